"""Error vs depth: trained models of depth L against t-step solvers with t = L, on held-out prompts.

`depth_comparison` puts trained models of depth L beside compiled CG, PCG (Jacobi) and Chebyshev
(`compiled_solvers`; Chebyshev's interval is `chebyshev_eig_bounds` of a calibration batch,
`[ridge, ridge + max ||Phi||_2^2]`) and reference GD (no compiled version) at t = L, with the CG
bound `|f_t(x) - f*(x)| <= sqrt(k^T A^-1 k) 2 rho^t ||alpha*||_A` (`kcg.bounds.cg_error_bound`) at
t = L; `depth_sweep` repeats it with one panel per input condition number or ridge.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from kcg._src import bounds
from kcg._src import checks
from kcg._src import compiler
from kcg._src import matching
from kcg._src import plotting
from kcg._src import solvers
from kcg._src.study import mse


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
         "kappa_max": float(np.max(kappa)), "oracle_mse": mse(oracle, y),
         "oracle_mse_noiseless": mse(oracle, f), "models": {}, "solvers": {}}
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
    out["solvers"][name] = {"mse": [mse(traj[:, L], y) for L in depths],
                            "mse_noiseless": [mse(traj[:, L], f) for L in depths],
                            "vs_oracle": [mse(traj[:, L], oracle) for L in depths]}
  bound_t = [np.asarray(bounds.cg_error_bound(xs, ys, xq, ridge, L)) for L in depths]
  out["bound"] = [float(np.mean(b)) for b in bound_t]
  # mean(bound^2) >= mean((f_L - f*)^2): the bound on CG's mse against the oracle.
  out["bound_mse"] = [float(np.mean(np.square(b))) for b in bound_t]
  for fam, by_depth in models.items():
    rows = {}
    for L, fn in sorted(by_depth.items()):
      pred = np.asarray(fn(xs, ys, xq), np.float64)
      rows[int(L)] = {"mse": mse(pred, y), "mse_noiseless": mse(pred, f),
                      "vs_oracle": mse(pred, oracle)}
    out["models"][fam] = rows
  return out


# Every panel styles a method alike: compiled solvers, reference GD, the reference solvers (dotted),
# then the trained families.
_DEPTH_ORDER = ("compiled_cg", "compiled_pcg", "compiled_chebyshev", "gd", "cg", "pcg", "chebyshev")


def _plot_depth(axes, cmp: dict, field: str, solver_names: Sequence[str] | None = None) -> None:
  depths = cmp["depths"]
  names = [n for n in (solver_names or cmp["solvers"]) if n in cmp["solvers"]]
  order = list(_DEPTH_ORDER) + sorted(n for n in cmp["solvers"] if n not in _DEPTH_ORDER)
  for name in names:
    linestyle = ":" if name in ("cg", "pcg", "chebyshev") else "-"
    axes.semilogy(depths, np.maximum(cmp["solvers"][name][field], plotting.PLOT_FLOOR),
                  linestyle=linestyle, markersize=4, label=f"{name}_t, t = L",
                  **plotting.line_style(order.index(name)))
  for j, (fam, rows) in enumerate(cmp["models"].items()):
    axes.semilogy(list(rows), [max(r[field], plotting.PLOT_FLOOR) for r in rows.values()], "-",
                  linewidth=2, label=f"trained: {fam}", **plotting.line_style(len(order) + j))
  if field == "vs_oracle":
    axes.semilogy(depths, np.maximum(cmp["bound_mse"], plotting.PLOT_FLOOR), "--", linewidth=0.8,
                  label="CG bound (mean bound^2)", **plotting.REFERENCE)
  else:
    axes.axhline(max(cmp["oracle_mse"], plotting.PLOT_FLOOR), linewidth=0.8, label="KRR oracle",
                 **plotting.REFERENCE)
  axes.set_xlabel("depth L (trained) = steps t (solvers)")
  plotting.integer_ticks(axes, "x")


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
  figure, ((axes,),) = plotting.new_figure()
  _plot_depth(axes, out, "mse")
  axes.set_ylabel("test mse (squared units of y)")
  axes.set_title("trained transformers vs solvers at matched depth", fontsize=9)
  plotting.add_legend(axes)
  plotting.save_figure(figure, path)
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
  if not panels:
    raise ValueError("depth_sweep needs at least one DepthPanel.")
  out = {"knob": knob, "values": [float(p.value) for p in panels], "panels": {}}
  figure, axes = plotting.new_figure(2, len(panels), panel_size=(4.2, 3.5))
  for i, panel in enumerate(panels):
    cmp = _depth_numbers(panel.models, panel.prompts, panel.ridge, panel.compiled)
    out["panels"][f"{panel.value:g}"] = cmp
    _plot_depth(axes[0, i], cmp, "mse", solver_names)
    _plot_depth(axes[1, i], cmp, "vs_oracle", solver_names)
    axes[0, i].set_title(f"{knob} = {panel.value:g} (ridge {panel.ridge:g}, mean kappa(A) "
                         f"{cmp['kappa_mean']:.3g})", fontsize=8)
    axes[0, i].set_ylabel("test mse (squared units of y)")
    axes[1, i].set_ylabel("mse vs KRR oracle (squared units of y)")
  figure.suptitle(f"error vs depth across {knob}", fontsize=9)
  plotting.add_figure_legend(figure, axes.ravel())
  plotting.save_figure(figure, path)
  return out


