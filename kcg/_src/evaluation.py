"""Evaluating in-context predictors and measuring which algorithm they match.

A predictor is any function `predict(x_support [B, k, d], y_support [B, k], x_query [B, q, d]) -> [B, q]`
(a trained model's `.predict`, a `CompiledCG.predict`, a kcg.baselines predictor). `prompts` is any object
with fields `x_support, y_support, x_query` (and `y_query`, optionally `f_query`), such as
`kcg.tasks.Prompts`. Predictions `a, b` below are `[B, q]` arrays; sums run over all `B q` entries unless
a function says "per problem" (over the `q` queries of one prompt).

Measures (each a library function; the ones returning arrays work under `jit`):

* errors: `mse(a, y) = mean (a - y)^2`, `normalized_mse(a, y) = mse(a, y) / Var(y)`;
* agreement of two predictors (`prediction_similarity`): squared prediction difference
  `mean (a - b)^2`, relative distance `|a - b| / |b|`, cosine `<a, b> / (|a| |b|)`, pooled
  `R^2 = 1 - |a - b|^2 / |b - mean(b)|^2`; `error_cosine`: the cosine of the errors `a - y`, `b - y`;
* `r2_with_ci`: per-problem `R^2` with a bootstrap confidence interval of its mean over problems;
* gradients with respect to the query input (`implicit_weights`, `sensitivity_cosine`): for a linear
  predictor `f(x) = w^T x`, `d f / d x = w`;
* algorithm identification: `fit_gd_step` (the step `eta` of one GD step that best explains the
  predictions, closed form), `fit_gd_preconditioner` (the matrix version), `best_matching_step`
  (the step `t` of CG/PCG/GD/Chebyshev whose predictions are closest);
* whole evaluations: `evaluate` (a model against targets and baselines, as a JSON-ready dict) and
  `error_vs_num_support` (error curves over the number of supports).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import baselines as baselines_lib
from kcg._src import checks
from kcg._src import tasks as tasks_lib

Array = jax.Array
Predictor = baselines_lib.Predictor


# ----------------------------------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------------------------------


class Similarity(NamedTuple):
  """How close predictions `a` are to reference predictions `b` (all scalars; sums over every entry).

  Attributes:
    squared_difference: `mean (a - b)^2`, the "squared prediction difference" (Akyurek et al. 2023).
    relative_distance: `|a - b| / |b|` (Frobenius norms; `inf` if `b = 0` and `a != b`).
    cosine: `<a, b> / (|a| |b|)` (0 when either is 0).
    r2: pooled `1 - |a - b|^2 / |b - mean(b)|^2`, the fraction of `b`'s variance `a` reproduces.
  """
  squared_difference: Array
  relative_distance: Array
  cosine: Array
  r2: Array


class R2Interval(NamedTuple):
  """Mean per-problem `R^2` with a bootstrap confidence interval.

  Attributes:
    r2: mean over problems of `R^2_b` (problems where it is undefined are left out).
    lower, upper: the bootstrap percentile interval of that mean at the requested confidence.
    per_problem: `R^2_b` for every problem, `[B]` (NaN where `b`'s predictions are constant in `q`).
  """
  r2: Array
  lower: Array
  upper: Array
  per_problem: Array


class GDStepFit(NamedTuple):
  """The one-step-GD predictor `eta g` closest to given predictions (see `fit_gd_step`).

  Attributes:
    eta: the least-squares step (a scalar; `[d, d]` for `fit_gd_preconditioner`).
    residual_mse: `mean (pred - eta g)^2`.
    relative_residual: `|pred - eta g| / |pred|`.
    r2: pooled `R^2` of the fitted GD predictions as a description of `pred`.
  """
  eta: Array
  residual_mse: Array
  relative_residual: Array
  r2: Array


class StepMatch(NamedTuple):
  """Which step of an iterative solver the predictions match best (see `best_matching_step`).

  Attributes:
    step: the `t` in `0..max_steps` of least mean squared difference (the first on ties).
    distances: `mean (pred - f_t)^2` for every `t`, `[max_steps + 1]`.
    best_distance: `distances[step]`.
  """
  step: Array
  distances: Array
  best_distance: Array


class SupportCurve(NamedTuple):
  """Error against the number of supports `k` (see `error_vs_num_support`); arrays over `k`, `[n]`.

  Attributes:
    num_support: the `k` values.
    mse: the model's mean squared error on `y_query`.
    mse_stderr: its standard error over prompts, `std_b(mse_b) / sqrt(B)`.
    nmse: the model's `mse / Var(y_query)`.
    baseline_mse: `{name: [n]}`, each baseline's mean squared error.
    baseline_agreement: `{name: [n]}`, `mean (model - baseline)^2`.
  """
  num_support: np.ndarray
  mse: np.ndarray
  mse_stderr: np.ndarray
  nmse: np.ndarray
  baseline_mse: dict[str, np.ndarray]
  baseline_agreement: dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------------------------------


def _prompt_fields(prompts: Any, *, need_targets: bool = False) -> tuple[Array, ...]:
  names = ("x_support", "y_support", "x_query") + (("y_query",) if need_targets else ())
  missing = [n for n in names if not hasattr(prompts, n)]
  if missing:
    raise ValueError(
        f"prompts must have fields {', '.join(names)} (e.g. kcg.tasks.Prompts); "
        f"{type(prompts).__name__} lacks {', '.join(missing)}.")
  x_support, y_support, x_query = baselines_lib.check_prompt_arrays(
      prompts.x_support, prompts.y_support, prompts.x_query)
  if not need_targets:
    return x_support, y_support, x_query
  y_query = _as_predictions("prompts.y_query", prompts.y_query, x_query.shape[:-1])
  return x_support, y_support, x_query, y_query


def _as_predictions(name: str, x: Any, shape: tuple[int, ...] | None = None,
                    dtype: Any = None) -> Array:
  dtype = checks.float_dtype(x) if dtype is None else dtype
  array = checks.as_array(name, x, dtype, min_ndim=1, shape_doc="[B, q]")
  if shape is not None and array.shape != tuple(shape):
    raise ValueError(
        f"{name} must have shape {tuple(shape)} (one prediction per query, [B, q]); got "
        f"{array.shape}.")
  return array


def _pair(name_a: str, a: Any, name_b: str, b: Any) -> tuple[Array, Array]:
  """Two prediction arrays of the same shape in one floating dtype."""
  dtype = checks.float_dtype(a, b)
  a = _as_predictions(name_a, a, dtype=dtype)
  b = _as_predictions(name_b, b, dtype=dtype)
  if a.shape != b.shape:
    raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape [B, q].")
  return a, b


def _check_predictor(name: str, fn: Any) -> Predictor:
  if not callable(fn):
    raise ValueError(
        f"{name} must be a predictor (x_support [B, k, d], y_support [B, k], x_query [B, q, d]) -> "
        f"[B, q], got {fn!r}.")
  return fn


def _predict(name: str, fn: Predictor, x_support: Array, y_support: Array, x_query: Array) -> Array:
  out = jnp.asarray(fn(x_support, y_support, x_query))
  if out.shape != x_query.shape[:-1]:
    raise ValueError(
        f"{name} returned shape {out.shape}; a predictor must return one prediction per query, shape "
        f"x_query.shape[:-1] = {x_query.shape[:-1]}.")
  return out


def _ratio_or_inf(numerator: Array, denominator: Array) -> Array:
  """`numerator / denominator` for `numerator >= 0`; 0 for 0/0 and `inf` for x/0 with x > 0."""
  is_zero = denominator == 0
  value = numerator / jnp.where(is_zero, jnp.ones_like(denominator), denominator)
  inf_or_zero = jnp.where(numerator == 0, jnp.zeros_like(value), jnp.full_like(value, jnp.inf))
  return jnp.where(is_zero, inf_or_zero, value)


def _safe_ratio(numerator: Array, denominator: Array, if_zero: float) -> Array:
  """`numerator / denominator`, or `if_zero` where the denominator is 0 (no NaN from 0/0)."""
  is_zero = denominator == 0
  value = numerator / jnp.where(is_zero, jnp.ones_like(denominator), denominator)
  return jnp.where(is_zero, jnp.full_like(value, if_zero), value)


# ----------------------------------------------------------------------------------------------------
# Pointwise measures.
# ----------------------------------------------------------------------------------------------------


# The array maths lives in jitted private cores (one compile per shape instead of op-by-op dispatch,
# which dominates evaluation time); the public functions validate their inputs first.


@jax.jit
def _mse_core(a: Array, y: Array) -> Array:
  return jnp.mean(jnp.square(a - y))


@jax.jit
def _normalized_mse_core(a: Array, y: Array) -> Array:
  variance = jnp.mean(jnp.square(y - jnp.mean(y)))
  return _ratio_or_inf(jnp.mean(jnp.square(a - y)), variance)


@functools.partial(jax.jit, static_argnames="axis")
def _cosine_core(u: Array, v: Array, axis: Any) -> Array:
  dot = jnp.sum(u * v, axis=axis)
  norms = jnp.sqrt(jnp.sum(jnp.square(u), axis=axis) * jnp.sum(jnp.square(v), axis=axis))
  return _safe_ratio(dot, norms, 0.0)


@jax.jit
def _similarity_core(a: Array, b: Array) -> Similarity:
  diff_sq = jnp.sum(jnp.square(a - b))
  relative = jnp.sqrt(_ratio_or_inf(diff_sq, jnp.sum(jnp.square(b))))
  r2 = 1 - _ratio_or_inf(diff_sq, jnp.sum(jnp.square(b - jnp.mean(b))))
  return Similarity(jnp.mean(jnp.square(a - b)), relative, _cosine_core(a, b, None), r2)


@jax.jit
def _per_problem_r2_core(a: Array, b: Array) -> Array:
  residual = jnp.sum(jnp.square(a - b), axis=-1)
  spread = jnp.sum(jnp.square(b - jnp.mean(b, axis=-1, keepdims=True)), axis=-1)
  defined = spread > 0
  return jnp.where(defined, 1 - residual / jnp.where(defined, spread, jnp.ones_like(spread)), jnp.nan)


@functools.partial(jax.jit, static_argnames="num_bootstrap")
def _bootstrap_mean_core(values: Array, key: Array, num_bootstrap: int,
                         tail: Array) -> tuple[Array, Array, Array]:
  num = values.shape[0]
  resampled = jax.random.randint(key, (num_bootstrap, num), 0, num)
  means = jnp.nanmean(values[resampled], axis=-1)
  lower, upper = jnp.nanquantile(means, jnp.stack([tail, 1 - tail]))
  return jnp.nanmean(values), lower, upper


def mse(predictions: Any, targets: Any) -> Array:
  """Mean squared error `mean_{b, j} (a_bj - y_bj)^2` over every entry."""
  return _mse_core(*_pair("predictions", predictions, "targets", targets))


def normalized_mse(predictions: Any, targets: Any) -> Array:
  """`mse(a, y) / Var(y)`, `Var(y) = mean (y - mean y)^2` over every entry (1 = predicting the mean).

  Garg et al. (2022) normalise by the input dimension `d`, which is `Var(y)` of their isotropic linear
  task; the empirical variance applies to every task family. NaN-free: 0 for 0/0, and `inf` if
  `Var(y) = 0` and the error is not.
  """
  return _normalized_mse_core(*_pair("predictions", predictions, "targets", targets))


def cosine_similarity(u: Any, v: Any, axis: int | tuple[int, ...] | None = -1) -> Array:
  """`<u, v> / (|u| |v|)` along `axis` (None: over every entry); 0 where `u` or `v` is 0."""
  u, v = _pair("u", u, "v", v)
  return _cosine_core(u, v, tuple(axis) if isinstance(axis, list) else axis)


def prediction_similarity(pred_a: Any, pred_b: Any) -> Similarity:
  """Agreement of predictions `a` with reference predictions `b`, both `[B, q]`; see `Similarity`.

  Degenerate cases are NaN-free: `relative_distance` is 0 for `a = b = 0` and `inf` for `b = 0 != a`;
  `r2` is 1 when `a = b` is constant and `-inf` when `b` is constant and `a` differs from it.
  """
  return _similarity_core(*_pair("pred_a", pred_a, "pred_b", pred_b))


def error_cosine(pred_a: Any, pred_b: Any, targets: Any) -> Array:
  """Similarity of errors: the cosine between `a - y` and `b - y` over every entry."""
  a, b = _pair("pred_a", pred_a, "pred_b", pred_b)
  a, y = _pair("pred_a", a, "targets", targets)
  return _cosine_core(a - y, b.astype(a.dtype) - y, None)


def per_problem_r2(pred_a: Any, pred_b: Any) -> Array:
  """`R^2_b = 1 - sum_j (a_bj - b_bj)^2 / sum_j (b_bj - mean_j b_bj)^2` for every problem, `[B]`.

  `a` is read as a prediction of `b` (the reference). Needs `q >= 2` queries per problem; NaN where
  `b` is constant over the queries of a problem (the ratio is undefined).
  """
  a, b = _pair("pred_a", pred_a, "pred_b", pred_b)
  if a.ndim < 2 or a.shape[-1] < 2:
    raise ValueError(
        f"per-problem R^2 needs predictions of shape [B, q] with q >= 2 queries per problem, got "
        f"{a.shape}; sample more queries, or use prediction_similarity(...).r2 (pooled over problems).")
  return _per_problem_r2_core(a, b)


def r2_with_ci(pred_a: Any, pred_b: Any, key: Any, num_bootstrap: int = 1000,
               confidence: float = 0.95) -> R2Interval:
  """Mean per-problem `R^2` of `a` against `b` with a percentile-bootstrap confidence interval.

  `r2 = mean_b R^2_b` (`per_problem_r2`, problems with undefined `R^2_b` left out). The interval resamples
  the `B` problems with replacement `num_bootstrap` times and takes the `(1 -+ confidence)/2` quantiles
  of the resampled means (Efron's percentile interval), so it reflects problem-to-problem variation.

  Args:
    pred_a: predictions `[B, q]`, `q >= 2` (more batch dims are flattened into problems).
    pred_b: reference predictions `[B, q]`.
    key: a PRNG key for the resampling.
    num_bootstrap: resamples, an int `>= 1`.
    confidence: in `(0, 1)`.
  """
  num_bootstrap = checks.check_positive_int("num_bootstrap", num_bootstrap)
  ok = isinstance(confidence, numbers.Real) and not isinstance(confidence, bool)
  if not ok or not 0 < float(confidence) < 1:
    raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95; got {confidence!r}.")
  per_problem = per_problem_r2(pred_a, pred_b).reshape(-1)
  tail = jnp.asarray((1 - float(confidence)) / 2, per_problem.dtype)
  r2, lower, upper = _bootstrap_mean_core(per_problem, key, num_bootstrap, tail)
  return R2Interval(r2, lower, upper, per_problem)


# ----------------------------------------------------------------------------------------------------
# Gradients with respect to the query input.
# ----------------------------------------------------------------------------------------------------


def implicit_weights(predict_fn: Predictor, prompts: Any, *,
                     independent_queries: bool = False) -> Array:
  """The implicit linear weights `w_bj = d f(x_query_bj) / d x_query_bj`, shape `[B, q, d]`.

  For a linear predictor `f(x) = w^T x` (ridge, least squares, CG_t on raw inputs: `w_t = X^T alpha_t`)
  this is `w` exactly; for a nonlinear one it is the local linearisation at the query. Only the
  diagonal of the Jacobian is kept (prediction `j` with respect to query `j`), so queries that attend to
  each other (a causal mask over queries) are handled correctly, at the cost of `q` backward passes;
  `independent_queries=True` (each prediction depends on its own query only, as for every baseline and
  a prefix-masked transformer) uses one backward pass of `sum f`.
  """
  predict_fn = _check_predictor("predict_fn", predict_fn)
  x_support, y_support, x_query = _prompt_fields(prompts)

  def summed_over_batch(xq):
    return _predict("predict_fn", predict_fn, x_support, y_support, xq).sum(axis=0)

  if independent_queries:
    return jax.grad(lambda xq: summed_over_batch(xq).sum())(x_query)
  jacobian = jax.jacrev(summed_over_batch)(x_query)  # [q, B, q, d]; problems are independent.
  diagonal = jnp.diagonal(jacobian, axis1=0, axis2=2)  # [B, d, q]
  weights = jnp.swapaxes(diagonal, -1, -2)
  assert weights.shape == x_query.shape
  return weights


def sensitivity_cosine(predict_a: Predictor, predict_b: Predictor, prompts: Any, *,
                       independent_queries: bool = False) -> Array:
  """Cosine between the input gradients of two predictors at every query, `[B, q]`.

  `cos(d f_a / d x_q, d f_b / d x_q)` (von Oswald et al. 2023's "sensitivity"): 1 when the two predictors
  respond to the query in the same direction; 0 where either gradient is 0. See `implicit_weights`.
  """
  w_a = implicit_weights(predict_a, prompts, independent_queries=independent_queries)
  w_b = implicit_weights(predict_b, prompts, independent_queries=independent_queries)
  return cosine_similarity(w_a, w_b, axis=-1)


# ----------------------------------------------------------------------------------------------------
# Algorithm identification.
# ----------------------------------------------------------------------------------------------------


def _fit_report(predictions: Array, fitted: Array, eta: Array) -> GDStepFit:
  similarity = prediction_similarity(fitted, predictions)
  return GDStepFit(eta, similarity.squared_difference, similarity.relative_distance, similarity.r2)


def fit_gd_step(predictions: Any, prompts: Any, loss_reduction: str = "mean") -> GDStepFit:
  """The step `eta` for which one GD step from `w = 0` best reproduces `predictions`, in closed form.

  With `g = one_step_gd(1)(prompts)` (`g_bj = x_bj^T X_b^T y_b / k` for `loss_reduction="mean"`),
  `eta* = argmin_eta sum (pred - eta g)^2 = <pred, g> / <g, g>` (0 if `g = 0`). A one-layer linear
  self-attention trained on linear regression is expected to give a small residual here.

  Args:
    predictions: `[B, q]`.
    prompts: with `x_support [B, k, d]`, `y_support [B, k]`, `x_query [B, q, d]`.
    loss_reduction: the convention of `one_step_gd` (`"mean"` or `"sum"`).
  """
  x_support, y_support, x_query = _prompt_fields(prompts)
  pred = _as_predictions("predictions", predictions, x_query.shape[:-1], x_query.dtype)
  g = baselines_lib.one_step_gd(1.0, loss_reduction)(x_support, y_support, x_query)
  eta = _safe_ratio(jnp.sum(pred * g), jnp.sum(g * g), 0.0)
  return _fit_report(pred, eta * g, eta)


def fit_gd_preconditioner(predictions: Any, prompts: Any, loss_reduction: str = "mean") -> GDStepFit:
  """The matrix `Gamma [d, d]` for which preconditioned one-step GD best reproduces `predictions`.

  `f(x) = x^T Gamma h`, `h = X^T y / k` (or `X^T y`), is linear in `Gamma`: `f_bj = <x_bj h_b^T, Gamma>`,
  so `Gamma*` is the minimum-norm least-squares solution over the `B q` predictions (`d^2` unknowns; it
  is unique when `B q >= d^2` and the outer products span). Returned in `GDStepFit.eta`.
  """
  x_support, y_support, x_query = _prompt_fields(prompts)
  pred = _as_predictions("predictions", predictions, x_query.shape[:-1], x_query.dtype)
  loss_reduction = baselines_lib._check_choice(
      "loss_reduction", loss_reduction, baselines_lib.LOSS_REDUCTIONS)
  k, d = x_support.shape[-2:]
  h = jnp.einsum("...kd,...k->...d", x_support, y_support, precision=checks.HIGHEST)
  if loss_reduction == "mean":
    h = h / jnp.asarray(k, h.dtype)
  h_q = jnp.broadcast_to(h[..., None, :], x_query.shape)
  design = (x_query[..., :, None] * h_q[..., None, :]).reshape(-1, d * d)
  gamma_flat, _, _, _ = jnp.linalg.lstsq(design, pred.reshape(-1))
  gamma = gamma_flat.reshape(d, d)
  fitted = baselines_lib.one_step_gd(gamma, loss_reduction)(x_support, y_support, x_query)
  return _fit_report(pred, fitted, gamma)


def best_matching_step(predictions: Any, prompts: Any, algorithm: str, max_steps: int, *,
                       ridge: Any, feature_map: Any = None, space: str = "feature",
                       kernel: Any = None, step_size: Any = None,
                       eig_bounds: Any = None) -> StepMatch:
  """The step `t` of an iterative KRR solver whose predictions are closest to `predictions`.

  `t* = argmin_{0 <= t <= T} mean_{b, j} (pred_bj - f_t(x_bj))^2` with `f_t` from
  `kcg.baselines.trajectory(algorithm, T, ridge, ...)` (CG, PCG, GD, Chebyshev or primal CG, on
  `phi(x)` or on raw `x` per `space`). Note that CG reaches the oracle at `t = k`, so every `t >= k`
  matches equally well there; the first minimiser is returned.

  Args:
    predictions: `[B, q]`.
    prompts: with `x_support, y_support, x_query`.
    algorithm: one of `kcg.baselines.ALGORITHMS`.
    max_steps: `T >= 0`.
    ridge: as in `kcg.baselines.trajectory`.
    feature_map: as in `kcg.baselines.trajectory`.
    space: as in `kcg.baselines.trajectory`.
    kernel: as in `kcg.baselines.trajectory`.
    step_size: as in `kcg.baselines.trajectory`.
    eig_bounds: as in `kcg.baselines.trajectory`.
  """
  steps_fn = baselines_lib.trajectory(algorithm, max_steps, ridge, feature_map=feature_map,
                                      space=space, kernel=kernel, step_size=step_size,
                                      eig_bounds=eig_bounds)
  x_support, y_support, x_query = _prompt_fields(prompts)
  pred = _as_predictions("predictions", predictions, x_query.shape[:-1], x_query.dtype)
  f_steps = steps_fn(x_support, y_support, x_query)  # [..., T + 1, q]
  diff_sq = jnp.square(f_steps - pred[..., None, :])
  step_axis = f_steps.ndim - 2
  other_axes = tuple(a for a in range(f_steps.ndim) if a != step_axis)
  distances = jnp.mean(diff_sq, axis=other_axes)
  assert distances.shape == (max_steps + 1,)
  step = jnp.argmin(distances)
  return StepMatch(step, distances, distances[step])


# ----------------------------------------------------------------------------------------------------
# Whole evaluations.
# ----------------------------------------------------------------------------------------------------


def _check_baselines(baselines: Any) -> dict[str, Predictor]:
  if baselines is None:
    return {}
  if not isinstance(baselines, Mapping):
    raise ValueError(
        f"baselines must be a dict {{name: predictor}} (e.g. kcg.baselines.default_suite(...)), got "
        f"{type(baselines).__name__}.")
  for name, fn in baselines.items():
    _check_predictor(f"baselines[{name!r}]", fn)
  return dict(baselines)


def evaluate(predict_fn: Predictor, prompts: Any,
             baselines: Mapping[str, Predictor] | None = None) -> dict[str, Any]:
  """Scores a predictor on held-out prompts and compares it with reference predictors.

  Returns a JSON-ready dict of Python floats:

  * `mse`, `nmse` (`mse / Var(y_query)`), `target_variance`: against `prompts.y_query`;
  * `mse_noiseless`: against `prompts.f_query` when the prompts carry it (excess risk plus noise-free);
  * `baselines[name]`: the baseline's own `mse` and `nmse`, and the model's agreement with it:
    `agreement_mse = mean (model - baseline)^2`, `relative_distance = |model - baseline| / |baseline|`,
    `cosine` and pooled `r2` (`prediction_similarity`).

  Args:
    predict_fn: the predictor under test.
    prompts: with `x_support [B, k, d]`, `y_support [B, k]`, `x_query [B, q, d]`, `y_query [B, q]`.
    baselines: `{name: predictor}`, e.g. `kcg.baselines.default_suite(ridge, t)`.
  """
  predict_fn = _check_predictor("predict_fn", predict_fn)
  result, _ = _evaluate(predict_fn, prompts, _check_baselines(baselines))
  return result


@jax.jit
def _error_report_core(pred: Array, y: Array) -> tuple[Array, Array, Array, Array]:
  """`mse, nmse, Var(y)` and the mean squared error of every prompt, `[B]`."""
  per_prompt = jnp.mean(jnp.square(pred - y).reshape(-1, y.shape[-1]), axis=-1)
  return _mse_core(pred, y), _normalized_mse_core(pred, y), jnp.var(y), per_prompt


def _evaluate(predict_fn: Predictor, prompts: Any,
              baselines: dict[str, Predictor]) -> tuple[dict[str, Any], np.ndarray]:
  """`evaluate`'s dict, and the per-prompt mean squared errors of the model, `[B]`."""
  x_support, y_support, x_query, y_query = _prompt_fields(prompts, need_targets=True)
  pred = _predict("predict_fn", predict_fn, x_support, y_support, x_query)
  pred = _as_predictions("predict_fn's predictions", pred, y_query.shape, y_query.dtype)
  error, normalized, variance, per_prompt_mse = _error_report_core(pred, y_query)
  result: dict[str, Any] = {
      "mse": float(error),
      "nmse": float(normalized),
      "target_variance": float(variance),
  }
  if getattr(prompts, "f_query", None) is not None:
    f_query = _as_predictions("prompts.f_query", prompts.f_query, y_query.shape, y_query.dtype)
    result["mse_noiseless"] = float(mse(pred, f_query))
  result["baselines"] = {}
  for name, fn in baselines.items():
    base = _predict(f"baselines[{name!r}]", fn, x_support, y_support, x_query)
    base = _as_predictions(f"baselines[{name!r}]'s predictions", base, y_query.shape, y_query.dtype)
    similarity = prediction_similarity(pred, base)
    result["baselines"][name] = {
        "mse": float(mse(base, y_query)),
        "nmse": float(normalized_mse(base, y_query)),
        "agreement_mse": float(similarity.squared_difference),
        "relative_distance": float(similarity.relative_distance),
        "cosine": float(similarity.cosine),
        "r2": float(similarity.r2),
    }
  return result, np.asarray(per_prompt_mse)


def error_vs_num_support(predict_fn: Any, sample_fn: Callable[[Any, int], Any],
                         num_supports: Sequence[int], key: Any, *,
                         baselines: Mapping[str, Predictor] | None = None,
                         factory: bool = False) -> SupportCurve:
  """Test error as a function of the number of supports `k`, for a model and baselines.

  For each `k` in `num_supports`, draws `prompts = sample_fn(fold_in(key, k), k)` and scores the model
  and every baseline on it with `evaluate` (same prompts for all, so differences are paired).

  Args:
    predict_fn: a predictor that accepts any `k`; or, with `factory=True`, a function `k -> predictor`
      (for models whose prompt layout fixes `k`).
    sample_fn: `(key, k) -> prompts`; `task_sampler(config)` builds one from a `kcg.tasks.TaskConfig`.
    num_supports: the `k` values, integers `>= 1`.
    key: a PRNG key.
    baselines: `{name: predictor}`, evaluated at every `k` (they all accept any `k`).
    factory: whether `predict_fn` is a `k -> predictor` factory.
  """
  if not callable(predict_fn):
    raise ValueError(f"predict_fn must be callable, got {predict_fn!r}.")
  if not callable(sample_fn):
    raise ValueError(f"sample_fn must be a callable (key, num_support) -> prompts, got {sample_fn!r}.")
  baselines = _check_baselines(baselines)
  if isinstance(num_supports, (numbers.Number, str)) or not isinstance(num_supports, Sequence):
    raise ValueError(f"num_supports must be a sequence of ints such as [5, 10, 20], got {num_supports!r}.")
  num_supports = [checks.check_positive_int("num_supports entry", k) for k in num_supports]
  if not num_supports:
    raise ValueError("num_supports is empty; pass at least one number of supports.")
  mses, stderrs, nmses = [], [], []
  baseline_mse = {name: [] for name in baselines}
  agreement = {name: [] for name in baselines}
  for k in num_supports:
    prompts = sample_fn(jax.random.fold_in(key, k), k)
    model = _check_predictor(f"predict_fn({k})" if factory else "predict_fn",
                             predict_fn(k) if factory else predict_fn)
    report, per_prompt = _evaluate(model, prompts, baselines)
    mses.append(report["mse"])
    nmses.append(report["nmse"])
    stderrs.append(float(np.std(per_prompt) / math.sqrt(per_prompt.shape[0])))
    for name in baselines:
      baseline_mse[name].append(report["baselines"][name]["mse"])
      agreement[name].append(report["baselines"][name]["agreement_mse"])
  as_np = lambda values: np.asarray(values, np.float64)
  return SupportCurve(np.asarray(num_supports), as_np(mses), as_np(stderrs), as_np(nmses),
                      {n: as_np(v) for n, v in baseline_mse.items()},
                      {n: as_np(v) for n, v in agreement.items()})


def task_sampler(config: Any) -> Callable[[Any, int], Any]:
  """`(key, k) -> kcg.tasks.sample(key, config with num_support = k)`, for `error_vs_num_support`."""
  if not isinstance(config, tasks_lib.TaskConfig):
    raise ValueError(f"config must be a kcg.tasks.TaskConfig, got {type(config).__name__}.")

  def sample_fn(key, num_support):
    return tasks_lib.sample(key, dataclasses.replace(config, num_support=num_support))

  return sample_fn


__all__ = (
    "GDStepFit", "R2Interval", "Similarity", "StepMatch", "SupportCurve", "best_matching_step",
    "cosine_similarity", "error_cosine", "error_vs_num_support", "evaluate", "fit_gd_preconditioner",
    "fit_gd_step", "implicit_weights", "mse", "normalized_mse", "per_problem_r2",
    "prediction_similarity", "r2_with_ci", "sensitivity_cosine", "task_sampler",
)
