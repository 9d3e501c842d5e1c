"""Training data: prompts of a run's task, its curriculum, and their encoding into token batches.

Two prompt encodings, one model class (`DataSpec.encoding`):

* `"query"`: the `kcg.prompt` layout `[support_1..support_k, aggregator, query_1..query_q]` that the
  compiled models read. The loss is the mean squared error of the `q` query predictions. With
  `mask="prefix"` (the default) every query sees the supports, the aggregator and itself only, so the
  `q` predictions are independent; this is the setting of the linear-self-attention literature
  (von Oswald et al. 2023, Ahn et al. 2023).
* `"every_prefix"`: interleaved tokens `[x_1, y_1, ..., x_n, y_n]` (`kcg.prompt.encode_interleaved`)
  under a causal mask. The output at `x_i` predicts `y_i` from the `i - 1` pairs before it and the loss
  averages the squared error over all `n` positions (Garg et al. 2022): one pass trains every prompt
  length. Predicting `q` queries from `k` supports runs one sequence of `k + 1` points per query.
  The model has no positional embedding; causal masking and the is_x / is_y flags are its only
  position information.

Curriculum (Garg et al. 2022). Stage `s = step // interval` trains on `d_s = min(d, d_0 + s * dd)`
input dimensions and `k_s = min(k, k_0 + s * dk)` supports. Prompts are drawn in `d_s` dimensions and
zero-padded to `d`, so the token size never changes. Under `"every_prefix"` the sequence keeps its
full length: points after the `k_s + 1` drawn ones are zero tokens with zero loss weight, and the causal
mask keeps them from influencing earlier positions, so the train step compiles once. Under `"query"`
the token count changes with `k_s` and the step compiles once per stage.

Keys. The batch of step `s` is drawn from `fold_in(fold_in(key(seed), 1), s)`: resuming needs no data
state, and the same seed gives the same numbers. Held-out prompts come from stream 2.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kcg._src import prompt as prompt_lib
from kcg._src import tasks as tasks_lib
from kcg._src import train_config as config_lib

_DATA_STREAM = 1
_EVAL_STREAM = 2


class Stage(NamedTuple):
  """Prompt sizes of a curriculum stage."""

  input_dim: int
  num_support: int


def curriculum_stage(config: config_lib.TrainConfig, step: int) -> Stage:
  """`(d_s, k_s)` at `step`: grows by the increments every `interval` steps up to the final sizes."""
  c, data = config.curriculum, config.data
  stage = step // c.interval

  def grow(start, increment, end):
    return end if start is None else min(end, start + increment * stage)

  return Stage(grow(c.input_dim_start, c.input_dim_increment, data.input_dim),
               grow(c.num_support_start, c.num_support_increment, data.num_support))


def decision_tree_targets(key: jax.Array, x_BxNxD: jax.Array, depth: int) -> jax.Array:
  """f [B, N] of one random depth-`depth` tree per prompt (Garg et al. 2022).

  Internal node `j` splits on coordinate `c_j ~ U{0..d-1}` at 0 (right when `x[c_j] > 0`); the `2^depth`
  leaves hold N(0, 1) values, so `Var f = 1` for symmetric inputs.
  """
  batch, _, d = x_BxNxD.shape
  num_internal, num_leaves = 2**depth - 1, 2**depth
  key_coord, key_leaf = jax.random.split(key)
  coords_BxI = jax.random.randint(key_coord, (batch, num_internal), 0, d)
  leaves_BxL = jax.random.normal(key_leaf, (batch, num_leaves), x_BxNxD.dtype)

  def one_prompt(x_NxD, coords_I, leaves_L):
    node_N = jnp.zeros((x_NxD.shape[0],), jnp.int32)
    for _ in range(depth):
      feature_N = jnp.take_along_axis(x_NxD, coords_I[node_N][:, None], axis=1)[:, 0]
      node_N = 2 * node_N + 1 + (feature_N > 0).astype(jnp.int32)
    return leaves_L[node_N - num_internal]

  return jax.vmap(one_prompt)(x_BxNxD, coords_BxI, leaves_BxL)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _sample_jit(key, data: config_lib.DataSpec, input_dim: int, num_support: int, batch_size: int,
                shift: str) -> tasks_lib.Prompts:
  key_inputs, key_tree, key_noise = jax.random.split(key, 3)
  cfg = config_lib.task_config(data, input_dim, num_support, batch_size, shift=shift)
  prompts = tasks_lib.sample(key_inputs, cfg)
  if data.family != config_lib.DECISION_TREE:
    return prompts
  x_all = jnp.concatenate([prompts.x_support, prompts.x_query], axis=1)
  f_all = decision_tree_targets(key_tree, x_all, data.tree_depth)
  y_all = f_all + jnp.asarray(cfg.noise_std, f_all.dtype) * jax.random.normal(
      key_noise, f_all.shape, f_all.dtype)
  # Output shifts act on targets, which the tree replaced: apply them again.
  if shift == "scaled_outputs":
    scale = jnp.asarray(cfg.shift_scale, f_all.dtype)
    f_all, y_all = f_all * scale, y_all * scale
  elif shift == "added_noise":
    y_all = y_all + jnp.asarray(cfg.shift_noise_std, f_all.dtype) * jax.random.normal(
        jax.random.fold_in(key_noise, 1), f_all.shape, f_all.dtype)
  k = num_support
  return tasks_lib.Prompts(prompts.x_support, y_all[:, :k], prompts.x_query, y_all[:, k:],
                           f_all[:, :k], f_all[:, k:])


def sample_prompts(key: jax.Array, data: config_lib.DataSpec, *, batch_size: int,
                   input_dim: int | None = None, num_support: int | None = None,
                   shift: str = "none") -> tasks_lib.Prompts:
  """Raw prompts of `data`'s family: x [B, k, d_s] (not padded), y [B, k], x_query [B, q', d_s], ...

  `q' = data.num_query` for the `"query"` encoding and 1 for `"every_prefix"`. Usable inside `jit`.
  """
  if shift not in tasks_lib.SHIFTS:
    raise ValueError(f"Unknown sample_prompts.shift {shift!r}; choose one of {tasks_lib.SHIFTS}.")
  input_dim = data.input_dim if input_dim is None else input_dim
  num_support = data.num_support if num_support is None else num_support
  return _sample_jit(key, data, int(input_dim), int(num_support), int(batch_size), shift)


class Batch(NamedTuple):
  """One training batch: tokens [B, T, F], targets [B, P], loss weights [B, P] (0 = padding)."""

  tokens: jax.Array
  targets: jax.Array
  weights: jax.Array


def pad_inputs(x_BxNxDs: jax.Array, input_dim: int) -> jax.Array:
  """Zero-pads the last axis to `input_dim` (curriculum stages use the leading coordinates)."""
  extra = input_dim - x_BxNxDs.shape[-1]
  if extra < 0:
    raise ValueError(f"inputs have {x_BxNxDs.shape[-1]} dimensions but the model was trained on "
                     f"input_dim={input_dim}; pass at most {input_dim}.")
  return jnp.pad(x_BxNxDs, ((0, 0), (0, 0), (0, extra)))


def make_batch(prompts: tasks_lib.Prompts, data: config_lib.DataSpec, dtype: Any) -> Batch:
  """Encodes raw prompts of any curriculum stage into the model's fixed-size tokens."""
  cast = lambda a: jnp.asarray(a, dtype)
  x_s = pad_inputs(cast(prompts.x_support), data.input_dim)
  x_q = pad_inputs(cast(prompts.x_query), data.input_dim)
  y_s, y_q = cast(prompts.y_support), cast(prompts.y_query)
  batch, k = y_s.shape
  if data.encoding == "query":
    layout = prompt_lib.make_layout(k, data.num_query, data.input_dim)
    tokens = prompt_lib.encode(layout, x_s, y_s, x_q)
    return Batch(tokens, y_q, jnp.ones_like(y_q))
  n_drawn, n = k + 1, data.num_points
  x_points = jnp.concatenate([x_s, x_q], axis=1)
  y_points = jnp.concatenate([y_s, y_q], axis=1)
  pad = n - n_drawn
  x_points = jnp.pad(x_points, ((0, 0), (0, pad), (0, 0)))
  y_points = jnp.pad(y_points, ((0, 0), (0, pad)))
  layout = prompt_lib.make_interleaved_layout(n, data.input_dim)
  tokens = prompt_lib.encode_interleaved(layout, x_points, y_points)
  weights = jnp.broadcast_to((jnp.arange(n) < n_drawn).astype(dtype)[None, :], (batch, n))
  return Batch(tokens, y_points, weights)


def readout(data: config_lib.DataSpec, outputs_BxTxO: jax.Array) -> jax.Array:
  """Predictions [B, P] that the loss scores: the query tokens, or every x-token."""
  if data.encoding == "query":
    num_query = data.num_query
    return outputs_BxTxO[:, outputs_BxTxO.shape[1] - num_query:, 0]
  return outputs_BxTxO[:, 0::2, 0]


def num_prefix(data: config_lib.DataSpec, tokens_BxTxF: jax.Array) -> int:
  """Prefix length for mask="prefix": all tokens before the queries."""
  return tokens_BxTxF.shape[1] - (data.num_query if data.encoding == "query" else 0)


def data_key(seed: int) -> jax.Array:
  """Root key of the training batches."""
  return jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)


def eval_key(seed: int) -> jax.Array:
  """Root key of the held-out prompts."""
  return jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM)


def training_batch(config: config_lib.TrainConfig, step: int) -> Batch:
  """The batch of `step` (unsharded): a pure function of (config, step)."""
  stage = curriculum_stage(config, step)
  prompts = sample_prompts(jax.random.fold_in(data_key(config.seed), step), config.data,
                           batch_size=config.batch_size, input_dim=stage.input_dim,
                           num_support=stage.num_support)
  return make_batch(prompts, config.data, config_lib.dtype_of(config))
