"""The shared block builders (kcg._src.blocks) and the IR (kcg._src.craft), each run alone in NumPy.

`craft.apply` runs one block on a residual stream [T, D] with an attention mask, without the model
class, as tracr's chamber tests run their blocks; `tests/test_structure.py` checks that it agrees
with the NNX layer on every block of every compiled construction. Tokens here are laid out as in
prompts: supports, the aggregator, queries.

Tolerances. Linear and product units are exact (relu(x) - relu(-x) = x, relu(a) b + relu(-a)(-b)
= a b: one term is exactly 0). Sums over tokens and over the reciprocal's units round like any
float64 sum of non-negative terms (a few eps relative); 4 Newton steps after the 4.2%-accurate guess
leave only rounding, <= 4 eps as in tests/test_reciprocal.py.
"""

import numpy as np
import pytest

from kcg._src import blocks as B
from kcg._src import craft
from kcg._src import model as model_lib
from kcg._src import reciprocal as recip
from kcg._src.ops import Construction, Op, Transform

EPS = np.finfo(np.float64).eps
K, Q = 5, 2  # supports, queries; the aggregator is token K
T = K + 1 + Q
SPEC = recip.default_spec(np.float64)


def _mask(kind="prefix"):
  return np.asarray(model_lib.attention_mask(T, kind, K + 1))


def _layout(*channels):
  return craft.ResidualLayout(tuple(channels) + tuple(B.flag_channels()))


def _stream(layout, rng, **values):
  """h [T, D] with the role flags set and `values[name]` ([T] or [T, size]) in their channels."""
  h = np.zeros((T, layout.width))
  h[:K, layout.slice("is_support")] = 1
  h[K, layout.slice(B.AGGREGATOR)] = 1
  h[K + 1:, layout.slice("is_query")] = 1
  for name, value in values.items():
    h[:, layout.slice(name)] = np.asarray(value).reshape(T, -1)
  return h


def test_linear_and_product_units_are_exact():
  layout = _layout(("a", 3), ("b", 3), ("out", 3), ("dot", 1))
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(T, 3)), rng.normal(size=(T, 3))
  h = _stream(layout, rng, a=a, b=b)
  block = craft.Block("units", Op.MOVE, units=(
      craft.linear_units(layout, "a", [("out", 2.0), ("a", -1.0)]),
      craft.product_units(layout, "a", "b", [("out", 1.0)], op=Op.UPDATE),
      craft.product_units(layout, "a", "b", [("dot", 1.0)], reduce=True, op=Op.UPDATE)))
  got = craft.apply(layout, block, h, _mask())
  np.testing.assert_array_equal(got[:, layout.slice("a")], 0.0)  # cleared exactly
  np.testing.assert_array_equal(got[:, layout.slice("out")], 2.0 * a + a * b)
  np.testing.assert_allclose(got[:, layout.slice("dot")][:, 0], np.sum(a * b, -1), rtol=4 * EPS)


def test_reduction_and_broadcast_heads_read_the_right_tokens():
  """A head queried by the aggregator flag sums over the supports; a head keyed on the aggregator
  flag brings the aggregator's value to every token that reads it."""
  layout = _layout(("u", 1), ("v", 1), ("sum", 1), ("g", 1), ("g_local", 1))
  rng = np.random.default_rng(1)
  u, v = np.zeros(T), np.zeros(T)  # support-held channels, as in every program's layout
  u[:K], v[:K] = rng.normal(size=K), rng.normal(size=K)
  g = np.zeros(T)
  g[K] = 3.0
  h = _stream(layout, rng, u=u, v=v, g=g)
  block = craft.Block("heads", Op.MOVE, heads=(
      B.reduce_over_supports("u", "v", [("sum", 2.0)], "2 u.v", Op.CURVATURE),
      craft.Head((("is_support", 1.0), ("is_query", 1.0)), ((B.AGGREGATOR, 1.0),),
                 (("g", 1.0),), (("g_local", 1.0),), "g to supports and queries", Op.BROADCAST)))
  for kind in ("prefix", "causal"):
    got = craft.apply(layout, block, h, _mask(kind))
    summed = got[:, layout.slice("sum")][:, 0]
    np.testing.assert_allclose(summed[K], 2 * u[:K] @ v[:K], rtol=4 * EPS)
    np.testing.assert_array_equal(np.delete(summed, K), 0.0)
    g_local = got[:, layout.slice("g_local")][:, 0]
    # Under the causal mask supports cannot read the aggregator (it comes after them).
    readers = slice(K + 1, T) if kind == "causal" else np.r_[0:K, K + 1:T]
    np.testing.assert_array_equal(g_local[readers], 3.0)
    np.testing.assert_array_equal(g_local[K], 0.0)


def test_support_matvec_heads():
  p = 3
  layout = _layout(("phi_support", p), ("phi_query", p), ("p", 1), ("Kp", 1), ("kq_p", 1))
  rng = np.random.default_rng(2)
  phi = np.zeros((T, p))
  phi[:K] = rng.normal(size=(K, p))
  phi_q = np.zeros((T, p))
  phi_q[K + 1:] = rng.normal(size=(Q, p))
  direction = np.zeros(T)
  direction[:K] = rng.normal(size=K)
  h = _stream(layout, rng, phi_support=phi, phi_query=phi_q, p=direction)
  block = craft.Block("mat-vec", Op.MATVEC, heads=B.support_matvec_heads())
  got = craft.apply(layout, block, h, _mask())
  np.testing.assert_allclose(got[:K, layout.slice("Kp")][:, 0], phi[:K] @ phi[:K].T @ direction[:K],
                             rtol=1e-14)
  np.testing.assert_allclose(got[K + 1:, layout.slice("kq_p")][:, 0],
                             phi_q[K + 1:] @ phi[:K].T @ direction[:K], rtol=1e-14)
  assert [h.op for h in block.heads] == [Op.MATVEC, Op.QUERY_MATVEC]


def test_aggregator_reciprocal_guess_and_newton_heads():
  """guess_units then spec.newton_steps layers of newton_heads: 1/s at the aggregator, over every
  decade of the range; nothing is written at the other tokens."""
  layout = _layout(("s", 1), ("x", 1))
  rng = np.random.default_rng(3)
  guess = craft.Block("guess", Op.GUESS, units=(B.guess_units("s", "x", SPEC),))
  newton = craft.Block("newton", Op.NEWTON, heads=B.newton_heads("x", "s"))
  for s in np.exp(rng.uniform(np.log(SPEC.low), np.log(SPEC.high), 50)):
    values = np.zeros(T)
    values[K] = s
    h = craft.apply(layout, guess, _stream(layout, rng, s=values), _mask("causal"))
    x = h[:, layout.slice("x")][:, 0]
    np.testing.assert_allclose(x[K], recip.guess(SPEC, s), rtol=1e-13)
    np.testing.assert_array_equal(np.delete(x, K), 0.0)
    for _ in range(SPEC.newton_steps):
      h = craft.apply(layout, newton, h, _mask("causal"))
    x = h[:, layout.slice("x")][:, 0]
    assert abs(1 - s * x[K]) <= 4 * EPS, s
    np.testing.assert_array_equal(np.delete(x, K), 0.0)


def test_token_reciprocal_blocks_invert_at_every_token_of_a_role():
  """Per-token division with gated MLP units (the Jacobi preconditioner's 1/d_i): the guess, then
  two layers per Newton step; the other roles hold s = 0 and get exactly 0."""
  layout = _layout(("s", 1), ("x", 1), ("scratch", 1))
  rng = np.random.default_rng(4)
  s = np.zeros(T)
  s[:K] = np.exp(rng.uniform(-20, 20, K))
  h = _stream(layout, rng, s=s)
  blocks = B.token_reciprocal_blocks(layout, "s", "x", "scratch", "is_support", SPEC, "test:")
  assert [b.op for b in blocks] == [Op.GUESS] + [Op.NEWTON] * (2 * SPEC.newton_steps)
  for block in blocks:
    h = craft.apply(layout, block, h, _mask())
  x = h[:, layout.slice("x")][:, 0]
  np.testing.assert_allclose(s[:K] * x[:K], 1.0, rtol=0, atol=4 * EPS)
  np.testing.assert_array_equal(x[K:], 0.0)
  np.testing.assert_array_equal(h[:, layout.slice("scratch")], 0.0)


def test_scalar_blocks_form_gamma_and_beta_at_the_aggregator():
  """The CG step's scalar machinery: 1/pAp and 1/rr by Newton, gamma = rr/pAp, rr cleared once
  consumed (in the update layer), then beta = rr_next/rr with rr <- rr_next; every consumed
  channel is cleared exactly."""
  layout = _layout(*B.scalar_channels())
  rng = np.random.default_rng(5)
  rr, p_ap, rr_next = 2.5e-7, 4.0e3, 1.5e-9
  values = {name: np.zeros(T) for name in B.SCALARS}
  values["rr"][K], values["pAp"][K], values["rr_next"][K] = rr, p_ap, rr_next
  values["inv_rr"][K] = recip.guess(SPEC, rr)
  values["inv_pAp"][K] = recip.guess(SPEC, p_ap)
  h = _stream(layout, rng, **values)
  update = craft.Block("update", Op.UPDATE, heads=B.after_update_heads())
  for block in B.scalar_blocks(SPEC, "cg") + [update, B.beta_block("cg")]:
    h = craft.apply(layout, block, h, _mask("causal"))
  at = lambda name: h[K, layout.slice(name)][0]
  np.testing.assert_allclose(at("gamma"), rr / p_ap, rtol=8 * EPS)
  np.testing.assert_allclose(at("beta"), rr_next / rr, rtol=8 * EPS)
  assert at("rr") == rr_next and at("rr_next") == 0.0
  assert at("pAp") == 0.0 and at("inv_pAp") == 0.0 and at("inv_rr") == 0.0
  np.testing.assert_array_equal(np.delete(h, K, axis=0)[:, :layout.slice("is_support").start], 0.0)


def test_blocks_check_their_spaces_when_built():
  layout = _layout(("a", 2), ("b", 1))
  good = craft.Block("ok", Op.MOVE, units=(craft.linear_units(layout, "a", [("a", -1.0)]),))
  craft.check_block(layout, good)
  missing = craft.Block("missing", Op.MOVE, heads=(
      B.at_aggregator("c", [("b", 1.0)], "reads a channel the layout lacks"),))
  with pytest.raises(ValueError, match="does not fit its layout.*'c'"):
    craft.check_block(layout, missing)
  wrong_size = craft.Block("wrong", Op.MOVE, heads=(
      craft.Head((("a", np.ones((3, 1))),), ((B.AGGREGATOR, 1.0),), (("b", 1.0),), (("b", 1.0),),
                 "a [3, 1] on a 2-wide channel", Op.MOVE),))
  with pytest.raises(ValueError, match="does not fit its layout"):
    craft.check_block(layout, wrong_size)
  with pytest.raises(ValueError, match="does not fit its layout"):
    craft.looped_program(Construction.SUPPORT_STATE, layout, (), [missing], [], 0, {}, None)


def test_apply_rejects_what_it_cannot_run():
  layout = _layout(("a", 1))
  block = craft.Block("b", Op.MOVE)
  with pytest.raises(ValueError, match=r"h must have shape \[..., T, 4\]"):
    craft.apply(layout, block, np.zeros((T, 5)), _mask())
  with pytest.raises(ValueError, match="mask must have shape"):
    craft.apply(layout, block, np.zeros((T, 4)), np.ones((T, T + 1), bool))
  with pytest.raises(ValueError, match="attention='cosine'"):
    craft.apply(layout, block, np.zeros((T, 4)), _mask(), attention="cosine")


def test_looped_program_schedule_and_names():
  layout = _layout(("a", 1))
  init = [craft.Block("init", Op.INIT)]
  step = [craft.Block("one", Op.MATVEC), craft.Block("two", Op.UPDATE)]
  program = craft.looped_program(Construction.SUPPORT_STATE, layout, (), init, step, 3, {}, None)
  assert program.schedule == (0, 1, 2, 1, 2, 1, 2) and program.step_ends == (1, 3, 5, 7)
  assert [program.layer_block(l).op for l in program.step_layers(1)] == [Op.MATVEC, Op.UPDATE]
  assert program.step_blocks(2) == tuple(step) and program.init_blocks == tuple(init)
  assert craft.layer_names(program)[3] == "step[1] one"
  program = program._replace(transforms=((Transform.OUTPUTS, 2), (Transform.PROJECTION, 3),
                                         (Transform.NORM_PINS, 0)))
  assert program.name == "support_state x2 outputs+rank3+prenorm"
