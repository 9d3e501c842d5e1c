"""Reference convergence of CG, Jacobi-PCG, GD and Chebyshev on KRR over sampled in-context prompts.

Run (from the repository root):

  python -m experiments.reference_convergence --workdir=/tmp/kcg/reference_convergence

Expected runtime: about 15 s on 2 CPU cores, most of it XLA compilation. Writes
`WORKDIR/results.json` and `WORKDIR/convergence.png` and prints the convergence table.

The tiny variant used by the test (about 5 s):

  python -m experiments.reference_convergence --workdir=/tmp/kcg/reference_convergence_local \
      --config=experiments/configs/reference_convergence.py:runlocal

Default problem: anisotropic linear regression (input covariance with condition number 100),
identity features (`phi(x) = x`, `p = d = 8`), `k = 32` supports, 8 queries, a batch of 16 prompts,
ridge 0.1, steps `t = 0..40`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg="runlocal"` shrinks every size for a seconds-long smoke run."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # float64 so that the errors can be followed down to ~1e-15 relative.
  config.float64 = True

  # Fields of kcg.tasks.TaskConfig.
  config.task = ml_collections.ConfigDict()
  config.task.family = "linear_anisotropic"
  config.task.input_dim = 8
  config.task.num_support = 32
  config.task.num_query = 8
  config.task.batch_size = 16
  config.task.condition_number = 100.0
  config.task.noise_std = 0.0

  # A kcg.features map by name, with its constructor's keyword arguments.
  config.features = ml_collections.ConfigDict()
  config.features.name = "identity"
  config.features.kwargs = ml_collections.ConfigDict()

  config.ridge = 0.1
  config.num_steps = 40
  # Rows of the printed table: every `table_every` steps, plus the last.
  config.table_every = 4

  if arg == "runlocal":
    config.task.input_dim = 4
    config.task.num_support = 8
    config.task.num_query = 4
    config.task.batch_size = 4
    config.num_steps = 10
    config.table_every = 2
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config variant {arg!r}; use no argument or 'runlocal'.")
  return config
