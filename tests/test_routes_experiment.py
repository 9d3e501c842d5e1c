"""experiments/routes.py at its runlocal size: every construction beyond plain CG, measured."""

import json

import numpy as np

from experiments import routes
from experiments.configs import routes as routes_config


def test_runlocal_measures_every_route(tmp_path):
  results = routes.run(routes_config.get_config("runlocal"), str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  for name in ("route_b_epsilon", "route_b_error_vs_t", "route_a_error_vs_t", "pcg_vs_cg",
               "chebyshev_vs_cg", "width", "multi_output"):
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
  eps = saved["route_b_epsilon"]
  # Ten times the temperature: ~10x smaller eps with one head, ~100x with two (Richardson).
  assert 3 < eps["h=1"][0] / eps["h=1"][1] < 30
  assert 30 < eps["h=2"][0] / eps["h=2"][1] < 300
  # Route A reaches exponential-kernel KRR; Jacobi shrinks kappa and PCG beats CG here.
  assert saved["route_a"][0]["compiled_vs_reference"][-1] < 1e-8
  pre = saved["preconditioning"]
  assert pre["kappa_preconditioned_median"] < pre["kappa_median"] / 5
  assert pre["pcg_error"][-1] < pre["cg_error"][-1]
  assert saved["chebyshev"]["layers_per_step"] == {"chebyshev": 1, "cg": 9}
  assert np.isfinite(results["route_b_curves"][0]["constant_C"])
  # Width m < p: each compiled width-m model is sketched KRR (float64 CG run to convergence), the
  # sketch bound holds at every query, m = p loses nothing, and the model is narrower for m < p.
  width = saved["width"]
  assert max(width["compiled_vs_reference"]) < 1e-10
  assert all(r <= 1 for r in width["max_ratio"] if r is not None)
  assert width["compiled_vs_full"][-1] < 1e-10 < width["compiled_vs_full"][0]
  assert width["model_width"][0] < width["model_width"][-1] == width["full_width"]
  # Several outputs: block CG reaches KRR in fewer steps than r independent CGs, both match their
  # references; pre-norm: RMSNorm changes nothing, LayerNorm departs in the first layer.
  block = [c for c in saved["multi_output"] if c["kind"] == "block"][0]
  independent = [c for c in saved["multi_output"] if c["kind"] == "independent"][0]
  assert max(block["compiled_vs_reference"] + independent["compiled_vs_reference"]) < 1e-8
  first = lambda c: next(t for t, e in enumerate(c["error"]) if e < 1e-8)
  assert first(block) < first(independent)
  assert saved["prenorm"]["rmsnorm_max_abs_difference"] == 0.0
  assert saved["prenorm"]["layernorm_departure"]["layer"] == 1
