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

import kcg
from kcg import plotting
from kcg import routes
from kcg import sketch

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "routes.py")


def _problems(seed, batch, k, p, q, norm_spread=0.0):
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(-norm_spread, norm_spread, size=(batch, k, 1))) if norm_spread else 1.0
  return (rng.normal(size=(batch, k, p)) / np.sqrt(p) * scale, rng.normal(size=(batch, k)),
          rng.normal(size=(batch, q, p)) / np.sqrt(p))


def _width_problems(seed, batch, k, p, q, decay):
  """Features with second moment R diag(mu) R^T, mu_i = decay^(2i), R a rotation fixed by the seed."""
  rng = np.random.default_rng(seed)
  mu = decay ** (2 * np.arange(p, dtype=np.float64))
  rotation, _ = np.linalg.qr(rng.standard_normal((p, p)))
  draw = lambda n: rng.standard_normal((batch, n, p)) * np.sqrt(mu) @ rotation.T
  return draw(k), rng.standard_normal((batch, k)), draw(q), rotation @ np.diag(mu) @ rotation.T, mu


def _width(config, results) -> dict:
  """Width m < p: compiled width-m models (principal sketch of the known second moment) vs m."""
  xs, ys, xq, covariance, mu = _width_problems(config.seed + 2, config.batch, config.width_num_support,
                                               config.width_feature_dim, config.num_query,
                                               config.width_decay)
  projections = [sketch.principal_projection(m, covariance=covariance) for m in config.widths]
  w = routes.width_error(xs, ys, xq, config.width_ridge, projections, eigenvalues=mu,
                         form=config.width_form, mask="prefix")
  results["width"] = {"feature_dim": config.width_feature_dim, "ridge": config.width_ridge,
                      "form": config.width_form, "full_width": w.full_width,
                      **{n: [float(v) if np.isfinite(v) else None for v in getattr(w, n)]
                         for n in w._fields if n != "full_width"}}  # None: NaN (nothing lost at m = p)
  narrow = w.widths < config.width_feature_dim  # m = p is rounding level (in the JSON, not the plot)
  return w.widths[narrow], {"measured: compiled width-m model": w.compiled_vs_full[narrow],
                            "compiled vs sketched KRR (kcg.sketch)": w.compiled_vs_reference[narrow]}, {
      "bound (each prompt's E)": w.bound[narrow], "sharp bound (||(I-P) w||)": w.sharp[narrow],
      "tail estimate (E^2 = k sum_{i>m} mu_i)": w.tail_estimate[narrow]}


def _multi_output(config, results) -> dict:
  """r > 1: r independent CGs (shared mat-vec head) against block CG, error vs step and model size."""
  rng = np.random.default_rng(config.seed + 3)
  k, p = config.outputs_num_support, config.outputs_feature_dim
  xs = rng.normal(size=(config.batch, k, p)) / np.sqrt(p)
  xq = rng.normal(size=(config.batch, config.num_query, p)) / np.sqrt(p)
  curves, results["multi_output"] = {}, []
  for r in config.outputs:
    ys = rng.normal(size=(config.batch, k, r))
    for cost in routes.multi_output_cost(xs, ys, xq, config.ridge, config.outputs_num_steps):
      curves[f"{cost.kind}, r={r} ({cost.layers_per_step} layers/step, {cost.num_heads} heads)"] = cost.error
      results["multi_output"].append({
          **{n: getattr(cost, n) for n in ("kind", "num_outputs", "layers_per_step", "num_layers",
                                           "width", "num_heads", "mlp_hidden")},
          "error": [float(v) for v in cost.error],
          "compiled_vs_reference": [float(v) for v in cost.compiled_vs_reference]})
  return curves


def _prenorm(config, results) -> None:
  """RMSNorm: bit-for-bit equal outputs (float64); LayerNorm: where the compiled CG departs."""
  xs, ys, xq = _problems(config.seed + 4, 1, config.num_support, config.feature_dim, config.num_query)
  plain = kcg.compile_cg(config.num_support, config.feature_dim, config.num_steps, config.ridge,
                         mask="causal")
  normed = kcg.compile_cg(config.num_support, config.feature_dim, config.num_steps, config.ridge,
                          mask="causal", norm="rmsnorm")
  difference = np.abs(np.asarray(normed.predict_steps(xs, ys, xq))
                      - np.asarray(plain.predict_steps(xs, ys, xq))).max()
  departure = kcg.routes.layernorm_departure(config.num_support, config.feature_dim, config.num_steps,
                                             config.ridge, xs, ys, xq, mask="causal")
  results["prenorm"] = {"rmsnorm_max_abs_difference": float(difference),
                        "rmsnorm_width": normed.config.width, "plain_width": plain.config.width,
                        "layernorm_departure": {n: (v.item() if hasattr(v, "item") else v)
                                                for n, v in departure._asdict().items()}}


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
    logging.info("Width: %d compiled width-m models.", len(config.widths))
    width_x, width_curves, width_bounds = _width(config, results)
    logging.info("Several outputs: independent CGs vs block CG for r in %s.", config.outputs)
    output_curves = _multi_output(config, results)
    logging.info("Pre-norm: RMSNorm and the LayerNorm departure.")
    _prenorm(config, results)
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
  plotting.error_curves(
      os.path.join(workdir, "width.png"), width_curves, dashed=width_bounds,
      x=width_x, integer_x=True,
      xlabel=f"width m < p of the feature channels (p = {config.width_feature_dim})",
      ylabel="relative error vs full KRR",
      title="Width m < p: compiled width-m model vs the sketch bound and the spectral tail")
  plotting.error_curves(
      os.path.join(workdir, "multi_output.png"), output_curves,
      ylabel="relative error vs multi-output KRR",
      title="r outputs: r independent CGs (shared mat-vec) vs block CG (r x r steps)")
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
  width = results["width"]
  print(f"Width (p = {width['feature_dim']}, ridge {width['ridge']:g}, {width['form']}; full model "
        f"width {width['full_width']}): m, model width, measured, bound, ratio, tail estimate")
  for i, m in enumerate(width["widths"]):
    ratio = width["max_ratio"][i]
    print(f"  m={int(m)}: width {int(width['model_width'][i])}, measured {width['compiled_vs_full'][i]:.2e}, "
          f"bound {width['bound'][i]:.2e}, max measured/bound "
          f"{'-' if ratio is None else f'{ratio:.3g}'}, tail estimate {width['tail_estimate'][i]:.2e}")
  print("Several outputs (kind, r, layers/step, width, heads, error at t = 1..):")
  for c in results["multi_output"]:
    print(f"  {c['kind']:11s} r={c['num_outputs']}: {c['layers_per_step']} layers/step, width "
          f"{c['width']}, {c['num_heads']} heads; error " + " ".join(f"{e:.0e}" for e in c["error"][1:]))
  pre = results["prenorm"]
  dep = pre["layernorm_departure"]
  print(f"Pre-norm: RMSNorm max |difference| {pre['rmsnorm_max_abs_difference']:.1e} (width "
        f"{pre['plain_width']} -> {pre['rmsnorm_width']}); LayerNorm departs at layer {dep['layer']} "
        f"({dep['layer_name']}), {dep['role']}, channel {dep['channel']}: {dep['expected']:.3g} -> "
        f"{dep['got']:.3g}; prediction error {dep['prediction_error']:.2g}")
  logging.info("Wrote %s in %.1f s.", workdir, results["runtime_s"])
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "results.json and the PNGs")
