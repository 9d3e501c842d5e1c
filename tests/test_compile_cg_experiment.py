"""The README's main job at its runlocal size, and the README/CI contract."""

import json
import pathlib
import re

from experiments import compile_cg
from experiments.configs import compile_cg as compile_cg_config

ROOT = pathlib.Path(__file__).parent.parent


def test_runlocal_writes_results_and_plot(tmp_path):
  results = compile_cg.run(compile_cg_config.get_config("runlocal"), str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "error_vs_t.png").stat().st_size > 10_000
  assert saved["steps"] == list(range(11))
  assert saved["bound_holds"] is True
  # t = k = 8 steps: CG has converged (exact termination), compiled and reference agree.
  assert saved["compiled_vs_oracle"][8] < 1e-9
  assert max(saved["compiled_vs_reference"]) < 1e-6
  assert results["dimensions"]["num_layers"] == 1 + 10 * 10  # causal dual: 10 layers per CG step


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
  assert len(block) == 2, "The README opens with exactly two commands."
  ci = (ROOT / ".ci" / "run").read_text()
  assert block[1] in ci
  assert "experiments.compile_cg" in block[0]
