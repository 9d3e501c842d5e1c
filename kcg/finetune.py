"""From compiled to trained: gradient descent started at exact CG, and CG learned from random init.

Implementation and the maths in `kcg._src.finetune`. A `kcg.compile_cg` model trains with kcg's own
loss and optimizer (`kcg.training.loss_fn`, `make_optimizer`) from one of `MODES`: every weight
(`"plain"`), every weight but the division (`"freeze_reciprocal"`, `reciprocal_mask` from the
program's block identities), a learned gain per layer and head on frozen weights (`"gains"`,
`GainedTransformer`, exact at initialisation), the same gains trained only on the heads that
compute a value while bookkeeping and division stay at 1 (`"compute_gains"`, `compute_gain_mask`),
or the same architecture from random init (`"random"`). `fit(setup, run, directory)` trains, evaluates at checkpoints (`evaluate`: test error
against the KRR oracle, agreement with CG_t, y-linearity index, `reciprocal_error`,
`weight_distance`) and resumes; `Run(task="imitate")` trains to imitate CG_t ("learning CG").
`Setup(features="random_relu")` compiles a random-ReLU first layer and trains on targets linear in
those features (kcg.tasks' "relu_features"); the references are then KRR and CG on phi(x).
`experiments/finetune.py` runs the study. Measures read from inside the model (`kcg._src.finetune_measures`,
recorded by `evaluate` too): probes of CG's alpha, r, p at the compiled step-end layers
(`step_end_layers`, `state_probes`), agreement with every candidate solver (`candidate_predictions`,
`candidate_agreement`) and layer-wise matching (`layer_matching`).
"""

from kcg._src.finetune import CONSTRUCTIONS
from kcg._src.finetune import FEATURES
from kcg._src.finetune import MODES
from kcg._src.finetune import TASKS
from kcg._src.finetune import EvalSet
from kcg._src.finetune import FitResult
from kcg._src.finetune import Gain
from kcg._src.finetune import GainedTransformer
from kcg._src.finetune import Run
from kcg._src.finetune import Setup
from kcg._src.finetune import compute_gain_mask
from kcg._src.finetune import compile_setup
from kcg._src.finetune import eval_set
from kcg._src.finetune import evaluate
from kcg._src.finetune import fit
from kcg._src.finetune import imitation_batch_fn
from kcg._src.finetune import make_predict
from kcg._src.finetune import make_tx
from kcg._src.finetune import masked_updates
from kcg._src.finetune import random_model
from kcg._src.finetune import departure
from kcg._src.finetune import reciprocal_error
from kcg._src.finetune import reciprocal_errors
from kcg._src.finetune import reciprocal_mask
from kcg._src.finetune import reciprocal_parts
from kcg._src.finetune import start_model
from kcg._src.finetune import train_step
from kcg._src.finetune import weight_distance
from kcg._src.finetune_measures import CANDIDATES
from kcg._src.finetune_measures import PROBE_QUANTITIES
from kcg._src.finetune_measures import StateProbes
from kcg._src.finetune_measures import candidate_agreement
from kcg._src.finetune_measures import candidate_predictions
from kcg._src.finetune_measures import checkpoint_measures
from kcg._src.finetune_measures import layer_matching
from kcg._src.finetune_measures import model_residuals
from kcg._src.finetune_measures import state_probes
from kcg._src.finetune_measures import step_end_layers

__all__ = (
    "CONSTRUCTIONS", "FEATURES", "MODES", "TASKS", "EvalSet", "FitResult", "Gain", "GainedTransformer", "Run",
    "Setup", "compile_setup", "compute_gain_mask", "eval_set", "evaluate", "fit", "imitation_batch_fn", "make_predict",
    "make_tx", "masked_updates", "random_model", "departure", "reciprocal_error", "reciprocal_errors", "reciprocal_mask",
    "reciprocal_parts", "start_model", "train_step", "weight_distance",
    # Measures from inside the model (kcg._src.finetune_measures).
    "CANDIDATES", "PROBE_QUANTITIES", "StateProbes", "candidate_agreement", "candidate_predictions",
    "checkpoint_measures", "layer_matching", "model_residuals", "state_probes", "step_end_layers",
)
