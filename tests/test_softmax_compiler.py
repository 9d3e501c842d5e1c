"""Softmax routes: Route A (CG for KRR with the exponential kernel, exactly) and Route B.

Matching the reference CG step by step, structure, no leakage and bad requests run in the
construction table (tests/construction_table.py, entries "softmax/..."); here: convergence to
scikit-learn's KernelRidge in float64 and float32, the state in named channels, and Route B's
error against the temperature.
"""

import numpy as np
import pytest
from sklearn.kernel_ridge import KernelRidge

import kcg
from kcg import bounds
from kcg import kernels
from kcg import solvers

EPS64 = np.finfo(np.float64).eps


def _problem(seed, k, p, q=3):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(k, p)), rng.normal(size=k), rng.normal(size=(q, p))


def _kernel_matrix(a, b, temperature, projection):
  u = np.eye(a.shape[1]) if projection is None else projection
  return np.exp((a @ u.T) @ (b @ u.T).T / temperature)


@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_converges_to_kernel_ridge_regression_with_that_kernel(dtype, tolerance):
  """At t = 2k, equal to scikit-learn's KernelRidge with the exponential kernel.

  cond(K~ + ridge I) ~ 20 here: float64 to ~100 eps kappa, float32 to ~100 eps32 kappa."""
  k, p, ridge, temperature = 8, 3, 0.5, 3.0
  phi, y, query = _problem(1, k, p, q=4)
  kernel = kernels.ExponentialKernel(temperature, None)
  assert float(bounds.condition_number(phi, ridge, kernel=kernel)) < 50
  compiled = kcg.compile_cg(k, p, 2 * k, ridge, mask="prefix", attention="softmax",
                            temperature=temperature)
  got = np.asarray(compiled.predict(phi[None].astype(dtype), y[None].astype(dtype),
                                    query[None].astype(dtype)))[0]
  assert got.dtype == dtype
  sklearn = KernelRidge(alpha=ridge, kernel="precomputed").fit(
      _kernel_matrix(phi, phi, temperature, None), y).predict(
          _kernel_matrix(query, phi, temperature, None))
  np.testing.assert_allclose(got, sklearn, rtol=0, atol=tolerance * np.abs(sklearn).max())


def test_state_in_named_channels():
  k, p, ridge, temperature, num_steps = 6, 2, 0.3, 2.0, 4
  phi, y, query = _problem(2, k, p)
  compiled = kcg.compile_cg(k, p, num_steps, ridge, mask="prefix", attention="softmax",
                            temperature=temperature)
  state = compiled.read_state(compiled.forward(phi[None], y[None], query[None],
                                               return_residuals=True).residuals)
  a = _kernel_matrix(phi, phi, temperature, None) + ridge * np.eye(k)
  trace = solvers.cg(a, y, num_steps)
  for name in ("alpha", "r", "p", "gamma", "beta"):
    want = np.asarray(getattr(trace, name))
    np.testing.assert_allclose(np.asarray(getattr(state, name))[0], want, rtol=0,
                               atol=1e-10 * np.abs(want).max(), err_msg=name)


def _route_b_error(temperature, heads, seed=0):
  rng = np.random.default_rng(seed)
  k, p, num_steps, ridge = 12, 3, 12, 0.5
  xs, ys = rng.normal(size=(4, k, p)) / np.sqrt(p), rng.normal(size=(4, k))
  xq = rng.normal(size=(4, 3, p)) / np.sqrt(p)
  compiled = kcg.compile_cg(k, p, num_steps, ridge, mask="prefix", attention="softmax",
                            kernel="linear", temperature=temperature, temperature_heads=heads)
  got = np.asarray(compiled.predict_steps(xs, ys, xq))
  ref = np.asarray(solvers.cg_predict(xs, ys, xq, ridge, num_steps))
  return np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("heads", [1, 2])
def test_route_b_error_falls_like_temperature_to_the_minus_heads(heads):
  """Route B: tau (e^{s/tau} - 1) = s + s^2/(2 tau) + ...; Richardson over h temperatures leaves
  O(tau^-h). Measured: h=1 1.4 -> 7.8e-3 over tau 3 -> 1000, h=2 0.11 -> 1.4e-6. Ten times the
  temperature divides the error by ~10^h (checked within a factor 3)."""
  coarse, fine = _route_b_error(10.0, heads), _route_b_error(100.0, heads)
  assert 10.0 ** heads / 3 < coarse / fine < 10.0 ** heads * 3
  assert fine < (1e-1 if heads == 1 else 3e-4)


def test_route_b_fails_where_cancellation_wins():
  """h=3 at tau=1000: coefficients ~1e4 amplify the cancellation (eps tau sum|c_m|) until the
  approximate operator is no longer positive definite; the breakdown guard keeps it finite."""
  assert _route_b_error(100.0, 3) < 1e-5
  bad = _route_b_error(1000.0, 3)
  assert np.isfinite(bad) and bad > 1e-3
