"""Block CG (O'Leary 1980): r right-hand sides at once, with full traces.

`block_cg` solves `(K + ridge I) X = Y` for `Y [k, r]` with one r x r inversion per step and
reaches `A^{-1} Y` in about `k / r` steps; `block_cg_predict` gives the predictions along the way.
Shapes and conventions as in kcg._src.solvers.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kcg._src import checks
from kcg._src import kernels as kernels_lib
from kcg._src import krr

Array = jax.Array


def _with_initial(initial: tuple[Array, ...], steps: tuple[Array, ...]) -> tuple[Array, ...]:
  return tuple(jnp.concatenate([x0[None], xs], axis=0) for x0, xs in zip(initial, steps))


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
                  kernel: Any) -> krr.KRRSystem:
  """Validated `A = K + ridge I` (and `K(query, support)`) with a `[..., k, r]` target block."""
  inputs = krr.validate_krr(support, y_support, phi_query, ridge, kernel_matrices=kernel is None)
  if not inputs.multi_output:
    raise ValueError(
        f"block CG needs targets y_support of shape [..., k, r] (r >= 1 outputs, one column each); "
        f"got {inputs.y.shape}. For one output pass y_support[..., None] (block CG with r = 1 is CG).")
  if inputs.y.shape[-1] < 1:
    raise ValueError(f"y_support has r = 0 outputs (shape {inputs.y.shape}); pass r >= 1 columns.")
  if kernel is None:
    return krr.system_from_kernel_matrices(inputs)
  return krr.build_system(krr.kernel_arg(kernel), inputs)


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
  return krr.predict_trace(system.k_query_support, trace.alpha, True)
