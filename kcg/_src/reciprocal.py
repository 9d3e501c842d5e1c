"""Division with standard primitives: a ReLU reciprocal over many decades, refined by Newton.

CG needs `gamma = (r.r)/(p.Ap)` and `beta = (r'.r')/(r.r)`. Both numerator and denominator shrink
geometrically as CG converges (by ~1e-30 in float64 before the residual hits rounding), so a
reciprocal with absolute error on a fixed interval fails after a few steps. kcg computes `1/s` at
the aggregator token in two stages:

1. Initial guess, one ReLU layer: the piecewise-linear interpolant of 1/s on geometric breakpoints
   t_0 < ... < t_n (ratio rho) written as a sum of terms that are all non-negative,
       x_0(s) = 1/t_n + sum_i c_i relu(t_i - s),   c_i > 0 (1/s is convex),
   so evaluating it never cancels and its relative error is the interpolation error
   (rho + 1)^2 / (4 rho) - 1 (4.2% for rho = 1.5) at every scale of the range, however many
   decades it spans. (The same interpolant written with relu(s - t_i) and a large constant
   cancels catastrophically beyond a few decades.) Above the range the guess ramps to 0, below it
   it stays at most 1.7/t_0: in both cases s x_0 < 2, so Newton cannot diverge.
2. Newton steps x <- x (2 - s x) = 2x - s x^2, each one attention layer (a head with query x,
   key s, value x, keys non-zero only at the aggregator, gives s x^2). The relative error squares
   each step: e_{n+1} = e_n^2, so 4 steps take 4.2e-2 to 1e-22, below float64 eps (3 would do for
   float32, 1e-11, but both dtypes use 4 so that the architecture does not depend on the dtype).

Outside [lo, hi] the result is an underestimate of 1/s (never NaN, never an overestimate), which
makes CG's step smaller after convergence instead of blowing up. `default_spec` picks the range
from the dtype: float64 [1e-40, 1e20], float32 [1e-18, 1e18] (the coefficients c_i ~ 1/t_i^2 must
not overflow).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class ReciprocalSpec(NamedTuple):
  """How 1/s is computed.

  Attributes:
    low, high: range where the guess is the interpolant (relative error `guess_error`).
    ratio: ratio of consecutive breakpoints.
    newton_steps: number of Newton refinements.
  """

  low: float
  high: float
  ratio: float
  newton_steps: int

  @property
  def breakpoints(self) -> np.ndarray:
    n = int(math.ceil(math.log(self.high / self.low) / math.log(self.ratio)))
    return self.low * self.ratio ** np.arange(n + 1)

  @property
  def num_units(self) -> int:
    # One unit per breakpoint, one for the constant 1/t_n, two to ramp to 0 above the range.
    return len(self.breakpoints) + 3

  @property
  def guess_error(self) -> float:
    return (self.ratio + 1) ** 2 / (4 * self.ratio) - 1

  @property
  def relative_error(self) -> float:
    """Bound on |1 - s x| after the Newton steps, for s in [low, high] (before rounding)."""
    return self.guess_error ** (2 ** self.newton_steps)


def default_spec(dtype) -> ReciprocalSpec:
  """Range and steps for a dtype, chosen so that the bound is below the dtype's epsilon."""
  if np.dtype(dtype) == np.float64:
    return ReciprocalSpec(low=1e-40, high=1e20, ratio=1.5, newton_steps=4)
  if np.dtype(dtype) in (np.float32,):
    return ReciprocalSpec(low=1e-18, high=1e18, ratio=1.5, newton_steps=4)
  raise ValueError(f"No reciprocal range for dtype {dtype}; use float32 or float64.")


def guess_coefficients(spec: ReciprocalSpec) -> tuple[np.ndarray, np.ndarray, float]:
  """(breakpoints t_i, coefficients c_i >= 0, constant 1/t_n) of the initial guess."""
  t = spec.breakpoints
  f = 1.0 / t
  slopes = np.diff(f) / np.diff(t)  # negative, increasing towards 0
  c = np.empty_like(t)
  c[-1] = -slopes[-1]
  c[1:-1] = slopes[1:] - slopes[:-1]
  # c_0 = 0: below t_1 the guess keeps the first piece's slope down to s = 0, where it is
  # 1/t_0 + 1/t_1 <= 1.7/t_0 (s x_0 <= 1 there, so Newton converges).
  c[0] = 0.0
  return t, c, float(f[-1])


def guess(spec: ReciprocalSpec, s: np.ndarray) -> np.ndarray:
  """NumPy evaluation of the initial guess (for tests and plots)."""
  t, c, top = guess_coefficients(spec)
  s = np.asarray(s, np.float64)[..., None]
  ramp = top / (t[-1] * (spec.ratio - 1))
  x = top + np.sum(c * np.maximum(t - s, 0), axis=-1)
  x = x - ramp * np.maximum(s[..., 0] - t[-1], 0) + ramp * np.maximum(s[..., 0] - spec.ratio * t[-1], 0)
  return x


def reciprocal(spec: ReciprocalSpec, s: np.ndarray) -> np.ndarray:
  """NumPy evaluation of guess + Newton, the same arithmetic as the compiled layers."""
  x = guess(spec, s)
  for _ in range(spec.newton_steps):
    x = 2 * x - s * x * x
  return x


def guess_units_matrices(spec: ReciprocalSpec):
  """(pre weights on s, pre weights on the flag, post weights) of the guess's ReLU units.

  Unit i computes relu(t_i * flag - s): the flag (1 at the aggregator, 0 elsewhere) stands in for
  a bias, so every other token computes relu(0) = 0 and writes nothing.
  """
  t, c, top = guess_coefficients(spec)
  ramp = top / (t[-1] * (spec.ratio - 1))
  on_s = np.concatenate([-np.ones_like(t), [0.0, 1.0, 1.0]])
  on_flag = np.concatenate([t, [1.0, -t[-1], -spec.ratio * t[-1]]])
  post = np.concatenate([c, [top, -ramp, ramp]])
  return on_s, on_flag, post
