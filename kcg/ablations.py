"""Ablations: remove heads or layers (by their op in compiled models) and compare with the damaged algorithm."""

from kcg._src.ablations import Ablation
from kcg._src.ablations import AblationReport
from kcg._src.ablations import Damage
from kcg._src.ablations import Degradation
from kcg._src.ablations import DegradationMap
from kcg._src.ablations import HEALTHY
from kcg._src.ablations import OPERATIONS
from kcg._src.ablations import ablate_compiled
from kcg._src.ablations import available_operations
from kcg._src.ablations import damaged_cg_predict
from kcg._src.ablations import damaged_chebyshev_predict
from kcg._src.ablations import damaged_pcg_predict
from kcg._src.ablations import degradation
from kcg._src.ablations import degradation_map
from kcg._src.ablations import find_heads
from kcg._src.ablations import find_layers
from kcg._src.ablations import masks
from kcg._src.ablations import operation_ablation
from kcg._src.ablations import reference_predict
from kcg._src.ablations import step_layers

__all__ = (
    "Ablation",
    "AblationReport",
    "Damage",
    "Degradation",
    "DegradationMap",
    "HEALTHY",
    "OPERATIONS",
    "ablate_compiled",
    "available_operations",
    "damaged_cg_predict",
    "damaged_chebyshev_predict",
    "damaged_pcg_predict",
    "degradation",
    "degradation_map",
    "find_heads",
    "find_layers",
    "masks",
    "operation_ablation",
    "reference_predict",
    "step_layers",
)
