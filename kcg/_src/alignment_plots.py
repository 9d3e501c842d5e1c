"""Figures of the alignment study (matplotlib Agg canvases, no global state): one PNG per task each.

Drawn with kcg's style helpers (`kcg.plotting`): every curve has its own colour and marker, layer and
step axes have integer ticks, axes are labelled and legends sit right of the panels, one per row.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Mapping

import numpy as np

from kcg._src import plotting
# Agreement is drawn as 1 - R^2 (the fraction of the model's variance left unexplained) on a log axis,
# clipped to [_FLOOR, _CEIL]: differences between 0.9 and 0.99 stay visible, and controls at R^2 <= 0
# sit at the top.
_FLOOR, _CEIL = 1e-4, 2.0


def _figure(nrows: int, ncols: int):
  return plotting.new_figure(nrows, ncols, panel_size=(3.6, 3.0))


def _styles() -> Iterator[tuple[str, str]]:
  """(colour, marker) of the lines of one panel, in drawing order, all distinct."""
  return ((s["color"], s["marker"]) for s in (plotting.line_style(i) for i in itertools.count()))


def _unexplained(values) -> np.ndarray:
  """1 - R^2, clipped to the plotted range."""
  v = np.asarray([np.nan if x is None else x for x in values], np.float64)
  return np.clip(1.0 - v, _FLOOR, _CEIL)


def _r2_axis(axes, ylabel: str) -> None:
  """Log axis from a third of the smallest value drawn (at least _FLOOR) to just above _CEIL."""
  values = [y for line in axes.get_lines() for y in np.ravel(line.get_ydata())]
  values = [v for v in values if np.isfinite(v) and v > 0]
  low = max(_FLOOR, min(values) / 3) if values else _FLOOR
  axes.set_yscale("log")
  axes.set_ylim(low, _CEIL * 1.25)
  axes.set_ylabel(ylabel)


def _save(figure, legend_rows, path: str) -> None:
  """Saves `figure` with one legend per row of panels, right of the figure: `legend_rows` =
  [(axes of the row, y of the legend's centre in figure coordinates)]; entries are the row's
  distinct labels in drawing order."""
  for axes_list, y in legend_rows:
    entries = {}
    for axes in axes_list:
      for handle, label in zip(*axes.get_legend_handles_labels()):
        entries.setdefault(label, handle)
    if entries:
      figure.legend(list(entries.values()), list(entries), loc="center left",
                    bbox_to_anchor=(1.0, y), fontsize=plotting.LEGEND_FONTSIZE)
  plotting.save_figure(figure, path)


def agreement_figure(results: Mapping[str, dict], path: str, title: str) -> str:
  """Agreement with each model vs layer, drawn as 1 - R^2 (log): top row, KRR on phi_l for every reading
  with the raw-x baselines as horizontal lines; bottom row, the best step of every candidate on phi_l."""
  names = list(results)
  figure, axes = _figure(2, len(names))
  for col, name in enumerate(names):
    r = results[name]
    top, bottom = axes[0][col], axes[1][col]
    styles = _styles()
    for reading, rows in r["krr"].items():
      colour, marker = next(styles)
      label = f"KRR on phi_l ({reading.replace('_', ' ')})"
      top.plot([row["layer"] for row in rows], _unexplained([row["r2"] for row in rows]), marker=marker,
               color=colour, linestyle="--" if reading == "with_labels" else "-", label=label)
    if "krr_rbf_phi" in r:
      colour, marker = next(styles)
      rows = r["krr_rbf_phi"]
      top.plot([row["layer"] for row in rows], _unexplained([row["r2"] for row in rows]),
               marker=marker, color=colour, label="Gaussian-kernel KRR on phi_l (zero labels)")
    colour, marker = next(styles)
    rows = r["krr"]["zero_labels"]
    top.plot([row["layer"] for row in rows], _unexplained([row["shuffled_r2"] for row in rows]),
             marker=marker, color=colour, linestyle=":", label="shuffled control (zero labels)")
    if "control" in r:
      colour, marker = next(styles)
      rows = r["control"]["krr"]["zero_labels"]
      top.plot([row["layer"] for row in rows], _unexplained([row["r2"] for row in rows]), marker=marker,
               color=colour, linestyle=":", label="random-init model (zero labels)")
    for base, label in (("linear_x", "KRR on raw x, linear"), ("rbf_x", "KRR on raw x, RBF"),
                        ("true_kernel", "KRR, task's true kernel")):
      colour, _ = next(styles)
      if base in r["baselines"]:
        top.axhline(_unexplained([r["baselines"][base]["r2"]])[0], color=colour, linewidth=1.2,
                    linestyle="-.", label=label)
    top.set_title(name, fontsize=8)
    layer_names = list(r["candidates"])
    layers = [int(l) for l in layer_names if l != "x"]
    for (cand, _), (colour, marker) in zip(r["candidates"][str(layers[0])].items(), _styles()):
      bottom.plot(layers, _unexplained([r["candidates"][str(l)][cand]["r2"] for l in layers]),
                  marker=marker, color=colour, label=f"{cand}, best t, on phi_l")
    for ax in (top, bottom):
      plotting.integer_ticks(ax, "x")
      ax.set_xlabel("layer l (blocks applied)")
      ax.grid(alpha=0.3, which="both")
    _r2_axis(top, "1 - R^2 of KRR vs model")
    _r2_axis(bottom, "1 - R^2 of candidate vs model")
  figure.suptitle(title, fontsize=9)
  _save(figure, [(list(axes[0]), 0.72), (list(axes[1]), 0.25)], path)
  return path


def alignment_figure(results: Mapping[str, dict], path: str, title: str) -> str:
  """Centred kernel alignment of Gram(phi_l) with the true, raw-x and target kernels vs layer."""
  names = list(results)
  figure, axes = _figure(1, len(names))
  labels = {"true_kernel": "vs task's true kernel", "raw_x": "vs raw x (linear)",
            "target": "vs target f f^T"}
  for col, name in enumerate(names):
    r, ax = results[name], axes[0][col]
    layers = r["layers"]
    styles = _styles()
    for key, label in labels.items():
      if key in r["kernel_alignment"]:
        colour, marker = next(styles)
        ax.plot(layers, r["kernel_alignment"][key], marker=marker, color=colour, label=label)
    if "control" in r and "true_kernel" in r["control"]["kernel_alignment"]:
      colour, marker = next(styles)
      ax.plot(r["control"]["layers"], r["control"]["kernel_alignment"]["true_kernel"], marker=marker,
              color=colour, linestyle=":", label="random init, vs true kernel")
    colour, marker = next(styles)
    key = "true_kernel_shuffled" if "true_kernel_shuffled" in r["kernel_alignment"] else "target_shuffled"
    ax.plot(layers, r["kernel_alignment"][key], marker=marker, color=colour, linestyle=":",
            label="shuffled prompts (control)")
    plotting.integer_ticks(ax, "x")
    ax.set_xlabel("layer l (blocks applied)")
    ax.set_ylabel("centred kernel alignment")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(name, fontsize=8)
    ax.grid(alpha=0.3)
  figure.suptitle(title, fontsize=9)
  _save(figure, [(list(axes[0]), 0.5)], path)
  return path


def graft_figure(results: Mapping[str, dict], path: str, title: str) -> str:
  """1 - R^2 of the graft (first l layers + compiled CG_t) vs the model, against t, one curve per l."""
  names = [n for n in results if results[n]["graft"]["layers"]]
  figure, axes = _figure(1, max(len(names), 1))
  for col, name in enumerate(names):
    g, ax = results[name]["graft"], axes[0][col]
    for (l, r2), (colour, marker) in zip(zip(g["layers"], g["r2"]), _styles()):
      ax.plot(range(len(r2)), _unexplained(r2), marker=marker, color=colour, label=f"l = {l}")
    plotting.integer_ticks(ax, "x")
    ax.set_xlabel("compiled CG steps t")
    _r2_axis(ax, "1 - R^2 of graft vs model")
    ax.set_title(name, fontsize=8)
    ax.grid(alpha=0.3)
  figure.suptitle(title, fontsize=9)
  _save(figure, [(list(axes[0]), 0.5)], path)
  return path


__all__ = ("agreement_figure", "alignment_figure", "graft_figure")
