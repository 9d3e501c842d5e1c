r"""A pretrained LM as an in-context learner: kcg's baselines, and the alignment instruments on its features.

  python -m experiments.lm_icl --workdir=DIR [--config=experiments/configs/lm_icl.py[:runlocal]] \
      [--config.model.checkpoint=PATH]

Writes `DIR/report.md` (summary generated from the numbers), `DIR/results.json` and PNGs. See the
config's docstring for scales and runtimes. The alignment instruments (`kcg.lm.analyse_lm`: KRR on
phi_l per reading and layer, kernel alignment, finite-difference smoother weights, the y-linearity
signature against CG_t) run on the LM and on its random-initialisation control.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from experiments import _cli

import kcg
from kcg import lm as kcg_lm

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "lm_icl.py")
_RANDOM_WARNING = (
    "**PIPELINE CHECK ONLY: the weights are random ({source}). Nothing below is a finding about "
    "language models; the numbers show that every stage runs and is wired correctly. Run with "
    "`--config.model.checkpoint=PATH` on real weights (BUILD.md) for results.**")


def _num(x: Any) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _fmt(x: float | None, spec: str = ".3g") -> str:
  return "n/a" if x is None else format(x, spec)


def _json_ready(x: Any) -> Any:
  """Non-finite floats (an R^2 of -inf when the LM's predictions do not vary) become None."""
  if isinstance(x, dict):
    return {k: _json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_ready(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return _num(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


# ----------------------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------------------


def _model(config, workdir: str) -> kcg_lm.LanguageModel:
  path = config.model.checkpoint
  if not path:
    path = os.path.join(workdir, "tiny_checkpoint")
    if not os.path.exists(os.path.join(path, "kcg_lm.json")):
      kcg_lm.write_tiny_checkpoint(path, seed=config.seed)
  return kcg_lm.load(path, activation_dtype=config.model.activation_dtype)


def _prompts(family: str, d: int, k: int, config, key) -> kcg.tasks.Prompts:
  task = kcg.tasks.TaskConfig(family=family, input_dim=d, num_support=k,
                              num_query=config.regression.num_query,
                              batch_size=config.regression.batch_size)
  return jax.tree.map(np.asarray, kcg.tasks.sample(key, task))


def _regression_cell(lm, control, fmt, config, prompts) -> dict[str, Any]:
  xs, ys, xq, yq = prompts.x_support, prompts.y_support, prompts.x_query, prompts.y_query
  seen = fmt.decode_labels(fmt.encode_labels(ys)[0])  # baselines get the labels the LM read
  cell: dict[str, Any] = {"readouts": {}, "baselines": {}}
  lm_expected = None
  for readout in config.regression.readouts:
    reg = kcg_lm.LMRegressor(lm, fmt, readout=readout, max_new_tokens=config.regression.max_new_tokens,
                             chunk_size=config.model.chunk_size)
    pred = reg.predict(xs, ys, xq)
    valid = pred.valid
    mse = float(np.mean((pred.values[valid] - yq[valid]) ** 2)) if valid.any() else float("nan")
    cell["readouts"][readout] = {
        "mse": _num(mse), "num_valid": int(valid.sum()), "num_invalid": int((~valid).sum()),
        "label_mass": _num(pred.label_mass.mean())}
    cell["clipped_support_labels"] = pred.clipped_support_labels
    if readout == "expected":
      lm_expected = pred.values
  if control is not None:
    pred = kcg_lm.LMRegressor(control, fmt, chunk_size=config.model.chunk_size).predict(xs, ys, xq)
    cell["random_control_mse"] = _num(np.mean((pred.values - yq) ** 2))
  suite = kcg_lm.regression_baselines(xs.shape[-1], ridge=config.baselines.ridge,
                                      num_steps=config.baselines.gd_steps,
                                      num_neighbors=min(config.baselines.num_neighbors, xs.shape[1]))
  for name, fn in suite.items():
    b = np.asarray(fn(xs, seen, xq))
    entry = {"mse": _num(np.mean((b - yq) ** 2))}
    if lm_expected is not None:
      entry["r2_of_lm_vs_baseline"] = _num(kcg.evaluation.prediction_similarity(lm_expected, b).r2)
    cell["baselines"][name] = entry
  cell["target_variance"] = _num(np.var(yq))
  return cell


def _settings(config, control: bool) -> kcg_lm.LMSettings:
  f = config.features
  # The control reads phi_l the primary way only (its other readings would control nothing new).
  readings = ("zero_labels",) if control else tuple(f.readings)
  return kcg_lm.LMSettings(readings=readings, token=f.token, relative_ridges=tuple(f.relative_ridges),
                           num_bootstrap=config.num_bootstrap, fd_step=f.fd_step,
                           smoother_prompts=f.smoother_prompts, cg_steps=f.cg_steps)


def _feature_section(lm, control, fmt, config, family, key) -> dict[str, Any]:
  """`kcg.lm.analyse_lm` on the LM and on the random-init control, on the same prompts."""
  f = config.features
  k_eval, k_fit, k_labels, k_lm, k_control = jax.random.split(key, 5)
  task = kcg.tasks.TaskConfig(family=family, input_dim=f.input_dim, num_support=f.num_support,
                              num_query=f.num_query, batch_size=f.batch_size)
  prompts = jax.tree.map(np.asarray, kcg.tasks.sample(k_eval, task))
  fit = jax.tree.map(np.asarray, kcg.tasks.sample(
      k_fit, dataclasses.replace(task, batch_size=f.num_fit_prompts)))
  labels_b = np.asarray(kcg.tasks.sample_targets(k_labels, task, prompts.x_support,
                                                 prompts.x_query).y_support)
  out: dict[str, Any] = {"num_support": f.num_support, "input_dim": f.input_dim, "token": f.token,
                         "label_std": float(np.std(fmt.written(prompts.y_support)))}
  reg = kcg_lm.LMRegressor(lm, fmt, chunk_size=config.model.chunk_size)
  out["lm"] = kcg_lm.analyse_lm(reg, prompts, fit, labels_b, _settings(config, False), k_lm)
  if control is not None:
    creg = kcg_lm.LMRegressor(control, fmt, chunk_size=config.model.chunk_size)
    out["random_control"] = kcg_lm.analyse_lm(creg, prompts, fit, labels_b, _settings(config, True),
                                              k_control)
  return out


def _classification(lm, control, fmt, config, rng) -> list[dict[str, Any]]:
  c = config.classification
  rows = []
  for inputs in c.inputs:
    cp = kcg_lm.sample_classification(rng, fmt, inputs=inputs, num_classes=c.num_classes,
                                      num_support=c.num_support, num_query=c.num_query,
                                      batch_size=c.batch_size, input_dim=c.input_dim)
    row: dict[str, Any] = {"inputs": inputs, "readouts": {}, "baselines": {}}
    for readout in config.regression.readouts:
      pred = kcg_lm.classify(lm, fmt, cp, readout=readout, chunk_size=config.model.chunk_size)
      row["readouts"][readout] = {
          "accuracy": _num(np.mean(pred.predicted == cp.c_query)),
          "num_invalid": int((~pred.valid).sum()), "label_mass": _num(pred.label_mass.mean())}
    if control is not None:
      pred = kcg_lm.classify(control, fmt, cp, chunk_size=config.model.chunk_size)
      row["random_control_accuracy"] = _num(np.mean(pred.predicted == cp.c_query))
    suite = kcg_lm.regression_baselines(cp.x_support.shape[-1], ridge=config.baselines.ridge,
                                        num_steps=config.baselines.gd_steps,
                                        num_neighbors=min(config.baselines.num_neighbors, c.num_support))
    for name, fn in suite.items():
      scores = kcg_lm.class_scores(fn, cp.x_support, cp.c_support, cp.x_query, c.num_classes)
      row["baselines"][name] = {"accuracy": _num(np.mean(scores.argmax(-1) == cp.c_query))}
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------------


def _plot_errors(path, regression, families, dims):
  """Per family: test MSE against k of the LM (expected readout), RBF KRR and the mean, per d."""
  fig, axes = kcg.plotting.new_figure(1, len(families), panel_size=(6.0, 3.9))
  methods = (("LM", lambda c: c["readouts"].get("expected", {}).get("mse"), "-"),
             ("KRR (RBF)", lambda c: c["baselines"]["krr_rbf"]["mse"], "--"),
             ("mean", lambda c: c["baselines"]["mean"]["mse"], ":"))
  for i, family in enumerate(families):
    ax = axes[0, i]
    for j, d in enumerate(dims):
      cells = [c for c in regression if c["family"] == family and c["input_dim"] == d]
      ks = [c["num_support"] for c in cells]
      for m, (name, value, style) in enumerate(methods):
        ax.plot(ks, [np.nan if value(c) is None else value(c) for c in cells], linestyle=style,
                label=f"{name}, d={d}", **kcg.plotting.line_style(len(methods) * j + m))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel("test MSE (y units squared)")
    ax.set_title(family, fontsize=9)
    kcg.plotting.add_legend(ax, where="right")
  kcg.plotting.save_figure(fig, path)
  return fig


_READING_LABELS = {
    "zero_labels": "labels as 0", "other_labels": "other prompt's labels",
    "placeholder_labels": "labels as ?", "context_free": "no supports",
    "with_labels": "true labels (circular)"}


def _gap(values):
  """1 - R^2 for a log axis (None, NaN -> NaN; below the floor -> the floor)."""
  return [np.nan if v is None else max(1.0 - v, kcg.plotting.PLOT_FLOOR) for v in values]


def _plot_alignment(path, features):
  """Per family: 1 - R^2 of KRR on phi_l against the LM per reading (and the control), by layer; the
  cosine of the LM's smoother weights with KRR's on phi_l; centred kernel alignment."""
  families = list(features)
  # Wide panels: each legend sits right of its axes.
  fig, axes = kcg.plotting.new_figure(len(families), 3, panel_size=(7.8, 3.9))
  for row, family in enumerate(families):
    sec = features[family]
    ax_r2, ax_w, ax_ka = axes[row]
    series = [(_READING_LABELS[r], [s["r2"] for s in rows], "-") for r, rows in sec["lm"]["krr"].items()]
    if "random_control" in sec:
      series.append(("random init, labels as 0",
                     [s["r2"] for s in sec["random_control"]["krr"]["zero_labels"]], "--"))
    for i, (label, r2, style) in enumerate(series):
      ax_r2.semilogy(range(len(r2)), _gap(r2), linestyle=style, label=label,
                     **kcg.plotting.line_style(i))
    ax_r2.axhline(_gap([sec["lm"]["krr_raw_x"]["r2"]])[0], linestyle=":", label="KRR on raw x",
                  **kcg.plotting.REFERENCE)
    ax_r2.set_xlabel("layer (0 = embeddings)")
    ax_r2.set_ylabel("1 - R^2 of KRR on phi_l vs the LM")
    ax_r2.set_title(f"{family}: KRR on the LM's phi_l, by context labels (lower = closer)", fontsize=9)
    kcg.plotting.integer_ticks(ax_r2)
    kcg.plotting.add_legend(ax_r2, where="right")
    lines = [("LM vs KRR on phi_l", sec["lm"]["smoother_weights"]["krr_phi"]),
             ("shuffled prompts", sec["lm"]["smoother_weights"]["krr_phi_shuffled"])]
    if "random_control" in sec:
      lines.append(("random-init control", sec["random_control"]["smoother_weights"]["krr_phi"]))
    for i, (label, values) in enumerate(lines):
      ax_w.plot(range(len(values)), [np.nan if v is None else v for v in values], label=label,
                **kcg.plotting.line_style(i))
    ax_w.set_xlabel("layer (0 = embeddings)")
    ax_w.set_ylabel("cosine of smoother weights")
    ax_w.set_title(f"{family}: smoother weights (finite differences)", fontsize=9)
    kcg.plotting.integer_ticks(ax_w)
    kcg.plotting.add_legend(ax_w, where="right")
    ka = sec["lm"]["kernel_alignment"]
    for i, (name, label) in enumerate((("raw_x", "vs raw x's linear kernel"),
                                       ("target", "vs target kernel f f^T"),
                                       ("raw_x_shuffled", "vs raw x, shuffled"))):
      ax_ka.plot(range(len(ka[name])), ka[name], label=label, **kcg.plotting.line_style(i))
    ax_ka.set_xlabel("layer (0 = embeddings)")
    ax_ka.set_ylabel("centred kernel alignment of Gram(phi_l)")
    ax_ka.set_title(f"{family}: kernel alignment", fontsize=9)
    kcg.plotting.integer_ticks(ax_ka)
    kcg.plotting.add_legend(ax_ka, where="right")
  kcg.plotting.save_figure(fig, path)
  return fig


def _plot_linearity(path, features):
  """Per family: the y-nonlinearity index of CG_t on phi_l (best layer) by step, the LM's and the
  random-init control's (0 for every predictor affine in the labels)."""
  families = list(features)
  fig, axes = kcg.plotting.new_figure(1, len(families), panel_size=(6.4, 3.9))
  for col, family in enumerate(families):
    ax = axes[0, col]
    sec = features[family]
    nl = sec["lm"]["y_nonlinearity"]
    steps = list(range(1, len(nl["cg_by_step"]) + 1))
    floor = kcg.plotting.PLOT_FLOOR
    ax.semilogy(steps, [np.nan if v is None else max(v, floor) for v in nl["cg_by_step"]],
                label=f"CG_t on phi_{nl['cg_layer']} (LM's features)", **kcg.plotting.line_style(0))
    ax.axhline(max(nl["index"], floor), color=kcg.plotting.PALETTE[1], linestyle="--", label="the LM")
    if "random_control" in sec:
      ax.axhline(max(sec["random_control"]["y_nonlinearity"]["index"], floor),
                 color=kcg.plotting.PALETTE[2], linestyle="-.", label="random-init control")
    ax.set_xlabel("CG step t")
    ax.set_ylabel("y-nonlinearity index (0 = affine in y)")
    ax.set_title(f"{family}: the y-linearity signature", fontsize=9)
    kcg.plotting.integer_ticks(ax)
    kcg.plotting.add_legend(ax, where="right")
  kcg.plotting.save_figure(fig, path)
  return fig


def _best(rows):
  scored = [r for r in rows if r["r2"] is not None]
  return max(scored, key=lambda r: r["r2"]) if scored else None


def _alignment_summary(family: str, sec: dict[str, Any]) -> list[str]:
  """Summary lines of the alignment instruments on one task family, generated from the numbers."""
  a = sec["lm"]
  lines = []
  pred = a["predictions"]
  spread = (f"the LM's predictions vary with std {_fmt(pred['std_within_prompt'])} within a prompt "
            f"(labels: std {_fmt(sec['label_std'])})")
  if pred["std_within_prompt"] < 0.1 * sec["label_std"]:
    spread += ", so they barely depend on the query and every R^2 below compares with a near-constant"
  best = _best(a["krr"]["zero_labels"])
  if best is None:
    return [f"- {family}: {spread}; KRR on phi_l gave no finite R^2."]
  if best["r2_lower"] is not None and best["r2_lower"] > 0.9:
    verdict = "describes the LM closely (R^2 interval above 0.9) at"
  elif best["r2"] > 0:
    verdict = "explains part of the LM's predictions, best at"
  else:
    verdict = "explains none of the LM's predictions (R^2 <= 0 at every layer); least badly at"
  if best["shuffled_r2"] is not None and best["r2"] <= best["shuffled_r2"]:
    verdict = "does no better than pairing each prompt with another one's predictions; best at"
  layer = best["layer"]
  circular = a["krr"].get("with_labels", [{}] * (layer + 1))[layer].get("r2")
  line = (f"- {family}: {spread}. KRR on phi_l (labels written as 0: the features cannot carry the "
          f"answer) {verdict} layer {layer}: R^2 {_fmt(best['r2'])} [{_fmt(best['r2_lower'])}, "
          f"{_fmt(best['r2_upper'])}], shuffled control {_fmt(best['shuffled_r2'])}; the circular "
          f"reading (true labels) there {_fmt(circular)}; KRR on raw x {_fmt(a['krr_raw_x']['r2'])}")
  if best["ridge_at_edge"]:
    line += " (the ridge chosen there is at the edge of the grid)"
  if "random_control" in sec:
    ctrl = _best(sec["random_control"]["krr"]["zero_labels"])
    if ctrl is not None:
      line += f"; random-init control, best layer {ctrl['layer']}: {_fmt(ctrl['r2'])}"
  lines.append(line + ".")
  w = a["smoother_weights"]
  lines.append(
      f"- {family}, smoother weights (central differences, step {w['step']:g} in y, "
      f"{w['num_prompts']} prompts): the LM's weights sum to {_fmt(w['weight_sum'])} (1: it follows "
      f"a shift of every label; 0: it ignores the labels); cosine with KRR's on phi_{layer} "
      f"{_fmt(w['krr_phi'][layer])} (shuffled {_fmt(w['krr_phi_shuffled'][layer])}), with linear "
      f"KRR's on raw x {_fmt(w['linear_x'])}.")
  nl = a["y_nonlinearity"]
  cg = [v for v in nl["cg_by_step"] if v is not None]
  r2s = [v if v is not None else -np.inf for v in nl["cg_r2_by_step"]]
  t = 1 + int(np.argmax(r2s))
  cg_t = nl["cg_by_step"][t - 1]
  text = (f"- {family}, y-linearity: the LM's y-nonlinearity index is {_fmt(nl['index'])}")
  if "random_control" in sec:
    text += f" (random-init control {_fmt(sec['random_control']['y_nonlinearity']['index'])})"
  if cg:
    text += (f"; CG_t on phi_{nl['cg_layer']} gives {_fmt(min(cg))} to {_fmt(max(cg))} over t = 1.."
             f"{len(nl['cg_by_step'])}, {_fmt(cg_t)} at t = {t} (the step closest to the LM)")
  text += "; every predictor affine in the labels (KRR, GD, Chebyshev) gives 0"
  if cg_t is not None and nl["index"] is not None:
    text += (". The LM is further from affine in its labels than that CG_t" if nl["index"] > cg_t
             else ". The LM is closer to affine in its labels than that CG_t")
  if nl["clipped_labels"]:
    text += f" ({nl['clipped_labels']} summed labels clipped)"
  lines.append(text + ".")
  return lines


def _alignment_tables(features: dict[str, Any]) -> list[str]:
  lines = ["", "## Alignment instruments on the LM's features (held-out prompts)", "",
           "phi_l is read at the last token of each input, every input asked as the query of a prompt "
           "of its own (`kcg.lm.hidden_features`); KRR is fitted per layer on standardised phi_l with "
           "the written support labels, ridge and intercept chosen on separate fit prompts to agree "
           "with the LM; R^2 is pooled over the evaluation prompts, [95% bootstrap interval].", "",
           "![alignment](alignment_by_layer.png)", ""]
  for family, sec in features.items():
    readings = list(sec["lm"]["krr"])
    head = " | ".join(_READING_LABELS[r] for r in readings)
    lines += [f"### {family}", "", f"| layer | {head} | shuffled (labels as 0) | random control | "
              "ridge | intercept |", "|---|" + "---|" * (len(readings) + 4)]
    ctrl = sec.get("random_control", {}).get("krr", {}).get("zero_labels")
    for layer, row in enumerate(sec["lm"]["krr"]["zero_labels"]):
      cells = []
      for r in readings:
        s = sec["lm"]["krr"][r][layer]
        cells.append(f"{_fmt(s['r2'])} [{_fmt(s['r2_lower'])}, {_fmt(s['r2_upper'])}]")
      lines.append(f"| {layer} | " + " | ".join(cells) + f" | {_fmt(row['shuffled_r2'])} | "
                   f"{_fmt(ctrl[layer]['r2']) if ctrl else '-'} | {row['ridge']:.3g} | "
                   f"{row['intercept']} |")
    raw = sec["lm"]["krr_raw_x"]
    lines += [f"| raw x | {_fmt(raw['r2'])} [{_fmt(raw['r2_lower'])}, {_fmt(raw['r2_upper'])}] |"
              + " |" * (len(readings) - 1) + f" {_fmt(raw['shuffled_r2'])} | - | {raw['ridge']:.3g} | "
              f"{raw['intercept']} |", ""]
    w, ka = sec["lm"]["smoother_weights"], sec["lm"]["kernel_alignment"]
    cw = sec.get("random_control", {}).get("smoother_weights")
    lines += ["| layer | smoother cosine vs KRR on phi_l | shuffled | random control | CKA vs raw x | "
              "CKA vs target f f^T | CKA vs raw x, shuffled |", "|---|---|---|---|---|---|---|"]
    for layer, cos in enumerate(w["krr_phi"]):
      lines.append(f"| {layer} | {_fmt(cos)} | {_fmt(w['krr_phi_shuffled'][layer])} | "
                   f"{_fmt(cw['krr_phi'][layer]) if cw else '-'} | {_fmt(ka['raw_x'][layer])} | "
                   f"{_fmt(ka['target'][layer])} | {_fmt(ka['raw_x_shuffled'][layer])} |")
    nl = sec["lm"]["y_nonlinearity"]
    lines += ["", f"y-nonlinearity index: LM {_fmt(nl['index'])}"
              + (f", random control {_fmt(sec['random_control']['y_nonlinearity']['index'])}"
                 if "random_control" in sec else "")
              + f"; CG_t on phi_{nl['cg_layer']} by step t = 1..{len(nl['cg_by_step'])}: "
              + ", ".join(_fmt(v) for v in nl["cg_by_step"]) + " (its R^2 vs the LM: "
              + ", ".join(_fmt(v) for v in nl["cg_r2_by_step"]) + ").", ""]
  lines += ["![y-linearity](y_linearity.png)", ""]
  return lines


def _report(results: dict[str, Any]) -> str:
  m = results["model"]
  lines = [f"# LM in-context learning: {m['source']}", ""]
  if m["random_init"]:
    lines += [_RANDOM_WARNING.format(source=m["source"]), ""]
  lines += [f"Model: {m['family']}, {m['num_layers']} layers, width {m['width']}, "
            f"{m['num_parameters']:,} parameters, checkpoint `{m['checkpoint']}`. Readout for the "
            "instruments: expected value over the label tokens (`kcg.lm.readout`).", "", "## Summary", ""]
  reg = results["regression"]
  beat = [c for c in reg if (c["readouts"].get("expected", {}).get("mse") or np.inf)
          < c["baselines"]["mean"]["mse"]]
  lines.append(f"- Regression: the LM's expected-value prediction beats predicting the support mean in "
               f"{len(beat)} of {len(reg)} cells (family x d x k).")
  if "greedy" in reg[0]["readouts"]:
    inv = sum(c["readouts"]["greedy"]["num_invalid"] for c in reg)
    tot = inv + sum(c["readouts"]["greedy"]["num_valid"] for c in reg)
    lines.append(f"- Greedy decoding gave {inv} invalid answers out of {tot} ({100 * inv / tot:.0f}%); "
                 "they are excluded from the greedy MSE and counted here.")
  mass = np.mean([c["readouts"]["expected"]["label_mass"] for c in reg if "expected" in c["readouts"]])
  lines.append(f"- Mean probability on label tokens at the answer: {mass:.3f}.")
  for family, sec in results["features"].items():
    lines += _alignment_summary(family, sec)
  for row in results["classification"]:
    acc = row["readouts"].get("expected", {}).get("accuracy")
    best = max(row["baselines"].items(), key=lambda kv: kv[1]["accuracy"] or 0)
    lines.append(f"- Classification ({row['inputs']} inputs): LM accuracy {_fmt(acc)}, best baseline "
                 f"{best[0]} {_fmt(best[1]['accuracy'])}, chance {1 / results['num_classes']:.2f}.")
  lines += ["", "## Regression (test MSE; baselines on the labels the LM read)", "",
            "| family | d | k | LM expected | LM greedy (invalid) | random control | krr_rbf | ridge | gd | knn | mean |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in reg:
    b = c["baselines"]
    g = c["readouts"].get("greedy")
    names = list(b)
    lines.append(
        f"| {c['family']} | {c['input_dim']} | {c['num_support']} | "
        f"{_fmt(c['readouts'].get('expected', {}).get('mse'))} | "
        f"{_fmt(g['mse']) + ' (' + str(g['num_invalid']) + ')' if g else '-'} | "
        f"{_fmt(c.get('random_control_mse'))} | "
        + " | ".join(_fmt(b[n]["mse"]) for n in names) + " |")
  lines += _alignment_tables(results["features"])
  lines += ["", "![errors](error_vs_k.png)", "", "## Classification (accuracy)", "",
            "| inputs | LM expected | LM greedy (invalid) | random control | " +
            " | ".join(results["classification"][0]["baselines"]) + " |",
            "|---|---|---|---|" + "---|" * len(results["classification"][0]["baselines"])]
  for row in results["classification"]:
    g = row["readouts"].get("greedy")
    lines.append(f"| {row['inputs']} | {_fmt(row['readouts'].get('expected', {}).get('accuracy'))} | "
                 f"{_fmt(g['accuracy']) + ' (' + str(g['num_invalid']) + ')' if g else '-'} | "
                 f"{_fmt(row.get('random_control_accuracy'))} | "
                 + " | ".join(_fmt(v["accuracy"]) for v in row["baselines"].values()) + " |")
  lines += ["", f"Runtime {results['runtime_s']:.0f} s.", ""]
  return "\n".join(lines)


def run(config, workdir: str) -> dict[str, Any]:
  """Every stage; writes report.md, results.json, error_vs_k.png, alignment_by_layer.png and
  y_linearity.png; returns the results."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  with jax.enable_x64(True):
    lm = _model(config, workdir)
    fmt = kcg_lm.TextFormat(**config.format.to_dict())
    key = jax.random.key(config.seed)
    control = kcg_lm.random_like(lm, jax.random.fold_in(key, 1)) if config.random_control else None
    logging.info("LM %s: %d layers, width %d, %d parameters.", lm.source, lm.num_layers, lm.width,
                 lm.num_parameters)
    regression = []
    r = config.regression
    cells = [(f, d, k) for f in r.families for d in r.input_dims for k in r.num_supports]
    for i, (family, d, k) in enumerate(cells):
      prompts = _prompts(family, d, k, config, jax.random.fold_in(key, 100 + i))
      cell = _regression_cell(lm, control, fmt, config, prompts)
      regression.append({"family": family, "input_dim": d, "num_support": k, **cell})
      logging.info("[%d/%d] %s d=%d k=%d: LM mse %s (%.0f s)", i + 1, len(cells), family, d, k,
                   cell["readouts"].get("expected", {}).get("mse"), time.time() - start)
    features = {}
    for i, family in enumerate(r.families):
      features[family] = _feature_section(lm, control, fmt, config, family, jax.random.fold_in(key, 200 + i))
      logging.info("features %s done (%.0f s)", family, time.time() - start)
    classification = _classification(lm, control, fmt, config, np.random.default_rng(config.seed))
  results = {
      "config": config.to_dict(),
      "model": {"source": lm.source, "random_init": lm.random_init, "family": lm.family,
                "checkpoint": lm.path, "num_layers": lm.num_layers, "width": lm.width,
                "num_parameters": lm.num_parameters},
      "regression": regression, "features": features, "classification": classification,
      "num_classes": config.classification.num_classes,
      "runtime_s": time.time() - start,
  }
  _plot_errors(os.path.join(workdir, "error_vs_k.png"), regression, r.families, r.input_dims)
  _plot_alignment(os.path.join(workdir, "alignment_by_layer.png"), features)
  _plot_linearity(os.path.join(workdir, "y_linearity.png"), features)
  results = _json_ready(results)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, allow_nan=False, default=str)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(_report(results))
  logging.info("Wrote %s in %.0f s.", workdir, results["runtime_s"])
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "report.md, results.json and PNGs")
