"""Feature maps phi that earlier transformer layers compute, as pure functions of explicit parameters.

The theorem kcg tests treats the lower stack of a transformer as a fixed feature map
`phi: R^d -> R^p` and the upper stack as a solver for kernel ridge regression with the linear kernel
`k(x, x') = <phi(x), phi(x')>` on those features. This module provides the feature maps that a lower
stack can realise exactly:

* `identity()`: `phi(x) = x` (the residual stream as is).
* `random_relu(m)`: `phi(x) = relu(W x + b) / sqrt(m)` (one MLP layer with frozen random weights).
* `random_fourier(m, bandwidth)`: `phi(x) = sqrt(2/m) cos(W x + b)`, `W ~ N(0, I / bandwidth^2)`,
  `b ~ U[0, 2 pi)`, so that `E <phi(x), phi(y)> = exp(-|x - y|^2 / (2 bandwidth^2))` (Rahimi & Recht).
* `polynomial2(m)`: `phi(x) = (A x) * (B x)` (elementwise), optionally followed by `x` itself: exactly
  what a gated linear unit computes, a bilinear form evaluated on the diagonal.

Each constructor returns a `FeatureMap`, a NamedTuple of pure functions (optax style):
`params = fm.init(key, input_dim)` then `phi_NxP = fm.apply(params, x_NxD)` with any leading batch axes.
`apply` computes in the dtype of `x` (integer inputs are promoted to the default float dtype) and works
under `jit` and `vmap`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks

Array = jax.Array
Params = Any


class FeatureMap(NamedTuple):
  """A feature map `phi` as a pair of pure functions.

  Attributes:
    name: the registry name (see `get`).
    init: `(key, input_dim) -> params`, a pytree of arrays in the default float dtype.
    apply: `(params, x[..., d]) -> phi[..., output_dim(d)]`, computed in the dtype of `x`.
    output_dim: `input_dim -> p`, the feature dimension.
  """

  name: str
  init: Callable[..., Params]
  apply: Callable[[Params, Any], Array]
  output_dim: Callable[[int], int]


class IdentityParams(NamedTuple):
  """The identity map has no parameters."""


class RandomFeatureParams(NamedTuple):
  """Parameters of `phi(x) = scale * act(W x + b)`.

  Attributes:
    weights_MxD: `W`, shape `[m, d]`.
    bias_M: `b`, shape `[m]`.
  """

  weights_MxD: Array
  bias_M: Array


class Polynomial2Params(NamedTuple):
  """Parameters of the GLU map `phi(x) = (A x) * (B x)`.

  Attributes:
    a_MxD: `A`, shape `[m, d]`.
    b_MxD: `B`, shape `[m, d]`.
  """

  a_MxD: Array
  b_MxD: Array


# ----------------------------------------------------------------------------------------------
# Validation helpers.


def _check_positive_float(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"{name} must be a positive number, got {value!r}.")
  if not (math.isfinite(float(value)) and float(value) > 0.0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
  return float(value)


def _as_float_input(x: Any) -> Array:
  """Returns `x` as a JAX array of a floating dtype (integers -> default float)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.result_type(float))
  return x


def _prepare_input(x: Any, input_dim: int, fm_name: str) -> Array:
  checks.check_finite(f"{fm_name}: x", x)
  x = _as_float_input(x)
  if x.ndim < 1 or x.shape[-1] != input_dim:
    raise ValueError(
        f"{fm_name}: x has shape {x.shape} but the parameters were initialised for input_dim="
        f"{input_dim}; pass x with trailing axis {input_dim} or re-run init with input_dim="
        f"{x.shape[-1] if x.ndim else 'x.shape[-1]'}."
    )
  return x


def _affine(x: Array, weights_MxD: Array, bias_M: Array) -> Array:
  """`W x + b` over any leading axes of `x [..., d]` -> `[..., m]`."""
  pre = jnp.einsum("...d,md->...m", x, weights_MxD, precision=checks.HIGHEST)
  return pre + bias_M.reshape((1,) * (pre.ndim - 1) + bias_M.shape)


def _default_float() -> Any:
  return jnp.result_type(float)


# ----------------------------------------------------------------------------------------------
# Feature maps.


def identity() -> FeatureMap:
  """`phi(x) = x`; `init` returns an empty `IdentityParams()`, `output_dim(d) = d`."""

  def init(key: Any, input_dim: int) -> IdentityParams:
    del key
    checks.check_positive_int("identity: input_dim", input_dim)
    return IdentityParams()

  def apply(params: IdentityParams, x: Any) -> Array:
    del params
    checks.check_finite("identity: x", x)
    x = _as_float_input(x)
    if x.ndim < 1:
      raise ValueError(f"identity: x must have a trailing feature axis, got shape {x.shape}.")
    return x

  return FeatureMap("identity", init, apply, lambda input_dim: input_dim)


def random_relu(num_features: int, weight_scale: float = 1.0, bias_scale: float = 0.0) -> FeatureMap:
  """Random ReLU features `phi(x) = relu(W x + b) / sqrt(m)`.

  `W_ij ~ N(0, weight_scale^2 / d)`, `b_i ~ N(0, bias_scale^2)`. With `bias_scale = 0`,
  `E <phi(x), phi(y)> = (weight_scale^2 / d) |x| |y| (sin t + (pi - t) cos t) / (2 pi)` with `t` the
  angle between `x` and `y` (the degree-1 arc-cosine kernel of Cho & Saul, 2009).

  Args:
    num_features: `m >= 1`.
    weight_scale: `> 0`, standard deviation of `W` times `sqrt(d)`.
    bias_scale: `>= 0`, standard deviation of `b`.
  """
  num_features = checks.check_positive_int("random_relu: num_features", num_features)
  weight_scale = _check_positive_float(weight_scale, "random_relu: weight_scale")
  if not (math.isfinite(float(bias_scale)) and float(bias_scale) >= 0.0):
    raise ValueError(f"random_relu: bias_scale must be finite and >= 0, got {bias_scale!r}.")
  bias_scale = float(bias_scale)

  def init(key: Any, input_dim: int) -> RandomFeatureParams:
    input_dim = checks.check_positive_int("random_relu: input_dim", input_dim)
    key_w, key_b = jax.random.split(key)
    dtype = _default_float()
    weights = jax.random.normal(key_w, (num_features, input_dim), dtype) * (
        weight_scale / math.sqrt(input_dim)
    )
    bias = jax.random.normal(key_b, (num_features,), dtype) * bias_scale
    return RandomFeatureParams(weights, bias)

  def apply(params: RandomFeatureParams, x: Any) -> Array:
    x = _prepare_input(x, params.weights_MxD.shape[1], "random_relu")
    weights = params.weights_MxD.astype(x.dtype)
    bias = params.bias_M.astype(x.dtype)
    pre = _affine(x, weights, bias)
    return jax.nn.relu(pre) * jnp.asarray(1.0 / math.sqrt(weights.shape[0]), x.dtype)

  return FeatureMap("random_relu", init, apply, lambda input_dim: num_features)


def random_fourier(num_features: int, bandwidth: float = 1.0) -> FeatureMap:
  """Random Fourier features `phi(x) = sqrt(2/m) cos(W x + b)` for the Gaussian kernel.

  `W_ij ~ N(0, 1 / bandwidth^2)`, `b_i ~ U[0, 2 pi)`, so that
  `E <phi(x), phi(y)> = exp(-|x - y|^2 / (2 bandwidth^2))` with Monte-Carlo error `O(1/sqrt(m))`.

  Args:
    num_features: `m >= 1`.
    bandwidth: `> 0`, the Gaussian kernel's length scale.
  """
  num_features = checks.check_positive_int("random_fourier: num_features", num_features)
  bandwidth = _check_positive_float(bandwidth, "random_fourier: bandwidth")

  def init(key: Any, input_dim: int) -> RandomFeatureParams:
    input_dim = checks.check_positive_int("random_fourier: input_dim", input_dim)
    key_w, key_b = jax.random.split(key)
    dtype = _default_float()
    weights = jax.random.normal(key_w, (num_features, input_dim), dtype) / bandwidth
    bias = jax.random.uniform(key_b, (num_features,), dtype, 0.0, 2.0 * math.pi)
    return RandomFeatureParams(weights, bias)

  def apply(params: RandomFeatureParams, x: Any) -> Array:
    x = _prepare_input(x, params.weights_MxD.shape[1], "random_fourier")
    weights = params.weights_MxD.astype(x.dtype)
    bias = params.bias_M.astype(x.dtype)
    pre = _affine(x, weights, bias)
    return jnp.cos(pre) * jnp.asarray(math.sqrt(2.0 / weights.shape[0]), x.dtype)

  return FeatureMap("random_fourier", init, apply, lambda input_dim: num_features)


def polynomial2(num_features: int, include_linear: bool = True) -> FeatureMap:
  """Degree-2 features as a GLU computes them: `phi(x) = [(A x) * (B x), x]`.

  `A_ij, B_ij ~ N(0, 1 / (d sqrt(m)))`, so that for the quadratic block
  `E <(A x) * (B x), (A y) * (B y)> = (<x, y> / d)^2`; with `include_linear` the kernel gains `+ <x, y>`.
  The quadratic block is the bilinear form `(A x) * (B y)` evaluated at `y = x`; the scale lives in the
  parameters so that `apply` is exactly the GLU product.

  Args:
    num_features: `m >= 1`, the number of GLU units.
    include_linear: append `x` (a residual connection) after the `m` quadratic features.
  """
  num_features = checks.check_positive_int("polynomial2: num_features", num_features)
  if not isinstance(include_linear, (bool, np.bool_)):
    raise ValueError(f"polynomial2: include_linear must be a bool, got {include_linear!r}.")
  include_linear = bool(include_linear)

  def init(key: Any, input_dim: int) -> Polynomial2Params:
    input_dim = checks.check_positive_int("polynomial2: input_dim", input_dim)
    key_a, key_b = jax.random.split(key)
    dtype = _default_float()
    std = 1.0 / math.sqrt(input_dim * math.sqrt(num_features))
    a = jax.random.normal(key_a, (num_features, input_dim), dtype) * std
    b = jax.random.normal(key_b, (num_features, input_dim), dtype) * std
    return Polynomial2Params(a, b)

  def apply(params: Polynomial2Params, x: Any) -> Array:
    x = _prepare_input(x, params.a_MxD.shape[1], "polynomial2")
    a = params.a_MxD.astype(x.dtype)
    b = params.b_MxD.astype(x.dtype)
    quadratic = (
        jnp.einsum("...d,md->...m", x, a, precision=checks.HIGHEST)
        * jnp.einsum("...d,md->...m", x, b, precision=checks.HIGHEST))
    if include_linear:
      return jnp.concatenate([quadratic, x], axis=-1)
    return quadratic

  def output_dim(input_dim: int) -> int:
    return num_features + (input_dim if include_linear else 0)

  return FeatureMap("polynomial2", init, apply, output_dim)


_REGISTRY: dict[str, Callable[..., FeatureMap]] = {
    "identity": identity,
    "random_relu": random_relu,
    "random_fourier": random_fourier,
    "polynomial2": polynomial2,
}

FEATURE_MAPS = tuple(_REGISTRY)


def get(name: str, **kwargs: Any) -> FeatureMap:
  """The feature map `name` built with `kwargs`, e.g. `get("random_fourier", num_features=256)`.

  Raises:
    ValueError: if `name` is not one of `FEATURE_MAPS`, or the constructor rejects `kwargs`.
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}.")
  try:
    return _REGISTRY[name](**kwargs)
  except TypeError as err:
    raise ValueError(f"Bad arguments for feature map {name!r}: {err}") from err
