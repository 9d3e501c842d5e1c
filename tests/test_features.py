"""Tests for kcg.features: shapes, dtypes, determinism, jit/vmap, the kernels the maps induce, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import features

# One small instance of every map; the kernel tests below build large ones.
SMALL_MAPS = {
    "identity": {},
    "random_relu": {"num_features": 16},
    "random_fourier": {"num_features": 16, "bandwidth": 0.7},
    "polynomial2": {"num_features": 16},
}
INPUT_DIM = 5
EPS64 = float(np.finfo(np.float64).eps)


def _x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("name", sorted(SMALL_MAPS))
def test_shapes_and_output_dim_with_leading_axes(name):
  fm = features.get(name, **SMALL_MAPS[name])
  assert fm.name == name
  params = fm.init(jax.random.key(0), INPUT_DIM)
  for lead in [(), (7,), (2, 3)]:
    phi = fm.apply(params, _x(lead + (INPUT_DIM,)))
    assert phi.shape == lead + (fm.output_dim(INPUT_DIM),)
    assert phi.dtype == jnp.float64
    assert np.all(np.isfinite(phi))


def test_output_dims():
  assert features.identity().output_dim(7) == 7
  assert features.random_relu(11).output_dim(7) == 11
  assert features.random_fourier(11).output_dim(7) == 11
  assert features.polynomial2(11).output_dim(7) == 18
  assert features.polynomial2(11, include_linear=False).output_dim(7) == 11
  assert set(features.FEATURE_MAPS) == set(SMALL_MAPS)


@pytest.mark.parametrize("name", ["random_relu", "random_fourier", "polynomial2"])
def test_init_is_deterministic_per_key(name):
  fm = features.get(name, **SMALL_MAPS[name])
  same_a, same_b = fm.init(jax.random.key(3), INPUT_DIM), fm.init(jax.random.key(3), INPUT_DIM)
  other = fm.init(jax.random.key(4), INPUT_DIM)
  for a, b, c in zip(same_a, same_b, other):
    np.testing.assert_array_equal(a, b)
    if np.any(a != 0):  # random_relu's bias is identically 0 at its default bias_scale=0.
      assert not np.allclose(a, c)
  # A raw uint32 key works too.
  raw = fm.init(jax.random.PRNGKey(3), INPUT_DIM)
  assert jax.tree.map(jnp.shape, raw) == jax.tree.map(jnp.shape, same_a)


@pytest.mark.parametrize("name", sorted(SMALL_MAPS))
def test_computes_in_the_input_dtype(name):
  fm = features.get(name, **SMALL_MAPS[name])
  params = fm.init(jax.random.key(0), INPUT_DIM)
  x32 = _x((3, INPUT_DIM)).astype(np.float32)
  assert fm.apply(params, x32).dtype == jnp.float32
  # Integer inputs are promoted to the default float (float64 under x64).
  assert fm.apply(params, np.ones((3, INPUT_DIM), np.int32)).dtype == jnp.float64
  # float32 agrees with float64 to float32 rounding: O(1) values, sums of INPUT_DIM terms.
  x64 = x32.astype(np.float64)
  np.testing.assert_allclose(fm.apply(params, x32), fm.apply(params, x64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL_MAPS))
def test_jit_and_vmap_match_eager(name):
  fm = features.get(name, **SMALL_MAPS[name])
  params = fm.init(jax.random.key(1), INPUT_DIM)
  x = _x((4, 6, INPUT_DIM))
  eager = fm.apply(params, x)
  # Same float64 operations in a different fusion order: a few ulps.
  np.testing.assert_allclose(jax.jit(fm.apply)(params, x), eager, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(jax.vmap(fm.apply, (None, 0))(params, x), eager, rtol=1e-13, atol=1e-13)
  # init under jit (input_dim static) gives the same parameters up to the rounding of one scaling.
  jitted_params = jax.jit(fm.init, static_argnums=1)(jax.random.key(1), INPUT_DIM)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=4 * EPS64), jitted_params, params)


def test_identity_is_identity():
  fm = features.identity()
  x = _x((3, 4))
  np.testing.assert_array_equal(fm.apply(fm.init(jax.random.key(0), 4), x), x)


def test_random_relu_matches_formula():
  fm = features.random_relu(8, bias_scale=0.5)
  params = fm.init(jax.random.key(2), 3)
  x = _x((5, 3))
  w, b = np.asarray(params.weights_MxD), np.asarray(params.bias_M)
  expected = np.maximum(x @ w.T + b, 0.0) / math.sqrt(8)
  np.testing.assert_allclose(fm.apply(params, x), expected, rtol=1e-14, atol=1e-14)


def test_random_fourier_approximates_gaussian_kernel():
  """E <phi(x), phi(y)> = exp(-|x-y|^2 / (2 bw^2)); Monte-Carlo error <= sqrt(1/m) per pair."""
  m, bandwidth, d = 40_000, 1.3, 3
  fm = features.random_fourier(m, bandwidth)
  params = fm.init(jax.random.key(0), d)
  x = _x((6, d), seed=1) * 0.8
  phi = np.asarray(fm.apply(params, x))
  gram = phi @ phi.T
  sq_dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
  exact = np.exp(-sq_dist / (2 * bandwidth**2))
  # Each summand 2 cos(a) cos(b) = cos(a-b) + cos(a+b) has variance <= 1, so the mean over m has
  # standard deviation <= 1/sqrt(m) = 0.005; 6 sigma.
  np.testing.assert_allclose(gram, exact, atol=6 / math.sqrt(m))
  # The diagonal is 1 + O(1/sqrt(m)) (only the cos(2 w.x + 2 b) part fluctuates).
  np.testing.assert_allclose(np.diag(gram), 1.0, atol=6 / math.sqrt(m))


def test_random_relu_approximates_arccosine_kernel():
  """bias 0: E <phi(x), phi(y)> = s^2 |x||y| (sin t + (pi - t) cos t) / (2 pi), s^2 = scale^2 / d."""
  m, d, scale = 40_000, 4, 1.5
  fm = features.random_relu(m, weight_scale=scale)
  params = fm.init(jax.random.key(5), d)
  x = _x((5, d), seed=2)
  phi = np.asarray(fm.apply(params, x))
  gram = phi @ phi.T
  norms = np.linalg.norm(x, axis=-1)
  cos_t = np.clip((x @ x.T) / np.outer(norms, norms), -1.0, 1.0)
  t = np.arccos(cos_t)
  s2 = scale**2 / d
  exact = s2 * np.outer(norms, norms) * (np.sin(t) + (np.pi - t) * cos_t) / (2 * np.pi)
  # relu(u) relu(v) with u, v ~ N(0, s^2 |x|^2), N(0, s^2 |y|^2) has second moment <= 3 s^4 |x|^2 |y|^2,
  # so the mean over m has standard deviation <= sqrt(3/m) s^2 |x||y|; 6 sigma.
  tol = 6 * math.sqrt(3 / m) * s2 * np.outer(norms, norms)
  assert np.all(np.abs(gram - exact) <= tol)


def test_polynomial2_is_the_glu_product_and_exactly_bilinear():
  d, m = 4, 6
  fm = features.polynomial2(m, include_linear=False)
  params = fm.init(jax.random.key(7), d)
  a, b = np.asarray(params.a_MxD), np.asarray(params.b_MxD)
  x, y = _x((3, d), seed=3), _x((3, d), seed=4)
  phi = lambda z: np.asarray(fm.apply(params, z))
  # The GLU product (A x) * (B x), exactly as NumPy computes it (rounding: d-term dot products).
  np.testing.assert_allclose(phi(x), (x @ a.T) * (x @ b.T), rtol=1e-13, atol=1e-15)
  # Homogeneous of degree 2.
  np.testing.assert_allclose(phi(2.5 * x), 6.25 * phi(x), rtol=1e-13, atol=1e-15)
  # Polarisation: phi(x + y) - phi(x) - phi(y) is the symmetric bilinear form (Ax)(By) + (Ay)(Bx).
  cross = (x @ a.T) * (y @ b.T) + (y @ a.T) * (x @ b.T)
  np.testing.assert_allclose(phi(x + y) - phi(x) - phi(y), cross, rtol=1e-12, atol=1e-13)
  # With include_linear the input follows the m quadratic features unchanged.
  with_linear = features.polynomial2(m).apply(params, x)
  np.testing.assert_array_equal(with_linear[:, m:], x)
  np.testing.assert_array_equal(with_linear[:, :m], phi(x))


def test_polynomial2_approximates_squared_linear_kernel():
  """E <(Ax)*(Bx), (Ay)*(By)> = (<x, y> / d)^2 by the scaling of A and B."""
  m, d = 40_000, 3
  fm = features.polynomial2(m, include_linear=False)
  params = fm.init(jax.random.key(11), d)
  x = _x((4, d), seed=5)
  phi = np.asarray(fm.apply(params, x))
  exact = (x @ x.T / d) ** 2
  # Each summand is a product of four Gaussians with 4th moment <= 9 (|x||y|/d)^4 / m^2 times m terms:
  # standard deviation <= 3 (|x||y|/d)^2 / sqrt(m); 6 sigma.
  norms = np.linalg.norm(x, axis=-1)
  tol = 6 * 3 * (np.outer(norms, norms) / d) ** 2 / math.sqrt(m)
  assert np.all(np.abs(phi @ phi.T - exact) <= tol)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: features.get("gaussian"), "Unknown feature map 'gaussian'.*identity"),
        (lambda: features.get("random_relu"), "Bad arguments for feature map"),
        (lambda: features.get("identity", num_features=3), "Bad arguments"),
        (lambda: features.random_relu(0), "num_features must be an integer >= 1"),
        (lambda: features.random_relu(2.5), "num_features must be an integer >= 1"),
        (lambda: features.random_relu(4, weight_scale=0.0), "weight_scale must be a positive"),
        (lambda: features.random_relu(4, bias_scale=-1.0), "bias_scale must be finite and >= 0"),
        (lambda: features.random_fourier(4, bandwidth=-1.0), "bandwidth must be a positive"),
        (lambda: features.random_fourier(4, bandwidth=float("nan")), "bandwidth must be a positive"),
        (lambda: features.random_fourier(0), "num_features must be an integer >= 1"),
        (lambda: features.polynomial2(0), "num_features must be an integer >= 1"),
        (lambda: features.polynomial2(3, include_linear="yes"), "include_linear must be a bool"),
    ],
)
def test_bad_constructor_arguments_raise(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("name", sorted(SMALL_MAPS))
def test_bad_inputs_raise(name):
  fm = features.get(name, **SMALL_MAPS[name])
  with pytest.raises(ValueError, match="input_dim must be an integer >= 1"):
    fm.init(jax.random.key(0), 0)
  params = fm.init(jax.random.key(0), INPUT_DIM)
  bad = _x((2, INPUT_DIM))
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf"):
    fm.apply(params, bad)
  bad[1, 2] = np.inf
  with pytest.raises(ValueError, match="NaN or Inf"):
    fm.apply(params, bad)
  with pytest.raises(ValueError, match="trailing"):
    fm.apply(params, np.float64(1.0))  # No feature axis.
  if name != "identity":  # The identity map takes any trailing dimension.
    with pytest.raises(ValueError, match="initialised for input_dim=5"):
      fm.apply(params, _x((2, INPUT_DIM + 1)))


def test_nan_check_is_skipped_under_jit():
  # Under tracing the values are unknown; the check must not fail on Tracers.
  fm = features.random_fourier(4)
  params = fm.init(jax.random.key(0), 2)
  out = jax.jit(fm.apply)(params, jnp.asarray([[jnp.nan, 0.0]]))
  assert out.shape == (1, 4) and bool(jnp.all(jnp.isnan(out)))
