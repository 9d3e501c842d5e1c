"""compile_cg(..., preconditioner="jacobi"): PCG with M = diag(K) + ridge I as token-wise scaling.

Matching the reference PCG, structure, no leakage and bad requests run in the construction table
(tests/construction_table.py, entries "pcg/..."); here: the state and z = M^{-1} r in named
channels, and the rate of the preconditioned condition number.
"""

import jax.numpy as jnp
import numpy as np

import kcg
from kcg import problems
from kcg import solvers

EPS64 = np.finfo(np.float64).eps


def _scaled_case(index):
  """A table case with support norms spread over e^{+-1.5}: Jacobi has something to fix."""
  case = problems.TEST_CASES[index]
  prob = case.problem(jnp.float64)
  phi = np.asarray(prob.phi_support) * np.exp(np.linspace(-1.5, 1.5, case.num_support))[:, None]
  return case, phi, np.asarray(prob.y_support), np.asarray(prob.phi_query)


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
