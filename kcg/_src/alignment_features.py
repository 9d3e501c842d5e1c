"""Hidden features phi_l(x) of a model, read so that they cannot carry the answer.

A support token's residual holds its own label, and from some layer on a query token's residual holds
the model's prediction for that input: KRR on such "features" explains the model trivially. So every
input (each support input and each query input) is asked as a *query*, and its query token's residual
after l blocks is phi_l(x), read in one of these ways (`READINGS`):

* `"zero_labels"`: in context, the prompt's supports with their labels set to 0;
* `"other_labels"`: in context, with the labels of another prompt (prompt b reads the labels of prompt
  b + 1 mod B: real label statistics, wrong answers);
* `"context_free"`: no supports at all, the layers applied to `[aggregator, query]` (for attention-free
  layers this is the per-token map itself; for attention layers, a prompt without supports);
* `"with_labels"`: the circular control: in context with the real labels. From the layer on which a
  query token holds the model's prediction for its input, KRR on these features explains the model
  trivially (asked as a query, support input i carries the prediction at x_i, close to y_i). Report
  it only to show the circularity.

Under the prefix mask every query reads the prefix and itself only, so all `k + q` inputs are asked in
one pass; under the causal mask each is asked in a prompt of its own. Results are `HiddenFeatures`
(`support [L+1, B, k, D]`, `query [L+1, B, q, D]`), the raw residual stream; `ResidualMap` is a fixed
linear read-out of it (`standardizing_map`, `channel_map`), the features the instruments of
`kcg.alignment` take as arrays.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kcg._src import checks
from kcg._src import probes
from kcg._src import prompt as prompt_lib

Array = jax.Array

READINGS = ("zero_labels", "other_labels", "context_free", "with_labels")


class HiddenFeatures(NamedTuple):
  """Residual-stream features of the support and query inputs after every block.

  Attributes:
    support: `[L+1, B, k, D]` (index l = after l blocks; 0 = the embedding).
    query: `[L+1, B, q, D]`.
  """

  support: np.ndarray
  query: np.ndarray

  def layer(self, l: int) -> tuple[np.ndarray, np.ndarray]:
    """`(support [B, k, D], query [B, q, D])` after `l` blocks."""
    return self.support[l], self.query[l]


def _check_reading(reading: str) -> str:
  if reading not in READINGS:
    raise ValueError(f"unknown reading {reading!r}; choose one of {', '.join(READINGS)}.")
  return reading


def _prompt_arrays(x_support, y_support, x_query):
  dtype = checks.float_dtype(x_support, y_support, x_query)
  x_support = checks.as_array("x_support", x_support, dtype, min_ndim=3, shape_doc="[B, k, d]")
  y_support = checks.as_array("y_support", y_support, dtype, min_ndim=2, shape_doc="[B, k]")
  x_query = checks.as_array("x_query", x_query, dtype, min_ndim=3, shape_doc="[B, q, d]")
  if (x_support.ndim != 3 or x_query.ndim != 3 or y_support.shape != x_support.shape[:2]
      or x_query.shape[0] != x_support.shape[0] or x_query.shape[2] != x_support.shape[2]):
    raise ValueError(f"prompts must be x_support [B, k, d], y_support [B, k], x_query [B, q, d]; got "
                     f"{x_support.shape}, {y_support.shape}, {x_query.shape}.")
  return x_support, y_support, x_query


def _as_queries(subject: probes.Subject, x_support, y_support, x_ask) -> Array:
  """Residuals `[L+1, B, n, D]` at the query tokens when the n inputs `x_ask [B, n, d]` are asked as
  queries of the prompt `(x_support, y_support)`."""
  if subject.config.mask == "prefix":
    h = subject.forward(x_support, y_support, x_ask, return_residuals=True).residuals
    return h[:, :, -x_ask.shape[1]:]
  # Causal: query j would read queries < j, so every input gets a prompt of its own.
  b, n, d = x_ask.shape
  k = x_support.shape[1]
  xs = jnp.broadcast_to(x_support[:, None], (b, n, k, d)).reshape(b * n, k, d)
  ys = jnp.broadcast_to(y_support[:, None], (b, n, k)).reshape(b * n, k)
  h = subject.forward(xs, ys, x_ask.reshape(b * n, 1, d), return_residuals=True).residuals
  return h[:, :, -1].reshape(h.shape[0], b, n, h.shape[-1])


@functools.partial(jax.jit, static_argnames=("graphdef", "num_prefix"))
def _apply_tokens(state, tokens, *, graphdef, num_prefix):
  return nnx.merge(graphdef, state)(tokens, num_prefix=num_prefix, return_residuals=True).residuals


def context_free_residuals(subject: probes.Subject, x: Any) -> Array:
  """Residuals `[L+1, B, n, D]` of inputs `x [B, n, d]`, each asked as the query of a prompt without
  supports: tokens `[aggregator, query]` (the prompt encoding of `kcg.prompt` minus its supports)."""
  if subject.model is None:
    raise ValueError("reading='context_free' runs the subject's kcg.Transformer on a prompt without "
                     "supports; this subject has no .model.")
  if subject.positional:
    raise ValueError("reading='context_free' is undefined for a positional encoding (support "
                     "positions have no meaning without supports); use 'zero_labels'.")
  x = jnp.asarray(x)
  b, n, d = x.shape
  if d > subject.input_dim:
    raise ValueError(f"inputs have {d} dimensions but the model reads input_dim={subject.input_dim}.")
  x = jnp.pad(x, ((0, 0), (0, 0), (0, subject.input_dim - d)))
  # Each input in a prompt of its own: [aggregator, query] (a one-support layout without its support).
  layout = prompt_lib.make_layout(1, 1, subject.input_dim)
  flat = x.reshape(b * n, 1, subject.input_dim)
  tokens = prompt_lib.encode(layout, jnp.zeros_like(flat), jnp.zeros((b * n, 1), x.dtype), flat)[:, 1:]
  if tokens.shape[-1] != subject.config.token_dim:
    raise ValueError(f"the prompt encodes to {tokens.shape[-1]} features per token but the model reads "
                     f"{subject.config.token_dim}.")
  graphdef, state = nnx.split(subject.model)
  h = _apply_tokens(state, tokens, graphdef=graphdef, num_prefix=1)  # [L+1, b n, 2, D]
  return h[:, :, -1].reshape(h.shape[0], b, n, h.shape[-1])


def hidden_features(subject: probes.Subject, x_support: Any, y_support: Any, x_query: Any, *,
                    reading: str = "zero_labels") -> HiddenFeatures:
  """phi_l of every support and query input at every layer, read as `reading` (module docstring).

  Args:
    subject: a `kcg.probes.Subject` (compiled or trained `kcg.Transformer`, "query" encoding).
    x_support: the support inputs, `[B, k, d]`.
    y_support: their labels, `[B, k]` (read only by the `with_labels` and `other_labels` readings).
    x_query: the query inputs, `[B, q, d]`.
    reading: one of `READINGS`.

  Returns:
    `HiddenFeatures(support [L+1, B, k, D], query [L+1, B, q, D])` as NumPy arrays.
  """
  reading = _check_reading(reading)
  x_support, y_support, x_query = _prompt_arrays(x_support, y_support, x_query)
  k = x_support.shape[1]
  x_ask = jnp.concatenate([x_support, x_query], axis=1)
  if reading == "context_free":
    h = context_free_residuals(subject, x_ask)
  else:
    labels = {"zero_labels": jnp.zeros_like(y_support), "with_labels": y_support,
              "other_labels": jnp.roll(y_support, -1, axis=0)}[reading]
    h = _as_queries(subject, x_support, labels, x_ask)
  h = np.asarray(h)
  return HiddenFeatures(h[:, :, :k], h[:, :, k:])


# ----------------------------------------------------------------------------------------------------
# Fixed linear read-outs of the residual stream.
# ----------------------------------------------------------------------------------------------------


class ResidualMap(NamedTuple):
  """A fixed affine read-out of the residual stream, `phi = (h - offset) @ matrix + bias`.

  Attributes:
    offset: `[D]`.
    matrix: `[D, p]`.
    bias: `[p]` or None (a constant feature adds a constant to the linear kernel: with a large one,
      KRR on it is KRR with an almost unpenalised intercept).
  """

  offset: np.ndarray
  matrix: np.ndarray
  bias: np.ndarray | None = None

  def __call__(self, h: Any) -> np.ndarray:
    h = np.asarray(h)
    if h.shape[-1] != self.offset.shape[0]:
      raise ValueError(f"residuals have width {h.shape[-1]}, the map reads {self.offset.shape[0]}.")
    out = (h - self.offset) @ self.matrix
    return out if self.bias is None else out + self.bias

  def with_constant(self, value: float) -> "ResidualMap":
    """The map with one more output, the constant `value`."""
    bias = np.zeros(self.output_dim) if self.bias is None else self.bias
    return ResidualMap(self.offset, np.concatenate([self.matrix, np.zeros((self.matrix.shape[0], 1))],
                                                   axis=1), np.append(bias, float(value)))

  @property
  def output_dim(self) -> int:
    """Number of features read out (columns of `matrix`)."""
    return int(self.matrix.shape[1])

  def scaled(self, factor: float) -> "ResidualMap":
    """The same read-out times `factor` (the linear kernel times `factor^2`)."""
    return ResidualMap(self.offset, self.matrix * float(factor),
                       None if self.bias is None else self.bias * float(factor))


def standardizing_map(*features: Any, rtol: float = 1e-9) -> ResidualMap:
  """Per-coordinate standardisation `(h - mean) / std`, statistics pooled over every token of the given
  feature arrays `[..., D]` (e.g. a `HiddenFeatures.layer(l)` of held-out prompts); coordinates whose
  std is below `rtol` times the largest (constant channels: flags, biases) are dropped (mapped to 0)."""
  if not features:
    raise ValueError("standardizing_map needs at least one array of features [..., D].")
  flat = [np.asarray(f, np.float64).reshape(-1, np.shape(f)[-1]) for f in features]
  if len({f.shape[1] for f in flat}) != 1:
    raise ValueError(f"feature arrays have different widths {[f.shape[1] for f in flat]}.")
  h = np.concatenate(flat, axis=0)
  if not np.all(np.isfinite(h)):
    raise ValueError("features contain NaN or Inf (a diverging model?); standardise finite features.")
  mean = h.mean(axis=0)
  std = h.std(axis=0)
  keep = std > rtol * max(float(std.max()), np.finfo(np.float64).tiny)
  scale = np.where(keep, 1.0 / np.where(keep, std, 1.0), 0.0)
  return ResidualMap(mean, np.diag(scale))


def channel_map(width: int, channels: slice) -> ResidualMap:
  """The read-out that selects residual channels `channels` of a width-`width` stream (no offset)."""
  width = checks.check_positive_int("width", width)
  index = np.arange(width)[channels]
  if index.size == 0:
    raise ValueError(f"channels {channels} select nothing of a width-{width} stream.")
  matrix = np.zeros((width, index.size))
  matrix[index, np.arange(index.size)] = 1.0
  return ResidualMap(np.zeros(width), matrix)


__all__ = ("READINGS", "HiddenFeatures", "ResidualMap", "channel_map", "context_free_residuals",
           "hidden_features", "standardizing_map")
