"""experiments/bench.py: the baselines compute CG, the smoke run writes its outputs, scaling works.

Tolerances. The baselines are checked in float64 against kcg.solvers (independent implementations
of the same t-step CG and of the closed form) on well-conditioned prompts (cond(K + ridge I) < 1e3):
reordering errors ~ t * cond * eps ~ 1e-11, so 1e-9 relative leaves a 100x margin. The smoke run is
float32 (the benchmark's precision): compiled and plain CG agree to ~cond * eps32 ~ 1e-5; 1e-3.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kcg
from experiments import bench
from experiments import bench_training
from experiments.configs import bench as bench_config


def _prompts(batch=3, k=12, p=5, q=2, seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((batch, k, p)) / np.sqrt(p)
  ys = rng.standard_normal((batch, k))
  xq = rng.standard_normal((batch, q, p)) / np.sqrt(p)
  return jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(xq)


@pytest.mark.parametrize("name", ["plain_cg", "plain_cg_kernel", "jax_cg_vmap"])
def test_dual_baselines_equal_reference_cg(name):
  xs, ys, xq = _prompts()
  ridge, t = 0.5, 4
  want = kcg.solvers.cg_predict(xs, ys, xq, ridge, t)[:, -1]
  got = bench.BASELINES[name](xs, ys, xq, ridge=ridge, num_steps=t)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_primal_baseline_equals_reference_primal_cg():
  xs, ys, xq = _prompts()
  want = kcg.solvers.primal_cg_predict(xs, ys, xq, 0.5, 3)[:, -1]
  got = bench.plain_cg_primal(xs, ys, xq, ridge=0.5, num_steps=3)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_cholesky_equals_closed_form():
  xs, ys, xq = _prompts()
  want = kcg.solvers.krr_predict(xs, ys, xq, 0.5)
  np.testing.assert_allclose(bench.cholesky(xs, ys, xq, ridge=0.5, num_steps=0), want,
                             rtol=1e-9, atol=1e-12)


def test_parse_point_and_errors():
  assert bench.parse_point("256x1024x64x16") == (256, 1024, 64, 16)
  assert bench.parse_point("1x64x16", 3) == (1, 64, 16)
  for bad in ("256x1024x64", "0x1x1x1", "ax1x1x1", "1x2x3x4x5"):
    with pytest.raises(ValueError, match="B x k x p x t"):
      bench.parse_point(bad)


def test_unknown_section_or_method_raises(tmp_path):
  config = bench_config.get_config("smoke")
  with pytest.raises(ValueError, match="Unknown sections"):
    bench.run(config, str(tmp_path), sections=["forwards"])
  config.methods = ("plain_cg", "magic")
  with pytest.raises(ValueError, match="Unknown methods"):
    bench.run(config, str(tmp_path), sections=["forward"])
  with pytest.raises(ValueError, match="Unknown config variant"):
    bench_config.get_config("huge")


def test_cost_model_counts_the_dominant_terms():
  """FLOP model: the compiled dual-prefix forward is dominated by dense per-token work."""
  compiled = kcg.compile_cg(64, 16, 2, 0.1, mask="prefix", dtype=jnp.float32)
  point = bench.Point(2, 64, 16, 2)
  terms = bench.forward_flops(compiled.config, 2, 66, 65)
  cfg = compiled.config
  assert terms["mlp"] == cfg.num_layers * 4.0 * 2 * 66 * cfg.width * cfg.mlp_hidden
  assert bench.compiled_flops(cfg, point, 2, 1) == pytest.approx(sum(terms.values()))
  assert bench.plain_cg_flops(point, 2) == 4.0 * 2 * 64 * 16 * 2


def test_scaled_batch_ratios_use_baseline_at_the_same_batch(tmp_path):
  """A compiled method over its FLOP budget runs on fewer prompts; its ratio is against plain CG
  timed at that batch on the same prompts, and the reason is recorded."""
  config = bench_config.get_config("smoke")
  config.methods = ("plain_cg", "compiled_dual_prefix")
  config.compiled_flop_budget = 1.0  # forces B' = 1
  rows = bench.run_point(bench.Point(3, 8, 4, 2), config, "target")
  by = {(r["method"], r["timed_batch"]): r for r in rows}
  assert set(by) == {("plain_cg", 3), ("plain_cg", 1), ("compiled_dual_prefix", 1)}
  compiled = by[("compiled_dual_prefix", 1)]
  assert "compiled_flop_budget" in compiled["scaled_reason"]
  assert compiled["ratio_to_plain_cg"] == pytest.approx(
      compiled["seconds"] / by[("plain_cg", 1)]["seconds"])
  assert compiled["extrapolated_ratio_at_full_batch"] == pytest.approx(
      compiled["seconds"] * 3 / by[("plain_cg", 3)]["seconds"])
  assert compiled["max_rel_diff_vs_reference"] < 1e-3


def test_smoke_run_writes_outputs(tmp_path):
  config = bench_config.get_config("smoke")
  results = bench.run(config, str(tmp_path), command="test")
  for name in ("bench.json", "bench.md", "time_vs_k.png"):
    assert os.path.getsize(tmp_path / name) > 0
  with open(tmp_path / "bench.json") as f:
    saved = json.load(f)
  assert set(saved) >= {"machine", "probe", "forward", "linearity", "compile", "attention",
                        "ablation", "train", "command"}
  methods = {r["method"] for r in results["forward"]}
  assert methods == set(bench_config.METHODS)
  for row in results["forward"]:
    assert row["seconds"] > 0 and row["ratio_to_plain_cg"] > 0
    if row["method"] in bench.COMPILED:
      assert row["max_rel_diff_vs_reference"] < 1e-3, row
      assert row["flop_ratio_to_plain"] > 1
  assert set(results["linearity"]) == set(bench_config.METHODS)
  assert [r["num_steps"] for r in results["compile"]] == [2, 2]
  assert {r["auto_picks"] for r in results["attention"]} == {"quadratic", "associative"}
  assert np.isfinite(results["train"][0]["losses"]).all()
  assert "| plain_cg |" in (tmp_path / "bench.md").read_text()
  throughput = saved["training_throughput"]
  names = [r["implementation"] for r in throughput["rows"]]
  if bench_training.import_torch() is None:
    assert "pip install" in throughput["torch"]["skipped"]
  else:  # torch installed (the "bench" extra): its rows are the ratios' denominators
    assert {"torch_gpt2_step", "torch_gpt2_forward"} <= set(names)
    for row in throughput["rows"]:
      assert row["ratio_to_torch_median"] > 0
  assert "| kcg_gpt_icl_step |" in (tmp_path / "bench.md").read_text()


def test_training_throughput_without_torch_skips_those_rows_and_says_so(tmp_path, monkeypatch,
                                                                         capsys):
  """CI never installs PyTorch: its rows are skipped, and the output and JSON say why."""
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  monkeypatch.setitem(sys.modules, "transformers", None)
  config = bench_config.get_config("smoke")
  results = bench.run(config, str(tmp_path), sections=["training_throughput"], command="test")
  throughput = results["training_throughput"]
  assert throughput["torch"] == {"skipped": bench_training.TORCH_MISSING}
  assert "pip install -e \".[bench]\"" in bench_training.TORCH_MISSING
  assert bench_training.TORCH_MISSING in capsys.readouterr().out
  assert bench_training.TORCH_MISSING in (tmp_path / "bench.md").read_text()
  with open(tmp_path / "bench.json") as f:
    assert json.load(f)["training_throughput"]["torch"] == throughput["torch"]
  assert [r["implementation"] for r in throughput["rows"]] == [
      "kcg_gpt_icl_step", "nnx_reference_step", "kcg_forward", "nnx_reference_forward"]
  assert set(throughput["peak_flops_per_s_by_framework"]) == {"jax"}
  for row in throughput["rows"]:
    assert "ratio_to_torch_median" not in row
    assert len(row["seconds"]) == config.throughput.rounds
    assert row["median_s"] > 0 and row["fraction_of_peak"] > 0


def test_flop_formula_counts_every_matmul_of_the_jaxpr():
  """The analytic count equals the dot_generals of the traced forward (kcg and the NNX reference);
  a training step's backward forms two matmuls per forward matmul except the embedding's input
  gradient, so the step has 3 x forward - 2 N F D."""
  from flax import nnx
  from kcg._src import model as model_lib

  shape = bench_training.Shape(num_layers=3, width=16, num_heads=2, head_dim=8, mlp_hidden=24,
                                 input_dim=3, num_points=5, batch_size=2)
  token_dim = 5
  tokens = jnp.ones((shape.batch_size, shape.num_tokens, token_dim), jnp.float32)
  forward = bench_training.transformer_flops(shape, token_dim, training_step=False)
  config = model_lib.ModelConfig(
      token_dim=token_dim, width=16, num_layers=3, num_heads=2, head_dim=8, mlp_hidden=24,
      attention="softmax", activation="gelu", norm="layernorm", param_dtype=jnp.float32)
  for model in (model_lib.Transformer(config, rngs=nnx.Rngs(0)),
                bench_training.ReferenceGPT(shape, token_dim, rngs=nnx.Rngs(0))):
    graphdef, state = nnx.split(model)

    def apply(state, tokens, graphdef=graphdef):
      out = nnx.merge(graphdef, state)(tokens)
      return out.outputs if isinstance(out, model_lib.ForwardOutput) else out

    assert bench_training.jaxpr_dot_flops(apply, state, tokens) == forward
    grad = jax.grad(lambda state, tokens: jnp.sum(apply(state, tokens)))
    n = shape.batch_size * shape.num_tokens
    assert bench_training.jaxpr_dot_flops(grad, state, tokens) == (
        bench_training.transformer_flops(shape, token_dim, training_step=True)
        - 2.0 * n * token_dim * shape.width)


def test_gpt_icl_step_is_timed_at_the_final_curriculum_stage():
  shape = bench_training.Shape(12, 256, 8, 32, 1024, 20, 41, 64)
  config = bench_training.gpt_icl_train_config(shape, 1e-4)
  step = bench_training.final_stage_step(config)
  assert step == 30_000  # d: 5 -> 20 by 1, k: 10 -> 40 by 2, every 2000 steps
  assert kcg.training.curriculum_stage(config, step - 1) != (20, 40)
  assert (config.model.num_layers, config.model.width, config.batch_size) == (12, 256, 64)
