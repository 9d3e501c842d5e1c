"""A-priori error bounds for CG, Chebyshev and GD on kernel ridge regression."""

from kcg._src.bounds import cg_error_bound
from kcg._src.bounds import cg_error_bound_kernel
from kcg._src.bounds import cg_rate
from kcg._src.bounds import chebyshev_error_bound
from kcg._src.bounds import chebyshev_factor
from kcg._src.bounds import condition_number
from kcg._src.bounds import condition_number_kernel
from kcg._src.bounds import gd_error_bound
from kcg._src.bounds import gd_rate

__all__ = (
    "cg_error_bound",
    "cg_error_bound_kernel",
    "cg_rate",
    "chebyshev_error_bound",
    "chebyshev_factor",
    "condition_number",
    "condition_number_kernel",
    "gd_error_bound",
    "gd_rate",
)
