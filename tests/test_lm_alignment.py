"""kcg.lm's alignment instruments: leak-free readings, finite-difference smoother weights on written
labels, the y-linearity index on written labels, and `analyse_lm` against a planted answer.

The LM is the tiny random GPT-NeoX the tests build themselves (no download). The planted answer is an
LM wrapper whose predictions *are* KRR on its own layer-2 features: every instrument must then say so.
"""

import jax
import numpy as np
import pytest

pytest.importorskip("penzai")
pytest.importorskip("tokenizers")

import kcg  # noqa: E402
from kcg import lm as kcg_lm  # noqa: E402

B, K, Q, D = 4, 4, 2, 2
FMT = kcg_lm.TextFormat()


@pytest.fixture(scope="module")
def lm():
  return kcg_lm.tiny_model(0)


def _prompts(seed, batch=B):
  task = kcg.tasks.TaskConfig(family="linear", input_dim=D, num_support=K, num_query=Q,
                              batch_size=batch)
  return jax.tree.map(np.asarray, kcg.tasks.sample(jax.random.key(seed), task))


@pytest.fixture(scope="module")
def prompts():
  return _prompts(0)


# ----------------------------------------------------------------------------------------------------
# Readings.
# ----------------------------------------------------------------------------------------------------


def test_readings_that_withhold_labels_cannot_see_them(lm, prompts):
  xs, ys, xq = prompts.x_support, FMT.written(prompts.y_support), prompts.x_query
  reg = kcg_lm.LMRegressor(lm)
  moved = ys.copy()
  moved[1] += 1.0  # prompt 1's labels only
  for reading in ("zero_labels", "placeholder_labels", "context_free", "other_labels", "with_labels"):
    a = kcg_lm.hidden_features(reg, xs, ys, xq, reading=reading)
    b = kcg_lm.hidden_features(reg, xs, moved, xq, reading=reading)
    assert a.support.shape == (lm.num_layers + 1, B, K, lm.width)
    assert a.query.shape == (lm.num_layers + 1, B, Q, lm.width)
    # Prompt b reads prompt b + 1's labels under "other_labels": only prompt 0 sees prompt 1's.
    sees = {"with_labels": [1], "other_labels": [0]}.get(reading, [])
    for p in range(B):
      same = (np.array_equal(a.support[:, p], b.support[:, p])
              and np.array_equal(a.query[:, p], b.query[:, p]))
      assert same == (p not in sees), (reading, p)


def test_hidden_features_are_kcg_lm_reads_under_alignment_names(lm, prompts):
  xs, ys, xq = prompts.x_support, prompts.y_support, prompts.x_query
  reg = kcg_lm.LMRegressor(lm)
  ours = kcg_lm.hidden_features(reg, xs, ys, xq, reading="other_labels", token="mean")
  theirs = kcg_lm.read_features(reg, xs, ys, xq, reading="as_query", labels="shuffled", token="mean")
  np.testing.assert_array_equal(ours.support, theirs.phi_support)
  np.testing.assert_array_equal(ours.query, theirs.phi_query)
  # "zero_labels" writes the code of y = 0 for every label: the same as reading with labels 0.
  zero = kcg_lm.hidden_features(reg, xs, ys, xq, reading="zero_labels")
  true_zero = kcg_lm.hidden_features(reg, xs, np.zeros_like(ys), xq, reading="with_labels")
  np.testing.assert_array_equal(zero.support, true_zero.support)
  with pytest.raises(ValueError, match="unknown reading"):
    kcg_lm.hidden_features(reg, xs, ys, xq, reading="in_context")
  with pytest.raises(ValueError, match="label of y = 0"):
    kcg_lm.read_class_features(lm, FMT, kcg_lm.sample_classification(
        np.random.default_rng(0), FMT, inputs="words", num_classes=2, num_support=3, num_query=1,
        batch_size=2), labels="zero")


# ----------------------------------------------------------------------------------------------------
# Finite differences and the y-linearity index on written labels.
# ----------------------------------------------------------------------------------------------------


def _affine_on_written(phi_s, phi_q, ridge, offset):
  """A predictor affine in the labels it reads (written labels), like the LM reads them."""
  return lambda _xs, y, _xq: np.asarray(kcg.alignment.krr_predict(
      phi_s, FMT.written(np.asarray(y, np.float64)), phi_q, ridge, intercept=True)) + offset


def test_finite_difference_weights_are_exact_for_a_predictor_affine_in_its_labels():
  rng = np.random.default_rng(0)
  phi_s, phi_q = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 2, 4))
  predict = _affine_on_written(phi_s, phi_q, 0.3, 1.5)
  expected = kcg.alignment.krr_smoother_weights(phi_s, phi_q, 0.3, intercept=True)
  y = FMT.written(rng.normal(size=(3, 6)))
  y[0, 2] = 4.9  # the top code: y + h clips, so the step read is h, not 2h
  y[1, 0] = -4.8  # y - h clips to -5.0
  for step in (0.1, 0.5, 2.0):
    w = kcg_lm.finite_difference_weights(predict, None, y, None, step=step, written=FMT.written)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-11)
  with pytest.raises(ValueError, match="step must be"):
    kcg_lm.finite_difference_weights(predict, None, y, None, step=0.0)
  with pytest.raises(ValueError, match="moves no written label"):
    kcg_lm.finite_difference_weights(predict, None, np.full((1, 2), 9.0), None, step=0.5,
                                     written=FMT.written)


def test_lm_steps_must_be_multiples_of_the_label_resolution(lm, prompts):
  reg = kcg_lm.LMRegressor(lm)
  for step in (0.05, 0.25, 0.1 + 1e-4, -0.1, float("nan")):
    with pytest.raises(ValueError, match="resolution|step must be"):
      kcg_lm.lm_smoother_weights(reg, prompts.x_support, prompts.y_support, prompts.x_query, step=step)
  assert kcg_lm.check_step(FMT, 0.3) == 0.3 and kcg_lm.check_step(FMT, 2.0) == 2.0


class _Stub:
  """Something with the LMRegressor interface the y-linearity index reads."""

  def __init__(self, predict):
    self.fmt, self.readout, self._predict = FMT, "expected", predict

  def __call__(self, xs, y, xq):
    return self._predict(xs, y, xq)


def test_y_nonlinearity_on_written_labels_is_zero_for_an_affine_predictor():
  rng = np.random.default_rng(1)
  phi_s, phi_q = rng.normal(size=(5, 6, 3)), rng.normal(size=(5, 2, 3))
  stub = _Stub(_affine_on_written(phi_s, phi_q, 0.5, -0.7))
  y_a, y_b = rng.normal(size=(2, 5, 6))
  nl = kcg_lm.lm_y_nonlinearity(stub, None, y_a, y_b, None)
  assert nl.index < 1e-12 and nl.clipped_labels == 0
  # kcg.alignment's default weights (1/sqrt 2) mix labels between codes: rounding reads as nonlinear.
  rounded = kcg.alignment.y_nonlinearity(stub, None, FMT.written(y_a), FMT.written(y_b), None)
  assert rounded.index > 1e-3
  clipped = kcg_lm.lm_y_nonlinearity(stub, None, np.full((5, 6), 3.0), np.full((5, 6), 3.0), None)
  assert clipped.clipped_labels == 30


# ----------------------------------------------------------------------------------------------------
# analyse_lm against a planted answer, and on the LM itself.
# ----------------------------------------------------------------------------------------------------


class _KrrOnLayer(kcg_lm.LMRegressor):
  """An LM whose predictions are KRR on its own zero-label phi_l (standardised with the fit prompts'
  statistics, ridge on analyse_lm's grid, intercept): the answer analyse_lm must find at `layer`."""

  def __init__(self, lm, fit_prompts, layer, relative_ridge):
    super().__init__(lm)
    self.layer = layer
    h = kcg_lm.hidden_features(self, fit_prompts.x_support, fit_prompts.y_support,
                               fit_prompts.x_query)
    self.readout_map = kcg.alignment.standardizing_map(h.support[layer], h.query[layer])
    self.ridge = float(kcg.alignment.relative_ridges(self.readout_map(h.support[layer]),
                                                     [relative_ridge])[0])

  def __call__(self, xs, ys, xq):
    h = kcg_lm.hidden_features(self, xs, ys, xq)
    return np.asarray(kcg.alignment.krr_predict(
        self.readout_map(h.support[self.layer]), self.fmt.written(ys),
        self.readout_map(h.query[self.layer]), self.ridge, intercept=True))


def test_analyse_lm_finds_a_planted_krr_on_phi_l(lm):
  prompts, fit = _prompts(3, batch=6), _prompts(4, batch=6)
  labels_b = np.asarray(kcg.tasks.sample_targets(jax.random.key(5), kcg.tasks.TaskConfig(
      family="linear", input_dim=D), prompts.x_support, prompts.x_query).y_support)
  settings = kcg_lm.LMSettings(readings=("zero_labels",), relative_ridges=(1e-2, 0.1, 1.0),
                               num_bootstrap=50, smoother_prompts=3, cg_steps=2)
  planted = _KrrOnLayer(lm, fit, layer=2, relative_ridge=0.1)
  with jax.enable_x64(True):
    out = kcg_lm.analyse_lm(planted, prompts, fit, labels_b, settings, jax.random.key(0))
  row = out["krr"]["zero_labels"][2]
  assert out["best_layer"] == 2 and row["intercept"] is True
  np.testing.assert_allclose(row["ridge"], planted.ridge, rtol=1e-12)
  assert row["relative_distance"] < 1e-9 and row["r2_lower"] > 1 - 1e-9
  assert out["smoother_weights"]["krr_phi"][2] > 1 - 1e-9
  assert out["y_nonlinearity"]["index"] < 1e-9
  # KRR's weights sum to 1 with an intercept (a shift of every label shifts the prediction).
  np.testing.assert_allclose(out["smoother_weights"]["weight_sum"], 1.0, atol=1e-9)


def test_analyse_lm_on_the_tiny_lm_reports_every_instrument(lm, prompts):
  fit = _prompts(1)
  labels_b = FMT.written(_prompts(2).y_support)
  settings = kcg_lm.LMSettings(readings=("zero_labels", "with_labels"), num_bootstrap=20,
                               smoother_prompts=2, cg_steps=2)
  out = kcg_lm.analyse_lm(kcg_lm.LMRegressor(lm), prompts, fit, labels_b, settings, jax.random.key(0))
  layers = lm.num_layers + 1
  assert [r["layer"] for r in out["krr"]["zero_labels"]] == list(range(layers))
  assert len(out["krr"]["with_labels"]) == layers
  assert len(out["kernel_alignment"]["raw_x"]) == len(out["smoother_weights"]["krr_phi"]) == layers
  assert np.isfinite(out["y_nonlinearity"]["index"]) and len(out["y_nonlinearity"]["cg_by_step"]) == 2
  # The same seed gives the same numbers.
  again = kcg_lm.analyse_lm(kcg_lm.LMRegressor(lm), prompts, fit, labels_b, settings,
                            jax.random.key(0))
  assert again["krr"]["zero_labels"] == out["krr"]["zero_labels"]
  with pytest.raises(ValueError, match="labels_b"):
    kcg_lm.analyse_lm(kcg_lm.LMRegressor(lm), prompts, fit, labels_b[:, :2], settings,
                      jax.random.key(0))


def test_settings_reject_bad_values():
  with pytest.raises(ValueError, match="must include"):
    kcg_lm.LMSettings(readings=("other_labels",))
  with pytest.raises(ValueError, match="unknown reading"):
    kcg_lm.LMSettings(readings=("zero_labels", "in_context"))
  with pytest.raises(ValueError, match="smoother_prompts"):
    kcg_lm.LMSettings(smoother_prompts=0)
  with pytest.raises(ValueError, match="token"):
    kcg_lm.LMSettings(token="first")
