"""Input validation and shape helpers shared by kcg's numerics.

Every public function validates first and computes second. Value checks (finiteness, signs) run only
on concrete inputs: under `jit`/`vmap` the values are Tracers and cannot be inspected, so those checks
are skipped there; shape checks always run because shapes are static.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def is_tracer(x: Any) -> bool:
  """True when `x` is an abstract value inside a JAX transformation (its values cannot be read)."""
  return isinstance(x, jax.core.Tracer)


def check_finite(name: str, x: Any) -> None:
  """Raises ValueError if a concrete `x` holds NaN or Inf; does nothing for Tracers."""
  if is_tracer(x):
    return
  values = np.asarray(x)
  if values.dtype.kind not in "fc":
    return
  if not np.all(np.isfinite(values)):
    num_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    raise ValueError(
        f"{name} contains {num_bad} NaN or Inf entries; pass finite values (check the data or an "
        "earlier computation that overflowed).")


def check_real(name: str, x: Any) -> None:
  """Raises ValueError if `x` is complex (also for Tracers: the dtype is static)."""
  if np.iscomplexobj(x):
    raise ValueError(f"{name} is complex; kcg solves real kernel ridge regression and would drop "
                     "the imaginary part. Pass real arrays (x.real if the imaginary part is 0).")


def check_ridge(ridge: Any) -> None:
  """Raises ValueError unless a concrete `ridge` is a finite, strictly positive real (every entry).

  Strings, booleans and complex numbers are refused, not converted: the one ridge validator of
  the solvers and the compiler.
  """
  if is_tracer(ridge):
    check_real("ridge", ridge)
    return
  values = np.asarray(ridge)
  if values.dtype.kind not in "iuf" or values.size == 0:
    raise ValueError(f"ridge must be a positive real number (or array of them), got {ridge!r}.")
  if not np.all(np.isfinite(values)) or not np.all(values > 0):
    raise ValueError(
        f"ridge must be finite and > 0 (it makes K + ridge I positive definite), got {ridge!r}; "
        "pass a positive regulariser such as 1e-3.")


def scalar_ridge(ridge: Any) -> float:
  """`ridge` as a Python float, after `check_ridge`; ValueError unless it is one number."""
  check_ridge(ridge)
  values = np.asarray(ridge)
  if values.size != 1:
    raise ValueError(f"ridge must be one positive number here, got an array of shape "
                     f"{values.shape}.")
  return float(values.reshape(()))


def check_symmetric(name: str, a: Any) -> None:
  """Raises ValueError if a concrete `a [..., k, k]` is not symmetric to sqrt(eps) of max |a|.

  Rounding leaves |a - a^T| of order k eps max |a| in a matrix computed as a symmetric one (a sum
  of k products per entry), far below sqrt(eps) for k < 1/sqrt(eps) (6.7e7 in float64, 2900 in
  float32); a difference above that is not rounding, and CG, PCG or Cholesky on it returns a
  wrong answer without any sign of it. Does nothing for Tracers.
  """
  if is_tracer(a):
    return
  values = np.asarray(a)
  if values.dtype.kind not in "f" or values.ndim < 2 or values.shape[-1] != values.shape[-2]:
    return
  scale = np.max(np.abs(values), axis=(-2, -1))
  asymmetry = np.max(np.abs(values - np.swapaxes(values, -1, -2)), axis=(-2, -1))
  tolerance = np.sqrt(np.finfo(values.dtype).eps)
  if np.any(asymmetry > tolerance * scale):
    worst = float(np.max(asymmetry / np.where(scale > 0, scale, 1)))
    raise ValueError(
        f"{name} is not symmetric: max |{name} - {name}^T| is {worst:.1e} of its largest entry "
        f"(rounding stays below {tolerance:.0e}). CG and Cholesky need a symmetric positive "
        f"definite matrix: pass ({name} + {name}^T) / 2 if the asymmetry is an error of yours, or "
        "use a solver for general matrices (e.g. lineax.GMRES).")


def check_num_steps(num_steps: Any) -> int:
  """Returns `num_steps` as a Python int; ValueError unless it is a static integer >= 0."""
  if is_tracer(num_steps):
    raise ValueError(
        "num_steps must be a static Python int (it fixes the length of the returned trace); under "
        "jax.jit mark it static, e.g. jax.jit(f, static_argnames='num_steps').")
  if isinstance(num_steps, bool) or not isinstance(num_steps, (numbers.Integral, np.integer)):
    raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}.")
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}; pass 0 for the initial state only.")
  return int(num_steps)


def check_positive_int(name: str, value: Any) -> int:
  """Returns `value` as a Python int; ValueError unless it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def float_dtype(*xs: Any) -> jnp.dtype:
  """The floating dtype to compute in: the promoted dtype of the array inputs, or the default float.

  Python scalars are weakly typed and do not upcast arrays (a float32 problem with `ridge=0.1` stays
  float32). Integer or boolean inputs give the default float (float64 when x64 is enabled).
  """
  arrays = [x if hasattr(x, "dtype") else np.asarray(x) for x in xs
            if x is not None and not isinstance(x, (numbers.Number, bool))]
  if not arrays:
    return jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64))
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.result_type(*arrays)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64))
  return jnp.dtype(dtype)


def as_array(name: str, x: Any, dtype: Any, *, min_ndim: int = 0, shape_doc: str = "") -> jax.Array:
  """`x` as a JAX array of `dtype`, checked to be finite and to have at least `min_ndim` dims."""
  if x is None:
    raise ValueError(f"{name} is None; pass an array{' of shape ' + shape_doc if shape_doc else ''}.")
  check_real(name, x)
  check_finite(name, x)
  array = jnp.asarray(x, dtype)
  if array.ndim < min_ndim:
    raise ValueError(
        f"{name} must have at least {min_ndim} dimensions"
        f"{' (shape ' + shape_doc + ')' if shape_doc else ''}, got shape {array.shape}.")
  return array


def broadcast_batch(names: Sequence[str], arrays: Sequence[jax.Array],
                    core_ndims: Sequence[int]) -> tuple[tuple[int, ...], list[jax.Array]]:
  """Broadcasts the leading (batch) dims of `arrays` against each other, keeping the core dims.

  `core_ndims[i]` trailing dims of `arrays[i]` are its core dims; the rest broadcast NumPy style.
  Returns the common batch shape and the broadcast arrays. Explicit broadcasting keeps the code valid
  under `jax_numpy_rank_promotion="raise"`.
  """
  batch_shapes = [tuple(a.shape[:a.ndim - c]) for a, c in zip(arrays, core_ndims)]
  try:
    batch = tuple(np.broadcast_shapes(*batch_shapes))
  except ValueError:
    described = ", ".join(f"{n} {s}" for n, s in zip(names, batch_shapes))
    raise ValueError(
        f"batch dimensions do not broadcast: {described}; give every input the same leading batch "
        "dimensions (or size-1 dimensions that broadcast).") from None
  out = [jnp.broadcast_to(a, batch + tuple(a.shape[a.ndim - c:])) for a, c in zip(arrays, core_ndims)]
  return batch, out


def batch_size(batch: Sequence[int]) -> int:
  return int(math.prod(batch))
