"""The best linear kernel on a feature space: KRR on `phi A`, with `A [p, r]` fitted to a model.

A linear kernel on standardised coordinates is one arbitrary metric on phi_l; the model may weigh
directions of its residual stream quite differently. `fit_metric` fits `A` so that linear-kernel KRR
on `phi A` (fixed ridge; the scale of A sets the effective ridge) agrees with reference predictions
(the model's) on held-out prompts:

    min_A  mean_{b, j} (KRR(phi_support A, y, phi_query A)_bj - m_bj)^2,   A_0 = I,

by Adam, keeping the A of least error on a validation split of those prompts (early stopping: A has
p r parameters for B q targets). The agreement is then measured on other prompts, so a fitted metric
that only memorised its prompts scores no better than the standardised one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kcg._src import alignment_measures as measures
from kcg._src import checks


class FittedMetric(NamedTuple):
  """`A [p, r]` and its fit.

  Attributes:
    matrix: A.
    initial_error, final_error: mean squared difference to the reference on the validation split,
      at `A_0` and at the kept A.
    steps: Adam steps taken until the kept A.
  """

  matrix: np.ndarray
  initial_error: float
  final_error: float
  steps: int


@functools.partial(jax.jit, static_argnames=("intercept",))
def _loss(a, phi_s, y_s, phi_q, target, ridge, *, intercept):
  pred = measures._krr_core(phi_s @ a, y_s, phi_q @ a, ridge, intercept=intercept)  # pylint: disable=protected-access
  return jnp.mean(jnp.square(pred - target))


@functools.partial(jax.jit, static_argnames=("intercept", "optimizer"))
def _step(a, state, phi_s, y_s, phi_q, target, ridge, *, intercept, optimizer):
  loss, grad = jax.value_and_grad(_loss)(a, phi_s, y_s, phi_q, target, ridge, intercept=intercept)
  # optax's bias correction mixes a Python float with an int32 count: let it promote even under
  # jax_numpy_dtype_promotion="strict".
  with jax.numpy_dtype_promotion("standard"):
    updates, state = optimizer.update(grad, state, a)
    a = optax.apply_updates(a, updates)
  return a, state, loss


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  """One optimizer object per learning rate, so that the jitted step compiles once per shape."""
  return optax.adam(learning_rate)


def fit_metric(phi_support: Any, y_support: Any, phi_query: Any, reference: Any, ridge: float, *,
               intercept: bool = False, num_steps: int = 300, learning_rate: float = 0.01,
               validation_fraction: float = 0.25, eval_every: int = 10) -> FittedMetric:
  """Fits `A` (module docstring) on held-out prompts; `reference [B, q]` are the model's predictions.

  The first `1 - validation_fraction` of the prompts train A, the rest choose when to stop.
  """
  phi_s, y_s, phi_q = measures.check_features(phi_support, y_support, phi_query)
  checks.check_ridge(ridge)
  num_steps = checks.check_num_steps(num_steps)
  target = checks.as_array("reference", reference, phi_s.dtype)
  if target.shape != phi_q.shape[:2]:
    raise ValueError(f"reference must be [B, q] = {phi_q.shape[:2]}, got {target.shape}.")
  b = phi_s.shape[0]
  split = int(round(b * (1 - validation_fraction)))
  if not 1 <= split < b:
    raise ValueError(f"validation_fraction={validation_fraction} leaves no training or no validation "
                     f"prompts out of {b}.")
  ridge = jnp.asarray(ridge, phi_s.dtype)
  train = (phi_s[:split], y_s[:split], phi_q[:split], target[:split])
  val = (phi_s[split:], y_s[split:], phi_q[split:], target[split:])
  optimizer = _adam(float(learning_rate))
  a = jnp.eye(phi_s.shape[-1], dtype=phi_s.dtype)
  with jax.numpy_dtype_promotion("standard"):
    state = optimizer.init(a)
  initial = float(_loss(a, *val, ridge, intercept=intercept))
  best, best_a, best_step = initial, a, 0
  for step in range(1, num_steps + 1):
    a, state, _ = _step(a, state, *train, ridge, intercept=intercept, optimizer=optimizer)
    if step % eval_every == 0 or step == num_steps:
      err = float(_loss(a, *val, ridge, intercept=intercept))
      if np.isfinite(err) and err < best:
        best, best_a, best_step = err, a, step
  return FittedMetric(np.asarray(best_a), initial, best, best_step)


__all__ = ("FittedMetric", "fit_metric")
