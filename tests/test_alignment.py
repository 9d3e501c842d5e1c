"""kcg.alignment on compiled models, where every answer is known exactly.

A compiled CG with `features="random_relu"` computes phi(x) = relu(W x + b) / sqrt(m) in its first
layer and then runs CG on the linear kernel of phi: its hidden features at layer 1 ARE phi, KRR on them
is its converged prediction, CG_t on them is its prediction after step t, its smoother weights at
convergence are KRR's, its y-nonlinearity index before convergence is > 0 (a compiled Chebyshev's is 0
to rounding), and grafting a compiled CG on its feature layer reproduces it.

Tolerances (float64, k = 5 supports, ridge 0.5, so cond(K + ridge I) <= ~40 here): exact readings are
compared bit for bit; closed-form vs compiled predictions to 1e-10 relative (measured ~1e-15);
step-by-step CG to 1e-9 of the prediction scale (measured ~5e-13 at cond ~40: rounding grows with the
condition number along the Krylov recurrence).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import alignment
from kcg import features
from kcg import probes
from kcg import tasks

K, D, M, RIDGE = 5, 3, 6, 0.5
CONVERGED = 8  # > k: CG on a k x k system has converged (to rounding)


@pytest.fixture(scope="module")
def problem():
  fm = features.random_relu(M, bias_scale=0.5)
  params = fm.init(jax.random.key(1), D)
  config = tasks.TaskConfig(family="kernel_prior", input_dim=D, num_support=K, num_query=3,
                            batch_size=12, noise_std=0.1)
  prompts = tasks.sample(jax.random.key(0), config)
  labels_b = tasks.sample_targets(jax.random.key(9), config, prompts.x_support,
                                  prompts.x_query).y_support
  compiled = kcg.compile_cg(K, M, CONVERGED, RIDGE, mask="prefix", features="random_relu",
                            feature_params=params)
  subject = probes.subject_from_compiled(compiled)
  selector = alignment.channel_map(compiled.config.width, compiled.program.layout.slice("phi_query"))
  hidden = alignment.hidden_features(subject, prompts.x_support, prompts.y_support, prompts.x_query)
  phi_s, phi_q = selector(hidden.support[1]), selector(hidden.query[1])
  return dict(params=params, prompts=prompts, labels_b=labels_b, compiled=compiled, subject=subject,
              selector=selector, phi_s=phi_s, phi_q=phi_q)


def _np(x):
  return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------------------------------
# Hidden features.
# ----------------------------------------------------------------------------------------------------


def test_feature_layer_of_compiled_cg_is_phi_for_every_label_free_reading(problem):
  p, compiled, subject, sel = (problem[n] for n in ("prompts", "compiled", "subject", "selector"))
  phi_s = _np(compiled.kernel_features(p.x_support))
  phi_q = _np(compiled.kernel_features(p.x_query))
  for reading in ("zero_labels", "other_labels", "context_free"):
    hidden = alignment.hidden_features(subject, p.x_support, p.y_support, p.x_query, reading=reading)
    assert hidden.support.shape == (compiled.config.num_layers + 1, 12, K, compiled.config.width)
    np.testing.assert_array_equal(sel(hidden.support[1]), phi_s)
    np.testing.assert_array_equal(sel(hidden.query[1]), phi_q)
  # The circular control: with the labels, the last layer's query tokens hold the model's own
  # predictions at every input (its prediction channel), so KRR on them explains it trivially.
  hidden = alignment.hidden_features(subject, p.x_support, p.y_support, p.x_query,
                                     reading="with_labels")
  f_channel = compiled.program.layout.slice(compiled.program.readout)
  np.testing.assert_allclose(hidden.query[-1][..., f_channel][..., 0],
                             _np(compiled.predict(p.x_support, p.y_support, p.x_query)), rtol=1e-13)
  np.testing.assert_allclose(hidden.support[-1][..., f_channel][..., 0],
                             _np(compiled.predict(p.x_support, p.y_support, p.x_support)), rtol=1e-13)
  # Zero labels: no label reaches any query-token reading at any layer (y is 0 in the prompt).
  zero = alignment.hidden_features(subject, p.x_support, p.y_support, p.x_query)
  other = alignment.hidden_features(subject, p.x_support, 2 * p.y_support, p.x_query)
  np.testing.assert_array_equal(zero.query, other.query)


def test_context_free_equals_in_context_through_attention_free_layers():
  """For a features-then-solver model the readings agree exactly up to the last token-wise block and
  differ after the first attention block."""
  config = kcg.ModelConfig(token_dim=kcg.prompt.make_layout(K, 2, D).token_dim, width=12,
                           num_layers=3, num_heads=2, head_dim=4, mlp_hidden=16, attention="softmax",
                           norm="layernorm", mask="prefix", attention_free_layers=2,
                           param_dtype=jnp.float64)
  subject = probes.subject_from_model(kcg.Transformer(config, rngs=nnx.Rngs(0)), input_dim=D)
  rng = np.random.default_rng(0)
  xs, ys, xq = rng.normal(size=(4, K, D)), rng.normal(size=(4, K)), rng.normal(size=(4, 2, D))
  readings = {r: alignment.hidden_features(subject, xs, ys, xq, reading=r)
              for r in ("zero_labels", "other_labels", "context_free")}
  for r in ("other_labels", "context_free"):
    np.testing.assert_array_equal(readings[r].support[:3], readings["zero_labels"].support[:3])
    assert np.max(np.abs(readings[r].query[3] - readings["zero_labels"].query[3])) > 1e-6


def test_causal_mask_asks_each_input_in_a_prompt_of_its_own(problem):
  """Under the causal mask query j would read queries < j; each input gets its own prompt, so the
  aggregator-state compiled CG (causal) still reads phi at its feature layer."""
  p = problem["prompts"]
  compiled = kcg.compile_cg(K, M, 1, RIDGE, mask="causal", features="random_relu",
                            feature_params=problem["params"])
  subject = probes.subject_from_compiled(compiled)
  sel = alignment.channel_map(compiled.config.width, compiled.program.layout.slice("phi_query"))
  hidden = alignment.hidden_features(subject, p.x_support, p.y_support, p.x_query)
  np.testing.assert_array_equal(sel(hidden.support[1]), _np(compiled.kernel_features(p.x_support)))
  np.testing.assert_array_equal(sel(hidden.query[1]), _np(compiled.kernel_features(p.x_query)))


def test_reading_validation(problem):
  p, subject = problem["prompts"], problem["subject"]
  with pytest.raises(ValueError, match="unknown reading"):
    alignment.hidden_features(subject, p.x_support, p.y_support, p.x_query, reading="labels")
  with pytest.raises(ValueError, match=r"x_support \[B, k, d\]"):
    alignment.hidden_features(subject, p.x_support, p.y_support[:, :2], p.x_query)
  with pytest.raises(ValueError, match="width"):
    alignment.channel_map(4, slice(5, 9))(np.zeros((2, 3)))
  st = alignment.standardizing_map(np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0]]))
  np.testing.assert_allclose(st(np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0]])),
                             [[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]])  # the constant column is dropped
  with pytest.raises(ValueError, match="NaN"):
    alignment.standardizing_map(np.array([[np.nan, 1.0]]))


# ----------------------------------------------------------------------------------------------------
# KRR and candidates on phi.
# ----------------------------------------------------------------------------------------------------


def test_krr_on_phi_explains_converged_compiled_cg_exactly(problem):
  p, compiled, phi_s, phi_q = (problem[n] for n in ("prompts", "compiled", "phi_s", "phi_q"))
  model = _np(compiled.predict(p.x_support, p.y_support, p.x_query))
  krr = _np(alignment.krr_predict(phi_s, p.y_support, phi_q, RIDGE))
  np.testing.assert_allclose(krr, model, rtol=0, atol=1e-10 * np.abs(model).max())
  agree = alignment.agreement(krr, model, jax.random.key(0))
  assert agree.r2 >= 1 - 1e-15 and agree.relative_distance < 1e-10
  # Independent references: NumPy's dense solve, and scikit-learn (with and without an intercept).
  sklearn = pytest.importorskip("sklearn.linear_model")
  for b in range(3):
    alpha = np.linalg.solve(phi_s[b] @ phi_s[b].T + RIDGE * np.eye(K), _np(p.y_support[b]))
    np.testing.assert_allclose(krr[b], phi_q[b] @ phi_s[b].T @ alpha, rtol=1e-12)
    ridge = sklearn.Ridge(alpha=RIDGE, fit_intercept=True).fit(phi_s[b], _np(p.y_support[b]))
    with_intercept = _np(alignment.krr_predict(phi_s, p.y_support, phi_q, RIDGE, intercept=True))[b]
    np.testing.assert_allclose(with_intercept, ridge.predict(phi_q[b]), rtol=1e-10)


def test_cg_on_phi_is_the_compiled_model_at_every_step(problem):
  p, compiled, phi_s, phi_q = (problem[n] for n in ("prompts", "compiled", "phi_s", "phi_q"))
  steps = _np(compiled.predict_steps(p.x_support, p.y_support, p.x_query))
  traj = alignment.trajectories(alignment.FeatureProblem(phi_s, p.y_support, phi_q), RIDGE,
                                CONVERGED, names=("cg",))["cg"]
  np.testing.assert_allclose(traj, steps, rtol=0, atol=1e-9 * np.abs(steps).max())


def test_per_prompt_candidates_are_kcg_solvers(problem):
  p, phi_s, phi_q = problem["prompts"], problem["phi_s"], problem["phi_q"]
  traj = alignment.trajectories(alignment.FeatureProblem(phi_s, p.y_support, phi_q), RIDGE, 4,
                                names=("gd", "chebyshev", "pcg"))
  ref = {"gd": kcg.solvers.gd_predict, "chebyshev": kcg.solvers.chebyshev_predict,
         "pcg": kcg.solvers.pcg_predict}
  for name, fn in ref.items():
    np.testing.assert_allclose(traj[name], _np(fn(phi_s, p.y_support, phi_q, RIDGE, 4)), rtol=1e-12,
                               atol=1e-14)


def test_fitted_candidates(problem):
  """Momentum with beta = 0 is GD with its step; GD++ follows its recurrence; the fixed polynomial
  recovers targets that are exactly a fixed polynomial in A; all three are linear in y."""
  p, phi_s, phi_q = problem["prompts"], problem["phi_s"], problem["phi_q"]
  y = _np(p.y_support)
  a = np.einsum("bkp,bjp->bkj", phi_s, phi_s) + RIDGE * np.eye(K)
  cross = np.einsum("bqp,bkp->bqk", phi_q, phi_s)
  # Targets made by a fixed degree-1 polynomial: f = k(x)^T (0.3 y - 0.02 A y).
  targets = np.einsum("bqk,bk->bq", cross, 0.3 * y - 0.02 * np.einsum("bkj,bj->bk", a, y))
  fit = alignment.FeatureProblem(phi_s, y, phi_q, targets)
  fitted = alignment.fit_candidates(fit, RIDGE, 3)
  traj = alignment.trajectories(fit, RIDGE, 3, names=alignment.FITTED + ("cg",), fitted=fitted)
  np.testing.assert_allclose(traj["polynomial"][:, 2], targets, rtol=1e-8, atol=1e-10)
  eta, beta = fitted.params["momentum"][0]
  gd = kcg.solvers.gd_predict(phi_s, y, phi_q, RIDGE, 1, step_size=eta)
  if beta == 0:
    np.testing.assert_allclose(traj["momentum"][:, 1], _np(gd)[:, 1], rtol=1e-12)
  step, delta = fitted.params["gd_plus"][0]
  second = fitted.constants["gd_plus_second_moment"]
  pre = np.linalg.inv(second + delta * np.trace(second) / M * np.eye(M))
  w1 = np.einsum("pq,bkq,bk->bp", pre, phi_s, y) * step / K
  np.testing.assert_allclose(traj["gd_plus"][:, 1], np.einsum("bqp,bp->bq", phi_q, w1), rtol=1e-10)
  for name in alignment.FITTED:
    f = lambda _xs, yy, _xq, n=name: alignment.trajectories(
        alignment.FeatureProblem(phi_s, yy, phi_q), RIDGE, 3, names=(n,), fitted=fitted)[n][:, -1]
    assert alignment.y_nonlinearity(f, None, y, problem["labels_b"], None).index < 1e-12, name
  with pytest.raises(ValueError, match="fitted"):
    alignment.trajectories(fit, RIDGE, 3, names=("polynomial",))
  with pytest.raises(ValueError, match="unknown candidate"):
    alignment.trajectories(fit, RIDGE, 3, names=("adam",))
  with pytest.raises(ValueError, match="targets"):
    alignment.fit_candidates(alignment.FeatureProblem(phi_s, y, phi_q), RIDGE, 3)


def test_select_ridge_recovers_the_ridge_of_the_reference(problem):
  p, phi_s, phi_q = problem["prompts"], problem["phi_s"], problem["phi_q"]
  reference = alignment.krr_predict(phi_s, p.y_support, phi_q, 0.3, intercept=True)
  choice = alignment.select_ridge(
      lambda r, i: alignment.krr_predict(phi_s, p.y_support, phi_q, r, intercept=i), reference,
      [0.01, 0.1, 0.3, 1.0, 3.0])
  assert choice.ridge == 0.3 and choice.intercept and choice.squared_difference[1, 2] == 0.0
  with pytest.raises(ValueError, match="ridge"):
    alignment.select_ridge(lambda r, i: reference, reference, [0.1, -1.0])


# ----------------------------------------------------------------------------------------------------
# Agreement, kernel alignment, smoother weights.
# ----------------------------------------------------------------------------------------------------


def test_agreement():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(400, 4))
  a = m + 0.5 * rng.normal(size=m.shape)
  got = alignment.agreement(a, m, jax.random.key(0), num_bootstrap=300)
  expected = 1 - np.sum((a - m) ** 2) / np.sum((m - m.mean()) ** 2)
  assert got.r2 == pytest.approx(expected, rel=1e-12)
  assert got.r2_lower < got.r2 < got.r2_upper and got.r2_upper - got.r2_lower < 0.1
  assert got.relative_distance == pytest.approx(np.linalg.norm(a - m) / np.linalg.norm(m))
  exact = alignment.agreement(m, m)
  assert exact.r2 == 1.0 and exact.relative_distance == 0.0
  with pytest.raises(ValueError, match=r"\[B, q\]"):
    alignment.agreement(m[:, :2], m)
  with pytest.raises(ValueError, match="NaN"):
    alignment.agreement(np.full_like(m, np.nan), m)
  sigma = alignment.shuffled_pairs(50, jax.random.key(1))
  assert sorted(sigma) == list(range(50)) and np.all(sigma != np.arange(50))


def test_kernel_alignment_against_its_definition():
  rng = np.random.default_rng(1)
  phi, psi = rng.normal(size=(3, 7, 4)), rng.normal(size=(3, 7, 2))
  ka, kb = alignment.linear_gram(phi), alignment.linear_gram(psi)
  h = np.eye(7) - np.ones((7, 7)) / 7
  for b in range(3):
    a_c, b_c = h @ ka[b] @ h, h @ kb[b] @ h
    expected = np.sum(a_c * b_c) / (np.linalg.norm(a_c) * np.linalg.norm(b_c))
    assert alignment.kernel_alignment(ka, kb)[b] == pytest.approx(expected, rel=1e-12)
  np.testing.assert_allclose(alignment.kernel_alignment(ka, 3.0 * ka + 2.0), 1.0, rtol=1e-12)
  with pytest.raises(ValueError, match=r"\[B, n, n\]"):
    alignment.kernel_alignment(ka, kb[:, :6, :6])


def test_smoother_weights_of_converged_cg_are_krrs(problem):
  p, subject, phi_s, phi_q = (problem[n] for n in ("prompts", "subject", "phi_s", "phi_q"))
  weights = alignment.smoother_weights(probes.predict_fn(subject), p.x_support, p.y_support,
                                       p.x_query)
  krr = alignment.krr_smoother_weights(phi_s, phi_q, RIDGE)
  assert weights.shape == (12, 3, K)
  np.testing.assert_allclose(weights, krr, rtol=0, atol=1e-10 * np.abs(krr).max())
  np.testing.assert_allclose(alignment.weight_cosine(weights, krr), 1.0, atol=1e-12)
  # KRR's closed-form weights are its values on unit label vectors: the same as forward mode.
  f = lambda _xs, y, _xq: alignment.krr_predict(phi_s, y, phi_q, RIDGE, intercept=True)
  np.testing.assert_allclose(alignment.smoother_weights(f, None, p.y_support, None),
                             alignment.krr_smoother_weights(phi_s, phi_q, RIDGE, intercept=True),
                             atol=1e-13)


# ----------------------------------------------------------------------------------------------------
# The y-linearity signature.
# ----------------------------------------------------------------------------------------------------


def test_y_nonlinearity_separates_cg_from_linear_solvers(problem):
  p, params, labels_b = problem["prompts"], problem["params"], problem["labels_b"]

  def index(compiled):
    return alignment.y_nonlinearity(compiled.predict, p.x_support, p.y_support, labels_b,
                                    p.x_query).index

  two_steps = kcg.compile_cg(K, M, 2, RIDGE, mask="prefix", features="random_relu",
                             feature_params=params)
  chebyshev = kcg.compile_chebyshev(K, M, 2, RIDGE, eig_bounds=(RIDGE, RIDGE + 10.0), mask="prefix",
                                    features="random_relu", feature_params=params)
  assert index(two_steps) > 1e-2  # step sizes computed from the prompt: nonlinear in y
  assert index(chebyshev) < 1e-12  # step sizes baked into the weights: linear in y
  assert index(problem["compiled"]) < 1e-10  # converged CG is KRR, linear in y
  phi_s, phi_q = problem["phi_s"], problem["phi_q"]
  krr = lambda _xs, y, _xq: alignment.krr_predict(phi_s, y, phi_q, RIDGE)
  assert alignment.y_nonlinearity(krr, None, p.y_support, labels_b, None).index < 1e-13


def test_y_nonlinearity_counts_an_offset_as_linear(problem):
  """A linear predictor plus a y-independent offset c(x) is affine: index 0 thanks to the f(0) term;
  the uncentred f(ya + yb) - f(ya) - f(yb) would see -c."""
  p, phi_s, phi_q, labels_b = (problem[n] for n in ("prompts", "phi_s", "phi_q", "labels_b"))
  offset = 5.0 + phi_q.sum(-1)
  f = lambda _xs, y, _xq: _np(alignment.krr_predict(phi_s, y, phi_q, RIDGE)) + offset
  ya, yb = _np(p.y_support), _np(labels_b)
  assert alignment.y_nonlinearity(f, None, ya, yb, None, weights=(1.0, 1.0)).index < 1e-13
  assert alignment.y_nonlinearity(f, None, ya, yb, None).index < 1e-13
  uncentred = np.linalg.norm(f(None, ya + yb, None) - f(None, ya, None) - f(None, yb, None))
  assert uncentred == pytest.approx(np.linalg.norm(offset), rel=1e-10)
  with pytest.raises(ValueError, match="weights"):
    alignment.y_nonlinearity(f, None, ya, yb, None, weights=(1.0, 0.0))
  with pytest.raises(ValueError, match="one shape"):
    alignment.y_nonlinearity(f, None, ya, yb[:, :2], None)


# ----------------------------------------------------------------------------------------------------
# Grafting.
# ----------------------------------------------------------------------------------------------------


def test_graft_of_compiled_cg_on_its_feature_layer_reproduces_it(problem):
  """First layer of the random-ReLU compiled CG (the feature layer) + a separately compiled CG on
  the phi channels: the hybrid equals the original at every step. The upper model has ridge 1 and
  runs on rescaled features, so this also checks the scale equivariance the graft relies on."""
  p, subject, compiled, sel = (problem[n] for n in ("prompts", "subject", "compiled", "selector"))
  graft = alignment.build_graft(subject, 1, sel, num_support=K, num_steps=CONVERGED, ridge=RIDGE)
  assert graft.compiled.ridge == 1.0 and graft.compiled.feature_dim == M
  got = graft.predict_steps(p.x_support, p.y_support, p.x_query)
  want = _np(compiled.predict_steps(p.x_support, p.y_support, p.x_query))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
  # Grafting on the embedding (layer 0, raw x in the x channels) is a different, worse model.
  x_sel = alignment.channel_map(compiled.config.width, compiled.program.layout.slice("x_query"))
  raw = alignment.build_graft(subject, 0, x_sel, num_support=K, num_steps=2, ridge=RIDGE)
  assert np.max(np.abs(raw.predict_steps(p.x_support, p.y_support, p.x_query)[:, -1]
                       - want[:, 2])) > 1e-3
  with pytest.raises(ValueError, match="layer"):
    alignment.build_graft(subject, compiled.config.num_layers + 1, sel, num_support=K, num_steps=1,
                          ridge=RIDGE)
  with pytest.raises(ValueError, match="without the answer"):
    alignment.build_graft(subject, 1, sel, num_support=K, num_steps=1, ridge=RIDGE,
                          reading="with_labels")
  with pytest.raises(ValueError, match="width"):
    alignment.build_graft(subject, 1, alignment.channel_map(4, slice(0, 2)), num_support=K,
                          num_steps=1, ridge=RIDGE)


# ----------------------------------------------------------------------------------------------------
# The tasks' true kernels.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,tolerance", [("linear", 0.05), ("kernel_prior", 0.05),
                                              ("relu_network", 0.08)])
def test_true_kernels_are_the_covariance_of_the_targets(family, tolerance):
  """E[f(x) f(x')] over tasks at fixed inputs equals the kernel of `task_info` (Monte Carlo over
  4000 tasks: standard error ~ 1/sqrt(4000) of the variance; relu_network's kernel is its h -> inf
  limit, h = 100)."""
  from kcg._src import alignment_study
  config = tasks.TaskConfig(family=family, input_dim=D, num_support=4, num_query=1, batch_size=1)
  x = np.random.default_rng(0).normal(size=(1, 4, D))
  xs, xq = np.repeat(x, 4000, axis=0), np.zeros((4000, 1, D)) + 0.5
  f = _np(tasks.sample_targets(jax.random.key(0), config, xs, xq).f_support)
  empirical = f.T @ f / f.shape[0]
  kernel = _np(alignment_study.task_info(config).kernel(x, x))[0]
  assert np.max(np.abs(empirical - kernel)) < tolerance * np.max(np.abs(kernel)), (empirical, kernel)
