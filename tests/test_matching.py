"""Layer-wise algorithm matching on compiled models: the layer at step end t must match CG_t.

Tolerances. At a step end the compiled prediction channel holds CG's f_t to float64 rounding
(relative ~1e-14 on these problems: k = 6, kappa(A) < 50, t <= 4), so its mean squared difference to
the reference CG_t is ~1e-28 times the prediction scale squared; we require < 1e-20. Every other
candidate (and every other step) differs at O(1e-3) or more on these problems, so the argmin is
unambiguous.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kcg
from kcg import matching
from kcg import probes
from kcg import tasks

K, D, Q, T, RIDGE = 6, 4, 3, 3, 0.5


@pytest.fixture(scope="module")
def prompts():
  config = tasks.TaskConfig(family="noisy_linear", input_dim=D, num_support=K, num_query=Q,
                            batch_size=48, condition_number=10.0)
  return tasks.sample(jax.random.key(0), config)


@functools.lru_cache(maxsize=None)
def _subject(form, mask):
  return probes.subject_from_compiled(kcg.compile_cg(K, D, T, RIDGE, mask=mask, form=form))


@pytest.mark.parametrize("form,mask,expected", [("dual", "prefix", "cg/data"),
                                                ("primal", "causal", "primal_cg/data")])
def test_step_end_layers_match_cg_t(form, mask, expected, prompts):
  subject = _subject(form, mask)
  result = matching.match_subject(subject, prompts, jax.random.key(1), ridge=RIDGE, max_steps=T + 1,
                                  readout="prediction_channel", gradients=True)
  assert len(result.layers) == subject.num_layers + 1
  for t, layer in enumerate(subject.program.step_ends):
    m = result.layers[layer]
    assert m.squared_difference < 1e-20
    if t == 0:  # f_0 = 0 for every candidate: any of them, at step 0.
      assert m.step == 0
    else:
      assert (m.name, m.step) == (expected, t), (t, m)
      assert m.r2 > 1 - 1e-10 and m.error_cosine > 1 - 1e-10
      # Induced weights d f / d x_query: the compiled model's are CG's w_t (= X^T alpha_t in dual
      # form); the causal mask takes the path that keeps the Jacobian's diagonal over queries.
      assert m.weight_cosine > 1 - 1e-10 and m.sensitivity_cosine > 1 - 1e-10
      assert m.weight_relative_distance < 1e-8
  # Before convergence (t = 2 < p = 4) every other candidate's best distance is far larger.
  mid = subject.program.step_ends[2]
  others = [d[mid] for n, d in result.best_distance.items() if n != expected]
  assert min(others) > 1e6 * max(result.layers[mid].squared_difference, 1e-30)
  assert "| layer |" in result.table()


def test_implicit_weights_steps_keep_each_querys_own_gradient(prompts):
  """Forward mode against reverse mode (`jax.jacrev`), and the Jacobian's diagonal over queries.

  Both modes differentiate the same float64 program, so they agree to rounding (1e-12).
  """
  subject = _subject("primal", "causal")
  predictor = matching.layer_predictor(subject, "prediction_channel")
  steps = lambda xs, ys, xq: jnp.moveaxis(predictor(xs, ys, xq), 0, 1)  # [B, N, q]
  got = matching.implicit_weights_steps(steps, prompts)
  xs, ys, xq = prompts.x_support, prompts.y_support, prompts.x_query
  jac = jax.jacrev(lambda x: jnp.sum(steps(xs, ys, x), axis=0))(xq)  # [N, q, B, q, d]
  want = jnp.moveaxis(jnp.swapaxes(jnp.diagonal(jac, axis1=1, axis2=3), -1, -2), 0, 1)
  assert got.shape == (xq.shape[0], subject.num_layers + 1, Q, D)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

  w = np.arange(1.0, D + 1)
  coupling = 0.5

  def interacting(xs, ys, xq):  # output n: n (w^T x_j + c sum_i x_i[0]); every query sees the others
    f = jnp.einsum("bqd,d->bq", xq, w) + coupling * jnp.sum(xq[..., 0], axis=-1, keepdims=True)
    return f[:, None, :] * jnp.arange(3.0)[None, :, None]

  own = np.array(w)
  own[0] += coupling
  got = matching.implicit_weights_steps(interacting, prompts)
  want = np.arange(3.0)[None, :, None, None] * own[None, None, None, :]
  np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-12, atol=1e-12)
  summed = matching.implicit_weights_steps(interacting, prompts, independent_queries=True)
  np.testing.assert_allclose(summed[:, 1, :, 0], w[0] + Q * coupling, rtol=1e-12)


def test_logit_lens_is_the_prediction_channel_for_compiled_models(prompts):
  subject = _subject("dual", "prefix")
  lens = matching.layer_predictions(subject, prompts, "logit_lens")
  channel = matching.layer_predictions(subject, prompts, "prediction_channel")
  np.testing.assert_array_equal(np.asarray(lens), np.asarray(channel))


def test_linear_readout_recovers_the_prediction_channel(prompts):
  """A readout fitted to the compiled model's own output recovers f_t at the step ends."""
  subject = _subject("dual", "prefix")
  fit = tasks.sample(jax.random.key(5), tasks.TaskConfig(
      family="noisy_linear", input_dim=D, num_support=K, num_query=Q, batch_size=48,
      condition_number=10.0))
  final = probes.predict_fn(subject)(fit.x_support, fit.y_support, fit.x_query)
  readout = matching.fit_linear_readout(subject, fit, ridge=1e-10, targets=final)
  preds = matching.layer_predictor(subject, "linear_readout", linear_readout=readout)(
      prompts.x_support, prompts.y_support, prompts.x_query)
  want = probes.predict_fn(subject)(prompts.x_support, prompts.y_support, prompts.x_query)
  np.testing.assert_allclose(np.asarray(preds[-1]), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_newton_schulz_closed_form(prompts):
  """X_i = (I - (I - c A^2)^(2^i)) A^{-1}, so step t predicts k(x)^T X_{t-1} y."""
  traj = matching.newton_schulz_trajectory(3, RIDGE)(prompts.x_support, prompts.y_support,
                                                     prompts.x_query)
  x, y, xq = (np.asarray(a) for a in (prompts.x_support, prompts.y_support, prompts.x_query))
  a = np.einsum("bkd,bjd->bkj", x, x) + RIDGE * np.eye(K)[None]
  evals = np.linalg.eigvalsh(a)
  c = 2 / (evals[:, 0] ** 2 + evals[:, -1] ** 2)
  e = np.eye(K)[None] - c[:, None, None] * a @ a
  kq = np.einsum("bqd,bkd->bqk", xq, x)
  np.testing.assert_array_equal(np.asarray(traj[:, 0]), 0)
  for t in range(1, 4):
    x_t = (np.eye(K)[None] - np.linalg.matrix_power(e, 2 ** (t - 1))) @ np.linalg.inv(a)
    np.testing.assert_allclose(np.asarray(traj[:, t]), np.einsum("bqk,bkj,bj->bq", kq, x_t, y),
                               rtol=1e-9, atol=1e-12)


def test_trajectories_and_candidates(prompts):
  names = matching.candidate_names(("cg", "gd"), ("feature", "data"))
  assert names == (("cg", "data"), ("gd", "data"))  # no feature map: phi = x
  fm = kcg.features.random_relu(8)
  params = fm.init(jax.random.key(0), D)
  phi = functools.partial(fm.apply, params)
  traj = matching.algorithm_trajectories(prompts, RIDGE, 3, algorithms=("cg", "newton_schulz"),
                                         feature_map=phi)
  assert set(traj) == {"cg/feature", "cg/data", "newton_schulz/feature", "newton_schulz/data"}
  np.testing.assert_allclose(
      np.asarray(traj["cg/feature"]),
      np.asarray(kcg.solvers.cg_predict(phi(prompts.x_support), prompts.y_support,
                                        phi(prompts.x_query), RIDGE, 3)), rtol=1e-12)
  one = matching.trajectory("cg", 3, RIDGE)(prompts.x_support, prompts.y_support, prompts.x_query)
  np.testing.assert_allclose(np.asarray(one), np.asarray(traj["cg/data"]), rtol=1e-12)


def test_match_layers_on_arrays(prompts):
  """A layer that is GD_2 plus nothing else is matched to GD_2 by every measure."""
  traj = matching.algorithm_trajectories(prompts, RIDGE, 3, algorithms=("cg", "gd"))
  layers = jnp.stack([traj["gd/data"][:, 2], traj["cg/data"][:, 1]])
  result = matching.match_layers(layers, prompts, traj, jax.random.key(0))
  assert (result.layers[0].name, result.layers[0].step) == ("gd/data", 2)
  assert (result.layers[1].name, result.layers[1].step) == ("cg/data", 1)
  assert result.distances["gd/data"].shape == (2, 4)


def test_trained_style_subject_runs(prompts):
  """A (random) non-compiled transformer: logit lens and linear readout (gradients: see above)."""
  # The same architecture as the random subjects of test_probes and test_ablations (shared compiles).
  config = kcg.ModelConfig(token_dim=kcg.prompt.make_layout(K, Q, D).token_dim, width=12,
                           num_layers=2, num_heads=2, head_dim=4, mask="prefix")
  subject = probes.random_init_like(probes.Subject("t", config, None, None, ("a", "b"), D), seed=1)
  for readout, gradients in (("logit_lens", False), ("linear_readout", False)):
    result = matching.match_subject(subject, prompts, jax.random.key(1), ridge=RIDGE, max_steps=3,
                                    readout=readout, fit_prompts=prompts,
                                    algorithms=("cg", "gd"), gradients=gradients)
    assert len(result.layers) == 3
    assert all(np.isfinite(m.squared_difference) for m in result.layers)


def test_validation_errors(prompts):
  subject = _subject("dual", "prefix")
  with pytest.raises(ValueError, match="unknown readout"):
    matching.layer_predictions(subject, prompts, "tuned_lens")
  with pytest.raises(ValueError, match="fit_prompts"):
    matching.layer_predictions(subject, prompts, "linear_readout")
  with pytest.raises(ValueError, match="fit_prompts"):
    matching.match_subject(subject, prompts, jax.random.key(0), ridge=RIDGE, max_steps=2,
                           readout="linear_readout")
  with pytest.raises(ValueError, match="linear_readout="):
    matching.layer_predictor(subject, "linear_readout")
  trained_like = subject._replace(program=None)
  with pytest.raises(ValueError, match="compiled subject"):
    matching.layer_predictor(trained_like, "prediction_channel")
  with pytest.raises(ValueError, match="unknown algorithm"):
    matching.trajectory("adam", 2, RIDGE)
  with pytest.raises(ValueError, match="unknown algorithm"):
    matching.candidate_names(("cg", "lbfgs"))
  with pytest.raises(ValueError, match="unknown space"):
    matching.candidate_names(("cg",), ("hilbert",))
  with pytest.raises(ValueError, match="ridge"):
    matching.newton_schulz_trajectory(2, 0.0)
  with pytest.raises(ValueError, match="num_steps"):
    matching.trajectory("cg", -1, RIDGE)
  with pytest.raises(ValueError, match=r"\[L\+1, B, q\]"):
    matching.match_layers(jnp.zeros((48, Q)), prompts, {"cg/data": jnp.zeros((48, 2, Q))},
                          jax.random.key(0))
  with pytest.raises(ValueError, match="empty"):
    matching.match_layers(jnp.zeros((1, 48, Q)), prompts, {}, jax.random.key(0))
  with pytest.raises(ValueError, match=r"\[B, T\+1, q\]"):
    matching.match_layers(jnp.zeros((1, 48, Q)), prompts, {"cg/data": jnp.zeros((48, Q))},
                          jax.random.key(0))
  with pytest.raises(ValueError, match="readout targets"):
    matching.fit_linear_readout(subject, prompts, targets=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="unknown space"):
    matching.newton_schulz_trajectory(2, RIDGE, space="hilbert")
  with pytest.raises(ValueError, match="unknown space"):
    matching.trajectory("cg", 2, RIDGE, space="hilbert")
  one = (prompts.x_support[0], prompts.y_support[0], prompts.x_query[0])  # no batch axis
  with pytest.raises(ValueError, match="batched"):
    matching.newton_schulz_trajectory(2, RIDGE)(*one)
  with pytest.raises(ValueError, match="batched"):
    matching.algorithm_trajectories(type(prompts)(*one, None, None, None), RIDGE, 2)
  with pytest.raises(ValueError, match="y_query"):
    matching.match_layers(jnp.zeros((1, 48, Q + 1)), prompts, {"cg/data": jnp.zeros((48, 2, Q))},
                          jax.random.key(0))
