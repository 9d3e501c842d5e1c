"""Where a compiled CG transformer under pre-LayerNorm departs from the unnormalised one.

`compile_cg(norm="rmsnorm")` is exact (kcg._src.transforms.with_norm_pins). LayerNorm is refused by
`compile_cg`; this module builds the LayerNorm model anyway, through the compiler's pipeline with
`refuse_inexact=False`, and finds the first layer, token and channel where its residual stream
leaves the unnormalised model's, so the failure can be looked at rather than taken on trust.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flax import nnx

from kcg._src import compiler
from kcg._src import craft


class Departure(NamedTuple):
  """First place where the LayerNorm model's residual stream departs from the plain model's.

  Attributes:
    layer: 1-based layer index (0 = embedding); None if it never departs.
    layer_name: which block (`craft.layer_names`).
    token: token index; `role` says which ("support i", "aggregator", "query i").
    channel: the residual channel's name.
    expected, got: the plain and LayerNorm values there.
    relative_error: |got - expected| / max(|expected|, floor).
    largest_weight: the largest |weight| with which that layer reads the stream (MLP and heads).
    prediction_error: max |f_t(LayerNorm) - f_t(plain)| / max |f_t(plain)| over steps and queries.
  """

  layer: int | None
  layer_name: str
  token: int
  role: str
  channel: str
  expected: float
  got: float
  relative_error: float
  largest_weight: float
  prediction_error: float


def _role(token: int, num_support: int) -> str:
  if token < num_support:
    return f"support {token}"
  return "aggregator" if token == num_support else f"query {token - num_support - 1}"


def layernorm_departure(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                        x_support, y_support, x_query, *, threshold: float = 1e-6,
                        floor: float = 1e-30, **options) -> Departure:
  """Compiles CG with and without pre-LayerNorm and locates the first departure.

  `options` are `compile_cg` keyword options (mask, form, ...). x_support [1, k, p],
  y_support [1, k], x_query [1, q, p]: one prompt.
  """
  plain = compiler.compile_cg(num_support, feature_dim, num_steps, ridge, **options)
  # The model compile_cg refuses, built on purpose: this is the model that refusal is about.
  normed = compiler.compile_options(plain.options.replace(norm="layernorm"), dtype=plain.dtype,
                                    refuse_inexact=False)
  residual = lambda m: np.asarray(m.forward(x_support, y_support, x_query,
                                            return_residuals=True).residuals)[:, 0]
  plain_h, normed_h = residual(plain), residual(normed)[..., :plain.config.width]
  predictions = [np.asarray(m.predict_steps(x_support, y_support, x_query)) for m in (plain, normed)]
  prediction_error = float(np.abs(predictions[1] - predictions[0]).max()
                           / max(np.abs(predictions[0]).max(), floor))
  names = craft.layer_names(plain.program)
  channels = [name for name, size in plain.program.layout.channels for _ in range(size)]
  blocks = {name: np.asarray(value)
            for name, value in nnx.to_pure_dict(normed.params)["blocks"].items()}
  for layer in range(1, plain_h.shape[0]):
    error = np.abs(normed_h[layer] - plain_h[layer]) / np.maximum(np.abs(plain_h[layer]), floor)
    token, channel = np.unravel_index(np.argmax(error), error.shape)
    if error[token, channel] > threshold:
      stored = normed.config.layer_schedule[layer - 1]
      reads = [np.abs(blocks[n][stored]).max() for n in ("query", "key", "value", "mlp_in")
               if n in blocks]
      return Departure(layer, names[layer - 1], int(token), _role(int(token), num_support),
                       channels[channel], float(plain_h[layer, token, channel]),
                       float(normed_h[layer, token, channel]), float(error[token, channel]),
                       float(max(reads)), prediction_error)
  return Departure(None, "", -1, "", "", 0.0, 0.0, 0.0, 0.0, prediction_error)
