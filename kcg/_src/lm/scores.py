"""Baselines on the LM's prompts: KRR, ridge, GD, kNN and the mean on the raw inputs, and per-class
scores of a regression predictor (KRR on the LM's own features is `kcg.lm.analyse_lm`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from kcg._src import alignment_measures as measures
from kcg._src import baselines


def rbf_kernel(bandwidth: float) -> Callable[[Any, Any], jax.Array]:
  """`k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))` as a kcg kernel `([..., n, p], [..., m, p]) -> [..., n, m]`
  (`kcg.alignment.gaussian_kernel`)."""
  return measures.gaussian_kernel(float(bandwidth))


def regression_baselines(input_dim: int, *, ridge: float = 0.1, num_steps: int = 8,
                         num_neighbors: int = 3) -> dict[str, baselines.Predictor]:
  """KRR (RBF, bandwidth sqrt(d)), ridge, GD (t steps, optimal step), kNN and the mean, on raw inputs."""
  return {
      "krr_rbf": baselines.krr_oracle(ridge, kernel=rbf_kernel(float(np.sqrt(input_dim)))),
      "ridge": baselines.ridge(ridge),
      f"gd_{num_steps}": baselines.gd_steps(num_steps, ridge),
      f"knn_{num_neighbors}": baselines.knn(num_neighbors),
      "mean": baselines.averaging("mean"),
  }


def class_scores(predictor: baselines.Predictor, x_support, c_support, x_query,
                 num_classes: int) -> np.ndarray:
  """Per-class scores `[B, q, C]` of a regression predictor on one-hot labels (argmax = its class)."""
  onehot = np.eye(num_classes)[np.asarray(c_support)]
  return np.stack([np.asarray(predictor(x_support, onehot[..., c], x_query))
                   for c in range(num_classes)], axis=-1)
