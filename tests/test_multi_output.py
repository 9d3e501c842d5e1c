"""Multi-output KRR, (K + ridge I) A = Y with Y [k, r]: r independent CGs in one compiled model.

Every column following its own CG, convergence to multi-output KRR, block CG through compile_cg,
no leakage and bad requests run in the construction table (tests/construction_table.py, entries
"outputs/..." and "block/..."); here: each column's state in its channels, the shared mat-vec
head, and the other solvers with several outputs.
"""

import functools

import chex
import numpy as np
from flax import nnx

import kcg
from kcg import solvers
from kcg._src import multi_output

R = 2


@functools.lru_cache(maxsize=None)
def _compiled(k, p, t, ridge, num_outputs, items):
  return kcg.compile_cg(k, p, t, ridge, num_outputs=num_outputs, **dict(items))


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
