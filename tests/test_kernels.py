"""kcg.kernels: values against NumPy, batch broadcasting, pytree use under jit, dtypes, errors.

Tolerances: a Gram entry is one dot product of length p, so float64 agreement is within a few ulps of
sum_j |a_j b_j|; 1e-13 relative is ample. The exponential kernel multiplies that relative error by the
exponent's magnitude (|logit| <= ~10 here), still far below 1e-12.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import kernels
from kcg import solvers


def _features(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape)


def test_linear_kernel_matches_numpy_and_broadcasts():
  phi_a, phi_b = _features(0, 5, 3), _features(1, 4, 3)
  np.testing.assert_allclose(kernels.linear_kernel(phi_a, phi_b), phi_a @ phi_b.T, rtol=1e-13)
  batch_a, batch_b = _features(2, 2, 1, 5, 3), _features(3, 6, 4, 3)  # batch [2, 1] x [6]
  out = kernels.linear_kernel(batch_a, batch_b)
  assert out.shape == (2, 6, 5, 4)
  np.testing.assert_allclose(out[1, 4], batch_a[1, 0] @ batch_b[4].T, rtol=1e-13)


def test_exponential_kernel_matches_numpy():
  phi_a, phi_b = _features(0, 5, 3), _features(1, 4, 3)
  projection = _features(2, 2, 3)
  expected = np.exp((phi_a @ projection.T) @ (projection @ phi_b.T) / 2.5)
  np.testing.assert_allclose(
      kernels.exponential_kernel(phi_a, phi_b, temperature=2.5, projection=projection), expected,
      rtol=1e-12)
  np.testing.assert_allclose(kernels.exponential_kernel(phi_a, phi_b, temperature=2.0),
                             np.exp(phi_a @ phi_b.T / 2.0), rtol=1e-12)
  bound = kernels.ExponentialKernel(temperature=2.5, projection=projection)
  np.testing.assert_allclose(bound(phi_a, phi_b), expected, rtol=1e-12)


def test_exponential_kernel_gram_is_positive_semidefinite():
  phi = _features(4, 12, 3)
  gram = np.asarray(kernels.exponential_kernel(phi, phi, temperature=3.0))
  np.testing.assert_allclose(gram, gram.T, rtol=1e-14)
  eigenvalues = np.linalg.eigvalsh(gram)
  assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_exponential_kernel_is_a_pytree_usable_under_jit():
  phi, y, query = _features(5, 6, 3), _features(6, 6), _features(7, 2, 3)
  kernel = kernels.ExponentialKernel(temperature=jnp.asarray(2.0))
  leaves = jax.tree.leaves(kernel)
  assert len(leaves) == 1  # the temperature is traced; the projection None is no leaf
  jitted = jax.jit(lambda kern: solvers.krr_predict(phi, y, query, 0.5, kernel=kern))(kernel)
  np.testing.assert_allclose(jitted, solvers.krr_predict(phi, y, query, 0.5, kernel=kernel),
                             rtol=1e-12)
  # Different temperatures reuse the trace: the kernel's parameters are arguments, not constants.
  other = jax.jit(lambda kern: solvers.krr_predict(phi, y, query, 0.5, kernel=kern))(
      kernels.ExponentialKernel(temperature=jnp.asarray(3.0)))
  assert not np.allclose(other, jitted)


def test_every_solver_accepts_a_kernel():
  phi, y, query = _features(8, 6, 3), _features(9, 6), _features(10, 2, 3)
  kernel = kernels.ExponentialKernel(temperature=4.0)
  f_star = solvers.krr_predict(phi, y, query, 1.0, kernel=kernel)
  for predictor in (solvers.cg_predict, solvers.pcg_predict, solvers.gd_predict,
                    solvers.chebyshev_predict):
    predictions = predictor(phi, y, query, 1.0, 60, kernel=kernel)
    assert predictions.shape == (61, 2)
    # All four converge on this 6x6 system (kappa ~ 50) well within 60 steps.
    np.testing.assert_allclose(predictions[-1], f_star, rtol=1e-6, atol=1e-6)


def test_dtypes_follow_inputs():
  phi32 = _features(0, 4, 3).astype(np.float32)
  assert kernels.linear_kernel(phi32, phi32).dtype == jnp.float32
  assert kernels.exponential_kernel(phi32, phi32, temperature=1.0).dtype == jnp.float32
  ints = np.arange(12).reshape(4, 3)
  assert kernels.linear_kernel(ints, ints).dtype == jnp.float64


def test_kernel_errors_raise():
  phi_a, phi_b = _features(0, 5, 3), _features(1, 4, 2)
  with pytest.raises(ValueError, match="feature dimensions differ"):
    kernels.linear_kernel(phi_a, phi_b)
  with pytest.raises(ValueError, match="feature dimensions differ"):
    kernels.exponential_kernel(phi_a, phi_b, temperature=1.0)
  with pytest.raises(ValueError, match="at least 2 dimensions"):
    kernels.linear_kernel(phi_a[0], phi_a)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    kernels.exponential_kernel(phi_a, phi_a, temperature=0.0)
  with pytest.raises(ValueError, match="temperature must be a scalar"):
    kernels.exponential_kernel(phi_a, phi_a, temperature=np.ones(2))
  with pytest.raises(ValueError, match="projection must have shape"):
    kernels.exponential_kernel(phi_a, phi_a, temperature=1.0, projection=np.ones((2, 4)))
  spoiled = phi_a.copy()
  spoiled[0, 0] = np.nan
  with pytest.raises(ValueError, match="phi_a contains"):
    kernels.linear_kernel(spoiled, phi_a)
  with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
    kernels.linear_kernel(_features(2, 2, 5, 3), _features(3, 3, 4, 3))
