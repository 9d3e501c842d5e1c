"""Training in-context learners: the very `kcg.Transformer` that the compiler fills, fitted with optax.

The pieces, nanodo style: `train_config` (the typed run), `train_data` (prompts, curriculum, batches),
`train_optim` (AdamW and its schedule), this module (the model's initialisation, the loss, the mesh, the
step and the loop), `train_eval` (held-out evaluation), `train_metrics` (metrics.jsonl) and
`checkpointing` (which reads only the config).

Initialisation. Parameters are initialised from `nnx.Rngs(seed)`; the data of step `s` from
`fold_in(key(seed), s)` (`train_data`), so resuming needs no data state.

Devices. `make_mesh` puts all devices on one mesh axis `"data"`; batches are sharded over it
(`PartitionSpec("data")`) and parameters and optimizer state are replicated (`PartitionSpec()`). The
jitted step reads and writes these shardings, so XLA inserts the gradient all-reduce. A batch is
drawn whole on one device and then split over the mesh (a sampler partitioned over the mesh would run
its LAPACK calls on every device at once, which can deadlock on CPU; see `kcg._src.train_eval`), and
evaluations run on one device. For several hosts, call `jax.distributed.initialize()` before anything
else (the binary does so under `--distributed`): `jax.devices()` is then global, every process runs
the same program, and each process draws the same batch and keeps its own shards of it. The work
directory must then be on a filesystem all hosts share (orbax writes one checkpoint from all of them;
config, metrics and manifests are written by process 0). The multi-host path is written to the
jax.distributed contract but has only been run with one process here.

Divergence. A step whose loss or gradient norm is not finite, or whose update makes a parameter
non-finite, clears a `healthy` flag that the step function carries from step to step. The loop reads
the flag where it waits for the device anyway (log lines) and before every evaluation and checkpoint,
and then raises `DivergenceError` naming the first bad step (the steps since the last check keep their
per-step `finite` flags): no host sync per step, and no checkpoint after the first bad step.
"""

from __future__ import annotations

import functools
import json
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

from kcg._src import checkpointing
from kcg._src import model as model_lib
from kcg._src import train_config as config_lib
from kcg._src import train_data as data_lib
from kcg._src import train_eval as eval_lib
from kcg._src import train_metrics as metrics_lib
from kcg._src import train_optim as optim_lib

DATA_AXIS = "data"


# ----------------------------------------------------------------------------------------------
# Model and loss.


def init_model(config: config_lib.TrainConfig) -> model_lib.Transformer:
  """A freshly initialised model: `kcg.Transformer(model_config(config), rngs=nnx.Rngs(seed))` with
  the query, key and value weights multiplied by `qkv_init_scale`."""
  model = model_lib.Transformer(config_lib.model_config(config), rngs=nnx.Rngs(config.seed))
  scale = config.model.qkv_init_scale
  if scale != 1.0:
    for name in ("query", "key", "value"):
      param = getattr(model.blocks, name)
      param[...] = param[...] * jnp.asarray(scale, param[...].dtype)
  return model


def loss_fn(model: model_lib.Transformer, batch: data_lib.Batch,
            data: config_lib.DataSpec) -> jax.Array:
  """Weighted mean squared error `sum w (f(prompt) - y)^2 / sum w` over the scored positions."""
  outputs = model(batch.tokens, num_prefix=data_lib.num_prefix(data, batch.tokens)).outputs
  predictions = data_lib.readout(data, outputs)
  assert predictions.shape == batch.targets.shape, (predictions.shape, batch.targets.shape)
  squared = jnp.square(predictions - batch.targets) * batch.weights
  return jnp.sum(squared) / jnp.sum(batch.weights)


def init_train_state(config: config_lib.TrainConfig) -> tuple[model_lib.Transformer, nnx.Optimizer]:
  """A fresh model and its `nnx.Optimizer(model, tx, wrt=nnx.Param)`."""
  model = init_model(config)
  return model, nnx.Optimizer(model, optim_lib.make_optimizer(config), wrt=nnx.Param)


def abstract_train_state(config: config_lib.TrainConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """`(graphdef, state)` with shapes only: the restore target of a checkpoint."""
  return nnx.split(nnx.eval_shape(lambda: init_train_state(config)))


@functools.lru_cache(maxsize=16)
def _init_state_jit(config: config_lib.TrainConfig, mesh: Mesh) -> Callable:
  return jax.jit(lambda: nnx.state(init_train_state(config)), out_shardings=replicated(mesh))


def init_state(config: config_lib.TrainConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """`(graphdef, state)` of a fresh `(model, optimizer)`, initialised in one jitted call (eager init
  dispatches, and on first use compiles, every random draw separately) and replicated over `mesh`."""
  graphdef, _ = abstract_train_state(config)
  return graphdef, _init_state_jit(config, mesh)()


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


# ----------------------------------------------------------------------------------------------
# The step.


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def _step_with_health(config: config_lib.TrainConfig) -> Callable:
  """`(state, batch, healthy) -> (state, healthy, metrics)`: one AdamW step on `loss_fn`; `healthy`
  stays True while every step's loss, gradient norm and updated parameters are finite."""
  graphdef, _ = abstract_train_state(config)
  data = config.data

  def step(state, batch, healthy):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, data))(model)
    grad_norm = optax.tree.norm(grads)
    # optax's Adam bias correction raises a Python float to an int32 count; let it promote even when
    # the caller runs jax_numpy_dtype_promotion="strict" (as kcg's tests do).
    with jax.numpy_dtype_promotion("standard"):
      optimizer.update(model, grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & _all_finite(nnx.state(model, nnx.Param)))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    return nnx.state((model, optimizer)), healthy & finite, metrics

  return step


@functools.lru_cache(maxsize=16)
def train_step_fn(config: config_lib.TrainConfig, mesh: Mesh) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)` of `state = nnx.state((model, optimizer))`.

  One AdamW step on `loss_fn`; the state is replicated over the mesh and the batch sharded along
  "data", so XLA all-reduces the gradients. `metrics`: `loss`, `grad_norm` and `finite` (whether
  both and the updated parameters are finite). Cached per (config, mesh), so repeated runs in one
  process compile once.
  """
  step = _step_with_health(config)

  def step_without_health(state, batch):
    state, _, metrics = step(state, batch, jnp.asarray(True))
    return state, metrics

  return jax.jit(step_without_health, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def loop_step_fn(config: config_lib.TrainConfig, mesh: Mesh) -> Callable:
  """The loop's step `(state, batch, healthy) -> (state, healthy, metrics)`: `train_step_fn` carrying
  a flag that turns False at the first non-finite step and stays False, read only at check points."""
  return jax.jit(_step_with_health(config),
                 in_shardings=(replicated(mesh), batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh), replicated(mesh)),
                 donate_argnums=0)


def _split_over_mesh(x: jax.Array, sharding: NamedSharding) -> jax.Array:
  """The whole batch `x` (the same on every process) laid out as `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(x), x.shape)


@functools.lru_cache(maxsize=64)
def _batch_sampler(data: config_lib.DataSpec, stage: data_lib.Stage, batch_size: int,
                   dtype_name: str, mesh: Mesh) -> Callable:
  """One curriculum stage's sampler: draws the whole batch on one device, then splits it over the
  mesh. Drawing prompts runs batched LAPACK (QR for the per-prompt rotations); partitioned over the
  mesh it would run one such call per device at once, which can deadlock XLA:CPU's intra-op thread
  pool (see `kcg._src.train_eval`)."""

  @jax.jit
  def sample(key):
    prompts = data_lib.sample_prompts(key, data, batch_size=batch_size,
                                      input_dim=stage.input_dim, num_support=stage.num_support)
    return data_lib.make_batch(prompts, data, jnp.dtype(dtype_name))

  sharding = batch_sharding(mesh)
  return lambda key: jax.tree.map(lambda x: _split_over_mesh(x, sharding), sample(key))


def make_batch_fn(config: config_lib.TrainConfig,
                  mesh: Mesh) -> Callable[[int], data_lib.Batch]:
  """step -> the `Batch` of that step, sharded over the mesh; one jitted sampler per curriculum stage."""
  check_batch_divides(config.batch_size, mesh)
  dtype_name = config_lib.dtype_of(config).name

  def batch_at(step: int) -> data_lib.Batch:
    key = jax.random.fold_in(data_lib.data_key(config.seed), step)
    stage = data_lib.curriculum_stage(config, step)
    return _batch_sampler(config.data, stage, config.batch_size, dtype_name, mesh)(key)

  return batch_at


def _host_scalar(x: jax.Array) -> Any:
  """A replicated scalar on the host; reads the local copy so that it also works across hosts."""
  return np.asarray(x.addressable_data(0)).item()


# ----------------------------------------------------------------------------------------------
# The loop.


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


class DivergenceError(FloatingPointError):
  """Training stopped at a step whose loss, gradient or update was not finite.

  Attributes:
    step: the first bad step (counted like the log lines: the update that would have made step `s`).
    last_checkpoint: the newest checkpoint on disk (all finite), or None.
  """

  def __init__(self, message: str, step: int, last_checkpoint: int | None):
    super().__init__(message)
    self.step = step
    self.last_checkpoint = last_checkpoint


def _divergence(config: config_lib.TrainConfig, step: int, metrics: dict,
                last_checkpoint: int | None) -> DivergenceError:
  loss, grad_norm = _host_scalar(metrics["loss"]), _host_scalar(metrics["grad_norm"])
  lr = float(optim_lib.learning_rate_schedule(config.optim, config.num_steps)(step - 1))
  what = (f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
          if not (np.isfinite(loss) and np.isfinite(grad_norm)) else
          f"the update made a parameter NaN or Inf (loss {loss:.4g}, gradient norm {grad_norm:.4g})")
  saved = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
           else "no checkpoint was written")
  return DivergenceError(
      f"Training diverged at step {step}: {what}; {saved}. Likely "
      f"cause: the learning rate ({lr:.3g} at that step; optim.learning_rate="
      f"{config.optim.learning_rate:g}) is too large; lower it, or add warmup "
      "(optim.warmup_steps) or gradient clipping (optim.clip_norm).", step, last_checkpoint)


def train(config: config_lib.TrainConfig, workdir: str | None = None, *,
          stop_at_step: int | None = None, devices: Any = None,
          evaluate_fn: Callable | None = None) -> TrainResult:
  """Trains `config`; with a workdir, checkpoints there and resumes from its newest verified checkpoint.

  A workdir of a finished run with a smaller `num_steps` but otherwise the same config is extended:
  training resumes from its last checkpoint, with the learning rate on the schedule of the new
  `num_steps` (`kcg.training.learning_rate_schedule`); any other change refuses.

  Args:
    config: the run.
    workdir: where config.json, metrics.jsonl, checkpoints and plots go (None: nothing written).
    stop_at_step: stop after this step (saving a checkpoint) as if killed; a later call resumes.
    devices: devices of the data mesh (default all).
    evaluate_fn: optional `(model, config, step) -> dict` of extra metrics, logged at each eval.

  Returns:
    TrainResult.

  Raises:
    DivergenceError: at the first step with a non-finite loss, gradient or update (see the module
      docstring); no checkpoint after that step is written.
    CheckpointError: the workdir holds another run.
  """
  if not isinstance(config, config_lib.TrainConfig):
    raise ValueError(f"train needs a TrainConfig (see config_from_dict), got {type(config).__name__}.")
  mesh = make_mesh(devices)
  check_batch_divides(config.batch_size, mesh)
  config_lib.dtype_of(config)
  end_step = config.num_steps if stop_at_step is None else min(config.num_steps, int(stop_at_step))

  graphdef, abstract = abstract_train_state(config)
  step_fn = loop_step_fn(config, mesh)
  state = None
  start_step = 0
  last_checkpoint = None
  checkpointer = None
  metrics_file = None
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    checkpointing.write_config(workdir, config)
    checkpointer = checkpointing.Checkpointer(
        workdir, max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every)
    latest = checkpointer.resume_step()
    if latest is not None:
      target = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), abstract)
      state = checkpointer.restore(latest, target)
      start_step = last_checkpoint = latest
      logging.info("Resumed from step %d in %s.", latest, workdir)
    if jax.process_index() == 0:
      metrics_lib.truncate_history(workdir, start_step)
    metrics_file = open(metrics_lib.metrics_path(workdir), "a")
  if state is None:
    _, state = init_state(config, mesh)

  batch_at = make_batch_fn(config, mesh)
  history = []

  def record(entry):
    history.append(entry)
    if metrics_file is not None and jax.process_index() == 0:
      metrics_file.write(json.dumps(entry) + "\n")
      metrics_file.flush()

  schedule = optim_lib.learning_rate_schedule(config.optim, config.num_steps)
  healthy = jax.device_put(jnp.asarray(True), replicated(mesh))
  pending = []  # (step, metrics) since the last log line: where to look for the first bad step.

  def check_health():
    if not _host_scalar(healthy):
      bad_step, metrics = next((s, m) for s, m in pending if not _host_scalar(m["finite"]))
      raise _divergence(config, bad_step, metrics, last_checkpoint)

  interval_start = time.perf_counter()
  interval_steps = 0
  try:
    for step in range(start_step, end_step):
      state, healthy, metrics = step_fn(state, batch_at(step), healthy)
      done = step + 1
      pending.append((done, metrics))
      interval_steps += 1
      if step == start_step:
        # Keep compilation out of the steps/s of the first interval.
        jax.block_until_ready(metrics)
        logging.info("first step (compilation included) took %.2f s",
                     time.perf_counter() - interval_start)
        interval_start, interval_steps = time.perf_counter(), 0
      if done % config.log_every == 0 or done == end_step:
        check_health()
        losses = [_host_scalar(m["loss"]) for _, m in pending]
        grad_norm = _host_scalar(pending[-1][1]["grad_norm"])
        elapsed = time.perf_counter() - interval_start
        stage = data_lib.curriculum_stage(config, step)
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
        check_health()
        model_now, _ = nnx.merge(graphdef, state)
        record(eval_lib.eval_record(model_now, config, done, evaluate_fn))
        interval_start = time.perf_counter()
      if checkpointer is not None and (done % config.checkpoint_every == 0 or done == end_step):
        check_health()
        checkpointer.save(done, state)
        last_checkpoint = done
        interval_start = time.perf_counter()
    final_step = max(end_step, start_step)
    model, optimizer = nnx.merge(graphdef, state)
    if final_step == config.num_steps and start_step < config.num_steps and config.final_eval:
      record(eval_lib.eval_record(model, config, final_step, evaluate_fn))
      if workdir is not None:
        metrics_file.close()
        eval_lib.write_final_evaluation(workdir, model, config)
  finally:
    if metrics_file is not None and not metrics_file.closed:
      metrics_file.close()
    if checkpointer is not None:
      checkpointer.close()
  return TrainResult(model, optimizer, final_step, history)
