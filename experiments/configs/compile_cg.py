"""The README's main job: compile a CG transformer, run it on sampled prompts, compare, plot.

Run (from the repository root):

  python -m experiments.compile_cg --workdir=/tmp/kcg/compile_cg

Expected runtime: about 30 s on 2 CPU cores (mostly XLA compilation). Prints the table
(t, compiled error, reference CG error, their difference, theorem bound, test MSEs) and writes
`WORKDIR/results.json` and `WORKDIR/error_vs_t.png`.

Any field is a flag, e.g. `--config.num_support=64 --config.num_steps=64 --config.mask=prefix
--config.form=primal --config.ridge=0.01 --config.seed=3`. The tiny variant (a few seconds):

  python -m experiments.compile_cg --workdir=/tmp/kcg/compile_cg_local \
      --config=experiments/configs/compile_cg.py:runlocal

Default problem: anisotropic linear regression (input covariance with condition number 100),
identity features (phi(x) = x, p = d = 8), k = 32 supports, 8 queries, 16 prompts, ridge 0.1,
t = 0..32 CG steps (32 = k: exact termination in exact arithmetic), causal mask, dual form.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg="runlocal"` shrinks every size for a seconds-long smoke run."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.float64 = True
  config.task = ml_collections.ConfigDict()
  config.task.family = "linear_anisotropic"
  config.task.input_dim = 8
  config.task.num_support = 32
  config.task.num_query = 8
  config.task.batch_size = 16
  config.task.condition_number = 100.0
  config.task.noise_std = 0.1
  config.ridge = 0.1
  config.num_steps = 32
  config.mask = "causal"
  config.form = "dual"
  config.table_every = 2
  if arg == "runlocal":
    config.task.input_dim = 4
    config.task.num_support = 8
    config.task.num_query = 3
    config.task.batch_size = 4
    config.num_steps = 10
    config.table_every = 1
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config variant {arg!r}; use no argument or 'runlocal'.")
  return config
