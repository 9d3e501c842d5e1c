"""The dynamic range of compiled models: which prompts their divisions handle, and rescaling y.

A compiled model divides by a ReLU guess plus Newton steps (kcg._src.reciprocal) that is exact on
an interval [L, H] of divisors (float64 [1e-40, 1e20], float32 [1e-35, 1e25]). Below L a division
comes out too small, so a CG step is too short: harmless once CG has converged, wrong before.
Above H it comes out ~0 (a wrong answer) or, far above, NaN. This module bounds every divided
quantity of a concrete prompt from the spectrum of its kernel matrix and from y, refuses prompts
that can leave the interval (`check`), and rescales y when asked (`prepare(normalize=True)`).

Bounds (exact arithmetic; A = K + ridge I with eigenvalues in [lam_lo, lam_hi], from an SVD of the
features, E0 = y^T A^-1 y = ||e_0||_A^2 the initial error in the A-norm):

* CG's A-norm error never grows, so ||r_t||^2 <= lam_hi ||e_t||_A^2 <= lam_hi E0: r.r <= lam_hi E0.
* p.Ap lies in [lam_lo r.r, lam_hi r.r] (p.Ap = r.Ar - beta r.r / gamma' <= r.Ar, and ||p|| >= ||r||).
* The floor: in exact arithmetic, while CG has not reached relative A-norm error eps,
  r.r >= lam_lo ||e_t||_A^2 >= lam_lo eps^2 E0 and p.Ap >= lam_lo r.r. In floating point the
  recursively updated r.r collapses to rounding (~eps_dtype^2 ||y||^2) at near-termination while
  the iterate still improves for a few steps, so eps = STALL_TOLERANCE[dtype] is set from
  measurement, not from a target accuracy. Once the run is done, r.r may go on below L (it keeps
  falling far below eps^2 ||y||^2): the divisions then underestimate, each step is shorter than
  the exact line search along a descent direction, and the answer stays put. So a prompt is safe
  if [lam_lo^2 eps^2 E0, lam_hi^2 E0] (and the r.r range) lies in [L, H / MARGIN].
* Jacobi PCG is CG on M^-1/2 A M^-1/2 (same E0, r.z in place of r.r, eigenvalues in
  [lam_lo / d_max, lam_hi / d_min]); each d_i = phi_i.phi_i + ridge is divided once and must lie
  in [L, H] itself. Primal CG: A = Phi^T Phi + ridge I, b = Phi^T y. Block CG: its Gram diagonal
  G_aa = ||p_a||_A^2 obeys column a's CG bounds (P is R projected A-orthogonally, and each
  column's A-norm error is monotone). Softmax routes: also 1/Z_i, Z_i = 1 + sum_j e^{s_ij}, at
  supports and queries, which y does not scale.
* Pre-norm models: channels c at a token with n pins of +-M scale every read there by
  rho = (1 + sum c^2 / (n M^2))^(-1/2). At the aggregator (scalars and their reciprocals) that
  does not bias CG: Newton's fixed point stays 1/s, and every step size is damped by the same
  rho^2 .. rho^3, which slows CG and Newton (to a linear rate ~1.5 (1 - rho^2)). Keeping
  sum c^2 / (n M^2) below PIN_DAMPING = 1e-2 there narrows [L, H] to the window
  [1/w, w], w = M sqrt(2 n PIN_DAMPING) (9e14 in float32: M = 2^52, 2 pins). At supports and
  queries rho differs from token to token, which perturbs K itself (a bias ~kappa rho): the
  stored vectors (alpha, r, p, A p, f) are capped at M sqrt(2 n eps) (2.8e12 in float32). Float64
  (M = 2^500) has no such constraint. A floor (of r.r, p.Ap) may lie FLOOR_MARGIN below 1/w: a
  run is done before it comes within that factor of its floor (measured), so the reciprocals it
  still needs stay below w. Below that the aggregator's reads shrink, which only stalls a done run.

Conditioning: a prompt with cond(A) > 1 / (n eps) (n unknowns) is refused too: that is where the
reference solvers' CG breaks down in the dtype (kcg._src.solvers) and stops; the compiled model
would return noise (measured: 170% off in float32 at cond 1.8e9). Rescaling cannot change it.

Rescaling. KRR is scale covariant: x -> c x, ridge -> c^2 ridge, y -> s y gives f -> s f. The ridge
is a weight of a compiled model, so only y can be rescaled at predict time (a model for inputs
c x is the model compiled with ridge c^2 ridge). `prepare(normalize=True)` divides each prompt's y
(each column, with several outputs: the column systems are independent, and block CG is
covariant under Y -> Y diag(s)) by a power of two chosen to centre its divided quantities in
[L, H]; the model's arithmetic on y / 2^e is the same as on y up to the reciprocal's guess, and
`restore` multiplies the predictions back exactly. This holds for every construction, including
random-ReLU features and softmax kernels (whose x-covariance does not hold): x is never rescaled.
A prompt whose quantities span more than the interval (hi / lo > H / L, e.g. features far from
unit scale in a float32 pre-norm model) is refused even then.

The checks need concrete inputs: under jax.jit (or any transformation of the prompt) `prepare`
does nothing, and normalize=True raises.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from kcg._src import checks
from kcg._src import prompt as prompt_lib
from kcg._src import reciprocal as recip

# The floor's factor eps: r.r must stay exact down to lam_lo eps^2 E0 (see module docstring).
# Measured on reference CG and PCG run in the dtype itself (tests/test_dynamic_range.py, 24
# random problems, k = 16): until a run is within 10x of its final error (or of 1e-13 / 1e-6),
# its r.r (r.z) stayed above this floor by 2.3e3 (float32 PCG) to 1e5 (float32 CG); the test
# asserts a margin of 100.
STALL_TOLERANCE = {np.dtype(np.float64): 1e-14, np.dtype(np.float32): 1e-7}
# What the floor test asserts of the measured margin above (a run is done before its r.r comes
# within this factor of the floor).
FLOOR_MARGIN = 100.0
# Headroom between the exact-arithmetic upper bounds and H, for rounding in the model's own dtype.
MARGIN = 2.0
# Pre-norm models: largest relative change of a token's squared normaliser while CG needs exact
# steps (module docstring).
PIN_DAMPING = 1e-2


class Interval(NamedTuple):
  """Where divided quantities must stay ([low, high]) and the cap on every other channel.

  `floor` is the lowest value a y-dependent quantity's floor (`Bound.low` of r.r, p.Ap, ...) may
  reach; it equals `low` except in pre-norm models (see `interval`).
  """

  low: float
  high: float
  cap: float
  floor: float


class Bound(NamedTuple):
  """The range of one quantity over a run, per prompt (and per output column).

  Attributes:
    name: what it is, e.g. "p.Ap".
    low, high: [B, r] arrays (r = 1 for quantities y does not scale); `low` is the smallest value
      needed before CG converges to STALL_TOLERANCE. Columns with y = 0 hold 0 (nothing divides).
    y_power: how it scales with y (2 for r.r, p.Ap; 1 for alpha; 0 for Z_i, d_i).
    kind: "divisor" (the model divides by it), "intermediate" (a product formed on the way to a
      divisor, which must not underflow) -- both must lie in the interval --, "stored" (only
      kept in a channel: must stay below the cap) or "condition" (cond(A) n eps, which must stay
      below 1: beyond, CG in the dtype breaks down, where the reference solvers stop).
  """

  name: str
  low: np.ndarray
  high: np.ndarray
  y_power: int
  kind: str

  @property
  def in_interval(self) -> bool:
    return self.kind in ("divisor", "intermediate")


class RangeModel(NamedTuple):
  """What the range analysis needs to know about a compiled model (`range_model`).

  Attributes:
    operator: "dual", "primal", "jacobi", "block", "exponential" (softmax Route A),
      "softmax_linear" (Route B) or "none" (no division: Chebyshev).
    ridge: the compiled ridge.
    features: x [B, n, d] -> the kernel's features [B, n, m] (kcg.CompiledCG.kernel_features).
    temperatures: softmax temperatures (tau_1..tau_h); () otherwise.
    projection: the softmax kernel's U [m, p], or None.
    norm_pin: (dtype -> M of a pre-norm model's pins, their count n), or None.
  """

  operator: str
  ridge: float
  features: Callable[[Any], Any]
  temperatures: tuple[float, ...] = ()
  projection: np.ndarray | None = None
  norm_pin: tuple[Callable[[Any], float], int] | None = None


def range_model(compiled) -> RangeModel:
  """The `RangeModel` of a `kcg.CompiledCG`, read from its compile options and program."""
  if compiled.algorithm == "chebyshev":
    operator = "none"
  elif compiled.attention == "softmax":
    operator = "exponential" if compiled.kernel == "exponential" else "softmax_linear"
  elif compiled.multi_output == "block" and compiled.num_outputs > 1:
    operator = "block"
  elif compiled.preconditioner == "jacobi":
    operator = "jacobi"
  else:
    operator = compiled.form
  temperatures = ()
  if compiled.attention == "softmax":
    temperatures = tuple(compiled.temperature * (i + 1) for i in range(compiled.temperature_heads))
  program = compiled.program
  pin = None
  if program.norm_pin is not None:
    pin = (compiled.norm_pin_for, program.layout.size("norm_pin"))
  return RangeModel(operator, float(compiled.ridge), compiled.kernel_features, temperatures,
                    None if compiled.attention != "softmax" else np.asarray(compiled.projection),
                    pin)


def interval(model: RangeModel, dtype) -> Interval:
  """The reciprocal's interval for `dtype`, narrowed by a pre-norm model's channel cap."""
  dtype = np.dtype(dtype)
  spec = recip.default_spec(dtype)
  cap = float(np.finfo(dtype).max) / 1e3
  if model.norm_pin is None:
    return Interval(spec.low, spec.high, cap, spec.low)
  pin_for, count = model.norm_pin
  window = min(cap, pin_for(dtype) * np.sqrt(2 * count * PIN_DAMPING))
  stored = min(cap, pin_for(dtype) * np.sqrt(2 * count * STALL_TOLERANCE[dtype]))
  # A floor is reached only once the run is done to 100x (FLOOR_MARGIN, measured): until then
  # the reciprocals stay FLOOR_MARGIN below `window`, so the pins allow floors that much lower.
  return Interval(max(spec.low, 1 / window), min(spec.high, window), stored,
                  max(spec.low, 1 / (window * FLOOR_MARGIN)))


# ---------------------------------------------------------------------------------------------
# Bounds for one prompt batch.


class _Spectrum(NamedTuple):
  """An SPD operator's extreme eigenvalues [B] and a start vector's energy b^T A^-1 b [B, r]."""

  lam_lo: np.ndarray
  lam_hi: np.ndarray
  energy: np.ndarray
  start: np.ndarray  # ||b||^2 [B, r]


def _linear_spectrum(phi_BxKxM: np.ndarray, y_BxKxR: np.ndarray, ridge: float,
                     primal: bool) -> _Spectrum:
  """Spectrum of K + ridge I (dual, b = y) or Phi^T Phi + ridge I (primal, b = Phi^T y)."""
  k, m = phi_BxKxM.shape[-2:]
  u, s, _ = np.linalg.svd(phi_BxKxM, full_matrices=False)  # u [B, k, n], s [B, n]
  squares = s ** 2
  coef = np.einsum("bkn,bkr->bnr", u, y_BxKxR)  # u_i . y
  full_rank = squares.shape[-1] == (m if primal else k)
  lam_lo = (squares.min(-1) if full_rank else 0.0) + ridge
  lam_hi = squares.max(-1, initial=0.0) + ridge
  if primal:  # b = V S U^T y: b^T (V S^2 V^T + ridge)^-1 b = sum s_i^2 (u_i.y)^2 / (s_i^2 + ridge)
    energy = np.sum(squares[..., None] * coef ** 2 / (squares[..., None] + ridge), axis=1)
    start = np.sum(squares[..., None] * coef ** 2, axis=1)
  else:
    null = y_BxKxR - np.einsum("bkn,bnr->bkr", u, coef)  # the part of y in K's null space
    null_energy = 0.0 if full_rank else np.sum(null ** 2, axis=1) / ridge
    energy = np.sum(coef ** 2 / (squares[..., None] + ridge), axis=1) + null_energy
    start = np.sum(y_BxKxR ** 2, axis=1)
  return _Spectrum(np.broadcast_to(lam_lo, energy.shape[:1]), lam_hi, energy, start)


def _kernel_spectrum(k_BxKxK: np.ndarray, y_BxKxR: np.ndarray, ridge: float) -> _Spectrum:
  eigenvalues, vectors = np.linalg.eigh(k_BxKxK)
  eigenvalues = np.maximum(eigenvalues, 0.0) + ridge
  coef = np.einsum("bkn,bkr->bnr", vectors, y_BxKxR)
  energy = np.sum(coef ** 2 / eigenvalues[..., None], axis=1)
  return _Spectrum(eigenvalues[:, 0], eigenvalues[:, -1], energy, np.sum(y_BxKxR ** 2, axis=1))


def _cg_bounds(spectrum: _Spectrum, eps: float, rho: str = "r.r",
               query_gain: np.ndarray | None = None) -> list[Bound]:
  """r.r (or r.z) and p.Ap over a CG run, and the vectors it stores (see module docstring).

  Stored: ||alpha_t|| <= ||alpha*|| <= sqrt(E0 / lam_lo) (CG's iterates grow in norm towards
  alpha*); ||p|| <= sqrt(p.Ap / lam_lo) bounds r and p; ||A p|| <= lam_hi ||p||; a prediction
  |f_t| <= query_gain ||alpha_t|| (query_gain = max_q ||k(x_q)||, [B]).
  """
  lo, hi = spectrum.lam_lo[:, None], spectrum.lam_hi[:, None]
  energy = spectrum.energy
  rr_low = lo * eps ** 2 * energy
  rr_high = np.maximum(spectrum.start, hi * energy)
  zero = np.zeros_like(energy)
  alpha = np.sqrt(energy / lo)
  direction = np.sqrt(hi * rr_high / lo)
  bounds = [Bound(rho, rr_low, rr_high, 2, "divisor"),
            Bound("p.Ap", lo * rr_low, hi * rr_high, 2, "divisor"),
            Bound("||alpha||", zero, alpha, 1, "stored"),
            Bound("||r||, ||p||", zero, direction, 1, "stored"),
            Bound("||A p||", zero, hi * direction, 1, "stored")]
  if query_gain is not None:
    bounds.append(Bound("|f|", zero, query_gain[:, None] * alpha, 1, "stored"))
  return bounds


def _condition(spectrum: _Spectrum, size: int, dtype) -> Bound:
  """cond(A) (as `low`) and size eps cond(A) (as `high`), [B, 1]: the solvers' breakdown test."""
  kappa = (spectrum.lam_hi / spectrum.lam_lo)[:, None]
  return Bound("cond(A)", kappa, size * float(np.finfo(dtype).eps) * kappa, 0, "condition")


def _query_gain(kernel_QxK: np.ndarray) -> np.ndarray:
  """max over queries of ||k(x_q)|| for kernel rows [B, q, k]."""
  return np.sqrt(np.max(np.sum(kernel_QxK ** 2, axis=-1), axis=-1))


def _softmax_normalisers(model: RangeModel, x_support, x_query) -> list[Bound]:
  """1/Z_i (divided) and Z_i (stored) for every temperature, at supports and queries."""
  u = np.asarray(model.projection, np.float64)
  keys = x_support @ u.T
  bounds = []
  for tau in model.temperatures:
    with np.errstate(over="ignore"):
      z = np.concatenate([1 + np.exp(np.einsum("bim,bjm->bij", x @ u.T, keys) / tau).sum(-1)
                          for x in (x_support, x_query)], axis=1)
    bounds += [Bound(f"1/Z_i (tau={tau:g})", 1 / z.max(1, keepdims=True),
                     1 / z.min(1, keepdims=True), 0, "divisor"),
               Bound(f"Z_i (tau={tau:g})", z.min(1, keepdims=True), z.max(1, keepdims=True), 0,
                     "stored")]
  return bounds


def prompt_bounds(model: RangeModel, x_support, y_support, x_query, dtype) -> list[Bound]:
  """Every bound of a concrete prompt batch (x [B, k, d], y [B, k] or [B, k, r], x_q [B, q, d]).

  Bounds that overflow float64 come out Inf (and are refused).
  """
  with np.errstate(over="ignore", invalid="ignore"):
    return _prompt_bounds(model, x_support, y_support, x_query, dtype)


def _prompt_bounds(model: RangeModel, x_support, y_support, x_query, dtype) -> list[Bound]:
  eps = STALL_TOLERANCE[np.dtype(dtype)]
  if model.operator == "none":
    return []
  y = np.asarray(y_support, np.float64)
  y = y[..., None] if y.ndim == 2 else y
  x_support = np.asarray(x_support, np.float64)
  x_query = np.asarray(x_query, np.float64)
  ridge = model.ridge
  if model.operator == "exponential":
    u = np.asarray(model.projection, np.float64)
    with np.errstate(over="ignore"):
      kernel = np.exp(np.einsum("bim,bjm->bij", x_support @ u.T, x_support @ u.T)
                      / model.temperatures[0])
    if not np.all(np.isfinite(kernel)):
      raise ValueError("the exponential kernel exp(<U x_i, U x_j> / temperature) overflows float64 "
                       "on this prompt; scale x down or compile with a larger temperature.")
    with np.errstate(over="ignore"):
      query_kernel = np.exp(np.einsum("bim,bjm->bij", x_query @ u.T, x_support @ u.T)
                            / model.temperatures[0])
    spectrum = _kernel_spectrum(kernel, y, ridge)
    return _cg_bounds(spectrum, eps, query_gain=_query_gain(query_kernel)) + [
        _condition(spectrum, y.shape[1], dtype)] + _softmax_normalisers(model, x_support, x_query)
  if model.operator == "softmax_linear":
    u = np.asarray(model.projection, np.float64)
    # The Richardson-combined heads approximate the dot-product kernel on U x.
    keys = x_support @ u.T
    spectrum = _linear_spectrum(keys, y, ridge, primal=False)
    gain = _query_gain(np.einsum("bqm,bkm->bqk", x_query @ u.T, keys))
    return _cg_bounds(spectrum, eps, query_gain=gain) + [
        _condition(spectrum, y.shape[1], dtype)] + _softmax_normalisers(model, x_support, x_query)
  phi = np.asarray(model.features(x_support), np.float64)
  phi_query = np.asarray(model.features(x_query), np.float64)
  if model.operator == "primal":
    spectrum = _linear_spectrum(phi, y, ridge, primal=True)
    return _cg_bounds(spectrum, eps, query_gain=np.sqrt(np.max(np.sum(phi_query ** 2, -1), -1))
                      ) + [_condition(spectrum, phi.shape[-1], dtype)]
  spectrum = _linear_spectrum(phi, y, ridge, primal=False)
  condition = _condition(spectrum, y.shape[1], dtype)
  gain = _query_gain(np.einsum("bqm,bkm->bqk", phi_query, phi))
  if model.operator == "jacobi":
    diag = np.sum(phi ** 2, axis=-1) + ridge  # [B, k]
    d_min, d_max = diag.min(-1), diag.max(-1)
    scaled = spectrum._replace(lam_lo=spectrum.lam_lo / d_max, lam_hi=spectrum.lam_hi / d_min,
                               start=np.einsum("bkr,bk->br", y ** 2, 1 / diag))
    bounds = _cg_bounds(scaled, eps, rho="r.z", query_gain=gain)
    # p and z are M^-1/2 times CG's vectors on the scaled system: p.p lies in
    # [r.z / d_max, ...] and is formed before the ridge multiplies it (ridge p.p in p.Ap).
    return bounds + [
        condition,
        Bound("p.p", bounds[0].low / d_max[:, None], bounds[1].high / ridge, 2,
              "intermediate"),
        Bound("d_i = phi_i.phi_i + ridge", d_min[:, None], d_max[:, None], 0, "divisor")]
  bounds = _cg_bounds(spectrum, eps, query_gain=gain) + [condition]
  if model.operator == "block":  # diag(P^T R) = r_a.r_a is formed, G_aa is divided by
    return [bounds[0]._replace(kind="intermediate"),
            bounds[1]._replace(name="G_aa = p_a.A p_a")] + bounds[2:]
  return bounds


# ---------------------------------------------------------------------------------------------
# Checking and rescaling.


def _scale_exponents(bounds: list[Bound], limits: Interval) -> tuple[np.ndarray, np.ndarray]:
  """Per prompt and column: the exponent e (y -> y / 2^e) that centres the y-dependent quantities
  in the interval, and whether any integer e puts them all inside.

  A quantity scaling as y^p moves by 2^(-p e): high 2^(-p e) <= top needs e >= log2(high/top)/p,
  low 2^(-p e) >= L needs e <= log2(low/L)/p.
  """
  lowest, highest = [], []
  for b in bounds:
    if b.y_power == 0:
      continue
    active = b.high > 0
    top = limits.high / MARGIN if b.in_interval else limits.cap
    with np.errstate(divide="ignore"):
      lowest.append(np.where(active, np.log2(b.high / top) / b.y_power, -np.inf))
      if b.in_interval:
        highest.append(np.where(active, np.log2(b.low / limits.floor) / b.y_power, np.inf))
  if not lowest:
    return np.zeros((1, 1)), np.ones((1, 1), bool)
  lowest = np.ceil(np.max(np.broadcast_arrays(*lowest), axis=0))
  highest = np.floor(np.min(np.broadcast_arrays(*highest), axis=0)) if highest else np.full_like(
      lowest, np.inf)
  fits = lowest <= highest
  centre = np.where(np.isfinite(lowest) & np.isfinite(highest), np.round((lowest + highest) / 2),
                    np.where(np.isfinite(lowest), lowest, np.where(np.isfinite(highest), highest,
                                                                    0.0)))
  return np.where(fits, np.clip(centre, lowest, highest), 0.0), fits


def _outside(b: Bound, limits: Interval) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(side, [B, r] mask of prompts and columns outside, the offending values) for one bound."""
  active = b.high > 0
  if b.kind == "condition":
    return [("above", b.high > 1, b.high)]
  if not b.in_interval:
    return [("above", active & (b.high > limits.cap), b.high)]
  low = limits.low if b.y_power == 0 else limits.floor
  return [("above", active & (b.high * MARGIN > limits.high), b.high),
          ("below", active & (b.low < low), b.low)]


def _violation(bounds: list[Bound], limits: Interval):
  """The (bound, prompt, column, value, side) furthest outside the interval, or None.

  Quantities y does not scale come first (rescaling y cannot fix them), then the conditioning.
  """
  for group in ([b for b in bounds if b.y_power == 0 and b.kind != "condition"],
                [b for b in bounds if b.kind == "condition"], bounds):
    if group and (found := _violation_among(group, limits)) is not None:
      return found
  return None


def _violation_among(bounds: list[Bound], limits: Interval):
  worst, found = 1.0, None
  for b in bounds:
    for side, bad, value in _outside(b, limits):
      if not np.any(bad):
        continue
      limit = (limits.low if b.y_power == 0 else limits.floor) if side == "below" else (
          limits.high / MARGIN if b.in_interval else 1.0 if b.kind == "condition" else limits.cap)
      with np.errstate(divide="ignore"):
        factor = np.where(bad, np.abs(np.log(np.broadcast_to(value, bad.shape) / limit)), -1.0)
      prompt, column = np.unravel_index(int(np.argmax(factor)), factor.shape)
      if factor[prompt, column] >= worst or found is None:
        worst = factor[prompt, column]
        found = b, int(prompt), int(column), float(np.broadcast_to(value, bad.shape)[
            prompt, column]), side
  return found


def refused(compiled, x_support, y_support, x_query, normalize: bool = False) -> np.ndarray:
  """[B] bool: which prompts of a concrete batch `compiled.predict` would refuse."""
  x_s, y_s, x_q = _validated(compiled, x_support, y_support, x_query)
  model = range_model(compiled)
  bounds = prompt_bounds(model, x_s, y_s, x_q, x_s.dtype)
  limits = interval(model, x_s.dtype)
  if normalize:
    bounds = _rescaled(bounds, _scale_exponents(bounds, limits)[0])
  bad = np.zeros(np.shape(y_s)[0], bool)
  for b in bounds:
    for _, mask, _ in _outside(b, limits):
      bad |= np.any(mask, axis=-1)
  return bad


def _rescaled(bounds: list[Bound], exponents: np.ndarray) -> list[Bound]:
  """The bounds after y -> y / 2^e."""
  return [b._replace(low=b.low * 2.0 ** (-b.y_power * exponents),
                     high=b.high * 2.0 ** (-b.y_power * exponents)) for b in bounds]


def check(model: RangeModel, bounds: list[Bound], dtype, num_outputs: int = 1) -> None:
  """Raises ValueError naming the quantity, the prompt and the fix if any bound leaves the range."""
  limits = interval(model, dtype)
  found = _violation(bounds, limits)
  if found is None:
    return
  bound, prompt, column, value, side = found
  where = f"prompt {prompt}" + (f", output {column}" if num_outputs > 1 else "")
  if bound.kind == "condition":
    raise ValueError(
        f"{where}: cond(K + ridge I) = {float(bound.low[prompt, column]):.1e} is beyond what CG "
        f"can resolve in {np.dtype(dtype).name} (n eps cond = {value:.1e} > 1, where the reference "
        "solvers break down and stop). Use float64 or a larger ridge.")
  kind = {"divisor": "divides by", "intermediate": "forms", "stored": "stores"}[bound.kind]
  low = limits.low if bound.y_power == 0 else limits.floor
  range_text = (f"[{low:.0e}, {limits.high / MARGIN:.0e}]" if bound.in_interval
                else f"below {limits.cap:.1e}")
  if model.norm_pin is not None:
    range_text += " (narrowed by the pre-norm pins)"
  message = (f"{where} is outside the compiled model's dynamic range in {np.dtype(dtype).name}: "
             f"the model {kind} {bound.name}, which can reach {value:.1e} on this prompt, "
             f"{side} {range_text}. ")
  if bound.y_power == 0:
    message += ("It depends on x and the ridge, not on y: scale x towards unit size (a model for "
                "inputs c x is the one compiled with ridge c^2 ridge) or, for softmax kernels, "
                "raise the temperature.")
  else:
    exponents, fits = _scale_exponents(bounds, limits)
    exponent = float(np.broadcast_to(exponents, bound.high.shape)[prompt, column])
    if bool(np.broadcast_to(fits, bound.high.shape)[prompt, column]):
      message += (f"Pass normalize=True (y is divided by a power of two, here 2^{exponent:.0f}, "
                  "and the prediction multiplied back exactly), or scale y by about "
                  f"{2.0 ** -exponent:.0e} yourself.")
    else:
      message += ("No rescaling of y fits it: the prompt's divided quantities span more than the "
                  "interval (its kernel's eigenvalues spread too far from 1 relative to the "
                  "ridge). Scale x towards unit size with the ridge (ridge -> c^2 ridge), or "
                  "use float64.")
  raise ValueError(message)


def _is_concrete(*xs) -> bool:
  return not any(checks.is_tracer(x) for x in xs)


def _validated(compiled, x_support, y_support, x_query):
  """The prompt's arrays after kcg's prompt validation (shapes, finite, real), one dtype."""
  x_query_np = np.asarray(x_query)
  num_query = x_query_np.shape[1] if x_query_np.ndim == 3 else 0
  layout = compiled.prompt_layout._replace(num_query=num_query)
  return prompt_lib.validate_prompt(layout, x_support, y_support, x_query)


def prepare(compiled, x_support, y_support, x_query, normalize: bool):
  """Checks a prompt against `compiled`'s range; returns (y to run on, scale to restore or None).

  With `normalize`, y is divided per prompt (and output) by a power of two that centres the
  divided quantities; otherwise the prompt is refused with a ValueError if it can leave the range.
  Does nothing for traced inputs (the check needs values); normalize=True needs concrete inputs.
  """
  if not isinstance(normalize, (bool, np.bool_)):
    raise ValueError(f"normalize must be True or False, got {normalize!r}.")
  if not _is_concrete(x_support, y_support, x_query):
    if normalize:
      raise ValueError("normalize=True needs concrete inputs (it picks the scale from y's values); "
                       "under jax.jit rescale y yourself, or call predict outside jit.")
    return y_support, None
  x_s, y_s, x_q = _validated(compiled, x_support, y_support, x_query)
  dtype = x_s.dtype
  model = range_model(compiled)
  bounds = prompt_bounds(model, x_s, y_s, x_q, dtype)
  if not normalize:
    check(model, bounds, dtype, compiled.num_outputs)
    return y_support, None
  limits = interval(model, dtype)
  exponents, _ = _scale_exponents(bounds, limits)
  check(model, _rescaled(bounds, exponents), dtype, compiled.num_outputs)
  scale = np.broadcast_to(2.0 ** exponents, (y_s.shape[0], compiled.num_outputs))
  y_np = np.asarray(y_s)
  y_scaled = (y_np / scale[:, None, :] if y_np.ndim == 3 else y_np / scale).astype(y_np.dtype)
  return y_scaled, scale


def restore(predictions, scale):
  """Undoes `prepare`'s rescaling on predictions [B, ..., q] or [B, ..., q, r]."""
  if scale is None:
    return predictions
  predictions = jnp.asarray(predictions)
  r = scale.shape[1]
  shape = (scale.shape[0],) + (1,) * (predictions.ndim - 1 - (r > 1)) + ((r,) if r > 1 else ())
  factor = scale.reshape(shape) if r > 1 else scale[:, 0].reshape(shape)
  return predictions * jnp.asarray(factor, predictions.dtype)
