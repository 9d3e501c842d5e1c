"""The one model class: masks, shapes, dtypes, looped layers, head and layer masks, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg._src import model as model_lib


def _config(**kw):
  base = dict(token_dim=5, width=8, num_layers=2, num_heads=2, head_dim=3, mlp_hidden=6)
  base.update(kw)
  return kcg.ModelConfig(**base)


def _tokens(batch=2, num_tokens=7, dim=5, seed=0, dtype=np.float64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, num_tokens, dim)), dtype)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("norm", [None, "layernorm", "rmsnorm"])
def test_shapes_and_residuals(attention, norm):
  model = kcg.Transformer(_config(attention=attention, norm=norm, param_dtype=jnp.float64),
                          rngs=nnx.Rngs(0))
  out = model(_tokens(), return_residuals=True)
  assert out.outputs.shape == (2, 7, 1)
  assert out.residuals.shape == (3, 2, 7, 8)
  assert out.outputs.dtype == jnp.float64


def test_computes_in_the_dtype_of_the_tokens():
  model = kcg.Transformer(_config(param_dtype=jnp.float64), rngs=nnx.Rngs(0))
  assert model(_tokens(dtype=np.float32)).outputs.dtype == jnp.float32


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_mask_semantics_through_gradients(mask):
  """Token i's output depends on token j exactly when the mask allows it (any depth)."""
  num_prefix = 4
  model = kcg.Transformer(_config(mask=mask, num_layers=3, param_dtype=jnp.float64),
                          rngs=nnx.Rngs(1))
  tokens = _tokens(batch=1)
  jac = jax.jacfwd(lambda t: model(t, num_prefix=num_prefix).outputs[0, :, 0])(tokens)[:, 0]
  depends = np.abs(np.asarray(jac)).sum(-1) > 0  # [T_out, T_in]
  allowed = np.asarray(model_lib.attention_mask(7, mask, num_prefix))
  if mask == "causal":
    reach = allowed  # causal masks compose to themselves
  else:
    reach = allowed
  np.testing.assert_array_equal(depends, reach)


def test_prefix_mask_needs_a_prefix_length():
  model = kcg.Transformer(_config(mask="prefix", param_dtype=jnp.float64), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_prefix"):
    model(_tokens())


def test_head_and_layer_masks():
  config = _config(param_dtype=jnp.float64)
  model = kcg.Transformer(config, rngs=nnx.Rngs(0))
  tokens = _tokens()
  full = model(tokens, return_residuals=True)
  off = model(tokens, layer_mask=jnp.zeros(2), return_residuals=True)
  np.testing.assert_allclose(off.residuals[2], off.residuals[0])
  no_heads = model(tokens, head_mask=jnp.zeros((2, 2)))
  assert not np.allclose(no_heads.outputs, full.outputs)
  with pytest.raises(ValueError, match="head_mask"):
    model(tokens, head_mask=jnp.zeros((3, 2)))


def test_tied_and_scheduled_layers():
  tied = _config(tied_layers=True, num_layers=4)
  assert tied.num_param_layers == 1 and tied.layer_schedule == (0, 0, 0, 0)
  looped = _config(param_layers=(0, 1, 1, 1), num_layers=4)
  assert looped.num_param_layers == 2
  model = kcg.Transformer(looped, rngs=nnx.Rngs(0))
  assert model.blocks.query[...].shape[0] == 2
  with pytest.raises(ValueError, match="param_layers"):
    _config(param_layers=(0, 2), num_layers=2)
  with pytest.raises(ValueError, match="not both"):
    _config(param_layers=(0, 0), num_layers=2, tied_layers=True)


@pytest.mark.parametrize("field,value", [("num_layers", 0), ("width", -1), ("attention", "cosine"),
                                         ("norm", "batchnorm"), ("mask", "full"),
                                         ("mlp_hidden", -2), ("activation", "tanh")])
def test_bad_configs(field, value):
  with pytest.raises(ValueError, match=field):
    _config(**{field: value})


def test_bad_tokens():
  model = kcg.Transformer(_config(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens"):
    model(_tokens(dim=4))


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_attention_free_layers_are_token_wise(attention, mask):
  """Up to the last attention-free block, token i's residual does not depend on any other token:
  the Jacobian of residual l at token i with respect to token j != i is exactly 0 (not just small);
  after the first attention block it is not."""
  free = 2
  model = kcg.Transformer(_config(num_layers=4, attention_free_layers=free, attention=attention,
                                  mask=mask, norm="layernorm", param_dtype=jnp.float64),
                          rngs=nnx.Rngs(3))
  tokens = _tokens(batch=1)
  jac = jax.jacfwd(lambda t: model(t, num_prefix=4, return_residuals=True).residuals[:, 0])(tokens)
  depends = np.abs(np.asarray(jac[:, :, :, 0])).sum(axis=(2, 4)) > 0  # [L+1, T_out, T_in]
  eye = np.eye(tokens.shape[1], dtype=bool)
  for layer in range(free + 1):
    np.testing.assert_array_equal(depends[layer], eye, err_msg=f"layer {layer}")
  assert depends[free + 1].sum() > eye.sum()  # the first attention block mixes tokens
  # Mutation check: without the option the first block already mixes tokens.
  mixed = kcg.Transformer(_config(num_layers=4, attention=attention, mask=mask,
                                  param_dtype=jnp.float64), rngs=nnx.Rngs(3))
  jac = jax.jacfwd(lambda t: mixed(t, num_prefix=4, return_residuals=True).residuals[1, 0])(tokens)
  assert (np.abs(np.asarray(jac[:, :, 0])).sum(axis=(1, 2)) > 0).sum() > tokens.shape[1]


def test_attention_free_layers_validation():
  with pytest.raises(ValueError, match="attention_free_layers"):
    _config(num_layers=2, attention_free_layers=3)
  with pytest.raises(ValueError, match="attention_free_layers"):
    _config(num_layers=2, attention_free_layers=-1)
  with pytest.raises(ValueError, match="mlp_hidden > 0"):
    _config(num_layers=2, attention_free_layers=1, mlp_hidden=0)


def _forward_and_grads(model, tokens, head_mask, layer_mask, num_prefix):
  graphdef, state = nnx.split(model)

  def loss(state, head_mask):
    out = nnx.merge(graphdef, state)(tokens, num_prefix=num_prefix, head_mask=head_mask,
                                     layer_mask=layer_mask, return_residuals=True)
    weights = jnp.cos(jnp.arange(out.outputs.size, dtype=out.outputs.dtype))
    return jnp.sum(out.outputs.ravel() * weights) + 1e-3 * jnp.sum(out.residuals ** 2), out

  argnums = 0 if head_mask is None else (0, 1)
  (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(state, head_mask)
  return out, grads


@pytest.mark.parametrize("kw", [
    dict(attention="softmax", norm="layernorm", activation="gelu"),
    dict(attention="linear", mask="prefix", param_layers=(0, 1, 1, 2, 1), num_layers=5,
         attention_scale=0.1),
    dict(attention="linear", tied_layers=True, num_layers=3, activation="swiglu",
         attention_scale=0.1),
])
def test_unrolled_and_scanned_stacks_agree(kw, monkeypatch):
  """Short stacks run unrolled, long ones as a lax.scan: same outputs, residuals and gradients.

  float64 and the same operations, fused differently: the differences are reorderings of sums, so
  they are bounded relative to each array's largest entry (entries can cancel), by a few eps64
  times the depth and the fan-in: 1e-12 x max |array|.
  """
  config = _config(param_dtype=jnp.float64, **kw)
  model = kcg.Transformer(config, rngs=nnx.Rngs(3))
  tokens = _tokens(num_tokens=7)
  rng = np.random.default_rng(1)
  head_mask = jnp.asarray(rng.uniform(size=(config.num_layers, config.num_heads)))
  layer_mask = jnp.asarray(rng.uniform(size=(config.num_layers,)))
  args = (model, tokens, head_mask, layer_mask, 4)
  assert config.num_layers <= model_lib._MAX_UNROLLED_LAYERS
  unrolled = _forward_and_grads(*args)
  jaxpr = str(jax.make_jaxpr(lambda t: model(t, num_prefix=4).outputs)(tokens))
  assert "scan" not in jaxpr
  monkeypatch.setattr(model_lib, "_MAX_UNROLLED_LAYERS", 0)
  assert "scan" in str(jax.make_jaxpr(lambda t: model(t, num_prefix=4).outputs)(tokens))
  scanned = _forward_and_grads(*args)
  for got, want in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
    scale = np.max(np.abs(want))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale)


def test_absent_masks_equal_masks_of_ones():
  model = kcg.Transformer(_config(param_dtype=jnp.float64, num_layers=3), rngs=nnx.Rngs(0))
  tokens = _tokens()
  ones = model(tokens, head_mask=jnp.ones((3, 2)), layer_mask=jnp.ones(3)).outputs
  np.testing.assert_allclose(model(tokens).outputs, ones, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("mask", ["causal", "prefix"])
def test_softmax_normalised_after_the_value_product_equals_softmax_first(mask):
  """precision="default" divides exp(S - m) V by the row sums; "highest" applies jax.nn.softmax
  first. float64 on CPU (both precisions are exact float64 matmuls): the same quotient up to
  reordering, ~1e-16 relative measured; 1e-12 x max |array| for outputs and gradients."""
  results = []
  for precision in ("highest", "default"):
    config = _config(attention="softmax", norm="layernorm", mask=mask, num_layers=3,
                     precision=precision, param_dtype=jnp.float64)
    model = kcg.Transformer(config, rngs=nnx.Rngs(4))
    tokens = 3.0 * _tokens(num_tokens=7)  # scores of order 10: the max shift matters
    results.append(_forward_and_grads(model, tokens, None, None, 4))
  for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.max(np.abs(want)))
