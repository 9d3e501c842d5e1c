"""kcg.training.train_group: models of one structure trained together equal each trained alone.

Tolerance. The group runs `vmap` of the single-model step, so XLA may order the sums of the batched
matrix products differently from the single model's: each gradient then differs by float64 rounding
(~1e-16 relative times the few hundred terms of a sum), and Adam's normalised updates pass a relative
gradient error on as a relative error of at most about the same size per step. After the few steps
here parameters (O(1)) and moments agree to ~1e-15 (measured: at most 2e-16); the tests allow 1e-12
(rtol) and 1e-14 (atol, for moments near 0). A wrong seed, data stream or task gives O(1) differences.
"""

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from kcg import training
from kcg._src import checkpointing

RTOL, ATOL = 1e-12, 1e-14


def tiny_config(seed=0, **data) -> training.TrainConfig:
  """Two softmax layers (the layer scan runs under vmap) on 3-d regression, float64."""
  return training.TrainConfig(
      model=training.ModelSpec(num_layers=2, width=8, num_heads=2, head_dim=4, attention="softmax"),
      data=training.DataSpec(**{"input_dim": 3, "num_support": 5, "num_query": 2, **data}),
      optim=training.OptimSpec(learning_rate=3e-3, warmup_steps=2),
      num_steps=6, batch_size=8, seed=seed, dtype="float64", log_every=2, checkpoint_every=2,
      keep_checkpoints=3, eval_batch_size=8, final_eval=False)


def group_configs():
  # Different seeds and tasks: noise, a fixed ill-conditioned covariance, a noiseless family.
  return [tiny_config(0, family="noisy_linear"),
          tiny_config(5, family="noisy_linear", noise_std=0.3),
          tiny_config(7, family="linear", condition_number=10.0, input_rotation="fixed")]


def _leaves(result):
  return [np.asarray(a) for a in jax.tree.leaves(nnx.state((result.model, result.optimizer)))]


def _assert_same_run(group_result, alone):
  for a, b in zip(_leaves(group_result), _leaves(alone)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  assert group_result.step == alone.step
  assert len(group_result.history) == len(alone.history)
  for g, s in zip(group_result.history, alone.history):
    assert g["step"] == s["step"] and g["learning_rate"] == s["learning_rate"]
    np.testing.assert_allclose(g["loss"], s["loss"], rtol=RTOL)
    np.testing.assert_allclose(g["grad_norm"], s["grad_norm"], rtol=RTOL)


@pytest.fixture(scope="module")
def alone():
  return [training.train(c) for c in group_configs()]


def test_group_equals_each_model_trained_alone(alone):
  configs = group_configs()
  results = training.train_group(configs)
  for result, single in zip(results, alone):
    _assert_same_run(result, single)
  # The models really differ (seeds and data): the check above is not comparing copies.
  query = lambda r: np.asarray(nnx.state(r.model)["blocks"]["query"][...])
  assert not np.allclose(query(results[0]), query(results[1]), rtol=0.1)


def test_group_resumes_each_model_and_saves_loadable_checkpoints(alone, tmp_path):
  configs = group_configs()
  workdirs = [str(tmp_path / f"m{i}") for i in range(3)]
  # Model 2 is already finished alone and model 1 stopped at step 2 by a group: the call resumes
  # 0 from scratch, 1 from its step 2 (a sub-group of its own) and only loads 2.
  training.train(configs[2], workdirs[2])
  training.train_group(configs[:2], workdirs[:2], stop_at_step=2)
  assert checkpointing.checkpoint_steps(workdirs[1]) == [2]
  shutil.rmtree(workdirs[0])
  results = training.train_group(configs, workdirs)
  for result, single, workdir in zip(results, alone, workdirs):
    for a, b in zip(_leaves(result), _leaves(single)):
      np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    assert checkpointing.checkpoint_steps(workdir) == [2, 4, 6]
    loaded = training.load_trained(workdir)
    assert loaded.step == 6 and loaded.config == configs[workdirs.index(workdir)]
    for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)),
                    jax.tree.leaves(nnx.state(result.model))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # metrics.jsonl reads like the run alone: one record per logged step.
  assert [h["step"] for h in training.load_history(workdirs[1])] == [2, 4, 6]


def test_divergence_in_one_model_stops_the_group_and_names_it(tmp_path):
  configs = group_configs()
  # Targets of size 1e300 square to inf: the loss of that model is not finite at step 1.
  configs[1] = tiny_config(5, family="noisy_linear", noise_std=1e300)
  workdirs = [str(tmp_path / name) for name in ("a", "b", "c")]
  with pytest.raises(training.DivergenceError,
                     match=r"Model b: training diverged at step 1: loss (inf|nan).*no checkpoint") as info:
    training.train_group(configs, workdirs, names=["a", "b", "c"])
  assert info.value.model == "b" and info.value.step == 1
  assert all(checkpointing.checkpoint_steps(w) == [] for w in workdirs)


def test_group_rejects_configs_of_different_structure():
  configs = [tiny_config(0), dataclasses.replace(tiny_config(1), num_steps=8)]
  with pytest.raises(ValueError, match=r"configs\[1\] differs from configs\[0\] in num_steps: 6 -> 8"
                     ".*group_by_structure"):
    training.train_group(configs)
  with pytest.raises(ValueError, match="2 configs but 1 workdirs"):
    training.train_group(group_configs()[:2], ["/tmp/x"])
  with pytest.raises(ValueError, match="same workdir twice"):
    training.train_group(group_configs()[:2], ["/tmp/x", "/tmp/x"])
  with pytest.raises(ValueError, match="at least one"):
    training.train_group([])


def test_group_by_structure():
  deeper = dataclasses.replace(tiny_config(3), model=dataclasses.replace(tiny_config().model,
                                                                       num_layers=3))
  configs = group_configs() + [deeper, tiny_config(9, noise_std=0.1)]
  assert training.group_by_structure(configs) == [[0, 1, 2, 4], [3]]
