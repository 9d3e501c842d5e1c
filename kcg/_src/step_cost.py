"""What one compiled CG step costs: layers, width, heads, MLP units, FLOPs per token; and the
reciprocal's trade of MLP units (a finer initial guess) against Newton steps (depth).

A step of the plain CG constructions (kcg._src.programs) is the mat-vec (two layers for the causal
dual), pAp with the guess of 1/pAp, the Newton steps, the update, r.r with the guess of 1/r.r,
and p = r + beta p_prev; with `carry_matvec` the next mat-vec is formed with p: 4 + newton_steps
layers for every construction. The Newton steps are the only part that depends on the reciprocal;
each squares the guess's relative error, so a finer guess (breakpoint ratio closer to 1: more
units over the same 60 decades) buys fewer steps.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from kcg._src import compiler
from kcg._src import reciprocal as recip

# Layers of a plain CG step with carry_matvec outside the Newton steps (see the module docstring).
LAYERS_BESIDE_NEWTON = 4


def flops_per_token_per_step(dims: compiler.Dimensions, num_tokens: int, *,
                             gated: bool = False) -> int:
  """Multiply-adds x 2 that the dense model spends per token in one CG step.

  Per layer: the q, k, v and output projections, 2 D H (2 d_k + d_v) + 2 H d_v D; attention
  against all `num_tokens` tokens, 2 T H (d_k + d_v) (a masked token still costs its product);
  the MLP, 2 D m (2, or 3 with a gated value map). Times `dims.layers_per_step`.
  """
  d, h, dk, dv, m = dims.width, dims.num_heads, dims.head_dim, dims.value_dim, dims.mlp_hidden
  per_layer = (2 * d * h * (2 * dk + dv) + 2 * h * dv * d + 2 * num_tokens * h * (dk + dv)
               + 2 * d * m * (3 if gated else 2))
  return dims.layers_per_step * per_layer


class ConstructionCost(NamedTuple):
  """One row of the per-construction table (`construction_costs`)."""

  form: str
  mask: str
  carry_matvec: bool
  newton_steps: int
  layers_per_step: int
  width: int
  num_heads: int
  mlp_units: int
  flops_per_token_per_step: int


def construction_costs(num_support: int, feature_dim: int, num_queries: int = 1,
                       newton_steps: int = 4, carry_matvec: bool = False
                       ) -> list[ConstructionCost]:
  """The three plain CG constructions at (k, p), T = k + 1 + num_queries tokens."""
  rows = []
  for form, mask in (("dual", "prefix"), ("dual", "causal"), ("primal", "causal")):
    dims = compiler.dimensions(num_support, feature_dim, 1, mask=mask, form=form,
                               newton_steps=newton_steps, carry_matvec=carry_matvec)
    rows.append(ConstructionCost(
        form, mask, carry_matvec, newton_steps, dims.layers_per_step, dims.width, dims.num_heads,
        dims.mlp_hidden, flops_per_token_per_step(dims, num_support + 1 + num_queries)))
  return rows


class TradeOff(NamedTuple):
  """One row of the units-against-depth table (`reciprocal_trade_off`).

  Attributes:
    ratio: breakpoint ratio of the guess; units: MLP units it needs over 60 decades.
    guess_error: bound on |1 - s x_0|; newton_steps: steps to reach the dtype's rounding.
    layers_per_step: 4 + newton_steps, with carry_matvec (one more without; two for the causal
      dual).
    max_error: measured max |1 - s x| over log-uniform s in [L, H], in the dtype's arithmetic.
  """

  dtype: str
  ratio: float
  units: int
  guess_error: float
  newton_steps: int
  layers_per_step: int
  max_error: float


def newton_steps_needed(guess_error: float, dtype) -> int:
  """Fewest Newton steps n with guess_error^(2^n) below the dtype's unit roundoff."""
  target = np.finfo(dtype).eps / 2
  n = 0
  while guess_error ** (2 ** n) > target:
    n += 1
  return n


def reciprocal_trade_off(ratios: Sequence[float], dtypes=(np.float64, np.float32), *,
                         num_samples: int = 20000, seed: int = 0) -> list[TradeOff]:
  """For each dtype and breakpoint ratio: units, Newton steps needed, layers per step, and the
  measured error of guess + Newton in that dtype over the dtype's default range [L, H]."""
  rows = []
  rng = np.random.default_rng(seed)
  for dtype in dtypes:
    base = recip.default_spec(dtype)
    log_s = rng.uniform(np.log(base.low), np.log(base.high), num_samples)
    for ratio in ratios:
      spec = base._replace(ratio=float(ratio))
      steps = newton_steps_needed(spec.guess_error, dtype)
      error = 0.0
      for chunk in np.array_split(np.exp(log_s).astype(dtype), max(1, num_samples // 500)):
        x = recip.newton(recip.evaluate_guess(spec, chunk), chunk, steps)  # [500, units] at most
        error = max(error, float(np.max(np.abs(1.0 - chunk.astype(np.float64)
                                                * x.astype(np.float64)))))
      rows.append(TradeOff(np.dtype(dtype).name, float(ratio), spec.num_units, spec.guess_error,
                           steps, LAYERS_BESIDE_NEWTON + steps, error))
  return rows


def construction_table(num_support: int, feature_dim: int, num_queries: int = 1,
                       newton_steps: Sequence[int] = (4, 3, 2)) -> str:
  """`construction_costs` for each mat-vec placement and number of Newton steps, as the markdown
  table BUILD.md shows."""
  lines = ["| construction | carry_matvec | Newton steps | layers per step | width | heads | "
           "MLP units | FLOPs per token per step |", "|---|---|---|---|---|---|---|---|"]
  for carry_matvec in (False, True):
    for n in newton_steps:
      for row in construction_costs(num_support, feature_dim, num_queries, n, carry_matvec):
        lines.append(f"| {row.form}, {row.mask} | {row.carry_matvec} | {row.newton_steps} | "
                     f"{row.layers_per_step} | {row.width} | {row.num_heads} | {row.mlp_units} | "
                     f"{row.flops_per_token_per_step:,} |")
  return "\n".join(lines)


def trade_off_table(ratios: Sequence[float]) -> str:
  """`reciprocal_trade_off` as the markdown table BUILD.md shows."""
  lines = ["| dtype | ratio | MLP units | guess error | Newton steps | layers per step (carried) | "
           "measured max abs(1 - s x) |", "|---|---|---|---|---|---|---|"]
  for row in reciprocal_trade_off(ratios):
    lines.append(f"| {row.dtype} | {row.ratio:g} | {row.units} | {row.guess_error:.1e} | "
                 f"{row.newton_steps} | {row.layers_per_step} | {row.max_error:.1e} |")
  return "\n".join(lines)
