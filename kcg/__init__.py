"""kcg: transformers that run kernel ridge regression by conjugate gradient, compiled and learned.

Public API (implementation lives in `kcg._src`):

* `kcg.compile_cg(k, p, t, ridge, ...)` -> a `CompiledCG` with `.model`, `.params`, `.predict`;
  `kcg.compile_chebyshev(k, p, t, ridge, eig_bounds=(lo, hi))` the division-free solver.
* `kcg.Transformer`, `kcg.ModelConfig`: the one model class, compiled or trained.
* `kcg.prompt`: prompt encoding (`make_layout`, `encode`, `query_outputs`).
* `kcg.solvers`, `kcg.bounds`, `kcg.kernels`, `kcg.problems`: reference numerics.
* `kcg.sketch`: width below the feature dimension (m < p): projections, sketched KRR f_m and its
  error bound; `kcg.routes`: the beyond-CG routes measured (Route B error, PCG, Chebyshev, width,
  multi-output cost, pre-norm).
* `kcg.tasks`, `kcg.features`: in-context task ladder and feature maps.
* `kcg.training`, `kcg.load_trained(DIR)`: training the same model class with optax; loading it back.
* `kcg.baselines`, `kcg.evaluation`: reference in-context predictors and similarity measures.
* `kcg.probes`, `kcg.ablations`, `kcg.matching`, `kcg.study`: formal vs learned (probes with
  controls, ablations against the damaged algorithm, layer-wise matching, the study's laws).
* `kcg.alignment`: do trained models run KRR, by CG, on their own hidden features (readings of
  phi_l, KRR and candidates on it, kernel alignment, smoother weights, y-linearity, grafting).
* `kcg.finetune`: from compiled to trained (fine-tuning compiled CG, learning CG from random init).
* `kcg.ops`: what each head and block of a compiled program computes (`Op`), which construction
  it is (`Construction`).
* `kcg.analysis`, `kcg.plotting`: compiled-vs-reference comparisons; headless plots and the style
  helpers every kcg figure uses.
* `kcg.lm`: pretrained causal LMs (penzai) as in-context learners; imported on first use, needs
  `pip install -e ".[lm]"`.

The API reference (`mkdocs serve`, pages in docs/) is generated from these modules' docstrings.
"""

from kcg import ablations
from kcg import alignment
from kcg import analysis
from kcg import baselines
from kcg import bounds
from kcg import evaluation
from kcg import features
from kcg import finetune
from kcg import kernels
from kcg import matching
from kcg import ops
from kcg import plotting
from kcg import probes
from kcg import problems
from kcg import prompt
from kcg import routes
from kcg import sketch
from kcg import solvers
from kcg import study
from kcg import tasks
from kcg import training
from kcg._src.compiler import CompiledCG
from kcg._src.compiler import CompiledState
from kcg._src.compiler import Dimensions
from kcg._src.compiler import compile_cg
from kcg._src.compiler import compile_chebyshev
from kcg._src.compiler import dimensions
from kcg._src.model import ForwardOutput
from kcg._src.model import ModelConfig
from kcg._src.model import Transformer
from kcg._src.trained import TrainedModel
from kcg._src.trained import load_trained

__version__ = "0.1.0"


def __getattr__(name: str):
  # kcg.lm needs the optional `lm` extra (penzai), so `import kcg` must not import it.
  if name == "lm":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("kcg.lm")
  raise AttributeError(f"module 'kcg' has no attribute {name!r}")

__all__ = [
    "ablations", "alignment", "analysis", "baselines", "evaluation", "finetune", "matching", "ops",
    "plotting", "probes", "study",
    "CompiledCG", "CompiledState", "Dimensions", "ForwardOutput", "ModelConfig", "Transformer",
    "bounds", "compile_cg", "compile_chebyshev", "dimensions", "features", "kernels", "problems", "prompt", "routes", "sketch", "solvers",
    "tasks", "training", "TrainedModel", "load_trained",
]
