"""The constructions beyond plain CG, measured: softmax Routes A and B, Jacobi PCG, Chebyshev,
width below the feature dimension, several outputs, and pre-LayerNorm's failing step; what one
plain CG step costs (layers, width, FLOPs) and the reciprocal's units-against-depth trade."""

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
from kcg._src.step_cost import ConstructionCost
from kcg._src.step_cost import TradeOff
from kcg._src.step_cost import construction_costs
from kcg._src.step_cost import construction_table
from kcg._src.step_cost import flops_per_token_per_step
from kcg._src.step_cost import newton_steps_needed
from kcg._src.step_cost import reciprocal_trade_off
from kcg._src.step_cost import trade_off_table

__all__ = [
    "ChebyshevVsCG", "ConstructionCost", "Departure", "MatvecError", "MultiOutputCost",
    "Preconditioning", "RouteA", "RouteError", "TradeOff", "WidthError", "chebyshev_vs_cg",
    "construction_costs", "construction_table", "converged_steps", "flops_per_token_per_step",
    "layernorm_departure", "multi_output_cost", "newton_steps_needed", "preconditioning",
    "reciprocal_trade_off", "route_a_error", "route_b_matvec_error", "route_b_prediction_error",
    "trade_off_table", "width_error",
]
