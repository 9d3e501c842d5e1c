"""r independent CGs in one transformer, for targets y in R^{k x r}.

`with_outputs(program, r)` turns any single-output construction into one that solves
(K + ridge I) A = Y column by column. Which channels carry one copy per output is found by data
flow from the target channel `y`: a channel is per-output iff some head or unit that writes it
reads a per-output channel (or it is written from the token feature y). A per-output channel of
size s becomes size s r, output c in entries [c s, (c + 1) s).

Each head is then rewritten by what it reads:

* only its value is per-output (the kernel mat-vec: query and key on phi): ONE head, shared by
  the r outputs, whose value and output maps are block-diagonal (I_r kron M). This is the sharing
  the proposal asks about: the attention pattern K is computed once.
* its query or key is per-output (reductions r.r, p.Ap, products with gamma and beta, Newton
  steps): r copies, copy c reading and writing block c. Scalars are per output, so every
  aggregator-side head is replicated: heads per layer grow r-fold, layers do not.
* nothing per-output: unchanged.

MLP unit groups that read a per-output channel are replicated in the same way.
"""

from __future__ import annotations

import numpy as np

from kcg._src.craft import (Block, Head, Program, ReluUnits, ResidualLayout, as_matrix,
                            terms_dim)
from kcg._src.ops import Transform


def per_output_channels(program: Program) -> frozenset[str]:
  """Channels that depend on the targets y (see module docstring)."""
  tainted = {channel for feature, channel, _ in program.embedding if feature == "y"}
  changed = True
  while changed:
    changed = False
    for block in program.blocks:
      for head in block.heads:
        reads = {c for terms in (head.query, head.key, head.value) for c, _ in terms}
        if reads & tainted:
          for channel, _ in head.output:
            if channel not in tainted:
              tainted.add(channel)
              changed = True
      for group in block.units:
        reads = {c for c, _ in group.pre} | {c for c, _ in (group.value or ())}
        if reads & tainted:
          for channel, _ in group.post:
            if channel not in tainted:
              tainted.add(channel)
              changed = True
  return frozenset(tainted)


def _select_rows(coef, size: int, cols: int, copy: int, r: int) -> np.ndarray:
  """[size r, cols]: `coef` ([size, cols]) in row block `copy`."""
  out = np.zeros((size * r, cols))
  out[copy * size:(copy + 1) * size] = as_matrix(coef, size, cols)
  return out


def _select_cols(coef, rows: int, size: int, copy: int, r: int) -> np.ndarray:
  """[rows, size r]: `coef` ([rows, size]) in column block `copy`."""
  out = np.zeros((rows, size * r))
  out[:, copy * size:(copy + 1) * size] = as_matrix(coef, rows, size)
  return out


def _copy_terms(layout, terms, dims: int, tainted, copy: int, r: int):
  return tuple((c, _select_rows(coef, layout.size(c), dims, copy, r)) if c in tainted else (c, coef)
               for c, coef in terms)


def _copy_output(layout, terms, dims: int, tainted, copy: int, r: int):
  return tuple((c, _select_cols(coef, dims, layout.size(c), copy, r)) if c in tainted else (c, coef)
               for c, coef in terms)


def _head(layout: ResidualLayout, head: Head, tainted, r: int) -> tuple[Head, ...]:
  dk, dv = terms_dim(layout, head.query), terms_dim(layout, head.value)
  query_key = {c for terms in (head.query, head.key) for c, _ in terms}
  value = {c for c, _ in head.value}
  written = {c for c, _ in head.output}
  if not (query_key | value | written) & tainted:
    return (head,)
  if not query_key & tainted and value & tainted:
    if not value <= tainted or not written <= tainted:
      raise ValueError(f"Head {head.name!r} mixes per-output and shared channels in its value or "
                       "output; it cannot be shared across outputs.")
    eye = np.eye(r)
    shared_value = tuple((c, np.kron(eye, as_matrix(coef, layout.size(c), dv)))
                         for c, coef in head.value)
    shared_output = tuple((c, np.kron(eye, as_matrix(coef, dv, layout.size(c))))
                          for c, coef in head.output)
    return (head._replace(value=shared_value, output=shared_output,
                          name=f"{head.name} [shared by {r} outputs]"),)
  return tuple(
      Head(_copy_terms(layout, head.query, dk, tainted, c, r),
           _copy_terms(layout, head.key, dk, tainted, c, r),
           _copy_terms(layout, head.value, dv, tainted, c, r),
           _copy_output(layout, head.output, dv, tainted, c, r), f"{head.name} [output {c}]",
           head.op)
      for c in range(r))


def _units(layout: ResidualLayout, group: ReluUnits, tainted, r: int) -> tuple[ReluUnits, ...]:
  reads = {c for c, _ in group.pre} | {c for c, _ in (group.value or ())}
  if not reads & tainted:
    if {c for c, _ in group.post} & tainted:
      raise ValueError(f"Units {group.name!r} write a per-output channel from shared inputs.")
    return (group,)
  n = group.num_units
  copies = []
  for c in range(r):
    value = None if group.value is None else _copy_terms(layout, group.value, n, tainted, c, r)
    copies.append(ReluUnits(_copy_terms(layout, group.pre, n, tainted, c, r),
                            _copy_output(layout, group.post, n, tainted, c, r),
                            f"{group.name} [output {c}]", group.op, value))
  return tuple(copies)


def with_outputs(program: Program, num_outputs: int) -> Program:
  """The program for r = num_outputs independent right-hand sides (see module docstring)."""
  r = int(num_outputs)
  if r == 1:
    return program
  tainted = per_output_channels(program)
  layout = program.layout
  wide = ResidualLayout(
      channels=tuple((name, size * r if name in tainted else size) for name, size in layout.channels),
      holders=tuple((name, f"{holder} (x{r} outputs)" if name in tainted else holder)
                    for name, holder in layout.holders))
  blocks = []
  for block in program.blocks:
    heads = tuple(h for head in block.heads for h in _head(layout, head, tainted, r))
    units = tuple(u for group in block.units for u in _units(layout, group, tainted, r))
    blocks.append(block._replace(heads=heads, units=units))
  for feature, channel, coef in program.embedding:
    if (feature == "y") != (channel in tainted) or np.ndim(coef) != 0:
      raise ValueError(f"Embedding {feature}->{channel} cannot be widened to {r} outputs.")
  return program._replace(layout=wide, blocks=tuple(blocks),
                          transforms=program.transforms + ((Transform.OUTPUTS, r),))


def num_outputs_of(program: Program) -> int:
  """r: the size of the readout channel."""
  return program.layout.size(program.readout)

