"""report.md of experiments/alignment.py, written from results.json's numbers only."""

from __future__ import annotations

import json
import math
from typing import Any

_READING_TEXT = {
    "zero_labels": "in context, support labels set to 0",
    "other_labels": "in context, labels of another prompt",
    "context_free": "no supports: [aggregator, query] only",
    "with_labels": "support tokens with their own labels (circular control)",
}


def _f(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if isinstance(x, bool):
    return str(x)
  if isinstance(x, int):
    return str(x)
  return f"{x:.{digits}g}"


def _table(header, rows) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_f(v) if not isinstance(v, str) else v for v in row) + " |"
            for row in rows]
  return lines + [""]


def _best(rows: list[dict]) -> dict:
  return max(rows, key=lambda r: -math.inf if r["r2"] is None else r["r2"])


def _linear_in_y(r: dict, ratio: float) -> tuple[bool, str]:
  """Whether the model is linear in y on the scale of CG's own nonlinearity on its features, and the
  sentence that says so."""
  model, ref = r["y_nonlinearity"], r["cg_reference"]
  scale = max(ref["y_nonlinearity_by_step"])
  at_match = ref["y_nonlinearity"]
  where = f"CG_t on phi_{ref['layer']}"
  if scale > 0 and model < ratio * scale:
    return True, (f"**linear in y** (index {_f(model)}, against up to {_f(scale)} for {where}): it "
                  f"is not running CG's prompt-dependent steps, whatever its R^2 against CG "
                  f"({_f(ref['r2'])} at t = {ref['step']})")
  text = (f"nonlinear in y (index {_f(model)}; {where}: up to {_f(scale)}, {_f(at_match)} at the "
          f"matched t = {ref['step']})")
  if at_match < ratio * scale:
    text += (f"; the matched CG_{ref['step']} is converged (linear in y), so its agreement is KRR's "
             "and the model's nonlinearity is not CG's")
  return False, text


def model_summary(name: str, r: dict, ratio: float) -> str:
  best = _best(r["krr"]["zero_labels"])
  fitted = _best(r["krr"]["zero_labels_fitted_metric"]) if "zero_labels_fitted_metric" in r["krr"] \
      else None
  base = r["baselines"]
  parts = [f"`{name}`: test mse {_f(r['test_mse'])}"]
  learners = [f"{label} {_f(base[key]['test_mse'])}" for key, label in (
      ("true_kernel", "true-kernel KRR"), ("rbf_x_tuned_to_targets", "tuned RBF KRR"),
      ("linear_x", "linear ridge"), ("support_mean", "support mean")) if key in base]
  parts[0] += " (" + ", ".join(learners) + ")"
  parts.append(f"KRR on phi_l (zero labels) explains it best at layer {best['layer']} of "
               f"{r['num_layers']}: R^2 {_f(best['r2'])} [{_f(best['r2_lower'])}, "
               f"{_f(best['r2_upper'])}], against {_f(base['linear_x']['r2'])} for linear KRR on raw x"
               + (f", {_f(base['rbf_x']['r2'])} for RBF KRR on x" if "rbf_x" in base else "")
               + (f", {_f(base['true_kernel']['r2'])} for the true kernel" if "true_kernel" in base
                  else "")
               + f" (random-init control {_f(_best(r['control']['krr']['zero_labels'])['r2'])}, "
               f"shuffled {_f(max(row['shuffled_r2'] for row in r['krr']['zero_labels']))})")
  if fitted is not None:
    parts.append(f"with the best linear kernel on phi_l (fitted on held-out prompts) R^2 "
                 f"{_f(fitted['r2'])} [{_f(fitted['r2_lower'])}, {_f(fitted['r2_upper'])}] at layer "
                 f"{fitted['layer']}, against {_f(base['linear_x_fitted_metric']['r2'])} on raw x "
                 f"(random-init control "
                 f"{_f(_best(r['control']['krr']['zero_labels_fitted_metric'])['r2'])})")
  if "krr_rbf_phi" in r:
    rbf = _best(r["krr_rbf_phi"])
    parts.append(f"a Gaussian kernel on phi_l reaches {_f(rbf['r2'])} [{_f(rbf['r2_lower'])}, "
                 f"{_f(rbf['r2_upper'])}] at layer {rbf['layer']}")
  cands = r["candidates"][str(r["best_layer"])]
  top = sorted(cands.items(), key=lambda kv: -kv[1]["r2"])[:3]
  parts.append(f"on phi_{r['best_layer']} ({r['feature_space'].replace('_', ' ')}) the best "
               "candidates are " + ", ".join(
      f"{n} t={c['best_step']} ({_f(c['r2'])})" for n, c in top))
  parts.append(_linear_in_y(r, ratio)[1])
  g = r["graft"]
  if g["layers"]:
    flat = [(l, t, v) for l, row in zip(g["layers"], g["r2"]) for t, v in enumerate(row)
            if v is not None]
    l, t, v = max(flat, key=lambda x: x[2])
    parts.append(f"grafted CG reproduces it best with l = {l}, t = {t}: R^2 {_f(v)}")
  return "; ".join(parts) + "."


def render(results: dict, config: Any) -> str:
  ratio = float(config.analysis.linear_in_y_ratio)
  lines = ["# Do trained transformers run KRR, by CG, on their own hidden features?", ""]
  cfg = config
  lines += [f"Scale `{cfg.scale}`: d = {cfg.task.input_dim}, k = {cfg.task.num_support} supports, "
            f"q = {cfg.task.num_query} queries, noise {cfg.task.noise_std} (logistic: mean targets, "
            f"glm_scale {cfg.task.glm_scale}); models {', '.join(cfg.models)} trained "
            f"{cfg.train.num_steps} steps each; {cfg.analysis.num_prompts} evaluation prompts, "
            f"{cfg.analysis.num_fit_prompts} held-out prompts for every choice. All in float64.", ""]
  lines += ["## Summary (generated from the numbers below)", ""]
  for task, tr in results["tasks"].items():
    lines.append(f"* **{task}**:")
    for name, r in tr["models"].items():
      lines.append(f"  * {model_summary(name, r, ratio)}")
    refs = tr["compiled_references"]
    lines.append("  * compiled references, y-nonlinearity index: " + ", ".join(
        f"{n} {_f(v)}" for n, v in refs.items()) + ".")
  linear = [n for tr in results["tasks"].values() for n, r in tr["models"].items()
            if _linear_in_y(r, ratio)[0]]
  lines += ["", f"Models linear in y (index below {ratio} of the largest of CG_t on their own features): "
            + (", ".join(f"`{n}`" for n in linear) if linear else "none") + ". A model linear in y "
            "is not running CG, whatever its R^2 against CG.", ""]
  lines += ["## Method", "",
            "phi_l(x) is the residual stream after l blocks at a query token, every support and query "
            "input being asked as a query (`kcg.alignment.hidden_features`): " + "; ".join(
                f"`{k}`: {v}" for k, v in _READING_TEXT.items()) + ". Each coordinate is standardised "
            "on held-out prompts; KRR with a linear kernel on it, with ridge and intercept chosen on "
            "held-out prompts to agree with the model, is compared with the model's predictions on "
            "evaluation prompts: pooled R^2 with a 95% bootstrap interval over prompts. Candidates "
            "(CG, PCG, GD, Chebyshev, Newton-Schulz per prompt; GD++, momentum and the best fixed "
            "polynomial in the Gram matrix fitted to the task distribution) run on the same features; "
            "the best step is reported. The best linear kernel on phi_l (`zero_labels_fitted_metric`) "
            "is KRR on phi_l A with A fitted to the model on the held-out prompts (Adam from A = I, "
            "early stopping on a validation quarter); candidates, CG references, grafts and probes "
            "read phi_l through it. KRR with a Gaussian kernel on the standardised phi_l (bandwidth "
            "and ridge chosen the same way) tests a nonlinear kernel on the model's own features. Controls: the same architecture at random initialisation, "
            "and shuffled prompts (the candidate paired with another prompt's model predictions). "
            "y-nonlinearity index: |f(a ya + b yb) - a f(ya) - b f(yb) - (1 - a - b) f(0)| / "
            "(a |f(ya) - f(0)| + b |f(yb) - f(0)|) with fresh labels yb on the same inputs, a = b = "
            "1/sqrt(2) (1/2 for logistic); 0 for anything affine in y. Grafts: the model's first l "
            "layers (zero-label reading), the standardising map, then the compiled CG transformer "
            "(`kcg.compile_cg`, prefix mask) on those features with the real labels.", ""]
  for task, tr in results["tasks"].items():
    lines += _task_section(task, tr, ratio)
  lines += ["## Runtime", "", ", ".join(f"{k}: {v:.0f} s" for k, v in
                                        results["timings_seconds"].items()), "",
            "## Configuration", "", "```json", json.dumps(results["config"], indent=1,
                                                          sort_keys=True), "```", ""]
  return "\n".join(lines)


def _task_section(task: str, tr: dict, ratio: float) -> list[str]:
  models = tr["models"]
  figs = tr["figures"]
  lines = [f"## Task `{task}`", ""]
  lines += ["### Did the models learn the task?", ""]
  any_model = next(iter(models.values()))
  refs = [k for k in ("true_kernel", "rbf_x_tuned_to_targets", "linear_x", "support_mean")
          if k in any_model["baselines"]]
  lines += _table(["model", "test mse", "noiseless"] + [f"{k} mse" for k in refs],
                  [[n, r["test_mse"], r["test_mse_noiseless"]]
                   + [r["baselines"][k]["test_mse"] for k in refs] for n, r in models.items()])
  lines += [f"![Agreement vs layer]({figs['agreement']})", "",
            "*Agreement drawn as 1 - R^2 (the fraction of the model's variance left unexplained; log "
            "axis, lower is better, clipped to [1e-4, 2]). Top: KRR on phi_l (each reading) against "
            "each model's predictions, with KRR on raw x (linear, RBF, the task's true kernel) as "
            "horizontal lines and the random-init and shuffled controls dotted. Bottom: the best step "
            "of each candidate on phi_l (zero labels).*", ""]
  lines += ["### KRR on phi_l (zero labels), per layer", "",
            "Linear kernel on standardised phi_l unless the column says otherwise; R^2 against the "
            "model's predictions on the evaluation prompts.", ""]
  for name, r in models.items():
    rows = []
    ctrl = {row["layer"]: row for row in r["control"]["krr"]["zero_labels"]}
    readings = list(r["krr"])
    by_layer = {reading: {row["layer"]: row for row in r["krr"][reading]} for reading in readings}
    rbf = {row["layer"]: row for row in r.get("krr_rbf_phi", [])}
    for row in r["krr"]["zero_labels"]:
      l = row["layer"]
      rows.append([l, f"{_f(row['r2'])} [{_f(row['r2_lower'])}, {_f(row['r2_upper'])}]",
                   row["relative_distance"], row["ridge"], str(row["intercept"])]
                  + [by_layer[rd][l]["r2"] for rd in readings if rd != "zero_labels"]
                  + [rbf[l]["r2"] if l in rbf else None, row["shuffled_r2"],
                     ctrl[l]["r2"] if l in ctrl else None])
    lines += [f"`{name}`:", ""]
    lines += _table(["layer", "R^2 [95% CI]", "rel. dist", "ridge", "intercept"]
                    + [f"R^2 {rd}" for rd in readings if rd != "zero_labels"]
                    + ["R^2 Gaussian kernel on phi_l", "shuffled R^2", "random-init R^2"], rows)
    base = r["baselines"]
    lines += ["Raw-x baselines (R^2 vs model): " + ", ".join(
        f"{k} {_f(v['r2'])}" for k, v in base.items() if "r2" in v) + ".", ""]
  lines += ["### Candidates: best step and R^2 vs the model, on phi_l (zero labels) and raw x", ""]
  for name, r in models.items():
    cand = r["candidates"]
    names = list(next(iter(cand.values())))
    rows = [[space] + [f"{_f(cand[space][c]['r2'])} (t={cand[space][c]['best_step']})"
                       for c in names] for space in cand]
    lines += [f"`{name}` (rows: layer l, or raw x):", ""] + _table(["space"] + names, rows)
  lines += ["### The y-linearity signature", ""]
  rows = [[n, r["y_nonlinearity"], r["control"]["y_nonlinearity"],
           f"CG_{r['cg_reference']['step']} on phi_{r['cg_reference']['layer']} (R^2 "
           f"{_f(r['cg_reference']['r2'])})", r["cg_reference"]["y_nonlinearity"],
           max(r["cg_reference"]["y_nonlinearity_by_step"]),
           "yes" if _linear_in_y(r, ratio)[0] else "no"] for n, r in models.items()]
  rows += [[f"compiled {n}", v, None, "", None, None, ""] for n, v in tr["compiled_references"].items()]
  lines += _table(["model", "index", "random-init index", "best-matching CG", "its index",
                   "max_t CG_t index on that phi_l", "linear in y"], rows)
  lines += ["Index: |f(a ya + b yb) - a f(ya) - b f(yb) - (1 - a - b) f(0)| / (a |f(ya) - f(0)| + "
            "b |f(yb) - f(0)|), 0 for every predictor affine in y. 'Linear in y': below "
            f"{ratio} of the largest index of CG_t (t = 1..T) on the model's own features.", ""]
  lines += ["### Kernel alignment", "", f"![Kernel alignment]({figs['alignment']})", "",
            "*Centred kernel alignment of Gram(phi_l) (zero labels, standardised) with the task's true "
            "kernel, raw x's linear kernel and the target kernel f f^T; dotted: random-init model and "
            "shuffled prompts.*", ""]
  for name, r in models.items():
    ka = r["kernel_alignment"]
    keys = [k for k in ("true_kernel", "raw_x", "target", "true_kernel_shuffled") if k in ka]
    lines += [f"`{name}`" + (f" (raw x vs true kernel: {_f(ka['raw_x_vs_true_kernel'])})"
                             if ka.get("raw_x_vs_true_kernel") is not None else "") + ":", ""]
    lines += _table(["layer"] + keys + ["smoother-weight cos (KRR phi_l)"],
                    [[l] + [ka[k][i] for k in keys] + [r["smoother_weights"]["krr_phi"][i]]
                     for i, l in enumerate(r["layers"])])
    sw = r["smoother_weights"]
    lines += ["Smoother weights d f/d y_i, mean cosine per query with: " + ", ".join(
        f"{k} {_f(v)}" for k, v in sw.items() if not isinstance(v, list)) + f"; shuffled control "
        f"{_f(max(sw['krr_phi_shuffled']))}.", ""]
  lines += ["### Grafting: first l layers + compiled CG_t", "", f"![Grafts]({figs['graft']})", ""]
  for name, r in models.items():
    g = r["graft"]
    if not g["layers"]:
      continue
    steps = len(g["r2"][0])
    lines += [f"`{name}`: R^2 of the graft against the model (random-init control: best "
              f"{_f(max((v for row in r['control']['graft']['r2'] for v in row), default=None))}):", ""]
    lines += _table(["l"] + [f"t={t}" for t in range(steps)] + ["shuffled (t=T)"],
                    [[l] + row + [s] for l, row, s in zip(g["layers"], g["r2"], g["shuffled_r2"])])
  lines += ["### Probes: CG state on phi_l in the residual stream", ""]
  for name, r in models.items():
    p = r.get("probes")
    if not p:
      continue
    rows = [[q, step, v["best_layer"], v["cosine"], v["r2"], v["shuffled_cosine"], v["control_cosine"]]
            for q in ("alpha", "r", "p") for step, v in p[q].items()]
    lines += [f"`{name}` (CG on phi_{p['phi_layer']}, site `{p['site']}`):", ""]
    lines += _table(["state", "t", "best layer", "cosine", "R^2", "shuffled cos",
                     "random-init cos"], rows)
  return lines
