"""Layer-wise algorithm matching: which algorithm and step each layer's read-out matches best."""

from kcg._src.matching import ALGORITHMS
from kcg._src.matching import LayerMatch
from kcg._src.matching import LinearReadout
from kcg._src.matching import Matching
from kcg._src.matching import READOUTS
from kcg._src.matching import SPACES
from kcg._src.matching import algorithm_trajectories
from kcg._src.matching import candidate_names
from kcg._src.matching import fit_linear_readout
from kcg._src.matching import implicit_weights_steps
from kcg._src.matching import layer_predictions
from kcg._src.matching import layer_predictor
from kcg._src.matching import match_layers
from kcg._src.matching import match_subject
from kcg._src.matching import newton_schulz_trajectory
from kcg._src.matching import trajectory

__all__ = (
    "ALGORITHMS",
    "LayerMatch",
    "LinearReadout",
    "Matching",
    "READOUTS",
    "SPACES",
    "algorithm_trajectories",
    "candidate_names",
    "fit_linear_readout",
    "implicit_weights_steps",
    "layer_predictions",
    "layer_predictor",
    "match_layers",
    "match_subject",
    "newton_schulz_trajectory",
    "trajectory",
)
