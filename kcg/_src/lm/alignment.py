"""The alignment instruments of `kcg.alignment` on a language model's in-context regression.

The LM is a predictor `f(x_support, y_support, x_query) -> [B, q]` (`LMRegressor`, expected readout)
with hidden states per layer, so the array instruments of `kcg.alignment` apply unchanged; this module
only adapts what differs for an LM:

* Hidden features (`hidden_features`, `READINGS`): `kcg.alignment`'s reading names mapped to the LM's
  prompts. Every input is asked as the query of a prompt of its own and read at its tokens (the
  `"as_query"` reading of `kcg.lm`), with the context labels the reading names: `"zero_labels"` (each
  label written as y = 0), `"other_labels"` (the next prompt's labels), `"placeholder_labels"` (each
  label written as "?"), `"context_free"` (no supports) and the circular `"with_labels"` (the true
  labels: a support asked as query sees its own label earlier in the context). The first four cannot
  carry the answer; `kcg.lm`'s module docstring states what every reading can see.
* Labels are written as integer codes at `fmt.resolution` (0.1 by default), so the labels of every
  instrument are written labels (`fmt.written(y)`): finite-difference steps are multiples of the
  resolution (`lm_smoother_weights`: a smaller change is not written into the prompt), and the
  y-linearity index uses `f(y_a + y_b) - f(y_a) - f(y_b) + f(0)` on written `y_a`, `y_b`, whose sum is
  written exactly (`lm_y_nonlinearity`; a smaller weight than 1 would add the prompt's rounding).
* Smoother weights by central finite differences (`finite_difference_weights`): the expected readout
  is a smooth function of the logits, but the labels enter as tokens, so there is no gradient to take.

`analyse_lm` runs them all on one model (KRR on phi_l per reading and layer with bootstrap R^2 and the
shuffled control, kernel alignment, smoother weights against KRR's, the y-nonlinearity index against
CG_t on phi_l); run it on `kcg.lm.random_like(lm, key)` for the random-initialisation control.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from kcg._src import alignment_candidates as candidates_lib
from kcg._src import alignment_features as features_lib
from kcg._src import alignment_measures as measures
from kcg._src.lm import icl
from kcg._src.lm import prompts as prompts_lib

# kcg.alignment's reading name -> (kcg.lm reading, context labels).
READINGS: dict[str, tuple[str, str]] = {
    "zero_labels": ("as_query", "zero"),
    "other_labels": ("as_query", "shuffled"),
    "placeholder_labels": ("as_query", "placeholder"),
    "context_free": ("context_free", "placeholder"),
    "with_labels": ("as_query", "true"),
}
PRIMARY_READING = "zero_labels"
CIRCULAR_READING = "with_labels"


def _reading(reading: str) -> tuple[str, str]:
  if reading not in READINGS:
    raise ValueError(f"unknown reading {reading!r}; choose one of {', '.join(READINGS)}.")
  return READINGS[reading]


def _continuous(regressor: icl.LMRegressor) -> icl.LMRegressor:
  """The regressor with the expected readout (continuous in the logits; greedy answers are not)."""
  if regressor.readout == "expected":
    return regressor
  return icl.LMRegressor(regressor.lm, regressor.fmt, readout="expected",
                         chunk_size=regressor.chunk_size)


def hidden_features(regressor: icl.LMRegressor, x_support: Any, y_support: Any, x_query: Any, *,
                    reading: str = PRIMARY_READING, token: str = "last") -> features_lib.HiddenFeatures:
  """phi_l of every support and query input at every layer, read as `kcg.alignment`'s `reading`.

  Args:
    regressor: the LM and its text format.
    x_support: `[B, k, d]`.
    y_support: `[B, k]` (what the context shows of them depends on `reading`).
    x_query: `[B, q, d]`.
    reading: one of `READINGS` (module docstring); the primary one is `"zero_labels"`.
    token: `"last"` or `"mean"` over the input's tokens.

  Returns:
    `kcg.alignment.HiddenFeatures(support [L+1, B, k, D], query [L+1, B, q, D])`.
  """
  lm_reading, labels = _reading(reading)
  feats = icl.read_input_features(
      regressor.lm, regressor.fmt, prompts_lib.numeric_texts(regressor.fmt, x_support),
      icl.context_label_texts(regressor.support_labels(y_support)[0], labels,
                              str(regressor.fmt.encode_labels(0.0)[0])),
      prompts_lib.numeric_texts(regressor.fmt, x_query), reading=lm_reading, token=token,
      chunk_size=regressor.chunk_size)
  return features_lib.HiddenFeatures(*feats)


# ----------------------------------------------------------------------------------------------------
# Smoother weights and the y-linearity signature of a predictor that reads written labels.
# ----------------------------------------------------------------------------------------------------


def finite_difference_weights(predict: Callable, x_support: Any, y_support: Any, x_query: Any, *,
                              step: float, written: Callable | None = None) -> np.ndarray:
  """Smoother weights `W[b, j, i] ~ d f(x_query_bj) / d y_support_bi`, `[B, q, k]`, by central
  differences (2 k calls of `predict`; label i of every prompt moves at once):

      W[:, :, i] = (f(w(y + h e_i)) - f(w(y - h e_i))) / (w(y_i + h) - w(y_i - h))

  with `h = step` and `w = written` (the labels as the predictor reads them; default: unchanged), so
  the denominator is the change the predictor read (smaller where a label clipped). Exact, for any
  step, for every predictor affine in y.
  """
  y = np.asarray(y_support, np.float64)
  if y.ndim != 2:
    raise ValueError(f"y_support must be [B, k], got {y.shape}.")
  if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
    raise ValueError(f"step must be a finite number > 0, got {step!r}.")
  written = written or (lambda v: v)
  columns = []
  for i in range(y.shape[1]):
    up, down = y.copy(), y.copy()
    up[:, i] += step
    down[:, i] -= step
    up, down = np.asarray(written(up), np.float64), np.asarray(written(down), np.float64)
    delta = up[:, i] - down[:, i]  # [B]
    if np.any(delta <= 0):
      raise ValueError(f"a step of {step} moves no written label of support {i} (the labels clip at "
                       "both ends); use labels inside the written range.")
    diff = (np.asarray(predict(x_support, up, x_query), np.float64)
            - np.asarray(predict(x_support, down, x_query), np.float64))
    columns.append(diff / delta[:, None])
  return np.stack(columns, axis=-1)


def check_step(fmt: prompts_lib.TextFormat, step: float) -> float:
  """`step` if it is a positive multiple of the format's label resolution, else a ValueError."""
  if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
    raise ValueError(f"step must be a finite number > 0, got {step!r}.")
  ratio = step / fmt.resolution
  if round(ratio) < 1 or abs(ratio - round(ratio)) > 1e-6:
    raise ValueError(f"step {step} is not a multiple of the prompt's label resolution "
                     f"{fmt.resolution:g}: a change of y between two codes is not written into the "
                     f"prompt. Use a multiple, e.g. {fmt.resolution * max(1, round(ratio)):g}.")
  return float(step)


def lm_smoother_weights(regressor: icl.LMRegressor, x_support: Any, y_support: Any, x_query: Any, *,
                        step: float) -> np.ndarray:
  """The LM's smoother weights `[B, q, k]` by central differences of `step` (a multiple of
  `fmt.resolution`) about the written labels (`finite_difference_weights`, expected readout)."""
  fmt = regressor.fmt
  step = check_step(fmt, step)
  return finite_difference_weights(_continuous(regressor), x_support, fmt.written(y_support),
                                   x_query, step=step, written=fmt.written)


class LMNonlinearity(NamedTuple):
  """The y-nonlinearity index of the LM (`kcg.alignment.Nonlinearity`) and how many labels clipped.

  Attributes:
    index, per_prompt: as in `kcg.alignment.y_nonlinearity`.
    clipped_labels: support labels of `y_a + y_b` outside the written range (clipped there, so the
      sum the LM read is not the sum of what it read for `y_a` and `y_b`).
  """

  index: float
  per_prompt: np.ndarray
  clipped_labels: int


def lm_y_nonlinearity(regressor: icl.LMRegressor, x_support: Any, y_a: Any, y_b: Any,
                      x_query: Any) -> LMNonlinearity:
  """`kcg.alignment.y_nonlinearity` of the LM on written labels `w(y_a)`, `w(y_b)` with weights (1, 1):
  `|f(y_a + y_b) - f(y_a) - f(y_b) + f(0)| / (|f(y_a) - f(0)| + |f(y_b) - f(0)|)` (0 for every predictor
  affine in the labels). Pass labels of about half the task's scale (e.g. `y / sqrt(2)`) so that the
  sum stays in range; `clipped_labels` counts where it did not."""
  fmt = regressor.fmt
  y_a, y_b = fmt.written(y_a), fmt.written(y_b)
  total = y_a + y_b
  clipped = int(np.sum(np.abs(fmt.written(total) - total) > 1e-9))
  nl = measures.y_nonlinearity(_continuous(regressor), x_support, y_a, y_b, x_query,
                               weights=(1.0, 1.0))
  return LMNonlinearity(nl.index, nl.per_prompt, clipped)


# ----------------------------------------------------------------------------------------------------
# The analysis of one LM.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMSettings:
  """What `analyse_lm` computes.

  Attributes:
    readings: `READINGS` names; must include `"zero_labels"` (the feature space of the other
      instruments).
    token: `"last"` or `"mean"` (`hidden_features`).
    relative_ridges: KRR ridge grid relative to the mean kernel diagonal (`kcg.alignment.relative_ridges`).
    num_bootstrap: bootstrap resamples of prompts for the R^2 interval.
    fd_step: finite-difference step of the smoother weights, a multiple of the format's resolution.
    smoother_prompts: the smoother weights use the first this many evaluation prompts (each costs
      `2 k` prediction passes).
    cg_steps: CG_t, t = 1..cg_steps, on phi_l of the best layer: agreement and y-nonlinearity.
  """

  readings: tuple[str, ...] = tuple(READINGS)
  token: str = "last"
  relative_ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
  num_bootstrap: int = 200
  fd_step: float = 0.5
  smoother_prompts: int = 8
  cg_steps: int = 8

  def __post_init__(self):
    for name in self.readings:
      _reading(name)
    if PRIMARY_READING not in self.readings:
      raise ValueError(f"readings must include {PRIMARY_READING!r} (the feature space of kernel "
                       "alignment, smoother weights and CG).")
    icl._choice("token", self.token, icl.TOKENS)  # pylint: disable=protected-access
    if not self.relative_ridges or any(not r > 0 for r in self.relative_ridges):
      raise ValueError(f"relative_ridges must be positive numbers, got {self.relative_ridges}.")
    for name in ("num_bootstrap", "smoother_prompts", "cg_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


class _Space(NamedTuple):
  eval_support: np.ndarray
  eval_query: np.ndarray
  ridge: float
  intercept: bool
  prediction: np.ndarray
  ridge_at_edge: bool


def _krr_space(fit_s, fit_q, ev_s, ev_q, y_fit, y_eval, model_fit, relative) -> _Space:
  """Standardised features (statistics of the fit prompts), the ridge and intercept whose KRR is
  closest to the model on the fit prompts, and its predictions on the evaluation prompts."""
  readout = features_lib.standardizing_map(fit_s, fit_q)
  fit_s, fit_q, ev_s, ev_q = (readout(a) for a in (fit_s, fit_q, ev_s, ev_q))
  choice = measures.select_ridge(
      lambda r, i: measures.krr_predict(fit_s, y_fit, fit_q, r, intercept=i), model_fit,
      measures.relative_ridges(fit_s, relative))
  pred = np.asarray(measures.krr_predict(ev_s, y_eval, ev_q, choice.ridge, intercept=choice.intercept))
  edge = choice.ridge in (float(choice.ridges[0]), float(choice.ridges[-1]))
  return _Space(ev_s, ev_q, choice.ridge, choice.intercept, pred, edge)


def _agreement_row(space: _Space, model_eval, sigma, key, num_bootstrap) -> dict[str, Any]:
  agree = measures.agreement(space.prediction, model_eval, key, num_bootstrap=num_bootstrap)
  shuffled = measures.agreement(space.prediction, model_eval[sigma], num_bootstrap=1)
  return {"ridge": space.ridge, "intercept": space.intercept, "ridge_at_edge": space.ridge_at_edge,
          **agree._asdict(), "shuffled_r2": shuffled.r2}


def _finite(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def analyse_lm(regressor: icl.LMRegressor, prompts: Any, fit_prompts: Any, labels_b: Any,
               settings: LMSettings, key: Any) -> dict[str, Any]:
  """The alignment instruments on one LM; returns a JSON-ready dict.

  On evaluation prompts, with held-out fit prompts for every choice (feature standardisation, ridge,
  intercept), all labels written (`fmt.written`):

  1. the LM's predictions (expected readout) with the true labels, `model_eval [B, q]`;
  2. `krr[reading]`: per layer, KRR on standardised phi_l against the LM (pooled R^2 with a bootstrap
     interval over prompts, relative distance; `shuffled_r2` pairs each prompt with another prompt's
     predictions; `ridge_at_edge` when the chosen ridge is the grid's smallest or largest);
     `krr_raw_x` the same on the raw inputs; `best_layer` of the primary reading;
  3. `kernel_alignment`: centred alignment of Gram(phi_l) with raw x's linear kernel and with the
     target kernel `f f^T` (and the shuffled control);
  4. `smoother_weights`: the LM's finite-difference weights on the first `smoother_prompts` prompts,
     their cosine per query with KRR's on phi_l (per layer), on raw x, and shuffled; the mean weight
     sum (1 for a predictor that follows a shift of every label);
  5. `y_nonlinearity`: of the LM on `w(y / sqrt 2)`, `w(labels_b / sqrt 2)`, and of CG_t
     (t = 1..cg_steps) on phi_l of the best layer, with CG_t's agreement with the LM.

  Args:
    regressor: the LM (`kcg.lm.LMRegressor`; the expected readout is used whatever its readout).
    prompts: evaluation `kcg.tasks.Prompts` (`f_support`/`f_query` give the target kernel).
    fit_prompts: held-out `kcg.tasks.Prompts` for every choice.
    labels_b: `[B, k]` support labels of fresh tasks on `prompts`' inputs (`kcg.tasks.sample_targets`).
    settings: `LMSettings`.
    key: PRNG key (bootstrap, shuffled pairs).
  """
  fmt = regressor.fmt
  regressor = _continuous(regressor)
  xs, xq = np.asarray(prompts.x_support, np.float64), np.asarray(prompts.x_query, np.float64)
  fxs, fxq = np.asarray(fit_prompts.x_support, np.float64), np.asarray(fit_prompts.x_query, np.float64)
  ys, fys = fmt.written(prompts.y_support), fmt.written(fit_prompts.y_support)
  if np.shape(labels_b) != ys.shape:
    raise ValueError(f"labels_b must be [B, k] = {ys.shape}, got {np.shape(labels_b)}.")
  agree_key, shuffle_key = jax.random.split(key)
  model_eval = regressor(xs, ys, xq)
  model_fit = regressor(fxs, fys, fxq)
  sigma = measures.shuffled_pairs(xs.shape[0], shuffle_key)
  out: dict[str, Any] = {
      "num_prompts": int(xs.shape[0]), "num_fit_prompts": int(fxs.shape[0]),
      "predictions": {"std": float(np.std(model_eval)),
                      "std_within_prompt": float(np.mean(np.std(model_eval, axis=1))),
                      "test_mse": float(np.mean((model_eval - np.asarray(prompts.y_query)) ** 2))},
      "krr": {}}

  spaces = {}
  for reading in settings.readings:
    h_eval = hidden_features(regressor, xs, ys, xq, reading=reading, token=settings.token)
    h_fit = hidden_features(regressor, fxs, fys, fxq, reading=reading, token=settings.token)
    rows = []
    for layer in range(h_eval.support.shape[0]):
      space = _krr_space(h_fit.support[layer], h_fit.query[layer], h_eval.support[layer],
                         h_eval.query[layer], fys, ys, model_fit, settings.relative_ridges)
      if reading == PRIMARY_READING:
        spaces[layer] = space
      rows.append({"layer": layer, **_agreement_row(space, model_eval, sigma, agree_key,
                                                    settings.num_bootstrap)})
    out["krr"][reading] = rows
  layers = sorted(spaces)
  raw = _krr_space(fxs, fxq, xs, xq, fys, ys, model_fit, settings.relative_ridges)
  out["krr_raw_x"] = _agreement_row(raw, model_eval, sigma, agree_key, settings.num_bootstrap)
  best_layer = max(out["krr"][PRIMARY_READING], key=lambda r: r["r2"])["layer"]
  out["best_layer"] = best_layer

  # 3. Kernel alignment of the primary reading's (standardised) features.
  points = lambda s, q: np.concatenate([np.asarray(s), np.asarray(q)], axis=1)
  targets = {"raw_x": measures.linear_gram(points(xs, xq)),
             "target": measures.linear_gram(points(prompts.f_support, prompts.f_query)[..., None])}
  alignment = {name: [] for name in targets}
  alignment.update({f"{name}_shuffled": [] for name in targets})
  for layer in layers:
    gram = measures.linear_gram(points(spaces[layer].eval_support, spaces[layer].eval_query))
    for name, target in targets.items():
      alignment[name].append(float(np.mean(measures.kernel_alignment(gram, target))))
      alignment[f"{name}_shuffled"].append(
          float(np.mean(measures.kernel_alignment(gram, target[sigma]))))
  out["kernel_alignment"] = alignment

  # 4. Smoother weights by finite differences.
  n = min(settings.smoother_prompts, xs.shape[0])
  weights = lm_smoother_weights(regressor, xs[:n], ys[:n], xq[:n], step=settings.fd_step)
  sub_sigma = measures.shuffled_pairs(n, shuffle_key) if n > 1 else None
  smoother: dict[str, Any] = {"step": settings.fd_step, "num_prompts": n,
                              "weight_sum": float(np.mean(weights.sum(-1))),
                              "weight_norm": float(np.mean(np.linalg.norm(weights, axis=-1))),
                              "krr_phi": [], "krr_phi_shuffled": []}
  for layer in layers:
    sp = spaces[layer]
    w = measures.krr_smoother_weights(sp.eval_support[:n], sp.eval_query[:n], sp.ridge,
                                      intercept=sp.intercept)
    smoother["krr_phi"].append(float(np.mean(measures.weight_cosine(weights, w))))
    smoother["krr_phi_shuffled"].append(
        None if sub_sigma is None else float(np.mean(measures.weight_cosine(weights[sub_sigma], w))))
  w_raw = measures.krr_smoother_weights(raw.eval_support[:n], raw.eval_query[:n], raw.ridge,
                                        intercept=raw.intercept)
  smoother["linear_x"] = float(np.mean(measures.weight_cosine(weights, w_raw)))
  out["smoother_weights"] = smoother

  # 5. The y-linearity signature, and CG_t on phi_l of the best layer as its reference.
  y_a = fmt.written(np.asarray(prompts.y_support, np.float64) / math.sqrt(2))
  y_b = fmt.written(np.asarray(labels_b, np.float64) / math.sqrt(2))
  nl = lm_y_nonlinearity(regressor, xs, y_a, y_b, xq)
  best = spaces[best_layer]

  def cg(t):
    return lambda _xs, y, _xq: candidates_lib.trajectories(
        candidates_lib.FeatureProblem(best.eval_support, np.asarray(y, np.float64), best.eval_query),
        best.ridge, t, intercept=best.intercept, names=("cg",))["cg"][:, -1]

  cg_traj = candidates_lib.trajectories(
      candidates_lib.FeatureProblem(best.eval_support, ys, best.eval_query), best.ridge,
      settings.cg_steps, intercept=best.intercept, names=("cg",))["cg"]
  cg_r2 = [measures.agreement(cg_traj[:, t], model_eval, num_bootstrap=1).r2
           for t in range(1, settings.cg_steps + 1)]
  out["y_nonlinearity"] = {
      "index": nl.index, "clipped_labels": nl.clipped_labels,
      "cg_layer": best_layer,
      "cg_by_step": [measures.y_nonlinearity(cg(t), xs, y_a, y_b, xq, weights=(1.0, 1.0)).index
                     for t in range(1, settings.cg_steps + 1)],
      "cg_r2_by_step": [_finite(r) for r in cg_r2]}
  return out


__all__ = ("CIRCULAR_READING", "LMNonlinearity", "LMSettings", "PRIMARY_READING", "READINGS",
           "analyse_lm", "check_step", "finite_difference_weights", "hidden_features",
           "lm_smoother_weights", "lm_y_nonlinearity")
