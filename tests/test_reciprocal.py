"""The division primitive: ReLU initial guess of 1/s plus Newton steps (kcg._src.reciprocal)."""

import numpy as np
import pytest

from kcg._src import reciprocal


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
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


def test_guess_coefficients_are_non_negative():
  _, c, top = reciprocal.guess_coefficients(reciprocal.default_spec(np.float64))
  assert np.all(c >= 0) and top > 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_outside_the_range_underestimates_and_never_diverges(dtype):
  spec = reciprocal.default_spec(dtype)
  s = np.array([0.0, spec.low * 1e-3, spec.low / 2, spec.high * 1.2, spec.high * 3, spec.high * 1e6])
  guess = reciprocal.guess(spec, s)
  assert np.all(np.isfinite(guess))
  assert np.all(s * guess < 2)  # Newton converges (or stays put) from here
  x = reciprocal.reciprocal(spec, s)
  assert np.all(np.isfinite(x)) and np.all(s * x <= 1 + 1e-12)


def test_coefficients_fit_the_dtype():
  """float32 coefficients c_i ~ 1/t_i^2 must not overflow."""
  spec = reciprocal.default_spec(np.float32)
  _, c, _ = reciprocal.guess_coefficients(spec)
  assert np.all(np.isfinite(c.astype(np.float32)))
  with pytest.raises(ValueError, match="dtype"):
    reciprocal.default_spec(np.float16)
