"""Runs the formal-vs-learned study and writes DIR/report.md, DIR/results.json and the PNG figures.

    python -m experiments.study --config=experiments/configs/study.py:runlocal --workdir=DIR

Trains small in-context learners (linear attention and softmax, depth L) with `kcg.training`, compiles
CG transformers with `kcg.compile_cg`, and runs the library functions of `kcg.study`, `kcg.probes`,
`kcg.ablations` and `kcg.matching` on both: error vs depth against compiled CG, PCG and Chebyshev
and reference GD at t = L (also with models trained afresh across input condition numbers and
ridges, `depth_sweeps`), the depth, ridge, condition-number and temperature laws, failure modes,
the feature-perturbation and width bounds, probes with controls, ablations against the damaged
algorithms (CG, PCG, Chebyshev, softmax Route A), and layer-wise algorithm matching.
See experiments/configs/study.py for the scales and their runtimes. Analyses run in float64 (the
models train in float32 and are evaluated in float64).

Each section is a function of what it reads (the config, the study's ridge, its PRNG key, the
prompts, the trained models) that writes its part of the report and returns its summary lines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax

from experiments import _cli
from experiments._report import Report
import kcg
from kcg import features
from kcg import probes
from kcg import study
from kcg import tasks
from kcg import training

SECTIONS = ("depth_comparison", "depth_sweeps", "depth_law", "ridge_sweep", "condition_sweep",
            "temperature_sweep", "failure_modes", "feature_perturbation", "width_sweep", "compiled",
            "trained")
# The PRNG streams of the study, one per use (`jax.random.split` of the seed's key, in this order).
KEY_NAMES = ("eval", "fit", "laws", "probes", "match", "features", "compiled")
# {(attention, depth L): the trained model as a probe subject}.
Trained = Mapping[tuple[str, int], probes.Subject]


def _ridge(config) -> float:
  """The study's KRR ridge: `config.ridge`, or the Bayes ridge noise^2 d (floored at 1e-3)."""
  if config.ridge > 0:
    return float(config.ridge)
  return max(float(config.task.noise_std) ** 2 * config.task.input_dim, 1e-3)


def _task(config, batch_size: int) -> tasks.TaskConfig:
  t = config.task
  return tasks.TaskConfig(family=t.family, input_dim=t.input_dim, num_support=t.num_support,
                          num_query=t.num_query, batch_size=batch_size, noise_std=t.noise_std,
                          condition_number=t.condition_number, input_rotation=t.input_rotation)


def _train_config(config, attention: str, depth: int, *, num_steps: int | None = None,
                  seed_offset: int = 0, **data_overrides) -> training.TrainConfig:
  """The training config of one model, through `kcg.training.config_from_dict` (which validates it).

  `data_overrides` replace fields of the data part (the task); unknown ones raise ValueError.
  """
  t, tr = config.task, config.train
  num_steps = tr.num_steps if num_steps is None else int(num_steps)
  return training.config_from_dict({
      "model": {"num_layers": depth, "width": tr.width, "num_heads": tr.num_heads,
                "head_dim": tr.head_dim, "mlp_hidden": tr.mlp_hidden, "attention": attention,
                "norm": None, "qkv_init_scale": tr.qkv_init_scale,
                # Linear attention sums over the k supports and the aggregator: 1/(k + 1) keeps it O(1).
                "attention_scale": 1.0 / (t.num_support + 1) if attention == "linear" else None},
      "data": {"family": t.family, "input_dim": t.input_dim, "num_support": t.num_support,
               "num_query": t.num_query, "encoding": "query", "mask": "prefix",
               "noise_std": t.noise_std, "condition_number": t.condition_number,
               "input_rotation": t.input_rotation, **data_overrides},
      "optim": {"learning_rate": tr.learning_rate,
                "warmup_steps": min(tr.warmup_steps, max(1, num_steps // 4))},
      "num_steps": num_steps, "batch_size": tr.batch_size, "seed": config.seed + depth + seed_offset,
      "dtype": "float32", "log_every": max(1, num_steps // 4), "checkpoint_every": num_steps,
      "keep_checkpoints": 1, "eval_batch_size": 64, "final_eval": False,
  })


def _fmt(x: Any) -> str:
  return "n/a" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _final_loss(result, model_dir: str | None) -> float | None:
  """The last logged training loss; a run resumed from a finished checkpoint logs nothing itself."""
  history = training.load_history(model_dir) if model_dir else result.history
  losses = [h["loss"] for h in history if "loss" in h]
  return losses[-1] if losses else None


def _train(report: Report, config, models_dir: str | None) -> dict[tuple[str, int], probes.Subject]:
  """Trains (or resumes from `models_dir`) the study's models; returns them as probe subjects."""
  trained, rows = {}, []
  for attention in config.train.attentions:
    depths = (config.train.softmax_depths if attention == "softmax" and config.train.softmax_depths
              else config.train.depths)
    for depth in depths:
      tc = _train_config(config, attention, int(depth))
      model_dir = (os.path.join(models_dir, f"{attention}_L{depth}") if models_dir
                   else None)
      began = time.perf_counter()
      result = training.train(tc, model_dir)
      loss = _final_loss(result, model_dir)
      name = f"{attention} L={depth}"
      trained[(attention, int(depth))] = probes.subject_from_model(
          result.model, input_dim=config.task.input_dim, name=name)
      rows.append([name, tc.num_steps, loss, time.perf_counter() - began])
  report.section("Trained models", "`kcg.training`, query encoding, prefix mask, no MLP and no "
                 "norm (the class of the compiled models); checkpoints under `models/` when saved "
                 "(load with `kcg.load_trained`).")
  report.table(["model", "steps", "final train loss", "seconds (this run; ~0 when resumed)"], rows)
  report.add("training", {r[0]: {"steps": r[1], "final_loss": r[2], "seconds": r[3]} for r in rows})
  return trained


def _depth_comparison(report: Report, config, trained: Trained, eval_prompts, fit_prompts,
                      ridge: float) -> list[str]:
  t = config.task
  max_depth = max(d for _, d in trained)
  # Chebyshev's interval from the fit prompts (a calibration batch of the same task).
  compiled = study.compiled_solvers(t.num_support, t.input_dim, max_depth, ridge,
                                    calibration_x_support=fit_prompts.x_support,
                                    algorithms=config.compiled.depth_solvers)
  families = {}
  for (attention, depth), subject in trained.items():
    families.setdefault(f"{attention} attention", {})[depth] = probes.predict_fn(subject)
  cmp = report.add("depth_comparison", study.depth_comparison(
      families, eval_prompts, ridge, compiled=compiled,
      path=report.path("depth_vs_trained.png")))
  report.section("Error vs depth: trained models and solvers at t = L", _SOLVERS_TEXT)
  report.figure("depth_vs_trained.png", "Test mse of trained models of depth L against t-step solvers "
                "with t = L (compiled CG, PCG, Chebyshev; reference GD and reference CG/PCG/Chebyshev "
                "dotted); black: KRR oracle.")
  names = [n for n in study.DEPTH_SWEEP_SOLVERS if n in cmp["solvers"]]
  rows = []
  for fam, by_depth in cmp["models"].items():
    for depth, r in by_depth.items():
      i = cmp["depths"].index(int(depth))
      rows.append([fam, depth, r["mse"], r["vs_oracle"]]
                  + [cmp["solvers"][n]["mse"][i] for n in names] + [cmp["bound"][i]])
  report.table(["model", "L", "mse", "mse vs oracle"] + [f"{n}_L mse" for n in names]
               + ["mean CG bound |f_L - f*|"], rows)
  report.text(f"KRR oracle mse {cmp['oracle_mse']:.4g}." + _chebyshev_note(cmp))
  fam, depth, mse = min(((f, d, r["mse"]) for f, bd in cmp["models"].items() for d, r in bd.items()),
                        key=lambda x: x[2])
  i = cmp["depths"].index(int(depth))
  return [f"Best trained model: {fam} L={depth}, test mse {mse:.3g} (KRR oracle "
          f"{cmp['oracle_mse']:.3g}; with t = L = {depth}: " + ", ".join(
              f"{n} {cmp['solvers'][n]['mse'][i]:.3g}" for n in names) + ")."]


_SOLVERS_TEXT = ("Solvers with t = L steps: compiled CG (`kcg.compile_cg`, prefix mask), compiled PCG "
                 "(Jacobi, M = diag(K) + ridge I), compiled Chebyshev (`kcg.compile_chebyshev`; one "
                 "interval baked into the weights: [ridge, ridge + max ||Phi||_2^2] over a "
                 "calibration batch of the same task, not per prompt) and gradient descent, which "
                 "has no compiled version (reference `kcg.solvers.gd_predict`, step 2/(lam_min + "
                 "lam_max) per prompt). The dotted reference Chebyshev uses each prompt's exact "
                 "extreme eigenvalues.")


def _chebyshev_note(cmp: dict) -> str:
  if "chebyshev_eig_bounds" not in cmp:
    return ""
  lo, hi = cmp["chebyshev_eig_bounds"]
  return (f" Compiled Chebyshev interval [{lo:.3g}, {hi:.3g}]; "
          f"{100 * cmp['chebyshev_fraction_above_bounds']:.0f}% of the held-out prompts have "
          "lambda_max(K + ridge I) above it.")


def _depth_sweeps(report: Report, config, eval_key, fit_key, ridge: float,
                  models_dir: str | None) -> list[str]:
  """Models trained afresh across input condition numbers and ridges against compiled solvers."""
  t, sw = config.task, config.sweeps
  d = t.input_dim
  # condition number: the task's noise, so the ridge stays the study's; the covariance's eigenbasis
  # is fixed (one data distribution a model can learn). ridge: the task's noise is set so that the
  # Bayes ridge noise^2 d equals the value, and oracle and solvers use that ridge.
  sweeps = {
      "condition number": ("condition", [
          (float(c), {"condition_number": float(c), "input_rotation": "fixed"}, ridge)
          for c in sw.condition_numbers]),
      "ridge": ("ridge", [
          (float(lam), {"family": "noisy_linear", "noise_std": math.sqrt(float(lam) / d)}, float(lam))
          for lam in sw.ridges]),
  }
  report.section("Error vs depth across input condition numbers and ridges", (
      f"For each value a fresh set of models ({', '.join(sw.attentions)} attention, L = "
      f"{', '.join(map(str, sw.depths))}, {sw.num_steps} steps each) is trained on the task at that "
      f"value and evaluated on {sw.num_prompts} held-out prompts of the same task. Condition "
      "number: of the input covariance (`kcg.tasks`, eigenbasis fixed: input_rotation='fixed'), "
      f"task noise {t.noise_std}, ridge {ridge:g}. Ridge: the task's noise is set to "
      "sqrt(ridge / d), so that the Bayes ridge noise^2 d equals the value, and the oracle and the "
      f"solvers use it (input condition number {t.condition_number:g}). " + _SOLVERS_TEXT
      + " Cells: test mse / mse against the KRR oracle; 'CG bound' is mean bound^2, which bounds "
      "CG's mse against the oracle."))
  results, timings, summary = {}, {}, []
  for knob, (tag, values) in sweeps.items():
    if not values:
      continue
    panels = []
    for i, (value, overrides, panel_ridge) in enumerate(values):
      eval_task = dataclasses.replace(_task(config, sw.num_prompts), **overrides)
      calibration_task = dataclasses.replace(eval_task, batch_size=sw.num_calibration_prompts)
      salt = 1000 + 100 * i + (0 if tag == "condition" else 50)
      prompts = tasks.sample(jax.random.fold_in(eval_key, salt), eval_task)
      calibration = tasks.sample(jax.random.fold_in(fit_key, salt), calibration_task)
      families = {}
      for attention in sw.attentions:
        for depth in sw.depths:
          tc = _train_config(config, attention, int(depth), num_steps=sw.num_steps,
                             seed_offset=salt, **overrides)
          began = time.perf_counter()
          model_dir = (os.path.join(models_dir, "sweeps", f"{tag}{value:g}_{attention}_L{depth}")
                       if models_dir else None)
          result = training.train(tc, model_dir)
          timings[f"{tag}={value:g} {attention} L={depth}"] = {
              "seconds": time.perf_counter() - began, "final_loss": _final_loss(result, model_dir)}
          subject = probes.subject_from_model(result.model, input_dim=d,
                                              name=f"{attention} L={depth}")
          families.setdefault(f"{attention} attention", {})[int(depth)] = probes.predict_fn(subject)
      compiled = study.compiled_solvers(t.num_support, d, max(sw.depths), panel_ridge,
                                        calibration_x_support=calibration.x_support,
                                        algorithms=config.compiled.depth_solvers)
      panels.append(study.DepthPanel(value, families, prompts, panel_ridge, compiled))
    filename = f"depth_sweep_{tag}.png"
    sweep = study.depth_sweep(knob, panels, path=report.path(filename))
    results[tag] = sweep
    report.text(f"### Sweep over the {knob}")
    report.figure(filename, f"Error vs depth, one panel per {knob}: test mse (top) and mse against "
                  "the KRR oracle with the CG bound (bottom).")
    names = [n for n in study.DEPTH_SWEEP_SOLVERS if n in next(iter(sweep["panels"].values()))["solvers"]]
    families = list(next(iter(sweep["panels"].values()))["models"])
    rows, notes = [], []
    for key, cmp in sweep["panels"].items():
      for i, depth in enumerate(cmp["depths"]):
        cell = lambda r, j=None: (f"{r['mse']:.3g} / {r['vs_oracle']:.2g}" if j is None else
                                  f"{r['mse'][j]:.3g} / {r['vs_oracle'][j]:.2g}")
        rows.append([key, depth, cmp["kappa_mean"]]
                    + [cell(cmp["models"][f][depth]) if depth in cmp["models"][f] else "n/a"
                       for f in families]
                    + [cell(cmp["solvers"][n], i) for n in names]
                    + [cmp["bound_mse"][i], cmp["oracle_mse"]])
      notes.append(f"{knob} {key}:" + (_chebyshev_note(cmp) or " no compiled Chebyshev."))
    report.table([knob, "L", "mean kappa(A)"] + [f"trained {f}" for f in families]
                 + [f"{n}_L" for n in names] + ["CG bound (mse)", "oracle mse"], rows)
    report.text(" ".join(notes))
    deepest = max(sw.depths)
    summary.append(f"Depth sweep over the {knob} (test mse at L = t = {deepest}; oracle): " + "; ".join(
        f"{key}: " + ", ".join(f"{f} {cmp['models'][f][deepest]['mse']:.3g}" for f in families)
        + ", " + ", ".join(f"{n} {cmp['solvers'][n]['mse'][-1]:.3g}" for n in names)
        + f", oracle {cmp['oracle_mse']:.3g}" for key, cmp in sweep["panels"].items()) + ".")
  results["training"] = timings
  report.add("depth_sweeps", results)
  return summary


def _depth_law(report: Report, laws, key) -> list[str]:
  compiled = kcg.compile_cg(laws.depth_support, laws.depth_support, laws.depth_max_steps,
                            laws.depth_ridge, mask="prefix")
  law = report.add("depth_law", study.depth_law(
      key, num_support=laws.depth_support, feature_dim=laws.depth_support,
      condition_numbers=laws.depth_kappas, ridge=laws.depth_ridge, max_steps=laws.depth_max_steps,
      num_prompts=laws.num_prompts, compiled=compiled, path=report.path("depth_law.png")))
  report.section("Depth law: error vs t against ((sqrt kappa - 1)/(sqrt kappa + 1))^t",
                 "Problems with cond(K + ridge I) = kappa exactly (`kcg.problems`). Fitted rate: exp of "
                 "the slope of log error over the steps above 1e-10.")
  report.figure("depth_law.png", "Compiled and reference CG error vs step, with 2 rho^t.")
  report.table(["kappa", "predicted rho", "fitted (compiled)", "fitted (reference)", "bound holds",
                "max |compiled - reference| rel"],
               [[k, v["predicted_rate"], v.get("compiled_fitted_rate"), v["reference_fitted_rate"],
                 v["bound_holds"], v.get("compiled_vs_reference")] for k, v in law["kappa"].items()])
  held = all(v["bound_holds"] for v in law["kappa"].values())
  return ["Depth law, fitted CG rates: " + ", ".join(
      f"kappa={k}: {_fmt(v.get('compiled_fitted_rate'))} (predicted {v['predicted_rate']:.3g})"
      for k, v in law["kappa"].items()) + f"; the bound held at every step: {held}."]


def _solver_sweeps(report: Report, config, key, ridge: float, sections: set[str]) -> list[str]:
  """The ridge, condition-number and temperature sweeps of the reference solvers (no summary)."""
  t, laws = config.task, config.laws
  sweeps = {}
  if "ridge_sweep" in sections:
    sweeps["ridge"] = report.add("ridge_sweep", study.solver_sweep(
        jax.random.fold_in(key, 1), "ridge", laws.ridges,
        task=_task(config, laws.num_prompts), ridge=ridge, num_steps=laws.num_steps,
        path=report.path("ridge_sweep.png")))
  if "condition_sweep" in sections:
    cond_task = tasks.TaskConfig(family="noisy_linear" if t.noise_std > 0 else "linear",
                                 input_dim=max(t.input_dim, 2), num_support=t.num_support,
                                 num_query=t.num_query, batch_size=laws.num_prompts,
                                 noise_std=t.noise_std, input_rotation=t.input_rotation)
    sweeps["condition number"] = report.add("condition_sweep", study.solver_sweep(
        jax.random.fold_in(key, 2), "condition_number", laws.condition_numbers,
        task=cond_task, ridge=ridge, num_steps=laws.num_steps,
        path=report.path("condition_sweep.png")))
  if sweeps:
    report.section("Ridge and condition-number sweeps",
                   f"t = {laws.num_steps} steps of each solver; relative error against the KRR oracle.")
    for name, sweep in sweeps.items():
      filename = "ridge_sweep.png" if name == "ridge" else "condition_sweep.png"
      report.figure(filename, f"Solver error and cond(A) against the {name}.")
      report.table([name, "mean kappa(A)", "2 rho^t"]
                   + [f"{a}_t rel err" for a in sweep["relative_error"]],
                   [[v, sweep["kappa"][i], sweep["predicted_cg_factor"][i]]
                    + [sweep["relative_error"][a][i] for a in sweep["relative_error"]]
                    for i, v in enumerate(sweep["values"])])
  if "temperature_sweep" in sections:
    temp = report.add("temperature_sweep", study.temperature_sweep(
        jax.random.fold_in(key, 3), laws.temperatures, num_support=t.num_support,
        input_dim=t.input_dim, num_steps=laws.num_steps, num_prompts=laws.num_prompts,
        ridge=ridge, path=report.path("temperature_sweep.png")))
    report.section("Temperature (softmax Route A: exponential kernel)")
    report.figure("temperature_sweep.png", "CG on exp(<x, x'>/tau) against its rate.")
    report.table(["tau", "kappa", "CG_t rel err", "2 rho^t", "fitted rate", "predicted rate"],
                 [[tau, temp["kappa"][i], temp["cg_relative_error"][i], temp["predicted_factor"][i],
                   temp["fitted_rate"][i], temp["predicted_rate"][i]]
                  for i, tau in enumerate(temp["temperatures"])])
  return []


def _failure_modes(report: Report, config, key) -> list[str]:
  t, laws = config.task, config.laws
  # Collinearity: k <= d supports, well conditioned unless they collapse onto one point. Small ridge:
  # k = 2d supports, so K has rank d and cond(A) ~ ||K|| / ridge.
  fail = report.add("failure_modes", study.failure_modes(
      key, num_support=min(t.num_support, t.input_dim),
      input_dim=t.input_dim, small_ridge_support=2 * t.input_dim, collinearity=laws.collinearity,
      ridges=laws.small_ridges, num_prompts=laws.num_prompts,
      compile_fn=lambda k, d, steps, lam: kcg.compile_cg(k, d, steps, lam, mask="prefix"),
      path=report.path("failure_modes.png")))
  report.section("Failure modes: nearly collinear supports, very small ridge",
                 f"t = k CG steps (k = {fail['num_support_collinear']} collinear supports, k = "
                 f"{fail['num_support_small_ridge']} supports in d = {t.input_dim} for the small "
                 "ridge; exact arithmetic would give the oracle); errors relative to the float64 "
                 "oracle.")
  report.figure("failure_modes.png", "Where cond(A) explodes: reference and compiled CG in float64 "
                "and float32, and the float32 oracle.")
  for title, rows in (("delta (collinear)", fail["collinear"]), ("ridge", fail["small_ridge"])):
    report.table([title, "kappa", "CG steps", "reference CG", "compiled f64", "compiled f32",
                  "oracle f32"],
                 [[key, r["kappa"], r["num_steps"], r["reference_cg"], r.get("compiled_float64"),
                   r.get("compiled_float32"), r["oracle_float32"]] for key, r in rows.items()])
  worst = max(fail["small_ridge"].values(), key=lambda r: r["kappa"])
  return [f"Failure modes: at kappa {worst['kappa']:.2g} (smallest ridge) k-step compiled "
          f"CG is off the oracle by {_fmt(worst.get('compiled_float64'))} in float64 and "
          f"{_fmt(worst.get('compiled_float32'))} in float32 (float32 Cholesky: "
          f"{worst['oracle_float32']:.2g})."]


def _feature_perturbation(report: Report, laws, key) -> list[str]:
  pert = report.add("feature_perturbation", study.feature_perturbation(
      key, scales=laws.perturbation_scales,
      num_prompts=laws.num_prompts, path=report.path("feature_perturbation.png")))
  report.section("Feature perturbation", (
      "With A = K + ridge I, A^ = K^ + ridge I, alpha* = A^-1 y: f* - f^* = (k - k^)^T alpha* + "
      "k^^T A^^-1 (K^ - K) alpha*, so |f*(x) - f^*(x)| <= ||k(x) - k^(x)|| ||alpha*|| + "
      "||A^^-1 k^(x)|| ||K - K^||_2 ||alpha*|| <= ||k - k^|| ||alpha*|| + (||k^(x)||/ridge) "
      "||K - K^||_2 ||alpha*||: Lipschitz in ||K - K^||_2 with constant ||k^(x)|| ||alpha*|| / ridge "
      "<= ||k^(x)|| ||y|| / ridge^2. Checked on random problems: the largest ratio actual/bound must "
      "be <= 1."))
  report.figure("feature_perturbation.png", "Prediction change vs ||K - K^|| with both bounds.")
  report.table(["eps", "||K - K^||", "mean |f* - f^*|", "max actual/sharp", "max actual/Lipschitz",
                "mean Lipschitz const"],
               [[eps, pert["kernel_distance"][i], pert["actual"][i], pert["max_ratio_sharp"][i],
                 pert["max_ratio_lipschitz"][i], pert["lipschitz_constant"][i]]
                for i, eps in enumerate(pert["scales"])])
  return [f"Feature-perturbation bound held on every prompt and query: "
          f"{pert['bound_holds']} (largest actual/bound {max(pert['max_ratio_sharp']):.3g} "
          f"sharp, {max(pert['max_ratio_lipschitz']):.3g} Lipschitz form)."]


def _width(report: Report, laws, key) -> list[str]:
  p = max(laws.widths)
  width = report.add("width_sweep", study.width_sweep(
      key, laws.widths, num_prompts=laws.num_prompts,
      feature_dim=p, num_support=p, path=report.path("width_sweep.png")))
  report.section("Width m < p: spectral-tail bound",
                 "KRR on an m-dimensional projection of phi (best rank-m, principal and random) "
                 "against the feature-perturbation bound, and the compiled width-m models (compile_cg(projection=S), "
                 "width of the m-dimensional construction) beside kcg.sketch's bound.")
  report.figure("width_sweep.png", "Error of width-m sketches and the bound.")
  report.table(["m", "sigma_{m+1}^2 (mean)", "top: error", "top: bound", "random: error",
                "random: bound"],
               [[m, width["spectral_tail"][i], width["top"]["error"][i], width["top"]["bound"][i],
                 width["random"]["error"][i], width["random"]["bound"][i]]
                for i, m in enumerate(width["widths"])])
  return []


def _compiled(report: Report, config, keys: Mapping[str, Any], ridge: float,
              eval_prompts) -> list[str]:
  """Probes, ablations and matching of the compiled constructions, whose right answers are known."""
  t, cc = config.task, config.compiled
  prompts = tasks.sample(keys["compiled"], _task(config, cc.num_prompts))
  report.section("Compiled models: probes, ablations, layer matching",
                 f"Compiled CG with t = {cc.num_steps}, ridge {ridge:g}, on the study's prompts. "
                 "Here the right answers are known: the state is written at each step end, removing "
                 "an operation gives the CG without it, and the step-end layer matches CG_t.")
  results, summary = {}, []
  for construction in cc.constructions:
    form, mask = construction.split("/")
    compiled = kcg.compile_cg(t.num_support, t.input_dim, cc.num_steps, ridge, mask=mask,
                              form=form)
    subject = probes.subject_from_compiled(compiled)
    tag = f"{form}_{mask}"
    ends = list(compiled.program.step_ends)
    combos = tuple((q, probes.compiled_state_site(compiled, q)) for q in ("alpha", "r", "p")) + (
        ("w", "aggregator"),)
    probe_res = study.probe_study(
        subject, prompts, keys["probes"], ridge=ridge, num_steps=cc.num_steps, combos=combos,
        form=form, num_folds=config.probes.num_folds, probe_ridge=config.probes.ridge,
        cosine_threshold=config.probes.cosine_threshold,
        path=report.path(f"probes_compiled_{tag}.png"))
    abl = study.compiled_ablation_table(compiled, prompts,
                                        path=report.path(f"ablations_compiled_{tag}.png"))
    match = study.matching_study(subject, eval_prompts, keys["match"], ridge=ridge,
                                 max_steps=config.matching.max_steps, readout="prediction_channel",
                                 gradients=config.matching.gradients,
                                 algorithms=config.matching.algorithms,
                                 path=report.path(f"matching_compiled_{tag}.png"))
    results[tag] = {"probes": probe_res, "ablations": abl, "matching": match, "step_ends": ends}
    report.text(f"### {subject.name} ({compiled.program.name}, {compiled.config.num_layers} layers, "
                f"step ends {ends})")
    report.figure(f"probes_compiled_{tag}.png", "Held-out probe cosine per layer for the state after "
                  "each step (solid) and on a random-init model of the same architecture (dotted).")
    rows = []
    for combo, r in probe_res["combos"].items():
      for step in range(1, cc.num_steps + 1):
        end = ends[step]
        rows.append([combo, step, end, r["cosine"][end][step], r["r2"][end][step],
                     r["shuffled_cosine"][end][step], r["control_cosine"][end][step],
                     r["best_control_cosine"][step], bool(r["trivial"][end][step]),
                     r["rows_per_feature"][end][step]])
    report.table(["state @ site", "t", "layer (step end)", "cosine", "R^2", "shuffled cos",
                  "random-init cos", "best random-init cos (any layer)", "trivial",
                  "train rows / varying feature"], rows)
    if min(row[-1] for row in rows) < 1:
      report.text(f"Some probes above had fewer training rows than varying features (underdetermined): "
                  f"their cosine is limited by the {cc.num_prompts} prompts "
                  "(`config.compiled.num_prompts`), not by the model.")
    report.figure(f"ablations_compiled_{tag}.png", "Removing an operation: the damaged model against "
                  "CG with the same operation removed (match), and against the intact model (damage).")
    report.table(["operation", "removed", "match", "damage", "mse vs oracle (healthy)",
                  "mse vs oracle (damaged)"],
                 [[op, r["removed"], r["match"], r["damage_size"], r["mse_vs_oracle_healthy"],
                   r["mse_vs_oracle_damaged"]] for op, r in abl["operations"].items()])
    report.figure(f"matching_compiled_{tag}.png", "Best distance of each candidate per layer "
                  "(prediction channel); numbers: best step.")
    at_ends = [match["layers"][e] for e in ends]
    report.table(["step", "layer", "best match", "sq. diff"],
                 [[i, e, f"{m['name']} t={m['step']}", m["squared_difference"]]
                  for i, (e, m) in enumerate(zip(ends, at_ends))])
    alpha = probe_res["combos"]["alpha@" + combos[0][1]]
    last = cc.num_steps
    ops = abl["operations"].values()
    rows_per_feature = alpha["rows_per_feature"][ends[last]][last]
    underdetermined = (f"underdetermined: {rows_per_feature:.2f} training rows per feature; "
                       if rows_per_feature < 1 else "")
    summary.append(
        f"Compiled {tag}: probe of alpha_{last} at its step end: cosine "
        f"{alpha['cosine'][ends[last]][last]:.6f} ({underdetermined}random-init control, best layer: "
        f"{alpha['best_control_cosine'][last]:.3f}); ablations match the damaged CG to "
        f"{max(r['match'] for r in ops):.1e} while changing the model by "
        f"{min(r['damage_size'] for r in ops):.1e}..{max(r['damage_size'] for r in ops):.1e}; "
        "step ends match " + ", ".join(f"{m['name']} t={m['step']}" for m in at_ends[1:]) + ".")
  report.add("compiled", results)
  if cc.ablation_extras and cc.num_steps >= 1:
    summary += _other_ablations(report, config, ridge, prompts)
  return summary


_ABLATION_EXTRAS = {
    "pcg": "PCG (Jacobi preconditioner, `kcg.compile_cg(..., preconditioner='jacobi')`)",
    "chebyshev": "Chebyshev (`kcg.compile_chebyshev`, per-support state; interval "
                 "[ridge, ridge + max ||Phi||_2^2] of these prompts)",
    "softmax": "softmax Route A (`kcg.compile_cg(..., attention='softmax', kernel='exponential')`)",
}


def _other_ablations(report: Report, config, ridge: float, prompts) -> list[str]:
  """Ablation tables of the PCG, Chebyshev and softmax (Route A) programs against their references."""
  t, cc = config.task, config.compiled
  temperature = cc.softmax_temperature or float(t.input_dim)
  # One step (not every step): removing the query update, the step or Route A's p.Ap at every step
  # leaves f = 0, a trivially exact match.
  steps = (min(cc.ablation_step, cc.num_steps - 1),)
  report.text("### Ablations of PCG, Chebyshev and softmax Route A")
  report.text(
      "Each operation removed from the compiled model, against the algorithm without it "
      "(`kcg.ablations`): PCG adds the preconditioner (its 1/d_i loses the Newton refinement, so "
      "M^-1 is the ReLU guess, within 4.2%; the scaling z = r/d itself is an MLP unit of the "
      "update layer and cannot be removed alone); Chebyshev has no reductions and no reciprocals "
      "(its step sizes are weights), so only its mat-vec, its query update and a layer (= a step) "
      "can go; Route A's p.Ap is one reduction head, whose removal triggers the breakdown guard "
      f"(gamma_s = 0). Route A runs KRR with exp(<x, x'>/tau), tau = {temperature:g}; its mse "
      "columns are against that kernel's oracle. 'step' removes every layer of the step. Each "
      f"operation is removed at step {steps[0]} (0-based) only, the preconditioner at init. Match: "
      "|damaged model - damaged reference| / |damaged reference| over all steps.")
  results = {}
  for name in cc.ablation_extras:
    if name == "pcg":
      compiled = kcg.compile_cg(t.num_support, t.input_dim, cc.num_steps, ridge, mask="prefix",
                                preconditioner="jacobi")
    elif name == "chebyshev":
      compiled = kcg.compile_chebyshev(
          t.num_support, t.input_dim, cc.num_steps, ridge, mask="prefix",
          eig_bounds=study.chebyshev_eig_bounds(prompts.x_support, ridge))
    elif name == "softmax":
      compiled = kcg.compile_cg(t.num_support, t.input_dim, cc.num_steps, ridge, mask="prefix",
                                attention="softmax", kernel="exponential", temperature=temperature)
    else:
      raise ValueError(f"unknown compiled.ablation_extras entry {name!r}; choose from "
                       f"{sorted(_ABLATION_EXTRAS)}.")
    filename = f"ablations_compiled_{name}.png"
    abl = study.compiled_ablation_table(compiled, prompts, steps=steps, path=report.path(filename))
    results[name] = abl
    report.figure(filename, f"Ablations of {_ABLATION_EXTRAS[name]}: match and damage.")
    report.table(["operation", "removed", "match", "damage", "mse vs oracle (healthy)",
                  "mse vs oracle (damaged)"],
                 [[op, r["removed"], r["match"], r["damage_size"], r["mse_vs_oracle_healthy"],
                   r["mse_vs_oracle_damaged"]] for op, r in abl["operations"].items()])
  report.add("compiled_ablations_other", results)
  return ["Ablations of " + "; ".join(
      f"{abl['construction']}: {len(abl['operations'])} operations match their damaged algorithm to "
      f"{max(r['match'] for r in abl['operations'].values()):.1e}"
      for abl in results.values()) + "."]


def _trained(report: Report, config, trained: Trained, keys: Mapping[str, Any], ridge: float,
             eval_prompts, fit_prompts, feature_map: Callable) -> list[str]:
  """Probes, ablations and layer matching of every trained model."""
  mc = config.matching
  report.section("Trained models: probes, ablations, layer matching",
                 "Probe targets: reference CG state (data space, the study's ridge) after t = 0..L "
                 "steps; controls: shuffled targets and a random-init model. Matching candidates: "
                 f"{', '.join(mc.algorithms)} in {' and '.join(mc.spaces)} space (feature space: "
                 f"random ReLU features, p = {mc.feature_dim}).")
  results, summary = {}, []
  for (attention, depth), subject in trained.items():
    tag = f"{attention}_L{depth}"
    probe_res = study.probe_study(
        subject, eval_prompts, keys["probes"], ridge=ridge, num_steps=depth,
        num_folds=config.probes.num_folds, probe_ridge=config.probes.ridge,
        cosine_threshold=config.probes.cosine_threshold, path=report.path(f"probes_{tag}.png"))
    abl = study.trained_ablation(subject, eval_prompts, keys["match"], ridge=ridge,
                                 max_steps=mc.max_steps, path=report.path(f"ablations_{tag}.png"))
    matches = {}
    for readout in mc.readouts:
      matches[readout] = study.matching_study(
          subject, eval_prompts, keys["match"], ridge=ridge, max_steps=mc.max_steps,
          readout=readout, fit_prompts=fit_prompts, feature_map=feature_map,
          gradients=mc.gradients, algorithms=mc.algorithms, spaces=mc.spaces,
          readout_ridge=mc.readout_ridge, path=report.path(f"matching_{tag}_{readout}.png"))
    results[tag] = {"probes": probe_res, "ablations": abl, "matching": matches}
    report.text(f"### {subject.name}")
    report.figure(f"probes_{tag}.png", "Held-out probe cosine per layer for the CG state after step "
                  "t (solid) and on a random-init model (dotted).")
    rows = []
    for combo, r in probe_res["combos"].items():
      for step in range(1, depth + 1):
        rows.append([combo, step, r["cosine"][step][step], r["r2"][step][step],
                     r["shuffled_cosine"][step][step], r["control_cosine"][step][step],
                     int(r["best_layer"][step]), r["best_cosine"][step],
                     r["best_control_cosine"][step], bool(r["trivial"][step][step])])
    report.table(["state @ site", "t", "cosine at layer t", "R^2", "shuffled cos", "random-init cos",
                  "best layer", "best cos", "best random-init cos", "trivial"], rows)
    report.figure(f"ablations_{tag}.png", "Removing one head / one layer: test mse.")
    report.table(["removed layer", "mse", "relative change", "damaged output best matches"],
                 [[m["layer"], abl["layer_mse"][m["layer"]], abl["layer_change"][m["layer"]],
                   f"{m['best']} t={m['step']}"] for m in abl["layer_removed_best_match"]])
    report.text(f"Healthy mse {abl['mse_healthy']:.4g}; the healthy output best matches "
                f"{abl['healthy_best_match']['best']} t={abl['healthy_best_match']['step']}.")
    for readout, m in matches.items():
      report.figure(f"matching_{tag}_{readout}.png", f"Layer-wise matching, {readout}.")
      report.text(m["table"])
    final = matches[mc.readouts[0]]["layers"][-1]
    alpha, w = probe_res["combos"]["alpha@support"], probe_res["combos"]["w@query"]
    summary.append(
        f"Trained {subject.name}: final layer ({mc.readouts[0]}) best matches {final['name']} "
        f"t={final['step']} (per-problem R^2 {final['r2']:.3f}, relative distance "
        f"{final['relative_distance']:.3g}); probe cosine for alpha_{depth} at the supports "
        f"{alpha['best_cosine'][depth]:.3f} (random init {alpha['best_control_cosine'][depth]:.3f}, "
        f"shuffled {alpha['best_shuffled_cosine'][depth]:.3f}); w_{depth} at the queries "
        f"{w['best_cosine'][depth]:.3f} (random init {w['best_control_cosine'][depth]:.3f}).")
  report.add("trained", results)
  return summary


def run(config, workdir: str) -> dict:
  """The whole study; returns the results dict also written to workdir/results.json.

  Needs float64 (`jax.config.update("jax_enable_x64", True)`, as `main` does).
  """
  if not jax.config.jax_enable_x64:
    raise ValueError("the study runs in float64: call jax.config.update('jax_enable_x64', True) "
                     "first (the binary does).")
  sections = set(config.sections)
  unknown = sections - set(SECTIONS)
  if unknown:
    raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}.")
  start = time.perf_counter()
  t = config.task
  ridge = _ridge(config)
  keys = dict(zip(KEY_NAMES, jax.random.split(jax.random.key(config.seed), len(KEY_NAMES))))
  report = Report(workdir, "Formal vs learned: do trained transformers run CG on their features?")
  report.text(f"Scale `{config.scale}`. Task `{t.family}`, d = {t.input_dim}, k = {t.num_support}, "
              f"q = {t.num_query}, noise {t.noise_std}, input condition number "
              f"{t.condition_number}; KRR/CG ridge {ridge:g} (the Bayes ridge noise^2 d unless set). "
              "All comparisons on held-out prompts, in float64.")
  summary_at = len(report.lines)
  eval_prompts = tasks.sample(keys["eval"], _task(config, config.eval.num_prompts))
  fit_prompts = tasks.sample(keys["fit"], _task(config, config.eval.num_fit_prompts))
  fm = features.random_relu(config.matching.feature_dim)
  feature_map = functools.partial(fm.apply, fm.init(keys["features"], t.input_dim))
  models_dir = os.path.join(workdir, "models") if config.train.save_models else None

  timings, summary = {}, []
  began = time.perf_counter()
  trained = _train(report, config, models_dir)
  timings["train"] = time.perf_counter() - began
  laws = config.laws
  sections_in_order = [
      ("depth_comparison", lambda: _depth_comparison(report, config, trained, eval_prompts,
                                                     fit_prompts, ridge)),
      ("depth_sweeps", lambda: _depth_sweeps(report, config, keys["eval"], keys["fit"], ridge,
                                             models_dir)),
      ("depth_law", lambda: _depth_law(report, laws, keys["laws"])),
      ("sweeps", lambda: _solver_sweeps(report, config, keys["laws"], ridge, sections)),
      ("failure_modes", lambda: _failure_modes(report, config,
                                               jax.random.fold_in(keys["laws"], 4))),
      ("feature_perturbation", lambda: _feature_perturbation(report, laws,
                                                             jax.random.fold_in(keys["laws"], 5))),
      ("width_sweep", lambda: _width(report, laws, jax.random.fold_in(keys["laws"], 6))),
      ("compiled", lambda: _compiled(report, config, keys, ridge, eval_prompts)),
      ("trained", lambda: _trained(report, config, trained, keys, ridge, eval_prompts, fit_prompts,
                                   feature_map)),
  ]
  for name, section in sections_in_order:
    if name != "sweeps" and name not in sections:
      continue
    began = time.perf_counter()
    summary += section()
    timings[name] = time.perf_counter() - began
    logging.info("%s: %.1f s", name, timings[name])
  timings["total"] = time.perf_counter() - start
  report.add("timings_seconds", timings)
  report.lines[summary_at:summary_at] = (["## Summary (generated from the numbers below)", ""]
                                         + [f"* {line}" for line in summary] + [""])
  report.section("Runtime", ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()))
  report.write(config.to_dict())
  return report.results


def main(config, workdir: str) -> dict:
  """The binary: float64 on, orbax's per-save log lines off, then `run`."""
  jax.config.update("jax_enable_x64", True)
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  results = run(config, workdir)
  logging.info("Report written to %s", os.path.join(workdir, "report.md"))
  return results


if __name__ == "__main__":
  _cli.run_main(main, None, "report.md, results.json and the figures")
