"""A deep linear-attention transformer (no MLP, no norm) on anisotropic linear regression.

Inputs `x ~ N(0, Sigma)` with condition number 30 in a fixed eigenbasis (`input_rotation="fixed"`, so
the model can learn a preconditioner, as multi-layer linear transformers do: Ahn et al. 2023).
d = 8, k = 32, depth 4, 2 heads of size 16. Compare `eval.json`'s model mse with `gd_L`, `cg_L` and
the `krr_oracle`; change the depth with `--config.model.num_layers=L` and the conditioning with
`--config.data.condition_number=C`.

Measured (this config, 4000 steps, shared 2-core CPU; noiseless targets, so the oracle's mse is ~1e-8):

    depth L      1       2       4       8
    model mse    0.19    0.016   0.0025  0.0014
    cg_L mse     0.30    0.13    0.022   8.6e-5
    wall time    54 s    110 s   140 s   130 s

Run (about 2-3 minutes on 2 CPU cores):

    python -m experiments.train --config=experiments/configs/linear_deep.py --workdir=/tmp/linear_deep

Smoke test (seconds): `--config=experiments/configs/linear_deep.py:runlocal`.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  options = common.parse_arg(arg)
  config = common.base_config()
  config.model.num_layers = 4
  config.model.attention = "linear"
  config.model.mlp_hidden = 0
  config.model.norm = None
  # The 1/n normalisation of linear self-attention (n = k supports + the aggregator token) and a
  # smaller q/k/v initialisation keep the cubic attention map near the identity at the start.
  config.model.attention_scale = 1.0 / (32 + 1)
  config.model.qkv_init_scale = 0.5
  config.model.width = 32
  config.model.num_heads = 2
  config.model.head_dim = 16
  config.data.family = "linear_anisotropic"
  config.data.condition_number = 30.0
  config.data.input_rotation = "fixed"
  config.data.input_dim = 8
  config.data.num_support = 32
  config.data.num_query = 4
  config.data.encoding = "query"
  config.data.mask = "prefix"
  config.num_steps = 4000
  config.batch_size = 64
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.clip_norm = 1.0
  config.log_every = 1000
  config.checkpoint_every = 1000
  config.eval_batch_size = 512
  if "runlocal" in options:
    common.runlocal(config)
  return config
