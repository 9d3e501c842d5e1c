"""Do trained transformers run KRR, by CG, on their own hidden features? Writes DIR/report.md.

    python -m experiments.alignment --config=experiments/configs/alignment.py:runlocal --workdir=DIR

Trains in-context learners on nonlinear task families and linear regression (`kcg.training`, into
DIR/models/<task>_<model>, resumed on a rerun; analyses cached in DIR/analysis/<name>.json), then runs `kcg.alignment.analyse_subject` on
each model and on a randomly initialised model of its architecture (the control), and the
y-nonlinearity of compiled references (`kcg.compile_cg`, PCG, Chebyshev). Writes DIR/report.md (a
summary generated from the numbers, then per task the agreement-vs-layer, kernel-alignment and graft
figures and the tables), DIR/results.json (top-level key "y_nonlinearity": model or compiled reference
-> index) and the PNGs. A bad config fails before any training. Analyses run in float64 (models train
in float32).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import zlib
from typing import Any

from absl import logging

from experiments import _cli

ARCHITECTURES = ("gpt", "fts", "lsa")
NONLINEAR_TASKS = ("relu_network", "kernel_prior", "logistic")
TASKS = ("linear",) + NONLINEAR_TASKS
_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "alignment.py")


def parse_model(name: str) -> tuple[str, int]:
  """`"gpt_L4"` -> `("gpt", 4)`; ValueError for anything else."""
  match = re.fullmatch(r"([a-z]+)_L(\d+)", str(name))
  if not match or match.group(1) not in ARCHITECTURES or int(match.group(2)) < 1:
    raise ValueError(f"unknown model {name!r}: models are '<arch>_L<depth>' with arch in "
                     f"{ARCHITECTURES} and depth >= 1, e.g. 'gpt_L4'.")
  return match.group(1), int(match.group(2))


def settings_from(config):
  """The analysis settings (`alignment.Settings`), validated."""
  from kcg import alignment  # pylint: disable=g-import-not-at-top
  a = config.analysis
  return alignment.Settings(
      readings=tuple(a.readings), candidates=tuple(a.candidates), max_steps=int(a.max_steps),
      layers=tuple(int(l) for l in a.layers) or None, relative_ridges=tuple(a.relative_ridges),
      rbf_bandwidths=tuple(a.rbf_bandwidths), num_bootstrap=int(a.num_bootstrap),
      graft_steps=int(config.graft.max_steps), graft_layers=tuple(int(l) for l in config.graft.layers)
      or None, graft_prompts=int(config.graft.num_prompts), probe_site=config.probes.site, probe_steps=tuple(int(s) for s in config.probes.steps),
      probe_folds=int(config.probes.num_folds), probe_ridge=float(config.probes.ridge),
      fit_metric=bool(a.fit_metric), metric_steps=int(a.metric_steps))


def _names(values) -> tuple[str, ...]:
  """A tuple of names; entries may hold several comma-separated names (`--config.tasks=a,b` on the
  command line arrives as the one-element tuple `("a,b",)`)."""
  if isinstance(values, str):
    values = (values,)
  return tuple(n.strip() for v in values for n in str(v).split(",") if n.strip())


def _normalise(config) -> None:
  with config.unlocked():
    for part, field in (("", "tasks"), ("", "models"), ("analysis", "readings"),
                        ("analysis", "candidates")):
      holder = config[part] if part else config
      holder[field] = _names(holder[field])


def validate(config) -> list[tuple[str, str, int]]:
  """Checks everything that can be checked before training; returns `[(task, arch, depth)]`."""
  _normalise(config)
  for task in config.tasks:
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; choose from {TASKS}.")
  if not config.tasks or not config.models:
    raise ValueError("config.tasks and config.models must not be empty.")
  models = [parse_model(m) for m in config.models]
  settings = settings_from(config)
  for arch, depth in models:
    if arch == "fts" and depth <= config.train.feature_layers:
      raise ValueError(f"model fts_L{depth} needs more blocks than train.feature_layers="
                       f"{config.train.feature_layers} (at least one attention block).")
    for what, layers in (("analysis.layers", settings.layers), ("graft.layers", settings.graft_layers)):
      bad = [l for l in layers or () if not 0 <= l <= depth]
      if bad:
        raise ValueError(f"{what} {bad} out of range for {arch}_L{depth}: layer indices run from 0 "
                         f"(embedding) to {depth}.")
  for task in config.tasks:  # task and training configs validate themselves when built
    _task_config(config, task, 1)
    for arch, depth in models:
      _train_config(config, task, arch, depth)
  return [(task, arch, depth) for task in config.tasks for arch, depth in models]


def _task_config(config, task: str, batch_size: int):
  from kcg import tasks  # pylint: disable=g-import-not-at-top
  t = config.task
  kwargs = dict(glm_targets="mean", glm_scale=float(t.glm_scale), noise_std=0.0) if task == "logistic" \
      else dict(noise_std=float(t.noise_std))
  return tasks.TaskConfig(family=task, input_dim=t.input_dim, num_support=t.num_support,
                          num_query=t.num_query, batch_size=batch_size, **kwargs)


def _train_config(config, task: str, arch: str, depth: int):
  from kcg import training  # pylint: disable=g-import-not-at-top
  t, tr = config.task, config.train
  if arch == "lsa":
    model = training.ModelSpec(num_layers=depth, width=tr.width, num_heads=tr.num_heads,
                               head_dim=tr.head_dim, mlp_hidden=0, attention="linear", norm=None,
                               attention_scale=1.0 / (t.num_support + 1), qkv_init_scale=0.5)
  else:
    model = training.ModelSpec(
        num_layers=depth, width=tr.width, num_heads=tr.num_heads, head_dim=tr.head_dim,
        mlp_hidden=tr.mlp_hidden, attention="softmax", activation="gelu", norm="layernorm",
        attention_free_layers=tr.feature_layers if arch == "fts" else 0)
  task_kwargs = dict(glm_targets="mean", glm_scale=float(t.glm_scale), noise_std=0.0) \
      if task == "logistic" else dict(noise_std=float(t.noise_std))
  data = training.DataSpec(family=task, input_dim=t.input_dim, num_support=t.num_support,
                           num_query=t.num_query, encoding="query", mask="prefix", **task_kwargs)
  optim = training.OptimSpec(learning_rate=tr.learning_rate,
                             warmup_steps=min(tr.warmup_steps, max(1, tr.num_steps // 4)))
  return training.TrainConfig(model=model, data=data, optim=optim, num_steps=tr.num_steps,
                              batch_size=tr.batch_size, seed=config.seed + depth, dtype="float32",
                              log_every=max(1, tr.num_steps // 10), checkpoint_every=max(
                                  1, tr.num_steps // 4), keep_checkpoints=1, eval_batch_size=64,
                              final_eval=False)


def _train_all(config, plan, models_dir: str) -> tuple[dict, dict]:
  from kcg import training  # pylint: disable=g-import-not-at-top
  trained, timings = {}, {}
  for task, arch, depth in plan:
    name = f"{task}_{arch}_L{depth}"
    began = time.perf_counter()
    result = training.train(_train_config(config, task, arch, depth), os.path.join(models_dir, name))
    history = training.load_history(os.path.join(models_dir, name))
    losses = [h["loss"] for h in history if "loss" in h]
    timings[name] = {"seconds": time.perf_counter() - began, "final_train_loss": losses[-1]}
    trained[name] = result.model
    logging.info("trained %s in %.0f s (loss %.4g)", name, timings[name]["seconds"], losses[-1])
  return trained, timings


def _analysis_config(config, task: str) -> dict:
  """Everything an analysis depends on besides the model: what its cache entry is keyed by."""
  parts = {name: config[name].to_dict() for name in ("task", "train", "analysis", "graft", "probes")}
  from kcg import alignment  # pylint: disable=g-import-not-at-top
  return {"version": alignment.ANALYSIS_VERSION, "seed": config.seed, "task": task, **parts}


def _cached(path: str, key: dict, compute) -> dict:
  """`compute()` or, when `path` holds a result computed under the same `key`, that result.

  Analyses take minutes per model: a rerun (or a run over a subset of tasks) reuses them.
  """
  from kcg import study  # pylint: disable=g-import-not-at-top
  key = study.jsonable(key)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("key") == key:
      logging.info("reusing %s", path)
      return saved["result"]
  result = study.jsonable(compute())
  _save(path, key, result)
  return result


def _save(path: str, key: dict, result: dict) -> None:
  from kcg import study  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"key": study.jsonable(key), "result": result}, f)
  os.replace(path + ".tmp", path)


def run(config, workdir: str) -> dict:
  """The whole experiment; returns the dict written to workdir/results.json."""
  import jax  # pylint: disable=g-import-not-at-top
  from kcg import alignment  # pylint: disable=g-import-not-at-top
  from kcg import probes  # pylint: disable=g-import-not-at-top
  from kcg import study  # pylint: disable=g-import-not-at-top
  from kcg import tasks  # pylint: disable=g-import-not-at-top

  if not jax.config.jax_enable_x64:
    raise ValueError("the alignment study analyses in float64: call "
                     "jax.config.update('jax_enable_x64', True) first (the binary does).")
  plan = validate(config)
  settings = settings_from(config)
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  trained, train_timings = _train_all(config, plan, os.path.join(workdir, "models"))
  timings = {"train": time.perf_counter() - start}
  if config.train_only:
    logging.info("train_only: %d models trained in %.0f s; no analysis.", len(trained), timings["train"])
    return {"training": train_timings}

  key = jax.random.key(config.seed)
  results = {"y_nonlinearity": {}, "tasks": {}, "training": train_timings}
  began = time.perf_counter()
  for task in config.tasks:
    # Keys from names, not positions: a run over a subset of tasks or models computes the same
    # numbers for them as the full run (and reuses their cached analyses).
    task_key = jax.random.fold_in(key, TASKS.index(task))
    k_eval, k_fit, k_labels, k_analysis = jax.random.split(task_key, 4)
    prompts = tasks.sample(k_eval, _task_config(config, task, config.analysis.num_prompts))
    fit_prompts = tasks.sample(k_fit, _task_config(config, task, config.analysis.num_fit_prompts))
    labels_b = tasks.sample_targets(k_labels, _task_config(config, task, 1), prompts.x_support,
                                    prompts.x_query).y_support
    info = alignment.task_info(_task_config(config, task, 1))
    weights = (0.5, 0.5) if task == "logistic" else (1 / math.sqrt(2), 1 / math.sqrt(2))
    task_settings = dataclasses.replace(settings, nonlinearity_weights=weights)
    per_model = {}
    for _, arch, depth in (p for p in plan if p[0] == task):
      name = f"{task}_{arch}_L{depth}"

      def subjects(name=name):
        """The model, its random-init control, and the salt of their keys (from the name)."""
        salt = zlib.crc32(name.encode())
        subject = probes.subject_from_model(trained[name], input_dim=config.task.input_dim,
                                            name=name)
        control = probes.random_init_like(subject, seed=config.seed + salt % 100_000)
        return subject, control, jax.random.fold_in(k_analysis, salt)

      def analyse():
        subject, control, model_key = subjects()
        r = alignment.analyse_subject(subject, prompts, fit_prompts, labels_b, info, task_settings,
                                      model_key, control_subject=control)
        r["control"] = alignment.analyse_subject(control, prompts, fit_prompts, labels_b, info,
                                                 task_settings, model_key, control=True)
        return r

      def rbf_phi():
        # Added to the study after some analyses were cached: computed alone for those, with the
        # key analyse_subject gives it.
        subject, control, model_key = subjects()
        shuffle_key = jax.random.split(model_key, 3)[1]
        return (alignment.rbf_on_features(subject, prompts, fit_prompts, task_settings, shuffle_key),
                alignment.rbf_on_features(control, prompts, fit_prompts, task_settings, shuffle_key))

      path = os.path.join(workdir, "analysis", f"{name}.json")
      cache_key = {"analysis": _analysis_config(config, task), "model": name,
                   "step": config.train.num_steps}
      r = _cached(path, cache_key, analyse)
      if "krr_rbf_phi" not in r:
        r["krr_rbf_phi"], r["control"]["krr_rbf_phi"] = (study.jsonable(v) for v in rbf_phi())
        _save(path, cache_key, r)
      r["architecture"] = arch
      per_model[name] = r
      results["y_nonlinearity"][name] = r["y_nonlinearity"]
      logging.info("analysed %s: best layer %d", name, r["best_layer"])
    refs = alignment.compiled_references(prompts, labels_b, ridge=config.compiled.ridge,
                                               cg_steps=tuple(config.compiled.cg_steps),
                                               weights=weights)
    for ref, value in refs.items():
      results["y_nonlinearity"][f"compiled_{ref}_{task}"] = value
    title = f"task {task} (d = {config.task.input_dim}, k = {config.task.num_support})"
    figures = {"agreement": alignment.agreement_figure(
                   per_model, os.path.join(workdir, f"agreement_vs_layer_{task}.png"), title),
               "alignment": alignment.alignment_figure(
                   per_model, os.path.join(workdir, f"kernel_alignment_{task}.png"), title),
               "graft": alignment.graft_figure(
                   per_model, os.path.join(workdir, f"graft_{task}.png"), title)}
    results["tasks"][task] = {"models": per_model, "compiled_references": refs,
                              "figures": {k: os.path.basename(v) for k, v in figures.items()}}
  timings["analysis"] = time.perf_counter() - began
  timings["total"] = time.perf_counter() - start
  results["timings_seconds"] = timings
  results["config"] = study.jsonable(config.to_dict())
  results = study.jsonable(results)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  from experiments import alignment_report  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(alignment_report.render(results, config))
  return results


def main(config, workdir: str) -> dict:
  """The binary: float64 on, orbax's per-save log lines off, then `run`."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  results = run(config, workdir)
  logging.info("Report written to %s", os.path.join(workdir, "report.md"))
  return results


if __name__ == "__main__":
  _cli.run_main(main, _DEFAULT_CONFIG,
                "report.md, results.json, the figures and the trained models")
