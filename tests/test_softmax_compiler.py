"""Route A: a softmax transformer that runs CG for KRR with the exponential kernel, exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.kernel_ridge import KernelRidge

import kcg
from kcg import bounds
from kcg import kernels
from kcg import solvers
from kcg._src import model as model_lib

EPS64 = np.finfo(np.float64).eps


def _problem(seed, k, p, q=3):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(k, p)), rng.normal(size=k), rng.normal(size=(q, p))


def _kernel_matrix(a, b, temperature, projection):
  u = np.eye(a.shape[1]) if projection is None else projection
  return np.exp((a @ u.T) @ (b @ u.T).T / temperature)


@pytest.mark.parametrize("temperature,projected", [(1.0, False), (3.0, False), (2.0, True)])
def test_matches_reference_exponential_cg_every_step(temperature, projected):
  """Tolerance as in test_compiler: 1e-10 of the scale + 30x the reference's rounding spread."""
  k, p, ridge, num_steps = 10, 3, 0.1, 12
  phi, y, query = _problem(0, k, p)
  projection = (np.random.default_rng(5).normal(size=(2, p)) / np.sqrt(p)) if projected else None
  kernel = kernels.ExponentialKernel(temperature, projection)
  compiled = kcg.compile_cg(k, p, num_steps, ridge, mask="prefix", attention="softmax",
                            temperature=temperature, projection=projection)
  got = np.asarray(compiled.predict_steps(phi[None], y[None], query[None])[0])
  ref = np.asarray(solvers.cg_predict(phi, y, query, ridge, num_steps, kernel=kernel))
  rng = np.random.default_rng(1)
  spread = np.zeros(num_steps + 1)
  for _ in range(4):
    perturbed = solvers.cg_predict(phi * (1 + EPS64 * rng.standard_normal(phi.shape)),
                                   y * (1 + EPS64 * rng.standard_normal(y.shape)), query, ridge,
                                   num_steps, kernel=kernel)
    spread = np.maximum(spread, np.abs(np.asarray(perturbed) - ref).max(-1))
  spread = np.maximum.accumulate(spread)
  scale = np.abs(ref).max()
  err = np.abs(got - ref).max(-1)
  assert np.all(err <= 1e-10 * scale + 30 * spread), err / scale


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


def test_one_model_class_softmax_heads_and_no_leakage():
  compiled = kcg.compile_cg(5, 2, 2, 0.2, mask="prefix", attention="softmax", temperature=1.5)
  assert compiled.config.attention == "softmax" and compiled.config.activation == "reglu"
  own = nnx.state(model_lib.abstract_model(compiled.config), nnx.Param)
  chex.assert_trees_all_equal_shapes_and_dtypes(own, compiled.params)
  rng = np.random.default_rng(3)
  xs, ys = rng.normal(size=(1, 5, 2)), rng.normal(size=(1, 5))
  jacobian = jax.jacfwd(lambda xq: compiled.forward(xs, ys, xq, return_residuals=True)
                        .residuals[:, :, :6])(jnp.asarray(rng.normal(size=(1, 2, 2))))
  assert np.all(np.asarray(jacobian) == 0.0)


def test_bad_softmax_requests():
  with pytest.raises(ValueError, match="temperature"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", attention="softmax")
  with pytest.raises(ValueError, match="temperature must be"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", attention="softmax", temperature=-1.0)
  with pytest.raises(ValueError, match="mask='prefix'"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="causal", attention="softmax", temperature=1.0)
  with pytest.raises(ValueError, match="temperature_heads"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", attention="softmax", kernel="linear",
                   temperature=10.0, temperature_heads=0)
  with pytest.raises(ValueError, match="projection"):
    kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", attention="softmax", temperature=1.0,
                   projection=np.ones((2, 3)))
  with pytest.raises(ValueError, match="needs attention='softmax'"):
    kcg.compile_cg(4, 2, 2, 0.1, kernel="exponential")


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
