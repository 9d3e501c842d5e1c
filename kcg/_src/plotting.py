"""Headless plots shared by the experiments (matplotlib's Agg canvas, never a GUI backend)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

# Errors are plotted on a log scale; exact zeros are drawn at this floor.
PLOT_FLOOR = 1e-17


def error_curves(path: str, curves: Mapping[str, np.ndarray], *, title: str = "",
                 dashed: Mapping[str, np.ndarray] | None = None, xlabel: str = "step t",
                 ylabel: str = "error", x: np.ndarray | None = None) -> None:
  """Log-scale curves against x (default 0..T), solid for `curves`, dashed for `dashed` (bounds)."""
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
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  if title:
    axes.set_title(title, fontsize=9)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
