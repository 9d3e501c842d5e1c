"""Reference in-context predictors: what a learned in-context learner is compared against.

Every baseline is a *predictor*, a pure function with one signature,

    predict(x_support [B, k, d], y_support [B, k], x_query [B, q, d]) -> predictions [B, q],

built by a small factory that fixes its hyper-parameters (`cg_steps(3, ridge=0.1)`, `knn(5)`, ...).
Leading dims are batch dims (any number, including none: `[k, d], [k], [q, d] -> [q]`) and must be equal
across the three inputs; targets are scalar (one output per point). A predictor computes in the floating
dtype of its inputs (integer inputs give the default float), works under `jit`, `vmap` and `grad`, and
raises ValueError for bad shapes and, on concrete inputs, NaN/Inf.

The iterative baselines run kcg.solvers on `A alpha = y`, `A = K + ridge I`, `K_ij = kernel(z_i, z_j)`,
from `alpha_0 = 0`, and predict `f_t(x) = kernel(z(x), Z) alpha_t` after exactly `t` steps; `z` is the
feature map `phi(x)` (`space="feature"`) or the raw input `x` (`space="data"`). `trajectory` returns the
predictions after every step `t = 0..T` at once, `[B, T + 1, q]`, the same layout as
`CompiledCG.predict_steps`.

Registry: `get(name, **hyperparameters)` builds a baseline by its factory name (`BASELINES`);
`default_suite(ridge, num_steps)` returns the dict of baselines an evaluation usually reports.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kcg._src import checks
from kcg._src import kernels as kernels_lib
from kcg._src import solvers

Array = jax.Array
Predictor = Callable[[Any, Any, Any], Array]
"""An in-context predictor `(x_support [B, k, d], y_support [B, k], x_query [B, q, d]) -> [B, q]`."""
FeatureMapFn = Callable[[Array], Array]

SPACES = ("feature", "data")
ALGORITHMS = ("cg", "pcg", "gd", "chebyshev", "primal_cg")
AVERAGING_KINDS = ("inner_product", "mean", "softmax")
LOSS_REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------


def check_prompt_arrays(x_support: Any, y_support: Any,
                        x_query: Any) -> tuple[Array, Array, Array]:
  """Validates a batch of prompts and returns it as arrays of one floating dtype.

  Shapes: `x_support [..., k, d]`, `y_support [..., k]`, `x_query [..., q, d]` with identical batch
  dims `...`. Raises ValueError naming the problem (shapes, multi-output targets, NaN/Inf on concrete
  inputs).
  """
  dtype = checks.float_dtype(x_support, y_support, x_query)
  x_support = checks.as_array("x_support", x_support, dtype, min_ndim=2, shape_doc="[B, k, d]")
  y_support = checks.as_array("y_support", y_support, dtype, min_ndim=1, shape_doc="[B, k]")
  x_query = checks.as_array("x_query", x_query, dtype, min_ndim=2, shape_doc="[B, q, d]")
  if y_support.shape != x_support.shape[:-1]:
    if y_support.ndim == x_support.ndim and y_support.shape[:-1] == x_support.shape[:-1]:
      raise ValueError(
          f"y_support has shape {y_support.shape}: multi-output targets [B, k, r] are not supported "
          "by the baselines; predict each output column y_support[..., j] separately.")
    raise ValueError(
        f"y_support must have shape x_support.shape[:-1] = {x_support.shape[:-1]} (one target per "
        f"support point, [B, k]); got {y_support.shape}.")
  if x_query.ndim != x_support.ndim or x_query.shape[:-2] != x_support.shape[:-2]:
    raise ValueError(
        f"x_query {x_query.shape} must have the batch dims of x_support {x_support.shape}, "
        "i.e. shapes [B, q, d] and [B, k, d] with the same B.")
  if x_query.shape[-1] != x_support.shape[-1]:
    raise ValueError(
        f"input dimension mismatch: x_support {x_support.shape} has d = {x_support.shape[-1]} but "
        f"x_query {x_query.shape} has d = {x_query.shape[-1]}.")
  return x_support, y_support, x_query


def _check_positive_number(name: str, value: Any, allow_none: bool = False) -> Any:
  if value is None and allow_none:
    return None
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not ok or not math.isfinite(float(value)) or float(value) <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
  return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")
  return value


def _check_feature_map(feature_map: Any) -> FeatureMapFn | None:
  if feature_map is None:
    return None
  if not callable(feature_map):
    raise ValueError(
        f"feature_map must be a callable x [..., d] -> phi [..., p] or None, got {feature_map!r}; "
        "for a kcg.features.FeatureMap `fm` pass functools.partial(fm.apply, params).")
  return feature_map


def _check_kernel(kernel: Any) -> Any:
  return kernels_lib.linear_kernel if kernel is None else kernels_lib.check_kernel(kernel)


def _apply_feature_map(feature_map: FeatureMapFn | None, x_support: Array,
                       x_query: Array) -> tuple[Array, Array]:
  """`(phi(x_support), phi(x_query))` in the inputs' dtype, or the inputs when there is no map."""
  if feature_map is None:
    return x_support, x_query
  dtype = x_support.dtype
  phi_support = jnp.asarray(feature_map(x_support), dtype)
  phi_query = jnp.asarray(feature_map(x_query), dtype)
  for name, x, phi in (("x_support", x_support, phi_support), ("x_query", x_query, phi_query)):
    if phi.shape[:-1] != x.shape[:-1] or phi.ndim != x.ndim:
      raise ValueError(
          f"feature_map must map {name} [..., n, d] to [..., n, p]; it mapped {x.shape} to "
          f"{phi.shape}.")
  return phi_support, phi_query


def _named(fn: Predictor, name: str) -> Predictor:
  fn.__name__ = fn.__qualname__ = name
  return fn


def _predictor(core: Callable[[Array, Array, Array], Array], name: str) -> Predictor:
  """Validates (outside any trace, so value checks run on concrete inputs), then runs `jit(core)`.

  Jitting the core compiles a baseline once per input shape instead of op by op, which dominates the
  cost of eager evaluation; under an outer `jit`/`vmap`/`grad` the inner `jit` simply inlines.
  """
  core_jit = jax.jit(core)

  def predict(x_support, y_support, x_query):
    return core_jit(*check_prompt_arrays(x_support, y_support, x_query))

  return _named(predict, name)


def _einsum(subscripts: str, *operands: Array) -> Array:
  return jnp.einsum(subscripts, *operands, precision=checks.HIGHEST)


# ----------------------------------------------------------------------------------------------------
# Closed-form estimators.
# ----------------------------------------------------------------------------------------------------


def krr_oracle(ridge: Any, feature_map: Any = None, *, kernel: Any = None) -> Predictor:
  """Kernel ridge regression, solved exactly: `f*(x) = k(x)^T (K + ridge I)^{-1} y`.

  `K_ij = kernel(phi(x_i), phi(x_j))` (default: linear kernel, `K = Phi Phi^T`). Computed by
  `kcg.solvers.krr_predict` (Cholesky).

  Args:
    ridge: `> 0`.
    feature_map: `x [..., d] -> phi [..., p]`, or None for `phi(x) = x`.
    kernel: a kcg kernel `(phi_a, phi_b) -> K`; None is the linear kernel.
  """
  checks.check_ridge(ridge)
  feature_map = _check_feature_map(feature_map)
  kernel = _check_kernel(kernel)

  def core(x_support, y_support, x_query):
    phi_support, phi_query = _apply_feature_map(feature_map, x_support, x_query)
    return solvers.krr_predict(phi_support, y_support, phi_query, ridge, kernel=kernel)

  return _predictor(core, f"krr_oracle(ridge={ridge})")


def ridge(ridge: Any, feature_map: Any = None) -> Predictor:
  """Primal ridge regression: `f(x) = phi(x)^T w`, `w = (Phi^T Phi + ridge I)^{-1} Phi^T y`.

  Equal to `krr_oracle` with the linear kernel (push-through identity), but solved in feature space
  (`p x p` system instead of `k x k`), so it doubles as an independent check of the oracle.

  Args:
    ridge: `> 0`.
    feature_map: `x [..., d] -> phi [..., p]`, or None for `phi(x) = x`.
  """
  checks.check_ridge(ridge)
  ridge_value = ridge
  feature_map = _check_feature_map(feature_map)

  def core(x_support, y_support, x_query):
    phi_support, phi_query = _apply_feature_map(feature_map, x_support, x_query)
    dtype = phi_support.dtype
    p = phi_support.shape[-1]
    gram_pxp = _einsum("...kp,...kr->...pr", phi_support, phi_support)
    ridge_batch = jnp.broadcast_to(jnp.asarray(ridge_value, dtype), gram_pxp.shape[:-2])
    eye_pxp = jnp.broadcast_to(jnp.eye(p, dtype=dtype), gram_pxp.shape)
    a_pxp = gram_pxp + ridge_batch[..., None, None] * eye_pxp
    b_p = _einsum("...kp,...k->...p", phi_support, y_support)
    w_p = jnp.linalg.solve(a_pxp, b_p[..., None])[..., 0]
    return _einsum("...qp,...p->...q", phi_query, w_p)

  return _predictor(core, f"ridge(ridge={ridge})")


def least_squares(feature_map: Any = None) -> Predictor:
  """Minimum-norm least squares: `f(x) = phi(x)^T Phi^+ y` with `Phi^+` the Moore-Penrose pseudo-inverse.

  For `k >= p` (full column rank) this is ordinary least squares; for `k < p` it is the interpolant of
  least norm, `w = Phi^T (Phi Phi^T)^{-1} y`, the `ridge -> 0` limit of ridge regression. Singular values
  below `10 max(k, p) eps sigma_max` are treated as zero (`jnp.linalg.pinv`'s default).

  Args:
    feature_map: `x [..., d] -> phi [..., p]`, or None for `phi(x) = x`.
  """
  feature_map = _check_feature_map(feature_map)

  def core(x_support, y_support, x_query):
    phi_support, phi_query = _apply_feature_map(feature_map, x_support, x_query)
    pinv_pxk = jnp.linalg.pinv(phi_support)
    w_p = _einsum("...pk,...k->...p", pinv_pxk, y_support)
    return _einsum("...qp,...p->...q", phi_query, w_p)

  return _predictor(core, "least_squares()")


def knn(num_neighbors: int) -> Predictor:
  """k-nearest-neighbour regression: the mean target of the `n` supports closest to the query.

  `f(x) = (1/n) sum_{i in N_n(x)} y_i`, `N_n(x)` the `n` supports of least Euclidean distance `|x - x_i|`
  (uniform weights, like `sklearn.neighbors.KNeighborsRegressor`). Needs `n <= k` (checked per call).
  """
  num_neighbors = checks.check_positive_int("num_neighbors", num_neighbors)

  def core(x_support, y_support, x_query):
    k = x_support.shape[-2]
    if num_neighbors > k:
      raise ValueError(
          f"knn({num_neighbors}) needs at least {num_neighbors} support points, got k = {k}; use "
          f"num_neighbors <= {k}.")
    diff = x_query[..., :, None, :] - x_support[..., None, :, :]
    sq_dist_qxk = jnp.sum(jnp.square(diff), axis=-1)
    _, nearest_qxn = lax.top_k(-sq_dist_qxk, num_neighbors)
    y_qxk = jnp.broadcast_to(y_support[..., None, :], sq_dist_qxk.shape)
    return jnp.mean(jnp.take_along_axis(y_qxk, nearest_qxn, axis=-1), axis=-1)

  return _predictor(core, f"knn({num_neighbors})")


def averaging(kind: str = "inner_product", temperature: float = 1.0) -> Predictor:
  """Averaging estimators, the weakest baselines of Garg et al. (2022).

  * `"inner_product"` (Garg et al.'s "averaging"): `f(x) = x^T (1/k) sum_i y_i x_i`, the targets averaged
    with linear-kernel weights `<x_i, x>`. Unbiased for `w` when `E x x^T = I`; equals
    `one_step_gd(1.0)`.
  * `"mean"`: `f(x) = (1/k) sum_i y_i`, ignoring the query.
  * `"softmax"`: Nadaraya-Watson with the exponential kernel, `f(x) = sum_i softmax_i(<x_i, x>/tau) y_i`,
    what one softmax attention head computes when values carry `y` (Route A's kernel, normalised).

  Args:
    kind: one of `AVERAGING_KINDS`.
    temperature: `tau > 0`, used by `"softmax"` only.
  """
  kind = _check_choice("averaging kind", kind, AVERAGING_KINDS)
  temperature = _check_positive_number("temperature", temperature)

  def core(x_support, y_support, x_query):
    if kind == "mean":
      mean = jnp.mean(y_support, axis=-1, keepdims=True)
      return jnp.broadcast_to(mean, x_query.shape[:-1])
    scores_qxk = _einsum("...qd,...kd->...qk", x_query, x_support)
    if kind == "inner_product":
      k = x_support.shape[-2]
      return _einsum("...qk,...k->...q", scores_qxk, y_support) / jnp.asarray(k, x_support.dtype)
    weights_qxk = jax.nn.softmax(scores_qxk / jnp.asarray(temperature, x_support.dtype), axis=-1)
    return _einsum("...qk,...k->...q", weights_qxk, y_support)

  suffix = f", temperature={temperature}" if kind == "softmax" else ""
  return _predictor(core, f"averaging({kind!r}{suffix})")


def one_step_gd(eta: Any, loss_reduction: str = "mean") -> Predictor:
  """The prediction after one gradient-descent step from `w = 0` on the least-squares loss.

  Convention (`loss_reduction="mean"`, the default): the loss is `L(w) = (1/2k) |X w - y|^2`, its
  gradient at 0 is `-X^T y / k`, so one step gives `w_1 = eta X^T y / k` and

      f(x) = eta * x^T X^T y / k.

  With `loss_reduction="sum"`, `L(w) = (1/2) |X w - y|^2` and `f(x) = eta * x^T X^T y` (the step absorbs
  `1/k`; this is the dual GD step on `K alpha = y` with `alpha_1 = eta y`). A matrix `eta = Gamma [d, d]`
  gives preconditioned GD, `f(x) = x^T Gamma X^T y / k`, the form a trained linear self-attention layer
  takes (von Oswald et al. 2023). Raw inputs only (no feature map): this is the data-space baseline.

  Args:
    eta: the step, a finite scalar or a `[d, d]` matrix.
    loss_reduction: `"mean"` or `"sum"`, see above.
  """
  loss_reduction = _check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
  if not checks.is_tracer(eta) and np.asarray(eta).dtype.kind not in "iuf":
    raise ValueError(f"eta must be a real number or a [d, d] matrix, got {eta!r}.")
  checks.check_finite("eta", eta)
  eta_shape = np.shape(eta)
  if eta_shape != () and (len(eta_shape) != 2 or eta_shape[0] != eta_shape[1]):
    raise ValueError(f"eta must be a scalar or a square [d, d] matrix, got shape {eta_shape}.")

  def core(x_support, y_support, x_query):
    dtype = x_support.dtype
    k, d = x_support.shape[-2:]
    grad_d = _einsum("...kd,...k->...d", x_support, y_support)  # X^T y = -dL/dw(0) for "sum".
    if loss_reduction == "mean":
      grad_d = grad_d / jnp.asarray(k, dtype)
    eta_array = jnp.asarray(eta, dtype)
    if eta_array.ndim == 0:
      return eta_array * _einsum("...qd,...d->...q", x_query, grad_d)
    if eta_array.shape != (d, d):
      raise ValueError(f"eta has shape {eta_array.shape} but the inputs have d = {d}; pass [d, d].")
    return _einsum("...qa,ab,...b->...q", x_query, eta_array, grad_d)

  return _predictor(core, f"one_step_gd(loss_reduction={loss_reduction!r})")


# ----------------------------------------------------------------------------------------------------
# Iterative KRR solvers, truncated after t steps (kcg.solvers does the iterating).
# ----------------------------------------------------------------------------------------------------


def trajectory(algorithm: str, num_steps: int, ridge: Any, *, feature_map: Any = None,
               space: str = "feature", kernel: Any = None, step_size: Any = None,
               eig_bounds: Any = None) -> Callable[[Any, Any, Any], Array]:
  """Predictions after every step `t = 0..num_steps` of an iterative KRR solver.

  Returns `predict_steps(x_support [B, k, d], y_support [B, k], x_query [B, q, d]) -> [B, T + 1, q]`
  with `[..., t, :] = f_t(x_query)`:

  * `"cg"`: conjugate gradient on `(K + ridge I) alpha = y`, `f_t = K(query, support) alpha_t`
    (`kcg.solvers.cg_predict`).
  * `"pcg"`: CG with the Jacobi preconditioner `M = diag(K + ridge I)` (`pcg_predict`).
  * `"gd"`: fixed-step gradient descent on the same system, `alpha_{t+1} = alpha_t + eta (y - A alpha_t)`;
    `step_size=None` uses the optimal `2 / (lam_min + lam_max)` of `A` per problem (`gd_predict`). With
    the linear kernel this is GD on the primal loss `(1/2)|Phi w - y|^2 + (ridge/2)|w|^2` from `w = 0`
    (the iterates satisfy `w_t = Phi^T alpha_t`).
  * `"chebyshev"`: Chebyshev semi-iteration; `eig_bounds=None` uses the exact extreme eigenvalues of `A`.
  * `"primal_cg"`: CG on `(Phi^T Phi + ridge I) w = Phi^T y`, `f_t = phi(x)^T w_t` (linear kernel only);
    its iterates differ from dual CG's for `0 < t < min(k, p)`.

  Args:
    algorithm: one of `ALGORITHMS`.
    num_steps: `T >= 0`.
    ridge: `> 0`.
    feature_map: `x [..., d] -> phi [..., p]`; None is the identity.
    space: `"feature"` runs the solver on `phi(x)`; `"data"` on the raw inputs `x`, ignoring
      `feature_map` (so one feature map can be compared in both spaces).
    kernel: a kcg kernel on the chosen space; None is the linear kernel.
    step_size: GD's fixed step (`"gd"` only).
    eig_bounds: `(lo, hi)` for `"chebyshev"` only.
  """
  algorithm = _check_choice("algorithm", algorithm, ALGORITHMS)
  num_steps = checks.check_num_steps(num_steps)
  checks.check_ridge(ridge)
  feature_map = _check_feature_map(feature_map)
  space = _check_choice("space", space, SPACES)
  if algorithm == "primal_cg" and kernel is not None:
    raise ValueError("primal_cg works with the linear kernel only (it needs the features); pass "
                     "kernel=None, or use algorithm='cg' for another kernel.")
  kernel = _check_kernel(kernel)
  if step_size is not None and algorithm != "gd":
    raise ValueError(f"step_size applies to algorithm 'gd' only, not {algorithm!r}.")
  step_size = _check_positive_number("step_size", step_size, allow_none=True)
  if eig_bounds is not None and algorithm != "chebyshev":
    raise ValueError(f"eig_bounds applies to algorithm 'chebyshev' only, not {algorithm!r}.")
  used_feature_map = feature_map if space == "feature" else None

  def core(x_support, y_support, x_query):
    z_support, z_query = _apply_feature_map(used_feature_map, x_support, x_query)
    args = (z_support, y_support, z_query, ridge, num_steps)
    if algorithm == "cg":
      return solvers.cg_predict(*args, kernel=kernel)
    if algorithm == "pcg":
      return solvers.pcg_predict(*args, kernel=kernel)
    if algorithm == "gd":
      return solvers.gd_predict(*args, step_size, kernel=kernel)
    if algorithm == "chebyshev":
      return solvers.chebyshev_predict(*args, eig_bounds, kernel=kernel)
    return solvers.primal_cg_predict(*args)

  return _predictor(core, f"trajectory({algorithm!r}, {num_steps}, ridge={ridge}, space={space!r})")


def _final_step(algorithm: str, name: str, num_steps: int, ridge: Any, **kwargs: Any) -> Predictor:
  steps = trajectory(algorithm, num_steps, ridge, **kwargs)

  def predict(x_support, y_support, x_query):
    return steps(x_support, y_support, x_query)[..., -1, :]

  space = kwargs.get("space", "feature")
  return _named(predict, f"{name}({num_steps}, ridge={ridge}, space={space!r})")


def cg_steps(num_steps: int, ridge: Any, feature_map: Any = None, space: str = "feature", *,
             kernel: Any = None, form: str = "dual") -> Predictor:
  """The KRR prediction after exactly `t = num_steps` CG steps from `alpha_0 = 0`.

  `f_t(x) = k(z(x))^T alpha_t` with `alpha_t` the CG iterate on `(K + ridge I) alpha = y`, which minimises
  `|alpha - alpha*|_A` over the Krylov space `span{y, A y, ..., A^{t-1} y}`; `f_k = f*` (`krr_oracle`) in
  exact arithmetic. `form="primal"` runs CG on `(Phi^T Phi + ridge I) w = Phi^T y` instead (linear
  kernel only), the compiler's `form="primal"` construction.

  Args:
    num_steps: `t >= 0` (`t = 0` predicts 0).
    ridge: `> 0`.
    feature_map: `x [..., d] -> phi [..., p]`, or None for the identity.
    space: `"feature"` (CG on `phi(x)`) or `"data"` (CG on raw `x`, `feature_map` ignored).
    kernel: kernel on the chosen space; None is linear.
    form: `"dual"` or `"primal"`.
  """
  form = _check_choice("form", form, ("dual", "primal"))
  algorithm = "cg" if form == "dual" else "primal_cg"
  return _final_step(algorithm, "cg_steps" if form == "dual" else "primal_cg_steps", num_steps, ridge,
                     feature_map=feature_map, space=space, kernel=kernel)


def pcg_steps(num_steps: int, ridge: Any, feature_map: Any = None, space: str = "feature", *,
              kernel: Any = None) -> Predictor:
  """The prediction after `num_steps` Jacobi-preconditioned CG steps (`M = diag(K + ridge I)`).

  Arguments as in `cg_steps`.
  """
  return _final_step("pcg", "pcg_steps", num_steps, ridge, feature_map=feature_map, space=space,
                     kernel=kernel)


def gd_steps(num_steps: int, ridge: Any, step_size: Any = None, feature_map: Any = None,
             space: str = "feature", *, kernel: Any = None) -> Predictor:
  """The prediction after `num_steps` fixed-step GD steps on `(K + ridge I) alpha = y` from 0.

  `alpha_{t+1} = alpha_t + eta (y - (K + ridge I) alpha_t)`; `step_size=None` takes the optimal fixed
  step `eta = 2 / (lam_min + lam_max)` of `K + ridge I`, per problem. With the linear kernel, identical
  to GD on the primal `(1/2)|Phi w - y|^2 + (ridge/2)|w|^2` from `w = 0` with the same step.
  Other arguments as in `cg_steps`.
  """
  return _final_step("gd", "gd_steps", num_steps, ridge, feature_map=feature_map, space=space,
                     kernel=kernel, step_size=step_size)


def chebyshev_steps(num_steps: int, ridge: Any, eig_bounds: Any = None, feature_map: Any = None,
                    space: str = "feature", *, kernel: Any = None) -> Predictor:
  """The prediction after `num_steps` Chebyshev semi-iteration steps on `(K + ridge I) alpha = y`.

  The residual after `t` steps is `T_t((theta - A)/delta) y / T_t(theta/delta)` with
  `theta, delta = (hi +- lo)/2`; `eig_bounds=None` uses the exact `(lam_min, lam_max)` per problem.
  Other arguments as in `cg_steps`.
  """
  return _final_step("chebyshev", "chebyshev_steps", num_steps, ridge, feature_map=feature_map,
                     space=space, kernel=kernel, eig_bounds=eig_bounds)


# ----------------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Predictor]] = {
    "krr_oracle": krr_oracle,
    "ridge": ridge,
    "least_squares": least_squares,
    "cg_steps": cg_steps,
    "pcg_steps": pcg_steps,
    "gd_steps": gd_steps,
    "chebyshev_steps": chebyshev_steps,
    "knn": knn,
    "averaging": averaging,
    "one_step_gd": one_step_gd,
}

BASELINES = tuple(_REGISTRY)


def get(name: str, **hyperparameters: Any) -> Predictor:
  """Builds the baseline `name` (one of `BASELINES`), e.g. `get("cg_steps", num_steps=3, ridge=0.1)`.

  Raises:
    ValueError: for an unknown name, or hyper-parameters the factory does not take or rejects.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}.")
  factory = _REGISTRY[name]
  signature = inspect.signature(factory)
  try:
    signature.bind(**hyperparameters)
  except TypeError as err:
    raise ValueError(f"bad hyper-parameters for baseline {name!r}: {err}; its signature is "
                     f"{name}{signature}.") from None
  return factory(**hyperparameters)


def default_suite(ridge: Any, num_steps: int, *, num_neighbors: int = 3,
                  feature_map: Any = None) -> dict[str, Predictor]:
  """The reference predictors an evaluation reports, keyed by a readable name.

  `krr_oracle`, `least_squares`, `cg_{t}`, `gd_{t}` (optimal step), `chebyshev_{t}`, `knn_{n}`,
  `averaging` (Garg et al.'s inner-product average) and `mean`, with `t = num_steps`.
  """
  t = checks.check_num_steps(num_steps)
  return {
      "krr_oracle": krr_oracle(ridge, feature_map),
      "least_squares": least_squares(feature_map),
      f"cg_{t}": cg_steps(t, ridge, feature_map),
      f"gd_{t}": gd_steps(t, ridge, feature_map=feature_map),
      f"chebyshev_{t}": chebyshev_steps(t, ridge, feature_map=feature_map),
      f"knn_{num_neighbors}": knn(num_neighbors),
      "averaging": averaging("inner_product"),
      "mean": averaging("mean"),
  }


__all__ = (
    "ALGORITHMS", "AVERAGING_KINDS", "BASELINES", "LOSS_REDUCTIONS", "Predictor", "SPACES",
    "averaging", "cg_steps", "check_prompt_arrays", "chebyshev_steps", "default_suite", "gd_steps",
    "get", "knn", "krr_oracle", "least_squares", "one_step_gd", "pcg_steps", "ridge", "trajectory",
)
