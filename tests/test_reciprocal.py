"""The division primitive: ReLU initial guess of 1/s plus Newton steps (kcg._src.reciprocal)."""

import jax.numpy as jnp
import numpy as np
import pytest

from kcg._src import reciprocal

DTYPES = [np.float64, np.float32]


def _compiled_arithmetic(spec, s, dtype):
  """Guess and Newton in `dtype`, in the compiled units' form and product order (JAX)."""
  s = jnp.asarray(s, dtype)
  x0 = reciprocal.evaluate_guess(spec, s, jnp)
  return np.asarray(x0, np.float64), np.asarray(reciprocal.newton(x0, s, spec.newton_steps),
                                                np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relative_error_over_the_whole_range(dtype):
  spec = reciprocal.default_spec(dtype)
  rng = np.random.default_rng(0)
  s = np.exp(rng.uniform(np.log(spec.low), np.log(spec.high), 100_000))
  guess = reciprocal.guess(spec, s)
  # The interpolation error bound of the initial guess holds at every scale (no cancellation).
  assert np.abs(1 - s * guess).max() <= spec.guess_error * (1 + 1e-9)
  x = reciprocal.reciprocal(spec, s)
  # 4 Newton steps: 4.2e-2 ** 16 ~ 1e-22, so only rounding is left (a few eps of float64).
  assert np.abs(1 - s * x).max() <= 4 * np.finfo(np.float64).eps
  assert spec.relative_error < np.finfo(dtype).eps
  # The same in the dtype's own arithmetic, as the compiled layers compute it.
  s_dtype = s.astype(dtype).astype(np.float64)
  _, x = _compiled_arithmetic(spec, s_dtype, dtype)
  assert np.abs(1 - s_dtype * x).max() <= 4 * np.finfo(dtype).eps


def test_guess_coefficients_are_non_negative():
  _, c, top = reciprocal.guess_coefficients(reciprocal.default_spec(np.float64))
  assert np.all(c >= 0) and top > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_below_and_just_above_the_range_it_underestimates(dtype):
  """s in [0, L) or (H, 1.5 H]: 0 <= s x <= 1 (a shorter CG step, never a longer one)."""
  spec = reciprocal.default_spec(dtype)
  s = np.array([0.0, spec.low * 1e-20, spec.low * 1e-3, spec.low / 2, spec.low * 0.99,
                spec.high * 1.01, spec.high * 1.2, spec.high * 1.49])
  s_dtype = s.astype(dtype).astype(np.float64)
  for s, (x0, x), eps in ((s, (reciprocal.guess(spec, s), reciprocal.reciprocal(spec, s)), 1e-15),
                          (s_dtype, _compiled_arithmetic(spec, s_dtype, dtype),
                           np.finfo(dtype).eps)):
    assert np.all(np.isfinite(x0)) and np.all(s * x0 < 2)
    assert np.all(np.isfinite(x)) and np.all(s * x >= 0) and np.all(s * x <= 1 + 4 * eps)
  # Just below L the first piece still gives a good guess: Newton is exact down to ~0.8 L.
  _, x = _compiled_arithmetic(spec, np.array([0.8 * spec.low]), dtype)
  assert abs(1 - 0.8 * spec.low * x[0]) <= 4 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_far_above_the_range_it_is_unusable(dtype):
  """Above rho H the ramp units cancel to ~0: the result is far from 1/s (the range check must
  refuse such prompts; kcg._src.dynamic_range)."""
  spec = reciprocal.default_spec(dtype)
  s = spec.high * np.array([2.0, 10.0, 1e3])
  _, x = _compiled_arithmetic(spec, s, dtype)
  assert np.all(~np.isfinite(x) | (np.abs(s * x) < 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_intermediate_overflows(dtype):
  """Weights and every value the guess and Newton form stay finite and below `max_value`, for any
  s >= 0 up to the dtype's largest (float32 would overflow with c_i ~ 1/t_i^2 or s x^2)."""
  spec = reciprocal.default_spec(dtype)
  on_s, on_flag, post = reciprocal.guess_units_matrices(spec)
  finfo = np.finfo(dtype)
  for weights in (on_s, on_flag, post):
    assert np.all(np.isfinite(weights.astype(dtype)))
    assert np.abs(weights).max() <= 1 / spec.low
  assert spec.max_value < float(finfo.max) / 100
  s = np.concatenate([[0.0], np.geomspace(float(finfo.tiny), spec.high * 1.5, 2000)])
  x = jnp.asarray(reciprocal.evaluate_guess(spec, jnp.asarray(s, dtype), jnp))
  s_j = jnp.asarray(s, dtype)
  for _ in range(spec.newton_steps):
    for value in (x, 2 * x, s_j * x, (s_j * x) * x):
      assert np.all(np.isfinite(np.asarray(value)))
      assert np.abs(np.asarray(value, np.float64)).max() <= spec.max_value
    x = reciprocal.newton(x, s_j, 1)


def test_one_architecture_for_both_dtypes():
  """The float32 interval is placed differently but has float64's number of units, so a compiled
  model's MLP does not depend on the dtype."""
  assert (reciprocal.default_spec(np.float32).num_units
          == reciprocal.default_spec(np.float64).num_units == 345)
  with pytest.raises(ValueError, match="dtype"):
    reciprocal.default_spec(np.float16)
