"""Property: every construction of the table is the model class's own structure, of the documented
size, and its blocks do what the model's layers do.

* Parameters: the same tree, shapes and dtypes as `kcg.Transformer`'s own state (its abstract
  state for every construction; a real init for a gated pre-norm one), assembled through NNX's
  state API.
* Size: `kcg.dimensions` (built from the programs alone) equals the compiled model's dimensions
  wherever it describes the construction (linear attention); a feature layer adds one layer, a
  projection S [m, p] gives the dimensions of feature_dim = m.
* Blocks: `craft.apply` (NumPy, no NNX) run on the residual stream before each layer gives the
  model's residual stream after it. The two differ only in the order of float64 sums, so by
  <= 64 eps of the larger of that channel's largest magnitude before or after the layer and the
  entry's sum of |terms| (a reduction such as (AP)^T R past convergence cancels to far below its
  terms; measured <= 2.1e-15 = 9.2 eps of the channel scale over the table), times 1 + sum_m |c_m| for softmax Route B, whose
  mat-vec subtracts Richardson-weighted sums ~ |c_m| times larger than their difference
  (c = (-300, 1200) at tau = 300, h = 2; measured 4.4e-13).
* Identity: the program records its construction and the transforms applied, and every head, unit
  group and block names an `Op`.
"""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import construction_table as table
import kcg
from kcg._src import craft
from kcg._src import model as model_lib
from kcg._src import softmax_programs
from kcg.ops import Construction, Op, Transform

K, D, Q, T = 5, 3, 2, 2
RIDGE = 0.3
EPS = np.finfo(np.float64).eps
ENTRIES = list(table.ENTRIES)


def _compiled(name):
  return table.compiled(table.ENTRIES[name], K, D, T, RIDGE)


@pytest.mark.parametrize("name", ENTRIES)
def test_parameters_are_the_model_classes_own(name):
  compiled = _compiled(name)
  entry = table.ENTRIES[name]
  assert isinstance(compiled.model, kcg.Transformer)
  own = nnx.state(model_lib.abstract_model(compiled.config), nnx.Param)
  chex.assert_trees_all_equal_structs(own, compiled.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(own, compiled.params)
  assert compiled.config.attention == entry.attention and compiled.config.mask == entry.mask
  gated = entry.solver in ("pcg", "block") or entry.attention == "softmax"
  assert compiled.config.activation == ("reglu" if gated else "relu")
  assert compiled.config.output_dim == entry.num_outputs


def test_parameters_equal_a_real_init_of_the_config():
  compiled = _compiled("prenorm/pcg")  # gated MLP, norm scales: every kind of parameter
  fresh = nnx.state(kcg.Transformer(compiled.config, rngs=nnx.Rngs(0)), nnx.Param)
  chex.assert_trees_all_equal_structs(fresh, compiled.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(fresh, compiled.params)


def _expected_dimensions(entry, num_steps):
  rank = table.feature_dim(entry, D)
  keys = ("mask", "form", "preconditioner", "num_outputs", "multi_output", "norm", "newton_steps",
          "carry_matvec")
  options = {key: entry.options[key] for key in keys if key in entry.options}
  return kcg.dimensions(K, rank, num_steps, **options)


@pytest.mark.parametrize("name", [n for n, e in table.ENTRIES.items() if e.dimensions or (
    e.features != "identity" and e.attention == "linear")])
def test_dimensions_agree_with_kcg_dimensions(name):
  entry = table.ENTRIES[name]
  compiled = _compiled(name)
  dims = _expected_dimensions(entry, T)
  got = compiled.dimensions
  assert got.num_layers == compiled.config.num_layers
  if entry.features == "random_relu":  # one more layer, the raw inputs in two more channels
    assert got.num_layers == dims.num_layers + 1 and got.width == dims.width + 2 * D
    assert (got.num_heads, got.head_dim, got.value_dim) == (dims.num_heads, dims.head_dim,
                                                            dims.value_dim)
  else:
    assert got == dims
  assert dims.num_layers == dims.init_layers + T * dims.layers_per_step


def _abs_terms(terms):
  return tuple((channel, np.abs(coef)) for channel, coef in terms)


def _term_magnitudes(layout, block, h, mask):
  """|h| plus, per entry, the sum of |terms| the layer adds there: what rounding is relative to."""
  abs_heads = tuple(head._replace(query=_abs_terms(head.query), key=_abs_terms(head.key),
                                  value=_abs_terms(head.value), output=_abs_terms(head.output))
                    for head in block.heads)
  magnitude = craft.apply(layout, block._replace(heads=abs_heads, units=()), np.abs(h), mask)
  after_heads = craft.apply(layout, block._replace(units=()), h, mask)
  for group in block.units:
    act = np.maximum(craft._read(layout, group.pre, after_heads, group.num_units), 0.0)  # pylint: disable=protected-access
    if group.value is not None:
      act = act * np.abs(craft._read(layout, group.value, after_heads, group.num_units))  # pylint: disable=protected-access
    for channel, coef in group.post:
      magnitude[..., layout.slice(channel)] += act @ np.abs(np.asarray(coef, np.float64))
  return magnitude


@pytest.mark.parametrize("name", ENTRIES)
def test_apply_agrees_with_the_model_on_every_block(name):
  compiled = _compiled(name)
  program = compiled.program
  xs, ys, xq = table.prompts(table.ENTRIES[name], K, D, Q, seed=0)
  residuals = np.asarray(compiled.forward(xs, ys, xq, return_residuals=True).residuals)[:, 0]
  mask = np.asarray(model_lib.attention_mask(residuals.shape[1], compiled.mask, K + 1))
  tolerance = 64 * EPS
  if compiled.attention == "softmax" and compiled.kernel == "linear":
    temperatures = [compiled.temperature * (i + 1) for i in range(compiled.temperature_heads)]
    weights = softmax_programs.richardson_weights(temperatures)
    tolerance *= 1 + np.sum(np.abs(weights * np.asarray(temperatures)))
  for layer in range(len(program.schedule)):
    block = program.layer_block(layer)
    before, after = residuals[layer], residuals[layer + 1]
    got = craft.apply(program.layout, block, before, mask, attention=compiled.attention)
    scale = np.maximum(np.abs(before).max(0), np.abs(after).max(0))
    if compiled.attention == "linear":
      scale = np.maximum(scale, _term_magnitudes(program.layout, block, before, mask))
    assert np.all(np.abs(got - after) <= tolerance * scale), (layer, block.name)


@pytest.mark.parametrize("name", ENTRIES)
def test_program_records_what_it_is(name):
  entry = table.ENTRIES[name]
  program = _compiled(name).program
  assert isinstance(program.construction, Construction)
  kinds = [kind for kind, _ in program.transforms]
  assert (Transform.OUTPUTS in kinds) == (entry.num_outputs > 1 and entry.solver != "block")
  assert (Transform.NORM_PINS in kinds) == ("norm" in entry.options)
  assert (Transform.RANDOM_RELU in kinds) == (entry.features == "random_relu")
  assert (Transform.PROJECTION in kinds) == (entry.features == "projection"
                                             and entry.attention == "linear")
  for block in program.blocks:
    assert isinstance(block.op, Op)
    assert all(isinstance(part.op, Op) for part in block.heads + block.units)
  state = program.state
  assert {"alpha", "r", "p"} <= set(state) and set(state).isdisjoint(program.baked)
  assert ("gamma" in program.baked) == (entry.solver == "chebyshev")


def test_float32_builds_agree_with_float64():
  """The float32 model is lowered from its own build, checked against the float64 one: only the
  reciprocal's table and the pins may differ (compiler.check_same_architecture)."""
  from kcg._src import compiler  # pylint: disable=g-import-not-at-top
  for name in ("softmax/route_b", "prenorm/causal", "block/r2"):
    compiled = _compiled(name)
    program32 = compiler.build_program(compiled.options, np.float32)
    compiler.check_same_architecture(compiled.program, program32)
    assert program32.reciprocal != compiled.program.reciprocal
    changed = compiled.program._replace(schedule=compiled.program.schedule[:-1])
    with pytest.raises(RuntimeError, match="differ in"):
      compiler.check_same_architecture(compiled.program, changed)
  x = np.random.default_rng(0).normal(size=(1, K, D)).astype(np.float32)
  got = _compiled("cg/dual/causal").predict(x, x[..., 0], x[:, :Q])
  assert got.dtype == jax.numpy.float32
