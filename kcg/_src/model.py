"""The one transformer class of kcg: compiled weights and trained weights both live in it.

A decoder-style stack over tokens `[B, T, F]`:

    h_0 = tokens @ W_embed + b_embed
    h_{l+1/2} = h_l + sum_h Attn_h(N(h_l))          (unnormalised linear or softmax attention)
    h_{l+1} = h_{l+1/2} + MLP(N(h_{l+1/2}))          (optional)
    out = N_final(h_L) @ W_readout + b_readout

`N` is the identity, LayerNorm or RMSNorm (pre-norm). Per-layer parameters are stacked along a
leading layer axis. Stacks of up to 32 layers (trained models) run as straight-line code; deeper ones
(compiled CG models, hundreds of layers over a dozen stored blocks) run as one `lax.scan`, so a
600-layer compiled model compiles as fast as a one-layer one; both forms apply the same operations to
the same parameters. `tied_layers=True` keeps a single block applied `num_layers` times (a looped
transformer). Linear attention is `out_i = scale * sum_{j allowed} (q_i . k_j) v_j`, no softmax, no
normaliser.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_KINDS = ("linear", "softmax")
ACTIVATIONS = ("relu", "gelu", "silu", "reglu", "geglu", "swiglu")
GATED_ACTIVATIONS = ("reglu", "geglu", "swiglu")
NORMS = (None, "layernorm", "rmsnorm")
MASKS = ("causal", "prefix")
LINEAR_ATTENTION_IMPLS = ("auto", "quadratic", "associative")
PRECISIONS = ("highest", "default")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of `Transformer`; every field is static.

  Attributes:
    token_dim: F, features per input token (see `kcg.prompt`).
    width: D, residual stream width.
    num_layers: L, number of blocks applied.
    num_heads: H.
    head_dim: query/key dimension per head.
    value_dim: value dimension per head (defaults to head_dim).
    mlp_hidden: hidden units of the token-wise MLP; 0 means attention-only blocks.
    attention: "linear" (unnormalised) or "softmax".
    activation: MLP activation; "reglu", "geglu", "swiglu" are gated linear units,
      act(h W_in + b) * (h W_gate_value), which multiply two linear functions of the token exactly.
    norm: None, "layernorm" or "rmsnorm" (pre-norm, plus a final norm before the readout).
    norm_eps: epsilon of the norm.
    mask: "causal" (token i sees j <= i) or "prefix" (tokens in the prefix see the whole prefix;
      a token after the prefix sees the prefix and itself; nobody sees a token after the prefix).
    output_dim: readout size per token.
    tied_layers: one block applied num_layers times (looped transformer).
    param_layers: optional schedule, a tuple of length num_layers whose entry l says which stored
      block layer l applies (entries 0 .. n-1 with n stored blocks). It generalises tied_layers
      (all zeros): a compiled CG model stores its init blocks and one CG step, and loops the step.
    use_bias: biases in embedding, MLP and readout.
    attention_free_layers: the first n applied layers skip attention (their attention output is
      multiplied by an exact 0), so they are token-wise MLP blocks: after them each token's residual
      is a function of that token alone ("features, then solver" models).
    attention_scale: multiplies q.k; None means 1 for linear and 1/sqrt(head_dim) for softmax.
    linear_attention_impl: "quadratic" forms the T x T scores; "associative" computes
      Q (K^T V) with prefix sums, O(T d_k d_v); "auto" picks associative for the prefix mask, and for the
      causal mask when T > 128 (measured: below that the quadratic form is as fast).
    precision: "highest" pins float32 matmuls to full precision (no TF32/bf16 passes on GPU/TPU);
      "default" lets the backend choose and normalises softmax attention after the value product
      (faster training; see `_softmax_attention`).
    param_dtype: dtype of freshly initialised parameters.
  """

  token_dim: int
  width: int
  num_layers: int
  num_heads: int = 1
  head_dim: int = 16
  value_dim: int | None = None
  mlp_hidden: int = 0
  attention: str = "linear"
  activation: str = "relu"
  norm: str | None = None
  norm_eps: float = 1e-6
  mask: str = "causal"
  output_dim: int = 1
  tied_layers: bool = False
  param_layers: tuple[int, ...] | None = None
  use_bias: bool = True
  attention_free_layers: int = 0
  attention_scale: float | None = None
  linear_attention_impl: str = "auto"
  precision: str = "highest"
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("token_dim", "width", "num_layers", "num_heads", "head_dim", "output_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
    if self.value_dim is not None and (not isinstance(self.value_dim, int) or self.value_dim < 1):
      raise ValueError(f"ModelConfig.value_dim must be a positive int or None, got {self.value_dim!r}.")
    if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
      raise ValueError(f"ModelConfig.mlp_hidden must be an int >= 0 (0 = no MLP), got {self.mlp_hidden!r}.")
    if (isinstance(self.attention_free_layers, bool) or not isinstance(self.attention_free_layers, int)
        or not 0 <= self.attention_free_layers <= self.num_layers):
      raise ValueError(f"ModelConfig.attention_free_layers must be an int in [0, num_layers="
                       f"{self.num_layers}], got {self.attention_free_layers!r}.")
    if self.attention_free_layers and self.mlp_hidden == 0:
      raise ValueError("ModelConfig.attention_free_layers > 0 needs mlp_hidden > 0: a block without "
                       "attention and without MLP is the identity.")
    if self.param_layers is not None:
      if self.tied_layers:
        raise ValueError("Give either tied_layers=True or a param_layers schedule, not both.")
      schedule = tuple(self.param_layers)
      if len(schedule) != self.num_layers or any(
          not isinstance(i, int) or i < 0 for i in schedule):
        raise ValueError(f"param_layers must hold num_layers={self.num_layers} ints >= 0, got "
                         f"{len(schedule)} entries.")
      if set(schedule) != set(range(max(schedule) + 1)):
        raise ValueError("param_layers must use every stored block 0 .. n-1 at least once.")
    _check_choice("attention", self.attention, ATTENTION_KINDS)
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("norm", self.norm, NORMS)
    _check_choice("mask", self.mask, MASKS)
    _check_choice("linear_attention_impl", self.linear_attention_impl, LINEAR_ATTENTION_IMPLS)
    _check_choice("precision", self.precision, PRECISIONS)

  @property
  def resolved_value_dim(self) -> int:
    """`value_dim`, or `head_dim` when it is None."""
    return self.head_dim if self.value_dim is None else self.value_dim

  @property
  def resolved_attention_scale(self) -> float:
    """`attention_scale`, or 1 for linear attention and 1/sqrt(head_dim) for softmax when None."""
    if self.attention_scale is not None:
      return float(self.attention_scale)
    return 1.0 if self.attention == "linear" else 1.0 / math.sqrt(self.head_dim)

  @property
  def num_param_layers(self) -> int:
    """Distinct parameter sets in `layer_schedule` (fewer than num_layers when layers are tied)."""
    return len(set(self.layer_schedule))

  @property
  def layer_schedule(self) -> tuple[int, ...]:
    """Stored block applied at each layer."""
    if self.param_layers is not None:
      return tuple(self.param_layers)
    return (0,) * self.num_layers if self.tied_layers else tuple(range(self.num_layers))


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"ModelConfig.{name}={value!r} is not one of {choices}.")


class ForwardOutput(NamedTuple):
  """Model outputs.

  Attributes:
    outputs: readout at every token, [B, T, output_dim].
    residuals: None, or the residual stream after the embedding and after every block,
      [L + 1, B, T, D] (index l = after l blocks).
  """

  outputs: jax.Array
  residuals: jax.Array | None


def attention_mask(num_tokens: int, mask: str, num_prefix: int | None) -> jax.Array:
  """Boolean [T, T] matrix, entry (i, j) True when token i may read token j."""
  _check_choice("mask", mask, MASKS)
  rows = jnp.arange(num_tokens)[:, None]
  cols = jnp.arange(num_tokens)[None, :]
  if mask == "causal":
    return cols <= rows
  if num_prefix is None or not 0 <= num_prefix <= num_tokens:
    raise ValueError(
        f"mask='prefix' needs num_prefix in [0, {num_tokens}] (the number of leading tokens that "
        f"see each other), got {num_prefix!r}.")
  return (cols < num_prefix) | (cols == rows)


def _precision(config: ModelConfig):
  return jax.lax.Precision.HIGHEST if config.precision == "highest" else None


def _normalize(x, scale, bias, kind, eps):
  if kind is None:
    return x
  if kind == "layernorm":
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  y = x / rms * scale[None, None, :]
  return y + bias[None, None, :] if kind == "layernorm" else y


def _activation(name):
  return {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "reglu": jax.nn.relu,
          "geglu": jax.nn.gelu, "swiglu": jax.nn.silu}[name]


# Causal chunks: each token costs 2 dk dv (read and update the running state) plus C (dk + dv)
# (exact scores inside its chunk); C near 2 dk dv / (dk + dv) balances the two, clipped so that
# the per-chunk matmuls stay large enough to be efficient and the scan short.
_MIN_CAUSAL_CHUNK = 32
_MAX_CAUSAL_CHUNK = 128
# `auto` keeps the quadratic form for causal masks up to this many tokens: there the sequence is
# a few chunks, and the masked T x T product costs no more and has no scan overhead. Measured
# (experiments/bench.py, section "attention", BENCHMARKS.md): on 2 CPU cores the associative form
# wins from T = 256 for dk = dv in {1, 16, 64}; at T <= 128 with dk = dv >= 16 it is no faster
# (even or up to 1.5x slower over three runs on a shared machine).
_AUTO_CAUSAL_MIN_TOKENS = 128
# Stacks of at most this many layers are unrolled; deeper ones are one `lax.scan` over the layer
# schedule (compile time independent of depth). Measured (experiments/bench.py, section
# "training_throughput", BENCHMARKS.md): on CPU a scan over the 12 layers of the GPT-style training
# step made it ~1.2x slower, because the scan keeps every layer's activations for the backward
# pass in stacked [L, ...] buffers that XLA zero-fills, copies and slices, and gathers each layer's
# parameters (and scatters their gradients) by a traced index. Unrolling costs compile time
# (measured: an 8-layer width-32 training step compiles in 5-6 s instead of ~4 s).
_MAX_UNROLLED_LAYERS = 32


def _resolved_linear_impl(impl: str, mask: str, num_tokens: int) -> str:
  """The implementation `linear_attention_impl=impl` runs for this mask and length."""
  if impl != "auto":
    return impl
  if mask == "prefix":
    return "associative"  # never more work than quadratic once T > 2 dk dv / (dk + dv)
  return "associative" if num_tokens > _AUTO_CAUSAL_MIN_TOKENS else "quadratic"


def _linear_attention(q, k, v, allowed, config, num_prefix):
  """sum_{j allowed} (q_i . k_j) v_j for q, k [B,H,T,dk], v [B,H,T,dv] -> [B,H,T,dv].

  "quadratic" forms the masked T x T scores: O(T^2 (dk + dv)). "associative" never does:
  prefix mask: O(T dk dv) (`_prefix_associative`); causal: O(T (dk dv + C (dk + dv)))
  (`_causal_associative`). Both are exact reorderings of the same sums.
  """
  precision = _precision(config)
  impl = _resolved_linear_impl(config.linear_attention_impl, config.mask, q.shape[2])
  if impl == "associative" and config.mask == "prefix":
    return _prefix_associative(q, k, v, num_prefix, precision)
  if impl == "associative":
    return _causal_associative(q, k, v, precision)
  scores = jnp.einsum("bhid,bhjd->bhij", q, k, precision=precision)
  scores = jnp.where(allowed, scores, jnp.zeros((), scores.dtype))
  return jnp.einsum("bhij,bhje->bhie", scores, v, precision=precision)


def _prefix_associative(q, k, v, num_prefix, precision):
  """Prefix-mask linear attention: out_i = q_i (K_P^T V_P) + [i >= P] (q_i . k_i) v_i.

  Every token reads the whole prefix, so K^T V over the prefix is formed once, [B,H,dk,dv];
  tokens after the prefix also read themselves.
  """
  t = q.shape[2]
  if num_prefix is None or not 0 <= num_prefix <= t:
    raise ValueError(f"mask='prefix' needs num_prefix in [0, {t}], got {num_prefix!r}.")
  kv = jnp.einsum("bhjd,bhje->bhde", k[:, :, :num_prefix], v[:, :, :num_prefix],
                  precision=precision)
  out = jnp.einsum("bhid,bhde->bhie", q, kv, precision=precision)
  after_prefix = (jnp.arange(t) >= num_prefix).astype(q.dtype)
  self_score = jnp.sum(q * k, axis=-1, keepdims=True) * after_prefix[None, None, :, None]
  return out + self_score * v


def _causal_chunk(num_tokens: int, dk: int, dv: int) -> int:
  balanced = 2.0 * dk * dv / (dk + dv)
  chunk = 2 ** round(math.log2(balanced))
  return max(1, min(max(chunk, _MIN_CAUSAL_CHUNK), _MAX_CAUSAL_CHUNK, num_tokens))


def _causal_associative(q, k, v, precision, chunk: int | None = None):
  """Causal linear attention by chunks of C tokens, never forming T x T scores.

  Within a chunk the scores are exact and masked (C x C); across chunks a running state
  S = sum_{j in earlier chunks} k_j v_j^T, [B,H,dk,dv], is carried by `lax.scan`, so memory is
  O(B H (T d + dk dv)) and work O(T (dk dv + C (dk + dv))). T need not be a multiple of C
  (zero padding adds nothing to S and its outputs are dropped). chunk=None picks C from dk, dv.
  """
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  chunk = _causal_chunk(t, dk, dv) if chunk is None else max(1, min(int(chunk), t))
  num_chunks = -(-t // chunk)
  pad = num_chunks * chunk - t

  def by_chunk(a):  # [B,H,T,d] -> [num_chunks, B, H, C, d]
    if pad:
      a = jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return jnp.moveaxis(a.reshape(b, h, num_chunks, chunk, a.shape[-1]), 2, 0)

  causal_CxC = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))
  zero = jnp.zeros((), q.dtype)

  def step(state_BxHxDkxDv, qkv):
    q_c, k_c, v_c = qkv
    scores = jnp.einsum("bhid,bhjd->bhij", q_c, k_c, precision=precision)
    scores = jnp.where(causal_CxC, scores, zero)
    out = (jnp.einsum("bhid,bhde->bhie", q_c, state_BxHxDkxDv, precision=precision)
           + jnp.einsum("bhij,bhje->bhie", scores, v_c, precision=precision))
    state_BxHxDkxDv = state_BxHxDkxDv + jnp.einsum("bhjd,bhje->bhde", k_c, v_c,
                                                   precision=precision)
    return state_BxHxDkxDv, out

  initial = jnp.zeros((b, h, dk, dv), q.dtype)
  _, out = jax.lax.scan(step, initial, (by_chunk(q), by_chunk(k), by_chunk(v)))
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, num_chunks * chunk, dv)
  return out[:, :, :t]


def _softmax_attention(q, k, v, allowed, config):
  """softmax(S) V for the masked scores S = q k^T [B,H,T,T] and values v [B,H,T,dv].

  precision="highest" (compiled models) normalises the weights first (jax.nn.softmax, then the
  product): the evaluation order that their exactness tests check. "default" (training) divides
  after the value product, (exp(S - m) V) / (exp(S - m) 1) with m the row maximum: the same
  quotient with the division on [T, dv] instead of [T, T] (attention forward + backward ~1.5x
  faster on CPU, BENCHMARKS.md). Every row allows at least its own token, so its sum is >= 1.
  """
  precision = _precision(config)
  scores = jnp.einsum("bhid,bhjd->bhij", q, k, precision=precision)
  scores = jnp.where(allowed, scores, jnp.asarray(jnp.finfo(scores.dtype).min, scores.dtype))
  if config.precision == "highest":
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhij,bhje->bhie", weights, v, precision=precision)
  weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  out = jnp.einsum("bhij,bhje->bhie", weights, v, precision=precision)
  return out / jnp.sum(weights, axis=-1, keepdims=True)


class Blocks(nnx.Module):
  """The stack of transformer blocks; parameters carry a leading layer axis [L_p, ...]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    lp, h, d, dk, dv, m = (c.num_param_layers, c.num_heads, c.width, c.head_dim,
                           c.resolved_value_dim, c.mlp_hidden)
    dt = c.param_dtype
    # Residual-branch outputs start small so that deep stacks begin near the identity.
    out_std = 1.0 / math.sqrt(2.0 * c.num_layers)
    normal = lambda key, shape, std: std * jax.random.normal(key, shape, dt)
    self.query = nnx.Param(normal(rngs.params(), (lp, h, d, dk), 1 / math.sqrt(d)))
    self.key = nnx.Param(normal(rngs.params(), (lp, h, d, dk), 1 / math.sqrt(d)))
    self.value = nnx.Param(normal(rngs.params(), (lp, h, d, dv), 1 / math.sqrt(d)))
    self.attn_out = nnx.Param(normal(rngs.params(), (lp, h, dv, d), out_std / math.sqrt(h * dv)))
    if m > 0:
      self.mlp_in = nnx.Param(normal(rngs.params(), (lp, d, m), 1 / math.sqrt(d)))
      if c.activation in GATED_ACTIVATIONS:
        self.mlp_value = nnx.Param(normal(rngs.params(), (lp, d, m), 1 / math.sqrt(d)))
      self.mlp_out = nnx.Param(normal(rngs.params(), (lp, m, d), out_std / math.sqrt(m)))
      if c.use_bias:
        self.mlp_in_bias = nnx.Param(jnp.zeros((lp, m), dt))
        self.mlp_out_bias = nnx.Param(jnp.zeros((lp, d), dt))
    if c.norm is not None:
      self.attn_norm_scale = nnx.Param(jnp.ones((lp, d), dt))
      if m > 0:
        self.mlp_norm_scale = nnx.Param(jnp.ones((lp, d), dt))
      if c.norm == "layernorm":
        self.attn_norm_bias = nnx.Param(jnp.zeros((lp, d), dt))
        if m > 0:
          self.mlp_norm_bias = nnx.Param(jnp.zeros((lp, d), dt))
    self.config = config


class Transformer(nnx.Module):
  """Decoder-style transformer over prompt tokens; see the module docstring for the maths."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed = nnx.Linear(c.token_dim, c.width, use_bias=c.use_bias, param_dtype=c.param_dtype,
                            rngs=rngs)
    self.blocks = Blocks(c, rngs=rngs)
    if c.norm is not None:
      self.final_norm_scale = nnx.Param(jnp.ones((c.width,), c.param_dtype))
      if c.norm == "layernorm":
        self.final_norm_bias = nnx.Param(jnp.zeros((c.width,), c.param_dtype))
    self.readout = nnx.Linear(c.width, c.output_dim, use_bias=c.use_bias,
                              param_dtype=c.param_dtype, rngs=rngs)

  def __call__(self, tokens_BxTxF: jax.Array, *, num_prefix: int | None = None,
               return_residuals: bool = False, head_mask: jax.Array | None = None,
               layer_mask: jax.Array | None = None) -> ForwardOutput:
    """Runs the stack.

    Args:
      tokens_BxTxF: input tokens; the computation runs in their (floating) dtype.
      num_prefix: length of the prefix for mask="prefix" (ignored for "causal").
      return_residuals: also return the residual stream after the embedding and each block.
      head_mask: optional [L, H] multipliers of each head's output (0 ablates a head).
      layer_mask: optional [L] multipliers of each block's residual update (0 skips a block).

    Returns:
      ForwardOutput(outputs [B, T, output_dim], residuals [L+1, B, T, D] or None).
    """
    c = self.config
    if tokens_BxTxF.ndim != 3 or tokens_BxTxF.shape[-1] != c.token_dim:
      raise ValueError(
          f"tokens must have shape [batch, tokens, {c.token_dim}], got {tokens_BxTxF.shape}.")
    dtype = tokens_BxTxF.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"tokens must be floating point, got {dtype}.")
    cast = lambda a: jnp.asarray(a, dtype)
    precision = _precision(c)
    num_tokens = tokens_BxTxF.shape[1]
    allowed = attention_mask(num_tokens, c.mask, num_prefix)
    if head_mask is not None and head_mask.shape != (c.num_layers, c.num_heads):
      raise ValueError(f"head_mask must have shape {(c.num_layers, c.num_heads)}, got {head_mask.shape}.")
    if layer_mask is not None and layer_mask.shape != (c.num_layers,):
      raise ValueError(f"layer_mask must have shape {(c.num_layers,)}, got {layer_mask.shape}.")
    if c.attention_free_layers:
      attends = (jnp.arange(c.num_layers) >= c.attention_free_layers).astype(dtype)
      heads = jnp.ones((c.num_layers, c.num_heads), dtype) if head_mask is None else head_mask
      head_mask = jnp.asarray(heads, dtype) * attends[:, None]

    h = jnp.einsum("btf,fd->btd", tokens_BxTxF, cast(self.embed.kernel[...]), precision=precision)
    if c.use_bias:
      h = h + cast(self.embed.bias[...])[None, None, :]

    params = {name: cast(getattr(self.blocks, name)[...]) for name in _block_param_names(self.blocks)}
    act = _activation(c.activation)
    scale = jnp.asarray(c.resolved_attention_scale, dtype)

    def block(h, layer_params, heads_on, layer_on):
      p = layer_params
      x = _normalize(h, p.get("attn_norm_scale"), p.get("attn_norm_bias"), c.norm, c.norm_eps)
      q = jnp.einsum("btd,hdk->bhtk", x, p["query"], precision=precision) * scale
      k = jnp.einsum("btd,hdk->bhtk", x, p["key"], precision=precision)
      v = jnp.einsum("btd,hdk->bhtk", x, p["value"], precision=precision)
      if c.attention == "linear":
        o = _linear_attention(q, k, v, allowed, c, num_prefix)
      else:
        o = _softmax_attention(q, k, v, allowed, c)
      if heads_on is not None:
        o = o * heads_on[None, :, None, None]
      u = jnp.einsum("bhtk,hkd->btd", o, p["attn_out"], precision=precision)
      h = h + (u if layer_on is None else layer_on * u)
      if c.mlp_hidden > 0:
        x = _normalize(h, p.get("mlp_norm_scale"), p.get("mlp_norm_bias"), c.norm, c.norm_eps)
        u = jnp.einsum("btd,dm->btm", x, p["mlp_in"], precision=precision)
        if c.use_bias:
          u = u + p["mlp_in_bias"][None, None, :]
        u = act(u)
        if c.activation in GATED_ACTIVATIONS:
          u = u * jnp.einsum("btd,dm->btm", x, p["mlp_value"], precision=precision)
        u = jnp.einsum("btm,md->btd", u, p["mlp_out"], precision=precision)
        if c.use_bias:
          u = u + p["mlp_out_bias"][None, None, :]
        h = h + (u if layer_on is None else layer_on * u)
      return h

    # Masks that are not given are not applied (multiplying by ones would be exact but not free).
    head_mask = None if head_mask is None else cast(head_mask)
    layer_mask = None if layer_mask is None else cast(layer_mask)
    if c.num_layers <= _MAX_UNROLLED_LAYERS:
      stored_blocks = {name: jax.lax.unstack(a) for name, a in params.items()}
      h_final, hs = h, []
      for layer, stored in enumerate(c.layer_schedule):
        h_final = block(h_final, {name: a[stored] for name, a in stored_blocks.items()},
                        None if head_mask is None else head_mask[layer],
                        None if layer_mask is None else layer_mask[layer])
        hs.append(h_final)
      hs = jnp.stack(hs) if return_residuals else None
    else:
      def step(h, xs):
        stored, heads_on, layer_on = xs
        layer_params = {name: a[stored] for name, a in params.items()}
        h = block(h, layer_params, heads_on, layer_on)
        return h, (h if return_residuals else None)

      schedule = jnp.asarray(c.layer_schedule, jnp.int32)
      h_final, hs = jax.lax.scan(step, h, (schedule, head_mask, layer_mask))
    if c.norm is not None:
      h_out = _normalize(h_final, cast(self.final_norm_scale[...]),
                         cast(self.final_norm_bias[...]) if c.norm == "layernorm" else None,
                         c.norm, c.norm_eps)
    else:
      h_out = h_final
    out = jnp.einsum("btd,do->bto", h_out, cast(self.readout.kernel[...]), precision=precision)
    if c.use_bias:
      out = out + cast(self.readout.bias[...])[None, None, :]
    residuals = jnp.concatenate([h[None], hs], axis=0) if return_residuals else None
    return ForwardOutput(out, residuals)


def _block_param_names(blocks: Blocks) -> tuple[str, ...]:
  return tuple(name for name, value in vars(blocks).items() if isinstance(value, nnx.Param))


def abstract_model(config: ModelConfig) -> Transformer:
  """The model with shapes and dtypes only (no arrays allocated): `nnx.eval_shape` of the init."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def param_shapes(config: ModelConfig) -> dict:
  """Nested dict of ShapeDtypeStruct, the structure of `nnx.state(model, nnx.Param)`."""
  return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
