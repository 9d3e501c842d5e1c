"""What a CG step costs (kcg._src.step_cost): the FLOP count against the built model's own
parameter shapes, and BUILD.md's tables against the functions that compute them."""

import math
import pathlib

import numpy as np
import pytest

import kcg
from kcg import problems
from kcg import routes
from kcg import solvers
from kcg._src import model as model_lib
from kcg._src import reciprocal

BUILD_MD = pathlib.Path(__file__).resolve().parents[1] / "BUILD.md"
CONSTRUCTIONS = [("dual", "prefix"), ("dual", "causal"), ("primal", "causal")]
RATIOS = (1.5, 1.17, 1.05, 1.015)


@pytest.mark.parametrize("carry_matvec", [False, True])
@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_flops_count_the_built_models_own_parameters(form, mask, carry_matvec):
  """Per token and layer: 2 x (entries of every projection and MLP matrix), plus attention's
  2 T H (d_k + d_v); times the layers of one step, counted on the built model."""
  k, p, t, num_queries = 6, 3, 2, 2
  compiled = kcg.compile_cg(k, p, t, 0.1, mask=mask, form=form, carry_matvec=carry_matvec)
  dims = kcg.dimensions(k, p, t, mask=mask, form=form, carry_matvec=carry_matvec)
  config = compiled.config
  shapes = model_lib.param_shapes(config)["blocks"]
  per_layer = sum(2 * math.prod(shapes[name].shape[1:])
                  for name in ("query", "key", "value", "attn_out", "mlp_in", "mlp_out"))
  _, heads, _, head_dim = shapes["query"].shape
  value_dim = shapes["value"].shape[-1]
  num_tokens = k + 1 + num_queries
  per_layer += 2 * num_tokens * heads * (head_dim + value_dim)
  step_layers = (config.num_layers - dims.init_layers) // t
  assert step_layers == dims.layers_per_step
  assert routes.flops_per_token_per_step(dims, num_tokens) == step_layers * per_layer


def _table(heading_row: str) -> str:
  text = BUILD_MD.read_text()
  start = text.index(heading_row)
  lines = []
  for line in text[start:].splitlines():
    if not line.startswith("|"):
      break
    lines.append(line)
  return "\n".join(lines)


def test_build_md_construction_table_is_computed():
  want = routes.construction_table(16, 8)
  assert _table(want.splitlines()[0]) == want


def test_fewer_layers_and_flops_than_before():
  """Both steps against the previous constructions' 11 / 12 / 11 layers and their FLOPs (BUILD.md's
  "Before" line, the same function on the previous programs)."""
  before = {("dual", "prefix"): (11, 618_420), ("dual", "causal"): (12, 3_729_264),
            ("primal", "causal"): (11, 1_376_892)}
  for carry_matvec in (False, True):
    for row in routes.construction_costs(16, 8, carry_matvec=carry_matvec):
      layers, flops = before[(row.form, row.mask)]
      assert row.layers_per_step < layers
      assert row.flops_per_token_per_step < flops
      if carry_matvec:
        assert row.layers_per_step == 8


def test_build_md_trade_off_table_analytic_columns():
  """Units, guess error, Newton steps and layers are computed; the measured column is checked by
  the slow test below."""
  got = _table("| dtype | ratio | MLP units |").splitlines()[2:]
  assert len(got) == 2 * len(RATIOS)
  for line in got:
    cells = [c.strip() for c in line.strip("|").split("|")]
    dtype, ratio, units, guess_error, steps, layers, _ = cells
    spec = reciprocal.default_spec(np.dtype(dtype))._replace(ratio=float(ratio))
    assert int(units) == spec.num_units
    assert guess_error == f"{spec.guess_error:.1e}"
    assert int(steps) == routes.newton_steps_needed(spec.guess_error, np.dtype(dtype))
    assert int(layers) == 4 + int(steps)


def test_newton_steps_needed():
  assert routes.newton_steps_needed(4.2e-2, np.float64) == 4  # 4.2e-2^8 = 1e-11 > 1.1e-16
  assert routes.newton_steps_needed(4.2e-2, np.float32) == 3
  assert routes.newton_steps_needed(5.5e-5, np.float64) == 2


@pytest.mark.slow
def test_build_md_trade_off_table_is_measured():
  """Regenerates the whole table (about a minute: the 9284-unit guesses); every row reaches its
  dtype's rounding (max |1 - s x| <= 2 eps)."""
  rows = routes.reciprocal_trade_off(RATIOS)
  for row in rows:
    assert row.max_error <= 2 * np.finfo(row.dtype).eps, row
  assert _table("| dtype | ratio | MLP units |") == routes.trade_off_table(RATIOS)


def _arrays(case):
  prob = case.problem(np.float64)
  return tuple(np.asarray(a) for a in (prob.phi_support, prob.y_support, prob.phi_query)) + (
      float(prob.ridge),)


@pytest.mark.parametrize("form,mask", [("dual", "prefix"), ("primal", "causal")])
@pytest.mark.parametrize("newton_steps", [3, 2])
def test_six_or_seven_layers_per_step_are_as_exact(form, mask, newton_steps):
  """carry_matvec with newton_steps=2 (6 layers per step, 9284 units) and 3 (7, 884): the state at
  every step end equals the float64 reference trace at test_compiler's tolerance (1e-9 of the
  largest entry: rounding amplified by ~kappa^2 over the steps, kappa = 100), and so do the
  predictions f_t = k(x)^T alpha_t (primal: phi(x) . w_t)."""
  case = problems.TEST_CASES[6]  # k=16, p=16, kappa=100
  phi, y, query, ridge = _arrays(case)
  num_steps = 8
  options = dict(mask=mask, form=form, newton_steps=newton_steps, carry_matvec=True)
  compiled = kcg.compile_cg(case.num_support, case.feature_dim, num_steps, ridge, **options)
  dims = kcg.dimensions(case.num_support, case.feature_dim, num_steps, **options)
  assert dims.layers_per_step == 4 + newton_steps
  assert (compiled.config.num_layers - dims.init_layers) / num_steps == dims.layers_per_step
  assert compiled.config.mlp_hidden == reciprocal.spec_for(np.float64, newton_steps).num_units
  out = compiled.forward(phi[None], y[None], query[None], return_residuals=True)
  state = compiled.read_state(out.residuals)
  if form == "dual":
    trace = solvers.cg(phi @ phi.T + ridge * np.eye(case.num_support), y, num_steps)
    readout = query @ phi.T
  else:
    trace = solvers.primal_cg(phi, y, ridge, num_steps)
    readout = query
  for name in ("alpha", "r", "p", "gamma", "beta"):
    want = np.asarray(getattr(trace, name))
    got = np.asarray(getattr(state, name))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max(), err_msg=name)
  got = np.asarray(compiled.predict_steps(phi[None], y[None], query[None])[0])
  want = np.asarray(trace.alpha) @ readout.T
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_ablations_refuse_a_carried_matvec():
  compiled = kcg.compile_cg(4, 2, 2, 0.1, mask="prefix", form="dual", carry_matvec=True)
  with pytest.raises(ValueError, match="no ablation table"):
    kcg.ablations.available_operations(compiled.program)


@pytest.mark.parametrize("bad", [5, 1, True, 3.0])
def test_unknown_newton_steps_are_refused(bad):
  with pytest.raises(ValueError, match="newton_steps"):
    kcg.dimensions(4, 2, 1, newton_steps=bad)


@pytest.mark.parametrize("bad,match", [
    (dict(carry_matvec=1), "True or False"),
    (dict(carry_matvec=True, preconditioner="jacobi", mask="prefix"), "plain CG"),
    (dict(carry_matvec=True, num_outputs=2, multi_output="block", mask="prefix"), "plain CG")])
def test_carry_matvec_is_checked(bad, match):
  with pytest.raises(ValueError, match=match):
    kcg.dimensions(4, 2, 1, **bad)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("newton_steps", [4, 3, 2])
def test_each_newton_setting_reaches_rounding(dtype, newton_steps):
  """The guess `spec_for` pairs with n Newton steps reaches the dtype's rounding: the bound
  guess_error^(2^n) below eps/2 (float64, which sets the architecture) and the measured
  max |1 - s x| over 2000 log-uniform s in [L, H] within 2 eps (guess and Newton in the dtype)."""
  spec = reciprocal.spec_for(dtype, newton_steps)
  assert spec.newton_steps == newton_steps
  if dtype == np.float64:
    assert spec.relative_error <= np.finfo(np.float64).eps / 2
  rng = np.random.default_rng(0)
  s = np.exp(rng.uniform(np.log(spec.low), np.log(spec.high), 2000)).astype(dtype)
  x = reciprocal.newton(reciprocal.evaluate_guess(spec, s), s, newton_steps)
  error = np.max(np.abs(1.0 - s.astype(np.float64) * x.astype(np.float64)))
  assert error <= 2 * np.finfo(dtype).eps, error
