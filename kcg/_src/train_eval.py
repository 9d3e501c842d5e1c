"""Held-out evaluation of trained models: predictions, the baselines they are compared with, curves.

`evaluate_trained` scores a model on prompts drawn from the held-out key stream against the reference
predictors of `kcg.baselines` (`kcg.evaluation`); `write_final_evaluation` writes it as `eval.json`
with the loss and error-vs-supports plots (`kcg._src.plotting`).

Evaluation runs on one device. Training leaves the parameters replicated over the data mesh, and a
program over replicated inputs runs once per device, all copies at once. That multiplies the work,
and on CPU it can deadlock: jaxlib's LAPACK kernels (the baselines' and the fitted GD
preconditioner's solves) split a batch into tasks on XLA's intra-op thread pool and block the calling
pool thread until they finish; with one such call per device and as many devices as pool threads (4
forced host devices on a 2-core machine give a 4-thread pool), every pool thread waits and none is
left to run the tasks. `make_predict_fn` therefore takes one copy of replicated parameters.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from kcg._src import baselines as baselines_lib
from kcg._src import checks
from kcg._src import evaluation as evaluation_lib
from kcg._src import model as model_lib
from kcg._src import plotting
from kcg._src import prompt as prompt_lib
from kcg._src import tasks as tasks_lib
from kcg._src import train_config as config_lib
from kcg._src import train_data as data_lib
from kcg._src import train_metrics as metrics_lib

EVAL_FILE = "eval.json"


# ----------------------------------------------------------------------------------------------
# Prediction.


def predict(model: model_lib.Transformer, data: config_lib.DataSpec, x_support: Any, y_support: Any,
            x_query: Any) -> jax.Array:
  """Predictions [B, q] of a trained model for x_support [B,k,d'], y_support [B,k], x_query [B,q,d'].

  Inputs with `d' < d` are zero-padded (as in the curriculum); any `k >= 1` runs (the model has no
  positional embedding), but a model has only learned the prompt lengths it was trained on. Computes
  in the (floating) dtype of the inputs.
  """
  x_support, y_support, x_query = (jnp.asarray(a) for a in (x_support, y_support, x_query))
  if x_support.ndim != 3 or y_support.ndim != 2 or x_query.ndim != 3:
    raise ValueError(f"predict needs x_support [B,k,d], y_support [B,k], x_query [B,q,d]; got "
                     f"{x_support.shape}, {y_support.shape}, {x_query.shape}.")
  batch, k, d_in = x_support.shape
  q = x_query.shape[1]
  layout = prompt_lib.make_layout(k, q, d_in)
  x_support, y_support, x_query = prompt_lib.validate_prompt(layout, x_support, y_support, x_query)
  x_support = data_lib.pad_inputs(x_support, data.input_dim)
  x_query = data_lib.pad_inputs(x_query, data.input_dim)
  if data.encoding == "query":
    layout = prompt_lib.make_layout(k, q, data.input_dim)
    tokens = prompt_lib.encode(layout, x_support, y_support, x_query)
    out = model(tokens, num_prefix=layout.num_prefix).outputs
    return prompt_lib.query_outputs(layout, out)
  # One causal sequence of k + 1 points per query; the last point's y-token is zero and unread.
  d = data.input_dim
  xs = jnp.broadcast_to(x_support[:, None], (batch, q, k, d))
  x_points = jnp.concatenate([xs, x_query[:, :, None]], axis=2).reshape(batch * q, k + 1, d)
  ys = jnp.broadcast_to(y_support[:, None], (batch, q, k))
  y_points = jnp.concatenate([ys, jnp.zeros((batch, q, 1), ys.dtype)], axis=2)
  y_points = y_points.reshape(batch * q, k + 1)
  layout = prompt_lib.make_interleaved_layout(k + 1, d)
  out = model(prompt_lib.encode_interleaved(layout, x_points, y_points)).outputs
  return prompt_lib.interleaved_predictions(layout, out)[:, k].reshape(batch, q)


@functools.lru_cache(maxsize=16)
def _predict_jit(config: model_lib.ModelConfig, data: config_lib.DataSpec) -> Callable:
  graphdef, _ = nnx.split(model_lib.abstract_model(config))
  return jax.jit(lambda state, xs, ys, xq: predict(nnx.merge(graphdef, state), data, xs, ys, xq))


def _on_one_device(x: Any) -> Any:
  """`x` on one device: the local copy of a replicated array, or `x` itself if it has one device."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return x
  if x.sharding.is_fully_replicated:
    return x.addressable_data(0)
  return jax.device_put(x, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def make_predict_fn(model: model_lib.Transformer, data: config_lib.DataSpec) -> Callable:
  """`predict` of this model on one device, jitted with the parameters as an argument (not baked-in
  constants) and cached per architecture, so evaluating many checkpoints compiles once per prompt
  shape. Parameters replicated over several devices (as training leaves them) are read from one
  copy (see the module docstring)."""
  _, state = nnx.split(model)
  state = jax.tree.map(_on_one_device, state)
  fn = _predict_jit(model.config, data)

  def predict_fn(x_support, y_support, x_query):
    for name, value in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query)):
      checks.check_finite(name, value)  # Under jit only shapes can be checked.
    return fn(state, x_support, y_support, x_query)

  return predict_fn


# ----------------------------------------------------------------------------------------------
# Evaluation against the baselines.


def baseline_suite(config: config_lib.TrainConfig, restrict: bool = True) -> dict:
  """`kcg.baselines.default_suite` with the run's ridge and `t = num_layers` solver steps (one step
  per block, the compiled models' budget up to a constant), restricted to `config.eval_baselines`
  unless `restrict=False` (every name)."""
  suite = baselines_lib.default_suite(**config_lib.baseline_suite_args(config))
  if restrict and config.eval_baselines:
    suite = {name: suite[name] for name in config.eval_baselines}
  return suite


def default_support_grid(data: config_lib.DataSpec) -> tuple[int, ...]:
  """Support counts of the error-vs-supports curve: 1, k/4, k/2 and k."""
  k = data.num_support
  grid = {max(1, round(k * f)) for f in (0.25, 0.5)} | {1, k}
  return tuple(sorted(int(g) for g in grid))


def evaluate_trained(model: model_lib.Transformer, config: config_lib.TrainConfig, key: jax.Array, *,
                     num_prompts: int | None = None) -> dict:
  """Held-out evaluation of a trained model against the reference predictors (`kcg.evaluation`).

  Returns a JSON-ready dict: `in_distribution` (`kcg.evaluation.evaluate` at the final stage's sizes),
  `gd_fit` / `gd_preconditioner_fit` (`fit_gd_step`, `fit_gd_preconditioner`: how well one GD step
  explains the predictions), `error_vs_supports` (model and baseline mse for each support count) and
  `ood` (`evaluate` under each of `config.ood_shifts`). Errors are against the observed `y_query`;
  `mse_noiseless` against the noiseless `f_query`.
  """
  data = config.data
  dtype = config_lib.dtype_of(config)
  num_prompts = config.eval_batch_size if num_prompts is None else num_prompts
  predict_fn = make_predict_fn(model, data)
  suite = baseline_suite(config)

  def sample_fn(key, num_support, shift="none"):
    prompts = data_lib.sample_prompts(key, data, batch_size=num_prompts,
                                      num_support=int(num_support), shift=shift)
    return tasks_lib.Prompts(*(jnp.asarray(a, dtype) for a in prompts))

  key_id, key_ood = jax.random.split(key)
  supports = sorted(config.eval_supports or default_support_grid(data))
  largest = sample_fn(key_id, max(supports[-1], data.num_support))

  def first_supports(_, num_support):
    # Supports are i.i.d., so the first k of a larger prompt form a k-support prompt; one draw (one
    # compilation) serves every k, and the curve's points are paired.
    return largest._replace(x_support=largest.x_support[:, :num_support],
                            y_support=largest.y_support[:, :num_support],
                            f_support=largest.f_support[:, :num_support])

  prompts = first_supports(None, data.num_support)
  predictions = predict_fn(prompts.x_support, prompts.y_support, prompts.x_query)
  out = {"in_distribution": evaluation_lib.evaluate(predict_fn, prompts, suite),
         "num_support": data.num_support, "baseline_ridge": config_lib.baseline_ridge(data)}
  fit = evaluation_lib.fit_gd_step(predictions, prompts)
  out["gd_fit"] = {name: float(value) for name, value in fit._asdict().items()}
  if data.input_dim**2 <= num_prompts * predictions.shape[1]:
    fit = evaluation_lib.fit_gd_preconditioner(predictions, prompts)
    out["gd_preconditioner_fit"] = {name: float(value) for name, value in fit._asdict().items()
                                    if name != "eta"}
  curve = evaluation_lib.error_vs_num_support(
      predict_fn, first_supports, supports, key_id,
      baselines={name: fn for name, fn in suite.items() if not name.startswith("knn")})
  out["error_vs_supports"] = {
      "num_support": curve.num_support.tolist(), "model": curve.mse.tolist(),
      "model_stderr": curve.mse_stderr.tolist(),
      **{name: values.tolist() for name, values in curve.baseline_mse.items()}}
  out["ood"] = {}
  for i, shift in enumerate(config.ood_shifts):
    k = data.num_support
    if shift == "orthogonal_query":
      k = min(k, data.input_dim - 1)  # Needs supports that do not span R^d.
      if k < 1:
        continue
    if shift == "skewed_covariance" and config_lib.task_config(
        data, data.input_dim, k, 1).condition_number != 1:
      out["ood"][shift] = {"skipped": "skewed_covariance replaces a condition_number > 1 spectrum"}
      continue
    shifted = sample_fn(jax.random.fold_in(key_ood, i), k, shift)
    out["ood"][shift] = {"num_support": k, **evaluation_lib.evaluate(predict_fn, shifted, suite)}
  return out


def support_curves(evaluation: dict) -> dict:
  """{name: {"num_support", "mse"}} from `evaluate_trained(...)["error_vs_supports"]`, for plotting."""
  curve = evaluation["error_vs_supports"]
  return {name: {"num_support": curve["num_support"], "mse": values}
          for name, values in curve.items() if name not in ("num_support", "model_stderr")}


def eval_record(model: model_lib.Transformer, config: config_lib.TrainConfig, step: int,
                evaluate_fn: Callable | None = None) -> dict:
  """The metrics record of a periodic evaluation: mse on `eval_batch_size` held-out prompts against
  the noiseless (`eval_mse`) and observed (`eval_mse_observed`) targets, plus `evaluate_fn`'s."""
  data = config.data
  prompts = data_lib.sample_prompts(data_lib.eval_key(config.seed), data,
                                    batch_size=config.eval_batch_size)
  dtype = config_lib.dtype_of(config)
  pred = make_predict_fn(model, data)(*(jnp.asarray(a, dtype) for a in (
      prompts.x_support, prompts.y_support, prompts.x_query)))
  entry = {"step": step,
           "eval_mse": float(jnp.mean(jnp.square(pred - jnp.asarray(prompts.f_query, dtype)))),
           "eval_mse_observed": float(jnp.mean(jnp.square(pred - jnp.asarray(prompts.y_query, dtype))))}
  if evaluate_fn is not None:
    entry.update(evaluate_fn(model, config, step))
  logging.info("eval at step %d: mse %.4g", step, entry["eval_mse"])
  return entry


def write_final_evaluation(workdir: str, model: model_lib.Transformer,
                           config: config_lib.TrainConfig) -> dict:
  """Runs `evaluate_trained` and writes `eval.json`, `loss.png` and `error_vs_supports.png`."""
  evaluation = evaluate_trained(model, config, jax.random.fold_in(data_lib.eval_key(config.seed), 1))
  if jax.process_index() == 0:
    path = os.path.join(workdir, EVAL_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(evaluation, f, indent=2)
    os.replace(path + ".tmp", path)
    plotting.training_plots(workdir, metrics_lib.load_history(workdir), support_curves(evaluation))
  ind = evaluation["in_distribution"]
  logging.info("final: model mse %.4g (noiseless %.4g); %s", ind["mse"],
               ind.get("mse_noiseless", float("nan")),
               ", ".join(f"{n} {b['mse']:.4g}" for n, b in ind["baselines"].items()))
  return evaluation
