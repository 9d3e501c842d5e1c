"""Candidate in-context algorithms on a feature space, step by step: `[B, T+1, q]` trajectories.

On features `phi_support [B, k, p]`, `phi_query [B, q, p]` with `A = Phi Phi^T + ridge I`:

* from `kcg.matching` (per prompt, step sizes computed from the prompt): `"cg"`, `"pcg"` (Jacobi),
  `"gd"` (step `2 / (lam_min + lam_max)` of the prompt's A), `"chebyshev"` (the prompt's exact
  spectral interval), `"newton_schulz"`;
* fitted once to the task distribution (`fit_candidates`, on held-out prompts, least squared error to
  `y_query`, separately for every step count t), so that nothing is computed from the prompt but the
  mat-vecs:
  - `"gd_plus"` (GD++, preconditioned GD in feature space): `w_{s+1} = w_s + (c / k) P (Phi^T (y -
    Phi w_s) - ridge w_s)`, `P = (Sigma + delta tr(Sigma)/p I)^{-1}` with `Sigma` the features' second
    moment over the held-out supports; `(c, delta)` fitted;
  - `"momentum"` (heavy ball on the dual): `alpha_{s+1} = alpha_s + eta (y - A alpha_s) + beta
    (alpha_s - alpha_{s-1})`, `eta = c / median lam_max(A)` over held-out prompts; `(c, beta)` fitted;
  - `"polynomial"`: `f_t(x) = k(x)^T sum_{j<t} c_j T_j(2 A / s - I) y`, Chebyshev polynomials `T_j`,
    `s` the largest `lam_max(A)` of the held-out prompts, `c` by least squares: the best fixed
    polynomial of degree t - 1 in A (t mat-vecs, as CG_t), what a model can learn from the
    distribution of spectra without computing step sizes from the prompt.

All but CG and PCG are linear in y. With `intercept=True` features and labels are centred on the
supports' means first and the labels' mean is added back (step 0 then predicts the mean label).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import alignment_measures as measures
from kcg._src import checks
from kcg._src import matching

Array = jax.Array

PER_PROMPT = ("cg", "pcg", "gd", "chebyshev", "newton_schulz")
FITTED = ("gd_plus", "momentum", "polynomial")
CANDIDATES = PER_PROMPT + FITTED
LINEAR_IN_Y = ("gd", "chebyshev", "newton_schulz") + FITTED

_GD_PLUS_STEPS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5)
_GD_PLUS_DELTAS = (1e-3, 1e-2, 1e-1, 1.0)
_MOMENTUM_STEPS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
_MOMENTUM_BETAS = (0.0, 0.3, 0.5, 0.7, 0.85, 0.95)


class FeatureProblem(NamedTuple):
  """In-context problems on features: `phi_support [B, k, p]`, `y_support [B, k]`,
  `phi_query [B, q, p]`, and (for fitting) the targets `y_query [B, q]`."""

  phi_support: Any
  y_support: Any
  phi_query: Any
  y_query: Any = None


class FittedCandidates(NamedTuple):
  """Parameters of the fitted candidates, one entry per step count t = 1..T (`fit_candidates`).

  Attributes:
    max_steps: T.
    ridge, intercept: the KRR system they were fitted on.
    params: `{name: [params of t = 1, ..., params of t = T]}`.
    constants: what the fit fixed from the held-out prompts (`preconditioner` [p, p], `eta_scale`,
      `spectral_scale`).
  """

  max_steps: int
  ridge: float
  intercept: bool
  params: dict
  constants: dict


def check_candidates(names: Sequence[str]) -> tuple[str, ...]:
  names = tuple(names)
  for name in names:
    if name not in CANDIDATES:
      raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}.")
  return names


def _prepare(problem: FeatureProblem, intercept: bool):
  phi_s, y_s, phi_q = measures.check_features(problem.phi_support, problem.y_support,
                                              problem.phi_query)
  if intercept:
    phi_s, y_s, phi_q, mean_y = measures.centre(phi_s, y_s, phi_q)
  else:
    mean_y = jnp.zeros_like(y_s[:, :1])
  return phi_s, y_s, phi_q, mean_y


def _system(phi_s, phi_q, ridge):
  k = phi_s.shape[1]
  gram = jnp.einsum("bkp,bjp->bkj", phi_s, phi_s, precision=checks.HIGHEST)
  a = gram + jnp.asarray(ridge, phi_s.dtype) * jnp.eye(k, dtype=phi_s.dtype)[None]
  cross = jnp.einsum("bqp,bkp->bqk", phi_q, phi_s, precision=checks.HIGHEST)
  return a, cross


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _gd_plus_core(phi_s, y_s, phi_q, ridge, preconditioner, step, *, num_steps):
  k = phi_s.shape[1]
  w = jnp.zeros(phi_s.shape[:1] + phi_s.shape[2:], phi_s.dtype)
  outs = [jnp.zeros(phi_q.shape[:2], phi_s.dtype)]
  for _ in range(num_steps):
    residual = y_s - jnp.einsum("bkp,bp->bk", phi_s, w, precision=checks.HIGHEST)
    grad = jnp.einsum("bkp,bk->bp", phi_s, residual, precision=checks.HIGHEST) - ridge * w
    w = w + (step / k) * jnp.einsum("pq,bq->bp", preconditioner, grad, precision=checks.HIGHEST)
    outs.append(jnp.einsum("bqp,bp->bq", phi_q, w, precision=checks.HIGHEST))
  return jnp.stack(outs, axis=1)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _momentum_core(a, cross, y_s, eta, beta, *, num_steps):
  alpha = prev = jnp.zeros_like(y_s)
  outs = [jnp.zeros(cross.shape[:2], y_s.dtype)]
  for _ in range(num_steps):
    residual = y_s - jnp.einsum("bkj,bj->bk", a, alpha, precision=checks.HIGHEST)
    alpha, prev = alpha + eta * residual + beta * (alpha - prev), alpha
    outs.append(jnp.einsum("bqk,bk->bq", cross, alpha, precision=checks.HIGHEST))
  return jnp.stack(outs, axis=1)


@functools.partial(jax.jit, static_argnames=("num_terms",))
def _chebyshev_features(a, cross, y_s, scale, *, num_terms):
  """`u_j = k(x)^T T_j(2 A / s - I) y`, `[B, q, num_terms]`."""
  shifted = lambda v: 2 * jnp.einsum("bkj,bj->bk", a, v, precision=checks.HIGHEST) / scale - v
  vs = [y_s]
  if num_terms > 1:
    vs.append(shifted(y_s))
  while len(vs) < num_terms:
    vs.append(2 * shifted(vs[-1]) - vs[-2])
  v = jnp.stack(vs, axis=-1)  # [B, k, J]
  return jnp.einsum("bqk,bkj->bqj", cross, v, precision=checks.HIGHEST)


def _mse_per_step(traj, y_q, mean_y):
  """Mean squared error of a trajectory `[B, T+1, q]` (+ mean) against `y_q`, per step; inf if NaN."""
  err = np.mean(np.square(np.asarray(traj) + np.asarray(mean_y)[:, :, None] - np.asarray(y_q)[:, None]),
                axis=(0, 2))
  return np.where(np.isfinite(err), err, np.inf)


def fit_candidates(fit: FeatureProblem, ridge: float, max_steps: int, *, intercept: bool = False,
                   names: Sequence[str] = FITTED) -> FittedCandidates:
  """Fits the parameters of the `FITTED` candidates in `names` to `fit.y_query`, per step count.

  Args:
    fit: held-out problems with targets `y_query`.
    ridge: the KRR ridge of the system (`A = Phi Phi^T + ridge I`).
    max_steps: T.
    intercept: centre on the supports first (as everywhere in a feature space).
    names: which of `FITTED` to fit (others are ignored).
  """
  max_steps = checks.check_num_steps(max_steps)
  checks.check_ridge(ridge)
  if fit.y_query is None:
    raise ValueError("fit_candidates needs targets: pass FeatureProblem(..., y_query=[B, q]).")
  phi_s, y_s, phi_q, mean_y = _prepare(fit, intercept)
  y_q = checks.as_array("y_query", fit.y_query, phi_s.dtype)
  if y_q.shape != phi_q.shape[:2]:
    raise ValueError(f"y_query must be [B, q] = {phi_q.shape[:2]}, got {y_q.shape}.")
  dtype = phi_s.dtype
  a, cross = _system(phi_s, phi_q, ridge)
  lam_max = np.asarray(jnp.linalg.eigvalsh(a)[:, -1])
  params, constants = {}, {}
  names = [n for n in check_candidates(names) if n in FITTED]
  if "gd_plus" in names:
    second = np.einsum("bkp,bkq->pq", np.asarray(phi_s), np.asarray(phi_s)) / (
        phi_s.shape[0] * phi_s.shape[1])
    trace = max(float(np.trace(second)) / second.shape[0], np.finfo(np.float64).tiny)
    best = np.full(max_steps + 1, np.inf)
    choice = [None] * (max_steps + 1)
    preconditioners = {}
    for step, delta in itertools.product(_GD_PLUS_STEPS, _GD_PLUS_DELTAS):
      if delta not in preconditioners:
        preconditioners[delta] = np.linalg.inv(second + delta * trace * np.eye(second.shape[0]))
      traj = _gd_plus_core(phi_s, y_s, phi_q, jnp.asarray(ridge, dtype),
                           jnp.asarray(preconditioners[delta], dtype), jnp.asarray(step, dtype),
                           num_steps=max_steps)
      err = _mse_per_step(traj, y_q, mean_y)
      better = err < best
      best = np.where(better, err, best)
      choice = [(step, delta) if better[t] else choice[t] for t in range(max_steps + 1)]
    params["gd_plus"] = [choice[t] for t in range(1, max_steps + 1)]
    constants["gd_plus_second_moment"] = second
  if "momentum" in names:
    scale = float(np.median(lam_max))
    best = np.full(max_steps + 1, np.inf)
    choice = [None] * (max_steps + 1)
    for c, beta in itertools.product(_MOMENTUM_STEPS, _MOMENTUM_BETAS):
      traj = _momentum_core(a, cross, y_s, jnp.asarray(c / scale, dtype), jnp.asarray(beta, dtype),
                            num_steps=max_steps)
      err = _mse_per_step(traj, y_q, mean_y)
      better = err < best
      best = np.where(better, err, best)
      choice = [(c / scale, beta) if better[t] else choice[t] for t in range(max_steps + 1)]
    params["momentum"] = [choice[t] for t in range(1, max_steps + 1)]
  if "polynomial" in names:
    scale = float(np.max(lam_max)) * 1.01
    constants["polynomial_scale"] = scale
    u = np.asarray(_chebyshev_features(a, cross, y_s, jnp.asarray(scale, dtype),
                                       num_terms=max(max_steps, 1)), np.float64)
    target = (np.asarray(y_q) - np.asarray(mean_y)).reshape(-1)
    coefs = []
    for t in range(1, max_steps + 1):
      design = u[..., :t].reshape(-1, t)
      # A tiny ridge keeps the normal equations solvable when two basis columns coincide.
      gram = design.T @ design
      gram += 1e-12 * np.trace(gram) / t * np.eye(t)
      coefs.append(np.linalg.solve(gram, design.T @ target))
    params["polynomial"] = coefs
  return FittedCandidates(max_steps, float(ridge), bool(intercept), params, constants)


def trajectories(problem: FeatureProblem, ridge: float, max_steps: int, *, intercept: bool = False,
                 names: Sequence[str] = PER_PROMPT, fitted: FittedCandidates | None = None
                 ) -> dict[str, np.ndarray]:
  """`{name: [B, T+1, q]}` predictions after t = 0..T steps of each candidate (module docstring).

  Fitted candidates need `fitted = fit_candidates(...)` with the same ridge, intercept and at least T
  steps.
  """
  names = check_candidates(names)
  max_steps = checks.check_num_steps(max_steps)
  checks.check_ridge(ridge)
  phi_s, y_s, phi_q, mean_y = _prepare(problem, intercept)
  dtype = phi_s.dtype
  add = lambda traj: np.asarray(traj) + np.asarray(mean_y)[:, :, None]
  out = {}
  per_prompt = tuple(n for n in names if n in PER_PROMPT)
  if per_prompt:
    prompts = FeatureProblem(phi_s, y_s, phi_q)
    values = matching.algorithm_trajectories(
        _AsPrompts(prompts.phi_support, prompts.y_support, prompts.phi_query), ridge, max_steps,
        algorithms=per_prompt, spaces=("data",))
    out.update({n: add(values[f"{n}/data"]) for n in per_prompt})
  wanted = [n for n in names if n in FITTED]
  if wanted:
    if fitted is None:
      raise ValueError(f"candidates {wanted} are fitted to the task distribution: pass "
                       "fitted=fit_candidates(held-out problems, ridge, max_steps).")
    if (fitted.max_steps < max_steps or not np.isclose(fitted.ridge, ridge)
        or fitted.intercept != bool(intercept)):
      raise ValueError(f"fitted candidates were fitted with T={fitted.max_steps}, ridge="
                       f"{fitted.ridge:g}, intercept={fitted.intercept}; this call asks T={max_steps}, "
                       f"ridge={ridge:g}, intercept={intercept}.")
    missing = [n for n in wanted if n not in fitted.params]
    if missing:
      raise ValueError(f"fitted has no parameters for {missing}; fit them with names=... .")
    a, cross = _system(phi_s, phi_q, ridge)
    for name in wanted:
      # Step count t uses the parameters fitted for t; every distinct parameter set runs all T steps
      # once (one compiled shape) and gives its column t.
      runs = {}
      columns = [np.zeros(phi_q.shape[:2])]
      for t in range(1, max_steps + 1):
        p = fitted.params[name][t - 1]
        tag = tuple(np.ravel(p).tolist())
        if tag not in runs:
          runs[tag] = np.asarray(_fitted_run(name, p, fitted, phi_s, y_s, phi_q, a, cross, ridge,
                                             max_steps))
        columns.append(runs[tag][:, t])
      out[name] = add(np.stack(columns, axis=1))
  return {n: out[n] for n in names}


def _fitted_run(name, p, fitted, phi_s, y_s, phi_q, a, cross, ridge, max_steps) -> Array:
  """`[B, T+1, q]` of one fitted candidate with parameters `p` (the polynomial: column t uses the
  first t coefficients, i.e. `p` padded with zeros, so only column `len(p)` is its own)."""
  dtype = phi_s.dtype
  if name == "gd_plus":
    second = fitted.constants["gd_plus_second_moment"]
    trace = max(float(np.trace(second)) / second.shape[0], np.finfo(np.float64).tiny)
    pre = np.linalg.inv(second + p[1] * trace * np.eye(second.shape[0]))
    return _gd_plus_core(phi_s, y_s, phi_q, jnp.asarray(ridge, dtype), jnp.asarray(pre, dtype),
                         jnp.asarray(p[0], dtype), num_steps=max_steps)
  if name == "momentum":
    return _momentum_core(a, cross, y_s, jnp.asarray(p[0], dtype), jnp.asarray(p[1], dtype),
                          num_steps=max_steps)
  u = _chebyshev_features(a, cross, y_s, jnp.asarray(fitted.constants["polynomial_scale"], dtype),
                          num_terms=max(max_steps, 1))
  coefs = np.zeros(u.shape[-1])
  coefs[:len(p)] = p
  value = jnp.einsum("bqj,j->bq", u, jnp.asarray(coefs, dtype))
  return jnp.broadcast_to(value[:, None], (value.shape[0], max_steps + 1, value.shape[1]))


class _AsPrompts(NamedTuple):
  x_support: Any
  y_support: Any
  x_query: Any


__all__ = ("CANDIDATES", "FITTED", "FeatureProblem", "FittedCandidates", "LINEAR_IN_Y", "PER_PROMPT",
           "check_candidates", "fit_candidates", "trajectories")
