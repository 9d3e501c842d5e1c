"""Linear probes from residual streams to the CG state, with shuffled-target and random-init controls."""

from kcg._src.probes import LayerProbes
from kcg._src.probes import ProbeGrid
from kcg._src.probes import ProbeResult
from kcg._src.probes import ProbeScore
from kcg._src.probes import QUANTITIES
from kcg._src.probes import SITES
from kcg._src.probes import StateTargets
from kcg._src.probes import Subject
from kcg._src.probes import compiled_state_site
from kcg._src.probes import cross_validated_probe
from kcg._src.probes import predict_fn
from kcg._src.probes import probe
from kcg._src.probes import probe_grid
from kcg._src.probes import probe_layers
from kcg._src.probes import probe_subject
from kcg._src.probes import random_init_like
from kcg._src.probes import residuals
from kcg._src.probes import site_features
from kcg._src.probes import site_targets
from kcg._src.probes import state_targets
from kcg._src.probes import subject_from_compiled
from kcg._src.probes import subject_from_model
from kcg._src.probes import subject_from_trained

__all__ = (
    "LayerProbes",
    "ProbeGrid",
    "ProbeResult",
    "ProbeScore",
    "QUANTITIES",
    "SITES",
    "StateTargets",
    "Subject",
    "compiled_state_site",
    "cross_validated_probe",
    "predict_fn",
    "probe",
    "probe_grid",
    "probe_layers",
    "probe_subject",
    "random_init_like",
    "residuals",
    "site_features",
    "site_targets",
    "state_targets",
    "subject_from_compiled",
    "subject_from_model",
    "subject_from_trained",
)
