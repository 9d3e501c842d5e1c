"""The bench's `study_training` section: the study's training, each model alone against train_group.

For each structure group of the study's models (`experiments.study.main_runs` and `sweep_runs` at
a scale), times `steps` training steps (batch drawing included, compilation excluded) of every
model alone (`kcg.training`'s loop step, one model after another: the study before grouping) and of
the group together (`kcg.training`'s `jit(vmap(step))`), in wall-clock and process CPU seconds, and
the first call (compilation) of each. The study's training time is extrapolated as
`models x num_steps x per-step time` plus one compilation per model (alone: the step is cached per
config, so every seed compiles again) or per group (together).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from experiments import study as study_binary
from experiments.configs import study as study_config
from kcg import training
from kcg._src import train_group as group_lib
from kcg._src import training as loop_lib


def _clock() -> tuple[float, float]:
  return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
  wall, cpu = _clock()
  return wall - start[0], cpu - start[1]


def _alone(configs, steps: int, mesh) -> dict:
  """Every model's own loop: `steps` steps each, after one (compiling) first step each."""
  first, timed = [0.0, 0.0], [0.0, 0.0]
  for config in configs:
    loop_lib.loop_step_fn.cache_clear()  # Alone, every config compiles its own step.
    step_fn = loop_lib.loop_step_fn(config, mesh)
    batch_at = loop_lib.make_batch_fn(config, mesh)
    _, state = loop_lib.init_state(config, mesh)
    healthy = jax.device_put(jnp.asarray(True), loop_lib.replicated(mesh))
    start = _clock()
    state, healthy, metrics = step_fn(state, batch_at(0), healthy)
    jax.block_until_ready(metrics)
    first = [a + b for a, b in zip(first, _since(start))]
    start = _clock()
    for step in range(1, steps + 1):
      state, healthy, metrics = step_fn(state, batch_at(step), healthy)
    jax.block_until_ready(metrics)
    timed = [a + b for a, b in zip(timed, _since(start))]
  return {"first_wall_s": first[0], "first_cpu_s": first[1], "wall_s": timed[0],
          "cpu_s": timed[1]}


def _together(configs, steps: int, mesh) -> dict:
  """The group's vmapped loop: `steps` steps after one (compiling) first step."""
  key = group_lib.structure_key(configs[0])
  group_lib.group_step_fn.cache_clear()
  step_fn = group_lib.group_step_fn(key, mesh)
  state = group_lib._group_init_fn(key, mesh)(jnp.asarray([c.seed for c in configs], jnp.int32))
  batch_at = group_lib.make_group_batch_fn(configs, mesh)

  healthy = jax.device_put(jnp.ones((len(configs),), bool), loop_lib.replicated(mesh))
  start = _clock()
  state, healthy, metrics = step_fn(state, batch_at(0), healthy)
  jax.block_until_ready(metrics)
  first = _since(start)
  start = _clock()
  for step in range(1, steps + 1):
    state, healthy, metrics = step_fn(state, batch_at(step), healthy)
  jax.block_until_ready(metrics)
  timed = _since(start)
  return {"first_wall_s": first[0], "first_cpu_s": first[1], "wall_s": timed[0], "cpu_s": timed[1]}


def run_study_training(scale: str, steps: int, only_groups: tuple[int, ...] = ()) -> dict:
  """Per structure group: per-model-step times alone and together, and the extrapolated totals
  (of the groups timed: `only_groups`, indices in `group_by_structure` order, or all)."""
  config = study_config.get_config(None if scale == "full" else scale)
  runs = {**study_binary.main_runs(config, None), **study_binary.sweep_runs(config, None)}
  names = list(runs)
  configs = [runs[n][0] for n in names]
  mesh = training.make_mesh()
  rows = []
  totals = {f"{mode}_{what}": 0.0 for mode in ("alone", "together") for what in ("wall_s", "cpu_s")}
  groups = training.group_by_structure(configs)
  for group in [groups[i] for i in only_groups] if only_groups else groups:
    members = [configs[i] for i in group]
    num, num_steps = len(members), members[0].num_steps
    alone = _alone(members, steps, mesh)
    together = _together(members, steps, mesh)
    row = {"models": [str(names[i]) for i in group], "num_models": num, "num_steps": num_steps,
           "layers": members[0].model.num_layers, "attention": members[0].model.attention}
    for mode, t, compiles in (("alone", alone, num), ("together", together, 1)):
      for what in ("wall_s", "cpu_s"):
        per_step = t[what] / (steps * num)
        first = t[f"first_{what}"] / compiles
        row[f"{mode}_step_{what}"] = per_step  # per model and step
        row[f"{mode}_first_{what}"] = first  # per compilation
        row[f"{mode}_total_{what}"] = num * num_steps * per_step + compiles * first
        totals[f"{mode}_{what}"] += row[f"{mode}_total_{what}"]
    rows.append(row)
    print(f"[study_training] {scale} {row['attention']} L={row['layers']} x{num}: per model-step "
          f"alone {row['alone_step_cpu_s'] * 1e3:.2f} ms CPU ({row['alone_step_wall_s'] * 1e3:.2f} "
          f"wall), together {row['together_step_cpu_s'] * 1e3:.2f} ms CPU "
          f"({row['together_step_wall_s'] * 1e3:.2f} wall)")
  print(f"[study_training] {scale}: extrapolated training alone {totals['alone_cpu_s']:.0f} s CPU "
        f"({totals['alone_wall_s']:.0f} s wall), together {totals['together_cpu_s']:.0f} s CPU "
        f"({totals['together_wall_s']:.0f} s wall)")
  return {"scale": scale, "timed_steps": steps, "groups": rows, "totals": totals,
          "only_groups": list(only_groups), "num_groups": len(groups)}


def format_study_training(result: dict) -> str:
  timed = (f"groups {result['only_groups']} of {result['num_groups']}" if result["only_groups"]
           else f"all {result['num_groups']} groups")
  parts = [f"Study training at scale `{result['scale']}`, {timed} ({result['timed_steps']} timed "
           "steps per "
           "model; per model and step; totals extrapolated to the config's steps, compilation "
           "included):", "",
           "| group | models | steps | alone CPU | alone wall | together CPU | together wall |",
           "|---|---|---|---|---|---|---|"]
  for r in result["groups"]:
    parts.append(f"| {r['attention']} L={r['layers']} | {r['num_models']} | {r['num_steps']} | "
                 f"{r['alone_step_cpu_s'] * 1e3:.2f} ms | {r['alone_step_wall_s'] * 1e3:.2f} ms | "
                 f"{r['together_step_cpu_s'] * 1e3:.2f} ms | "
                 f"{r['together_step_wall_s'] * 1e3:.2f} ms |")
  t = result["totals"]
  parts += [f"| total of these groups (extrapolated) | | | {t['alone_cpu_s']:.0f} s | {t['alone_wall_s']:.0f} s | "
            f"{t['together_cpu_s']:.0f} s | {t['together_wall_s']:.0f} s |", ""]
  return "\n".join(parts)
