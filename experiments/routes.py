r"""Softmax Routes A and B, Jacobi PCG and Chebyshev, compiled and measured against theory.

  python -m experiments.routes --workdir=DIR [--config=experiments/configs/routes.py[:runlocal]]

See the config's docstring for what it writes and how long it takes.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
import numpy as np

from experiments import _cli

from kcg._src import plotting
from kcg._src import routes

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "routes.py")


def _problems(seed, batch, k, p, q, norm_spread=0.0):
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(-norm_spread, norm_spread, size=(batch, k, 1))) if norm_spread else 1.0
  return (rng.normal(size=(batch, k, p)) / np.sqrt(p) * scale, rng.normal(size=(batch, k)),
          rng.normal(size=(batch, q, p)) / np.sqrt(p))


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  results = {"config": config.to_dict()}
  with jax.enable_x64(True):
    xs, ys, xq = _problems(config.seed, config.batch, config.num_support, config.feature_dim,
                           config.num_query)
    logging.info("Route B mat-vec error over %d head counts x %d temperatures.", len(config.heads),
                 len(config.temperatures))
    eps = routes.route_b_matvec_error(xs, ys, xq, config.ridge, config.heads, config.temperatures)
    results["route_b_epsilon"] = {f"h={h}": [float(e) for e in eps.epsilon[i]]
                                  for i, h in enumerate(eps.heads)}
    results["temperatures"] = [float(t) for t in eps.temperatures]
    curves, bounds_b = {}, {}
    results["route_b_curves"] = []
    for heads, tau in config.route_b_curves:
      err = routes.route_b_prediction_error(xs, ys, xq, config.ridge, config.num_steps, heads, tau)
      name = f"Route B h={heads} tau={tau:g}"
      curves[name] = err.route_vs_oracle
      steps = np.arange(config.num_steps + 1)
      bounds_b[f"CG + C eps t (h={heads}, tau={tau:g})"] = err.cg_vs_oracle + err.constant * err.epsilon * steps
      results["route_b_curves"].append({"heads": heads, "temperature": tau, "epsilon": err.epsilon,
                                        "constant_C": err.constant,
                                        "route_vs_oracle": [float(v) for v in err.route_vs_oracle]})
      cg_curve = err.cg_vs_oracle
    curves["exact CG (dot product)"] = cg_curve
    results["route_a"] = []
    route_a_curves, route_a_bounds = {}, {}
    for tau in config.route_a_temperatures:
      ra = routes.route_a_error(xs, ys, xq, config.ridge, config.num_steps, tau)
      route_a_curves[f"compiled, tau={tau:g}"] = ra.compiled_vs_oracle
      route_a_curves[f"compiled vs reference, tau={tau:g}"] = ra.compiled_vs_reference
      route_a_bounds[f"theorem bound, tau={tau:g}"] = ra.bound
      results["route_a"].append({"temperature": tau, **{n: [float(v) for v in getattr(ra, n)] for n in
                                 ("compiled_vs_oracle", "reference_vs_oracle", "compiled_vs_reference", "bound")},
                                 "condition_number_median": float(np.median(ra.condition_number))})
    px, py, pq = _problems(config.seed + 1, config.batch, config.pcg_num_support,
                           config.pcg_feature_dim, config.num_query, config.pcg_norm_spread)
    pre = routes.preconditioning(px, py, pq, config.ridge, config.num_steps)
    steps = np.arange(config.num_steps + 1)
    results["preconditioning"] = {
        "cg_error": [float(v) for v in pre.cg_error], "pcg_error": [float(v) for v in pre.pcg_error],
        "kappa_median": float(np.median(pre.kappa)),
        "kappa_preconditioned_median": float(np.median(pre.kappa_preconditioned)),
        "cg_rate": pre.cg_rate, "pcg_rate": pre.pcg_rate}
    cheb = routes.chebyshev_vs_cg(xs, ys, xq, config.ridge, config.num_steps)
    results["chebyshev"] = {"chebyshev": [float(v) for v in cheb.chebyshev],
                            "cg": [float(v) for v in cheb.cg],
                            "layers_per_step": {"chebyshev": cheb.chebyshev_layers_per_step,
                                                "cg": cheb.cg_layers_per_step}}

  plotting.error_curves(
      os.path.join(workdir, "route_b_epsilon.png"),
      {f"h = {h}": eps.epsilon[i] for i, h in enumerate(eps.heads)}, x=eps.temperatures,
      xlabel="temperature tau", ylabel="mat-vec error eps", log_x=True,
      title="Route B: per-step mat-vec error (truncation ~ tau^-h, cancellation ~ eps tau)")
  plotting.error_curves(os.path.join(workdir, "route_b_error_vs_t.png"), curves, dashed=bounds_b,
                        ylabel="relative error vs KRR oracle",
                        title="Route B: prediction error vs t, with CG error + C eps t")
  plotting.error_curves(os.path.join(workdir, "route_a_error_vs_t.png"), route_a_curves,
                        dashed=route_a_bounds, ylabel="relative error vs exponential-kernel KRR",
                        title="Route A: exponential kernel, compiled softmax transformer")
  plotting.error_curves(
      os.path.join(workdir, "pcg_vs_cg.png"), {"CG": pre.cg_error, "Jacobi PCG": pre.pcg_error},
      dashed={f"2 rho^t, kappa={np.median(pre.kappa):.3g}": 2 * pre.cg_rate ** steps,
              f"2 rho'^t, kappa'={np.median(pre.kappa_preconditioned):.3g}": 2 * pre.pcg_rate ** steps},
      ylabel="||alpha_t - alpha*||_A / ||alpha*||_A", title="Compiled CG vs compiled Jacobi PCG")
  plotting.error_curves(
      os.path.join(workdir, "chebyshev_vs_cg.png"),
      {f"Chebyshev ({cheb.chebyshev_layers_per_step} layer/step)": cheb.chebyshev,
       f"CG ({cheb.cg_layers_per_step} layers/step)": cheb.cg},
      ylabel="relative error vs KRR oracle", title="Compiled Chebyshev (exact bounds) vs compiled CG")
  results["runtime_s"] = time.time() - start
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, allow_nan=False)
  print("Route B mat-vec error eps (rows: heads; columns: temperatures "
        f"{[f'{t:g}' for t in eps.temperatures]}):")
  for i, h in enumerate(eps.heads):
    print(f"  h={h}: " + " ".join(f"{e:.1e}" for e in eps.epsilon[i]))
  for c in results["route_b_curves"]:
    print(f"  Route B h={c['heads']} tau={c['temperature']:g}: eps={c['epsilon']:.2e}, "
          f"C={c['constant_C']:.3g}, final error {c['route_vs_oracle'][-1]:.2e}")
  print(f"PCG: median kappa {results['preconditioning']['kappa_median']:.3g} -> "
        f"{results['preconditioning']['kappa_preconditioned_median']:.3g}; "
        f"A-norm error at t={config.num_steps}: CG {pre.cg_error[-1]:.2e}, PCG {pre.pcg_error[-1]:.2e}")
  logging.info("Wrote %s in %.1f s.", workdir, results["runtime_s"])
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "results.json and the PNGs")
