"""kcg.solvers against independent references (scikit-learn, scipy, lineax, plain NumPy loops).

Tolerances. Cholesky KRR and the fixed-polynomial methods (GD, Chebyshev) are forward stable: their
error is a small multiple of eps * kappa relative to the scale of the computed quantity. CG is not:
once a Ritz value converges, finite-precision CG loses orthogonality, and from then on two textbook
implementations that round differently drift apart by as much as CG itself moves when A is perturbed
by one ulp (measured up to 2e-2 relative on TEST_CASES at kappa = 1e4, k = 64), while the first
steps agree to eps * kappa. So step-by-step CG comparisons allow `100 * eps * kappa * |alpha*|` plus
100 times that measured spread of the reference under eps-relative perturbations of A
(`_reference_spread`); the worst case uses 0.024 of it. A wrong formula shows up as an O(1)
difference at the first steps, where the spread is at the rounding level.
"""
import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.sparse.linalg
from sklearn.kernel_ridge import KernelRidge

import kcg
from kcg import kernels
from kcg import problems
from kcg import solvers
from kcg._src import solvers as solvers_src

EPS = np.finfo(np.float64).eps
CASES = problems.TEST_CASES
CASE_IDS = [case.name for case in CASES]


@functools.lru_cache(maxsize=None)
def _case_problem(index):
  """The TEST_CASES problem as NumPy arrays plus A = K + ridge I (cached: shared by many tests)."""
  problem = jax.tree.map(np.asarray, CASES[index].problem())
  phi, y, phi_query, ridge = problem
  a = phi @ phi.T + float(ridge) * np.eye(phi.shape[0])
  return problem, a


def _random_spd(k, kappa, seed):
  """Random SPD matrix with eigenvalues geometrically spaced in [1, kappa] and a random rhs."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((k, k)))
  a = (q * np.geomspace(1.0, kappa, k)) @ q.T
  return (a + a.T) / 2, rng.standard_normal(k)


def _scipy_iterates(a, b, num_steps, inverse_preconditioner=None):
  """alpha_0..alpha_T of scipy's CG (rtol = atol = 0), recorded by the callback."""
  iterates = [np.zeros_like(b)]
  m = None
  if inverse_preconditioner is not None:
    m = scipy.sparse.linalg.LinearOperator(a.shape, matvec=lambda v: inverse_preconditioner * v)
  with np.errstate(invalid="ignore", divide="ignore"):  # scipy divides 0/0 after exact convergence
    scipy.sparse.linalg.cg(a, b, rtol=0.0, atol=0.0, maxiter=num_steps, M=m,
                           callback=lambda x: iterates.append(np.array(x)))
  return np.array(iterates)


def _reference_spread(a, b, num_steps, inverse_preconditioner=None, draws=4, seed=0):
  """Per step, the largest change of scipy's CG iterates when A is perturbed by one ulp (relative),
  running max over the steps so far: the level below which two correct CGs cannot be told apart."""
  rng = np.random.default_rng(seed)
  reference = _scipy_iterates(a, b, num_steps, inverse_preconditioner)
  spread = np.zeros(len(reference))
  for _ in range(draws):
    noise = rng.standard_normal(a.shape)
    perturbed = _scipy_iterates(a * (1 + EPS * (noise + noise.T) / 2), b, num_steps,
                                inverse_preconditioner)
    n = min(len(perturbed), len(reference))
    diff = np.abs(perturbed[:n] - reference[:n]).max(axis=1)
    spread[:n] = np.maximum(spread[:n], np.nan_to_num(diff, nan=0.0))
  return reference, np.maximum.accumulate(spread)


def _assert_cg_matches(ours, reference, spread, a, b):
  kappa = np.linalg.cond(a)
  scale = np.abs(np.linalg.solve(a, b)).max()
  finite = np.all(np.isfinite(reference), axis=1)  # scipy returns NaN after an exact 0/0
  n = len(reference)
  tolerance = 100 * EPS * kappa * scale + 100 * spread
  diff = np.abs(np.asarray(ours)[:n] - reference).max(axis=1)
  assert np.all(diff[finite] <= tolerance[finite]), (diff, tolerance)


def _numpy_cg(a, b, num_steps):
  """Textbook CG in NumPy recording every field, as a third reference."""
  alpha, r, p = np.zeros_like(b), b.copy(), b.copy()
  alphas, rs, ps, gammas, betas = [alpha], [r], [p], [], []
  for _ in range(num_steps):
    a_p = a @ p
    gamma = (r @ r) / (p @ a_p)
    alpha = alpha + gamma * p
    r_next = r - gamma * a_p
    beta = (r_next @ r_next) / (r @ r)
    p = r_next + beta * p
    r = r_next
    alphas.append(alpha), rs.append(r), ps.append(p), gammas.append(gamma), betas.append(beta)
  return [np.array(x) for x in (alphas, rs, ps, gammas, betas)]


# ------------------------------------------------------------------------------------------------
# Closed-form KRR.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_krr_predict_matches_sklearn_precomputed(index):
  (phi, y, phi_query, ridge), a = _case_problem(index)
  k_query = phi_query @ phi.T
  reference = KernelRidge(alpha=float(ridge), kernel="precomputed").fit(phi @ phi.T, y).predict(
      k_query)
  ours = solvers.krr_predict(phi, y, phi_query, ridge)
  # Both solve by Cholesky: relative error eps * kappa in alpha, propagated through |K_q| |alpha|.
  alpha = np.linalg.solve(a, y)
  tolerance = 100 * EPS * CASES[index].condition_number * (np.abs(k_query) @ np.abs(alpha) + 1)
  assert ours.shape == (CASES[index].num_query,)
  np.testing.assert_array_less(np.abs(ours - reference), tolerance)


def test_krr_predict_matches_sklearn_callable_multi_output():
  (phi, y, phi_query, ridge), a = _case_problem(6)
  y_multi = np.stack([y, -2 * y + 1, np.cos(y)], axis=-1)  # [k, r = 3]
  reference = KernelRidge(alpha=float(ridge), kernel=lambda u, v: u @ v).fit(phi, y_multi).predict(
      phi_query)
  ours = solvers.krr_predict(phi, y_multi, phi_query, ridge)
  assert ours.shape == (phi_query.shape[0], 3)
  alpha = np.linalg.solve(a, y_multi)
  tolerance = 100 * EPS * np.linalg.cond(a) * (np.abs(phi_query @ phi.T) @ np.abs(alpha) + 1)
  np.testing.assert_array_less(np.abs(ours - reference), tolerance)


def test_exponential_kernel_krr_matches_sklearn_callable():
  (phi, y, phi_query, ridge), _ = _case_problem(6)
  rng = np.random.default_rng(0)
  projection = rng.standard_normal((5, phi.shape[1])) / np.sqrt(phi.shape[1])
  temperature = 4.0
  kernel_fn = lambda u, v: np.exp((projection @ u) @ (projection @ v) / temperature)
  reference = KernelRidge(alpha=float(ridge), kernel=kernel_fn).fit(phi, y).predict(phi_query)
  kernel = kernels.ExponentialKernel(temperature=temperature, projection=projection)
  ours = solvers.krr_predict(phi, y, phi_query, ridge, kernel=kernel)
  k_support = np.asarray(kernel(phi, phi))
  a = k_support + float(ridge) * np.eye(len(y))
  alpha = np.linalg.solve(a, y)
  tolerance = 100 * EPS * np.linalg.cond(a) * (np.abs(kernel(phi_query, phi)) @ np.abs(alpha) + 1)
  np.testing.assert_array_less(np.abs(ours - reference), tolerance)
  # The same kernel through the iterative solvers: CG at 3k steps has converged.
  cg_final = solvers.cg_predict(phi, y, phi_query, ridge, 3 * len(y), kernel=kernel)[-1]
  np.testing.assert_allclose(cg_final, reference, rtol=0, atol=1e3 * np.max(tolerance))


def test_krr_batch_dims_broadcast():
  (phi, y, phi_query, ridge), _ = _case_problem(6)
  rng = np.random.default_rng(1)
  phi_b = phi[None] * rng.uniform(0.5, 2.0, size=(2, 1, 1))  # [2, k, p]
  y_b = y[None, None] + rng.standard_normal((1, 3, len(y)))  # [1, 3, k]
  phi_support_b = phi_b[:, None]  # [2, 1, k, p]: same batch rank as y_b
  out = solvers.krr_predict(phi_support_b, y_b, phi_query, ridge)  # query has no batch dims
  assert out.shape == (2, 3, phi_query.shape[0])
  for i in range(2):
    for j in range(3):
      expected = solvers.krr_predict(phi_b[i], y_b[0, j], phi_query, ridge)
      np.testing.assert_allclose(out[i, j], expected, rtol=1e-12, atol=1e-12)
  # A per-problem ridge of batch shape.
  ridges = np.array([0.1, 1.0])
  out_r = solvers.krr_predict(phi_b, y_b[0, :2], phi_query, ridges)
  for i in range(2):
    np.testing.assert_allclose(out_r[i], solvers.krr_predict(phi_b[i], y_b[0, i], phi_query,
                                                             ridges[i]), rtol=1e-12, atol=1e-12)


def test_kernel_matrix_forms_agree():
  (phi, y, phi_query, ridge), a = _case_problem(3)
  k_support, k_query = phi @ phi.T, phi_query @ phi.T
  np.testing.assert_allclose(solvers.krr_predict_kernel(k_support, k_query, y, ridge),
                             solvers.krr_predict(phi, y, phi_query, ridge), rtol=1e-10, atol=1e-10)
  alpha = np.linalg.solve(a, y)
  tolerance = 100 * EPS * np.linalg.cond(a) * np.abs(alpha).max()
  np.testing.assert_allclose(solvers.krr_alpha(phi, y, ridge), alpha, rtol=0, atol=tolerance)
  np.testing.assert_allclose(solvers.krr_alpha_kernel(k_support, y, ridge), alpha, rtol=0,
                             atol=tolerance)


# ------------------------------------------------------------------------------------------------
# CG step by step.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("k", [4, 8])
def test_cg_matches_scipy_lineax_numpy_by_step(k, kappa):
  a, b = _random_spd(k, kappa, seed=k)
  num_steps = k
  trace = solvers.cg(a, b, num_steps)
  reference, spread = _reference_spread(a, b, num_steps)
  _assert_cg_matches(trace.alpha, reference, spread, a, b)
  # lineax's CG without residual re-computation (stabilise_every=None) is the textbook recurrence.
  operator = lx.MatrixLinearOperator(jnp.asarray(a), lx.positive_semidefinite_tag)
  for t in (1, 2, num_steps):
    solver = lx.CG(rtol=0.0, atol=0.0, max_steps=t, stabilise_every=None)
    value = lx.linear_solve(operator, jnp.asarray(b), solver, throw=False).value
    if np.all(np.isfinite(value)):
      scale = np.abs(np.linalg.solve(a, b)).max()
      assert np.abs(trace.alpha[t] - value).max() <= 100 * EPS * kappa * scale + 100 * spread[t]
  # Every field against a NumPy loop (only for kappa > 1: at kappa = 1 the loop divides 0/0).
  if kappa > 1:
    alphas, rs, ps, gammas, betas = _numpy_cg(a, b, num_steps)
    _assert_cg_matches(trace.alpha, alphas, spread, a, b)
    scale_b = np.abs(b).max() * kappa
    np.testing.assert_allclose(trace.r, rs, rtol=0, atol=100 * EPS * scale_b + 100 * spread.max()
                               * np.abs(a).max())
    np.testing.assert_allclose(trace.p, ps, rtol=0,
                               atol=100 * EPS * np.abs(ps).max() * kappa + 100 * spread.max()
                               * np.abs(a).max())
    np.testing.assert_allclose(trace.gamma[:2], gammas[:2], rtol=100 * EPS * kappa)
    np.testing.assert_allclose(trace.beta[:2], betas[:2], rtol=100 * EPS * kappa)


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_cg_matches_scipy_on_test_cases(index):
  (_, y, _, _), a = _case_problem(index)
  k = len(y)
  trace = solvers.cg(a, y, k)
  reference, spread = _reference_spread(a, y, k)
  _assert_cg_matches(trace.alpha, reference, spread, a, y)
  assert trace.alpha.shape == (k + 1, k) and trace.gamma.shape == (k,)


@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4, 1e6])
def test_cg_at_k_steps_equals_cholesky_krr(kappa):
  # k = 4 with separated eigenvalues: finite-precision CG still terminates at t = k (measured error
  # <= 5 eps kappa), so the t = k iterate is the KRR solution up to 100 eps kappa.
  a, b = _random_spd(4, kappa, seed=3)
  alpha_star = np.linalg.solve(a, b)
  alpha = solvers.cg(a, b, 4).alpha[-1]
  np.testing.assert_allclose(alpha, alpha_star, rtol=0,
                             atol=100 * EPS * kappa * np.abs(alpha_star).max())


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_cg_predict_converges_to_krr(index):
  (phi, y, phi_query, ridge), a = _case_problem(index)
  k = len(y)
  kappa = np.linalg.cond(a)
  predictions = solvers.cg_predict(phi, y, phi_query, ridge, 3 * k)
  f_star = solvers.krr_predict(phi, y, phi_query, ridge)
  assert predictions.shape == (3 * k + 1, phi_query.shape[0])
  assert np.all(np.isfinite(predictions))  # also at kappa = 1, long after exact convergence
  np.testing.assert_allclose(predictions[0], 0.0)
  # Finite-precision CG is delayed by loss of orthogonality but converges by t = 3k on every case
  # (measured <= 0.5 eps kappa relative to |K_q| |alpha*|).
  alpha = np.linalg.solve(a, y)
  scale = np.abs(phi_query @ phi.T) @ np.abs(alpha) + 1
  np.testing.assert_array_less(np.abs(predictions[-1] - f_star), 100 * EPS * kappa * scale)
  # The predict form is K_q alpha_t of the trace form.
  trace = solvers.cg(a, y, 3 * k)
  np.testing.assert_allclose(predictions, np.asarray(trace.alpha) @ (phi_query @ phi.T).T,
                             rtol=1e-9, atol=1e-9 * scale.max())


def test_cg_exact_convergence_gives_no_nan():
  # A = 2 I: step 1 solves exactly (r_1 = 0), after which a naive CG divides 0 by 0.
  trace = solvers.cg(2 * np.eye(4), np.ones(4), 10)
  assert all(np.all(np.isfinite(x)) for x in trace)
  np.testing.assert_array_equal(trace.alpha[1:], 0.5)
  np.testing.assert_array_equal(trace.r[1:], 0.0)
  np.testing.assert_array_equal(trace.gamma[1:], 0.0)
  # b = 0: converged from the start.
  zero = solvers.cg(np.diag([1.0, 2.0, 3.0]), np.zeros(3), 5)
  assert all(np.all(x == 0) for x in zero)


def test_cg_callable_equals_matrix():
  (_, y, _, _), a = _case_problem(6)
  k = len(y)
  a_jnp = jnp.asarray(a)
  by_matrix = solvers.cg(a, y, k)
  by_matvec = solvers.cg(lambda v: jnp.dot(a_jnp, v, precision=jax.lax.Precision.HIGHEST), y, k)
  # Same arithmetic; allow the spread of CG under rounding changes (fusion may reorder sums).
  _, spread = _reference_spread(a, y, k)
  for ours, theirs in zip(by_matrix[:3], by_matvec[:3]):
    np.testing.assert_allclose(ours, theirs, rtol=0,
                               atol=100 * EPS * np.linalg.cond(a) * (np.abs(theirs).max() + 1)
                               + 100 * spread.max() * np.abs(a).max())
  for ours, theirs in zip(by_matrix[3:], by_matvec[3:]):
    np.testing.assert_allclose(ours[:2], theirs[:2], rtol=1e-12)
  # A batch of right-hand sides with a callable: every leading dim of b is a batch dim.
  batch_b = np.stack([y, 2 * y])
  traced = solvers.cg(lambda v: jnp.dot(a_jnp, v, precision=jax.lax.Precision.HIGHEST), batch_b, 3)
  np.testing.assert_allclose(traced.alpha[1], 2 * np.asarray(traced.alpha[0]), rtol=1e-12)


def test_cg_multi_rhs_and_batch():
  (_, y, _, _), a = _case_problem(0)
  k = len(y)
  b = np.stack([y, np.arange(k, dtype=float)], axis=-1)  # [k, r = 2]
  trace = solvers.cg(a, b, 3)
  assert trace.alpha.shape == (4, k, 2) and trace.gamma.shape == (3, 2)
  for j in range(2):
    single = solvers.cg(a, b[:, j], 3)
    for multi_field, single_field in zip(trace, single):
      np.testing.assert_allclose(np.asarray(multi_field)[..., j], single_field, rtol=1e-13,
                                 atol=1e-13)
  # Batch dims broadcast: one A (size-1 batch dim) for three right-hand sides.
  rhs = np.stack([y, -y, 3 * y])
  batched = solvers.cg(a[None], rhs, 3)
  assert batched.alpha.shape == (3, 4, k)
  np.testing.assert_allclose(batched.alpha[2], 3 * np.asarray(batched.alpha[0]), rtol=1e-12)


def test_cg_jit_and_vmap():
  (_, y, _, _), a = _case_problem(0)
  eager = solvers.cg(a, y, 4)
  jitted = jax.jit(solvers.cg, static_argnames="num_steps")(a, y, num_steps=4)
  mapped = jax.vmap(lambda b: solvers.cg(a, b, 4))(np.stack([y, y]))
  # This case has 3 distinct eigenvalues: CG is exact at t = 3 and the step-4 scalars are ratios of
  # rounding noise (gamma, beta below), so compare states to rounding and scalars before that step.
  for e, j, m in zip(eager[:3], jitted[:3], mapped[:3]):
    np.testing.assert_allclose(j, e, rtol=0, atol=1e-13)
    np.testing.assert_allclose(m[1], e, rtol=0, atol=1e-13)
  for e, j, m in zip(eager[3:], jitted[3:], mapped[3:]):
    np.testing.assert_allclose(j[:3], e[:3], rtol=1e-12, atol=1e-20)
    np.testing.assert_allclose(m[1, :3], e[:3], rtol=1e-12, atol=1e-20)
  (phi, y, phi_query, ridge), _ = _case_problem(4)
  predict = jax.jit(solvers.cg_predict, static_argnames="num_steps")
  np.testing.assert_allclose(predict(phi, y, phi_query, ridge, num_steps=5),
                             solvers.cg_predict(phi, y, phi_query, ridge, 5), rtol=1e-12,
                             atol=1e-12)
  with pytest.raises(ValueError, match="static"):
    jax.jit(solvers.cg)(a, y, 4)  # num_steps traced


# ------------------------------------------------------------------------------------------------
# PCG, GD, Chebyshev, primal CG.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [1e2, 1e4])
def test_pcg_matches_scipy_with_preconditioner(kappa):
  a0, b = _random_spd(8, kappa, seed=5)
  scaling = np.geomspace(0.1, 10.0, 8)  # bad diagonal scaling: what Jacobi undoes
  a = scaling[:, None] * a0 * scaling[None, :]
  diagonal = solvers.jacobi_diagonal(a)
  np.testing.assert_array_equal(diagonal, np.diag(a))
  trace = solvers.pcg(a, b, 8, diagonal)
  reference, spread = _reference_spread(a, b, 8, inverse_preconditioner=1 / np.diag(a))
  _assert_cg_matches(trace.alpha, reference, spread, a, b)
  # With M = I, PCG performs exactly the arithmetic of CG.
  plain, unit = solvers.cg(a, b, 8), solvers.pcg(a, b, 8, np.ones(8))
  for x, y in zip(plain, unit):
    np.testing.assert_allclose(x, y, rtol=1e-14, atol=1e-300)


def test_pcg_predict_defaults_to_jacobi():
  (phi, y, phi_query, ridge), a = _case_problem(5)
  trace = solvers.pcg(a, y, 6, np.diag(a))
  expected = np.asarray(trace.alpha) @ (phi_query @ phi.T).T
  np.testing.assert_allclose(solvers.pcg_predict(phi, y, phi_query, ridge, 6), expected,
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(solvers.pcg_predict(phi, y, phi_query, ridge, 6, np.diag(a)),
                             expected, rtol=1e-9, atol=1e-9)


def _numpy_gd(a, b, step, num_steps):
  alphas = [np.zeros_like(b)]
  for _ in range(num_steps):
    alphas.append(alphas[-1] + step * (b - a @ alphas[-1]))  # true residual, not the recurrence
  return np.array(alphas)


def _numpy_chebyshev(a, b, lo, hi, num_steps):
  """Saad (2003), Alg. 12.1, from x_0 = 0."""
  theta, delta = (hi + lo) / 2, (hi - lo) / 2
  sigma = theta / delta
  x, r = np.zeros_like(b), b.copy()
  rho = 1 / sigma
  d = r / theta
  xs = [x]
  for _ in range(num_steps):
    x = x + d
    r = r - a @ d
    rho_next = 1 / (2 * sigma - rho)
    d = rho_next * rho * d + 2 * rho_next / delta * r
    rho = rho_next
    xs.append(x)
  return np.array(xs)


@pytest.mark.parametrize("kappa", [10.0, 1e3, 1e6])
def test_gd_and_chebyshev_match_numpy_loops(kappa):
  a, b = _random_spd(8, kappa, seed=7)
  lo, hi = np.linalg.eigvalsh(a)[[0, -1]]
  num_steps = 20
  # Fixed polynomials in A are forward stable: error <= (steps) * eps * kappa * |alpha*| (x10).
  tolerance = 10 * num_steps * EPS * kappa * np.abs(np.linalg.solve(a, b)).max()
  step = float(solvers.optimal_gd_step(lo, hi))
  assert step == pytest.approx(2 / (lo + hi))
  gd_trace = solvers.gd(a, b, num_steps, step)
  np.testing.assert_allclose(gd_trace.alpha, _numpy_gd(a, b, step, num_steps), rtol=0,
                             atol=tolerance)
  np.testing.assert_array_equal(gd_trace.p, 0.0)
  np.testing.assert_array_equal(gd_trace.beta, 0.0)
  np.testing.assert_allclose(gd_trace.gamma, step)
  cheb = solvers.chebyshev(a, b, num_steps, (lo, hi))
  np.testing.assert_allclose(cheb.alpha, _numpy_chebyshev(a, b, lo, hi, num_steps), rtol=0,
                             atol=tolerance)
  # Recorded residuals are the recurrence's b - A alpha_t.
  np.testing.assert_allclose(cheb.r, b - np.asarray(cheb.alpha) @ a.T, rtol=0,
                             atol=tolerance * np.abs(a).max())


def test_chebyshev_with_equal_bounds_solves_scaled_identity_in_one_step():
  trace = solvers.chebyshev(3 * np.eye(5), np.arange(5.0), 4, (3.0, 3.0))
  np.testing.assert_allclose(trace.alpha[1:], np.broadcast_to(np.arange(5.0) / 3, (4, 5)),
                             rtol=1e-15)
  assert np.all(np.isfinite(trace.beta))


def test_gd_chebyshev_predict_defaults():
  (phi, y, phi_query, ridge), a = _case_problem(6)
  lo, hi = np.linalg.eigvalsh(a)[[0, -1]]
  k_query = phi_query @ phi.T
  gd_expected = np.asarray(solvers.gd(a, y, 7, 2 / (lo + hi)).alpha) @ k_query.T
  np.testing.assert_allclose(solvers.gd_predict(phi, y, phi_query, ridge, 7), gd_expected,
                             rtol=1e-9, atol=1e-9)
  cheb_expected = np.asarray(solvers.chebyshev(a, y, 7, (lo, hi)).alpha) @ k_query.T
  np.testing.assert_allclose(solvers.chebyshev_predict(phi, y, phi_query, ridge, 7), cheb_expected,
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(
      solvers.chebyshev_predict(phi, y, phi_query, ridge, 7, eig_bounds=(lo, hi)), cheb_expected,
      rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(solvers.gd_predict(phi, y, phi_query, ridge, 7, 2 / (lo + hi)),
                             gd_expected, rtol=1e-9, atol=1e-9)


def test_primal_cg():
  (phi, y, phi_query, ridge), _ = _case_problem(0)  # k = 4, p = 2
  p = phi.shape[1]
  a_primal = phi.T @ phi + float(ridge) * np.eye(p)
  b_primal = phi.T @ y
  trace = solvers.primal_cg(phi, y, ridge, p)
  assert trace.alpha.shape == (p + 1, p)
  reference, spread = _reference_spread(a_primal, b_primal, p)
  _assert_cg_matches(trace.alpha, reference, spread, a_primal, b_primal)
  predictions = solvers.primal_cg_predict(phi, y, phi_query, ridge, p)
  np.testing.assert_allclose(predictions, np.asarray(trace.alpha) @ phi_query.T, rtol=1e-12)
  # After p steps primal CG has solved the p x p system: the KRR prediction.
  np.testing.assert_allclose(predictions[-1], solvers.krr_predict(phi, y, phi_query, ridge),
                             rtol=0, atol=1e3 * EPS * np.linalg.cond(a_primal))


# ------------------------------------------------------------------------------------------------
# dtypes.
# ------------------------------------------------------------------------------------------------


def test_float32_in_float32_out_and_integers_give_default_float():
  (phi, y, phi_query, ridge), a = _case_problem(1)
  f32 = lambda x: np.asarray(x, np.float32)
  args = (f32(phi), f32(y), f32(phi_query), 0.5)
  outputs = [
      solvers.krr_predict(*args), solvers.cg_predict(*args, 3), solvers.pcg_predict(*args, 3),
      solvers.gd_predict(*args, 3), solvers.chebyshev_predict(*args, 3),
      solvers.primal_cg_predict(*args, 3), solvers.krr_alpha(f32(phi), f32(y), 0.5),
      *solvers.cg(f32(a), f32(y), 3), *solvers.gd(f32(a), f32(y), 3, 0.1),
      *solvers.chebyshev(f32(a), f32(y), 3, (0.5, 2.0)),
      *solvers.pcg(f32(a), f32(y), 3, f32(np.diag(a))),
  ]
  assert all(x.dtype == jnp.float32 for x in outputs), [x.dtype for x in outputs]
  assert solvers.cg(np.eye(3, dtype=np.int32), np.ones(3, np.int32), 2).alpha.dtype == jnp.float64


# ------------------------------------------------------------------------------------------------
# Every ValueError fires.
# ------------------------------------------------------------------------------------------------

_PREDICTORS = [solvers.cg_predict, solvers.pcg_predict, solvers.gd_predict,
               solvers.chebyshev_predict, solvers.primal_cg_predict]


@pytest.mark.parametrize("ridge", [0.0, -1.0, np.nan, np.inf, np.array([0.1, -0.1])])
def test_bad_ridge_raises(ridge):
  (phi, y, phi_query, _), _ = _case_problem(0)
  with pytest.raises(ValueError, match="ridge"):
    solvers.krr_predict(phi, y, phi_query, ridge)
  for predictor in _PREDICTORS:
    with pytest.raises(ValueError, match="ridge"):
      predictor(phi, y, phi_query, ridge, 2)
  with pytest.raises(ValueError, match="ridge"):
    solvers.krr_predict_kernel(phi @ phi.T, phi_query @ phi.T, y, ridge)


def test_shape_errors_raise():
  (phi, y, phi_query, ridge), a = _case_problem(0)
  with pytest.raises(ValueError, match="mismatched number of support points"):
    solvers.krr_predict(phi, y[:-1], phi_query, ridge)
  for predictor in _PREDICTORS:
    with pytest.raises(ValueError, match="mismatched number of support points"):
      predictor(phi, y[:-1], phi_query, ridge, 2)
    with pytest.raises(ValueError, match="feature dimension mismatch"):
      predictor(phi, y, phi_query[:, :-1], ridge, 2)
  with pytest.raises(ValueError, match="feature dimension mismatch"):
    solvers.krr_predict(phi, y, phi_query[:, :-1], ridge)
  with pytest.raises(ValueError, match="y_support must have shape"):
    solvers.krr_predict(phi, y[None, None], phi_query, ridge)
  with pytest.raises(ValueError, match="at least 2 dimensions"):
    solvers.krr_predict(phi[0], y, phi_query, ridge)
  with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
    solvers.krr_predict(np.stack([phi] * 2), np.stack([y] * 3), phi_query, ridge)
  with pytest.raises(ValueError, match="K_support must be square"):
    solvers.krr_predict_kernel(phi, phi_query @ phi.T, y, ridge)
  with pytest.raises(ValueError, match="K_query_support"):
    solvers.krr_predict_kernel(phi @ phi.T, phi_query, y, ridge)
  with pytest.raises(ValueError, match="A must be square"):
    solvers.cg(a[:, :-1], y, 2)
  with pytest.raises(ValueError, match="A must be square"):
    solvers.jacobi_diagonal(a[:-1])
  with pytest.raises(ValueError, match="b needs one entry per row"):
    solvers.cg(a, y[:-1], 2)
  with pytest.raises(ValueError, match="b must have shape"):
    solvers.cg(a, y[None, None], 2)
  with pytest.raises(ValueError, match="mat-vec A must map"):
    solvers.cg(lambda v: v[:-1], y, 2)
  with pytest.raises(ValueError, match="could not be applied"):
    solvers.cg(lambda v: v @ np.ones((7, 7)), y, 2)


def test_num_steps_errors_raise():
  (phi, y, phi_query, ridge), a = _case_problem(0)
  for bad in (-1, 2.5, True, None):
    with pytest.raises(ValueError, match="num_steps"):
      solvers.cg(a, y, bad)
    for predictor in _PREDICTORS:
      with pytest.raises(ValueError, match="num_steps"):
        predictor(phi, y, phi_query, ridge, bad)
  with pytest.raises(ValueError, match="num_steps"):
    solvers.pcg(a, y, -1, np.diag(a))
  with pytest.raises(ValueError, match="num_steps"):
    solvers.gd(a, y, -1, 0.1)
  with pytest.raises(ValueError, match="num_steps"):
    solvers.chebyshev(a, y, -1, (0.1, 1.0))
  with pytest.raises(ValueError, match="num_steps"):
    solvers.primal_cg(phi, y, ridge, -1)
  assert solvers.cg(a, y, 0).alpha.shape == (1, len(y))  # 0 is allowed: the initial state


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise(bad):
  (phi, y, phi_query, ridge), a = _case_problem(0)
  def spoil(x):
    x = np.array(x, copy=True)
    x.flat[0] = bad
    return x
  for args, name in [((spoil(phi), y, phi_query), "phi_support"), ((phi, spoil(y), phi_query),
                     "y_support"), ((phi, y, spoil(phi_query)), "phi_query")]:
    with pytest.raises(ValueError, match=f"{name} contains"):
      solvers.krr_predict(*args, ridge)
    with pytest.raises(ValueError, match=f"{name} contains"):
      solvers.cg_predict(*args, ridge, 2)
  with pytest.raises(ValueError, match="A contains"):
    solvers.cg(spoil(a), y, 2)
  with pytest.raises(ValueError, match="b contains"):
    solvers.cg(a, spoil(y), 2)
  with pytest.raises(ValueError, match="preconditioner contains"):
    solvers.pcg(a, y, 2, spoil(np.diag(a)))


def test_solver_parameter_errors_raise():
  (phi, y, phi_query, ridge), a = _case_problem(0)
  k = len(y)
  with pytest.raises(ValueError, match="preconditioner must be > 0"):
    solvers.pcg(a, y, 2, -np.ones(k))
  with pytest.raises(ValueError, match="preconditioner must be the diagonal"):
    solvers.pcg(a, y, 2, np.ones(k + 1))
  with pytest.raises(ValueError, match="preconditioner must be > 0"):
    solvers.pcg_predict(phi, y, phi_query, ridge, 2, np.zeros(k))
  with pytest.raises(ValueError, match="preconditioner must be the diagonal"):
    solvers.pcg_predict(phi, y, phi_query, ridge, 2, np.ones(k + 1))
  with pytest.raises(ValueError, match="step_size must be > 0"):
    solvers.gd(a, y, 2, 0.0)
  with pytest.raises(ValueError, match="step_size must be > 0"):
    solvers.gd_predict(phi, y, phi_query, ridge, 2, -0.1)
  for bounds in [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)]:
    with pytest.raises(ValueError, match="0 < lo <= hi"):
      solvers.chebyshev(a, y, 2, bounds)
    with pytest.raises(ValueError, match="0 < lo <= hi"):
      solvers.chebyshev_predict(phi, y, phi_query, ridge, 2, bounds)
  with pytest.raises(ValueError, match="pair"):
    solvers.chebyshev(a, y, 2, 1.0)
  with pytest.raises(ValueError, match="do not broadcast"):
    solvers.gd_predict(phi, y, phi_query, ridge, 2, np.array([0.1, 0.2]))
  with pytest.raises(ValueError, match="kernel must be a callable"):
    solvers.krr_predict(phi, y, phi_query, ridge, kernel="rbf")
  with pytest.raises(ValueError, match="kernel .* returned shape"):
    solvers.cg_predict(phi, y, phi_query, ridge, 2, kernel=lambda u, v: u @ v.T[..., :1])


def test_solver_trace_contract():
  # The names and shapes later layers rely on.
  assert solvers.SolverTrace._fields == ("alpha", "r", "p", "gamma", "beta")
  assert solvers_src.SolverTrace is solvers.SolverTrace


# ----------------------------------------------------------------------------------------------------
# No silent wrong answers from the references themselves.
# ----------------------------------------------------------------------------------------------------


def _low_rank_problem(k=16, p=4, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(k, p)), rng.normal(size=k), rng.normal(size=(3, p))


def test_krr_predict_raises_when_cholesky_fails():
  """float32 with ridge 1e-8 against ||K|| ~ 50: K + ridge I is not positive definite to float32
  rounding, the Cholesky factor is NaN; every closed form says so instead of returning it."""
  phi, y, query = (a.astype(np.float32) for a in _low_rank_problem())
  k_support = phi @ phi.T
  calls = [lambda: solvers.krr_predict(phi, y, query, 1e-8),
           lambda: solvers.krr_alpha(phi, y, 1e-8),
           lambda: solvers.krr_predict_kernel(k_support, query @ phi.T, y, 1e-8),
           lambda: solvers.krr_alpha_kernel(k_support, y, 1e-8)]
  for call in calls:
    with pytest.raises(ValueError, match="Cholesky.*float32.*float64.*larger ridge"):
      call()
  # float64 solves it, and so does float32 with a ridge above its rounding of K.
  phi64, y64, query64 = _low_rank_problem()
  assert np.all(np.isfinite(np.asarray(solvers.krr_predict(phi64, y64, query64, 1e-8))))
  assert np.all(np.isfinite(np.asarray(solvers.krr_predict(phi, y, query, 1e-2))))


def test_cg_refuses_a_non_symmetric_matrix():
  a, b = _random_spd(6, 10.0, 0)
  skewed = a.copy()
  skewed[0, 1] += 0.1 * np.abs(a).max()
  for solve in (lambda m: solvers.cg(m, b, 3), lambda m: solvers.pcg(m, b, 3, np.diag(a)),
                lambda m: solvers.gd(m, b, 3, 0.01), lambda m: solvers.chebyshev(m, b, 3, (1, 10)),
                lambda m: solvers.krr_predict_kernel(m, np.ones((2, 6)), b, 0.1),
                lambda m: solvers.block_cg(m, b[:, None], 0.1, 3)):
    with pytest.raises(ValueError, match="not symmetric"):
      solve(skewed)
    solve(a)  # rounding-level asymmetry passes
  # Asymmetry at rounding level (sqrt(eps) is the threshold) is accepted.
  noisy = a * (1 + 1e3 * EPS * np.random.default_rng(1).standard_normal(a.shape))
  solvers.cg(noisy, b, 3)


def test_cg_breakdown_freezes_the_iterate():
  """float32, ridge 1e-8, k = 16 > p = 4: cond(A) = 5e9 is beyond float32, p.Ap turns negative at
  step 5 and the textbook recurrence drifts to 1e7 relative error by step 200. The run stops there
  instead: every later prediction is the step-4 one, no worse than exact CG's own transient."""
  phi, y, query = _low_rank_problem()
  want = np.asarray(solvers.krr_predict(phi, y, query, 1e-8))
  f32 = [a.astype(np.float32) for a in (phi, y, query)]
  steps = np.asarray(solvers.cg_predict(*f32, 1e-8, 200), np.float64)
  errors = np.abs(steps - want).max(-1) / np.abs(want).max()
  assert np.all(np.isfinite(steps))
  frozen = int(np.argmax(np.all(steps == steps[-1], axis=-1)))
  assert frozen <= phi.shape[1] + 2
  exact = np.asarray(solvers.cg_predict(phi, y, query, 1e-8, 200))  # float64: no breakdown
  exact_errors = np.abs(exact - want).max(-1) / np.abs(want).max()
  assert errors[-1] <= exact_errors[:phi.shape[1] + 2].max()
  assert exact_errors[-1] <= 1e-6  # float64 converges on the same problem
  trace = solvers.cg(f32[0] @ f32[0].T + np.float32(1e-8) * np.eye(16, dtype=np.float32), f32[1],
                     50)
  gamma = np.asarray(trace.gamma)
  assert np.all(gamma[frozen:] == 0) and np.all(np.asarray(trace.beta)[frozen:] == 0)
  np.testing.assert_array_equal(np.asarray(trace.alpha)[frozen:], np.asarray(trace.alpha)[-1:]
                                .repeat(50 + 1 - frozen, 0))


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_breakdown_test_is_silent_where_the_dtype_can_solve(index):
  """The shared table (kappa <= 1e4, float64), run to 3k steps (past convergence): no step is
  frozen, so the compiled models' step-by-step references are the textbook recurrence. Float32
  on the same problem freezes only where cond(A) > ~1 / (k eps)."""
  (phi, y, _, _), a = _case_problem(index)
  k = a.shape[0]
  for dtype, steps in ((np.float64, 3 * k), (np.float32, k)):
    if dtype == np.float32 and np.linalg.cond(a) > 1e-2 / (k * np.finfo(np.float32).eps):
      continue
    trace = solvers.cg(a.astype(dtype), y.astype(dtype), steps)
    frozen = np.asarray(trace.gamma) == 0
    # A frozen step is one where CG has terminated: its residual is at rounding level.
    residual = np.linalg.norm(np.asarray(trace.r, np.float64)[:-1], axis=-1)
    assert np.all(residual[frozen] <= 10 * k * np.finfo(dtype).eps * np.linalg.norm(y)), (
        dtype, np.flatnonzero(frozen), residual[frozen])


def test_complex_inputs_are_refused():
  phi, y, query = _low_rank_problem()
  a = phi @ phi.T + np.eye(16)
  calls = [lambda: solvers.krr_predict(phi + 0j, y, query, 0.1),
           lambda: solvers.krr_predict(phi, y + 1j, query, 0.1),
           lambda: solvers.cg_predict(phi, y, query + 0j, 0.1, 3),
           lambda: solvers.cg(a + 0j, y, 3),
           lambda: solvers.cg(lambda v: a @ v, y + 0j, 3),
           lambda: solvers.block_cg(phi + 0j, y[:, None], 0.1, 3, kernel=kernels.linear_kernel),
           lambda: solvers.krr_predict(phi, y, query, 0.1 + 0j)]
  for call in calls:
    with pytest.raises(ValueError, match="complex|real number"):
      call()
  compiled = kcg.compile_cg(16, 4, 2, 0.1)
  # (All three complex: no dtype promotion error can stand in for the check.)
  for args in ((phi + 0j, y + 0j, query + 0j), (phi, y + 0j, query), (phi, y, query + 1j)):
    with pytest.raises(ValueError, match="complex"):
      compiled.predict(*(np.asarray(x)[None] for x in args))
  with pytest.raises(ValueError, match="complex"):
    kcg.compile_cg(16, 4, 2, 0.1, projection=np.eye(4)[:2] + 0j)
  # Under jit the dtype is static, so complex is refused there too.
  with pytest.raises(ValueError, match="complex"):
    jax.jit(lambda v: solvers.cg(a, v, 2))(jnp.asarray(y + 0j))


@pytest.mark.parametrize("ridge", ["0.1", True, np.bool_(True), 0.1 + 0j, None, [0.1, 0.2]])
def test_one_ridge_validator_for_solvers_and_compiler(ridge):
  """Strings, booleans and complex ridges are refused everywhere with the same message (the
  compiler once accepted "0.1" and True)."""
  phi, y, query = _low_rank_problem()
  with pytest.raises(ValueError, match="ridge must be"):
    kcg.compile_cg(16, 4, 2, ridge)
  if not isinstance(ridge, list):  # an array of ridges is a batch for the solvers
    with pytest.raises(ValueError, match="ridge must be a positive real number"):
      solvers.krr_predict(phi, y, query, ridge)
