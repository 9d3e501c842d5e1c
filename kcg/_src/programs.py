"""Conjugate gradient written as transformer blocks on named channels (compiler stage 1).

Three constructions, all exact up to floating point, all sharing the scalar machinery that runs at
the aggregator token (kcg._src.blocks: reductions arrive there, reciprocals and step sizes are
computed there):

* ``support_state`` (form="dual", mask="prefix"): support token i holds alpha_i, r_i, p_i. One head
  does the mat-vec (Kp)_i = sum_j (phi_i . phi_j) p_j; the aggregator reads r.r and p.Ap with one
  head each; step sizes come back to every token through heads whose keys live at the aggregator.
  Width O(p), work O(k p) per layer. Needs the prefix mask: under a strict causal mask support i
  cannot read supports j > i, so it can neither form (Kp)_i nor read a reduction computed later.
* ``aggregator_dual`` (form="dual", any mask): alpha, r, p in R^k all live in the aggregator, in
  channels indexed by support position. Two position-keyed heads do the mat-vec,
  u = Phi^T p = sum_j p_j phi_j (query p, key e_j, value phi_j), then Kp = Phi u (query u, key
  phi_j, value e_j). Width O(k + p), work O(k (k + p)) per layer.
* ``aggregator_primal`` (form="primal", any mask): CG on (Phi^T Phi + ridge I) w = Phi^T y with
  w, r, p in R^p in the aggregator; one head does A p = sum_j phi_j (phi_j . p). Width O(p), work
  O(k p). Its iterates differ from dual CG's (it minimises the error in another norm) but its
  Krylov space is the image of the dual one under Phi^T, and it reaches the same KRR prediction.

And preconditioned CG with the Jacobi preconditioner (``jacobi_support_state``).

Queries never hold solver state: each query token accumulates its prediction f_t(x) = k(x)^T alpha_t
(primal: phi(x) . w_t) with the same step sizes, f_{t+1} = f_t + gamma_t k(x)^T p_t.

Each builder lists one step's blocks (`craft.looped_program` repeats them); every block and head
names its `op`.
"""

from __future__ import annotations

import numpy as np

from kcg._src import blocks as B
from kcg._src import reciprocal as recip
from kcg._src.craft import (Block, Head, Program, ReluUnits, ResidualLayout, StateLocation,
                            linear_units, looped_program, product_units)
from kcg._src.ops import Construction, Op

AGG = B.AGGREGATOR


def _state(tokens: str, alpha: str = "alpha", **extra: StateLocation) -> dict:
  state = {"alpha": StateLocation(alpha, tokens), "r": StateLocation("r", tokens),
           "p": StateLocation("p", tokens), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  state.update(extra)
  return state


def _support_pap_block(prefix: str, ridge: float, spec) -> Block:
  return Block(f"{prefix} pAp = p.Kp + ridge p.p", Op.CURVATURE, heads=(
      B.reduce_over_supports("p", "Kp", [("pAp", 1.0)], "p.Kp", Op.CURVATURE),
      B.reduce_over_supports("p", "p", [("pAp", ridge)], "ridge p.p", Op.RIDGE),
  ), units=(B.guess_units("pAp", "inv_pAp", spec),))


def _support_update_heads(ridge: float) -> tuple[Head, ...]:
  """alpha += gamma p, r -= gamma (Kp + ridge p) at supports, f += gamma k(x).p at queries."""
  return (
      Head((("p", 1.0),), ((AGG, 1.0),), (("gamma", 1.0),), (("alpha", 1.0), ("r", -ridge)),
           "alpha += gamma p; r -= gamma ridge p", Op.UPDATE),
      Head((("Kp", 1.0),), ((AGG, 1.0),), (("gamma", 1.0),), (("r", -1.0),), "r -= gamma Kp",
           Op.UPDATE),
      Head((("kq_p", 1.0),), ((AGG, 1.0),), (("gamma", 1.0),), (("f", 1.0),), "f += gamma k(x).p",
           Op.UPDATE),
  )


def _support_direction_head() -> Head:
  return Head((("p_prev", 1.0),), ((AGG, 1.0),), (("beta", 1.0),), (("p", 1.0),),
              "p += beta p_prev", Op.DIRECTION)


def support_state(feature_dim: int, num_steps: int, ridge: float,
                  spec: recip.ReciprocalSpec) -> Program:
  """Dual CG with per-support state; needs the prefix mask (see module docstring)."""
  dim = feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("alpha", 1), ("r", 1),
                      ("p", 1), ("Kp", 1), ("p_prev", 1), ("kq_p", 1), ("f", 1)]
                     + B.scalar_channels() + B.flag_channels()),
      holders=B.holders([("alpha", "supports"), ("r", "supports"), ("p", "supports"),
                         ("Kp", "supports"), ("p_prev", "supports"), ("kq_p", "queries"),
                         ("f", "queries")] + [(s, "aggregator") for s in B.SCALARS]))
  embedding = B.feature_embedding() + [("y", "r", 1.0), ("y", "p", 1.0)]
  init = [Block("init: rr = y.y", Op.INIT,
                heads=(B.reduce_over_supports("y", "y", [("rr", 1.0)], "y.y", Op.RESIDUAL_NORM),),
                units=(B.guess_units("rr", "inv_rr_next", spec),))]
  s = "cg"
  step = [
      Block(f"{s} mat-vec Kp", Op.MATVEC, heads=B.support_matvec_heads() + B.step_start_heads()),
      _support_pap_block(s, ridge, spec),
      *B.scalar_blocks(spec, s),
      Block(f"{s} update alpha, r, f", Op.UPDATE,
            heads=_support_update_heads(ridge) + B.after_update_heads(), units=(
                linear_units(layout, "Kp", [("Kp", -1.0)], "clear Kp"),
                linear_units(layout, "kq_p", [("kq_p", -1.0)], "clear kq_p"),
                linear_units(layout, "p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"))),
      Block(f"{s} rr_next = r.r", Op.RESIDUAL_NORM, heads=(
          B.reduce_over_supports("r", "r", [("rr_next", 1.0)], "r.r", Op.RESIDUAL_NORM),),
          units=(B.guess_units("rr_next", "inv_rr_next", spec),)),
      B.beta_block(s),
      Block(f"{s} p = r + beta p", Op.DIRECTION, heads=(_support_direction_head(),), units=(
          linear_units(layout, "r", [("p", 1.0)], "p += r", op=Op.DIRECTION),
          linear_units(layout, "p_prev", [("p_prev", -1.0)], "clear p_prev"))),
  ]
  return looped_program(Construction.SUPPORT_STATE, layout, embedding, init, step, num_steps,
                        _state("support"), spec)


def _aggregator_direction_block(prefix: str) -> Block:
  """p = r + beta p_prev, p_prev <- 0 (p_prev <- p, p <- 0 happened in the update block)."""
  return Block(f"{prefix} p = r + beta p", Op.DIRECTION, heads=(
      B.product_head("beta", AGG, "p_prev", [("p", 1.0)], "p += beta p_prev", Op.DIRECTION),
      B.at_aggregator("r", [("p", 1.0)], "p += r", Op.DIRECTION),
      B.at_aggregator("p_prev", [("p_prev", -1.0)], "clear p_prev"),
  ))


def _move_p_heads() -> tuple[Head, ...]:
  return (B.at_aggregator("p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"),)


def _u_head() -> Head:
  return Head((("p", 1.0),), (("position", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
              "u = sum_j p_j phi_j", Op.MATVEC_U)


def _kp_from_u_head() -> Head:
  return Head((("u", 1.0),), (("phi_support", 1.0),), (("position", 1.0),), (("Kp", 1.0),),
              "Kp = sum_j (u . phi_j) e_j", Op.MATVEC)


def _init_from_y_head() -> Head:
  return Head(((AGG, 1.0),), (("y", 1.0),), (("position", 1.0),), (("r", 1.0), ("p", 1.0)),
              "r = p = sum_j y_j e_j", Op.INIT)


def aggregator_dual(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                    spec: recip.ReciprocalSpec) -> Program:
  """Dual CG with alpha, r, p in R^k held by the aggregator; works under any mask."""
  k, dim = num_support, feature_dim
  vectors = [("alpha", k), ("r", k), ("p", k), ("p_prev", k), ("Kp", k), ("u", dim)]
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("position", k)] + vectors
                     + [("f", 1)] + B.scalar_channels() + B.flag_channels()),
      holders=B.holders([("position", "supports (one-hot)"), ("f", "queries")]
                        + [(n, "aggregator") for n, _ in vectors]
                        + [(s, "aggregator") for s in B.SCALARS]))
  embedding = B.feature_embedding() + [("position", "position", 1.0)]
  init = [Block("init: r = p = y; rr = y.y", Op.INIT, heads=(
      _init_from_y_head(),
      B.reduce_over_supports("y", "y", [("rr", 1.0)], "y.y", Op.RESIDUAL_NORM),
  ), units=(B.guess_units("rr", "inv_rr_next", spec),))]
  s = "cg"
  step = [
      Block(f"{s} u = Phi^T p", Op.MATVEC_U, heads=(_u_head(),) + B.step_start_heads()),
      Block(f"{s} Kp = Phi u", Op.MATVEC, heads=(_kp_from_u_head(),)),
      Block(f"{s} pAp = p.Kp + ridge p.p", Op.CURVATURE, heads=(
          B.product_head("p", "Kp", AGG, [("pAp", 1.0)], "p.Kp", Op.CURVATURE),
          B.product_head("p", "p", AGG, [("pAp", ridge)], "ridge p.p", Op.RIDGE),
      ), units=(B.guess_units("pAp", "inv_pAp", spec),)),
      *B.scalar_blocks(spec, s),
      Block(f"{s} update alpha, r, f", Op.UPDATE, heads=(
          B.product_head("gamma", AGG, "p", [("alpha", 1.0), ("r", -ridge)],
                         "alpha += gamma p; r -= gamma ridge p", Op.UPDATE),
          B.product_head("gamma", AGG, "Kp", [("r", -1.0)], "r -= gamma Kp", Op.UPDATE),
          Head((("phi_query", 1.0),), (("u", 1.0),), (("gamma", 1.0),), (("f", 1.0),),
               "f += gamma phi(x).u", Op.QUERY_MATVEC),
          B.at_aggregator("Kp", [("Kp", -1.0)], "clear Kp"),
          B.at_aggregator("u", [("u", -1.0)], "clear u"),
      ) + B.after_update_heads() + _move_p_heads()),
      Block(f"{s} rr_next = r.r", Op.RESIDUAL_NORM, heads=(
          B.product_head("r", "r", AGG, [("rr_next", 1.0)], "r.r", Op.RESIDUAL_NORM),),
          units=(B.guess_units("rr_next", "inv_rr_next", spec),)),
      B.beta_block(s),
      _aggregator_direction_block(s),
  ]
  return looped_program(Construction.AGGREGATOR_DUAL, layout, embedding, init, step, num_steps,
                        _state("aggregator"), spec)


def _primal_matvec_head() -> Head:
  return Head((("p", 1.0),), (("phi_support", 1.0),), (("phi_support", 1.0),), (("Ap", 1.0),),
              "sum_j phi_j (phi_j . p)", Op.MATVEC)


def _primal_init_head() -> Head:
  return Head(((AGG, 1.0),), (("y", 1.0),), (("phi_support", 1.0),), (("r", 1.0), ("p", 1.0)),
              "r = p = sum_j y_j phi_j", Op.INIT)


def aggregator_primal(feature_dim: int, num_steps: int, ridge: float,
                      spec: recip.ReciprocalSpec) -> Program:
  """CG on (Phi^T Phi + ridge I) w = Phi^T y with w, r, p in R^p held by the aggregator."""
  dim = feature_dim
  vectors = [("w", dim), ("r", dim), ("p", dim), ("p_prev", dim), ("Ap", dim)]
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1)] + vectors + [("f", 1)]
                     + B.scalar_channels() + B.flag_channels()),
      holders=B.holders([("f", "queries")] + [(n, "aggregator") for n, _ in vectors]
                        + [(s, "aggregator") for s in B.SCALARS]))
  init = [
      Block("init: r = p = Phi^T y", Op.INIT, heads=(_primal_init_head(),)),
      Block("init: rr = r.r", Op.INIT,
            heads=(B.product_head("r", "r", AGG, [("rr", 1.0)], "r.r", Op.RESIDUAL_NORM),),
            units=(B.guess_units("rr", "inv_rr_next", spec),)),
  ]
  s = "primal-cg"
  step = [
      Block(f"{s} Ap = Phi^T Phi p + ridge p", Op.MATVEC, heads=(
          _primal_matvec_head(),
          B.at_aggregator("p", [("Ap", ridge)], "ridge p", Op.RIDGE),
      ) + B.step_start_heads()),
      Block(f"{s} pAp = p.Ap", Op.PAP,
            heads=(B.product_head("p", "Ap", AGG, [("pAp", 1.0)], "p.Ap", Op.PAP),),
            units=(B.guess_units("pAp", "inv_pAp", spec),)),
      *B.scalar_blocks(spec, s),
      Block(f"{s} update w, r, f", Op.UPDATE, heads=(
          B.product_head("gamma", AGG, "p", [("w", 1.0)], "w += gamma p", Op.UPDATE),
          B.product_head("gamma", AGG, "Ap", [("r", -1.0)], "r -= gamma Ap", Op.UPDATE),
          Head((("phi_query", 1.0),), (("p", 1.0),), (("gamma", 1.0),), (("f", 1.0),),
               "f += gamma phi(x).p", Op.QUERY_MATVEC),
          B.at_aggregator("Ap", [("Ap", -1.0)], "clear Ap"),
      ) + B.after_update_heads() + _move_p_heads()),
      Block(f"{s} rr_next = r.r", Op.RESIDUAL_NORM, heads=(
          B.product_head("r", "r", AGG, [("rr_next", 1.0)], "r.r", Op.RESIDUAL_NORM),),
          units=(B.guess_units("rr_next", "inv_rr_next", spec),)),
      B.beta_block(s),
      _aggregator_direction_block(s),
  ]
  return looped_program(Construction.AGGREGATOR_PRIMAL, layout, B.feature_embedding(), init, step,
                        num_steps, _state("aggregator", alpha="w"), spec)


# ---------------------------------------------------------------------------------------------
# Preconditioned CG with the Jacobi preconditioner M = diag(K) + ridge I, per-support state.
# M^{-1} is a token-wise channel scaling: support i multiplies its residual by 1/d_i,
# d_i = phi_i . phi_i + ridge. Gated MLP units (activation="reglu") form the products exactly;
# 1/d_i is computed once, by the same ReLU guess and Newton steps as the aggregator's scalars but
# in every support token (two MLP layers per Newton step: s x, then x (2 - s x)).


def jacobi_support_state(feature_dim: int, num_steps: int, ridge: float,
                         spec: recip.ReciprocalSpec) -> Program:
  """PCG, M = diag(K + ridge I), alpha_i, r_i, z_i, p_i in support token i (prefix mask).

  gamma = (r.z)/(p.Ap); alpha += gamma p; r -= gamma Ap; z = r / d; beta = (r'.z')/(r.z);
  p = z + beta p. Rate ((sqrt(kappa') - 1)/(sqrt(kappa') + 1))^t with kappa' = cond(M^-1 A).
  """
  dim = feature_dim
  rho = "rz"
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("alpha", 1), ("r", 1),
                      ("z", 1), ("p", 1), ("Kp", 1), ("p_prev", 1), ("kq_p", 1), ("f", 1),
                      ("diag", 1), ("inv_diag", 1), ("newton_scratch", 1)]
                     + B.scalar_channels(rho) + B.flag_channels()),
      holders=B.holders([("alpha", "supports"), ("r", "supports"), ("z", "supports"),
                         ("p", "supports"), ("Kp", "supports"), ("p_prev", "supports"),
                         ("kq_p", "queries"), ("f", "queries"), ("diag", "supports"),
                         ("inv_diag", "supports"), ("newton_scratch", "supports")]
                        + [(s, "aggregator") for s in B.scalar_names(rho)]))
  embedding = B.feature_embedding() + [("y", "r", 1.0)]
  squares = np.concatenate([np.eye(dim), -np.eye(dim)], axis=1)
  init = [Block("init: diag = phi.phi + ridge", Op.PRECONDITION, units=(
      ReluUnits((("phi_support", squares),), (("diag", np.ones((2 * dim, 1))),), "phi.phi",
                Op.PRECONDITION, (("phi_support", squares),)),
      ReluUnits((("is_support", np.ones((1, 1))),), (("diag", ridge * np.ones((1, 1))),),
                "diag += ridge", Op.PRECONDITION)))]
  init += B.token_reciprocal_blocks(layout, "diag", "inv_diag", "newton_scratch", "is_support",
                                    spec, "init:")
  init += [
      Block("init: z = p = r / diag", Op.PRECONDITION, units=(
          product_units(layout, "inv_diag", "r", [("z", 1.0), ("p", 1.0)], op=Op.PRECONDITION),)),
      Block("init: rz = r.z", Op.INIT,
            heads=(B.reduce_over_supports("r", "z", [(rho, 1.0)], "r.z", Op.RESIDUAL_NORM),),
            units=(B.guess_units(rho, f"inv_{rho}_next", spec),)),
  ]
  s = "pcg"
  step = [
      Block(f"{s} mat-vec Kp", Op.MATVEC, heads=B.support_matvec_heads() + B.step_start_heads(rho),
            units=(linear_units(layout, "z", [("z", -1.0)], "clear z"),)),
      _support_pap_block(s, ridge, spec),
      *B.scalar_blocks(spec, s, rho),
      Block(f"{s} update alpha, r, f; z = r / diag", Op.UPDATE,
            heads=_support_update_heads(ridge) + B.after_update_heads(rho), units=(
                linear_units(layout, "Kp", [("Kp", -1.0)], "clear Kp"),
                linear_units(layout, "kq_p", [("kq_p", -1.0)], "clear kq_p"),
                linear_units(layout, "p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"),
                product_units(layout, "inv_diag", "r", [("z", 1.0)], "z = r / diag",
                              op=Op.PRECONDITION))),
      Block(f"{s} rz_next = r.z", Op.RESIDUAL_NORM, heads=(
          B.reduce_over_supports("r", "z", [(f"{rho}_next", 1.0)], "r.z", Op.RESIDUAL_NORM),),
          units=(B.guess_units(f"{rho}_next", f"inv_{rho}_next", spec),)),
      B.beta_block(s, rho),
      Block(f"{s} p = z + beta p", Op.DIRECTION, heads=(_support_direction_head(),), units=(
          linear_units(layout, "z", [("p", 1.0)], "p += z", op=Op.DIRECTION),
          linear_units(layout, "p_prev", [("p_prev", -1.0)], "clear p_prev"))),
  ]
  return looped_program(Construction.JACOBI_SUPPORT_STATE, layout, embedding, init, step,
                        num_steps, _state("support", z=StateLocation("z", "support")), spec)
