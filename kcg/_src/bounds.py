"""A-priori error bounds for the iterative KRR solvers in `kcg.solvers`.

All bounds here rest on one inequality. With `A = K + ridge I`, `alpha* = A^{-1} y` and the error
`e_t = alpha_t - alpha*` of a solver started at `alpha_0 = 0` (so `||e_0||_A = ||alpha*||_A`),

    |f_t(x) - f*(x)| = |k(x)^T e_t| = |<A^{-1} k(x), e_t>_A| <= sqrt(k(x)^T A^{-1} k(x)) ||e_t||_A

by Cauchy-Schwarz in the A-inner product, and each solver contracts `||e_t||_A`:

* CG:        `||e_t||_A <= 2 ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^t ||e_0||_A`, `kappa = cond(A)`.
* Chebyshev: `||e_t||_A <= ||e_0||_A / T_t((hi + lo)/(hi - lo)) = 2 rho^t/(1 + rho^{2t}) ||e_0||_A`,
  `rho = cg_rate(hi/lo)`, valid when the spectrum of A lies in `[lo, hi]`.
* GD with step `eta`: `||e_t||_A <= max_{lam in [lo, hi]} |1 - eta lam|^t ||e_0||_A`, which is
  `((kappa - 1)/(kappa + 1))^t` for the optimal step `eta = 2/(lo + hi)`.

The bounds are computed in the dtype of the inputs with the exact spectrum of A from `eigvalsh`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks
from kcg._src import kernels as kernels_lib
from kcg._src import solvers

Array = jax.Array


def cg_rate(kappa: Any) -> Array:
  """The CG contraction factor `(sqrt(kappa) - 1)/(sqrt(kappa) + 1)` per step."""
  kappa = jnp.asarray(kappa, checks.float_dtype(kappa))
  root = jnp.sqrt(kappa)
  return (root - 1) / (root + 1)


def gd_rate(kappa: Any) -> Array:
  """The contraction factor `(kappa - 1)/(kappa + 1)` of GD with the optimal fixed step."""
  kappa = jnp.asarray(kappa, checks.float_dtype(kappa))
  return (kappa - 1) / (kappa + 1)


def chebyshev_factor(kappa: Any, num_steps: Any) -> Array:
  """Chebyshev's factor `1 / T_t((kappa + 1)/(kappa - 1)) = 2 rho^t / (1 + rho^{2t})`.

  `rho = cg_rate(kappa)` and `t = num_steps` (a Python int, or traced inside `jit`).
  """
  if not checks.is_tracer(num_steps):
    num_steps = checks.check_num_steps(num_steps)
  rho_t = jnp.power(cg_rate(kappa), num_steps)
  return 2 * rho_t / (1 + jnp.square(rho_t))


@functools.partial(jax.jit, static_argnames=("kernel_matrices",))
def _condition_number_core(kernel, support, ridge, kernel_matrices):
  y = jnp.zeros(support.shape[:-1], support.dtype)
  inputs = solvers.KRRInputs(support, y, None, ridge, False)
  system = (solvers.system_from_kernel_matrices(inputs) if kernel_matrices
            else solvers.build_system(kernel, inputs))
  lo, hi = solvers.spectrum_bounds(system.A)
  return hi / lo


def condition_number_kernel(k_support: Any, ridge: Any) -> Array:
  """`cond(K + ridge I) = lam_max / lam_min` (by `eigvalsh`) for `K [..., k, k]`; shape `[...]`."""
  dtype = checks.float_dtype(k_support)
  k_support = checks.as_array("K_support", k_support, dtype, min_ndim=2, shape_doc="[..., k, k]")
  inputs = solvers.validate_krr(k_support, np.zeros(k_support.shape[:-1], dtype), None, ridge,
                                kernel_matrices=True)
  return _condition_number_core(None, inputs.phi_support, inputs.ridge, kernel_matrices=True)


def condition_number(phi_support: Any, ridge: Any, *,
                     kernel: Any = kernels_lib.linear_kernel) -> Array:
  """`cond(K + ridge I)`, `K = kernel(phi_support, phi_support)`, `phi_support [..., k, p]`; `[...]`."""
  kernel = solvers.kernel_arg(kernel)
  dtype = checks.float_dtype(phi_support)
  phi_support = checks.as_array("phi_support", phi_support, dtype, min_ndim=2,
                                shape_doc="[..., k, p]")
  inputs = solvers.validate_krr(phi_support, np.zeros(phi_support.shape[:-1], dtype), None, ridge)
  return _condition_number_core(kernel, inputs.phi_support, inputs.ridge, kernel_matrices=False)


def _error_scales(system: solvers.KRRSystem) -> tuple[Array, Array]:
  """`sqrt(k(x)^T A^{-1} k(x))` `[..., q]` and `||alpha*||_A = sqrt(y^T A^{-1} y)` `[...(, r)]`."""
  chol = jnp.linalg.cholesky(system.A)
  # ||L^{-1} v||^2 = v^T A^{-1} v for A = L L^T.
  whitened_queries = jax.scipy.linalg.solve_triangular(
      chol, jnp.swapaxes(system.k_query_support, -1, -2), lower=True)
  query_scale = jnp.sqrt(jnp.sum(jnp.square(whitened_queries), axis=-2))
  y_kxr = system.y if system.multi_output else system.y[..., None]
  whitened_y = jax.scipy.linalg.solve_triangular(chol, y_kxr, lower=True)
  alpha_norm = jnp.sqrt(jnp.sum(jnp.square(whitened_y), axis=-2))
  return query_scale, (alpha_norm if system.multi_output else alpha_norm[..., 0])


def _combine(system: solvers.KRRSystem, factor: Array) -> Array:
  """`sqrt(k^T A^{-1} k) * factor * ||alpha*||_A` with `factor [...]` -> `[..., q(, r)]`."""
  query_scale, alpha_norm = _error_scales(system)
  if system.multi_output:
    return query_scale[..., :, None] * (factor[..., None] * alpha_norm)[..., None, :]
  return query_scale * (factor * alpha_norm)[..., None]


# num_steps is traced (only an exponent here), so one compilation serves every t.
@functools.partial(jax.jit, static_argnames=("solver", "multi", "kernel_matrices"))
def _bound_core(kernel, support, y, query, ridge, eig_bounds, step_size, solver, multi,
                kernel_matrices, num_steps):
  inputs = solvers.KRRInputs(support, y, query, ridge, multi)
  system = (solvers.system_from_kernel_matrices(inputs) if kernel_matrices
            else solvers.build_system(kernel, inputs))
  lo, hi = solvers.spectrum_bounds(system.A) if eig_bounds is None else eig_bounds
  if solver == "cg":
    factor = 2 * jnp.power(cg_rate(hi / lo), num_steps)
  elif solver == "chebyshev":
    factor = chebyshev_factor(hi / lo, num_steps)
  elif step_size is None:
    factor = jnp.power(gd_rate(hi / lo), num_steps)
  else:
    factor = jnp.power(jnp.maximum(jnp.abs(1 - step_size * lo), jnp.abs(1 - step_size * hi)),
                       num_steps)
  return _combine(system, factor)


def _bound(solver: str, support: Any, y_support: Any, query: Any, ridge: Any, num_steps: int,
           kernel: Any, eig_bounds: Any = None, step_size: Any = None,
           kernel_matrices: bool = False) -> Array:
  num_steps = checks.check_num_steps(num_steps)
  kernel = None if kernel_matrices else solvers.kernel_arg(kernel)
  inputs = solvers.validate_krr(support, y_support, query, ridge, kernel_matrices=kernel_matrices)
  if query is None:
    raise ValueError("the bound is pointwise at the queries: pass query features (or K_query_support).")
  dtype, batch = inputs.y.dtype, inputs.ridge.shape
  if eig_bounds is not None:
    lo, hi = solvers._check_eig_bounds(eig_bounds, dtype)  # pylint: disable=protected-access
    eig_bounds = (solvers.broadcast_param("eig_bounds[0]", lo, 0, batch),
                  solvers.broadcast_param("eig_bounds[1]", hi, 0, batch))
  if step_size is not None:
    step_size = checks.as_array("step_size", step_size, dtype)
    step_size = solvers.broadcast_param("step_size", step_size, 0, batch)
  return _bound_core(kernel, *inputs[:4], eig_bounds, step_size, solver=solver,
                     multi=inputs.multi_output, kernel_matrices=kernel_matrices,
                     num_steps=jnp.asarray(num_steps, dtype))


def cg_error_bound_kernel(k_support: Any, k_query_support: Any, y_support: Any, ridge: Any,
                          num_steps: int) -> Array:
  """`cg_error_bound` from kernel matrices `K [..., k, k]` and `K(query, support) [..., q, k]`."""
  return _bound("cg", k_support, y_support, k_query_support, ridge, num_steps, None,
                kernel_matrices=True)


def cg_error_bound(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, num_steps: int,
                   *, kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Bound on `|f_t(x) - f*(x)|` after `t = num_steps` CG steps, at every query; `[..., q(, r)]`.

  `sqrt(k(x)^T A^{-1} k(x)) * 2 ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^t * ||alpha*||_A` with
  `A = K + ridge I`, `kappa = cond(A)`. Arguments as in `kcg.solvers.krr_predict`.
  """
  return _bound("cg", phi_support, y_support, phi_query, ridge, num_steps, kernel)


def chebyshev_error_bound(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                          num_steps: int, eig_bounds: Any = None, *,
                          kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Bound on `|f_t - f*|` after `t` Chebyshev steps with bounds `(lo, hi)`; `[..., q(, r)]`.

  `sqrt(k^T A^{-1} k) * 2 rho^t/(1 + rho^{2t}) * ||alpha*||_A`, `rho = cg_rate(hi/lo)`. Holds when the
  spectrum of `A` lies in `[lo, hi]`; None uses the exact extreme eigenvalues.
  """
  return _bound("chebyshev", phi_support, y_support, phi_query, ridge, num_steps, kernel,
                eig_bounds=eig_bounds)


def gd_error_bound(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                   num_steps: int, eig_bounds: Any = None, step_size: Any = None, *,
                   kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Bound on `|f_t - f*|` after `t` fixed-step GD steps; `[..., q(, r)]`.

  `sqrt(k^T A^{-1} k) * max(|1 - eta lo|, |1 - eta hi|)^t * ||alpha*||_A`; with the default step
  `eta = 2/(lo + hi)` the factor is `((kappa - 1)/(kappa + 1))^t`, `kappa = hi/lo`. `eig_bounds`
  default to the exact extreme eigenvalues of `A`.
  """
  return _bound("gd", phi_support, y_support, phi_query, ridge, num_steps, kernel,
                eig_bounds=eig_bounds, step_size=step_size)
