"""Block builders shared by the constructions: token roles, reductions, division, step sizes.

Every construction routes its token features into the same channels (`feature_embedding`), marks
each token's role with a flag channel that is 1 there and 0 elsewhere (`FLAGS`), and computes its
scalars at the aggregator token. What is built here:

* heads at the aggregator (`at_aggregator`, `product_head`, `reduce_over_supports`): a head whose
  key is non-zero only at the aggregator reads that token alone, so `q . k` times `v` multiplies
  three quantities it holds; a head whose query is the aggregator flag sums over the supports;
* the support mat-vec `(Kp)_i = sum_j (phi_i . phi_j) p_j` and its query read-out;
* division (kcg._src.reciprocal): the ReLU initial guess of 1/s (`guess_units`), refined by Newton
  steps x <- 2x - (s x) x, either as attention heads at the aggregator (`newton_heads`, one layer
  per step) or as gated MLP units in every token of a role (`token_newton_blocks`, two layers per step:
  s x, then x (2 - s x));
* the aggregator's scalar machinery of a CG step (`scalar_blocks`, `beta_block`, ...).

Overwriting a channel as x + (new - x) in one layer loses `new` entirely when |new| is below the
rounding of |x| (r.r can fall by 1e-17 in one step). So every channel is cleared exactly
(x + (-x) = 0) in an earlier layer and written into zero later; the write then rounds exactly as
the textbook recurrence does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kcg._src import reciprocal as recip
from kcg._src.craft import Block, Head, ReluUnits, ResidualLayout, linear_units, product_units
from kcg._src.ops import Op

AGGREGATOR = "is_aggregator"
FLAGS = ("is_support", AGGREGATOR, "is_query")
# The aggregator's scalars of a CG step (rr: the reduced quantity, r.r for CG, r.z for PCG).
SCALARS = ("rr", "rr_next", "pAp", "inv_rr", "inv_rr_next", "inv_pAp", "gamma", "beta")


def scalar_names(rho: str = "rr") -> tuple[str, ...]:
  """The aggregator's scalars when the reduced quantity is `rho` (r.r for CG, r.z for PCG)."""
  return tuple(name.replace("rr", rho) for name in SCALARS)


def scalar_channels(rho: str = "rr") -> list[tuple[str, int]]:
  return [(name, 1) for name in scalar_names(rho)]


def flag_channels() -> list[tuple[str, int]]:
  return [(name, 1) for name in FLAGS]


def flag_embedding() -> list[tuple[str, str, float]]:
  return [(flag, flag, 1.0) for flag in FLAGS]


def feature_embedding() -> list[tuple[str, str, float]]:
  """x_support, x_query and y into phi_support, phi_query and y; the role flags into theirs."""
  return [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0),
          ("y", "y", 1.0)] + flag_embedding()


def holders(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
  """Which tokens hold which channel (documentation, `ResidualLayout.table`): the feature channels
  every construction has, then `pairs`."""
  return (("phi_support", "supports"), ("phi_query", "queries"), ("y", "supports")) + tuple(pairs)


# ---------------------------------------------------------------------------------------------
# Heads.


def at_aggregator(value: str, output, name: str, op: Op = Op.MOVE) -> Head:
  """The aggregator adds a linear function of its own channel `value` to `output`."""
  return Head(((AGGREGATOR, 1.0),), ((AGGREGATOR, 1.0),), ((value, 1.0),), tuple(output), name, op)


def product_head(query: str, key: str, value: str, output, name: str, op: Op) -> Head:
  """Every token adds (h[query] . h[key]) h[value] summed over the tokens it reads; with `key` or
  `value` non-zero only at the aggregator, a product of quantities held there."""
  return Head(((query, 1.0),), ((key, 1.0),), ((value, 1.0),), tuple(output), name, op)


def reduce_over_supports(key: str, value: str, output, name: str, op: Op) -> Head:
  """The aggregator reads sum_j key_j value_j over the support tokens."""
  return Head(((AGGREGATOR, 1.0),), ((key, 1.0),), ((value, 1.0),), tuple(output), name, op)


def support_matvec_heads() -> tuple[Head, ...]:
  """(Kp)_i = sum_j (phi_i . phi_j) p_j at supports; k(x_q) . p at queries."""
  return (
      Head((("phi_support", 1.0),), (("phi_support", 1.0),), (("p", 1.0),), (("Kp", 1.0),),
           "(Kp)_i = sum_j (phi_i . phi_j) p_j", Op.MATVEC),
      Head((("phi_query", 1.0),), (("phi_support", 1.0),), (("p", 1.0),), (("kq_p", 1.0),),
           "k(x_q) . p", Op.QUERY_MATVEC),
  )


# ---------------------------------------------------------------------------------------------
# Division: the ReLU guess and Newton steps (kcg._src.reciprocal).


def guess_units(source: str, target: str, spec: recip.ReciprocalSpec, *,
                on: Sequence[str] = (AGGREGATOR,), off: Sequence[str] = (),
                off_offset: float | None = None, read: np.ndarray | None = None,
                write: np.ndarray | None = None,
                scale: float = 1.0, name: str = "") -> ReluUnits:
  """The initial guess of 1/source into target, at the tokens whose flag in `on` is 1.

  Unit i computes relu(flag - s / t_i) (weights at most 1/low, `recip.guess_units_matrices`): the
  flag stands in for a bias, so a token with every `on` flag 0 computes relu(-s / t_i), which is 0
  for the s >= 0 it holds there (exactly 0 at tokens that do not hold `source`). `off` flags add
  `off_offset` (< 0) to every unit's pre-activation instead, for tokens whose `source` is only ~0
  (softmax heads leave ~e^-80 of other tokens' values there).
  `read` [size(source), 1] picks the entry of a wider source channel, `write` [1, size(target)]
  the entry written (default: size-1 channels); `scale` multiplies the guess.
  """
  if off and (off_offset is None or not off_offset < 0):
    raise ValueError(f"guess_units with off={tuple(off)} needs a negative off_offset, got "
                     f"{off_offset!r}.")
  on_s, on_flag, post = recip.guess_units_matrices(spec)
  read = np.ones((1, 1)) if read is None else np.asarray(read, np.float64)
  write = np.ones((1, 1)) if write is None else np.asarray(write, np.float64)
  pre = ((source, read * on_s[None, :]),) + tuple((flag, on_flag[None, :]) for flag in on)
  pre += tuple((flag, np.full((1, len(on_s)), off_offset)) for flag in off)
  return ReluUnits(pre, ((target, scale * post[:, None] * write),), name or f"guess 1/{source}",
                   Op.GUESS)


def newton_heads(x: str, s: str) -> tuple[Head, ...]:
  """x <- 2x - (s x) x at the aggregator: one head adds x, one subtracts (x . s) x (query x, key s,
  value x, both non-zero at the aggregator only); never s (x x), which would overflow float32."""
  return (at_aggregator(x, [(x, 1.0)], f"newton {x}: +x", Op.NEWTON),
          product_head(x, s, x, [(x, -1.0)], f"newton {x}: -({s} x) x", Op.NEWTON))


def token_newton_blocks(layout: ResidualLayout, pairs: Sequence[tuple[str, str, str]],
                        spec: recip.ReciprocalSpec, prefix: str,
                        extra_second: Sequence[ReluUnits] = ()) -> list[Block]:
  """Newton steps x <- x (2 - s x) in every token, as gated MLP units: two layers per step.

  `pairs`: (s, x, scratch) channel triples; the first layer writes s x into scratch, the second
  x <- x - x (s x) and clears scratch. `extra_second`: more units for the second layer of the
  first step.
  """
  blocks = []
  for i in range(spec.newton_steps):
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (s x)", Op.NEWTON, units=tuple(
        product_units(layout, s, x, [(scratch, 1.0)], op=Op.NEWTON) for s, x, scratch in pairs)))
    units = []
    for s, x, scratch in pairs:
      units += [product_units(layout, x, scratch, [(x, -1.0)], op=Op.NEWTON),
                linear_units(layout, x, [(x, 1.0)], op=Op.NEWTON),
                linear_units(layout, scratch, [(scratch, -1.0)])]
    if i == 0:
      units += list(extra_second)
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (x (2 - s x))", Op.NEWTON,
                        units=tuple(units)))
  return blocks


def token_reciprocal_blocks(layout: ResidualLayout, source: str, target: str, scratch: str,
                            flag: str, spec: recip.ReciprocalSpec, prefix: str) -> list[Block]:
  """target = 1/source in every token whose `flag` is 1: the guess, then the Newton steps."""
  guess = Block(f"{prefix} guess 1/{source}", Op.GUESS,
                units=(guess_units(source, target, spec, on=(flag,)),))
  return [guess] + token_newton_blocks(layout, [(source, target, scratch)], spec, prefix)


# ---------------------------------------------------------------------------------------------
# The aggregator's scalars in a CG step: gamma = rho / pAp, beta = rho_next / rho.


def newton_blocks(spec: recip.ReciprocalSpec, prefix: str, rho: str = "rr") -> list[Block]:
  """Newton refinement of 1/pAp and 1/rho at the aggregator, both in the same layers."""
  return [Block(f"{prefix} newton {i + 1}/{spec.newton_steps}", Op.NEWTON,
                heads=newton_heads("inv_pAp", "pAp") + newton_heads(f"inv_{rho}", rho))
          for i in range(spec.newton_steps)]


def ratio_head(query: str, numerator: str, inverse: str, output, name: str, op: Op) -> Head:
  """Every token adds h[query] * numerator / denominator to `output`, the ratio read at the
  aggregator as numerator * inverse (inverse ~ 1/denominator): a step size applied without first
  storing it, which saves the layer that would form it.

  The query meets `inverse` first (q . k), then the numerator (v): h[query] * inverse is of the
  order of 1/|state|, where h[query] * numerator would be |state|^3 (float32 underflows there
  past convergence, at |state| ~ 1e-13)."""
  return Head(((query, 1.0),), ((inverse, 1.0),), ((numerator, 1.0),), tuple(output), name, op)


def scalar_blocks(spec: recip.ReciprocalSpec, prefix: str, rho: str = "rr") -> list[Block]:
  """Newton refinement of 1/pAp and 1/rho, then gamma = rho / pAp (clearing what is consumed)."""
  blocks = newton_blocks(spec, prefix, rho)
  blocks.append(Block(f"{prefix} gamma = {rho} / pAp", Op.STEP_SIZE, heads=(
      product_head(rho, AGGREGATOR, "inv_pAp", [("gamma", 1.0)], f"gamma = {rho} * inv_pAp",
                   Op.STEP_SIZE),
      at_aggregator("pAp", [("pAp", -1.0)], "clear pAp"),
      at_aggregator("inv_pAp", [("inv_pAp", -1.0)], "clear inv_pAp"),
  )))
  return blocks


def step_start_heads(rho: str = "rr") -> tuple[Head, ...]:
  """First layer of a step: clear last step's gamma and beta, move the guess of 1/rho in place."""
  return (
      at_aggregator("gamma", [("gamma", -1.0)], "clear gamma"),
      at_aggregator("beta", [("beta", -1.0)], "clear beta"),
      at_aggregator(f"inv_{rho}_next", [(f"inv_{rho}", 1.0), (f"inv_{rho}_next", -1.0)],
                    f"inv_{rho} <- guess"),
  )


def after_update_heads(rho: str = "rr") -> tuple[Head, ...]:
  """rho is consumed once gamma is formed."""
  return (at_aggregator(rho, [(rho, -1.0)], f"clear {rho}"),)


def beta_block(prefix: str, rho: str = "rr") -> Block:
  """beta = rho_next / rho; rho <- rho_next; inv_rho cleared (its successor waits in _next)."""
  return Block(f"{prefix} beta = {rho}_next / {rho}", Op.BETA, heads=(
      product_head(f"{rho}_next", AGGREGATOR, f"inv_{rho}", [("beta", 1.0)],
                   f"beta = {rho}_next * inv_{rho}", Op.BETA),
      at_aggregator(f"{rho}_next", [(rho, 1.0), (f"{rho}_next", -1.0)], f"{rho} <- {rho}_next"),
      at_aggregator(f"inv_{rho}", [(f"inv_{rho}", -1.0)], f"clear inv_{rho}"),
  ))


# ---------------------------------------------------------------------------------------------
# The same scalars applied where they are used (the constructions' fused step): gamma = rho / pAp
# is stored by the update layer that applies it, beta = rho_next / rho by the direction layer.


def gamma_heads(rho: str = "rr") -> tuple[Head, ...]:
  """In the update layer: store gamma = rho * inv_pAp (for probes and the state read-out); clear
  pAp and inv_pAp, consumed by the same layer's `ratio_head`s."""
  return (
      Head(((AGGREGATOR, 1.0),), (("inv_pAp", 1.0),), ((rho, 1.0),), (("gamma", 1.0),),
           f"gamma = {rho} * inv_pAp", Op.STEP_SIZE),
      at_aggregator("pAp", [("pAp", -1.0)], "clear pAp"),
      at_aggregator("inv_pAp", [("inv_pAp", -1.0)], "clear inv_pAp"),
  )


def beta_heads(rho: str = "rr") -> tuple[Head, ...]:
  """In the direction layer: store beta = rho_next * inv_rho; rho <- rho_next; clear inv_rho
  (its successor waits in inv_rho_next)."""
  return (
      Head(((AGGREGATOR, 1.0),), ((f"inv_{rho}", 1.0),), ((f"{rho}_next", 1.0),),
           (("beta", 1.0),), f"beta = {rho}_next * inv_{rho}", Op.BETA),
      at_aggregator(f"{rho}_next", [(rho, 1.0), (f"{rho}_next", -1.0)], f"{rho} <- {rho}_next"),
      at_aggregator(f"inv_{rho}", [(f"inv_{rho}", -1.0)], f"clear inv_{rho}"),
  )
