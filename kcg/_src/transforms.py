"""Rewrites of a program: a projection of the features, a random-ReLU feature layer, norm pins.

Each takes a `Program` and returns a new one (nothing is mutated), recording itself in
`Program.transforms`. The r-output rewrite lives in kcg._src.multi_output.
"""

from __future__ import annotations

import numpy as np

from kcg._src import blocks as B
from kcg._src.craft import Block, Program, ReluUnits, ResidualLayout, check_block
from kcg._src.ops import Op, Transform


def with_projection(program: Program, projection_RxP: np.ndarray) -> Program:
  """The embedding writes psi(x) = S phi(x) (S = projection [m, p]) into the m-wide feature channels.

  `program` must be built for feature dimension m: it then runs on the sketched kernel
  K_m = Phi S^T S Phi^T, and the residual stream never carries phi itself (width m < p).
  """
  projection_RxP = np.asarray(projection_RxP, np.float64)
  routes = {("x_support", "phi_support"), ("x_query", "phi_query")}
  embedding = tuple((feature, channel, projection_RxP.T if (feature, channel) in routes else coef)
                    for feature, channel, coef in program.embedding)
  return program._replace(
      embedding=embedding,
      transforms=program.transforms + ((Transform.PROJECTION, projection_RxP.shape[0]),))


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
  features = Block("features: phi(x) = relu(W x + b) / sqrt(m)", Op.FEATURES, units=(
      ReluUnits((("x_support", weights_MxD.T), ("is_support", bias_M[None, :])),
                (("phi_support", scale),), "phi(x_support)", Op.FEATURES),
      ReluUnits((("x_query", weights_MxD.T), ("is_query", bias_M[None, :])),
                (("phi_query", scale),), "phi(x_query)", Op.FEATURES),
  ))
  check_block(layout, features)
  return program._replace(
      layout=layout, embedding=embedding, blocks=(features,) + program.blocks,
      schedule=(0,) + tuple(i + 1 for i in program.schedule),
      step_ends=tuple(e + 1 for e in program.step_ends),
      transforms=program.transforms + ((Transform.RANDOM_RELU, 0),))


def norm_pin(dtype) -> float:
  """M of the pre-norm pinning channels, a power of two: 2^500 in float64, 2^52 in float32.

  2^(max exponent / 2 - 12): M^2 times the (at most a few dozen) pins stays far below the largest
  float, so the mean square never overflows from the pins. Every other channel below 2^-27 M is
  absorbed exactly by the mean square (see `with_norm_pins`): in float64 that is 2^473, far above
  anything a compiled model writes (the reciprocal's channels stay below ~3e41); in float32 it is
  2^25 ~ 3e7, which the reciprocal's channels pass once CG has converged below the reciprocal's
  range (BUILD.md, "Pre-norm models").
  """
  info = np.finfo(np.dtype(dtype))
  return 2.0 ** (int(info.maxexp) // 2 - 12)


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
  embedding = program.embedding + tuple((flag, "norm_pin", pins) for flag in B.FLAGS)
  layout = ResidualLayout(program.layout.channels + tuple(extra),
                          program.layout.holders + tuple(h for h in holders if h[0] in dict(extra)))
  return program._replace(layout=layout, embedding=embedding, norm_pin=float(pin),
                          transforms=program.transforms + ((Transform.NORM_PINS, 0),))
