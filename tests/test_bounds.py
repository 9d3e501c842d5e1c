"""kcg.bounds: the rates, the condition number, and that each bound holds for its solver.

A bound is checked as `|f_t - f*| <= bound_t * (1 + 1e-8) + floor` with the rounding floor
`100 * eps * kappa * max|f*|`: once the a-priori bound falls below the level to which f* itself is
computed (Cholesky, relative error ~ eps * kappa), the measured error stalls there. The measured
worst ratio |f_t - f*| / (bound_t + 10 * eps * kappa * max|f*|) over the 200 random problems is 0.46.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import bounds
from kcg import kernels
from kcg import problems
from kcg import solvers

EPS = np.finfo(np.float64).eps
CASES = problems.TEST_CASES
CASE_IDS = [case.name for case in CASES]


@functools.lru_cache(maxsize=None)
def _case_problem(index):
  return jax.tree.map(np.asarray, CASES[index].problem())


def _assert_bound_holds(errors, bound, kappa, f_star):
  floor = 100 * EPS * kappa * np.abs(f_star).max()
  assert np.all(errors <= bound * (1 + 1e-8) + floor), np.max(errors - bound)


def test_rates_match_closed_forms():
  kappa = np.array([1.0, 4.0, 100.0, 1e6])
  np.testing.assert_allclose(bounds.cg_rate(kappa), (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1),
                             rtol=1e-15)
  np.testing.assert_allclose(bounds.gd_rate(kappa), (kappa - 1) / (kappa + 1), rtol=1e-15)
  # 1 / T_t(x) with x = (kappa + 1)/(kappa - 1) > 1, T_t(x) = cosh(t arccosh x).
  kappa = np.array([4.0, 100.0, 1e4])
  x = (kappa + 1) / (kappa - 1)
  for t in (0, 1, 5, 30):
    np.testing.assert_allclose(bounds.chebyshev_factor(kappa, t), 1 / np.cosh(t * np.arccosh(x)),
                               rtol=1e-12)
  assert float(bounds.chebyshev_factor(1.0, 0)) == 1.0
  assert float(bounds.chebyshev_factor(1.0, 3)) == 0.0


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_condition_number_is_the_requested_one(index):
  phi, _, _, ridge = _case_problem(index)
  kappa = float(bounds.condition_number(phi, ridge))
  a = phi @ phi.T + float(ridge) * np.eye(phi.shape[0])
  np.testing.assert_allclose(kappa, np.linalg.cond(a), rtol=1e3 * EPS * kappa)
  # The problem generator pins cond(A) exactly up to rounding (eigvalsh error ~ eps * kappa).
  np.testing.assert_allclose(kappa, CASES[index].condition_number, rtol=1e3 * EPS * kappa)
  np.testing.assert_allclose(bounds.condition_number_kernel(phi @ phi.T, ridge), kappa,
                             rtol=1e3 * EPS * kappa)


def test_cg_error_bound_formula_at_t0():
  phi, y, query, ridge = _case_problem(6)
  a = phi @ phi.T + float(ridge) * np.eye(len(y))
  k_query = query @ phi.T
  a_inv = np.linalg.inv(a)
  expected = (np.sqrt(np.einsum("qk,kl,ql->q", k_query, a_inv, k_query)) * 2
              * np.sqrt(y @ a_inv @ y))
  bound0 = bounds.cg_error_bound(phi, y, query, ridge, 0)
  assert bound0.shape == (query.shape[0],)
  np.testing.assert_allclose(bound0, expected, rtol=1e-10)
  kappa = np.linalg.cond(a)
  rate = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
  np.testing.assert_allclose(bounds.cg_error_bound(phi, y, query, ridge, 7), expected * rate**7,
                             rtol=1e-9)
  np.testing.assert_allclose(bounds.cg_error_bound_kernel(phi @ phi.T, k_query, y, ridge, 7),
                             expected * rate**7, rtol=1e-9)


@pytest.mark.parametrize("k,p", [(12, 6), (16, 32)])
def test_cg_error_bound_holds_on_200_random_problems(k, p):
  # 2 shapes (p < k and p > k) x 100 problems, kappa log-uniform in [1, 1e6], every t = 0..2k.
  key_kappa, key_problem = jax.random.split(jax.random.key(100 * k + p))
  kappas = 10 ** jax.random.uniform(key_kappa, (100,), minval=0.0, maxval=6.0)
  problem = problems.batched_krr_problem(key_problem, 100, num_support=k, feature_dim=p,
                                         num_query=3, condition_number=kappas)
  num_steps = 2 * k
  predictions = np.asarray(solvers.cg_predict(*problem, num_steps))  # [100, T + 1, 3]
  f_star = np.asarray(solvers.krr_predict(*problem))  # [100, 3]
  kappa = np.asarray(bounds.condition_number(problem.phi_support, problem.ridge))
  for t in range(num_steps + 1):
    bound = np.asarray(bounds.cg_error_bound(*problem, t))
    assert bound.shape == (100, 3)
    errors = np.abs(predictions[:, t] - f_star)
    floor = 100 * EPS * kappa[:, None] * np.abs(f_star).max(axis=-1, keepdims=True)
    assert np.all(errors <= bound * (1 + 1e-8) + floor), (t, np.max(errors - bound - floor))


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_cg_bound_holds_on_test_cases(index):
  phi, y, query, ridge = _case_problem(index)
  num_steps = 2 * len(y)
  f_star = np.asarray(solvers.krr_predict(phi, y, query, ridge))
  kappa = float(bounds.condition_number(phi, ridge))
  cg = np.asarray(solvers.cg_predict(phi, y, query, ridge, num_steps))
  for t in range(num_steps + 1):
    _assert_bound_holds(np.abs(cg[t] - f_star), bounds.cg_error_bound(phi, y, query, ridge, t),
                        kappa, f_star)


# One case per condition number among those with k <= 16.
_SMALL = sorted({case.condition_number: i for i, case in enumerate(CASES)
                 if case.num_support <= 16}.values())


@pytest.mark.parametrize("index", _SMALL, ids=[CASE_IDS[i] for i in _SMALL])
def test_chebyshev_and_gd_bounds_hold_on_test_cases(index):
  # A subset (every kappa, k <= 16) only to keep this file fast; the CG bound runs on every case.
  phi, y, query, ridge = _case_problem(index)
  num_steps = 2 * len(y)
  f_star = np.asarray(solvers.krr_predict(phi, y, query, ridge))
  kappa = float(bounds.condition_number(phi, ridge))
  chebyshev = np.asarray(solvers.chebyshev_predict(phi, y, query, ridge, num_steps))
  gd = np.asarray(solvers.gd_predict(phi, y, query, ridge, num_steps))
  for t in range(num_steps + 1):
    _assert_bound_holds(np.abs(chebyshev[t] - f_star),
                        bounds.chebyshev_error_bound(phi, y, query, ridge, t), kappa, f_star)
    _assert_bound_holds(np.abs(gd[t] - f_star), bounds.gd_error_bound(phi, y, query, ridge, t),
                        kappa, f_star)


def test_chebyshev_and_gd_bounds_with_loose_spectral_bounds_and_steps():
  phi, y, query, ridge = _case_problem(6)
  a = phi @ phi.T + float(ridge) * np.eye(len(y))
  lo, hi = np.linalg.eigvalsh(a)[[0, -1]]
  loose = (0.5 * lo, 2.0 * hi)  # still contain the spectrum: the bounds must hold
  f_star = np.asarray(solvers.krr_predict(phi, y, query, ridge))
  kappa = hi / lo
  chebyshev = np.asarray(solvers.chebyshev_predict(phi, y, query, ridge, 30, eig_bounds=loose))
  step = 1.0 / hi  # a safe, non-optimal step
  gd = np.asarray(solvers.gd_predict(phi, y, query, ridge, 30, step_size=step))
  for t in (0, 1, 5, 30):
    _assert_bound_holds(np.abs(chebyshev[t] - f_star),
                        bounds.chebyshev_error_bound(phi, y, query, ridge, t, eig_bounds=loose),
                        kappa, f_star)
    _assert_bound_holds(np.abs(gd[t] - f_star),
                        bounds.gd_error_bound(phi, y, query, ridge, t, step_size=step), kappa,
                        f_star)
  # GD's contraction with the optimal step is (kappa - 1)/(kappa + 1) per step.
  ratio = (bounds.gd_error_bound(phi, y, query, ridge, 4)
           / bounds.gd_error_bound(phi, y, query, ridge, 3))
  np.testing.assert_allclose(ratio, (kappa - 1) / (kappa + 1), rtol=1e-9)


def test_bounds_with_a_kernel_multi_output_and_float32():
  phi, y, query, ridge = _case_problem(1)
  kernel = kernels.ExponentialKernel(temperature=2.0)
  y_multi = np.stack([y, 2 * y], axis=-1)
  bound = bounds.cg_error_bound(phi, y_multi, query, ridge, 2, kernel=kernel)
  assert bound.shape == (query.shape[0], 2)
  np.testing.assert_allclose(bound[:, 1], 2 * np.asarray(bound[:, 0]), rtol=1e-12)
  errors = np.abs(np.asarray(solvers.cg_predict(phi, y_multi, query, ridge, 2, kernel=kernel))[2]
                  - np.asarray(solvers.krr_predict(phi, y_multi, query, ridge, kernel=kernel)))
  assert np.all(errors <= bound * (1 + 1e-8) + 1e-10)
  f32 = lambda x: np.asarray(x, np.float32)
  args = (f32(phi), f32(y), f32(query), 0.5)
  for value in (bounds.cg_error_bound(*args, 2), bounds.gd_error_bound(*args, 2),
                bounds.chebyshev_error_bound(*args, 2), bounds.condition_number(f32(phi), 0.5)):
    assert value.dtype == jnp.float32


def test_bound_errors_raise():
  phi, y, query, ridge = _case_problem(0)
  with pytest.raises(ValueError, match="ridge"):
    bounds.cg_error_bound(phi, y, query, 0.0, 1)
  with pytest.raises(ValueError, match="ridge"):
    bounds.condition_number(phi, -1.0)
  with pytest.raises(ValueError, match="mismatched number of support points"):
    bounds.cg_error_bound(phi, y[:-1], query, ridge, 1)
  with pytest.raises(ValueError, match="feature dimension mismatch"):
    bounds.cg_error_bound(phi, y, query[:, :-1], ridge, 1)
  with pytest.raises(ValueError, match="num_steps"):
    bounds.cg_error_bound(phi, y, query, ridge, -1)
  with pytest.raises(ValueError, match="num_steps"):
    bounds.chebyshev_factor(10.0, -2)
  with pytest.raises(ValueError, match="phi_support contains"):
    bounds.cg_error_bound(phi * np.nan, y, query, ridge, 1)
  with pytest.raises(ValueError, match="0 < lo <= hi"):
    bounds.chebyshev_error_bound(phi, y, query, ridge, 1, eig_bounds=(1.0, 0.5))
  with pytest.raises(ValueError, match="pass query features"):
    bounds.cg_error_bound(phi, y, None, ridge, 1)
  with pytest.raises(ValueError, match="K_support must be square"):
    bounds.cg_error_bound_kernel(phi, query @ phi.T, y, ridge, 1)
