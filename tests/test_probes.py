"""Probes on compiled models, where the answer is known: the state sits in named channels.

Tolerances. A compiled model writes alpha_t, r_t, p_t (or w_t) into a residual channel exactly as CG
computes them, so a linear probe on that layer's residual stream only has to pick the channel: the
held-out cosine is 1 up to the probe's own ridge shrinkage (ridge 1e-8 per standardised feature, i.e.
~1e-8 relative) and float64 rounding, so > 0.999 leaves a wide margin. The controls measure what is
recoverable without the computation; "clearly lower" is < 0.5 (measured 0.0-0.2 at the step ends).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kcg
from kcg import probes
from kcg import solvers
from kcg import tasks

K, D, Q, T, RIDGE = 6, 4, 3, 3, 0.5


@pytest.fixture(scope="module")
def prompts():
  config = tasks.TaskConfig(family="noisy_linear", input_dim=D, num_support=K, num_query=Q,
                            batch_size=48, condition_number=10.0)
  return tasks.sample(jax.random.key(0), config)


@functools.lru_cache(maxsize=None)
def _compiled(form, mask):
  return kcg.compile_cg(K, D, T, RIDGE, mask=mask, form=form)


@pytest.fixture(scope="module", params=[("dual", "prefix"), ("dual", "causal"), ("primal", "causal")],
                ids=["support_state", "aggregator_dual", "aggregator_primal"])
def compiled(request):
  return _compiled(*request.param)


_RESIDUALS = {}


def _residual_pair(compiled, prompts):
  """(subject, residuals, random-init residuals), computed once per construction."""
  key = (compiled.form, compiled.mask)
  if key not in _RESIDUALS:
    subject = probes.subject_from_compiled(compiled)
    control = probes.random_init_like(subject, seed=0)
    _RESIDUALS[key] = (subject, np.asarray(probes.residuals(subject, prompts)),
                       np.asarray(probes.residuals(control, prompts)))
  return _RESIDUALS[key]


@pytest.fixture(scope="module")
def residual_pair(compiled, prompts):
  return _residual_pair(compiled, prompts)


@pytest.mark.parametrize("quantity", ["alpha", "r", "p"])
def test_probe_recovers_compiled_state_where_it_is_written(compiled, prompts, residual_pair,
                                                           quantity):
  _, h, h_control = residual_pair
  site = probes.compiled_state_site(compiled, quantity)
  targets = probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, T, form=compiled.form)
  step = 2  # alpha_2 is a nonlinear function of the prompt (alpha_1 is proportional to y).
  layer = compiled.program.step_ends[step]
  features = probes.site_features(h, site, K)[layer]
  control = probes.site_features(h_control, site, K)[layer]
  target = probes.site_targets(np.asarray(getattr(targets, quantity))[:, step], site, Q)
  result = probes.probe(features, target, jax.random.key(1), control_features=control, ridge=1e-8)
  assert result.score.cosine > 0.999, result.score
  assert result.score.r2 > 0.999, result.score
  assert result.control.cosine < 0.5, result.control
  assert result.shuffled.cosine < 0.5, result.shuffled
  assert not result.trivial
  assert result.excess_cosine > 0.5


def test_probe_layers_peaks_at_step_end(compiled, prompts, residual_pair):
  """Before the step that writes alpha_2 the probe cannot recover it; from its step end on it can."""
  _, h, h_control = residual_pair
  site = probes.compiled_state_site(compiled, "alpha")
  targets = probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, T, form=compiled.form)
  target = probes.site_targets(np.asarray(targets.alpha)[:, 2], site, Q)
  layers = probes.probe_layers(probes.site_features(h, site, K), target, jax.random.key(2),
                               control_features_LxBxSxD=probes.site_features(h_control, site, K),
                               ridge=1e-8)
  end = compiled.program.step_ends[2]
  assert layers.cosine.shape == (compiled.config.num_layers + 1,)
  assert layers.cosine[end] > 0.999
  # alpha is overwritten in the next step's update layer, so late layers hold alpha_3 instead.
  assert layers.cosine[compiled.program.step_ends[1]] < layers.cosine[end]
  assert np.nanmax(layers.control_cosine[end - 2:end + 1]) < 0.5


def test_primal_weights_probe(prompts):
  """w_t is the state of the primal construction, in the aggregator; dual w_t = Phi^T alpha_t."""
  compiled = _compiled("primal", "causal")
  _, h, _ = _residual_pair(compiled, prompts)
  primal = probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, T, form="primal")
  target = probes.site_targets(np.asarray(primal.w)[:, 3], "aggregator")
  features = probes.site_features(h, "aggregator", K)[compiled.program.step_ends[3]]
  assert probes.cross_validated_probe(features, target, jax.random.key(3), ridge=1e-8).cosine > 0.999
  dual = probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, T, form="dual")
  np.testing.assert_allclose(np.asarray(dual.w), np.einsum(
      "btk,bkp->btp", np.asarray(dual.alpha), np.asarray(prompts.x_support)), rtol=1e-12)


def test_too_few_prompts_for_the_aggregator_features_is_reported(prompts):
  """The dual/causal state sits in 22 varying aggregator columns: one row per prompt, so 16 prompts
  (12-13 training rows per fold) underdetermine the probe and its cosine drops with nothing wrong in
  the model; 48 prompts recover alpha_2 exactly."""
  compiled = _compiled("dual", "causal")
  _, h, _ = _residual_pair(compiled, prompts)
  targets = probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, T, form="dual")
  features = probes.site_features(h, "aggregator", K)[compiled.program.step_ends[2]]
  target = probes.site_targets(np.asarray(targets.alpha)[:, 2], "aggregator", Q)
  few = probes.cross_validated_probe(features[:16], target[:16], jax.random.key(1), ridge=1e-8)
  enough = probes.cross_validated_probe(features, target, jax.random.key(1), ridge=1e-8)
  assert few.rows_per_feature < 1 and few.cosine < 0.9, few[:3] + few[4:]
  assert enough.rows_per_feature > 1 and enough.cosine > 0.999, enough[:3] + enough[4:]
  # A per-token site has one row per token: the support site of dual/prefix is far from the limit.
  per_token = probes.cross_validated_probe(np.ones((16, K, 4)) + np.arange(16 * K * 4).reshape(
      16, K, 4) % 7, np.ones((16, K, 1)), jax.random.key(1))
  assert per_token.rows_per_feature == pytest.approx(12 * K / 4)


def test_shuffled_control_flags_trivial_low_dimensional_target():
  """Noise features carry no information, yet a 2-d target with a large mean gets cosine ~1."""
  rng = np.random.default_rng(0)
  features = rng.standard_normal((64, 1, 8))
  targets = np.array([3.0, 3.0]) + 0.3 * rng.standard_normal((64, 1, 2))
  result = probes.probe(features, targets, jax.random.key(0))
  assert result.score.cosine > 0.9  # The naive criterion passes...
  assert result.score.r2 < 0.2  # ...while nothing prompt-specific is recovered,
  assert result.shuffled.cosine > 0.9  # and the shuffled control reaches the same cosine:
  assert result.trivial


def test_state_targets_match_solvers(prompts):
  t = probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, 2)
  x = np.asarray(prompts.x_support)
  a = np.einsum("bkd,bjd->bkj", x, x) + RIDGE * np.eye(K)[None]
  ref = solvers.cg(a, prompts.y_support, 2)
  np.testing.assert_allclose(np.asarray(t.alpha), np.asarray(ref.alpha), rtol=1e-12, atol=1e-14)
  assert t.w.shape == (48, 3, D)


def test_probe_keeps_dtype_and_drops_nonfinite_columns():
  rng = np.random.default_rng(1)
  features = rng.standard_normal((32, 2, 5)).astype(np.float32)
  features[..., 0] = np.inf  # a blown-up channel of a random deep model
  targets = (features[..., 1:3] * 2.0).astype(np.float32)
  score = probes.cross_validated_probe(features, targets, jax.random.key(0), num_folds=4)
  assert score.predictions.dtype == np.float32
  assert score.cosine > 0.999  # float32, linear target


@pytest.fixture(scope="module")
def small_subject():
  # The same architecture as the random subjects of test_ablations and test_matching (shared compiles).
  config = kcg.ModelConfig(token_dim=kcg.prompt.make_layout(K, Q, D).token_dim, width=12,
                           num_layers=2, num_heads=2, head_dim=4, mask="prefix")
  template = probes.Subject("template", config, None, None, ("a", "b"), input_dim=D)
  return probes.random_init_like(template, seed=1)  # a kcg.Transformer behind subject_from_model


def test_subject_from_model_adapter(small_subject):
  rng = np.random.default_rng(0)
  xs, ys, xq = rng.standard_normal((48, K, D)), rng.standard_normal((48, K)), rng.standard_normal((48, Q, D))
  out = small_subject.forward(xs, ys, xq, return_residuals=True)
  assert out.residuals.shape == (3, 48, K + 1 + Q, 12)
  assert small_subject.layer_names == ("a", "b")
  # The logit lens on the last residual is the model's own output (no norm: exact to rounding).
  np.testing.assert_allclose(np.asarray(small_subject.readout(out.residuals[-1])),
                             np.asarray(out.outputs[..., 0]), rtol=1e-12, atol=1e-12)
  # Inputs of a smaller dimension are zero-padded to input_dim.
  padded = small_subject.forward(xs[..., :1], ys, xq[..., :1], return_residuals=True)
  explicit = small_subject.forward(np.pad(xs[..., :1], ((0, 0), (0, 0), (0, D - 1))), ys,
                                   np.pad(xq[..., :1], ((0, 0), (0, 0), (0, D - 1))),
                                   return_residuals=True)
  np.testing.assert_array_equal(np.asarray(padded.outputs), np.asarray(explicit.outputs))


def test_validation_errors(prompts):
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((8, 1, 3))
  with pytest.raises(ValueError, match="num_folds"):
    probes.cross_validated_probe(feats, feats, jax.random.key(0), num_folds=9)
  with pytest.raises(ValueError, match="ridge"):
    probes.cross_validated_probe(feats, feats, jax.random.key(0), ridge=0.0)
  with pytest.raises(ValueError, match="agree"):
    probes.cross_validated_probe(feats, rng.standard_normal((7, 1, 3)), jax.random.key(0))
  with pytest.raises(ValueError, match="NaN"):
    probes.cross_validated_probe(feats, np.full((8, 1, 1), np.nan), jax.random.key(0))
  with pytest.raises(ValueError, match="unknown site"):
    probes.site_features(np.zeros((2, 8, 5, 3)), "middle", 3)
  with pytest.raises(ValueError, match="num_support"):
    probes.site_features(np.zeros((2, 8, 3, 3)), "support", 3)
  with pytest.raises(ValueError, match="query"):
    probes.site_features(np.zeros((2, 8, 4, 3)), "query", 3)
  with pytest.raises(ValueError, match="one vector per prompt"):
    probes.site_targets(np.zeros((8, 2, 3)), "aggregator")
  with pytest.raises(ValueError, match="num_tokens"):
    probes.site_targets(np.zeros((8, 3)), "query")
  with pytest.raises(ValueError, match="form"):
    probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, 2, form="mixed")
  with pytest.raises(ValueError, match="ridge"):
    probes.state_targets(prompts.x_support, prompts.y_support, -1.0, 2)
  with pytest.raises(ValueError, match="num_steps"):
    probes.state_targets(prompts.x_support, prompts.y_support, RIDGE, -1)
  with pytest.raises(ValueError, match="kcg.Transformer"):
    probes.subject_from_model("not a model", input_dim=2)
  with pytest.raises(ValueError, match="CompiledCG"):
    probes.subject_from_compiled(object())
  with pytest.raises(ValueError, match="TrainedModel"):
    probes.subject_from_trained(object())
  with pytest.raises(ValueError, match="quantity"):
    probes.compiled_state_site(kcg.compile_cg(2, 2, 1, 1.0), "gamma")
  with pytest.raises(ValueError, match="L\\+1"):
    probes.probe_layers(feats, feats, jax.random.key(0))
  with pytest.raises(ValueError, match="layers"):
    probes.probe_layers(feats[None], feats, jax.random.key(0), control_features_LxBxSxD=np.stack(
        [feats, feats]))
  with pytest.raises(ValueError, match="one target per step"):
    probes.probe_grid(feats[None], feats, jax.random.key(0))
  with pytest.raises(ValueError, match=r"\[B, S, D\]"):
    probes.cross_validated_probe(feats[None], feats, jax.random.key(0))
  with pytest.raises(ValueError, match="batch axis"):
    probes.site_targets(np.zeros(8), "support")
  with pytest.raises(ValueError, match="y_support"):
    probes.state_targets(prompts.x_support, prompts.y_support[:, :-1], RIDGE, 2)


def test_trained_encoding_check():
  class Data:
    encoding = "every_prefix"
    input_dim = 2

  class Config:
    data = Data()

  class Trained:
    config = Config()
    model = None

  with pytest.raises(ValueError, match="every_prefix"):
    probes.subject_from_trained(Trained())


def test_forward_rejects_bad_prompts(small_subject):
  with pytest.raises(ValueError, match="layer_names"):
    probes.subject_from_model(small_subject.model, input_dim=D, layer_names=("a",))
  with pytest.raises(ValueError, match="features per token"):  # positional prompts, plain model
    probes.subject_from_model(small_subject.model, input_dim=D, positional=True).forward(
        jnp.zeros((1, K, D)), jnp.zeros((1, K)), jnp.zeros((1, Q, D)))
  with pytest.raises(ValueError, match="input_dim"):
    small_subject.forward(jnp.zeros((1, K, D + 1)), jnp.zeros((1, K)), jnp.zeros((1, Q, D + 1)))
  with pytest.raises(ValueError, match="prompts must be"):
    small_subject.forward(jnp.zeros((1, K, D)), jnp.zeros((1, K + 1)), jnp.zeros((1, Q, D)))
  with pytest.raises(ValueError, match="NaN"):
    small_subject.forward(jnp.full((1, K, D), jnp.nan), jnp.zeros((1, K)), jnp.zeros((1, Q, D)))
