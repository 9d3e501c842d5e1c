"""Runs the reference-convergence experiment with its `runlocal` config and checks its outputs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import reference_convergence
from experiments.configs import reference_convergence as reference_convergence_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runlocal_results(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference_convergence"))
  config = reference_convergence_config.get_config("runlocal")
  returned = reference_convergence.run(config, workdir)
  return config, workdir, returned


def test_writes_results_json_and_png(runlocal_results):
  config, workdir, returned = runlocal_results
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["steps"] == list(range(config.num_steps + 1))
  assert results == json.loads(json.dumps(returned))  # What run returns is what it wrote.
  with open(os.path.join(workdir, "convergence.png"), "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(os.path.join(workdir, "convergence.png")) > 10_000
  assert results["dtype"] == "float64"


def test_numbers_are_finite_and_sane(runlocal_results):
  config, _, results = runlocal_results
  errors = results["relative_error"]
  assert set(errors) == set(reference_convergence.SOLVERS)
  k = config.task.num_support
  for name, curve in errors.items():
    assert len(curve) == config.num_steps + 1 and all(math.isfinite(v) for v in curve), name
    # Every solver starts from alpha_0 = 0, i.e. f_0 = 0: relative error exactly 1.
    assert curve[0] == pytest.approx(1.0, abs=1e-15), name
    assert min(curve) >= 0.0
  # CG terminates in at most k steps in exact arithmetic; float64 rounding at cond(A) <= ~1e3 leaves
  # about eps * kappa ~ 1e-13.
  assert errors["cg"][k] < 1e-8
  # GD and Chebyshev contract but cannot reach rounding in k steps at this condition number.
  assert 1e-6 < errors["gd"][k] < 1.0 and 1e-6 < errors["chebyshev"][k] < 1.0
  bound = np.asarray(results["cg_bound"])
  assert np.all(np.isfinite(bound)) and np.all(np.diff(bound) < 0)  # A geometric rate < 1.
  assert results["cg_bound_holds"] is True
  assert np.all(np.asarray(errors["cg"]) <= bound)  # RMS of pointwise-dominated errors.
  kappa = results["condition_number"]
  assert 1.0 <= kappa["min"] <= kappa["median"] <= kappa["max"] < 1e4
  assert results["oracle_query_mse"] >= 0.0 and results["runtime_s"] > 0.0


def test_format_table_rows(runlocal_results):
  config, _, results = runlocal_results
  convergence = reference_convergence.Convergence(
      {name: np.asarray(v) for name, v in results["relative_error"].items()},
      np.asarray(results["cg_bound"]), True, np.ones(1))
  lines = reference_convergence.format_table(convergence, every=4).splitlines()
  assert lines[0].split() == ["t", *reference_convergence.SOLVERS, "cg_bound"]
  assert [int(line.split()[0]) for line in lines[1:]] == [0, 4, 8, 10]


def test_config_variants():
  default = reference_convergence_config.get_config()
  assert default.task.family == "linear_anisotropic" and default.task.condition_number == 100.0
  assert default.task.input_dim == 8 and default.task.num_support == 32
  assert default.features.name == "identity"
  local = reference_convergence_config.get_config("runlocal")
  assert local.num_steps >= local.task.num_support  # so the test can check CG at t = k.
  with pytest.raises(ValueError, match="Unknown config variant 'big'"):
    reference_convergence_config.get_config("big")


def test_multi_output_task_is_rejected(tmp_path):
  config = reference_convergence_config.get_config("runlocal")
  config.task.num_outputs = 2
  with pytest.raises(ValueError, match="set task.num_outputs = 1"):
    reference_convergence.run(config, str(tmp_path))


@pytest.mark.slow
def test_command_line_runs_runlocal(tmp_path):
  """The documented command, as a subprocess (a fresh interpreter)."""
  command = [sys.executable, "-m", "experiments.reference_convergence", f"--workdir={tmp_path}",
             "--config=experiments/configs/reference_convergence.py:runlocal"]
  completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "cg_bound" in completed.stdout
  assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "convergence.png")
  missing = subprocess.run(command[:3], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "--workdir is required" in missing.stderr
