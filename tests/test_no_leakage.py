"""Property: no construction lets a query reach a support, and the attention mask itself holds.

Two checks, because either alone can pass for the wrong reason:

* The compiled model: every activation of the supports and the aggregator, at every layer, is
  bit for bit the same whatever the queries are (random, and scaled by 100), and (for one
  construction per mask here, every construction under -m slow) has an exactly zero Jacobian with
  respect to the query tokens. Compiled weights put no key on the query tokens, so this holds even
  without a mask; it shows that the construction reads nothing from the queries.
* The mask: a model of the same config (two layers) with random weights, keys everywhere, as
  nanodo tests causality. Token i's output has an exactly zero gradient with respect to every
  token the mask hides from it (causal: j > i; prefix: j outside the prefix, other than i itself)
  and a non-zero gradient with respect to the others. Replacing the mask with full attention
  fails here. One construction per (mask, attention, norm, MLP) kind in the fast suite.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import construction_table as table
from kcg._src import lowering
from kcg._src import model as model_lib

K, D, Q, T = 5, 3, 2, 2
RIDGE = 0.3


ENTRIES = list(table.ENTRIES)
# One per kind of attention code path the mask goes through: linear prefix / causal, softmax,
# pre-norm, gated MLP.
MASK_KINDS = ("cg/dual/prefix", "cg/dual/causal", "softmax/route_a", "prenorm/causal",
              "pcg/jacobi")


def _slow_unless(names):
  return [n if n in names else pytest.param(n, marks=pytest.mark.slow) for n in ENTRIES]


def _prefix_residuals(compiled, xs, ys):
  return lambda x_query: compiled.forward(xs, ys, x_query,
                                          return_residuals=True).residuals[:, :, :K + 1]


@pytest.mark.parametrize("name", ENTRIES)
def test_supports_never_read_the_queries(name):
  entry = table.ENTRIES[name]
  compiled = table.compiled(entry, K, D, T, RIDGE)
  xs, ys, xq = (jnp.asarray(a) for a in table.prompts(entry, K, D, Q, seed=0))
  prefix = _prefix_residuals(compiled, xs, ys)
  other = jnp.asarray(np.random.default_rng(5).normal(size=xq.shape))
  for moved in (100 * xq, other):
    np.testing.assert_array_equal(np.asarray(prefix(moved)), np.asarray(prefix(xq)))


@pytest.mark.parametrize("name", _slow_unless(("cg/dual/prefix", "cg/dual/causal")))
def test_supports_have_a_zero_jacobian_in_the_queries(name):
  entry = table.ENTRIES[name]
  compiled = table.compiled(entry, K, D, T, RIDGE)
  xs, ys, xq = (jnp.asarray(a) for a in table.prompts(entry, K, D, Q, seed=0))
  jacobian = jax.jacfwd(_prefix_residuals(compiled, xs, ys))(xq)
  assert np.all(np.asarray(jacobian) == 0.0)


def _random_model(config, seed):
  """The config with two layers and random weights (read weights ~ N(0, 1/fan_in))."""
  config = dataclasses.replace(config, num_layers=2, param_layers=None)
  rng = np.random.default_rng(seed)
  arrays = jax.tree.map(
      lambda s: rng.normal(size=s.shape) / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 1.0),
      model_lib.param_shapes(config))
  return lowering.assemble(config, arrays, jnp.float64)


def _may_read(mask: str, num_tokens: int, num_prefix: int) -> np.ndarray:
  """[T, T]: token i may read token j; written here, not taken from the model's code."""
  i, j = np.arange(num_tokens)[:, None], np.arange(num_tokens)[None, :]
  return (j <= i) if mask == "causal" else ((j < num_prefix) | (j == i))


def _dependence(model, tokens, num_prefix):
  """[T, T]: |d output_i / d token_j| summed over features (0 exactly where i cannot read j)."""
  def outputs(x):
    return model(x, num_prefix=num_prefix).outputs[0].sum(-1)  # [T]

  jacobian = jax.jacrev(outputs)(tokens)  # [T, 1, T, F]
  return np.abs(np.asarray(jacobian)).sum(axis=(1, 3))


@pytest.mark.parametrize("name", _slow_unless(MASK_KINDS))
def test_the_mask_hides_what_it_must_in_a_random_model_of_the_config(name):
  config = table.compiled(table.ENTRIES[name], K, D, T, RIDGE).config
  model = _random_model(config, seed=3)
  num_tokens, num_prefix = K + 1 + Q, K + 1
  tokens = jnp.asarray(np.random.default_rng(2).normal(size=(1, num_tokens, config.token_dim)))
  dependence = _dependence(model, tokens, num_prefix)
  assert np.all(np.isfinite(dependence))
  allowed = _may_read(config.mask, num_tokens, num_prefix)
  # Reads compose over layers: i depends on j if a chain of allowed reads links them. Both masks
  # are transitively closed, so the reachable set is the mask itself.
  np.testing.assert_array_equal(dependence[~allowed], 0.0)
  assert np.all(dependence[allowed] > 0), "a random model should read every token it may"
