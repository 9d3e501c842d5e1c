"""Kernels on features: `k(phi_a, phi_b) -> [..., n, m]`, usable by every solver's predict form.

* `linear_kernel`: `K_ij = <phi_i, phi_j>`; the kernel a linear-attention transformer computes.
* `exponential_kernel`: `K_ij = exp(<U phi_i, U phi_j> / tau)`; the kernel a softmax attention head
  computes before normalisation (Route A of the proposal). It is positive definite (a limit of sums of
  positive multiples of powers of the linear kernel), so KRR and CG apply.

A kernel is any callable `(phi_a [..., n, p], phi_b [..., m, p]) -> [..., n, m]`. `ExponentialKernel`
binds the temperature and projection into a NamedTuple, so it is a pytree: it can be passed as an
ordinary (traced) argument to a jitted function.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks

Kernel = Callable[[jax.Array, jax.Array], jax.Array]
"""A kernel on features: `(phi_a [..., n, p], phi_b [..., m, p]) -> [..., n, m]`."""


def _pair(phi_a: Any, phi_b: Any) -> tuple[jax.Array, jax.Array]:
  dtype = checks.float_dtype(phi_a, phi_b)
  phi_a = checks.as_array("phi_a", phi_a, dtype, min_ndim=2, shape_doc="[..., n, p]")
  phi_b = checks.as_array("phi_b", phi_b, dtype, min_ndim=2, shape_doc="[..., m, p]")
  if phi_a.shape[-1] != phi_b.shape[-1]:
    raise ValueError(
        f"feature dimensions differ: phi_a has shape {phi_a.shape} and phi_b {phi_b.shape}; both "
        "need the same last dimension p.")
  _, (phi_a, phi_b) = checks.broadcast_batch(("phi_a", "phi_b"), (phi_a, phi_b), (2, 2))
  return phi_a, phi_b


def linear_kernel(phi_a: Any, phi_b: Any) -> jax.Array:
  """Gram matrix `K[..., i, j] = <phi_a[..., i, :], phi_b[..., j, :]>`, shape `[..., n, m]`."""
  phi_a, phi_b = _pair(phi_a, phi_b)
  return jnp.einsum("...np,...mp->...nm", phi_a, phi_b, precision=checks.HIGHEST)


def exponential_kernel(phi_a: Any, phi_b: Any, *, temperature: Any,
                       projection: Any = None) -> jax.Array:
  """`K[..., i, j] = exp(<U phi_a_i, U phi_b_j> / temperature)`, shape `[..., n, m]`.

  Args:
    phi_a: features `[..., n, p]`.
    phi_b: features `[..., m, p]`.
    temperature: `tau > 0` (a scalar).
    projection: `U` of shape `[p', p]`, or None for the identity (`p' = p`).
  """
  phi_a, phi_b = _pair(phi_a, phi_b)
  dtype = phi_a.dtype
  if not checks.is_tracer(temperature):
    checks.check_finite("temperature", temperature)
    if not np.all(np.asarray(temperature) > 0):
      raise ValueError(f"temperature must be > 0, got {temperature!r}.")
  temperature = jnp.asarray(temperature, dtype)
  if temperature.ndim != 0:
    raise ValueError(f"temperature must be a scalar, got shape {temperature.shape}.")
  if projection is not None:
    projection = checks.as_array("projection", projection, dtype, min_ndim=2, shape_doc="[p', p]")
    if projection.ndim != 2 or projection.shape[1] != phi_a.shape[-1]:
      raise ValueError(
          f"projection must have shape [p', p] with p = {phi_a.shape[-1]} (the feature dimension), "
          f"got {projection.shape}.")
    phi_a = jnp.einsum("...np,qp->...nq", phi_a, projection, precision=checks.HIGHEST)
    phi_b = jnp.einsum("...np,qp->...nq", phi_b, projection, precision=checks.HIGHEST)
  logits = jnp.einsum("...np,...mp->...nm", phi_a, phi_b, precision=checks.HIGHEST)
  return jnp.exp(logits / temperature)


class ExponentialKernel(NamedTuple):
  """`exponential_kernel` with its parameters bound: `ExponentialKernel(tau, U)(phi_a, phi_b)`."""
  temperature: Any
  projection: Any = None

  def __call__(self, phi_a: Any, phi_b: Any) -> jax.Array:
    return exponential_kernel(phi_a, phi_b, temperature=self.temperature,
                              projection=self.projection)


def check_kernel(kernel: Any) -> Kernel:
  """Returns `kernel` if it is callable; ValueError naming the fix otherwise."""
  if not callable(kernel):
    raise ValueError(
        f"kernel must be a callable (phi_a [..., n, p], phi_b [..., m, p]) -> [..., n, m], such as "
        f"kcg.kernels.linear_kernel or kcg.kernels.ExponentialKernel(temperature=1.0); got {kernel!r}.")
  return kernel
