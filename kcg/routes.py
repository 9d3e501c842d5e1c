"""The constructions beyond plain CG, measured: softmax Routes A and B, Jacobi PCG, Chebyshev,
width below the feature dimension, several outputs, and pre-LayerNorm's failing step."""

from kcg._src.prenorm import Departure
from kcg._src.prenorm import layernorm_departure
from kcg._src.routes import ChebyshevVsCG
from kcg._src.routes import MatvecError
from kcg._src.routes import MultiOutputCost
from kcg._src.routes import Preconditioning
from kcg._src.routes import RouteA
from kcg._src.routes import RouteError
from kcg._src.routes import WidthError
from kcg._src.routes import chebyshev_vs_cg
from kcg._src.routes import converged_steps
from kcg._src.routes import multi_output_cost
from kcg._src.routes import preconditioning
from kcg._src.routes import route_a_error
from kcg._src.routes import route_b_matvec_error
from kcg._src.routes import route_b_prediction_error
from kcg._src.routes import width_error

__all__ = [
    "ChebyshevVsCG", "Departure", "MatvecError", "MultiOutputCost", "Preconditioning", "RouteA",
    "RouteError", "WidthError", "chebyshev_vs_cg", "converged_steps", "layernorm_departure",
    "multi_output_cost", "preconditioning", "route_a_error", "route_b_matvec_error",
    "route_b_prediction_error", "width_error",
]
