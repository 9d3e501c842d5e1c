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
from kcg._src import train_config as config_lib
from kcg._src import train_data as data_lib
from kcg._src import train_eval as eval_lib
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
  config: config_lib.TrainConfig
  step: int
  workdir: str

  def predict(self, x_support: Any, y_support: Any, x_query: Any) -> jax.Array:
    """Query predictions [B, q] from x_support [B,k,d], y_support [B,k], x_query [B,q,d].

    `d` may be smaller than the trained input dimension (inputs are zero-padded, as in training).
    Jitted and cached per prompt shape.
    """
    return eval_lib.make_predict_fn(self.model, self.config.data)(x_support, y_support, x_query)

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
    tokens = prompt_lib.encode(layout, data_lib.pad_inputs(x_support, data.input_dim), y_support,
                               data_lib.pad_inputs(x_query, data.input_dim))
    return tokens, layout.num_prefix


def load_trained(workdir: str, *, step: int | None = None) -> TrainedModel:
  """Loads the newest verified (or the given) checkpoint of a training run and its saved config.

  Reads only: safe while a trainer is writing to `workdir`. Newer checkpoints that fail
  verification (damaged, or a save still in progress) are skipped with a logged warning.

  Raises:
    CheckpointError (a ValueError): no config.json, no verified checkpoint, the requested step is
      partial or corrupt, or its parameters hold NaN or Inf.
  """
  config = checkpointing.read_config(workdir)
  if step is None:
    step = checkpointing.latest_verified_step(workdir)
    if step is None:
      on_disk = checkpointing.checkpoint_steps(workdir)
      raise checkpointing.CheckpointError(
          f"No verified checkpoint in {checkpointing.checkpoint_dir(workdir)}"
          + (f" (steps {on_disk} failed verification, see the warnings)" if on_disk else "")
          + "; train first.")
  graphdef, abstract = training.abstract_train_state(config)
  # Load onto one local device whatever mesh the run was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  state = checkpointing.restore(workdir, int(step), abstract)
  model, _ = nnx.merge(graphdef, state)
  return TrainedModel(model=model, config=config, step=int(step), workdir=workdir)
