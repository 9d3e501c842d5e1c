"""Baselines on the LM's prompts and interim agreement scores of KRR on the LM's features.

`krr_on_layers` is what the report shows per layer until the alignment instruments (`kcg.alignment`)
land: closed-form KRR with a linear kernel on standardised `phi_l` (`kcg.solvers.krr_predict`), the
ridge chosen on one half of the prompts, agreement with the LM's predictions scored on the other half
(`kcg.evaluation.r2_with_ci`, `prediction_similarity`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import baselines
from kcg._src import evaluation
from kcg._src import solvers
from kcg._src.lm import icl

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def rbf_kernel(bandwidth: float) -> Callable[[Any, Any], jax.Array]:
  """`k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))` as a kcg kernel `([..., n, p], [..., m, p]) -> [..., n, m]`."""
  if not np.isfinite(bandwidth) or bandwidth <= 0:
    raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}.")

  def kernel(a, b):
    sq = (jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :]
          - 2 * jnp.einsum("...np,...mp->...nm", a, b))
    return jnp.exp(-jnp.maximum(sq, 0) / (2 * bandwidth ** 2))

  return kernel


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


@dataclasses.dataclass(frozen=True)
class LayerAgreement:
  """KRR on one layer's features against the LM's predictions (scored on held-out prompts).

  Attributes:
    layer: 0 = embeddings, l = after block l.
    ridge: chosen on the other half of the prompts (relative to the feature dimension p: the
      system is `K + ridge * p I` on standardised features).
    r2, r2_lower, r2_upper: mean per-prompt R^2 of KRR as a description of the LM, with a 95%
      bootstrap interval over prompts.
    pooled_r2, relative_distance: `kcg.evaluation.prediction_similarity(krr, lm)`.
  """
  layer: int
  ridge: float
  r2: float
  r2_lower: float
  r2_upper: float
  pooled_r2: float
  relative_distance: float


def _standardise(phi_support: np.ndarray, phi_query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  pooled = np.concatenate([phi_support.reshape(-1, phi_support.shape[-1]),
                           phi_query.reshape(-1, phi_query.shape[-1])])
  mean, std = pooled.mean(0), pooled.std(0)
  std = np.where(std > 1e-12 * max(1.0, float(np.abs(pooled).max())), std, 1.0)
  return (phi_support - mean) / std, (phi_query - mean) / std


def krr_on_layers(features: icl.LMFeatures, key: Any, *, ridges=RIDGES,
                  num_bootstrap: int = 1000) -> list[LayerAgreement]:
  """Per layer: KRR (linear kernel) on standardised `phi_l` with the support labels the LM saw,
  against the LM's predictions. Needs `B >= 4` prompts (halves for choosing the ridge and scoring)
  and `q >= 2` queries per prompt (per-prompt R^2)."""
  b, q = features.predictions.shape
  if b < 4 or q < 2:
    raise ValueError(f"krr_on_layers needs at least 4 prompts and 2 queries each, got B={b}, q={q}.")
  choose, score = np.arange(b) < b // 2, np.arange(b) >= b // 2
  y = features.y_support.astype(np.float64)
  lm = features.predictions.astype(np.float64)
  out = []
  for layer in range(features.num_layers):
    phi_s, phi_q = _standardise(*(a.astype(np.float64) for a in features.layer(layer)))
    p = phi_s.shape[-1]

    def fit(rows, ridge):
      return np.asarray(solvers.krr_predict(phi_s[rows], y[rows], phi_q[rows], ridge * p))

    errors = [float(np.mean((fit(choose, r) - lm[choose]) ** 2)) for r in ridges]
    ridge = float(ridges[int(np.argmin(errors))])
    pred = fit(score, ridge)
    ci = evaluation.r2_with_ci(pred, lm[score], key, num_bootstrap=num_bootstrap)
    sim = evaluation.prediction_similarity(pred, lm[score])
    out.append(LayerAgreement(layer, ridge, float(ci.r2), float(ci.lower), float(ci.upper),
                              float(sim.r2), float(sim.relative_distance)))
  return out
