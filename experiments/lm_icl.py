r"""A pretrained LM as an in-context learner, with kcg's baselines and per-layer KRR on its features.

  python -m experiments.lm_icl --workdir=DIR [--config=experiments/configs/lm_icl.py[:runlocal]] \
      [--config.model.checkpoint=PATH]

Writes `DIR/report.md` (summary generated from the numbers), `DIR/results.json` and PNGs. See the
config's docstring for scales and runtimes. The alignment instruments plug in at
`alignment_instruments` below.
"""

from __future__ import annotations

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


# ----------------------------------------------------------------------------------------------------
# Where the alignment instruments go.
# ----------------------------------------------------------------------------------------------------


def alignment_instruments(regressor: kcg_lm.LMRegressor, features: kcg_lm.LMFeatures,
                          prompts: kcg.tasks.Prompts, key: Any) -> dict[str, Any]:
  """The alignment instruments on the LM (the place to call them once `kcg.alignment` exists).

  Inputs are what they need: `regressor(x_support [B,k,d], y_support [B,k], x_query [B,q,d]) -> [B,q]`
  for the y-nonlinearity index and finite-difference smoother weights. The LM reads labels rounded to
  `regressor.fmt.resolution` and clipped to the code range: finite-difference steps must be
  multiples of the resolution (smaller changes are not written into the prompt), y_a and y_b of the
  linearity index should be written labels (`regressor.fmt.written(y)`, so that y_a + y_b is
  written exactly), and `regressor.predict(...).clipped_support_labels` says when a sum clipped. And
  `features.layer(l) -> (phi_support [B,k,p], phi_query [B,q,p])`, `features.y_support`,
  `features.predictions` for KRR on phi_l with bootstrap R^2, CKA and smoother weights against
  KRR's. Until then this returns what is pending; the report lists it.
  """
  del regressor, features, prompts, key
  return {"status": "pending", "instruments": [
      "y_nonlinearity", "smoother_weights", "cka", "krr_on_phi_with_bootstrap (kcg.alignment)",
      "grafting (not applicable to an LM)"]}


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


def _layer_scores(features, key, num_bootstrap) -> list[dict[str, Any]]:
  return [{k: (_num(v) if isinstance(v, float) else v) for k, v in s.__dict__.items()}
          for s in kcg_lm.krr_on_layers(features, key, num_bootstrap=num_bootstrap)]


def _feature_section(lm, control, fmt, config, family, key) -> dict[str, Any]:
  f = config.features
  prompts = _prompts(family, f.input_dim, f.num_support, config, key)
  xs, ys, xq = prompts.x_support, prompts.y_support, prompts.x_query
  reg = kcg_lm.LMRegressor(lm, fmt, chunk_size=config.model.chunk_size)
  keys = jax.random.split(key, 4)
  out: dict[str, Any] = {"num_support": f.num_support, "input_dim": f.input_dim,
                         "reading": f.reading, "labels": f.labels, "token": f.token}
  feats = kcg_lm.read_features(reg, xs, ys, xq, reading=f.reading, labels=f.labels, token=f.token)
  out["lm"] = _layer_scores(feats, keys[0], config.num_bootstrap)
  circular = kcg_lm.read_features(reg, xs, ys, xq, reading=f.reading, labels="true", token=f.token)
  out["true_labels_control"] = _layer_scores(circular, keys[1], config.num_bootstrap)
  raw = kcg_lm.LMFeatures(xs[None], xq[None], feats.y_support, feats.predictions, feats.label_mass,
                          "raw inputs", "-", "-")
  out["raw_x"] = _layer_scores(raw, keys[1], config.num_bootstrap)[0]
  if control is not None:
    creg = kcg_lm.LMRegressor(control, fmt, chunk_size=config.model.chunk_size)
    cfeats = kcg_lm.read_features(creg, xs, ys, xq, reading=f.reading, labels=f.labels, token=f.token)
    out["random_control"] = _layer_scores(cfeats, keys[2], config.num_bootstrap)
  out["alignment"] = alignment_instruments(reg, feats, prompts, keys[3])
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
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5 * len(families), 4))
  FigureCanvasAgg(fig)
  markers = "osD^v<>"
  for i, family in enumerate(families):
    ax = fig.add_subplot(1, len(families), i + 1)
    for j, d in enumerate(dims):
      cells = [c for c in regression if c["family"] == family and c["input_dim"] == d]
      ks = [c["num_support"] for c in cells]
      lm = [c["readouts"].get("expected", {}).get("mse") for c in cells]
      krr = [c["baselines"]["krr_rbf"]["mse"] for c in cells]
      mean = [c["baselines"]["mean"]["mse"] for c in cells]
      color = f"C{j}"
      ax.plot(ks, [np.nan if v is None else v for v in lm], marker=markers[j], color=color,
              label=f"LM, d={d}")
      ax.plot(ks, krr, marker=markers[j], color=color, linestyle="--", label=f"KRR (RBF), d={d}")
      ax.plot(ks, mean, marker=markers[j], color=color, linestyle=":", alpha=0.6, label=f"mean, d={d}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel("test MSE (y units squared)")
    ax.set_title(family)
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _plot_layers(path, features):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  families = list(features)
  fig = Figure(figsize=(5 * len(families), 4))
  FigureCanvasAgg(fig)
  series = (("lm", "LM, labels withheld", "o", "C0"), ("true_labels_control", "LM, true labels (circular)",
                                                        "s", "C1"),
            ("random_control", "random-init control", "D", "C2"))
  for i, family in enumerate(families):
    ax = fig.add_subplot(1, len(families), i + 1)
    sec = features[family]
    for key, label, marker, color in series:
      if key not in sec:
        continue
      layers = [s["layer"] for s in sec[key]]
      ax.plot(layers, [np.nan if s["pooled_r2"] is None else s["pooled_r2"] for s in sec[key]],
              marker=marker, color=color, label=label)
    raw = sec["raw_x"]["pooled_r2"]
    if raw is not None:
      ax.axhline(raw, color="k", linestyle="--", label="KRR on raw x")
    ax.set_xticks(layers, [str(l) for l in layers])
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("pooled R^2 of KRR on phi_l vs LM predictions")
    ax.set_title(family)
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


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
    scores = [s for s in sec["lm"] if s["pooled_r2"] is not None]
    if scores:
      best = max(scores, key=lambda s: s["pooled_r2"])
      raw = sec["raw_x"]["pooled_r2"]
      verdict = ("explains the LM best at" if best["pooled_r2"] > 0 else
                 "explains none of the LM's predictions (R^2 <= 0 at every layer); least badly at")
      lines.append(f"- {family}: KRR on phi_l (labels withheld, {sec['reading']}) {verdict} "
                   f"layer {best['layer']} (pooled R^2 {_fmt(best['pooled_r2'])}; per-prompt R^2 "
                   f"{_fmt(best['r2'])} [{_fmt(best['r2_lower'])}, {_fmt(best['r2_upper'])}]); KRR on raw "
                   f"x: {_fmt(raw)}; true-label (circular) control at that layer: "
                   f"{_fmt(sec['true_labels_control'][best['layer']]['pooled_r2'])}.")
  for row in results["classification"]:
    acc = row["readouts"].get("expected", {}).get("accuracy")
    best = max(row["baselines"].items(), key=lambda kv: kv[1]["accuracy"] or 0)
    lines.append(f"- Classification ({row['inputs']} inputs): LM accuracy {_fmt(acc)}, best baseline "
                 f"{best[0]} {_fmt(best[1]['accuracy'])}, chance {1 / results['num_classes']:.2f}.")
  lines.append(f"- Alignment instruments (y-linearity, smoother weights, CKA): "
               f"{next(iter(results['features'].values()))['alignment']['status']}.")
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
  lines += ["", "## KRR on the LM's features per layer (vs the LM's predictions, held-out prompts)", "",
            "![layers](krr_by_layer.png)", "", "| family | layer | pooled R^2 (withheld) | per-prompt R^2 [95% CI] | "
            "true labels (circular) | random control | ridge/p |", "|---|---|---|---|---|---|---|"]
  for family, sec in results["features"].items():
    for i, s in enumerate(sec["lm"]):
      ctrl = sec.get("random_control", [{}] * len(sec["lm"]))[i].get("pooled_r2")
      lines.append(f"| {family} | {s['layer']} | {_fmt(s['pooled_r2'])} | {_fmt(s['r2'])} "
                   f"[{_fmt(s['r2_lower'])}, {_fmt(s['r2_upper'])}] | "
                   f"{_fmt(sec['true_labels_control'][i]['pooled_r2'])} | {_fmt(ctrl)} | {s['ridge']:g} |")
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
  """Every stage; writes report.md, results.json, error_vs_k.png, krr_by_layer.png; returns results."""
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
  _plot_layers(os.path.join(workdir, "krr_by_layer.png"), features)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, allow_nan=False, default=str)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(_report(results))
  logging.info("Wrote %s in %.0f s.", workdir, results["runtime_s"])
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "report.md, results.json and PNGs")
