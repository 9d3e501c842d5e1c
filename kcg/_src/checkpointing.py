"""Checkpoints of training runs: orbax saves plus a manifest that proves a save finished.

Layout of a work directory:

    DIR/config.json                 the TrainConfig (JSON), written before the first step
    DIR/checkpoints/<step>/         orbax checkpoints (StandardSave of nnx.state((model, optimizer)))
    DIR/checkpoint_manifests/<step>.json   size and sha256 of every file of that checkpoint

Why a manifest: orbax renames a finished save into place atomically and writes `commit_success.txt`,
so an interrupted save is a `<step>.orbax-checkpoint-tmp*` directory that orbax never lists. But a
step directory can still be damaged after the fact (an incomplete copy or sync, a truncated file), or
the process can stop between orbax's commit and the manifest, and orbax would load such a directory
or fail deep inside tensorstore. A step is *verified* when its commit marker is present and every
file matches the manifest written after the save returned.

Reading (`latest_verified_step`, `restore`, used by `kcg.load_trained`) never writes to the work
directory, so it is safe while a trainer is running there: it takes the newest verified step and
logs a warning for every newer step it skips and why (a save still in progress looks like a step
without a manifest). Writing (`Checkpointer`, the trainer's) resumes from the newest verified step:
it removes interrupted saves (never loadable) and moves the unverified steps after the one it resumes
from to `DIR/unverified_checkpoints/` (in place they would block saving those steps again; training
repeats them bit for bit), and saves only finite states.
Restoring refuses a state with NaN or Inf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from kcg._src import train_config as config_lib

CHECKPOINT_SUBDIR = "checkpoints"
MANIFEST_SUBDIR = "checkpoint_manifests"
UNVERIFIED_SUBDIR = "unverified_checkpoints"
CONFIG_FILE = "config.json"
COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
# The item name orbax's CheckpointManager gives a single unnamed item inside a step directory.
_ITEM = "default"


class CheckpointError(ValueError):
  """A checkpoint directory is partial, corrupt, non-finite, or does not match the run."""


# ----------------------------------------------------------------------------------------------
# The config of a run.


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}): the {what} is damaged.") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}): the {what} is damaged.") from None


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def write_config(workdir: str, config: config_lib.TrainConfig) -> None:
  """Writes `workdir/config.json`, or checks it against the saved one.

  A saved config may differ only by a larger `num_steps` (the run is extended; the file is rewritten).
  Any other difference raises CheckpointError naming the fields: resuming would mix two runs.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    existing = read_config(workdir)
    if existing == config:
      return
    differences = _differences(config_lib.config_to_dict(existing),
                               config_lib.config_to_dict(config))
    extends = dataclasses.replace(existing, num_steps=config.num_steps) == config
    if not extends or config.num_steps < existing.num_steps:
      fix = ("A run can only be extended (a larger num_steps); " if extends else "")
      raise CheckpointError(
          f"{path} holds a different config than this run ({'; '.join(differences)}); resuming "
          f"would mix two runs. {fix}Use a new --workdir, or delete the old one.")
    logging.warning("Extending the run in %s from %d to %d steps; the learning rate follows the "
                    "schedule of %d steps from the resumed step on.", workdir, existing.num_steps,
                    config.num_steps, config.num_steps)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(config_lib.config_to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_config(workdir: str) -> config_lib.TrainConfig:
  """The `TrainConfig` saved in `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {workdir!r} is not a kcg training directory "
                          "(train with `python -m experiments.train --workdir=...`).")
  raw = _read_json(path, "run's config")
  try:
    return config_lib.config_from_dict(raw)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path} does not hold a valid TrainConfig: {e}") from None


# ----------------------------------------------------------------------------------------------
# Reading: verification and restore, never a write.


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(checkpoint_dir(workdir), str(step))


def manifest_path(workdir: str, step: int) -> str:
  return os.path.join(os.path.abspath(workdir), MANIFEST_SUBDIR, f"{step}.json")


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a (committed or not, verified or not) step directory, ascending."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _file_digests(directory: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in sorted(files):
      full = os.path.join(root, name)
      digest = hashlib.sha256()
      with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      out[os.path.relpath(full, directory)] = [os.path.getsize(full), digest.hexdigest()]
  return out


def verify(workdir: str, step: int) -> None:
  """Raises CheckpointError unless `step` is committed and every file matches its manifest."""
  directory, manifest = step_dir(workdir, step), manifest_path(workdir, step)
  if not os.path.isdir(directory):
    raise CheckpointError(f"Checkpoint step {step} not found in {checkpoint_dir(workdir)}.")
  if not os.path.exists(os.path.join(directory, COMMIT_MARKER)):
    raise CheckpointError(f"Checkpoint {directory} is partial: it has no {COMMIT_MARKER} commit "
                          "marker, so its save never finished.")
  if not os.path.exists(manifest):
    raise CheckpointError(f"Checkpoint {directory} has no manifest {manifest}: its save is still "
                          "in progress, or the run stopped before confirming it.")
  expected = _read_json(manifest, "checkpoint manifest")
  if not isinstance(expected, dict):
    raise CheckpointError(f"{manifest} is not a checkpoint manifest: the file is damaged.")
  try:
    actual = _file_digests(directory)
  except OSError as e:  # Removed or unreadable while we read it.
    raise CheckpointError(f"Checkpoint {directory} could not be read ({e}).") from None
  missing = sorted(set(expected) - set(actual))
  changed = sorted(p for p in expected if p in actual and actual[p] != expected[p])
  if missing or changed:
    detail = []
    if missing:
      detail.append(f"missing files {missing[:5]}")
    for p in changed[:5]:
      detail.append(f"{p}: size {actual[p][0]} (saved {expected[p][0]} bytes)"
                    + (", contents differ" if actual[p][0] == expected[p][0] else ", truncated"
                       if actual[p][0] < expected[p][0] else ""))
    raise CheckpointError(f"Checkpoint {directory} is corrupt: {'; '.join(detail)}.")


def latest_verified_step(workdir: str) -> int | None:
  """The newest verified step (None if there is none), logging a warning for each newer step skipped.

  Older steps are not read: a damaged old checkpoint does not block a healthy newer one.
  """
  for step in reversed(checkpoint_steps(workdir)):
    try:
      verify(workdir, step)
    except CheckpointError as e:
      logging.warning("Skipping checkpoint step %d: %s Using an older step.", step, e)
      continue
    return step
  return None


@jax.jit
def _count_non_finite(tree) -> jax.Array:
  counts = [jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sum(counts, jnp.zeros((), jnp.int32))


def count_non_finite(state: Any) -> int:
  """Entries of `state`'s floating leaves that are NaN or Inf."""
  return int(np.asarray(_count_non_finite(state)))


def restore(workdir: str, step: int, abstract_state: Any) -> Any:
  """The verified, finite state of `step`, laid out like `abstract_state` (ShapeDtypeStructs with
  shardings). Reads only. Raises CheckpointError for an unverified, unloadable or non-finite one."""
  verify(workdir, step)
  directory = step_dir(workdir, step)
  # A synchronous checkpointer: restoring needs none of the async one's background threads.
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    state = checkpointer.restore(os.path.join(directory, _ITEM),
                                 args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax/tensorstore raise many types; all mean "cannot load this".
    raise CheckpointError(
        f"Checkpoint {directory} could not be restored into this model ({type(e).__name__}: "
        f"{str(e)[:300]}). Does config.json match the checkpoint?") from e
  finally:
    checkpointer.close()
  bad = count_non_finite(state)
  if bad:
    older = [s for s in checkpoint_steps(workdir) if s < step]
    raise CheckpointError(
        f"Checkpoint {directory} holds {bad} NaN or Inf values: the run diverged before it was "
        f"saved. Load an earlier step (on disk: {older or 'none'}) or retrain with a smaller "
        "learning rate.")
  return state


# ----------------------------------------------------------------------------------------------
# Writing: the trainer's side.


@dataclasses.dataclass
class Checkpointer:
  """The trainer's checkpoints: resume from the newest verified step, periodic verified saves.

  Constructing one writes nothing; `resume_step` cleans up what an interrupted run left behind and
  `save` creates the directories.

  Attributes:
    workdir: the run's directory (checkpoints go to `workdir/checkpoints`).
    max_to_keep: checkpoints kept.
    save_interval_steps: `save(..., force=False)` saves steps that are multiples of this.
  """

  workdir: str
  max_to_keep: int = 3
  save_interval_steps: int = 1

  def __post_init__(self):
    self.directory = checkpoint_dir(self.workdir)
    self.manifest_dir = os.path.join(os.path.abspath(self.workdir), MANIFEST_SUBDIR)
    self.manager = None

  def verify(self, step: int) -> None:
    """Raises CheckpointError unless `step` is committed and every file matches its manifest."""
    verify(self.workdir, step)

  def latest_step(self) -> int | None:
    """The newest verified step (None if there is none); newer unverified ones are skipped."""
    return latest_verified_step(self.workdir)

  def resume_step(self) -> int | None:
    """The step to resume from (the newest verified one, or None), after removing interrupted
    saves and the unverified steps after it, with a warning for each."""
    step = self.latest_step()
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if TMP_MARKER in name:
          logging.warning("Removing %s: a save that was interrupted before orbax committed it.",
                          os.path.join(self.directory, name))
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      for newer in checkpoint_steps(self.workdir):
        if step is None or newer > step:
          self._set_aside(newer, resume_from=step or 0)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("kcg_checkpointing_resume")
    return step

  def _set_aside(self, step: int, resume_from: int) -> None:
    """Moves an unverified step (and its manifest) to `workdir/unverified_checkpoints/`."""
    aside = os.path.join(os.path.abspath(self.workdir), UNVERIFIED_SUBDIR)
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, str(step))
    suffix = 1
    while os.path.exists(target):
      target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
    os.replace(step_dir(self.workdir, step), target)
    if os.path.exists(manifest_path(self.workdir, step)):
      os.replace(manifest_path(self.workdir, step), target + ".manifest.json")
    logging.warning("Moved unverified checkpoint step %d to %s: training resumes from step %d and "
                    "saves that step again. Delete %s when you no longer need it.", step, target,
                    resume_from, aside)

  def _orbax_manager(self) -> ocp.CheckpointManager:
    if self.manager is None:
      os.makedirs(self.manifest_dir, exist_ok=True)
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.max_to_keep, save_interval_steps=self.save_interval_steps,
          enable_async_checkpointing=False, create=True)
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    return self.manager

  def save(self, step: int, state: Any, *, force: bool = True) -> bool:
    """Saves a finite `state` at `step` (by default regardless of the interval), then its manifest.

    Raises CheckpointError, writing nothing, if the state holds NaN or Inf.
    """
    bad = count_non_finite(state)
    if bad:
      raise CheckpointError(f"Refusing to save step {step}: the state holds {bad} NaN or Inf "
                            "values.")
    manager = self._orbax_manager()
    saved = manager.save(step, args=ocp.args.StandardSave(state), force=force)
    manager.wait_until_finished()
    if saved and jax.process_index() == 0:
      manifest = _file_digests(step_dir(self.workdir, step))
      tmp = manifest_path(self.workdir, step) + ".tmp"
      with open(tmp, "w") as f:
        json.dump(manifest, f)
      os.replace(tmp, manifest_path(self.workdir, step))
      kept = set(checkpoint_steps(self.workdir))
      for name in os.listdir(self.manifest_dir):
        stem = name.split(".")[0]
        if stem.isdigit() and int(stem) not in kept:
          os.remove(os.path.join(self.manifest_dir, name))
    return saved

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The verified, finite state of `step`, laid out like `abstract_state`."""
    return restore(self.workdir, step, abstract_state)

  def close(self) -> None:
    """Waits for pending saves and releases the checkpoint manager."""
    if self.manager is not None:
      self.manager.close()
