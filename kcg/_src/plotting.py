"""Headless plots shared by the experiments (matplotlib's Agg canvas, never a GUI backend)."""

from __future__ import annotations

import os
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


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def training_plots(workdir: str, history: list[dict], curves: Mapping[str, dict] | None = None
                   ) -> list[str]:
  """A training run's figures: `loss.png` (training loss and held-out mse vs step) and, given
  `curves` `{name: {"num_support", "mse"}}`, `error_vs_supports.png`. Returns the paths written."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  paths = []
  train = [h for h in history if "loss" in h]
  if train:
    figure = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([h["step"] for h in train], [h["loss"] for h in train], color="C0",
              label="train loss (mean over the log interval)")
    evals = [h for h in history if "eval_mse" in h]
    if evals:
      axes.plot([h["step"] for h in evals], [h["eval_mse"] for h in evals], "s-", color="C1",
                label="held-out mse")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean squared error")
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(os.path.join(workdir, "loss.png"))
    figure.savefig(paths[-1], dpi=120)
  if curves:
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (name, curve) in enumerate(curves.items()):
      axes.plot(curve["num_support"], curve["mse"], "-" if name == "model" else "--",
                marker=_MARKERS[i % len(_MARKERS)], color=f"C{i % 10}",
                linewidth=2 if name == "model" else 1, label=name)
    axes.set_yscale("log")
    # Exact solvers reach ~1e-13 on noiseless prompts; keep the learned curves readable.
    lowest = min(min(c["mse"]) for c in curves.values())
    axes.set_ylim(bottom=max(lowest * 0.5, 1e-4))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("number of supports k")
    axes.set_ylabel("query mean squared error")
    # Outside the axes: up to nine lines would cover the curves.
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    paths.append(os.path.join(workdir, "error_vs_supports.png"))
    figure.savefig(paths[-1], dpi=120)
  return paths
