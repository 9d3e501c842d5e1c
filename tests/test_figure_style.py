"""Style of the figures kcg draws (rules and checker in tests/figure_style.py).

The study's figures are checked where the study tests draw them anyway (tests/test_study.py, the
smoke study draws one of each kind it runs); here: the checker itself, the shared plots, the
temperature sweep, the matching figure with twelve candidates, and the experiments' own plots.
"""

import jax
import numpy as np
import pytest

import kcg
from kcg import plotting

from experiments import bench
from experiments import reference_convergence
import figure_style
from figure_style import check_style


@pytest.fixture
def drawn(monkeypatch):
  return figure_style.record(monkeypatch)


def test_line_styles_are_distinct_for_many_lines():
  styles = [(s["color"], s["marker"]) for s in plotting.line_styles(120)]
  assert len(set(styles)) == 120
  assert len({s[0] for s in styles[:len(plotting.PALETTE)]}) == len(plotting.PALETTE) >= 12
  with pytest.raises(ValueError, match="axis"):
    plotting.integer_ticks(plotting.new_figure()[1][0, 0], "z")
  with pytest.raises(ValueError, match="where"):
    plotting.add_legend(plotting.new_figure()[1][0, 0], where="inside")


def test_check_style_catches_bad_figures():
  """The checker itself: a plain matplotlib figure with the usual faults fails it."""
  figure, ((ax,),) = plotting.new_figure()
  for i in range(12):  # matplotlib's default cycle: 10 colours, no markers, so lines 0 and 10 clash
    ax.plot(np.arange(4), np.arange(4) + i, label=f"line {i}")
  ax.set_xlabel("layer")
  ax.set_ylabel("error")
  with pytest.raises(AssertionError, match="look alike"):
    check_style(figure)
  figure, ((ax,),) = plotting.new_figure()
  ax.plot(np.arange(4), np.arange(4), label="one", **plotting.line_style(0))
  ax.set_xlabel("CG step t")
  ax.set_ylabel("error")
  with pytest.raises(AssertionError, match="integer ticks"):
    check_style(figure)
  plotting.integer_ticks(ax)
  ax.legend(fontsize=5)
  with pytest.raises(AssertionError, match="7 pt"):
    check_style(figure)
  ax.legend(fontsize=8, loc="upper right")
  with pytest.raises(AssertionError, match="hide data"):
    check_style(figure)
  plotting.add_legend(ax)
  check_style(figure)


def test_error_curves_and_residual_stream(drawn):
  curves = {f"curve {i}": np.geomspace(1, 1e-3 * (i + 1), 6) for i in range(12)}
  check_style(plotting.error_curves(None, curves, dashed={"bound": np.ones(6)}, xlabel="CG step t"))
  check_style(plotting.error_curves(None, {"eps": np.ones(3)}, x=np.array([1.0, 10.0, 100.0]),
                                    log_x=True, xlabel="temperature tau"))
  compiled = kcg.compile_cg(3, 2, 1, 0.5, mask="prefix")
  residuals = compiled.forward(np.ones((1, 3, 2)), np.ones((1, 3)), np.ones((1, 1, 2)),
                               return_residuals=True).residuals
  check_style(plotting.residual_stream(np.asarray(residuals)[-1, 0], compiled.program.layout))
  assert len(drawn) == 3


def test_temperature_sweep_and_twelve_candidate_matching(drawn):
  key = jax.random.key(0)
  kcg.study.temperature_sweep(key, (1.0, 3.0), num_support=4, input_dim=2, num_steps=2,
                              num_prompts=2)
  compiled = kcg.compile_cg(4, 2, 2, 0.5, mask="prefix")
  prompts = kcg.tasks.sample(key, kcg.tasks.TaskConfig(family="noisy_linear", input_dim=2,
                                                       num_support=4, num_query=2, batch_size=6))
  # Six algorithms in data and feature space: the figure whose lines used to share colours.
  feature_map = lambda x: np.concatenate([x, np.square(x)], axis=-1)
  matching = kcg.study.matching_study(kcg.probes.subject_from_compiled(compiled), prompts, key,
                                      ridge=0.5, max_steps=2, gradients=False,
                                      feature_map=feature_map, readout="prediction_channel")
  assert len(matching["best_distance"]) == 12
  assert len(drawn) == 2
  for figure in drawn:
    check_style(figure)


def test_experiment_figures(drawn, tmp_path):
  convergence = reference_convergence.Convergence(
      {name: np.geomspace(1, 1e-6, 5) for name in reference_convergence.SOLVERS},
      np.ones(5), True, np.ones(2))
  reference_convergence.plot_convergence(convergence, str(tmp_path / "c.png"), "title")
  rows = [{"kind": "sweep", "method": m, "num_support": k, "feature_dim": 4, "num_steps": 2,
           "batch": 2, "timed_batch": 2, "seconds": 1e-3 * k * (i + 1)}
          for i, m in enumerate(("plain_cg", "cholesky")) for k in (4, 8)]
  bench.plot_time_vs_k(str(tmp_path / "t.png"), rows)
  assert len(drawn) == 2
  for figure in drawn:
    check_style(figure)
