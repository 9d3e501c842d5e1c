"""Headless plots shared by the experiments (matplotlib's Agg canvas, never a GUI backend)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

# Errors are plotted on a log scale; exact zeros are drawn at this floor.
PLOT_FLOOR = 1e-17


def error_curves(path: str | None, curves: Mapping[str, np.ndarray], *, title: str = "",
                 dashed: Mapping[str, np.ndarray] | None = None, xlabel: str = "step t",
                 ylabel: str = "error", x: np.ndarray | None = None, log_x: bool = False):
  """Log-scale curves against x (default 0..T), solid for `curves`, dashed for `dashed` (bounds).

  Returns the Figure; saved as PNG when `path` is not None.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(6.4, 4.4))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for name, values in curves.items():
    values = np.asarray(values, np.float64)
    xs = np.arange(len(values)) if x is None else np.asarray(x)
    axes.semilogy(xs, np.maximum(values, PLOT_FLOOR), marker=".", label=name)
  for name, values in (dashed or {}).items():
    values = np.asarray(values, np.float64)
    xs = np.arange(len(values)) if x is None else np.asarray(x)
    axes.semilogy(xs, np.maximum(values, PLOT_FLOOR), "--", label=name)
  if log_x:
    axes.set_xscale("log")
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  if title:
    axes.set_title(title, fontsize=9)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  if path:
    figure.savefig(path, dpi=120)
  return figure


def residual_stream(residual_TxD: np.ndarray, layout, *, token_labels=None, title: str = "",
                    path: str | None = None):
  """Picture of one residual stream: tokens x named channels, log10 |value| (blank where 0).

  Returns the matplotlib Figure (shown inline by notebooks); saved as PNG when `path` is given.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  values = np.abs(np.asarray(residual_TxD, np.float64))
  shown = np.where(values > 0, np.log10(np.maximum(values, 1e-300)), np.nan)
  figure = Figure(figsize=(max(6.0, 0.12 * values.shape[1] + 2), max(3.0, 0.22 * values.shape[0] + 1.5)))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  image = axes.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
  figure.colorbar(image, ax=axes, label="log10 |value|")
  ticks, labels = [], []
  for name, size in layout.channels:
    s = layout.slice(name)
    ticks.append((s.start + s.stop - 1) / 2)
    labels.append(name)
    axes.axvline(s.start - 0.5, color="white", linewidth=0.5)
  axes.set_xticks(ticks)
  axes.set_xticklabels(labels, rotation=90, fontsize=7)
  if token_labels is not None:
    axes.set_yticks(np.arange(len(token_labels)))
    axes.set_yticklabels(token_labels, fontsize=7)
  axes.set_xlabel("residual channel")
  axes.set_ylabel("token")
  if title:
    axes.set_title(title, fontsize=9)
  figure.tight_layout()
  if path:
    figure.savefig(path, dpi=120)
  return figure
