"""Compiler stages 2 and 3: a program's blocks to arrays, and the arrays into `kcg.Transformer`.

* `config_for_program`: the smallest `ModelConfig` that carries a program.
* `lower`: float64 NumPy arrays for every parameter, shaped from the model's own abstract state
  (`model.param_shapes`), never from hand-typed parameter paths.
* `assemble`: the arrays into the NNX state of the model class (nnx.eval_shape -> nnx.state ->
  replace -> nnx.update), with a check that tree structure, shapes and dtypes equal those of the
  model's own state.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kcg._src import craft
from kcg._src import model as model_lib
from kcg._src import prompt as prompt_lib


def config_for_program(program: craft.Program, prompt_layout: prompt_lib.PromptLayout,
                       mask: str, param_dtype, attention: str = "linear",
                       norm: str | None = None) -> model_lib.ModelConfig:
  """The smallest `ModelConfig` that carries the program (mask and attention as requested)."""
  req = craft.requirements(program.layout, program.blocks)
  return model_lib.ModelConfig(
      token_dim=prompt_layout.token_dim, width=program.layout.width,
      num_layers=len(program.schedule), param_layers=program.schedule, num_heads=req.num_heads,
      head_dim=req.head_dim, value_dim=req.value_dim, mlp_hidden=req.mlp_hidden,
      attention=attention, attention_scale=1.0, activation="reglu" if req.gated else "relu",
      norm=norm, mask=mask, output_dim=program.layout.size(program.readout), use_bias=True,
      precision="highest", param_dtype=param_dtype)


def lower(program: craft.Program, prompt_layout: prompt_lib.PromptLayout,
          config: model_lib.ModelConfig) -> dict:
  """Float64 NumPy arrays for every parameter, shaped from the model's abstract state."""
  shapes = jax.tree.map(lambda s: s.shape, model_lib.param_shapes(config))
  arrays = {"blocks": craft.lower_blocks(program.layout, program.blocks, dict(shapes["blocks"]))}
  embed = np.zeros(shapes["embed"]["kernel"], np.float64)
  for feature, channel, coef in program.embedding:
    rows = prompt_layout.feature_slice(feature)
    cols = program.layout.slice(channel)
    embed[rows, cols] += craft.as_matrix(coef, rows.stop - rows.start, cols.stop - cols.start)
  readout = np.zeros(shapes["readout"]["kernel"], np.float64)
  readout[program.layout.slice(program.readout), :] = np.eye(program.layout.size(program.readout))
  arrays["embed"] = {"kernel": embed, "bias": np.zeros(shapes["embed"]["bias"])}
  arrays["readout"] = {"kernel": readout, "bias": np.zeros(shapes["readout"]["bias"])}
  if config.norm is not None:
    _pin_norms(arrays, program, config)
  return arrays


# Parameters that read the (normalised) residual stream: [..., D, n] with D on axis -2.
_READS = ("query", "key", "value", "mlp_in", "mlp_value")


def _pin_norms(arrays: dict, program: craft.Program, config: model_lib.ModelConfig) -> None:
  """Pre-norm: gains that undo the pinned normaliser; zero-sum reads for LayerNorm's centring.

  See `transforms.with_norm_pins`: with gains M sqrt(n / D) every norm is the identity (RMSNorm)
  or h - mean(h) (LayerNorm), and a read w with sum_c w_c = 0 sees w . h either way.
  """
  if program.norm_pin is None:
    raise ValueError("A pre-norm model needs a program with pinning channels "
                     "(transforms.with_norm_pins).")
  num_pins = program.layout.size("norm_pin")
  gain = program.norm_pin * math.sqrt(num_pins / config.width)  # a power of two (norm_pin_count)
  for name in arrays["blocks"]:
    if name.endswith("norm_scale"):
      arrays["blocks"][name][...] = gain
  arrays["final_norm_scale"] = np.full((config.width,), gain)
  if config.norm == "layernorm":
    zero = program.layout.slice("norm_zero").start
    reads = [arrays["blocks"][name] for name in _READS if name in arrays["blocks"]]
    for w in reads + [arrays["readout"]["kernel"]]:
      w[..., zero, :] = 0.0
      w[..., zero, :] = -w.sum(axis=-2)
    arrays["final_norm_bias"] = np.zeros((config.width,))


def assemble(config: model_lib.ModelConfig, arrays: dict, dtype) -> model_lib.Transformer:
  """Loads the arrays into the model class through NNX's state API (cast to `dtype`)."""
  model = model_lib.abstract_model(config)
  reference = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(reference)
  filled = jax.tree.map(lambda shape_dtype, a: jnp.asarray(a, dtype), pure, arrays)
  chex.assert_trees_all_equal_shapes(pure, filled)
  chex.assert_trees_all_equal_structs(pure, filled)
  nnx.replace_by_pure_dict(reference, filled)
  nnx.update(model, reference)
  return model
