"""Checkpoints: exact resume, load by path, keep-last-N, recovery from damaged or unconfirmed steps,
read-only loading, extension to more steps, and refusing non-finite states."""

import json
import logging as pylogging
import math
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import training
from kcg._src import checkpointing
from kcg._src import training as training_loop


def tiny_config(**overrides) -> training.TrainConfig:
  base = dict(model=training.ModelSpec(num_layers=1, width=8, head_dim=8),
              data=training.DataSpec(input_dim=3, num_support=6, num_query=2),
              num_steps=6, batch_size=8, log_every=2, checkpoint_every=2, keep_checkpoints=2,
              eval_batch_size=8, final_eval=False)
  base.update(overrides)
  return training.TrainConfig(**base)


def _leaves(result):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state((result.model, result.optimizer)))]


def _model_leaves(model):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model))]


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


def _largest_file(step_dir):
  return max((os.path.join(root, f) for root, _, files in os.walk(step_dir) for f in files),
             key=os.path.getsize)


def _snapshot(workdir):
  """Every directory and file under `workdir` with its size and modification time."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      info = os.stat(path)
      out[os.path.relpath(path, workdir)] = (info.st_size if name in files else None,
                                             info.st_mtime_ns)
  return out


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


def test_load_trained_never_writes_to_the_workdir(damaged_copy, caplog):
  # What a running trainer leaves mid-save: orbax's temporary directory, and a committed step whose
  # manifest is not written yet. Loading must use step 6 and touch none of it.
  checkpoints = os.path.join(damaged_copy, "checkpoints")
  tmp = os.path.join(checkpoints, "10.orbax-checkpoint-tmp-123")
  shutil.copytree(os.path.join(checkpoints, "6"), tmp)
  shutil.copytree(os.path.join(checkpoints, "6"), os.path.join(checkpoints, "8"))
  before = _snapshot(damaged_copy)
  with caplog.at_level(pylogging.WARNING):
    loaded = kcg.training.load_trained(damaged_copy)
  assert loaded.step == 6 and os.path.isdir(tmp)
  assert "Skipping checkpoint step 8" in caplog.text and "no manifest" in caplog.text
  assert _snapshot(damaged_copy) == before


def test_damaged_older_checkpoint_does_not_block_the_newer_one(damaged_copy):
  manifest = json.load(open(os.path.join(damaged_copy, "checkpoint_manifests", "4.json")))
  name = max(manifest, key=lambda p: manifest[p][0])
  path = os.path.join(damaged_copy, "checkpoints", "4", name)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  assert kcg.training.load_trained(damaged_copy).step == 6
  assert training.train(tiny_config(), damaged_copy).step == 6  # Resumes: nothing left to do.
  with pytest.raises(checkpointing.CheckpointError, match="checkpoints/4 is corrupt.*contents differ"):
    kcg.training.load_trained(damaged_copy, step=4)


def _truncate(workdir):
  largest = _largest_file(os.path.join(workdir, "checkpoints", "6"))
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _drop_manifest(workdir):
  os.remove(os.path.join(workdir, "checkpoint_manifests", "6.json"))


def _drop_commit_marker(workdir):
  os.remove(os.path.join(workdir, "checkpoints", "6", "commit_success.txt"))


def _garble_manifest(workdir):
  path = os.path.join(workdir, "checkpoint_manifests", "6.json")
  text = open(path).read()
  open(path, "w").write(text[:len(text) // 2])


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "corrupt.*truncated"),
    (_drop_manifest, "has no manifest"),  # a crash between orbax's commit and the manifest
    (_drop_commit_marker, "partial.*commit"),
    (_garble_manifest, "checkpoint_manifests/6.json is not valid JSON"),
])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(damaged_copy, damage, reason, caplog):
  damage(damaged_copy)
  with caplog.at_level(pylogging.WARNING):
    loaded = kcg.training.load_trained(damaged_copy)
  assert loaded.step == 4
  assert "Skipping checkpoint step 6" in caplog.text
  with pytest.raises(checkpointing.CheckpointError, match=reason):
    kcg.training.load_trained(damaged_copy, step=6)


@pytest.mark.parametrize("damage", [_drop_manifest, _truncate])
def test_resume_recovers_from_the_newest_verified_step(finished_run, damaged_copy, damage, caplog):
  _, uninterrupted = finished_run
  damage(damaged_copy)
  with caplog.at_level(pylogging.WARNING):
    resumed = training.train(tiny_config(), damaged_copy)
  assert "Moved unverified checkpoint step 6" in caplog.text
  for a, b in zip(_leaves(uninterrupted), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  checkpointing.verify(damaged_copy, 6)  # Saved again, with its manifest.
  assert os.listdir(os.path.join(damaged_copy, "unverified_checkpoints")) != []
  assert [h["step"] for h in training.load_history(damaged_copy)] == [2, 4, 6]


def test_interrupted_save_is_removed_by_the_trainer(damaged_copy):
  tmp = os.path.join(damaged_copy, "checkpoints", "8.orbax-checkpoint-tmp-123")
  shutil.copytree(os.path.join(damaged_copy, "checkpoints", "6"), tmp)
  assert training.train(tiny_config(), damaged_copy).step == 6
  assert not os.path.exists(tmp)


def test_workdir_of_another_config_is_refused(finished_run, tmp_path):
  workdir = str(tmp_path / "other")
  shutil.copytree(finished_run[0], workdir)
  with pytest.raises(checkpointing.CheckpointError, match=r"different config than this run \(seed: 0 -> 5\)"):
    training.train(tiny_config(seed=5), workdir)
  with pytest.raises(checkpointing.CheckpointError, match="num_steps: 6 -> 4.*only be extended"):
    training.train(tiny_config(num_steps=4), workdir)


def test_finished_run_extends_to_more_steps(finished_run, tmp_path):
  """6 -> 8 steps: the run continues from its step-6 state with the cosine schedule of 8 steps."""
  workdir = str(tmp_path / "extended")
  shutil.copytree(finished_run[0], workdir)
  longer = tiny_config(num_steps=8)
  extended = training.train(longer, workdir)
  assert extended.step == 8 and int(extended.optimizer.step[...]) == 8
  assert training.read_config(workdir) == longer
  # Reference: restore step 6 and apply steps 6 and 7 of the longer run by hand.
  mesh = training.make_mesh()  # The devices train() used.
  _, abstract = training_loop.abstract_train_state(longer)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=training_loop.replicated(mesh)),
                        abstract)
  state = checkpointing.restore(finished_run[0], 6, target)
  step_fn = training.train_step_fn(longer, mesh)
  batch_at = training.make_batch_fn(longer, mesh)
  for step in (6, 7):
    state, _ = step_fn(state, batch_at(step))
  for a, b in zip([np.asarray(x) for x in jax.tree.leaves(state)], _leaves(extended)):
    np.testing.assert_array_equal(a, b)
  # The learning rate of the extension: the 8-step cosine at count 7, not the finished 6-step
  # schedule's end value 0. The schedule computes in float32, and 1 + cos(7 pi / 8) = 0.076
  # cancels: float32 rounding (6e-8) of the cosine grows ~13x relative, hence 1e-5.
  lr = tiny_config().optim.learning_rate
  (record,) = [h for h in training.load_history(workdir) if h["step"] == 8]
  np.testing.assert_allclose(record["learning_rate"], lr * 0.5 * (1 + math.cos(math.pi * 7 / 8)),
                             rtol=1e-5)
  # Other changes still refuse, and so does going back to fewer steps.
  with pytest.raises(checkpointing.CheckpointError, match="num_steps: 8 -> 6"):
    training.train(tiny_config(), workdir)


def test_non_finite_states_are_never_saved_or_loaded(damaged_copy, monkeypatch):
  config = tiny_config()
  graphdef, abstract = training_loop.abstract_train_state(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  state = checkpointing.restore(damaged_copy, 6, target)
  model, optimizer = nnx.merge(graphdef, state)
  model.embed.kernel[...] = model.embed.kernel[...].at[0, 0].set(np.nan)
  bad_state = nnx.state((model, optimizer))
  checkpointer = checkpointing.Checkpointer(damaged_copy, max_to_keep=3)
  with pytest.raises(checkpointing.CheckpointError, match="Refusing to save step 8.*1 NaN or Inf"):
    checkpointer.save(8, bad_state)
  assert checkpointing.checkpoint_steps(damaged_copy) == [4, 6]
  # A NaN checkpoint written without the guard (as older kcg did) is refused when loading.
  monkeypatch.setattr(checkpointing, "count_non_finite", lambda state: 0)
  checkpointer.save(8, bad_state)
  checkpointer.close()
  monkeypatch.undo()
  with pytest.raises(ValueError, match="checkpoints/8 holds 1 NaN or Inf.*earlier step"):
    kcg.training.load_trained(damaged_copy)
  assert kcg.training.load_trained(damaged_copy, step=6).step == 6


def test_missing_or_broken_run_directory_is_reported(tmp_path, finished_run):
  with pytest.raises(checkpointing.CheckpointError, match="not a kcg training directory"):
    kcg.training.load_trained(str(tmp_path))
  workdir = str(tmp_path / "broken")
  shutil.copytree(finished_run[0], workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(checkpointing.CheckpointError, match="broken/config.json is not valid JSON"):
    kcg.training.load_trained(workdir)
  empty = tmp_path / "empty"
  empty.mkdir()
  checkpointing.write_config(str(empty), tiny_config())
  with pytest.raises(checkpointing.CheckpointError, match="No verified checkpoint"):
    kcg.training.load_trained(str(empty))


def test_metrics_cut_off_mid_line_resume_cleanly(damaged_copy):
  path = os.path.join(damaged_copy, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 7, "loss": 0.')  # A kill while writing a record.
  assert [h["step"] for h in training.load_history(damaged_copy)] == [2, 4, 6]
  training.train(tiny_config(), damaged_copy)
  assert open(path).read().endswith("}\n")
  with open(path, "a") as f:
    f.write("garbage\n{}\n")
  with pytest.raises(ValueError, match="metrics.jsonl line 4 is not a JSON record"):
    training.load_history(damaged_copy)
