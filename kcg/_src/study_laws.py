"""The study's laws, each measured on random problems beside its bound, with a figure.

* Depth (`depth_law`). CG's error after t steps satisfies `|f_t(x) - f*(x)| <= sqrt(k^T A^-1 k) 2 rho^t
  ||alpha*||_A`, `rho = (sqrt(kappa) - 1)/(sqrt(kappa) + 1)` (`kcg.bounds.cg_error_bound`). The fitted
  rate is `exp` of the least-squares slope of `log(error)` over the steps above the rounding floor;
  CG is superlinear, so the fitted rate is at most `rho` (and the bound must hold at every step).
* Ridge and condition number (`solver_sweep`): error of t-step CG, PCG, GD and Chebyshev against the
  KRR oracle as the ridge or the condition number of the input covariance moves.
* Failure modes (`failure_modes`): nearly collinear supports and very small ridge, where `kappa(A)`
  explodes; compiled CG in float64 and float32 against the float64 oracle.
* Feature perturbation (`feature_perturbation`, `perturbation_bound`). With `A = K + ridge I`,
  `A^ = K^ + ridge I`, `alpha* = A^-1 y`:

      f*(x) - f^*(x) = (k(x) - k^(x))^T alpha* + k^(x)^T (A^-1 - A^^-1) y
                     = (k(x) - k^(x))^T alpha* + k^(x)^T A^^-1 (K^ - K) alpha*,

  since `A^-1 - A^^-1 = A^^-1 (A^ - A) A^-1`. Cauchy-Schwarz gives the sharp form and, with
  `||A^^-1||_2 <= 1/ridge` (K^ is PSD), the Lipschitz form in `||K - K^||_2`:

      |f*(x) - f^*(x)| <= ||k(x) - k^(x)|| ||alpha*|| + ||A^^-1 k^(x)|| ||K - K^||_2 ||alpha*||
                       <= ||k(x) - k^(x)|| ||alpha*|| + (||k^(x)|| / ridge) ||K - K^||_2 ||alpha*||,

  i.e. Lipschitz constant `L(x) = ||k^(x)|| ||alpha*|| / ridge <= ||k^(x)|| ||y|| / ridge^2` in
  `||K - K^||_2` (plus the query-kernel term). For the linear kernel and `Phi^ = Phi + E`:
  `||K - K^||_2 <= ||E||_2 (2 ||Phi||_2 + ||E||_2)`.
* Width (`width_sweep`): a width-m model sees at most an m-dimensional projection `P phi` of the
  features; KRR on `P phi` is KRR with `K^ = Phi P Phi^T`, so the feature-perturbation bound
  applies with `||K - K^||_2 = sigma_{m+1}(Phi)^2` for the best rank-m projection (the spectral tail). The
  compiled width-m models (`compile_cg(projection=S)`) are measured beside `kcg.sketch`'s bound.
* Temperature (`temperature_sweep`, Route A): CG on the exponential kernel `exp(<x, x'>/tau)` against
  its rate `rho(kappa(tau))^t`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import bounds
from kcg._src import checks
from kcg._src import kernels
from kcg._src import matching
from kcg._src import plotting
from kcg._src import problems
from kcg._src import routes
from kcg._src import sketch
from kcg._src import solvers
from kcg._src import tasks
from kcg._src.study import FLOOR
from kcg._src.study import fitted_rate
from kcg._src.study import mse
from kcg._src.study import relative_rms
from kcg._src.study import rms

Array = jax.Array


def depth_law(key: Any, *, num_support: int = 16, feature_dim: int = 16, num_query: int = 4,
              condition_numbers: Sequence[float] = (10.0, 100.0, 1000.0), ridge: float = 0.1,
              max_steps: int = 12, num_prompts: int = 16, compiled: Any = None,
              path: str | None = None) -> dict:
  """Error of t-step CG (compiled, if given, and reference) against `rho^t` on problems of exact kappa.

  Problems: `kcg.problems.batched_krr_problem` with `cond(K + ridge I) = kappa` exactly. Errors are
  `rms_{b,q}(f_t - f*) / rms(f*)`; the bound is the same aggregate of `kcg.bounds.cg_error_bound`.

  Args:
    compiled: a `kcg.CompiledCG` for (num_support, feature_dim, >= max_steps, ridge), or None.
  """
  out = {"ridge": ridge, "num_support": num_support, "feature_dim": feature_dim, "kappa": {}}
  figure, ((axes,),) = plotting.new_figure(size=(6.4, 4.2))
  floor = lambda v: np.maximum(v, plotting.PLOT_FLOOR)
  for i, kappa in enumerate(condition_numbers):
    prob = problems.batched_krr_problem(jax.random.fold_in(key, i), num_prompts,
                                        num_support=num_support, feature_dim=feature_dim,
                                        num_query=num_query, condition_number=kappa, ridge=ridge)
    args = (prob.phi_support, prob.y_support, prob.phi_query)
    f_star = np.asarray(solvers.krr_predict(*args, ridge))
    ref = np.asarray(solvers.cg_predict(*args, ridge, max_steps))
    ref_err = relative_rms(ref, f_star[:, None], axis=(0, 2))
    bound_t = np.stack([np.asarray(bounds.cg_error_bound(*args, ridge, t))
                        for t in range(max_steps + 1)], axis=1)
    bound = rms(bound_t, axis=(0, 2)) / max(float(rms(f_star)), FLOOR)
    rho = float(bounds.cg_rate(kappa))
    entry = {"predicted_rate": rho, "reference_error": ref_err, "bound": bound,
             "reference_fitted_rate": fitted_rate(ref_err),
             "bound_holds": bool(np.all(np.abs(ref - f_star[:, None]) <= bound_t + 1e-9))}
    if compiled is not None:
      comp = np.asarray(compiled.predict_steps(*args))[:, :max_steps + 1]
      comp_err = relative_rms(comp, f_star[:, None], axis=(0, 2))
      entry.update(compiled_error=comp_err, compiled_fitted_rate=fitted_rate(comp_err),
                   compiled_vs_reference=float(np.max(relative_rms(comp, ref, axis=(0, 2)))))
      # One colour per kappa; the marker tells compiled (filled) from reference (hollow).
      axes.semilogy(floor(comp_err), "-", markersize=5, label=f"compiled CG, kappa={kappa:g}",
                    **plotting.line_style(i))
    axes.semilogy(floor(ref_err), ":", markersize=7, markerfacecolor="none",
                  label=f"reference CG, kappa={kappa:g}",
                  **{**plotting.line_style(i), "marker": plotting.MARKERS[-1 - i]})
    axes.semilogy(floor(2 * rho ** np.arange(max_steps + 1)), "--", linewidth=0.9,
                  label=f"2 rho^t, rho={rho:.3f}", **{**plotting.line_style(i), "marker": None})
    out["kappa"][f"{kappa:g}"] = entry
  axes.set_xlabel("CG step t (compiled: depth = init + t x layers per step)")
  axes.set_ylabel("relative error |f_t - f*| / |f*|")
  axes.set_title("error vs depth against ((sqrt k - 1)/(sqrt k + 1))^t", fontsize=9)
  plotting.integer_ticks(axes, "x")
  plotting.add_legend(axes)
  plotting.save_figure(figure, path)
  return out



SWEEP_ALGORITHMS = ("cg", "pcg", "gd", "chebyshev")


def solver_sweep(key: Any, knob: str, values: Sequence[float], *, task: Any, ridge: float,
                 num_steps: int, algorithms: Sequence[str] = SWEEP_ALGORITHMS,
                 path: str | None = None) -> dict:
  """Error of t-step solvers against the KRR oracle as `knob` ("ridge" or "condition_number") moves.

  `task` is a `kcg.tasks.TaskConfig`; for `knob="condition_number"` its input covariance's condition
  number takes each value (the `ridge` stays), for `knob="ridge"` the solvers' ridge does. Reports the
  mean `cond(K + ridge I)`, each solver's relative error to the oracle and its test mse, the oracle's
  test mse, and the CG rate `rho^t` at the mean condition number.
  """
  if knob not in ("ridge", "condition_number"):
    raise ValueError(f"knob must be 'ridge' or 'condition_number', got {knob!r}.")
  out = {"knob": knob, "values": list(map(float, values)), "num_steps": num_steps, "kappa": [],
         "oracle_mse": [], "predicted_cg_factor": [],
         "relative_error": {a: [] for a in algorithms}, "mse": {a: [] for a in algorithms}}
  for i, value in enumerate(values):
    config = (dataclasses.replace(task, condition_number=float(value))
              if knob == "condition_number" else task)
    lam = float(value) if knob == "ridge" else ridge
    p = tasks.sample(jax.random.fold_in(key, i), config)
    xs, ys, xq = p.x_support, p.y_support, p.x_query
    oracle = np.asarray(solvers.krr_predict(xs, ys, xq, lam))
    y = np.asarray(p.y_query, np.float64)
    kappa = float(np.mean(np.asarray(bounds.condition_number(xs, lam))))
    out["kappa"].append(kappa)
    out["oracle_mse"].append(mse(oracle, y))
    out["predicted_cg_factor"].append(float(2 * bounds.cg_rate(kappa) ** num_steps))
    for a in algorithms:
      f_t = np.asarray(matching.trajectory(a, num_steps, lam)(xs, ys, xq))[:, -1]
      out["relative_error"][a].append(float(relative_rms(f_t, oracle)))
      out["mse"][a].append(mse(f_t, y))
  figure, (axes,) = plotting.new_figure(1, 2)
  xlabel = "ridge" if knob == "ridge" else "condition number of the input covariance"
  for i, a in enumerate(algorithms):
    axes[0].loglog(out["values"], np.maximum(out["relative_error"][a], plotting.PLOT_FLOOR), "-",
                   label=f"{a}_{num_steps}", **plotting.line_style(i))
  axes[0].loglog(out["values"], np.minimum(out["predicted_cg_factor"], 1e3), "--",
                 label="2 rho(kappa)^t", **plotting.REFERENCE)
  axes[0].set_ylabel("relative error vs KRR oracle")
  plotting.add_legend(axes[0])
  axes[1].loglog(out["values"], out["kappa"], "-", **plotting.line_style(0))
  axes[1].set_ylabel("mean cond(K + ridge I)")
  for ax in axes:
    ax.set_xlabel(xlabel)
  figure.suptitle(f"{knob} sweep, t = {num_steps}", fontsize=9)
  plotting.save_figure(figure, path)
  return out


def temperature_sweep(key: Any, temperatures: Sequence[float], *, num_support: int = 16,
                      input_dim: int = 4, num_query: int = 4, ridge: float = 0.1, num_steps: int = 4,
                      num_prompts: int = 16, path: str | None = None) -> dict:
  """CG on the exponential (softmax, Route A) kernel `exp(<x, x'>/tau)` as the temperature moves.

  `x ~ N(0, I / d)`; reports `cond(K_tau + ridge I)`, the t-step CG error against that kernel's KRR
  oracle and the rate `2 rho^t` predicted from the condition number.
  """
  k1, k2, k3 = jax.random.split(key, 3)
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  scale = jnp.asarray(1 / math.sqrt(input_dim), dtype)
  xs = jax.random.normal(k1, (num_prompts, num_support, input_dim), dtype) * scale
  xq = jax.random.normal(k2, (num_prompts, num_query, input_dim), dtype) * scale
  ys = jax.random.normal(k3, (num_prompts, num_support), dtype)
  out = {"temperatures": list(map(float, temperatures)), "kappa": [], "cg_relative_error": [],
         "predicted_factor": [], "fitted_rate": [], "predicted_rate": []}
  for tau in temperatures:
    kernel = kernels.ExponentialKernel(jnp.asarray(tau, dtype))
    oracle = np.asarray(solvers.krr_predict(xs, ys, xq, ridge, kernel=kernel))
    traj = np.asarray(solvers.cg_predict(xs, ys, xq, ridge, num_steps, kernel=kernel))
    errors = relative_rms(traj, oracle[:, None], axis=(0, 2))
    kappa = float(np.mean(np.asarray(bounds.condition_number(xs, ridge, kernel=kernel))))
    out["kappa"].append(kappa)
    out["cg_relative_error"].append(float(errors[-1]))
    out["predicted_factor"].append(float(2 * bounds.cg_rate(kappa) ** num_steps))
    out["fitted_rate"].append(fitted_rate(errors))
    out["predicted_rate"].append(float(bounds.cg_rate(kappa)))
  figure, (axes,) = plotting.new_figure(1, 2)
  axes[0].loglog(out["temperatures"], np.maximum(out["cg_relative_error"], plotting.PLOT_FLOOR),
                 "-", label=f"CG_{num_steps} vs oracle", **plotting.line_style(0))
  axes[0].loglog(out["temperatures"], out["predicted_factor"], "--", label="2 rho(kappa)^t",
                 **plotting.REFERENCE)
  axes[0].set_ylabel("relative error vs exponential-kernel KRR")
  plotting.add_legend(axes[0])
  axes[1].loglog(out["temperatures"], out["kappa"], "-", **plotting.line_style(0))
  axes[1].set_ylabel("mean cond(K_tau + ridge I)")
  for ax in axes:
    ax.set_xlabel("temperature tau (in units of <x, x'>)")
  figure.suptitle("exponential kernel (softmax Route A): temperature sweep", fontsize=9)
  plotting.save_figure(figure, path)
  return out


# ----------------------------------------------------------------------------------------------------
# Failure modes.
# ----------------------------------------------------------------------------------------------------


def failure_modes(key: Any, *, num_support: int = 4, input_dim: int = 8, num_query: int = 4,
                  num_steps: int | None = None, collinearity: Sequence[float] = (1.0, 1e-2, 1e-4, 1e-6),
                  ridges: Sequence[float] = (1.0, 1e-2, 1e-4, 1e-6, 1e-8), base_ridge: float = 1e-3,
                  small_ridge_support: int | None = None, num_prompts: int = 8,
                  compile_fn: Callable | None = None, path: str | None = None) -> dict:
  """Nearly collinear supports and very small ridge: where the condition number, and CG, break down.

  Collinear supports: `k = num_support <= input_dim` supports `x_j = x_0 + delta z_j` (all within
  `delta` of one point; with k <= d, Gaussian supports would be well conditioned), ridge `base_ridge`.
  Small ridge: `small_ridge_support` (default `2 d`) Gaussian supports, so `K` has rank `d < k` and
  `cond(K + ridge I) ~ ||K|| / ridge`, for each ridge in `ridges`. For each setting: `cond(A)` and the
  error after `t = num_steps` (default: the number of supports) CG steps against the float64 oracle,
  for reference CG, compiled CG in float64 and float32 (when `compile_fn(k, d, t, ridge)` returns a
  `kcg.CompiledCG`), and the float32 oracle (Cholesky in float32) for comparison; NaN where the
  float32 Cholesky fails or the compiled model refuses the prompts (both raise ValueError).
  """
  f64 = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  k_ridge = 2 * input_dim if small_ridge_support is None else int(small_ridge_support)
  keys = jax.random.split(key, 6)
  base = jax.random.normal(keys[0], (num_prompts, 1, input_dim), f64)
  spread = jax.random.normal(keys[1], (num_prompts, num_support, input_dim), f64)
  gaussian = jax.random.normal(keys[2], (num_prompts, k_ridge, input_dim), f64)
  xq = jax.random.normal(keys[3], (num_prompts, num_query, input_dim), f64)
  y_collinear = jax.random.normal(keys[4], (num_prompts, num_support), f64)
  y_ridge = jax.random.normal(keys[5], (num_prompts, k_ridge), f64)

  def evaluate(xs, ys, lam):
    k = xs.shape[1]
    t = k if num_steps is None else int(num_steps)
    oracle = np.asarray(solvers.krr_predict(xs, ys, xq, lam))
    row = {"kappa": float(np.mean(np.asarray(bounds.condition_number(xs, lam)))), "num_steps": t,
           "reference_cg": float(relative_rms(
               np.asarray(solvers.cg_predict(xs, ys, xq, lam, t))[:, -1], oracle))}
    as32 = [jnp.asarray(a, jnp.float32) for a in (xs, ys, xq)]

    def error(predict):
      # NaN where float32 Cholesky fails or the compiled model refuses the prompt (outside its
      # dynamic range): both raise ValueError rather than return a wrong number.
      try:
        return float(relative_rms(np.asarray(predict()), oracle))
      except ValueError:
        return float("nan")

    row["oracle_float32"] = error(lambda: solvers.krr_predict(*as32, lam))
    if compile_fn is not None:
      compiled = compile_fn(k, input_dim, t, lam)
      row["compiled_float64"] = error(lambda: compiled.predict(xs, ys, xq))
      row["compiled_float32"] = error(lambda: compiled.predict(*as32))
    return row

  out = {"base_ridge": base_ridge, "num_support_collinear": num_support,
         "num_support_small_ridge": k_ridge, "collinear": {}, "small_ridge": {}}
  for delta in collinearity:
    out["collinear"][f"{delta:g}"] = evaluate(base + jnp.asarray(delta, f64) * spread, y_collinear,
                                              base_ridge)
  for lam in ridges:
    out["small_ridge"][f"{lam:g}"] = evaluate(gaussian, y_ridge, float(lam))
  figure, (axes,) = plotting.new_figure(1, 2)
  panels = (("nearly collinear supports", out["collinear"],
             "spread delta of the supports around one point"),
            ("very small ridge (rank K = d < k)", out["small_ridge"], "ridge"))
  for ax, (title, rows, xlabel) in zip(axes, panels):
    xs_plot = [float(v) for v in rows]
    fields = ("reference_cg", "compiled_float64", "compiled_float32", "oracle_float32")
    for i, field in enumerate(fields):
      if field in next(iter(rows.values())):
        ax.loglog(xs_plot, [max(r[field], plotting.PLOT_FLOOR) for r in rows.values()], "-",
                  label=field, **plotting.line_style(i))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative error vs float64 oracle (t = k)")
    ax.set_title(title, fontsize=9)
    plotting.add_legend(ax)
  plotting.save_figure(figure, path)
  return out


# ----------------------------------------------------------------------------------------------------
# Feature perturbation and width.
# ----------------------------------------------------------------------------------------------------


def perturbation_bound(phi_support: Any, y_support: Any, phi_query: Any, phi_support_hat: Any,
                       phi_query_hat: Any, ridge: float) -> dict[str, Array]:
  """The feature-perturbation bound for the linear kernel at every query (module docstring), `[B, q]`.

  Returns `actual = |f* - f^*|`, `sharp` (with `||A^^-1 k^||`), `lipschitz` (with `||k^|| / ridge`),
  `kernel_distance = ||K - K^||_2` `[B]` and `lipschitz_constant = ||k^|| ||alpha*|| / ridge` `[B, q]`.
  """
  checks.check_ridge(ridge)
  dtype = checks.float_dtype(phi_support, y_support, phi_query, phi_support_hat, phi_query_hat)
  arrays = [checks.as_array(n, a, dtype, min_ndim=m) for n, a, m in (
      ("phi_support", phi_support, 3), ("y_support", y_support, 2), ("phi_query", phi_query, 3),
      ("phi_support_hat", phi_support_hat, 3), ("phi_query_hat", phi_query_hat, 3))]
  phi, y, phi_q, phi_h, phi_qh = arrays
  if (y.shape != phi.shape[:-1] or phi_h.shape[:-1] != phi.shape[:-1] or phi_q.shape[:2] != phi_qh.shape[:2]
      or phi_q.shape[0] != phi.shape[0] or phi_h.shape[-1] != phi_qh.shape[-1]
      or phi.shape[-1] != phi_q.shape[-1]):
    raise ValueError("perturbation_bound needs phi_support [B, k, p], y_support [B, k], phi_query "
                     "[B, q, p] and perturbed features [B, k, p'], [B, q, p']; got "
                     f"{[a.shape for a in arrays]}.")
  return _perturbation_core(phi, y, phi_q, phi_h, phi_qh, jnp.asarray(ridge, dtype))


@jax.jit
def _perturbation_core(phi, y, phi_q, phi_h, phi_qh, lam):
  dtype = phi.dtype
  einsum = lambda s, *a: jnp.einsum(s, *a, precision=checks.HIGHEST)
  k = phi.shape[-2]
  eye = jnp.eye(k, dtype=dtype)[None]
  gram, gram_h = einsum("bkp,bjp->bkj", phi, phi), einsum("bkp,bjp->bkj", phi_h, phi_h)
  kq, kq_h = einsum("bqp,bkp->bqk", phi_q, phi), einsum("bqp,bkp->bqk", phi_qh, phi_h)
  alpha = jnp.linalg.solve(gram + lam * eye, y[..., None])[..., 0]
  alpha_h = jnp.linalg.solve(gram_h + lam * eye, y[..., None])[..., 0]
  actual = jnp.abs(einsum("bqk,bk->bq", kq, alpha) - einsum("bqk,bk->bq", kq_h, alpha_h))
  alpha_norm = jnp.linalg.norm(alpha, axis=-1)
  kernel_distance = jnp.linalg.norm(gram - gram_h, ord=2, axis=(-2, -1))
  query_term = jnp.linalg.norm(kq - kq_h, axis=-1) * alpha_norm[:, None]
  solved = jnp.linalg.solve(gram_h + lam * eye, jnp.swapaxes(kq_h, -1, -2))  # [B, k, q]
  sharp = query_term + jnp.linalg.norm(solved, axis=-2) * (kernel_distance * alpha_norm)[:, None]
  constant = jnp.linalg.norm(kq_h, axis=-1) * alpha_norm[:, None] / lam
  lipschitz = query_term + constant * kernel_distance[:, None]
  return {"actual": actual, "sharp": sharp, "lipschitz": lipschitz,
          "kernel_distance": kernel_distance, "lipschitz_constant": constant}


def feature_perturbation(key: Any, *, num_support: int = 16, feature_dim: int = 8, num_query: int = 4,
                         ridge: float = 0.1, scales: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                         num_prompts: int = 32, path: str | None = None) -> dict:
  """Feature perturbation: `|f* - f^*|` against `||K - K^||_2` for `Phi^ = Phi + eps E` (E Gaussian, query features too).

  Reports, per eps, the mean kernel distance, the mean actual error, the largest `actual / bound` over
  all prompts and queries for both forms of the bound (must be <= 1), and the mean Lipschitz constant.
  """
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  keys = jax.random.split(key, 5)
  phi = jax.random.normal(keys[0], (num_prompts, num_support, feature_dim), dtype)
  phi_q = jax.random.normal(keys[1], (num_prompts, num_query, feature_dim), dtype)
  y = jax.random.normal(keys[2], (num_prompts, num_support), dtype)
  e_s = jax.random.normal(keys[3], phi.shape, dtype)
  e_q = jax.random.normal(keys[4], phi_q.shape, dtype)
  out = {"ridge": ridge, "scales": list(map(float, scales)), "kernel_distance": [], "actual": [],
         "sharp_bound": [], "lipschitz_bound": [], "max_ratio_sharp": [], "max_ratio_lipschitz": [],
         "lipschitz_constant": []}
  for eps in scales:
    eps_a = jnp.asarray(eps, dtype)
    r = perturbation_bound(phi, y, phi_q, phi + eps_a * e_s, phi_q + eps_a * e_q, ridge)
    actual, sharp, lip = (np.asarray(r[n]) for n in ("actual", "sharp", "lipschitz"))
    out["kernel_distance"].append(float(np.mean(np.asarray(r["kernel_distance"]))))
    out["actual"].append(float(np.mean(actual)))
    out["sharp_bound"].append(float(np.mean(sharp)))
    out["lipschitz_bound"].append(float(np.mean(lip)))
    out["max_ratio_sharp"].append(float(np.max(actual / np.maximum(sharp, FLOOR))))
    out["max_ratio_lipschitz"].append(float(np.max(actual / np.maximum(lip, FLOOR))))
    out["lipschitz_constant"].append(float(np.mean(np.asarray(r["lipschitz_constant"]))))
  out["bound_holds"] = bool(max(out["max_ratio_sharp"] + out["max_ratio_lipschitz"]) <= 1 + 1e-9)
  figure, ((axes,),) = plotting.new_figure()
  axes.loglog(out["kernel_distance"], out["actual"], "-", label="mean |f* - f^*|",
              **plotting.line_style(0))
  axes.loglog(out["kernel_distance"], out["sharp_bound"], "--", label="sharp bound (||A^^-1 k^||)",
              **plotting.line_style(1))
  axes.loglog(out["kernel_distance"], out["lipschitz_bound"], ":", label="Lipschitz bound (1/ridge)",
              **plotting.line_style(2))
  axes.set_xlabel("kernel perturbation ||K - K^||_2")
  axes.set_ylabel("prediction change |f* - f^*| (units of y)")
  axes.set_title("KRR under feature perturbation", fontsize=9)
  plotting.add_legend(axes)
  plotting.save_figure(figure, path)
  return out


def width_sweep(key: Any, widths: Sequence[int], *, num_support: int = 16, feature_dim: int = 16,
                num_query: int = 4, ridge: float = 0.1, decay: float = 0.7, num_prompts: int = 16,
                form: str = "primal", mask: str = "prefix",
                low_rank_predictor: Callable[[int], Callable] | None = None,
                path: str | None = None) -> dict:
  """Width law: compiled width-m models (m < p) against the sketch bound and the spectral tail.

  Features `phi = g D` (g standard normal, `D = diag(decay^i)`), so the second moment is `diag(mu)`,
  `mu_i = decay^(2i)`. Three sketches `S [m, p]` (`kcg.sketch`): `"principal"` (top-m eigenvectors of
  that second moment: prompt-independent, compiled with `compile_cg(projection=S)`), `"random"` (the
  first m rows of one Haar rotation, nested in m; compiled too) and `"top"` (each prompt's own top-m
  right singular vectors, the best rank-m sketch, `E^2 = lambda_{m+1}(K)`; reference only, a model
  cannot bake a per-prompt S). Per sketch, lists over `widths`: `"error"` (sketched KRR vs full KRR),
  `"bound"` (`sketch_error_bound` with each prompt's own E: a bound at every query), `"sharp"`,
  `"max_ratio"` (largest measured / bound, <= 1), `"kernel_distance"` (mean E^2); for the compiled
  sketches `"compiled_error"` (the measured width-m model vs full KRR) and `"compiled_vs_reference"`;
  for `"principal"` `"tail_estimate"` (the bound with `E^2 := k sum_{i>m} mu_i`, an expected-value
  estimate, not a bound per prompt). Errors are RMS over prompts and queries relative to RMS(f).
  Also `"spectral_tail"` (mean `lambda_{m+1}(K)`), `"expected_tail"` (`k sum_{i>m} mu_i`),
  `"model_width"` (width of each compiled principal model) and `"full_width"` (on all p features).
  `low_rank_predictor(m)`, when given, is another width-m predictor `(phi_support, y_support,
  phi_query) -> [B, q]` (e.g. a trained model) whose error is reported as `"hook"`.
  """
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  for m in widths:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= feature_dim:
      raise ValueError(f"widths must be ints in [1, feature_dim={feature_dim}], got {m!r}.")
  widths = [int(m) for m in widths]
  k1, k2, k3, k4 = jax.random.split(key, 4)
  mu = decay ** (2 * np.arange(feature_dim, dtype=np.float64))
  scale_p = jnp.asarray(np.sqrt(mu), dtype)[None, None]
  phi = jax.random.normal(k1, (num_prompts, num_support, feature_dim), dtype) * scale_p
  phi_q = jax.random.normal(k2, (num_prompts, num_query, feature_dim), dtype) * scale_p
  y = jax.random.normal(k3, (num_prompts, num_support), dtype)
  full = np.asarray(solvers.krr_predict(phi, y, phi_q, ridge))
  scale = max(float(rms(full)), FLOOR)
  rotation = sketch.gaussian_projection(k4, feature_dim, feature_dim, dtype)
  sketches = {
      "principal": [sketch.principal_projection(m, covariance=np.diag(mu)) for m in widths],
      "random": [rotation[:m] for m in widths]}
  out = {"widths": widths, "feature_dim": feature_dim, "ridge": ridge, "form": form, "mask": mask,
         "spectral_tail": [], "expected_tail": [sketch.spectral_tail(mu, m, num_support)
                                                for m in widths], "hook": None}
  for name, projections in sketches.items():
    w = routes.width_error(phi, y, phi_q, ridge, projections,
                           eigenvalues=mu if name == "principal" else None, form=form, mask=mask)
    out[name] = {"error": w.reference_vs_full.tolist(), "compiled_error": w.compiled_vs_full.tolist(),
                 "compiled_vs_reference": w.compiled_vs_reference.tolist(),
                 "bound": w.bound.tolist(), "sharp": w.sharp.tolist(),
                 "max_ratio": w.max_ratio.tolist(), "kernel_distance": w.kernel_distance.tolist()}
    if name == "principal":
      out[name]["tail_estimate"] = w.tail_estimate.tolist()
      out["model_width"] = w.model_width.tolist()
      out["full_width"] = w.full_width
  out["top"] = {"error": [], "bound": [], "sharp": [], "max_ratio": [], "kernel_distance": []}
  for m in widths:
    s = sketch.prompt_projection(phi, m)
    b = sketch.sketch_error_bound(phi, y, phi_q, ridge, s)
    measured = np.abs(np.asarray(sketch.sketched_krr_predict(phi, y, phi_q, ridge, s)) - full)
    bound = np.asarray(b.bound)
    resolved = bound > 1e-8 * np.max(np.abs(full))  # below: nothing lost (rounding)
    out["top"]["error"].append(float(rms(measured)) / scale)
    out["top"]["bound"].append(float(rms(bound)) / scale)
    out["top"]["sharp"].append(float(rms(np.asarray(b.sharp))) / scale)
    out["top"]["max_ratio"].append(float(np.max(measured[resolved] / bound[resolved]))
                                   if np.any(resolved) else float("nan"))
    out["top"]["kernel_distance"].append(float(np.mean(np.asarray(b.kernel_distance))))
    out["spectral_tail"].append(out["top"]["kernel_distance"][-1])
  if low_rank_predictor is not None:
    out["hook"] = [float(relative_rms(np.asarray(low_rank_predictor(m)(phi, y, phi_q)), full))
                   for m in widths]
  ratios = [r for name in ("principal", "random", "top") for r in out[name]["max_ratio"]
            if math.isfinite(r)]
  out["bound_holds"] = bool(all(r <= 1 + 1e-9 for r in ratios))

  figure, ((axes, width_axes),) = plotting.new_figure(1, 2, size=(11.5, 4.2))
  floor = lambda v: np.maximum(np.asarray(v, np.float64), plotting.PLOT_FLOOR)
  # One colour per sketch; solid: measured, dashed: its bound.
  for i, name in enumerate(("principal", "random")):
    axes.semilogy(widths, floor(out[name]["compiled_error"]), "-",
                  label=f"{name}: compiled width-m model", **plotting.line_style(i))
    axes.semilogy(widths, floor(out[name]["bound"]), "--", label=f"{name}: bound (own E)",
                  **{**plotting.line_style(i), "marker": None})
  axes.semilogy(widths, floor(out["principal"]["tail_estimate"]), ":",
                label="principal: tail estimate (E^2 = k sum mu_i>m)",
                **{**plotting.line_style(0), "marker": plotting.MARKERS[-1]})
  axes.semilogy(widths, floor(out["top"]["error"]), "-", label="top (per prompt): sketched KRR",
                **plotting.line_style(2))
  axes.semilogy(widths, floor(out["top"]["bound"]), "--", label="top: bound",
                **{**plotting.line_style(2), "marker": None})
  if out["hook"] is not None:
    axes.semilogy(widths, floor(out["hook"]), "-", label="width-m model (hook)",
                  **plotting.line_style(3))
  narrow = [v for name in ("principal", "random", "top") for m, v in zip(widths, out[name]["error"])
            if m < feature_dim and v > 0]
  if narrow:  # m = p sits at rounding level (~1e-15): clip there rather than squash the m < p curves
    axes.set_ylim(bottom=max(min(narrow) / 30, 1e-16))
  axes.set_xlabel(f"width m of the feature channels (p = {feature_dim})")
  axes.set_ylabel("relative error vs full KRR")
  axes.set_title("measured vs bound, side by side (m = p: rounding, clipped)", fontsize=9)
  plotting.add_legend(axes, where="below", ncol=2)
  width_axes.plot(widths, out["model_width"], "-", label=f"compiled width-m model ({form}, {mask})",
                  **plotting.line_style(0))
  width_axes.axhline(out["full_width"], linewidth=0.8, label="compiled on all p features",
                     **plotting.REFERENCE)
  width_axes.set_xlabel("width m of the feature channels")
  width_axes.set_ylabel("residual stream width (channels)")
  width_axes.set_title("model width", fontsize=9)
  plotting.add_legend(width_axes)
  for ax in (axes, width_axes):
    plotting.integer_ticks(ax, "x")
  plotting.save_figure(figure, path)
  return out


