"""Do trained transformers run KRR, by CG, on their own hidden features? The instruments.

Pure functions (implementation in `kcg._src.alignment_*`). The core ones take arrays, so they apply
to any model; thin adapters read them from a `kcg.probes.Subject` (compiled or trained).

* Hidden features (`hidden_features`, `READINGS`): phi_l(x) of every support and query input at every
  layer, read at a query token so that it cannot carry the answer (labels withheld or taken from
  another prompt, or no supports at all); `"with_labels"` is the circular control. `ResidualMap`,
  `standardizing_map`, `channel_map`: fixed linear read-outs of the residual stream.
* KRR on features (`krr_predict`, `kernel_krr_predict`, `select_ridge`, `relative_ridges`; the best
  linear kernel on them, `fit_metric`) and the
  agreement with a model's predictions (`agreement`: pooled R^2 with a bootstrap interval, relative
  distance); `shuffled_pairs` pairs each prompt with another one (the shuffled control).
* Candidates on a feature space, step by step (`trajectories`, `fit_candidates`, `CANDIDATES`): CG,
  PCG, GD, Chebyshev, Newton-Schulz, and GD++ (preconditioned GD), heavy-ball momentum and the best
  fixed polynomial in the Gram matrix, fitted to the task distribution.
* Kernel alignment (`kernel_alignment`, `linear_gram`, `gaussian_kernel`, `arccos_kernel`).
* Smoother weights (`smoother_weights` of any predictor, `krr_smoother_weights`, `weight_cosine`).
* The y-linearity signature (`y_nonlinearity`): 0 for every predictor affine in the labels, > 0 for
  CG and PCG.
* Grafting (`build_graft`, `Graft`, `graft_predict_steps`): a model's first l layers, a linear map,
  then a compiled CG transformer.
* The study of one model (`analyse_subject` with `Settings`, `task_info`, `compiled_references`) and
  its figures (`agreement_figure`, `alignment_figure`, `graft_figure`), as `experiments/alignment.py`
  runs them.
"""

from kcg._src.alignment_candidates import CANDIDATES
from kcg._src.alignment_candidates import FITTED
from kcg._src.alignment_candidates import FeatureProblem
from kcg._src.alignment_candidates import FittedCandidates
from kcg._src.alignment_candidates import LINEAR_IN_Y
from kcg._src.alignment_candidates import PER_PROMPT
from kcg._src.alignment_candidates import fit_candidates
from kcg._src.alignment_candidates import trajectories
from kcg._src.alignment_features import READINGS
from kcg._src.alignment_features import HiddenFeatures
from kcg._src.alignment_features import ResidualMap
from kcg._src.alignment_features import channel_map
from kcg._src.alignment_features import context_free_residuals
from kcg._src.alignment_features import hidden_features
from kcg._src.alignment_features import standardizing_map
from kcg._src.alignment_graft import Graft
from kcg._src.alignment_graft import build_graft
from kcg._src.alignment_graft import compiled_solver
from kcg._src.alignment_graft import graft_map
from kcg._src.alignment_graft import graft_predict_steps
from kcg._src.alignment_plots import agreement_figure
from kcg._src.alignment_plots import alignment_figure
from kcg._src.alignment_plots import graft_figure
from kcg._src.alignment_metric import FittedMetric
from kcg._src.alignment_metric import fit_metric
from kcg._src.alignment_study import VERSION as ANALYSIS_VERSION
from kcg._src.alignment_study import Settings
from kcg._src.alignment_study import TaskInfo
from kcg._src.alignment_study import analyse_subject
from kcg._src.alignment_study import compiled_references
from kcg._src.alignment_study import rbf_on_features
from kcg._src.alignment_study import task_info
from kcg._src.alignment_measures import Agreement
from kcg._src.alignment_measures import Nonlinearity
from kcg._src.alignment_measures import RidgeChoice
from kcg._src.alignment_measures import agreement
from kcg._src.alignment_measures import arccos_kernel
from kcg._src.alignment_measures import gaussian_kernel
from kcg._src.alignment_measures import kernel_alignment
from kcg._src.alignment_measures import kernel_krr_predict
from kcg._src.alignment_measures import krr_predict
from kcg._src.alignment_measures import krr_smoother_weights
from kcg._src.alignment_measures import linear_gram
from kcg._src.alignment_measures import relative_ridges
from kcg._src.alignment_measures import select_ridge
from kcg._src.alignment_measures import shuffled_pairs
from kcg._src.alignment_measures import smoother_weights
from kcg._src.alignment_measures import weight_cosine
from kcg._src.alignment_measures import y_nonlinearity

__all__ = (
    "ANALYSIS_VERSION", "FittedMetric", "fit_metric", "Settings", "TaskInfo", "agreement_figure", "alignment_figure", "analyse_subject",
    "compiled_references", "graft_figure", "rbf_on_features", "task_info",
    "Agreement", "CANDIDATES", "FITTED", "FeatureProblem", "FittedCandidates", "Graft",
    "HiddenFeatures", "LINEAR_IN_Y", "Nonlinearity", "PER_PROMPT", "READINGS", "ResidualMap",
    "RidgeChoice", "agreement", "arccos_kernel", "build_graft", "channel_map", "compiled_solver",
    "context_free_residuals", "fit_candidates", "gaussian_kernel", "graft_map", "graft_predict_steps",
    "hidden_features", "kernel_alignment", "kernel_krr_predict", "krr_predict", "krr_smoother_weights",
    "linear_gram", "relative_ridges", "select_ridge", "shuffled_pairs", "smoother_weights",
    "standardizing_map", "trajectories", "weight_cosine", "y_nonlinearity",
)
