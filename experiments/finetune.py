r"""From compiled to trained: does gradient descent keep CG, and can it find it? Writes DIR/report.md.

  python -m experiments.finetune --config=experiments/configs/finetune.py[:runlocal] --workdir=DIR

For each task family (noisy linear regression on x; targets linear in a fixed random-ReLU feature layer,
which the compiled model's first layer computes), construction and t, trains the compiled model
(`kcg.finetune.fit`) in each mode and dtype on the task it solves, the same architecture from random
init, and (float32) random init imitating CG_t.
Writes DIR/results.json (per run: the evaluation history, the step it diverged at, CPU and wall
seconds), DIR/report.md (summary generated from the numbers, figures, tables) and the PNGs; models
(orbax checkpoints + history.json) in DIR/models/<family>_<construction>_t<t>_<run name>. A rerun
resumes.
All configs are checked before any training.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import jax

from experiments import _cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "finetune.py")


def _family_plan(config, features: str, family: dict) -> list[tuple]:
  """`[(Setup, Run)]` of one task family: `family` holds its constructions, modes, float64 modes and
  whether it runs the imitation."""
  from kcg import finetune  # pylint: disable=g-import-not-at-top

  unknown = set(family["modes"]) - set(finetune.MODES)
  if unknown or not family["modes"]:
    raise ValueError(f"config modes {tuple(family['modes'])} of features={features!r} must be a "
                     f"non-empty subset of {finetune.MODES}.")
  bad_dtypes = set(config.dtypes) - {"float32", "float64"}
  if bad_dtypes or not config.dtypes:
    raise ValueError(f"config.dtypes {tuple(config.dtypes)} must be a non-empty subset of "
                     "('float32', 'float64').")
  runs = []
  for construction in family["constructions"]:
    for t in config.cg_steps:
      setup = finetune.Setup(construction, num_steps=int(t), input_dim=int(config.input_dim),
                             num_support=int(config.num_support), num_query=int(config.num_query),
                             noise_std=float(config.noise_std), features=features,
                             feature_dim=int(config.feature_dim),
                             feature_seed=int(config.feature_seed))
      common = dict(batch_size=int(config.batch_size), eval_every=int(config.eval_every),
                    seed=int(config.seed), qkv_init_scale=float(config.qkv_init_scale))
      for dtype in config.dtypes:
        for mode in family["modes"]:
          if dtype == "float64" and mode not in family["float64_modes"]:
            continue
          lr = {"gains": config.gains_learning_rate, "compute_gains": config.gains_learning_rate,
                "random": config.random_learning_rate}.get(mode, config.learning_rate)
          warmup = config.random_warmup_steps if mode == "random" else 0
          runs.append((setup, finetune.Run(mode=mode, dtype=dtype, num_steps=int(config.num_steps),
                                           learning_rate=float(lr), warmup_steps=int(warmup),
                                           **common)))
      if family["imitate"]:
        runs.append((setup, finetune.Run(mode="random", task="imitate", dtype="float32",
                                         num_steps=int(config.imitate_steps),
                                         learning_rate=float(config.random_learning_rate),
                                         warmup_steps=int(config.random_warmup_steps), **common)))
  return runs


def plan(config) -> list[tuple]:
  """`[(key, Setup, Run)]` of every run the config asks for; ValueError for a bad config.

  The key is "<family>_<construction>_t<t>_<task>_<mode>_<dtype>" (`Setup.name`, `Run.name`).
  """
  from kcg import finetune  # pylint: disable=g-import-not-at-top

  unknown = set(config.features) - set(finetune.FEATURES)
  if unknown or not config.features or len(set(config.features)) != len(config.features):
    raise ValueError(f"config.features {tuple(config.features)} must be distinct entries of "
                     f"{tuple(finetune.FEATURES)}.")
  runs = []
  for features in config.features:
    if features == "identity":
      family = dict(constructions=config.constructions, modes=config.modes,
                    float64_modes=config.float64_modes, imitate=config.imitate)
    else:
      family = config.random_relu.to_dict()
    runs += _family_plan(config, features, family)
  return [(f"{s.name}_{r.name}", s, r) for s, r in runs]


def run(config, workdir: str) -> dict:
  """Trains every planned run (resuming), then writes results.json, the figures and report.md."""
  from experiments import finetune_report  # pylint: disable=g-import-not-at-top
  from kcg import finetune  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_enable_x64", True)
  runs = plan(config)
  os.makedirs(workdir, exist_ok=True)
  wall0, cpu0 = time.time(), time.process_time()
  results = {"scale": config.scale, "config": config.to_dict(), "runs": {}}
  for key, setup, run_spec in runs:
    w, c = time.time(), time.process_time()
    logging.info("run %s", key)
    fitted = finetune.fit(setup, run_spec, os.path.join(workdir, "models", key),
                          num_eval_prompts=int(config.num_eval_prompts), log=logging.info)
    results["runs"][key] = {
        "family": setup.family, "construction": setup.construction, "cg_steps": setup.num_steps,
        "features": setup.features, "feature_dim": setup.feature_dim, "mode": run_spec.mode,
        "task": run_spec.task, "dtype": run_spec.dtype, "learning_rate": run_spec.learning_rate,
        "ridge": setup.ridge, "num_steps": run_spec.num_steps, "diverged_at": fitted.diverged_at,
        "history": fitted.history, "wall_s": time.time() - w, "cpu_s": time.process_time() - c}
  results["wall_s"] = time.time() - wall0
  results["cpu_s"] = time.process_time() - cpu0
  results = finetune_report.write(workdir, results)
  logging.info("Wrote %s in %.0f s wall, %.0f s CPU.", workdir, results["wall_s"], results["cpu_s"])
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "report.md, results.json, the PNGs and models/")
