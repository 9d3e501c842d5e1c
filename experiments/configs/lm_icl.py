"""A pretrained causal LM as an in-context learner: numeric regression and classification as text.

Run (from the repository root; needs `pip install -e ".[lm]"`):

  python -m experiments.lm_icl --workdir=/tmp/kcg/lm_icl \
      --config=experiments/configs/lm_icl.py --config.model.checkpoint=/path/to/pythia-160m-kcg

`--config.model.checkpoint` is a kcg LM checkpoint directory (`kcg.lm.convert_huggingface` makes one
from a Hugging Face GPT-NeoX / Pythia download; BUILD.md says how). Without it the binary writes the
tiny random GPT-NeoX into `WORKDIR/tiny_checkpoint` and runs on that: a pipeline check whose report
says so at the top, never a finding about language models.

Tiny variant (what the tests run; measured 65 s CPU, 7.3 min wall on 2 cores under a load of ~24,
i.e. 15% of a core; about 1-1.5 min on an idle machine; limit 5 min):

  python -m experiments.lm_icl --workdir=/tmp/kcg/lm_icl_local \
      --config=experiments/configs/lm_icl.py:runlocal

Default scale: 2 task families x d in {1, 2, 4} x k in {4, 8, 16, 32}, 32 prompts x 4 queries per
cell, both readouts, the random-init control; the alignment instruments (`kcg.lm.analyse_lm`) at
k = 16, d = 2 on 32 evaluation + 32 fit prompts, four readings, smoother weights on 8 prompts, on the
LM and the control; classification with number and word inputs: 8.7e6 tokens through the model
(`experiments.lm_bench` counts them; 4.5e6 of them the instruments). On a Pythia-160m-shaped model
`experiments.lm_bench` measured 135 tokens/s on 2 loaded CPU cores (~18 h for this scale, ~13 h
with `--config.regression.readouts='("expected",)'`); Pythia-70m 411 tokens/s (~6 h, ~4 h). On one
GPU, ~1.5e15 FLOPs are minutes (an estimate: no real weights or GPU were available where kcg is
developed).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg="runlocal"` shrinks it to the tests' pipeline check."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict()
  config.model.checkpoint = config_dict.placeholder(str)  # None: write and use the tiny random LM
  config.model.activation_dtype = "float32"
  config.model.chunk_size = 32
  config.format = ml_collections.ConfigDict()
  config.format.input_decimals = 2
  config.format.label_scale = 10.0
  config.format.label_offset = 50.0
  config.format.label_max = 99
  config.regression = ml_collections.ConfigDict()
  config.regression.families = ("linear", "relu_network")
  config.regression.input_dims = (1, 2, 4)
  config.regression.num_supports = (4, 8, 16, 32)
  config.regression.num_query = 4
  config.regression.batch_size = 32
  config.regression.readouts = ("expected", "greedy")
  config.regression.max_new_tokens = 3
  config.features = ml_collections.ConfigDict()
  # The alignment instruments (kcg.lm.analyse_lm) on evaluation prompts, with held-out fit prompts.
  config.features.num_support = 16
  config.features.input_dim = 2
  config.features.num_query = 4
  config.features.batch_size = 32
  config.features.num_fit_prompts = 32
  # kcg.lm.ALIGNMENT_READINGS; "placeholder_labels" (labels written as "?") costs as much as
  # "zero_labels" and runlocal runs it.
  config.features.readings = ("zero_labels", "other_labels", "context_free", "with_labels")
  config.features.token = "last"
  config.features.relative_ridges = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
  config.features.fd_step = 0.5  # a multiple of the label resolution (1 / format.label_scale)
  config.features.smoother_prompts = 8
  config.features.cg_steps = 8
  config.classification = ml_collections.ConfigDict()
  config.classification.inputs = ("numbers", "words")
  config.classification.num_classes = 3
  config.classification.num_support = 12
  config.classification.num_query = 4
  config.classification.batch_size = 32
  config.classification.input_dim = 2
  config.baselines = ml_collections.ConfigDict()
  config.baselines.ridge = 0.1
  config.baselines.gd_steps = 8
  config.baselines.num_neighbors = 3
  config.random_control = True
  config.num_bootstrap = 1000
  if arg == "runlocal":
    config.regression.input_dims = (1, 2)
    config.regression.num_supports = (4, 8)
    config.regression.num_query = 3
    config.regression.batch_size = 8
    config.features.num_support = 8
    config.features.num_query = 3
    config.features.batch_size = 8
    config.features.num_fit_prompts = 8
    config.features.smoother_prompts = 4
    config.features.readings = ("zero_labels", "other_labels", "placeholder_labels", "context_free",
                                "with_labels")
    config.features.cg_steps = 4
    config.classification.num_support = 6
    config.classification.num_query = 2
    config.classification.batch_size = 8
    config.num_bootstrap = 200
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config variant {arg!r}; use no argument or 'runlocal'.")
  return config
