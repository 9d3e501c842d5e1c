"""Measurements for the constructions beyond plain CG: softmax Routes A and B, Jacobi PCG, Chebyshev.

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
