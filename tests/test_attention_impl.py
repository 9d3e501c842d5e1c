"""Linear attention: the associative forms equal the quadratic form, and `auto` picks them.

Tolerances. Quadratic and associative compute the same sums sum_j (q_i . k_j) v_j in different
orders (whole rows vs K^T V states, chunk by chunk), so they differ by reordering alone: at most
~n eps sum_j |q_i . k_j| |v_j| for n = T (dk + dv) terms per entry. Each check compares the
difference with that absolute-value sum ("scale"), with a factor 4 of margin over n eps:
float64 (eps 1.1e-16, n <= ~1e4) gives <= 5e-12 of the scale; float32 (eps 6e-8) gives 2e-3 in
the worst case of n, and in practice (errors of random sign grow like sqrt(n)) 1e-5 does.
"""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg._src import model as model_lib

HIGHEST = jax.lax.Precision.HIGHEST


def _qkv(seed, batch, heads, tokens, dk, dv, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, heads, tokens, d)), dtype)
               for d in (dk, dk, dv))


def _quadratic(q, k, v, allowed):
  scores = jnp.einsum("bhid,bhjd->bhij", q, k, precision=HIGHEST)
  return jnp.einsum("bhij,bhje->bhie", jnp.where(allowed, scores, 0.0), v, precision=HIGHEST)


def _scale(q, k, v, allowed):
  """sum_j |q_i . k_j| |v_j| over the allowed j: the size of the rounding of any summation order."""
  scores = jnp.abs(jnp.einsum("bhid,bhjd->bhij", q, k, precision=HIGHEST))
  return jnp.einsum("bhij,bhje->bhie", jnp.where(allowed, scores, 0.0), jnp.abs(v),
                    precision=HIGHEST)


def _assert_reordering_close(got, want, scale, rel):
  assert got.shape == want.shape
  err = np.abs(np.asarray(got) - np.asarray(want))
  bound = rel * np.asarray(scale) + 1e-300
  assert np.all(err <= bound), f"max err/scale {np.max(err / bound) * rel:.3g} > {rel:g}"


# (T, chunk) pairs: T a multiple of the chunk, T not a multiple, T smaller than one chunk, T = 1.
CAUSAL_CASES = [(64, 16), (67, 16), (5, 64), (1, 8), (300, None)]


@pytest.mark.parametrize("num_tokens,chunk", CAUSAL_CASES)
@pytest.mark.parametrize("heads,dk,dv", [(1, 4, 4), (3, 8, 2), (2, 5, 1)])
def test_causal_associative_equals_quadratic_float64(num_tokens, chunk, heads, dk, dv):
  q, k, v = _qkv(num_tokens + dk, 2, heads, num_tokens, dk, dv)
  allowed = model_lib.attention_mask(num_tokens, "causal", None)
  got = model_lib._causal_associative(q, k, v, HIGHEST, chunk)
  _assert_reordering_close(got, _quadratic(q, k, v, allowed), _scale(q, k, v, allowed), 5e-12)


@pytest.mark.parametrize("num_tokens,num_prefix", [(10, 0), (10, 1), (10, 7), (10, 10), (33, 20)])
@pytest.mark.parametrize("heads,dk,dv", [(1, 4, 4), (3, 8, 1)])
def test_prefix_associative_equals_quadratic_float64(num_tokens, num_prefix, heads, dk, dv):
  q, k, v = _qkv(num_prefix, 2, heads, num_tokens, dk, dv)
  allowed = model_lib.attention_mask(num_tokens, "prefix", num_prefix)
  got = model_lib._prefix_associative(q, k, v, num_prefix, HIGHEST)
  _assert_reordering_close(got, _quadratic(q, k, v, allowed), _scale(q, k, v, allowed), 5e-12)


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_associative_float32_within_stated_tolerance(mask):
  t, p = 300, 200
  q, k, v = _qkv(1, 2, 2, t, 16, 16, dtype=jnp.float32)
  allowed = model_lib.attention_mask(t, mask, p)
  if mask == "causal":
    got = model_lib._causal_associative(q, k, v, HIGHEST)
  else:
    got = model_lib._prefix_associative(q, k, v, p, HIGHEST)
  assert got.dtype == jnp.float32
  want = _quadratic(*(a.astype(jnp.float64) for a in (q, k, v)), allowed)
  scale = _scale(*(a.astype(jnp.float64) for a in (q, k, v)), allowed)
  _assert_reordering_close(got.astype(jnp.float64), want, scale, 1e-5)


def _config(mask, impl, **overrides):
  base = dict(token_dim=6, width=16, num_layers=3, num_heads=3, head_dim=5, value_dim=4,
              mlp_hidden=8, attention="linear", mask=mask, linear_attention_impl=impl,
              param_dtype=jnp.float64)
  base.update(overrides)
  return model_lib.ModelConfig(**base)


def _run(config, state, tokens, num_prefix, head_mask, layer_mask):
  graphdef = nnx.graphdef(model_lib.abstract_model(config))

  @jax.jit
  def forward(state, tokens, head_mask, layer_mask):
    return nnx.merge(graphdef, state)(tokens, num_prefix=num_prefix, return_residuals=True,
                                      head_mask=head_mask, layer_mask=layer_mask)
  return forward(state, tokens, head_mask, layer_mask)


@pytest.mark.parametrize("mask,num_tokens", [("causal", 70), ("causal", 300), ("prefix", 41)])
def test_transformer_associative_equals_quadratic_with_masks(mask, num_tokens):
  """Whole model, 3 layers, head and layer masks: outputs and residuals agree to float64 rounding.

  Three layers of width 16 with unit-scale weights amplify the attention's reordering error by
  at most the product of the layers' gains (~1e2 here); 1e-9 relative leaves a 10x margin.
  """
  quadratic = _config(mask, "quadratic")
  model = model_lib.Transformer(quadratic, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.standard_normal((2, num_tokens, 6)) / 4, jnp.float64)
  head_mask = jnp.asarray([[1.0, 0.0, 1.0], [0.5, 1.0, 1.0], [1.0, 1.0, 0.0]], jnp.float64)
  layer_mask = jnp.asarray([1.0, 0.0, 1.0], jnp.float64)
  num_prefix = num_tokens - 3
  want = _run(quadratic, state, tokens, num_prefix, head_mask, layer_mask)
  for impl in ("associative", "auto"):
    got = _run(dataclasses.replace(quadratic, linear_attention_impl=impl), state, tokens,
               num_prefix, head_mask, layer_mask)
    scale = float(jnp.max(jnp.abs(want.residuals)))
    np.testing.assert_allclose(got.residuals, want.residuals, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(got.outputs, want.outputs, rtol=0,
                               atol=1e-9 * float(jnp.max(jnp.abs(want.outputs))))


def test_gradients_agree():
  """The associative forms are differentiable and give the quadratic form's gradients."""
  config = _config("causal", "quadratic", num_layers=2)
  model = model_lib.Transformer(config, rngs=nnx.Rngs(1))
  params = nnx.state(model)
  tokens = jnp.asarray(np.random.default_rng(1).standard_normal((2, 70, 6)) / 4, jnp.float64)

  def grad(impl):
    graphdef = nnx.graphdef(model_lib.abstract_model(
        dataclasses.replace(config, linear_attention_impl=impl)))

    def loss(params):
      return jnp.sum(jnp.square(nnx.merge(graphdef, params)(tokens).outputs))
    return jax.jit(jax.grad(loss))(params)

  want = grad("quadratic")
  got = grad("associative")
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(w))))


def test_auto_resolution():
  """auto: associative for prefix at every length; for causal above the measured crossover."""
  threshold = model_lib._AUTO_CAUSAL_MIN_TOKENS
  assert model_lib._resolved_linear_impl("auto", "prefix", 2) == "associative"
  assert model_lib._resolved_linear_impl("auto", "prefix", 10_000) == "associative"
  assert model_lib._resolved_linear_impl("auto", "causal", threshold) == "quadratic"
  assert model_lib._resolved_linear_impl("auto", "causal", threshold + 1) == "associative"
  for impl in ("quadratic", "associative"):
    for mask in ("causal", "prefix"):
      assert model_lib._resolved_linear_impl(impl, mask, 5) == impl


def _float_intermediate_shapes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  shapes = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        aval = var.aval
        if hasattr(aval, "shape") and jnp.issubdtype(aval.dtype, jnp.floating):
          shapes.append(aval.shape)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return shapes


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_auto_never_forms_token_by_token_scores_at_large_t(mask):
  """With `auto` at T above the crossover no float array has two trailing axes of size T."""
  t = model_lib._AUTO_CAUSAL_MIN_TOKENS + 44
  config = _config(mask, "auto", num_layers=1, param_dtype=jnp.float32)
  model = model_lib.Transformer(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((1, t, 6), jnp.float32)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens, num_prefix=t - 2).outputs

  shapes = _float_intermediate_shapes(forward, state, tokens)
  assert shapes, "no intermediates found: the jaxpr walk is broken"
  assert not [s for s in shapes if len(s) >= 2 and s[-1] == t and s[-2] == t]
  quadratic = dataclasses.replace(config, linear_attention_impl="quadratic")
  graphdef_q, _ = nnx.split(model_lib.Transformer(quadratic, rngs=nnx.Rngs(0)))
  shapes_q = _float_intermediate_shapes(
      lambda s, x: nnx.merge(graphdef_q, s)(x, num_prefix=t - 2).outputs, state, tokens)
  assert [s for s in shapes_q if len(s) >= 2 and s[-1] == t and s[-2] == t]  # the check can fire


@pytest.mark.parametrize("form,mask", [("dual", "prefix"), ("primal", "causal")])
def test_compiled_forward_uses_associative_by_default_and_matches_quadratic(form, mask):
  """The timed compiled forwards: `auto` is associative at k = 300 (T > the causal crossover),
  and equals the quadratic form on the same weights (float64; the compiled CG is exact up to
  rounding, amplified by at most the condition number ~1e2 of these prompts: 1e-9 relative)."""
  k, p, t = 300, 4, 2
  compiled = kcg.compile_cg(k, p, t, 0.1, mask=mask, form=form, dtype=jnp.float64)
  assert compiled.config.linear_attention_impl == "auto"
  num_tokens = k + 2
  assert model_lib._resolved_linear_impl("auto", mask, num_tokens) == "associative"
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((2, k, p)) / 2
  ys = rng.standard_normal((2, k))
  xq = rng.standard_normal((2, 1, p)) / 2
  tokens, layout = compiled.encode(xs, ys, xq)
  graphdef, state = nnx.split(compiled.model)
  want_model = nnx.merge(nnx.graphdef(model_lib.abstract_model(
      dataclasses.replace(compiled.config, linear_attention_impl="quadratic"))), state)
  want = want_model(tokens, num_prefix=layout.num_prefix).outputs
  got = compiled.model(tokens, num_prefix=layout.num_prefix).outputs
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(want))))
  np.testing.assert_allclose(compiled.predict(xs, ys, xq),
                             kcg.prompt.query_outputs(layout, want), rtol=1e-9, atol=1e-12)


def test_prefix_associative_rejects_bad_num_prefix():
  q, k, v = _qkv(0, 1, 1, 4, 2, 2)
  with pytest.raises(ValueError, match="num_prefix"):
    model_lib._prefix_associative(q, k, v, 5, HIGHEST)
  with pytest.raises(ValueError, match="num_prefix"):
    model_lib._prefix_associative(q, k, v, None, HIGHEST)
