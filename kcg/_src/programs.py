"""Conjugate gradient written as transformer blocks on named channels (compiler stage 1).

Three constructions, all exact up to floating point, all sharing the scalar machinery that runs at
the aggregator token (reductions arrive there, reciprocals and step sizes are computed there):

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

Queries never hold solver state: each query token accumulates its prediction f_t(x) = k(x)^T alpha_t
(primal: phi(x) . w_t) with the same step sizes, f_{t+1} = f_t + gamma_t k(x)^T p_t.

Every block's docstring-level meaning is its `name`; `blocks_per_step` and `step_ends` say which
layer finishes which CG step.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np

from kcg._src import reciprocal as recip
from kcg._src.craft import Block, Head, ReluUnits, ResidualLayout, linear_units, product_units

AGG = "is_aggregator"
SCALARS = ("rr", "rr_next", "pAp", "inv_rr", "inv_rr_next", "inv_pAp", "gamma", "beta")


def _scalar_names(rho: str) -> tuple[str, ...]:
  """The aggregator's scalars when the reduced quantity is `rho` (r.r for CG, r.z for PCG)."""
  return tuple(name.replace("rr", rho) for name in SCALARS)
FLAGS = ("is_support", AGG, "is_query")


class StateLocation(NamedTuple):
  """Where a CG quantity lives: a channel, held by `tokens` ("support": one entry per support
  token; "aggregator": the whole vector or scalar in the aggregator token)."""

  channel: str
  tokens: str


class Program(NamedTuple):
  """A construction: residual layout, embedding and readout routes, and the blocks.

  Attributes:
    name: which construction.
    layout: the residual channels.
    embedding: ((token feature, channel, coefficient), ...): the embedding writes each input
      feature into channels.
    blocks: the distinct blocks: the init blocks, then one CG step's blocks (every step applies
      the same weights: the step sizes are computed, not baked in).
    schedule: schedule[l] = index into `blocks` of the block applied at layer l.
    readout: the channel read at query tokens.
    step_ends: step_ends[t] = number of layers after which the CG state of step t is in place
      (t = 0 .. num_steps).
    state: where alpha, r, p, gamma, beta live.
    reciprocal: the division used.
    norm_pin: for pre-norm models, the value M of the pinning channels (see `with_norm_pins`).
  """

  name: str
  layout: ResidualLayout
  embedding: tuple[tuple[str, str, float], ...]
  blocks: tuple[Block, ...]
  schedule: tuple[int, ...]
  readout: str
  step_ends: tuple[int, ...]
  state: dict
  reciprocal: recip.ReciprocalSpec
  norm_pin: float | None = None


# ---------------------------------------------------------------------------------------------
# Heads that every construction uses. "At the aggregator" heads have keys that are non-zero only
# in the aggregator token, so the sum over tokens reads that one token.


def _at_aggregator(value: str, output, name: str) -> Head:
  """The aggregator adds a linear function of its own channel `value` to `output`."""
  return Head(((AGG, 1.0),), ((AGG, 1.0),), ((value, 1.0),), tuple(output), name)


def _product(query: str, key: str, value: str, output, name: str) -> Head:
  return Head(((query, 1.0),), ((key, 1.0),), ((value, 1.0),), tuple(output), name)


def _reduce_over_supports(key: str, value: str, output, name: str) -> Head:
  """The aggregator reads sum_j key_j value_j over the support tokens."""
  return Head(((AGG, 1.0),), ((key, 1.0),), ((value, 1.0),), tuple(output), name)


def _guess_units(source: str, target: str, spec: recip.ReciprocalSpec) -> ReluUnits:
  """Initial guess of 1/source into target (see kcg._src.reciprocal), aggregator only."""
  on_s, on_flag, post = recip.guess_units_matrices(spec)
  return ReluUnits(((source, on_s[None, :]), (AGG, on_flag[None, :])), ((target, post[:, None]),),
                   f"guess 1/{source}")


def _newton_heads(x: str, s: str) -> tuple[Head, ...]:
  """x <- 2x - s x^2: one head adds x, one subtracts s x^2 (query x, key s, value x)."""
  return (_at_aggregator(x, [(x, 1.0)], f"newton {x}: +x"),
          _product(x, s, x, [(x, -1.0)], f"newton {x}: -{s} x^2"))


def _scalar_blocks(spec, prefix: str, rho: str = "rr"):
  """Newton refinement of 1/pAp and 1/rho, then gamma = rho / pAp (clearing what is consumed)."""
  blocks = [Block(f"{prefix} newton {i + 1}/{spec.newton_steps}",
                  heads=_newton_heads("inv_pAp", "pAp") + _newton_heads(f"inv_{rho}", rho))
            for i in range(spec.newton_steps)]
  blocks.append(Block(f"{prefix} gamma = {rho} / pAp", heads=(
      _product(rho, AGG, "inv_pAp", [("gamma", 1.0)], f"gamma = {rho} * inv_pAp"),
      _at_aggregator("pAp", [("pAp", -1.0)], "clear pAp"),
      _at_aggregator("inv_pAp", [("inv_pAp", -1.0)], "clear inv_pAp"),
  )))
  return blocks


# Overwriting a channel as x + (new - x) in one layer loses `new` entirely when |new| is below
# the rounding of |x| (r.r can fall by 1e-17 in one step). So every channel is cleared exactly
# (x + (-x) = 0) in an earlier layer and written into zero later; the write then rounds exactly as
# the textbook recurrence does.


def _step_start_heads(rho: str = "rr") -> tuple[Head, ...]:
  """First layer of a step: clear last step's gamma and beta, move the guess of 1/rho in place."""
  return (
      _at_aggregator("gamma", [("gamma", -1.0)], "clear gamma"),
      _at_aggregator("beta", [("beta", -1.0)], "clear beta"),
      _at_aggregator(f"inv_{rho}_next", [(f"inv_{rho}", 1.0), (f"inv_{rho}_next", -1.0)],
                     f"inv_{rho} <- guess"),
  )


def _after_update_heads(rho: str = "rr") -> tuple[Head, ...]:
  """rho is consumed once gamma is formed."""
  return (_at_aggregator(rho, [(rho, -1.0)], f"clear {rho}"),)


def _beta_block(prefix: str, rho: str = "rr") -> Block:
  """beta = rho_next / rho; rho <- rho_next; inv_rho cleared (its successor waits in _next)."""
  return Block(f"{prefix} beta = {rho}_next / {rho}", heads=(
      _product(f"{rho}_next", AGG, f"inv_{rho}", [("beta", 1.0)], f"beta = {rho}_next * inv_{rho}"),
      _at_aggregator(f"{rho}_next", [(rho, 1.0), (f"{rho}_next", -1.0)], f"{rho} <- {rho}_next"),
      _at_aggregator(f"inv_{rho}", [(f"inv_{rho}", -1.0)], f"clear inv_{rho}"),
  ))


def _aggregator_direction_blocks(prefix: str):
  """p_prev <- p, p <- 0 (in the update block), then p = r + beta p_prev, p_prev <- 0."""
  return Block(f"{prefix} p = r + beta p", heads=(
      _product("beta", AGG, "p_prev", [("p", 1.0)], "p += beta p_prev"),
      _at_aggregator("r", [("p", 1.0)], "p += r"),
      _at_aggregator("p_prev", [("p_prev", -1.0)], "clear p_prev"),
  ))


def _move_p_heads() -> tuple[Head, ...]:
  return (_at_aggregator("p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"),)


def _support_matvec_heads() -> tuple[Head, ...]:
  """(Kp)_i = sum_j (phi_i . phi_j) p_j at supports; k(x_q) . p at queries."""
  return (
      Head((("phi_support", 1.0),), (("phi_support", 1.0),), (("p", 1.0),), (("Kp", 1.0),),
           "(Kp)_i = sum_j (phi_i . phi_j) p_j"),
      Head((("phi_query", 1.0),), (("phi_support", 1.0),), (("p", 1.0),), (("kq_p", 1.0),),
           "k(x_q) . p"),
  )


def _support_pap_block(prefix: str, ridge: float, spec) -> Block:
  return Block(f"{prefix} pAp = p.Kp + ridge p.p", heads=(
      _reduce_over_supports("p", "Kp", [("pAp", 1.0)], "p.Kp"),
      _reduce_over_supports("p", "p", [("pAp", ridge)], "ridge p.p"),
  ), units=(_guess_units("pAp", "inv_pAp", spec),))


def _support_update_heads(ridge: float) -> tuple[Head, ...]:
  """alpha += gamma p, r -= gamma (Kp + ridge p) at supports, f += gamma k(x).p at queries."""
  return (
      Head((("p", 1.0),), ((AGG, 1.0),), (("gamma", 1.0),), (("alpha", 1.0), ("r", -ridge)),
           "alpha += gamma p; r -= gamma ridge p"),
      Head((("Kp", 1.0),), ((AGG, 1.0),), (("gamma", 1.0),), (("r", -1.0),), "r -= gamma Kp"),
      Head((("kq_p", 1.0),), ((AGG, 1.0),), (("gamma", 1.0),), (("f", 1.0),), "f += gamma k(x).p"),
  )


def _scalar_channels(rho: str = "rr"):
  return [(name, 1) for name in _scalar_names(rho)]


def _flag_channels():
  return [(name, 1) for name in FLAGS]


def _holders(pairs):
  """Which tokens hold which channel (documentation, `ResidualLayout.table`): the feature channels
  every construction has, then `pairs`."""
  return (("phi_support", "supports"), ("phi_query", "queries"), ("y", "supports")) + tuple(pairs)


def _finish(name, layout, embedding, init_blocks, step_blocks, num_steps, state, spec) -> Program:
  init = list(init_blocks)
  step = list(step_blocks()) if num_steps > 0 else []
  schedule = list(range(len(init)))
  step_ends = [len(schedule)]
  for _ in range(num_steps):
    schedule.extend(range(len(init), len(init) + len(step)))
    step_ends.append(len(schedule))
  return Program(name, layout, tuple(embedding), tuple(init + step), tuple(schedule), "f",
                 tuple(step_ends), state, spec)


def layer_names(program: Program) -> tuple[str, ...]:
  """A name for every layer, e.g. 'cg[3] mat-vec Kp'."""
  # The step comes from `step_ends`, not from the block count: per-step programs (Chebyshev) list
  # every step's blocks separately.
  names = []
  for layer, block in enumerate(program.schedule):
    step = bisect.bisect_right(program.step_ends, layer) - 1
    prefix = "" if step < 0 else f"step[{step}] "
    names.append(prefix + program.blocks[block].name)
  return tuple(names)


def _flag_embedding():
  return [(flag, flag, 1.0) for flag in FLAGS]


# ---------------------------------------------------------------------------------------------


def support_state(feature_dim: int, num_steps: int, ridge: float,
                  spec: recip.ReciprocalSpec) -> Program:
  """Dual CG with per-support state; needs the prefix mask (see module docstring)."""
  p = feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1), ("alpha", 1), ("r", 1),
                      ("p", 1), ("Kp", 1), ("p_prev", 1), ("kq_p", 1), ("f", 1)]
                     + _scalar_channels() + _flag_channels()),
      holders=_holders([("alpha", "supports"), ("r", "supports"), ("p", "supports"),
                        ("Kp", "supports"), ("p_prev", "supports"), ("kq_p", "queries"),
                        ("f", "queries")] + [(s, "aggregator") for s in SCALARS]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("y", "r", 1.0), ("y", "p", 1.0)] + _flag_embedding()
  init = [Block("init: rr = y.y", heads=(_reduce_over_supports("y", "y", [("rr", 1.0)], "y.y"),),
                units=(_guess_units("rr", "inv_rr_next", spec),))]

  def step():
    s = "cg"
    return [
        Block(f"{s} mat-vec Kp", heads=_support_matvec_heads() + _step_start_heads()),
        _support_pap_block(s, ridge, spec),
        *_scalar_blocks(spec, s),
        Block(f"{s} update alpha, r, f", heads=_support_update_heads(ridge) + _after_update_heads(),
              units=(
            linear_units(layout, "Kp", [("Kp", -1.0)], "clear Kp"),
            linear_units(layout, "kq_p", [("kq_p", -1.0)], "clear kq_p"),
            linear_units(layout, "p", [("p_prev", 1.0), ("p", -1.0)], "p_prev <- p, p <- 0"),
        )),
        Block(f"{s} rr_next = r.r", heads=(
            _reduce_over_supports("r", "r", [("rr_next", 1.0)], "r.r"),),
            units=(_guess_units("rr_next", "inv_rr_next", spec),)),
        _beta_block(s),
        Block(f"{s} p = r + beta p", heads=(
            Head((("p_prev", 1.0),), ((AGG, 1.0),), (("beta", 1.0),), (("p", 1.0),), "p += beta p_prev"),
        ), units=(linear_units(layout, "r", [("p", 1.0)], "p += r"),
                  linear_units(layout, "p_prev", [("p_prev", -1.0)], "clear p_prev"))),
    ]

  state = {"alpha": StateLocation("alpha", "support"), "r": StateLocation("r", "support"),
           "p": StateLocation("p", "support"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  return _finish("support_state", layout, embedding, init, step, num_steps, state, spec)


def aggregator_dual(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                    spec: recip.ReciprocalSpec) -> Program:
  """Dual CG with alpha, r, p in R^k held by the aggregator; works under any mask."""
  k, p = num_support, feature_dim
  vectors = [("alpha", k), ("r", k), ("p", k), ("p_prev", k), ("Kp", k), ("u", p)]
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1), ("position", k)] + vectors
                     + [("f", 1)] + _scalar_channels() + _flag_channels()),
      holders=_holders([("position", "supports (one-hot)"), ("f", "queries")]
                       + [(n, "aggregator") for n, _ in vectors] + [(s, "aggregator") for s in SCALARS]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("position", "position", 1.0)] + _flag_embedding()
  init = [Block("init: r = p = y; rr = y.y", heads=(
      Head(((AGG, 1.0),), (("y", 1.0),), (("position", 1.0),), (("r", 1.0), ("p", 1.0)),
           "r = p = sum_j y_j e_j"),
      _reduce_over_supports("y", "y", [("rr", 1.0)], "y.y"),
  ), units=(_guess_units("rr", "inv_rr_next", spec),))]

  def step():
    s = "cg"
    return [
        Block(f"{s} u = Phi^T p", heads=(
            Head((("p", 1.0),), (("position", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
                 "u = sum_j p_j phi_j"),) + _step_start_heads()),
        Block(f"{s} Kp = Phi u", heads=(
            Head((("u", 1.0),), (("phi_support", 1.0),), (("position", 1.0),), (("Kp", 1.0),),
                 "Kp = sum_j (u . phi_j) e_j"),)),
        Block(f"{s} pAp = p.Kp + ridge p.p", heads=(
            _product("p", "Kp", AGG, [("pAp", 1.0)], "p.Kp"),
            _product("p", "p", AGG, [("pAp", ridge)], "ridge p.p"),
        ), units=(_guess_units("pAp", "inv_pAp", spec),)),
        *_scalar_blocks(spec, s),
        Block(f"{s} update alpha, r, f", heads=(
            _product("gamma", AGG, "p", [("alpha", 1.0), ("r", -ridge)], "alpha += gamma p; r -= gamma ridge p"),
            _product("gamma", AGG, "Kp", [("r", -1.0)], "r -= gamma Kp"),
            Head((("phi_query", 1.0),), (("u", 1.0),), (("gamma", 1.0),), (("f", 1.0),),
                 "f += gamma phi(x).u"),
            _at_aggregator("Kp", [("Kp", -1.0)], "clear Kp"),
            _at_aggregator("u", [("u", -1.0)], "clear u"),
        ) + _after_update_heads() + _move_p_heads()),
        Block(f"{s} rr_next = r.r", heads=(_product("r", "r", AGG, [("rr_next", 1.0)], "r.r"),),
              units=(_guess_units("rr_next", "inv_rr_next", spec),)),
        _beta_block(s),
        _aggregator_direction_blocks(s),
    ]

  state = {"alpha": StateLocation("alpha", "aggregator"), "r": StateLocation("r", "aggregator"),
           "p": StateLocation("p", "aggregator"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  return _finish("aggregator_dual", layout, embedding, init, step, num_steps, state, spec)


def aggregator_primal(feature_dim: int, num_steps: int, ridge: float,
                      spec: recip.ReciprocalSpec) -> Program:
  """CG on (Phi^T Phi + ridge I) w = Phi^T y with w, r, p in R^p held by the aggregator."""
  p = feature_dim
  vectors = [("w", p), ("r", p), ("p", p), ("p_prev", p), ("Ap", p)]
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1)] + vectors + [("f", 1)]
                     + _scalar_channels() + _flag_channels()),
      holders=_holders([("f", "queries")] + [(n, "aggregator") for n, _ in vectors]
                       + [(s, "aggregator") for s in SCALARS]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0),
               ("y", "y", 1.0)] + _flag_embedding()
  init = [
      Block("init: r = p = Phi^T y", heads=(
          Head(((AGG, 1.0),), (("y", 1.0),), (("phi_support", 1.0),), (("r", 1.0), ("p", 1.0)),
               "r = p = sum_j y_j phi_j"),)),
      Block("init: rr = r.r", heads=(_product("r", "r", AGG, [("rr", 1.0)], "r.r"),),
            units=(_guess_units("rr", "inv_rr_next", spec),)),
  ]

  def step():
    s = "primal-cg"
    return [
        Block(f"{s} Ap = Phi^T Phi p + ridge p", heads=(
            Head((("p", 1.0),), (("phi_support", 1.0),), (("phi_support", 1.0),), (("Ap", 1.0),),
                 "sum_j phi_j (phi_j . p)"),
            _at_aggregator("p", [("Ap", ridge)], "ridge p"),
        ) + _step_start_heads()),
        Block(f"{s} pAp = p.Ap", heads=(_product("p", "Ap", AGG, [("pAp", 1.0)], "p.Ap"),),
              units=(_guess_units("pAp", "inv_pAp", spec),)),
        *_scalar_blocks(spec, s),
        Block(f"{s} update w, r, f", heads=(
            _product("gamma", AGG, "p", [("w", 1.0)], "w += gamma p"),
            _product("gamma", AGG, "Ap", [("r", -1.0)], "r -= gamma Ap"),
            Head((("phi_query", 1.0),), (("p", 1.0),), (("gamma", 1.0),), (("f", 1.0),),
                 "f += gamma phi(x).p"),
            _at_aggregator("Ap", [("Ap", -1.0)], "clear Ap"),
        ) + _after_update_heads() + _move_p_heads()),
        Block(f"{s} rr_next = r.r", heads=(_product("r", "r", AGG, [("rr_next", 1.0)], "r.r"),),
              units=(_guess_units("rr_next", "inv_rr_next", spec),)),
        _beta_block(s),
        _aggregator_direction_blocks(s),
    ]

  state = {"alpha": StateLocation("w", "aggregator"), "r": StateLocation("r", "aggregator"),
           "p": StateLocation("p", "aggregator"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  return _finish("aggregator_primal", layout, embedding, init, step, num_steps, state, spec)


# ---------------------------------------------------------------------------------------------
# Chebyshev semi-iteration: the same CG-form recurrence, alpha += gamma_s p; r -= gamma_s A p;
# p = r + beta_s p, but gamma_s and beta_s depend only on the spectral bounds (lo, hi). They are
# baked into each layer's weights, so a step needs no reduction and no division: one mat-vec and
# one layer of exact linear ReLU units (x = relu(x) - relu(-x)).


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


def _chebyshev_updates(layout, gamma, beta, ridge, matvec: str, query_matvec: str | None):
  """Linear units: alpha += g p; r -= g (Av); p <- r_new + b p (Av = matvec + ridge p)."""
  units = [
      linear_units(layout, "p", [("alpha", gamma), ("r", -gamma * ridge),
                                 ("p", beta - gamma * ridge - 1.0)], "from p"),
      linear_units(layout, matvec, [("r", -gamma), ("p", -gamma), (matvec, -1.0)], f"from {matvec}"),
      linear_units(layout, "r", [("p", 1.0)], "from r"),
  ]
  if query_matvec is not None:
    units.append(linear_units(layout, query_matvec, [("f", gamma), (query_matvec, -1.0)],
                              f"f += gamma {query_matvec}"))
  return tuple(units)


def chebyshev_support_state(feature_dim: int, num_steps: int, ridge: float, low: float,
                            high: float) -> Program:
  """Chebyshev with alpha_i, r_i, p_i in support token i (prefix mask): one layer per step."""
  p = feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1), ("alpha", 1), ("r", 1),
                      ("p", 1), ("Kp", 1), ("kq_p", 1), ("f", 1)] + _flag_channels()),
      holders=_holders([("alpha", "supports"), ("r", "supports"), ("p", "supports"),
                        ("Kp", "supports"), ("kq_p", "queries"), ("f", "queries")]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("y", "r", 1.0), ("y", "p", 1.0)] + _flag_embedding()
  gammas, betas = chebyshev_coefficients(low, high, num_steps)
  blocks = []
  for s, (g, b) in enumerate(zip(gammas, betas)):
    blocks.append(Block(f"chebyshev[{s}] mat-vec and update", heads=_support_matvec_heads(),
                        units=_chebyshev_updates(layout, g, b, ridge, "Kp", "kq_p")))
  return _per_step_program("chebyshev_support_state", layout, embedding, [], blocks, 1,
                           gammas, betas)


def chebyshev_aggregator_primal(feature_dim: int, num_steps: int, ridge: float, low: float,
                                high: float) -> Program:
  """Chebyshev on (Phi^T Phi + ridge I) w = Phi^T y in the aggregator (any mask): one layer/step."""
  p = feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1), ("alpha", p), ("r", p),
                      ("p", p), ("Ap", p), ("f", 1)] + _flag_channels()),
      holders=_holders([("f", "queries")] + [(n, "aggregator") for n in ("alpha", "r", "p", "Ap")]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0),
               ("y", "y", 1.0)] + _flag_embedding()
  init = [Block("init: r = p = Phi^T y", heads=(
      Head(((AGG, 1.0),), (("y", 1.0),), (("phi_support", 1.0),), (("r", 1.0), ("p", 1.0)),
           "r = p = sum_j y_j phi_j"),))]
  gammas, betas = chebyshev_coefficients(low, high, num_steps)
  blocks = []
  for s, (g, b) in enumerate(zip(gammas, betas)):
    blocks.append(Block(f"primal-chebyshev[{s}] mat-vec and update", heads=(
        Head((("p", 1.0),), (("phi_support", 1.0),), (("phi_support", 1.0),), (("Ap", 1.0),),
             "sum_j phi_j (phi_j . p)"),
        Head((("phi_query", 1.0),), (("p", 1.0),), ((AGG, 1.0),), (("f", g),), "f += gamma phi(x).p"),
    ), units=_chebyshev_updates(layout, g, b, ridge, "Ap", None)))
  return _per_step_program("chebyshev_aggregator_primal", layout, embedding, init, blocks, 1,
                           gammas, betas)


def chebyshev_aggregator_dual(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                              low: float, high: float) -> Program:
  """Chebyshev on (K + ridge I) alpha = y in the aggregator (any mask): two layers per step."""
  k, p = num_support, feature_dim
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1), ("position", k),
                      ("alpha", k), ("r", k), ("p", k), ("Kp", k), ("u", p), ("f", 1)]
                     + _flag_channels()),
      holders=_holders([("position", "supports (one-hot)"), ("f", "queries")]
                       + [(n, "aggregator") for n in ("alpha", "r", "p", "Kp", "u")]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("position", "position", 1.0)] + _flag_embedding()
  init = [Block("init: r = p = y", heads=(
      Head(((AGG, 1.0),), (("y", 1.0),), (("position", 1.0),), (("r", 1.0), ("p", 1.0)),
           "r = p = sum_j y_j e_j"),))]
  gammas, betas = chebyshev_coefficients(low, high, num_steps)
  blocks = []
  for s, (g, b) in enumerate(zip(gammas, betas)):
    blocks.append(Block(f"chebyshev[{s}] u = Phi^T p", heads=(
        Head((("p", 1.0),), (("position", 1.0),), (("phi_support", 1.0),), (("u", 1.0),),
             "u = sum_j p_j phi_j"),)))
    blocks.append(Block(f"chebyshev[{s}] Kp = Phi u and update", heads=(
        Head((("u", 1.0),), (("phi_support", 1.0),), (("position", 1.0),), (("Kp", 1.0),),
             "Kp = sum_j (u . phi_j) e_j"),
        Head((("phi_query", 1.0),), (("u", 1.0),), ((AGG, 1.0),), (("f", g),), "f += gamma phi(x).u"),
        _at_aggregator("u", [("u", -1.0)], "clear u"),
    ), units=_chebyshev_updates(layout, g, b, ridge, "Kp", None)))
  return _per_step_program("chebyshev_aggregator_dual", layout, embedding, init, blocks, 2,
                           gammas, betas)


def _per_step_program(name, layout, embedding, init, step_blocks, per_step, gammas, betas):
  blocks = list(init) + list(step_blocks)
  step_ends = tuple(len(init) + per_step * t for t in range(len(gammas) + 1))
  state = {"alpha": StateLocation("alpha", "support" if name.endswith("support_state") else "aggregator"),
           "r": StateLocation("r", "support" if name.endswith("support_state") else "aggregator"),
           "p": StateLocation("p", "support" if name.endswith("support_state") else "aggregator"),
           "gamma": tuple(float(g) for g in gammas), "beta": tuple(float(b) for b in betas)}
  return Program(name, layout, tuple(embedding), tuple(blocks), tuple(range(len(blocks))), "f",
                 step_ends, state, None)


def with_projection(program: Program, projection_RxP: np.ndarray) -> Program:
  """The embedding writes psi(x) = S phi(x) (S = projection [m, p]) into the m-wide feature channels.

  `program` must be built for feature dimension m: it then runs on the sketched kernel
  K_m = Phi S^T S Phi^T, and the residual stream never carries phi itself (width m < p).
  """
  projection_RxP = np.asarray(projection_RxP, np.float64)
  routes = {("x_support", "phi_support"), ("x_query", "phi_query")}
  embedding = tuple((feature, channel, projection_RxP.T if (feature, channel) in routes else coef)
                    for feature, channel, coef in program.embedding)
  return program._replace(name=program.name + f"+rank{projection_RxP.shape[0]}", embedding=embedding)


def norm_pin_count(width: int) -> tuple[int, int]:
  """(pins n, padded width D) with D = n 4^j >= width + n, n even, D as small as possible.

  Then a token's mean square is n M^2 / D = M^2 4^-j: a power of two when M is one, so the norm's
  square root and both scalings are exact in floating point.
  """
  best = None
  for j in range(1, 12):
    n = max(2, -(-width // (4 ** j - 1)))
    n += n % 2
    candidate = (n * 4 ** j, n)
    if best is None or candidate < best:
      best = candidate
  return best[1], best[0]


def with_norm_pins(program: Program, pin: float, centered: bool) -> Program:
  """Channels that make a pre-norm model's normaliser a known constant (norm="rmsnorm"/"layernorm").

  Every token carries +M and -M alternately in the n channels of `norm_pin` (written by the
  embedding, never by a block), and the stream is padded to D = n 4^j channels (`norm_pad`,
  always 0). With M a power of two far above every other channel (|rest| < 2^-27 M), the mean
  square n M^2 / D = M^2 4^-j absorbs the rest exactly, so the normaliser is the same power of
  two at every token and the compiler's norm gains (that same power) make N(h) = h bit for bit.
  LayerNorm also subtracts the token mean, which is not constant; `centered` adds `norm_zero`, a
  channel that is always 0, and the compiler makes every read of the stream sum to zero over
  channels (through that channel's row), so w . (h - mean 1) = w . h in exact arithmetic. In
  floating point the mean leaves an absolute error ~ eps |w| |mean| per read: LayerNorm mixes a
  token's channels, so a read is accurate relative to the token's largest channel, not its own.
  """
  width = program.layout.width + (1 if centered else 0)
  num_pins, padded = norm_pin_count(width)
  extra = [("norm_pin", num_pins)] + ([("norm_zero", 1)] if centered else [])
  pad = padded - width - num_pins
  extra += [("norm_pad", pad)] if pad else []
  holders = [("norm_pin", "every token (+M, -M, ...)"), ("norm_zero", "no token (always 0)"),
             ("norm_pad", "no token (always 0)")]
  pins = np.where(np.arange(num_pins) % 2 == 0, pin, -pin)[None, :]
  embedding = program.embedding + tuple((flag, "norm_pin", pins) for flag in FLAGS)
  layout = ResidualLayout(program.layout.channels + tuple(extra),
                          program.layout.holders + tuple(h for h in holders if h[0] in dict(extra)))
  return program._replace(name=program.name + "+prenorm", layout=layout, embedding=embedding,
                          norm_pin=float(pin))


def with_random_relu_features(program: Program, weights_MxD: np.ndarray, bias_M: np.ndarray,
                              projection_RxM: np.ndarray | None = None) -> Program:
  """Prepends one ReLU layer computing phi(x) = relu(W x + b) / sqrt(m) (kcg.features.random_relu).

  The embedding writes raw inputs to `x_support` / `x_query`; the layer's units read them with the
  token's role flag standing in for the bias, so each token writes only its own phi channel. With
  `projection_RxM` = S the layer writes S phi(x) instead (S folded into its output weights).
  """
  weights_MxD = np.asarray(weights_MxD, np.float64)
  bias_M = np.asarray(bias_M, np.float64)
  m, d = weights_MxD.shape
  layout = ResidualLayout(channels=(("x_support", d), ("x_query", d)) + program.layout.channels,
                          holders=(("x_support", "supports"), ("x_query", "queries"))
                          + program.layout.holders)
  routes = {"phi_support": "x_support", "phi_query": "x_query"}
  embedding = tuple((feature, routes.get(channel, channel) if feature in routes.values() else channel,
                     coef) for feature, channel, coef in program.embedding)
  scale = np.eye(m) / np.sqrt(m)
  if projection_RxM is not None:
    scale = scale @ np.asarray(projection_RxM, np.float64).T
  features = Block("features: phi(x) = relu(W x + b) / sqrt(m)", units=(
      ReluUnits((("x_support", weights_MxD.T), ("is_support", bias_M[None, :])),
                (("phi_support", scale),), "phi(x_support)"),
      ReluUnits((("x_query", weights_MxD.T), ("is_query", bias_M[None, :])),
                (("phi_query", scale),), "phi(x_query)"),
  ))
  return program._replace(
      name=program.name + "+random_relu", layout=layout, embedding=embedding,
      blocks=(features,) + program.blocks,
      schedule=(0,) + tuple(i + 1 for i in program.schedule),
      step_ends=tuple(e + 1 for e in program.step_ends))



# ---------------------------------------------------------------------------------------------
# Preconditioned CG with the Jacobi preconditioner M = diag(K) + ridge I (stub S2), per-support
# state. M^{-1} is a token-wise channel scaling: support i multiplies its residual by
# 1/d_i, d_i = phi_i . phi_i + ridge. Gated MLP units (activation="reglu") form the products
# exactly; 1/d_i is computed once, by the same ReLU guess and Newton steps as the aggregator's
# scalars but in every support token (two MLP layers per Newton step: s x, then x (2 - s x)).


def _token_reciprocal_blocks(source: str, target: str, scratch: str, flag: str,
                             spec: recip.ReciprocalSpec, prefix: str):
  """Blocks computing target = 1/source in every token whose `flag` is 1 (MLPs only)."""
  on_s, on_flag, post = recip.guess_units_matrices(spec)
  blocks = [Block(f"{prefix} guess 1/{source}", units=(
      ReluUnits(((source, on_s[None, :]), (flag, on_flag[None, :])), ((target, post[:, None]),),
                f"guess 1/{source}"),))]
  for i in range(spec.newton_steps):
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (s x)", units=(
        product_units_from(source, target, [(scratch, 1.0)]),)))
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (x <- x (2 - s x))", units=(
        product_units_from(target, scratch, [(target, -1.0)]),
        _linear_from(target, [(target, 1.0)]),
        _linear_from(scratch, [(scratch, -1.0)]),
    )))
  return blocks


def product_units_from(a: str, b: str, targets) -> ReluUnits:
  """Scalar channels only: c * a * b into targets (see craft.product_units)."""
  pre = ((a, np.array([[1.0, -1.0]])),)
  value = ((b, np.array([[1.0, -1.0]])),)
  return ReluUnits(pre, tuple((t, c * np.ones((2, 1))) for t, c in targets), f"{a}*{b}", value)


def _linear_from(source: str, targets) -> ReluUnits:
  """Scalar channel only: c * source into targets."""
  pre = ((source, np.array([[1.0, -1.0]])),)
  return ReluUnits(pre, tuple((t, c * np.array([[1.0], [-1.0]])) for t, c in targets),
                   f"{source}->{[t for t, _ in targets]}")


def jacobi_support_state(feature_dim: int, num_steps: int, ridge: float,
                         spec: recip.ReciprocalSpec) -> Program:
  """PCG, M = diag(K + ridge I), alpha_i, r_i, z_i, p_i in support token i (prefix mask).

  gamma = (r.z)/(p.Ap); alpha += gamma p; r -= gamma Ap; z = r / d; beta = (r'.z')/(r.z);
  p = z + beta p. Rate ((sqrt(kappa') - 1)/(sqrt(kappa') + 1))^t with kappa' = cond(M^-1 A).
  """
  p = feature_dim
  rho = "rz"
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1), ("alpha", 1), ("r", 1),
                      ("z", 1), ("p", 1), ("Kp", 1), ("p_prev", 1), ("kq_p", 1), ("f", 1),
                      ("diag", 1), ("inv_diag", 1), ("newton_scratch", 1)]
                     + _scalar_channels(rho) + _flag_channels()),
      holders=_holders([("alpha", "supports"), ("r", "supports"), ("z", "supports"),
                        ("p", "supports"), ("Kp", "supports"), ("p_prev", "supports"),
                        ("kq_p", "queries"), ("f", "queries"), ("diag", "supports"),
                        ("inv_diag", "supports"), ("newton_scratch", "supports")]
                       + [(s, "aggregator") for s in _scalar_names(rho)]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("y", "r", 1.0)] + _flag_embedding()
  ridge_units = ReluUnits((("is_support", np.ones((1, 1))),), (("diag", ridge * np.ones((1, 1))),),
                          "diag += ridge")
  init = [Block("init: diag = phi.phi + ridge", units=(
      ReluUnits(((("phi_support", np.concatenate([np.eye(p), -np.eye(p)], axis=1))),),
                (("diag", np.ones((2 * p, 1))),), "phi.phi",
                (("phi_support", np.concatenate([np.eye(p), -np.eye(p)], axis=1)),)),
      ridge_units))]
  init += _token_reciprocal_blocks("diag", "inv_diag", "newton_scratch", "is_support", spec,
                                   "init:")
  init += [
      Block("init: z = p = r / diag", units=(
          product_units_from("inv_diag", "r", [("z", 1.0), ("p", 1.0)]),)),
      Block("init: rz = r.z", heads=(_reduce_over_supports("r", "z", [(rho, 1.0)], "r.z"),),
            units=(_guess_units(rho, f"inv_{rho}_next", spec),)),
  ]

  def step():
    s = "pcg"
    return [
        Block(f"{s} mat-vec Kp", heads=_support_matvec_heads() + _step_start_heads(rho),
              units=(_linear_from("z", [("z", -1.0)]),)),
        _support_pap_block(s, ridge, spec),
        *_scalar_blocks(spec, s, rho),
        Block(f"{s} update alpha, r, f; z = r / diag",
              heads=_support_update_heads(ridge) + _after_update_heads(rho), units=(
            _linear_from("Kp", [("Kp", -1.0)]),
            _linear_from("kq_p", [("kq_p", -1.0)]),
            _linear_from("p", [("p_prev", 1.0), ("p", -1.0)]),
            product_units_from("inv_diag", "r", [("z", 1.0)]),
        )),
        Block(f"{s} rz_next = r.z", heads=(
            _reduce_over_supports("r", "z", [(f"{rho}_next", 1.0)], "r.z"),),
            units=(_guess_units(f"{rho}_next", f"inv_{rho}_next", spec),)),
        _beta_block(s, rho),
        Block(f"{s} p = z + beta p", heads=(
            Head((("p_prev", 1.0),), ((AGG, 1.0),), (("beta", 1.0),), (("p", 1.0),), "p += beta p_prev"),
        ), units=(_linear_from("z", [("p", 1.0)]), _linear_from("p_prev", [("p_prev", -1.0)]))),
    ]

  state = {"alpha": StateLocation("alpha", "support"), "r": StateLocation("r", "support"),
           "p": StateLocation("p", "support"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator"), "z": StateLocation("z", "support")}
  return _finish("jacobi_support_state", layout, embedding, init, step, num_steps, state, spec)
