"""Tests for kcg.baselines: every predictor against an independent NumPy / scikit-learn computation.

Tolerances. Everything runs in float64 (eps ~ 2.2e-16). The KRR systems below have
`A = X X^T + ridge I` with `k <= 12`, `d <= 6`, standard normal inputs and `ridge >= 0.1`, so
`cond(A) <= (|X|_2^2 + ridge) / ridge ~ 40 / 0.1 = 4e2`; a backward-stable solve then agrees with another
to `~ eps * cond ~ 1e-13` relative. We use `rtol=1e-9, atol=1e-11` for solver results (three orders of
margin for accumulation over a few CG steps and for the Krylov-basis reference) and `1e-12` for closed
formulas with no solve.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial import chebyshev as np_chebyshev
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor

from kcg import baselines
from kcg import features
from kcg import kernels

SOLVE_TOL = dict(rtol=1e-9, atol=1e-11)
FORMULA_TOL = dict(rtol=1e-12, atol=1e-12)
RIDGE = 0.3


def make_prompts(seed=0, batch=4, k=10, q=3, d=5):
  rng = np.random.default_rng(seed)
  x_support = rng.normal(size=(batch, k, d))
  w = rng.normal(size=(batch, d))
  y_support = np.einsum("bkd,bd->bk", x_support, w) + 0.1 * rng.normal(size=(batch, k))
  x_query = rng.normal(size=(batch, q, d))
  return x_support, y_support, x_query


# ------------------------------------------------------------------------------------------------
# Independent references.


def krylov_galerkin(a, b, operator, start, t):
  """`alpha_t = argmin_{alpha in span{start, op start, ..}} |alpha - A^{-1} b|_A`, by Arnoldi + Galerkin.

  CG (operator = A, start = b) and PCG (operator = M^{-1} A, start = M^{-1} b) iterates are this
  minimiser; the basis is built with twice-repeated Gram-Schmidt, not by the CG recurrences.
  """
  if t == 0:
    return np.zeros_like(b)
  basis = [start / np.linalg.norm(start)]
  for _ in range(t - 1):
    v = operator @ basis[-1]
    for _ in range(2):
      for u in basis:
        v = v - (u @ v) * u
    basis.append(v / np.linalg.norm(v))
  q = np.stack(basis, axis=1)
  return q @ np.linalg.solve(q.T @ a @ q, q.T @ b)


def np_cg_predict(xs, ys, xq, ridge, t):
  out = []
  for x_s, y_s, x_q in zip(xs, ys, xq):
    a = x_s @ x_s.T + ridge * np.eye(len(x_s))
    out.append(x_q @ x_s.T @ krylov_galerkin(a, y_s, a, y_s, t))
  return np.stack(out)


def np_gd_predict(xs, ys, xq, ridge, t, step=None):
  out = []
  for x_s, y_s, x_q in zip(xs, ys, xq):
    a = x_s @ x_s.T + ridge * np.eye(len(x_s))
    eig = np.linalg.eigvalsh(a)
    eta = 2 / (eig[0] + eig[-1]) if step is None else step
    alpha = np.zeros_like(y_s)
    for _ in range(t):
      alpha = alpha + eta * (y_s - a @ alpha)
    out.append(x_q @ x_s.T @ alpha)
  return np.stack(out)


def np_chebyshev_predict(xs, ys, xq, ridge, t):
  """`alpha_t = A^{-1} (I - P_t(A)) y`, `P_t(lam) = T_t((theta - lam)/delta) / T_t(theta/delta)`."""
  out = []
  for x_s, y_s, x_q in zip(xs, ys, xq):
    a = x_s @ x_s.T + ridge * np.eye(len(x_s))
    lam, u = np.linalg.eigh(a)
    theta, delta = (lam[-1] + lam[0]) / 2, (lam[-1] - lam[0]) / 2
    coef = [0] * t + [1]
    residual_poly = np_chebyshev.chebval((theta - lam) / delta, coef) / np_chebyshev.chebval(
        theta / delta, coef)
    alpha = u @ (((1 - residual_poly) / lam) * (u.T @ y_s))
    out.append(x_q @ x_s.T @ alpha)
  return np.stack(out)


# ------------------------------------------------------------------------------------------------
# Closed-form baselines.


def test_krr_oracle_matches_sklearn_kernel_ridge():
  xs, ys, xq = make_prompts()
  got = baselines.krr_oracle(RIDGE)(xs, ys, xq)
  want = np.stack([KernelRidge(alpha=RIDGE, kernel="linear").fit(x, y).predict(x_q)
                   for x, y, x_q in zip(xs, ys, xq)])
  np.testing.assert_allclose(got, want, **SOLVE_TOL)


def test_krr_oracle_with_feature_map_and_kernel_matches_sklearn_precomputed():
  xs, ys, xq = make_prompts(seed=1)
  fm = features.random_relu(16)
  params = fm.init(jax.random.key(0), xs.shape[-1])
  phi = functools.partial(fm.apply, params)
  got = baselines.krr_oracle(RIDGE, phi)(xs, ys, xq)
  want = np.stack([KernelRidge(alpha=RIDGE, kernel="linear").fit(np.asarray(phi(x)), y)
                   .predict(np.asarray(phi(x_q))) for x, y, x_q in zip(xs, ys, xq)])
  np.testing.assert_allclose(got, want, **SOLVE_TOL)

  tau = 4.0  # exp(<x, x'>/tau) with |x|^2 ~ 5: entries O(e^2), cond(A) ~ 1e3, still far from 1e-9.
  got = baselines.krr_oracle(RIDGE, kernel=kernels.ExponentialKernel(tau))(xs, ys, xq)
  want = []
  for x, y, x_q in zip(xs, ys, xq):
    model = KernelRidge(alpha=RIDGE, kernel="precomputed").fit(np.exp(x @ x.T / tau), y)
    want.append(model.predict(np.exp(x_q @ x.T / tau)))
  np.testing.assert_allclose(got, np.stack(want), **SOLVE_TOL)


def test_ridge_matches_sklearn_and_equals_the_oracle():
  xs, ys, xq = make_prompts(seed=2)
  got = baselines.ridge(RIDGE)(xs, ys, xq)
  want = np.stack([Ridge(alpha=RIDGE, fit_intercept=False, solver="cholesky").fit(x, y).predict(x_q)
                   for x, y, x_q in zip(xs, ys, xq)])
  np.testing.assert_allclose(got, want, **SOLVE_TOL)
  np.testing.assert_allclose(got, baselines.krr_oracle(RIDGE)(xs, ys, xq), **SOLVE_TOL)


@pytest.mark.parametrize("k", [3, 5, 12])  # under-determined, square, over-determined (d = 5)
def test_least_squares_is_the_minimum_norm_solution(k):
  xs, ys, xq = make_prompts(seed=3, k=k)
  got = baselines.least_squares()(xs, ys, xq)
  want = np.stack([x_q @ np.linalg.lstsq(x, y, rcond=None)[0] for x, y, x_q in zip(xs, ys, xq)])
  np.testing.assert_allclose(got, want, **SOLVE_TOL)
  if k < xs.shape[-1]:  # k < d: the least-squares fit interpolates the supports.
    np.testing.assert_allclose(baselines.least_squares()(xs, ys, xs), ys, **SOLVE_TOL)


def test_knn_matches_sklearn():
  xs, ys, xq = make_prompts(seed=4, k=12, q=6)
  for n in (1, 3, 12):
    got = baselines.knn(n)(xs, ys, xq)
    want = np.stack([KNeighborsRegressor(n_neighbors=n).fit(x, y).predict(x_q)
                     for x, y, x_q in zip(xs, ys, xq)])
    np.testing.assert_allclose(got, want, **FORMULA_TOL)


def test_averaging_kinds():
  xs, ys, xq = make_prompts(seed=5)
  k = xs.shape[1]
  garg = np.einsum("bqd,bkd,bk->bq", xq, xs, ys) / k
  np.testing.assert_allclose(baselines.averaging()(xs, ys, xq), garg, **FORMULA_TOL)
  np.testing.assert_allclose(baselines.one_step_gd(1.0)(xs, ys, xq), garg, **FORMULA_TOL)
  mean = np.broadcast_to(ys.mean(axis=1, keepdims=True), xq.shape[:2])
  np.testing.assert_allclose(baselines.averaging("mean")(xs, ys, xq), mean, **FORMULA_TOL)
  logits = np.einsum("bqd,bkd->bqk", xq, xs) / 2.0
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(baselines.averaging("softmax", temperature=2.0)(xs, ys, xq),
                             np.einsum("bqk,bk->bq", weights, ys), **FORMULA_TOL)


def test_one_step_gd_formula_and_conventions():
  xs, ys, xq = make_prompts(seed=6)
  k, d = xs.shape[1:]
  eta = 0.37
  # One GD step from w = 0 on L(w) = |Xw - y|^2 / (2k): w_1 = -eta grad L(0) = eta X^T y / k.
  w1 = eta * np.einsum("bkd,bk->bd", xs, ys) / k
  np.testing.assert_allclose(baselines.one_step_gd(eta)(xs, ys, xq),
                             np.einsum("bqd,bd->bq", xq, w1), **FORMULA_TOL)
  np.testing.assert_allclose(baselines.one_step_gd(eta, "sum")(xs, ys, xq),
                             k * np.einsum("bqd,bd->bq", xq, w1), **FORMULA_TOL)
  gamma = np.random.default_rng(0).normal(size=(d, d))
  want = np.einsum("nqa,ac,nkc,nk->nq", xq, gamma, xs, ys) / k
  np.testing.assert_allclose(baselines.one_step_gd(gamma)(xs, ys, xq), want, **FORMULA_TOL)


# ------------------------------------------------------------------------------------------------
# Iterative baselines.


@pytest.mark.parametrize("t", [0, 1, 2, 4])
def test_cg_steps_match_the_krylov_minimiser(t):
  xs, ys, xq = make_prompts(seed=7)
  np.testing.assert_allclose(baselines.cg_steps(t, RIDGE)(xs, ys, xq),
                             np_cg_predict(xs, ys, xq, RIDGE, t), **SOLVE_TOL)


def test_cg_steps_at_t_equal_k_is_the_oracle():
  xs, ys, xq = make_prompts(seed=8, k=6)
  k = xs.shape[1]
  np.testing.assert_allclose(baselines.cg_steps(k, RIDGE)(xs, ys, xq),
                             baselines.krr_oracle(RIDGE)(xs, ys, xq), **SOLVE_TOL)


def test_cg_steps_feature_and_data_space():
  xs, ys, xq = make_prompts(seed=9)
  fm = features.random_relu(8)
  phi = functools.partial(fm.apply, fm.init(jax.random.key(1), xs.shape[-1]))
  t = 3
  in_data = baselines.cg_steps(t, RIDGE, phi, space="data")(xs, ys, xq)
  np.testing.assert_allclose(in_data, baselines.cg_steps(t, RIDGE)(xs, ys, xq), **FORMULA_TOL)
  in_features = baselines.cg_steps(t, RIDGE, phi)(xs, ys, xq)
  phis, phiq = np.asarray(phi(xs)), np.asarray(phi(xq))
  np.testing.assert_allclose(in_features, np_cg_predict(phis, ys, phiq, RIDGE, t), **SOLVE_TOL)
  assert np.max(np.abs(in_features - in_data)) > 0.1  # the two spaces are different baselines.


def test_primal_cg_steps_match_the_primal_krylov_minimiser():
  xs, ys, xq = make_prompts(seed=10)
  t = 2
  want = []
  for x, y, x_q in zip(xs, ys, xq):
    a = x.T @ x + RIDGE * np.eye(x.shape[1])
    want.append(x_q @ krylov_galerkin(a, x.T @ y, a, x.T @ y, t))
  got = baselines.cg_steps(t, RIDGE, form="primal")(xs, ys, xq)
  np.testing.assert_allclose(got, np.stack(want), **SOLVE_TOL)
  assert np.max(np.abs(got - baselines.cg_steps(t, RIDGE)(xs, ys, xq))) > 1e-3


@pytest.mark.parametrize("t", [1, 3])
def test_pcg_steps_match_the_preconditioned_krylov_minimiser(t):
  rng = np.random.default_rng(11)
  xs, ys, xq = make_prompts(seed=11)
  xs = xs * rng.uniform(0.3, 3.0, size=xs.shape[:2])[..., None]  # uneven norms: Jacobi matters.
  want = []
  for x, y, x_q in zip(xs, ys, xq):
    a = x @ x.T + RIDGE * np.eye(len(x))
    m_inv = 1 / np.diag(a)
    want.append(x_q @ x.T @ krylov_galerkin(a, y, m_inv[:, None] * a, m_inv * y, t))
  np.testing.assert_allclose(baselines.pcg_steps(t, RIDGE)(xs, ys, xq), np.stack(want), **SOLVE_TOL)


@pytest.mark.parametrize("step_size", [None, 0.01])
def test_gd_steps_match_a_numpy_loop(step_size):
  xs, ys, xq = make_prompts(seed=12)
  got = baselines.gd_steps(5, RIDGE, step_size)(xs, ys, xq)
  np.testing.assert_allclose(got, np_gd_predict(xs, ys, xq, RIDGE, 5, step_size), **SOLVE_TOL)


def test_chebyshev_steps_match_the_chebyshev_polynomial():
  xs, ys, xq = make_prompts(seed=13)
  for t in (1, 4):
    np.testing.assert_allclose(baselines.chebyshev_steps(t, RIDGE)(xs, ys, xq),
                               np_chebyshev_predict(xs, ys, xq, RIDGE, t), **SOLVE_TOL)


def test_trajectory_holds_every_step():
  xs, ys, xq = make_prompts(seed=14)
  steps = baselines.trajectory("cg", 4, RIDGE)(xs, ys, xq)
  assert steps.shape == (xs.shape[0], 5, xq.shape[1])
  for t in range(5):
    np.testing.assert_allclose(steps[:, t], baselines.cg_steps(t, RIDGE)(xs, ys, xq), **FORMULA_TOL)


# ------------------------------------------------------------------------------------------------
# Transformations, dtypes, registry.


ALL_BASELINES = {
    "krr_oracle": dict(ridge=RIDGE),
    "ridge": dict(ridge=RIDGE),
    "least_squares": {},
    "cg_steps": dict(num_steps=2, ridge=RIDGE),
    "pcg_steps": dict(num_steps=2, ridge=RIDGE),
    "gd_steps": dict(num_steps=2, ridge=RIDGE),
    "chebyshev_steps": dict(num_steps=2, ridge=RIDGE),
    "knn": dict(num_neighbors=3),
    "averaging": {},
    "one_step_gd": dict(eta=0.5),
}


def test_registry_covers_every_baseline():
  assert set(ALL_BASELINES) == set(baselines.BASELINES)


@pytest.mark.parametrize("name", sorted(ALL_BASELINES))
def test_jit_vmap_and_float32(name):
  predict = baselines.get(name, **ALL_BASELINES[name])
  xs, ys, xq = make_prompts(seed=15, batch=3)
  eager = predict(xs, ys, xq)
  assert eager.shape == (3, xq.shape[1]) and eager.dtype == jnp.float64
  np.testing.assert_allclose(jax.jit(predict)(xs, ys, xq), eager, **FORMULA_TOL)
  np.testing.assert_allclose(jax.vmap(predict)(xs, ys, xq), eager, **SOLVE_TOL)
  as_f32 = predict(*(np.asarray(a, np.float32) for a in (xs, ys, xq)))
  assert as_f32.dtype == jnp.float32
  # float32 rounding (6e-8) times cond(A) ~ 4e2 and a few steps: ~1e-4 relative; 1e-3 leaves margin.
  np.testing.assert_allclose(as_f32, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["cg_steps", "knn", "one_step_gd", "averaging"])
def test_any_number_of_batch_dims_and_integer_inputs(name):
  predict = baselines.get(name, **ALL_BASELINES[name])
  xs, ys, xq = make_prompts(seed=15, batch=3)
  eager = predict(xs, ys, xq)
  np.testing.assert_allclose(predict(xs[0], ys[0], xq[0]), eager[0], **SOLVE_TOL)
  np.testing.assert_allclose(predict(xs[None], ys[None], xq[None])[0], eager, **SOLVE_TOL)
  as_int = predict(*(np.round(a).astype(np.int32) for a in (xs, ys, xq)))
  assert as_int.dtype == jnp.float64


def test_default_suite_runs():
  xs, ys, xq = make_prompts(seed=16)
  suite = baselines.default_suite(RIDGE, 3)
  assert {"krr_oracle", "least_squares", "cg_3", "gd_3", "chebyshev_3", "knn_3", "averaging",
          "mean"} == set(suite)
  for predict in suite.values():
    assert predict(xs, ys, xq).shape == xq.shape[:2]


# ------------------------------------------------------------------------------------------------
# Every check fires.


@pytest.mark.parametrize("build, match", [
    (lambda: baselines.get("newton"), "unknown baseline"),
    (lambda: baselines.get("knn", k=3), "bad hyper-parameters"),
    (lambda: baselines.krr_oracle(0.0), "ridge"),
    (lambda: baselines.ridge(-1.0), "ridge"),
    (lambda: baselines.cg_steps(2, 0.0), "ridge"),
    (lambda: baselines.cg_steps(-1, 0.1), "num_steps"),
    (lambda: baselines.gd_steps(1.5, 0.1), "num_steps"),
    (lambda: baselines.cg_steps(2, 0.1, space="latent"), "space"),
    (lambda: baselines.cg_steps(2, 0.1, form="newton"), "form"),
    (lambda: baselines.cg_steps(2, 0.1, form="primal", kernel=kernels.linear_kernel), "linear"),
    (lambda: baselines.cg_steps(2, 0.1, features.identity()), "functools.partial"),
    (lambda: baselines.trajectory("cg", 2, 0.1, step_size=0.1), "step_size"),
    (lambda: baselines.trajectory("gd", 2, 0.1, eig_bounds=(1.0, 2.0)), "eig_bounds"),
    (lambda: baselines.trajectory("lanczos", 2, 0.1), "algorithm"),
    (lambda: baselines.gd_steps(2, 0.1, step_size=0.0), "step_size"),
    (lambda: baselines.knn(0), "num_neighbors"),
    (lambda: baselines.averaging("median"), "averaging kind"),
    (lambda: baselines.averaging("softmax", temperature=0.0), "temperature"),
    (lambda: baselines.one_step_gd(float("nan")), "NaN"),
    (lambda: baselines.one_step_gd("big"), "eta"),
    (lambda: baselines.one_step_gd(np.ones((2, 3))), "square"),
    (lambda: baselines.one_step_gd(0.1, loss_reduction="max"), "loss_reduction"),
])
def test_factory_checks_fire(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("args, match", [
    ((np.ones((2, 4, 3)), np.ones((2, 5)), np.ones((2, 1, 3))), "one target per"),
    ((np.ones((2, 4, 3)), np.ones((2, 4, 2)), np.ones((2, 1, 3))), "multi-output"),
    ((np.ones((2, 4, 3)), np.ones((2, 4)), np.ones((2, 1, 2))), "input dimension mismatch"),
    ((np.ones((2, 4, 3)), np.ones((2, 4)), np.ones((3, 1, 3))), "batch dims"),
    ((np.ones((2, 4, 3)), np.ones((2, 4)), np.ones((1, 3))), "batch dims"),
    ((np.ones(3), np.ones(()), np.ones((1, 3))), "at least 2 dimensions"),
    ((np.full((2, 4, 3), np.nan), np.ones((2, 4)), np.ones((2, 1, 3))), "NaN"),
    ((np.ones((2, 4, 3)), np.array([[1, 2, np.inf, 4]] * 2), np.ones((2, 1, 3))), "NaN"),
])
def test_input_checks_fire(args, match):
  for name in ("krr_oracle", "cg_steps", "knn"):
    with pytest.raises(ValueError, match=match):
      baselines.get(name, **ALL_BASELINES[name])(*args)


def test_call_time_checks_fire():
  xs, ys, xq = make_prompts(seed=17, k=4)
  with pytest.raises(ValueError, match="num_neighbors <= 4"):
    baselines.knn(5)(xs, ys, xq)
  with pytest.raises(ValueError, match="d = 5"):
    baselines.one_step_gd(np.eye(3))(xs, ys, xq)
  with pytest.raises(ValueError, match="feature_map must map"):
    baselines.krr_oracle(0.1, lambda x: x.reshape(-1))(xs, ys, xq)
