"""Blocks defined by what they do to named channels of the residual stream, and their lowering.

A compiled program is a list of `Block`s. Each block is one transformer layer: a set of attention
heads followed by a set of ReLU units (the MLP). Heads and units never name an index; they name
channels of a `ResidualLayout`, and `lower` turns them into the arrays of `kcg.Transformer`.

A `Head` reads `q = sum_c Q_c h[c]`, `k = sum_c K_c h[c]`, `v = sum_c V_c h[c]` and adds
`sum_j (q_i . k_j) v_j` (unnormalised linear attention over the tokens i may read) to the output
channels. Every coefficient is a scalar (times the identity) or a matrix [channel size, head dims].
Because the sum runs over tokens j, a head whose key channels are non-zero at one token only (the
aggregator) reads that token alone: this is how the constructions multiply quantities held by one
token (`q . k` times `v` is a product of three of them) without any special activation.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence, Union

import numpy as np

Coefficient = Union[float, np.ndarray]
Terms = tuple[tuple[str, Coefficient], ...]


@dataclasses.dataclass(frozen=True)
class ResidualLayout:
  """Named, contiguous channels of the residual stream.

  Attributes:
    channels: ((name, size), ...) in order.
    holders: name -> which tokens may hold a non-zero value there (documentation and tests).
  """

  channels: tuple[tuple[str, int], ...]
  holders: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    names = [n for n, _ in self.channels]
    if len(set(names)) != len(names):
      raise ValueError(f"Duplicate channel names in layout: {names}.")

  @property
  def width(self) -> int:
    return sum(size for _, size in self.channels)

  def slice(self, name: str) -> slice:
    offset = 0
    for channel, size in self.channels:
      if channel == name:
        return slice(offset, offset + size)
      offset += size
    raise KeyError(f"No channel {name!r} in layout {[n for n, _ in self.channels]}.")

  def size(self, name: str) -> int:
    s = self.slice(name)
    return s.stop - s.start

  def holder(self, name: str) -> str:
    return dict(self.holders).get(name, "")

  def table(self) -> str:
    """A human-readable table: channel, offset, size, which tokens hold it."""
    rows = ["| channel | offset | size | held by |", "|---|---|---|---|"]
    for name, size in self.channels:
      rows.append(f"| `{name}` | {self.slice(name).start} | {size} | {self.holder(name)} |")
    return "\n".join(rows)


class Head(NamedTuple):
  """One attention head: adds sum_j (q_i . k_j) v_j to `output` (see module docstring)."""

  query: Terms
  key: Terms
  value: Terms
  output: Terms
  name: str = ""


class ReluUnits(NamedTuple):
  """A group of MLP units: adds post^T (relu(pre h) * value h) to the output channels.

  `pre` maps channels to the units ([channel size, n] matrices), `post` maps the units back
  ([n, channel size] matrices). `value` (gated MLPs only, activation="reglu") multiplies each
  unit by another linear function of the token, so that relu(a) b - relu(-a) b = a b is an exact
  product; without it the value is 1 (in a gated model: the sum of the token-role flags).
  """

  pre: Terms
  post: Terms
  name: str = ""
  value: Terms | None = None

  @property
  def num_units(self) -> int:
    return np.shape(self.pre[0][1])[1]


class Block(NamedTuple):
  """One transformer layer: heads, then ReLU units. `name` says which algorithm step it does."""

  name: str
  heads: tuple[Head, ...] = ()
  units: tuple[ReluUnits, ...] = ()


def linear_units(layout: ResidualLayout, source: str, targets: Sequence[tuple[str, float]],
                 name: str = "") -> ReluUnits:
  """ReLU units that add c * h[source] to each target channel: x = relu(x) - relu(-x), exactly."""
  m = layout.size(source)
  eye = np.eye(m)
  pre = ((source, np.concatenate([eye, -eye], axis=1)),)
  post = tuple((target, coef * np.concatenate([eye, -eye], axis=0)) for target, coef in targets)
  return ReluUnits(pre, post, name or f"{source}->{[t for t, _ in targets]}")


def product_units(layout: ResidualLayout, a: str, b: str, targets: Sequence[tuple[str, float]],
                  name: str = "", reduce: bool = False) -> ReluUnits:
  """Gated units adding c * (a * b) (elementwise; summed over entries if `reduce`) to targets.

  relu(a) b + relu(-a) (-b) = a b exactly for either sign of a.
  """
  m = layout.size(a)
  if layout.size(b) != m:
    raise ValueError(f"product_units: {a!r} and {b!r} have different sizes.")
  eye = np.eye(m)
  pre = ((a, np.concatenate([eye, -eye], axis=1)),)
  value = ((b, np.concatenate([eye, -eye], axis=1)),)
  post = []
  for target, coef in targets:
    out = np.ones((2 * m, 1)) if reduce else np.concatenate([eye, eye], axis=0)
    post.append((target, coef * out))
  return ReluUnits(pre, tuple(post), name or f"{a}*{b}", value)


def as_matrix(coef: Coefficient, rows: int, cols: int | None = None) -> np.ndarray:
  """A coefficient as a [rows, cols] matrix: a scalar times the (rectangular) identity, or itself."""
  if np.ndim(coef) == 0:
    cols = rows if cols is None else cols
    return float(coef) * np.eye(rows, cols)
  coef = np.asarray(coef, dtype=np.float64)
  if coef.ndim != 2 or coef.shape[0] != rows or (cols is not None and coef.shape[1] != cols):
    raise ValueError(f"Coefficient of shape {coef.shape} does not fit a channel of size {rows}"
                     + (f" and {cols} head dimensions." if cols is not None else "."))
  return coef


def _terms_dim(layout: ResidualLayout, terms: Terms) -> int:
  dims = set()
  for channel, coef in terms:
    dims.add(layout.size(channel) if np.ndim(coef) == 0 else np.shape(coef)[1])
  if len(dims) != 1:
    raise ValueError(f"Terms {[c for c, _ in terms]} map to different head sizes {dims}.")
  return dims.pop()


def head_dims(layout: ResidualLayout, head: Head) -> tuple[int, int]:
  """(query/key dims, value dims) a head needs."""
  dk = _terms_dim(layout, head.query)
  if _terms_dim(layout, head.key) != dk:
    raise ValueError(f"Head {head.name!r}: query and key sizes differ.")
  dv = _terms_dim(layout, head.value)
  for channel, coef in head.output:
    rows = dv if np.ndim(coef) == 0 else np.shape(coef)[0]
    if rows != dv:
      raise ValueError(f"Head {head.name!r}: output to {channel!r} expects {rows} value dims, "
                       f"the value has {dv}.")
  return dk, dv


class Requirements(NamedTuple):
  """The smallest model dimensions that carry a program."""

  num_layers: int
  num_heads: int
  head_dim: int
  value_dim: int
  mlp_hidden: int
  gated: bool = False


def requirements(layout: ResidualLayout, blocks: Sequence[Block]) -> Requirements:
  dk = dv = 1
  for block in blocks:
    for head in block.heads:
      hk, hv = head_dims(layout, head)
      dk, dv = max(dk, hk), max(dv, hv)
  return Requirements(
      num_layers=len(blocks),
      num_heads=max([len(b.heads) for b in blocks] + [1]),
      head_dim=dk,
      value_dim=dv,
      mlp_hidden=max([sum(u.num_units for u in b.units) for b in blocks] + [0]),
      gated=any(u.value is not None for b in blocks for u in b.units),
  )


ONES = (("is_support", 1.0), ("is_aggregator", 1.0), ("is_query", 1.0))


def lower_blocks(layout: ResidualLayout, blocks: Sequence[Block], shapes: dict,
                 ones: Terms = ONES) -> dict:
  """Arrays (float64 NumPy) for the block parameters, shaped as in the model's own state.

  `shapes` maps parameter names to shapes, taken from the model's abstract state. In a gated
  model (`mlp_value` present) a unit without a value reads `ones`, channels summing to 1 at
  every token.
  """
  arrays = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
  gated = "mlp_value" in arrays
  for l, block in enumerate(blocks):
    for h, head in enumerate(block.heads):
      dk, dv = head_dims(layout, head)
      for target, terms, dims in (("query", head.query, dk), ("key", head.key, dk),
                                  ("value", head.value, dv)):
        for channel, coef in terms:
          arrays[target][l, h, layout.slice(channel), :dims] += as_matrix(
              coef, layout.size(channel), dims)
      for channel, coef in head.output:
        m = as_matrix(coef, dv, layout.size(channel)) if np.ndim(coef) == 0 else np.asarray(coef)
        arrays["attn_out"][l, h, :dv, layout.slice(channel)] += m
    offset = 0
    for group in block.units:
      n = group.num_units
      for channel, coef in group.pre:
        arrays["mlp_in"][l, layout.slice(channel), offset:offset + n] += as_matrix(
            coef, layout.size(channel), n)
      for channel, coef in group.post:
        arrays["mlp_out"][l, offset:offset + n, layout.slice(channel)] += np.asarray(coef)
      if group.value is not None and not gated:
        raise ValueError(f"Unit group {group.name!r} multiplies two channels; it needs a gated MLP "
                         "(activation='reglu').")
      if gated:
        for channel, coef in (group.value if group.value is not None else
                              tuple((c, np.full((1, n), w)) for c, w in ones)):
          arrays["mlp_value"][l, layout.slice(channel), offset:offset + n] += as_matrix(
              coef, layout.size(channel), n)
      offset += n
  return arrays
