"""Reference in-context predictors `(x_support [B,k,d], y_support [B,k], x_query [B,q,d]) -> [B,q]`."""

from kcg._src.baselines import ALGORITHMS
from kcg._src.baselines import AVERAGING_KINDS
from kcg._src.baselines import averaging
from kcg._src.baselines import BASELINES
from kcg._src.baselines import cg_steps
from kcg._src.baselines import chebyshev_steps
from kcg._src.baselines import default_suite
from kcg._src.baselines import gd_steps
from kcg._src.baselines import get
from kcg._src.baselines import knn
from kcg._src.baselines import krr_oracle
from kcg._src.baselines import least_squares
from kcg._src.baselines import LOSS_REDUCTIONS
from kcg._src.baselines import one_step_gd
from kcg._src.baselines import pcg_steps
from kcg._src.baselines import Predictor
from kcg._src.baselines import ridge
from kcg._src.baselines import SPACES
from kcg._src.baselines import trajectory

__all__ = (
    "ALGORITHMS",
    "AVERAGING_KINDS",
    "BASELINES",
    "LOSS_REDUCTIONS",
    "Predictor",
    "SPACES",
    "averaging",
    "cg_steps",
    "chebyshev_steps",
    "default_suite",
    "gd_steps",
    "get",
    "knn",
    "krr_oracle",
    "least_squares",
    "one_step_gd",
    "pcg_steps",
    "ridge",
    "trajectory",
)
