"""Training in-context learners: the very `kcg.Transformer` that the compiler fills, fitted with optax.

Configuration. `TrainConfig` is a frozen dataclass of frozen parts (`ModelSpec`, `DataSpec`,
`OptimSpec`, `CurriculumSpec`), validated at construction, built from an ml_collections ConfigDict at
the boundary (`config_from_dict`, nanodo style) and saved as JSON in the work directory. Library code
reads no flags.

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

Data. The batch of step `s` is drawn from `fold_in(fold_in(key(seed), 1), s)`: resuming needs no data
state, and the same seed gives the same numbers. Parameters are initialised from `nnx.Rngs(seed)`.

Devices. `make_mesh` puts all devices on one mesh axis `"data"`; batches are sharded over it
(`PartitionSpec("data")`) and parameters and optimizer state are replicated (`PartitionSpec()`). The
jitted step reads and writes these shardings, so XLA inserts the gradient all-reduce. For several
hosts, call `jax.distributed.initialize()` before anything else (the binary does so under
`--distributed`): `jax.devices()` is then global, every process runs the same program, and the
sampler's `out_shardings` make each process materialise only its own shards of the batch. The work
directory must then be on a filesystem all hosts share (orbax writes one checkpoint from all of them;
config, metrics and manifests are written by process 0). The multi-host path is written to the
jax.distributed contract but has only been run with one process here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from kcg._src import checks
from kcg._src import model as model_lib
from kcg._src import prompt as prompt_lib
from kcg._src import tasks as tasks_lib

DECISION_TREE = "decision_tree"
FAMILIES = tasks_lib.FAMILIES + (DECISION_TREE,)
ENCODINGS = ("query", "every_prefix")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "float64")
DATA_AXIS = "data"
_DATA_STREAM = 1
_EVAL_STREAM = 2


# ----------------------------------------------------------------------------------------------
# Configuration.


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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture of the learned model: `kcg.ModelConfig` without the prompt-derived sizes.

  Variants: linear attention without MLP and norm (linear self-attention, `mlp_hidden=0`,
  `norm=None`), linear or softmax attention with MLPs, pre-norm or not, any depth, `tied_layers=True`
  for a looped (weight-tied) stack. `token_dim` and `mask` follow from `DataSpec`.

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

  num_layers: int = 1
  width: int = 32
  num_heads: int = 1
  head_dim: int = 32
  value_dim: int | None = None
  mlp_hidden: int = 0
  attention: str = "linear"
  activation: str = "gelu"
  norm: str | None = None
  tied_layers: bool = False
  use_bias: bool = True
  attention_scale: float | None = None
  qkv_init_scale: float = 1.0
  precision: str = "highest"
  attention_free_layers: int = 0

  def __post_init__(self):
    if isinstance(self.num_layers, (int, np.integer)) and not isinstance(self.num_layers, bool) \
        and self.num_layers < 1:
      raise ValueError(
          f"ModelSpec.num_layers (depth) must be >= 1, got {self.num_layers}: a depth-0 transformer "
          "has no attention and cannot learn in context. Use num_layers=1 or more.")
    for name in ("num_layers", "width", "num_heads", "head_dim"):
      object.__setattr__(self, name, _positive_int("ModelSpec", name, getattr(self, name)))
    if self.value_dim is not None:
      object.__setattr__(self, "value_dim", _positive_int("ModelSpec", "value_dim", self.value_dim))
    object.__setattr__(self, "mlp_hidden",
                       _positive_int("ModelSpec", "mlp_hidden", self.mlp_hidden, minimum=0))
    _choice("ModelSpec", "attention", self.attention, model_lib.ATTENTION_KINDS)
    _choice("ModelSpec", "activation", self.activation, model_lib.ACTIVATIONS)
    _choice("ModelSpec", "norm", self.norm, model_lib.NORMS)
    _choice("ModelSpec", "precision", self.precision, model_lib.PRECISIONS)
    object.__setattr__(self, "qkv_init_scale",
                       _finite("ModelSpec", "qkv_init_scale", self.qkv_init_scale, 0.0, True))
    free = _positive_int("ModelSpec", "attention_free_layers", self.attention_free_layers, minimum=0)
    if free >= self.num_layers or (free and self.mlp_hidden == 0):
      raise ValueError(f"ModelSpec.attention_free_layers={free} needs mlp_hidden > 0 and at least one "
                       f"attention block after it (< num_layers={self.num_layers}).")
    object.__setattr__(self, "attention_free_layers", free)
    if self.attention_scale is not None:
      object.__setattr__(self, "attention_scale",
                         _finite("ModelSpec", "attention_scale", self.attention_scale, 0.0, True))


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The task family, the prompt sizes at the end of the curriculum, and the encoding.

  Attributes:
    family: a `kcg.tasks` family or `"decision_tree"` (depth-`tree_depth` binary trees splitting on a
      random coordinate at 0 with N(0, 1) leaves, Garg et al. 2022).
    input_dim: d (inputs of earlier curriculum stages are zero-padded to d).
    num_support: k supports. Under `"every_prefix"` a prompt has `k + 1` points.
    num_query: q queries per prompt (`"query"` encoding; `"every_prefix"` uses 1).
    encoding: `"query"` or `"every_prefix"` (see the module docstring).
    mask: `"prefix"` or `"causal"` for `"query"`; `"every_prefix"` needs `"causal"`.
    noise_std, condition_number, input_rotation, covariance_seed, sparsity, hidden_units: passed to
      `kcg.tasks.TaskConfig` (None = the family's default).
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; equal configs and seeds give equal numbers.

  Attributes:
    model, data, optim, curriculum: the parts above.
    num_steps: optimizer steps.
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
    for name, part in (("model", ModelSpec), ("data", DataSpec), ("optim", OptimSpec),
                       ("curriculum", CurriculumSpec)):
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
      known = tuple(baseline_suite(self, restrict=False))
      for name in self.eval_baselines:
        _choice("TrainConfig", "eval_baselines entry", name, known)
    c = self.curriculum
    for name, start, end in (("input_dim_start", c.input_dim_start, self.data.input_dim),
                             ("num_support_start", c.num_support_start, self.data.num_support)):
      if start is not None and start > end:
        raise ValueError(f"CurriculumSpec.{name}={start} exceeds the final value {end} in DataSpec.")
    if c.input_dim_start is not None:
      task_config(self.data, c.input_dim_start, c.num_support_start or self.data.num_support, 1)


def config_from_dict(config: Any) -> TrainConfig:
  """`TrainConfig` from a nested mapping (an ml_collections ConfigDict or the saved JSON dict).

  Unknown keys raise ValueError, so a typo in a config file fails fast.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  config = dict(config)
  parts = {"model": ModelSpec, "data": DataSpec, "optim": OptimSpec, "curriculum": CurriculumSpec}
  kwargs = {}
  top_fields = {f.name for f in dataclasses.fields(TrainConfig)}
  for key, value in config.items():
    if key not in top_fields:
      raise ValueError(f"Unknown config key {key!r}; TrainConfig has {sorted(top_fields)}.")
    if key in parts:
      cls = parts[key]
      fields = {f.name for f in dataclasses.fields(cls)}
      value = dict(value)
      unknown = sorted(set(value) - fields)
      if unknown:
        raise ValueError(f"Unknown config key(s) {unknown} in {key!r}; {cls.__name__} has "
                         f"{sorted(fields)}.")
      kwargs[key] = cls(**value)
    elif key in ("ood_shifts", "eval_supports", "eval_baselines"):
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return TrainConfig(**kwargs)


def config_to_dict(config: TrainConfig) -> dict:
  """Plain JSON-ready nested dict; `config_from_dict(config_to_dict(c)) == c`."""
  out = dataclasses.asdict(config)
  out["ood_shifts"] = list(config.ood_shifts)
  out["eval_supports"] = list(config.eval_supports)
  out["eval_baselines"] = list(config.eval_baselines)
  return out


def dtype_of(config: TrainConfig) -> jnp.dtype:
  """The run's floating dtype; float64 needs `jax_enable_x64`."""
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("TrainConfig.dtype='float64' needs jax.config.update('jax_enable_x64', True) "
                     "before any computation; or use dtype='float32'.")
  return jnp.dtype(config.dtype)


def token_dim(data: DataSpec) -> int:
  if data.encoding == "every_prefix":
    return prompt_lib.make_interleaved_layout(data.num_points, data.input_dim).token_dim
  return prompt_lib.make_layout(data.num_support, data.num_query, data.input_dim).token_dim


def model_config(config: TrainConfig) -> model_lib.ModelConfig:
  """The `kcg.ModelConfig` of the run: `ModelSpec` plus the token size and mask of the encoding."""
  m, data = config.model, config.data
  return model_lib.ModelConfig(
      token_dim=token_dim(data), width=m.width, num_layers=m.num_layers, num_heads=m.num_heads,
      head_dim=m.head_dim, value_dim=m.value_dim, mlp_hidden=m.mlp_hidden, attention=m.attention,
      activation=m.activation, norm=m.norm, mask=data.mask, output_dim=1,
      tied_layers=m.tied_layers, use_bias=m.use_bias, attention_scale=m.attention_scale,
      attention_free_layers=m.attention_free_layers, precision=m.precision,
      param_dtype=dtype_of(config))


# ----------------------------------------------------------------------------------------------
# Curriculum and data.


class Stage(NamedTuple):
  """Prompt sizes of a curriculum stage."""

  input_dim: int
  num_support: int


def curriculum_stage(config: TrainConfig, step: int) -> Stage:
  """`(d_s, k_s)` at `step`: grows by the increments every `interval` steps up to the final sizes."""
  c, data = config.curriculum, config.data
  stage = step // c.interval

  def grow(start, increment, end):
    return end if start is None else min(end, start + increment * stage)

  return Stage(grow(c.input_dim_start, c.input_dim_increment, data.input_dim),
               grow(c.num_support_start, c.num_support_increment, data.num_support))


def task_config(data: DataSpec, input_dim: int, num_support: int, batch_size: int, *,
                shift: str = "none") -> tasks_lib.TaskConfig:
  """The `kcg.tasks.TaskConfig` drawing this data's prompts (decision trees draw linear-task inputs)."""
  family = "linear" if data.family == DECISION_TREE else data.family
  num_query = 1 if data.encoding == "every_prefix" else data.num_query
  kwargs = dict(family=family, input_dim=input_dim, num_support=num_support, num_query=num_query,
                batch_size=batch_size, noise_std=data.noise_std,
                condition_number=data.condition_number, input_rotation=data.input_rotation,
                covariance_seed=data.covariance_seed, hidden_units=data.hidden_units, shift=shift,
                glm_targets=data.glm_targets, glm_scale=data.glm_scale)
  if data.sparsity is not None:
    kwargs["sparsity"] = min(data.sparsity, input_dim)
  elif family == "sparse_linear":
    kwargs["sparsity"] = min(3, input_dim)
  return tasks_lib.TaskConfig(**kwargs)


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
def _sample_jit(key, data: DataSpec, input_dim: int, num_support: int, batch_size: int,
                shift: str) -> tasks_lib.Prompts:
  key_inputs, key_tree, key_noise = jax.random.split(key, 3)
  cfg = task_config(data, input_dim, num_support, batch_size, shift=shift)
  prompts = tasks_lib.sample(key_inputs, cfg)
  if data.family != DECISION_TREE:
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


def sample_prompts(key: jax.Array, data: DataSpec, *, batch_size: int,
                   input_dim: int | None = None, num_support: int | None = None,
                   shift: str = "none") -> tasks_lib.Prompts:
  """Raw prompts of `data`'s family: x [B, k, d_s] (not padded), y [B, k], x_query [B, q', d_s], ...

  `q' = data.num_query` for the `"query"` encoding and 1 for `"every_prefix"`.
  """
  _choice("sample_prompts", "shift", shift, tasks_lib.SHIFTS)
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


def make_batch(prompts: tasks_lib.Prompts, data: DataSpec, dtype: Any) -> Batch:
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


def data_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)


def eval_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _EVAL_STREAM)


def training_batch(config: TrainConfig, step: int) -> Batch:
  """The batch of `step` (unsharded): a pure function of (config, step)."""
  stage = curriculum_stage(config, step)
  prompts = sample_prompts(jax.random.fold_in(data_key(config.seed), step), config.data,
                           batch_size=config.batch_size, input_dim=stage.input_dim,
                           num_support=stage.num_support)
  return make_batch(prompts, config.data, dtype_of(config))


# ----------------------------------------------------------------------------------------------
# Model, loss, optimizer.


def init_model(config: TrainConfig) -> model_lib.Transformer:
  """A freshly initialised model: `kcg.Transformer(model_config(config), rngs=nnx.Rngs(seed))` with
  the query, key and value weights multiplied by `qkv_init_scale`."""
  model = model_lib.Transformer(model_config(config), rngs=nnx.Rngs(config.seed))
  scale = config.model.qkv_init_scale
  if scale != 1.0:
    for name in ("query", "key", "value"):
      param = getattr(model.blocks, name)
      param[...] = param[...] * jnp.asarray(scale, param[...].dtype)
  return model


def readout(data: DataSpec, outputs_BxTxO: jax.Array) -> jax.Array:
  """Predictions [B, P] that the loss scores: the query tokens, or every x-token."""
  if data.encoding == "query":
    num_query = data.num_query
    return outputs_BxTxO[:, outputs_BxTxO.shape[1] - num_query:, 0]
  return outputs_BxTxO[:, 0::2, 0]


def num_prefix(data: DataSpec, tokens_BxTxF: jax.Array) -> int:
  """Prefix length for mask="prefix": all tokens before the queries."""
  return tokens_BxTxF.shape[1] - (data.num_query if data.encoding == "query" else 0)


def loss_fn(model: model_lib.Transformer, batch: Batch, data: DataSpec) -> jax.Array:
  """Weighted mean squared error `sum w (f(prompt) - y)^2 / sum w` over the scored positions."""
  outputs = model(batch.tokens, num_prefix=num_prefix(data, batch.tokens)).outputs
  predictions = readout(data, outputs)
  assert predictions.shape == batch.targets.shape, (predictions.shape, batch.targets.shape)
  squared = jnp.square(predictions - batch.targets) * batch.weights
  return jnp.sum(squared) / jnp.sum(batch.weights)


def learning_rate_schedule(optim: OptimSpec, num_steps: int) -> optax.Schedule:
  """count -> learning rate: linear warmup from 0 over `warmup_steps`, then a cosine decay from `lr` to
  `final_learning_rate_fraction * lr` at `num_steps` ("cosine"), or `lr` ("constant").

  Written out rather than taken from optax so that it computes in float32 from an integer count
  under `jax_numpy_dtype_promotion="strict"` (optax's schedules mix Python floats and int32).
  """
  lr, final = optim.learning_rate, optim.final_learning_rate_fraction
  warmup = min(optim.warmup_steps, num_steps)
  decay_steps = max(num_steps - warmup, 1)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    scale = jnp.minimum(step / warmup, 1.0) if warmup > 0 else jnp.ones((), jnp.float32)
    if optim.schedule == "cosine":
      progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      scale = scale * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return lr * scale

  return schedule


def _decay_mask(params):
  """Weight decay on weight matrices only: not on biases or norm scales."""

  def decays(path, _):
    names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
    name = names[-1] if names else ""
    return not ("bias" in name or "norm" in name)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """clip_by_global_norm (optional) followed by AdamW on the schedule."""
  optim = config.optim
  adamw = optax.adamw(learning_rate_schedule(optim, config.num_steps), b1=optim.b1, b2=optim.b2,
                      weight_decay=optim.weight_decay, mask=_decay_mask)
  if optim.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)


def init_train_state(config: TrainConfig) -> tuple[model_lib.Transformer, nnx.Optimizer]:
  """A fresh model and its `nnx.Optimizer(model, tx, wrt=nnx.Param)`."""
  model = init_model(config)
  return model, nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)


@functools.lru_cache(maxsize=16)
def _init_state_jit(config: TrainConfig, mesh: Mesh) -> Callable:
  return jax.jit(lambda: nnx.state(init_train_state(config)), out_shardings=replicated(mesh))


def init_state(config: TrainConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """`(graphdef, state)` of a fresh `(model, optimizer)`, initialised in one jitted call (eager init
  dispatches, and on first use compiles, every random draw separately) and replicated over `mesh`."""
  graphdef, _ = abstract_train_state(config)
  return graphdef, _init_state_jit(config, mesh)()


def abstract_train_state(config: TrainConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """`(graphdef, state)` with shapes only: the restore target of a checkpoint."""
  return nnx.split(nnx.eval_shape(lambda: init_train_state(config)))


# ----------------------------------------------------------------------------------------------
# Devices.


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh named "data" over `devices` (default: `jax.devices()`, all devices of all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "TrainConfig.batch_size") -> None:
  num = mesh.shape[DATA_AXIS]
  if batch_size % num:
    raise ValueError(
        f"{what}={batch_size} does not divide across the {num} devices of the data mesh; use a "
        f"multiple of {num} (e.g. {num * max(1, batch_size // num)}) or fewer devices.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@functools.lru_cache(maxsize=16)
def train_step_fn(config: TrainConfig, mesh: Mesh) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)` of `state = nnx.state((model, optimizer))`.

  One AdamW step on `loss_fn`; the state is replicated over the mesh and the batch sharded along
  "data", so XLA all-reduces the gradients. Cached per (config, mesh), so repeated runs in one
  process compile once.
  """
  graphdef, _ = abstract_train_state(config)
  data = config.data

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, data))(model)
    # optax's Adam bias correction raises a Python float to an int32 count; let it promote even when
    # the caller runs jax_numpy_dtype_promotion="strict" (as kcg's tests do).
    with jax.numpy_dtype_promotion("standard"):
      optimizer.update(model, grads)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return nnx.state((model, optimizer)), metrics

  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


@functools.lru_cache(maxsize=64)
def _batch_sampler(data: DataSpec, stage: Stage, batch_size: int, dtype_name: str,
                   mesh: Mesh) -> Callable:
  def sample(key):
    prompts = _sample_jit(key, data, stage.input_dim, stage.num_support, batch_size, "none")
    return make_batch(prompts, data, jnp.dtype(dtype_name))

  return jax.jit(sample, out_shardings=batch_sharding(mesh))


def make_batch_fn(config: TrainConfig, mesh: Mesh) -> Callable[[int], Batch]:
  """step -> the `Batch` of that step, sharded over the mesh; one jitted sampler per curriculum stage."""
  check_batch_divides(config.batch_size, mesh)
  dtype_name = dtype_of(config).name

  def batch_at(step: int) -> Batch:
    key = jax.random.fold_in(data_key(config.seed), step)
    stage = curriculum_stage(config, step)
    return _batch_sampler(config.data, stage, config.batch_size, dtype_name, mesh)(key)

  return batch_at


def _host_scalar(x: jax.Array) -> float:
  """A replicated scalar as a float; reads the local copy so that it also works across hosts."""
  return float(np.asarray(x.addressable_data(0)))


# ----------------------------------------------------------------------------------------------
# Prediction and evaluation.


def predict(model: model_lib.Transformer, data: DataSpec, x_support: Any, y_support: Any,
            x_query: Any) -> jax.Array:
  """Predictions [B, q] of a trained model for x_support [B,k,d'], y_support [B,k], x_query [B,q,d'].

  Inputs with `d' < d` are zero-padded (as in the curriculum); any `k >= 1` runs (the model has no
  positional embedding), but a model has only learned the prompt lengths it was trained on. Computes
  in the (floating) dtype of the inputs.
  """
  x_support, y_support, x_query = (jnp.asarray(a) for a in (x_support, y_support, x_query))
  if x_support.ndim != 3 or y_support.ndim != 2 or x_query.ndim != 3:
    raise ValueError(f"predict needs x_support [B,k,d], y_support [B,k], x_query [B,q,d]; got "
                     f"{x_support.shape}, {y_support.shape}, {x_query.shape}.")
  batch, k, d_in = x_support.shape
  q = x_query.shape[1]
  layout = prompt_lib.make_layout(k, q, d_in)
  x_support, y_support, x_query = prompt_lib.validate_prompt(layout, x_support, y_support, x_query)
  x_support = pad_inputs(x_support, data.input_dim)
  x_query = pad_inputs(x_query, data.input_dim)
  if data.encoding == "query":
    layout = prompt_lib.make_layout(k, q, data.input_dim)
    tokens = prompt_lib.encode(layout, x_support, y_support, x_query)
    out = model(tokens, num_prefix=layout.num_prefix).outputs
    return prompt_lib.query_outputs(layout, out)
  # One causal sequence of k + 1 points per query; the last point's y-token is zero and unread.
  d = data.input_dim
  xs = jnp.broadcast_to(x_support[:, None], (batch, q, k, d))
  x_points = jnp.concatenate([xs, x_query[:, :, None]], axis=2).reshape(batch * q, k + 1, d)
  ys = jnp.broadcast_to(y_support[:, None], (batch, q, k))
  y_points = jnp.concatenate([ys, jnp.zeros((batch, q, 1), ys.dtype)], axis=2)
  y_points = y_points.reshape(batch * q, k + 1)
  layout = prompt_lib.make_interleaved_layout(k + 1, d)
  out = model(prompt_lib.encode_interleaved(layout, x_points, y_points)).outputs
  return prompt_lib.interleaved_predictions(layout, out)[:, k].reshape(batch, q)


@functools.lru_cache(maxsize=16)
def _predict_jit(config: model_lib.ModelConfig, data: DataSpec) -> Callable:
  graphdef, _ = nnx.split(model_lib.abstract_model(config))
  return jax.jit(lambda state, xs, ys, xq: predict(nnx.merge(graphdef, state), data, xs, ys, xq))


def make_predict_fn(model: model_lib.Transformer, data: DataSpec) -> Callable:
  """`predict` of this model, jitted with the parameters as an argument (not baked-in constants)
  and cached per architecture, so evaluating many checkpoints compiles once per prompt shape."""
  _, state = nnx.split(model)
  fn = _predict_jit(model.config, data)

  def predict_fn(x_support, y_support, x_query):
    for name, value in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query)):
      checks.check_finite(name, value)  # Under jit only shapes can be checked.
    return fn(state, x_support, y_support, x_query)

  return predict_fn


def baseline_ridge(data: DataSpec) -> float:
  """Ridge of the KRR / CG / GD baselines: the Bayes ridge `noise_var * d` of the linear task
  (`w ~ N(0, I/d)`), floored at 1e-3 so that noiseless prompts keep a well-posed system."""
  noise = task_config(data, data.input_dim, data.num_support, 1).noise_std
  return max(noise**2 * data.input_dim, 1e-3)


def baseline_suite(config: TrainConfig, restrict: bool = True) -> dict:
  """`kcg.baselines.default_suite` with the run's ridge and `t = num_layers` solver steps (one step
  per block, the compiled models' budget up to a constant), restricted to `config.eval_baselines`
  unless `restrict=False` (every name, for validating them)."""
  from kcg._src import baselines as baselines_lib

  k = config.data.num_support
  suite = baselines_lib.default_suite(baseline_ridge(config.data), config.model.num_layers,
                                      num_neighbors=min(3, k))
  if restrict and config.eval_baselines:
    suite = {name: suite[name] for name in config.eval_baselines}
  return suite


def default_support_grid(data: DataSpec) -> tuple[int, ...]:
  k = data.num_support
  grid = {max(1, round(k * f)) for f in (0.25, 0.5)} | {1, k}
  return tuple(sorted(int(g) for g in grid))


def evaluate_trained(model: model_lib.Transformer, config: TrainConfig, key: jax.Array, *,
                     num_prompts: int | None = None) -> dict:
  """Held-out evaluation of a trained model against the reference predictors (`kcg.evaluation`).

  Returns a JSON-ready dict: `in_distribution` (`kcg.evaluation.evaluate` at the final stage's sizes),
  `gd_fit` / `gd_preconditioner_fit` (`fit_gd_step`, `fit_gd_preconditioner`: how well one GD step
  explains the predictions), `error_vs_supports` (model and baseline mse for each support count) and
  `ood` (`evaluate` under each of `config.ood_shifts`). Errors are against the observed `y_query`;
  `mse_noiseless` against the noiseless `f_query`.
  """
  from kcg._src import evaluation as evaluation_lib

  data = config.data
  dtype = dtype_of(config)
  num_prompts = config.eval_batch_size if num_prompts is None else num_prompts
  predict_fn = make_predict_fn(model, data)
  suite = baseline_suite(config)

  def sample_fn(key, num_support, shift="none"):
    prompts = sample_prompts(key, data, batch_size=num_prompts, num_support=int(num_support),
                             shift=shift)
    return tasks_lib.Prompts(*(jnp.asarray(a, dtype) for a in prompts))

  key_id, key_ood = jax.random.split(key)
  supports = sorted(config.eval_supports or default_support_grid(data))
  largest = sample_fn(key_id, max(supports[-1], data.num_support))

  def first_supports(_, num_support):
    # Supports are i.i.d., so the first k of a larger prompt form a k-support prompt; one draw (one
    # compilation) serves every k, and the curve's points are paired.
    return largest._replace(x_support=largest.x_support[:, :num_support],
                            y_support=largest.y_support[:, :num_support],
                            f_support=largest.f_support[:, :num_support])

  prompts = first_supports(None, data.num_support)
  predictions = predict_fn(prompts.x_support, prompts.y_support, prompts.x_query)
  out = {"in_distribution": evaluation_lib.evaluate(predict_fn, prompts, suite),
         "num_support": data.num_support, "baseline_ridge": baseline_ridge(data)}
  fit = evaluation_lib.fit_gd_step(predictions, prompts)
  out["gd_fit"] = {name: float(value) for name, value in fit._asdict().items()}
  if data.input_dim**2 <= num_prompts * predictions.shape[1]:
    fit = evaluation_lib.fit_gd_preconditioner(predictions, prompts)
    out["gd_preconditioner_fit"] = {name: float(value) for name, value in fit._asdict().items()
                                    if name != "eta"}
  curve = evaluation_lib.error_vs_num_support(
      predict_fn, first_supports, supports, key_id,
      baselines={name: fn for name, fn in suite.items() if not name.startswith("knn")})
  out["error_vs_supports"] = {
      "num_support": curve.num_support.tolist(), "model": curve.mse.tolist(),
      "model_stderr": curve.mse_stderr.tolist(),
      **{name: values.tolist() for name, values in curve.baseline_mse.items()}}
  out["ood"] = {}
  for i, shift in enumerate(config.ood_shifts):
    k = data.num_support
    if shift == "orthogonal_query":
      k = min(k, data.input_dim - 1)  # Needs supports that do not span R^d.
      if k < 1:
        continue
    if shift == "skewed_covariance" and task_config(data, data.input_dim, k, 1).condition_number != 1:
      out["ood"][shift] = {"skipped": "skewed_covariance replaces a condition_number > 1 spectrum"}
      continue
    shifted = sample_fn(jax.random.fold_in(key_ood, i), k, shift)
    out["ood"][shift] = {"num_support": k, **evaluation_lib.evaluate(predict_fn, shifted, suite)}
  return out


def support_curves(evaluation: dict) -> dict:
  """{name: {"num_support", "mse"}} from `evaluate_trained(...)["error_vs_supports"]`, for plotting."""
  curve = evaluation["error_vs_supports"]
  return {name: {"num_support": curve["num_support"], "mse": values}
          for name, values in curve.items() if name not in ("num_support", "model_stderr")}


# ----------------------------------------------------------------------------------------------
# The training loop.


class TrainResult(NamedTuple):
  """What `train` returns.

  Attributes:
    model: the trained `kcg.Transformer` (replicated arrays).
    optimizer: its `nnx.Optimizer`.
    step: the step reached.
    history: the metrics records written (list of dicts).
  """

  model: model_lib.Transformer
  optimizer: nnx.Optimizer
  step: int
  history: list


def train(config: TrainConfig, workdir: str | None = None, *, stop_at_step: int | None = None,
          devices: Any = None, evaluate_fn: Callable | None = None) -> TrainResult:
  """Trains `config`; with a workdir, checkpoints there and resumes from its latest checkpoint.

  Args:
    config: the run.
    workdir: where config.json, metrics.jsonl, checkpoints and plots go (None: nothing written).
    stop_at_step: stop after this step (saving a checkpoint) as if killed; a later call resumes.
    devices: devices of the data mesh (default all).
    evaluate_fn: optional `(model, config, step) -> dict` of extra metrics, logged at each eval.

  Returns:
    TrainResult.
  """
  from kcg._src import checkpointing  # The training loop owns the checkpoint format.

  if not isinstance(config, TrainConfig):
    raise ValueError(f"train needs a TrainConfig (see config_from_dict), got {type(config).__name__}.")
  mesh = make_mesh(devices)
  check_batch_divides(config.batch_size, mesh)
  dtype_of(config)
  end_step = config.num_steps if stop_at_step is None else min(config.num_steps, int(stop_at_step))

  graphdef, abstract = abstract_train_state(config)
  step_fn = train_step_fn(config, mesh)
  state = None
  start_step = 0
  manager = None
  metrics_file = None
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    checkpointing.write_config(workdir, config)
    manager = checkpointing.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every)
    try:
      latest = manager.latest_step()
      if latest is not None:
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), abstract)
        state = manager.restore(latest, target)
        start_step = latest
        logging.info("Resumed from step %d in %s.", latest, workdir)
    except Exception:
      manager.close()
      raise
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0:
      _truncate_history(metrics_path, start_step)
    metrics_file = open(metrics_path, "a")
  if state is None:
    _, state = init_state(config, mesh)

  batch_at = make_batch_fn(config, mesh)
  history = []

  def record(entry):
    history.append(entry)
    if metrics_file is not None and jax.process_index() == 0:
      metrics_file.write(json.dumps(entry) + "\n")
      metrics_file.flush()

  schedule = learning_rate_schedule(config.optim, config.num_steps)
  pending = []
  interval_start = time.perf_counter()
  interval_steps = 0
  try:
    for step in range(start_step, end_step):
      state, metrics = step_fn(state, batch_at(step))
      pending.append(metrics)
      interval_steps += 1
      done = step + 1
      if step == start_step:
        # Keep compilation out of the steps/s of the first interval.
        jax.block_until_ready(metrics)
        logging.info("first step (compilation included) took %.2f s",
                     time.perf_counter() - interval_start)
        interval_start, interval_steps = time.perf_counter(), 0
      if done % config.log_every == 0 or done == end_step:
        losses = [_host_scalar(m["loss"]) for m in pending]
        grad_norm = _host_scalar(pending[-1]["grad_norm"])
        elapsed = time.perf_counter() - interval_start
        stage = curriculum_stage(config, step)
        entry = {"step": done, "loss": float(np.mean(losses)), "grad_norm": grad_norm,
                 "learning_rate": float(schedule(step)),
                 "steps_per_sec": interval_steps / elapsed if interval_steps else None,
                 "input_dim": stage.input_dim, "num_support": stage.num_support}
        record(entry)
        logging.info("step %d/%d  loss %.4g  %.1f steps/s  lr %.3g  d=%d k=%d", done,
                     config.num_steps, entry["loss"], entry["steps_per_sec"] or float("nan"),
                     entry["learning_rate"], stage.input_dim, stage.num_support)
        pending = []
        interval_steps = 0
        interval_start = time.perf_counter()
      if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
        model_now, _ = nnx.merge(graphdef, state)
        record(_eval_record(model_now, config, done, evaluate_fn))
        interval_start = time.perf_counter()
      if manager is not None and (done % config.checkpoint_every == 0 or done == end_step):
        manager.save(done, state)
        interval_start = time.perf_counter()
    final_step = max(end_step, start_step)
    model, optimizer = nnx.merge(graphdef, state)
    if final_step == config.num_steps and start_step < config.num_steps and config.final_eval:
      record(_eval_record(model, config, final_step, evaluate_fn))
      if workdir is not None:
        metrics_file.close()
        write_final_evaluation(workdir, model, config)
  finally:
    if metrics_file is not None and not metrics_file.closed:
      metrics_file.close()
    if manager is not None:
      manager.close()
  return TrainResult(model, optimizer, final_step, history)


def write_final_evaluation(workdir: str, model: model_lib.Transformer, config: TrainConfig) -> dict:
  """Runs `evaluate_trained` and writes `eval.json`, `loss.png` and `error_vs_supports.png`."""
  evaluation = evaluate_trained(model, config, jax.random.fold_in(eval_key(config.seed), 1))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(evaluation, f, indent=2)
    write_plots(workdir, load_history(workdir), support_curves(evaluation))
  ind = evaluation["in_distribution"]
  logging.info("final: model mse %.4g (noiseless %.4g); %s", ind["mse"], ind.get("mse_noiseless", float("nan")),
               ", ".join(f"{n} {b['mse']:.4g}" for n, b in ind["baselines"].items()))
  return evaluation


def _eval_record(model, config: TrainConfig, step: int, evaluate_fn) -> dict:
  data = config.data
  prompts = sample_prompts(eval_key(config.seed), data, batch_size=config.eval_batch_size)
  dtype = dtype_of(config)
  pred = make_predict_fn(model, data)(*(jnp.asarray(a, dtype) for a in (
      prompts.x_support, prompts.y_support, prompts.x_query)))
  entry = {"step": step,
           "eval_mse": float(jnp.mean(jnp.square(pred - jnp.asarray(prompts.f_query, dtype)))),
           "eval_mse_observed": float(jnp.mean(jnp.square(pred - jnp.asarray(prompts.y_query, dtype))))}
  if evaluate_fn is not None:
    entry.update(evaluate_fn(model, config, step))
  logging.info("eval at step %d: mse %.4g", step, entry["eval_mse"])
  return entry


def _truncate_history(path: str, step: int) -> None:
  """Drops records after `step` (logged by a run killed after its last checkpoint), so that a
  resumed run's metrics.jsonl reads like an uninterrupted one."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def load_history(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_plots(workdir: str, history: list[dict], curves: dict | None = None) -> list[str]:
  """loss.png (training loss vs step) and, given curves {name: {"num_support", "mse"}},
  error_vs_supports.png; Agg canvas, no global matplotlib state. Returns the paths written."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  paths = []
  train = [h for h in history if "loss" in h]
  if train:
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    evals = [h for h in history if "eval_mse" in h]
    if evals:
      ax.plot([h["step"] for h in evals], [h["eval_mse"] for h in evals], "o-", label="held-out mse")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("step")
    ax.set_ylabel("mean squared error")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(workdir, "loss.png"))
    fig.savefig(paths[-1], dpi=120)
  if curves:
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
      ax.plot(curve["num_support"], curve["mse"], "o-" if name == "model" else "--", label=name)
    ax.set_yscale("log")
    # Exact solvers reach ~1e-13 on noiseless prompts; keep the learned curves readable.
    lowest = min(min(c["mse"]) for c in curves.values())
    ax.set_ylim(bottom=max(lowest * 0.5, 1e-4))
    ax.set_xlabel("number of supports k")
    ax.set_ylabel("query mean squared error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "error_vs_supports.png"))
    fig.savefig(paths[-1], dpi=120)
  return paths

