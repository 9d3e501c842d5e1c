"""Multi-output KRR, (K + ridge I) A = Y with Y [k, r]: r independent CGs in one compiled model.

Tolerances are those of test_compiler: the reference's own spread under eps-sized input
perturbations (`kcg.analysis.rounding_spread`) times 30, plus 1e-10 of the prediction scale. Each
column of the r-output model is the single-output model run on that column, up to the order of
floating-point sums in the shared (block-diagonal) heads.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import problems
from kcg import solvers
from kcg._src import multi_output

EPS64 = np.finfo(np.float64).eps
R = 2
CONSTRUCTIONS = [dict(mask="prefix"), dict(mask="causal"), dict(form="primal"),
                 dict(mask="prefix", preconditioner="jacobi")]
# The shared table's cases with k <= 16 (the k = 64 ones add compile time, not coverage here),
# each with one construction, rotating.
CASES = [(case, CONSTRUCTIONS[i % len(CONSTRUCTIONS)])
         for i, case in enumerate(problems.TEST_CASES) if case.num_support <= 16]


def _reference(kw):
  if kw.get("form") == "primal":
    return solvers.primal_cg_predict
  if kw.get("preconditioner") == "jacobi":
    return solvers.pcg_predict
  return solvers.cg_predict


def _problem(case, num_outputs=R):
  prob = case.problem(jnp.float64)
  phi, y, query = (np.asarray(a) for a in (prob.phi_support, prob.y_support, prob.phi_query))
  rng = np.random.default_rng(case.seed)
  extra = rng.normal(size=y.shape + (num_outputs - 1,)) * max(np.abs(y).max(), 1.0)
  return phi, np.concatenate([y[:, None], extra], axis=-1), query, float(prob.ridge)


@functools.lru_cache(maxsize=None)
def _compiled(k, p, t, ridge, num_outputs, items):
  return kcg.compile_cg(k, p, t, ridge, num_outputs=num_outputs, **dict(items))


def _case_id(pair):
  case, kw = pair
  return f"{case.name}-{'-'.join(str(v) for v in kw.values())}"


@pytest.mark.parametrize("pair", CASES, ids=_case_id)
def test_every_column_follows_its_own_cg(pair):
  case, kw = pair
  phi, Y, query, ridge = _problem(case)
  k, p = case.num_support, case.feature_dim
  t = (p if kw.get("form") == "primal" else k) + 2
  compiled = _compiled(k, p, t, ridge, R, tuple(sorted(kw.items())))
  got = np.asarray(compiled.predict_steps(phi[None], Y[None], query[None]))[0]
  assert got.shape == (t + 1, case.num_query, R)
  assert np.all(np.isfinite(got))
  # The reference solvers take Y [k, r] too (one CG per column): the same trajectories.
  multi_ref = np.asarray(_reference(kw)(phi, Y, query, ridge, t))
  for column in range(R):
    ref, spread = kcg.analysis.rounding_spread(_reference(kw), phi, Y[:, column], query, ridge, t)
    scale = max(np.abs(ref).max(), np.abs(Y[:, column]).max() * 1e-12, 1e-300)
    tolerance = 1e-10 * scale + 30 * spread
    err = np.abs(got[..., column] - ref).max(-1)
    assert np.all(err <= tolerance), (column, err / scale, spread / scale)
    assert np.all(np.abs(multi_ref[..., column] - ref).max(-1) <= tolerance)


@pytest.mark.parametrize("kw", CONSTRUCTIONS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_converged_prediction_is_multi_output_krr(kw):
  """At convergence the r columns equal closed-form KRR with Y, (K + ridge I)^{-1} Y, by Cholesky."""
  rng = np.random.default_rng(1)
  k, p, q, ridge, r = 8, 5, 3, 0.3, 3
  phi, Y, query = rng.normal(size=(k, p)), rng.normal(size=(k, r)), rng.normal(size=(q, p))
  t = 3 * (p if kw.get("form") == "primal" else k)  # well past n: CG has converged to rounding
  compiled = _compiled(k, p, t, ridge, r, tuple(sorted(kw.items())))
  got = np.asarray(compiled.predict(phi[None], Y[None], query[None]))[0]
  krr = np.asarray(solvers.krr_predict(phi, Y, query, ridge))
  assert got.shape == krr.shape == (q, r)
  # kappa(K + ridge I) <= 1 + ||Phi||^2 / ridge ~ 1e2 here: 1e-12 is ~50 eps kappa.
  np.testing.assert_allclose(got, krr, rtol=0, atol=1e-12 * np.abs(krr).max())


def test_state_channels_hold_each_columns_cg_state():
  rng = np.random.default_rng(2)
  k, p, t, ridge = 6, 4, 4, 0.5
  phi, Y, query = rng.normal(size=(k, p)), rng.normal(size=(k, R)), rng.normal(size=(2, p))
  compiled = _compiled(k, p, t, ridge, R, (("mask", "prefix"),))
  residuals = compiled.forward(phi[None], Y[None], query[None], return_residuals=True).residuals
  state = compiled.read_state(residuals)
  assert state.alpha.shape == (1, t + 1, k, R) and state.gamma.shape == (1, t, R)
  gram = phi @ phi.T + ridge * np.eye(k)
  for column in range(R):
    trace = solvers.cg(gram, Y[:, column], t)
    for name in ("alpha", "r", "p"):
      np.testing.assert_allclose(getattr(state, name)[0, ..., column], getattr(trace, name),
                                 rtol=0, atol=1e-12)
    np.testing.assert_allclose(state.gamma[0, :, column], trace.gamma, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state.beta[0, :, column], trace.beta, rtol=0, atol=1e-12)


def test_mat_vec_head_is_shared_and_depth_is_unchanged():
  k, p, t, r = 6, 4, 3, 3
  single = kcg.compile_cg(k, p, t, 0.5, mask="prefix")
  multi = kcg.compile_cg(k, p, t, 0.5, mask="prefix", num_outputs=r)
  assert multi.config.num_layers == single.config.num_layers
  assert multi.config.output_dim == r
  heads = [h.name for block in multi.program.blocks for h in block.heads]
  shared = [name for name in heads if "shared by" in name]
  assert any("(Kp)_i" in name for name in shared), shared
  # One mat-vec head for all outputs; every reduction is replicated per output.
  assert sum("(Kp)_i" in name for name in heads) == 1
  assert sum(name.startswith("p.Kp") for name in heads) == r
  assert multi.config.num_heads <= r * single.config.num_heads
  tainted = multi_output.per_output_channels(single.program)
  assert {"y", "alpha", "r", "p", "Kp", "f", "gamma", "beta"} <= tainted
  assert not {"phi_support", "phi_query", "is_support", "is_aggregator", "is_query"} & tainted
  # The parameter tree is the model class's own (structure and shapes).
  fresh = nnx.state(kcg.Transformer(multi.config, rngs=nnx.Rngs(0)), nnx.Param)
  chex.assert_trees_all_equal_shapes_and_dtypes(fresh, multi.params)


def test_no_leakage_from_queries_into_supports():
  rng = np.random.default_rng(3)
  k, p = 5, 3
  compiled = _compiled(k, p, 2, 0.5, R, (("mask", "prefix"),))
  xs, Y = jnp.asarray(rng.normal(size=(1, k, p))), jnp.asarray(rng.normal(size=(1, k, R)))

  def support_residuals(xq):
    out = compiled.forward(xs, Y, xq, return_residuals=True)
    return out.residuals[:, :, :k + 1]

  jac = jax.jacobian(support_residuals)(jnp.asarray(rng.normal(size=(1, 2, p))))
  assert np.all(np.asarray(jac) == 0.0)


def test_chebyshev_and_softmax_routes_take_several_outputs():
  rng = np.random.default_rng(4)
  k, p, q, ridge = 6, 3, 2, 0.5
  xs, Y, xq = rng.normal(size=(1, k, p)), rng.normal(size=(1, k, R)), rng.normal(size=(1, q, p))
  # Chebyshev has no reductions: columns agree to rounding (1e-13). Route A rescales by
  # exp(<phi_i, phi_j> / tau) and its normaliser; its CG steps amplify the different summation
  # order of the wider shared heads to ~2e-13 (measured), so 1e-11.
  for tolerance, make in (
      (1e-13, lambda r: kcg.compile_chebyshev(k, p, 6, ridge, eig_bounds=(ridge, 30.0),
                                              mask="causal", num_outputs=r)),
      (1e-11, lambda r: kcg.compile_cg(k, p, 4, ridge, mask="prefix", attention="softmax",
                                       kernel="exponential", temperature=2.0, num_outputs=r))):
    multi, single = make(R), make(1)
    got = np.asarray(multi.predict(xs, Y, xq))[0]
    for column in range(R):
      want = np.asarray(single.predict(xs, Y[..., column], xq))[0]
      np.testing.assert_allclose(got[:, column], want, rtol=0,
                                 atol=tolerance * np.abs(want).max())


def test_bad_outputs_raise():
  for bad in (0, -1, True, 1.5, "2"):
    with pytest.raises(ValueError, match="num_outputs must be a positive int"):
      kcg.compile_cg(4, 2, 1, 0.1, num_outputs=bad)
  with pytest.raises(ValueError, match="multi_output='chol' is not one of"):
    kcg.compile_cg(4, 2, 1, 0.1, num_outputs=2, multi_output="chol")
  with pytest.raises(ValueError, match="block CG"):
    kcg.compile_cg(4, 2, 1, 0.1, num_outputs=2, multi_output="block", mask="causal")
  compiled = _compiled(4, 2, 1, 0.1, R, (("mask", "prefix"),))
  with pytest.raises(ValueError, match="y_support must have shape"):
    compiled.predict(np.zeros((1, 4, 2)), np.zeros((1, 4, 3)), np.zeros((1, 1, 2)))


def test_block_cg_through_compile_cg_matches_reference_block_cg():
  """compile_cg(multi_output="block") is the block program (tests/test_block_cg.py checks it
  against the reference in depth); here: wiring, state shapes, and fewer steps than independent."""
  rng = np.random.default_rng(5)
  k, p, q, ridge, r, t = 8, 10, 2, 0.3, 2, 6
  phi, Y, query = rng.normal(size=(1, k, p)), rng.normal(size=(1, k, r)), rng.normal(size=(1, q, p))
  model = kcg.compile_cg(k, p, t, ridge, mask="prefix", num_outputs=r, multi_output="block")
  got = np.asarray(model.predict_steps(phi, Y, query))
  ref = np.asarray(solvers.block_cg_predict(phi, Y, query, ridge, t))
  assert got.shape == ref.shape == (1, t + 1, q, r)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
  krr = np.asarray(solvers.krr_predict(phi, Y, query, ridge))
  np.testing.assert_allclose(got[:, k // r + 1], krr, rtol=0, atol=1e-9 * np.abs(krr).max())
  state = model.read_state(model.forward(phi, Y, query, return_residuals=True).residuals)
  assert state.alpha.shape == (1, t + 1, k, r) and state.gamma.shape == (1, t, r, r)
