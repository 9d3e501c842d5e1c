"""The CG compiler's own properties beyond the construction table.

The table-driven properties (matches the reference, structure, no leakage, bad input, rescaled
prompts) run on every construction in tests/test_matches_reference.py and its siblings (see
tests/construction_table.py). Here: the state in named channels, a sudden drop of the residual,
the theorem's bound, float32, the documented sizes, jit/vmap/grad and batches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kcg
from kcg import problems
from kcg import solvers

CONSTRUCTIONS = [("dual", "prefix"), ("dual", "causal"), ("primal", "causal")]


def _arrays(case):
  prob = case.problem(jnp.float64)
  return tuple(np.asarray(a) for a in (prob.phi_support, prob.y_support, prob.phi_query)) + (
      float(prob.ridge),)


@functools.lru_cache(maxsize=None)
def _compiled(k, p, t, ridge, mask, form):
  return kcg.compile_cg(k, p, t, ridge, mask=mask, form=form)


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


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_depth_and_width_are_the_documented_functions(form, mask):
  for k, p, t in [(4, 2, 0), (4, 2, 3), (16, 8, 5), (8, 32, 2)]:
    dims = kcg.dimensions(k, p, t, mask=mask, form=form)
    compiled = _compiled(k, p, t, 0.1, mask, form)
    assert compiled.config.num_layers == dims.num_layers == dims.init_layers + t * dims.layers_per_step
    assert compiled.config.width == dims.width
    assert compiled.config.num_heads == dims.num_heads
    assert compiled.config.mlp_hidden == dims.mlp_hidden
    if t:  # what the built model has, per step
      assert (compiled.config.num_layers - dims.init_layers) / t == dims.layers_per_step
    # Channels: features, solver vectors, y and f, 8 scalars, 3 flags (see programs.py).
    # A step: the mat-vec (aggregator dual: u, then Kp), pAp (+ guess), 4 Newton steps
    # (reciprocal.default_spec), the update, r.r (+ guess), p = r + beta p_prev.
    if form == "primal":
      assert dims.width == 7 * p + 2 + 8 + 3  # phi_s, phi_q, w, r, p, p_prev, Ap
      assert dims.layers_per_step == 5 + 4
    elif mask == "prefix":
      assert dims.width == 2 * p + 8 + 8 + 3  # y alpha r p Kp p_prev kq_p f, one each
      assert dims.layers_per_step == 5 + 4
    else:
      assert dims.width == 3 * p + 6 * k + 2 + 8 + 3  # phi_s phi_q u; position alpha r p p_prev Kp
      assert dims.layers_per_step == 6 + 4


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_carried_matvec_depth_and_width(form, mask):
  """carry_matvec=True: 4 + 4 layers per step, one carried channel more (Kp_prev, u_prev, Ap_prev)."""
  for k, p, t in [(4, 2, 0), (16, 8, 3)]:
    dims = kcg.dimensions(k, p, t, mask=mask, form=form, carry_matvec=True)
    compiled = kcg.compile_cg(k, p, t, 0.1, mask=mask, form=form, carry_matvec=True)
    assert compiled.config.num_layers == dims.num_layers == dims.init_layers + t * dims.layers_per_step
    assert compiled.config.width == dims.width
    assert dims.layers_per_step == 4 + 4
    if form == "primal":
      assert dims.width == 8 * p + 2 + 8 + 3
    elif mask == "prefix":
      assert dims.width == 2 * p + 9 + 8 + 3
    else:
      assert dims.width == 4 * p + 6 * k + 2 + 8 + 3


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


def test_jit_works_on_the_first_call_in_a_new_dtype():
  """The per-dtype model is built on first use; built inside a trace it would hold tracers.

  A fresh model sees float32 prompts first under jax.jit (both entry points), then eagerly and
  under jit again: every call must give the eager answer (a model cached from the first trace
  raises UnexpectedTracerError).
  """
  k, p, t = 5, 3, 4
  rng = np.random.default_rng(3)
  xs, xq = rng.normal(size=(2, k, p)).astype(np.float32), rng.normal(size=(2, 2, p)).astype(
      np.float32)
  ys = rng.normal(size=(2, k)).astype(np.float32)
  for method in ("predict", "predict_steps"):
    compiled = kcg.compile_cg(k, p, t, 0.3, mask="prefix", dtype=np.float64)
    run = getattr(compiled, method)
    first = jax.jit(run)(xs, ys, xq)
    eager = run(xs, ys, xq)
    assert first.dtype == eager.dtype == jnp.float32
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(jax.jit(lambda a, b, c: run(a, b, c))(xs, ys, xq), eager)
    leaves = jax.tree.leaves(compiled._assembled_for(np.float32).params)  # pylint: disable=protected-access
    assert not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def test_many_queries_and_batches():
  k, p = 6, 4
  compiled = _compiled(k, p, k, 0.3, "causal", "dual")
  rng = np.random.default_rng(3)
  xs, ys, xq = rng.normal(size=(3, k, p)), rng.normal(size=(3, k)), rng.normal(size=(3, 7, p))
  got = compiled.predict(xs, ys, xq)
  want = solvers.krr_predict(xs, ys, xq, 0.3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
