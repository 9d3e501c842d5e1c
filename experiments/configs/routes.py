"""Beyond plain CG: softmax Routes A and B, Jacobi PCG and Chebyshev, measured against theory.

Run (from the repository root):

  python -m experiments.routes --workdir=/tmp/kcg_runs/routes

Expected runtime: about 4 minutes on 2 CPU cores (each (heads, temperature) pair compiles a model).
Writes `WORKDIR/results.json` and seven PNGs: `route_b_epsilon.png` (mat-vec error eps against
temperature per head count), `route_b_error_vs_t.png` (prediction error against t with
`CG error + C eps t`), `route_a_error_vs_t.png`, `pcg_vs_cg.png`, `chebyshev_vs_cg.png`, and
`width.png` (compiled width-m models, m < p, against `kcg.sketch`'s bound and spectral-tail estimate),
`multi_output.png` (r independent CGs against block CG); the JSON also holds the pre-norm check
(RMSNorm bit-for-bit, and where LayerNorm departs).

The tiny variant used by the test (about 40 s):

  python -m experiments.routes --workdir=/tmp/kcg_runs/routes_local \
      --config=experiments/configs/routes.py:runlocal
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch = 8
  config.num_support = 16
  config.feature_dim = 3
  config.num_query = 4
  config.num_steps = 16
  config.ridge = 0.5
  config.heads = (1, 2, 3)
  config.temperatures = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
  config.route_b_curves = ((1, 100.0), (2, 30.0), (2, 300.0), (3, 100.0))
  config.route_a_temperatures = (1.0, 3.0)
  # Jacobi PCG: support norms spread over e^{+-spread}, p > k so that K is full rank.
  config.pcg_num_support = 24
  config.pcg_feature_dim = 32
  config.pcg_norm_spread = 2.0
  # Width m < p: principal sketches of a known second moment with eigenvalues decay^(2i).
  config.width_num_support = 16
  config.width_feature_dim = 12
  config.width_decay = 0.6
  config.width_ridge = 0.1
  config.width_form = "primal"
  config.widths = (1, 2, 4, 6, 8, 10, 12)
  # Several outputs: full-rank K (p > k), block CG needs ~k/r steps, independent CGs ~k.
  config.outputs = (2, 4)
  config.outputs_num_support = 16
  config.outputs_feature_dim = 24
  config.outputs_num_steps = 18
  if arg == "runlocal":
    config.batch = 3
    config.num_support = 8
    config.num_steps = 8
    config.heads = (1, 2)
    config.temperatures = (10.0, 100.0)
    config.route_b_curves = ((2, 100.0),)
    config.route_a_temperatures = (2.0,)
    config.pcg_num_support = 8
    config.pcg_feature_dim = 12
    config.width_num_support = 6
    config.width_feature_dim = 6
    config.widths = (1, 3, 6)
    config.outputs = (2,)
    config.outputs_num_support = 6
    config.outputs_feature_dim = 8
    config.outputs_num_steps = 7
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config variant {arg!r}; use no argument or 'runlocal'.")
  return config
