"""The CG compiler: compiled transformers against reference CG, closed-form KRR and the theorem.

Tolerances. Float64 CG is itself sensitive to rounding: two textbook float64 CGs that differ only in
the order of a sum disagree at intermediate steps by up to ~0.3 relative for k = 64, kappa = 1e4
(rounding errors are amplified while the Krylov basis loses orthogonality), and agree again at
convergence. No implementation can match another to a fixed 1e-6 there. So each comparison's
tolerance is measured on the problem itself: the spread of the reference under eps-sized relative
perturbations of the inputs (running max over steps, 4 draws), times 30; plus 1e-10 of the
prediction scale, which is the whole tolerance on well-conditioned problems (spread ~1e-15). Over
the shared table the compiled error is at most 3.5x that spread (measured), so the factor 30 is a
10x margin.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg._src import model as model_lib
from kcg import problems
from kcg import solvers

CONSTRUCTIONS = [("dual", "prefix"), ("dual", "causal"), ("primal", "causal")]
EPS64 = np.finfo(np.float64).eps
# The fast suite checks every case of the shared table with one construction each (rotating, so
# every construction sees small, large, well- and ill-conditioned cases); -m slow checks all pairs.
FAST_PAIRS = [(case, *CONSTRUCTIONS[i % len(CONSTRUCTIONS)])
              for i, case in enumerate(problems.TEST_CASES)]
SLOW_PAIRS = [(case, form, mask) for case in problems.TEST_CASES for form, mask in CONSTRUCTIONS
              if (case, form, mask) not in FAST_PAIRS]


def _reference_fn(form):
  return solvers.cg_predict if form == "dual" else solvers.primal_cg_predict


def _arrays(case):
  prob = case.problem(jnp.float64)
  return tuple(np.asarray(a) for a in (prob.phi_support, prob.y_support, prob.phi_query)) + (
      float(prob.ridge),)


def _rounding_spread(form, phi, y, query, ridge, num_steps):
  return kcg.analysis.rounding_spread(_reference_fn(form), phi, y, query, ridge, num_steps)


@functools.lru_cache(maxsize=None)
def _compiled(k, p, t, ridge, mask, form):
  return kcg.compile_cg(k, p, t, ridge, mask=mask, form=form)


def _check_case(case, form, mask):
  phi, y, query, ridge = _arrays(case)
  k = case.num_support
  num_steps = k + 2  # past k: exact termination must not produce NaN
  compiled = _compiled(k, case.feature_dim, num_steps, ridge, mask, form)
  got = np.asarray(compiled.predict_steps(phi[None], y[None], query[None])[0])
  assert got.shape == (num_steps + 1, case.num_query)
  assert np.all(np.isfinite(got))
  ref, spread = _rounding_spread(form, phi, y, query, ridge, num_steps)
  scale = max(np.abs(ref).max(), np.abs(y).max() * 1e-12, 1e-300)
  tolerance = 1e-10 * scale + 30 * spread
  err = np.abs(got - ref).max(-1)
  assert np.all(err <= tolerance), (err / scale, tolerance / scale)
  # The last prediction is the KRR solution: closed form by Cholesky, to eps * kappa.
  krr = np.asarray(solvers.krr_predict(phi, y, query, ridge))
  krr_tol = 1e-10 * scale + 100 * EPS64 * case.condition_number * scale + 30 * spread[-1]
  np.testing.assert_allclose(got[-1], krr, rtol=0, atol=krr_tol)
  # predict() is the last step of predict_steps().
  np.testing.assert_allclose(np.asarray(compiled.predict(phi[None], y[None], query[None]))[0],
                             got[-1], rtol=0, atol=1e-13 * scale)


def _pair_id(pair):
  return f"{pair[0].name}-{pair[1]}-{pair[2]}" if isinstance(pair, tuple) else str(pair)


@pytest.mark.parametrize("pair", FAST_PAIRS, ids=_pair_id)
def test_compiled_matches_reference_cg_every_step(pair):
  _check_case(*pair)


@pytest.mark.slow
@pytest.mark.parametrize("pair", SLOW_PAIRS, ids=_pair_id)
def test_compiled_matches_reference_cg_every_step_all_constructions(pair):
  _check_case(*pair)


def test_prefix_mask_primal_matches_reference():
  case = problems.TEST_CASES[5]
  _check_case(case, "primal", "prefix")


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_state_in_named_channels_equals_reference_trace(form, mask):
  """alpha_t, r_t, p_t, gamma_t, beta_t read from the layout's channels equal the reference trace."""
  case = problems.TEST_CASES[6]  # k=16, p=16, kappa=100
  phi, y, query, ridge = _arrays(case)
  num_steps = 8
  compiled = _compiled(case.num_support, case.feature_dim, num_steps, ridge, mask, form)
  out = compiled.forward(phi[None], y[None], query[None], return_residuals=True)
  state = compiled.read_state(out.residuals)
  if form == "dual":
    trace = solvers.cg(phi @ phi.T + ridge * np.eye(case.num_support), y, num_steps)
  else:
    trace = solvers.primal_cg(phi, y, ridge, num_steps)
  # Before convergence (rr/rr0 > 1e-20 here) the trace is well defined; float64 rounding is
  # amplified by at most ~kappa^2 over these steps.
  for name in ("alpha", "r", "p", "gamma", "beta"):
    want = np.asarray(getattr(trace, name))
    got = np.asarray(getattr(state, name))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_sudden_drop_of_the_residual_loses_nothing(form, mask):
  """r.r falls by ~1e-18 in one step while part of the solution is still unresolved.

  y has O(1) components on two eigenvectors of K and 1e-9 on four others; the query weighs only
  the small ones. CG removes the large components in two steps (r.r drops ~1e-18), then must go on
  resolving the small ones. A channel overwritten as x + (new - x) rounds `new` to zero at that
  drop and stalls CG (error O(1) here); the constructions clear first and write into zero.
  Tolerance: rounding noise ~1e-16 of |y| against components of 1e-9 gives ~1e-7 relative, times
  kappa(A) ~ 200.
  """
  k, num_steps, ridge = 6, 10, 0.05
  rng = np.random.default_rng(5)
  basis, _ = np.linalg.qr(rng.normal(size=(k, k)))
  sigma2 = np.array([10.0, 1.0, 5.0, 3.0, 2.0, 0.5])
  phi = basis * np.sqrt(sigma2)[None, :]  # K = Q diag(sigma^2) Q^T, p = k
  y = basis @ np.array([1.0, -1.0, 1e-9, -2e-9, 1.5e-9, 1e-9])
  query = (1e9 * np.array([0.0, 0.0, 1.0, 1.0, -1.0, 1.0]) / np.sqrt(sigma2))[None, :]
  compiled = _compiled(k, k, num_steps, ridge, mask, form)
  got = np.asarray(compiled.predict_steps(phi[None], y[None], query[None])[0])
  krr = np.asarray(solvers.krr_predict(phi, y, query, ridge))
  np.testing.assert_allclose(got[-1], krr, rtol=3e-5)


def test_theorem_bound_holds_for_compiled_predictions():
  """|f_t(x) - f*(x)| <= the theorem's bound at every t, on 40 random problems."""
  k, p, num_steps = 8, 6, 8
  compiled = _compiled(k, p, num_steps, 0.1, "prefix", "dual")
  keys = jax.random.split(jax.random.key(7), 40)
  kappas = np.geomspace(1.5, 1e3, 40)
  for key, kappa in zip(keys, kappas):
    prob = problems.krr_problem(key, num_support=k, feature_dim=p, num_query=3,
                                condition_number=float(kappa), ridge=0.1, dtype=jnp.float64)
    f = np.asarray(compiled.predict_steps(prob.phi_support[None], prob.y_support[None],
                                          prob.phi_query[None])[0])
    fstar = np.asarray(solvers.krr_predict(prob.phi_support, prob.y_support, prob.phi_query, 0.1))
    for t in range(num_steps + 1):
      bound = np.asarray(kcg.bounds.cg_error_bound(prob.phi_support, prob.y_support,
                                                   prob.phi_query, 0.1, t))
      assert np.all(np.abs(f[t] - fstar) <= bound * (1 + 1e-8) + 1e-10), (t, kappa)


def test_float32_inputs_compute_in_float32():
  """Float32: relative error <= 1e-4 on well-conditioned problems (eps32 * kappa * k ~ 1e-4)."""
  for case in [c for c in problems.TEST_CASES if c.condition_number == 10.0][:2]:
    phi, y, query, ridge = _arrays(case)
    compiled = _compiled(case.num_support, case.feature_dim, case.num_support, ridge, "prefix", "dual")
    got = compiled.predict_steps(phi[None].astype(np.float32), y[None].astype(np.float32),
                                 query[None].astype(np.float32))
    assert got.dtype == jnp.float32
    ref = np.asarray(solvers.cg_predict(phi, y, query, ridge, case.num_support))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(got[0], np.float64), ref, rtol=0, atol=1e-4 * scale)


def test_parameter_structure_equals_the_models_own_state():
  """Same tree, shapes and dtypes as the model class's own state (abstract, and one real init)."""
  for form, mask in CONSTRUCTIONS:
    compiled = _compiled(4, 3, 2, 0.1, mask, form)
    own = nnx.state(model_lib.abstract_model(compiled.config), nnx.Param)
    chex.assert_trees_all_equal_structs(own, compiled.params)
    chex.assert_trees_all_equal_shapes_and_dtypes(own, compiled.params)
    assert isinstance(compiled.model, kcg.Transformer)
  fresh_state = nnx.state(kcg.Transformer(compiled.config, rngs=nnx.Rngs(0)), nnx.Param)
  chex.assert_trees_all_equal_structs(fresh_state, compiled.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(fresh_state, compiled.params)


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_depth_and_width_are_the_documented_functions(form, mask):
  for k, p, t in [(4, 2, 0), (4, 2, 3), (16, 8, 5), (8, 32, 2)]:
    dims = kcg.dimensions(k, p, t, mask=mask, form=form)
    compiled = _compiled(k, p, t, 0.1, mask, form)
    assert compiled.config.num_layers == dims.num_layers == dims.init_layers + t * dims.layers_per_step
    assert compiled.config.width == dims.width
    assert compiled.config.num_heads == dims.num_heads
    assert compiled.config.mlp_hidden == dims.mlp_hidden
    # Channels: features, solver vectors, y and f, 8 scalars, 3 flags (see programs.py).
    if form == "primal":
      assert dims.width == 7 * p + 2 + 8 + 3  # phi_s, phi_q, w, r, p, p_prev, Ap
      assert dims.layers_per_step == 11
    elif mask == "prefix":
      assert dims.width == 2 * p + 8 + 8 + 3  # y alpha r p Kp p_prev kq_p f, one each
      assert dims.layers_per_step == 11
    else:
      assert dims.width == 3 * p + 6 * k + 2 + 8 + 3  # phi_s phi_q u; position alpha r p p_prev Kp
      assert dims.layers_per_step == 12


@pytest.mark.parametrize("options", [
    dict(form="dual", mask="prefix", num_outputs=3),
    dict(form="primal", mask="causal", num_outputs=2),
    dict(form="dual", mask="prefix", num_outputs=2, multi_output="block"),
    dict(form="dual", mask="causal", norm="rmsnorm"),
    dict(form="dual", mask="prefix", preconditioner="jacobi"),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_dimensions_of_the_variants_without_compiling(options):
  k, p, t = 6, 3, 2
  dims = kcg.dimensions(k, p, t, **options)
  assert dims == kcg.compile_cg(k, p, t, 0.3, **options).dimensions
  assert dims.num_layers == dims.init_layers + t * dims.layers_per_step
  plain = kcg.dimensions(k, p, t, form=options["form"], mask=options["mask"])
  assert dims.width > plain.width  # each variant adds channels


def test_dimensions_rejects_what_compile_cg_rejects():
  with pytest.raises(ValueError, match="num_outputs"):
    kcg.dimensions(4, 2, 1, num_outputs=0)
  with pytest.raises(ValueError, match="block"):
    kcg.dimensions(4, 2, 1, num_outputs=2, multi_output="block", mask="causal")
  with pytest.raises(ValueError, match="norm"):
    kcg.dimensions(4, 2, 1, norm="batchnorm")
  with pytest.raises(ValueError, match="preconditioner"):
    kcg.dimensions(4, 2, 1, mask="prefix", preconditioner="ilu")
  with pytest.raises(ValueError, match="jacobi"):
    kcg.dimensions(4, 2, 1, mask="causal", preconditioner="jacobi")


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS + [("primal", "prefix")])
def test_no_leakage_from_queries_to_supports(form, mask):
  """Support tokens' activations at every layer do not depend on the query tokens at all."""
  k, p, t = 5, 3, 2
  compiled = _compiled(k, p, t, 0.2, mask, form)
  rng = np.random.default_rng(0)
  xs, ys, xq = rng.normal(size=(1, k, p)), rng.normal(size=(1, k)), rng.normal(size=(1, 2, p))

  def support_residuals(x_query):
    out = compiled.forward(xs, ys, x_query, return_residuals=True)
    return out.residuals[:, :, : k + 1]  # supports and the aggregator, every layer

  jacobian = jax.jacfwd(support_residuals)(jnp.asarray(xq))
  assert np.all(np.asarray(jacobian) == 0.0)
  other = support_residuals(jnp.asarray(rng.normal(size=(1, 2, p)) * 100))
  np.testing.assert_array_equal(np.asarray(other), np.asarray(support_residuals(jnp.asarray(xq))))


def test_jit_vmap_and_grad_through_the_compiled_forward():
  case = problems.TEST_CASES[6]
  phi, y, query, ridge = _arrays(case)
  num_steps = 5
  compiled = _compiled(case.num_support, case.feature_dim, num_steps, ridge, "prefix", "dual")
  batch = (np.stack([phi, phi[::-1]]), np.stack([y, -y]), np.stack([query, query]))
  eager = compiled.predict(*batch)
  np.testing.assert_allclose(jax.jit(compiled.predict)(*batch), eager, rtol=1e-12)
  mapped = jax.vmap(lambda a, b, c: compiled.predict(a[None], b[None], c[None])[0])(*batch)
  np.testing.assert_allclose(mapped, eager, rtol=1e-12)
  # CG's prediction is a rational function of y; its gradient matches the reference's.
  grad = jax.grad(lambda yy: compiled.predict(phi[None], yy[None], query[None]).sum())(jnp.asarray(y))
  ref_grad = jax.grad(lambda yy: solvers.cg_predict(phi, yy, query, ridge, num_steps)[-1].sum())(
      jnp.asarray(y))
  np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-8 * np.abs(ref_grad).max())


def test_many_queries_and_batches():
  k, p = 6, 4
  compiled = _compiled(k, p, k, 0.3, "causal", "dual")
  rng = np.random.default_rng(3)
  xs, ys, xq = rng.normal(size=(3, k, p)), rng.normal(size=(3, k)), rng.normal(size=(3, 7, p))
  got = compiled.predict(xs, ys, xq)
  want = solvers.krr_predict(xs, ys, xq, 0.3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())


class TestBadInput:

  def test_ridge(self):
    for ridge in (0.0, -1.0, float("nan"), float("inf")):
      with pytest.raises(ValueError, match="ridge"):
        kcg.compile_cg(4, 2, 2, ridge)

  def test_num_steps_and_sizes(self):
    with pytest.raises(ValueError, match="num_steps"):
      kcg.compile_cg(4, 2, -1, 0.1)
    with pytest.raises(ValueError, match="num_support"):
      kcg.compile_cg(0, 2, 1, 0.1)
    with pytest.raises(ValueError, match="feature_dim"):
      kcg.compile_cg(4, 0, 1, 0.1)

  def test_options(self):
    with pytest.raises(ValueError, match="mask"):
      kcg.compile_cg(4, 2, 1, 0.1, mask="bidirectional")
    with pytest.raises(ValueError, match="form"):
      kcg.compile_cg(4, 2, 1, 0.1, form="normal")
    with pytest.raises(ValueError, match="attention"):
      kcg.compile_cg(4, 2, 1, 0.1, attention="cosine")
    with pytest.raises(ValueError, match="features"):
      kcg.compile_cg(4, 2, 1, 0.1, features="fourier")

  def test_mask_that_cannot_carry_the_construction(self):
    with pytest.raises(ValueError, match="causal mask support i cannot read"):
      kcg.compile_cg(4, 2, 1, 0.1, mask="causal", form="dual", state_placement="support")

  def test_prompt_that_does_not_match(self):
    compiled = _compiled(4, 2, 1, 0.1, "prefix", "dual")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_support=4"):
      compiled.predict(rng.normal(size=(1, 5, 2)), rng.normal(size=(1, 5)), rng.normal(size=(1, 1, 2)))
    with pytest.raises(ValueError, match="input_dim=2"):
      compiled.predict(rng.normal(size=(1, 4, 3)), rng.normal(size=(1, 4)), rng.normal(size=(1, 1, 3)))
    with pytest.raises(ValueError, match="y_support"):
      compiled.predict(rng.normal(size=(1, 4, 2)), rng.normal(size=(1, 3)), rng.normal(size=(1, 1, 2)))
    bad = rng.normal(size=(1, 4))
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
      compiled.predict(rng.normal(size=(1, 4, 2)), bad, rng.normal(size=(1, 1, 2)))


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_random_relu_features_computed_by_the_first_layer(form, mask):
  """features='random_relu': one ReLU layer computes phi; the rest is CG on phi."""
  k, m, d, num_steps, ridge = 10, 12, 3, 8, 0.1
  feature_map = kcg.features.random_relu(m, bias_scale=0.5)
  params = feature_map.init(jax.random.key(0), d)
  rng = np.random.default_rng(0)
  xs, ys, xq = rng.normal(size=(k, d)), rng.normal(size=k), rng.normal(size=(3, d))
  compiled = kcg.compile_cg(k, m, num_steps, ridge, mask=mask, form=form, features="random_relu",
                            feature_params=params)
  got = np.asarray(compiled.predict_steps(xs[None], ys[None], xq[None])[0])
  phi, phi_q = np.asarray(feature_map.apply(params, xs)), np.asarray(feature_map.apply(params, xq))
  ref, spread = _rounding_spread(form, phi, ys, phi_q, ridge, num_steps)
  scale = np.abs(ref).max()
  assert np.all(np.abs(got - ref).max(-1) <= 1e-10 * scale + 30 * spread)
  assert compiled.config.num_layers == kcg.dimensions(k, m, num_steps, mask=mask, form=form).num_layers + 1


def test_random_relu_features_bad_params():
  params = kcg.features.random_relu(6).init(jax.random.key(0), 3)
  with pytest.raises(ValueError, match="feature_params"):
    kcg.compile_cg(4, 6, 2, 0.1, features="random_relu")
  with pytest.raises(ValueError, match="feature_dim=5"):
    kcg.compile_cg(4, 5, 2, 0.1, features="random_relu", feature_params=params)
  with pytest.raises(ValueError, match="input_dim=4"):
    kcg.compile_cg(4, 6, 2, 0.1, features="random_relu", feature_params=params, input_dim=4)
  with pytest.raises(ValueError, match="only used"):
    kcg.compile_cg(4, 6, 2, 0.1, feature_params=params)
