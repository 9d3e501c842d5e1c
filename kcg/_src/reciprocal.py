"""Division with standard primitives: a ReLU reciprocal over many decades, refined by Newton.

CG needs `gamma = (r.r)/(p.Ap)` and `beta = (r'.r')/(r.r)`. Both numerator and denominator shrink
geometrically as CG converges (by ~1e-30 in float64 before the residual hits rounding), so a
reciprocal with absolute error on a fixed interval fails after a few steps. kcg computes `1/s` at
the aggregator token in two stages:

1. Initial guess, one ReLU layer: the piecewise-linear interpolant of 1/s on geometric breakpoints
   L = t_0 < ... < t_n = H (ratio rho) written as a sum of terms that are all non-negative,
       x_0(s) = 1/t_n + sum_i c_i relu(t_i - s),   c_i = (rho - 1/rho) / t_i^2 > 0 (1/s is convex),
   so evaluating it never cancels and its relative error is the interpolation error
   (rho + 1)^2 / (4 rho) - 1 (4.2% for rho = 1.5) at every scale of [L, H], however many decades
   it spans. (The same interpolant written with relu(s - t_i) and a large constant cancels
   catastrophically beyond a few decades.) Each unit is stored as relu(1 - s / t_i) (c_i t_i):
   weights 1/t_i <= 1/L and (rho - 1/rho)/t_i < 1/L instead of c_i ~ 1/L^2, which float32 could
   not hold for L < 1e-19. Above H the guess ramps linearly to 0 at rho H; below L it follows the
   first piece, x_0(s) = 1/t_0 + 1/t_1 - s / (t_0 t_1) (at most 1.67/L).
2. Newton steps x <- x (2 - s x) = 2x - (s x) x, each one attention layer (a head with query x,
   key s, value x, keys non-zero only at the aggregator, gives (x . s) x). The relative error
   squares each step: e_{n+1} = e_n^2, so 4 steps take 4.2e-2 to 1e-22, below float64 eps (3 would
   do for float32, 1e-11, but both dtypes use 4 so that the architecture does not depend on it).

What the result is, for s >= 0 (proved here, measured in tests/test_reciprocal.py):

* s in [L, H]: |1 - s x| <= 4.2e-2 after the guess and rounding level after Newton.
* s in [0, L): the guess is below 1/s (a secant of a convex function, extended), s x_0 < 1, and
  Newton from below stays below: s x_{n+1} = 1 - (1 - s x_n)^2 in [0, 1]. So x underestimates
  1/s, by less the closer s is to L; x <= 2^4 x_0 <= 26.7 / L. A CG step divided this way is
  shorter than the exact one (it cannot diverge), which is harmless once CG has converged (see
  kcg._src.dynamic_range) and wrong before.
* s in (H, rho H]: the ramp gives s x_0 in [0, 1], so again an underestimate; above rho H the two
  ramp units cancel to 0 up to rounding (|x_0| ~ eps s / H^2), the result is ~0 and CG stalls
  with a wrong answer; above about H / sqrt(eps) that rounding makes s x_0 exceed 2 and Newton
  diverges to Inf/NaN. So nothing above H is usable: `kcg._src.dynamic_range` refuses prompts
  that can get there.

No intermediate overflows (float32 max 3.4e38), for any s >= 0 that is not itself Inf: weights
are at most 1/L; the guess is at most 1.67/L (it decreases in s); while s x_n is in [0, 2], the
Newton step's terms are 2 x_n <= 2^(n+1) 1.67/L and (s x_n) x_n <= 2 x_n, so every value is at
most 26.7/L, 2.7e36 for float32's L = 1e-35. Products are formed as (s x) x, never s (x x):
x^2 alone would reach 1e72. A unit's pre-activation 1 - s/t_i may overflow to -Inf for large s;
relu(-Inf) = 0, so it only switches the unit off.

`default_spec` picks [L, H] from the dtype (both 60 decades, 345 units): float64 [1e-40, 1e20],
float32 [1e-35, 1e25]. Which prompts that covers (y scales, feature scales, ridge) is the business
of `kcg._src.dynamic_range`; BUILD.md gives measured ranges.
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

  @property
  def max_value(self) -> float:
    """Bound on every value the guess and Newton produce for s >= 0: 2^newton x_0(0)."""
    t = self.breakpoints
    return 2.0 ** self.newton_steps * (1 / t[0] + 1 / t[1])


# Breakpoint ratio of the guess for a number of Newton steps: the widest ratio in
# kcg.routes.reciprocal_trade_off whose guess reaches float64's rounding in that many steps
# (ratio 1.5: 345 units, 1.17: 884, 1.015: 9284 over 60 decades).
RATIO_FOR_NEWTON_STEPS = {4: 1.5, 3: 1.17, 2: 1.015}


def spec_for(dtype, newton_steps: int = 4) -> ReciprocalSpec:
  """`default_spec(dtype)` with `newton_steps` Newton steps and the guess fine enough for them
  (`RATIO_FOR_NEWTON_STEPS`): fewer layers per CG step, a wider MLP."""
  if newton_steps not in RATIO_FOR_NEWTON_STEPS:
    raise ValueError(f"newton_steps={newton_steps!r} is not one of "
                     f"{tuple(RATIO_FOR_NEWTON_STEPS)}.")
  return default_spec(dtype)._replace(ratio=RATIO_FOR_NEWTON_STEPS[newton_steps],
                                      newton_steps=newton_steps)


def default_spec(dtype) -> ReciprocalSpec:
  """Range and steps for a dtype: 4 Newton steps reach its epsilon; 60 decades in 345 units.

  float32's range is placed so that 1/L fits with room to spare (`max_value` = 2.7e36) and, with
  kcg._src.dynamic_range's bounds, y scales in [1e-10, 1e10] at unit x work (BUILD.md).
  """
  if np.dtype(dtype) == np.float64:
    return ReciprocalSpec(low=1e-40, high=1e20, ratio=1.5, newton_steps=4)
  if np.dtype(dtype) in (np.float32,):
    return ReciprocalSpec(low=1e-35, high=1e25, ratio=1.5, newton_steps=4)
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


def guess_units_matrices(spec: ReciprocalSpec):
  """(pre weights on s, pre weights on the flag, post weights) of the guess's ReLU units.

  Unit i computes relu(flag - s / t_i) (c_i t_i) = c_i relu(t_i - s) at the aggregator (flag 1);
  every other token has flag 0 and s 0, computes relu(0) = 0 and writes nothing. The constant
  is relu(flag) / t_n, the ramp above H is -r relu(s - t_n) + r relu(s - rho t_n) with
  r = (1/t_n) / ((rho - 1) t_n), stored the same way. Every weight is at most 1/L in magnitude.
  """
  t, c, top = guess_coefficients(spec)
  ramp = top / (t[-1] * (spec.ratio - 1))
  knee = spec.ratio * t[-1]
  on_s = np.concatenate([-1.0 / t, [0.0, 1.0 / t[-1], 1.0 / knee]])
  on_flag = np.concatenate([np.ones_like(t), [1.0, -1.0, -1.0]])
  post = np.concatenate([c * t, [top, -ramp * t[-1], ramp * knee]])
  return on_s, on_flag, post


def evaluate_guess(spec: ReciprocalSpec, s, xp=np):
  """The guess as the compiled units compute it, in the dtype of `s` (`xp`: numpy or jax.numpy).

  sum_u post_u relu(on_s_u s + on_flag_u) at flag 1; `s` of any shape.
  """
  on_s, on_flag, post = guess_units_matrices(spec)
  dtype = s.dtype
  expand = (1,) * s.ndim + (len(on_s),)
  weights = [xp.asarray(w, dtype).reshape(expand) for w in (on_s, on_flag, post)]
  with np.errstate(over="ignore", invalid="ignore"):
    pre = weights[0] * s[..., None] + weights[1]
    return xp.sum(weights[2] * xp.maximum(pre, xp.zeros((), dtype)), axis=-1)


def newton(x, s, num_steps: int):
  """x <- 2x - (s x) x, `num_steps` times (the compiled order: s x^2 would overflow float32)."""
  for _ in range(num_steps):
    x = 2 * x - (s * x) * x
  return x


def guess(spec: ReciprocalSpec, s: np.ndarray) -> np.ndarray:
  """NumPy float64 evaluation of the initial guess (for tests and plots)."""
  return evaluate_guess(spec, np.asarray(s, np.float64))


def reciprocal(spec: ReciprocalSpec, s: np.ndarray) -> np.ndarray:
  """NumPy float64 evaluation of guess + Newton, the same arithmetic as the compiled layers."""
  s = np.asarray(s, np.float64)
  return newton(guess(spec, s), s, spec.newton_steps)
