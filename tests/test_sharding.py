"""Data parallelism over a mesh of (forced host) CPU devices matches a single-device run."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from kcg import training


def tiny_config(**overrides) -> training.TrainConfig:
  base = dict(model=training.ModelSpec(num_layers=2, width=8, head_dim=4, num_heads=2,
                                       mlp_hidden=8, attention="softmax", norm="layernorm"),
              data=training.DataSpec(input_dim=3, num_support=6, num_query=2),
              num_steps=4, batch_size=8, log_every=2, dtype="float64", final_eval=False)
  base.update(overrides)
  return training.TrainConfig(**base)


@pytest.fixture(scope="module")
def devices():
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 (conftest)")
  return devices[:4]


def test_sharded_run_matches_single_device(devices):
  config = tiny_config()
  sharded = training.train(config, devices=devices)
  single = training.train(config, devices=devices[:1])
  leaves_sharded = jax.tree.leaves(nnx.state((sharded.model, sharded.optimizer)))
  leaves_single = jax.tree.leaves(nnx.state((single.model, single.optimizer)))
  for a, b in zip(leaves_sharded, leaves_single):
    # Only the order of the batch reduction differs (per-device partial sums, then an all-reduce):
    # float64 rounding ~1e-16 relative, amplified by 4 Adam steps whose update divides by
    # sqrt(v) + eps; 1e-9 leaves a wide margin and still fails on any real difference.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
  for a in leaves_sharded:
    assert a.sharding.spec == PartitionSpec() and len(a.sharding.device_set) == 4
  losses = [h["loss"] for h in sharded.history], [h["loss"] for h in single.history]
  np.testing.assert_allclose(*losses, rtol=1e-12)


def test_batches_are_split_over_the_data_axis(devices):
  config = tiny_config()
  mesh = training.make_mesh(devices)
  batch = training.make_batch_fn(config, mesh)(0)
  for array in batch:
    assert array.sharding.spec == PartitionSpec("data")
    assert {s.data.shape[0] for s in array.addressable_shards} == {2}
  np.testing.assert_array_equal(batch.tokens, training.training_batch(config, 0).tokens)


def test_batch_that_does_not_divide_raises(devices):
  with pytest.raises(ValueError, match="batch_size=6 does not divide across the 4 devices"):
    training.train(tiny_config(batch_size=6), devices=devices)


def test_evaluation_runs_on_one_device(devices):
  """Training leaves the parameters replicated over the mesh; predictions (and so every evaluation
  program) run once, on one device, not once per device (see kcg._src.train_eval)."""
  config = tiny_config(num_steps=1)
  result = training.train(config, devices=devices)
  prompts = training.sample_prompts(jax.random.key(0), config.data, batch_size=4)
  pred = training.make_predict_fn(result.model, config.data)(
      prompts.x_support, prompts.y_support, prompts.x_query)
  assert len(pred.sharding.device_set) == 1
  evaluation = training.evaluate_trained(result.model, config, jax.random.key(1), num_prompts=16)
  assert np.isfinite(evaluation["in_distribution"]["mse"])
