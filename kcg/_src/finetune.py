"""From compiled to trained: gradient descent started at exact CG, and CG learned from random init.

The compiled and trained models are one class (`kcg.Transformer`), so a `kcg.compile_cg` model can be
handed straight to the training code (`kcg.training.loss_fn`, `make_optimizer`, `make_batch`). Five
ways to start and what is trained (`MODES`):

* ``plain``: every parameter of the compiled model, AdamW as for any trained model. The reciprocal's
  ReLU guess has weights up to ~1e35 (float32) / ~1e79 (float64) and its flags stay off at every token
  but the aggregator only because their pre-activation is exactly 0; an AdamW step moves every
  parameter by ~lr whatever its scale, so one step is expected to break the division (measured in
  `experiments/finetune.py`).
* ``freeze_reciprocal``: every parameter except the division (the heads and ReLU units whose typed identity,
  `kcg.ops.Op`, is the reciprocal's `GUESS` or a `NEWTON` step);
  the frozen entries get a zero update, before and after AdamW, so they stay bit-identical.
* ``gains``: the compiled weights are frozen and the model learns a multiplier per (layer, head) and
  per layer (`GainedTransformer`, initialised at 1: the model's own `head_mask` / `layer_mask`
  arguments), so the model is exactly the compiled one at initialisation and every parameter is O(1).
* ``compute_gains``: ``gains`` with the bookkeeping and the division held at 1 (`compute_gain_mask`):
  only heads that compute a value (mat-vecs, reductions, step sizes, updates, directions) have a
  trained gain, and a layer gain is trained only where its layer holds no frozen head or unit. A gain
  of 1 + delta on a head that clears a channel leaves -delta times the old value there, which can turn
  the next p.Ap or r.r non-positive and the reciprocal's input out of its range (measured:
  relu_features gains diverge at step 1 this way); a gain on a head that computes a positive quantity
  keeps it positive.
* ``random``: the same architecture (depth, width, heads, MLP, layer schedule) from a random init.

`imitation_targets` gives the "learning CG" task: the compiled float64 model's predictions as targets.

Two task families (`Setup.features`): noisy linear regression on x ("identity"), and targets linear in a
fixed random-ReLU layer phi ("random_relu", kcg.tasks' "relu_features") that the compiled model
computes as its first layer; the references (KRR oracle, CG_t) are then computed on phi(x).

Measures at checkpoints (`evaluate`): test error against the noiseless targets and against the KRR
oracle, agreement with CG_t (pooled R^2 and relative error, `kcg.alignment.agreement`), the
y-linearity index (`kcg.alignment.y_nonlinearity`: 0 for predictors affine in y, > 0 for CG), whether
the reciprocal still divides (`reciprocal_error`: max |s x - 1| over the (s, 1/s) channel pairs at the
aggregator after each step's last Newton layer), and the distance of the weights from the compiled ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kcg._src import checkpointing
from kcg._src import compiler
from kcg._src import craft
from kcg._src import finetune_measures
from kcg._src import model as model_lib
from kcg._src import ops
from kcg._src import prompt as prompt_lib
from kcg._src import reciprocal as recip
from kcg._src import solvers
from kcg._src import tasks as tasks_lib
from kcg._src import train_config as config_lib
from kcg._src import train_data as data_lib
from kcg._src import train_optim as optim_lib
from kcg._src import training
from kcg._src.alignment_measures import agreement
from kcg._src.alignment_measures import y_nonlinearity

MODES = ("plain", "freeze_reciprocal", "gains", "compute_gains", "random")
CONSTRUCTIONS = {"dual_prefix": ("dual", "prefix"), "primal_causal": ("primal", "causal")}
# Setup.features -> the task family's short name (keys of runs and the report's sections).
FEATURES = {"identity": "linear", "random_relu": "relu_features"}
# The scalar channels that hold s and its reciprocal at the aggregator (CG: r.r and p.Ap).
RECIPROCAL_PAIRS = (("pAp", "inv_pAp"), ("rr", "inv_rr"))
_RECIPROCAL_OPS = (ops.Op.GUESS, ops.Op.NEWTON)
# Axis of the per-head / per-unit index in each block parameter (axis 0 is the stored block). Checked
# against the model's abstract state in `reciprocal_mask`, so a change of the model's layout fails loudly.
_HEAD_AXIS = {"query": 1, "key": 1, "value": 1, "attn_out": 1}
_UNIT_AXIS = {"mlp_in": 2, "mlp_value": 2, "mlp_in_bias": 1, "mlp_out": 1}


@dataclasses.dataclass(frozen=True)
class Setup:
  """One compiled starting point and its task.

  Two task families, each the one its compiled model is Bayes-optimal for at t -> infinity:

  * features="identity" ("linear"): y = w^T x + noise_std eps, w ~ N(0, I/d) (kcg.tasks'
    "noisy_linear"); CG on the linear kernel of x, ridge noise_std^2 d.
  * features="random_relu" ("relu_features"): y = w^T phi(x) + noise_std eps with
    phi(x) = relu(W x + b) / sqrt(m), (W, b) fixed by feature_seed (`kcg.tasks.relu_feature_params`)
    and w ~ N(0, v I_m), v = `kcg.tasks.RELU_FEATURES_WEIGHT_VARIANCE` (= 2, so Var f = 1). The
    compiled model's first layer computes the same phi (`compile_cg(features="random_relu")`), its
    upper stack runs CG on K = Phi Phi^T at the ridge noise_std^2 / v: the posterior mean of
    f(x*) is phi(x*)^T Phi^T (Phi Phi^T + (noise_std^2 / v) I)^-1 y.

  Attributes:
    construction: a key of `CONSTRUCTIONS` ("dual_prefix": per-support dual CG under the prefix mask;
      "primal_causal": primal CG in the aggregator under the causal mask).
    num_steps: t, CG steps compiled.
    input_dim: d (the prompt holds raw x in both families).
    num_support: k.
    num_query: q queries per prompt.
    noise_std: label noise; sets the Bayes ridge (above), floored at 1e-3 as for kcg's baselines.
    features: a `FEATURES` entry: "identity" or "random_relu".
    feature_dim: m, the random-ReLU features (features="random_relu" only).
    feature_seed: the seed of (W, b) (features="random_relu" only).
  """

  construction: str = "dual_prefix"
  num_steps: int = 2
  input_dim: int = 4
  num_support: int = 8
  num_query: int = 4
  noise_std: float = 0.3
  features: str = "identity"
  feature_dim: int = 16
  feature_seed: int = 0

  def __post_init__(self):
    if self.construction not in CONSTRUCTIONS:
      raise ValueError(f"Setup.construction={self.construction!r} is not one of "
                       f"{tuple(CONSTRUCTIONS)}.")
    if self.features not in FEATURES:
      raise ValueError(f"Setup.features={self.features!r} is not one of {tuple(FEATURES)}.")
    for name in ("num_steps", "input_dim", "num_support", "num_query", "feature_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Setup.{name} must be a positive int, got {value!r}.")
    if (isinstance(self.feature_seed, bool) or not isinstance(self.feature_seed, (int, np.integer))
        or self.feature_seed < 0):
      raise ValueError(f"Setup.feature_seed must be an int >= 0, got {self.feature_seed!r}.")
    if not (isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std)
            and self.noise_std > 0):
      raise ValueError(f"Setup.noise_std must be > 0 (it sets the Bayes ridge), got "
                       f"{self.noise_std!r}.")

  @property
  def mask(self) -> str:
    """The attention mask of the construction: "prefix" or "causal"."""
    return CONSTRUCTIONS[self.construction][1]

  @property
  def form(self) -> str:
    """The CG form of the construction: "dual" or "primal"."""
    return CONSTRUCTIONS[self.construction][0]

  @property
  def family(self) -> str:
    """The task family's short name: "linear" or "relu_features"."""
    return FEATURES[self.features]

  @property
  def name(self) -> str:
    """"<family>_<construction>_t<t>", e.g. "relu_features_dual_prefix_t2"."""
    return f"{self.family}_{self.construction}_t{self.num_steps}"

  @property
  def data(self) -> config_lib.DataSpec:
    """The training task (see the class docstring) at this setup's d, k, q and noise."""
    common = dict(input_dim=self.input_dim, num_support=self.num_support, num_query=self.num_query,
                  mask=self.mask, noise_std=float(self.noise_std))
    if self.features == "identity":
      return config_lib.DataSpec(family="noisy_linear", **common)
    return config_lib.DataSpec(family="relu_features", hidden_units=int(self.feature_dim),
                               feature_seed=int(self.feature_seed), **common)

  @property
  def ridge(self) -> float:
    """The compiled ridge: the Bayes ridge noise_std^2 / (prior variance of w), floored at 1e-3."""
    if self.features == "identity":
      return config_lib.baseline_ridge(self.data)
    return max(self.noise_std**2 / tasks_lib.RELU_FEATURES_WEIGHT_VARIANCE, 1e-3)

  @property
  def feature_params(self):
    """(W [m, d], b [m]) of the random-ReLU layer, or None for features="identity"."""
    if self.features == "identity":
      return None
    return tasks_lib.relu_feature_params(self.input_dim, self.feature_dim, self.feature_seed)

  def phi(self, x) -> np.ndarray:
    """The features `[..., p]` at inputs `x [..., d]` in float64: x, or relu(W x + b) / sqrt(m)."""
    x = np.asarray(x, np.float64)
    if self.features == "identity":
      return x
    weights, bias = (np.asarray(a, np.float64) for a in self.feature_params)
    return np.maximum(x @ weights.T + bias, 0.0) / math.sqrt(self.feature_dim)


def compile_setup(setup: Setup, dtype) -> compiler.CompiledCG:
  """`kcg.compile_cg` for the setup: CG on the linear kernel of phi(x) (x, or the random-ReLU layer
  `setup.feature_params` as the model's first layer) at the setup's Bayes ridge."""
  if setup.features == "identity":
    return compiler.compile_cg(setup.num_support, setup.input_dim, setup.num_steps, setup.ridge,
                               mask=setup.mask, form=setup.form, dtype=jnp.dtype(dtype))
  return compiler.compile_cg(setup.num_support, setup.feature_dim, setup.num_steps, setup.ridge,
                             mask=setup.mask, form=setup.form, features="random_relu",
                             feature_params=tuple(np.asarray(a) for a in setup.feature_params),
                             input_dim=setup.input_dim, dtype=jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------------
# Reparametrisations.


def reciprocal_parts(program: craft.Program) -> tuple[tuple[int, str, Any], ...]:
  """The division of a program: `(stored block, "head", h)` and `(stored block, "units", slice)`.

  Read from the program's own typed identities (`kcg.ops.Op`): heads and ReLU unit groups whose op is
  the reciprocal's guess or a Newton step, with the unit columns laid out in block order as
  `craft.lower_blocks` lays them out.
  """
  parts = []
  for b, block in enumerate(program.blocks):
    for h, head in enumerate(block.heads):
      if head.op in _RECIPROCAL_OPS:
        parts.append((b, "head", h))
    offset = 0
    for group in block.units:
      if group.op in _RECIPROCAL_OPS:
        parts.append((b, "units", slice(offset, offset + group.num_units)))
      offset += group.num_units
  if not parts:
    raise ValueError(f"Program {program.name!r} has no reciprocal blocks to freeze.")
  return tuple(parts)


def reciprocal_mask(compiled: compiler.CompiledCG) -> dict:
  """Pure dict shaped like `nnx.state(model, nnx.Param)`: True on the division's entries.

  Head parameters `[L_p, H, ...]` are masked along the head axis, MLP parameters along the unit axis;
  embedding, readout and `mlp_out_bias` (shared by every unit) are never part of it.
  """
  config = compiled.config
  shapes = jax.tree.map(lambda s: s.shape, model_lib.param_shapes(config))
  mask = jax.tree.map(lambda shape: np.zeros(shape, bool), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))
  blocks = mask["blocks"]
  for name, axis in {**_HEAD_AXIS, **_UNIT_AXIS}.items():
    if name in blocks:
      size = config.num_heads if name in _HEAD_AXIS else config.mlp_hidden
      if blocks[name].shape[axis] != size:
        raise ValueError(f"Parameter blocks/{name} has shape {blocks[name].shape}; expected axis "
                         f"{axis} of size {size}. The model layout changed: update _HEAD_AXIS/_UNIT_AXIS.")
  for block, kind, index in reciprocal_parts(compiled.program):
    names = _HEAD_AXIS if kind == "head" else _UNIT_AXIS
    for name, axis in names.items():
      if name in blocks:
        where = [block] + [slice(None)] * (blocks[name].ndim - 1)
        where[axis] = index
        blocks[name][tuple(where)] = True
  return mask


class Gain(nnx.Param):
  """A trainable multiplier of a compiled block's output (initialised at 1)."""


class GainedTransformer(nnx.Module):
  """A frozen `kcg.Transformer` with a learned gain per (layer, head) and per layer.

      out = Transformer(tokens; head_mask = G_head [L, H], layer_mask = g_layer [L])

  At G = 1, g = 1 this is the base model bit for bit (its default masks are ones).
  """

  def __init__(self, base: model_lib.Transformer):
    c = base.config
    self.base = base
    self.config = c
    self.head_gain = Gain(jnp.ones((c.num_layers, c.num_heads), c.param_dtype))
    self.layer_gain = Gain(jnp.ones((c.num_layers,), c.param_dtype))

  def __call__(self, tokens_BxTxF, *, num_prefix=None, return_residuals=False):
    return self.base(tokens_BxTxF, num_prefix=num_prefix, return_residuals=return_residuals,
                     head_mask=self.head_gain[...], layer_mask=self.layer_gain[...])


def random_model(config: model_lib.ModelConfig, seed: int, qkv_init_scale: float) -> model_lib.Transformer:
  """The compiled architecture from `nnx.Rngs(seed)`, query/key/value weights times qkv_init_scale
  (as `kcg.training.init_model` does: unnormalised linear attention is cubic per layer)."""
  model = model_lib.Transformer(config, rngs=nnx.Rngs(seed))
  for name in ("query", "key", "value"):
    param = getattr(model.blocks, name)
    param[...] = param[...] * jnp.asarray(qkv_init_scale, param[...].dtype)
  return model


# Ops whose gain stays 1 in mode "compute_gains": exact cancellation (clears and moves) and the
# division, whose guess is only valid on its stated input range.
_FROZEN_GAIN_OPS = (ops.Op.MOVE, ops.Op.GUESS, ops.Op.NEWTON)


def compute_gain_mask(compiled: compiler.CompiledCG) -> dict:
  """`{"head_gain": [L, H], "layer_gain": [L]}` 0/1 (`GainedTransformer`'s pure-dict layout): 1 on
  heads whose `kcg.ops.Op` computes a value, 0 on heads in `_FROZEN_GAIN_OPS` and on unused head
  slots; a layer's gain is 1 only if none of its heads or ReLU unit groups is frozen."""
  program, config = compiled.program, compiled.config
  if len(program.schedule) != config.num_layers:
    raise ValueError(f"Program {program.name!r} runs {len(program.schedule)} layers but the model has "
                     f"{config.num_layers}: the gain mask needs one block per layer.")
  heads = np.zeros((config.num_layers, config.num_heads))
  layers = np.zeros((config.num_layers,))
  for layer in range(config.num_layers):
    block = program.layer_block(layer)
    for h, head in enumerate(block.heads):
      heads[layer, h] = head.op not in _FROZEN_GAIN_OPS
    frozen = [x for x in tuple(block.heads) + tuple(block.units) if x.op in _FROZEN_GAIN_OPS]
    layers[layer] = not frozen
  return {"head_gain": heads, "layer_gain": layers}


def masked_updates(keep: dict) -> optax.GradientTransformation:
  """Zeroes the update entries where `keep` (a pure dict of 0/1 arrays, `nnx.to_pure_dict` layout,
  looked up by the update's own tree path) is 0; `where`, not a product, so that a non-finite update
  of a frozen entry is still 0."""

  def lookup(path):
    node = keep
    for entry in path:
      if isinstance(entry, jax.tree_util.DictKey):
        node = node[entry.key]
    return node

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: jnp.where(jnp.asarray(lookup(path)) != 0, u, jnp.zeros((), u.dtype)), updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def start_model(mode: str, compiled: compiler.CompiledCG, *, seed: int = 0,
                qkv_init_scale: float = 0.5):
  """`(model, wrt, keep)`: the model to train, the nnx filter of its trained variables, and a pure dict
  of 0/1 update multipliers (None: all of `wrt` is trained)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}.")
  if mode == "random":
    return random_model(compiled.config, seed, qkv_init_scale), nnx.Param, None
  base = nnx.clone(compiled.model)  # the optimizer updates its own copy
  if mode == "gains":
    return GainedTransformer(base), Gain, None
  if mode == "compute_gains":
    return GainedTransformer(base), Gain, compute_gain_mask(compiled)
  if mode == "plain":
    return base, nnx.Param, None
  keep = jax.tree.map(lambda m: (~m).astype(np.float64), reciprocal_mask(compiled))
  return base, nnx.Param, keep


def make_tx(train_config: config_lib.TrainConfig, keep: dict | None) -> optax.GradientTransformation:
  """kcg's optimizer (`kcg.training.make_optimizer`), with frozen entries zeroed before and after it
  (after: so that weight decay cannot move them either)."""
  tx = optim_lib.make_optimizer(train_config)
  if keep is None:
    return tx
  return optax.chain(masked_updates(keep), tx, masked_updates(keep))


# ----------------------------------------------------------------------------------------------
# Runs.

TASKS = ("task", "imitate")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run from one start.

  Attributes:
    mode: a `MODES` entry (how the model starts and what is trained).
    task: "task" (the setup's regression task, which the compiled model solves: targets y) or "imitate"
      (targets are the compiled float64 model's predictions, CG_t: "learning CG").
    dtype: "float32" or "float64" (parameters, data and arithmetic).
    num_steps, batch_size, learning_rate, warmup_steps, clip_norm: AdamW as in `kcg.training`
      (constant learning rate after the warmup, no weight decay).
    eval_every: steps between evaluations (and checkpoints); step 0 is always evaluated.
    seed: data seed (and the random init's seed).
    qkv_init_scale: for mode "random" (see `random_model`).
  """

  mode: str = "gains"
  task: str = "task"
  dtype: str = "float32"
  num_steps: int = 200
  batch_size: int = 32
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  clip_norm: float | None = 1.0
  eval_every: int = 50
  seed: int = 0
  qkv_init_scale: float = 0.5

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Run.mode={self.mode!r} is not one of {MODES}.")
    if self.task not in TASKS:
      raise ValueError(f"Run.task={self.task!r} is not one of {TASKS}.")
    if self.dtype not in config_lib.DTYPES:
      raise ValueError(f"Run.dtype={self.dtype!r} is not one of {config_lib.DTYPES}.")
    for name in ("num_steps", "batch_size", "eval_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Run.{name} must be a positive int, got {value!r}.")
    if not (math.isfinite(self.qkv_init_scale) and self.qkv_init_scale > 0):
      raise ValueError(f"Run.qkv_init_scale must be > 0, got {self.qkv_init_scale!r}.")
    self.train_config(Setup())  # runs kcg.training's checks of the optimizer fields now

  @property
  def name(self) -> str:
    """"<task>_<mode>_<dtype>", e.g. "task_gains_float32"."""
    return f"{self.task}_{self.mode}_{self.dtype}"

  def train_config(self, setup: Setup) -> config_lib.TrainConfig:
    """The `kcg.training.TrainConfig` whose data, optimizer and seed this run uses."""
    optim = config_lib.OptimSpec(learning_rate=float(self.learning_rate), schedule="constant",
                               warmup_steps=int(self.warmup_steps), weight_decay=0.0,
                               clip_norm=None if self.clip_norm is None else float(self.clip_norm))
    return config_lib.TrainConfig(data=setup.data, optim=optim, num_steps=int(self.num_steps),
                                batch_size=int(self.batch_size), seed=int(self.seed),
                                dtype=self.dtype, final_eval=False)


class EvalSet(NamedTuple):
  """Held-out prompts and float64 references on them.

  Attributes:
    x_support: [B, k, d].
    y_support: [B, k].
    x_query: [B, q, d].
    f_query: [B, q], the noiseless targets.
    y_other: [B, k], another prompt's labels (the second label vector of the y-linearity index).
    krr: [B, q], the KRR oracle on phi(x) (Cholesky, the compiled ridge).
    cg: [B, q], CG_t on phi(x) (reference solver).
  """

  x_support: np.ndarray
  y_support: np.ndarray
  x_query: np.ndarray
  f_query: np.ndarray
  y_other: np.ndarray
  krr: np.ndarray
  cg: np.ndarray


def eval_set(setup: Setup, num_prompts: int, seed: int, shift: str = "none") -> EvalSet:
  """`num_prompts` held-out prompts (an eval stream of `seed`, never a training batch), with
  references in float64 on the setup's features `setup.phi(x)` (`kcg.solvers`: Cholesky KRR; dual or
  primal CG as compiled)."""
  data = setup.data
  key = jax.random.fold_in(data_lib.eval_key(seed), 7)
  p = data_lib.sample_prompts(key, data, batch_size=num_prompts, shift=shift)
  f64 = lambda a: np.asarray(a, np.float64)
  xs, ys, xq = f64(p.x_support), f64(p.y_support), f64(p.x_query)
  cg_fn = solvers.cg_predict if setup.form == "dual" else solvers.primal_cg_predict
  phi_s, phi_q = setup.phi(xs), setup.phi(xq)
  with jax.numpy_dtype_promotion("standard"):
    krr = f64(solvers.krr_predict(phi_s, ys, phi_q, setup.ridge))
    cg = f64(cg_fn(phi_s, ys, phi_q, setup.ridge, setup.num_steps))[:, -1]
  return EvalSet(xs, ys, xq, f64(p.f_query), np.roll(ys, 1, axis=0), krr, cg)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward(graphdef, state, tokens, num_prefix, return_residuals):
  model = nnx.merge(graphdef, state)
  return model(tokens, num_prefix=num_prefix, return_residuals=return_residuals)


def make_predict(model, setup: Setup, dtype) -> Callable:
  """`(x_support, y_support, x_query) -> [B, q]` float64 NumPy predictions of `model` in `dtype`."""
  graphdef, state = nnx.split(model)

  def predict(x_support, y_support, x_query):
    layout = prompt_lib.make_layout(setup.num_support, np.shape(x_query)[1], setup.input_dim)
    cast = lambda a: jnp.asarray(a, dtype)
    tokens = prompt_lib.encode(layout, cast(x_support), cast(y_support), cast(x_query))
    out = _forward(graphdef, state, tokens, layout.num_prefix, False).outputs
    return np.asarray(prompt_lib.query_outputs(layout, out), np.float64)

  return predict


def reciprocal_errors(model, compiled: compiler.CompiledCG, ev: EvalSet, dtype) -> np.ndarray:
  """`model` (a Transformer of the compiled architecture, or a `GainedTransformer`): max |s x - 1| over the aggregator's (s, x ~ 1/s) channel pairs after every step's last Newton
  layer, on the eval prompts; 0 when the model still divides exactly (in exact arithmetic).

  Pairs with s outside the reciprocal's stated interval [low, high] (`kcg._src.reciprocal.spec_for`)
  are skipped: s = 0 (nothing to divide), and r.r below `low` once CG has converged (float64 at t = k),
  where gamma = r.r / p.Ap is ~0 whatever the reciprocal returns."""
  program = compiled.program
  # The residual after a layer that ends a run of Newton layers holds the refined reciprocals.
  is_newton = [program.blocks[b].op is ops.Op.NEWTON for b in program.schedule] + [False]
  layers = [l + 1 for l in range(len(program.schedule)) if is_newton[l] and not is_newton[l + 1]]
  pairs = [(s, x) for s, x in RECIPROCAL_PAIRS if s in dict(program.layout.channels)]
  if not layers or not pairs:
    raise ValueError(f"Program {program.name!r} has no Newton layers or reciprocal channels.")
  layout = prompt_lib.make_layout(compiled.num_support, ev.x_query.shape[1], compiled.input_dim)
  cast = lambda a: jnp.asarray(a, dtype)
  tokens = prompt_lib.encode(layout, cast(ev.x_support), cast(ev.y_support), cast(ev.x_query))
  graphdef, state = nnx.split(model)
  residuals = _forward(graphdef, state, tokens, layout.num_prefix, True).residuals
  at_agg = np.asarray(residuals[np.asarray(layers), :, layout.aggregator_index], np.float64)
  spec = recip.spec_for(dtype, compiled.options.newton_steps)
  errors = []
  for s_name, x_name in pairs:
    s = at_agg[..., program.layout.slice(s_name)]
    x = at_agg[..., program.layout.slice(x_name)]
    in_range = (np.abs(s) >= spec.low) & (np.abs(s) <= spec.high)
    with np.errstate(invalid="ignore", over="ignore"):
      err = np.abs(s * x - 1.0)[in_range]
    errors.append(np.where(np.isfinite(err), err, np.inf))
  return np.concatenate(errors)


def reciprocal_error(model, compiled: compiler.CompiledCG, ev: EvalSet, dtype) -> float:
  """The largest of `reciprocal_errors`: max |s x - 1| over pairs, steps and prompts (0.0 if none)."""
  errors = reciprocal_errors(model, compiled, ev, dtype)
  return float(np.max(errors)) if errors.size else 0.0


def departure(model, compiled: compiler.CompiledCG, ev: EvalSet, dtype, rtol: float = 1e-3) -> dict:
  """Where `model` first leaves the compiled model on the eval prompts: the first layer whose residual
  differs from the compiled one by more than rtol (1 + |compiled|) in some entry (or is not finite),
  its name (`craft.layer_names`), the channel and the token role of the worst entry there.
  {"layer": None} when no layer departs."""
  layout = prompt_lib.make_layout(compiled.num_support, ev.x_query.shape[1], compiled.input_dim)
  cast = lambda a: jnp.asarray(a, dtype)
  tokens = prompt_lib.encode(layout, cast(ev.x_support), cast(ev.y_support), cast(ev.x_query))
  residuals = []
  for m in (model, compiled.model):
    graphdef, state = nnx.split(m)
    residuals.append(np.asarray(_forward(graphdef, state, tokens, layout.num_prefix, True).residuals,
                                np.float64))
  got, want = residuals
  with np.errstate(invalid="ignore", over="ignore"):
    excess = np.where(np.isfinite(got), np.abs(got - want) / (1.0 + np.abs(want)), np.inf)
  bad = np.nonzero(np.max(excess.reshape(excess.shape[0], -1), axis=1) > rtol)[0]
  if bad.size == 0:
    return {"layer": None}
  layer = int(bad[0])
  _, token, channel = np.unravel_index(np.argmax(excess[layer]), excess[layer].shape)
  names = ("embedding",) + craft.layer_names(compiled.program)
  offsets = np.cumsum([0] + [size for _, size in compiled.program.layout.channels])
  channel_name = compiled.program.layout.channels[int(np.searchsorted(offsets, channel, "right")) - 1][0]
  role = ("support" if token < layout.num_support else
          "aggregator" if token == layout.aggregator_index else "query")
  return {"layer": layer, "name": names[layer], "channel": channel_name, "token": role,
          "relative_change": float(excess[layer].max())}


def _params(model) -> dict:
  base = model.base if isinstance(model, GainedTransformer) else model
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(base, nnx.Param)))


def weight_distance(model, reference: dict) -> dict:
  """Distance of the (base) weights from `reference` (pure dict): relative L2, max |delta|, and the
  number of entries that changed; for a `GainedTransformer`, also max |gain - 1|."""
  now = jax.tree.leaves(_params(model))
  ref = [np.asarray(b, np.float64) for b in jax.tree.leaves(reference)]
  diff2 = sum(float(np.sum(np.square(a - b))) for a, b in zip(now, ref))
  ref2 = sum(float(np.sum(np.square(b))) for b in ref)
  out = {"relative_l2": math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2),
         "max_abs": max(float(np.max(np.abs(a - b))) for a, b in zip(now, ref)),
         "changed": int(sum(int(np.sum(a != b)) for a, b in zip(now, ref)))}
  if isinstance(model, GainedTransformer):
    gains = [np.asarray(model.head_gain[...], np.float64), np.asarray(model.layer_gain[...], np.float64)]
    out["max_gain_change"] = max(float(np.max(np.abs(g - 1.0))) for g in gains)
  return out


def _relative(a, b) -> float:
  if not np.all(np.isfinite(a)):
    return math.inf
  norm = float(np.linalg.norm(b))
  return float(np.linalg.norm(a - b)) / norm if norm > 0 else float(np.linalg.norm(a))


def evaluate(model, compiled: compiler.CompiledCG, setup: Setup, run: Run, ev: EvalSet,
             reference: dict, scaled: EvalSet | None = None, teacher: Callable | None = None) -> dict:
  """The checkpoint measures (see the module docstring) on the eval prompts.

  Keys: mse (against the noiseless f), krr_mse (the oracle's), cg_mse, cg_r2 and cg_relative
  (agreement with CG_t: R^2 = 1 - |f - f_cg|^2 / |f_cg - mean|^2, relative error |f - f_cg| / |f_cg|),
  y_nonlinearity (pooled) and y_nonlinearity_median (over prompts), reciprocal_error and
  reciprocal_error_median (max and median of `reciprocal_errors`) (compiled starts only), distance (compiled starts only) and, for
  imitation runs, teacher_relative and teacher_relative_scaled (relative error against CG_t on the
  eval prompts and on `scaled`); and the probes, candidate agreement and layer matching of
  `finetune_measures.checkpoint_measures`.
  """
  dtype = jnp.dtype(run.dtype)
  predict = make_predict(model, setup, dtype)
  pred = predict(ev.x_support, ev.y_support, ev.x_query)
  out = {"finite": bool(np.all(np.isfinite(pred)))}
  if not out["finite"]:
    return out
  out["mse"] = float(np.mean(np.square(pred - ev.f_query)))
  out["krr_mse"] = float(np.mean(np.square(ev.krr - ev.f_query)))
  out["cg_mse"] = float(np.mean(np.square(ev.cg - ev.f_query)))
  agree = agreement(pred, ev.cg, num_bootstrap=20)
  out["cg_r2"], out["cg_relative"] = agree.r2, agree.relative_distance
  nonlinearity = y_nonlinearity(predict, ev.x_support, ev.y_support, ev.y_other, ev.x_query)
  out["y_nonlinearity"] = nonlinearity.index
  out["y_nonlinearity_median"] = float(np.median(nonlinearity.per_prompt))
  if run.mode != "random":
    errors = reciprocal_errors(model, compiled, ev, dtype)
    out["reciprocal_error"] = float(np.max(errors)) if errors.size else 0.0
    out["reciprocal_error_median"] = float(np.median(errors)) if errors.size else 0.0
    out["distance"] = weight_distance(model, reference)
  if run.task == "imitate":
    out["teacher_relative"] = _relative(pred, ev.cg)
    if scaled is not None:
      pred_s = predict(scaled.x_support, scaled.y_support, scaled.x_query)
      out["teacher_relative_scaled"] = _relative(pred_s, scaled.cg)
  out.update(finetune_measures.checkpoint_measures(model, compiled, setup, run, ev, pred))
  return out


def imitation_batch_fn(compiled64: compiler.CompiledCG, train_config: config_lib.TrainConfig,
                       mesh) -> Callable[[int], data_lib.Batch]:
  """step -> the task's batch with targets replaced by the compiled float64 model's predictions
  (CG_t), cast to the run's dtype: the "learning CG" objective."""
  batch_at = training.make_batch_fn(train_config, mesh)
  data = train_config.data
  graphdef, state = nnx.split(compiled64.model)
  dtype = config_lib.dtype_of(train_config)

  @jax.jit
  def teach(batch):
    tokens64 = batch.tokens.astype(jnp.float64)
    out = nnx.merge(graphdef, state)(tokens64, num_prefix=data_lib.num_prefix(data, tokens64)).outputs
    return data_lib.Batch(batch.tokens, data_lib.readout(data, out).astype(dtype), batch.weights)

  return lambda step: teach(batch_at(step))


def train_step(graphdef, data: config_lib.DataSpec, wrt) -> Callable:
  """The jitted `(state, batch) -> (state, metrics)` of `state = nnx.state((model, optimizer))`: one
  optimizer step on `kcg.training.loss_fn`, gradients only for the `wrt` variables."""

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: training.loss_fn(m, batch, data),
                                     argnums=nnx.DiffState(0, wrt))(model)
    with jax.numpy_dtype_promotion("standard"):
      optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  # No donation: on a non-finite loss or gradient `fit` keeps the state the step started from.
  return jax.jit(step)


class FitResult(NamedTuple):
  """What `fit` returns.

  Attributes:
    model: the trained model (a `kcg.Transformer` or a `GainedTransformer`); after a divergence the
      one whose loss was not finite (its weights are finite; the checkpoint on disk is the last
      evaluated one).
    history: evaluation records `{"step", "train_loss", **evaluate(...)}`, step 0 first.
    diverged_at: the first step whose training loss was not finite (the run stopped there), or None.
    compiled: the compiled starting point (in the run's dtype).
  """

  model: Any
  history: list
  diverged_at: int | None
  compiled: compiler.CompiledCG


def fit(setup: Setup, run: Run, directory: str | None = None, *, num_eval_prompts: int = 64,
        stop_at_step: int | None = None,
        log: Callable[[str], None] = lambda message: None) -> FitResult:
  """Trains `run` from its start; with a directory, checkpoints there at every evaluation and resumes.

  A non-finite training loss or gradient norm stops the run at once (recorded as `diverged_at`; the checkpoint on disk
  stays the last evaluated finite one). `stop_at_step` stops there, checkpointed, as if killed.
  """
  dtype = jnp.dtype(run.dtype)
  train_config = run.train_config(setup)
  config_lib.dtype_of(train_config)
  compiled = compile_setup(setup, dtype)
  model, wrt, keep = start_model(run.mode, compiled, seed=run.seed,
                                 qkv_init_scale=run.qkv_init_scale)
  reference = _params(compiled.model)
  optimizer = nnx.Optimizer(model, make_tx(train_config, keep), wrt=wrt)
  mesh = training.make_mesh(jax.devices()[:1])
  graphdef, state = nnx.split((model, optimizer))
  # Laid out as the jitted step returns it, so that the step compiles once, not again at step 1.
  state = jax.device_put(state, training.replicated(mesh))
  if run.task == "imitate":
    batch_at = imitation_batch_fn(compile_setup(setup, jnp.float64), train_config, mesh)
  else:
    batch_at = training.make_batch_fn(train_config, mesh)
  step_fn = train_step(graphdef, setup.data, wrt)
  ev = eval_set(setup, num_eval_prompts, run.seed)
  scaled = eval_set(setup, num_eval_prompts, run.seed, "scaled_inputs") if run.task == "imitate" else None

  def evaluate_now(step, train_loss):
    model_now, _ = nnx.merge(graphdef, state)
    record = {"step": step, "train_loss": train_loss,
              **evaluate(model_now, compiled, setup, run, ev, reference, scaled)}
    log(f"{run.name} step {step}: " + ", ".join(
        f"{k} {v:.3g}" for k, v in record.items() if isinstance(v, float)))
    return record

  history, start, diverged_at, manager = [], 0, None, None
  history_path = None
  if directory is not None:
    os.makedirs(directory, exist_ok=True)
    history_path = os.path.join(directory, "history.json")
    manager = checkpointing.Checkpointer(directory, max_to_keep=1)
    latest = manager.resume_step()
    if latest is not None and os.path.exists(history_path):
      with open(history_path) as f:
        saved = json.load(f)
      if saved.get("run") != dataclasses.asdict(run):
        manager.close()
        raise ValueError(f"{directory} holds a different run ({saved.get('run')}); use a new workdir.")
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=training.replicated(mesh)), state)
      state = manager.restore(latest, target)
      history = [h for h in saved["history"] if h["step"] <= latest]
      start, diverged_at = latest, saved.get("diverged_at")
      log(f"{run.name}: resumed at step {latest}")

  def save(step):
    if manager is None:
      return
    if step is not None:
      manager.save(step, state)
    with open(history_path + ".tmp", "w") as f:
      json.dump({"run": dataclasses.asdict(run), "history": history, "diverged_at": diverged_at}, f)
    os.replace(history_path + ".tmp", history_path)

  try:
    if start == 0 and not history:
      history.append(evaluate_now(0, None))
      save(0)
    losses = []
    end = run.num_steps if stop_at_step is None else min(run.num_steps, int(stop_at_step))
    for step in range(start, end if diverged_at is None else start):
      new_state, metrics = step_fn(state, batch_at(step))
      loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
      # An overflowing gradient norm with a finite loss is not harmless: clip_by_global_norm then
      # scales every gradient by 1/inf, and the step silently changes nothing.
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        diverged_at = step
        log(f"{run.name}: non-finite loss or gradient norm at step {step} (loss {loss:.3g}, gradient "
            f"norm {grad_norm:.3g}); stopped")
        record = {"step": step, "train_loss": loss, "grad_norm": grad_norm, "finite": False}
        if run.mode != "random":
          model_now, _ = nnx.merge(graphdef, state)
          record["departure"] = departure(model_now, compiled, ev, dtype)
          record["blowup"] = departure(model_now, compiled, ev, dtype, rtol=1e6)
          log(f"{run.name}: departs from the compiled model at {record['departure']}, by more than "
              f"1e6 at {record['blowup']}")
        history.append(record)
        save(None)
        break
      state = new_state
      losses.append(loss)
      done = step + 1
      if done % run.eval_every == 0 or done == run.num_steps:
        history.append(evaluate_now(done, float(np.mean(losses))))
        losses = []
        save(done)
      elif done == end:
        save(done)
  finally:
    if manager is not None:
      manager.close()
  model, _ = nnx.merge(graphdef, state)
  return FitResult(model, history, diverged_at, compiled)
