"""Blocks defined by what they do to named channels of the residual stream; programs of blocks.

A compiled program is a list of `Block`s. Each block is one transformer layer: a set of attention
heads followed by a set of ReLU units (the MLP). Heads and units never name an index; they name
channels of a `ResidualLayout`, and `lower_blocks` turns them into the arrays of `kcg.Transformer`.
Each head, unit group and block carries an `op` (`kcg._src.ops.Op`) saying what it computes; its
`name` is for display only.

A `Head` reads `q = sum_c Q_c h[c]`, `k = sum_c K_c h[c]`, `v = sum_c V_c h[c]` and adds
`sum_j (q_i . k_j) v_j` (unnormalised linear attention over the tokens i may read) to the output
channels. Every coefficient is a scalar (times the identity) or a matrix [channel size, head dims].
Because the sum runs over tokens j, a head whose key channels are non-zero at one token only (the
aggregator) reads that token alone: this is how the constructions multiply quantities held by one
token (`q . k` times `v` is a product of three of them) without any special activation.

`apply` runs one block in NumPy, without the model class, so that a block can be tested alone.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Mapping, NamedTuple, Sequence, Union

import numpy as np

from kcg._src import ops
from kcg._src import reciprocal as recip

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
  name: str
  op: ops.Op


class ReluUnits(NamedTuple):
  """A group of MLP units: adds post^T (relu(pre h) * value h) to the output channels.

  `pre` maps channels to the units ([channel size, n] matrices), `post` maps the units back
  ([n, channel size] matrices). `value` (gated MLPs only, activation="reglu") multiplies each
  unit by another linear function of the token, so that relu(a) b - relu(-a) b = a b is an exact
  product; without it the value is 1 (in a gated model: the sum of the token-role flags).
  """

  pre: Terms
  post: Terms
  name: str
  op: ops.Op
  value: Terms | None = None

  @property
  def num_units(self) -> int:
    return np.shape(self.pre[0][1])[1]


class Block(NamedTuple):
  """One transformer layer: heads, then ReLU units; `op` is what the layer is for."""

  name: str
  op: ops.Op
  heads: tuple[Head, ...] = ()
  units: tuple[ReluUnits, ...] = ()


def linear_units(layout: ResidualLayout, source: str, targets: Sequence[tuple[str, float]],
                 name: str = "", *, op: ops.Op = ops.Op.MOVE) -> ReluUnits:
  """ReLU units that add c * h[source] to each target channel: x = relu(x) - relu(-x), exactly."""
  m = layout.size(source)
  eye = np.eye(m)
  pre = ((source, np.concatenate([eye, -eye], axis=1)),)
  post = tuple((target, coef * np.concatenate([eye, -eye], axis=0)) for target, coef in targets)
  return ReluUnits(pre, post, name or f"{source}->{[t for t, _ in targets]}", op)


def product_units(layout: ResidualLayout, a: str, b: str, targets: Sequence[tuple[str, float]],
                  name: str = "", reduce: bool = False, *, op: ops.Op) -> ReluUnits:
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
  return ReluUnits(pre, tuple(post), name or f"{a}*{b}", op, value)


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


def terms_dim(layout: ResidualLayout, terms: Terms) -> int:
  """The number of head dimensions (or units) that `terms` map the stream to."""
  dims = set()
  for channel, coef in terms:
    dims.add(layout.size(channel) if np.ndim(coef) == 0 else np.shape(coef)[1])
  if len(dims) != 1:
    raise ValueError(f"Terms {[c for c, _ in terms]} map to different head sizes {dims}.")
  return dims.pop()


def head_dims(layout: ResidualLayout, head: Head) -> tuple[int, int]:
  """(query/key dims, value dims) a head needs."""
  dk = terms_dim(layout, head.query)
  if terms_dim(layout, head.key) != dk:
    raise ValueError(f"Head {head.name!r}: query and key sizes differ.")
  dv = terms_dim(layout, head.value)
  for channel, coef in head.output:
    rows = dv if np.ndim(coef) == 0 else np.shape(coef)[0]
    if rows != dv:
      raise ValueError(f"Head {head.name!r}: output to {channel!r} expects {rows} value dims, "
                       f"the value has {dv}.")
  return dk, dv


def check_block(layout: ResidualLayout, block: Block) -> None:
  """Raises ValueError unless every channel a block names is in `layout` with matching sizes."""
  try:
    for head in block.heads:
      dk, dv = head_dims(layout, head)
      for terms, dims in ((head.query, dk), (head.key, dk), (head.value, dv)):
        for channel, coef in terms:
          as_matrix(coef, layout.size(channel), dims)
      for channel, coef in head.output:
        as_matrix(coef, dv, layout.size(channel))
    for group in block.units:
      n = group.num_units
      for channel, coef in group.pre + (group.value or ()):
        as_matrix(coef, layout.size(channel), n)
      for channel, coef in group.post:
        if np.shape(coef) != (n, layout.size(channel)):
          raise ValueError(f"units {group.name!r} write {channel!r} with shape {np.shape(coef)}")
  except (KeyError, ValueError) as e:
    raise ValueError(f"Block {block.name!r} does not fit its layout: {e}") from None


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
        arrays["attn_out"][l, h, :dv, layout.slice(channel)] += as_matrix(
            coef, dv, layout.size(channel))
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


def _read(layout: ResidualLayout, terms: Terms, h: np.ndarray, dims: int) -> np.ndarray:
  """sum_c h[..., c] @ M_c: [..., T, dims]."""
  out = np.zeros(h.shape[:-1] + (dims,))
  for channel, coef in terms:
    out += h[..., layout.slice(channel)] @ as_matrix(coef, layout.size(channel), dims)
  return out


def apply(layout: ResidualLayout, block: Block, h: np.ndarray, mask: np.ndarray, *,
          attention: str = "linear") -> np.ndarray:
  """The residual stream after one block, in NumPy float64, without the model class.

  h [..., T, D] (D = layout.width); mask [T, T] bool, True where token i may read token j
  (`kcg._src.model.attention_mask`). Heads read h; the units read h plus the heads' outputs:
  h' = h + sum_heads out_h,  out_h = attend(q, k, v) O,  h'' = h' + post^T (relu(pre h') * value h').
  `attention`: "linear" (sum_j (q_i . k_j) v_j over the allowed j) or "softmax" (the same with
  softmax weights over the allowed j), the attention of the model the block is lowered into.
  """
  h = np.asarray(h, np.float64)
  mask = np.asarray(mask, bool)
  num_tokens = h.shape[-2] if h.ndim >= 2 else 0
  if h.ndim < 2 or h.shape[-1] != layout.width:
    raise ValueError(f"h must have shape [..., T, {layout.width}], got {h.shape}.")
  if mask.shape != (num_tokens, num_tokens):
    raise ValueError(f"mask must have shape [{num_tokens}, {num_tokens}], got {mask.shape}.")
  if attention not in ("linear", "softmax"):
    raise ValueError(f"attention={attention!r} is not one of ('linear', 'softmax').")
  update = np.zeros_like(h)
  for head in block.heads:
    dk, dv = head_dims(layout, head)
    q, k, v = (_read(layout, terms, h, dims)
               for terms, dims in ((head.query, dk), (head.key, dk), (head.value, dv)))
    scores = q @ np.swapaxes(k, -1, -2)
    if attention == "linear":
      weights = np.where(mask, scores, 0.0)
    else:
      scores = np.where(mask, scores, -np.inf)
      weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
      weights = weights / weights.sum(axis=-1, keepdims=True)
    out = weights @ v
    for channel, coef in head.output:
      update[..., layout.slice(channel)] += out @ as_matrix(coef, dv, layout.size(channel))
  h = h + update
  update = np.zeros_like(h)
  for group in block.units:
    n = group.num_units
    act = np.maximum(_read(layout, group.pre, h, n), 0.0)
    if group.value is not None:
      act = act * _read(layout, group.value, h, n)
    for channel, coef in group.post:
      update[..., layout.slice(channel)] += act @ np.asarray(coef, np.float64)
  return h + update


# ---------------------------------------------------------------------------------------------
# Programs.


class StateLocation(NamedTuple):
  """Where a solver quantity lives: a channel, held by `tokens` ("support": one entry per support
  token; "aggregator": the whole vector or scalar in the aggregator token)."""

  channel: str
  tokens: str


class Program(NamedTuple):
  """A construction: residual layout, embedding and readout routes, and the blocks.

  Attributes:
    construction: which construction (`ops.Construction`).
    layout: the residual channels.
    embedding: ((token feature, channel, coefficient), ...): the embedding writes each input
      feature into channels.
    blocks: the distinct blocks: the init blocks, then one step's blocks (looped solvers: every
      step applies the same weights, the step sizes are computed) or every step's blocks (solvers
      whose step sizes are weights, Chebyshev).
    schedule: schedule[l] = index into `blocks` of the block applied at layer l.
    readout: the channel read at query tokens.
    step_ends: step_ends[t] = number of layers after which the state of step t is in place
      (t = 0 .. num_steps).
    state: where alpha, r, p (and, when the network computes them, gamma, beta) live.
    baked: step sizes that are weights rather than state (Chebyshev: gamma, beta per step).
    reciprocal: the division used (None: no division).
    transforms: ((ops.Transform, size), ...) applied to the construction, in order (size: r for
      OUTPUTS, m for PROJECTION, 0 otherwise).
    norm_pin: for pre-norm models, the value M of the pinning channels.
  """

  construction: ops.Construction
  layout: ResidualLayout
  embedding: tuple[tuple[str, str, Coefficient], ...]
  blocks: tuple[Block, ...]
  schedule: tuple[int, ...]
  readout: str
  step_ends: tuple[int, ...]
  state: Mapping[str, StateLocation]
  baked: Mapping[str, tuple[float, ...]] = {}
  reciprocal: recip.ReciprocalSpec | None = None
  transforms: tuple[tuple[ops.Transform, int], ...] = ()
  norm_pin: float | None = None

  @property
  def name(self) -> str:
    """Display name, e.g. 'support_state x2 outputs+prenorm'."""
    suffix = {ops.Transform.OUTPUTS: " x{} outputs", ops.Transform.RANDOM_RELU: "+random_relu",
              ops.Transform.PROJECTION: "+rank{}", ops.Transform.NORM_PINS: "+prenorm"}
    return self.construction.value + "".join(suffix[t].format(size) for t, size in self.transforms)

  @property
  def num_steps(self) -> int:
    return len(self.step_ends) - 1

  def layer_block(self, layer: int) -> Block:
    """The block applied at `layer` (0-based)."""
    return self.blocks[self.schedule[layer]]

  def step_layers(self, step: int) -> range:
    """The layers that run step `step` (0-based): `step_ends[step] .. step_ends[step + 1] - 1`."""
    if not 0 <= step < self.num_steps:
      raise ValueError(f"step {step} is outside the program's steps 0..{self.num_steps - 1}.")
    return range(self.step_ends[step], self.step_ends[step + 1])

  def step_blocks(self, step: int) -> tuple[Block, ...]:
    """The blocks step `step` applies, in order (a looped program: the same list every step)."""
    return tuple(self.layer_block(layer) for layer in self.step_layers(step))

  @property
  def init_blocks(self) -> tuple[Block, ...]:
    """The blocks applied before the first step."""
    return tuple(self.layer_block(layer) for layer in range(self.step_ends[0]))


def looped_program(construction: ops.Construction, layout: ResidualLayout, embedding,
                   init_blocks: Sequence[Block], step_blocks: Sequence[Block], num_steps: int,
                   state: Mapping[str, StateLocation], reciprocal: recip.ReciprocalSpec | None,
                   readout: str = "f") -> Program:
  """A program that applies `init_blocks` once, then the same `step_blocks` `num_steps` times.

  Every block is checked against the layout here, when the program is built.
  """
  init, step = list(init_blocks), list(step_blocks) if num_steps > 0 else []
  for block in init + step:
    check_block(layout, block)
  schedule = list(range(len(init)))
  step_ends = [len(schedule)]
  for _ in range(num_steps):
    schedule.extend(range(len(init), len(init) + len(step)))
    step_ends.append(len(schedule))
  return Program(construction, layout, tuple(embedding), tuple(init + step), tuple(schedule),
                 readout, tuple(step_ends), dict(state), {}, reciprocal)


def unrolled_program(construction: ops.Construction, layout: ResidualLayout, embedding,
                     init_blocks: Sequence[Block], step_blocks: Sequence[Block],
                     blocks_per_step: int, state: Mapping[str, StateLocation],
                     baked: Mapping[str, tuple[float, ...]], readout: str = "f") -> Program:
  """A program whose every step has its own `blocks_per_step` blocks (step sizes baked in)."""
  blocks = list(init_blocks) + list(step_blocks)
  for block in blocks:
    check_block(layout, block)
  num_steps = len(step_blocks) // blocks_per_step if blocks_per_step else 0
  step_ends = tuple(len(init_blocks) + blocks_per_step * t for t in range(num_steps + 1))
  return Program(construction, layout, tuple(embedding), tuple(blocks), tuple(range(len(blocks))),
                 readout, step_ends, dict(state), dict(baked), None)


def layer_names(program: Program) -> tuple[str, ...]:
  """A name for every layer, e.g. 'step[3] cg mat-vec Kp'."""
  # The step comes from `step_ends`, not from the block count: unrolled programs (Chebyshev) list
  # every step's blocks separately.
  names = []
  for layer, block in enumerate(program.schedule):
    step = bisect.bisect_right(program.step_ends, layer) - 1
    prefix = "" if step < 0 else f"step[{step}] "
    names.append(prefix + program.blocks[block].name)
  return tuple(names)
