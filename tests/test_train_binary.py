"""The experiment binary and every config's `runlocal` variant, end to end."""

import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import training
from kcg._src import checkpointing
from kcg._src import training as training_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_binary(config_arg, workdir, *extra, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={config_arg}", f"--workdir={workdir}",
       *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _check_outputs(workdir, config):
  records = training.load_history(workdir)
  train_records = [r for r in records if "loss" in r]
  assert train_records[-1]["step"] == config.num_steps
  assert all(r["steps_per_sec"] > 0 and np.isfinite(r["loss"]) for r in train_records)
  for name in ("loss.png", "error_vs_supports.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == PNG_MAGIC
  evaluation = json.load(open(os.path.join(workdir, "eval.json")))
  assert set(evaluation) >= {"in_distribution", "gd_fit", "error_vs_supports", "ood"}
  assert set(evaluation["ood"]) == set(config.ood_shifts)
  return evaluation


def test_lsa_linear_runlocal_binary(tmp_path):
  workdir = str(tmp_path / "lsa")
  proc = _run_binary("experiments/configs/lsa_linear.py:runlocal", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "steps/s" in proc.stderr and "final: model mse" in proc.stderr
  config = training.read_config(workdir)
  assert config.num_steps == 20 and config.model.num_layers == 1
  _check_outputs(workdir, config)
  loaded = kcg.training.load_trained(workdir)
  prompts = training.sample_prompts(jax.random.key(0), config.data, batch_size=2)
  assert loaded.predict(prompts.x_support, prompts.y_support, prompts.x_query).shape == (2, 4)


def test_binary_rejects_bad_configs(tmp_path):
  # Three subprocesses (each costs a JAX import); the other checks are tested in-process.
  proc = _run_binary("experiments/configs/lsa_linear.py:runlocal", str(tmp_path / "bad"),
                     "--config.model.num_layers=0")
  assert proc.returncode != 0 and "depth" in proc.stderr
  assert not os.path.exists(tmp_path / "bad" / "config.json")
  proc = _run_binary("experiments/configs/lsa_linear.py:runlocal", str(tmp_path / "bad"),
                     "--config.foo=1")
  assert proc.returncode != 0
  assert "--config.foo: the config has no field 'foo'; valid fields: batch_size, " in proc.stderr
  assert "Traceback" not in proc.stderr
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "experiments.train",
                         "--config=experiments/configs/lsa_linear.py:runlocal"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "--workdir is required" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_binary_stops_a_diverging_run_at_the_first_bad_step(tmp_path):
  """learning_rate=1e6: non-zero exit naming the step and the learning rate; every checkpoint
  on disk is finite and precedes that step, and that step is the first non-finite one."""
  workdir = str(tmp_path / "diverged")
  proc = _run_binary("experiments/configs/lsa_linear.py:runlocal", workdir,
                     "--config.optim.learning_rate=1e6", "--config.checkpoint_every=1",
                     "--config.keep_checkpoints=50")
  assert proc.returncode != 0, proc.stderr[-3000:]
  match = re.search(r"Training diverged at step (\d+): .*learning rate", proc.stderr)
  assert match, proc.stderr[-3000:]
  bad = int(match.group(1))
  # A checkpoint is written only after checking every step before it, so these steps were finite.
  assert checkpointing.checkpoint_steps(workdir) == list(range(1, bad))
  last = kcg.load_trained(workdir)  # refuses non-finite parameters
  assert last.step == bad - 1
  # The next step from the last checkpoint is not finite.
  config = last.config
  mesh = training.make_mesh(jax.devices()[:1])
  graphdef, abstract = training_loop.abstract_train_state(config)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=training_loop.replicated(mesh)),
                        abstract)
  state = checkpointing.restore(workdir, bad - 1, target)
  _, metrics = training.train_step_fn(config, mesh)(state, training.make_batch_fn(config, mesh)(bad - 1))
  assert not bool(metrics["finite"])


def test_training_and_final_evaluation_finish_on_four_host_devices(tmp_path):
  """Four forced host devices on a 2-core machine give XLA:CPU a 4-thread pool. A batch sampler
  partitioned over the mesh ran one batched QR (jaxlib LAPACK) per device, each blocking a pool
  thread until its own sub-tasks ran on that pool: at d = 64 and 256 prompts the first step hung at
  0% CPU every time. Evaluation used the parameters replicated over the mesh, one program per device.
  Both now run on one device; a hang shows up here as the timeout."""
  workdir = str(tmp_path / "four_devices")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  args = [sys.executable, "-m", "experiments.train",
          "--config=experiments/configs/lsa_linear.py:runlocal", f"--workdir={workdir}",
          "--config.data.input_dim=64", "--config.batch_size=256", "--config.num_steps=2"]
  try:
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  except subprocess.TimeoutExpired:
    pytest.fail("training or its final evaluation on 4 host devices did not finish in 240 s (a "
                "deadlocked run sits at 0% CPU; py-spy dump --native shows where).")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Devices: [CpuDevice(id=0), CpuDevice(id=1), CpuDevice(id=2), CpuDevice(id=3)]" in proc.stderr
  assert os.path.exists(os.path.join(workdir, "eval.json"))


@pytest.mark.parametrize("name,arg", [("linear_deep", "runlocal"),
                                      ("gpt_icl", "linear,runlocal")])
def test_config_runlocal_trains(name, arg, tmp_path):
  """Training, checkpoints and metrics of every runlocal config (the evaluation is tested below)."""
  module = importlib.import_module(f"experiments.configs.{name}")
  config = training.config_from_dict(module.get_config(arg))
  config = dataclasses.replace(config, final_eval=False)
  workdir = str(tmp_path / name)
  result = training.train(config, workdir)
  assert result.step == config.num_steps
  records = training.load_history(workdir)
  assert records[-1]["step"] == config.num_steps and np.isfinite(records[-1]["loss"])
  assert kcg.training.load_trained(workdir).step == config.num_steps


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [("linear_deep", "runlocal"),
                                      ("gpt_icl", "linear,runlocal")])
def test_config_runlocal_trains_and_evaluates(name, arg, tmp_path):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = training.config_from_dict(module.get_config(arg))
  workdir = str(tmp_path / name)
  training.train(config, workdir)
  evaluation = _check_outputs(workdir, config)
  assert np.isfinite(evaluation["in_distribution"]["mse"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sparse_linear", "relu_network", "decision_tree"])
def test_gpt_icl_families_runlocal(family, tmp_path):
  module = importlib.import_module("experiments.configs.gpt_icl")
  config = training.config_from_dict(module.get_config(f"{family},runlocal"))
  training.train(config, str(tmp_path / family))
  _check_outputs(str(tmp_path / family), config)


@pytest.mark.slow
def test_killed_binary_resumes_exactly(tmp_path):
  """SIGKILL mid-run, rerun, and compare with an uninterrupted run of the same seed: bitwise equal."""
  args = ["--config.num_steps=1000", "--config.checkpoint_every=100", "--config.log_every=10",
          "--config.final_eval=False"]
  reference = str(tmp_path / "reference")
  assert _run_binary("experiments/configs/lsa_linear.py:runlocal", reference, *args).returncode == 0
  killed = str(tmp_path / "killed")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/lsa_linear.py:runlocal",
       f"--workdir={killed}", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 240

  def logged_step():
    if not os.path.exists(metrics):
      return 0
    lines = open(metrics).read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0

  # Kill just after a log line at step 110..150: a checkpoint (step 100) exists and the next save
  # is tens of steps away, so the kill lands between saves.
  while time.time() < deadline and logged_step() <= 100:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  stopped_at = logged_step()
  assert 100 < stopped_at < 1000, stopped_at
  rerun = _run_binary("experiments/configs/lsa_linear.py:runlocal", killed, *args)
  assert rerun.returncode == 0 and "Resumed from step" in rerun.stderr, rerun.stderr[-3000:]
  a, b = kcg.training.load_trained(reference), kcg.training.load_trained(killed)
  assert a.step == b.step == 1000
  for x, y in zip(jax.tree.leaves(nnx.state(a.model)), jax.tree.leaves(nnx.state(b.model))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
