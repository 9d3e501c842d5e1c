"""The alignment study of one model: every instrument of `kcg.alignment`, numbers as a JSON-ready dict.

`analyse_subject` runs, on held-out evaluation prompts (with a second held-out set, the *fit* prompts,
for every choice: ridges, intercepts, read-out standardisation, fitted candidates):

1. the model's predictions and test error, with the reference learners (mean of the support labels,
   linear ridge on x, RBF KRR tuned to the targets, KRR with the task's true kernel where known);
2. KRR on phi_l for every reading and layer (standardised coordinates; ridge and intercept chosen to
   agree with the model on the fit prompts), its agreement with the model (R^2 with a bootstrap
   interval, relative distance) and the shuffled control (the model's predictions of another prompt);
   with `fit_metric`, also KRR on the "zero_labels" phi_l with the best linear kernel
   (`kcg._src.alignment_metric`, fitted on the fit prompts; reported as "zero_labels_fitted_metric"),
   which is then the feature space of 3, 7, 8 and 9; and KRR with a Gaussian kernel on phi_l
   (`rbf_on_features`: a nonlinear kernel on the model's own features);
3. every candidate on phi_l and on raw x, step by step: the best step and its agreement;
4. baselines on raw x: linear-kernel KRR, RBF KRR (bandwidth and ridge chosen on the fit prompts),
   the task's true kernel (Bayes ridge);
5. centred kernel alignment of Gram(phi_l) with the true kernel, raw x's linear kernel and the target
   kernel f f^T, and the shuffled control;
6. smoother weights d f / d y against KRR's, cosine per query, per layer;
7. the y-nonlinearity index of the model and of the CG_t it matches best on phi_l;
8. grafts: the model's first l layers + compiled CG (t = 0..T) on phi_l;
9. probes of CG's alpha_t, r_t, p_t on phi_l (best layer) in the model's residual stream, with the
   random-init and shuffled controls.

`control=True` (the random-initialisation control, run on a freshly initialised model of the same
architecture) runs everything but the other readings and the probes, whose own control is that
model's residual stream.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from kcg._src import alignment_candidates as candidates_lib
from kcg._src import alignment_features as features_lib
from kcg._src import alignment_graft as graft_lib
from kcg._src import alignment_measures as measures
from kcg._src import alignment_metric as metric_lib
from kcg._src import probes

PRIMARY_READING = "zero_labels"
# The primary reading read by the fitted linear metric (`kcg._src.alignment_metric`).
FITTED_READING = "zero_labels_fitted_metric"
# Bumped whenever an analysis would give other numbers for the same model and settings (cached
# analyses are keyed by it).
VERSION = 1
QUANTITIES = ("alpha", "r", "p")
# The constant feature of a graft with an intercept: its square, relative to the mean kernel diagonal.
_INTERCEPT_FEATURE = 10.0


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `analyse_subject` computes (see experiments/configs/alignment.py for the meaning)."""

  readings: tuple[str, ...] = features_lib.READINGS
  candidates: tuple[str, ...] = candidates_lib.CANDIDATES
  max_steps: int = 8
  layers: tuple[int, ...] | None = None
  relative_ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
  rbf_bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
  num_bootstrap: int = 200
  graft_steps: int = 8
  graft_layers: tuple[int, ...] | None = None
  graft_prompts: int = 64
  probe_site: str = "support"
  probe_steps: tuple[int, ...] = (1, 2, 4)
  probe_folds: int = 5
  probe_ridge: float = 1e-6
  nonlinearity_weights: tuple[float, float] = (1 / math.sqrt(2), 1 / math.sqrt(2))
  fit_metric: bool = True
  metric_steps: int = 300

  def __post_init__(self):
    for name in self.readings:
      if name not in features_lib.READINGS:
        raise ValueError(f"unknown reading (feature site) {name!r}; choose from {features_lib.READINGS}.")
    if PRIMARY_READING not in self.readings:
      raise ValueError(f"readings must include {PRIMARY_READING!r} (candidates, kernel alignment, "
                       "smoother weights and grafts read it).")
    candidates_lib.check_candidates(self.candidates)
    if self.probe_site not in probes.SITES:
      raise ValueError(f"unknown probe site {self.probe_site!r}; choose from {probes.SITES}.")
    if any(s < 1 or s > self.max_steps for s in self.probe_steps):
      raise ValueError(f"probe steps {self.probe_steps} must lie in [1, max_steps={self.max_steps}].")


class TaskInfo(NamedTuple):
  """What the study knows about the task: its true kernel (None if unknown) and Bayes ridge."""

  family: str
  kernel: Callable | None
  bayes_ridge: float | None


def task_info(task: Any) -> TaskInfo:
  """The true kernel of a `kcg.tasks.TaskConfig` where the task is a Gaussian process in x.

  linear: `x.x'/d` (w ~ N(0, I/d)); kernel_prior: Gaussian with the task's bandwidth (the GP its
  random Fourier features sample, exactly in expectation over the features); relu_network: the
  arc-cosine kernel of `sqrt(2/h) sum_j a_j relu(u_j.x)` (exact only as h -> inf). Bayes ridge: the
  noise variance. Others: unknown.
  """
  d = task.input_dim
  noise = float(task.noise_std) ** 2
  ridge = max(noise, 1e-6)
  if task.family in ("linear", "noisy_linear"):
    return TaskInfo(task.family, lambda a, b: np.einsum("...np,...mp->...nm", a, b) / d, ridge)
  if task.family == "kernel_prior":
    return TaskInfo(task.family, measures.gaussian_kernel(float(task.kernel_bandwidth)), ridge)
  if task.family == "relu_network":
    return TaskInfo(task.family, measures.arccos_kernel(1.0 / d), ridge)
  return TaskInfo(task.family, None, None)


class _Clock:
  """Wall seconds per stage (reported in the results; the machine may be shared)."""

  def __init__(self):
    self.laps = {}
    self._last = time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name] = now - self._last
    self._last = now


def _layers(requested, num_layers: int) -> list[int]:
  layers = list(range(num_layers + 1)) if not requested else [int(l) for l in requested]
  bad = [l for l in layers if not 0 <= l <= num_layers]
  if bad:
    raise ValueError(f"layer indices {bad} out of range [0, {num_layers}] for a {num_layers}-block model.")
  return layers


def _agree(candidate, model, key, settings, bootstrap=True) -> dict:
  if not bootstrap:
    a, m = np.asarray(candidate, np.float64), np.asarray(model, np.float64)
    if not np.all(np.isfinite(a)):
      return {"r2": -math.inf}
    sst = np.sum(np.square(m - m.mean()))
    return {"r2": float(1 - np.sum(np.square(a - m)) / sst) if sst > 0 else float("nan")}
  return measures.agreement(candidate, model, key, num_bootstrap=settings.num_bootstrap)._asdict()


def _mse(a, b) -> float:
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class _Space(NamedTuple):
  """KRR on one feature space: features of the fit and eval prompts, the choice and its predictions."""

  fit_support: np.ndarray
  fit_query: np.ndarray
  eval_support: np.ndarray
  eval_query: np.ndarray
  ridge: float
  intercept: bool
  prediction: np.ndarray


def _krr_space(fit_s, fit_q, ev_s, ev_q, y_fit, y_eval, model_fit, settings) -> _Space:
  ridges = measures.relative_ridges(fit_s, settings.relative_ridges)
  choice = measures.select_ridge(
      lambda r, i: measures.krr_predict(fit_s, y_fit, fit_q, r, intercept=i), model_fit, ridges)
  pred = np.asarray(measures.krr_predict(ev_s, y_eval, ev_q, choice.ridge, intercept=choice.intercept))
  return _Space(fit_s, fit_q, ev_s, ev_q, choice.ridge, choice.intercept, pred)


def _candidate_scores(space: _Space, y_fit, y_fit_query, y_eval, model_eval, names, max_steps, key,
                      settings, sigma) -> dict:
  """Best step of every candidate on a feature space, and its agreement (with bootstrap)."""
  fitted = None
  if any(n in candidates_lib.FITTED for n in names):
    fitted = candidates_lib.fit_candidates(
        candidates_lib.FeatureProblem(space.fit_support, y_fit, space.fit_query, y_fit_query),
        space.ridge, max_steps, intercept=space.intercept, names=names)
  trajs = candidates_lib.trajectories(
      candidates_lib.FeatureProblem(space.eval_support, y_eval, space.eval_query), space.ridge,
      max_steps, intercept=space.intercept, names=names, fitted=fitted)
  out = {}
  for name, traj in trajs.items():
    by_t = [_agree(traj[:, t], model_eval, key, settings, bootstrap=False)["r2"]
            for t in range(max_steps + 1)]
    # Step 0 predicts a constant (0 or the label mean): the best step is searched from t = 1.
    scores = np.asarray(by_t[1:], np.float64)
    best = 1 + int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
    out[name] = {"r2_by_step": by_t, "best_step": best,
                 **_agree(traj[:, best], model_eval, key, settings),
                 "shuffled_r2": _agree(traj[:, best], model_eval[sigma], key, settings,
                                       bootstrap=False)["r2"]}
  return out, trajs


def _gram_points(support, query) -> np.ndarray:
  return np.concatenate([np.asarray(support), np.asarray(query)], axis=1)


def _subject_predict(subject):
  return probes.predict_fn(subject)


def analyse_subject(subject: probes.Subject, prompts: Any, fit_prompts: Any, labels_b: Any,
                    task: TaskInfo, settings: Settings, key: Any, *, control: bool = False,
                    control_subject: probes.Subject | None = None) -> dict:
  """The alignment study of one model (module docstring); returns a JSON-ready dict.

  Args:
    subject: the model (`kcg.probes.Subject`).
    prompts: evaluation prompts (`kcg.tasks.Prompts`, with `y_query` and `f_query`).
    fit_prompts: held-out prompts for every choice.
    labels_b: support labels `[B, k]` of fresh tasks on `prompts`' inputs (`kcg.tasks.sample_targets`),
      the second label vector of the y-nonlinearity index.
    task: `task_info(...)`.
    settings: `Settings`.
    key: PRNG key (bootstraps, shuffles, probe folds).
    control: this is the random-init control: skip the probes.
    control_subject: the random-init model whose residuals the probes' control reads.
  """
  clock = _Clock()
  keys = dict(zip(("agree", "shuffle", "probe"), jax.random.split(key, 3)))
  xs, ys, xq = (np.asarray(a) for a in (prompts.x_support, prompts.y_support, prompts.x_query))
  fxs, fys, fxq = (np.asarray(a) for a in (fit_prompts.x_support, fit_prompts.y_support,
                                            fit_prompts.x_query))
  y_query, f_query = np.asarray(prompts.y_query), np.asarray(prompts.f_query)
  predict = _subject_predict(subject)
  model_eval = np.asarray(predict(xs, ys, xq), np.float64)
  model_fit = np.asarray(predict(fxs, fys, fxq), np.float64)
  sigma = measures.shuffled_pairs(xs.shape[0], keys["shuffle"])
  layers = _layers(settings.layers, subject.num_layers)
  out = {"name": subject.name, "num_layers": subject.num_layers, "layers": layers,
         "test_mse": _mse(model_eval, y_query), "test_mse_noiseless": _mse(model_eval, f_query)}
  # The control reads phi_l the primary way only (its other readings would control nothing new).
  readings = (PRIMARY_READING,) if control else settings.readings

  clock.lap('predictions')
  # 2. KRR on phi_l for every reading and layer.
  spaces = {}
  out["krr"] = {}
  for reading in readings:
    h_eval = features_lib.hidden_features(subject, xs, ys, xq, reading=reading)
    h_fit = features_lib.hidden_features(subject, fxs, fys, fxq, reading=reading)
    rows = []
    for l in layers:
      readout = features_lib.standardizing_map(h_fit.support[l], h_fit.query[l])
      space = _krr_space(readout(h_fit.support[l]), readout(h_fit.query[l]),
                         readout(h_eval.support[l]), readout(h_eval.query[l]), fys, ys, model_fit,
                         settings)
      if reading == PRIMARY_READING:
        spaces[l] = (space, readout, h_eval.support[l], h_eval.query[l])
      rows.append({"layer": l, "ridge": space.ridge, "intercept": space.intercept,
                   **_agree(space.prediction, model_eval, keys["agree"], settings),
                   "shuffled_r2": _agree(space.prediction, model_eval[sigma], None, settings,
                                         bootstrap=False)["r2"]})
    out["krr"][reading] = rows
  standardized = dict(spaces)
  if settings.fit_metric:
    # The best linear kernel on phi_l: candidates, CG references, grafts and probes use it.
    rows = []
    for l in layers:
      space, readout, h_s, h_q = spaces[l]
      fitted = metric_lib.fit_metric(space.fit_support, fys, space.fit_query, model_fit, space.ridge,
                                     intercept=space.intercept, num_steps=settings.metric_steps)
      a = fitted.matrix
      pred = np.asarray(measures.krr_predict(space.eval_support @ a, ys, space.eval_query @ a,
                                             space.ridge, intercept=space.intercept))
      spaces[l] = (space._replace(fit_support=space.fit_support @ a, fit_query=space.fit_query @ a,
                                  eval_support=space.eval_support @ a,
                                  eval_query=space.eval_query @ a, prediction=pred),
                   features_lib.ResidualMap(readout.offset, readout.matrix @ a), h_s, h_q)
      rows.append({"layer": l, "ridge": space.ridge, "intercept": space.intercept,
                   "metric_steps": fitted.steps, **_agree(pred, model_eval, keys["agree"], settings),
                   "shuffled_r2": _agree(pred, model_eval[sigma], None, settings,
                                         bootstrap=False)["r2"]})
    out["krr"][FITTED_READING] = rows
  main = FITTED_READING if settings.fit_metric else PRIMARY_READING
  best_layer = max(out["krr"][main], key=lambda r: r["r2"])["layer"]
  out["best_layer"] = best_layer
  out["feature_space"] = main

  clock.lap('krr')
  out["krr_rbf_phi"] = rbf_on_features(subject, prompts, fit_prompts, settings, keys["shuffle"])
  clock.lap('krr_rbf_phi')
  # 3-4. Candidates on phi_l and on raw x; KRR baselines on raw x.
  names = settings.candidates
  fyq = np.asarray(fit_prompts.y_query)
  out["candidates"] = {}
  trajectories_at = {}
  for l in layers:
    space = spaces[l][0]
    scores, trajs = _candidate_scores(space, fys, fyq, ys, model_eval, names, settings.max_steps,
                                      keys["agree"], settings, sigma)
    out["candidates"][str(l)] = scores
    trajectories_at[l] = trajs
  raw = _krr_space(fxs, fxq, xs, xq, fys, ys, model_fit, settings)
  out["baselines"] = {"linear_x": {"ridge": raw.ridge, "intercept": raw.intercept,
                                   **_agree(raw.prediction, model_eval, keys["agree"], settings),
                                   "test_mse": _mse(raw.prediction, y_query)}}
  if settings.fit_metric:
    a = metric_lib.fit_metric(raw.fit_support, fys, raw.fit_query, model_fit, raw.ridge,
                              intercept=raw.intercept, num_steps=settings.metric_steps).matrix
    pred = np.asarray(measures.krr_predict(xs @ a, ys, xq @ a, raw.ridge, intercept=raw.intercept))
    out["baselines"]["linear_x_fitted_metric"] = {
        **_agree(pred, model_eval, keys["agree"], settings), "test_mse": _mse(pred, y_query)}
  out["candidates"]["x"], _ = _candidate_scores(raw, fys, fyq, ys, model_eval, names,
                                                settings.max_steps, keys["agree"], settings, sigma)
  out["baselines"].update(_kernel_baselines(xs, ys, xq, fxs, fys, fxq, fyq, y_query, f_query,
                                              model_eval, model_fit, task, keys["agree"], settings))

  clock.lap('candidates')
  # 5. Kernel alignment of Gram(phi_l) (zero-label reading) with the true, raw-x and target kernels.
  x_all = _gram_points(xs, xq)
  targets = {"raw_x": measures.linear_gram(x_all),
             "target": measures.linear_gram(_gram_points(prompts.f_support, f_query)[..., None])}
  if task.kernel is not None:
    targets["true_kernel"] = np.asarray(task.kernel(x_all, x_all))
  out["kernel_alignment"] = {name: [] for name in targets}
  out["kernel_alignment"].update({f"{name}_shuffled": [] for name in targets})
  for l in layers:
    space = standardized[l][0]
    gram = measures.linear_gram(_gram_points(space.eval_support, space.eval_query))
    for name, target in targets.items():
      out["kernel_alignment"][name].append(float(np.mean(measures.kernel_alignment(gram, target))))
      out["kernel_alignment"][f"{name}_shuffled"].append(
          float(np.mean(measures.kernel_alignment(gram, target[sigma]))))
  out["kernel_alignment"]["raw_x_vs_true_kernel"] = (
      float(np.mean(measures.kernel_alignment(targets["raw_x"], targets["true_kernel"])))
      if "true_kernel" in targets else None)

  clock.lap('kernel_alignment')
  # 6. Smoother weights.
  weights = measures.smoother_weights(predict, xs, ys, xq)
  smoother = {"krr_phi": [], "krr_phi_shuffled": []}
  if settings.fit_metric:
    smoother["krr_phi_fitted_metric"] = []
  for l in layers:
    space = standardized[l][0]
    w = measures.krr_smoother_weights(space.eval_support, space.eval_query, space.ridge,
                                      intercept=space.intercept)
    smoother["krr_phi"].append(float(np.mean(measures.weight_cosine(weights, w))))
    smoother["krr_phi_shuffled"].append(float(np.mean(measures.weight_cosine(weights[sigma], w))))
    if settings.fit_metric:
      space = spaces[l][0]
      w = measures.krr_smoother_weights(space.eval_support, space.eval_query, space.ridge,
                                        intercept=space.intercept)
      smoother["krr_phi_fitted_metric"].append(float(np.mean(measures.weight_cosine(weights, w))))
  w_raw = measures.krr_smoother_weights(xs, xq, raw.ridge, intercept=raw.intercept)
  smoother["linear_x"] = float(np.mean(measures.weight_cosine(weights, w_raw)))
  if task.kernel is not None:
    w_true = _kernel_weights(task.kernel, xs, xq, task.bayes_ridge)
    smoother["true_kernel"] = float(np.mean(measures.weight_cosine(weights, w_true)))
  out["smoother_weights"] = smoother

  clock.lap('smoother_weights')
  # 7. The y-linearity signature of the model and of its best-matching CG_t on phi_l.
  nl = measures.y_nonlinearity(predict, xs, ys, labels_b, xq, weights=settings.nonlinearity_weights)
  out["y_nonlinearity"] = nl.index
  cg_scores = {l: out["candidates"][str(l)]["cg"] for l in layers}
  cg_layer = max(layers, key=lambda l: cg_scores[l]["r2"])
  cg_step = cg_scores[cg_layer]["best_step"]
  space = spaces[cg_layer][0]
  by_step = []
  for t in range(1, settings.max_steps + 1):
    cg_predict = lambda _xs, y, _xq, t=t: candidates_lib.trajectories(
        candidates_lib.FeatureProblem(space.eval_support, y, space.eval_query), space.ridge, t,
        intercept=space.intercept, names=("cg",))["cg"][:, -1]
    by_step.append(measures.y_nonlinearity(cg_predict, xs, ys, labels_b, xq,
                                           weights=settings.nonlinearity_weights).index)
  out["cg_reference"] = {"layer": cg_layer, "step": cg_step, "r2": cg_scores[cg_layer]["r2"],
                         "y_nonlinearity": by_step[cg_step - 1],
                         "y_nonlinearity_by_step": by_step}

  clock.lap('y_nonlinearity')
  # 8. Grafts.
  out["graft"] = _grafts(spaces, layers, settings, ys, model_eval, keys["agree"])

  clock.lap('graft')
  # 9. Probes of CG's state on phi_l (best layer) in the model's residual stream.
  if not control:
    out["probes"] = _probes(subject, control_subject, prompts, spaces[best_layer][0], best_layer,
                            settings, keys["probe"])
  clock.lap("probes")
  out["seconds"] = clock.laps
  return out


def _kernel_weights(kernel, xs, xq, ridge) -> np.ndarray:
  k = xs.shape[1]
  eye = np.broadcast_to(np.eye(k)[:, None], (k, xs.shape[0], k))
  cols = [np.asarray(measures.kernel_krr_predict(kernel, xs, e, xq, ridge)) for e in eye]
  return np.stack(cols, axis=-1)


_RBF_RIDGES = (1e-3, 1e-2, 0.1, 1.0)


def rbf_on_features(subject: probes.Subject, prompts: Any, fit_prompts: Any, settings: Settings,
                    key: Any) -> list[dict]:
  """KRR with a Gaussian kernel on the standardised phi_l (zero-label reading) of every layer.

  A nonlinear kernel on the model's own features (softmax attention computes exponential kernels,
  Route A): bandwidth `c * sqrt(median squared distance / 2)` for `c` in `settings.rbf_bandwidths`,
  ridge in (1e-3, 1e-2, 0.1, 1), labels centred; chosen on the fit prompts to agree with the model.
  Returns one row per layer (agreement with bootstrap interval, shuffled control).
  """
  xs, ys, xq = (np.asarray(a) for a in (prompts.x_support, prompts.y_support, prompts.x_query))
  fxs, fys, fxq = (np.asarray(a) for a in (fit_prompts.x_support, fit_prompts.y_support,
                                            fit_prompts.x_query))
  predict = probes.predict_fn(subject)
  model_eval = np.asarray(predict(xs, ys, xq), np.float64)
  model_fit = np.asarray(predict(fxs, fys, fxq), np.float64)
  sigma = measures.shuffled_pairs(xs.shape[0], key)
  h_eval = features_lib.hidden_features(subject, xs, ys, xq, reading=PRIMARY_READING)
  h_fit = features_lib.hidden_features(subject, fxs, fys, fxq, reading=PRIMARY_READING)
  rows = []
  for l in _layers(settings.layers, subject.num_layers):
    readout = features_lib.standardizing_map(h_fit.support[l], h_fit.query[l])
    fs, fq = readout(h_fit.support[l]), readout(h_fit.query[l])
    es, eq = readout(h_eval.support[l]), readout(h_eval.query[l])
    sq = np.sum(np.square(fs[:, :, None] - fs[:, None]), axis=-1)
    scale = math.sqrt(max(float(np.median(sq[sq > 0])) if np.any(sq > 0) else 1.0, 1e-12) / 2)
    grid = [(c * scale, r) for c in settings.rbf_bandwidths for r in _RBF_RIDGES]
    rbf = lambda bw, r, a, y, b: np.asarray(measures.kernel_krr_predict(
        measures.gaussian_kernel(float(bw)), a, y, b, r, intercept=True))
    errs = [_mse(rbf(bw, r, fs, fys, fq), model_fit) for bw, r in grid]
    bw, r = grid[int(np.argmin(errs))]
    pred = rbf(bw, r, es, ys, eq)
    rows.append({"layer": l, "bandwidth": bw, "ridge": r, **_agree(pred, model_eval, key, settings),
                 "shuffled_r2": _agree(pred, model_eval[sigma], None, settings, bootstrap=False)["r2"]})
  return rows


def _kernel_baselines(xs, ys, xq, fxs, fys, fxq, fyq, y_query, f_query, model_eval, model_fit, task,
                      key, settings) -> dict:
  """RBF KRR on x (tuned to agree with the model, and tuned to the targets) and the true kernel."""
  out = {}
  grid = [(bw, r) for bw in settings.rbf_bandwidths for r in (1e-3, 1e-2, 0.1, 1.0)]
  rbf = lambda bw, r, a, y, b: np.asarray(measures.kernel_krr_predict(
      measures.gaussian_kernel(bw), a, y, b, r, intercept=True))
  for name, reference in (("rbf_x", model_fit), ("rbf_x_tuned_to_targets", fyq)):
    errs = [_mse(rbf(bw, r, fxs, fys, fxq), reference) for bw, r in grid]
    bw, r = grid[int(np.argmin(errs))]
    pred = rbf(bw, r, xs, ys, xq)
    out[name] = {"bandwidth": bw, "ridge": r, **_agree(pred, model_eval, key, settings),
                 "test_mse": _mse(pred, y_query), "test_mse_noiseless": _mse(pred, f_query)}
  if task.kernel is not None:
    pred = np.asarray(measures.kernel_krr_predict(task.kernel, xs, ys, xq, task.bayes_ridge))
    out["true_kernel"] = {"ridge": task.bayes_ridge, **_agree(pred, model_eval, key, settings),
                          "test_mse": _mse(pred, y_query), "test_mse_noiseless": _mse(pred, f_query)}
  mean = np.broadcast_to(ys.mean(axis=1, keepdims=True), y_query.shape)
  out["support_mean"] = {"test_mse": _mse(mean, y_query), "test_mse_noiseless": _mse(mean, f_query)}
  return out


def _grafts(spaces, layers, settings, ys, model_eval, key) -> dict:
  """R^2 and relative distance of the graft (layers 0..l + compiled CG_t) against the model, on the
  first `settings.graft_prompts` evaluation prompts."""
  requested = settings.graft_layers
  graft_layers = [l for l in layers if not requested or l in requested]
  if not graft_layers:
    return {"layers": [], "r2": [], "relative_distance": [], "shuffled_r2": []}
  n = min(settings.graft_prompts, ys.shape[0])
  width = spaces[graft_layers[0]][2].shape[-1]
  compiled = graft_lib.compiled_solver(ys.shape[1], width + 1, settings.graft_steps, 1.0)
  model = model_eval[:n]
  sigma = measures.shuffled_pairs(n, key)
  r2, rel, shuffled = [], [], []
  for l in graft_layers:
    space, readout, h_s, h_q = spaces[l]
    if space.intercept:
      scale = float(np.mean(np.sum(space.fit_support**2, axis=-1)))
      readout = readout.with_constant(math.sqrt(_INTERCEPT_FEATURE * max(scale, 1e-12)))
    else:
      readout = readout.with_constant(0.0)
    steps = graft_lib.graft_predict_steps(compiled, graft_lib.graft_map(readout, space.ridge),
                                          h_s[:n], h_q[:n], ys[:n])
    r2.append([_agree(steps[:, t], model, key, settings, bootstrap=False)["r2"]
               for t in range(settings.graft_steps + 1)])
    rel.append([float(np.linalg.norm(steps[:, t] - model) / max(np.linalg.norm(model), 1e-300))
                for t in range(settings.graft_steps + 1)])
    shuffled.append(_agree(steps[:, -1], model[sigma], key, settings, bootstrap=False)["r2"])
  return {"layers": graft_layers, "num_prompts": n, "r2": r2, "relative_distance": rel,
          "shuffled_r2": shuffled}


def _probes(subject, control_subject, prompts, space, layer, settings, key) -> dict:
  ys = np.asarray(prompts.y_support)
  phi_s, y = space.eval_support, ys
  if space.intercept:
    phi_s = phi_s - phi_s.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
  state = probes.state_targets(phi_s, y, space.ridge, max(settings.probe_steps))
  k, q = ys.shape[1], np.shape(prompts.x_query)[1]
  feats = probes.site_features(probes.residuals(subject, prompts), settings.probe_site, k)
  ctrl = None
  if control_subject is not None:
    ctrl = probes.site_features(probes.residuals(control_subject, prompts), settings.probe_site, k)
  out = {"phi_layer": layer, "site": settings.probe_site}
  for quantity in QUANTITIES:
    values = np.asarray(getattr(state, quantity))
    rows = {}
    for step in settings.probe_steps:
      targets = probes.site_targets(values[:, step], settings.probe_site, q)
      res = probes.probe_layers(feats, targets, key, control_features_LxBxSxD=ctrl,
                                num_folds=settings.probe_folds, ridge=settings.probe_ridge)
      best = int(np.argmax(res.cosine))
      rows[str(step)] = {"best_layer": best, "cosine": float(res.cosine[best]),
                         "r2": float(res.r2[best]), "shuffled_cosine": float(np.max(res.shuffled_cosine)),
                         "control_cosine": float(np.nanmax(res.control_cosine))
                         if ctrl is not None else None,
                         "cosine_by_layer": res.cosine.tolist()}
    out[quantity] = rows
  return out


def compiled_references(prompts: Any, labels_b: Any, *, ridge: float, cg_steps: Sequence[int],
                        weights: tuple[float, float]) -> dict:
  """y-nonlinearity of compiled CG (t in `cg_steps`), Jacobi PCG and Chebyshev (t = max step) on raw x."""
  from kcg._src import compiler  # pylint: disable=g-import-not-at-top
  xs, ys, xq = (np.asarray(a) for a in (prompts.x_support, prompts.y_support, prompts.x_query))
  k, d = xs.shape[1], xs.shape[2]
  models = {f"cg_t{t}": compiler.compile_cg(k, d, int(t), ridge, mask="prefix") for t in cg_steps}
  t = max(cg_steps)
  models[f"pcg_t{t}"] = compiler.compile_cg(k, d, t, ridge, mask="prefix", preconditioner="jacobi")
  # Chebyshev's interval from these prompts: the spectrum of K + ridge I lies in [ridge, ridge +
  # ||X||_2^2], and the largest ||X||_2^2 over the batch covers every prompt.
  top = float(np.max(np.linalg.eigvalsh(np.einsum("bkd,bjd->bkj", xs, xs))[:, -1]))
  models[f"chebyshev_t{t}"] = compiler.compile_chebyshev(k, d, t, ridge, mask="prefix",
                                                         eig_bounds=(ridge, ridge + top))
  return {name: measures.y_nonlinearity(m.predict, xs, ys, labels_b, xq, weights=weights).index
          for name, m in models.items()}


__all__ = ("FITTED_READING", "PRIMARY_READING", "Settings", "TaskInfo", "VERSION", "analyse_subject",
           "compiled_references", "rbf_on_features", "task_info")
