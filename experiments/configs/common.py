"""Shared pieces of the training configs (big_vision style).

`base_config()` is a ConfigDict holding every field of `kcg.training.TrainConfig` at its default, so
that any field can be overridden on the command line (`--config.optim.learning_rate=3e-4`); fields
whose default is None are typed placeholders. `parse_arg` reads the `:arg` suffix of
`--config=path.py:arg`; `runlocal` shrinks a config to a seconds-long smoke run (what the tests
execute).
"""

from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from kcg import training

_PARTS = {"model": training.ModelSpec, "data": training.DataSpec, "optim": training.OptimSpec,
          "curriculum": training.CurriculumSpec}


def _field_type(cls, name: str):
  """The non-None type of a dataclass field annotated `T | None` (for typed placeholders)."""
  hints = typing.get_type_hints(cls)
  args = [a for a in typing.get_args(hints[name]) if a is not type(None)]
  return args[0] if args else hints[name]


def _as_config_dict(cls, instance) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(cls):
    value = getattr(instance, field.name)
    if value is None:
      out[field.name] = config_dict.placeholder(_field_type(cls, field.name))
    else:
      out[field.name] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every `TrainConfig` field at its default."""
  defaults = training.TrainConfig()
  config = ml_collections.ConfigDict()
  for field in dataclasses.fields(training.TrainConfig):
    if field.name in _PARTS:
      config[field.name] = _as_config_dict(_PARTS[field.name], getattr(defaults, field.name))
    else:
      config[field.name] = getattr(defaults, field.name)
  return config


def parse_arg(arg: str | None) -> set[str]:
  """Options of `--config=file.py:opt1,opt2`; only `runlocal` is known."""
  options = {a for a in (arg or "").split(",") if a}
  unknown = options - {"runlocal"}
  if unknown:
    raise ValueError(f"Unknown config option(s) {sorted(unknown)}; the only option is 'runlocal'.")
  return options


def runlocal(config: ml_collections.ConfigDict, *, num_steps: int = 20) -> ml_collections.ConfigDict:
  """Shrinks `config` to a smoke run of a few seconds: few steps, small batches, tiny evaluation."""
  config.num_steps = num_steps
  config.batch_size = 8
  config.log_every = max(1, num_steps // 4)
  config.eval_every = 0
  config.eval_batch_size = 16
  config.checkpoint_every = max(1, num_steps // 2)
  config.keep_checkpoints = 2
  config.optim.warmup_steps = min(config.optim.warmup_steps, num_steps // 4)
  config.eval_supports = (config.data.num_support,)
  config.eval_baselines = ("least_squares", "averaging")
  if config.curriculum.input_dim_start is not None or config.curriculum.num_support_start is not None:
    config.curriculum.interval = max(1, num_steps // 4)
  return config
