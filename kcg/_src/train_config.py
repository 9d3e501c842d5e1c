"""The configuration of a training run: typed, frozen, validated at construction.

`TrainConfig` is a frozen dataclass of frozen parts (`ModelSpec`, `DataSpec`, `OptimSpec`,
`CurriculumSpec`), built from an ml_collections ConfigDict at the boundary (`config_from_dict`, nanodo
style) and saved as JSON in the work directory (`config_to_dict`). Library code reads no flags.

`ModelSpec` is `kcg.ModelConfig` without the sizes that the prompt encoding fixes (token size, mask,
output size) and the dtype (`TrainConfig.dtype`): its fields are derived from `ModelConfig`'s, so a
field added to the model class is a training option at once, and `ModelConfig`'s own checks validate it.

Validation reads only the config and the libraries it names (`kcg.tasks` for the task, `kcg.baselines`
for the baseline names); nothing here runs a model or an evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import baselines as baselines_lib
from kcg._src import model as model_lib
from kcg._src import prompt as prompt_lib
from kcg._src import tasks as tasks_lib

DECISION_TREE = "decision_tree"
FAMILIES = tasks_lib.FAMILIES + (DECISION_TREE,)
ENCODINGS = ("query", "every_prefix")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "float64")


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1, fix: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}.{fix}")
  return int(value)


def _choice(owner: str, name: str, value: Any, choices: tuple) -> Any:
  if value not in choices:
    raise ValueError(f"Unknown {owner}.{name} {value!r}; choose one of {choices}.")
  return value


def _finite(owner: str, name: str, value: Any, minimum: float, strict: bool) -> float:
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if ok and math.isfinite(float(value)) and (float(value) > minimum or
                                              (not strict and float(value) == minimum)):
    return float(value)
  raise ValueError(f"{owner}.{name} must be a finite number {'>' if strict else '>='} {minimum}, "
                   f"got {value!r}.")


# ----------------------------------------------------------------------------------------------
# The model: ModelConfig's fields less the ones the run fixes.

# Set by the prompt encoding (token size, mask), the scalar regression target and TrainConfig.dtype.
# param_layers (a schedule of stored blocks) serves compiled models; tied_layers is the trained loop.
_FIXED_BY_THE_RUN = ("token_dim", "mask", "output_dim", "param_dtype", "param_layers")
# Defaults that differ from ModelConfig's (which has none for width and depth).
_SPEC_DEFAULTS = {"num_layers": 1, "width": 32, "head_dim": 32, "activation": "gelu"}


class _ModelSpecMethods:
  """Architecture of the learned model: `kcg.ModelConfig` without the prompt-derived sizes.

  Fields: every `kcg.ModelConfig` field except `token_dim`, `mask`, `output_dim` (fixed by
  `DataSpec`'s encoding), `param_dtype` (`TrainConfig.dtype`) and `param_layers`, with the defaults
  `num_layers=1, width=32, head_dim=32, activation="gelu"`; plus `qkv_init_scale`.

  Variants: linear attention without MLP and norm (linear self-attention, `mlp_hidden=0`,
  `norm=None`), linear or softmax attention with MLPs, pre-norm or not, any depth, `tied_layers=True`
  for a looped (weight-tied) stack.

  Unnormalised linear attention is a cubic map of the residual stream per layer, so a deep stack
  without norm diverges at the default initialisation (the residual norm grows like `c^(3^L)`).
  `attention_scale = 1 / num_prefix` (the 1/n of the linear-self-attention literature) together with
  `qkv_init_scale < 1` (multiplies the initial query, key and value weights, so the first updates are
  `qkv_init_scale^3` smaller) keeps it near the identity at initialisation; 1/n and 0.5 train 16
  layers stably.

  `attention_free_layers = n` makes the first n blocks token-wise MLPs without attention ("features,
  then solver": phi(x) is then a function of each token alone); it needs `mlp_hidden > 0` and leaves at
  least one attention block (`n < num_layers`).
  """

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, np.integer):  # ConfigDicts and numpy give numpy scalars.
        object.__setattr__(self, field.name, int(value))
      elif isinstance(value, np.floating):
        object.__setattr__(self, field.name, float(value))
    if isinstance(self.num_layers, int) and not isinstance(self.num_layers, bool) \
        and self.num_layers < 1:
      raise ValueError(
          f"ModelSpec.num_layers (depth) must be >= 1, got {self.num_layers}: a depth-0 transformer "
          "has no attention and cannot learn in context. Use num_layers=1 or more.")
    object.__setattr__(self, "qkv_init_scale",
                       _finite("ModelSpec", "qkv_init_scale", self.qkv_init_scale, 0.0, True))
    if self.attention_scale is not None:
      object.__setattr__(self, "attention_scale",
                         _finite("ModelSpec", "attention_scale", self.attention_scale, 0.0, True))
    try:
      self.model_config(token_dim=1, mask=model_lib.MASKS[0], param_dtype=jnp.float32)
    except ValueError as e:
      # The fields are ModelConfig's and so are the checks; name the class the caller built.
      raise ValueError(str(e).replace("ModelConfig.", "ModelSpec.")) from None
    if self.attention_free_layers >= self.num_layers:
      raise ValueError(f"ModelSpec.attention_free_layers={self.attention_free_layers} leaves no "
                       f"attention block; use fewer than num_layers={self.num_layers}.")

  def model_config(self, *, token_dim: int, mask: str, param_dtype: Any) -> model_lib.ModelConfig:
    """The `kcg.ModelConfig` of this architecture for the given token size, mask and dtype."""
    shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(model_lib.ModelConfig)
              if f.name not in _FIXED_BY_THE_RUN}
    return model_lib.ModelConfig(token_dim=token_dim, mask=mask, output_dim=1,
                                 param_dtype=param_dtype, **shared)


def _model_spec_fields() -> list:
  fields = []
  for field in dataclasses.fields(model_lib.ModelConfig):
    if field.name in _FIXED_BY_THE_RUN:
      continue
    default = _SPEC_DEFAULTS.get(field.name, field.default)
    if default is dataclasses.MISSING:
      raise TypeError(f"ModelConfig.{field.name} has no default; give ModelSpec one.")
    fields.append((field.name, field.type, dataclasses.field(default=default)))
  return fields + [("qkv_init_scale", "float", dataclasses.field(default=1.0))]


ModelSpec = dataclasses.make_dataclass("ModelSpec", _model_spec_fields(), bases=(_ModelSpecMethods,),
                                       frozen=True)
ModelSpec.__module__ = __name__  # For pickling and reprs (make_dataclass's `module=` is Python 3.12+).
ModelSpec.__doc__ = _ModelSpecMethods.__doc__


# ----------------------------------------------------------------------------------------------
# Data, curriculum, optimizer.


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The task family, the prompt sizes at the end of the curriculum, and the encoding.

  Attributes:
    family: a `kcg.tasks` family or `"decision_tree"` (depth-`tree_depth` binary trees splitting on a
      random coordinate at 0 with N(0, 1) leaves, Garg et al. 2022).
    input_dim: d (inputs of earlier curriculum stages are zero-padded to d).
    num_support: k supports. Under `"every_prefix"` a prompt has `k + 1` points.
    num_query: q queries per prompt (`"query"` encoding; `"every_prefix"` uses 1).
    encoding: `"query"` or `"every_prefix"` (see `kcg._src.train_data`).
    mask: `"prefix"` or `"causal"` for `"query"`; `"every_prefix"` needs `"causal"`.
    noise_std, condition_number, input_rotation, covariance_seed, sparsity, hidden_units, feature_seed:
      passed to `kcg.tasks.TaskConfig` (None = the family's default).
    tree_depth: depth of the decision trees.
    glm_targets, glm_scale: `kcg.tasks.TaskConfig.glm_targets` ("sample" or "mean") and `glm_scale` of
      the GLM families.
  """

  family: str = "linear"
  input_dim: int = 10
  num_support: int = 20
  num_query: int = 1
  encoding: str = "query"
  mask: str = "prefix"
  noise_std: float | None = None
  condition_number: float | None = None
  input_rotation: str = "per_prompt"
  covariance_seed: int = 0
  sparsity: int | None = None
  hidden_units: int = 100
  feature_seed: int = 0
  tree_depth: int = 4
  glm_targets: str = "sample"
  glm_scale: float = 1.0

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"Unknown task family {self.family!r}; choose one of {FAMILIES}.")
    for name in ("input_dim", "num_support", "num_query", "hidden_units", "tree_depth"):
      object.__setattr__(self, name, _positive_int("DataSpec", name, getattr(self, name)))
    _choice("DataSpec", "encoding", self.encoding, ENCODINGS)
    _choice("DataSpec", "mask", self.mask, model_lib.MASKS)
    if self.encoding == "every_prefix" and self.mask != "causal":
      raise ValueError("DataSpec.encoding='every_prefix' reads every prefix under a causal mask; set "
                       "mask='causal'.")
    if self.sparsity is not None and self.sparsity > self.input_dim:
      raise ValueError(f"DataSpec.sparsity={self.sparsity} exceeds input_dim={self.input_dim}; use "
                       f"sparsity <= {self.input_dim} (curriculum stages clip it to their dimension).")
    # Building the task configuration runs kcg.tasks' own checks now rather than at the first step.
    task_config(self, self.input_dim, self.num_support, batch_size=1)

  @property
  def num_points(self) -> int:
    """Points per interleaved prompt (`"every_prefix"`): the supports plus one."""
    return self.num_support + 1


@dataclasses.dataclass(frozen=True)
class CurriculumSpec:
  """Growth of input dimension and support count over training; None starts at the final value."""

  input_dim_start: int | None = None
  input_dim_increment: int = 1
  num_support_start: int | None = None
  num_support_increment: int = 2
  interval: int = 2000

  def __post_init__(self):
    for name in ("input_dim_start", "num_support_start"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, _positive_int("CurriculumSpec", name, getattr(self, name)))
    for name in ("input_dim_increment", "num_support_increment"):
      object.__setattr__(self, name,
                         _positive_int("CurriculumSpec", name, getattr(self, name), minimum=0))
    object.__setattr__(self, "interval", _positive_int("CurriculumSpec", "interval", self.interval))


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """AdamW with global-norm clipping and a warmup + cosine or warmup + constant learning rate."""

  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 0
  final_learning_rate_fraction: float = 0.0
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.999

  def __post_init__(self):
    object.__setattr__(self, "learning_rate",
                       _finite("OptimSpec", "learning_rate", self.learning_rate, 0.0, True))
    _choice("OptimSpec", "schedule", self.schedule, SCHEDULES)
    object.__setattr__(self, "warmup_steps",
                       _positive_int("OptimSpec", "warmup_steps", self.warmup_steps, minimum=0))
    for name in ("final_learning_rate_fraction", "weight_decay"):
      object.__setattr__(self, name, _finite("OptimSpec", name, getattr(self, name), 0.0, False))
    if self.clip_norm is not None:
      object.__setattr__(self, "clip_norm", _finite("OptimSpec", "clip_norm", self.clip_norm, 0.0, True))
    for name in ("b1", "b2"):
      value = _finite("OptimSpec", name, getattr(self, name), 0.0, False)
      if value >= 1.0:
        raise ValueError(f"OptimSpec.{name} must be in [0, 1), got {value}.")
      object.__setattr__(self, name, value)


# ----------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; equal configs and seeds give equal numbers.

  Attributes:
    model, data, optim, curriculum: the parts above.
    num_steps: optimizer steps. Raising it on a finished run extends the run (see `kcg.training.train`).
    batch_size: prompts per step (global, across all devices; must divide by the device count).
    seed: initialisation and data seed.
    dtype: "float32" or "float64" (parameters, data and arithmetic).
    log_every: steps between log lines / metrics.jsonl records.
    eval_every: steps between held-out evaluations (0: only at the end).
    eval_batch_size: held-out prompts per evaluation.
    checkpoint_every: steps between checkpoints (the last step is always saved).
    keep_checkpoints: checkpoints kept on disk.
    ood_shifts: `kcg.tasks.SHIFTS` to evaluate out of distribution at the end.
    eval_supports: support counts of the error-vs-supports curve (empty: a default grid up to k).
    eval_baselines: names from `kcg.baselines.default_suite` to compare with (empty: all but kNN
      in the curve, all in the tables).
    final_eval: evaluate on held-out prompts at the end; with a workdir also against the baselines,
      writing eval.json and the PNG curves.
  """

  model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  data: DataSpec = dataclasses.field(default_factory=DataSpec)
  optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
  curriculum: CurriculumSpec = dataclasses.field(default_factory=CurriculumSpec)
  num_steps: int = 1000
  batch_size: int = 64
  seed: int = 0
  dtype: str = "float32"
  log_every: int = 100
  eval_every: int = 0
  eval_batch_size: int = 256
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  ood_shifts: tuple[str, ...] = ()
  eval_supports: tuple[int, ...] = ()
  eval_baselines: tuple[str, ...] = ()
  final_eval: bool = True

  def __post_init__(self):
    for name, part in _PARTS.items():
      if not isinstance(getattr(self, name), part):
        raise ValueError(f"TrainConfig.{name} must be a {part.__name__}, got "
                         f"{type(getattr(self, name)).__name__}.")
    object.__setattr__(self, "num_steps",
                       _positive_int("TrainConfig", "num_steps", self.num_steps, minimum=0))
    for name in ("batch_size", "log_every", "eval_batch_size", "checkpoint_every",
                 "keep_checkpoints"):
      object.__setattr__(self, name, _positive_int("TrainConfig", name, getattr(self, name)))
    object.__setattr__(self, "eval_every",
                       _positive_int("TrainConfig", "eval_every", self.eval_every, minimum=0))
    object.__setattr__(self, "seed", _positive_int("TrainConfig", "seed", self.seed, minimum=0))
    _choice("TrainConfig", "dtype", self.dtype, DTYPES)
    shifts = tuple(self.ood_shifts)
    for shift in shifts:
      _choice("TrainConfig", "ood_shifts entry", shift, tasks_lib.SHIFTS)
    object.__setattr__(self, "ood_shifts", shifts)
    supports = tuple(_positive_int("TrainConfig", "eval_supports entry", k)
                     for k in self.eval_supports)
    object.__setattr__(self, "eval_supports", supports)
    object.__setattr__(self, "eval_baselines", tuple(self.eval_baselines))
    if self.eval_baselines:
      known = baseline_names(self)
      for name in self.eval_baselines:
        _choice("TrainConfig", "eval_baselines entry", name, known)
    c = self.curriculum
    for name, start, end in (("input_dim_start", c.input_dim_start, self.data.input_dim),
                             ("num_support_start", c.num_support_start, self.data.num_support)):
      if start is not None and start > end:
        raise ValueError(f"CurriculumSpec.{name}={start} exceeds the final value {end} in DataSpec.")
    if c.input_dim_start is not None:
      task_config(self.data, c.input_dim_start, c.num_support_start or self.data.num_support, 1)


_PARTS = {"model": ModelSpec, "data": DataSpec, "optim": OptimSpec, "curriculum": CurriculumSpec}
_TUPLE_FIELDS = ("ood_shifts", "eval_supports", "eval_baselines")


def config_from_dict(config: Any) -> TrainConfig:
  """`TrainConfig` from a nested mapping (an ml_collections ConfigDict or the saved JSON dict).

  Unknown keys raise ValueError naming the key and the valid ones, so a typo fails fast.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, dict):
    raise ValueError(f"A training config must be a mapping of TrainConfig fields, got "
                     f"{type(config).__name__}.")
  kwargs = {}
  top_fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for key, value in config.items():
    if key not in top_fields:
      raise ValueError(f"Unknown config key {key!r}; TrainConfig has {sorted(top_fields)}.")
    if key in _PARTS:
      cls = _PARTS[key]
      fields = {f.name for f in dataclasses.fields(cls)}
      if not isinstance(value, dict):
        raise ValueError(f"Config key {key!r} must be a mapping of {cls.__name__} fields, got "
                         f"{type(value).__name__}.")
      unknown = sorted(set(value) - fields)
      if unknown:
        raise ValueError(f"Unknown config key(s) {unknown} in {key!r}; {cls.__name__} has "
                         f"{sorted(fields)}.")
      kwargs[key] = cls(**value)
    elif key in _TUPLE_FIELDS:
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return TrainConfig(**kwargs)


def config_to_dict(config: TrainConfig) -> dict:
  """Plain JSON-ready nested dict; `config_from_dict(config_to_dict(c)) == c`."""
  out = dataclasses.asdict(config)
  for name in _TUPLE_FIELDS:
    out[name] = list(getattr(config, name))
  return out


def dtype_of(config: TrainConfig) -> jnp.dtype:
  """The run's floating dtype; float64 needs `jax_enable_x64`."""
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("TrainConfig.dtype='float64' needs jax.config.update('jax_enable_x64', True) "
                     "before any computation; or use dtype='float32'.")
  return jnp.dtype(config.dtype)


def token_dim(data: DataSpec) -> int:
  """Features per token of the encoding."""
  if data.encoding == "every_prefix":
    return prompt_lib.make_interleaved_layout(data.num_points, data.input_dim).token_dim
  return prompt_lib.make_layout(data.num_support, data.num_query, data.input_dim).token_dim


def model_config(config: TrainConfig) -> model_lib.ModelConfig:
  """The `kcg.ModelConfig` of the run: `ModelSpec` plus the token size and mask of the encoding."""
  return config.model.model_config(token_dim=token_dim(config.data), mask=config.data.mask,
                                   param_dtype=dtype_of(config))


def task_config(data: DataSpec, input_dim: int, num_support: int, batch_size: int, *,
                shift: str = "none") -> tasks_lib.TaskConfig:
  """The `kcg.tasks.TaskConfig` drawing this data's prompts (decision trees draw linear-task inputs)."""
  family = "linear" if data.family == DECISION_TREE else data.family
  num_query = 1 if data.encoding == "every_prefix" else data.num_query
  kwargs = dict(family=family, input_dim=input_dim, num_support=num_support, num_query=num_query,
                batch_size=batch_size, noise_std=data.noise_std,
                condition_number=data.condition_number, input_rotation=data.input_rotation,
                covariance_seed=data.covariance_seed, hidden_units=data.hidden_units,
                feature_seed=data.feature_seed, shift=shift,
                glm_targets=data.glm_targets, glm_scale=data.glm_scale)
  if data.sparsity is not None:
    kwargs["sparsity"] = min(data.sparsity, input_dim)
  elif family == "sparse_linear":
    kwargs["sparsity"] = min(3, input_dim)
  return tasks_lib.TaskConfig(**kwargs)


def baseline_ridge(data: DataSpec) -> float:
  """Ridge of the KRR / CG / GD baselines: the Bayes ridge `noise_var * d` of the linear task
  (`w ~ N(0, I/d)`), floored at 1e-3 so that noiseless prompts keep a well-posed system."""
  noise = task_config(data, data.input_dim, data.num_support, 1).noise_std
  return max(noise**2 * data.input_dim, 1e-3)


def baseline_suite_args(config: TrainConfig) -> dict:
  """Arguments of `kcg.baselines.default_suite` for this run: its ridge, `t = num_layers` solver
  steps (one step per block, the compiled models' budget up to a constant) and kNN with up to 3."""
  return dict(ridge=baseline_ridge(config.data), num_steps=config.model.num_layers,
              num_neighbors=min(3, config.data.num_support))


def baseline_names(config: TrainConfig) -> tuple[str, ...]:
  """Names of the baselines this run can compare with (the keys of its default suite)."""
  return tuple(baselines_lib.default_suite(**baseline_suite_args(config)))
