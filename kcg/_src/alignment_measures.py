"""How well KRR on a feature space explains a model: the array instruments of `kcg.alignment`.

Everything here takes arrays (features `phi_support [B, k, p]`, `phi_query [B, q, p]`, labels
`y_support [B, k]`, predictions `[B, q]`) or a predictor `f(x_support, y_support, x_query) -> [B, q]`,
so it applies to any model (a compiled or trained `kcg.Transformer`, a language model's hidden states).

* `krr_predict`: linear-kernel KRR `f(x) = phi(x)^T Phi^T (Phi Phi^T + ridge I)^{-1} y`; with
  `intercept=True` features and labels are first centred on the supports' means (an unpenalised
  constant), and the labels' mean is added back. Linear in `y` either way.
* `select_ridge`: the (ridge, intercept) whose predictions are closest (mean squared difference) to
  reference predictions, on held-out prompts.
* `agreement`: pooled `R^2 = 1 - sum (a - m)^2 / sum (m - mean m)^2` of candidate predictions `a` as a
  description of the model's `m`, with a bootstrap interval over prompts, and the relative distance
  `|a - m| / |m|`.
* `kernel_alignment`: centred kernel alignment `<HKH, HLH>_F / (|HKH|_F |HLH|_F)` per prompt,
  `H = I - 11^T / n` (Cortes et al. 2012).
* `smoother_weights`: `W[b, j, i] = d f(x_query_bj) / d y_support_bi` (forward mode, k passes);
  `krr_smoother_weights`: KRR's `k_phi(x_q)^T (K_phi + ridge I)^{-1}` (the same with the intercept).
* `y_nonlinearity`: `|f(a y_a + b y_b) - a f(y_a) - b f(y_b) - (1 - a - b) f(0)| / (a |f(y_a) - f(0)|
  + b |f(y_b) - f(0)|)` (norms over every prompt and query; see its docstring for why f(0) enters).
* `shuffled_pairs`: the control of every score: pair prompt b's values with another prompt's.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks
from kcg._src import solvers

Array = jax.Array


# ----------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------


def check_features(phi_support: Any, y_support: Any, phi_query: Any) -> tuple[Array, Array, Array]:
  """`phi_support [B, k, p]`, `y_support [B, k]`, `phi_query [B, q, p]` as finite arrays of one dtype."""
  dtype = checks.float_dtype(phi_support, y_support, phi_query)
  phi_support = checks.as_array("phi_support", phi_support, dtype, shape_doc="[B, k, p]")
  y_support = checks.as_array("y_support", y_support, dtype, shape_doc="[B, k]")
  phi_query = checks.as_array("phi_query", phi_query, dtype, shape_doc="[B, q, p]")
  if (phi_support.ndim != 3 or phi_query.ndim != 3 or y_support.shape != phi_support.shape[:2]
      or phi_query.shape[0] != phi_support.shape[0] or phi_query.shape[2] != phi_support.shape[2]):
    raise ValueError(f"features must be phi_support [B, k, p], y_support [B, k], phi_query [B, q, p] "
                     f"with one B and p; got {phi_support.shape}, {y_support.shape}, "
                     f"{phi_query.shape}.")
  return phi_support, y_support, phi_query


def _check_pair(name_a: str, a: Any, name_b: str, b: Any) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"{name_a} and {name_b} must both be [B, q]; got {a.shape} and {b.shape}.")
  checks.check_finite(name_a, a)
  checks.check_finite(name_b, b)
  return a, b


# ----------------------------------------------------------------------------------------------------
# KRR on features.
# ----------------------------------------------------------------------------------------------------


def centre(phi_support: Array, y_support: Array, phi_query: Array):
  """Features and labels centred on the supports' means, and the label mean `[B, 1]` to add back."""
  mean_phi = jnp.mean(phi_support, axis=1, keepdims=True)
  mean_y = jnp.mean(y_support, axis=1, keepdims=True)
  return phi_support - mean_phi, y_support - mean_y, phi_query - mean_phi, mean_y


@functools.partial(jax.jit, static_argnames=("intercept",))
def _krr_core(phi_support, y_support, phi_query, ridge, *, intercept):
  offset = jnp.zeros(phi_query.shape[:2], phi_query.dtype)
  if intercept:
    phi_support, y_support, phi_query, mean_y = centre(phi_support, y_support, phi_query)
    offset = jnp.broadcast_to(mean_y, offset.shape)
  gram = jnp.einsum("bkp,bjp->bkj", phi_support, phi_support, precision=checks.HIGHEST)
  cross = jnp.einsum("bqp,bkp->bqk", phi_query, phi_support, precision=checks.HIGHEST)
  ridge_b = jnp.broadcast_to(ridge, phi_support.shape[:1])
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)[None]
  alpha = solvers.cholesky_solve(gram + ridge_b[:, None, None] * eye, y_support, False)
  return offset + jnp.einsum("bqk,bk->bq", cross, alpha, precision=checks.HIGHEST)


def krr_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, *,
                intercept: bool = False) -> Array:
  """Linear-kernel KRR `phi(x_q)^T Phi^T (Phi Phi^T + ridge I)^{-1} y`, `[B, q]` (module docstring)."""
  phi_support, y_support, phi_query = check_features(phi_support, y_support, phi_query)
  checks.check_ridge(ridge)
  return _krr_core(phi_support, y_support, phi_query, jnp.asarray(ridge, phi_support.dtype),
                   intercept=bool(intercept))


def kernel_krr_predict(kernel: Callable, x_support: Any, y_support: Any, x_query: Any, ridge: Any, *,
                       intercept: bool = False) -> Array:
  """KRR with any kernel `(a [B, n, d], b [B, m, d]) -> [B, n, m]`; `intercept` centres the labels only
  (the kernel is not centred), `[B, q]`."""
  x_support, y_support, x_query = check_features(x_support, y_support, x_query)
  checks.check_ridge(ridge)
  mean_y = jnp.mean(y_support, axis=1, keepdims=True) if intercept else jnp.zeros_like(
      y_support[:, :1])
  gram = jnp.asarray(kernel(x_support, x_support), x_support.dtype)
  cross = jnp.asarray(kernel(x_query, x_support), x_support.dtype)
  return mean_y + solvers.krr_predict_kernel(gram, cross, y_support - mean_y, ridge)


def relative_ridges(phi_support: Any, relative: Sequence[float]) -> np.ndarray:
  """Ridges `relative * mean_b tr(K_b) / k`: a grid on the scale of the kernel's diagonal."""
  phi = np.asarray(phi_support, np.float64)
  scale = float(np.mean(np.sum(phi * phi, axis=-1)))
  relative = np.asarray(relative, np.float64)
  if relative.ndim != 1 or relative.size == 0 or not np.all(relative > 0):
    raise ValueError(f"relative ridges must be a non-empty list of positive numbers, got {relative}.")
  return relative * max(scale, np.finfo(np.float64).tiny)


class RidgeChoice(NamedTuple):
  """The (ridge, intercept) of least mean squared difference to the reference on held-out prompts.

  Attributes:
    ridge, intercept: the choice.
    ridges: the grid `[n]`.
    squared_difference: `[2, n]`, rows intercept False / True (NaN where not tried).
  """

  ridge: float
  intercept: bool
  ridges: np.ndarray
  squared_difference: np.ndarray


def select_ridge(predict: Callable[[float, bool], Any], reference: Any, ridges: Sequence[float], *,
                 intercepts: Sequence[bool] = (False, True)) -> RidgeChoice:
  """Grid search: `predict(ridge, intercept) -> [B, q]` on held-out prompts against `reference [B, q]`.

  Non-finite predictions (a diverging candidate) count as infinitely far.
  """
  reference = np.asarray(reference, np.float64)
  ridges = np.asarray(ridges, np.float64)
  if ridges.ndim != 1 or ridges.size == 0:
    raise ValueError("select_ridge needs a non-empty 1-d grid of ridges.")
  checks.check_ridge(ridges)
  grid = np.full((2, ridges.size), np.nan)
  for intercept in intercepts:
    for i, ridge in enumerate(ridges):
      pred = np.asarray(predict(float(ridge), bool(intercept)), np.float64)
      if pred.shape != reference.shape:
        raise ValueError(f"predictions {pred.shape} and reference {reference.shape} differ in shape.")
      grid[int(intercept), i] = np.mean(np.square(pred - reference)) if np.all(
          np.isfinite(pred)) else np.inf
  row, col = np.unravel_index(np.nanargmin(grid), grid.shape)
  return RidgeChoice(float(ridges[col]), bool(row), ridges, grid)


# ----------------------------------------------------------------------------------------------------
# Agreement.
# ----------------------------------------------------------------------------------------------------


class Agreement(NamedTuple):
  """Candidate predictions `a` as a description of the model's predictions `m`, both `[B, q]`.

  Attributes:
    r2: pooled `1 - sum (a - m)^2 / sum (m - mean m)^2`.
    r2_lower, r2_upper: percentile-bootstrap interval (prompts resampled).
    relative_distance: `|a - m|_F / |m|_F`.
    squared_difference: `mean (a - m)^2`.
  """

  r2: float
  r2_lower: float
  r2_upper: float
  relative_distance: float
  squared_difference: float


def agreement(candidate: Any, model: Any, key: Any = None, *, num_bootstrap: int = 200,
              confidence: float = 0.95) -> Agreement:
  """`Agreement` of `candidate` with `model` predictions (see the class); `key` seeds the bootstrap."""
  a, m = _check_pair("candidate", candidate, "model", model)
  num_bootstrap = checks.check_positive_int("num_bootstrap", num_bootstrap)
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
  sse_b = np.sum(np.square(a - m), axis=1)
  s1_b, s2_b = np.sum(m, axis=1), np.sum(m * m, axis=1)
  q = m.shape[1]

  def r2(index):
    n = index.shape[-1] * q
    sst = np.sum(s2_b[index], -1) - np.square(np.sum(s1_b[index], -1)) / n
    sse = np.sum(sse_b[index], -1)
    return np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), np.where(sse > 0, -np.inf, 1.0))

  b = m.shape[0]
  rng = np.random.default_rng(_seed(key))
  boot = r2(rng.integers(0, b, size=(num_bootstrap, b)))
  tail = (1 - confidence) / 2
  lower, upper = np.quantile(boot, [tail, 1 - tail])
  norm_m = math.sqrt(float(np.sum(m * m)))
  diff = math.sqrt(float(np.sum(sse_b)))
  relative = diff / norm_m if norm_m > 0 else (0.0 if diff == 0 else math.inf)
  return Agreement(float(r2(np.arange(b))), float(lower), float(upper), relative,
                   float(np.mean(sse_b) / q))


def _seed(key: Any) -> list[int]:
  if key is None:
    return [0]
  data = jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype,
                                                     jax.dtypes.prng_key) else key
  return np.asarray(data).ravel().tolist()


def shuffled_pairs(num_prompts: int, key: Any = None) -> np.ndarray:
  """A derangement of `range(num_prompts)`: index `b` -> another prompt (the shuffled control)."""
  num_prompts = checks.check_positive_int("num_prompts", num_prompts)
  if num_prompts < 2:
    raise ValueError("the shuffled control needs at least 2 prompts.")
  order = np.random.default_rng(_seed(key) + [7]).permutation(num_prompts)
  out = np.empty(num_prompts, np.int64)
  out[order] = np.roll(order, -1)
  return out


# ----------------------------------------------------------------------------------------------------
# Kernel alignment.
# ----------------------------------------------------------------------------------------------------


def linear_gram(phi: Any) -> np.ndarray:
  """`phi [B, n, p] -> phi phi^T [B, n, n]`."""
  phi = np.asarray(phi, np.float64)
  if phi.ndim != 3:
    raise ValueError(f"features must be [B, n, p], got {phi.shape}.")
  return np.einsum("bnp,bmp->bnm", phi, phi)


def kernel_alignment(gram_a: Any, gram_b: Any) -> np.ndarray:
  """Centred kernel alignment per prompt, `[B]`: `<HAH, HBH>_F / (|HAH|_F |HBH|_F)` (0 if either is 0)."""
  a, b = np.asarray(gram_a, np.float64), np.asarray(gram_b, np.float64)
  if a.shape != b.shape or a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise ValueError(f"Gram matrices must both be [B, n, n]; got {a.shape} and {b.shape}.")
  checks.check_finite("gram_a", a)
  checks.check_finite("gram_b", b)

  def centred(g):
    g = g - g.mean(axis=1, keepdims=True)
    return g - g.mean(axis=2, keepdims=True)

  ca, cb = centred(a), centred(b)
  num = np.sum(ca * cb, axis=(1, 2))
  den = np.sqrt(np.sum(ca * ca, axis=(1, 2)) * np.sum(cb * cb, axis=(1, 2)))
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def gaussian_kernel(bandwidth: float) -> Callable[[Any, Any], Array]:
  """`k(x, x') = exp(-|x - x'|^2 / (2 bandwidth^2))` on `[B, n, d] x [B, m, d]`."""
  if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
    raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}.")

  def kernel(a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    sq = (jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :]
          - 2 * jnp.einsum("...np,...mp->...nm", a, b, precision=checks.HIGHEST))
    return jnp.exp(-jnp.maximum(sq, 0) / (2 * bandwidth**2))

  return kernel


def arccos_kernel(scale: float = 1.0) -> Callable[[Any, Any], Array]:
  """Degree-1 arc-cosine kernel `scale |x| |x'| (sin t + (pi - t) cos t) / pi` (t: the angle), the
  covariance of `sqrt(2/h) sum_j a_j relu(u_j . x)` with `u_j ~ N(0, I scale)`, `a_j ~ N(0, 1)` as
  `h -> inf` (Cho & Saul 2009)."""

  def kernel(a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    na, nb = jnp.linalg.norm(a, axis=-1)[..., :, None], jnp.linalg.norm(b, axis=-1)[..., None, :]
    dot = jnp.einsum("...np,...mp->...nm", a, b, precision=checks.HIGHEST)
    norms = na * nb
    cos = jnp.clip(dot / jnp.where(norms > 0, norms, 1), -1, 1)
    theta = jnp.arccos(cos)
    return scale * norms * (jnp.sin(theta) + (jnp.pi - theta) * cos) / jnp.pi

  return kernel


# ----------------------------------------------------------------------------------------------------
# Smoother weights.
# ----------------------------------------------------------------------------------------------------


def smoother_weights(predict: Callable, x_support: Any, y_support: Any, x_query: Any) -> np.ndarray:
  """`W[b, j, i] = d f(x_query_bj) / d y_support_bi`, `[B, q, k]`, by one forward-mode pass per support
  (prompts are independent, so tangent `e_i` moves label i of every prompt at once)."""
  y_support = jnp.asarray(y_support)
  if y_support.ndim != 2:
    raise ValueError(f"y_support must be [B, k], got {y_support.shape}.")
  k = y_support.shape[1]
  columns = []
  for i in range(k):
    tangent = jnp.zeros_like(y_support).at[:, i].set(1)
    _, column = jax.jvp(lambda y: jnp.asarray(predict(x_support, y, x_query)), (y_support,),
                        (tangent,))
    columns.append(np.asarray(column))
  return np.stack(columns, axis=-1)


def krr_smoother_weights(phi_support: Any, phi_query: Any, ridge: Any, *,
                         intercept: bool = False) -> np.ndarray:
  """KRR's weights on the support labels, `k_phi(x_q)^T (K_phi + ridge I)^{-1}`, `[B, q, k]` (with
  `intercept`, those of the centred predictor; `krr_predict` is linear in y, so these are its values on
  the unit label vectors)."""
  phi_support = jnp.asarray(phi_support)
  b, k, _ = phi_support.shape
  eye = jnp.broadcast_to(jnp.eye(k, dtype=phi_support.dtype)[:, None], (k, b, k))
  cols = jax.vmap(lambda e: krr_predict(phi_support, e, phi_query, ridge, intercept=intercept))(eye)
  return np.moveaxis(np.asarray(cols), 0, -1)


def weight_cosine(weights_a: Any, weights_b: Any) -> np.ndarray:
  """Cosine per query of two weight vectors over the supports, `[B, q, k] x 2 -> [B, q]`."""
  a, b = np.asarray(weights_a, np.float64), np.asarray(weights_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"weights differ in shape: {a.shape} and {b.shape}.")
  num = np.sum(a * b, -1)
  den = np.sqrt(np.sum(a * a, -1) * np.sum(b * b, -1))
  return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


# ----------------------------------------------------------------------------------------------------
# The y-linearity signature.
# ----------------------------------------------------------------------------------------------------


class Nonlinearity(NamedTuple):
  """The y-nonlinearity index (see `y_nonlinearity`).

  Attributes:
    index: pooled over every prompt and query.
    per_prompt: the same ratio per prompt, `[B]`.
  """

  index: float
  per_prompt: np.ndarray


def y_nonlinearity(predict: Callable, x_support: Any, y_a: Any, y_b: Any, x_query: Any, *,
                   weights: tuple[float, float] = (1 / math.sqrt(2), 1 / math.sqrt(2))) -> Nonlinearity:
  """How far a predictor is from affine in the support labels, on labels `y_a`, `y_b` of one inputs.

      N = |f(a y_a + b y_b) - a f(y_a) - b f(y_b) - (1 - a - b) f(0)| / (a |f(y_a) - f(0)| + b |f(y_b) - f(0)|)

  with `(a, b) = weights` and `f(y) = predict(x_support, y, x_query)`. N = 0 for every predictor affine
  in y (KRR, GD with a fixed or x-dependent step, Chebyshev, any fixed polynomial in K, plus any offset
  c(x) such as a readout bias); CG and PCG, whose steps are ratios of quadratics in y, give N > 0. The
  f(0) term is what makes an offset count as linear: without it `f(y_a + y_b) - f(y_a) - f(y_b) = -c`.
  The default `a = b = 1/sqrt(2)` keeps `a y_a + b y_b` at the labels' variance, so for Gaussian-process
  tasks it is an in-distribution label vector.
  """
  a, b = (float(w) for w in weights)
  if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
    raise ValueError(f"weights must be two positive numbers, got {weights!r}.")
  y_a, y_b = np.asarray(y_a), np.asarray(y_b)
  if y_a.shape != y_b.shape:
    raise ValueError(f"y_a and y_b must have one shape, got {y_a.shape} and {y_b.shape}.")
  f = lambda y: np.asarray(predict(x_support, jnp.asarray(y), x_query), np.float64)
  f0, fa, fb, fab = f(np.zeros_like(y_a)), f(y_a), f(y_b), f(a * y_a + b * y_b)
  residual = fab - a * fa - b * fb - (1 - a - b) * f0
  scale_a = np.sqrt(np.sum(np.square(fa - f0), axis=1))
  scale_b = np.sqrt(np.sum(np.square(fb - f0), axis=1))
  per_b = np.sqrt(np.sum(np.square(residual), axis=1)) / np.maximum(a * scale_a + b * scale_b, 1e-300)
  den = a * np.sqrt(np.sum(np.square(fa - f0))) + b * np.sqrt(np.sum(np.square(fb - f0)))
  index = float(np.sqrt(np.sum(np.square(residual))) / den) if den > 0 else 0.0
  return Nonlinearity(index, per_b)


__all__ = ("Agreement", "Nonlinearity", "RidgeChoice", "agreement", "arccos_kernel", "centre",
           "check_features", "gaussian_kernel", "kernel_alignment", "kernel_krr_predict",
           "krr_predict", "krr_smoother_weights", "linear_gram", "relative_ridges", "select_ridge",
           "shuffled_pairs", "smoother_weights", "weight_cosine", "y_nonlinearity")
