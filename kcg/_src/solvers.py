"""Reference solvers for kernel ridge regression (KRR): closed form and iterative, with full traces.

KRR with kernel `k` on support features `phi_1..phi_k` and targets `y` predicts

    f*(x) = k(x)^T alpha*,   alpha* = A^{-1} y,   A = K + ridge I,   K_ij = k(phi_i, phi_j).

`krr_predict` computes `f*` by Cholesky. The iterative solvers run `num_steps` steps on `A alpha = y`
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
* Bad shapes, `ridge <= 0`, `num_steps < 0` and NaN/Inf inputs raise ValueError. Value checks are
  skipped under `jit`/`vmap` (values are abstract there); `num_steps` must be a static Python int,
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


def _cg_single(matvec: MatVec, b: Array, num_steps: int) -> SolverTrace:
  def step(state, _):
    alpha, r, p = state
    a_p = matvec(p)
    r_dot_r = _dot(r, r)
    gamma = _safe_div(r_dot_r, _dot(p, a_p))
    alpha = alpha + gamma * p
    r_next = r - gamma * a_p
    beta = _safe_div(_dot(r_next, r_next), r_dot_r)
    p = r_next + beta * p
    return (alpha, r_next, p), (alpha, r_next, p, gamma, beta)

  initial = (jnp.zeros_like(b), b, b)
  _, (alphas, rs, ps, gammas, betas) = lax.scan(step, initial, length=num_steps)
  alpha, r, p = _with_initial(initial, (alphas, rs, ps))
  return SolverTrace(alpha, r, p, gammas, betas)


def _pcg_single(matvec: MatVec, b: Array, diagonal: Array, num_steps: int) -> SolverTrace:
  def step(state, _):
    alpha, r, p = state
    z = r / diagonal
    a_p = matvec(p)
    r_dot_z = _dot(r, z)
    gamma = _safe_div(r_dot_z, _dot(p, a_p))
    alpha = alpha + gamma * p
    r_next = r - gamma * a_p
    z_next = r_next / diagonal
    beta = _safe_div(_dot(r_next, z_next), r_dot_z)
    p = z_next + beta * p
    return (alpha, r_next, p), (alpha, r_next, p, gamma, beta)

  initial = (jnp.zeros_like(b), b, b / diagonal)
  _, (alphas, rs, ps, gammas, betas) = lax.scan(step, initial, length=num_steps)
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

  Differences from the textbook (compare lineax's CG): (1) a division whose denominator is exactly 0
  returns 0, so once CG has converged exactly (e.g. `b = 0`, or `A = c I`, or exact termination before
  `num_steps`) the iterate stays put instead of becoming NaN; (2) there is no stopping test: all
  `num_steps` steps are run and recorded; (3) the residual is never recomputed as `b - A alpha`, so
  in floating point `r` drifts from the true residual exactly as textbook CG does.

  Finite precision: two correct CGs that round differently (this one, scipy's, a compiled
  transformer's) agree to O(eps * kappa) only until CG loses orthogonality, typically once a Ritz value
  has converged; from then on they differ by as much as CG moves when `A` is perturbed by one ulp
  (measured up to 2e-2 relative on `kcg.problems.TEST_CASES`, k = 64 and kappa = 1e4, and 1e-1 on
  other random problems), and all of them reach `A^{-1} b` late (by `t = 3k` on every test case)
  rather than at `t = k`. Compare late steps by their error, not entry by entry.

  Args:
    A: symmetric positive definite `[..., k, k]`, or a callable mat-vec `v[k] -> A v` (then every
      leading dim of `b` is a batch dim, vmapped over).
    b: right-hand side `[..., k]`, or `[..., k, r]` for `r` independent systems (array `A` only).
    num_steps: number of steps `T >= 0` (static Python int).

  Returns:
    SolverTrace with `alpha, r, p` of shape `[..., T + 1, k]` and `gamma, beta` of shape `[..., T]`
    (with a trailing `r` axis for a multi-column `b`).
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _check_system(A, b)
  return _solve("cg", system.A, system.b, (), (), system.multi_rhs, num_steps)


# ----------------------------------------------------------------------------------------------------
# Block CG (O'Leary 1980) for r right-hand sides at once.
# ----------------------------------------------------------------------------------------------------


class BlockCGTrace(NamedTuple):
  """The state of block CG on `A X = Y` (`Y [k, r]`) at every step; batch dims `...` lead.

  Attributes:
    alpha: iterates `X_0 = 0, X_1, ..., X_T`, shape `[..., T + 1, k, r]`.
    r: block residuals `R_t` (updated by the recurrence), shape `[..., T + 1, k, r]`.
    p: block directions `P_t`, shape `[..., T + 1, k, r]`.
    gamma: step matrix `Lambda_s` of step `s` (`X_{s+1} = X_s + P_s Lambda_s`), `[..., T, r, r]`.
    beta: direction matrix `Psi_s` (`P_{s+1} = R_{s+1} + P_s Psi_s`), `[..., T, r, r]`.
    gram: `G_s = P_s^T A P_s`, the r x r matrix inverted in step `s`, `[..., T, r, r]`.
    rank: the numerical rank of `G_s` that was used (see `block_cg`), int32 `[..., T]`; `< r` where
      the block had dependent columns.
  """
  alpha: Array
  r: Array
  p: Array
  gamma: Array
  beta: Array
  gram: Array
  rank: Array


def _matmul(a: Array, b: Array) -> Array:
  return jnp.matmul(a, b, precision=checks.HIGHEST)


def scaled_pseudo_inverse(gram_RxR: Array, rank_rtol: Array) -> tuple[Array, Array]:
  """A generalised inverse of symmetric PSD `G [r, r]`, and its numerical rank.

  With `D = diag(G)` and `S = D^{-1/2} G D^{-1/2}` (unit diagonal; a zero diagonal entry, i.e. a zero
  column, gets scale 0), `G^- = D^{-1/2} S^+ D^{-1/2}` where `S^+` drops the eigenvalues of `S` at or
  below `rank_rtol * max eig(S)`. For invertible `G` this is `G^{-1}`; otherwise it satisfies
  `G G^- G = G`, which is all that block CG needs (`P G^- P^T` is then the same A-orthogonal
  projector for every generalised inverse). The Jacobi scaling makes the test independent of the
  columns' norms (one column converged to 1e-30 is not "dependent").
  """
  gram_RxR = (gram_RxR + gram_RxR.T) / 2
  diagonal = jnp.diagonal(gram_RxR)
  positive = diagonal > 0
  scale = jnp.where(positive, lax.rsqrt(jnp.where(positive, diagonal, jnp.ones_like(diagonal))),
                    jnp.zeros_like(diagonal))
  scaled = scale[:, None] * gram_RxR * scale[None, :]
  eigenvalues, vectors = jnp.linalg.eigh(scaled)
  keep = eigenvalues > rank_rtol * jnp.max(eigenvalues)
  inverse_eigenvalues = jnp.where(keep, 1 / jnp.where(keep, eigenvalues, jnp.ones_like(eigenvalues)),
                                  jnp.zeros_like(eigenvalues))
  scaled_inverse = _matmul(vectors * inverse_eigenvalues[None, :], vectors.T)
  return (scale[:, None] * scaled_inverse * scale[None, :],
          jnp.sum(keep.astype(jnp.int32)))


def _block_cg_single(a_KxK: Array, y_KxR: Array, rank_rtol: Array, num_steps: int) -> BlockCGTrace:
  def step(state, _):
    alpha, r, p = state
    a_p = _matmul(a_KxK, p)
    gram = _matmul(p.T, a_p)
    gram_inverse, rank = scaled_pseudo_inverse(gram, rank_rtol)
    lam = _matmul(gram_inverse, _matmul(p.T, r))
    alpha = alpha + _matmul(p, lam)
    r_next = r - _matmul(a_p, lam)
    psi = -_matmul(gram_inverse, _matmul(a_p.T, r_next))
    p = r_next + _matmul(p, psi)
    return (alpha, r_next, p), (alpha, r_next, p, lam, psi, gram, rank)

  initial = (jnp.zeros_like(y_KxR), y_KxR, y_KxR)
  _, (alphas, rs, ps, lams, psis, grams, ranks) = lax.scan(step, initial, length=num_steps)
  alpha, r, p = _with_initial(initial, (alphas, rs, ps))
  return BlockCGTrace(alpha, r, p, lams, psis, grams, ranks)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _block_cg_batched(a: Array, y: Array, rank_rtol: Array, num_steps: int) -> BlockCGTrace:
  batch = a.shape[:-2]
  size = checks.batch_size(batch)
  flat_a = a.reshape((size,) + a.shape[-2:])
  flat_y = y.reshape((size,) + y.shape[-2:])
  trace = jax.vmap(lambda a1, y1: _block_cg_single(a1, y1, rank_rtol, num_steps))(flat_a, flat_y)
  return jax.tree.map(lambda x: x.reshape(batch + x.shape[1:]), trace)


def _check_rank_rtol(rank_rtol: Any, dtype: Any) -> Array:
  if rank_rtol is None:
    return jnp.asarray(np.sqrt(jnp.finfo(dtype).eps), dtype)
  if not checks.is_tracer(rank_rtol):
    value = np.asarray(rank_rtol)
    if value.ndim != 0 or value.dtype.kind not in "iuf" or not 0 <= float(value) < 1:
      raise ValueError(f"rank_rtol must be a number in [0, 1) (eigenvalues of the scaled r x r "
                       f"matrix at or below rank_rtol * its largest are dropped), got {rank_rtol!r}.")
  return jnp.asarray(rank_rtol, dtype)


def _block_system(support: Any, y_support: Any, phi_query: Any, ridge: Any,
                  kernel: Any) -> KRRSystem:
  """Validated `A = K + ridge I` (and `K(query, support)`) with a `[..., k, r]` target block."""
  inputs = validate_krr(support, y_support, phi_query, ridge, kernel_matrices=kernel is None)
  if not inputs.multi_output:
    raise ValueError(
        f"block CG needs targets y_support of shape [..., k, r] (r >= 1 outputs, one column each); "
        f"got {inputs.y.shape}. For one output pass y_support[..., None] (block CG with r = 1 is CG).")
  if inputs.y.shape[-1] < 1:
    raise ValueError(f"y_support has r = 0 outputs (shape {inputs.y.shape}); pass r >= 1 columns.")
  if kernel is None:
    return system_from_kernel_matrices(inputs)
  return build_system(kernel_arg(kernel), inputs)


def block_cg(support: Any, y_support: Any, ridge: Any, num_steps: int, *, kernel: Any = None,
             rank_rtol: Any = None) -> BlockCGTrace:
  """Block CG (O'Leary 1980) on `(K + ridge I) X = Y` for `r` outputs at once, from `X_0 = 0`.

  `A = K + ridge I`, `R_0 = P_0 = Y`; for `s = 0..T-1`, with ONE r x r inversion per step:
  `G = P^T A P`, `Lambda = G^{-1} (P^T R)`, `X += P Lambda`, `R' = R - (A P) Lambda`,
  `Psi = -G^{-1} ((A P)^T R')`, `P' = R' + P Psi`.
  `Lambda` makes `R'` orthogonal to `P`, `Psi` makes `P'` A-conjugate to `P`. In exact arithmetic
  `X_t` minimises the A-norm of the error of each column over the block Krylov space
  `span{Y, A Y, .., A^{t-1} Y}` (dimension up to `r t`), so it reaches `A^{-1} Y` in `ceil(k / r)`
  steps (CG, `r = 1`: `k` steps). Each column is at least as accurate as `t` steps of CG on it.

  Differences from the textbook (O'Leary's `Lambda = G^{-1} R^T R`, `Psi = (R^T R)^{-1} R'^T R'`,
  equal in exact arithmetic because `P^T R = R^T R` and `(A P)^T R' = -Lambda^{-T} R'^T R'`):
  (1) one r x r matrix, `G`, is inverted per step instead of two (`G` and `R^T R`); `Psi` is the
  conjugacy condition itself. (2) Rank deficiency: when the block's columns are linearly dependent
  (two equal columns of `Y`, a column that has converged exactly, or the last step when `r` does not
  divide the dimension left), `G` is singular and the textbook form divides by zero. Here `G^{-1}`
  is the Jacobi-scaled pseudo-inverse (`scaled_pseudo_inverse`): eigenvalues of
  `D^{-1/2} G D^{-1/2}` at or below `rank_rtol` times the largest are dropped. Any generalised
  inverse gives the same update `P G^- P^T` (the A-orthogonal projection onto `span P`), so this is
  deflation done implicitly: the step uses the directions the block has. The rank used is reported
  in `trace.rank`; the result is never NaN (an all-zero block, e.g. `Y = 0`, stays at `X = 0`).
  (3) No stopping test; the residual is never recomputed (as in `cg`).

  Finite precision: like CG, block CG loses A-conjugacy once directions converge; on ill-conditioned
  or large problems it reaches `A^{-1} Y` later than `ceil(k / r)` steps. Gradients through a step
  whose `G` is rank-deficient are undefined (eigh of repeated eigenvalues).

  Args:
    support: the kernel matrix `K [..., k, k]` (`kernel=None`), or support features `phi [..., k, p]`
      with `K = kernel(phi, phi)`.
    y_support: targets `Y [..., k, r]`, `r >= 1` (a trailing output axis is required).
    ridge: `> 0`, scalar or `[...]`.
    num_steps: `T >= 0` (static Python int).
    kernel: None (`support` is K) or a kernel such as `kcg.kernels.linear_kernel`.
    rank_rtol: relative threshold of the rank test, in `[0, 1)`; None gives `sqrt(eps)` of the
      dtype. Why not ~`k eps`: an eigenvalue `s` of the scaled `G` carries a rounding error of about
      `k eps`, so inverting it amplifies that error by `1/s`. At the last step of a 16 x 16 problem
      with `r = 3` (the block has one direction left) the two noise eigenvalues were 1e-15 and
      1e-13; keeping the second (threshold `10 k eps` = 3.5e-14) made the error of `X` 1.7e-6 instead
      of 2.7e-11. Directions above `sqrt(eps)` are inverted to `k sqrt(eps)` relative accuracy.

  Returns:
    BlockCGTrace with `alpha, r, p` `[..., T + 1, k, r]`, `gamma, beta, gram` `[..., T, r, r]`,
    `rank` `[..., T]`.
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _block_system(support, y_support, None, ridge, kernel)
  rtol = _check_rank_rtol(rank_rtol, system.y.dtype)
  return _block_cg_batched(system.A, system.y, rtol, num_steps=num_steps)


def block_cg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, num_steps: int,
                     *, kernel: Any = kernels_lib.linear_kernel, rank_rtol: Any = None) -> Array:
  """KRR predictions `K(query, support) X_t` along block CG, `t = 0..T`: `[..., T + 1, q, r]`.

  Arguments as in `krr_predict` (with `y_support [..., k, r]`) and `block_cg`.
  """
  num_steps = checks.check_num_steps(num_steps)
  system = _block_system(phi_support, y_support, phi_query, ridge, kernel)
  rtol = _check_rank_rtol(rank_rtol, system.y.dtype)
  trace = _block_cg_batched(system.A, system.y, rtol, num_steps=num_steps)
  return _predict_trace(system.k_query_support, trace.alpha, True)


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
  textbook as `cg` (0 for a zero denominator). `r` holds the unpreconditioned residual.

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
# KRR systems from features. Public functions validate eagerly (shapes, values), then run one jitted
# core per function; the kernel travels into jit as a pytree (`kernel_arg`).
# ----------------------------------------------------------------------------------------------------

_PARAM_CORE_NDIMS = {"cg": (), "pcg": (1,), "gd": (0,), "chebyshev": (0, 0)}


class KRRInputs(NamedTuple):
  """Validated KRR inputs, cast to one dtype, batch dims broadcast (internal; shared with `bounds`).

  Attributes:
    phi_support: `[..., k, p]` (or the kernel matrix `K [..., k, k]` in the kernel-matrix form).
    y: `[..., k]` or `[..., k, r]`.
    phi_query: `[..., q, p]` (or `K(query, support) [..., q, k]`), or None.
    ridge: `[...]`.
    multi_output: whether `y` has a trailing output axis.
  """
  phi_support: Array
  y: Array
  phi_query: Array | None
  ridge: Array
  multi_output: bool


class KRRSystem(NamedTuple):
  """`A = K + ridge I` `[..., k, k]`, `K(query, support)` `[..., q, k]` (or None), `y`, `ridge`."""
  A: Array
  k_query_support: Array | None
  y: Array
  ridge: Array
  multi_output: bool


def _add_ridge(gram: Array, ridge: Array) -> Array:
  """`gram + ridge I` for `gram [..., n, n]` and `ridge [...]` (same batch shape)."""
  identity = jnp.broadcast_to(jnp.eye(gram.shape[-1], dtype=gram.dtype), gram.shape)
  return gram + ridge[..., None, None] * identity


def _y_layout(y: Array, support_ndim: int, k: int, support_name: str) -> bool:
  if y.ndim == support_ndim - 1:
    y_k, multi = y.shape[-1], False
  elif y.ndim == support_ndim:
    y_k, multi = y.shape[-2], True
  else:
    raise ValueError(
        f"y_support must have shape [..., k] or [..., k, r] with the same batch dims as "
        f"{support_name}; got {y.shape} for {support_name} with {support_ndim} dims.")
  if y_k != k:
    raise ValueError(
        f"mismatched number of support points: {support_name} has k = {k} but y_support has "
        f"{y_k} (shape {y.shape}); pass one target per support point.")
  return multi


def validate_krr(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, *,
                 kernel_matrices: bool = False) -> KRRInputs:
  """Checks and broadcasts `(phi_support, y_support, phi_query or None, ridge)`.

  With `kernel_matrices=True` the first and third arguments are `K [..., k, k]` and
  `K(query, support) [..., q, k]` instead of features.
  """
  s_name, q_name = ("K_support", "K_query_support") if kernel_matrices else ("phi_support",
                                                                             "phi_query")
  s_doc, q_doc = ("[..., k, k]", "[..., q, k]") if kernel_matrices else ("[..., k, p]", "[..., q, p]")
  dtype = checks.float_dtype(phi_support, y_support, phi_query)
  support = checks.as_array(s_name, phi_support, dtype, min_ndim=2, shape_doc=s_doc)
  y = checks.as_array("y_support", y_support, dtype, min_ndim=1, shape_doc="[..., k]")
  checks.check_ridge(ridge)
  ridge = jnp.asarray(ridge, dtype)
  k = support.shape[-2]
  if kernel_matrices and support.shape[-1] != k:
    raise ValueError(f"K_support must be square [..., k, k]; got shape {support.shape}.")
  multi = _y_layout(y, support.ndim, k, s_name)
  names, arrays, cores = [s_name, "y_support", "ridge"], [support, y, ridge], [2, 1 + multi, 0]
  if phi_query is not None:
    query = checks.as_array(q_name, phi_query, dtype, min_ndim=2, shape_doc=q_doc)
    if query.shape[-1] != support.shape[-1]:
      if kernel_matrices:
        raise ValueError(
            f"K_query_support must have shape [..., q, k] with k = {k} (from K_support); got "
            f"{query.shape}.")
      raise ValueError(
          f"feature dimension mismatch: phi_support {support.shape} has p = {support.shape[-1]} "
          f"but phi_query {query.shape} has p = {query.shape[-1]}; queries and support points "
          "must use the same feature map.")
    names.append(q_name)
    arrays.append(query)
    cores.append(2)
  _, arrays = checks.broadcast_batch(names, arrays, cores)
  return KRRInputs(arrays[0], arrays[1], arrays[3] if phi_query is not None else None, arrays[2],
                   multi)


def kernel_arg(kernel: Any) -> Any:
  """`kernel` in a form `jit` accepts as an argument: pytree kernels as they are (their parameters
  are traced), plain functions wrapped in `jax.tree_util.Partial` (static, compared by identity)."""
  kernel = kernels_lib.check_kernel(kernel)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(kernel)):
    return jax.tree_util.Partial(kernel)
  return kernel


def build_system(kernel: Any, inputs: KRRInputs) -> KRRSystem:
  """`A = kernel(S, S) + ridge I` and `kernel(Q, S)` from validated inputs (traceable)."""
  phi_support, phi_query = inputs.phi_support, inputs.phi_query
  dtype = phi_support.dtype
  batch, k = phi_support.shape[:-2], phi_support.shape[-2]
  k_support = jnp.asarray(kernel(phi_support, phi_support), dtype)
  if k_support.shape != batch + (k, k):
    raise ValueError(
        f"kernel {kernel!r} returned shape {k_support.shape} for K(support, support); a kernel must "
        f"map [..., n, p] x [..., m, p] to [..., n, m] (expected {batch + (k, k)}).")
  k_query_support = None
  if phi_query is not None:
    k_query_support = jnp.asarray(kernel(phi_query, phi_support), dtype)
    expected = batch + (phi_query.shape[-2], k)
    if k_query_support.shape != expected:
      raise ValueError(
          f"kernel {kernel!r} returned shape {k_query_support.shape} for K(query, support); a "
          f"kernel must map [..., n, p] x [..., m, p] to [..., n, m] (expected {expected}).")
  return KRRSystem(_add_ridge(k_support, inputs.ridge), k_query_support, inputs.y, inputs.ridge,
                   inputs.multi_output)


def system_from_kernel_matrices(inputs: KRRInputs) -> KRRSystem:
  """`KRRSystem` from validated kernel-matrix inputs (`validate_krr(..., kernel_matrices=True)`)."""
  return KRRSystem(_add_ridge(inputs.phi_support, inputs.ridge), inputs.phi_query, inputs.y,
                   inputs.ridge, inputs.multi_output)


def krr_system(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
               kernel: Any = kernels_lib.linear_kernel) -> KRRSystem:
  """Validates the inputs and builds `A = K + ridge I` and `K(query, support)` (eagerly)."""
  return build_system(kernels_lib.check_kernel(kernel),
                      validate_krr(phi_support, y_support, phi_query, ridge))


def broadcast_param(name: str, x: Array, core_ndim: int, batch: tuple[int, ...]) -> Array:
  """Broadcasts a solver parameter to the batch shape of its KRR system, or raises ValueError."""
  core = tuple(x.shape[x.ndim - core_ndim:])
  try:
    return jnp.broadcast_to(x, tuple(batch) + core)
  except ValueError:
    raise ValueError(
        f"{name} has shape {x.shape}, whose batch dims {x.shape[:x.ndim - core_ndim]} do not "
        f"broadcast to the problem's batch shape {tuple(batch)}.") from None


def cholesky_solve(a: Array, y: Array, multi: bool) -> Array:
  """`a^{-1} y` for SPD `a [..., k, k]`, `y [..., k]` (or `[..., k, r]` when `multi`)."""
  y_kxr = y if multi else y[..., None]
  chol = jnp.linalg.cholesky(a)
  z = jax.scipy.linalg.solve_triangular(chol, y_kxr, lower=True)
  alpha = jax.scipy.linalg.solve_triangular(chol, z, lower=True, trans="T")
  return alpha if multi else alpha[..., 0]


def _predict(k_query_support: Array, alpha: Array, multi: bool) -> Array:
  """`K(query, support) alpha` for alpha `[..., k]`/`[..., k, r]` -> `[..., q]`/`[..., q, r]`."""
  if multi:
    return jnp.einsum("...qk,...kr->...qr", k_query_support, alpha, precision=checks.HIGHEST)
  return jnp.einsum("...qk,...k->...q", k_query_support, alpha, precision=checks.HIGHEST)


def _predict_trace(k_query_support: Array, alpha: Array, multi: bool) -> Array:
  """Predictions at every step: alpha `[..., T+1, k(, r)]` -> `[..., T+1, q(, r)]`."""
  if multi:
    return jnp.einsum("...qk,...tkr->...tqr", k_query_support, alpha, precision=checks.HIGHEST)
  return jnp.einsum("...qk,...tk->...tq", k_query_support, alpha, precision=checks.HIGHEST)


def spectrum_bounds(a: Array) -> tuple[Array, Array]:
  """Exact extreme eigenvalues `(lam_min, lam_max)` of symmetric `a [..., k, k]`, each `[...]`."""
  eigenvalues = jnp.linalg.eigvalsh(a)
  return eigenvalues[..., 0], eigenvalues[..., -1]


def _inputs_from(arrays: tuple[Array, ...], multi: bool) -> KRRInputs:
  phi_support, y, phi_query, ridge = arrays
  return KRRInputs(phi_support, y, phi_query, ridge, multi)


@functools.partial(jax.jit, static_argnames=("multi", "kernel_matrices"))
def _krr_core(kernel, phi_support, y, phi_query, ridge, multi, kernel_matrices):
  inputs = _inputs_from((phi_support, y, phi_query, ridge), multi)
  system = (system_from_kernel_matrices(inputs) if kernel_matrices
            else build_system(kernel, inputs))
  alpha = cholesky_solve(system.A, system.y, multi)
  if phi_query is None:
    return alpha
  return _predict(system.k_query_support, alpha, multi)


def krr_alpha_kernel(k_support: Any, y_support: Any, ridge: Any) -> Array:
  """`alpha* = (K + ridge I)^{-1} y` by Cholesky: `K [..., k, k]`, `y [..., k(, r)]` -> `[..., k(, r)]`.
  """
  inputs = validate_krr(k_support, y_support, None, ridge, kernel_matrices=True)
  return _krr_core(None, *inputs[:4], multi=inputs.multi_output, kernel_matrices=True)


def krr_alpha(phi_support: Any, y_support: Any, ridge: Any, *,
              kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Dual KRR coefficients `alpha* = (K + ridge I)^{-1} y` by Cholesky, shape `[..., k(, r)]`."""
  kernel = kernel_arg(kernel)
  inputs = validate_krr(phi_support, y_support, None, ridge)
  return _krr_core(kernel, *inputs[:4], multi=inputs.multi_output, kernel_matrices=False)


def krr_predict_kernel(k_support: Any, k_query_support: Any, y_support: Any, ridge: Any) -> Array:
  """KRR prediction from kernel matrices: `K(query, support) (K + ridge I)^{-1} y`.

  Args:
    k_support: `K [..., k, k]`, symmetric positive semidefinite.
    k_query_support: `K(query, support) [..., q, k]`.
    y_support: `[..., k]` or `[..., k, r]`.
    ridge: `> 0`, scalar or `[...]`.

  Returns:
    `[..., q]` or `[..., q, r]`.
  """
  inputs = validate_krr(k_support, y_support, k_query_support, ridge, kernel_matrices=True)
  return _krr_core(None, *inputs[:4], multi=inputs.multi_output, kernel_matrices=True)


def krr_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any, *,
                kernel: Any = kernels_lib.linear_kernel) -> Array:
  """Closed-form KRR by Cholesky: `f*(x) = k(x)^T (K + ridge I)^{-1} y`.

  Args:
    phi_support: support features `[..., k, p]`.
    y_support: targets `[..., k]`, or `[..., k, r]` for `r` outputs.
    phi_query: query features `[..., q, p]`.
    ridge: `> 0`, scalar or `[...]`.
    kernel: a kernel `(phi_a, phi_b) -> K`, default `linear_kernel` (`K = Phi Phi^T`).

  Returns:
    `f*` at the queries, `[..., q]` or `[..., q, r]`.
  """
  kernel = kernel_arg(kernel)
  inputs = validate_krr(phi_support, y_support, phi_query, ridge)
  return _krr_core(kernel, *inputs[:4], multi=inputs.multi_output, kernel_matrices=False)


def _default_params(solver: str, a: Array) -> tuple[Array, ...]:
  if solver == "cg":
    return ()
  if solver == "pcg":
    return (jnp.diagonal(a, axis1=-2, axis2=-1),)
  lo, hi = spectrum_bounds(a)
  if solver == "gd":
    return (optimal_gd_step(lo, hi),)
  return (lo, hi)


@functools.partial(jax.jit, static_argnames=("solver", "multi", "num_steps"))
def _iterative_predict_core(kernel, phi_support, y, phi_query, ridge, params, solver, multi,
                            num_steps):
  system = build_system(kernel, _inputs_from((phi_support, y, phi_query, ridge), multi))
  if params is None:
    params = _default_params(solver, system.A)
  trace = _batched_solve(solver, system.A, None, system.y, tuple(params),
                         _PARAM_CORE_NDIMS[solver], multi, num_steps)
  return _predict_trace(system.k_query_support, trace.alpha, multi)


def _iterative_predict(solver: str, phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                       num_steps: int, kernel: Any, params: Any) -> Array:
  """Validates, then runs `solver` in the jitted core; `params` None means the solver's default."""
  num_steps = checks.check_num_steps(num_steps)
  kernel = kernel_arg(kernel)
  inputs = validate_krr(phi_support, y_support, phi_query, ridge)
  dtype, batch, k = inputs.y.dtype, inputs.ridge.shape, inputs.phi_support.shape[-2]
  if params is not None:
    if solver == "pcg":
      diagonal = checks.as_array("preconditioner", params, dtype, min_ndim=1, shape_doc="[..., k]")
      if diagonal.shape[-1] != k:
        raise ValueError(
            f"preconditioner must be the diagonal of M, shape [..., {k}]; got {diagonal.shape}.")
      _check_positive("preconditioner", diagonal,
                      "the diagonal of a positive definite preconditioner is positive.")
      params = (broadcast_param("preconditioner", diagonal, 1, batch),)
    elif solver == "gd":
      step_size = checks.as_array("step_size", params, dtype)
      _check_positive("step_size", step_size,
                      "pass a positive step such as optimal_gd_step(lo, hi).")
      params = (broadcast_param("step_size", step_size, 0, batch),)
    else:
      lo, hi = _check_eig_bounds(params, dtype)
      params = (broadcast_param("eig_bounds[0]", lo, 0, batch),
                broadcast_param("eig_bounds[1]", hi, 0, batch))
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
  a = _add_ridge(gram, ridge)
  if multi:
    b = jnp.einsum("...kp,...kr->...pr", phi_support, y, precision=checks.HIGHEST)
  else:
    b = jnp.einsum("...kp,...k->...p", phi_support, y, precision=checks.HIGHEST)
  trace = _batched_solve("cg", a, None, b, (), (), multi, num_steps)
  if phi_query is None:
    return trace
  return _predict_trace(phi_query, trace.alpha, multi)


def primal_cg(phi_support: Any, y_support: Any, ridge: Any, num_steps: int) -> SolverTrace:
  """CG on the primal ridge system `(Phi^T Phi + ridge I) w = Phi^T y` from `w_0 = 0`.

  Same recurrences as `cg`, in feature space: the trace's `alpha` holds the weights `w_t`, shape
  `[..., T + 1, p]` (`[..., T + 1, p, r]` for multi-output `y`). Linear kernel only (it needs the
  features themselves). In exact arithmetic `w_t` converges to the same `w* = Phi^T alpha*` as dual CG,
  but for `0 < t < min(k, p)` its iterates differ: it minimises a different norm of the error.
  """
  num_steps = checks.check_num_steps(num_steps)
  inputs = validate_krr(phi_support, y_support, None, ridge)
  return _primal_core(inputs.phi_support, inputs.y, None, inputs.ridge, multi=inputs.multi_output,
                      num_steps=num_steps)


def primal_cg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: Any,
                      num_steps: int) -> Array:
  """Predictions `phi_query w_t` along primal CG, shape `[..., T + 1, q]` (or `[..., T + 1, q, r]`)."""
  num_steps = checks.check_num_steps(num_steps)
  inputs = validate_krr(phi_support, y_support, phi_query, ridge)
  return _primal_core(inputs.phi_support, inputs.y, inputs.phi_query, inputs.ridge,
                      multi=inputs.multi_output, num_steps=num_steps)
