"""report.md, results.json and the PNGs of experiments/finetune.py, written from the numbers only.

One section of sentences and one figure per (task family, construction, t)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from kcg import finetune
from kcg import plotting

_MODE_TEXT = {
    "plain": "every weight",
    "freeze_reciprocal": "every weight but the division",
    "gains": "a gain per layer and head, weights frozen",
    "compute_gains": "gains on the computing heads only, bookkeeping and division frozen",
    "random": "same architecture, random init",
}
# Line styles follow the order of `finetune.MODES`, then of these dtypes (`_line_style`).
_DTYPES = ("float32", "float64")


def _f(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if isinstance(x, (bool, int)):
    return str(x)
  return f"{x:.{digits}g}"


def _clean(x):
  """JSON without NaN/Infinity: non-finite floats become their string."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def _article(word: str) -> str:
  return ("an " if word[:1] in "aeiou" else "a ") + word


def _evals(record: dict) -> list[dict]:
  return [h for h in record["history"] if h.get("finite", True) and "mse" in h]


def _summary_row(key: str, r: dict) -> dict:
  evals = _evals(r)
  first, last = (evals[0], evals[-1]) if evals else ({}, {})
  recip = [h.get("reciprocal_error") for h in evals if h.get("reciprocal_error") is not None]
  return {
      "run": key, "family": r.get("family", "linear"), "mode": r["mode"], "task": r["task"],
      "dtype": r["dtype"],
      "diverged_at": r["diverged_at"], "last_step": last.get("step"),
      "mse_start": first.get("mse"), "mse_end": last.get("mse"), "krr_mse": last.get("krr_mse"),
      "cg_mse": last.get("cg_mse"), "cg_r2_start": first.get("cg_r2"), "cg_r2_end": last.get("cg_r2"),
      "y_nl_start": first.get("y_nonlinearity"), "y_nl_end": last.get("y_nonlinearity"),
      "reciprocal_error_max": max(recip) if recip else None,
      "reciprocal_error_median_end": last.get("reciprocal_error_median"),
      "reciprocal_breaks_at": next((h["step"] for h in evals
                                    if (h.get("reciprocal_error") or 0.0) > 1e-3), None),
      "distance_end": (last.get("distance") or {}).get("relative_l2"),
      "gain_change_end": (last.get("distance") or {}).get("max_gain_change"),
      "teacher_end": last.get("teacher_relative"), "teacher_scaled_end": last.get("teacher_relative_scaled"),
      "teacher_start": first.get("teacher_relative"),
      "y_nl_median_start": first.get("y_nonlinearity_median"),
      "y_nl_median_end": last.get("y_nonlinearity_median"),
      "departure": next((h.get("departure") for h in r["history"] if "departure" in h), None),
      "blowup": next((h.get("blowup") for h in r["history"] if "blowup" in h), None),
      "probe_start": first.get("probe_r2_mean"), "probe_end": last.get("probe_r2_mean"),
      "probe_end_by_quantity": {q: _mean(v) for q, v in (last.get("probe_r2") or {}).items()},
      "closest_end": last.get("closest_candidate"),
      "closest_r2_end": (last.get("candidate_r2") or {}).get(last.get("closest_candidate")),
      "step_end_matches": _step_end_matches(last),
  }


def _mean(values) -> float | None:
  finite = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
  return sum(finite) / len(finite) if finite else None


def _step_end_matches(record: dict) -> list[str]:
  """"<algorithm> t=<step>" of the layer matching at each step-end layer s = 1..t of `record`."""
  match, layers = record.get("layer_match"), record.get("probe_layers")
  if not match or not layers:
    return []
  return [f"{match['name'][l]} t={match['step'][l]}" if match["name"][l] is not None else "none"
          for l in layers]


def _line_style(mode: str, dtype: str) -> dict:
  """One (colour, marker) per (mode, dtype), the same in every figure; float64 also dashed."""
  index = finetune.MODES.index(mode) + len(finetune.MODES) * _DTYPES.index(dtype)
  return {**plotting.line_style(index), "linestyle": "-" if dtype == "float32" else "--",
          "markersize": 4}


def _figure(path: str, groups: dict, construction: str, t: int) -> None:
  figure, ((loss_ax, agree_ax, ynl_ax),) = plotting.new_figure(1, 3, size=(12.5, 4.2))
  reference = None
  for r in groups.values():
    evals = _evals(r)
    if not evals:
      continue
    label = f"{r['mode']} {r['dtype']}" + (f" (diverged at step {r['diverged_at']})"
                                          if r["diverged_at"] is not None else "")
    style = dict(_line_style(r["mode"], r["dtype"]), label=label)
    steps = [h["step"] for h in evals]
    loss_ax.semilogy(steps, [h["mse"] for h in evals], **style)
    agree_ax.semilogy(steps, [max(1 - h["cg_r2"], 1e-16) for h in evals], **style)
    ynl_ax.plot(steps, [h["y_nonlinearity"] for h in evals], **style)
    reference = evals[-1]
  if reference is not None:
    loss_ax.axhline(reference["krr_mse"], **plotting.REFERENCE, linestyle=":", label="KRR oracle")
    loss_ax.axhline(reference["cg_mse"], **plotting.REFERENCE, linestyle="--", label=f"CG_{t}")
  for ax, ylabel in ((loss_ax, "test MSE vs noiseless f"),
                     (agree_ax, "1 - R^2 against CG_t"),
                     (ynl_ax, "y-nonlinearity index")):
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    plotting.integer_ticks(ax)
    ax.grid(True, alpha=0.3)
  figure.suptitle(f"{construction}, t = {t}: from compiled weights vs from random init", fontsize=9)
  # One legend right of the panels, which draw the same runs alike, so that it hides no data.
  plotting.add_figure_legend(figure, (loss_ax, agree_ax, ynl_ax))
  plotting.save_figure(figure, path)


def _probe_figure(path: str, group: dict, construction: str, t: int) -> None:
  """Held-out probe R^2 of alpha, r, p at the compiled step-end layers (mean over s) vs training step."""
  figure, (axes,) = plotting.new_figure(1, 3, size=(12.5, 4.2))
  for r in group.values():
    evals = [h for h in _evals(r) if h.get("probe_r2")]
    if not evals:
      continue
    if r["task"] == "imitate":
      style = dict(plotting.line_style(len(finetune.MODES) * len(_DTYPES)), linestyle=":",
                   markersize=4, label=f"imitating CG_{t} (random init) {r['dtype']}")
    else:
      style = dict(_line_style(r["mode"], r["dtype"]), label=f"{r['mode']} {r['dtype']}" + (
          f" (diverged at step {r['diverged_at']})" if r["diverged_at"] is not None else ""))
    steps = [h["step"] for h in evals]
    for ax, quantity in zip(axes, ("alpha", "r", "p")):
      values = [_mean(h["probe_r2"][quantity]) for h in evals]
      ax.plot(steps, [max(v, -1.0) if v is not None else math.nan for v in values], **style)
  for ax, quantity in zip(axes, ("alpha", "r", "p")):
    ax.set_xlabel("training step")
    ax.set_ylabel(f"probe R^2 of {quantity}_s (held out, mean over s; floor -1)")
    ax.set_title(f"{quantity}_s at the compiled step-end layers", fontsize=9)
    plotting.integer_ticks(ax)
    ax.grid(True, alpha=0.3)
  figure.suptitle(f"{construction}, t = {t}: is the CG state where the compiled model keeps it?",
                  fontsize=9)
  plotting.add_figure_legend(figure, axes)
  plotting.save_figure(figure, path)


def _run_label(r: dict) -> str:
  name = f"{r['mode'] if r['task'] == 'task' else 'imitation'} {r['dtype']}"
  if r["diverged_at"] is not None:
    name += f" (diverged at step {r['diverged_at']}; last evaluated at step {r['last_step']})"
  return name


def _probe_sentences(rows: list[dict], construction: str, t: int) -> list[str]:
  """Probe, candidate and layer-matching sentences of one (construction, t), from the rows."""
  out = []
  parts = [f"{_run_label(r)} {_f(r['probe_start'])} -> {_f(r['probe_end'])}"
           for r in rows if r["probe_end"] is not None]
  if parts:
    out.append(f"{construction}, t={t}: held-out probe R^2 of the CG state (alpha_s, r_s, p_s at the "
               f"compiled step-end layers, mean over quantities and s = 1..{t}), first -> last "
               f"evaluated checkpoint: " + "; ".join(parts) + ".")
  closest = [f"{_run_label(r)}: {r['closest_end']} (R^2 {_f(r['closest_r2_end'], 4)})"
             for r in rows if r["closest_end"] is not None]
  if closest:
    out.append(f"{construction}, t={t}: at the last evaluated checkpoint the predictions are closest "
               f"(R^2 after "
               f"{t} steps of each candidate, or KRR) to " + "; ".join(closest) + ".")
  for r in rows:
    if r["task"] == "imitate" and r["step_end_matches"]:
      out.append(f"{construction}, t={t}: the imitating model's logit lens at the compiled step-end "
                 f"layers (s = 1..{t}) best matches " + ", ".join(r["step_end_matches"]) +
                 f"; its probe R^2 there: " + ", ".join(
                     f"{q} {_f(v)}" for q, v in r["probe_end_by_quantity"].items()) + ".")
  return out


def _imitation_figure(path: str, record: dict, construction: str, t: int) -> None:
  figure, ((ax,),) = plotting.new_figure(size=(5.5, 3.8))
  evals = _evals(record)
  steps = [h["step"] for h in evals]
  ax.semilogy(steps, [h["teacher_relative"] for h in evals], **plotting.line_style(0),
              markersize=4, label="held-out prompts")
  ax.semilogy(steps, [h["teacher_relative_scaled"] for h in evals], **plotting.line_style(1),
              markersize=4, linestyle="--", label="inputs x 2 (outside the training scale)")
  ax.set_xlabel("training step")
  ax.set_ylabel("|f - CG_t| / |CG_t|")
  plotting.integer_ticks(ax)
  ax.grid(True, alpha=0.3)
  plotting.add_legend(ax)
  ax.set_title(f"learning CG: {construction}, t = {t}, random init imitating CG_{t}", fontsize=9)
  plotting.save_figure(figure, path)


def _sentences(rows: list[dict], construction: str, t: int) -> list[str]:
  """The summary of one (construction, t), every number read from the rows."""
  out = []
  by = {(r["task"], r["mode"], r["dtype"]): r for r in rows}
  for dtype in ("float32", "float64"):
    for mode in ("plain", "freeze_reciprocal"):
      r = by.get(("task", mode, dtype))
      if r is None:
        continue
      if r["diverged_at"] is not None:
        where = r["departure"] or {}
        detail = "" if where.get("layer") is None else (
            f"; the model the non-finite step started from first leaves the compiled one at layer "
            f"{where['layer']} ({where['name']}), channel {where['channel']} of {_article(where['token'])} token "
            f"(relative change {_f(where['relative_change'])})")
        blow = r["blowup"] or {}
        if blow.get("layer") is not None:
          detail += (f"; the first change above 1e6 (relative) is at layer {blow['layer']} "
                     f"({blow['name']}), channel {blow['channel']} of {_article(blow['token'])} token "
                     f"({_f(blow['relative_change'])})")
        out.append(f"{construction}, t={t}, {dtype}: training {_MODE_TEXT[mode]} from the compiled "
                   f"weights gave a non-finite loss or gradient at step {r['diverged_at']} (stopped){detail}.")
      else:
        out.append(f"{construction}, t={t}, {dtype}: training {_MODE_TEXT[mode]} ran {r['last_step']} "
                   f"steps; test MSE {_f(r['mse_start'])} -> {_f(r['mse_end'])} (CG_t {_f(r['cg_mse'])}, "
                   f"KRR {_f(r['krr_mse'])}); R^2 against CG_t {_f(r['cg_r2_end'], 4)}; y-nonlinearity "
                   f"{_f(r['y_nl_start'])} -> {_f(r['y_nl_end'])}; max |s x - 1| {_f(r['reciprocal_error_max'])}.")
    for gain_mode in ("gains", "compute_gains"):
      r = by.get(("task", gain_mode, dtype))
      if r is not None:
        if r["diverged_at"] is not None:
          blow = r["blowup"] or {}
          detail = "" if blow.get("layer") is None else (
              f"; the first change above 1e6 (relative) is at layer {blow['layer']} ({blow['name']}), "
              f"channel {blow['channel']} of {_article(blow['token'])} token")
          out.append(f"{construction}, t={t}, {dtype}, {gain_mode}: non-finite loss or gradient at step {r['diverged_at']}"
                     f"{detail}.")
        else:
          kept = "within R^2 0.99 of" if (r["cg_r2_end"] or -1) > 0.99 else "below R^2 0.99 against"
          if r["reciprocal_breaks_at"] is None:
            division = (f"the division still divides (max |s x - 1| = {_f(r['reciprocal_error_max'])} over "
                        "training)")
          else:
            division = (f"the division stops dividing: max |s x - 1| > 1e-3 from step "
                        f"{r['reciprocal_breaks_at']}, {_f(r['reciprocal_error_max'])} at worst, median "
                        f"{_f(r['reciprocal_error_median_end'])} at the end")
          out.append(
              f"{construction}, t={t}, {dtype}, {gain_mode} (exact at step 0): {r['last_step']} steps; test MSE "
              f"{_f(r['mse_start'])} -> {_f(r['mse_end'])} (CG_t {_f(r['cg_mse'])}, KRR oracle "
              f"{_f(r['krr_mse'])}); R^2 against CG_t {_f(r['cg_r2_start'], 4)} -> {_f(r['cg_r2_end'], 4)} "
              f"({kept} CG_t); y-nonlinearity {_f(r['y_nl_start'])} -> {_f(r['y_nl_end'])} (median over "
              f"prompts {_f(r['y_nl_median_start'])} -> {_f(r['y_nl_median_end'])}); {division}; "
              f"max |gain - 1| {_f(r['gain_change_end'])}.")
  r = by.get(("task", "random", "float32"))
  if r is not None:
    if r["diverged_at"] is not None:
      out.append(f"{construction}, t={t}: the random-init control diverged at step {r['diverged_at']}.")
    else:
      out.append(f"{construction}, t={t}: random init of the same architecture, {r['last_step']} steps: "
                 f"test MSE {_f(r['mse_start'])} -> {_f(r['mse_end'])}; R^2 against CG_t "
                 f"{_f(r['cg_r2_end'], 4)}; y-nonlinearity {_f(r['y_nl_end'])} (median "
                 f"{_f(r['y_nl_median_end'])}).")
  r = by.get(("imitate", "random", "float32"))
  if r is not None:
    if r["diverged_at"] is not None:
      out.append(f"{construction}, t={t}: learning CG from random init diverged at step {r['diverged_at']}.")
    else:
      cg_index = next((x["y_nl_start"] for x in rows if x["mode"] in ("gains", "plain") and
                       x["y_nl_start"] is not None), None)
      out.append(f"{construction}, t={t}: learning CG (random init imitating CG_t), {r['last_step']} "
                 f"steps: relative error against the teacher {_f(r['teacher_start'])} -> "
                 f"{_f(r['teacher_end'])} on held-out prompts, {_f(r['teacher_scaled_end'])} on inputs "
                 f"scaled by 2; y-nonlinearity {_f(r['y_nl_end'])} (median {_f(r['y_nl_median_end'])}; "
                 f"CG_t's own: {_f(cg_index)}).")
  return out


def _layer_match_tables(results: dict) -> list[str]:
  """Per layer of each imitation run's last evaluation: the best-matching candidate and step."""
  out = []
  for key, r in results["runs"].items():
    evals = _evals(r)
    if r["task"] != "imitate" or not evals or not evals[-1].get("layer_match"):
      continue
    last = evals[-1]
    match, ends = last["layer_match"], set(last.get("probe_layers") or [])
    out += ["", f"## Layer matching: {key}, step {last['step']}", "",
            "Logit lens of each layer against every per-prompt candidate's trajectory (up to 2t steps); "
            "* marks the compiled model's step-end layers.", "",
            "| layer | best match | mean squared difference | rel. distance (inf: f_0 = 0) |",
            "|---|---|---|---|"]
    rows = zip(match["name"], match["step"], match["squared_difference"], match["relative"])
    for layer, (name, step, mse, rel) in enumerate(rows):
      label = "none (not finite)" if name is None else f"{name} t={step}"
      out.append(f"| {layer}{'*' if layer in ends else ''} | {label} | {_f(mse)} | {_f(rel)} |")
  return out


def write(workdir: str, results: dict) -> dict:
  """Adds the summary table to `results`, writes results.json, the PNGs and report.md."""
  groups: dict = {}
  for key, r in results["runs"].items():
    groups.setdefault((r.get("family", "linear"), r["construction"], r["cg_steps"]), {})[key] = r
  rows_all, lines, figures = [], [], []
  for (family, construction, t), group in groups.items():
    rows = [_summary_row(k, r) for k, r in group.items()]
    rows_all += rows
    # The sentences and titles name the family with the construction ("relu_features dual_prefix").
    label = f"{family} {construction}"
    lines += _sentences(rows, label, t)
    name = f"{family}_{construction}_t{t}.png"
    lines += _probe_sentences(rows, label, t)
    _figure(os.path.join(workdir, name), {k: r for k, r in group.items() if r["task"] == "task"},
            label, t)
    figures.append(name)
    if any(h.get("probe_r2") for r in group.values() for h in _evals(r)):
      name = f"{family}_{construction}_t{t}_probes.png"
      _probe_figure(os.path.join(workdir, name), group, label, t)
      figures.append(name)
    for k, r in group.items():
      if r["task"] == "imitate" and _evals(r):
        name = f"{family}_{construction}_t{t}_imitate.png"
        _imitation_figure(os.path.join(workdir, name), r, label, t)
        figures.append(name)
  results["summary"] = rows_all
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(_clean(results), f, indent=1)
  report = [f"# From compiled to trained ({results['scale']} scale)", "",
            "Does gradient descent started at exact CG keep CG, and can it find CG from random init? "
            "Each run trains with kcg's loss and AdamW on the task its compiled model solves: noisy linear "
            "regression on x (family linear) or targets linear in a fixed random-ReLU feature layer "
            "phi(x) that the compiled model's first layer computes (family relu_features); the compiled "
            "ridge is the Bayes ridge. Test MSE is against the noiseless targets on held-out prompts; the "
            "KRR oracle, R^2 and the relative error are against KRR and CG_t on phi(x) (reference solver, "
            "float64); the y-nonlinearity index is 0 "
            "for predictors affine in the labels and > 0 for CG; |s x - 1| checks the division channels "
            "at the aggregator after each step's last Newton layer. Probes: a cross-validated linear "
            "probe from the residual stream at the layer where the compiled program ends step s to "
            "the reference alpha_s, r_s, p_s; candidates: CG, primal CG, PCG, GD, Chebyshev, "
            "Newton-Schulz, GD++, momentum, the best fixed polynomial (t steps) and KRR on the same "
            "features phi(x).", "", "## Summary", ""]
  report += [f"- {s}" for s in lines]
  report += ["", f"Runtime: {results['wall_s']:.0f} s wall, {results['cpu_s']:.0f} s CPU (this process; "
             "on a shared machine wall time is inflated by other load).", "", "## Figures", ""]
  report += [f"![{n}]({n})" for n in figures]
  header = ["run", "diverged at", "MSE start", "MSE end", "CG_t MSE", "KRR MSE", "R^2 vs CG_t end",
            "y-NL start", "y-NL end", "y-NL median end", "max |sx-1|", "rel. weight dist.", "teacher err end",
            "teacher err (x2)", "probe R^2 start", "probe R^2 end", "closest candidate end"]
  report += ["", "## All runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows_all:
    values = [r["run"], r["diverged_at"], r["mse_start"], r["mse_end"], r["cg_mse"], r["krr_mse"],
              r["cg_r2_end"], r["y_nl_start"], r["y_nl_end"], r["y_nl_median_end"],
              r["reciprocal_error_max"],
              r["distance_end"], r["teacher_end"], r["teacher_scaled_end"], r["probe_start"],
              r["probe_end"], r["closest_end"] or "n/a"]
    report.append("| " + " | ".join(v if isinstance(v, str) else _f(v) for v in values) + " |")
  report += _layer_match_tables(results)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(report) + "\n")
  return results
