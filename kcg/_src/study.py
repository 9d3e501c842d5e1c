"""The formal-vs-learned study as library functions: each sweep returns its numbers and writes a figure.

Every function takes explicit sizes, a PRNG key and an optional `path` (PNG, matplotlib's Agg canvas, no
global state) and returns a JSON-ready dict (floats, lists, nested dicts). `experiments/study.py` runs
them at a chosen scale and assembles `report.md` and `results.json` with `Report`.

Laws tested here:

* Depth (`depth_law`). CG's error after t steps satisfies `|f_t(x) - f*(x)| <= sqrt(k^T A^-1 k) 2 rho^t
  ||alpha*||_A`, `rho = (sqrt(kappa) - 1)/(sqrt(kappa) + 1)` (`kcg.bounds.cg_error_bound`). The fitted
  rate is `exp` of the least-squares slope of `log(error)` over the steps above the rounding floor;
  CG is superlinear, so the fitted rate is at most `rho` (and the bound must hold at every step).
* Error vs depth (`depth_comparison`, `depth_sweep`): trained models of depth L against compiled CG,
  PCG (Jacobi) and Chebyshev with t = L (`compiled_solvers`; Chebyshev's interval is
  `chebyshev_eig_bounds` of a calibration batch, `[ridge, ridge + max ||Phi||_2^2]`) and reference GD
  (no compiled version), on held-out prompts; one panel per input condition number or ridge.
* Ridge and condition number (`solver_sweep`): error of t-step CG, PCG, GD and Chebyshev against the
  KRR oracle as the ridge or the condition number of the input covariance moves.
* Failure modes (`failure_modes`): nearly collinear supports and very small ridge, where `kappa(A)`
  explodes; compiled CG in float64 and float32 against the float64 oracle.
* Feature perturbation, stub S4 (`feature_perturbation`, `perturbation_bound`). With `A = K + ridge I`,
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
  features; KRR on `P phi` is KRR with `K^ = Phi P Phi^T`, so the S4 bound applies with
  `||K - K^||_2 = sigma_{m+1}(Phi)^2` for the best rank-m projection (the spectral tail). The
  compiled width-m models (`compile_cg(projection=S)`) are measured beside `kcg.sketch`'s bound.
* Temperature (`temperature_sweep`, Route A): CG on the exponential kernel `exp(<x, x'>/tau)` against
  its rate `rho(kappa(tau))^t`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import ablations
from kcg._src import bounds
from kcg._src import checks
from kcg._src import kernels
from kcg._src import matching
from kcg._src import probes
from kcg._src import problems
from kcg._src import solvers

Array = jax.Array
FLOOR = 1e-300


# ----------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------


def _figure(ncols: int = 1, size: tuple[float, float] | None = None):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=size or (5.2 * ncols, 3.9))
  FigureCanvasAgg(figure)
  return figure, figure.subplots(1, ncols, squeeze=False)[0]


def _save(figure, path: str | None) -> None:
  figure.tight_layout()
  if path:
    figure.savefig(path, dpi=110)


def _rms(x: Any, axis=None) -> np.ndarray:
  return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), axis=axis))


def _relative_rms(a: Any, b: Any, axis=None) -> np.ndarray:
  """`rms(a - b) / rms(b)` over `axis` (0 where both vanish)."""
  num = _rms(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis)
  den = _rms(b, axis)
  return np.where(den > 0, num / np.maximum(den, FLOOR), num)


def fitted_rate(errors: Sequence[float], floor: float = 1e-10) -> float:
  """`exp(slope)` of a least-squares line through `log(errors[t])` for the t with error > floor.

  NaN when fewer than two steps lie above the floor.
  """
  e = np.asarray(errors, np.float64)
  steps = np.arange(len(e))
  keep = np.isfinite(e) & (e > floor)
  # Fit from t = 1: t = 0 (f_0 = 0) is the same for every method.
  keep &= steps >= 1
  if np.count_nonzero(keep) < 2:
    return float("nan")
  slope = np.polyfit(steps[keep], np.log(e[keep]), 1)[0]
  return float(np.exp(slope))


def jsonable(x: Any) -> Any:
  """Nested dicts/lists of numbers with NumPy and JAX values converted (NaN and inf become None)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray)):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x


def _mse(a: Any, b: Any) -> float:
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------------------
# Depth.
# ----------------------------------------------------------------------------------------------------


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
  figure, (axes,) = _figure()
  for i, kappa in enumerate(condition_numbers):
    prob = problems.batched_krr_problem(jax.random.fold_in(key, i), num_prompts,
                                        num_support=num_support, feature_dim=feature_dim,
                                        num_query=num_query, condition_number=kappa, ridge=ridge)
    args = (prob.phi_support, prob.y_support, prob.phi_query)
    f_star = np.asarray(solvers.krr_predict(*args, ridge))
    ref = np.asarray(solvers.cg_predict(*args, ridge, max_steps))
    ref_err = _relative_rms(ref, f_star[:, None], axis=(0, 2))
    bound_t = np.stack([np.asarray(bounds.cg_error_bound(*args, ridge, t))
                        for t in range(max_steps + 1)], axis=1)
    bound = _rms(bound_t, axis=(0, 2)) / max(float(_rms(f_star)), FLOOR)
    rho = float(bounds.cg_rate(kappa))
    entry = {"predicted_rate": rho, "reference_error": ref_err, "bound": bound,
             "reference_fitted_rate": fitted_rate(ref_err),
             "bound_holds": bool(np.all(np.abs(ref - f_star[:, None]) <= bound_t + 1e-9))}
    if compiled is not None:
      comp = np.asarray(compiled.predict_steps(*args))[:, :max_steps + 1]
      comp_err = _relative_rms(comp, f_star[:, None], axis=(0, 2))
      entry.update(compiled_error=comp_err, compiled_fitted_rate=fitted_rate(comp_err),
                   compiled_vs_reference=float(np.max(_relative_rms(comp, ref, axis=(0, 2)))))
      axes.semilogy(np.maximum(comp_err, 1e-17), "o-", label=f"compiled CG, kappa={kappa:g}")
    axes.semilogy(np.maximum(ref_err, 1e-17), ".:", label=f"reference CG, kappa={kappa:g}")
    axes.semilogy(np.maximum(2 * rho ** np.arange(max_steps + 1), 1e-17), "--",
                  label=f"2 rho^t, rho={rho:.3f}")
    out["kappa"][f"{kappa:g}"] = entry
  axes.set_xlabel("CG step t (compiled: depth = init + t x layers per step)")
  axes.set_ylabel("relative error |f_t - f*| / |f*|")
  axes.set_title("error vs depth against ((sqrt k - 1)/(sqrt k + 1))^t", fontsize=9)
  axes.legend(fontsize=6)
  _save(figure, path)
  return out


def chebyshev_eig_bounds(x_support: Any, ridge: float) -> tuple[float, float]:
  """`(ridge, ridge + max_b ||Phi_b||_2^2)`: one interval holding `eig(K_b + ridge I)` for every prompt b.

  `K = Phi Phi^T` is PSD with `lambda_max(K) = ||Phi||_2^2`, so the interval holds the spectrum of
  every prompt of the batch `x_support [B, k, p]` (a calibration batch: a compiled Chebyshev model
  bakes one interval into its weights). The lower end is attained when `k > p` (K singular). A
  held-out prompt can exceed the upper end; `depth_comparison` reports how many do.
  """
  checks.check_ridge(ridge)
  phi = np.asarray(x_support, np.float64)
  if phi.ndim != 3 or not np.all(np.isfinite(phi)):
    raise ValueError(f"x_support must be a finite [B, k, p] batch, got shape {phi.shape}.")
  top = float(np.max(np.linalg.norm(phi, ord=2, axis=(1, 2)) ** 2))
  return float(ridge), float(ridge) + top


def compiled_solvers(num_support: int, input_dim: int, num_steps: int, ridge: float, *,
                     calibration_x_support: Any,
                     algorithms: Sequence[str] = ("cg", "pcg", "chebyshev")) -> dict:
  """Compiled t-step solvers for error-vs-depth comparisons: `{"compiled_<name>": kcg.CompiledCG}`.

  `"cg"`: `kcg.compile_cg(k, d, t, ridge, mask="prefix")`; `"pcg"`: the same with
  `preconditioner="jacobi"` (`M = diag(K) + ridge I`); `"chebyshev"`: `kcg.compile_chebyshev` with
  `eig_bounds = chebyshev_eig_bounds(calibration_x_support, ridge)`. Gradient descent has no compiled
  version (only its reference, `kcg.solvers.gd_predict`).
  """
  from kcg._src import compiler  # pylint: disable=g-import-not-at-top

  out = {}
  for name in algorithms:
    if name == "cg":
      out["compiled_cg"] = compiler.compile_cg(num_support, input_dim, num_steps, ridge, mask="prefix")
    elif name == "pcg":
      out["compiled_pcg"] = compiler.compile_cg(num_support, input_dim, num_steps, ridge,
                                                mask="prefix", preconditioner="jacobi")
    elif name == "chebyshev":
      out["compiled_chebyshev"] = compiler.compile_chebyshev(
          num_support, input_dim, num_steps, ridge, mask="prefix",
          eig_bounds=chebyshev_eig_bounds(calibration_x_support, ridge))
    else:
      raise ValueError(f"unknown compiled solver {name!r}; choose from 'cg', 'pcg', 'chebyshev' "
                       "(gradient descent has no compiled version).")
  return out


def _depth_numbers(models: Mapping[str, Mapping[int, Callable]], prompts: Any, ridge: float,
                   compiled: Any) -> dict:
  """The numbers of `depth_comparison` (no figure)."""
  xs, ys, xq = prompts.x_support, prompts.y_support, prompts.x_query
  y = np.asarray(prompts.y_query, np.float64)
  f = np.asarray(getattr(prompts, "f_query", prompts.y_query), np.float64)
  depths = sorted({int(L) for fam in models.values() for L in fam})
  if not depths:
    raise ValueError("models is empty: pass {family: {depth L: predictor}} with at least one depth.")
  max_depth = max(depths)
  oracle = np.asarray(solvers.krr_predict(xs, ys, xq, ridge))
  kappa = np.asarray(bounds.condition_number(xs, ridge))
  out = {"depths": depths, "ridge": float(ridge), "kappa_mean": float(np.mean(kappa)),
         "kappa_max": float(np.max(kappa)), "oracle_mse": _mse(oracle, y),
         "oracle_mse_noiseless": _mse(oracle, f), "models": {}, "solvers": {}}
  solver_traj = {alg: np.asarray(matching.trajectory(alg, max_depth, ridge)(xs, ys, xq))
                 for alg in ("cg", "pcg", "gd", "chebyshev")}
  if compiled is not None:
    compiled = compiled if isinstance(compiled, Mapping) else {"compiled_cg": compiled}
    for name, model in compiled.items():
      if model.num_steps < max_depth:
        raise ValueError(f"compiled solver {name!r} runs {model.num_steps} steps; the deepest model "
                         f"has L = {max_depth}: compile with num_steps >= {max_depth}.")
      solver_traj[name] = np.asarray(model.predict_steps(xs, ys, xq))
      if getattr(model, "algorithm", "cg") == "chebyshev":
        lam_max = np.linalg.norm(np.asarray(xs, np.float64), ord=2, axis=(1, 2)) ** 2 + ridge
        out["chebyshev_eig_bounds"] = list(model.eig_bounds)
        out["chebyshev_fraction_above_bounds"] = float(np.mean(lam_max > model.eig_bounds[1]))
  for name, traj in solver_traj.items():
    out["solvers"][name] = {"mse": [_mse(traj[:, L], y) for L in depths],
                            "mse_noiseless": [_mse(traj[:, L], f) for L in depths],
                            "vs_oracle": [_mse(traj[:, L], oracle) for L in depths]}
  bound_t = [np.asarray(bounds.cg_error_bound(xs, ys, xq, ridge, L)) for L in depths]
  out["bound"] = [float(np.mean(b)) for b in bound_t]
  # mean(bound^2) >= mean((f_L - f*)^2): the bound on CG's mse against the oracle.
  out["bound_mse"] = [float(np.mean(np.square(b))) for b in bound_t]
  for fam, by_depth in models.items():
    rows = {}
    for L, fn in sorted(by_depth.items()):
      pred = np.asarray(fn(xs, ys, xq), np.float64)
      rows[int(L)] = {"mse": _mse(pred, y), "mse_noiseless": _mse(pred, f),
                      "vs_oracle": _mse(pred, oracle)}
    out["models"][fam] = rows
  return out


_DEPTH_STYLE = {"compiled_cg": "s-", "compiled_pcg": "^-", "compiled_chebyshev": "v-", "gd": "x--",
                "cg": ".:", "pcg": ".:", "chebyshev": ".:"}


def _plot_depth(axes, cmp: dict, field: str, solver_names: Sequence[str] | None = None,
                legend: bool = True) -> None:
  depths = cmp["depths"]
  names = [n for n in (solver_names or cmp["solvers"]) if n in cmp["solvers"]]
  for name in names:
    axes.semilogy(depths, np.maximum(cmp["solvers"][name][field], 1e-17),
                  _DEPTH_STYLE.get(name, ".--"), label=f"{name}_t, t = L")
  for fam, rows in cmp["models"].items():
    axes.semilogy(list(rows), [max(r[field], 1e-17) for r in rows.values()], "o-", linewidth=2,
                  label=f"trained: {fam}")
  if field == "vs_oracle":
    axes.semilogy(depths, np.maximum(cmp["bound_mse"], 1e-17), "k--", linewidth=0.8,
                  label="CG bound (mean bound^2)")
  else:
    axes.axhline(max(cmp["oracle_mse"], 1e-17), color="k", linewidth=0.8, label="KRR oracle")
  axes.set_xlabel("depth L (trained) = steps t (solvers)")
  if legend:
    axes.legend(fontsize=6)


def depth_comparison(models: Mapping[str, Mapping[int, Callable]], prompts: Any, ridge: float, *,
                     compiled: Any = None, path: str | None = None) -> dict:
  """Test error vs depth L for trained models and for the solvers with t = L steps.

  Args:
    models: `{family name: {depth L: predictor}}` (e.g. "linear attention": {1: f1, 2: f2}).
    prompts: held-out prompts with `y_query` (and `f_query`).
    ridge: the solvers' ridge.
    compiled: compiled solvers with `num_steps >= max L` whose `predict_steps` gives every t: a
      `{name: kcg.CompiledCG}` mapping (e.g. `compiled_solvers(...)`), one `kcg.CompiledCG` (named
      "compiled_cg"), or None. Reference CG, PCG, GD and Chebyshev (exact per-prompt bounds) are
      always included.

  Returns: per family and depth the model's mse (vs y and vs the noiseless f), its agreement with the
  oracle (mse against it); per solver and depth the same at t = L; the theorem's bound at t = L (mean
  |bound| and mean bound^2, the latter bounding CG's mse against the oracle); the mean and largest
  `cond(K + ridge I)`; for a compiled Chebyshev model its interval and the fraction of prompts whose
  `lambda_max` lies above it.
  """
  out = _depth_numbers(models, prompts, ridge, compiled)
  figure, (axes,) = _figure()
  _plot_depth(axes, out, "mse")
  axes.set_ylabel("test mse")
  axes.set_title("trained transformers vs solvers at matched depth", fontsize=9)
  _save(figure, path)
  return out


class DepthPanel(NamedTuple):
  """One panel of `depth_sweep`: the trained models, held-out prompts and solvers at one knob value.

  Attributes:
    value: the knob's value (a condition number, a ridge).
    models: `{family: {depth L: predictor}}` trained on the task at this value.
    prompts: held-out prompts of that task.
    ridge: the solvers' (and oracle's) ridge.
    compiled: compiled solvers, as `depth_comparison`'s `compiled`.
  """

  value: float
  models: Mapping[str, Mapping[int, Callable]]
  prompts: Any
  ridge: float
  compiled: Any = None


DEPTH_SWEEP_SOLVERS = ("compiled_cg", "compiled_pcg", "compiled_chebyshev", "gd")


def depth_sweep(knob: str, panels: Sequence[DepthPanel], *,
                solver_names: Sequence[str] = DEPTH_SWEEP_SOLVERS, path: str | None = None) -> dict:
  """`depth_comparison` at each value of `knob`; one figure, one column of panels per value.

  Top row: test mse vs depth, one line per method (trained families; the solvers in `solver_names`
  with t = L; the KRR oracle). Bottom row: mse against the KRR oracle, with the CG bound.

  Returns `{"knob", "values", "panels": {f"{value:g}": depth_comparison numbers}}`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  if not panels:
    raise ValueError("depth_sweep needs at least one DepthPanel.")
  out = {"knob": knob, "values": [float(p.value) for p in panels], "panels": {}}
  figure = Figure(figsize=(4.2 * len(panels), 7.0))
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, len(panels), squeeze=False)
  for i, panel in enumerate(panels):
    cmp = _depth_numbers(panel.models, panel.prompts, panel.ridge, panel.compiled)
    out["panels"][f"{panel.value:g}"] = cmp
    _plot_depth(axes[0, i], cmp, "mse", solver_names, legend=i == 0)
    _plot_depth(axes[1, i], cmp, "vs_oracle", solver_names, legend=i == 0)
    axes[0, i].set_title(f"{knob} = {panel.value:g} (ridge {panel.ridge:g}, mean kappa(A) "
                         f"{cmp['kappa_mean']:.3g})", fontsize=8)
  axes[0, 0].set_ylabel("test mse")
  axes[1, 0].set_ylabel("mse vs KRR oracle")
  figure.suptitle(f"error vs depth across {knob}", fontsize=9)
  _save(figure, path)
  return out


# ----------------------------------------------------------------------------------------------------
# Ridge, condition number, temperature.
# ----------------------------------------------------------------------------------------------------

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
  from kcg._src import tasks  # pylint: disable=g-import-not-at-top

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
    out["oracle_mse"].append(_mse(oracle, y))
    out["predicted_cg_factor"].append(float(2 * bounds.cg_rate(kappa) ** num_steps))
    for a in algorithms:
      f_t = np.asarray(matching.trajectory(a, num_steps, lam)(xs, ys, xq))[:, -1]
      out["relative_error"][a].append(float(_relative_rms(f_t, oracle)))
      out["mse"][a].append(_mse(f_t, y))
  figure, axes = _figure(2)
  for a in algorithms:
    axes[0].loglog(out["values"], np.maximum(out["relative_error"][a], 1e-17), "o-", label=f"{a}_{num_steps}")
  axes[0].loglog(out["values"], np.minimum(out["predicted_cg_factor"], 1e3), "k--",
                 label="2 rho(kappa)^t")
  axes[0].set_xlabel(knob)
  axes[0].set_ylabel("relative error vs KRR oracle")
  axes[0].legend(fontsize=6)
  axes[1].loglog(out["values"], out["kappa"], "o-")
  axes[1].set_xlabel(knob)
  axes[1].set_ylabel("mean cond(K + ridge I)")
  figure.suptitle(f"{knob} sweep, t = {num_steps}", fontsize=9)
  _save(figure, path)
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
    errors = _relative_rms(traj, oracle[:, None], axis=(0, 2))
    kappa = float(np.mean(np.asarray(bounds.condition_number(xs, ridge, kernel=kernel))))
    out["kappa"].append(kappa)
    out["cg_relative_error"].append(float(errors[-1]))
    out["predicted_factor"].append(float(2 * bounds.cg_rate(kappa) ** num_steps))
    out["fitted_rate"].append(fitted_rate(errors))
    out["predicted_rate"].append(float(bounds.cg_rate(kappa)))
  figure, axes = _figure(2)
  axes[0].loglog(out["temperatures"], np.maximum(out["cg_relative_error"], 1e-17), "o-",
                 label=f"CG_{num_steps} vs oracle")
  axes[0].loglog(out["temperatures"], out["predicted_factor"], "k--", label="2 rho(kappa)^t")
  axes[0].set_xlabel("temperature tau")
  axes[0].set_ylabel("relative error")
  axes[0].legend(fontsize=7)
  axes[1].loglog(out["temperatures"], out["kappa"], "o-")
  axes[1].set_xlabel("temperature tau")
  axes[1].set_ylabel("mean cond(K_tau + ridge I)")
  figure.suptitle("exponential kernel (softmax route A): temperature sweep", fontsize=9)
  _save(figure, path)
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
           "reference_cg": float(_relative_rms(
               np.asarray(solvers.cg_predict(xs, ys, xq, lam, t))[:, -1], oracle))}
    as32 = [jnp.asarray(a, jnp.float32) for a in (xs, ys, xq)]

    def error(predict):
      # NaN where float32 Cholesky fails or the compiled model refuses the prompt (outside its
      # dynamic range): both raise ValueError rather than return a wrong number.
      try:
        return float(_relative_rms(np.asarray(predict()), oracle))
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
  figure, axes = _figure(2)
  for ax, (title, rows, xlabel) in zip(axes, (("nearly collinear supports", out["collinear"], "delta"),
                                               ("very small ridge (rank K = d < k)", out["small_ridge"],
                                                "ridge"))):
    xs_plot = [float(v) for v in rows]
    for field in ("reference_cg", "compiled_float64", "compiled_float32", "oracle_float32"):
      if field in next(iter(rows.values())):
        ax.loglog(xs_plot, [max(r[field], 1e-17) for r in rows.values()], "o-", label=field)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative error vs float64 oracle (t = k)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
  _save(figure, path)
  return out


# ----------------------------------------------------------------------------------------------------
# Feature perturbation (S4) and width.
# ----------------------------------------------------------------------------------------------------


def perturbation_bound(phi_support: Any, y_support: Any, phi_query: Any, phi_support_hat: Any,
                       phi_query_hat: Any, ridge: float) -> dict[str, Array]:
  """The S4 bound for the linear kernel at every query (module docstring), `[B, q]` arrays.

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
  """S4: `|f* - f^*|` against `||K - K^||_2` for `Phi^ = Phi + eps E` (E Gaussian, query features too).

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
  figure, (axes,) = _figure()
  axes.loglog(out["kernel_distance"], out["actual"], "o-", label="mean |f* - f^*|")
  axes.loglog(out["kernel_distance"], out["sharp_bound"], "--", label="sharp bound (||A^^-1 k^||)")
  axes.loglog(out["kernel_distance"], out["lipschitz_bound"], ":", label="Lipschitz bound (1/ridge)")
  axes.set_xlabel("||K - K^||_2")
  axes.set_ylabel("prediction change")
  axes.set_title("S4: KRR under feature perturbation", fontsize=9)
  axes.legend(fontsize=7)
  _save(figure, path)
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
  from kcg._src import routes  # pylint: disable=g-import-not-at-top
  from kcg._src import sketch  # pylint: disable=g-import-not-at-top

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
  scale = max(float(_rms(full)), FLOOR)
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
    out["top"]["error"].append(float(_rms(measured)) / scale)
    out["top"]["bound"].append(float(_rms(bound)) / scale)
    out["top"]["sharp"].append(float(_rms(np.asarray(b.sharp))) / scale)
    out["top"]["max_ratio"].append(float(np.max(measured[resolved] / bound[resolved]))
                                   if np.any(resolved) else float("nan"))
    out["top"]["kernel_distance"].append(float(np.mean(np.asarray(b.kernel_distance))))
    out["spectral_tail"].append(out["top"]["kernel_distance"][-1])
  if low_rank_predictor is not None:
    out["hook"] = [float(_relative_rms(np.asarray(low_rank_predictor(m)(phi, y, phi_q)), full))
                   for m in widths]
  ratios = [r for name in ("principal", "random", "top") for r in out[name]["max_ratio"]
            if math.isfinite(r)]
  out["bound_holds"] = bool(all(r <= 1 + 1e-9 for r in ratios))

  figure, (axes, width_axes) = _figure(2)
  floor = lambda v: np.maximum(np.asarray(v, np.float64), 1e-17)
  for name, marker in (("principal", "o"), ("random", "s")):
    axes.semilogy(widths, floor(out[name]["compiled_error"]), marker + "-",
                  label=f"{name}: compiled width-m model")
    axes.semilogy(widths, floor(out[name]["bound"]), marker + "--", label=f"{name}: bound (own E)")
  axes.semilogy(widths, floor(out["principal"]["tail_estimate"]), "o:",
                label="principal: tail estimate (E^2 = k sum mu_i>m)")
  axes.semilogy(widths, floor(out["top"]["error"]), "^-", label="top (per prompt): sketched KRR")
  axes.semilogy(widths, floor(out["top"]["bound"]), "^--", label="top: bound")
  if out["hook"] is not None:
    axes.semilogy(widths, floor(out["hook"]), "kx-", label="width-m model (hook)")
  narrow = [v for name in ("principal", "random", "top") for m, v in zip(widths, out[name]["error"])
            if m < feature_dim and v > 0]
  if narrow:  # m = p sits at rounding level (~1e-15): clip there rather than squash the m < p curves
    axes.set_ylim(bottom=max(min(narrow) / 30, 1e-16))
  axes.set_xlabel(f"width m of the feature channels (p = {feature_dim})")
  axes.set_ylabel("relative error vs full KRR")
  axes.set_title("measured vs bound, side by side (m = p: rounding, clipped)", fontsize=9)
  axes.legend(fontsize=6)
  width_axes.plot(widths, out["model_width"], "o-", label=f"compiled width-m model ({form}, {mask})")
  width_axes.axhline(out["full_width"], color="k", linewidth=0.8, label="compiled on all p features")
  width_axes.set_xlabel("m")
  width_axes.set_ylabel("residual stream width")
  width_axes.set_title("model width", fontsize=9)
  width_axes.legend(fontsize=6)
  _save(figure, path)
  return out


# ----------------------------------------------------------------------------------------------------
# Probes, ablations and matching of a subject, with their figures.
# ----------------------------------------------------------------------------------------------------


def probe_study(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, num_steps: int,
                combos: Sequence[tuple[str, str]] | None = None, form: str = "dual",
                feature_map: Callable | None = None, control_seed: int = 0, num_folds: int = 5,
                probe_ridge: float = 1e-6, cosine_threshold: float = 0.9,
                path: str | None = None) -> dict:
  """Probes every layer of `subject` for the CG state at every step `t = 0..num_steps`.

  `combos` are `(quantity, site)` pairs (default: alpha, r, p at the support tokens and at the
  aggregator, w at the aggregator and the queries). Targets: `probes.state_targets` (reference CG with
  `ridge` on `phi(x)`). The control is `random_init_like(subject, control_seed)`.

  Returns per combo the `[L+1, T+1]` grids (cosine, r2, shuffled cosine, control cosine, trivial,
  training rows per varying feature) and, per step t, the best layer and its scores.
  """
  if combos is None:
    combos = (("alpha", "support"), ("r", "support"), ("p", "support"), ("alpha", "aggregator"),
              ("w", "aggregator"), ("w", "query"))
  num_support = prompts.x_support.shape[1]
  num_query = prompts.x_query.shape[1]
  h = np.asarray(probes.residuals(subject, prompts))
  h_control = np.asarray(probes.residuals(probes.random_init_like(subject, control_seed), prompts))
  targets = probes.state_targets(prompts.x_support, prompts.y_support, ridge, num_steps, form=form,
                                 feature_map=feature_map)
  out = {"subject": subject.name, "layer_names": list(subject.layer_names), "combos": {}}
  figure, axes = _figure(len(combos), size=(3.6 * len(combos), 3.4))
  for ax, (quantity, site) in zip(axes, combos):
    values = np.asarray(getattr(targets, quantity))  # [B, T+1, n]
    per_step = np.stack([probes.site_targets(values[:, t], site, num_query)
                         for t in range(num_steps + 1)])
    grid = probes.probe_grid(probes.site_features(h, site, num_support), per_step, key,
                             control_features_LxBxSxD=probes.site_features(h_control, site, num_support),
                             num_folds=num_folds, ridge=probe_ridge, cosine_threshold=cosine_threshold)
    best_layer = np.argmax(np.nan_to_num(grid.cosine, nan=-2), axis=0)
    steps = np.arange(num_steps + 1)
    out["combos"][f"{quantity}@{site}"] = {
        "cosine": grid.cosine, "r2": grid.r2, "shuffled_cosine": grid.shuffled_cosine,
        "control_cosine": grid.control_cosine, "trivial": grid.trivial,
        "rows_per_feature": grid.rows_per_feature,
        "best_layer": best_layer, "best_cosine": grid.cosine[best_layer, steps],
        "best_r2": grid.r2[best_layer, steps],
        "best_control_cosine": np.nanmax(grid.control_cosine, axis=0),
        "best_shuffled_cosine": np.nanmax(grid.shuffled_cosine, axis=0)}
    layers = np.arange(grid.cosine.shape[0])
    for t in range(1, num_steps + 1):
      line, = ax.plot(layers, grid.cosine[:, t], "-", label=f"t={t}")
      ax.plot(layers, grid.control_cosine[:, t], ":", color=line.get_color())
    ax.axhline(cosine_threshold, color="k", linewidth=0.6)
    ax.set_ylim(-0.2, 1.05)
    ax.set_xlabel("layer")
    ax.set_title(f"{quantity}_t @ {site}", fontsize=8)
  axes[0].set_ylabel("held-out cosine (dotted: random init)")
  axes[0].legend(fontsize=6)
  figure.suptitle(f"probes: {subject.name}", fontsize=9)
  _save(figure, path)
  return out


def compiled_ablation_table(compiled: Any, prompts: Any, *, operations: Sequence[str] | None = None,
                            steps: Sequence[int] | None = None, path: str | None = None) -> dict:
  """`ablations.ablate_compiled` for every operation the construction has; a bar chart of match/damage.

  Works for every construction with an ablation table (`ablations.available_operations`): CG in its
  three constructions, PCG, Chebyshev and softmax Route A. `steps` (None: all) are the CG steps at
  which each operation is removed; operations of the init layers (the PCG preconditioner) damage
  every step whatever `steps` is.
  """
  available = ablations.available_operations(compiled.program)
  ops = [op for op in (operations or available) if op in available]
  rows = {}
  for op in ops:
    at = None if op == "preconditioner" else steps
    rep = ablations.ablate_compiled(compiled, op, prompts, steps=at)
    rows[op] = {"removed": rep.ablation.description, "match": rep.match,
                "damage_size": rep.damage_size, "mse_vs_oracle_healthy": rep.mse_healthy,
                "mse_vs_oracle_damaged": rep.mse_damaged}
  figure, (axes,) = _figure(size=(6.4, 3.9))
  pos = np.arange(len(ops))
  axes.bar(pos - 0.2, [max(rows[o]["match"], 1e-17) for o in ops], 0.4,
           label="|damaged model - damaged CG| / |damaged CG|")
  axes.bar(pos + 0.2, [max(rows[o]["damage_size"], 1e-17) for o in ops], 0.4,
           label="|damaged - healthy| / |healthy|")
  axes.set_yscale("log")
  axes.set_xticks(pos)
  axes.set_xticklabels(ops, rotation=30, fontsize=7)
  where = "every step" if steps is None else f"steps {list(steps)}"
  axes.set_title(f"ablations of {compiled.program.name} (t={compiled.num_steps}, at {where})",
                 fontsize=9)
  axes.legend(fontsize=6)
  _save(figure, path)
  return {"construction": compiled.program.name, "steps": None if steps is None else list(steps),
          "operations": rows}


def trained_ablation(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, max_steps: int,
                     path: str | None = None) -> dict:
  """Every head and every layer of a trained subject removed in turn; the damaged model's best CG/GD step.

  For each removed layer, the damaged predictions are matched (`matching.match_layers` on the final
  output) against CG and GD trajectories: does removing a layer look like one solver step fewer?
  """
  dmap = ablations.degradation_map(subject, prompts)
  trajectories = matching.algorithm_trajectories(prompts, ridge, max_steps, algorithms=("cg", "gd"),
                                                 spaces=("data",))
  healthy = probes.predict_fn(subject)(prompts.x_support, prompts.y_support, prompts.x_query)
  healthy_match = matching.match_layers(healthy[None], prompts, trajectories, key).layers[0]
  layer_matches = []
  for layer in range(subject.num_layers):
    damaged = ablations.degradation(subject, prompts, layers=(layer,)).damaged
    m = matching.match_layers(damaged[None], prompts, trajectories, key).layers[0]
    layer_matches.append({"layer": layer, "best": m.name, "step": m.step,
                          "squared_difference": m.squared_difference})
  figure, axes = _figure(2)
  image = axes[0].imshow(np.log10(np.maximum(dmap.head_mse, 1e-17) / max(dmap.mse_healthy, 1e-17)),
                         aspect="auto", cmap="magma")
  figure.colorbar(image, ax=axes[0], label="log10 (mse damaged / mse healthy)")
  axes[0].set_xlabel("head")
  axes[0].set_ylabel("layer")
  axes[0].set_title("remove one head", fontsize=8)
  axes[1].bar(np.arange(subject.num_layers), dmap.layer_mse)
  axes[1].axhline(dmap.mse_healthy, color="k", linewidth=0.8, label="healthy")
  axes[1].set_yscale("log")
  axes[1].set_xlabel("removed layer")
  axes[1].set_ylabel("test mse")
  axes[1].legend(fontsize=7)
  figure.suptitle(f"ablations: {subject.name}", fontsize=9)
  _save(figure, path)
  return {"mse_healthy": dmap.mse_healthy, "head_mse": dmap.head_mse, "layer_mse": dmap.layer_mse,
          "head_change": dmap.head_change, "layer_change": dmap.layer_change,
          "healthy_best_match": {"best": healthy_match.name, "step": healthy_match.step,
                                 "squared_difference": healthy_match.squared_difference},
          "layer_removed_best_match": layer_matches}


def matching_study(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, max_steps: int,
                   readout: str = "logit_lens", fit_prompts: Any = None,
                   feature_map: Callable | None = None, gradients: bool = True,
                   algorithms: Sequence[str] = matching.ALGORITHMS,
                   spaces: Sequence[str] = matching.SPACES, readout_ridge: float = 1e-3,
                   path: str | None = None) -> dict:
  """`matching.match_subject` plus a figure: each candidate's best distance per layer."""
  m = matching.match_subject(subject, prompts, key, ridge=ridge, max_steps=max_steps, readout=readout,
                             fit_prompts=fit_prompts, feature_map=feature_map, gradients=gradients,
                             algorithms=algorithms, spaces=spaces, readout_ridge=readout_ridge)
  figure, (axes,) = _figure(size=(6.4, 3.9))
  layers = np.arange(len(m.layers))
  for name, dist in m.best_distance.items():
    axes.semilogy(layers, np.maximum(dist, 1e-33), ".-", label=name)
  for lm in m.layers:
    axes.annotate(str(lm.step), (lm.layer, max(lm.squared_difference, 1e-33)), fontsize=6)
  axes.set_xlabel("layer")
  axes.set_ylabel("min_t mean (f_layer - f_t)^2")
  axes.set_title(f"layer-wise matching ({readout}): {subject.name}", fontsize=8)
  axes.legend(fontsize=5, ncol=2)
  _save(figure, path)
  return {"subject": subject.name, "readout": readout,
          "layers": [lm._asdict() for lm in m.layers], "best_step": m.best_step,
          "best_distance": m.best_distance, "table": m.table()}


# ----------------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------------


class Report:
  """Collects markdown sections, figures and numbers; `write` saves report.md and results.json."""

  def __init__(self, workdir: str, title: str):
    self.workdir = workdir
    self.lines = [f"# {title}", ""]
    self.results: dict[str, Any] = {}
    self.figures: list[str] = []
    os.makedirs(workdir, exist_ok=True)

  def path(self, filename: str) -> str:
    return os.path.join(self.workdir, filename)

  def section(self, title: str, text: str = "") -> None:
    self.lines += [f"## {title}", ""] + ([text, ""] if text else [])

  def text(self, text: str) -> None:
    self.lines += [text, ""]

  def figure(self, filename: str, caption: str) -> None:
    if not os.path.exists(self.path(filename)):
      raise ValueError(f"figure {filename} was not written to {self.workdir}.")
    self.figures.append(filename)
    self.lines += [f"![{caption}]({filename})", "", f"*{caption}*", ""]

  def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    self.lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    self.lines.append("")

  def add(self, name: str, value: Any) -> Any:
    self.results[name] = jsonable(value)
    return value

  def write(self, config: Mapping[str, Any]) -> tuple[str, str]:
    self.lines += ["## Configuration", "", "```json", json.dumps(jsonable(config), indent=2,
                                                                  sort_keys=True), "```", ""]
    report_path, results_path = self.path("report.md"), self.path("results.json")
    with open(report_path, "w") as f:
      f.write("\n".join(self.lines))
    with open(results_path, "w") as f:
      json.dump({"config": jsonable(config), "results": self.results}, f, indent=1)
    return report_path, results_path


__all__ = (
    "DEPTH_SWEEP_SOLVERS", "DepthPanel", "Report", "chebyshev_eig_bounds", "compiled_ablation_table",
    "compiled_solvers", "depth_comparison", "depth_law", "depth_sweep", "failure_modes",
    "feature_perturbation", "fitted_rate", "jsonable", "matching_study", "perturbation_bound",
    "probe_study", "solver_sweep", "temperature_sweep", "trained_ablation", "width_sweep",
)
