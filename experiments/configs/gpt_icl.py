"""GPT-style in-context learner on the function classes of Garg et al. (2022).

12 layers, width 256, 8 heads, softmax attention, GELU MLP of width 1024, pre-LayerNorm; d = 20,
41 points per prompt (k = 40 supports), batch 64; interleaved (x, y) tokens with the loss on every
prefix; curriculum growing the input dimension 5 -> 20 (+1) and the points 11 -> 41 (+2) every 2000
steps. `--config=...gpt_icl.py:FAMILY` picks the task family (linear, sparse_linear, relu_network,
decision_tree; default linear), e.g. `gpt_icl.py:relu_network` or `gpt_icl.py:decision_tree,runlocal`.
The final evaluation covers the out-of-distribution prompts of Garg et al. (queries orthogonal to the
supports, supports in one orthant or a subspace, skewed covariance, scaled inputs and outputs, added
noise).

Unlike the GPT-2 of Garg et al., kcg.Transformer has no positional embedding: the causal mask and the
x/y token flags are its only position information.

Run (500k steps as in the paper is GPU work: about 4-5 s per step was measured on a shared 2-core CPU
before kcg.Transformer unrolled short stacks; `python -m experiments.bench
--sections=training_throughput` times the step now against PyTorch, see BENCHMARKS.md; the first
step, compilation included, takes ~15 s):

    python -m experiments.train --config=experiments/configs/gpt_icl.py:linear --workdir=/tmp/gpt_icl

Smoke test (under a minute): `--config=experiments/configs/gpt_icl.py:linear,runlocal`.
"""

from experiments.configs import common

FAMILIES = ("linear", "sparse_linear", "relu_network", "decision_tree")
OOD_SHIFTS = ("orthant", "orthogonal_query", "subspace", "skewed_covariance", "scaled_inputs",
              "scaled_outputs", "added_noise")


def get_config(arg: str | None = None):
  parts = [a for a in (arg or "").split(",") if a]
  families = [p for p in parts if p in FAMILIES]
  if len(families) > 1:
    raise ValueError(f"Pick one task family, got {families}.")
  options = common.parse_arg(",".join(p for p in parts if p not in FAMILIES))
  config = common.base_config()
  config.model.num_layers = 12
  config.model.width = 256
  config.model.num_heads = 8
  config.model.head_dim = 32
  config.model.mlp_hidden = 1024
  config.model.attention = "softmax"
  config.model.activation = "gelu"
  config.model.norm = "layernorm"
  config.model.precision = "default"
  config.data.family = families[0] if families else "linear"
  config.data.input_dim = 20
  config.data.num_support = 40
  config.data.encoding = "every_prefix"
  config.data.mask = "causal"
  config.data.hidden_units = 100
  config.data.tree_depth = 4
  config.curriculum.input_dim_start = 5
  config.curriculum.input_dim_increment = 1
  config.curriculum.num_support_start = 10
  config.curriculum.num_support_increment = 2
  config.curriculum.interval = 2000
  config.num_steps = 500_000
  config.batch_size = 64
  config.optim.learning_rate = 1e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.clip_norm = 1.0
  config.log_every = 500
  config.eval_every = 10_000
  config.checkpoint_every = 5000
  config.eval_batch_size = 512
  config.eval_supports = (1, 5, 10, 20, 30, 40)
  config.ood_shifts = OOD_SHIFTS
  if "runlocal" in options:
    config.model.num_layers = 2
    config.model.width = 32
    config.model.num_heads = 2
    config.model.head_dim = 16
    config.model.mlp_hidden = 64
    config.data.input_dim = 6
    config.data.num_support = 10
    config.curriculum.input_dim_start = 3
    config.curriculum.num_support_start = 4
    config.curriculum.num_support_increment = 3
    common.runlocal(config, num_steps=8)
    config.curriculum.interval = 4  # Two curriculum stages: each one compiles its own sampler.
    config.ood_shifts = ("orthogonal_query", "scaled_inputs")
  return config
