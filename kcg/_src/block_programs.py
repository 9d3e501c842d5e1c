"""Block CG (O'Leary 1980) for r outputs, written as transformer blocks.

`block_support_state` compiles `kcg.solvers.block_cg` on (K + ridge I) X = Y, Y in R^{k x r}: dual
form, prefix mask, per-support state. Support token i holds the rows X_i, R_i, P_i, (KP)_i (each r
wide); query tokens hold f(x) and k(x)^T P (r wide); the aggregator holds the r x r matrices
(entry (a, b) of a matrix channel at offset a r + b). One step:

    G = P^T (K P + ridge P)               Lambda = G^{-1} (P^T R)
    X += P Lambda,  R -= (K P + ridge P) Lambda,  f += (k(x)^T P) Lambda
    Psi = -G^{-1} ((K P + ridge P)^T R)    P <- R + P Psi

The kernel mat-vec is ONE head for all r columns (value and output r wide), as in CG. Reductions
over supports (P^T A P, P^T R, (AP)^T R) are r heads each (head a reads row a: query the
aggregator flag, key P_{ia}, value an r-wide row). A support row times an aggregator matrix
(P_i Lambda, P_i Psi) is r heads (head b: query the r-wide row, key column b of the matrix).
Products of two aggregator matrices are r^2 heads (head (a, b): query row a of one matrix, key
column b of the other, both non-zero only at the aggregator) or 2 r^3 gated units
(`_matmul_units`).

The inverse: scaled Newton-Schulz, G^{-1} = lim X_j, computed by the network.

* Start: X_0 = diag(g_a) / r, g_a the ReLU guess of 1/G_aa (kcg._src.reciprocal, one MLP layer, no
  Newton refinement needed). The guess overestimates by at most e = spec.guess_error (4.2%) and
  s g(s) <= 1 + e for every s >= 0, so the eigenvalues of X_0 G (similar to
  D~^{-1/2} G D~^{-1/2} / r, PSD with trace <= 1 + e times r) lie in (0, b], b = 1 + e, and above
  a = 1 / (r kappa_S), kappa_S = cond(D^{-1/2} G D^{-1/2}) (its largest eigenvalue is >= 1).
* Iterations j = 0..n-1: X_{j+1} = c_j X_j (2 I - c_j G X_j), c_j = 2 / (a_j + b_j). Each
  eigenvalue x of X_j G maps to h(c_j x), h(y) = y (2 - y); c_j centres [a_j, b_j] on 1, so both
  ends map to the new lower bound a_{j+1} = h(c_j a_j) (about 4 a_j while a_j is small; plain
  Newton-Schulz, c = 1, only doubles it) and b_{j+1} = 1. Once a_j is near 1, c_j -> 1 and the
  error 1 - x squares each iteration. Every eigenvalue stays in (0, 1]: no iteration can diverge.
  `newton_schulz_coefficients` picks n as the first count with 1 - a_n <= eps for an assumed
  kappa_S (`gram_condition`), n = log4(r kappa_S) + ~5 (plain Newton-Schulz: log2(r kappa_S) + ~5).
  Default 1e4, n(r = 2, 3, 4) = 12 for float64. Measured on 21 problems (k <= 16, kappa(A) <= 1e3,
  r in {2, 3, 4}): with 1e2 (n = 9) or 1e3 (n = 11) the network missed the reference by up to 2e-2
  and 6e-4 where kappa_S exceeded the assumption; with 1e4, differences above 1e-10 of the
  prediction scale remained only at kappa(A) = 1e3, where the reference itself moves by up to 7e-3
  under eps-sized perturbations of its inputs, and for p < k, r = 4 (4e-9).
* One layer per iteration: the attention forms T = G X_j (r^2 heads), the gated MLP adds
  (2 c_j - 1) X_j - c_j^2 X_j T to X_j (2 r^3 product units) and clears T.
* Rank deficiency (dependent columns of Y, or the last step when r does not divide k): the
  network's X_n is a polynomial in X_0 G, x -> x_n(x) with x_n(0) = 0, so an eigenvalue x << a_0
  is not inverted: the step goes a fraction x_n(x) ~ x r kappa_S (at most ~4^n x) of the way along
  that direction instead of all the way, and X_n stays finite (its growth there is annihilated by
  P, whose null vector the direction is). This is the reference's pseudo-inverse
  (`kcg.solvers.scaled_pseudo_inverse`, threshold sqrt(eps)) made soft: no NaN, no division by a
  rounding-level pivot. Cost: a direction that is pure rounding (x ~ k eps, possibly slightly
  negative because the computed G is not exactly PSD; |x_n| <= 4^n k eps << 1, so no divergence)
  still moves the iterate by that fraction of a garbage step: measured 3e-12 relative at the last
  step of k = 8, r = 3 (the reference: 2e-15). Eigenvalues between sqrt(eps) and a_0 are inverted
  by the reference and only partly by the network. `inverse_ends` / `read_inverses` give the
  layers at which G and X_n can be read to check ||I - X_n G||.

Cost (r outputs, n Newton-Schulz iterations, p features): 6 + n layers per step (mat-vec and
P^T R; Gram and guess; n Newton-Schulz; Lambda; update; f, (AP)^T R and Psi; P <- R + P Psi) plus
one init layer (R = P = Y, so that t = 0 is a model too); heads per layer max(r^2, 2 r, r + 2);
width 2 p + 8 r + 7 r^2 + 3; gated MLP of max(r * spec.num_units, 2 r^3 + 4 r^2) units (the guess
of the r diagonal reciprocals in the Gram layer dominates). Compare r independent CGs
(kcg._src.multi_output): 9 layers per step, ~k steps instead of ~k/r.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import blocks as B
from kcg._src import checks
from kcg._src import reciprocal as recip
from kcg._src.craft import (Block, Head, Program, ReluUnits, ResidualLayout, StateLocation,
                            linear_units, looped_program)
from kcg._src.ops import Construction, Op

AGG = B.AGGREGATOR

VECTORS = ("alpha", "r", "p", "Kp", "p_prev")  # per-support rows, r wide
QUERY_VECTORS = ("kq_p", "f")  # per-query rows, r wide
MATRICES = ("gram", "gram_inv", "ns_product", "ptr", "gamma", "aptr", "beta")  # r x r, aggregator
DEFAULT_GRAM_CONDITION = 1e4


def newton_schulz_coefficients(num_outputs: int, gram_condition: float = DEFAULT_GRAM_CONDITION,
                               guess_error: float | None = None,
                               dtype=np.float64) -> tuple[float, ...]:
  """Scalings c_j of X <- c X (2 I - c G X), one per iteration (see the module docstring).

  The count n is the first with 1 - a_n <= eps(dtype), from a_0 = 1 / (r gram_condition) and
  b_0 = 1 + guess_error (default: the float64 reciprocal guess's, 4.2%).
  """
  if guess_error is None:
    guess_error = recip.default_spec(np.float64).guess_error
  num_outputs = checks.check_positive_int("num_outputs", num_outputs)
  if isinstance(gram_condition, bool) or not (
      isinstance(gram_condition, (int, float, np.integer, np.floating))
      and math.isfinite(gram_condition) and gram_condition >= 1):
    raise ValueError(f"gram_condition must be a finite number >= 1 (the condition number of the "
                     f"Jacobi-scaled r x r Gram matrix that is inverted exactly), got "
                     f"{gram_condition!r}.")
  eps = float(jnp.finfo(dtype).eps)
  low, high = 1.0 / (num_outputs * gram_condition), 1.0 + guess_error
  coefficients = []
  while 1.0 - low > eps and len(coefficients) < 200:
    c = 2.0 / (low + high)
    coefficients.append(c)
    low, high = c * low * (2.0 - c * low), 1.0
  return tuple(coefficients)


# ---------------------------------------------------------------------------------------------
# Coefficient matrices for r x r channels stored row-major (entry (a, b) at a r + b).


def _row_reader(m: int, a: int) -> np.ndarray:
  """[m^2, m]: reads row a of a matrix channel as an m-vector."""
  out = np.zeros((m * m, m))
  out[a * m + np.arange(m), np.arange(m)] = 1.0
  return out


def _column_reader(m: int, b: int) -> np.ndarray:
  """[m^2, m]: reads column b of a matrix channel as an m-vector."""
  out = np.zeros((m * m, m))
  out[np.arange(m) * m + b, np.arange(m)] = 1.0
  return out


def _row_writer(m: int, a: int) -> np.ndarray:
  """[m, m^2]: writes an m-vector into row a of a matrix channel."""
  return _row_reader(m, a).T


def _entry_writer(m: int, a: int, b: int, coef: float = 1.0) -> np.ndarray:
  out = np.zeros((1, m * m))
  out[0, a * m + b] = coef
  return out


def _unit(m: int, a: int) -> np.ndarray:
  """[m, 1]: selects entry a of an m-wide channel (or, transposed, writes it)."""
  out = np.zeros((m, 1))
  out[a, 0] = 1.0
  return out


# ---------------------------------------------------------------------------------------------
# Heads and units.


def _reduce_rows(m: int, key_terms, value_terms, target: str, name: str,
                 op: Op) -> tuple[Head, ...]:
  """Row a of `target` += sum_i key_i[a] value_i over supports (head a; r heads)."""
  return tuple(
      Head(((AGG, 1.0),), tuple((c, coef * _unit(m, a)) for c, coef in key_terms),
           tuple(value_terms), ((target, _row_writer(m, a)),), f"{name} row {a}", op)
      for a in range(m))


def _row_times_matrix(m: int, row_terms, matrix: str, outputs, name: str,
                      op: Op) -> tuple[Head, ...]:
  """Each token adds (row . matrix[:, b]) to entry b of the outputs (head b; r heads).

  The matrix lives at the aggregator only, so the key is non-zero there alone.
  """
  return tuple(
      Head(tuple(row_terms), ((matrix, _column_reader(m, b)),), ((AGG, 1.0),),
           tuple((c, coef * _unit(m, b).T) for c, coef in outputs), f"{name}[:, {b}]", op)
      for b in range(m))


def _matrix_product_heads(m: int, left: str, right: str, target: str, coef: float,
                          name: str, op: Op) -> tuple[Head, ...]:
  """target += coef left @ right at the aggregator.

  Head (a, b): query row a of left, key column b of right (both non-zero at the aggregator only).
  """
  return tuple(
      Head(((left, _row_reader(m, a)),), ((right, _column_reader(m, b)),), ((AGG, 1.0),),
           ((target, _entry_writer(m, a, b, coef)),), f"{name}[{a}, {b}]", op)
      for a in range(m) for b in range(m))


def _matmul_units(m: int, left: str, right: str, target: str, coef: float, name: str,
                  op: Op) -> ReluUnits:
  """Gated units adding coef left @ right to target: relu(l) x + relu(-l) (-x) = l x, exactly.

  Unit pair (a, c, b) multiplies left[a, c] by right[c, b]; 2 m^3 units.
  """
  n = 2 * m ** 3
  pre, value, post = np.zeros((m * m, n)), np.zeros((m * m, n)), np.zeros((n, m * m))
  u = 0
  for a in range(m):
    for c in range(m):
      for b in range(m):
        for sign in (1.0, -1.0):
          pre[a * m + c, u] = sign
          value[c * m + b, u] = sign
          post[u, a * m + b] = coef
          u += 1
  return ReluUnits(((left, pre),), ((target, post),), name, op, ((right, value),))


def _diagonal_guess_units(m: int, source: str, target: str, spec: recip.ReciprocalSpec,
                          scale: float) -> tuple[ReluUnits, ...]:
  """target[a, a] += scale * guess(1 / source[a, a]) at the aggregator (one group per a)."""
  return tuple(
      B.guess_units(source, target, spec, read=_unit(m * m, a * m + a),
                    write=_unit(m * m, a * m + a).T, scale=scale,
                    name=f"{target}[{a}, {a}] = guess 1/{source}[{a}, {a}] / {m}")
      for a in range(m))


# ---------------------------------------------------------------------------------------------


def block_support_state(feature_dim: int, num_outputs: int, num_steps: int, ridge: float,
                        spec: recip.ReciprocalSpec, *,
                        newton_schulz: tuple[float, ...] | None = None) -> Program:
  """Block CG with per-support state (prefix mask): see the module docstring.

  Args:
    feature_dim: p.
    num_outputs: r >= 1.
    num_steps: t >= 0 block CG steps.
    ridge: > 0.
    spec: the reciprocal's guess (only its ReLU guess is used, for the diagonal of G).
    newton_schulz: the scalings c_j, one per Newton-Schulz iteration (default:
      `newton_schulz_coefficients(num_outputs)`).

  Returns:
    A `Program` whose readout `f` is r wide at queries; `state` maps alpha, r, p to per-support
    r-wide channels and gamma (Lambda), beta (Psi) to r x r aggregator channels (row-major).
  """
  dim = checks.check_positive_int("feature_dim", feature_dim)
  m = checks.check_positive_int("num_outputs", num_outputs)
  num_steps = checks.check_num_steps(num_steps)
  ridge = checks.scalar_ridge(ridge)
  coefficients = (newton_schulz_coefficients(m, guess_error=spec.guess_error)
                  if newton_schulz is None else tuple(float(c) for c in newton_schulz))
  if not coefficients or not all(0 < c < 2 for c in coefficients):
    raise ValueError(f"newton_schulz must be a non-empty sequence of scalings in (0, 2), got "
                     f"{newton_schulz!r}.")
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", m)]
                     + [(name, m) for name in VECTORS + QUERY_VECTORS]
                     + [(name, m * m) for name in MATRICES] + B.flag_channels()),
      holders=B.holders([(name, "supports") for name in VECTORS]
                        + [(name, "queries") for name in QUERY_VECTORS]
                        + [(name, "aggregator (r x r, row-major)") for name in MATRICES]))
  # One layer so that t = 0 is a model too; R and P are written into zero like every later write.
  init = [Block("init: R = P = Y", Op.INIT, units=(
      linear_units(layout, "y", [("r", 1.0), ("p", 1.0)], "R = P = Y", op=Op.INIT),))]
  a_p = (("Kp", 1.0), ("p", ridge))  # (A P)_i = (K P)_i + ridge P_i, formed by the projections
  s = "block-cg"
  step = [
      Block(f"{s} mat-vec KP; P^T R", Op.MATVEC, heads=B.support_matvec_heads()
            + _reduce_rows(m, (("p", 1.0),), (("r", 1.0),), "ptr", "P^T R", Op.PROJECTION), units=(
                linear_units(layout, "gamma", [("gamma", -1.0)], "clear Lambda"),
                linear_units(layout, "beta", [("beta", -1.0)], "clear Psi"))),
      Block(f"{s} G = P^T A P; X_0 = diag(1/G_aa)/r", Op.CURVATURE,
            heads=_reduce_rows(m, (("p", 1.0),), a_p, "gram", "P^T A P", Op.CURVATURE),
            units=_diagonal_guess_units(m, "gram", "gram_inv", spec, 1.0 / m)),
  ]
  for j, c in enumerate(coefficients):
    step.append(Block(
        f"{s} newton-schulz {j + 1}/{len(coefficients)}: X <- c X (2I - c G X), c = {c:.6g}",
        Op.NEWTON_SCHULZ,
        heads=_matrix_product_heads(m, "gram", "gram_inv", "ns_product", 1.0, "G X",
                                    Op.NEWTON_SCHULZ),
        units=(linear_units(layout, "gram_inv", [("gram_inv", 2 * c - 1)], "(2c - 1) X",
                            op=Op.NEWTON_SCHULZ),
               _matmul_units(m, "gram_inv", "ns_product", "gram_inv", -c * c, "-c^2 X (G X)",
                             Op.NEWTON_SCHULZ),
               linear_units(layout, "ns_product", [("ns_product", -1.0)], "clear G X"))))
  step += [
      Block(f"{s} Lambda = X P^T R", Op.STEP_SIZE,
            heads=_matrix_product_heads(m, "gram_inv", "ptr", "gamma", 1.0, "X P^T R",
                                        Op.STEP_SIZE), units=(
                linear_units(layout, "gram", [("gram", -1.0)], "clear G"),
                linear_units(layout, "ptr", [("ptr", -1.0)], "clear P^T R"))),
      Block(f"{s} update X += P Lambda, R -= A P Lambda", Op.UPDATE,
            heads=_row_times_matrix(m, (("p", 1.0),), "gamma", (("alpha", 1.0), ("r", -ridge)),
                                    "X += P Lambda; R -= ridge P Lambda", Op.UPDATE)
            + _row_times_matrix(m, (("Kp", 1.0),), "gamma", (("r", -1.0),), "R -= KP Lambda",
                                Op.UPDATE)),
      Block(f"{s} f += k(x)^T P Lambda; (AP)^T R; Psi = -X (AP)^T R", Op.BETA,
            heads=_row_times_matrix(m, (("kq_p", 1.0),), "gamma", (("f", 1.0),),
                                    "f += k(x)^T P Lambda", Op.UPDATE)
            + _reduce_rows(m, a_p, (("r", 1.0),), "aptr", "(AP)^T R", Op.PROJECTION), units=(
                _matmul_units(m, "gram_inv", "aptr", "beta", -1.0, "Psi = -X (AP)^T R", Op.BETA),
                linear_units(layout, "aptr", [("aptr", -1.0)], "clear (AP)^T R"),
                linear_units(layout, "gram_inv", [("gram_inv", -1.0)], "clear X"),
                linear_units(layout, "Kp", [("Kp", -1.0)], "clear KP"),
                linear_units(layout, "kq_p", [("kq_p", -1.0)], "clear k(x)^T P"),
                linear_units(layout, "p", [("p_prev", 1.0), ("p", -1.0)], "P_prev <- P, P <- 0"))),
      Block(f"{s} P = R + P Psi", Op.DIRECTION,
            heads=_row_times_matrix(m, (("p_prev", 1.0),), "beta", (("p", 1.0),),
                                    "P += P_prev Psi", Op.DIRECTION),
            units=(linear_units(layout, "r", [("p", 1.0)], "P += R", op=Op.DIRECTION),
                   linear_units(layout, "p_prev", [("p_prev", -1.0)], "clear P_prev"))),
  ]
  state = {"alpha": StateLocation("alpha", "support"), "r": StateLocation("r", "support"),
           "p": StateLocation("p", "support"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  return looped_program(Construction.BLOCK_SUPPORT_STATE, layout, B.feature_embedding(), init,
                        step, num_steps, state, spec)


def layers_per_step(newton_schulz_steps: int) -> int:
  """Layers of one block CG step: mat-vec, Gram, n Newton-Schulz, Lambda, update, Psi, P."""
  return newton_schulz_steps + 6


def inverse_ends(program: Program) -> tuple[int, ...]:
  """For each step s, the number of layers after which `gram` holds G_s, `gram_inv` X_n ~ G_s^{-1}.

  (The next layer's MLP clears `gram`.) Read ||I - X_n G|| from the residual stream there.
  """
  ends = program.step_ends
  per_step = ends[1] - ends[0] if len(ends) > 1 else 0
  return tuple(end + per_step - 4 for end in ends[:-1])


class BlockState(NamedTuple):
  """Block CG state read from a compiled model's residual streams, batch-first.

  alpha, r, p: [B, t+1, k, r]; gamma (Lambda), beta (Psi): [B, t, r, r].
  """

  alpha: jax.Array
  r: jax.Array
  p: jax.Array
  gamma: jax.Array
  beta: jax.Array


def read_state(program: Program, residuals_LxBxTxD, num_support: int) -> BlockState:
  """The block CG state after each step, from the named channels at the step ends."""
  layout = program.layout
  m = layout.size("y")
  at_ends = residuals_LxBxTxD[jnp.asarray(program.step_ends)]  # [t+1, B, T, D]

  def rows(name):
    return jnp.moveaxis(at_ends[:, :, :num_support, layout.slice(name)], 0, 1)

  def matrix(name):
    flat = at_ends[1:, :, num_support, layout.slice(name)]  # [t, B, r^2]
    return jnp.moveaxis(flat.reshape(flat.shape[:2] + (m, m)), 0, 1)

  return BlockState(rows("alpha"), rows("r"), rows("p"), matrix("gamma"), matrix("beta"))


def read_inverses(program: Program, residuals_LxBxTxD, num_support: int):
  """(G_s, X_s) [B, t, r, r] each: the Gram matrix and its Newton-Schulz inverse at every step."""
  m = program.layout.size("y")
  at = residuals_LxBxTxD[jnp.asarray(inverse_ends(program))][:, :, num_support]  # [t, B, D]

  def matrix(name):
    flat = at[..., program.layout.slice(name)]
    return jnp.moveaxis(flat.reshape(flat.shape[:2] + (m, m)), 0, 1)

  return matrix("gram"), matrix("gram_inv")
