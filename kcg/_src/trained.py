"""Trained models loaded back by path, with the same `.predict` as the compiled models."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kcg._src import checkpointing
from kcg._src import model as model_lib
from kcg._src import prompt as prompt_lib
from kcg._src import training


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A trained `kcg.Transformer` with the configuration it was trained under.

  Attributes:
    model: the `kcg.Transformer` (call it on tokens for residuals, head or layer masks).
    config: the run's `kcg.training.TrainConfig`.
    step: the training step of the loaded checkpoint.
    workdir: where it was loaded from.
  """

  model: model_lib.Transformer
  config: training.TrainConfig
  step: int
  workdir: str

  def predict(self, x_support: Any, y_support: Any, x_query: Any) -> jax.Array:
    """Query predictions [B, q] from x_support [B,k,d], y_support [B,k], x_query [B,q,d].

    `d` may be smaller than the trained input dimension (inputs are zero-padded, as in training).
    Jitted and cached per prompt shape.
    """
    return training.make_predict_fn(self.model, self.config.data)(x_support, y_support, x_query)

  def encode(self, x_support: Any, y_support: Any, x_query: Any) -> tuple[jax.Array, int | None]:
    """The tokens [B, T, F] the model reads for this prompt, and its `num_prefix` (for probing).

    Only for the "query" encoding (every-prefix models read one interleaved sequence per query).
    """
    data = self.config.data
    if data.encoding != "query":
      raise ValueError("encode covers the 'query' encoding; every-prefix models read one "
                       "interleaved sequence per query (kcg.prompt.encode_interleaved).")
    x_support, x_query = jnp.asarray(x_support), jnp.asarray(x_query)
    if x_support.ndim != 3 or x_query.ndim != 3:
      raise ValueError(f"x_support and x_query must be [B, k, d] and [B, q, d], got "
                       f"{x_support.shape} and {x_query.shape}.")
    layout = prompt_lib.make_layout(x_support.shape[1], x_query.shape[1], data.input_dim)
    tokens = prompt_lib.encode(layout, training.pad_inputs(x_support, data.input_dim), y_support,
                               training.pad_inputs(x_query, data.input_dim))
    return tokens, layout.num_prefix


def load_trained(workdir: str, *, step: int | None = None) -> TrainedModel:
  """Loads the latest (or the given) verified checkpoint of a training run and its saved config.

  Raises:
    CheckpointError (a ValueError): no config.json, no checkpoint, or a partial or corrupt one.
  """
  config = checkpointing.read_config(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  try:
    latest = checkpointer.latest_step()
    if latest is None:
      raise checkpointing.CheckpointError(f"No checkpoint in {checkpointer.directory}; train first.")
    step = latest if step is None else int(step)
    graphdef, abstract = training.abstract_train_state(config)
    # Load onto one local device whatever mesh the run was saved from.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract)
    state = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  model, _ = nnx.merge(graphdef, state)
  return TrainedModel(model=model, config=config, step=step, workdir=workdir)
