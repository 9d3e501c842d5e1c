"""Measurements for the constructions beyond plain CG: softmax Routes A and B, Jacobi PCG, Chebyshev,
and width-m models below the feature dimension (`width_error`).

Each function compiles the construction, runs it on a batch of problems and returns numbers (plain
NumPy in NamedTuples) that experiments print, plot and save; tests check them.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from kcg._src import analysis
from kcg._src import bounds
from kcg._src import compiler
from kcg._src import kernels
from kcg._src import sketch
from kcg._src import solvers


_rms = analysis._rms  # pylint: disable=protected-access


class MatvecError(NamedTuple):
  """Route B's first mat-vec against the exact K p: eps = ||K_B p - K p|| / ||K p|| (RMS over
  prompts), for every (heads, temperature)."""

  heads: tuple[int, ...]
  temperatures: np.ndarray
  epsilon: np.ndarray  # [len(heads), len(temperatures)]


def route_b_matvec_error(phi_support, y_support, phi_query, ridge, heads: Sequence[int],
                         temperatures: Sequence[float]) -> MatvecError:
  """Measured per-step error of Route B's mat-vec (read from the `Kp` channel after step 0's
  mat-vec layer, where p = y)."""
  phi_support = np.asarray(phi_support)
  batch, k, p = phi_support.shape
  exact = np.einsum("bij,bj->bi", phi_support @ np.swapaxes(phi_support, 1, 2), np.asarray(y_support))
  epsilon = np.zeros((len(heads), len(temperatures)))
  for a, h in enumerate(heads):
    for b, tau in enumerate(temperatures):
      compiled = compiler.compile_cg(k, p, 1, ridge, mask="prefix", attention="softmax",
                                     kernel="linear", temperature=float(tau), temperature_heads=h)
      out = compiled.forward(phi_support, y_support, phi_query, return_residuals=True)
      layer = compiled.program.step_ends[0] + 1
      kp = np.asarray(out.residuals)[layer, :, :k, compiled.program.layout.slice("Kp").start]
      epsilon[a, b] = _rms(kp - exact) / _rms(exact)
  return MatvecError(tuple(heads), np.asarray(temperatures, np.float64), epsilon)


class RouteError(NamedTuple):
  """Prediction errors against t, RMS over prompts and queries, relative to RMS(f*).

  route_vs_oracle: the compiled route; cg_vs_oracle: exact dot-product CG; excess: their
  difference route - CG (>= 0 when the route is worse); epsilon: the route's measured mat-vec error;
  constant: C = max_t excess_t / (epsilon t), the constant of the claim `CG error + C eps t`.
  """

  route_vs_oracle: np.ndarray
  cg_vs_oracle: np.ndarray
  excess: np.ndarray
  epsilon: float
  constant: float


def route_b_prediction_error(phi_support, y_support, phi_query, ridge, num_steps, heads,
                             temperature) -> RouteError:
  """Route B (`heads` softmax heads from `temperature` up) against exact dot-product CG, t = 0..T.

  Inputs `phi_support [B, k, p]`, `y_support [B, k]`, `phi_query [B, q, p]`; `num_steps` is T.
  """
  k, p = np.shape(phi_support)[1:]
  compiled = compiler.compile_cg(k, p, num_steps, ridge, mask="prefix", attention="softmax",
                                 kernel="linear", temperature=temperature, temperature_heads=heads)
  got = np.asarray(compiled.predict_steps(phi_support, y_support, phi_query))
  cg = np.asarray(solvers.cg_predict(phi_support, y_support, phi_query, ridge, num_steps))
  f_star = np.asarray(solvers.krr_predict(phi_support, y_support, phi_query, ridge))
  scale = _rms(f_star)
  route = _rms(got - f_star[:, None], axis=(0, 2)) / scale
  exact = _rms(cg - f_star[:, None], axis=(0, 2)) / scale
  epsilon = float(route_b_matvec_error(phi_support, y_support, phi_query, ridge, (heads,),
                                       (temperature,)).epsilon[0, 0])
  steps = np.arange(num_steps + 1)
  excess = route - exact
  constant = float(np.max(excess[1:] / (epsilon * steps[1:])))
  return RouteError(route, exact, excess, epsilon, constant)


class RouteA(NamedTuple):
  """Route A (exponential kernel) against reference exponential-kernel CG and its theorem bound."""

  compiled_vs_oracle: np.ndarray
  reference_vs_oracle: np.ndarray
  compiled_vs_reference: np.ndarray
  bound: np.ndarray
  condition_number: np.ndarray


def route_a_error(phi_support, y_support, phi_query, ridge, num_steps, temperature,
                  projection=None) -> RouteA:
  """Route A (softmax, kernel `exp(<U phi, U phi'> / temperature)`, U = `projection` or I) compiled
  for `num_steps` CG steps, against reference CG on that kernel and its oracle, t = 0..T."""
  k, p = np.shape(phi_support)[1:]
  kernel = kernels.ExponentialKernel(temperature, projection)
  compiled = compiler.compile_cg(k, p, num_steps, ridge, mask="prefix", attention="softmax",
                                 temperature=temperature, projection=projection)
  got = np.asarray(compiled.predict_steps(phi_support, y_support, phi_query))
  ref = np.asarray(solvers.cg_predict(phi_support, y_support, phi_query, ridge, num_steps,
                                      kernel=kernel))
  f_star = np.asarray(solvers.krr_predict(phi_support, y_support, phi_query, ridge, kernel=kernel))
  scale = _rms(f_star)
  bound = analysis.bound_per_step(phi_support, y_support, phi_query, ridge, num_steps, kernel)
  return RouteA(_rms(got - f_star[:, None], axis=(0, 2)) / scale,
                _rms(ref - f_star[:, None], axis=(0, 2)) / scale,
                _rms(got - ref, axis=(0, 2)) / scale, _rms(bound, axis=(0, 2)) / scale,
                np.asarray(bounds.condition_number(phi_support, ridge, kernel=kernel)))


class Preconditioning(NamedTuple):
  """Compiled CG and Jacobi PCG on the same prompts: errors in the A-norm relative to ||alpha*||_A
  (RMS over prompts), and the rates predicted by kappa = cond(A) and kappa' = cond(M^-1 A)."""

  cg_error: np.ndarray
  pcg_error: np.ndarray
  kappa: np.ndarray
  kappa_preconditioned: np.ndarray
  cg_rate: float
  pcg_rate: float


def preconditioning(phi_support, y_support, phi_query, ridge, num_steps) -> Preconditioning:
  """Compiled CG and compiled Jacobi PCG (`M = diag(K) + ridge I`) on the same prompts, with the
  condition numbers before and after preconditioning and the rates they predict."""
  phi_support = np.asarray(phi_support)
  y_support = np.asarray(y_support)
  batch, k, p = phi_support.shape
  a = phi_support @ np.swapaxes(phi_support, 1, 2) + ridge * np.eye(k)[None]
  alpha_star = np.linalg.solve(a, y_support[..., None])[..., 0]
  a_norm = lambda v: np.sqrt(np.einsum("b...i,bij,b...j->b...", v, a, v))
  errors = {}
  for name, preconditioner in (("cg", None), ("pcg", "jacobi")):
    compiled = compiler.compile_cg(k, p, num_steps, ridge, mask="prefix",
                                   preconditioner=preconditioner)
    state = compiled.read_state(compiled.forward(phi_support, y_support, phi_query,
                                                 return_residuals=True).residuals)
    alpha = np.asarray(state.alpha)  # [B, t+1, k]
    errors[name] = _rms(a_norm(alpha - alpha_star[:, None]) / a_norm(alpha_star)[:, None], axis=0)
  scaling = 1 / np.sqrt(np.diagonal(a, axis1=1, axis2=2))
  kappa = np.linalg.cond(a)
  kappa_pre = np.linalg.cond(scaling[:, :, None] * a * scaling[:, None, :])
  rate = lambda kk: float((np.sqrt(np.median(kk)) - 1) / (np.sqrt(np.median(kk)) + 1))
  return Preconditioning(errors["cg"], errors["pcg"], kappa, kappa_pre, rate(kappa),
                         rate(kappa_pre))


class ChebyshevVsCG(NamedTuple):
  """Relative prediction error vs the KRR oracle of compiled Chebyshev (exact spectral bounds)
  and compiled CG, and their layers per step."""

  chebyshev: np.ndarray
  cg: np.ndarray
  chebyshev_layers_per_step: int
  cg_layers_per_step: int


def chebyshev_vs_cg(phi_support, y_support, phi_query, ridge, num_steps) -> ChebyshevVsCG:
  """Compiled Chebyshev (one interval: the batch's smallest and largest eigenvalue of K + ridge I)
  and compiled CG against the KRR oracle, t = 0..T."""
  phi_support = np.asarray(phi_support)
  batch, k, p = phi_support.shape
  f_star = np.asarray(solvers.krr_predict(phi_support, y_support, phi_query, ridge))
  scale = _rms(f_star)
  eig = np.linalg.eigvalsh(phi_support @ np.swapaxes(phi_support, 1, 2) + ridge * np.eye(k)[None])
  low, high = float(eig[:, 0].min()), float(eig[:, -1].max())
  cheb = compiler.compile_chebyshev(k, p, num_steps, ridge, eig_bounds=(low, high), mask="prefix")
  cg = compiler.compile_cg(k, p, num_steps, ridge, mask="prefix")
  errors = [_rms(np.asarray(c.predict_steps(phi_support, y_support, phi_query)) - f_star[:, None],
                 axis=(0, 2)) / scale for c in (cheb, cg)]
  return ChebyshevVsCG(errors[0], errors[1], cheb.dimensions.layers_per_step,
                       cg.dimensions.layers_per_step)


# ----------------------------------------------------------------------------------------------------
# Width below the feature dimension (m < p): compiled width-m models against the sketch bound.
# ----------------------------------------------------------------------------------------------------


class WidthError(NamedTuple):
  """Compiled width-m models (`compile_cg(projection=S)`) against full KRR, one entry per sketch.

  Errors are RMS over prompts and queries relative to RMS(f) of the full KRR f. compiled_vs_full:
  the measured error of the compiled model; reference_vs_full: sketched KRR (`kcg.sketch`) vs f;
  compiled_vs_reference: the compiled model against sketched KRR; bound and sharp:
  `kcg.sketch.sketch_error_bound` with each prompt's own E (a bound at every query); tail_estimate:
  the same formula with E^2 := k sum_{i>m} mu_i (an expected-value estimate; NaN without
  eigenvalues); max_ratio: largest measured / bound over prompts and queries (<= 1);
  kernel_distance: mean E^2 = ||K - K_m||_2; expected_tail: k sum_{i>m} mu_i; model_width: width
  of each compiled model, full_width that of the compiled model on all p features.
  """

  widths: np.ndarray
  compiled_vs_full: np.ndarray
  reference_vs_full: np.ndarray
  compiled_vs_reference: np.ndarray
  bound: np.ndarray
  sharp: np.ndarray
  tail_estimate: np.ndarray
  max_ratio: np.ndarray
  kernel_distance: np.ndarray
  expected_tail: np.ndarray
  model_width: np.ndarray
  full_width: int


def converged_steps(rank: int, num_support: int, form: str) -> int:
  """CG steps that take a width-m model to convergence: 2 m (primal) or 2 min(m + 1, k) (dual).

  In exact arithmetic m steps (primal, m x m system) or m + 1 (dual: K_m + ridge I has at most
  m + 1 distinct eigenvalues) suffice; float64 CG loses orthogonality on a decaying spectrum and
  needs a few more (measured, m = 8, kappa = 140: 2.5e-5 relative at t = m, 5e-12 at m + 2,
  4e-16 at m + 4), hence the factor 2.
  """
  return 2 * rank if form == "primal" else 2 * min(rank + 1, num_support)


def width_error(phi_support, y_support, phi_query, ridge, projections, *, eigenvalues=None,
                form: str = "primal", mask: str = "prefix") -> WidthError:
  """Compiles one width-m model per projection S [m, p] and measures it against full KRR.

  phi_support [B, k, p], y_support [B, k], phi_query [B, q, p]; each S [m, p] has orthonormal
  rows. Each model runs `converged_steps(m, k, form)` CG steps on the m-dimensional construction.
  `eigenvalues` (mu [p] of the second moment the principal projections were taken from) give the
  spectral-tail estimate.
  """
  phi_support, y_support, phi_query = (np.asarray(a, np.float64) for a in
                                       (phi_support, y_support, phi_query))
  _, k, p = phi_support.shape
  f_full = np.asarray(solvers.krr_predict(phi_support, y_support, phi_query, ridge))
  scale = max(float(_rms(f_full)), 1e-300)
  rows = []
  for s in projections:
    s = np.asarray(s, np.float64)
    m = s.shape[0]
    num_steps = converged_steps(m, k, form)
    compiled = compiler.compile_cg(k, p, num_steps, ridge, mask=mask, form=form, projection=s)
    got = np.asarray(compiled.predict(phi_support, y_support, phi_query))
    ref = np.asarray(sketch.sketched_krr_predict(phi_support, y_support, phi_query, ridge, s))
    own = sketch.sketch_error_bound(phi_support, y_support, phi_query, ridge, s)
    measured = np.abs(got - f_full)
    bound = np.asarray(own.bound)
    resolved = bound > 1e-8 * np.max(np.abs(f_full))  # below: the sketch loses nothing (rounding)
    ratio = float(np.max(measured[resolved] / bound[resolved])) if np.any(resolved) else float("nan")
    if eigenvalues is None:
      expected, tail = float("nan"), float("nan")
    else:
      expected = sketch.spectral_tail(eigenvalues, m, k)
      estimate = sketch.sketch_error_bound(phi_support, y_support, phi_query, ridge, s,
                                           kernel_distance=expected)
      tail = float(_rms(np.asarray(estimate.bound))) / scale
    rows.append((m, _rms(measured) / scale, _rms(ref - f_full) / scale, _rms(got - ref) / scale,
                 _rms(bound) / scale, _rms(np.asarray(own.sharp)) / scale, tail, ratio,
                 float(np.mean(np.asarray(own.kernel_distance))), expected,
                 compiled.dimensions.width))
  columns = [np.asarray(c) for c in zip(*rows)]
  full_width = compiler.dimensions(k, p, converged_steps(p, k, form), mask=mask, form=form).width
  return WidthError(*columns, full_width=int(full_width))


# ----------------------------------------------------------------------------------------------------
# Several outputs: r independent CGs sharing the mat-vec head, against block CG.
# ----------------------------------------------------------------------------------------------------


class MultiOutputCost(NamedTuple):
  """Cost and accuracy of one way to solve (K + ridge I) A = Y, Y [k, r], in a compiled model.

  Attributes:
    kind: "independent" (r CGs in one model) or "block" (block CG).
    num_outputs: r.
    layers_per_step, num_layers, width, num_heads, mlp_hidden: the model's size.
    error: [t+1] RMS over prompts, queries and outputs of f_t - f*, over the RMS of f*.
    compiled_vs_reference: [t+1] the same for f_t(compiled) - f_t(reference solver).
  """

  kind: str
  num_outputs: int
  layers_per_step: int
  num_layers: int
  width: int
  num_heads: int
  mlp_hidden: int
  error: np.ndarray
  compiled_vs_reference: np.ndarray


def multi_output_cost(phi_support, y_support, phi_query, ridge, num_steps,
                      kinds: Sequence[str] = ("independent", "block")) -> list[MultiOutputCost]:
  """Compiles each multi-output construction (dual, prefix mask) for y_support [B, k, r].

  The reference is column-wise CG for "independent" and `solvers.block_cg_predict` for "block".
  """
  phi_support, y_support = np.asarray(phi_support), np.asarray(y_support)
  batch, k, p = phi_support.shape
  r = y_support.shape[-1]
  f_star = np.asarray(solvers.krr_predict(phi_support, y_support, phi_query, ridge))  # [B, q, r]
  scale = _rms(f_star)
  out = []
  for kind in kinds:
    model = compiler.compile_cg(k, p, num_steps, ridge, mask="prefix", num_outputs=r,
                                multi_output=kind)
    steps = np.asarray(model.predict_steps(phi_support, y_support, phi_query))  # [B, t+1, q, r]
    if kind == "block":
      reference = np.asarray(solvers.block_cg_predict(phi_support, y_support, phi_query, ridge,
                                                      num_steps))
    else:
      reference = np.asarray(solvers.cg_predict(phi_support, y_support, phi_query, ridge, num_steps))
    dims = model.dimensions
    out.append(MultiOutputCost(
        kind, r, dims.layers_per_step, dims.num_layers, dims.width, dims.num_heads, dims.mlp_hidden,
        _rms(steps - f_star[:, None], axis=(0, 2, 3)) / scale,
        _rms(steps - reference, axis=(0, 2, 3)) / scale))
  return out
