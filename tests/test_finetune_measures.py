"""kcg.finetune's measures from inside the model: the known answers of compiled CG (its state at its
step-end layers, its own CG as the closest candidate, CG step s at step-end layer s) and the random-init
control."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import finetune
from kcg import probes

# Primal at d = 3 > t = 2, so that r_t, p_t are not yet 0 (primal CG converges in d steps).
DUAL = finetune.Setup("dual_prefix", num_steps=2, input_dim=2, num_support=4, num_query=2)
PRIMAL = finetune.Setup("primal_causal", num_steps=2, input_dim=3, num_support=4, num_query=2)
# The dual case is the fast test; the primal one repeats it on the other construction (~20 s more).
SETUPS = pytest.mark.parametrize("setup", [
    pytest.param(DUAL, id="dual_prefix"),
    pytest.param(PRIMAL, id="primal_causal", marks=pytest.mark.slow)])


@functools.lru_cache(maxsize=None)
def _case(setup, mode):
  """(compiled float64, model, eval prompts, measures) of a start at step 0."""
  compiled = finetune.compile_setup(setup, "float64")
  model, _, _ = finetune.start_model(mode, compiled, qkv_init_scale=0.2)
  ev = finetune.eval_set(setup, 32, seed=0)
  run = finetune.Run(mode=mode, dtype="float64")
  return compiled, model, ev, finetune.checkpoint_measures(model, compiled, setup, run, ev)


def _probe(setup, mode, layers=None):
  compiled, model, ev, _ = _case(setup, mode)
  residuals, _ = finetune.model_residuals(model, setup.input_dim, ev.x_support, ev.y_support,
                                          ev.x_query, jnp.float64)
  targets = probes.state_targets(ev.x_support, ev.y_support, setup.ridge, setup.num_steps,
                                 form=setup.form)
  return finetune.state_probes(residuals, compiled.program, targets, jax.random.key(0),
                               num_support=setup.num_support, num_query=setup.num_query,
                               layers=layers)


@SETUPS
def test_compiled_start_holds_its_state_at_the_step_end_layers_and_random_init_does_not(setup):
  compiled, _, _, found = _case(setup, "gains")
  assert found["probe_layers"] == list(compiled.program.step_ends[1:])
  # float64, exact CG in named channels: the probe recovers it to ~1e-9 (ridge 1e-6 on standardised
  # features costs ~1e-12; the primal aggregator site has 4 training rows per varying column).
  for quantity in finetune.PROBE_QUANTITIES:
    assert min(found["probe_r2"][quantity]) > 1 - 1e-6, quantity
    assert max(found["probe_shuffled_r2"][quantity]) < 0.5, quantity
  # The control: the same architecture from random init holds none of it (alpha_1 = gamma_0 y is the
  # most linear in the inputs; measured 0.56 dual, < 0 primal).
  control = _case(setup, "random")[3]
  for quantity in finetune.PROBE_QUANTITIES:
    assert max(control["probe_r2"][quantity]) < 0.8, quantity
  assert control["probe_r2_mean"] < 0.3


@SETUPS
def test_step_end_is_the_first_layer_with_the_whole_state(setup):
  # One layer earlier alpha_s and r_s are in place but p_s (written last in every step) is not, so
  # both an early and a late step_end_layers, and swapped r/p targets, fail here.
  compiled = _case(setup, "gains")[0]
  ends = finetune.step_end_layers(compiled.program)
  assert ends == tuple(compiled.program.step_ends) and len(ends) == setup.num_steps + 1
  before = _probe(setup, "gains", layers=(ends[0],) + tuple(l - 1 for l in ends[1:]))
  for s in range(setup.num_steps):
    assert before.r2["alpha"][s] > 1 - 1e-6 and before.r2["r"][s] > 1 - 1e-6
    assert before.r2["p"][s] < 0.99


@SETUPS
def test_compiled_start_is_closest_to_its_own_cg(setup):
  _, _, _, found = _case(setup, "gains")
  own = "cg" if setup.form == "dual" else "primal_cg"
  assert found["closest_candidate"] == own
  assert found["candidate_r2"][own] > 1 - 1e-10 and found["candidate_relative"][own] < 1e-6
  others = [v for name, v in found["candidate_r2"].items() if name != own]
  assert max(others) < 0.99  # the other form, KRR and the fitted candidates are measurably different
  assert set(found["candidate_r2"]) == set(finetune.CANDIDATES)


@SETUPS
def test_layer_matching_of_the_compiled_model_finds_cg_step_s_at_step_end_layer_s(setup):
  compiled, _, _, found = _case(setup, "gains")
  own = "cg" if setup.form == "dual" else "primal_cg"
  match = found["layer_match"]
  assert len(match["name"]) == compiled.config.num_layers + 1
  for s, layer in enumerate(compiled.program.step_ends):
    if s > 0:
      assert match["name"][layer] == own, (s, layer)
    assert match["step"][layer] == s, (s, layer)
    assert match["relative"][layer] < 1e-8


def test_bad_inputs_are_refused():
  compiled, model, ev, _ = _case(DUAL, "gains")
  with pytest.raises(ValueError, match="increasing"):
    finetune.step_end_layers(compiled.program._replace(step_ends=(3, 3, 5)))
  targets = probes.state_targets(ev.x_support, ev.y_support, DUAL.ridge, 1)
  residuals, _ = finetune.model_residuals(model, DUAL.input_dim, ev.x_support, ev.y_support,
                                          ev.x_query, jnp.float64)
  with pytest.raises(ValueError, match="steps"):
    finetune.state_probes(residuals, compiled.program, targets, jax.random.key(0), num_support=4,
                          num_query=2)
  with pytest.raises(ValueError, match=r"L\+1"):
    finetune.state_probes(residuals[:5], compiled.program, targets, jax.random.key(0), num_support=4,
                          num_query=2)


@pytest.mark.slow
def test_converged_state_is_not_probed():
  # Primal CG at d = 2 converges in 2 steps: r_2 = p_2 = 0 to rounding, nothing to probe (NaN).
  setup = finetune.Setup("primal_causal", num_steps=2, input_dim=2, num_support=4, num_query=2)
  found = _case(setup, "gains")[3]
  assert np.isnan(found["probe_r2"]["r"][1]) and np.isnan(found["probe_r2"]["p"][1])
  assert found["probe_r2"]["alpha"][1] > 1 - 1e-6 and found["probe_r2_mean"] > 1 - 1e-6
