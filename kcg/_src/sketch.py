"""Width below the feature dimension: KRR on a rank-m sketch `psi(x) = S phi(x)` of the features.

When the residual stream cannot carry all `p` features (`m < p` channels), a compiled model writes
`psi(x) = S phi(x)` with `S [m, p]` and runs CG on `psi`. It then computes sketched KRR,

    f_m(x) = psi(x)^T (Psi^T Psi + ridge I)^{-1} Psi^T y = k_m(x)^T (K_m + ridge I)^{-1} y,

with `Psi = Phi S^T`, `K_m = Phi P Phi^T`, `k_m(x) = Phi P phi(x)` and `P = S^T S`, an orthogonal
projector when `S` has orthonormal rows (every projection built here does).

The bound (`sketch_error_bound`). Let `alpha = (K + ridge I)^{-1} y`, `w = Phi^T alpha` (so
`f(x) = phi(x)^T w`) and `E = ||Phi (I - P)||_2`, so that `||K - K_m||_2 = E^2`. Since
`(K + ridge I)^{-1} - (K_m + ridge I)^{-1} = (K_m + ridge I)^{-1} (K_m - K) (K + ridge I)^{-1}`,

    f(x) - f_m(x) = ((I - P) phi(x))^T (I - P) w  -  psi(x)^T Psi^T (K_m + ridge I)^{-1} Phi (I - P) w,

and `||Psi^T (Psi Psi^T + ridge I)^{-1}||_2 = max_s s / (s^2 + ridge) <= 1 / (2 sqrt(ridge))`, so

    |f(x) - f_m(x)| <= ||(I - P) w|| (||(I - P) phi(x)|| + E ||P phi(x)|| / (2 sqrt(ridge)))   (sharp)
                    <= E ||alpha|| (||(I - P) phi(x)|| + E ||P phi(x)|| / (2 sqrt(ridge)))     (bound)

using `||(I - P) w|| = ||(Phi (I - P))^T alpha|| <= E ||alpha||`. Both forms hold with equality when
`k = 1` and the query is `(I - P) phi_1` (then `f_m(x) = 0` and both Cauchy-Schwarz steps are tight).

What `E^2` is, for three kinds of sketch:

* `prompt_projection` (top-m right singular vectors of the prompt's own `Phi`, the best rank-m sketch
  of `K`, not prompt-independent): `E^2 = lambda_{m+1}(K)` exactly (0 when `m >= rank K`).
* `principal_projection` (top-m eigenvectors of a population / pooled second moment with eigenvalues
  `mu_1 >= ... >= mu_p`; prompt-independent, so it can be baked into weights): `E^2 <=
  ||Phi (I - P)||_F^2`, whose expectation over the supports is `k sum_{i>m} mu_i` (`spectral_tail`).
  This is an expected-value estimate, not a bound for every prompt.
* `gaussian_projection` (a random orthonormal `S`): `E` measured per prompt.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks

Array = jax.Array
_HI = checks.HIGHEST


class SketchBound(NamedTuple):
  """`sketch_error_bound`'s result for phi_support `[..., k, p]` and phi_query `[..., q, p]`.

  Attributes:
    bound: `[..., q]`, `E ||alpha|| (||(I-P) phi(x)|| + E ||P phi(x)|| / (2 sqrt(ridge)))`.
    sharp: `[..., q]`, the same with `||(I-P) Phi^T alpha||` in place of `E ||alpha||` (<= bound).
    kernel_distance: `[...]`, the `E^2` used: `||K - K_m||_2 = ||Phi (I-P)||_2^2` unless given.
  """

  bound: Array
  sharp: Array
  kernel_distance: Array


# ----------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------


def _check_rank(rank: Any, dim: int) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, np.integer)) or not (
      1 <= rank <= dim):
    raise ValueError(f"rank must be an int in [1, p={dim}] (the sketch width m; m = p keeps every "
                     f"feature), got {rank!r}.")
  return int(rank)


def _orthonormality_tolerance(dtype: Any, rank: int) -> float:
  # Rows orthonormalised by QR or eigh in `dtype` are orthonormal to ~ rank * eps.
  return 100.0 * max(rank, 1) * float(jnp.finfo(dtype).eps)


def _check_orthonormal_rows(projection: Array) -> None:
  if checks.is_tracer(projection):
    return
  s = np.asarray(projection, np.float64)
  m = s.shape[-2]
  gram = np.einsum("...ip,...jp->...ij", s, s)
  defect = float(np.max(np.abs(gram - np.eye(m)))) if gram.size else 0.0
  if defect > _orthonormality_tolerance(projection.dtype, m):
    raise ValueError(
        f"projection must have orthonormal rows (S S^T = I, so that P = S^T S is a projector) for the "
        f"bound; max |S S^T - I| = {defect:.3g}. Orthonormalise it, e.g. S = jnp.linalg.qr(S.T)[0].T, "
        "or build it with principal_projection / gaussian_projection.")


class _Inputs(NamedTuple):
  phi: Array
  y: Array
  phi_q: Array
  ridge: Array
  projection: Array


def _validate(name: str, phi_support, y_support, phi_query, ridge, projection) -> _Inputs:
  checks.check_ridge(ridge)
  if np.ndim(ridge) != 0:
    raise ValueError(f"{name}: ridge must be a scalar, got shape {np.shape(ridge)}; call once per "
                     "ridge (or vmap).")
  dtype = checks.float_dtype(phi_support, y_support, phi_query, projection)
  phi = checks.as_array("phi_support", phi_support, dtype, min_ndim=2, shape_doc="[..., k, p]")
  y = checks.as_array("y_support", y_support, dtype, min_ndim=1, shape_doc="[..., k]")
  phi_q = checks.as_array("phi_query", phi_query, dtype, min_ndim=2, shape_doc="[..., q, p]")
  s = checks.as_array("projection", projection, dtype, min_ndim=2, shape_doc="[..., m, p]")
  k, p = phi.shape[-2:]
  if y.shape[-1] != k or phi_q.shape[-1] != p or s.shape[-1] != p:
    raise ValueError(
        f"{name} needs phi_support [..., k, p], y_support [..., k], phi_query [..., q, p] and "
        f"projection [..., m, p] with the same k and p; got {phi.shape}, {y.shape}, {phi_q.shape}, "
        f"{s.shape}.")
  if not 1 <= s.shape[-2] <= p:
    raise ValueError(f"{name}: projection must be [m, p] with 1 <= m <= p={p} (a sketch narrows the "
                     f"features), got {s.shape}.")
  _, (phi, y, phi_q, s) = checks.broadcast_batch(
      ("phi_support", "y_support", "phi_query", "projection"), (phi, y, phi_q, s), (2, 1, 2, 2))
  return _Inputs(phi, y, phi_q, jnp.asarray(ridge, dtype), s)


# ----------------------------------------------------------------------------------------------------
# Projections.
# ----------------------------------------------------------------------------------------------------


def principal_projection(rank: int, *, features: Any = None, covariance: Any = None) -> Array:
  """`S [m, p]`: the top-m eigenvectors (as rows, eigenvalues descending) of a second moment.

  Give exactly one of `features [..., N, p]` (every leading axis pooled: the uncentred second moment
  `F^T F / N`, the matrix whose spectrum the linear kernel sees) or `covariance [p, p]` (a population
  second moment, symmetric). The result does not depend on any one prompt, so it can be baked into
  weights; with `mu` the eigenvalues, `E ||Phi (I - P)||_F^2 = k sum_{i>m} mu_i` (`spectral_tail`).
  """
  if (features is None) == (covariance is None):
    raise ValueError("principal_projection needs exactly one of features=[..., N, p] or "
                     "covariance=[p, p].")
  if features is not None:
    dtype = checks.float_dtype(features)
    f = checks.as_array("features", features, dtype, min_ndim=2, shape_doc="[..., N, p]")
    f = f.reshape(-1, f.shape[-1])
    moment = jnp.einsum("np,nq->pq", f, f, precision=_HI) / jnp.asarray(f.shape[0], dtype)
  else:
    dtype = checks.float_dtype(covariance)
    moment = checks.as_array("covariance", covariance, dtype, min_ndim=2, shape_doc="[p, p]")
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
      raise ValueError(f"covariance must be a square [p, p] matrix, got shape {moment.shape}.")
    if not checks.is_tracer(moment):
      c = np.asarray(moment, np.float64)
      scale = max(float(np.max(np.abs(c))), np.finfo(np.float64).tiny)
      if float(np.max(np.abs(c - c.T))) > 1e3 * float(jnp.finfo(dtype).eps) * scale:
        raise ValueError("covariance must be symmetric; pass (C + C.T) / 2 if it is only "
                         "symmetric up to rounding.")
  rank = _check_rank(rank, moment.shape[-1])
  return _principal_core(moment, rank)


@functools.partial(jax.jit, static_argnames="rank")
def _principal_core(moment: Array, rank: int) -> Array:
  moment = (moment + moment.T) / jnp.asarray(2, moment.dtype)
  _, vectors = jnp.linalg.eigh(moment)  # ascending
  return jnp.flip(vectors[:, -rank:], axis=1).T


def gaussian_projection(key: Any, rank: int, dim: int, dtype: Any = None) -> Array:
  """`S [m, p]` with Haar-distributed orthonormal rows (QR of an `[p, m]` Gaussian, signs fixed)."""
  dim = checks.check_positive_int("dim", dim)
  rank = _check_rank(rank, dim)
  dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64) if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
  return _gaussian_core(key, rank, dim, dtype)


@functools.partial(jax.jit, static_argnames=("rank", "dim", "dtype"))
def _gaussian_core(key: Array, rank: int, dim: int, dtype: Any) -> Array:
  q, r = jnp.linalg.qr(jax.random.normal(key, (dim, rank), dtype))
  # Signs of diag(R) fixed positive: Q is then Haar-distributed (Mezzadri 2007).
  signs = jnp.where(jnp.diagonal(r) < 0, jnp.asarray(-1, dtype), jnp.asarray(1, dtype))
  return (q * signs[None, :]).T


def prompt_projection(phi_support: Any, rank: int) -> Array:
  """`S [..., m, p]`: the top-m right singular vectors of each prompt's own `Phi [..., k, p]`.

  The best rank-m sketch of K (Eckart-Young): `||K - K_m||_2 = lambda_{m+1}(K)`. It depends on the
  prompt, so a compiled model cannot bake it into weights; it is the reference's lower envelope.
  """
  dtype = checks.float_dtype(phi_support)
  phi = checks.as_array("phi_support", phi_support, dtype, min_ndim=2, shape_doc="[..., k, p]")
  rank = _check_rank(rank, phi.shape[-1])
  return _prompt_core(phi, rank)


@functools.partial(jax.jit, static_argnames="rank")
def _prompt_core(phi: Array, rank: int) -> Array:
  _, _, vt = jnp.linalg.svd(phi, full_matrices=True)  # [..., p, p]: a basis for any m <= p
  return vt[..., :rank, :]


def spectral_tail(eigenvalues: Any, rank: int, num_support: int) -> float:
  """`k sum_{i>m} mu_i`: the expectation of `||Phi (I - P)||_F^2 >= E^2` when `S` spans the top-m
  eigenvectors of the second moment with eigenvalues `mu [p]` (any order; sorted here).

  An expected-value estimate of `E^2 = ||K - K_m||_2`, not a bound for every prompt.
  """
  mu = np.asarray(eigenvalues, np.float64)
  if mu.ndim != 1 or mu.size == 0 or not np.all(np.isfinite(mu)):
    raise ValueError(f"eigenvalues must be a finite 1-d array [p], got shape {mu.shape}.")
  if np.min(mu) < -1e-12 * max(float(np.max(np.abs(mu))), 1.0):
    raise ValueError("eigenvalues of a second moment must be >= 0; got a negative one "
                     f"({float(np.min(mu))!r}).")
  rank = _check_rank(rank, mu.size)
  k = checks.check_positive_int("num_support", num_support)
  mu = np.sort(np.maximum(mu, 0.0))[::-1]
  return float(k * np.sum(mu[rank:]))


# ----------------------------------------------------------------------------------------------------
# Sketched KRR and the bound.
# ----------------------------------------------------------------------------------------------------


def sketched_krr_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                         projection: Any) -> Array:
  """`f_m(x_query) [..., q]`: KRR on `psi = S phi`, i.e. `k_m(x)^T (K_m + ridge I)^{-1} y`.

  Args:
    phi_support: `[..., k, p]`.
    y_support: `[..., k]`.
    phi_query: `[..., q, p]`.
    ridge: scalar `> 0`.
    projection: `S [..., m, p]`, `1 <= m <= p` (any rows: the formula needs no orthonormality).

  Solved by Cholesky on the `m x m` primal system `Psi^T Psi + ridge I` when `m <= k`, else on the
  `k x k` dual system `Psi Psi^T + ridge I`; independent of the compiler.
  """
  inputs = _validate("sketched_krr_predict", phi_support, y_support, phi_query, ridge, projection)
  return _sketched_core(*inputs)


def _cholesky_solve(a: Array, b: Array) -> Array:
  chol = jnp.linalg.cholesky(a)
  z = jax.scipy.linalg.solve_triangular(chol, b[..., None], lower=True)
  return jax.scipy.linalg.solve_triangular(chol, z, lower=True, trans="T")[..., 0]


def _eye_like(n: int, batch: tuple[int, ...], dtype: Any) -> Array:
  return jnp.broadcast_to(jnp.eye(n, dtype=dtype), batch + (n, n))


@jax.jit
def _sketched_core(phi, y, phi_q, ridge, s):
  psi = jnp.einsum("...kp,...mp->...km", phi, s, precision=_HI)
  psi_q = jnp.einsum("...qp,...mp->...qm", phi_q, s, precision=_HI)
  k, m = psi.shape[-2:]
  batch = psi.shape[:-2]
  if m <= k:  # primal: (Psi^T Psi + ridge I) w = Psi^T y
    gram = jnp.einsum("...km,...kn->...mn", psi, psi, precision=_HI)
    w = _cholesky_solve(gram + ridge * _eye_like(m, batch, psi.dtype),
                        jnp.einsum("...km,...k->...m", psi, y, precision=_HI))
    return jnp.einsum("...qm,...m->...q", psi_q, w, precision=_HI)
  gram = jnp.einsum("...km,...jm->...kj", psi, psi, precision=_HI)
  alpha = _cholesky_solve(gram + ridge * _eye_like(k, batch, psi.dtype), y)
  k_query = jnp.einsum("...qm,...km->...qk", psi_q, psi, precision=_HI)
  return jnp.einsum("...qk,...k->...q", k_query, alpha, precision=_HI)


def sketch_error_bound(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                       projection: Any, *, kernel_distance: Any = None) -> SketchBound:
  """Bounds `|f(x) - f_m(x)|` between full and sketched KRR at every query (module docstring).

  Args:
    phi_support: as in `sketched_krr_predict`.
    y_support: as in `sketched_krr_predict`.
    phi_query: as in `sketched_krr_predict`.
    ridge: as in `sketched_krr_predict`.
    projection: `S [..., m, p]` with orthonormal rows (checked when concrete).
    kernel_distance: optional `E^2` (scalar or `[...]`) to use instead of the prompt's own
      `||Phi (I - P)||_2^2`, e.g. `spectral_tail(mu, m, k)` for an a-priori estimate (which is then
      an estimate, not a bound).

  Returns:
    `SketchBound(bound [..., q], sharp [..., q], kernel_distance [...])`.
  """
  inputs = _validate("sketch_error_bound", phi_support, y_support, phi_query, ridge, projection)
  _check_orthonormal_rows(inputs.projection)
  batch = inputs.phi.shape[:-2]
  if kernel_distance is None:
    given = jnp.full(batch, jnp.nan, inputs.phi.dtype)
  else:
    checks.check_finite("kernel_distance", kernel_distance)
    if not checks.is_tracer(kernel_distance) and np.any(np.asarray(kernel_distance) < 0):
      raise ValueError(f"kernel_distance is E^2 = ||K - K_m||_2 and must be >= 0, got "
                       f"{kernel_distance!r}.")
    given = jnp.asarray(kernel_distance, inputs.phi.dtype)
    try:
      given = jnp.broadcast_to(given, batch)
    except ValueError:
      raise ValueError(f"kernel_distance has shape {given.shape}; it must be a scalar or broadcast "
                       f"to the batch shape {batch}.") from None
  return _bound_core(*inputs, given, kernel_distance is not None)


@functools.partial(jax.jit, static_argnames="use_given")
def _bound_core(phi, y, phi_q, ridge, s, given, use_given):
  k = phi.shape[-2]
  batch = phi.shape[:-2]
  project = lambda v: jnp.einsum("...np,...mp,...mr->...nr", v, s, s, precision=_HI)
  phi_perp = phi - project(phi)  # Phi (I - P)
  q_perp = jnp.linalg.norm(phi_q - project(phi_q), axis=-1)
  q_par = jnp.linalg.norm(jnp.einsum("...qp,...mp->...qm", phi_q, s, precision=_HI), axis=-1)
  if use_given:
    e2 = given
  else:
    e2 = jnp.linalg.norm(phi_perp, ord=2, axis=(-2, -1)) ** 2
  gram = jnp.einsum("...kp,...jp->...kj", phi, phi, precision=_HI)
  alpha = _cholesky_solve(gram + ridge * _eye_like(k, batch, phi.dtype), y)
  alpha_norm = jnp.linalg.norm(alpha, axis=-1)
  w_perp_norm = jnp.linalg.norm(jnp.einsum("...kp,...k->...p", phi_perp, alpha, precision=_HI),
                                axis=-1)
  e = jnp.sqrt(e2)
  per_query = q_perp + (e / (2 * jnp.sqrt(ridge)))[..., None] * q_par
  return SketchBound(bound=(e * alpha_norm)[..., None] * per_query,
                     sharp=w_perp_norm[..., None] * per_query, kernel_distance=e2)


def kernel_distance(phi_support: Any, projection: Any) -> Array:
  """`E^2 = ||K - K_m||_2 = ||Phi (I - P)||_2^2 [...]` for `Phi [..., k, p]`, orthonormal `S [..., m, p]`."""
  dtype = checks.float_dtype(phi_support, projection)
  phi = checks.as_array("phi_support", phi_support, dtype, min_ndim=2, shape_doc="[..., k, p]")
  s = checks.as_array("projection", projection, dtype, min_ndim=2, shape_doc="[..., m, p]")
  if s.shape[-1] != phi.shape[-1]:
    raise ValueError(f"projection [..., m, p] and phi_support [..., k, p] need the same p; got "
                     f"{s.shape} and {phi.shape}.")
  _check_orthonormal_rows(s)
  _, (phi, s) = checks.broadcast_batch(("phi_support", "projection"), (phi, s), (2, 2))
  phi_perp = phi - jnp.einsum("...np,...mp,...mr->...nr", phi, s, s, precision=_HI)
  return jnp.linalg.norm(phi_perp, ord=2, axis=(-2, -1)) ** 2


__all__ = ("SketchBound", "gaussian_projection", "kernel_distance", "principal_projection",
           "prompt_projection", "sketch_error_bound", "sketched_krr_predict", "spectral_tail")
