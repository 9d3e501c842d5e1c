"""Random KRR problems with an exactly prescribed condition number, and the shared table of test cases.

`krr_problem` builds support features `Phi = U diag(sigma) V^T` (random orthonormal `U [k, k]`,
`V [p, p]`) so that the eigenvalues of `A = Phi Phi^T + ridge I` are `ridge + sigma_i^2` and, when
`p < k`, `ridge` again for the `k - p` directions `Phi` does not reach. The `min(k, p)` values
`lam_i = ridge * kappa^{u_i}` are spread log-uniformly over `[ridge, ridge * kappa]` with the extremes
pinned: `u = 1` for the largest (`sigma^2 = ridge (kappa - 1)`), and `u = 0` (`sigma = 0`) for the
smallest when `p >= k` (when `p < k` the rank deficiency already gives the eigenvalue `ridge`). Hence
`cond(A) = kappa` up to rounding in the construction (relative error ~ eps * kappa).

`TEST_CASES` is one table of small problems that every layer of kcg is tested on (reference solvers,
compiled transformer, learned model), tracr style: `case.problem()` builds the problem.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks

Array = jax.Array


class KRRProblem(NamedTuple):
  """A KRR problem. Batched problems (`batched_krr_problem`) add leading batch dims to the arrays.

  Attributes:
    phi_support: support features `[k, p]`.
    y_support: targets `[k]`.
    phi_query: query features `[q, p]`.
    ridge: the ridge, a scalar array.
  """
  phi_support: Array
  y_support: Array
  phi_query: Array
  ridge: Array


def _problem_dtype(dtype: Any) -> jnp.dtype:
  if dtype is None:
    return jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64))
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as jnp.float32, got {dtype}.")
  return dtype


def _check_problem_args(num_support: Any, feature_dim: Any, num_query: Any, condition_number: Any,
                        ridge: Any) -> tuple[int, int, int]:
  k = checks.check_positive_int("num_support", num_support)
  p = checks.check_positive_int("feature_dim", feature_dim)
  q = checks.check_positive_int("num_query", num_query)
  checks.check_ridge(ridge)
  if not checks.is_tracer(condition_number):
    checks.check_finite("condition_number", condition_number)
    kappa = np.asarray(condition_number)
    if kappa.ndim != 0 or not kappa >= 1:
      raise ValueError(
          f"condition_number must be a scalar >= 1 (it is cond(K + ridge I)), got {condition_number!r}.")
    if k == 1 and kappa != 1:
      raise ValueError(
          f"a problem with num_support=1 has a 1x1 matrix A, whose condition number is 1; got "
          f"condition_number={condition_number!r}. Use num_support >= 2.")
  return k, p, q


def krr_problem(key: Array, *, num_support: int, feature_dim: int, num_query: int = 1,
                condition_number: Any = 10.0, ridge: Any = 0.1, dtype: Any = None) -> KRRProblem:
  """A random KRR problem whose `A = Phi Phi^T + ridge I` has condition number `condition_number`.

  Args:
    key: a PRNG key.
    num_support: `k`, the number of support points (static).
    feature_dim: `p`, the feature dimension (static).
    num_query: `q`, the number of query points (static).
    condition_number: `kappa >= 1` (may be traced, e.g. vmapped over).
    ridge: `> 0` (may be traced).
    dtype: floating dtype of the arrays; None gives the default float (float64 under x64).

  Returns:
    KRRProblem with `phi_support [k, p]` as described in the module docstring, `y_support [k]` and
    `phi_query [q, p]` standard normal, and `ridge` as a scalar array.
  """
  k, p, q = _check_problem_args(num_support, feature_dim, num_query, condition_number, ridge)
  dtype = _problem_dtype(dtype)
  return _krr_problem_core(key, jnp.asarray(condition_number, dtype), jnp.asarray(ridge, dtype),
                           num_support=k, feature_dim=p, num_query=q)


@functools.partial(jax.jit, static_argnames=("num_support", "feature_dim", "num_query"))
def _krr_problem_core(key: Array, kappa: Array, ridge: Array, *, num_support: int, feature_dim: int,
                      num_query: int) -> KRRProblem:
  k, p, q = num_support, feature_dim, num_query
  dtype = kappa.dtype
  rank = min(k, p)
  # One draw for everything: each distinct shape of a threefry draw costs a compilation.
  sizes = (k * k, p * p, rank, k, q * p)
  normals = jnp.split(jax.random.normal(key, (sum(sizes),), dtype), np.cumsum(sizes)[:-1])
  basis_support, _ = jnp.linalg.qr(normals[0].reshape(k, k))
  basis_features, _ = jnp.linalg.qr(normals[1].reshape(p, p))
  exponents = jax.scipy.special.ndtr(normals[2])  # uniform on (0, 1)
  exponents = exponents.at[0].set(1)
  if p >= k and rank >= 2:
    exponents = exponents.at[rank - 1].set(0)
  # sigma^2 = lam - ridge with lam = ridge * kappa^u: exactly ridge (kappa - 1) at u = 1, 0 at u = 0.
  sigma = jnp.sqrt(ridge * jnp.power(kappa, exponents) - ridge)
  phi_support = jnp.einsum("kr,r,pr->kp", basis_support[:, :rank], sigma, basis_features[:, :rank],
                           precision=checks.HIGHEST)
  y_support = normals[3]
  phi_query = normals[4].reshape(q, p)
  return KRRProblem(phi_support, y_support, phi_query, ridge)


@functools.partial(jax.jit, static_argnames=("num_support", "feature_dim", "num_query"))
def _batched_core(keys: Array, kappas: Array, ridge: Array, *, num_support: int, feature_dim: int,
                  num_query: int) -> KRRProblem:
  one = functools.partial(_krr_problem_core, num_support=num_support, feature_dim=feature_dim,
                          num_query=num_query)
  return jax.vmap(one, in_axes=(0, 0, None))(keys, kappas, ridge)


def batched_krr_problem(key: Array, batch: int | tuple[int, ...], *, num_support: int,
                        feature_dim: int, num_query: int = 1, condition_number: Any = 10.0,
                        ridge: Any = 0.1, dtype: Any = None) -> KRRProblem:
  """Independent `krr_problem`s with leading batch dims `batch` (an int or a shape).

  The arrays get shapes `[*batch, k, p]`, `[*batch, k]`, `[*batch, q, p]`; `ridge` stays a scalar
  (shared). `condition_number` may be a scalar or an array of shape `batch` (one per problem).
  """
  batch = (batch,) if isinstance(batch, (int, np.integer)) else tuple(batch)
  for size in batch:
    checks.check_positive_int("batch", size)
  dtype = _problem_dtype(dtype)
  kappa = jnp.asarray(condition_number, dtype)
  if kappa.ndim != 0 and kappa.shape != batch:
    raise ValueError(
        f"condition_number must be a scalar or have shape {batch} (one per problem), got "
        f"{kappa.shape}.")
  if not checks.is_tracer(condition_number):
    checks.check_finite("condition_number", condition_number)
    if not np.all(np.asarray(condition_number) >= 1):
      raise ValueError(f"condition_number must be >= 1, got {condition_number!r}.")
  size = math.prod(batch)
  keys = jax.random.split(key, size)
  kappas = jnp.broadcast_to(kappa, batch).reshape((size,))
  k, p, q = _check_problem_args(num_support, feature_dim, num_query, 1.0, ridge)
  ridge = jnp.asarray(ridge, dtype)
  phi_support, y_support, phi_query, _ = _batched_core(keys, kappas, ridge, num_support=k,
                                                       feature_dim=p, num_query=q)
  unflatten = lambda x: x.reshape(batch + x.shape[1:])
  return KRRProblem(unflatten(phi_support), unflatten(y_support), unflatten(phi_query), ridge)


class KRRCase(NamedTuple):
  """One row of `TEST_CASES`: the arguments of `krr_problem` plus a readable name and a seed."""
  name: str
  num_support: int
  feature_dim: int
  num_query: int
  condition_number: float
  ridge: float
  seed: int

  def problem(self, dtype: Any = None) -> KRRProblem:
    """The case's problem: `krr_problem(jax.random.key(seed), ...)`."""
    return krr_problem(jax.random.key(self.seed), num_support=self.num_support,
                       feature_dim=self.feature_dim, num_query=self.num_query,
                       condition_number=self.condition_number, ridge=self.ridge, dtype=dtype)


def _case(num_support: int, feature_dim: int, num_query: int, condition_number: float, ridge: float,
          seed: int) -> KRRCase:
  name = f"k{num_support}_p{feature_dim}_q{num_query}_kappa{condition_number:g}_ridge{ridge:g}"
  return KRRCase(name, num_support, feature_dim, num_query, condition_number, ridge, seed)


# Small on purpose (every layer runs all of them): k in {4, 16, 64}, p from 2 to 64 on both sides of k
# (rank-deficient Phi when p < k), kappa in {1, 10, 1e2, 1e4}.
TEST_CASES: tuple[KRRCase, ...] = (
    _case(4, 2, 1, 10.0, 0.1, 0),
    _case(4, 4, 3, 1.0, 0.5, 1),
    _case(4, 8, 2, 100.0, 0.1, 2),
    _case(4, 3, 1, 1e4, 0.01, 3),
    _case(16, 2, 4, 10.0, 1.0, 4),
    _case(16, 8, 1, 1e4, 0.1, 5),
    _case(16, 16, 3, 100.0, 0.1, 6),
    _case(16, 32, 2, 10.0, 0.01, 7),
    _case(16, 64, 1, 1.0, 0.1, 8),
    _case(64, 8, 2, 10.0, 0.1, 9),
    _case(64, 32, 1, 1e4, 0.1, 10),
    _case(64, 64, 4, 100.0, 1.0, 11),
    _case(64, 16, 1, 1.0, 0.1, 12),
    _case(64, 48, 2, 1e4, 0.01, 13),
)
