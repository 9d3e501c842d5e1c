"""The formal-vs-learned study's sweeps and laws as library functions (numbers + a figure each)."""

from kcg._src.study import fitted_rate
from kcg._src.study import jsonable
from kcg._src.study_depth import DEPTH_SWEEP_SOLVERS
from kcg._src.study_depth import DepthPanel
from kcg._src.study_depth import chebyshev_eig_bounds
from kcg._src.study_depth import compiled_solvers
from kcg._src.study_depth import depth_comparison
from kcg._src.study_depth import depth_sweep
from kcg._src.study_laws import depth_law
from kcg._src.study_laws import failure_modes
from kcg._src.study_laws import feature_perturbation
from kcg._src.study_laws import perturbation_bound
from kcg._src.study_laws import solver_sweep
from kcg._src.study_laws import temperature_sweep
from kcg._src.study_laws import width_sweep
from kcg._src.study_subjects import compiled_ablation_table
from kcg._src.study_subjects import matching_study
from kcg._src.study_subjects import probe_study
from kcg._src.study_subjects import trained_ablation

__all__ = (
    "DEPTH_SWEEP_SOLVERS",
    "DepthPanel",
    "chebyshev_eig_bounds",
    "compiled_ablation_table",
    "compiled_solvers",
    "depth_comparison",
    "depth_law",
    "depth_sweep",
    "failure_modes",
    "feature_perturbation",
    "fitted_rate",
    "jsonable",
    "matching_study",
    "perturbation_bound",
    "probe_study",
    "solver_sweep",
    "temperature_sweep",
    "trained_ablation",
    "width_sweep",
)
