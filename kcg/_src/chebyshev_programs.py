"""Chebyshev semi-iteration written as transformer blocks (compiler stage 1).

The same CG-form recurrence, alpha += gamma_s p; r -= gamma_s A p; p = r + beta_s p, but gamma_s
and beta_s depend only on the spectral bounds (lo, hi). They are baked into each layer's weights
(`Program.baked`), so a step needs no reduction and no division: one mat-vec and one layer of exact
linear ReLU units (x = relu(x) - relu(-x)). Three constructions, as for CG: per-support state
(prefix mask), and the dual or primal state in the aggregator (any mask).
"""

from __future__ import annotations

import numpy as np

from kcg._src import blocks as B
from kcg._src.craft import (Block, Head, Program, ResidualLayout, StateLocation, linear_units,
                            unrolled_program)
from kcg._src.ops import Construction, Op

AGG = B.AGGREGATOR


def chebyshev_coefficients(low: float, high: float, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(gamma_s, beta_s), s = 0..t-1, of Chebyshev semi-iteration for eig(A) in [low, high].

  theta = (hi + lo)/2, delta = (hi - lo)/2, gamma_0 = 1/theta, beta_0 = (delta/theta)^2/2,
  beta_s = (delta gamma_s / 2)^2, gamma_{s+1} = 1/(theta - beta_s/gamma_s) (Saad 2003, Alg. 12.1
  in CG form; the residual polynomial is T_t((theta - lam)/delta) / T_t(theta/delta)).
  """
  if not (0 < low <= high) or not np.isfinite(high):
    raise ValueError(f"eig_bounds must satisfy 0 < low <= high < inf, got ({low}, {high}).")
  theta, delta = (high + low) / 2, (high - low) / 2
  gammas, betas = [], []
  gamma, first = 1.0 / theta, 2.0
  for _ in range(num_steps):
    beta = first * (delta * gamma / 2) ** 2
    gammas.append(gamma)
    betas.append(beta)
    gamma, first = 1.0 / (theta - beta / gamma), 1.0
  return np.asarray(gammas), np.asarray(betas)


def _updates(layout, gamma, beta, ridge, matvec: str, query_matvec: str | None):
  """Linear units: alpha += g p; r -= g (Av); p <- r_new + b p (Av = matvec + ridge p)."""
  units = [
      linear_units(layout, "p", [("alpha", gamma), ("r", -gamma * ridge),
                                 ("p", beta - gamma * ridge - 1.0)], "from p", op=Op.UPDATE),
      linear_units(layout, matvec, [("r", -gamma), ("p", -gamma), (matvec, -1.0)],
                   f"from {matvec}", op=Op.UPDATE),
      linear_units(layout, "r", [("p", 1.0)], "from r", op=Op.DIRECTION),
  ]
  if query_matvec is not None:
    units.append(linear_units(layout, query_matvec, [("f", gamma), (query_matvec, -1.0)],
                              f"f += gamma {query_matvec}", op=Op.UPDATE))
  return tuple(units)


def _program(construction, layout, embedding, init, step_blocks, per_step, tokens, gammas, betas):
  state = {name: StateLocation(name, tokens) for name in ("alpha", "r", "p")}
  baked = {"gamma": tuple(float(g) for g in gammas), "beta": tuple(float(b) for b in betas)}
  return unrolled_program(construction, layout, embedding, init, step_blocks, per_step, state,
                          baked)


def chebyshev_support_state(feature_dim: int, num_steps: int, ridge: float, low: float,
                            high: float) -> Program:
  """Chebyshev with alpha_i, r_i, p_i in support token i (prefix mask): one layer per step."""
  dim = feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("alpha", 1), ("r", 1),
                      ("p", 1), ("Kp", 1), ("kq_p", 1), ("f", 1)] + B.flag_channels()),
      holders=B.holders([("alpha", "supports"), ("r", "supports"), ("p", "supports"),
                         ("Kp", "supports"), ("kq_p", "queries"), ("f", "queries")]))
  embedding = B.feature_embedding() + [("y", "r", 1.0), ("y", "p", 1.0)]
  gammas, betas = chebyshev_coefficients(low, high, num_steps)
  step_blocks = [Block(f"chebyshev[{s}] mat-vec and update", Op.UPDATE,
                       heads=B.support_matvec_heads(),
                       units=_updates(layout, g, b, ridge, "Kp", "kq_p"))
                 for s, (g, b) in enumerate(zip(gammas, betas))]
  return _program(Construction.CHEBYSHEV_SUPPORT_STATE, layout, embedding, [], step_blocks, 1,
                  "support", gammas, betas)


def chebyshev_aggregator_primal(feature_dim: int, num_steps: int, ridge: float, low: float,
                                high: float) -> Program:
  """Chebyshev on (Phi^T Phi + ridge I) w = Phi^T y in the aggregator (any mask): one layer/step."""
  dim = feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("alpha", dim),
                      ("r", dim), ("p", dim), ("Ap", dim), ("f", 1)] + B.flag_channels()),
      holders=B.holders([("f", "queries")] + [(n, "aggregator") for n in ("alpha", "r", "p", "Ap")]))
  init = [Block("init: r = p = Phi^T y", Op.INIT, heads=(
      Head(((AGG, 1.0),), (("y", 1.0),), (("phi_support", 1.0),), (("r", 1.0), ("p", 1.0)),
           "r = p = sum_j y_j phi_j", Op.INIT),))]
  gammas, betas = chebyshev_coefficients(low, high, num_steps)
  step_blocks = []
  for s, (g, b) in enumerate(zip(gammas, betas)):
    step_blocks.append(Block(f"primal-chebyshev[{s}] mat-vec and update", Op.UPDATE, heads=(
        Head((("p", 1.0),), (("phi_support", 1.0),), (("phi_support", 1.0),), (("Ap", 1.0),),
             "sum_j phi_j (phi_j . p)", Op.MATVEC),
        Head((("phi_query", 1.0),), (("p", 1.0),), ((AGG, 1.0),), (("f", g),),
             "f += gamma phi(x).p", Op.QUERY_MATVEC),
    ), units=_updates(layout, g, b, ridge, "Ap", None)))
  return _program(Construction.CHEBYSHEV_AGGREGATOR_PRIMAL, layout, B.feature_embedding(), init,
                  step_blocks, 1, "aggregator", gammas, betas)


def chebyshev_aggregator_dual(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                              low: float, high: float) -> Program:
  """Chebyshev on (K + ridge I) alpha = y in the aggregator (any mask): two layers per step."""
  k, dim = num_support, feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("position", k),
                      ("alpha", k), ("r", k), ("p", k), ("Kp", k), ("u", dim), ("f", 1)]
                     + B.flag_channels()),
      holders=B.holders([("position", "supports (one-hot)"), ("f", "queries")]
                        + [(n, "aggregator") for n in ("alpha", "r", "p", "Kp", "u")]))
  embedding = B.feature_embedding() + [("position", "position", 1.0)]
  init = [Block("init: r = p = y", Op.INIT, heads=(
      Head(((AGG, 1.0),), (("y", 1.0),), (("position", 1.0),), (("r", 1.0), ("p", 1.0)),
           "r = p = sum_j y_j e_j", Op.INIT),))]
  gammas, betas = chebyshev_coefficients(low, high, num_steps)
  step_blocks = []
  for s, (g, b) in enumerate(zip(gammas, betas)):
    step_blocks.append(Block(f"chebyshev[{s}] u = Phi^T p", Op.MATVEC_U, heads=(
        Head((("p", 1.0),), (("position", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
             "u = sum_j p_j phi_j", Op.MATVEC_U),)))
    step_blocks.append(Block(f"chebyshev[{s}] Kp = Phi u and update", Op.UPDATE, heads=(
        Head((("u", 1.0),), (("phi_support", 1.0),), (("position", 1.0),), (("Kp", 1.0),),
             "Kp = sum_j (u . phi_j) e_j", Op.MATVEC),
        Head((("phi_query", 1.0),), (("u", 1.0),), ((AGG, 1.0),), (("f", g),),
             "f += gamma phi(x).u", Op.QUERY_MATVEC),
        B.at_aggregator("u", [("u", -1.0)], "clear u"),
    ), units=_updates(layout, g, b, ridge, "Kp", None)))
  return _program(Construction.CHEBYSHEV_AGGREGATOR_DUAL, layout, embedding, init, step_blocks, 2,
                  "aggregator", gammas, betas)
