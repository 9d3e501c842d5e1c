"""Kernel ridge regression systems: validated inputs, A = K + ridge I, and the closed form.

KRR with kernel `k` on support features `phi_1..phi_k` and targets `y` predicts

    f*(x) = k(x)^T alpha*,   alpha* = A^{-1} y,   A = K + ridge I,   K_ij = k(phi_i, phi_j).

`krr_predict` computes `f*` by Cholesky; the iterative solvers (kcg._src.solvers,
kcg._src.block_cg) build their systems with `validate_krr` and `build_system`. Public functions
validate eagerly (shapes, values), then run one jitted core per function; the kernel travels into
jit as a pytree (`kernel_arg`). Shapes and conventions are those of kcg._src.solvers.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks
from kcg._src import kernels as kernels_lib

Array = jax.Array


class KRRInputs(NamedTuple):
  """Validated KRR inputs, cast to one dtype, batch dims broadcast (internal; shared with `bounds`).

  Attributes:
    phi_support: `[..., k, p]` (or the kernel matrix `K [..., k, k]` in the kernel-matrix form).
    y: `[..., k]` or `[..., k, r]`.
    phi_query: `[..., q, p]` (or `K(query, support) [..., q, k]`), or None.
    ridge: `[...]`.
    multi_output: whether `y` has a trailing output axis.
  """
  phi_support: Array
  y: Array
  phi_query: Array | None
  ridge: Array
  multi_output: bool


class KRRSystem(NamedTuple):
  """`A = K + ridge I` `[..., k, k]`, `K(query, support)` `[..., q, k]` (or None), `y`, `ridge`."""
  A: Array
  k_query_support: Array | None
  y: Array
  ridge: Array
  multi_output: bool


def add_ridge(gram: Array, ridge: Array) -> Array:
  """`gram + ridge I` for `gram [..., n, n]` and `ridge [...]` (same batch shape)."""
  identity = jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype), gram.shape)
  return gram + ridge[..., None, None] * identity


def _y_layout(y: Array, support_ndim: int, k: int, support_name: str) -> bool:
  if y.ndim == support_ndim - 1:
    y_k, multi = y.shape[-1], False
  elif y.ndim == support_ndim:
    y_k, multi = y.shape[-2], True
  else:
    raise ValueError(
        f"y_support must have shape [..., k] or [..., k, r] with the same batch dims as "
        f"{support_name}; got {y.shape} for {support_name} with {support_ndim} dims.")
  if y_k != k:
    raise ValueError(
        f"mismatched number of support points: {support_name} has k = {k} but y_support has "
        f"{y_k} (shape {y.shape}); pass one target per support point.")
  return multi


def validate_krr(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, *,
                 kernel_matrices: bool = False) -> KRRInputs:
  """Checks and broadcasts `(phi_support, y_support, phi_query or None, ridge)`.

  With `kernel_matrices=True` the first and third arguments are `K [..., k, k]` and
  `K(query, support) [..., q, k]` instead of features.
  """
  s_name, q_name = ("K_support", "K_query_support") if kernel_matrices else ("phi_support",
                                                                             "phi_query")
  s_doc, q_doc = ("[..., k, k]", "[..., q, k]") if kernel_matrices else ("[..., k, p]", "[..., q, p]")
  dtype = checks.float_dtype(phi_support, y_support, phi_query)
  support = checks.as_array(s_name, phi_support, dtype, min_ndim=2, shape_doc=s_doc)
  y = checks.as_array("y_support", y_support, dtype, min_ndim=1, shape_doc="[..., k]")
  checks.check_ridge(ridge)
  ridge = jnp.asarray(ridge, dtype)
  k = support.shape[-2]
  if kernel_matrices and support.shape[-1] != k:
    raise ValueError(f"K_support must be square [..., k, k]; got shape {support.shape}.")
  if kernel_matrices:
    checks.check_symmetric("K_support", support)
  multi = _y_layout(y, support.ndim, k, s_name)
  names, arrays, cores = [s_name, "y_support", "ridge"], [support, y, ridge], [2, 1 + multi, 0]
  if phi_query is not None:
    query = checks.as_array(q_name, phi_query, dtype, min_ndim=2, shape_doc=q_doc)
    if query.shape[-1] != support.shape[-1]:
      if kernel_matrices:
        raise ValueError(
            f"K_query_support must have shape [..., q, k] with k = {k} (from K_support); got "
            f"{query.shape}.")
      raise ValueError(
          f"feature dimension mismatch: phi_support {support.shape} has p = {support.shape[-1]} "
          f"but phi_query {query.shape} has p = {query.shape[-1]}; queries and support points "
          "must use the same feature map.")
    names.append(q_name)
    arrays.append(query)
    cores.append(2)
  _, arrays = checks.broadcast_batch(names, arrays, cores)
  return KRRInputs(arrays[0], arrays[1], arrays[3] if phi_query is not None else None, arrays[2],
                   multi)


def kernel_arg(kernel: Any) -> Any:
  """`kernel` in a form `jit` accepts as an argument: pytree kernels as they are (their parameters
  are traced), plain functions wrapped in `jax.tree_util.Partial` (static, compared by identity)."""
  kernel = kernels_lib.check_kernel(kernel)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(kernel)):
    return jax.tree_util.Partial(kernel)
  return kernel


def build_system(kernel: Any, inputs: KRRInputs) -> KRRSystem:
  """`A = kernel(S, S) + ridge I` and `kernel(Q, S)` from validated inputs (traceable)."""
  phi_support, phi_query = inputs.phi_support, inputs.phi_query
  dtype = phi_support.dtype
  batch, k = phi_support.shape[:-2], phi_support.shape[-2]
  k_support = jnp.asarray(kernel(phi_support, phi_support), dtype)
  if k_support.shape != batch + (k, k):
    raise ValueError(
        f"kernel {kernel!r} returned shape {k_support.shape} for K(support, support); a kernel must "
        f"map [..., n, p] x [..., m, p] to [..., n, m] (expected {batch + (k, k)}).")
  k_query_support = None
  if phi_query is not None:
    k_query_support = jnp.asarray(kernel(phi_query, phi_support), dtype)
    expected = batch + (phi_query.shape[-2], k)
    if k_query_support.shape != expected:
      raise ValueError(
          f"kernel {kernel!r} returned shape {k_query_support.shape} for K(query, support); a "
          f"kernel must map [..., n, p] x [..., m, p] to [..., n, m] (expected {expected}).")
  return KRRSystem(add_ridge(k_support, inputs.ridge), k_query_support, inputs.y, inputs.ridge,
                   inputs.multi_output)


def system_from_kernel_matrices(inputs: KRRInputs) -> KRRSystem:
  """`KRRSystem` from validated kernel-matrix inputs (`validate_krr(..., kernel_matrices=True)`)."""
  return KRRSystem(add_ridge(inputs.phi_support, inputs.ridge), inputs.phi_query, inputs.y,
                   inputs.ridge, inputs.multi_output)


def krr_system(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
               kernel: Any = kernels_lib.linear_kernel) -> KRRSystem:
  """Validates the inputs and builds `A = K + ridge I` and `K(query, support)` (eagerly)."""
  return build_system(kernels_lib.check_kernel(kernel),
                      validate_krr(phi_support, y_support, phi_query, ridge))


def broadcast_param(name: str, x: Array, core_ndim: int, batch: tuple[int, ...]) -> Array:
  """Broadcasts a solver parameter to the batch shape of its KRR system, or raises ValueError."""
  core = tuple(x.shape[x.ndim - core_ndim:])
  try:
    return jnp.broadcast_to(x, tuple(batch) + core)
  except ValueError:
    raise ValueError(
        f"{name} has shape {x.shape}, whose batch dims {x.shape[:x.ndim - core_ndim]} do not "
        f"broadcast to the problem's batch shape {tuple(batch)}.") from None


def cholesky_solve(a: Array, y: Array, multi: bool) -> Array:
  """`a^{-1} y` for SPD `a [..., k, k]`, `y [..., k]` (or `[..., k, r]` when `multi`)."""
  y_kxr = y if multi else y[..., None]
  chol = jnp.linalg.cholesky(a)
  z = jax.scipy.linalg.solve_triangular(chol, y_kxr, lower=True)
  alpha = jax.scipy.linalg.solve_triangular(chol, z, lower=True, trans="T")
  return alpha if multi else alpha[..., 0]


def predict_queries(k_query_support: Array, alpha: Array, multi: bool) -> Array:
  """`K(query, support) alpha` for alpha `[..., k]`/`[..., k, r]` -> `[..., q]`/`[..., q, r]`."""
  if multi:
    return jnp.einsum("...qk,...kr->...qr", k_query_support, alpha, precision=checks.HIGHEST)
  return jnp.einsum("...qk,...k->...q", k_query_support, alpha, precision=checks.HIGHEST)


def predict_trace(k_query_support: Array, alpha: Array, multi: bool) -> Array:
  """Predictions at every step: alpha `[..., T+1, k(, r)]` -> `[..., T+1, q(, r)]`."""
  if multi:
    return jnp.einsum("...qk,...tkr->...tqr", k_query_support, alpha, precision=checks.HIGHEST)
  return jnp.einsum("...qk,...tk->...tq", k_query_support, alpha, precision=checks.HIGHEST)


def spectrum_bounds(a: Array) -> tuple[Array, Array]:
  """Exact extreme eigenvalues `(lam_min, lam_max)` of symmetric `a [..., k, k]`, each `[...]`."""
  eigenvalues = jnp.linalg.eigvalsh(a)
  return eigenvalues[..., 0], eigenvalues[..., -1]


def inputs_from(arrays: tuple[Array, ...], multi: bool) -> KRRInputs:
  phi_support, y, phi_query, ridge = arrays
  return KRRInputs(phi_support, y, phi_query, ridge, multi)


@functools.partial(jax.jit, static_argnames=("multi", "kernel_matrices"))
def _krr_core(kernel, phi_support, y, phi_query, ridge, multi, kernel_matrices):
  inputs = inputs_from((phi_support, y, phi_query, ridge), multi)
  system = (system_from_kernel_matrices(inputs) if kernel_matrices
            else build_system(kernel, inputs))
  alpha = cholesky_solve(system.A, system.y, multi)
  if phi_query is None:
    return alpha
  return predict_queries(system.k_query_support, alpha, multi)


def _closed_form(kernel, inputs: KRRInputs, kernel_matrices: bool) -> Array:
  """`_krr_core`, and a ValueError instead of NaN when the Cholesky factorisation fails.

  jnp.linalg.cholesky returns NaN when K + ridge I is not numerically positive definite: the
  ridge is below the rounding of K (~eps ||K||, e.g. 1e-8 against ||K|| ~ 10 in float32). The
  inputs are finite (validated), so a non-finite result is that failure. Under jit nothing can
  be inspected and the NaN is returned.
  """
  out = _krr_core(kernel, *inputs[:4], multi=inputs.multi_output, kernel_matrices=kernel_matrices)
  if not checks.is_tracer(out) and not np.all(np.isfinite(np.asarray(out))):
    dtype = np.dtype(inputs.y.dtype)
    ridge = np.asarray(inputs.ridge)
    raise ValueError(
        f"the Cholesky factorisation of K + ridge I failed in {dtype.name} (ridge "
        f"{float(ridge.min()):.1e}): the matrix is not positive definite to {dtype.name} "
        f"rounding, which is ~{np.finfo(dtype).eps:.0e} times K's largest eigenvalue. Compute in "
        "float64 (pass float64 arrays with jax_enable_x64) or use a larger ridge.")
  return out


def krr_alpha_kernel(k_support: Any, y_support: Any, ridge: Any) -> Array:
  """`alpha* = (K + ridge I)^{-1} y` by Cholesky: `K [..., k, k]`, `y [..., k(, r)]` -> `[..., k(, r)]`.
  """
  inputs = validate_krr(k_support, y_support, None, ridge, kernel_matrices=True)
  return _closed_form(None, inputs, kernel_matrices=True)


def krr_alpha(phi_support: Any, y_support: Any, ridge: Any, *,
              kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Dual KRR coefficients `alpha* = (K + ridge I)^{-1} y` by Cholesky, shape `[..., k(, r)]`."""
  kernel = kernel_arg(kernel)
  inputs = validate_krr(phi_support, y_support, None, ridge)
  return _closed_form(kernel, inputs, kernel_matrices=False)


def krr_predict_kernel(k_support: Any, k_query_support: Any, y_support: Any, ridge: Any) -> Array:
  """KRR prediction from kernel matrices: `K(query, support) (K + ridge I)^{-1} y`.

  Args:
    k_support: `K [..., k, k]`, symmetric positive semidefinite.
    k_query_support: `K(query, support) [..., q, k]`.
    y_support: `[..., k]` or `[..., k, r]`.
    ridge: `> 0`, scalar or `[...]`.

  Returns:
    `[..., q]` or `[..., q, r]`.
  """
  inputs = validate_krr(k_support, y_support, k_query_support, ridge, kernel_matrices=True)
  return _closed_form(None, inputs, kernel_matrices=True)


def krr_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, *,
                kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Closed-form KRR by Cholesky: `f*(x) = k(x)^T (K + ridge I)^{-1} y`.

  Args:
    phi_support: support features `[..., k, p]`.
    y_support: targets `[..., k]`, or `[..., k, r]` for `r` outputs.
    phi_query: query features `[..., q, p]`.
    ridge: `> 0`, scalar or `[...]`.
    kernel: a kernel `(phi_a, phi_b) -> K`, default `linear_kernel` (`K = Phi Phi^T`).

  Returns:
    `f*` at the queries, `[..., q]` or `[..., q, r]`.

  Raises ValueError when `K + ridge I` is not positive definite to the dtype's rounding (the
  Cholesky factor would be NaN: e.g. float32 with a ridge below ~1e-7 ||K||); under jit the NaN
  is returned.
  """
  kernel = kernel_arg(kernel)
  inputs = validate_krr(phi_support, y_support, phi_query, ridge)
  return _closed_form(kernel, inputs, kernel_matrices=False)
