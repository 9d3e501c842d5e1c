"""kcg.finetune: the reparametrised starts are the compiled model, frozen parts stay frozen, the
division check sees a broken division, runs resume, bad configs fail first; the random-ReLU feature
family (compiled phi = the task's phi, CG on phi from an independent reference, the Bayes ridge); the
binary end to end."""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import figure_style

from kcg import finetune
from kcg._src import finetune as finetune_lib
from kcg import ops
from kcg import tasks
from kcg._src import train_data

SETUP = finetune.Setup("dual_prefix", num_steps=1, input_dim=2, num_support=4, num_query=2)
PRIMAL = finetune.Setup("primal_causal", num_steps=1, input_dim=2, num_support=4, num_query=2)
# The feature family: m = 5 random-ReLU features of d = 2 inputs, k = 4 supports, t = 2 steps.
RELU = finetune.Setup("dual_prefix", num_steps=2, input_dim=2, num_support=4, num_query=2,
                      features="random_relu", feature_dim=5, feature_seed=3)
RELU_PRIMAL = dataclasses.replace(RELU, construction="primal_causal")


@functools.lru_cache(maxsize=None)
def _compiled(setup, dtype):
  return finetune.compile_setup(setup, dtype)


def _tokens(setup, dtype, batch=6):
  data = setup.data
  prompts = train_data.sample_prompts(jax.random.key(3), data, batch_size=batch)
  return train_data.make_batch(prompts, data, jnp.dtype(dtype))


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("setup", [SETUP, PRIMAL], ids=["dual_prefix", "primal_causal"])
def test_every_start_from_compiled_weights_is_the_compiled_model_bit_for_bit(setup, dtype):
  compiled = _compiled(setup, dtype)
  batch = _tokens(setup, dtype)
  num_prefix = train_data.num_prefix(setup.data, batch.tokens)
  expected = np.asarray(compiled.model(batch.tokens, num_prefix=num_prefix).outputs)
  for mode in ("plain", "freeze_reciprocal", "gains"):
    model, _, _ = finetune.start_model(mode, compiled)
    got = np.asarray(model(batch.tokens, num_prefix=num_prefix).outputs)
    np.testing.assert_array_equal(got, expected, err_msg=mode)
  # And the compiled model is CG_t: float64 agrees with the reference solver to rounding.
  if dtype == "float64":
    ev = finetune.eval_set(setup, 8, seed=0)
    pred = finetune.make_predict(compiled.model, setup, jnp.float64)(ev.x_support, ev.y_support,
                                                                     ev.x_query)
    np.testing.assert_allclose(pred, ev.cg, rtol=1e-11, atol=1e-12)


def _phi(setup, x):
  """relu(x W^T + b) / sqrt(m) in NumPy float64 from the family's (W, b)."""
  weights, bias = (np.asarray(a, np.float64) for a in tasks.relu_feature_params(
      setup.input_dim, setup.feature_dim, setup.feature_seed))
  return np.maximum(np.einsum("...d,md->...m", x, weights) + bias, 0.0) / np.sqrt(setup.feature_dim)


def _plain_cg(phi_s, y, phi_q, ridge, num_steps, form):
  """t steps of textbook CG in NumPy float64, one prompt: dual on (K + ridge I) a = y, f = K_q a;
  primal on (Phi^T Phi + ridge I) w = Phi^T y, f = Phi_q w."""
  if form == "dual":
    matrix, rhs, readout = phi_s @ phi_s.T + ridge * np.eye(len(y)), y, phi_q @ phi_s.T
  else:
    matrix, rhs, readout = phi_s.T @ phi_s + ridge * np.eye(phi_s.shape[1]), phi_s.T @ y, phi_q
  x = np.zeros_like(rhs)
  r = rhs.copy()
  p = r.copy()
  for _ in range(num_steps):
    ap = matrix @ p
    step = (r @ r) / (p @ ap)
    x, r_new = x + step * p, r - step * ap
    p = r_new + (r_new @ r_new) / (r @ r) * p
    r = r_new
  return readout @ x


@pytest.mark.parametrize("setup", [RELU, RELU_PRIMAL], ids=["dual_prefix", "primal_causal"])
def test_feature_setup_at_step_0_is_cg_on_phi_from_an_independent_reference(setup):
  compiled = _compiled(setup, "float64")
  ev = finetune.eval_set(setup, 8, seed=0)
  phi_s, phi_q = _phi(setup, ev.x_support), _phi(setup, ev.x_query)
  assert setup.ridge == 0.3**2 / tasks.RELU_FEATURES_WEIGHT_VARIANCE
  cg = np.stack([_plain_cg(a, y, b, setup.ridge, setup.num_steps, setup.form)
                 for a, y, b in zip(phi_s, ev.y_support, phi_q)])
  krr = np.stack([b @ a.T @ np.linalg.solve(a @ a.T + setup.ridge * np.eye(len(y)), y)
                  for a, y, b in zip(phi_s, ev.y_support, phi_q)])
  # The prompts' targets are O(1) and t = 2 steps on K + 0.045 I (|K| < 3): rounding of a few dozen
  # float64 operations per entry, amplified by at most |K| / ridge ~ 1e2, stays below 1e-12.
  np.testing.assert_allclose(ev.cg, cg, rtol=0, atol=1e-12)
  np.testing.assert_allclose(ev.krr, krr, rtol=0, atol=1e-12)
  assert np.max(np.abs(cg - krr)) > 1e-3  # t = 2 < k: CG_t is not yet KRR, so the two tell apart
  # The compiled model (which every start from compiled weights equals bit for bit, tested above).
  pred = finetune.make_predict(compiled.model, setup, jnp.float64)(ev.x_support, ev.y_support,
                                                                   ev.x_query)
  np.testing.assert_allclose(pred, cg, rtol=0, atol=1e-12)
  # The model's first layer is the setup's phi: the features it feeds CG are the family's.
  np.testing.assert_allclose(np.asarray(compiled.kernel_features(ev.x_query)), phi_q, rtol=0,
                             atol=1e-15)


def test_feature_family_targets_are_linear_in_the_compiled_phi_with_the_bayes_ridge():
  compiled = _compiled(RELU, "float64")
  # Noiseless targets on 40 > m points: w is determined; the queries must follow it exactly.
  data = dataclasses.replace(RELU.data, num_support=40, noise_std=0.0)
  prompts = train_data.sample_prompts(jax.random.key(5), data, batch_size=4)

  def residual(phi_fn):
    worst = 0.0
    for xs, fs, xq, fq in zip(prompts.x_support, prompts.f_support, prompts.x_query,
                              prompts.f_query):
      w, *_ = np.linalg.lstsq(phi_fn(xs), np.asarray(fs), rcond=None)
      worst = max(worst, float(np.max(np.abs(phi_fn(xq) @ w - np.asarray(fq)))))
    return worst

  assert residual(lambda x: np.asarray(compiled.kernel_features(jnp.asarray(x)))) < 1e-12
  # Another feature seed's phi does not fit the targets: the test sees a mismatch of layers.
  assert residual(lambda x: _phi(dataclasses.replace(RELU, feature_seed=4), np.asarray(x))) > 1e-2
  # The compiled ridge is the posterior mean's: KRR on phi at noise^2 / v beats 4x and 1/4 of it on
  # 512 prompts (its excess over the posterior mean is E|f_lambda - f_*|^2 >= 0 given the inputs).
  ev = finetune.eval_set(dataclasses.replace(RELU, num_support=8), 512, seed=1)
  phi_s, phi_q = _phi(RELU, ev.x_support), _phi(RELU, ev.x_query)

  def krr_mse(ridge):
    k = np.einsum("bim,bjm->bij", phi_s, phi_s) + ridge * np.eye(phi_s.shape[1])
    alpha = np.linalg.solve(k, ev.y_support[..., None])[..., 0]
    return float(np.mean(np.square(np.einsum("bqm,bim,bi->bq", phi_q, phi_s, alpha) - ev.f_query)))

  best = krr_mse(RELU.ridge)
  assert best == pytest.approx(float(np.mean(np.square(ev.krr - ev.f_query))), rel=1e-9)
  assert best < krr_mse(4 * RELU.ridge) and best < krr_mse(RELU.ridge / 4)


def test_reciprocal_mask_is_the_programs_division_and_nothing_else():
  # float64: every unit of the guess is in use (float32's shorter range leaves trailing columns 0).
  compiled = _compiled(SETUP, "float64")
  program = compiled.program
  mask = finetune.reciprocal_mask(compiled)["blocks"]
  newton_heads = sum(h.name.startswith("newton ") for b in program.blocks for h in b.heads)
  guess_units = sum(u.num_units for b in program.blocks for u in b.units
                    if u.name.startswith("guess 1/"))
  # Four Newton steps refine two reciprocals with two heads each, in the init and the step blocks'
  # scalar stage; guesses: one per reduction.
  assert newton_heads == 4 * 2 * 2
  assert int(mask["attn_out"].any(axis=(2, 3)).sum()) == newton_heads
  assert int(mask["mlp_in_bias"].sum()) == guess_units > 0
  # The masked MLP columns are the guess units: each reads the aggregator flag (its stand-in bias),
  # apart from the unit whose breakpoint term is 0 (c_0 = 0, kcg._src.reciprocal); no other unit does.
  flag = program.layout.slice("is_aggregator").start
  reads_flag = np.asarray(compiled.model.blocks.mlp_in[...])[:, flag, :] != 0
  assert np.all(~reads_flag[~mask["mlp_in_bias"]])
  assert np.mean(reads_flag[mask["mlp_in_bias"]]) > 0.9
  with pytest.raises(ValueError, match="no reciprocal"):
    finetune.reciprocal_parts(program._replace(blocks=program.blocks[:0]))


def test_frozen_entries_stay_bit_identical_and_the_rest_moves():
  compiled = _compiled(SETUP, "float32")
  model, wrt, keep = finetune.start_model("freeze_reciprocal", compiled)
  run = finetune.Run(mode="freeze_reciprocal", num_steps=2, batch_size=8, learning_rate=1e-3)
  tx = finetune.make_tx(run.train_config(SETUP), keep)
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  before = jax.tree.map(np.array, _params(model))
  graphdef, state = nnx.split((model, optimizer))
  step = finetune.train_step(graphdef, SETUP.data, wrt)
  for s in range(2):
    state, _ = step(state, _tokens(SETUP, "float32", batch=8))
  after = _params(nnx.merge(graphdef, state)[0])
  frozen = finetune.reciprocal_mask(compiled)
  moved = 0
  for f, b, a in zip(jax.tree.leaves(frozen), jax.tree.leaves(before), jax.tree.leaves(after)):
    a = np.asarray(a)
    np.testing.assert_array_equal(a[f], b[f])  # bit-identical (NaN elsewhere is allowed)
    moved += int(np.sum(a[~f] != b[~f]))
  assert moved > 0


def test_gains_train_only_the_gains():
  compiled = _compiled(SETUP, "float32")
  model, wrt, keep = finetune.start_model("gains", compiled)
  assert keep is None and wrt is finetune.Gain
  run = finetune.Run(mode="gains", num_steps=2, batch_size=8, learning_rate=1e-2)
  optimizer = nnx.Optimizer(model, finetune.make_tx(run.train_config(SETUP), None), wrt=wrt)
  graphdef, state = nnx.split((model, optimizer))
  state, _ = finetune.train_step(graphdef, SETUP.data, wrt)(state, _tokens(SETUP, "float32", 8))
  trained, _ = nnx.merge(graphdef, state)
  distance = finetune.weight_distance(trained, _params(compiled.model))
  assert distance["changed"] == 0 and distance["relative_l2"] == 0
  assert distance["max_gain_change"] > 0


def test_reciprocal_error_sees_a_broken_division():
  compiled = _compiled(SETUP, "float64")
  ev = finetune.eval_set(SETUP, 8, seed=0)
  # Exact CG: Newton's relative error 4e-2^(2^4) is below float64 rounding.
  assert finetune.reciprocal_error(compiled.model, compiled, ev, jnp.float64) < 1e-13
  gained = finetune.GainedTransformer(nnx.clone(compiled.model))
  layer_ops = [compiled.program.blocks[b].op for b in compiled.program.schedule]
  last_newton = max(l for l, op in enumerate(layer_ops) if op is ops.Op.NEWTON)
  gained.head_gain[...] = gained.head_gain[...].at[last_newton, 1].set(1.01)  # the -s x^2 head
  assert finetune.reciprocal_error(gained, compiled, ev, jnp.float64) > 1e-3


def test_plain_adam_from_compiled_weights_stops_at_the_first_non_finite_loss(tmp_path):
  run = finetune.Run(mode="plain", num_steps=4, batch_size=8, eval_every=2)
  result = finetune.fit(SETUP, run, str(tmp_path / "plain"), num_eval_prompts=8)
  assert result.diverged_at is not None and result.diverged_at <= 2
  assert result.history[0]["step"] == 0 and result.history[0]["cg_r2"] > 0.999999
  assert result.history[-1]["finite"] is False
  # The model the non-finite step started from leaves the compiled one at a named layer and channel.
  where = result.history[-1]["departure"]
  assert where["layer"] is not None and where["channel"] and where["token"] in (
      "support", "aggregator", "query")
  saved = json.loads((tmp_path / "plain" / "history.json").read_text())
  assert saved["diverged_at"] == result.diverged_at


def test_an_overflowing_gradient_norm_stops_the_run_even_with_a_finite_loss(monkeypatch):
  """clip_by_global_norm turns an infinite gradient norm into a zero update: without the check the run
  would go on with a finite loss and weights that never move (measured: plain float32 at t = 8)."""
  made = finetune.train_step

  def overflowing_at_step_1(graphdef, data, wrt):
    step_fn, calls = made(graphdef, data, wrt), []

    def step(state, batch):
      calls.append(1)
      new_state, metrics = step_fn(state, batch)
      if len(calls) == 2:
        metrics = {**metrics, "grad_norm": jnp.asarray(np.inf, metrics["grad_norm"].dtype)}
      return new_state, metrics

    return step

  monkeypatch.setattr(finetune_lib, "train_step", overflowing_at_step_1)
  run = finetune.Run(mode="gains", num_steps=4, batch_size=8, eval_every=2, learning_rate=1e-2)
  result = finetune.fit(SETUP, run, num_eval_prompts=8)
  assert result.diverged_at == 1
  assert result.history[-1]["finite"] is False and math.isfinite(result.history[-1]["train_loss"])
  assert result.history[-1]["grad_norm"] == np.inf


def test_a_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path):
  run = finetune.Run(mode="gains", num_steps=4, batch_size=8, eval_every=2, learning_rate=1e-2)
  whole = finetune.fit(SETUP, run, str(tmp_path / "whole"), num_eval_prompts=8)
  finetune.fit(SETUP, run, str(tmp_path / "split"), num_eval_prompts=8, stop_at_step=2)
  resumed = finetune.fit(SETUP, run, str(tmp_path / "split"), num_eval_prompts=8)
  assert [h["step"] for h in resumed.history] == [0, 2, 4]
  for a, b in zip(whole.history, resumed.history):
    assert a["mse"] == b["mse"] and a["cg_r2"] == b["cg_r2"]
  other = finetune.Run(mode="gains", num_steps=5, batch_size=8, eval_every=2)
  with pytest.raises(ValueError, match="different run"):
    finetune.fit(SETUP, other, str(tmp_path / "split"), num_eval_prompts=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="adam"), "Run.mode"), (dict(task="regress"), "Run.task"),
    (dict(dtype="bfloat16"), "Run.dtype"), (dict(num_steps=0), "num_steps"),
    (dict(learning_rate=-1.0), "learning_rate"), (dict(qkv_init_scale=0.0), "qkv_init_scale")])
def test_bad_run_fails_with_the_field_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    finetune.Run(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(construction="dual_causal"), "construction"), (dict(num_steps=0), "num_steps"),
    (dict(noise_std=0.0), "noise_std"), (dict(features="relu"), "Setup.features"),
    (dict(features="random_relu", feature_dim=0), "feature_dim"),
    (dict(features="random_relu", feature_seed=-1), "feature_seed")])
def test_bad_setup_fails_with_the_field_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    finetune.Setup(**kwargs)


def _config(option):
  from experiments.configs import finetune as config_lib
  return config_lib.get_config(option)


@pytest.mark.parametrize("field, value, match", [
    ("modes", ("plain", "sgd"), "modes"), ("dtypes", ("float16",), "dtypes"),
    ("constructions", ("dual_causal",), "construction"), ("cg_steps", (0,), "num_steps"),
    ("features", ("identity", "relu"), "config.features"), ("feature_dim", 0, "feature_dim"),
    ("random_relu.modes", ("adam",), "random_relu"),
    ("random_relu.constructions", ("dual_causal",), "construction")])
def test_bad_config_fails_before_any_training(tmp_path, field, value, match):
  from experiments import finetune as binary
  config = _config("smoke")
  if "." in field:
    parent, field = field.split(".")
    config[parent][field] = value
  else:
    config[field] = value
  with pytest.raises(ValueError, match=match):
    binary.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "models")
  with pytest.raises(ValueError, match="Unknown or conflicting"):
    _config("tiny")


def test_smoke_binary_writes_report_results_and_figures_then_resumes(tmp_path, monkeypatch):
  from experiments import finetune as binary
  config = _config("smoke")
  figures = figure_style.record(monkeypatch)
  results = binary.run(config, str(tmp_path))
  for name in ("report.md", "results.json", "linear_dual_prefix_t1.png",
               "linear_dual_prefix_t1_imitate.png", "relu_features_dual_prefix_t1.png",
               "linear_dual_prefix_t1_probes.png", "relu_features_dual_prefix_t1_probes.png"):
    assert (tmp_path / name).exists(), name
  assert len(figures) == 5
  for figure in figures:
    figure_style.check_style(figure)
  runs = results["runs"]
  plain = runs["linear_dual_prefix_t1_task_plain_float32"]
  gains = runs["linear_dual_prefix_t1_task_gains_float32"]
  features = runs["relu_features_dual_prefix_t1_task_gains_float32"]
  assert set(runs) == {"linear_dual_prefix_t1_task_plain_float32", "linear_dual_prefix_t1_task_gains_float32",
                       "linear_dual_prefix_t1_imitate_random_float32",
                       "relu_features_dual_prefix_t1_task_gains_float32"}
  assert features["family"] == "relu_features" and features["diverged_at"] is None
  assert features["history"][0]["cg_r2"] > 0.999999
  assert plain["diverged_at"] is not None and gains["diverged_at"] is None
  assert gains["history"][0]["cg_r2"] > 0.999999 and gains["history"][0]["reciprocal_error"] < 1e-5
  report = (tmp_path / "report.md").read_text()
  assert f"non-finite loss or gradient at step {plain['diverged_at']}" in report
  # The compiled start holds the CG state at its step-end layers and is closest to CG_t.
  assert gains["history"][0]["probe_r2_mean"] > 0.99
  assert gains["history"][0]["closest_candidate"] == "cg"
  assert "held-out probe R^2 of the CG state" in report
  assert "## Layer matching: linear_dual_prefix_t1_imitate_random_float32" in report
  assert os.path.isdir(tmp_path / "models" / "linear_dual_prefix_t1_task_gains_float32" / "checkpoints")
  assert "relu_features dual_prefix, t=1, float32, gains" in report
  again = binary.run(config, str(tmp_path))
  assert again["runs"]["linear_dual_prefix_t1_task_gains_float32"]["history"] == gains["history"]


@pytest.mark.slow
def test_runlocal_binary(tmp_path):
  from experiments import finetune as binary
  results = binary.run(_config("runlocal"), str(tmp_path))
  # linear: 2 constructions x (5 modes + 3 in float64 + imitation); relu_features: dual_prefix x 4 modes.
  assert len(results["runs"]) == 2 * (5 + 3 + 1) + 4
  for r in results["runs"].values():
    if r["mode"] == "compute_gains":
      assert r["diverged_at"] is None
      assert max(h["reciprocal_error"] for h in r["history"]) < 1e-6
    if r["mode"] in ("gains", "plain"):
      assert r["history"][0]["cg_r2"] > 0.99999
    # float32 gains stop at a non-finite loss (linear: steps 17 and 2; relu_features: step 1, where a
    # gain above 1 on the head that clears pAp leaves -delta pAp_old, which outweighs the next, smaller
    # pAp and sends the reciprocal a non-positive input). float64 gains keep training.
    if r["mode"] == "gains" and r["family"] == "linear" and r["dtype"] == "float64":
      assert r["diverged_at"] is None


_RELU_SETUP = dict(num_steps=2, input_dim=3, num_support=6, features="random_relu", feature_dim=12)


def test_compute_gain_mask_freezes_bookkeeping_and_division():
  """The compute_gains mask follows the program's typed ops, layer by layer and head by head."""
  compiled = finetune.compile_setup(finetune.Setup("dual_prefix", **_RELU_SETUP), jnp.float32)
  mask = finetune.compute_gain_mask(compiled)
  program = compiled.program
  frozen_ops = (ops.Op.MOVE, ops.Op.GUESS, ops.Op.NEWTON)
  for layer in range(compiled.config.num_layers):
    block = program.layer_block(layer)
    for h in range(compiled.config.num_heads):
      computes = h < len(block.heads) and block.heads[h].op not in frozen_ops
      assert mask["head_gain"][layer, h] == computes, (layer, h)
    parts = tuple(block.heads) + tuple(block.units)
    assert mask["layer_gain"][layer] == all(x.op not in frozen_ops for x in parts), layer
  assert 0 < mask["head_gain"].sum() < mask["head_gain"].size and mask["layer_gain"].sum() >= 1
  _, wrt, keep = finetune.start_model("compute_gains", compiled)
  assert wrt is finetune.Gain and set(keep) == set(mask)
  for name in mask:
    np.testing.assert_array_equal(keep[name], mask[name])


@pytest.mark.slow
def test_compute_gains_keep_dividing_where_gains_diverge():
  """On the relu_features task a gain on a clearing head turns p.Ap non-positive at step 1 (gains
  diverge there); compute_gains trains only unfrozen gains and the division stays exact."""
  setup = finetune.Setup("dual_prefix", **_RELU_SETUP)
  mask = finetune.compute_gain_mask(finetune.compile_setup(setup, jnp.float32))
  run = finetune.Run(mode="compute_gains", num_steps=3, batch_size=32, eval_every=3,
                     learning_rate=1e-2)
  fitted = finetune.fit(setup, run, num_eval_prompts=16)
  assert fitted.diverged_at is None
  last = fitted.history[-1]
  assert last["finite"] and last["reciprocal_error"] < 1e-5
  gains = nnx.to_pure_dict(nnx.state(fitted.model, finetune.Gain))
  for name in ("head_gain", "layer_gain"):
    moved = np.asarray(gains[name]) != 1
    assert moved.any() and not moved[mask[name] == 0].any(), name
  plain_gains = finetune.fit(setup, dataclasses.replace(run, mode="gains"), num_eval_prompts=16)
  assert plain_gains.diverged_at == 1
