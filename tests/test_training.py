"""Tests of kcg.training: configs, data, loss, optimizer, determinism and learning on tiny runs."""

import ast
import dataclasses
import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kcg import training
from kcg._src import checkpointing
from kcg._src import prompt as prompt_lib
from kcg._src import train_config
from kcg._src import train_data
from kcg._src import train_optim
from kcg._src import training as training_loop


def tiny_config(**overrides) -> training.TrainConfig:
  """A one-layer linear-attention run on 3-d linear regression that compiles in seconds."""
  base = dict(model=training.ModelSpec(num_layers=1, width=8, head_dim=8),
              data=training.DataSpec(input_dim=3, num_support=6, num_query=2),
              num_steps=4, batch_size=8, log_every=2, checkpoint_every=2, eval_batch_size=8,
              final_eval=False)
  base.update(overrides)
  return training.TrainConfig(**base)


def every_prefix_data(**overrides) -> training.DataSpec:
  base = dict(family="linear", input_dim=4, num_support=5, encoding="every_prefix", mask="causal")
  base.update(overrides)
  return training.DataSpec(**base)


# ----------------------------------------------------------------------------------------------
# Configuration.


def test_unknown_task_family_raises():
  with pytest.raises(ValueError, match="Unknown task family 'quadratic'"):
    training.DataSpec(family="quadratic")


def test_depth_zero_raises():
  with pytest.raises(ValueError, match="depth.*must be >= 1"):
    training.ModelSpec(num_layers=0)


def test_every_prefix_needs_causal_mask():
  with pytest.raises(ValueError, match="mask='causal'"):
    training.DataSpec(encoding="every_prefix", mask="prefix")


def test_unknown_config_key_raises():
  raw = training.config_to_dict(tiny_config())
  raw["model"]["depth"] = 3
  with pytest.raises(ValueError, match="Unknown config key.*depth"):
    training.config_from_dict(raw)
  raw = training.config_to_dict(tiny_config())
  raw["num_epochs"] = 3
  with pytest.raises(ValueError, match="Unknown config key 'num_epochs'"):
    training.config_from_dict(raw)


def test_bad_values_raise():
  with pytest.raises(ValueError, match="input_dim_start=9 exceeds"):
    tiny_config(curriculum=training.CurriculumSpec(input_dim_start=9))
  with pytest.raises(ValueError, match="eval_baselines entry"):
    tiny_config(eval_baselines=("oracle_of_delphi",))
  with pytest.raises(ValueError, match="ood_shifts entry"):
    tiny_config(ood_shifts=("sideways",))
  with pytest.raises(ValueError, match="schedule"):
    training.OptimSpec(schedule="linear")
  with pytest.raises(ValueError, match="b2 must be in"):
    training.OptimSpec(b2=1.0)
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
    tiny_config(batch_size=0)
  # kcg.tasks' own checks run when the DataSpec is built.
  with pytest.raises(ValueError, match="sparsity"):
    training.DataSpec(family="sparse_linear", input_dim=3, sparsity=5)


@pytest.mark.parametrize("build,message", [
    (lambda: training.ModelSpec(width=0), "ModelSpec.width must be a positive int"),
    (lambda: training.ModelSpec(num_heads=1.5), "ModelSpec.num_heads"),
    (lambda: training.ModelSpec(value_dim=0), "ModelSpec.value_dim"),
    (lambda: training.ModelSpec(mlp_hidden=-1), "ModelSpec.mlp_hidden"),
    (lambda: training.ModelSpec(attention="sparse"), "ModelSpec.attention"),
    (lambda: training.ModelSpec(activation="tanh"), "ModelSpec.activation"),
    (lambda: training.ModelSpec(norm="batchnorm"), "ModelSpec.norm"),
    (lambda: training.ModelSpec(precision="low"), "ModelSpec.precision"),
    (lambda: training.ModelSpec(attention_scale=0.0), "ModelSpec.attention_scale"),
    (lambda: training.ModelSpec(qkv_init_scale=-1.0), "ModelSpec.qkv_init_scale"),
    (lambda: training.ModelSpec(num_layers=2, mlp_hidden=8, attention_free_layers=2),
     "ModelSpec.attention_free_layers=2 leaves no attention block"),
    (lambda: training.ModelSpec(num_layers=2, attention_free_layers=1), "needs mlp_hidden > 0"),
    (lambda: training.DataSpec(num_query=0), "DataSpec.num_query"),
    (lambda: training.DataSpec(encoding="pairs"), "DataSpec.encoding"),
    (lambda: training.DataSpec(mask="full"), "DataSpec.mask"),
    (lambda: training.DataSpec(tree_depth=0), "DataSpec.tree_depth"),
    (lambda: training.DataSpec(family="logistic", glm_targets="median"), "glm_targets"),
    (lambda: training.DataSpec(noise_std=-1.0), "noise_std"),
    (lambda: training.CurriculumSpec(interval=0), "CurriculumSpec.interval"),
    (lambda: training.CurriculumSpec(num_support_start=0), "CurriculumSpec.num_support_start"),
    (lambda: training.CurriculumSpec(input_dim_increment=-1), "CurriculumSpec.input_dim_increment"),
    (lambda: training.OptimSpec(learning_rate=0.0), "OptimSpec.learning_rate"),
    (lambda: training.OptimSpec(warmup_steps=-1), "OptimSpec.warmup_steps"),
    (lambda: training.OptimSpec(weight_decay=float("nan")), "OptimSpec.weight_decay"),
    (lambda: training.OptimSpec(clip_norm=0.0), "OptimSpec.clip_norm"),
    (lambda: tiny_config(num_steps=-1), "TrainConfig.num_steps"),
    (lambda: tiny_config(seed=-1), "TrainConfig.seed"),
    (lambda: tiny_config(dtype="bfloat16"), "TrainConfig.dtype"),
    (lambda: tiny_config(eval_every=-1), "TrainConfig.eval_every"),
    (lambda: tiny_config(eval_supports=(0,)), "eval_supports entry"),
    (lambda: tiny_config(model={"num_layers": 2}), "TrainConfig.model must be a ModelSpec"),
    (lambda: training.train({"num_steps": 2}), "train needs a TrainConfig"),
])
def test_every_config_check_fires(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_interleaved_encoding_checks():
  prompt = prompt_lib
  with pytest.raises(ValueError, match="num_points must be a positive int"):
    prompt.make_interleaved_layout(0, 3)
  layout = prompt.make_interleaved_layout(4, 3)
  with pytest.raises(ValueError, match="x_points must have shape"):
    prompt.encode_interleaved(layout, jnp.zeros((2, 5, 3)), jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="y_points must have shape"):
    prompt.encode_interleaved(layout, jnp.zeros((2, 4, 3)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="NaN or Inf"):
    prompt.encode_interleaved(layout, jnp.full((2, 4, 3), jnp.inf), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="outputs must have shape"):
    prompt.interleaved_predictions(layout, jnp.zeros((2, 7, 1)))
  with pytest.raises(ValueError, match="No token feature 'z'"):
    layout.feature_slice("z")
  tokens = prompt.encode_interleaved(layout, jnp.ones((1, 4, 3)), jnp.arange(4.0)[None])
  np.testing.assert_array_equal(tokens[0, 1::2, layout.feature_slice("y")][:, 0], np.arange(4.0))
  np.testing.assert_array_equal(tokens[0, 0::2, layout.feature_slice("is_x")][:, 0], np.ones(4))
  assert tokens.dtype == jnp.float64  # float64 inputs stay float64


def test_glm_targets_reach_the_task():
  data = training.DataSpec(family="logistic", input_dim=3, num_support=6, noise_std=0.0,
                           glm_targets="mean", glm_scale=3.0)
  task = train_config.task_config(data, 3, 6, batch_size=2)
  assert (task.glm_targets, task.glm_scale) == ("mean", 3.0)
  config = tiny_config(data=data)
  assert training.config_from_dict(json.loads(json.dumps(training.config_to_dict(config)))) == config


def test_float64_needs_x64():
  config = tiny_config(dtype="float64")
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match="jax_enable_x64"):
      train_config.dtype_of(config)


def test_config_round_trips_through_json():
  config = tiny_config(ood_shifts=("orthant",), eval_supports=(1, 3),
                       curriculum=training.CurriculumSpec(input_dim_start=2, num_support_start=2),
                       data=training.DataSpec(input_dim=3, num_support=6, noise_std=0.1))
  raw = json.loads(json.dumps(training.config_to_dict(config)))
  assert training.config_from_dict(raw) == config


@pytest.mark.parametrize("name,arg", [("lsa_linear", None), ("lsa_linear", "runlocal"),
                                      ("linear_deep", None), ("linear_deep", "runlocal"),
                                      ("gpt_icl", None), ("gpt_icl", "decision_tree,runlocal"),
                                      ("gpt_icl", "relu_network")])
def test_config_files_build_typed_configs(name, arg):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = training.config_from_dict(module.get_config(arg))
  assert isinstance(config, training.TrainConfig)
  if name == "lsa_linear":
    m, d = config.model, config.data
    assert (m.num_layers, m.attention, m.mlp_hidden, m.norm) == (1, "linear", 0, None)
    assert (d.family, d.input_dim, d.num_support, d.condition_number) == ("linear", 10, 20, None)
  if name == "gpt_icl" and arg is None:
    m, d = config.model, config.data
    assert (m.num_layers, m.width, m.num_heads, config.batch_size) == (12, 256, 8, 64)
    assert (d.input_dim, d.num_points, d.encoding) == (20, 41, "every_prefix")
    assert len(config.ood_shifts) == 7


def test_unknown_config_option_raises():
  module = importlib.import_module("experiments.configs.lsa_linear")
  with pytest.raises(ValueError, match="Unknown config option"):
    module.get_config("runfast")


def test_curriculum_follows_garg_schedule():
  config = training.config_from_dict(
      importlib.import_module("experiments.configs.gpt_icl").get_config(None))
  assert training.curriculum_stage(config, 0) == (5, 10)  # 11 points.
  assert training.curriculum_stage(config, 1999) == (5, 10)
  assert training.curriculum_stage(config, 2000) == (6, 12)
  assert training.curriculum_stage(config, 15 * 2000) == (20, 40)  # 41 points.
  assert training.curriculum_stage(config, 10**6) == (20, 40)


# ----------------------------------------------------------------------------------------------
# Data and encodings.


def test_every_prefix_batch_pads_dims_and_points():
  data = every_prefix_data()
  prompts = training.sample_prompts(jax.random.key(0), data, batch_size=3, input_dim=2,
                                    num_support=2)
  batch = training.make_batch(prompts, data, jnp.float64)
  n = data.num_points
  layout = prompt_lib.make_interleaved_layout(n, data.input_dim)
  assert batch.tokens.shape == (3, 2 * n, layout.token_dim)
  assert batch.targets.shape == batch.weights.shape == (3, n)
  np.testing.assert_array_equal(batch.weights[0], [1, 1, 1, 0, 0, 0])
  x_block = batch.tokens[..., layout.feature_slice("x")]
  assert np.all(x_block[..., 2:] == 0)  # curriculum dims beyond d_s = 2 are zero.
  # Points beyond k_s + 1 = 3 carry no data (only their x/y flags) and no loss weight.
  assert np.all(batch.tokens[:, 6:, :layout.feature_slice("y").stop] == 0)
  np.testing.assert_array_equal(x_block[:, 0:6:2, :2],
                                np.concatenate([prompts.x_support, prompts.x_query], axis=1))


def test_query_batch_layout():
  config = tiny_config()
  batch = training.training_batch(config, step=0)
  layout = prompt_lib.make_layout(6, 2, 3)
  assert batch.tokens.shape == (8, layout.num_tokens, layout.token_dim)
  assert batch.targets.shape == (8, 2) and np.all(batch.weights == 1)
  assert batch.tokens.dtype == jnp.float32
  # The batch of a step is a pure function of (seed, step).
  again = training.training_batch(config, step=0)
  np.testing.assert_array_equal(batch.tokens, again.tokens)
  other = training.training_batch(config, step=1)
  assert not np.array_equal(batch.tokens, other.tokens)


def _reference_tree(x_nd, coords, leaves, depth):
  out = []
  for x in x_nd:
    node = 0
    for _ in range(depth):
      node = 2 * node + (2 if x[coords[node]] > 0 else 1)
    out.append(leaves[node - (2**depth - 1)])
  return np.asarray(out)


def test_decision_tree_targets_match_a_loop_reference():
  depth = 3
  x = jax.random.normal(jax.random.key(1), (2, 7, 5), jnp.float64)
  f = training.decision_tree_targets(jax.random.key(2), x, depth)
  key_coord, key_leaf = jax.random.split(jax.random.key(2))
  coords = np.asarray(jax.random.randint(key_coord, (2, 2**depth - 1), 0, 5))
  leaves = np.asarray(jax.random.normal(key_leaf, (2, 2**depth), jnp.float64))
  for b in range(2):
    np.testing.assert_array_equal(f[b], _reference_tree(np.asarray(x[b]), coords[b], leaves[b], depth))
  prompts = training.sample_prompts(jax.random.key(0), every_prefix_data(family="decision_tree"),
                                    batch_size=4)
  assert prompts.y_support.shape == (4, 5) and np.all(np.isfinite(prompts.y_query))


# ----------------------------------------------------------------------------------------------
# Model, loss, prediction.


def _small_model(data, **model_overrides):
  """A 2-layer softmax + MLP + LayerNorm model in float64, initialised by the (cached) jitted init."""
  spec = dict(num_layers=2, width=16, num_heads=2, head_dim=8, mlp_hidden=16, attention="softmax",
              norm="layernorm")
  spec.update(model_overrides)
  config = training.TrainConfig(model=training.ModelSpec(**spec), data=data, dtype="float64",
                                batch_size=2, final_eval=False)
  graphdef, state = training.init_state(config, training.make_mesh(jax.devices()[:1]))
  model, _ = nnx.merge(graphdef, state)
  return config, model


@pytest.fixture(scope="module")
def every_prefix_model():
  config, model = _small_model(every_prefix_data())
  return config, model, training.training_batch(config, step=0)


@pytest.fixture(scope="module")
def query_model():
  return _small_model(training.DataSpec(input_dim=4, num_support=6, num_query=3))


def test_every_prefix_prediction_reads_only_earlier_pairs(every_prefix_model):
  """d prediction_i / d tokens is zero from y-token i on: causality through gradients."""
  config, model, batch = every_prefix_model
  data, n = config.data, config.data.num_points
  jacobian = jax.jit(jax.jacrev(lambda t: train_data.readout(data, model(t).outputs)[0]))(
      batch.tokens)
  assert jacobian.shape == (n,) + batch.tokens.shape
  for i in range(n):
    assert np.all(jacobian[i, 0, 2 * i + 1:] == 0), f"prediction {i} reads y_{i} or a later token"
    assert np.any(jacobian[i, 0, 2 * i] != 0)
  assert np.all(jacobian[:, 1:] == 0)  # prompts of a batch do not mix.


def test_query_predictions_are_independent_under_prefix_mask(query_model):
  config, model = query_model
  prompts = training.sample_prompts(jax.random.key(3), config.data, batch_size=2)
  predict = training.make_predict_fn(model, config.data)
  base = predict(prompts.x_support, prompts.y_support, prompts.x_query)
  moved = prompts.x_query.at[:, 1:].multiply(-3.0)
  changed = predict(prompts.x_support, prompts.y_support, moved)
  np.testing.assert_array_equal(base[:, 0], changed[:, 0])
  assert not np.allclose(base[:, 1:], changed[:, 1:])


def test_every_prefix_predict_matches_the_full_sequence(every_prefix_model):
  config, model, batch = every_prefix_model
  data = config.data
  full = train_data.readout(data, model(batch.tokens).outputs)
  layout = prompt_lib.make_interleaved_layout(data.num_points, data.input_dim)
  x = batch.tokens[..., layout.feature_slice("x")][:, 0::2]
  y = batch.targets
  k = 3
  pred = training.make_predict_fn(model, data)(x[:, :k], y[:, :k], x[:, k:k + 2])
  # Query j of predict is point k of its own sequence; query 0 equals the full sequence's point k.
  # Float64 with O(1) activations over a 12-token sequence: rounding differences stay ~1e-15.
  np.testing.assert_allclose(pred[:, 0], full[:, k], rtol=1e-12, atol=1e-12)


def test_predict_zero_pads_lower_input_dims_and_rejects_higher(query_model):
  config, model = query_model
  prompts = training.sample_prompts(jax.random.key(4), config.data, batch_size=2, input_dim=2)
  padded = [train_data.pad_inputs(a, 4) for a in (prompts.x_support, prompts.x_query)]
  predict = training.make_predict_fn(model, config.data)
  low = predict(prompts.x_support, prompts.y_support, prompts.x_query)
  full = predict(padded[0], prompts.y_support, padded[1])
  np.testing.assert_array_equal(low, full)
  with pytest.raises(ValueError, match="input_dim=4"):
    predict(jnp.zeros((2, 6, 5)), prompts.y_support, jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="y_support"):
    predict(padded[0], prompts.y_support[:, :3], padded[1])
  with pytest.raises(ValueError, match="NaN or Inf"):
    predict(padded[0].at[0, 0, 0].set(jnp.nan), prompts.y_support, padded[1])


def test_loss_is_weighted_mean_squared_error(every_prefix_model):
  config, model, batch = every_prefix_model
  data = config.data
  weights = batch.weights.at[:, 3:].set(0.0)
  pred = train_data.readout(data, model(batch.tokens).outputs)
  expected = jnp.sum(jnp.square(pred - batch.targets)[:, :3]) / (2 * 3)
  loss = training.loss_fn(model, batch._replace(weights=weights), data)
  np.testing.assert_allclose(loss, expected, rtol=1e-13)


# ----------------------------------------------------------------------------------------------
# Optimizer.


def test_schedules():
  optim = training.OptimSpec(learning_rate=1.0, warmup_steps=10, final_learning_rate_fraction=0.1)
  schedule = training.learning_rate_schedule(optim, num_steps=110)
  values = np.asarray([schedule(s) for s in (0, 5, 10, 60, 110, 200)])
  # Warmup is linear, the cosine is at its midpoint after half the decay, and ends at 0.1.
  np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
  constant = training.learning_rate_schedule(
      dataclasses.replace(optim, schedule="constant"), num_steps=110)
  np.testing.assert_allclose([constant(s) for s in (0, 5, 10, 1000)], [0.0, 0.5, 1.0, 1.0])
  no_warmup = training.learning_rate_schedule(training.OptimSpec(learning_rate=0.3,
                                                                 schedule="constant"), 5)
  np.testing.assert_allclose(no_warmup(0), 0.3, rtol=1e-7)


def test_weight_decay_spares_biases_and_norms(every_prefix_model):
  _, model, _ = every_prefix_model
  mask = train_optim.decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert mask["blocks"]["query"] and mask["blocks"]["mlp_in"] and mask["embed"]["kernel"]
  assert not mask["embed"]["bias"] and not mask["blocks"]["mlp_in_bias"]
  assert not mask["blocks"]["attn_norm_scale"] and not mask["final_norm_scale"]


# ----------------------------------------------------------------------------------------------
# Training runs.


def _state_leaves(result):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state((result.model, result.optimizer)))]


def test_training_is_deterministic_and_learns():
  config = tiny_config(num_steps=40, log_every=10, optim=training.OptimSpec(learning_rate=3e-3))
  first = training.train(config)
  second = training.train(config)
  losses = [h["loss"] for h in first.history if "loss" in h]
  assert losses == [h["loss"] for h in second.history if "loss" in h]
  for a, b in zip(_state_leaves(first), _state_leaves(second)):
    np.testing.assert_array_equal(a, b)
  assert losses[-1] < 0.5 * losses[0]
  assert isinstance(first.optimizer, nnx.Optimizer) and int(first.optimizer.step[...]) == 40
  assert first.model.config == training.model_config(config)
  record = first.history[0]
  assert {"step", "loss", "grad_norm", "learning_rate", "steps_per_sec"} <= set(record)


@pytest.mark.parametrize("model_spec", [
    # Softmax + MLP + LayerNorm also trains in tests/test_sharding.py.
    pytest.param(dict(num_layers=2, attention="softmax", mlp_hidden=16, norm="layernorm"),
                 marks=pytest.mark.slow),
    dict(num_layers=3, attention="linear", mlp_hidden=16, norm="rmsnorm", tied_layers=True),
    pytest.param(dict(num_layers=16, attention="linear", attention_scale=1 / 7, qkv_init_scale=0.5),
                 marks=pytest.mark.slow),
])
def test_model_variants_train(model_spec):
  config = tiny_config(model=training.ModelSpec(width=8, head_dim=4, num_heads=2, **model_spec),
                       num_steps=2, log_every=1)
  result = training.train(config)
  assert all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)
  params = nnx.state(result.model, nnx.Param)
  layers = 1 if model_spec.get("tied_layers") else model_spec["num_layers"]
  assert params["blocks"]["query"][...].shape[0] == layers


def test_every_prefix_curriculum_run_compiles_once_per_stage_shape():
  config = tiny_config(data=every_prefix_data(family="decision_tree"),
                       curriculum=training.CurriculumSpec(input_dim_start=2, num_support_start=2,
                                                          num_support_increment=2, interval=2),
                       num_steps=4, log_every=2)
  result = training.train(config)
  stages = [(h["input_dim"], h["num_support"]) for h in result.history if "loss" in h]
  assert stages == [(2, 2), (3, 4)]
  assert all(np.isfinite(h["loss"]) for h in result.history if "loss" in h)


# ----------------------------------------------------------------------------------------------
# Divergence.


def test_non_finite_step_stops_the_run_at_that_step(tmp_path, monkeypatch):
  """A NaN batch at step 5 (between the checkpoints at 4 and 6, logs only at 8): the run stops
  there, names step 5, and keeps only the finite checkpoints before it."""
  real_make_batch_fn = training_loop.make_batch_fn

  def make_batch_fn(config, mesh):
    batch_at = real_make_batch_fn(config, mesh)
    return lambda step: (batch_at(step)._replace(targets=batch_at(step).targets * jnp.nan)
                         if step + 1 == 5 else batch_at(step))

  monkeypatch.setattr(training_loop, "make_batch_fn", make_batch_fn)
  config = tiny_config(num_steps=8, log_every=8, checkpoint_every=2, keep_checkpoints=8)
  with pytest.raises(training.DivergenceError,
                     match="diverged at step 5: loss nan.*last checkpoint is step 4.*learning rate"
                     ) as info:
    training.train(config, str(tmp_path))
  assert info.value.step == 5 and info.value.last_checkpoint == 4
  assert checkpointing.checkpoint_steps(str(tmp_path)) == [2, 4]
  assert training.load_trained(str(tmp_path)).step == 4  # load_trained refuses non-finite states


def test_loop_step_keeps_the_run_unhealthy():
  config = tiny_config()
  mesh = training.make_mesh(jax.devices()[:1])
  step_fn = training_loop.loop_step_fn(config, mesh)
  _, state = training.init_state(config, mesh)
  batch = training.training_batch(config, 0)
  state, healthy, metrics = step_fn(state, batch, jnp.asarray(True))
  assert bool(healthy) and bool(metrics["finite"])
  # A finite step after a bad one does not make the run healthy again.
  _, healthy, metrics = step_fn(state, batch, jnp.asarray(False))
  assert not bool(healthy) and bool(metrics["finite"])


# ----------------------------------------------------------------------------------------------
# Structure.

_TRAINING_MODULES = ("train_config", "train_data", "train_optim", "training", "train_eval",
                     "train_metrics", "checkpointing", "trained")


_SRC = pathlib.Path(__file__).parent.parent / "kcg" / "_src"


def _kcg_imports(name):
  """(module-level, function-local) `kcg._src` modules that `kcg/_src/<name>.py` imports."""
  tree = ast.parse((_SRC / f"{name}.py").read_text())
  top, local = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "kcg._src":
      names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kcg._src."):
      names = {node.module.split(".")[2]}
    else:
      continue
    (top if node in tree.body else local).update(names)
  return top, local


def test_training_modules_import_one_way():
  graph = {}
  for name in _TRAINING_MODULES:
    top, local = _kcg_imports(name)
    assert not local, f"{name} imports {local} inside a function"
    graph[name] = top & set(_TRAINING_MODULES)
  # Checkpointing reads only the config; the config and the data know nothing of training.
  assert graph["checkpointing"] == {"train_config"}
  assert graph["train_config"] == set() and graph["train_data"] == {"train_config"}
  assert "train_eval" not in graph["train_config"] | graph["train_data"] | graph["checkpointing"]

  def visit(name, path):
    assert name not in path, f"import cycle {' -> '.join(path + (name,))}"
    for dep in graph[name]:
      visit(dep, path + (name,))

  for name in graph:
    visit(name, ())
  for name in _TRAINING_MODULES:
    assert (_SRC / f"{name}.py").read_text().count("\n") <= 800, f"{name}.py is over 800 lines"
