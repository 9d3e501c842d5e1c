"""Reference KRR solvers: closed form (Cholesky) and iterative (CG, PCG, GD, Chebyshev) with traces."""

from kcg._src.block_cg import BlockCGTrace
from kcg._src.block_cg import block_cg
from kcg._src.block_cg import block_cg_predict
from kcg._src.block_cg import scaled_pseudo_inverse
from kcg._src.krr import krr_alpha
from kcg._src.krr import krr_alpha_kernel
from kcg._src.krr import krr_predict
from kcg._src.krr import krr_predict_kernel
from kcg._src.krr import spectrum_bounds
from kcg._src.solvers import SolverTrace
from kcg._src.solvers import cg
from kcg._src.solvers import cg_predict
from kcg._src.solvers import chebyshev
from kcg._src.solvers import chebyshev_predict
from kcg._src.solvers import gd
from kcg._src.solvers import gd_predict
from kcg._src.solvers import jacobi_diagonal
from kcg._src.solvers import optimal_gd_step
from kcg._src.solvers import pcg
from kcg._src.solvers import pcg_predict
from kcg._src.solvers import primal_cg
from kcg._src.solvers import primal_cg_predict

__all__ = (
    "BlockCGTrace",
    "SolverTrace",
    "block_cg",
    "block_cg_predict",
    "scaled_pseudo_inverse",
    "cg",
    "cg_predict",
    "chebyshev",
    "chebyshev_predict",
    "gd",
    "gd_predict",
    "jacobi_diagonal",
    "krr_alpha",
    "krr_alpha_kernel",
    "krr_predict",
    "krr_predict_kernel",
    "optimal_gd_step",
    "pcg",
    "pcg_predict",
    "primal_cg",
    "primal_cg_predict",
    "spectrum_bounds",
)
