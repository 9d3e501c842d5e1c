"""The task ladder: batches of in-context regression prompts sampled from an explicit PRNG key.

A prompt is `k` support pairs `(x_i, y_i)` and `q` query pairs whose targets the model must predict.
`sample(key, config)` returns a `Prompts` NamedTuple of arrays with a leading batch axis `B`; every prompt
draws its own task (weight vector, network, GP sample...) and its own inputs. Sampling is jit-compiled
with all sizes static (`TaskConfig` is hashable) and deterministic given the key.

Inputs. `x ~ N(0, Sigma)`, `Sigma = R diag(lambda) R^T` with `lambda` log-spaced from 1 down to
`1 / condition_number` and rescaled to mean 1 (so `tr Sigma = d` and `E|x|^2 = d` at every condition
number). `R` is a Haar-random rotation drawn per prompt (`input_rotation="per_prompt"`), one rotation fixed
by `covariance_seed` and shared by every prompt of every call (`"fixed"`: a fixed data distribution that a
trained model can learn to precondition), or the identity (`"none"`: axis-aligned, where diagonal scalings
of the features help).

Targets. Task parameters are scaled so that `Var f(x) ~= 1` for `x ~ N(0, Sigma)` (`tr Sigma = d`); for
the GLMs it is the linear predictor `w^T x` that has unit variance:

| family | noiseless target `f(x)` | observation `y` |
|---|---|---|
| `linear` | `w^T x`, `w ~ N(0, I/d)` | `f + noise_std * eps` (default `noise_std = 0`) |
| `linear_anisotropic` | as `linear`; needs `condition_number > 1` (default 100) | as `linear` |
| `noisy_linear` | as `linear`; needs `noise_std > 0` (default 0.5) | `f + noise_std * eps` |
| `sparse_linear` | `w^T x`, `sparsity` non-zeros `~ N(0, 1/s)` (support shared by outputs) | as `linear` |
| `logistic` | `sigmoid(glm_scale * w^T x)` | `glm_targets="sample"`: label in {0, 1}; `"mean"`: `f` |
| `poisson` | `exp(glm_scale * w^T x)` | `"sample"`: Poisson count (as float); `"mean"`: `f` |
| `heteroskedastic` | `w^T x` | `f + noise_std * abs(v^T x) * eps`, `v` a random unit vector |
| `mixture_linear` | `w_c^T x`, `c` uniform over `num_components` (see `mixture_mode`) | as `linear` |
| `relu_network` | `sqrt(2/h) sum_j a_j relu(u_j^T x)`, `u_j ~ N(0, I/d)`, `a_j ~ N(0, 1)` [1] | as `linear` |
| `kernel_prior` | `w^T phi_rf(x)`, `w ~ N(0, I)`: a GP sample, random Fourier features | as `linear` |
| `relu_features` | `w^T phi(x)`, `w ~ N(0, 2 I_h)`, `phi` one fixed random-ReLU layer [2] | as `linear` |

`mixture_mode="per_point"`: each prompt draws `num_components` weight vectors and every point (support
and query) picks its component independently. `"per_prompt"`: `num_components` weight vectors are drawn
once per `sample` call and shared by the batch; each prompt uses one of them for all its points (a finite
set of tasks).

Multi-output targets (`num_outputs = r > 1`, arrays `[..., r]`) are drawn with independent weights per
output for every family except `logistic` and `poisson`, whose link is scalar (a ValueError says so).
With `num_outputs = 1` the trailing axis is dropped (`y [B, k]`).

Distribution shifts (`shift=`, after Garg et al. 2022), for testing out of distribution:
`"orthant"` (supports share one random orthant, queries do not), `"orthogonal_query"` (each query is
projected onto the orthogonal complement of the span of its supports and rescaled to its original norm;
needs `num_support < input_dim`), `"subspace"` (supports and queries lie in one random
`shift_subspace_dim`-dimensional subspace, rescaled by `sqrt(d / s)` to keep `E|x|^2`), `"skewed_covariance"`
(spectrum `lambda_i ~ 1/i^2` instead of the log-spaced one), `"scaled_inputs"` (all `x` times
`shift_scale`, targets computed on the scaled inputs), `"scaled_outputs"` (`y` and `f` times `shift_scale`)
and `"added_noise"` (`y += shift_noise_std * eps`). `with_shift(config, kind)` sets them. Under the same
key a shifted config makes every draw of its unshifted version (same inputs before the shift, same tasks),
so comparisons isolate the shift.

[1] Garg, Tsipras, Liang, Valiant (2022), What can transformers learn in-context?
[2] `phi(x) = relu(W x + b) / sqrt(h)` with `(W, b) = relu_feature_params(d, h, feature_seed)`
(`kcg.features.random_relu(h)`: `W ~ N(0, I/d)`, `b = 0`), one layer shared by every prompt of every
call: the feature layer `kcg.compile_cg(features="random_relu")` compiles. This is `relu_network` with
its hidden layer fixed, so KRR on `phi` at ridge `noise_std^2 / RELU_FEATURES_WEIGHT_VARIANCE` is the
Bayes posterior mean. `E|phi(x)|^2 = 1/2` (`E relu(z)^2 = 1/2` for `z = W_i x ~ N(0, 1)`), so
`Var f = 2 E|phi|^2 = 1`. `W` is drawn for the prompts' `d`: a curriculum stage with fewer dimensions
draws its own layer.

`Prompts` also carries the noiseless targets `f_support`, `f_query` (the conditional mean `E[y | x, task]`;
for `mixture_linear`, given the point's component) for measuring excess risk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import features as features_lib

Array = jax.Array

FAMILIES = (
    "linear",
    "linear_anisotropic",
    "sparse_linear",
    "noisy_linear",
    "logistic",
    "poisson",
    "heteroskedastic",
    "mixture_linear",
    "relu_network",
    "kernel_prior",
    "relu_features",
)
SHIFTS = (
    "none",
    "orthant",
    "orthogonal_query",
    "subspace",
    "skewed_covariance",
    "scaled_inputs",
    "scaled_outputs",
    "added_noise",
)
INPUT_ROTATIONS = ("per_prompt", "fixed", "none")
GLM_TARGETS = ("sample", "mean")
MIXTURE_MODES = ("per_point", "per_prompt")

_SCALAR_OUTPUT_FAMILIES = ("logistic", "poisson")
_GLM_FAMILIES = ("logistic", "poisson")
_NEEDS_NOISE = ("noisy_linear", "heteroskedastic")
_DEFAULT_NOISE_STD = {"noisy_linear": 0.5, "heteroskedastic": 0.5}
_DEFAULT_CONDITION_NUMBER = {"linear_anisotropic": 100.0}
# Prior variance of the output weights of `relu_features` (w ~ N(0, 2 I)), so that Var f = 1.
RELU_FEATURES_WEIGHT_VARIANCE = 2.0


class Prompts(NamedTuple):
  """A batch of in-context prompts.

  Attributes:
    x_support: `[B, k, d]` support inputs.
    y_support: `[B, k]`, or `[B, k, r]` when `num_outputs = r > 1`: observed support targets.
    x_query: `[B, q, d]` query inputs.
    y_query: `[B, q]` or `[B, q, r]`: observed query targets (what a model is scored against).
    f_support: like `y_support`: noiseless targets `E[y | x, task]` at the supports.
    f_query: like `y_query`: noiseless targets at the queries.
  """

  x_support: Array
  y_support: Array
  x_query: Array
  y_query: Array
  f_support: Array
  f_query: Array


# ----------------------------------------------------------------------------------------------
# Configuration.


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"TaskConfig.{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _check_float(value: Any, name: str, minimum: float, strict: bool) -> float:
  ok_type = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if ok_type and math.isfinite(float(value)):
    if float(value) > minimum or (not strict and float(value) == minimum):
      return float(value)
  relation = ">" if strict else ">="
  raise ValueError(f"TaskConfig.{name} must be a finite number {relation} {minimum}, got {value!r}.")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"Unknown TaskConfig.{name} {value!r}; choose one of {', '.join(choices)}.")
  return value


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """A task family and its sizes; hashable, so it is a static argument of the jitted sampler.

  Fields left at `None` are resolved at construction to the family's default (see the module
  docstring); invalid values raise ValueError. `dataclasses.replace` keeps resolved values, so switching
  `family` to `noisy_linear` or `linear_anisotropic` needs `noise_std` / `condition_number` as well.

  Attributes:
    family: one of `FAMILIES`.
    input_dim: `d >= 1`.
    num_support: `k >= 1` support pairs per prompt.
    num_query: `q >= 1` query pairs per prompt.
    batch_size: `B >= 1` prompts.
    num_outputs: `r >= 1`; `1` drops the trailing output axis.
    noise_std: additive Gaussian noise std (for `heteroskedastic`: the scale of `|v^T x|`); `>= 0`,
      must be 0 for the GLMs (their noise is the link's).
    condition_number: `>= 1`, `lambda_max / lambda_min` of the input covariance.
    input_rotation: one of `INPUT_ROTATIONS`: the eigenbasis of the input covariance.
    covariance_seed: the seed of the `"fixed"` rotation.
    sparsity: non-zero weights of `sparse_linear`, `1 <= s <= d` (default `min(3, d)`).
    glm_targets: `"sample"` (labels/counts) or `"mean"` (the link mean) for the GLMs.
    glm_scale: `> 0`, the GLMs' inverse temperature on `w^T x`.
    num_components: mixture components `>= 1`.
    mixture_mode: one of `MIXTURE_MODES`.
    hidden_units: width `h` of the `relu_network` target and of the `relu_features` feature layer.
    feature_seed: the seed of `relu_features`' fixed feature layer (`relu_feature_params`).
    kernel_num_features: random Fourier features of the `kernel_prior` target.
    kernel_bandwidth: its Gaussian kernel's length scale (default `sqrt(d)`, so a typical pair of inputs
      has kernel value about `exp(-1)`).
    shift: one of `SHIFTS`.
    shift_scale: `> 0`, the factor of `"scaled_inputs"` and `"scaled_outputs"`.
    shift_noise_std: `>= 0`, the noise std of `"added_noise"`.
    shift_subspace_dim: dimension of the `"subspace"` shift, `1 <= s <= d` (default `max(1, d // 2)`).
  """

  family: str = "linear"
  input_dim: int = 8
  num_support: int = 32
  num_query: int = 8
  batch_size: int = 16
  num_outputs: int = 1
  noise_std: float | None = None
  condition_number: float | None = None
  input_rotation: str = "per_prompt"
  covariance_seed: int = 0
  sparsity: int | None = None
  glm_targets: str = "sample"
  glm_scale: float = 1.0
  num_components: int = 2
  mixture_mode: str = "per_point"
  hidden_units: int = 100
  feature_seed: int = 0
  kernel_num_features: int = 256
  kernel_bandwidth: float | None = None
  shift: str = "none"
  shift_scale: float = 2.0
  shift_noise_std: float = 0.5
  shift_subspace_dim: int | None = None

  def __post_init__(self):
    def put(name, value):
      object.__setattr__(self, name, value)

    family = _check_choice(self.family, "family", FAMILIES)
    d = _check_int(self.input_dim, "input_dim", 1)
    put("input_dim", d)
    put("num_support", _check_int(self.num_support, "num_support", 1))
    put("num_query", _check_int(self.num_query, "num_query", 1))
    put("batch_size", _check_int(self.batch_size, "batch_size", 1))
    put("num_outputs", _check_int(self.num_outputs, "num_outputs", 1))

    noise_std = _DEFAULT_NOISE_STD.get(family, 0.0) if self.noise_std is None else self.noise_std
    put("noise_std", _check_float(noise_std, "noise_std", 0.0, strict=False))
    cond = (
        _DEFAULT_CONDITION_NUMBER.get(family, 1.0)
        if self.condition_number is None
        else self.condition_number
    )
    put("condition_number", _check_float(cond, "condition_number", 1.0, strict=False))
    _check_choice(self.input_rotation, "input_rotation", INPUT_ROTATIONS)
    put("covariance_seed", _check_int(self.covariance_seed, "covariance_seed", 0))

    sparsity = min(3, d) if self.sparsity is None else self.sparsity
    put("sparsity", _check_int(sparsity, "sparsity", 1))
    _check_choice(self.glm_targets, "glm_targets", GLM_TARGETS)
    put("glm_scale", _check_float(self.glm_scale, "glm_scale", 0.0, strict=True))
    put("num_components", _check_int(self.num_components, "num_components", 1))
    _check_choice(self.mixture_mode, "mixture_mode", MIXTURE_MODES)
    put("hidden_units", _check_int(self.hidden_units, "hidden_units", 1))
    put("feature_seed", _check_int(self.feature_seed, "feature_seed", 0))
    put("kernel_num_features", _check_int(self.kernel_num_features, "kernel_num_features", 1))
    bandwidth = math.sqrt(d) if self.kernel_bandwidth is None else self.kernel_bandwidth
    put("kernel_bandwidth", _check_float(bandwidth, "kernel_bandwidth", 0.0, strict=True))

    shift = _check_choice(self.shift, "shift", SHIFTS)
    put("shift_scale", _check_float(self.shift_scale, "shift_scale", 0.0, strict=True))
    put("shift_noise_std", _check_float(self.shift_noise_std, "shift_noise_std", 0.0, strict=False))
    subspace_dim = max(1, d // 2) if self.shift_subspace_dim is None else self.shift_subspace_dim
    put("shift_subspace_dim", _check_int(subspace_dim, "shift_subspace_dim", 1))

    # Checks that relate fields.
    if self.condition_number > 1.0 and d == 1:
      raise ValueError(
          "TaskConfig.condition_number > 1 needs input_dim >= 2 (a 1-d covariance is well conditioned)."
      )
    if family == "linear_anisotropic" and self.condition_number <= 1.0:
      raise ValueError(
          "family 'linear_anisotropic' needs condition_number > 1 (e.g. 100); "
          "use 'linear' for isotropic inputs."
      )
    if family in _NEEDS_NOISE and self.noise_std <= 0.0:
      raise ValueError(f"family {family!r} needs noise_std > 0 (e.g. 0.5).")
    if family in _GLM_FAMILIES and self.noise_std != 0.0:
      raise ValueError(
          f"family {family!r} takes its noise from the link; set noise_std=0 (use glm_targets='sample')."
      )
    if family in _SCALAR_OUTPUT_FAMILIES and self.num_outputs > 1:
      raise ValueError(
          f"family {family!r} has a scalar link and supports num_outputs=1 only, got {self.num_outputs}."
      )
    if self.sparsity > d:
      raise ValueError(f"TaskConfig.sparsity={self.sparsity} exceeds input_dim={d}; use sparsity <= {d}.")
    if self.shift_subspace_dim > d:
      raise ValueError(
          f"TaskConfig.shift_subspace_dim={self.shift_subspace_dim} exceeds input_dim={d}; use <= {d}."
      )
    if shift == "orthogonal_query" and self.num_support >= d:
      raise ValueError(
          f"shift 'orthogonal_query' needs num_support < input_dim (got {self.num_support} >= {d}): "
          "k supports in general position span R^d when k >= d, leaving no orthogonal direction."
      )
    if shift == "skewed_covariance" and self.condition_number != 1.0:
      raise ValueError(
          "shift 'skewed_covariance' replaces the input spectrum; set condition_number=1 "
          "(or use shift='none' with condition_number > 1)."
      )


def with_shift(config: TaskConfig, kind: str, **knobs: Any) -> TaskConfig:
  """Returns `config` with distribution shift `kind` (one of `SHIFTS`) and optional shift knobs.

  E.g. `with_shift(cfg, "scaled_inputs", shift_scale=3.0)`. Raises ValueError for an unknown kind or knob.
  """
  _check_choice(kind, "shift", SHIFTS)
  allowed = ("shift_scale", "shift_noise_std", "shift_subspace_dim", "condition_number")
  for name in knobs:
    if name not in allowed:
      raise ValueError(f"with_shift: unknown knob {name!r}; choose from {', '.join(allowed)}.")
  return dataclasses.replace(config, shift=kind, **knobs)


# ----------------------------------------------------------------------------------------------
# Sampling.


def input_covariance_eigenvalues(config: TaskConfig) -> np.ndarray:
  """The eigenvalues `lambda [d]` of the input covariance, descending, with mean 1.

  Log-spaced from 1 to `1 / condition_number` (or `~ 1/i^2` under the `"skewed_covariance"` shift),
  then rescaled so that `tr Sigma = d`.
  """
  d = config.input_dim
  if config.shift == "skewed_covariance":
    eig = 1.0 / np.arange(1, d + 1, dtype=np.float64) ** 2
  else:
    eig = np.logspace(0.0, -math.log10(config.condition_number), num=d, dtype=np.float64)
  return eig * (d / eig.sum())


def _matmul(a: Array, b: Array) -> Array:
  # Full precision: on GPU a default float32 matmul rounds through TF32 (~1e-3), which would make
  # "noiseless" targets differ from x^T w by more than float32 rounding.
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _orthonormalise(gaussian_DxC: Array) -> Array:
  """Orthonormal columns spanning the range of a Gaussian matrix (QR with the sign fix).

  For a square Gaussian input the result is Haar-distributed; for `[d, c]` it spans a uniformly random
  `c`-dimensional subspace.
  """
  q, r = jnp.linalg.qr(gaussian_DxC)
  return q * jnp.sign(jnp.diagonal(r))[None, :]


# Every PRNG call inlines its own copy of the threefry hash into the XLA program, and compilation
# dominates the cost of a fresh config; so each prompt draws all its Gaussians in one call and all its
# uniforms in another, then slices them by name.
def _normal_shapes(config: TaskConfig) -> dict[str, tuple[int, ...]]:
  """Names and shapes of the standard normals one prompt consumes."""
  d, r = config.input_dim, config.num_outputs
  n = config.num_support + config.num_query
  shapes = {"z": (n, d), "eps": (n, r)}
  if config.input_rotation == "per_prompt":
    shapes["rotation"] = (d, d)
  family = config.family
  if family == "mixture_linear":
    if config.mixture_mode == "per_point":
      shapes["weights"] = (config.num_components, d, r)
  elif family == "relu_network":
    shapes["hidden_weights"] = (config.hidden_units, d)
    shapes["out_weights"] = (config.hidden_units, r)
  elif family == "relu_features":
    shapes["out_weights"] = (config.hidden_units, r)
  elif family == "kernel_prior":
    shapes["rf_weights"] = (config.kernel_num_features, d)
    shapes["gp_weights"] = (config.kernel_num_features, r)
  else:
    shapes["weights"] = (d, r)
  if family == "heteroskedastic":
    shapes["direction"] = (d,)
  # Shift draws come last, so a shifted config shares every other draw with the unshifted one.
  if config.shift == "subspace":
    shapes["subspace"] = (d, config.shift_subspace_dim)
  if config.shift == "added_noise":
    shapes["shift_noise"] = (n, r)
  return shapes


def _uniform_shapes(config: TaskConfig) -> dict[str, tuple[int, ...]]:
  """Names and shapes of the U[0, 1) draws one prompt consumes."""
  n = config.num_support + config.num_query
  shapes = {}
  family = config.family
  if family == "sparse_linear":
    shapes["support"] = (config.input_dim,)
  elif family == "logistic":
    shapes["labels"] = (n, 1)
  elif family == "mixture_linear":
    shapes["component"] = (n,) if config.mixture_mode == "per_point" else ()
  elif family == "kernel_prior":
    shapes["rf_phases"] = (config.kernel_num_features,)
  if config.shift == "orthant":
    shapes["orthant"] = (config.input_dim,)
  return shapes


def _draw(sampler: Any, key: Array, shapes: dict[str, tuple[int, ...]], dtype: Any) -> dict[str, Array]:
  """One call of `sampler(key, (total,), dtype)`, cut into arrays of the named `shapes`."""
  sizes = [math.prod(shape) for shape in shapes.values()]
  if not sizes:
    return {}
  flat = sampler(key, (sum(sizes),), dtype)
  offsets = np.cumsum([0] + sizes)
  return {
      name: flat[start:stop].reshape(shape)
      for (name, shape), start, stop in zip(shapes.items(), offsets[:-1], offsets[1:])
  }


class _Shared(NamedTuple):
  """Randomness shared by every prompt of a batch (`None` when drawn per prompt)."""

  rotation_DxD: Array | None
  mixture_weights_MxDxR: Array | None
  relu_features: features_lib.RandomFeatureParams | None


def relu_feature_params(input_dim: int, num_features: int,
                        seed: int) -> features_lib.RandomFeatureParams:
  """`(W [h, d], b [h])` of the `relu_features` family: `kcg.features.random_relu(h).init(key(seed), d)`.

  Pass the same to `kcg.compile_cg(features="random_relu", feature_params=...)` to compile the model
  whose first layer is this family's `phi`.
  """
  return features_lib.random_relu(num_features).init(jax.random.key(seed), input_dim)


def _sample_shared(key: Array, config: TaskConfig, dtype: Any) -> _Shared:
  d, r = config.input_dim, config.num_outputs
  rotation = None
  if config.input_rotation == "fixed":
    fixed_key = jax.random.key(config.covariance_seed)
    rotation = _orthonormalise(jax.random.normal(fixed_key, (d, d), dtype))
  elif config.input_rotation == "none":
    rotation = jnp.eye(d, dtype=dtype)
  mixture = None
  if config.family == "mixture_linear" and config.mixture_mode == "per_prompt":
    mixture = jax.random.normal(key, (config.num_components, d, r), dtype) * jnp.asarray(
        1.0 / math.sqrt(d), dtype
    )
  relu = None
  if config.family == "relu_features":
    relu = relu_feature_params(d, config.hidden_units, config.feature_seed)
  return _Shared(rotation, mixture, relu)


def _sample_inputs(
    config: TaskConfig, shared: _Shared, normals: dict[str, Array], uniforms: dict[str, Array]
) -> tuple[Array, Array]:
  """Support and query inputs `[k, d]`, `[q, d]` of one prompt, with the input shifts applied."""
  k, d = config.num_support, config.input_dim
  dtype = normals["z"].dtype
  if shared.rotation_DxD is None:
    rotation = _orthonormalise(normals["rotation"])
  else:
    rotation = shared.rotation_DxD
  sqrt_eig = jnp.asarray(np.sqrt(input_covariance_eigenvalues(config)), dtype)
  x = _matmul(normals["z"] * sqrt_eig[None, :], rotation.T)  # Cov = R diag(eig) R^T.
  x_support, x_query = x[:k], x[k:]

  if config.shift == "orthant":
    signs = jnp.where(uniforms["orthant"] < 0.5, -1.0, 1.0).astype(dtype)
    x_support = jnp.abs(x_support) * signs[None, :]
  elif config.shift == "orthogonal_query":
    basis, _ = jnp.linalg.qr(x_support.T)  # [d, k]: the supports' span (k < d, validated).
    perp = x_query - _matmul(_matmul(x_query, basis), basis.T)
    norm_ratio = jnp.linalg.norm(x_query, axis=-1, keepdims=True) / jnp.linalg.norm(
        perp, axis=-1, keepdims=True
    )
    x_query = perp * norm_ratio
  elif config.shift == "subspace":
    basis = _orthonormalise(normals["subspace"])
    rescale = jnp.asarray(math.sqrt(d / config.shift_subspace_dim), dtype)  # keeps E|x|^2.
    x_support = _matmul(_matmul(x_support, basis), basis.T) * rescale
    x_query = _matmul(_matmul(x_query, basis), basis.T) * rescale
  elif config.shift == "scaled_inputs":
    scale = jnp.asarray(config.shift_scale, dtype)
    x_support, x_query = x_support * scale, x_query * scale
  return x_support, x_query


def _targets(
    config: TaskConfig,
    shared: _Shared,
    x_NxD: Array,
    normals: dict[str, Array],
    uniforms: dict[str, Array],
    key_poisson: Array,
) -> tuple[Array, Array]:
  """Noiseless targets `f [n, r]` and observations `y [n, r]` of one prompt at inputs `x [n, d]`."""
  dtype = x_NxD.dtype
  d = config.input_dim
  inv_sqrt_d = jnp.asarray(1.0 / math.sqrt(d), dtype)
  noise_std = jnp.asarray(config.noise_std, dtype)
  eps_NxR = normals["eps"]
  family = config.family

  if family in ("linear", "linear_anisotropic", "noisy_linear"):
    f = _matmul(x_NxD, normals["weights"] * inv_sqrt_d)
    return f, f + noise_std * eps_NxR

  if family == "sparse_linear":
    s = config.sparsity
    # The s smallest of d i.i.d. uniforms sit at a uniformly random s-subset of positions.
    support = jnp.argsort(uniforms["support"])[:s]
    mask_D = jnp.zeros((d,), dtype).at[support].set(jnp.asarray(1.0, dtype))
    w = normals["weights"] * mask_D[:, None] * jnp.asarray(1.0 / math.sqrt(s), dtype)
    f = _matmul(x_NxD, w)
    return f, f + noise_std * eps_NxR

  if family in _GLM_FAMILIES:
    logits = _matmul(x_NxD, normals["weights"] * inv_sqrt_d) * jnp.asarray(config.glm_scale, dtype)
    if config.glm_targets == "mean":
      f = jax.nn.sigmoid(logits) if family == "logistic" else jnp.exp(logits)
      return f, f
    if family == "logistic":
      f = jax.nn.sigmoid(logits)
      return f, (uniforms["labels"] < f).astype(dtype)
    f = jnp.exp(logits)
    return f, jax.random.poisson(key_poisson, f).astype(dtype)

  if family == "heteroskedastic":
    f = _matmul(x_NxD, normals["weights"] * inv_sqrt_d)
    direction = normals["direction"] / jnp.linalg.norm(normals["direction"])
    noise_scale_Nx1 = noise_std * jnp.abs(_matmul(x_NxD, direction))[:, None]
    return f, f + noise_scale_Nx1 * eps_NxR

  if family == "mixture_linear":
    m = config.num_components
    component = jnp.minimum(
        jnp.floor(uniforms["component"] * jnp.asarray(m, dtype)).astype(jnp.int32), m - 1
    )
    if config.mixture_mode == "per_point":
      weights_NxDxR = (normals["weights"] * inv_sqrt_d)[component]
      f = jnp.einsum("nd,ndr->nr", x_NxD, weights_NxDxR, precision=jax.lax.Precision.HIGHEST)
    else:
      f = _matmul(x_NxD, shared.mixture_weights_MxDxR[component])
    return f, f + noise_std * eps_NxR

  if family == "relu_network":
    hidden = jax.nn.relu(_matmul(x_NxD, (normals["hidden_weights"] * inv_sqrt_d).T))
    f = _matmul(hidden, normals["out_weights"]) * jnp.asarray(
        math.sqrt(2.0 / config.hidden_units), dtype)
    return f, f + noise_std * eps_NxR

  if family == "kernel_prior":
    feature_map = features_lib.random_fourier(config.kernel_num_features, config.kernel_bandwidth)
    params = features_lib.RandomFeatureParams(
        weights_MxD=normals["rf_weights"] * jnp.asarray(1.0 / config.kernel_bandwidth, dtype),
        bias_M=uniforms["rf_phases"] * jnp.asarray(2.0 * math.pi, dtype),
    )  # The same distribution as `feature_map.init`, drawn from this prompt's pools.
    f = _matmul(feature_map.apply(params, x_NxD), normals["gp_weights"])
    return f, f + noise_std * eps_NxR

  if family == "relu_features":
    phi_NxH = features_lib.random_relu(config.hidden_units).apply(shared.relu_features, x_NxD)
    w_HxR = normals["out_weights"] * jnp.asarray(math.sqrt(RELU_FEATURES_WEIGHT_VARIANCE), dtype)
    f = _matmul(phi_NxH, w_HxR)
    return f, f + noise_std * eps_NxR

  raise AssertionError(f"unhandled family {family!r}")  # TaskConfig validated the name.


def _sample_prompt(key: Array, config: TaskConfig, shared: _Shared, dtype: Any) -> tuple[Array, ...]:
  key_normal, key_uniform, key_poisson = jax.random.split(key, 3)
  normals = _draw(jax.random.normal, key_normal, _normal_shapes(config), dtype)
  uniforms = _draw(jax.random.uniform, key_uniform, _uniform_shapes(config), dtype)
  x_support, x_query = _sample_inputs(config, shared, normals, uniforms)
  x_all = jnp.concatenate([x_support, x_query], axis=0)
  f_all, y_all = _targets(config, shared, x_all, normals, uniforms, key_poisson)

  if config.shift == "scaled_outputs":
    scale = jnp.asarray(config.shift_scale, dtype)
    f_all, y_all = f_all * scale, y_all * scale
  elif config.shift == "added_noise":
    y_all = y_all + jnp.asarray(config.shift_noise_std, dtype) * normals["shift_noise"]

  k = config.num_support
  return x_support, y_all[:k], x_query, y_all[k:], f_all[:k], f_all[k:]


@functools.partial(jax.jit, static_argnums=1)
def _sample_jit(key: Array, config: TaskConfig) -> Prompts:
  dtype = jnp.result_type(float)
  key_shared, key_prompts = jax.random.split(key)
  shared = _sample_shared(key_shared, config, dtype)
  keys = jax.random.split(key_prompts, config.batch_size)
  x_s, y_s, x_q, y_q, f_s, f_q = jax.vmap(lambda kk: _sample_prompt(kk, config, shared, dtype))(keys)
  if config.num_outputs == 1:
    y_s, y_q, f_s, f_q = (a[..., 0] for a in (y_s, y_q, f_s, f_q))
  prompts = Prompts(x_s, y_s, x_q, y_q, f_s, f_q)
  b, k, q, d, r = (
      config.batch_size, config.num_support, config.num_query, config.input_dim, config.num_outputs)
  out_axes = () if r == 1 else (r,)
  assert prompts.x_support.shape == (b, k, d) and prompts.x_query.shape == (b, q, d)
  assert prompts.y_support.shape == prompts.f_support.shape == (b, k, *out_axes)
  assert prompts.y_query.shape == prompts.f_query.shape == (b, q, *out_axes)
  return prompts


def _check_key(key: Any) -> Array:
  if isinstance(key, jax.Array) or isinstance(key, np.ndarray):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
      return key
    if key.dtype == np.uint32 and key.shape == (2,):  # a raw `jax.random.PRNGKey`.
      return jnp.asarray(key)
  raise ValueError(
      f"key must be a single PRNG key such as jax.random.key(0), got {type(key).__name__} "
      f"{getattr(key, 'shape', '')}."
  )


def sample(key: Any, config: TaskConfig) -> Prompts:
  """Samples `config.batch_size` prompts of `config.family`, deterministically from `key`.

  Args:
    key: a PRNG key (`jax.random.key(seed)` or `jax.random.PRNGKey(seed)`).
    config: a `TaskConfig` (validated at construction).

  Returns:
    `Prompts` with `x_support [B, k, d]`, `y_support [B, k(, r)]`, `x_query [B, q, d]`,
    `y_query [B, q(, r)]` and the noiseless `f_support`, `f_query`, in the default float dtype
    (float64 when x64 is enabled).
  """
  if not isinstance(config, TaskConfig):
    raise ValueError(f"config must be a kcg.tasks.TaskConfig, got {type(config).__name__}.")
  return _sample_jit(_check_key(key), config)


@functools.partial(jax.jit, static_argnums=1)
def _targets_jit(key: Array, config: TaskConfig, x_support: Array, x_query: Array) -> Prompts:
  dtype = x_support.dtype
  key_shared, key_prompts = jax.random.split(key)
  shared = _sample_shared(key_shared, config, dtype)
  keys = jax.random.split(key_prompts, config.batch_size)

  def one(key_b, xs, xq):
    key_normal, key_uniform, key_poisson = jax.random.split(key_b, 3)
    normals = _draw(jax.random.normal, key_normal, _normal_shapes(config), dtype)
    uniforms = _draw(jax.random.uniform, key_uniform, _uniform_shapes(config), dtype)
    f_all, y_all = _targets(config, shared, jnp.concatenate([xs, xq], axis=0), normals, uniforms,
                            key_poisson)
    k = config.num_support
    return y_all[:k], y_all[k:], f_all[:k], f_all[k:]

  y_s, y_q, f_s, f_q = jax.vmap(one)(keys, x_support, x_query)
  if config.num_outputs == 1:
    y_s, y_q, f_s, f_q = (a[..., 0] for a in (y_s, y_q, f_s, f_q))
  return Prompts(x_support, y_s, x_query, y_q, f_s, f_q)


def sample_targets(key: Any, config: TaskConfig, x_support: Any, x_query: Any) -> Prompts:
  """Fresh tasks of `config.family` (one per prompt) evaluated at given inputs.

  Draws every prompt's task (weights, network, GP sample, noise) as `sample` does, but takes the inputs
  `x_support [B, k, d]`, `x_query [B, q, d]` instead of drawing them; sizes come from the arrays (the
  config's own sizes are ignored) and input shifts do not apply. Two calls with independent keys give
  independent label vectors on the same inputs (what a y-linearity test needs).
  """
  if not isinstance(config, TaskConfig):
    raise ValueError(f"config must be a kcg.tasks.TaskConfig, got {type(config).__name__}.")
  dtype = jnp.result_type(float)
  x_support, x_query = jnp.asarray(x_support, dtype), jnp.asarray(x_query, dtype)
  if (x_support.ndim != 3 or x_query.ndim != 3 or x_support.shape[0] != x_query.shape[0]
      or x_support.shape[2] != x_query.shape[2]):
    raise ValueError(f"x_support must be [B, k, d] and x_query [B, q, d] with the same B and d; got "
                     f"{x_support.shape} and {x_query.shape}.")
  if x_support.shape[2] != config.input_dim:
    raise ValueError(f"inputs have d={x_support.shape[2]} but config.input_dim={config.input_dim}; "
                     "pass a config of the inputs' dimension.")
  for name, x in (("x_support", x_support), ("x_query", x_query)):
    if not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"{name} contains NaN or Inf.")
  sized = dataclasses.replace(config, batch_size=x_support.shape[0], num_support=x_support.shape[1],
                              num_query=x_query.shape[1], shift="none")
  return _targets_jit(_check_key(key), sized, x_support, x_query)
