"""In-context regression prompts: the task ladder (see `kcg._src.tasks` for the families' maths)."""

from kcg._src.tasks import FAMILIES
from kcg._src.tasks import GLM_TARGETS
from kcg._src.tasks import INPUT_ROTATIONS
from kcg._src.tasks import input_covariance_eigenvalues
from kcg._src.tasks import MIXTURE_MODES
from kcg._src.tasks import Prompts
from kcg._src.tasks import RELU_FEATURES_WEIGHT_VARIANCE
from kcg._src.tasks import relu_feature_params
from kcg._src.tasks import sample
from kcg._src.tasks import sample_targets
from kcg._src.tasks import SHIFTS
from kcg._src.tasks import TaskConfig
from kcg._src.tasks import with_shift

__all__ = (
    "FAMILIES",
    "GLM_TARGETS",
    "INPUT_ROTATIONS",
    "MIXTURE_MODES",
    "Prompts",
    "RELU_FEATURES_WEIGHT_VARIANCE",
    "SHIFTS",
    "TaskConfig",
    "input_covariance_eigenvalues",
    "relu_feature_params",
    "sample",
    "sample_targets",
    "with_shift",
)
