"""experiments.lm_icl at its runlocal size on the tiny random checkpoint, and kcg without the extra."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("penzai")
pytest.importorskip("tokenizers")

from experiments import lm_icl  # noqa: E402
import figure_style  # noqa: E402
from experiments.configs import lm_icl as lm_icl_config  # noqa: E402


def test_runlocal_writes_a_report_that_says_it_is_a_pipeline_check(tmp_path):
  config = lm_icl_config.get_config("runlocal")
  results = lm_icl.run(config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  report = (tmp_path / "report.md").read_text()
  for name in ("error_vs_k.png", "alignment_by_layer.png", "y_linearity.png"):
    assert (tmp_path / name).stat().st_size > 10_000
  assert saved["model"]["random_init"] is True
  # The warning comes before any number.
  assert report.index("PIPELINE CHECK ONLY") < report.index("## Summary")
  assert (tmp_path / "tiny_checkpoint" / "kcg_lm.json").exists()
  # Every cell of the grid, both readouts, invalid greedy answers counted.
  assert len(saved["regression"]) == 2 * 2 * 2
  for cell in saved["regression"]:
    g = cell["readouts"]["greedy"]
    assert g["num_valid"] + g["num_invalid"] == 8 * 3
    assert set(cell["baselines"]) == {"krr_rbf", "ridge", "gd_8", "knn_3", "mean"}
  # The alignment instruments on the LM (every reading) and on the random-init control (the primary
  # reading), per layer 0..3 of the tiny model.
  for family, sec in saved["features"].items():
    assert list(sec["lm"]["krr"]) == list(config.features.readings)
    for rows in sec["lm"]["krr"].values():
      assert [s["layer"] for s in rows] == [0, 1, 2, 3]
    assert list(sec["random_control"]["krr"]) == ["zero_labels"]
    for analysis in (sec["lm"], sec["random_control"]):
      assert len(analysis["smoother_weights"]["krr_phi"]) == 4
      assert len(analysis["kernel_alignment"]["raw_x"]) == 4
      assert len(analysis["y_nonlinearity"]["cg_by_step"]) == config.features.cg_steps
      assert analysis["smoother_weights"]["num_prompts"] == config.features.smoother_prompts
    assert f"- {family}, y-linearity: the LM's y-nonlinearity index is" in report
  assert "## Alignment instruments" in report and "pending" not in report
  assert {r["inputs"] for r in saved["classification"]} == {"numbers", "words"}
  assert results["runtime_s"] > 0


def test_kcg_imports_without_the_lm_extra():
  code = ("import sys; sys.modules['penzai'] = None; import kcg; "
          "assert 'kcg.lm' not in sys.modules\n"
          "try:\n  kcg.lm\nexcept ImportError as e:\n  assert 'lm extra' in str(e)\n"
          "else:\n  raise AssertionError('kcg.lm imported without penzai')")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=lm_icl.__file__.rsplit("/experiments/", 1)[0])


def test_lm_bench_runlocal(tmp_path):
  from experiments import lm_bench
  from experiments.configs import lm_bench as lm_bench_config
  results = lm_bench.run(lm_bench_config.get_config("runlocal"), str(tmp_path))
  assert json.loads((tmp_path / "results.json").read_text())["tokens_per_s"] > 0
  tokens = results["lm_icl_default_tokens"]
  assert tokens["total"] == tokens["regression"] + tokens["features"] + tokens["classification"] > 1e6


def test_checkpoint_flag_loads_that_checkpoint(tmp_path):
  from kcg import lm as kcg_lm
  path = kcg_lm.write_tiny_checkpoint(str(tmp_path / "ckpt"), seed=3)
  config = lm_icl_config.get_config("runlocal")
  config.model.checkpoint = path
  lm = lm_icl._model(config, str(tmp_path / "work"))
  assert lm.path == path and not (tmp_path / "work" / "tiny_checkpoint").exists()
  config.model.checkpoint = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="not a kcg LM checkpoint"):
    lm_icl._model(config, str(tmp_path / "work"))


def _fake_analysis(num_layers, readings, steps, rng):
  rows = lambda: [{"layer": l, "r2": float(rng.uniform(-1, 1))} for l in range(num_layers)]
  per_layer = lambda: [float(v) for v in rng.uniform(-1, 1, num_layers)]
  return {"krr": {r: rows() for r in readings}, "krr_raw_x": {"r2": 0.1},
          "smoother_weights": {"krr_phi": per_layer(), "krr_phi_shuffled": per_layer()},
          "kernel_alignment": {n: per_layer() for n in ("raw_x", "target", "raw_x_shuffled")},
          "y_nonlinearity": {"index": 0.3, "cg_layer": 1, "cg_by_step": [0.1 / t for t in range(1, steps + 1)]}}


def test_figures_follow_the_style_rules():
  """kcg's figure style (tests/figure_style.py) on every figure lm_icl draws, from fake results."""
  rng = np.random.default_rng(0)
  readings = lm_icl_config.get_config("runlocal").features.readings
  features = {f: {"lm": _fake_analysis(4, readings, 3, rng),
                  "random_control": _fake_analysis(4, ("zero_labels",), 3, rng)}
              for f in ("linear", "relu_network")}
  regression = [{"family": f, "input_dim": d, "num_support": k, "readouts": {"expected": {"mse": 1.0}},
                 "baselines": {"krr_rbf": {"mse": 0.5}, "mean": {"mse": 1.2}}}
                for f in features for d in (1, 2) for k in (4, 8)]
  for fig in (lm_icl._plot_alignment(None, features), lm_icl._plot_linearity(None, features),
              lm_icl._plot_errors(None, regression, list(features), (1, 2))):
    figure_style.check_style(fig)
