"""Reference solvers for kernel ridge regression (KRR): closed form and iterative, with full traces.

KRR with kernel `k` on support features `phi_1..phi_k` and targets `y` predicts

    f*(x) = k(x)^T alpha*,   alpha* = A^{-1} y,   A = K + ridge I,   K_ij = k(phi_i, phi_j).

`krr_predict` computes `f*` by Cholesky (kcg._src.krr, with the validated KRR systems every solver
builds on; block CG is kcg._src.block_cg; both re-exported here). The iterative solvers run
`num_steps` steps on `A alpha = y`
from `alpha_0 = 0` and return a `SolverTrace` with the state after every step `0..num_steps`, so that
experiments (and the compiled transformer, which reproduces these recurrences) can compare algorithms
step by step (see `cg` for how far "to rounding" carries in finite precision):

* `cg`: conjugate gradient (Hestenes-Stiefel, textbook recurrences; differences listed in `cg`).
* `pcg`: CG preconditioned by a diagonal (Jacobi) matrix `M = diag(d)`.
* `gd`: gradient descent (Richardson iteration) with a fixed step.
* `chebyshev`: Chebyshev semi-iteration from spectral bounds `[lo, hi]`.
* `block_cg`: block CG (O'Leary 1980) on `A X = Y` for `r` outputs at once, `BlockCGTrace`.

Every solver has a predict form `<solver>_predict(phi_support, y_support, phi_query, ridge, num_steps,
..., kernel=linear_kernel)` returning `f_t = K_query_support alpha_t` for `t = 0..num_steps`, shape
`[..., num_steps + 1, q]`. `primal_cg` runs CG on the primal (feature-space) system instead.

Shapes and conventions shared by all functions here:
* Leading dims are batch dims and broadcast NumPy style. `y_support` (or `b`) has the same number of
  dims as `phi_support` (or `A`) minus one for one output, `[..., k]`, or the same number for `r`
  outputs solved independently, `[..., k, r]`. To share one `A` across a batch of `b`, give `A` a
  size-1 batch dim (`A[None]`).
* Computation happens in the floating dtype of the array inputs (integer inputs give the default
  float); `ridge` and other scalars are cast to it.
* Bad shapes, `ridge <= 0` (or a string, bool or complex ridge), `num_steps < 0`, NaN/Inf or
  complex inputs, a non-symmetric matrix and a failed Cholesky factorisation raise ValueError.
  Value checks are skipped under `jit`/`vmap` (values are abstract there; the dtype, and so a
  complex input, is still seen); `num_steps` must be a static Python int,
  e.g. `jax.jit(cg_predict, static_argnames="num_steps")`. A kernel passed through an outer `jit`
  must be static (a plain function) or a pytree such as `kcg.kernels.ExponentialKernel`.
* Gradients flow through every solver (`jax.grad` of a prediction w.r.t. `y` or the features); at a
  point where CG has converged exactly (e.g. `b = 0`) the zero-denominator guard makes them 0.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kcg._src import checks
from kcg._src import kernels as kernels_lib
from kcg._src import krr
# The closed form, the KRR systems and block CG live in their own modules; their names are
# re-exported here so that `kcg._src.solvers` stays the one import of the reference solvers.
from kcg._src.block_cg import BlockCGTrace, block_cg, block_cg_predict, scaled_pseudo_inverse  # noqa: F401
from kcg._src.krr import (KRRInputs, KRRSystem, broadcast_param, build_system, cholesky_solve,  # noqa: F401
                          kernel_arg, krr_alpha, krr_alpha_kernel, krr_predict, krr_predict_kernel,
                          krr_system, spectrum_bounds, system_from_kernel_matrices, validate_krr)

Array = jax.Array
MatVec = Callable[[Array], Array]


class SolverTrace(NamedTuple):
  """The state of an iterative solver at every step.

  For one system with `k` unknowns (batch dims `...` lead; with `r` right-hand sides a trailing `r`
  axis is appended to every field):

  Attributes:
    alpha: iterates `alpha_0 = 0, alpha_1, ..., alpha_T`, shape `[..., T + 1, k]`.
    r: residuals `r_t = b - A alpha_t` as updated by the recurrence, shape `[..., T + 1, k]`.
    p: search directions `p_t` (zeros for `gd`, which has none), shape `[..., T + 1, k]`.
    gamma: step length used in step `s` (`alpha_{s+1} = alpha_s + gamma_s p_s`; for `gd` the step
      size, `alpha_{s+1} = alpha_s + gamma_s r_s`), shape `[..., T]`.
    beta: direction coefficient computed in step `s` (`p_{s+1} = z_{s+1} + beta_s p_s` with
      `z = r` for `cg` and `chebyshev`, `z = M^{-1} r` for `pcg`; zeros for `gd`), shape `[..., T]`.
  """
  alpha: Array
  r: Array
  p: Array
  gamma: Array
  beta: Array


# ----------------------------------------------------------------------------------------------------
# Single-system recurrences. Each takes a mat-vec `v[k] -> A v`, `b[k]` and its own parameters, and
# returns a SolverTrace with fields [T + 1, k] and [T]. Batching is added by `_solve`.
# ----------------------------------------------------------------------------------------------------


def _dot(u: Array, v: Array) -> Array:
  return jnp.dot(u, v, precision=checks.HIGHEST)


def _safe_div(numerator: Array, denominator: Array) -> Array:
  """`numerator / denominator`, and 0 where the denominator is exactly 0 (no NaN from 0/0)."""
  is_zero = denominator == 0
  return jnp.where(is_zero, jnp.zeros_like(numerator),
                   numerator / jnp.where(is_zero, jnp.ones_like(denominator), denominator))


def _with_initial(initial: tuple[Array, ...], steps: tuple[Array, ...]) -> tuple[Array, ...]:
  return tuple(jnp.concatenate([x0[None], xs], axis=0) for x0, xs in zip(initial, steps))


def _curvature_step(a_p: Array, p: Array, rho: Array, largest: Array, stopped: Array):
  """gamma = rho / p.Ap, or 0 once the curvature p.Ap is at rounding level (breakdown).

  p.Ap computed in floating point carries an error up to ~n eps ||A|| p.p, so a value at or
  below n eps (largest Rayleigh quotient p.Ap / p.p seen so far, a lower bound on ||A||) p.p
  says nothing about A along p: its sign may be wrong and gamma arbitrarily large. In exact
  arithmetic with A SPD that happens only when p = 0 (CG has terminated); in floating point also
  when cond(A) > ~1 / (n eps), where CG cannot make progress in this dtype. The run then stops:
  `stopped` stays True and the iterate is frozen (gamma = beta = 0, p kept), as a CG with a
  stopping test would stop, with the trace keeping its fixed length.
  """
  p_dot_ap, p_dot_p = _dot(p, a_p), _dot(p, p)
  largest = jnp.maximum(largest, _safe_div(p_dot_ap, p_dot_p))
  rounding = p.shape[-1] * jnp.finfo(p.dtype).eps
  stopped = stopped | ~(p_dot_ap > rounding * largest * p_dot_p)
  gamma = jnp.where(stopped, jnp.zeros_like(rho), _safe_div(rho, p_dot_ap))
  return gamma, largest, stopped


def _cg_single(matvec: MatVec, b: Array, num_steps: int) -> SolverTrace:
  def step(state, _):
    alpha, r, p, largest, stopped = state
    a_p = matvec(p)
    r_dot_r = _dot(r, r)
    gamma, largest, stopped = _curvature_step(a_p, p, r_dot_r, largest, stopped)
    alpha = alpha + gamma * p
    r_next = r - gamma * a_p
    beta = jnp.where(stopped, jnp.zeros_like(gamma), _safe_div(_dot(r_next, r_next), r_dot_r))
    p = jnp.where(stopped, p, r_next + beta * p)
    return (alpha, r_next, p, largest, stopped), (alpha, r_next, p, gamma, beta)

  initial = (jnp.zeros_like(b), b, b)
  carry = initial + (jnp.zeros((), b.dtype), jnp.zeros((), bool))
  _, (alphas, rs, ps, gammas, betas) = lax.scan(step, carry, length=num_steps)
  alpha, r, p = _with_initial(initial, (alphas, rs, ps))
  return SolverTrace(alpha, r, p, gammas, betas)


def _pcg_single(matvec: MatVec, b: Array, diagonal: Array, num_steps: int) -> SolverTrace:
  def step(state, _):
    alpha, r, p, largest, stopped = state
    z = r / diagonal
    a_p = matvec(p)
    r_dot_z = _dot(r, z)
    gamma, largest, stopped = _curvature_step(a_p, p, r_dot_z, largest, stopped)
    alpha = alpha + gamma * p
    r_next = r - gamma * a_p
    z_next = r_next / diagonal
    beta = jnp.where(stopped, jnp.zeros_like(gamma), _safe_div(_dot(r_next, z_next), r_dot_z))
    p = jnp.where(stopped, p, z_next + beta * p)
    return (alpha, r_next, p, largest, stopped), (alpha, r_next, p, gamma, beta)

  initial = (jnp.zeros_like(b), b, b / diagonal)
  carry = initial + (jnp.zeros((), b.dtype), jnp.zeros((), bool))
  _, (alphas, rs, ps, gammas, betas) = lax.scan(step, carry, length=num_steps)
  alpha, r, p = _with_initial(initial, (alphas, rs, ps))
  return SolverTrace(alpha, r, p, gammas, betas)


def _gd_single(matvec: MatVec, b: Array, step_size: Array, num_steps: int) -> SolverTrace:
  def step(state, _):
    alpha, r = state
    a_r = matvec(r)
    alpha = alpha + step_size * r
    r_next = r - step_size * a_r
    return (alpha, r_next), (alpha, r_next)

  initial = (jnp.zeros_like(b), b)
  _, (alphas, rs) = lax.scan(step, initial, length=num_steps)
  alpha, r = _with_initial(initial, (alphas, rs))
  gamma = jnp.broadcast_to(step_size, (num_steps,))
  return SolverTrace(alpha, r, jnp.zeros_like(alpha), gamma, jnp.zeros_like(gamma))


def _chebyshev_single(matvec: MatVec, b: Array, lo: Array, hi: Array, num_steps: int) -> SolverTrace:
  # Saad (2003) Alg. 12.1 rewritten in CG form (Barrett et al., Templates, Sec. 2.3.9, with the first
  # step 1/theta): alpha += gamma p; r -= gamma A p; p = r + beta p, where
  #   gamma_0 = 1/theta, beta_0 = (delta/theta)^2 / 2, beta_s = (delta gamma_s / 2)^2 (s >= 1),
  #   gamma_{s+1} = 1 / (theta - beta_s / gamma_s),   theta = (hi + lo)/2, delta = (hi - lo)/2.
  # This form never divides by delta, so lo == hi (Richardson with step 1/theta) needs no special case.
  theta = (hi + lo) / 2
  delta = (hi - lo) / 2

  def step(state, _):
    alpha, r, p, gamma, first_factor = state
    a_p = matvec(p)
    alpha = alpha + gamma * p
    r_next = r - gamma * a_p
    beta = first_factor * jnp.square(delta * gamma / 2)
    p = r_next + beta * p
    gamma_next = 1 / (theta - beta / gamma)
    return (alpha, r_next, p, gamma_next, jnp.ones_like(first_factor)), (alpha, r_next, p, gamma, beta)

  initial = (jnp.zeros_like(b), b, b)
  state0 = initial + (1 / theta, jnp.asarray(2, b.dtype))
  _, (alphas, rs, ps, gammas, betas) = lax.scan(step, state0, length=num_steps)
  alpha, r, p = _with_initial(initial, (alphas, rs, ps))
  return SolverTrace(alpha, r, p, gammas, betas)


_SINGLE_SOLVERS = {
    "cg": _cg_single,
    "pcg": _pcg_single,
    "gd": _gd_single,
    "chebyshev": _chebyshev_single,
}


# ----------------------------------------------------------------------------------------------------
# Batching: broadcast batch dims, flatten them, vmap the single-system recurrence.
# ----------------------------------------------------------------------------------------------------


def _batched_solve(solver: str, matrix: Array | None, matvec: MatVec | None, b: Array,
                   params: tuple[Array, ...], param_core_ndims: tuple[int, ...], multi_rhs: bool,
                   num_steps: int) -> SolverTrace:
  single = _SINGLE_SOLVERS[solver]
  if multi_rhs:
    # Independent systems per column: move the column axis r into the batch dims.
    b = jnp.swapaxes(b, -1, -2)
    matrix = matrix[..., None, :, :]
    params = tuple(jnp.expand_dims(x, x.ndim - c) for x, c in zip(params, param_core_ndims))
  operands = ((matrix,) if matrix is not None else ()) + (b,) + params
  core_ndims = ((2,) if matrix is not None else ()) + (1,) + param_core_ndims
  batch = tuple(np.broadcast_shapes(*(x.shape[:x.ndim - c] for x, c in zip(operands, core_ndims))))
  size = checks.batch_size(batch)
  flat, in_axes = [], []
  for x, c in zip(operands, core_ndims):
    core = x.shape[x.ndim - c:]
    if checks.batch_size(x.shape[:x.ndim - c]) == 1:
      flat.append(x.reshape(core))
      in_axes.append(None)
    else:
      flat.append(jnp.broadcast_to(x, batch + core).reshape((size,) + core))
      in_axes.append(0)

  def run(*args):
    if matrix is not None:
      a_kxk, b_k, *rest = args
      mv = lambda v: jnp.dot(a_kxk, v, precision=checks.HIGHEST)
    else:
      b_k, *rest = args
      mv = lambda v: jnp.asarray(matvec(v), b_k.dtype)
    return single(mv, b_k, *rest, num_steps)

  if all(axis is None for axis in in_axes):
    trace = run(*flat)
    trace = jax.tree.map(lambda x: x.reshape(batch + x.shape), trace)
  else:
    trace = jax.vmap(run, in_axes=tuple(in_axes))(*flat)
    trace = jax.tree.map(lambda x: x.reshape(batch + x.shape[1:]), trace)
  if multi_rhs:
    # [..., r, T + 1, k] -> [..., T + 1, k, r] and [..., r, T] -> [..., T, r].
    trace = SolverTrace(*(jnp.moveaxis(x, -3, -1) for x in trace[:3]),
                        *(jnp.moveaxis(x, -2, -1) for x in trace[3:]))
  return trace


_batched_solve_matrix = jax.jit(
    functools.partial(_batched_solve, matvec=None),
    static_argnames=("solver", "param_core_ndims", "multi_rhs", "num_steps"))


def _solve(solver: str, A: Any, b: Array, params: tuple[Array, ...],
           param_core_ndims: tuple[int, ...], multi_rhs: bool, num_steps: int) -> SolverTrace:
  if callable(A):
    return _batched_solve(solver, None, A, b, params, param_core_ndims, multi_rhs, num_steps)
  return _batched_solve_matrix(solver=solver, matrix=A, b=b, params=params,
                               param_core_ndims=param_core_ndims, multi_rhs=multi_rhs,
                               num_steps=num_steps)


# ----------------------------------------------------------------------------------------------------
# Validation of (A, b) systems.
# ----------------------------------------------------------------------------------------------------


class _System(NamedTuple):
  A: Any  # array [..., k, k] or a mat-vec callable
  b: Array
  multi_rhs: bool
  dtype: Any


def _check_system(A: Any, b: Any) -> _System:
  """Validates `A` (array [..., k, k] or mat-vec) and `b`, and decides single vs multiple RHS."""
  if callable(A):
    dtype = checks.float_dtype(b)
    b = checks.as_array("b", b, dtype, min_ndim=1, shape_doc="[..., k]")
    k = b.shape[-1]
    try:
      out = jax.eval_shape(A, jax.ShapeDtypeStruct((k,), dtype))
    except Exception as e:  # The mat-vec's own error, re-raised with what was expected of it.
      raise ValueError(
          f"the mat-vec A could not be applied to a vector of shape ({k},) and dtype {dtype}: {e}"
      ) from e
    if getattr(out, "shape", None) != (k,):
      raise ValueError(
          f"the mat-vec A must map a vector of shape ({k},) to shape ({k},); it returned "
          f"{getattr(out, 'shape', out)}. With a callable A every leading dim of b is a batch dim.")
    return _System(A, b, False, dtype)
  dtype = checks.float_dtype(A, b)
  A = checks.as_array("A", A, dtype, min_ndim=2, shape_doc="[..., k, k]")
  b = checks.as_array("b", b, dtype, min_ndim=1, shape_doc="[..., k] or [..., k, r]")
  if A.shape[-1] != A.shape[-2]:
    raise ValueError(f"A must be square, shape [..., k, k]; got shape {A.shape}.")
  checks.check_symmetric("A", A)
  k = A.shape[-1]
  if b.ndim == A.ndim - 1:
    multi_rhs = False
    b_k = b.shape[-1]
  elif b.ndim == A.ndim:
    multi_rhs = True
    b_k = b.shape[-2]
  else:
    raise ValueError(
        f"b must have shape [..., k] or [..., k, r] with the same batch dims as A {A.shape}; got "
        f"{b.shape}. To share A across a batch of b give A a size-1 batch dim (A[None]).")
  if b_k != k:
    raise ValueError(
        f"A is {k}x{k} but b has {b_k} rows (shape {b.shape}); b needs one entry per row of A.")
  checks.broadcast_batch(("A", "b"), (A, b), (2, 2 if multi_rhs else 1))
  return _System(A, b, multi_rhs, dtype)


def _check_positive(name: str, x: Any, fix: str) -> None:
  if checks.is_tracer(x):
    return
  if not np.all(np.asarray(x) > 0):
    raise ValueError(f"{name} must be > 0 everywhere, got {np.asarray(x)!r}; {fix}")


def _check_param_batch(system: _System, names: tuple[str, ...], params: tuple[Array, ...],
                       core_ndims: tuple[int, ...]) -> None:
  """Shape check: parameter batch dims broadcast against the system's."""
  if callable(system.A):
    operands, cores, labels = (system.b,), (1,), ("b",)
  else:
    operands = (system.A, system.b)
    cores = (2, 2 if system.multi_rhs else 1)
    labels = ("A", "b")
  checks.broadcast_batch(labels + names, operands + params, cores + core_ndims)


# ----------------------------------------------------------------------------------------------------
# Public solvers on A alpha = b.
# ----------------------------------------------------------------------------------------------------


def cg(A: Any, b: Any, num_steps: int) -> SolverTrace:
  """Conjugate gradient on `A alpha = b` from `alpha_0 = 0`, run for exactly `num_steps` steps.

  Recurrences (textbook Hestenes-Stiefel): `r_0 = b, p_0 = r_0`; for `s = 0..T-1`:
  `gamma_s = (r_s.r_s)/(p_s.A p_s)`, `alpha_{s+1} = alpha_s + gamma_s p_s`,
  `r_{s+1} = r_s - gamma_s A p_s`, `beta_s = (r_{s+1}.r_{s+1})/(r_s.r_s)`,
  `p_{s+1} = r_{s+1} + beta_s p_s`.

  Differences from the textbook (compare lineax's CG): (1) breakdown stops the run: when the
  curvature `p.Ap` is at rounding level (at most `k eps` times the largest `p.Ap / p.p` seen so far
  times `p.p`, or not positive) the iterate is frozen for the remaining steps (`gamma = beta = 0`,
  `p` kept; the trace keeps its length, so it jits). In exact arithmetic that happens only when CG
  has terminated (`b = 0`, `A = c I`, exact termination before `num_steps`: `p = 0`), where the
  textbook would divide 0 by 0; in floating point also when `cond(A) > ~1 / (k eps)` (float32 with
  a ridge far below `||K||`), where the textbook's steps are noise and its iterates drift without
  bound (measured: 6e4 relative error after 200 steps, k = 16, p = 4, ridge 1e-8). Runs on
  problems conditioned well enough for the dtype never meet this test before convergence; (2)
  there is no other stopping test: all `num_steps` steps are run and recorded; (3) the residual is
  never recomputed as `b - A alpha`, so in floating point `r` drifts from the true residual exactly
  as textbook CG does (the recursively updated `r.r` keeps falling far below `eps^2 b.b`).

  Finite precision: two correct CGs that round differently (this one, scipy's, a compiled
  transformer's) agree to O(eps * kappa) only until CG loses orthogonality, typically once a Ritz value
  has converged; from then on they differ by as much as CG moves when `A` is perturbed by one ulp
  (measured up to 2e-2 relative on `kcg.problems.TEST_CASES`, k = 64 and kappa = 1e4, and 1e-1 on
  other random problems), and all of them reach `A^{-1} b` late (by `t = 3k` on every test case)
  rather than at `t = k`. Compare late steps by their error, not entry by entry.

  Args:
    A: symmetric positive definite `[..., k, k]`, or a callable mat-vec `v[k] -> A v` (then every
      leading dim of `b` is a batch dim, vmapped over). A concrete array must be symmetric to
      `sqrt(eps)` relative to its largest entry, else ValueError: CG on a non-symmetric matrix
      returns a wrong answer without any sign of it. A mat-vec cannot be checked: it must be
      symmetric (`u . A(v) = v . A(u)`) and positive definite, or the result is meaningless.
    b: right-hand side `[..., k]`, or `[..., k, r]` for `r` independent systems (array `A` only).
    num_steps: number of steps `T >= 0` (static Python int).

  Returns:
    SolverTrace with `alpha, r, p` of shape `[..., T + 1, k]` and `gamma, beta` of shape `[..., T]`
    (with a trailing `r` axis for a multi-column `b`).
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _check_system(A, b)
  return _solve("cg", system.A, system.b, (), (), system.multi_rhs, num_steps)

def jacobi_diagonal(A: Any) -> Array:
  """The Jacobi preconditioner of `A [..., k, k]`: its diagonal, shape `[..., k]`."""
  dtype = checks.float_dtype(A)
  A = checks.as_array("A", A, dtype, min_ndim=2, shape_doc="[..., k, k]")
  if A.shape[-1] != A.shape[-2]:
    raise ValueError(f"A must be square, shape [..., k, k]; got shape {A.shape}.")
  return jnp.diagonal(A, axis1=-2, axis2=-1)


def pcg(A: Any, b: Any, num_steps: int, preconditioner: Any) -> SolverTrace:
  """Preconditioned CG with the diagonal preconditioner `M = diag(preconditioner)`.

  `z_s = M^{-1} r_s`, `p_0 = z_0`, `gamma_s = (r_s.z_s)/(p_s.A p_s)`,
  `alpha_{s+1} = alpha_s + gamma_s p_s`, `r_{s+1} = r_s - gamma_s A p_s`,
  `beta_s = (r_{s+1}.z_{s+1})/(r_s.z_s)`, `p_{s+1} = z_{s+1} + beta_s p_s`. Same differences from the
  textbook as `cg` (breakdown stops the run). `r` holds the unpreconditioned residual.

  Args:
    A: as in `cg`.
    b: as in `cg`.
    num_steps: as in `cg`.
    preconditioner: the diagonal `d > 0` of `M ~ A`, shape `[..., k]` (e.g. `jacobi_diagonal(A)`).

  Returns:
    SolverTrace shaped as in `cg`.
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _check_system(A, b)
  diagonal = checks.as_array("preconditioner", preconditioner, system.dtype, min_ndim=1,
                             shape_doc="[..., k]")
  k = system.b.shape[-2] if system.multi_rhs else system.b.shape[-1]
  if diagonal.shape[-1] != k:
    raise ValueError(
        f"preconditioner must be the diagonal of M, shape [..., {k}]; got shape {diagonal.shape}.")
  _check_positive("preconditioner", preconditioner,
                  "the diagonal of a positive definite preconditioner is positive.")
  _check_param_batch(system, ("preconditioner",), (diagonal,), (1,))
  return _solve("pcg", system.A, system.b, (diagonal,), (1,), system.multi_rhs, num_steps)


def optimal_gd_step(lam_min: Any, lam_max: Any) -> Array:
  """The fixed gradient-descent step `2 / (lam_min + lam_max)` minimising the worst-case rate."""
  dtype = checks.float_dtype(lam_min, lam_max)
  return 2 / (jnp.asarray(lam_min, dtype) + jnp.asarray(lam_max, dtype))


def gd(A: Any, b: Any, num_steps: int, step_size: Any) -> SolverTrace:
  """Gradient descent on `alpha^T A alpha / 2 - b^T alpha` with a fixed step (Richardson iteration).

  `r_0 = b`; `alpha_{s+1} = alpha_s + eta r_s`, `r_{s+1} = r_s - eta A r_s`. Converges for
  `0 < eta < 2 / lam_max`; `optimal_gd_step` gives the best fixed step.

  Args:
    A: as in `cg`.
    b: as in `cg`.
    num_steps: as in `cg`.
    step_size: `eta > 0`, a scalar or batch-shaped `[...]`.

  Returns:
    SolverTrace as in `cg`; `gamma` holds `eta` at every step, and `p` and `beta` (which GD does not
    have) are zeros.
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _check_system(A, b)
  step_size = checks.as_array("step_size", step_size, system.dtype)
  _check_positive("step_size", step_size, "pass a positive step such as optimal_gd_step(lo, hi).")
  _check_param_batch(system, ("step_size",), (step_size,), (0,))
  return _solve("gd", system.A, system.b, (step_size,), (0,), system.multi_rhs, num_steps)


def _check_eig_bounds(eig_bounds: Any, dtype: Any) -> tuple[Array, Array]:
  try:
    lo, hi = eig_bounds
  except (TypeError, ValueError):
    raise ValueError(
        f"eig_bounds must be a pair (lo, hi) of spectral bounds of A, got {eig_bounds!r}.") from None
  lo = checks.as_array("eig_bounds[0]", lo, dtype)
  hi = checks.as_array("eig_bounds[1]", hi, dtype)
  if not (checks.is_tracer(lo) or checks.is_tracer(hi)):
    if not (np.all(np.asarray(lo) > 0) and np.all(np.asarray(hi) >= np.asarray(lo))):
      raise ValueError(
          f"eig_bounds must satisfy 0 < lo <= hi, got lo={np.asarray(lo)!r}, hi={np.asarray(hi)!r}.")
  return lo, hi


def chebyshev(A: Any, b: Any, num_steps: int, eig_bounds: Any) -> SolverTrace:
  """Chebyshev semi-iteration on `A alpha = b` from `alpha_0 = 0`, given `eig(A) in [lo, hi]`.

  Saad (2003) Alg. 12.1 in CG form (`alpha += gamma p; r -= gamma A p; p = r + beta p`) with
  `theta = (hi + lo)/2`, `delta = (hi - lo)/2`, `gamma_0 = 1/theta`, `beta_0 = (delta/theta)^2/2`,
  `beta_s = (delta gamma_s/2)^2`, `gamma_{s+1} = 1/(theta - beta_s/gamma_s)`. The residual polynomial
  after `t` steps is `T_t((theta - lam)/delta) / T_t(theta/delta)`.

  Args:
    A: as in `cg`.
    b: as in `cg`.
    num_steps: as in `cg`.
    eig_bounds: `(lo, hi)` with `0 < lo <= hi`, scalars or batch-shaped `[...]`.

  Returns:
    SolverTrace as in `cg` (`p` is the unscaled direction, the update is `gamma_s p_s`).
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _check_system(A, b)
  lo, hi = _check_eig_bounds(eig_bounds, system.dtype)
  _check_param_batch(system, ("lo", "hi"), (lo, hi), (0, 0))
  return _solve("chebyshev", system.A, system.b, (lo, hi), (0, 0), system.multi_rhs, num_steps)

# ----------------------------------------------------------------------------------------------------
# Iterative solvers on KRR systems built from features (kcg._src.krr).
# ----------------------------------------------------------------------------------------------------

_PARAM_CORE_NDIMS = {"cg": (), "pcg": (1,), "gd": (0,), "chebyshev": (0, 0)}

def _default_params(solver: str, a: Array) -> tuple[Array, ...]:
  if solver == "cg":
    return ()
  if solver == "pcg":
    return (jnp.diagonal(a, axis1=-2, axis2=-1),)
  lo, hi = krr.spectrum_bounds(a)
  if solver == "gd":
    return (optimal_gd_step(lo, hi),)
  return (lo, hi)


@functools.partial(jax.jit, static_argnames=("solver", "multi", "num_steps"))
def _iterative_predict_core(kernel, phi_support, y, phi_query, ridge, params, solver, multi,
                            num_steps):
  system = krr.build_system(kernel, krr.inputs_from((phi_support, y, phi_query, ridge), multi))
  if params is None:
    params = _default_params(solver, system.A)
  trace = _batched_solve(solver, system.A, None, system.y, tuple(params),
                         _PARAM_CORE_NDIMS[solver], multi, num_steps)
  return krr.predict_trace(system.k_query_support, trace.alpha, multi)


def _iterative_predict(solver: str, phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                       num_steps: int, kernel: Any, params: Any) -> Array:
  """Validates, then runs `solver` in the jitted core; `params` None means the solver's default."""
  num_steps = checks.check_num_steps(num_steps)
  kernel = krr.kernel_arg(kernel)
  inputs = krr.validate_krr(phi_support, y_support, phi_query, ridge)
  dtype, batch, k = inputs.y.dtype, inputs.ridge.shape, inputs.phi_support.shape[-2]
  if params is not None:
    if solver == "pcg":
      diagonal = checks.as_array("preconditioner", params, dtype, min_ndim=1, shape_doc="[..., k]")
      if diagonal.shape[-1] != k:
        raise ValueError(
            f"preconditioner must be the diagonal of M, shape [..., {k}]; got {diagonal.shape}.")
      _check_positive("preconditioner", diagonal,
                      "the diagonal of a positive definite preconditioner is positive.")
      params = (krr.broadcast_param("preconditioner", diagonal, 1, batch),)
    elif solver == "gd":
      step_size = checks.as_array("step_size", params, dtype)
      _check_positive("step_size", step_size,
                      "pass a positive step such as optimal_gd_step(lo, hi).")
      params = (krr.broadcast_param("step_size", step_size, 0, batch),)
    else:
      lo, hi = _check_eig_bounds(params, dtype)
      params = (krr.broadcast_param("eig_bounds[0]", lo, 0, batch),
                krr.broadcast_param("eig_bounds[1]", hi, 0, batch))
  return _iterative_predict_core(kernel, *inputs[:4], params, solver=solver,
                                 multi=inputs.multi_output, num_steps=num_steps)


def cg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, num_steps: int, *,
               kernel: Any = kernels_lib.linear_kernel) -> Array:
  """KRR predictions after `t = 0..num_steps` CG steps on `(K + ridge I) alpha = y`.

  Returns `f_t = K(query, support) alpha_t`, shape `[..., num_steps + 1, q]` (or `[..., T + 1, q, r]`);
  arguments as in `krr_predict`, `num_steps` as in `cg`.
  """
  return _iterative_predict("cg", phi_support, y_support, phi_query, ridge, num_steps, kernel, None)


def pcg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, num_steps: int,
                preconditioner: Any = None, *,
                kernel: Any = kernels_lib.linear_kernel) -> Array:
  """KRR predictions `[..., T + 1, q(, r)]` along diagonal-preconditioned CG (`pcg`).

  `preconditioner`: the diagonal of `M`, `[..., k]`; None uses Jacobi, `diag(K + ridge I)`.
  """
  return _iterative_predict("pcg", phi_support, y_support, phi_query, ridge, num_steps, kernel,
                            preconditioner)


def gd_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, num_steps: int,
               step_size: Any = None, *, kernel: Any = kernels_lib.linear_kernel) -> Array:
  """KRR predictions `[..., T + 1, q(, r)]` along fixed-step gradient descent (`gd`).

  `step_size`: scalar or `[...]`; None uses `2/(lam_min + lam_max)` of `K + ridge I` (by `eigvalsh`).
  """
  return _iterative_predict("gd", phi_support, y_support, phi_query, ridge, num_steps, kernel,
                            step_size)


def chebyshev_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, num_steps: int,
                      eig_bounds: Any = None, *,
                      kernel: Any = kernels_lib.linear_kernel) -> Array:
  """KRR predictions `[..., T + 1, q(, r)]` along Chebyshev semi-iteration (`chebyshev`).

  `eig_bounds`: `(lo, hi)`; None uses the exact extreme eigenvalues of `K + ridge I` (by `eigvalsh`).
  """
  return _iterative_predict("chebyshev", phi_support, y_support, phi_query, ridge, num_steps,
                            kernel, eig_bounds)

# ----------------------------------------------------------------------------------------------------
# Primal (feature-space) CG.
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("multi", "num_steps"))
def _primal_core(phi_support, y, phi_query, ridge, multi, num_steps):
  gram = jnp.einsum("...kp,...kq->...pq", phi_support, phi_support, precision=checks.HIGHEST)
  a = krr.add_ridge(gram, ridge)
  if multi:
    b = jnp.einsum("...kp,...kr->...pr", phi_support, y, precision=checks.HIGHEST)
  else:
    b = jnp.einsum("...kp,...k->...p", phi_support, y, precision=checks.HIGHEST)
  trace = _batched_solve("cg", a, None, b, (), (), multi, num_steps)
  if phi_query is None:
    return trace
  return krr.predict_trace(phi_query, trace.alpha, multi)


def primal_cg(phi_support: Any, y_support: Any, ridge: Any, num_steps: int) -> SolverTrace:
  """CG on the primal ridge system `(Phi^T Phi + ridge I) w = Phi^T y` from `w_0 = 0`.

  Same recurrences as `cg`, in feature space: the trace's `alpha` holds the weights `w_t`, shape
  `[..., T + 1, p]` (`[..., T + 1, p, r]` for multi-output `y`). Linear kernel only (it needs the
  features themselves). In exact arithmetic `w_t` converges to the same `w* = Phi^T alpha*` as dual CG,
  but for `0 < t < min(k, p)` its iterates differ: it minimises a different norm of the error.
  """
  num_steps = checks.check_num_steps(num_steps)
  inputs = krr.validate_krr(phi_support, y_support, None, ridge)
  return _primal_core(inputs.phi_support, inputs.y, None, inputs.ridge, multi=inputs.multi_output,
                      num_steps=num_steps)


def primal_cg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                      num_steps: int) -> Array:
  """Predictions `phi_query w_t` along primal CG, shape `[..., T + 1, q]` (or `[..., T + 1, q, r]`)."""
  num_steps = checks.check_num_steps(num_steps)
  inputs = krr.validate_krr(phi_support, y_support, phi_query, ridge)
  return _primal_core(inputs.phi_support, inputs.y, inputs.phi_query, inputs.ridge,
                      multi=inputs.multi_output, num_steps=num_steps)
