"""Prompt encoding: raw `(x_support, y_support, x_query)` to tokens, and back to predictions.

Token order is `[support_1 .. support_k, aggregator, query_1 .. query_q]`. The aggregator is a
token with no data of its own (a register): the compiled models keep scalars and, in some
constructions, the whole solver state there; learned models may use it or not. It sits after the
supports so that under a strict causal mask it can read all of them, and before the queries so that
they can read it. The prefix (for mask="prefix") is the supports plus the aggregator.

Each token's input features are named blocks (`TokenFeatures`), so that a compiled embedding can
route them to named residual channels without index arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks


class PromptLayout(NamedTuple):
  """Static description of a prompt's tokens and of each token's input features.

  Attributes:
    num_support: k.
    num_query: q.
    input_dim: d.
    positional: whether support tokens carry a one-hot position among the supports.
    num_outputs: r, the size of y per support (1 for scalar targets).
  """

  num_support: int
  num_query: int
  input_dim: int
  positional: bool = False
  num_outputs: int = 1

  @property
  def num_tokens(self) -> int:
    """`k + 1 + q`: the supports, the aggregator, the queries."""
    return self.num_support + 1 + self.num_query

  @property
  def num_prefix(self) -> int:
    """`k + 1`: the tokens every token may attend to under the prefix mask."""
    return self.num_support + 1

  @property
  def aggregator_index(self) -> int:
    """Position of the aggregator token, right after the k supports."""
    return self.num_support

  @property
  def query_slice(self) -> slice:
    """Positions of the q query tokens."""
    return slice(self.num_support + 1, self.num_tokens)

  @property
  def features(self) -> tuple[tuple[str, int], ...]:
    """Named input feature blocks, in order: (name, size)."""
    blocks = [("x_support", self.input_dim), ("x_query", self.input_dim),
              ("y", self.num_outputs), ("is_support", 1), ("is_aggregator", 1), ("is_query", 1)]
    if self.positional:
      blocks.append(("position", self.num_support))
    return tuple(blocks)

  @property
  def token_dim(self) -> int:
    """Size of one input token: the sum of the feature blocks."""
    return sum(size for _, size in self.features)

  def feature_slice(self, name: str) -> slice:
    """Where feature block `name` sits in a token; ValueError for an unknown name."""
    offset = 0
    for block, size in self.features:
      if block == name:
        return slice(offset, offset + size)
      offset += size
    raise ValueError(f"No token feature {name!r}; the layout has {[b for b, _ in self.features]}.")


def make_layout(num_support: int, num_query: int, input_dim: int, *, positional: bool = False,
                num_outputs: int = 1) -> PromptLayout:
  """A validated `PromptLayout` (every size a positive int, else ValueError)."""
  for name, value in (("num_support", num_support), ("num_query", num_query),
                      ("input_dim", input_dim), ("num_outputs", num_outputs)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return PromptLayout(int(num_support), int(num_query), int(input_dim), bool(positional),
                      int(num_outputs))


def encode(layout: PromptLayout, x_support: jax.Array, y_support: jax.Array,
           x_query: jax.Array) -> jax.Array:
  """Tokens [B, T, F] from x_support [B,k,d], y_support [B,k] (or [B,k,r]), x_query [B,q,d]."""
  x_support, y_support, x_query = validate_prompt(layout, x_support, y_support, x_query)
  dtype = x_support.dtype
  batch = x_support.shape[0]
  k, q = layout.num_support, layout.num_query
  if y_support.ndim == 2:
    y_support = y_support[..., None]

  def block(rows, name, values):
    out = jnp.zeros((batch, rows, layout.token_dim), dtype)
    return out.at[..., layout.feature_slice(name)].set(values)

  support = block(k, "x_support", x_support)
  support = support.at[..., layout.feature_slice("y")].set(y_support)
  support = support.at[..., layout.feature_slice("is_support")].set(1)
  if layout.positional:
    support = support.at[..., layout.feature_slice("position")].set(
        jnp.broadcast_to(jnp.eye(k, dtype=dtype), (batch, k, k)))
  aggregator = block(1, "is_aggregator", jnp.ones((batch, 1, 1), dtype))
  query = block(q, "x_query", x_query)
  query = query.at[..., layout.feature_slice("is_query")].set(1)
  return jnp.concatenate([support, aggregator, query], axis=1)


def validate_prompt(layout: PromptLayout, x_support, y_support, x_query):
  """Checks shapes, dtypes and finiteness; returns the arrays in one floating dtype."""
  for name, value in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query)):
    checks.check_real(name, value)
  x_support = jnp.asarray(x_support)
  y_support = jnp.asarray(y_support)
  x_query = jnp.asarray(x_query)
  dtype = jnp.result_type(x_support.dtype, y_support.dtype, x_query.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.zeros(()).dtype
  x_support, y_support, x_query = (a.astype(dtype) for a in (x_support, y_support, x_query))
  k, q, d = layout.num_support, layout.num_query, layout.input_dim
  if x_support.ndim != 3 or x_support.shape[1:] != (k, d):
    raise ValueError(
        f"x_support must have shape [batch, num_support={k}, input_dim={d}], got {x_support.shape}. "
        "Compile or configure the model for the prompt's sizes.")
  batch = x_support.shape[0]
  expected_y = (batch, k) if layout.num_outputs == 1 else (batch, k, layout.num_outputs)
  if y_support.shape != expected_y and y_support.shape != (batch, k, layout.num_outputs):
    raise ValueError(f"y_support must have shape {expected_y} to match x_support {x_support.shape}, "
                     f"got {y_support.shape}.")
  if x_query.ndim != 3 or x_query.shape[0] != batch or x_query.shape[2] != d:
    raise ValueError(f"x_query must have shape [batch={batch}, num_query, input_dim={d}], "
                     f"got {x_query.shape}.")
  if x_query.shape[1] != q:
    raise ValueError(f"x_query has {x_query.shape[1]} queries but the layout expects {q}.")
  for name, value in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query)):
    checks.check_finite(name, value)
  return x_support, y_support, x_query


def query_outputs(layout: PromptLayout, outputs_BxTxO: jax.Array) -> jax.Array:
  """Predictions at the query tokens: [B, q] for one output, else [B, q, r]."""
  out = outputs_BxTxO[:, layout.query_slice]
  return out[..., 0] if out.shape[-1] == 1 else out


# ----------------------------------------------------------------------------------------------
# Interleaved prompts (Garg et al. 2022): one token per x and one per y, for the every-prefix loss.


class InterleavedLayout(NamedTuple):
  """Tokens `[x_1, y_1, x_2, y_2, ..., x_n, y_n]` read under a causal mask.

  The output at x-token `i` (token `2i`, 0-based) sees `x_1..x_i` and `y_1..y_{i-1}`, so it predicts
  `y_i` from `i - 1` support pairs: one forward pass scores every prefix. Token features are the
  named blocks `x[d]`, `y[r]`, `is_x`, `is_y`.

  Attributes:
    num_points: n, (x, y) pairs per prompt.
    input_dim: d.
    num_outputs: r.
  """

  num_points: int
  input_dim: int
  num_outputs: int = 1

  @property
  def num_tokens(self) -> int:
    """`2 n`: one x token and one y token per point."""
    return 2 * self.num_points

  @property
  def features(self) -> tuple[tuple[str, int], ...]:
    """Named input feature blocks, in order: (name, size)."""
    return (("x", self.input_dim), ("y", self.num_outputs), ("is_x", 1), ("is_y", 1))

  @property
  def token_dim(self) -> int:
    """Size of one input token: the sum of the feature blocks."""
    return sum(size for _, size in self.features)

  def feature_slice(self, name: str) -> slice:
    """Where feature block `name` sits in a token; ValueError for an unknown name."""
    offset = 0
    for block, size in self.features:
      if block == name:
        return slice(offset, offset + size)
      offset += size
    raise ValueError(f"No token feature {name!r}; the layout has {[b for b, _ in self.features]}.")


def make_interleaved_layout(num_points: int, input_dim: int, *,
                            num_outputs: int = 1) -> InterleavedLayout:
  """A validated `InterleavedLayout` (every size a positive int, else ValueError)."""
  for name, value in (("num_points", num_points), ("input_dim", input_dim),
                      ("num_outputs", num_outputs)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return InterleavedLayout(int(num_points), int(input_dim), int(num_outputs))


def encode_interleaved(layout: InterleavedLayout, x_points: jax.Array,
                       y_points: jax.Array) -> jax.Array:
  """Tokens [B, 2n, F] from x_points [B,n,d] and y_points [B,n] (or [B,n,r]), x- and y-tokens alternating."""
  checks.check_real("x_points", x_points)
  checks.check_real("y_points", y_points)
  x_points = jnp.asarray(x_points)
  y_points = jnp.asarray(y_points)
  dtype = jnp.result_type(x_points.dtype, y_points.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.zeros(()).dtype
  x_points, y_points = x_points.astype(dtype), y_points.astype(dtype)
  n, d, r = layout.num_points, layout.input_dim, layout.num_outputs
  if x_points.ndim != 3 or x_points.shape[1:] != (n, d):
    raise ValueError(f"x_points must have shape [batch, num_points={n}, input_dim={d}], "
                     f"got {x_points.shape}.")
  batch = x_points.shape[0]
  if y_points.shape == (batch, n) and r == 1:
    y_points = y_points[..., None]
  if y_points.shape != (batch, n, r):
    raise ValueError(f"y_points must have shape {(batch, n) if r == 1 else (batch, n, r)} to match "
                     f"x_points {x_points.shape}, got {y_points.shape}.")
  checks.check_finite("x_points", x_points)
  checks.check_finite("y_points", y_points)
  x_tokens = jnp.zeros((batch, n, layout.token_dim), dtype)
  x_tokens = x_tokens.at[..., layout.feature_slice("x")].set(x_points)
  x_tokens = x_tokens.at[..., layout.feature_slice("is_x")].set(1)
  y_tokens = jnp.zeros((batch, n, layout.token_dim), dtype)
  y_tokens = y_tokens.at[..., layout.feature_slice("y")].set(y_points)
  y_tokens = y_tokens.at[..., layout.feature_slice("is_y")].set(1)
  # [B, n, 2, F] -> [B, 2n, F] puts x_i at token 2i and y_i at token 2i + 1.
  return jnp.stack([x_tokens, y_tokens], axis=2).reshape(batch, 2 * n, layout.token_dim)


def interleaved_predictions(layout: InterleavedLayout, outputs_BxTxO: jax.Array) -> jax.Array:
  """Predictions at the x-tokens, [B, n] for one output (else [B, n, r]): entry i predicts y_i."""
  if outputs_BxTxO.ndim != 3 or outputs_BxTxO.shape[1] != layout.num_tokens:
    raise ValueError(f"outputs must have shape [batch, {layout.num_tokens}, outputs], "
                     f"got {outputs_BxTxO.shape}.")
  out = outputs_BxTxO[:, 0::2]
  return out[..., 0] if out.shape[-1] == 1 else out
