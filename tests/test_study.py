"""The study's laws as library functions, and the study binary at smoke (fast) and runlocal (slow) scale.

Tolerances. The feature-perturbation bound is an inequality, checked with a 1e-9 relative slack for float64 rounding of
the norms (the measured ratio actual/bound is below 1e-2). The depth law compares CG's fitted rate
with rho = (sqrt(kappa) - 1)/(sqrt(kappa) + 1): CG contracts at least this fast in the A-norm (the
theorem), so the fitted rate of the prediction error must not exceed rho by more than the slack of a
least-squares fit over a few steps (we allow 5%; measured: 0.34 vs 0.52 at kappa = 10).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import kcg
from kcg import study

from experiments import study as study_binary
from experiments._report import Report
from experiments.configs import study as study_config
import figure_style


def test_perturbation_bound_holds_on_random_problems():
  rng = np.random.default_rng(0)
  for eps in (1e-6, 1e-3, 1e-1, 1.0, 10.0):
    phi = rng.standard_normal((16, 12, 5))
    phi_q = rng.standard_normal((16, 3, 5))
    y = rng.standard_normal((16, 12))
    phi_h = phi + eps * rng.standard_normal(phi.shape)
    phi_qh = phi_q + eps * rng.standard_normal(phi_q.shape)
    for ridge in (1e-3, 0.1, 10.0):
      r = study.perturbation_bound(phi, y, phi_q, phi_h, phi_qh, ridge)
      actual, sharp, lipschitz = (np.asarray(r[n]) for n in ("actual", "sharp", "lipschitz"))
      assert np.all(actual <= sharp * (1 + 1e-9)), (eps, ridge)
      assert np.all(sharp <= lipschitz * (1 + 1e-9)), (eps, ridge)
  # No perturbation, no change and a zero bound.
  r = study.perturbation_bound(phi, y, phi_q, phi, phi_q, 0.1)
  assert float(np.max(np.asarray(r["actual"]))) == 0.0
  assert float(np.max(np.asarray(r["lipschitz"]))) == 0.0
  with pytest.raises(ValueError, match="perturbation_bound needs"):
    study.perturbation_bound(phi, y[:, :-1], phi_q, phi, phi_q, 0.1)
  with pytest.raises(ValueError, match="ridge"):
    study.perturbation_bound(phi, y, phi_q, phi, phi_q, 0.0)


def test_fitted_rate():
  assert study.fitted_rate([1.0, 0.5, 0.25, 0.125, 0.0625]) == pytest.approx(0.5, rel=1e-12)
  assert np.isnan(study.fitted_rate([1.0, 1e-12, 1e-13]))  # fewer than two points above the floor


def test_depth_law_against_rho(tmp_path, monkeypatch):
  figures = figure_style.record(monkeypatch)
  # The sizes of the smoke config's depth law: this compiled model is shared with the smoke run.
  compiled = kcg.compile_cg(4, 4, 3, 0.1, mask="prefix")
  out = study.depth_law(jax.random.key(0), num_support=4, feature_dim=4, condition_numbers=(10.0,),
                        ridge=0.1, max_steps=3, num_prompts=4, compiled=compiled,
                        path=str(tmp_path / "depth.png"))
  row = out["kappa"]["10"]
  assert row["bound_holds"]
  assert row["compiled_fitted_rate"] <= 1.05 * row["predicted_rate"]
  assert row["compiled_vs_reference"] < 1e-10
  (figure,) = figures
  figure_style.check_style(figure)


def test_width_sweep_and_hook(tmp_path, monkeypatch):
  figures = figure_style.record(monkeypatch)
  calls = []

  def hook(m):
    calls.append(m)
    return lambda xs, ys, xq: kcg.solvers.krr_predict(xs, ys, xq, 0.1)

  out = study.width_sweep(jax.random.key(0), (2, 6), num_support=6, feature_dim=6, num_prompts=4,
                          low_rank_predictor=hook, path=str(tmp_path / "w.png"))
  assert calls == [2, 6]
  assert out["bound_holds"]
  for sketch in ("principal", "random", "top"):
    # The bound holds per query, so RMS(measured) <= RMS(bound); slack for rounding (at m = p both
    # are rounding noise: ~1e-15 relative error against a bound of ~0).
    assert all(e <= b * (1 + 1e-9) + 1e-12
               for e, b in zip(out[sketch]["error"], out[sketch]["bound"]))
    assert out[sketch]["error"][-1] < 1e-10  # m = p with orthonormal S: no bottleneck
  for sketch in ("principal", "random"):
    # The compiled width-m models are sketched KRR: CG run to convergence in float64 (kappa < 1e2).
    assert max(out[sketch]["compiled_vs_reference"]) < 1e-10
    np.testing.assert_allclose(out[sketch]["compiled_error"], out[sketch]["error"], atol=1e-10)
  assert out["principal"]["error"][0] > 1e-3  # m = 2 < p = 6 loses something
  assert out["model_width"][0] < out["model_width"][1] == out["full_width"]
  assert out["hook"][-1] < 1e-10  # the hook here is the full KRR itself
  assert (tmp_path / "w.png").stat().st_size > 10_000
  figure_style.check_style(figures[0])
  with pytest.raises(ValueError, match="widths"):
    study.width_sweep(jax.random.key(0), (7,), num_support=6, feature_dim=6)


def test_failure_modes_reference_only(monkeypatch):
  figures = figure_style.record(monkeypatch)
  out = study.failure_modes(jax.random.key(0), num_support=3, input_dim=4, num_query=2,
                            collinearity=(1.0, 1e-4), ridges=(1.0, 1e-6), num_prompts=2)
  assert out["collinear"]["0.0001"]["kappa"] > 100 * out["collinear"]["1"]["kappa"]
  assert out["small_ridge"]["1e-06"]["kappa"] > out["small_ridge"]["1"]["kappa"]
  assert out["small_ridge"]["1"]["reference_cg"] < 1e-10
  (figure,) = figures
  figure_style.check_style(figure)


def test_solver_sweep_rejects_unknown_knob():
  with pytest.raises(ValueError, match="knob"):
    study.solver_sweep(jax.random.key(0), "temperature", (1.0,), task=kcg.tasks.TaskConfig(),
                       ridge=0.1, num_steps=1)


def test_chebyshev_eig_bounds_hold_every_spectrum():
  x = np.random.default_rng(0).standard_normal((8, 6, 3))
  lo, hi = study.chebyshev_eig_bounds(x, 0.1)
  eig = np.linalg.eigvalsh(np.einsum("bkp,bjp->bkj", x, x) + 0.1 * np.eye(6))
  # k = 6 > p = 3: K is singular, so the lower end is attained; the upper end is the largest
  # lambda_max over the batch (equal up to the rounding of eigvalsh, ~eps * ||K||).
  np.testing.assert_allclose(eig[:, 0], lo, rtol=1e-12)
  np.testing.assert_allclose(eig[:, -1].max(), hi, rtol=1e-12)
  with pytest.raises(ValueError, match="ridge"):
    study.chebyshev_eig_bounds(x, 0.0)
  with pytest.raises(ValueError, match=r"\[B, k, p\]"):
    study.chebyshev_eig_bounds(x[0], 0.1)
  with pytest.raises(ValueError, match=r"\[B, k, p\]"):
    study.chebyshev_eig_bounds(np.full((1, 2, 2), np.nan), 0.1)


def test_depth_sweep_with_compiled_solvers(tmp_path, monkeypatch):
  """Compiled solvers at t = L against their references; "trained" models here are CG itself.

  Compiled and reference solvers run the same recurrence in float64 on kappa(A) < 1e2 problems:
  their mse agree to 1e-10 relative (measured ~1e-15)."""
  k, d, ridge = 5, 3, 0.3
  config = kcg.tasks.TaskConfig(family="noisy_linear", input_dim=d, num_support=k, num_query=2,
                                batch_size=8, condition_number=10.0, input_rotation="fixed")
  prompts = kcg.tasks.sample(jax.random.key(0), config)
  calibration = kcg.tasks.sample(jax.random.key(1), config)
  # PCG is left out to keep this test fast: its compiled model is checked against pcg_predict in
  # test_ablations and runs in the runlocal study.
  compiled = study.compiled_solvers(k, d, 2, ridge, calibration_x_support=calibration.x_support,
                                    algorithms=("cg", "chebyshev"))
  assert set(compiled) == {"compiled_cg", "compiled_chebyshev"}
  cg = lambda L: (lambda xs, ys, xq: kcg.solvers.cg_predict(xs, ys, xq, ridge, L)[..., -1, :])
  models = {"cg as a model": {1: cg(1), 2: cg(2)}}
  panels = [study.DepthPanel(10.0, models, prompts, ridge, compiled),
            study.DepthPanel(1.0, models, prompts, ridge, {"compiled_cg": compiled["compiled_cg"]})]
  figures = figure_style.record(monkeypatch)
  out = study.depth_sweep("condition number", panels, path=str(tmp_path / "sweep.png"))
  (figure,) = figures
  figure_style.check_style(figure)
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  assert out["values"] == [10.0, 1.0]
  cmp = out["panels"]["10"]
  lo, hi = compiled["compiled_chebyshev"].eig_bounds
  assert lo == ridge and cmp["chebyshev_eig_bounds"] == [lo, hi]
  y = np.asarray(prompts.y_query)
  args = (prompts.x_support, prompts.y_support, prompts.x_query, ridge, 2)
  for name, reference in (("compiled_cg", kcg.solvers.cg_predict(*args)),
                          ("compiled_chebyshev", kcg.solvers.chebyshev_predict(*args, (lo, hi)))):
    expected = [np.mean((np.asarray(reference)[:, L] - y) ** 2) for L in (1, 2)]
    np.testing.assert_allclose(cmp["solvers"][name]["mse"], expected, rtol=1e-10)
  np.testing.assert_allclose([cmp["models"]["cg as a model"][L]["mse"] for L in (1, 2)],
                             cmp["solvers"]["compiled_cg"]["mse"], rtol=1e-10)
  # The theorem: mean bound^2 >= CG's mse against the oracle, at every depth.
  assert all(c <= b for c, b in zip(cmp["solvers"]["cg"]["vs_oracle"], cmp["bound_mse"]))
  assert "compiled_chebyshev" not in out["panels"]["1"]["solvers"]
  with pytest.raises(ValueError, match="num_steps >= 3"):
    study.depth_comparison({"m": {3: cg(3)}}, prompts, ridge, compiled=compiled)
  with pytest.raises(ValueError, match="at least one depth"):
    study.depth_comparison({}, prompts, ridge)
  with pytest.raises(ValueError, match="at least one DepthPanel"):
    study.depth_sweep("ridge", [])
  with pytest.raises(ValueError, match="no compiled version"):
    study.compiled_solvers(k, d, 2, ridge, calibration_x_support=calibration.x_support,
                           algorithms=("gd",))


def test_compiled_ablation_table_for_chebyshev(tmp_path):
  """Chebyshev has no reductions: its table has the mat-vec, the query update and the step; each
  removed at step 1 matches the damaged Chebyshev to float64 rounding (1e-11, as test_ablations)."""
  prompts = kcg.tasks.sample(jax.random.key(0), kcg.tasks.TaskConfig(
      family="noisy_linear", input_dim=3, num_support=5, num_query=2, batch_size=8))
  compiled = kcg.compile_chebyshev(5, 3, 3, 0.3, mask="prefix",
                                   eig_bounds=study.chebyshev_eig_bounds(prompts.x_support, 0.3))
  table = study.compiled_ablation_table(compiled, prompts, steps=(1,),
                                        path=str(tmp_path / "abl.png"))
  assert table["steps"] == [1]
  assert list(table["operations"]) == ["matvec", "query_matvec", "step"]
  for row in table["operations"].values():
    assert row["match"] < 1e-11 and row["damage_size"] > 1e-3, row


def test_report_rejects_missing_figure(tmp_path):
  report = Report(str(tmp_path), "title")
  with pytest.raises(ValueError, match="not written"):
    report.figure("nothing.png", "caption")


def test_config_scales():
  assert study_config.get_config().scale == "full"
  assert study_config.get_config("runlocal").scale == "runlocal"
  assert study_config.get_config("smoke").scale == "smoke"
  with pytest.raises(ValueError, match="Unknown config option"):
    study_config.get_config("huge")
  with pytest.raises(ValueError, match="one scale"):
    study_config.get_config("smoke,runlocal")


def _check_report(workdir, min_figures=5):
  report = open(os.path.join(workdir, "report.md")).read()
  figures = [f for f in os.listdir(workdir) if f.endswith(".png")]
  assert len(figures) >= min_figures, figures
  for figure in figures:  # every figure is in the report, and every referenced figure exists
    assert f"]({figure})" in report, figure
  for line in report.splitlines():
    if line.startswith("!["):
      assert os.path.exists(os.path.join(workdir, line.split("](")[1].rstrip(")")))
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["config"]["scale"] in report
  assert "## Configuration" in report and "## Summary" in report
  return report, results


def test_smoke_study_in_process(tmp_path, monkeypatch):
  config = study_config.get_config("smoke")
  figures = figure_style.record(monkeypatch)
  results = study_binary.run(config, str(tmp_path))
  report, saved = _check_report(str(tmp_path))
  # Every figure of the report follows the style rules (one of each kind the smoke study runs).
  assert len(figures) == len([f for f in os.listdir(tmp_path) if f.endswith(".png")])
  for figure in figures:
    figure_style.check_style(figure)
  assert set(saved["results"]) >= {"training", "depth_comparison", "depth_law", "compiled", "trained",
                                   "ridge_sweep", "feature_perturbation", "depth_sweeps"}
  for sweep in ("condition", "ridge"):
    (panel,) = saved["results"]["depth_sweeps"][sweep]["panels"].values()
    assert set(panel["solvers"]) >= {"compiled_cg", "gd"}
    assert set(panel["models"]) == {"linear attention"}
  assert saved["results"]["feature_perturbation"]["bound_holds"]
  compiled = saved["results"]["compiled"]["dual_prefix"]
  # The compiled model's probes, ablations and matching find the known answers.
  alpha = compiled["probes"]["combos"]["alpha@support"]
  end = compiled["step_ends"][1]
  assert alpha["cosine"][end][1] > 0.999
  assert max(r["match"] for r in compiled["ablations"]["operations"].values()) < 1e-11
  assert compiled["matching"]["layers"][end]["step"] == 1
  assert results["timings_seconds"]["total"] > 0
  assert "compiled CG" in report


def test_study_rejects_unknown_section(tmp_path):
  config = study_config.get_config("smoke")
  with config.unlocked():
    config.sections = ("depth_law", "vibes")
  with pytest.raises(ValueError, match="unknown sections"):
    study_binary.run(config, str(tmp_path))


def _files(directory):
  """{path: (size, modification time)} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      info = os.stat(os.path.join(root, name))
      out[os.path.join(root, name)] = (info.st_size, info.st_mtime_ns)
  return out


def test_study_resumes_saved_models_and_reports_their_final_loss(tmp_path):
  # A rerun into the same workdir restores the finished checkpoints instead of training; the
  # report must still carry the loss logged by the run that trained them.
  config = study_config.get_config("smoke")
  with config.unlocked():
    config.sections = ("depth_law",)
    config.train.save_models = True
  first = study_binary.run(config, str(tmp_path))["training"]
  models = os.path.join(str(tmp_path), "models")
  saved = _files(models)
  assert any("/checkpoints/" in path for path in saved)
  second = study_binary.run(config, str(tmp_path))["training"]
  (name,) = first
  assert first[name]["final_loss"] is not None
  assert second[name]["final_loss"] == first[name]["final_loss"]
  # Restored, not retrained: no checkpoint, manifest or metrics record was written or rewritten.
  assert _files(models) == saved


@pytest.mark.slow
@pytest.mark.ci
def test_runlocal_study_binary(tmp_path):
  """The runlocal study finishes and writes the report with every section's figures."""
  workdir = str(tmp_path / "study")
  # The README's command as a user runs it: one host device (the suite's four forced devices would
  # put every training step's all-reduce at the mercy of a loaded machine's scheduler).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  subprocess.run([sys.executable, "-m", "experiments.study",
                  "--config=experiments/configs/study.py:runlocal", f"--workdir={workdir}"],
                 check=True, timeout=1800, cwd=os.path.dirname(os.path.dirname(__file__)), env=env)
  _, results = _check_report(workdir, min_figures=10)
  assert results["results"]["feature_perturbation"]["bound_holds"]
  sweeps = results["results"]["depth_sweeps"]
  assert set(sweeps) == {"condition", "ridge", "training"}
  for sweep in (sweeps["condition"], sweeps["ridge"]):
    assert len(sweep["panels"]) == 2
    for panel in sweep["panels"].values():
      assert {"compiled_cg", "compiled_pcg", "compiled_chebyshev", "gd"} <= set(panel["solvers"])
  # The PCG, Chebyshev and Route A ablations match their damaged references (as test_ablations).
  for table in results["results"]["compiled_ablations_other"].values():
    assert max(r["match"] for r in table["operations"].values()) < 1e-11
