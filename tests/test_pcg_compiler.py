"""compile_cg(..., preconditioner="jacobi"): PCG with M = diag(K) + ridge I as token-wise scaling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import problems
from kcg import solvers
from kcg._src import model as model_lib

EPS64 = np.finfo(np.float64).eps


def _scaled_case(index):
  """A table case with support norms spread over e^{+-1.5}: Jacobi has something to fix."""
  case = problems.TEST_CASES[index]
  prob = case.problem(jnp.float64)
  phi = np.asarray(prob.phi_support) * np.exp(np.linspace(-1.5, 1.5, case.num_support))[:, None]
  return case, phi, np.asarray(prob.y_support), np.asarray(prob.phi_query)


def _spread(phi, y, query, ridge, num_steps, draws=4):
  rng = np.random.default_rng(0)
  ref = np.asarray(solvers.pcg_predict(phi, y, query, ridge, num_steps))
  spread = np.zeros(num_steps + 1)
  for _ in range(draws):
    perturbed = np.asarray(solvers.pcg_predict(phi * (1 + EPS64 * rng.standard_normal(phi.shape)),
                                               y * (1 + EPS64 * rng.standard_normal(y.shape)),
                                               query, ridge, num_steps))
    spread = np.maximum(spread, np.abs(perturbed - ref).max(-1))
  return ref, np.maximum.accumulate(spread)


@pytest.mark.parametrize("index", [0, 2, 3, 4, 6, 9])
def test_matches_reference_pcg_every_step(index):
  """Tolerance as in test_compiler: 1e-10 of the scale plus 30x the reference's rounding spread."""
  case, phi, y, query = _scaled_case(index)
  k = case.num_support
  num_steps = k + 2
  compiled = kcg.compile_cg(k, case.feature_dim, num_steps, case.ridge, mask="prefix",
                            preconditioner="jacobi")
  got = np.asarray(compiled.predict_steps(phi[None], y[None], query[None])[0])
  ref, spread = _spread(phi, y, query, case.ridge, num_steps)
  scale = max(np.abs(ref).max(), 1e-300)
  err = np.abs(got - ref).max(-1)
  assert np.all(err <= 1e-10 * scale + 30 * spread), (err / scale)


def test_state_and_preconditioned_residual_in_named_channels():
  case, phi, y, query = _scaled_case(6)
  k, num_steps = case.num_support, 6
  compiled = kcg.compile_cg(k, case.feature_dim, num_steps, case.ridge, mask="prefix",
                            preconditioner="jacobi")
  out = compiled.forward(phi[None], y[None], query[None], return_residuals=True)
  state = compiled.read_state(out.residuals)
  a = phi @ phi.T + case.ridge * np.eye(k)
  trace = solvers.pcg(a, y, num_steps, solvers.jacobi_diagonal(a))
  for name in ("alpha", "r", "p", "gamma", "beta"):
    want = np.asarray(getattr(trace, name))
    np.testing.assert_allclose(np.asarray(getattr(state, name))[0], want, rtol=0,
                               atol=1e-9 * np.abs(want).max(), err_msg=name)
  # z = M^{-1} r lives in its own channel of every support token.
  z_channel = compiled.program.layout.slice("z").start
  z = np.asarray(out.residuals)[compiled.program.step_ends[-1], 0, :k, z_channel]
  np.testing.assert_allclose(z, np.asarray(trace.r)[-1] / np.diag(a), rtol=1e-12)


def test_rate_follows_the_preconditioned_condition_number():
  """||alpha_t - alpha*||_A <= 2 rho'^t ||alpha*||_A, rho' from kappa' = cond(M^{-1/2} A M^{-1/2}),
  and Jacobi makes kappa' much smaller than kappa on supports with spread-out norms."""
  rng = np.random.default_rng(3)
  # p > k: K is full rank and the spread of the support norms is what makes it ill-conditioned,
  # the case Jacobi fixes (with p < k the ridge eigenvalues dominate and Jacobi helps little).
  k, p, ridge, num_steps = 24, 32, 0.05, 16
  phi = rng.normal(size=(k, p)) * np.exp(rng.uniform(-2, 2, size=k))[:, None] / np.sqrt(p)
  y = rng.normal(size=k)
  query = rng.normal(size=(1, p))
  a = phi @ phi.T + ridge * np.eye(k)
  scaling = 1 / np.sqrt(np.diag(a))
  kappa = np.linalg.cond(a)
  kappa_pre = np.linalg.cond(scaling[:, None] * a * scaling[None, :])
  assert kappa_pre < kappa / 10
  compiled = kcg.compile_cg(k, p, num_steps, ridge, mask="prefix", preconditioner="jacobi")
  state = compiled.read_state(compiled.forward(phi[None], y[None], query[None],
                                               return_residuals=True).residuals)
  alpha_star = np.linalg.solve(a, y)
  a_norm = lambda v: np.sqrt(np.einsum("...i,ij,...j->...", v, a, v))
  errors = a_norm(np.asarray(state.alpha[0]) - alpha_star)
  rate = (np.sqrt(kappa_pre) - 1) / (np.sqrt(kappa_pre) + 1)
  bound = 2 * rate ** np.arange(num_steps + 1) * a_norm(alpha_star)
  assert np.all(errors <= bound * (1 + 1e-8) + 1e-12 * a_norm(alpha_star))


def test_model_is_gated_and_structure_matches():
  compiled = kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", preconditioner="jacobi")
  assert compiled.config.activation == "reglu"
  own = nnx.state(model_lib.abstract_model(compiled.config), nnx.Param)
  chex.assert_trees_all_equal_shapes_and_dtypes(own, compiled.params)
  rng = np.random.default_rng(0)
  xs, ys = rng.normal(size=(1, 4, 2)), rng.normal(size=(1, 4))
  jacobian = jax.jacfwd(lambda xq: compiled.forward(xs, ys, xq, return_residuals=True)
                        .residuals[:, :, :5])(jnp.asarray(rng.normal(size=(1, 2, 2))))
  assert np.all(np.asarray(jacobian) == 0.0)


def test_converges_to_krr():
  case, phi, y, query = _scaled_case(4)
  k = case.num_support
  compiled = kcg.compile_cg(k, case.feature_dim, 2 * k, case.ridge, mask="prefix",
                            preconditioner="jacobi")
  got = np.asarray(compiled.predict(phi[None], y[None], query[None]))[0]
  want = np.asarray(solvers.krr_predict(phi, y, query, case.ridge))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_bad_preconditioner_requests():
  with pytest.raises(ValueError, match="mask='prefix'"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="causal", preconditioner="jacobi")
  with pytest.raises(ValueError, match="form='dual'"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", form="primal", preconditioner="jacobi")
  with pytest.raises(ValueError, match="preconditioner"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", preconditioner="ilu")
