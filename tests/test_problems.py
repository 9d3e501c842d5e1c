"""kcg.problems: the generator hits the requested spectrum exactly, is deterministic, jit-able and
batchable, and TEST_CASES covers what it promises.

Tolerances: the eigenvalues of A = Phi Phi^T + ridge I come out of a QR, a product of three matrices
and eigvalsh, each backward stable, so each has absolute error ~ k * eps * lam_max = k * eps * ridge *
kappa; relative to lam_min = ridge that is k * eps * kappa (1e3 * eps * kappa below is ample).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import problems

EPS = np.finfo(np.float64).eps


def _spectrum(problem):
  phi, _, _, ridge = jax.tree.map(np.asarray, problem)
  return np.linalg.eigvalsh(phi @ phi.T + float(ridge) * np.eye(phi.shape[0]))


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("k,p", [(8, 3), (8, 8), (6, 20)])
def test_spectrum_is_exactly_the_requested_one(k, p, kappa):
  ridge = 0.3
  problem = problems.krr_problem(jax.random.key(0), num_support=k, feature_dim=p, num_query=2,
                                 condition_number=kappa, ridge=ridge)
  eigenvalues = _spectrum(problem)
  tolerance = 1e3 * EPS * kappa
  np.testing.assert_allclose(eigenvalues[0], ridge, rtol=tolerance)
  np.testing.assert_allclose(eigenvalues[-1], ridge * kappa, rtol=1e3 * EPS)
  np.testing.assert_allclose(eigenvalues[-1] / eigenvalues[0], kappa, rtol=tolerance)
  # The interior is spread over [ridge, ridge * kappa] (log-uniform draws), not piled on the ends.
  assert np.all(eigenvalues >= ridge * (1 - tolerance))
  if kappa > 1 and min(k, p) > 2:
    interior = np.log(eigenvalues[(eigenvalues > ridge * 1.001) & (eigenvalues < ridge * kappa
                                                                   * 0.999)] / ridge)
    assert interior.size >= 1 and np.all(interior < np.log(kappa))


def test_shapes_dtypes_and_determinism():
  problem = problems.krr_problem(jax.random.key(3), num_support=5, feature_dim=4, num_query=7)
  assert isinstance(problem, problems.KRRProblem)
  assert problem.phi_support.shape == (5, 4)
  assert problem.y_support.shape == (5,)
  assert problem.phi_query.shape == (7, 4)
  assert problem.ridge.shape == ()
  assert all(x.dtype == jnp.float64 for x in problem)  # the default float under x64
  again = problems.krr_problem(jax.random.key(3), num_support=5, feature_dim=4, num_query=7)
  for x, y in zip(problem, again):
    np.testing.assert_array_equal(x, y)
  other = problems.krr_problem(jax.random.key(4), num_support=5, feature_dim=4, num_query=7)
  assert not np.allclose(problem.phi_support, other.phi_support)
  f32 = problems.krr_problem(jax.random.key(3), num_support=5, feature_dim=4, dtype=jnp.float32,
                             condition_number=100.0)
  assert all(x.dtype == jnp.float32 for x in f32)
  eigenvalues = _spectrum(f32)
  np.testing.assert_allclose(eigenvalues[-1] / eigenvalues[0], 100.0, rtol=1e-3)


def test_jit_with_traced_condition_number_and_ridge():
  make = jax.jit(problems.krr_problem, static_argnames=("num_support", "feature_dim", "num_query"))
  jitted = make(jax.random.key(1), num_support=6, feature_dim=4, condition_number=50.0,
                ridge=0.2)
  eager = problems.krr_problem(jax.random.key(1), num_support=6, feature_dim=4,
                               condition_number=50.0, ridge=0.2)
  for x, y in zip(jitted, eager):
    np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)


def test_batched_problems():
  kappas = np.array([[1.0, 10.0, 100.0], [1e3, 1e4, 1e5]])
  batch = problems.batched_krr_problem(jax.random.key(2), (2, 3), num_support=6, feature_dim=4,
                                       num_query=2, condition_number=kappas, ridge=0.5)
  assert batch.phi_support.shape == (2, 3, 6, 4)
  assert batch.y_support.shape == (2, 3, 6)
  assert batch.phi_query.shape == (2, 3, 2, 4)
  assert batch.ridge.shape == ()
  for i in range(2):
    for j in range(3):
      eigenvalues = _spectrum(problems.KRRProblem(batch.phi_support[i, j], batch.y_support[i, j],
                                                  batch.phi_query[i, j], batch.ridge))
      np.testing.assert_allclose(eigenvalues[-1] / eigenvalues[0], kappas[i, j],
                                 rtol=1e3 * EPS * kappas[i, j])
  # Problem i of a flat batch is krr_problem with the i-th split key.
  flat = problems.batched_krr_problem(jax.random.key(2), 4, num_support=6, feature_dim=4)
  keys = jax.random.split(jax.random.key(2), 4)
  single = problems.krr_problem(keys[3], num_support=6, feature_dim=4)
  np.testing.assert_allclose(flat.phi_support[3], single.phi_support, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(flat.y_support[3], single.y_support)


def test_test_cases_table():
  cases = problems.TEST_CASES
  assert 12 <= len(cases) <= 16
  names = [case.name for case in cases]
  assert len(set(names)) == len(names)
  assert {case.num_support for case in cases} == {4, 16, 64}
  assert {case.condition_number for case in cases} == {1.0, 10.0, 1e2, 1e4}
  feature_dims = {case.feature_dim for case in cases}
  assert min(feature_dims) == 2 and max(feature_dims) == 64
  assert any(case.feature_dim < case.num_support for case in cases)
  assert any(case.feature_dim > case.num_support for case in cases)
  case = cases[2]
  problem = case.problem()
  assert problem.phi_support.shape == (case.num_support, case.feature_dim)
  assert problem.phi_query.shape == (case.num_query, case.feature_dim)
  assert float(problem.ridge) == pytest.approx(case.ridge)
  assert case.problem(jnp.float32).phi_support.dtype == jnp.float32


def test_problem_errors_raise():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_support"):
    problems.krr_problem(key, num_support=0, feature_dim=3)
  with pytest.raises(ValueError, match="feature_dim"):
    problems.krr_problem(key, num_support=3, feature_dim=2.5)
  with pytest.raises(ValueError, match="num_query"):
    problems.krr_problem(key, num_support=3, feature_dim=2, num_query=-1)
  with pytest.raises(ValueError, match="condition_number"):
    problems.krr_problem(key, num_support=3, feature_dim=2, condition_number=0.5)
  with pytest.raises(ValueError, match="condition_number"):
    problems.krr_problem(key, num_support=3, feature_dim=2, condition_number=np.nan)
  with pytest.raises(ValueError, match="ridge"):
    problems.krr_problem(key, num_support=3, feature_dim=2, ridge=0.0)
  with pytest.raises(ValueError, match="dtype"):
    problems.krr_problem(key, num_support=3, feature_dim=2, dtype=jnp.int32)
  with pytest.raises(ValueError, match="num_support=1"):
    problems.krr_problem(key, num_support=1, feature_dim=2, condition_number=10.0)
  with pytest.raises(ValueError, match="condition_number must be a scalar or have shape"):
    problems.batched_krr_problem(key, 3, num_support=3, feature_dim=2,
                                 condition_number=np.ones(4))
  with pytest.raises(ValueError, match="condition_number must be >= 1"):
    problems.batched_krr_problem(key, 2, num_support=3, feature_dim=2,
                                 condition_number=np.array([2.0, 0.5]))
  with pytest.raises(ValueError, match="batch"):
    problems.batched_krr_problem(key, 0, num_support=3, feature_dim=2)
