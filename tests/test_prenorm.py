"""Compiled models in the pre-norm variant of the model class (norm="rmsnorm" / "layernorm").

RMSNorm: pinning channels (+M, -M, ...) make every token's normaliser the same power of two while
the pins' sum of squares absorbs the rest of the stream (its norm below 2^-26 M in float64,
2^-12 M in float32: the rest's squares, summed in any order, stay below half an ulp of M^2); the
norm is then the identity. In float64 (M = 2^500) that always holds and the pre-norm model's
predictions EQUAL the norm=None model's at every step, past convergence too (assert_array_equal).
Float32 cannot pin that high (M = 2^52: M^2 times the pins must not overflow): past convergence the
reciprocal's channels reach 2.7e19 (Newton doubles its guess of 1/s once s falls below the float32
range), and the wider stream changes the order of some float32 sums. Measured over the routes
below: <= 6.7e-8 apart (<= 0.6 eps32 max |f|), less than the plain float32 model's own distance to
float64 (>= 1.6e-6 here); Route B (tau = 300) in float32 is dominated by its cancellation error
(10 against float64) and its two models differ by 3.6e-4. Tested: float32 within 4 eps32 max |f|,
Route B within its own float32 error.

LayerNorm's mean subtraction cannot be undone bit for bit: zero-sum reads cancel it in exact
arithmetic, and in floating point each read carries ~eps |w| |token mean| absolute error. That is
harmless for the division-free Chebyshev solver (checked to 1e-12) and fatal for CG's ReLU
reciprocal guess (weights up to ~1e20): compile_cg refuses it, and a test locates the failing step.
"""

import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import problems
from kcg._src import prenorm
from kcg._src import transforms

ROUTES = {
    "cg-prefix": dict(mask="prefix"),
    "cg-causal": dict(mask="causal"),
    "cg-primal": dict(form="primal"),
    "pcg-jacobi": dict(mask="prefix", preconditioner="jacobi"),
    "route-a": dict(mask="prefix", attention="softmax", kernel="exponential", temperature=2.0),
    "route-b": dict(mask="prefix", attention="softmax", kernel="linear", temperature=300.0),
}


def _prompts(k=8, p=5, q=3, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, k, p)), rng.normal(size=(batch, k)), rng.normal(size=(batch, q, p))


# Past convergence: k = 8 supports, 3 k steps.
CONVERGED_STEPS = 24


@functools.lru_cache(maxsize=None)
def _compiled(name, norm, k=8, p=5, t=CONVERGED_STEPS, ridge=0.3):
  return kcg.compile_cg(k, p, t, ridge, norm=norm, **ROUTES[name])

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("name", list(ROUTES))
def test_rmsnorm_model_equals_the_unnormalised_model_bit_for_bit_in_float64(name):
  xs, ys, xq = _prompts()
  plain = np.asarray(_compiled(name, None).predict_steps(xs, ys, xq))
  normed = np.asarray(_compiled(name, "rmsnorm").predict_steps(xs, ys, xq))
  assert np.all(np.isfinite(normed))
  np.testing.assert_array_equal(normed, plain)


@pytest.mark.parametrize("name", ROUTES)
def test_rmsnorm_model_in_float32_is_as_accurate_as_the_unnormalised_model(name):
  xs, ys, xq = _prompts()
  plain64 = np.asarray(_compiled(name, None).predict_steps(xs, ys, xq))
  xs, ys, xq = (a.astype(np.float32) for a in (xs, ys, xq))
  if name == "route-b":
    # Run to t = 24 >> k = 8, float32 Route B (tau = 300) leaves float32's range past convergence:
    # the plain model is refused, not NaN. The pre-norm model stays finite; up to t = k it is within
    # Route B's float32 cancellation error (measured 9e-3 of max |f| = 4.2), past convergence it
    # drifts (0.16 at t = 24; BUILD.md).
    with pytest.raises(ValueError, match="not finite"):
      _compiled(name, None).predict_steps(xs, ys, xq)
    normed = np.asarray(_compiled(name, "rmsnorm").predict_steps(xs, ys, xq))
    assert np.all(np.isfinite(normed))
    k = xs.shape[1]
    assert np.abs(normed - plain64)[:, :k + 1].max() <= 5e-3 * np.abs(plain64).max()
    return
  plain = np.asarray(_compiled(name, None).predict_steps(xs, ys, xq))
  normed = np.asarray(_compiled(name, "rmsnorm").predict_steps(xs, ys, xq))
  assert normed.dtype == np.float32 and np.all(np.isfinite(normed))
  apart = np.abs(normed - plain).max()
  assert apart <= np.abs(plain - plain64).max()
  assert apart <= 4 * EPS32 * np.abs(plain).max(), apart


def test_chebyshev_rmsnorm_bit_for_bit_and_layernorm_close():
  xs, ys, xq = _prompts()
  make = lambda norm: kcg.compile_chebyshev(8, 5, 12, 0.3, eig_bounds=(0.3, 40.0), mask="causal",
                                            norm=norm)
  plain = np.asarray(make(None).predict_steps(xs, ys, xq))
  np.testing.assert_array_equal(np.asarray(make("rmsnorm").predict_steps(xs, ys, xq)), plain)
  # Chebyshev's channels stay O(|y|): the mean leaves ~eps error per read, 1e-12 over 12 layers.
  np.testing.assert_allclose(np.asarray(make("layernorm").predict_steps(xs, ys, xq)), plain,
                             rtol=0, atol=1e-12 * np.abs(plain).max())


def test_layernorm_departure_is_the_reciprocal_guess_at_non_aggregator_tokens():
  """Why compile_cg refuses LayerNorm: the first layer's ReLU guess of 1/s fires off-aggregator."""
  case = problems.TEST_CASES[2]  # k = 4, p = 8, kappa = 100
  prob = case.problem(jnp.float64)
  phi, y, query = (np.asarray(a)[None] for a in (prob.phi_support, prob.y_support, prob.phi_query))
  departure = prenorm.layernorm_departure(case.num_support, case.feature_dim, case.num_support + 2,
                                          float(prob.ridge), phi, y, query, mask="causal")
  assert departure.layer == 1 and departure.layer_name.startswith("init")
  assert departure.role.startswith("support") and departure.channel == "inv_rr_next"
  assert departure.expected == 0.0 and abs(departure.got) > 1e6
  assert departure.largest_weight > 1e15
  assert departure.prediction_error > 0.1
  # The same model without LayerNorm's centring (RMSNorm) never departs.
  plain = np.asarray(kcg.compile_cg(case.num_support, case.feature_dim, 6, float(prob.ridge),
                                    mask="causal").predict_steps(phi, y, query))
  normed = np.asarray(kcg.compile_cg(case.num_support, case.feature_dim, 6, float(prob.ridge),
                                     mask="causal", norm="rmsnorm").predict_steps(phi, y, query))
  np.testing.assert_array_equal(normed, plain)


def _pinned_model(norm, mask="prefix"):
  if norm == "layernorm":  # the division-free solver is the one LayerNorm can carry
    return kcg.compile_chebyshev(8, 5, 6, 0.3, eig_bounds=(0.3, 40.0), mask=mask, norm=norm)
  return _compiled("cg-prefix" if mask == "prefix" else "cg-causal", norm)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_normaliser_is_pinned_at_every_token_and_layer(norm):
  model = _pinned_model(norm)
  xs, ys, xq = _prompts()
  residuals = np.asarray(model.forward(xs, ys, xq, return_residuals=True).residuals)
  layout = model.program.layout
  num_pins = layout.size("norm_pin")
  width = model.config.width
  assert width == layout.width and width % num_pins == 0
  ratio = width // num_pins
  assert ratio & (ratio - 1) == 0 and int(np.log2(ratio)) % 2 == 0  # D = n 4^j
  pins = residuals[..., layout.slice("norm_pin")]
  np.testing.assert_array_equal(np.abs(pins), model.program.norm_pin)
  # Mean square = n M^2 / D at every token and layer, exactly (the rest is absorbed).
  mean_square = np.mean(np.square(residuals), axis=-1)
  np.testing.assert_array_equal(mean_square, num_pins * model.program.norm_pin ** 2 / width)
  if norm == "layernorm":
    np.testing.assert_array_equal(residuals[..., layout.slice("norm_zero")], 0.0)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_pins_are_never_read_or_written_and_reads_sum_to_zero(norm):
  model = _pinned_model(norm, mask="causal")
  layout = model.program.layout
  blocks = nnx.to_pure_dict(model.params)["blocks"]
  pins = layout.slice("norm_pin")
  for name in ("query", "key", "value", "mlp_in"):
    w = np.asarray(blocks[name])
    np.testing.assert_array_equal(w[..., pins, :], 0.0)
    if norm == "layernorm":
      np.testing.assert_allclose(w.sum(axis=-2), 0.0, atol=1e-9 * np.abs(w).max())
  for name in ("attn_out", "mlp_out"):
    written = np.asarray(blocks[name])[..., pins.start:]  # pins, zero and padding channels
    np.testing.assert_array_equal(written, 0.0)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_prenorm_model_is_the_trainable_class(norm):
  model = _pinned_model(norm)
  assert model.config.norm == norm
  fresh = kcg.Transformer(model.config, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(fresh, nnx.Param), model.params)
  names = set(nnx.to_pure_dict(model.params)["blocks"])
  assert {"attn_norm_scale", "mlp_norm_scale"} <= names
  assert ("attn_norm_bias" in names) == (norm == "layernorm")


def test_pin_count_gives_powers_of_four():
  for width in (3, 17, 49, 64, 100, 511, 2000):
    num_pins, padded = transforms.norm_pin_count(width)
    assert num_pins % 2 == 0 and padded >= width + num_pins
    ratio = padded // num_pins
    assert padded % num_pins == 0 and ratio & (ratio - 1) == 0 and int(np.log2(ratio)) % 2 == 0
  assert transforms.norm_pin(jnp.float64) == 2.0 ** 500
  assert transforms.norm_pin(jnp.float32) == 2.0 ** 52
