"""One-layer linear self-attention (no MLP, no norm) on isotropic linear regression, d = 10, k = 20.

The classic setting in which a trained linear self-attention layer implements one step of gradient
descent with a learned step size (von Oswald et al. 2023; Ahn et al. 2023). For Gaussian inputs the
best one-step-GD predictor has step eta* = 1 / (k + d + 1) in `f(x) = eta x^T X^T y` and mean squared
error (d + 1) / (k + d + 1) = 11/31 = 0.355 (targets have unit variance); `eval.json` reports the fitted
GD step (`gd_fit`, `kcg.evaluation.fit_gd_step`, convention `f = eta x^T X^T y / k`, so theory says
eta = k / (k + d + 1) = 0.645) and how much of the predictions it explains.

Measured at this default (seed 0, 1024 held-out prompts x 4 queries): model mse 0.3505; fitted
eta = 0.6465; one GD step with that eta reproduces the model's predictions to 1.0% relative error
(pooled R^2 = 0.9999; a preconditioned step Gamma [d, d]: 0.57%).

Run (measured 2 min 37 s wall, 110 s CPU, on a shared 2-core CPU: ~150 steps/s; the loss reaches
its plateau after ~2000 steps):

    python -m experiments.train --config=experiments/configs/lsa_linear.py --workdir=/tmp/lsa_linear

Smoke test (seconds): `--config=experiments/configs/lsa_linear.py:runlocal`.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  options = common.parse_arg(arg)
  config = common.base_config()
  config.model.num_layers = 1
  config.model.attention = "linear"
  config.model.mlp_hidden = 0
  config.model.norm = None
  # The 1/n normalisation of linear self-attention (n = k supports + the aggregator token) and a
  # smaller q/k/v initialisation keep the cubic attention map near the identity at the start.
  config.model.attention_scale = 1.0 / (20 + 1)
  config.model.qkv_init_scale = 0.5
  config.model.width = 32
  config.model.num_heads = 1
  config.model.head_dim = 32
  config.data.family = "linear"
  config.data.input_dim = 10
  config.data.num_support = 20
  config.data.num_query = 4
  config.data.encoding = "query"
  config.data.mask = "prefix"
  config.num_steps = 20_000
  config.batch_size = 128
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 500
  config.optim.schedule = "cosine"
  config.optim.clip_norm = 1.0
  config.log_every = 1000
  config.checkpoint_every = 5000
  config.eval_batch_size = 1024
  if "runlocal" in options:
    common.runlocal(config)
  return config
