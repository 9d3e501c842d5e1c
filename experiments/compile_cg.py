r"""Compile t-step CG into a transformer, run it on in-context prompts, compare with the references.

  python -m experiments.compile_cg --workdir=DIR [--config=experiments/configs/compile_cg.py[:runlocal]]

See the config's docstring for the defaults and the expected runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging
import jax
import numpy as np

from experiments import _cli

import kcg
from kcg import analysis
from kcg import plotting

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "compile_cg.py")


def run(config, workdir: str) -> dict:
  """Samples prompts, compiles, compares; writes results.json and error_vs_t.png; returns results."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  with jax.enable_x64(bool(config.float64)):
    task = kcg.tasks.TaskConfig(**config.task.to_dict())
    prompts = kcg.tasks.sample(jax.random.key(config.seed), task)
    compiled = kcg.compile_cg(task.num_support, task.input_dim, config.num_steps, config.ridge,
                              mask=config.mask, form=config.form)
    dims = compiled.dimensions
    logging.info("Compiled %s: %d layers (%d per CG step), width %d, %d heads, MLP %d.",
                 compiled.program.name, dims.num_layers, dims.layers_per_step, dims.width,
                 dims.num_heads, dims.mlp_hidden)
    comparison = analysis.compare_steps(compiled, prompts.x_support, prompts.y_support,
                                        prompts.x_query, prompts.y_query)
    dtype = str(compiled.dtype)
  kappa = comparison.condition_numbers
  print(f"{compiled.program.name}: k={task.num_support}, p={task.input_dim}, ridge={config.ridge:g}, "
        f"mask={config.mask}, form={config.form}, {dims.num_layers} layers, width {dims.width}; "
        f"cond(K + ridge I) median {np.median(kappa):.3g} (max {kappa.max():.3g}); "
        f"bound holds: {comparison.bound_holds}")
  print("errors are RMS over prompts and queries relative to RMS(f*)")
  print(analysis.format_comparison(comparison, config.table_every))

  results = {
      "config": config.to_dict(),
      "task": dataclasses.asdict(task),
      "dtype": dtype,
      "construction": compiled.program.name,
      "dimensions": dims._asdict(),
      "steps": list(range(config.num_steps + 1)),
      **{name: [float(v) for v in getattr(comparison, name)]
         for name in ("compiled_vs_oracle", "reference_vs_oracle", "compiled_vs_reference",
                      "bound", "compiled_test_mse")},
      "oracle_test_mse": comparison.oracle_test_mse,
      "bound_holds": comparison.bound_holds,
      "condition_number": {"min": float(kappa.min()), "median": float(np.median(kappa)),
                           "max": float(kappa.max())},
      "runtime_s": time.time() - start,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, allow_nan=False)
  plot_path = os.path.join(workdir, "error_vs_t.png")
  plotting.error_curves(
      plot_path,
      {"compiled transformer": comparison.compiled_vs_oracle,
       "reference CG": comparison.reference_vs_oracle,
       "compiled vs reference": comparison.compiled_vs_reference},
      dashed={"theorem bound": comparison.bound},
      ylabel="relative error vs KRR oracle",
      title=(f"{compiled.program.name} ({dims.num_layers} layers), {task.family}, "
             f"k={task.num_support}, ridge={config.ridge:g}"))
  logging.info("Wrote %s in %.1f s.", workdir, results["runtime_s"])
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "results.json and error_vs_t.png")
