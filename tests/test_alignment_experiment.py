"""experiments/alignment.py: bad configs fail before training; the smoke scale end to end (fast) with a
resumed rerun; the runlocal scale as a subprocess (slow)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kcg
from experiments import alignment as binary
from experiments.configs import alignment as alignment_config
import figure_style

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("field,value,message", [
    ("tasks", ("kernel_prior", "fourier"), "unknown task 'fourier'"),
    ("models", ("gpt_L2", "mlp_L3"), "unknown model 'mlp_L3'"),
    ("models", ("fts_L1",), "fts_L1 needs more blocks"),
    ("analysis.candidates", ("cg", "adam"), "unknown candidate 'adam'"),
    ("analysis.readings", ("zero_labels", "residual"), "unknown reading \\(feature site\\) 'residual'"),
    ("analysis.layers", (0, 3), "analysis.layers \\[3\\] out of range for fts_L2"),
    ("graft.layers", (7,), "graft.layers \\[7\\] out of range for fts_L2"),
    ("probes.site", "keys", "unknown probe site 'keys'"),
    ("probes.steps", (5,), "probe steps"),
])
def test_bad_config_fails_before_training(tmp_path, field, value, message):
  config = alignment_config.get_config("smoke")
  part, _, name = field.rpartition(".")
  with config.unlocked():
    (config[part] if part else config)[name] = value
  with pytest.raises(ValueError, match=message):
    binary.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "models")


def test_smoke_scale_end_to_end_and_resume(tmp_path, monkeypatch):
  config = alignment_config.get_config("smoke")
  figures = figure_style.record(monkeypatch)
  results = binary.run(config, str(tmp_path))
  assert len(figures) == 3  # agreement, kernel alignment, graft
  for figure in figures:
    figure_style.check_style(figure)
  name = "kernel_prior_fts_L2"
  for filename in ("report.md", "results.json", "agreement_vs_layer_kernel_prior.png",
                   "kernel_alignment_kernel_prior.png", "graft_kernel_prior.png"):
    assert os.path.exists(tmp_path / filename), filename
  with open(tmp_path / "agreement_vs_layer_kernel_prior.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  saved = json.load(open(tmp_path / "results.json"))
  nl = saved["y_nonlinearity"]
  assert set(nl) == {name, "compiled_cg_t1_kernel_prior", "compiled_pcg_t1_kernel_prior",
                     "compiled_chebyshev_t1_kernel_prior"}
  assert nl["compiled_cg_t1_kernel_prior"] > 1e-2 and nl["compiled_chebyshev_t1_kernel_prior"] < 1e-12
  assert all(np.isfinite(v) for v in nl.values())
  model = saved["tasks"]["kernel_prior"]["models"][name]
  assert [r["layer"] for r in model["krr"]["zero_labels"]] == [0, 1, 2]
  assert set(model["krr"]) == set(config.analysis.readings) | {"zero_labels_fitted_metric"}
  assert set(model["candidates"]["1"]) == set(config.analysis.candidates)
  assert len(model["graft"]["r2"]) == 3 and len(model["graft"]["r2"][0]) == 3
  report = open(tmp_path / "report.md").read()
  for heading in ("## Summary (generated from the numbers below)", "### The y-linearity signature",
                  "### Grafting", "### Kernel alignment", "![Agreement vs layer]"):
    assert heading in report, heading
  # The trained model loads by path, with its attention-free feature block.
  trained = kcg.load_trained(str(tmp_path / "models" / name))
  assert trained.model.config.attention_free_layers == 1 and trained.step == config.train.num_steps
  assert results["y_nonlinearity"][name] == nl[name]
  # A rerun resumes the finished model instead of training it again.
  history = open(tmp_path / "models" / name / "metrics.jsonl").read()
  with config.unlocked():
    config.train_only = True
  binary.run(config, str(tmp_path))
  assert open(tmp_path / "models" / name / "metrics.jsonl").read() == history


@pytest.mark.slow
def test_runlocal_scale(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-m", "experiments.alignment",
                        "--config=experiments/configs/alignment.py:runlocal",
                        f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=3600)
  assert out.returncode == 0, out.stderr[-3000:]
  saved = json.load(open(tmp_path / "results.json"))
  names = {f"{t}_{m}" for t in ("linear", "kernel_prior") for m in ("gpt_L2", "fts_L3", "lsa_L2")}
  assert names <= set(saved["y_nonlinearity"])
  for name in names:
    assert os.path.isdir(tmp_path / "models" / name)
