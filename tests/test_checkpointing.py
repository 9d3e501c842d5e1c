"""Checkpoints: exact resume, load by path, keep-last-N, and partial or corrupt directories reported."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import training
from kcg._src import checkpointing


def tiny_config(**overrides) -> training.TrainConfig:
  base = dict(model=training.ModelSpec(num_layers=1, width=8, head_dim=8),
              data=training.DataSpec(input_dim=3, num_support=6, num_query=2),
              num_steps=6, batch_size=8, log_every=2, checkpoint_every=2, keep_checkpoints=2,
              eval_batch_size=8, final_eval=False)
  base.update(overrides)
  return training.TrainConfig(**base)


def _leaves(result):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state((result.model, result.optimizer)))]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A completed 6-step run (checkpoints at 2, 4, 6; the last 2 kept) and its result."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, training.train(tiny_config(), workdir)


@pytest.fixture
def damaged_copy(finished_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_run[0], workdir)
  return workdir


def test_resume_after_stop_is_bitwise_identical(finished_run, tmp_path):
  _, uninterrupted = finished_run
  workdir = str(tmp_path / "resumed")
  first = training.train(tiny_config(), workdir, stop_at_step=3)  # Checkpoint at 2, stop at 3.
  assert first.step == 3
  resumed = training.train(tiny_config(), workdir)
  assert resumed.step == 6
  # Exact equality: the data of step s is drawn from fold_in(key(seed), s) and the optimizer state
  # (moments, count) is restored, so the resumed run repeats the same float operations.
  for a, b in zip(_leaves(uninterrupted), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  steps = [h["step"] for h in training.load_history(workdir) if "loss" in h]
  assert steps == [2, 3, 4, 6]  # logged at the interval and at the stop


def test_keeps_the_last_checkpoints_with_manifests(finished_run):
  workdir, _ = finished_run
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoint_manifests"))) == ["4.json", "6.json"]
  assert training.read_config(workdir) == tiny_config()


def test_load_trained_predicts_like_the_trained_model(finished_run):
  workdir, result = finished_run
  loaded = kcg.training.load_trained(workdir)
  assert loaded.step == 6 and loaded.config == tiny_config()
  assert isinstance(loaded.model, kcg.Transformer)
  prompts = training.sample_prompts(jax.random.key(9), loaded.config.data, batch_size=3)
  pred = loaded.predict(prompts.x_support, prompts.y_support, prompts.x_query)
  assert pred.shape == (3, 2)
  expected = training.make_predict_fn(result.model, loaded.config.data)(
      prompts.x_support, prompts.y_support, prompts.x_query)
  np.testing.assert_array_equal(pred, expected)
  tokens, num_prefix = loaded.encode(prompts.x_support, prompts.y_support, prompts.x_query)
  assert tokens.shape[1] == 6 + 1 + 2 and num_prefix == 7
  older = kcg.training.load_trained(workdir, step=4)
  assert older.step == 4


def test_missing_commit_marker_is_reported(damaged_copy):
  os.remove(os.path.join(damaged_copy, "checkpoints", "6", "commit_success.txt"))
  with pytest.raises(checkpointing.CheckpointError, match="partial.*commit"):
    kcg.training.load_trained(damaged_copy)
  # Resuming does not silently fall back to step 4 either.
  with pytest.raises(checkpointing.CheckpointError, match="checkpoints/6"):
    training.train(tiny_config(), damaged_copy)


def test_truncated_file_is_reported(damaged_copy):
  step_dir = os.path.join(damaged_copy, "checkpoints", "6")
  largest = max((os.path.join(root, f) for root, _, files in os.walk(step_dir) for f in files),
                key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  with pytest.raises(checkpointing.CheckpointError, match="corrupt.*truncated"):
    kcg.training.load_trained(damaged_copy)


def test_changed_bytes_are_reported(damaged_copy):
  manifest = json.load(open(os.path.join(damaged_copy, "checkpoint_manifests", "4.json")))
  name = max(manifest, key=lambda p: manifest[p][0])
  path = os.path.join(damaged_copy, "checkpoints", "4", name)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(checkpointing.CheckpointError, match="corrupt.*contents differ"):
    kcg.training.load_trained(damaged_copy)


def test_missing_manifest_is_reported(damaged_copy):
  os.remove(os.path.join(damaged_copy, "checkpoint_manifests", "6.json"))
  with pytest.raises(checkpointing.CheckpointError, match="no manifest"):
    kcg.training.load_trained(damaged_copy)


def test_interrupted_save_is_removed_not_loaded(damaged_copy):
  tmp = os.path.join(damaged_copy, "checkpoints", "8.orbax-checkpoint-tmp-123")
  shutil.copytree(os.path.join(damaged_copy, "checkpoints", "6"), tmp)
  loaded = kcg.training.load_trained(damaged_copy)
  assert loaded.step == 6 and not os.path.exists(tmp)


def test_workdir_of_another_config_is_refused(finished_run, tmp_path):
  workdir = str(tmp_path / "other")
  shutil.copytree(finished_run[0], workdir)
  with pytest.raises(checkpointing.CheckpointError, match="different config"):
    training.train(tiny_config(seed=5), workdir)


def test_missing_or_broken_run_directory_is_reported(tmp_path, finished_run):
  with pytest.raises(checkpointing.CheckpointError, match="not a kcg training directory"):
    kcg.training.load_trained(str(tmp_path))
  workdir = str(tmp_path / "broken")
  shutil.copytree(finished_run[0], workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(checkpointing.CheckpointError, match="not valid JSON"):
    kcg.training.load_trained(workdir)
  empty = tmp_path / "empty"
  empty.mkdir()
  checkpointing.write_config(str(empty), tiny_config())
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoint"):
    kcg.training.load_trained(str(empty))
