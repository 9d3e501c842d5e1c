"""Tests for kcg.evaluation: metrics against NumPy formulas, and identification of planted algorithms.

Tolerances (float64, eps ~ 2.2e-16): closed formulas with no solve are checked to `1e-12`; quantities
that go through a KRR solve with `cond(K + ridge I) <~ 4e2` (inputs N(0, I), k <= 12, d <= 6, ridge 0.3)
to `1e-9`, as in test_baselines.py. A planted step or preconditioner is recovered from a linear least
squares problem whose design is well conditioned (random Gaussian outer products), so to `1e-9` too.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import baselines
from kcg import evaluation
from kcg import tasks

FORMULA_TOL = dict(rtol=1e-12, atol=1e-12)
SOLVE_TOL = dict(rtol=1e-9, atol=1e-11)
RIDGE = 0.3


@pytest.fixture(scope="module")
def prompts():
  config = tasks.TaskConfig(family="noisy_linear", input_dim=5, num_support=10, num_query=6,
                            batch_size=48, noise_std=0.3)
  return tasks.sample(jax.random.key(0), config)


def predict_on(predict, p):
  return predict(p.x_support, p.y_support, p.x_query)


# ------------------------------------------------------------------------------------------------
# Pointwise measures.


def test_mse_and_normalized_mse(prompts):
  pred = np.asarray(predict_on(baselines.krr_oracle(RIDGE), prompts))
  y = np.asarray(prompts.y_query)
  np.testing.assert_allclose(evaluation.mse(pred, y), np.mean((pred - y) ** 2), **FORMULA_TOL)
  np.testing.assert_allclose(evaluation.normalized_mse(pred, y), np.mean((pred - y) ** 2) / np.var(y),
                             **FORMULA_TOL)
  # Predicting the mean target scores exactly 1.
  np.testing.assert_allclose(evaluation.normalized_mse(np.full_like(y, y.mean()), y), 1.0, **FORMULA_TOL)
  constant = np.ones((2, 3))
  assert float(evaluation.normalized_mse(constant, constant)) == 0.0
  assert float(evaluation.normalized_mse(constant + 1, constant)) == math.inf


def test_prediction_similarity_formulas():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 7, 4))
  sim = evaluation.prediction_similarity(a, b)
  np.testing.assert_allclose(sim.squared_difference, np.mean((a - b) ** 2), **FORMULA_TOL)
  np.testing.assert_allclose(sim.relative_distance, np.linalg.norm(a - b) / np.linalg.norm(b),
                             **FORMULA_TOL)
  np.testing.assert_allclose(sim.cosine, np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b),
                             **FORMULA_TOL)
  np.testing.assert_allclose(sim.r2, 1 - np.sum((a - b) ** 2) / np.sum((b - b.mean()) ** 2),
                             **FORMULA_TOL)
  same = evaluation.prediction_similarity(a, a)
  assert [float(x) for x in same] == [0.0, 0.0, pytest.approx(1.0, abs=1e-15), 1.0]
  jitted = jax.jit(evaluation.prediction_similarity)(a, b)
  np.testing.assert_allclose(jnp.stack(jitted), jnp.stack(sim), **FORMULA_TOL)
  zeros = np.zeros((2, 3))
  assert float(evaluation.prediction_similarity(zeros, zeros).relative_distance) == 0.0
  assert float(evaluation.prediction_similarity(zeros + 1, zeros).relative_distance) == math.inf
  assert float(evaluation.prediction_similarity(zeros, zeros).cosine) == 0.0


def test_error_cosine_and_cosine_similarity():
  rng = np.random.default_rng(1)
  a, b, y = rng.normal(size=(3, 5, 4))
  ea, eb = (a - y).ravel(), (b - y).ravel()
  np.testing.assert_allclose(evaluation.error_cosine(a, b, y),
                             ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb), **FORMULA_TOL)
  rows = evaluation.cosine_similarity(a, b, axis=-1)
  np.testing.assert_allclose(
      rows, np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1), **FORMULA_TOL)


# ------------------------------------------------------------------------------------------------
# Per-problem R^2 with bootstrap intervals.


def test_r2_with_ci_is_one_for_identical_predictions(prompts):
  pred = predict_on(baselines.ridge(RIDGE), prompts)
  result = evaluation.r2_with_ci(pred, pred, jax.random.key(0), num_bootstrap=200)
  assert float(result.r2) == float(result.lower) == float(result.upper) == 1.0
  assert result.per_problem.shape == (prompts.x_query.shape[0],)


def test_r2_with_ci_formula_and_interval():
  rng = np.random.default_rng(2)
  num_problems, q = 400, 8
  b = rng.normal(size=(num_problems, q))
  a = b + 0.5 * rng.normal(size=(num_problems, q))  # expected R^2_b ~ 1 - 0.25 = 0.75.
  result = evaluation.r2_with_ci(a, b, jax.random.key(1), num_bootstrap=2000, confidence=0.9)
  want = 1 - np.sum((a - b) ** 2, 1) / np.sum((b - b.mean(1, keepdims=True)) ** 2, 1)
  np.testing.assert_allclose(result.per_problem, want, **FORMULA_TOL)
  np.testing.assert_allclose(result.r2, want.mean(), **FORMULA_TOL)
  assert result.lower < result.r2 < result.upper
  # The percentile interval should be close to the normal one, mean -+ z_{0.95} sd / sqrt(B)
  # (z = 1.645); a 25% margin covers the Monte-Carlo error of 2000 resamples.
  half_width = 1.645 * want.std() / math.sqrt(num_problems)
  assert 0.75 * half_width < (result.upper - result.lower) / 2 < 1.25 * half_width
  # Deterministic given the key; a wider confidence gives a wider interval.
  again = evaluation.r2_with_ci(a, b, jax.random.key(1), num_bootstrap=2000, confidence=0.9)
  assert float(again.lower) == float(result.lower)
  wider = evaluation.r2_with_ci(a, b, jax.random.key(1), num_bootstrap=2000, confidence=0.99)
  assert wider.lower < result.lower and wider.upper > result.upper


def test_r2_skips_problems_where_it_is_undefined():
  b = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])  # second problem: constant reference.
  a = b + np.array([[0.1, 0.0, -0.1], [1.0, 0.0, 0.0]])
  result = evaluation.r2_with_ci(a, b, jax.random.key(0), num_bootstrap=50)
  assert np.isnan(result.per_problem[1])
  np.testing.assert_allclose(result.r2, 1 - 0.02 / 2.0, **FORMULA_TOL)


# ------------------------------------------------------------------------------------------------
# Gradients with respect to the query.


def test_implicit_weights_of_linear_predictors(prompts):
  rng = np.random.default_rng(3)
  w = rng.normal(size=prompts.x_query.shape[-1])
  linear = lambda xs, ys, xq: jnp.einsum("bqd,d->bq", xq, w)
  want = np.broadcast_to(w, prompts.x_query.shape)
  np.testing.assert_allclose(evaluation.implicit_weights(linear, prompts), want, **FORMULA_TOL)
  np.testing.assert_allclose(
      evaluation.implicit_weights(linear, prompts, independent_queries=True), want, **FORMULA_TOL)
  # Ridge regression is linear in the query with w = (X^T X + ridge I)^{-1} X^T y per problem.
  xs, ys = np.asarray(prompts.x_support), np.asarray(prompts.y_support)
  w_ridge = np.stack([np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ y)
                      for x, y in zip(xs, ys)])
  got = evaluation.implicit_weights(baselines.ridge(RIDGE), prompts, independent_queries=True)
  np.testing.assert_allclose(got, np.broadcast_to(w_ridge[:, None], got.shape), **SOLVE_TOL)


def test_implicit_weights_keep_only_each_querys_own_gradient(prompts):
  """With queries that interact, the Jacobian diagonal is the right answer; the summed gradient is not."""
  w = np.arange(1.0, prompts.x_query.shape[-1] + 1)
  coupling = 0.5

  def interacting(xs, ys, xq):  # f_j = w^T x_j + c * sum_i x_i[0]: every query sees the others.
    return jnp.einsum("bqd,d->bq", xq, w) + coupling * jnp.sum(xq[..., 0], axis=-1, keepdims=True)

  own = np.array(w)
  own[0] += coupling
  got = evaluation.implicit_weights(interacting, prompts)
  np.testing.assert_allclose(got, np.broadcast_to(own, got.shape), **FORMULA_TOL)
  summed = evaluation.implicit_weights(interacting, prompts, independent_queries=True)
  q = prompts.x_query.shape[1]
  assert np.allclose(summed[..., 0], w[0] + q * coupling)


def test_sensitivity_cosine(prompts):
  krr = baselines.krr_oracle(RIDGE)
  assert np.allclose(evaluation.sensitivity_cosine(krr, krr, prompts), 1.0, atol=1e-12)
  negated = lambda xs, ys, xq: -krr(xs, ys, xq)
  assert np.allclose(evaluation.sensitivity_cosine(krr, negated, prompts), -1.0, atol=1e-12)
  constant = lambda xs, ys, xq: jnp.zeros(xq.shape[:-1], xq.dtype)
  assert np.all(evaluation.sensitivity_cosine(krr, constant, prompts) == 0.0)
  # Three CG steps on a 5-dim problem point close to, but not exactly along, the oracle's weights.
  cos = evaluation.sensitivity_cosine(baselines.cg_steps(3, RIDGE), krr, prompts,
                                      independent_queries=True)
  assert cos.shape == prompts.x_query.shape[:2]
  assert 0.8 < float(jnp.mean(cos)) < 1.0 - 1e-6


# ------------------------------------------------------------------------------------------------
# Algorithm identification.


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_fit_gd_step_recovers_a_planted_step(prompts, loss_reduction):
  eta = 0.37
  pred = predict_on(baselines.one_step_gd(eta, loss_reduction), prompts)
  fit = evaluation.fit_gd_step(pred, prompts, loss_reduction)
  np.testing.assert_allclose(fit.eta, eta, **SOLVE_TOL)
  assert float(fit.residual_mse) < 1e-25 and float(fit.r2) == pytest.approx(1.0, abs=1e-12)
  # With other predictions the fit is the least-squares eta: compare with numpy's lstsq.
  other = np.asarray(predict_on(baselines.krr_oracle(RIDGE), prompts))
  g = np.asarray(predict_on(baselines.one_step_gd(1.0, loss_reduction), prompts)).ravel()
  want_eta = np.linalg.lstsq(g[:, None], other.ravel(), rcond=None)[0][0]
  fit = evaluation.fit_gd_step(other, prompts, loss_reduction)
  np.testing.assert_allclose(fit.eta, want_eta, **SOLVE_TOL)
  np.testing.assert_allclose(fit.residual_mse, np.mean((other.ravel() - want_eta * g) ** 2),
                             **SOLVE_TOL)


def test_fit_gd_preconditioner_recovers_a_planted_matrix(prompts):
  d = prompts.x_query.shape[-1]
  gamma = np.random.default_rng(4).normal(size=(d, d))
  pred = predict_on(baselines.one_step_gd(gamma), prompts)
  fit = evaluation.fit_gd_preconditioner(pred, prompts)
  np.testing.assert_allclose(fit.eta, gamma, **SOLVE_TOL)
  assert float(fit.residual_mse) < 1e-20


@pytest.mark.parametrize("algorithm, planted", [("cg", 0), ("cg", 3), ("gd", 4), ("pcg", 2),
                                                ("chebyshev", 5), ("primal_cg", 2)])
def test_best_matching_step_recovers_the_planted_step(prompts, algorithm, planted):
  pred = baselines.trajectory(algorithm, planted, RIDGE)(
      prompts.x_support, prompts.y_support, prompts.x_query)[..., -1, :]
  match = evaluation.best_matching_step(pred, prompts, algorithm, 8, ridge=RIDGE)
  assert int(match.step) == planted
  assert match.distances.shape == (9,)
  assert float(match.best_distance) < 1e-25
  assert float(jnp.sort(match.distances)[1]) > 1e-6  # the match is unambiguous.


def test_best_matching_step_tells_feature_space_from_data_space(prompts):
  from kcg import features
  import functools
  fm = features.random_relu(12)
  phi = functools.partial(fm.apply, fm.init(jax.random.key(2), prompts.x_query.shape[-1]))
  pred = predict_on(baselines.cg_steps(2, RIDGE, phi), prompts)
  in_features = evaluation.best_matching_step(pred, prompts, "cg", 6, ridge=RIDGE, feature_map=phi)
  in_data = evaluation.best_matching_step(pred, prompts, "cg", 6, ridge=RIDGE, feature_map=phi,
                                          space="data")
  assert int(in_features.step) == 2 and float(in_features.best_distance) < 1e-25
  assert float(in_data.best_distance) > 1e-3


# ------------------------------------------------------------------------------------------------
# Whole evaluations.


def test_evaluate_reports_errors_and_agreement(prompts):
  suite = baselines.default_suite(RIDGE, 3)
  model = suite["cg_3"]
  report = evaluation.evaluate(model, prompts, suite)
  json.dumps(report)  # JSON-ready.
  pred = np.asarray(predict_on(model, prompts))
  y = np.asarray(prompts.y_query)
  assert report["mse"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-12)
  assert report["nmse"] == pytest.approx(np.mean((pred - y) ** 2) / np.var(y), rel=1e-12)
  assert report["mse_noiseless"] == pytest.approx(np.mean((pred - np.asarray(prompts.f_query)) ** 2),
                                                  rel=1e-12)
  assert set(report["baselines"]) == set(suite)
  assert report["baselines"]["cg_3"]["agreement_mse"] == 0.0
  assert report["baselines"]["cg_3"]["mse"] == report["mse"]
  krr = report["baselines"]["krr_oracle"]
  oracle = np.asarray(predict_on(suite["krr_oracle"], prompts))
  assert krr["agreement_mse"] == pytest.approx(np.mean((pred - oracle) ** 2), rel=1e-9)
  assert set(krr) == {"mse", "nmse", "agreement_mse", "relative_distance", "cosine", "r2"}
  # The oracle beats averaging and k-NN on a linear task with k = 2d supports.
  assert krr["mse"] < report["baselines"]["averaging"]["mse"]
  assert krr["mse"] < report["baselines"]["knn_3"]["mse"]


def test_evaluate_accepts_a_float32_model_against_float64_targets(prompts):
  model32 = lambda xs, ys, xq: baselines.krr_oracle(RIDGE)(
      *(jnp.asarray(a, jnp.float32) for a in (xs, ys, xq)))
  report = evaluation.evaluate(model32, prompts, {"krr": baselines.krr_oracle(RIDGE)})
  assert report["baselines"]["krr"]["relative_distance"] < 1e-4  # float32 solve, cond ~ 4e2.


def linear_task_sampler(d=4, q=4, batch=32):
  """A cheap `(key, k) -> prompts` sampler (NumPy, seeded by the key) for noiseless linear tasks."""
  def sample_fn(key, k):
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    x_support, x_query = rng.normal(size=(batch, k, d)), rng.normal(size=(batch, q, d))
    w = rng.normal(size=(batch, d)) / math.sqrt(d)
    return tasks.Prompts(x_support, np.einsum("bkd,bd->bk", x_support, w), x_query,
                         np.einsum("bqd,bd->bq", x_query, w), None, None)
  return sample_fn


def test_error_vs_num_support():
  num_supports = [2, 8, 16]
  curve = evaluation.error_vs_num_support(
      baselines.krr_oracle(0.01), linear_task_sampler(), num_supports, jax.random.key(0),
      baselines={"averaging": baselines.averaging()})
  assert list(curve.num_support) == num_supports
  assert curve.mse.shape == curve.nmse.shape == curve.mse_stderr.shape == (3,)
  assert curve.mse[-1] < 1e-3 < curve.mse[0]  # noiseless, k >> d: the oracle interpolates.
  assert np.all(curve.mse_stderr > 0)
  assert curve.baseline_mse["averaging"][-1] > 10 * curve.mse[-1]
  by_factory = evaluation.error_vs_num_support(
      lambda k: baselines.krr_oracle(0.01), linear_task_sampler(), num_supports, jax.random.key(0),
      factory=True)
  np.testing.assert_array_equal(by_factory.mse, curve.mse)  # same keys, same prompts.


def test_task_sampler_sets_the_number_of_supports():
  config = tasks.TaskConfig(family="linear", input_dim=4, num_query=2, batch_size=3)
  sampled = evaluation.task_sampler(config)(jax.random.key(0), 7)
  assert sampled.x_support.shape == (3, 7, 4) and sampled.y_query.shape == (3, 2)


# ------------------------------------------------------------------------------------------------
# Every check fires.


def test_checks_fire(prompts):
  pred = predict_on(baselines.krr_oracle(RIDGE), prompts)
  key = jax.random.key(0)
  cases = [
      (lambda: evaluation.mse(pred, pred[:, :2]), "same shape"),
      (lambda: evaluation.mse(pred.at[0, 0].set(jnp.nan), pred), "NaN"),
      (lambda: evaluation.r2_with_ci(pred[:, :1], pred[:, :1], key), "q >= 2"),
      (lambda: evaluation.r2_with_ci(pred, pred, key, num_bootstrap=0), "num_bootstrap"),
      (lambda: evaluation.r2_with_ci(pred, pred, key, confidence=1.0), "confidence"),
      (lambda: evaluation.fit_gd_step(pred[:, :2], prompts), "one prediction per query"),
      (lambda: evaluation.fit_gd_step(pred, prompts, loss_reduction="max"), "loss_reduction"),
      (lambda: evaluation.fit_gd_preconditioner(pred, prompts, loss_reduction="max"),
       "loss_reduction"),
      (lambda: evaluation.best_matching_step(pred, prompts, "newton", 3, ridge=RIDGE), "algorithm"),
      (lambda: evaluation.best_matching_step(pred, prompts, "cg", -1, ridge=RIDGE), "num_steps"),
      (lambda: evaluation.best_matching_step(pred, prompts, "cg", 3, ridge=0.0), "ridge"),
      (lambda: evaluation.evaluate(baselines.ridge(RIDGE), (1, 2)), "prompts must have fields"),
      (lambda: evaluation.evaluate("model", prompts), "predictor"),
      (lambda: evaluation.evaluate(lambda xs, ys, xq: xq, prompts), "one prediction per query"),
      (lambda: evaluation.evaluate(baselines.ridge(RIDGE), prompts, [baselines.knn(1)]), "dict"),
      (lambda: evaluation.implicit_weights(None, prompts), "predictor"),
      (lambda: evaluation.error_vs_num_support(baselines.ridge(RIDGE), None, [2], key), "sample_fn"),
      (lambda: evaluation.error_vs_num_support(
          baselines.ridge(RIDGE), lambda k, n: prompts, 4, key), "sequence"),
      (lambda: evaluation.error_vs_num_support(
          baselines.ridge(RIDGE), lambda k, n: prompts, [], key), "empty"),
      (lambda: evaluation.error_vs_num_support(
          baselines.ridge(RIDGE), lambda k, n: prompts, [0], key), ">= 1"),
      (lambda: evaluation.task_sampler({"family": "linear"}), "TaskConfig"),
  ]
  for build, match in cases:
    with pytest.raises(ValueError, match=match):
      build()
