"""Headless plots shared by the library and the experiments (matplotlib's Agg canvas, never a GUI).

Every figure of kcg is drawn with the style helpers here, so that plots look alike and read well at
the size a report shows them:

* `line_style(i)` / `line_styles(n)`: the i-th of a cycle of distinct (colour, marker) pairs: 15
  colours that read on white (matplotlib's tab10 plus five dark tab20b shades) and 8 markers, so
  pairs repeat only after 120 lines and colours only after 15. Reference lines (bounds, oracles)
  are `REFERENCE` (black, no marker), dashed.
* `new_figure(nrows, ncols)`: an Agg figure and its `[nrows, ncols]` axes.
* `integer_ticks(axes)`: integer tick positions on a layer, step or depth axis.
* `add_legend(axes)`: a legend in the best place with a translucent frame, or outside the axes
  (right, above or below) when it has many entries, at `LEGEND_FONTSIZE`; `add_figure_legend(figure, axes)`: one
  legend right of several panels that draw the same methods alike.
* `save_figure(figure, path)`: tight layout (legends outside the axes included), PNG at `DPI`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np

# Errors are plotted on a log scale; exact zeros are drawn at this floor.
PLOT_FLOOR = 1e-17
# tab10, then the darkest shade of five tab20b groups (the light tab20 shades vanish on white).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
# Eight markers: with 15 colours, (colour, marker) pairs repeat only after lcm(15, 8) = 120 lines.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
# Bounds, oracles and thresholds: black and unmarked, so they never look like a measured line.
REFERENCE = {"color": "k", "marker": None}
LEGEND_FONTSIZE = 7.5
# Legends with more entries than this go outside the axes, where they cannot hide data.
LEGEND_INSIDE_MAX = 5
DPI = 120


def line_style(i: int) -> dict[str, str]:
  """`{"color", "marker"}` of the i-th line: distinct pairs for i < 120, distinct colours for i < 15."""
  return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}


def line_styles(n: int) -> list[dict[str, str]]:
  """`[line_style(0), ..., line_style(n - 1)]`."""
  return [line_style(i) for i in range(n)]


def new_figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] | None = None,
               panel_size: tuple[float, float] = (5.2, 3.9)):
  """A headless (Agg) Figure and its axes as a `[nrows, ncols]` array.

  `size` (inches) defaults to `panel_size` per panel.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=size or (panel_size[0] * ncols, panel_size[1] * nrows))
  FigureCanvasAgg(figure)
  return figure, figure.subplots(nrows, ncols, squeeze=False)


def integer_ticks(axes, axis: str = "x") -> None:
  """Ticks at integers only on `axis` ("x" or "y"): layers, steps and depths are counts.

  Call it after any `set_xscale`/`loglog`, which replace the locator.
  """
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  if axis not in ("x", "y"):
    raise ValueError(f"axis must be 'x' or 'y', got {axis!r}.")
  # min_n_ticks=1: a single depth (range 0.95..1.05) still gets its one integer tick.
  getattr(axes, f"{axis}axis").set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


_LEGEND_PLACES = {
    "right": {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)},
    "above": {"loc": "lower left", "bbox_to_anchor": (0.0, 1.02)},
    "below": {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2)},
}


def add_legend(axes, *, where: str = "auto", ncol: int = 1, **kwargs: Any):
  """A legend that does not hide data, readable at report size (`LEGEND_FONTSIZE`).

  `where`: "best" (matplotlib's least-covering place, translucent frame), or outside the axes:
  "right", "above" (give the figure a `suptitle` rather than the axes a title) or "below" (for a
  panel with a neighbour on its right); "auto" is "right" for more than `LEGEND_INSIDE_MAX`
  entries, else "best". Returns the Legend (None when no line is labelled).
  """
  if where not in ("auto", "best", *_LEGEND_PLACES):
    raise ValueError(f"where must be 'auto', 'best', 'right', 'above' or 'below', got {where!r}.")
  handles, labels = axes.get_legend_handles_labels()
  if not handles:
    return None
  if where == "auto":
    where = "right" if len(handles) > LEGEND_INSIDE_MAX else "best"
  kwargs.setdefault("fontsize", LEGEND_FONTSIZE)
  if where == "best":
    return axes.legend(handles, labels, loc="best", framealpha=0.7, ncol=ncol, **kwargs)
  return axes.legend(handles, labels, borderaxespad=0.0, ncol=ncol, **_LEGEND_PLACES[where],
                     **kwargs)


def add_figure_legend(figure, axes: Iterable[Any]):
  """One legend for panels that draw the same methods alike, right of the figure.

  Entries are the distinct labels over `axes`, in order. `save_figure` keeps it in frame.
  Returns the Legend (None when no line is labelled).
  """
  entries: dict[str, Any] = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      entries.setdefault(label, handle)
  if not entries:
    return None
  return figure.legend(list(entries.values()), list(entries), loc="center left",
                       bbox_to_anchor=(1.0, 0.5), fontsize=LEGEND_FONTSIZE)


def save_figure(figure, path: str | None, *, dpi: int = DPI) -> None:
  """Tight layout; saved as PNG when `path` is given, with legends outside the axes kept in frame."""
  figure.tight_layout()
  if path:
    figure.savefig(path, dpi=dpi, bbox_inches="tight")


def error_curves(path: str | None, curves: Mapping[str, np.ndarray], *, title: str = "",
                 dashed: Mapping[str, np.ndarray] | None = None, xlabel: str = "step t",
                 ylabel: str = "error", x: np.ndarray | None = None, log_x: bool = False,
                 integer_x: bool | None = None):
  """Log-scale curves against x (default 0..T), solid for `curves`, dashed for `dashed` (bounds).

  Each line has its own (colour, marker) from `line_style`; dashed lines carry no marker.
  `integer_x` (default: when x is the step index 0..T) puts integer ticks on the x axis.
  Returns the Figure; saved as PNG when `path` is not None.
  """
  figure, ((axes,),) = new_figure(size=(6.4, 4.4))
  for i, (name, values) in enumerate(curves.items()):
    values = np.asarray(values, np.float64)
    xs = np.arange(len(values)) if x is None else np.asarray(x)
    axes.semilogy(xs, np.maximum(values, PLOT_FLOOR), "-", label=name, markersize=4,
                  **line_style(i))
  for i, (name, values) in enumerate((dashed or {}).items(), start=len(curves)):
    values = np.asarray(values, np.float64)
    xs = np.arange(len(values)) if x is None else np.asarray(x)
    axes.semilogy(xs, np.maximum(values, PLOT_FLOOR), "--", label=name,
                  **{**line_style(i), "marker": None})
  if log_x:
    axes.set_xscale("log")
  if integer_x if integer_x is not None else (x is None and not log_x):
    integer_ticks(axes, "x")
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  if title:
    axes.set_title(title, fontsize=9)
  axes.grid(True, which="both", alpha=0.3)
  add_legend(axes)
  save_figure(figure, path)
  return figure


def residual_stream(residual_TxD: np.ndarray, layout, *, token_labels=None, title: str = "",
                    path: str | None = None):
  """Picture of one residual stream: tokens x named channels, log10 |value| (blank where 0).

  Returns the matplotlib Figure (shown inline by notebooks); saved as PNG when `path` is given.
  """
  values = np.abs(np.asarray(residual_TxD, np.float64))
  shown = np.where(values > 0, np.log10(np.maximum(values, 1e-300)), np.nan)
  figure, ((axes,),) = new_figure(size=(max(6.0, 0.12 * values.shape[1] + 2),
                                        max(3.0, 0.22 * values.shape[0] + 1.5)))
  image = axes.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
  figure.colorbar(image, ax=axes, label="log10 |value|")
  ticks, labels, borders = [], [], []
  for name, _ in layout.channels:
    s = layout.slice(name)
    ticks.append((s.start + s.stop - 1) / 2)
    labels.append(name)
    borders.append(s.start - 0.5)
  # One collection of white borders between the named channels (not data lines).
  axes.vlines(borders, -0.5, values.shape[0] - 0.5, color="white", linewidth=0.5)
  axes.set_xticks(ticks)
  axes.set_xticklabels(labels, rotation=90, fontsize=7)
  if token_labels is not None:
    axes.set_yticks(np.arange(len(token_labels)))
    axes.set_yticklabels(token_labels, fontsize=7)
  axes.set_xlabel("residual channel")
  axes.set_ylabel("token")
  if title:
    axes.set_title(title, fontsize=9)
  save_figure(figure, path)
  return figure


def training_plots(workdir: str, history: list[dict], curves: Mapping[str, dict] | None = None
                   ) -> list[str]:
  """A training run's figures: `loss.png` (training loss and held-out mse vs step) and, given
  `curves` `{name: {"num_support", "mse"}}`, `error_vs_supports.png`. Returns the paths written."""
  paths = []
  train = [h for h in history if "loss" in h]
  if train:
    figure, ((axes,),) = new_figure(size=(5.5, 3.5))
    axes.plot([h["step"] for h in train], [h["loss"] for h in train], "-", **line_style(0),
              markevery=max(1, len(train) // 12), label="train loss (mean over the log interval)")
    evals = [h for h in history if "eval_mse" in h]
    if evals:
      axes.plot([h["step"] for h in evals], [h["eval_mse"] for h in evals], "--", **line_style(1),
                label="held-out mse")
    axes.set_yscale("log")
    integer_ticks(axes, "x")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean squared error")
    add_legend(axes, where="best")
    paths.append(os.path.join(workdir, "loss.png"))
    save_figure(figure, paths[-1])
  if curves:
    figure, ((axes,),) = new_figure(size=(6.5, 4))
    for i, (name, curve) in enumerate(curves.items()):
      axes.plot(curve["num_support"], curve["mse"], "-" if name == "model" else "--",
                **line_style(i), linewidth=2 if name == "model" else 1, label=name)
    axes.set_yscale("log")
    # Exact solvers reach ~1e-13 on noiseless prompts; keep the learned curves readable.
    lowest = min(min(c["mse"]) for c in curves.values())
    axes.set_ylim(bottom=max(lowest * 0.5, 1e-4))
    integer_ticks(axes, "x")
    axes.set_xlabel("number of supports k")
    axes.set_ylabel("query mean squared error")
    add_legend(axes, where="right")
    paths.append(os.path.join(workdir, "error_vs_supports.png"))
    save_figure(figure, paths[-1])
  return paths
