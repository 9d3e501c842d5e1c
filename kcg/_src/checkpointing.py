"""Checkpoints of training runs: orbax `CheckpointManager` plus a manifest that proves a save finished.

Layout of a work directory:

    DIR/config.json                 the TrainConfig (JSON), written before the first step
    DIR/checkpoints/<step>/         orbax checkpoints (StandardSave of nnx.state((model, optimizer)))
    DIR/checkpoint_manifests/<step>.json   size and sha256 of every file of that checkpoint

Why a manifest: orbax renames a finished save into place atomically and writes `commit_success.txt`,
so an interrupted save is a `<step>.orbax-checkpoint-tmp*` directory that orbax never lists. But a
step directory can still be damaged after the fact (an incomplete copy or sync, a truncated file),
and orbax would load such a directory or fail deep inside tensorstore. Every step is therefore
checked before use: the commit marker must be present and every file must match the manifest written
after the save returned. A failed check raises `CheckpointError` naming the directory and the fix;
nothing falls back silently to an older step. Interrupted saves (tmp directories) hold nothing that
was ever loadable; they are logged and removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_SUBDIR = "checkpoints"
MANIFEST_SUBDIR = "checkpoint_manifests"
CONFIG_FILE = "config.json"
COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
  """A checkpoint directory is partial, corrupt, or does not match the run."""


def write_config(workdir: str, config: Any) -> None:
  """Writes `workdir/config.json`; refuses a workdir that holds a run of a different config."""
  from kcg._src import training  # config <-> dict lives with the config classes.

  path = os.path.join(workdir, CONFIG_FILE)
  as_dict = training.config_to_dict(config)
  if os.path.exists(path):
    existing = read_config(workdir)
    if existing != config:
      raise CheckpointError(
          f"{path} holds a different config than this run; resuming would mix two runs. Use a new "
          "--workdir, or delete the old one.")
    return
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(as_dict, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_config(workdir: str):
  """The `TrainConfig` saved in `workdir/config.json`."""
  from kcg._src import training

  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {workdir!r} is not a kcg training directory "
                          "(train with `python -m experiments.train --workdir=...`).")
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged.") from None
  return training.config_from_dict(raw)


def _file_digests(step_dir: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file under `step_dir`."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      full = os.path.join(root, name)
      digest = hashlib.sha256()
      with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      out[os.path.relpath(full, step_dir)] = [os.path.getsize(full), digest.hexdigest()]
  return out


@dataclasses.dataclass
class Checkpointer:
  """Periodic saves with orbax, keeping the last `max_to_keep`, each verified before restore.

  Attributes:
    workdir: the run's directory (checkpoints go to `workdir/checkpoints`).
    max_to_keep: checkpoints kept.
    save_interval_steps: orbax saves steps that are multiples of this (and `force=True` saves).
  """

  workdir: str
  max_to_keep: int = 3
  save_interval_steps: int = 1

  def __post_init__(self):
    self.directory = os.path.abspath(os.path.join(self.workdir, CHECKPOINT_SUBDIR))
    self.manifest_dir = os.path.join(os.path.abspath(self.workdir), MANIFEST_SUBDIR)
    os.makedirs(self.manifest_dir, exist_ok=True)
    self._remove_interrupted_saves()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.max_to_keep, save_interval_steps=self.save_interval_steps,
        enable_async_checkpointing=False, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _remove_interrupted_saves(self) -> None:
    if not os.path.isdir(self.directory) or jax.process_index() != 0:
      return
    for name in os.listdir(self.directory):
      if TMP_MARKER in name:
        logging.warning("Removing %s: a save that was interrupted before orbax committed it.",
                        os.path.join(self.directory, name))
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _step_dirs(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def verify(self, step: int) -> None:
    """Raises CheckpointError unless `step` is committed and every file matches its manifest."""
    step_dir = os.path.join(self.directory, str(step))
    fix = (f"Delete {step_dir} (and {self._manifest_path(step)}) to resume from the previous "
           "checkpoint, or start a fresh --workdir.")
    if not os.path.isdir(step_dir):
      raise CheckpointError(f"Checkpoint step {step} not found in {self.directory}.")
    if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
      raise CheckpointError(f"Checkpoint {step_dir} is partial: it has no {COMMIT_MARKER} commit "
                            f"marker, so its save never finished. {fix}")
    manifest_path = self._manifest_path(step)
    if not os.path.exists(manifest_path):
      raise CheckpointError(f"Checkpoint {step_dir} has no manifest {manifest_path}: the run stopped "
                            f"before the save was confirmed, or files were copied partially. {fix}")
    with open(manifest_path) as f:
      expected = json.load(f)
    actual = _file_digests(step_dir)
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
      raise CheckpointError(f"Checkpoint {step_dir} is corrupt: {'; '.join(detail)}. {fix}")

  def _manifest_path(self, step: int) -> str:
    return os.path.join(self.manifest_dir, f"{step}.json")

  def latest_step(self) -> int | None:
    """The newest step after verifying every step on disk; None if there is none."""
    steps = self._step_dirs()
    for step in steps:
      self.verify(step)
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, *, force: bool = True) -> bool:
    """Saves `state` at `step` (by default regardless of the interval) and writes its manifest."""
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self.manager.wait_until_finished()
    if saved and jax.process_index() == 0:
      manifest = _file_digests(os.path.join(self.directory, str(step)))
      tmp = self._manifest_path(step) + ".tmp"
      with open(tmp, "w") as f:
        json.dump(manifest, f)
      os.replace(tmp, self._manifest_path(step))
      kept = set(self._step_dirs())
      for name in os.listdir(self.manifest_dir):
        stem = name.split(".")[0]
        if stem.isdigit() and int(stem) not in kept:
          os.remove(os.path.join(self.manifest_dir, name))
    return saved

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The verified state of `step`, laid out like `abstract_state` (ShapeDtypeStructs with shardings)."""
    self.verify(step)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax/tensorstore raise many types; all mean "cannot load this".
      raise CheckpointError(
          f"Checkpoint {os.path.join(self.directory, str(step))} could not be restored into this "
          f"model ({type(e).__name__}: {str(e)[:300]}). Does config.json match the checkpoint?") from e

  def close(self) -> None:
    """Waits for pending saves and releases the checkpoint manager."""
    self.manager.close()
