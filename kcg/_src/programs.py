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

Step sizes are applied where they are used: gamma = rr / pAp reaches the update as a head whose
query is the token's own p or Kp, key 1/pAp and value rr at the aggregator (three factors in one
head), and beta = rr_next / rr reaches p = r + beta p_prev the same way; each is also stored for
the state read-out. So no layer forms a step size alone. With `carry_matvec` the next mat-vec is
formed together with p (Kp = K r + beta Kp_prev): 4 + newton_steps layers per step.

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


def _support_gamma_update_heads(ridge: float) -> tuple[Head, ...]:
  """The update with a stored gamma (PCG): alpha += gamma p, r -= gamma (Kp + ridge p),
  f += gamma k(x).p."""
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


def _support_update_heads(ridge: float) -> tuple[Head, ...]:
  """alpha += gamma p, r -= gamma (Kp + ridge p) at supports, f += gamma k(x).p at queries, with
  gamma = rr * inv_pAp read at the aggregator (`B.ratio_head`), and gamma itself stored."""
  return (
      B.ratio_head("p", "rr", "inv_pAp", (("alpha", 1.0), ("r", -ridge)),
                   "alpha += gamma p; r -= gamma ridge p", Op.UPDATE),
      B.ratio_head("Kp", "rr", "inv_pAp", (("r", -1.0),), "r -= gamma Kp", Op.UPDATE),
      B.ratio_head("kq_p", "rr", "inv_pAp", (("f", 1.0),), "f += gamma k(x).p", Op.UPDATE),
  ) + B.gamma_heads()


def support_state(feature_dim: int, num_steps: int, ridge: float, spec: recip.ReciprocalSpec,
                  carry_matvec: bool = False) -> Program:
  """Dual CG with per-support state; needs the prefix mask (see module docstring).

  A step (BUILD.md, "Layers per CG step"): the mat-vec Kp = K p and k(x).p, pAp, the Newton steps,
  the update (gamma applied as rr * inv_pAp), r.r, p = r + beta p_prev: 5 + newton_steps layers.
  `carry_matvec`: the mat-vec is formed with p instead, Kp = K r + beta Kp_prev (linear in p, so
  it needs p only through r and the kept Kp_prev): 4 + newton_steps layers, but the mat-vec
  layer's heads then damage later steps through Kp_prev, so kcg.ablations has no table for it.
  """
  dim = feature_dim
  carried = [("Kp_prev", 1)] if carry_matvec else []
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("alpha", 1), ("r", 1),
                      ("p", 1), ("Kp", 1), ("p_prev", 1)] + carried + [("kq_p", 1), ("f", 1)]
                     + B.scalar_channels() + B.flag_channels()),
      holders=B.holders([("alpha", "supports"), ("r", "supports"), ("p", "supports"),
                         ("Kp", "supports"), ("p_prev", "supports")]
                        + [(c, "supports") for c, _ in carried]
                        + [("kq_p", "queries"), ("f", "queries")]
                        + [(s, "aggregator") for s in B.SCALARS]))
  embedding = B.feature_embedding() + [("y", "r", 1.0), ("y", "p", 1.0)]
  matvec, query_matvec = B.support_matvec_heads()
  init_heads = (B.reduce_over_supports("y", "y", [("rr", 1.0)], "y.y", Op.RESIDUAL_NORM),)
  init = [Block("init: rr = y.y" + ("; Kp = K y" if carry_matvec else ""), Op.INIT,
                heads=init_heads + ((matvec,) if carry_matvec else ()),
                units=(B.guess_units("rr", "inv_rr_next", spec),))]
  s = "cg"
  pap_heads = (B.reduce_over_supports("p", "Kp", [("pAp", 1.0)], "p.Kp", Op.CURVATURE),
               B.reduce_over_supports("p", "p", [("pAp", ridge)], "ridge p.p", Op.RIDGE))
  move_kp = (linear_units(layout, "Kp", [("Kp_prev", 1.0), ("Kp", -1.0)], "Kp_prev <- Kp, Kp <- 0")
             if carry_matvec else linear_units(layout, "Kp", [("Kp", -1.0)], "clear Kp"))
  direction_heads = (B.ratio_head("p_prev", "rr_next", "inv_rr", (("p", 1.0),),
                                  "p += beta p_prev", Op.DIRECTION),) + B.beta_heads()
  direction_units = (linear_units(layout, "r", [("p", 1.0)], "p += r", op=Op.DIRECTION),
                     linear_units(layout, "p_prev", [("p_prev", -1.0)], "clear p_prev"))
  if carry_matvec:
    direction_heads += (
        B.ratio_head("Kp_prev", "rr_next", "inv_rr", (("Kp", 1.0),), "Kp += beta Kp_prev",
                     Op.DIRECTION),
        Head((("phi_support", 1.0),), (("phi_support", 1.0),), (("r", 1.0),), (("Kp", 1.0),),
             "(Kr)_i = sum_j (phi_i . phi_j) r_j", Op.MATVEC))
    direction_units += (linear_units(layout, "Kp_prev", [("Kp_prev", -1.0)], "clear Kp_prev"),)
    head_of_step = [Block(f"{s} pAp = p.Kp + ridge p.p; k(x).p", Op.CURVATURE,
                          heads=pap_heads + (query_matvec,) + B.step_start_heads(),
                          units=(B.guess_units("pAp", "inv_pAp", spec),))]
  else:
    head_of_step = [
        Block(f"{s} mat-vec Kp", Op.MATVEC, heads=(matvec, query_matvec) + B.step_start_heads()),
        Block(f"{s} pAp = p.Kp + ridge p.p", Op.CURVATURE, heads=pap_heads,
              units=(B.guess_units("pAp", "inv_pAp", spec),))]
  step = head_of_step + [
      *B.newton_blocks(spec, s),
      Block(f"{s} update alpha, r, f", Op.UPDATE,
            heads=_support_update_heads(ridge) + B.after_update_heads(), units=(
                move_kp, linear_units(layout, "kq_p", [("kq_p", -1.0)], "clear kq_p"),
                linear_units(layout, "p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"))),
      Block(f"{s} rr_next = r.r", Op.RESIDUAL_NORM, heads=(
          B.reduce_over_supports("r", "r", [("rr_next", 1.0)], "r.r", Op.RESIDUAL_NORM),),
          units=(B.guess_units("rr_next", "inv_rr_next", spec),)),
      Block(f"{s} p = r + beta p" + ("; Kp = K r + beta Kp" if carry_matvec else ""),
            Op.DIRECTION, heads=direction_heads, units=direction_units),
  ]
  construction = (Construction.CARRIED_SUPPORT_STATE if carry_matvec
                  else Construction.SUPPORT_STATE)
  return looped_program(construction, layout, embedding, init, step, num_steps,
                        _state("support"), spec)


def _aggregator_update_heads(solution: str, matvec: str, ridge: float | None) -> tuple[Head, ...]:
  """solution += gamma p, r -= gamma matvec (and gamma ridge p unless ridge is None: the primal's
  Ap holds its ridge term), gamma = rr * inv_pAp; p moves to p_prev."""
  outputs = [(solution, 1.0)] + ([] if ridge is None else [("r", -ridge)])
  return (
      B.product_head("rr", "inv_pAp", "p", outputs, f"{solution} += gamma p" +
                     ("" if ridge is None else "; r -= gamma ridge p"), Op.UPDATE),
      B.product_head("rr", "inv_pAp", matvec, [("r", -1.0)], f"r -= gamma {matvec}", Op.UPDATE),
      B.at_aggregator("p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"),
  ) + B.gamma_heads() + B.after_update_heads()


def _aggregator_direction_heads(carried: str | None) -> tuple[Head, ...]:
  """p = r + beta p_prev; with `carried`, also carried += beta carried_prev (the rest of the next
  mat-vec is linear in r)."""
  heads = (
      B.product_head("rr_next", "inv_rr", "p_prev", [("p", 1.0)], "p += beta p_prev",
                     Op.DIRECTION),
      B.at_aggregator("r", [("p", 1.0)], "p += r", Op.DIRECTION),
      B.at_aggregator("p_prev", [("p_prev", -1.0)], "clear p_prev"),
  ) + B.beta_heads()
  if carried is None:
    return heads
  return heads + (
      B.product_head("rr_next", "inv_rr", f"{carried}_prev", [(carried, 1.0)],
                     f"{carried} += beta {carried}_prev", Op.DIRECTION),
      B.at_aggregator(f"{carried}_prev", [(f"{carried}_prev", -1.0)], f"clear {carried}_prev"))


def _kp_from_u_head() -> Head:
  return Head((("u", 1.0),), (("phi_support", 1.0),), (("position", 1.0),), (("Kp", 1.0),),
              "Kp = sum_j (u . phi_j) e_j", Op.MATVEC)


def _aggregator_residual_norm_block(prefix: str, spec: recip.ReciprocalSpec) -> Block:
  """rr_next = r.r of the aggregator's r, with the reciprocal's guess of 1/rr_next."""
  return Block(f"{prefix} rr_next = r.r", Op.RESIDUAL_NORM, heads=(
      B.product_head("r", "r", AGG, [("rr_next", 1.0)], "r.r", Op.RESIDUAL_NORM),),
      units=(B.guess_units("rr_next", "inv_rr_next", spec),))


def aggregator_dual(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                    spec: recip.ReciprocalSpec, carry_matvec: bool = False) -> Program:
  """Dual CG with alpha, r, p in R^k held by the aggregator; works under any mask.

  A step: u = Phi^T p, Kp = Phi u, pAp, the Newton steps, the update, r.r, then f += gamma phi(x).u
  and p = r + beta p_prev: 6 + newton_steps layers. `carry_matvec`: u = Phi^T r + beta u_prev is
  formed with p, so that Kp = Phi u and pAp = u.u + ridge p.p come in one layer: 4 + newton_steps
  (no ablation table: see `support_state`).
  """
  k, dim = num_support, feature_dim
  vectors = [("alpha", k), ("r", k), ("p", k), ("p_prev", k), ("Kp", k), ("u", dim)]
  vectors += [("u_prev", dim)] if carry_matvec else []
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1), ("position", k)] + vectors
                     + [("f", 1)] + B.scalar_channels() + B.flag_channels()),
      holders=B.holders([("position", "supports (one-hot)"), ("f", "queries")]
                        + [(n, "aggregator") for n, _ in vectors]
                        + [(s, "aggregator") for s in B.SCALARS]))
  embedding = B.feature_embedding() + [("position", "position", 1.0)]
  init_heads = (
      Head(((AGG, 1.0),), (("y", 1.0),), (("position", 1.0),), (("r", 1.0), ("p", 1.0)),
           "r = p = sum_j y_j e_j", Op.INIT),
      B.reduce_over_supports("y", "y", [("rr", 1.0)], "y.y", Op.RESIDUAL_NORM))
  if carry_matvec:
    init_heads += (Head(((AGG, 1.0),), (("y", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
                        "u = sum_j y_j phi_j", Op.MATVEC_U),)
  init = [Block("init: r = p = y; rr = y.y" + ("; u = Phi^T y" if carry_matvec else ""), Op.INIT,
                heads=init_heads, units=(B.guess_units("rr", "inv_rr_next", spec),))]
  s = "cg"
  u_of = "u_prev" if carry_matvec else "u"  # where u = Phi^T p is when f reads it
  query_head = Head((("phi_query", 1.0),), ((u_of, 1.0),), (("gamma", 1.0),), (("f", 1.0),),
                    "f += gamma phi(x).u", Op.QUERY_MATVEC)
  if carry_matvec:
    head_of_step = [Block(f"{s} Kp = Phi u; pAp = u.u + ridge p.p", Op.CURVATURE, heads=(
        _kp_from_u_head(),
        B.product_head("u", "u", AGG, [("pAp", 1.0)], "p.Kp = u.u", Op.CURVATURE),
        B.product_head("p", "p", AGG, [("pAp", ridge)], "ridge p.p", Op.RIDGE),
    ) + B.step_start_heads(), units=(B.guess_units("pAp", "inv_pAp", spec),))]
    move_u = (B.at_aggregator("u", [("u_prev", 1.0), ("u", -1.0)], "u_prev <- u, u <- 0"),)
    direction = _aggregator_direction_heads("u") + (query_head, Head(
        (("r", 1.0),), (("position", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
        "u += sum_j r_j phi_j", Op.MATVEC_U))
  else:
    head_of_step = [
        Block(f"{s} u = Phi^T p", Op.MATVEC_U, heads=(Head(
            (("p", 1.0),), (("position", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
            "u = sum_j p_j phi_j", Op.MATVEC_U),) + B.step_start_heads()),
        Block(f"{s} Kp = Phi u", Op.MATVEC, heads=(_kp_from_u_head(),)),
        Block(f"{s} pAp = p.Kp + ridge p.p", Op.CURVATURE, heads=(
            B.product_head("p", "Kp", AGG, [("pAp", 1.0)], "p.Kp", Op.CURVATURE),
            B.product_head("p", "p", AGG, [("pAp", ridge)], "ridge p.p", Op.RIDGE),
        ), units=(B.guess_units("pAp", "inv_pAp", spec),))]
    move_u = ()
    direction = (_aggregator_direction_heads(None) + (query_head,)
                 + (B.at_aggregator("u", [("u", -1.0)], "clear u"),))
  step = head_of_step + [
      *B.newton_blocks(spec, s),
      Block(f"{s} update alpha, r", Op.UPDATE, heads=_aggregator_update_heads("alpha", "Kp", ridge)
            + (B.at_aggregator("Kp", [("Kp", -1.0)], "clear Kp"),) + move_u),
      _aggregator_residual_norm_block(s, spec),
      Block(f"{s} f += gamma phi(x).u; p = r + beta p" + ("; u = Phi^T r + beta u" if carry_matvec
                                                           else ""), Op.DIRECTION, heads=direction),
  ]
  construction = (Construction.CARRIED_AGGREGATOR_DUAL if carry_matvec
                  else Construction.AGGREGATOR_DUAL)
  return looped_program(construction, layout, embedding, init, step, num_steps,
                        _state("aggregator"), spec)


def _primal_matvec_head(vector: str) -> Head:
  return Head(((vector, 1.0),), (("phi_support", 1.0),), (("phi_support", 1.0),), (("Ap", 1.0),),
              f"sum_j phi_j (phi_j . {vector})", Op.MATVEC)


def _primal_init_head() -> Head:
  return Head(((AGG, 1.0),), (("y", 1.0),), (("phi_support", 1.0),), (("r", 1.0), ("p", 1.0)),
              "r = p = sum_j y_j phi_j", Op.INIT)


def aggregator_primal(feature_dim: int, num_steps: int, ridge: float,
                      spec: recip.ReciprocalSpec, carry_matvec: bool = False) -> Program:
  """CG on (Phi^T Phi + ridge I) w = Phi^T y with w, r, p in R^p held by the aggregator.

  A step: Ap = Phi^T Phi p + ridge p, pAp, the Newton steps, the update, r.r, then
  f += gamma phi(x).p (gamma is stored by then) and p = r + beta p_prev: 5 + newton_steps layers.
  `carry_matvec`: Ap = A r + beta Ap_prev is formed with p: 4 + newton_steps (no ablation table).
  """
  dim = feature_dim
  vectors = [("w", dim), ("r", dim), ("p", dim), ("p_prev", dim), ("Ap", dim)]
  vectors += [("Ap_prev", dim)] if carry_matvec else []
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1)] + vectors + [("f", 1)]
                     + B.scalar_channels() + B.flag_channels()),
      holders=B.holders([("f", "queries")] + [(n, "aggregator") for n, _ in vectors]
                        + [(s, "aggregator") for s in B.SCALARS]))
  ridge_head = lambda v: B.at_aggregator(v, [("Ap", ridge)], f"ridge {v}", Op.RIDGE)
  rr_heads = (B.product_head("r", "r", AGG, [("rr", 1.0)], "r.r", Op.RESIDUAL_NORM),)
  init = [
      Block("init: r = p = Phi^T y", Op.INIT, heads=(_primal_init_head(),)),
      Block("init: rr = r.r" + ("; Ap = A p" if carry_matvec else ""), Op.INIT,
            heads=rr_heads + ((_primal_matvec_head("p"), ridge_head("p")) if carry_matvec else ()),
            units=(B.guess_units("rr", "inv_rr_next", spec),)),
  ]
  s = "primal-cg"
  pap = Block(f"{s} pAp = p.Ap", Op.PAP,
              heads=(B.product_head("p", "Ap", AGG, [("pAp", 1.0)], "p.Ap", Op.PAP),)
              + (B.step_start_heads() if carry_matvec else ()),
              units=(B.guess_units("pAp", "inv_pAp", spec),))
  query_head = Head((("phi_query", 1.0),), (("p_prev", 1.0),), (("gamma", 1.0),), (("f", 1.0),),
                    "f += gamma phi(x).p", Op.QUERY_MATVEC)
  if carry_matvec:
    head_of_step = [pap]
    move_ap = B.at_aggregator("Ap", [("Ap_prev", 1.0), ("Ap", -1.0)], "Ap_prev <- Ap, Ap <- 0")
    direction = _aggregator_direction_heads("Ap") + (
        query_head, _primal_matvec_head("r"), ridge_head("r"))
  else:
    head_of_step = [Block(f"{s} Ap = Phi^T Phi p + ridge p", Op.MATVEC, heads=(
        _primal_matvec_head("p"), ridge_head("p")) + B.step_start_heads()), pap]
    move_ap = B.at_aggregator("Ap", [("Ap", -1.0)], "clear Ap")
    direction = _aggregator_direction_heads(None) + (query_head,)
  step = head_of_step + [
      *B.newton_blocks(spec, s),
      Block(f"{s} update w, r", Op.UPDATE,
            heads=_aggregator_update_heads("w", "Ap", None) + (move_ap,)),
      _aggregator_residual_norm_block(s, spec),
      Block(f"{s} f += gamma phi(x).p; p = r + beta p" + ("; Ap = A r + beta Ap" if carry_matvec
                                                           else ""), Op.DIRECTION, heads=direction),
  ]
  construction = (Construction.CARRIED_AGGREGATOR_PRIMAL if carry_matvec
                  else Construction.AGGREGATOR_PRIMAL)
  return looped_program(construction, layout, B.feature_embedding(), init, step, num_steps,
                        _state("aggregator", alpha="w"), spec)


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
            heads=_support_gamma_update_heads(ridge) + B.after_update_heads(rho), units=(
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
