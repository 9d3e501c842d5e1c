"""Training several models of one structure together: one jitted step, `vmap`ped over a model axis.

Models whose configs differ only in the seed and in the task distribution (`TASK_FIELDS` of
`DataSpec`: family, noise, conditioning, ...) run the same step function on arrays of the same shapes.
`train_group` stacks their states along a leading model axis `M` (`state[leaf] -> [M, ...]`) and runs
`jit(vmap(step))` once per step, so a group of `M` small models costs one dispatch per step instead of
`M`, and compiles once (cached per structure, like `kcg.training.train`'s step).

Each model keeps everything of its own run: its parameters are initialised from `nnx.Rngs(seed)`
(under `vmap` over the seeds), its batch of step `s` is drawn from `fold_in(key(seed), s)` by the
single-model sampler of its own `DataSpec` (whole, on one device, then split over the mesh, as in
`kcg.training.train`), and it is checkpointed, logged and evaluated in its own work directory exactly
as `train` would do it, so `kcg.load_trained` and `train` itself resume it. The numbers equal a
`train` of the same config up to the floating-point reassociation of batched matrix products.

Resuming: models are resumed from their own newest checkpoints; models that resume from different
steps train in successive sub-groups (one per resume step). A non-finite loss, gradient or update in
any model stops the whole group with `DivergenceError` naming that model (first bad model, first bad
step); no checkpoint of any model is written after that step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from kcg._src import checkpointing
from kcg._src import train_config as config_lib
from kcg._src import train_data as data_lib
from kcg._src import train_eval as eval_lib
from kcg._src import train_metrics as metrics_lib
from kcg._src import train_optim as optim_lib
from kcg._src import training

# DataSpec fields that only change which prompts are drawn, not the shapes or the step function.
TASK_FIELDS = ("family", "noise_std", "condition_number", "input_rotation", "covariance_seed",
               "sparsity", "hidden_units", "feature_seed", "tree_depth")


def structure_key(config: config_lib.TrainConfig) -> config_lib.TrainConfig:
  """`config` with the seed and the `TASK_FIELDS` reset: configs with equal keys train together."""
  default = config_lib.DataSpec()
  data = dataclasses.replace(config.data, **{f: getattr(default, f) for f in TASK_FIELDS})
  return dataclasses.replace(config, seed=0, data=data)


def group_by_structure(configs: Sequence[config_lib.TrainConfig]) -> list[list[int]]:
  """Indices of `configs` grouped by `structure_key`, groups and members in order of appearance."""
  groups: dict[config_lib.TrainConfig, list[int]] = {}
  for i, config in enumerate(configs):
    groups.setdefault(structure_key(config), []).append(i)
  return list(groups.values())


def _stacked_sharding(mesh: Mesh) -> NamedSharding:
  """A stacked batch [M, B, ...]: models unsplit, prompts along the data axis."""
  return NamedSharding(mesh, PartitionSpec(None, training.DATA_AXIS))


@functools.lru_cache(maxsize=16)
def group_step_fn(key: config_lib.TrainConfig, mesh: Mesh) -> Callable:
  """`jit(vmap(step))` of `kcg.training`'s loop step over a leading model axis of state, batch and
  health flag: `(state [M,...], batch [M,B,...], healthy [M]) -> (state, healthy, metrics [M])`."""
  replicated = training.replicated(mesh)
  return jax.jit(jax.vmap(training.step_with_health(key)),
                 in_shardings=(replicated, _stacked_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _group_init_fn(key: config_lib.TrainConfig, mesh: Mesh) -> Callable:
  init = lambda seed: nnx.state(training.init_train_state(key, jax.random.key(seed)))
  return jax.jit(jax.vmap(init), out_shardings=training.replicated(mesh))


@functools.lru_cache(maxsize=64)
def _group_sampler(datas: tuple[config_lib.DataSpec, ...], stage: data_lib.Stage, batch_size: int,
                   dtype_name: str) -> Callable:
  """`(data keys [M], step) -> Batch [M, B, ...]`: every model's own sampler (`kcg.training`'s, of
  its `DataSpec`) on its own key `fold_in(data_key, step)`, all in one jitted call on one device."""
  samplers = [training.whole_batch_sampler(data, stage, batch_size, dtype_name) for data in datas]

  @jax.jit
  def sample(data_keys, step):
    return _stack([sampler(jax.random.fold_in(data_keys[i], step))
                   for i, sampler in enumerate(samplers)])

  return sample


def make_group_batch_fn(configs: Sequence[config_lib.TrainConfig],
                        mesh: Mesh) -> Callable[[int], data_lib.Batch]:
  """step -> the stacked `Batch` [M, B, ...] of that step: model `i`'s batch is the one
  `kcg.training.make_batch_fn(configs[i], mesh)` draws. Drawn whole on one device (one jitted call
  for the group), then split over the mesh along B, as in `kcg.training.train`."""
  key = structure_key(configs[0])
  dtype_name = config_lib.dtype_of(key).name
  datas = tuple(config.data for config in configs)
  data_keys = jnp.stack([data_lib.data_key(config.seed) for config in configs])
  stacked = _stacked_sharding(mesh)

  def batch_at(step: int) -> data_lib.Batch:
    sample = _group_sampler(datas, data_lib.curriculum_stage(key, step), key.batch_size, dtype_name)
    return jax.tree.map(lambda x: training.split_over_mesh(x, stacked),
                        sample(data_keys, jnp.asarray(step, jnp.int32)))

  return batch_at


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _member(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda x: x[i], tree)


@dataclasses.dataclass
class _Run:
  """One model's bookkeeping: its config, work directory, checkpointer and metrics."""

  config: config_lib.TrainConfig
  name: str
  workdir: str | None
  checkpointer: checkpointing.Checkpointer | None = None
  metrics_file: Any = None
  start_step: int = 0
  last_checkpoint: int | None = None
  state: Any = None
  history: list = dataclasses.field(default_factory=list)

  def record(self, entry: dict) -> None:
    self.history.append(entry)
    if self.metrics_file is not None and jax.process_index() == 0:
      self.metrics_file.write(json.dumps(entry) + "\n")
      self.metrics_file.flush()

  def close(self) -> None:
    if self.metrics_file is not None and not self.metrics_file.closed:
      self.metrics_file.close()
    if self.checkpointer is not None:
      self.checkpointer.close()


def _open(run: _Run, abstract: Any, mesh: Mesh) -> None:
  """Writes the config, resumes from the newest verified checkpoint and opens metrics.jsonl."""
  if run.workdir is None:
    return
  config = run.config
  os.makedirs(run.workdir, exist_ok=True)
  checkpointing.write_config(run.workdir, config)
  run.checkpointer = checkpointing.Checkpointer(
      run.workdir, max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every)
  latest = run.checkpointer.resume_step()
  if latest is not None:
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=training.replicated(mesh)),
        abstract)
    run.state = run.checkpointer.restore(latest, target)
    run.start_step = run.last_checkpoint = latest
    logging.info("%s: resumed from step %d in %s.", run.name, latest, run.workdir)
  if jax.process_index() == 0:
    metrics_lib.truncate_history(run.workdir, run.start_step)
  run.metrics_file = open(metrics_lib.metrics_path(run.workdir), "a")


def train_group(configs: Sequence[config_lib.TrainConfig],
                workdirs: Sequence[str | None] | None = None, *,
                names: Sequence[str] | None = None, stop_at_step: int | None = None,
                devices: Any = None,
                evaluate_fn: Callable | None = None) -> list[training.TrainResult]:
  """Trains models of one structure together; result `i` is what `train(configs[i], workdirs[i])`
  returns, up to floating-point reassociation.

  Args:
    configs: the runs; they may differ only in `seed` and in `TASK_FIELDS` of the data (see
      `group_by_structure` to split a list).
    workdirs: one work directory (or None: nothing written) per config; default all None.
    names: names of the models in logs and errors (default: the work directory, or `configs[i]`).
    stop_at_step: as in `kcg.training.train`, for every model.
    devices: as in `kcg.training.train`.
    evaluate_fn: as in `kcg.training.train`, for every model.

  Returns:
    One `TrainResult` per config, in order.

  Raises:
    ValueError: configs of different structure, or workdirs / names of the wrong length.
    DivergenceError: at the first non-finite step of any model; its `.model` names the model.
    CheckpointError: a work directory holds another run.
  """
  configs = list(configs)
  if not configs:
    raise ValueError("train_group needs at least one TrainConfig.")
  for i, config in enumerate(configs):
    if not isinstance(config, config_lib.TrainConfig):
      raise ValueError(f"train_group needs TrainConfigs (see config_from_dict); configs[{i}] is a "
                       f"{type(config).__name__}.")
  key = structure_key(configs[0])
  for i, config in enumerate(configs):
    if structure_key(config) != key:
      diff = checkpointing._differences(config_lib.config_to_dict(key),
                                        config_lib.config_to_dict(structure_key(config)))
      raise ValueError(
          f"train_group trains models that differ only in the seed and the task "
          f"({', '.join(TASK_FIELDS)}); configs[{i}] differs from configs[0] in "
          f"{'; '.join(diff)}. Split the list with group_by_structure.")
  num = len(configs)
  workdirs = [None] * num if workdirs is None else list(workdirs)
  if len(workdirs) != num:
    raise ValueError(f"train_group got {num} configs but {len(workdirs)} workdirs; pass one each.")
  given = [os.path.abspath(w) for w in workdirs if w is not None]
  if len(set(given)) != len(given):
    raise ValueError("train_group got the same workdir twice; give each model its own.")
  if names is None:
    names = [w if w is not None else f"configs[{i}]" for i, w in enumerate(workdirs)]
  names = [str(n) for n in names]
  if len(names) != num:
    raise ValueError(f"train_group got {num} configs but {len(names)} names; pass one each.")

  mesh = training.make_mesh(devices)
  training.check_batch_divides(key.batch_size, mesh)
  config_lib.dtype_of(key)
  graphdef, abstract = training.abstract_train_state(key)
  runs = [_Run(c, n, w) for c, n, w in zip(configs, names, workdirs)]
  results = [None] * num
  try:
    for run in runs:
      _open(run, abstract, mesh)
    by_start: dict[int, list[int]] = {}
    for i, run in enumerate(runs):
      by_start.setdefault(run.start_step, []).append(i)
    for start, members in sorted(by_start.items()):
      for i, result in zip(members, _train_together([runs[i] for i in members], key, graphdef, mesh,
                                                    start, stop_at_step, evaluate_fn)):
        results[i] = result
  finally:
    for run in runs:
      run.close()
  return results


def _train_together(runs: list[_Run], key: config_lib.TrainConfig, graphdef: nnx.GraphDef,
                    mesh: Mesh, start_step: int, stop_at_step: int | None,
                    evaluate_fn: Callable | None) -> list[training.TrainResult]:
  """The loop of `kcg.training.train` for models that resume from the same step."""
  num_steps = key.num_steps
  end_step = num_steps if stop_at_step is None else min(num_steps, int(stop_at_step))
  seeds = [run.config.seed for run in runs]
  if all(run.state is None for run in runs) and max(seeds) < 2**31:
    state = _group_init_fn(key, mesh)(jnp.asarray(seeds, jnp.int32))
  else:
    state = _stack([run.state if run.state is not None else training.init_state(run.config, mesh)[1]
                    for run in runs])
  for run in runs:
    run.state = None
  step_fn = group_step_fn(key, mesh)
  batch_at = make_group_batch_fn([run.config for run in runs], mesh)

  schedule = optim_lib.learning_rate_schedule(key.optim, num_steps)
  host = lambda x: np.asarray(x.addressable_data(0))
  healthy = jax.device_put(jnp.ones((len(runs),), bool), training.replicated(mesh))
  pending = []

  def check_health():
    flags = host(healthy)
    if flags.all():
      return
    i = int(np.argmin(flags))
    bad_step, metrics = next((s, m) for s, m in pending if not host(m["finite"])[i])
    run = runs[i]
    raise training.divergence_error(run.config, bad_step, float(host(metrics["loss"])[i]),
                                    float(host(metrics["grad_norm"])[i]), run.last_checkpoint,
                                    model=run.name)

  def evaluate(done):
    for i, run in enumerate(runs):
      model, _ = nnx.merge(graphdef, _member(state, i))
      run.record(eval_lib.eval_record(model, run.config, done, evaluate_fn))

  interval_start = time.perf_counter()
  interval_steps = 0
  for step in range(start_step, end_step):
    state, healthy, metrics = step_fn(state, batch_at(step), healthy)
    done = step + 1
    pending.append((done, metrics))
    interval_steps += 1
    if step == start_step:
      jax.block_until_ready(metrics)
      logging.info("group of %d: first step (compilation included) took %.2f s", len(runs),
                   time.perf_counter() - interval_start)
      interval_start, interval_steps = time.perf_counter(), 0
    if done % key.log_every == 0 or done == end_step:
      check_health()
      losses = np.mean([host(m["loss"]) for _, m in pending], axis=0)
      grad_norms = host(pending[-1][1]["grad_norm"])
      elapsed = time.perf_counter() - interval_start
      stage = data_lib.curriculum_stage(key, step)
      for i, run in enumerate(runs):
        run.record({"step": done, "loss": float(losses[i]), "grad_norm": float(grad_norms[i]),
                    "learning_rate": float(schedule(step)),
                    "steps_per_sec": interval_steps / elapsed if interval_steps else None,
                    "input_dim": stage.input_dim, "num_support": stage.num_support})
      logging.info("group of %d: step %d/%d  loss %s  %.1f steps/s", len(runs), done, num_steps,
                   " ".join(f"{x:.4g}" for x in losses),
                   interval_steps / elapsed if interval_steps else float("nan"))
      pending = []
      interval_steps = 0
      interval_start = time.perf_counter()
    if key.eval_every and done % key.eval_every == 0 and done != num_steps:
      check_health()
      evaluate(done)
      interval_start = time.perf_counter()
    if done % key.checkpoint_every == 0 or done == end_step:
      check_health()
      for i, run in enumerate(runs):
        if run.checkpointer is not None:
          run.checkpointer.save(done, _member(state, i))
          run.last_checkpoint = done
      interval_start = time.perf_counter()

  final_step = max(end_step, start_step)
  results = []
  for i, run in enumerate(runs):
    model, optimizer = nnx.merge(graphdef, _member(state, i))
    if final_step == num_steps and start_step < num_steps and key.final_eval:
      run.record(eval_lib.eval_record(model, run.config, final_step, evaluate_fn))
      if run.workdir is not None:
        run.metrics_file.close()
        eval_lib.write_final_evaluation(run.workdir, model, run.config)
    results.append(training.TrainResult(model, optimizer, final_step, run.history))
  return results
