"""Pretrained causal language models as in-context learners (needs `pip install -e ".[lm]"`).

The model is penzai's GPT-NeoX / Pythia implementation; kcg adds checkpoints on disk, prompts
written as text, readouts, per-layer hidden features and baselines (see `kcg._src.lm`):

* `load(DIR)` / `save(DIR, lm)` / `convert_huggingface(HF_DIR, DIR)` (conversion needs torch);
  `write_tiny_checkpoint(DIR)` writes the tiny random model the tests and `runlocal` use;
  `random_like(lm, key)` is the untrained control.
* `TextFormat`, `sample_classification`, `LEXICON`, `LABEL_WORDS`: tasks as text.
* `LMRegressor(lm)`: a predictor `(x_support [B,k,d], y_support [B,k], x_query [B,q,d]) -> [B,q]`;
  `classify(lm, fmt, prompts)`.
* `read_features(regressor, ...)` / `read_class_features(...)` -> `LMFeatures` (phi per layer).
* The alignment instruments of `kcg.alignment` on the LM: `hidden_features` (phi_l read under
  `kcg.alignment`'s reading names, `ALIGNMENT_READINGS`), `lm_smoother_weights` (finite differences,
  `finite_difference_weights`), `lm_y_nonlinearity`, and `analyse_lm(regressor, ..., LMSettings)`
  which runs them all (KRR on phi_l with bootstrap R^2, kernel alignment, smoother weights,
  y-linearity against CG_t); the random-init control is `analyse_lm` on `random_like(lm, key)`.
* `regression_baselines(d)`, `class_scores`: baselines on the raw inputs.
"""

try:
  import penzai as _penzai  # noqa: F401
  import tokenizers as _tokenizers  # noqa: F401
except ImportError as _e:  # pragma: no cover - exercised only without the extra
  raise ImportError("kcg.lm needs the lm extra: pip install -e '.[lm]' (penzai, tokenizers).") from _e

from kcg._src.lm.alignment import analyse_lm
from kcg._src.lm.alignment import check_step
from kcg._src.lm.alignment import finite_difference_weights
from kcg._src.lm.alignment import hidden_features
from kcg._src.lm.alignment import lm_smoother_weights
from kcg._src.lm.alignment import lm_y_nonlinearity
from kcg._src.lm.alignment import LMNonlinearity
from kcg._src.lm.alignment import LMSettings
from kcg._src.lm.alignment import READINGS as ALIGNMENT_READINGS
from kcg._src.lm.icl import ClassPrediction
from kcg._src.lm.icl import classify
from kcg._src.lm.icl import LABEL_MODES
from kcg._src.lm.icl import LMFeatures
from kcg._src.lm.icl import LMRegressor
from kcg._src.lm.icl import Prediction
from kcg._src.lm.icl import read_class_features
from kcg._src.lm.icl import read_features
from kcg._src.lm.icl import read_input_features
from kcg._src.lm.icl import READINGS
from kcg._src.lm.icl import TOKENS
from kcg._src.lm.model import build_random
from kcg._src.lm.model import convert_huggingface
from kcg._src.lm.model import FAMILIES
from kcg._src.lm.model import from_huggingface_model
from kcg._src.lm.model import LanguageModel
from kcg._src.lm.model import load
from kcg._src.lm.model import random_like
from kcg._src.lm.model import read_manifest
from kcg._src.lm.model import save
from kcg._src.lm.model import tiny_config
from kcg._src.lm.prompts import ClassificationPrompts
from kcg._src.lm.prompts import LABEL_WORDS
from kcg._src.lm.prompts import LEXICON
from kcg._src.lm.prompts import PLACEHOLDER
from kcg._src.lm.prompts import sample_classification
from kcg._src.lm.prompts import Sequences
from kcg._src.lm.prompts import TextFormat
from kcg._src.lm.readout import READOUTS
from kcg._src.lm.scores import class_scores
from kcg._src.lm.scores import rbf_kernel
from kcg._src.lm.scores import regression_baselines
from kcg._src.lm.tiny import tiny_model
from kcg._src.lm.tiny import write_tiny_checkpoint
from kcg._src.lm.tokenizer import Tokenizer
from kcg._src.lm.tokenizer import train_tiny_tokenizer

__all__ = (
    "ALIGNMENT_READINGS", "LMNonlinearity", "LMSettings", "analyse_lm", "check_step",
    "finite_difference_weights", "hidden_features", "lm_smoother_weights", "lm_y_nonlinearity",
    "ClassPrediction", "ClassificationPrompts", "FAMILIES", "LABEL_MODES", "LABEL_WORDS", "LEXICON",
    "LMFeatures", "LMRegressor", "LanguageModel", "PLACEHOLDER", "Prediction",
    "READINGS", "READOUTS", "Sequences", "TOKENS", "TextFormat", "Tokenizer", "build_random",
    "class_scores", "classify", "convert_huggingface", "from_huggingface_model", "load",
    "random_like", "rbf_kernel", "read_class_features", "read_features", "read_input_features",
    "read_manifest", "regression_baselines", "sample_classification", "save", "tiny_config",
    "tiny_model", "train_tiny_tokenizer", "write_tiny_checkpoint",
)
