"""Layer-wise algorithm matching: which algorithm, at which step, does each layer's read-out match?

For every layer l of a subject (`kcg.probes`-style `Subject`, compiled or trained) a prediction at the
query tokens is read out of the residual stream (`layer_predictions`), in one of three named ways:

* `"prediction_channel"` (compiled models): the channel the construction accumulates `f_t(x)` in;
* `"logit_lens"`: the model's own final norm and readout applied to the layer's residual;
* `"linear_readout"`: a ridge regression from the query token's residual to `y_query`, fitted per layer
  on a separate set of prompts (`fit_prompts`) and applied to the evaluation prompts.

Each layer's predictions are compared with the trajectories of the candidate algorithms
(`algorithm_trajectories`: CG, primal CG, Jacobi-PCG, GD with the optimal fixed step, Chebyshev and a
Newton-Schulz iteration, each in feature space on `phi(x)` and in data space on raw `x`), step by step,
and the best match `(algorithm, space, t) = argmin mean (f_layer - f_t)^2` is reported with the measures
of `kcg.evaluation` at that match (`match_layers`): squared prediction difference, relative distance,
cosine of the errors, per-problem R^2 with a bootstrap interval, and (when gradients are taken) the
cosine and relative distance of the induced weights `d f / d x_query` (for a linear predictor
`w = Phi^T alpha`) and the sensitivity cosine (mean over queries of the per-query cosine).

Newton-Schulz (`newton_schulz_trajectory`): `X_0 = c A`, `X_{i+1} = X_i (2 I - A X_i)` on
`A = K + ridge I` with `c = 2 / (lam_min^2 + lam_max^2)`, so `I - A X_i = (I - c A^2)^(2^i)` (quadratic
convergence; the "iterative Newton" of Fu et al. 2023). Step `t` predicts `k(x)^T X_{t-1} y`, step 0
predicts 0, as every other trajectory.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import baselines as baselines_lib
from kcg._src import checks
from kcg._src import evaluation
from kcg._src import probes
from kcg._src import solvers

Array = jax.Array

READOUTS = ("prediction_channel", "logit_lens", "linear_readout")
ALGORITHMS = ("cg", "primal_cg", "pcg", "gd", "chebyshev", "newton_schulz")
SPACES = ("feature", "data")
_SOLVE = {"cg": solvers.cg_predict, "primal_cg": solvers.primal_cg_predict, "pcg": solvers.pcg_predict,
          "gd": solvers.gd_predict, "chebyshev": solvers.chebyshev_predict}


# ----------------------------------------------------------------------------------------------------
# Reading a prediction out of every layer.
# ----------------------------------------------------------------------------------------------------


class LinearReadout(NamedTuple):
  """Per-layer ridge readouts `f = ((h - mean) * scale) @ weights + bias`; arrays lead with `[L+1]`."""

  mean: Array
  scale: Array
  weights: Array
  bias: Array


@jax.jit
def _fit_readout_core(h_LxNxD, y_N, ridge):
  dtype = h_LxNxD.dtype
  eps = jnp.finfo(dtype).eps

  def one(h):
    finite = jnp.all(jnp.isfinite(h), axis=0)
    h = jnp.where(finite[None, :], h, jnp.zeros((), dtype))
    mean = jnp.mean(h, axis=0)
    std = jnp.std(h, axis=0)
    keep = finite & (std > 1e3 * eps * jnp.max(std))
    scale = jnp.where(keep, 1 / jnp.where(keep, std, jnp.ones((), dtype)), 0)
    z = (h - mean[None, :]) * scale[None, :]
    n, d = z.shape
    gram = jnp.einsum("nd,ne->de", z, z, precision=checks.HIGHEST)
    evals, evecs = jnp.linalg.eigh(gram + ridge * n * jnp.eye(d, dtype=dtype))
    rhs = jnp.einsum("nd,n->d", z, y_N - jnp.mean(y_N), precision=checks.HIGHEST)
    weights = evecs @ ((evecs.T @ rhs) / evals)
    return mean, scale, weights, jnp.mean(y_N)

  return jax.vmap(one)(h_LxNxD)


def fit_linear_readout(subject: probes.Subject, fit_prompts: Any, *, ridge: float = 1e-6,
                       targets: Any = None) -> LinearReadout:
  """Per-layer ridge readouts from the query tokens' residuals to `targets` (default: y_query)."""
  checks.check_ridge(ridge)
  h = probes.residuals(subject, fit_prompts)
  q = fit_prompts.x_query.shape[1]
  h_q = h[:, :, -q:, :]
  targets = fit_prompts.y_query if targets is None else targets
  y = jnp.asarray(targets, h.dtype)
  if y.shape != h_q.shape[1:3]:
    raise ValueError(f"readout targets must have shape {h_q.shape[1:3]} ([B, q]), got {y.shape}.")
  return LinearReadout(*_fit_readout_core(h_q.reshape(h.shape[0], -1, h.shape[-1]), y.reshape(-1),
                                          jnp.asarray(ridge, h.dtype)))


def _apply_readout(readout: LinearReadout, h_LxBxQxD: Array) -> Array:
  dtype = h_LxBxQxD.dtype
  cast = lambda a: jnp.asarray(a, dtype)
  h = jnp.where(jnp.isfinite(h_LxBxQxD), h_LxBxQxD, jnp.zeros((), dtype))
  z = (h - cast(readout.mean)[:, None, None, :]) * cast(readout.scale)[:, None, None, :]
  return (jnp.einsum("lbqd,ld->lbq", z, cast(readout.weights), precision=checks.HIGHEST)
          + cast(readout.bias)[:, None, None])


def _check_readout(readout: str) -> str:
  if readout not in READOUTS:
    raise ValueError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}.")
  return readout


def layer_predictor(subject: probes.Subject, readout: str = "logit_lens", *,
                    linear_readout: LinearReadout | None = None) -> Callable[..., Array]:
  """`(x_support, y_support, x_query) -> [L+1, B, q]`: every layer's read-out prediction (differentiable)."""
  readout = _check_readout(readout)
  if readout == "prediction_channel" and subject.program is None:
    raise ValueError("readout='prediction_channel' needs a compiled subject (its program names the "
                     "channel); use 'logit_lens' or 'linear_readout' for a trained model.")
  if readout == "linear_readout" and linear_readout is None:
    raise ValueError("readout='linear_readout' needs linear_readout=fit_linear_readout(subject, "
                     "fit_prompts) fitted on other prompts.")

  def predict(x_support, y_support, x_query):
    h = subject.forward(x_support, y_support, x_query, return_residuals=True).residuals
    q = jnp.shape(x_query)[1]
    h_q = h[:, :, -q:, :]
    if readout == "prediction_channel":
      program = subject.program
      return h_q[..., program.layout.slice(program.readout).start]
    if readout == "logit_lens":
      return subject.readout(h_q)
    return _apply_readout(linear_readout, h_q)

  return predict


def layer_predictions(subject: probes.Subject, prompts: Any, readout: str = "logit_lens", *,
                      fit_prompts: Any = None, ridge: float = 1e-6) -> Array:
  """Every layer's prediction at the query tokens, `[L+1, B, q]` (see the module docstring)."""
  linear = None
  if _check_readout(readout) == "linear_readout":
    if fit_prompts is None:
      raise ValueError("readout='linear_readout' is fitted on separate prompts: pass fit_prompts.")
    linear = fit_linear_readout(subject, fit_prompts, ridge=ridge)
  return layer_predictor(subject, readout, linear_readout=linear)(
      prompts.x_support, prompts.y_support, prompts.x_query)


# ----------------------------------------------------------------------------------------------------
# Candidate algorithms.
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _newton_schulz_core(z_support, y_support, z_query, ridge, num_steps):
  dtype = z_support.dtype
  k = z_support.shape[-2]
  gram = jnp.einsum("bkp,bjp->bkj", z_support, z_support, precision=checks.HIGHEST)
  a = gram + ridge * jnp.eye(k, dtype=dtype)[None]
  k_query = jnp.einsum("bqp,bkp->bqk", z_query, z_support, precision=checks.HIGHEST)
  evals = jnp.linalg.eigvalsh(a)
  c = 2 / (jnp.square(evals[:, 0]) + jnp.square(evals[:, -1]))
  x = c[:, None, None] * a
  eye = jnp.eye(k, dtype=dtype)[None]
  outputs = [jnp.zeros(z_query.shape[:2], dtype)]
  for _ in range(num_steps):
    outputs.append(jnp.einsum("bqk,bkj,bj->bq", k_query, x, y_support, precision=checks.HIGHEST))
    x = jnp.einsum("bij,bjk->bik", x, 2 * eye - jnp.einsum("bij,bjk->bik", a, x,
                                                             precision=checks.HIGHEST),
                   precision=checks.HIGHEST)
  return jnp.stack(outputs, axis=1)


def newton_schulz_trajectory(num_steps: int, ridge: float, *, feature_map: Callable | None = None,
                             space: str = "feature") -> Callable[..., Array]:
  """`(x_support [B,k,d], y_support [B,k], x_query [B,q,d]) -> [B, T+1, q]` of Newton-Schulz (module doc)."""
  num_steps = checks.check_num_steps(num_steps)
  checks.check_ridge(ridge)
  if space not in SPACES:
    raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}.")
  used = feature_map if space == "feature" else None

  def predict_steps(x_support, y_support, x_query):
    x_support, y_support, x_query = baselines_lib.check_prompt_arrays(x_support, y_support, x_query)
    if x_support.ndim != 3:
      raise ValueError(f"newton_schulz_trajectory takes batched prompts [B, k, d]; got {x_support.shape}.")
    dtype = x_support.dtype
    z_s = x_support if used is None else jnp.asarray(used(x_support), dtype)
    z_q = x_query if used is None else jnp.asarray(used(x_query), dtype)
    return _newton_schulz_core(z_s, y_support, z_q, jnp.asarray(ridge, dtype), num_steps)

  return predict_steps


def trajectory(algorithm: str, num_steps: int, ridge: float, *, feature_map: Callable | None = None,
               space: str = "feature") -> Callable[..., Array]:
  """The `[B, T+1, q]` trajectory of one candidate (`ALGORITHMS`), as `kcg.baselines.trajectory`.

  Runs the `kcg.solvers` predict functions directly (their jitted cores take the ridge as an array), so
  sweeping the ridge or building many candidates compiles each solver once per shape.
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
  if algorithm == "newton_schulz":
    return newton_schulz_trajectory(num_steps, ridge, feature_map=feature_map, space=space)
  num_steps = checks.check_num_steps(num_steps)
  checks.check_ridge(ridge)
  if space not in SPACES:
    raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}.")
  used = feature_map if space == "feature" else None
  solve = _SOLVE[algorithm]

  def predict_steps(x_support, y_support, x_query):
    x_support, y_support, x_query = baselines_lib.check_prompt_arrays(x_support, y_support, x_query)
    dtype = x_support.dtype
    z_s = x_support if used is None else jnp.asarray(used(x_support), dtype)
    z_q = x_query if used is None else jnp.asarray(used(x_query), dtype)
    return solve(z_s, y_support, z_q, jnp.asarray(ridge, dtype), num_steps)

  return predict_steps


def candidate_names(algorithms: Sequence[str] = ALGORITHMS, spaces: Sequence[str] = SPACES, *,
                    feature_map: Callable | None = None) -> tuple[tuple[str, str], ...]:
  """The `(algorithm, space)` candidates; without a feature map `phi = x` and only "data" is kept."""
  for a in algorithms:
    if a not in ALGORITHMS:
      raise ValueError(f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}.")
  for s in spaces:
    if s not in SPACES:
      raise ValueError(f"unknown space {s!r}; choose from {', '.join(SPACES)}.")
  if feature_map is None:
    spaces = ("data",)
  return tuple((a, s) for a in algorithms for s in spaces)


@functools.partial(jax.jit, static_argnames=("algorithms", "num_steps"))
def _trajectories_core(z_support, y_support, z_query, ridge, *, algorithms, num_steps):
  """Every candidate's trajectory on one space in one compiled call (one compilation, not one each)."""
  out = {}
  for algorithm in algorithms:
    if algorithm == "newton_schulz":
      out[algorithm] = _newton_schulz_core(z_support, y_support, z_query, ridge, num_steps)
    else:
      out[algorithm] = _SOLVE[algorithm](z_support, y_support, z_query, ridge, num_steps)
  return out


def algorithm_trajectories(prompts: Any, ridge: float, max_steps: int, *,
                           algorithms: Sequence[str] = ALGORITHMS, spaces: Sequence[str] = SPACES,
                           feature_map: Callable | None = None) -> dict[str, Array]:
  """`{"<algorithm>/<space>": [B, T+1, q]}` for every candidate (see `candidate_names`)."""
  names = candidate_names(algorithms, spaces, feature_map=feature_map)
  max_steps = checks.check_num_steps(max_steps)
  checks.check_ridge(ridge)
  x_support, y_support, x_query = baselines_lib.check_prompt_arrays(
      prompts.x_support, prompts.y_support, prompts.x_query)
  if x_support.ndim != 3:
    raise ValueError(f"algorithm_trajectories takes batched prompts [B, k, d]; got {x_support.shape}.")
  dtype = x_support.dtype
  out = {}
  for space in dict.fromkeys(s for _, s in names):
    used = feature_map if space == "feature" else None
    z_s = x_support if used is None else jnp.asarray(used(x_support), dtype)
    z_q = x_query if used is None else jnp.asarray(used(x_query), dtype)
    algs = tuple(a for a, s in names if s == space)
    values = _trajectories_core(z_s, y_support, z_q, jnp.asarray(ridge, dtype), algorithms=algs,
                                num_steps=max_steps)
    out.update({f"{a}/{space}": values[a] for a in algs})
  return {f"{a}/{s}": out[f"{a}/{s}"] for a, s in names}


# ----------------------------------------------------------------------------------------------------
# Matching.
# ----------------------------------------------------------------------------------------------------


def implicit_weights_steps(predict_steps: Callable[..., Array], prompts: Any, *,
                           independent_queries: bool = False) -> Array:
  """`d f_n(x_query_bj) / d x_query_bj` for a predictor returning `[B, N, q]`; shape `[B, N, q, d]`.

  Only the diagonal of the Jacobian over queries is kept, so queries that attend to each other are
  handled (as in `kcg.evaluation.implicit_weights`). Forward mode: one Jacobian-vector product per
  query coordinate `(j, i)`, applied to query `j` of every prompt at once (prompts are independent), so
  the cost is `q d` forward passes whatever the number `N` of outputs; `independent_queries=True` (each
  prediction reads its own query only: every candidate algorithm, and a prefix-masked model) moves
  coordinate `i` of all queries together, `d` passes. (Reverse mode needs one backward pass per output
  `(n, j)`, and vectorising those over a compiled model's ~50 layers at B = 256 asked for 57 GB.)
  Memory is that of `d` forward passes at a time.
  """
  x_support, y_support, x_query = (jnp.asarray(prompts.x_support), jnp.asarray(prompts.y_support),
                                   jnp.asarray(prompts.x_query))
  _, q, d = x_query.shape

  def directional(tangent_Bxqxd):
    return jax.jvp(lambda xq: predict_steps(x_support, y_support, xq), (x_query,),
                   (tangent_Bxqxd,))[1]  # [B, N, q]

  if independent_queries:
    tangents_dxBxqxd = jnp.broadcast_to(jnp.eye(d, dtype=x_query.dtype)[:, None, None, :],
                                        (d,) + x_query.shape)
    jvps_dxBxNxq = jax.lax.map(directional, tangents_dxBxqxd, batch_size=d)
    return jnp.moveaxis(jvps_dxBxNxq, 0, -1)  # [B, N, q, d]

  basis_QDxqxd = jnp.eye(q * d, dtype=x_query.dtype).reshape(q * d, q, d)
  tangents = jnp.broadcast_to(basis_QDxqxd[:, None], (q * d,) + x_query.shape)
  jvps = jax.lax.map(directional, tangents, batch_size=d)  # [q d, B, N, q]
  jvps_qxdxBxNxq = jvps.reshape((q, d) + jvps.shape[1:])
  diag_dxBxNxq = jnp.diagonal(jvps_qxdxBxNxq, axis1=0, axis2=4)  # [d, B, N, q] (query j of output j)
  return jnp.moveaxis(diag_dxBxNxq, 0, -1)  # [B, N, q, d]


class LayerMatch(NamedTuple):
  """The best-matching algorithm of one layer, with every measure at that match.

  Attributes:
    layer: the layer (0 = embedding, l = after l blocks).
    name: `"<algorithm>/<space>"` of the best match.
    step: its step `t`.
    squared_difference: `mean (f_layer - f_t)^2`.
    relative_distance: `|f_layer - f_t| / |f_t|`.
    error_cosine: cosine of the errors `f_layer - y`, `f_t - y`.
    r2, r2_lower, r2_upper: mean per-problem `R^2` of `f_layer` as a prediction of `f_t`, bootstrap CI.
    weight_cosine, weight_relative_distance: of the induced weights `d f / d x_query` (NaN without
      gradients).
    sensitivity_cosine: mean over queries of the per-query cosine of those gradients (NaN without).
  """

  layer: int
  name: str
  step: int
  squared_difference: float
  relative_distance: float
  error_cosine: float
  r2: float
  r2_lower: float
  r2_upper: float
  weight_cosine: float
  weight_relative_distance: float
  sensitivity_cosine: float


class Matching(NamedTuple):
  """Layer-wise matching of a subject against candidate algorithms.

  Attributes:
    layers: one `LayerMatch` per layer.
    distances: `{name: [L+1, T+1]}` mean squared difference of every layer to every step.
    best_step: `{name: [L+1]}` the best step of each candidate for each layer.
    best_distance: `{name: [L+1]}` the distance at that step.
  """

  layers: tuple[LayerMatch, ...]
  distances: dict[str, np.ndarray]
  best_step: dict[str, np.ndarray]
  best_distance: dict[str, np.ndarray]

  def table(self) -> str:
    """Markdown table: layer, best algorithm and step, and the measures."""
    rows = ["| layer | best match | sq. diff | rel. dist | err cos | R^2 [CI] | w cos | sens cos |",
            "|---|---|---|---|---|---|---|---|"]
    for m in self.layers:
      rows.append(f"| {m.layer} | {m.name} t={m.step} | {m.squared_difference:.3g} | "
                  f"{m.relative_distance:.3g} | {m.error_cosine:.3f} | {m.r2:.3f} "
                  f"[{m.r2_lower:.3f}, {m.r2_upper:.3f}] | {m.weight_cosine:.3f} | "
                  f"{m.sensitivity_cosine:.3f} |")
    return "\n".join(rows)


def _cosine(a: Array, b: Array) -> float:
  den = float(jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)))
  return float(jnp.sum(a * b)) / den if den > 0 else 0.0


def match_layers(layer_predictions_LxBxQ: Any, prompts: Any, trajectories: dict[str, Any], key: Any, *,
                 layer_weights: Any = None, trajectory_weights: dict[str, Any] | None = None,
                 num_bootstrap: int = 200) -> Matching:
  """Best `(candidate, step)` for every layer by squared prediction difference, and measures there.

  Args:
    layer_predictions_LxBxQ: `[L+1, B, q]` (see `layer_predictions`).
    prompts: the prompts they were made on (with `y_query`; `q >= 2` for the per-problem R^2).
    trajectories: `{name: [B, T+1, q]}` (see `algorithm_trajectories`).
    key: PRNG key for the bootstrap.
    layer_weights: optional `[B, L+1, q, d]` induced weights of the layers (`implicit_weights_steps`).
    trajectory_weights: optional `{name: [B, T+1, q, d]}` of the candidates.
    num_bootstrap: bootstrap resamples of the R^2 interval.
  """
  preds = jnp.asarray(layer_predictions_LxBxQ)
  if preds.ndim != 3:
    raise ValueError(f"layer predictions must be [L+1, B, q], got shape {preds.shape}.")
  if not trajectories:
    raise ValueError("trajectories is empty; pass algorithm_trajectories(...).")
  y_query = jnp.asarray(prompts.y_query, preds.dtype)
  if y_query.shape != preds.shape[1:]:
    raise ValueError(f"prompts.y_query {y_query.shape} must match the predictions' [B, q] "
                     f"{preds.shape[1:]}.")
  distances, best_step, best_distance = {}, {}, {}
  for name, traj in trajectories.items():
    traj = jnp.asarray(traj, preds.dtype)
    if traj.ndim != 3 or traj.shape[0] != preds.shape[1] or traj.shape[2] != preds.shape[2]:
      raise ValueError(f"trajectory {name!r} must be [B, T+1, q] with B, q = {preds.shape[1:]}, got "
                       f"{traj.shape}.")
    d = jnp.mean(jnp.square(preds[:, :, None, :] - traj[None]), axis=(1, 3))  # [L+1, T+1]
    distances[name] = np.asarray(d)
    best_step[name] = np.argmin(distances[name], axis=1)
    best_distance[name] = np.min(distances[name], axis=1)
  names = list(trajectories)
  matches = []
  for layer in range(preds.shape[0]):
    scores = [best_distance[n][layer] for n in names]
    name = names[int(np.argmin(scores))]
    step = int(best_step[name][layer])
    f_layer = preds[layer]
    f_alg = jnp.asarray(trajectories[name], preds.dtype)[:, step]
    sim = evaluation.prediction_similarity(f_layer, f_alg)
    err_cos = float(evaluation.error_cosine(f_layer, f_alg, y_query))
    if preds.shape[2] >= 2:
      r2 = evaluation.r2_with_ci(f_layer, f_alg, jax.random.fold_in(key, layer),
                                 num_bootstrap=num_bootstrap)
      r2_vals = (float(r2.r2), float(r2.lower), float(r2.upper))
    else:
      r2_vals = (float("nan"),) * 3
    w_cos = w_rel = sens = float("nan")
    if layer_weights is not None and trajectory_weights is not None and name in trajectory_weights:
      w_layer = jnp.asarray(layer_weights)[:, layer]
      w_alg = jnp.asarray(trajectory_weights[name])[:, step]
      w_cos = _cosine(w_layer, w_alg)
      w_rel = float(evaluation.prediction_similarity(w_layer, w_alg).relative_distance)
      sens = float(jnp.mean(evaluation.cosine_similarity(w_layer, w_alg, axis=-1)))
    matches.append(LayerMatch(layer, name, step, float(sim.squared_difference),
                              float(sim.relative_distance), err_cos, *r2_vals, w_cos, w_rel, sens))
  return Matching(tuple(matches), distances, best_step, best_distance)


def match_subject(subject: probes.Subject, prompts: Any, key: Any, *, ridge: float, max_steps: int,
                  readout: str = "logit_lens", fit_prompts: Any = None,
                  algorithms: Sequence[str] = ALGORITHMS, spaces: Sequence[str] = SPACES,
                  feature_map: Callable | None = None, gradients: bool = True,
                  readout_ridge: float = 1e-6, num_bootstrap: int = 200) -> Matching:
  """`match_layers` for a subject: its layer read-outs against every candidate's trajectory.

  Args:
    subject: a `kcg.probes.Subject`.
    prompts: evaluation prompts (x_support, y_support, x_query, y_query).
    key: PRNG key (bootstrap).
    ridge: the KRR ridge of the candidates.
    max_steps: `T`, the longest trajectory.
    readout: one of `READOUTS`; "linear_readout" is fitted on `fit_prompts`.
    algorithms: the candidates (`candidate_names`).
    spaces: the candidates (`candidate_names`).
    feature_map: the candidates (`candidate_names`).
    gradients: also compare induced weights `d f / d x_query` (one backward pass per layer and step).
  """
  linear = None
  if _check_readout(readout) == "linear_readout":
    if fit_prompts is None:
      raise ValueError("readout='linear_readout' is fitted on separate prompts: pass fit_prompts.")
    linear = fit_linear_readout(subject, fit_prompts, ridge=readout_ridge)
  predictor = layer_predictor(subject, readout, linear_readout=linear)
  preds = predictor(prompts.x_support, prompts.y_support, prompts.x_query)
  trajectories = algorithm_trajectories(prompts, ridge, max_steps, algorithms=algorithms,
                                        spaces=spaces, feature_map=feature_map)
  layer_w = traj_w = None
  if gradients:
    # Measures first (cheap), then gradients for the candidates that are some layer's best match only.
    first = match_layers(preds, prompts, trajectories, key, num_bootstrap=num_bootstrap)
    best_names = sorted({m.name for m in first.layers})
    layer_w = implicit_weights_steps(lambda xs, ys, xq: jnp.moveaxis(predictor(xs, ys, xq), 0, 1),
                                     prompts, independent_queries=subject.config.mask == "prefix")
    traj_w = {}
    for name in best_names:
      algorithm, space = name.split("/")
      fn = trajectory(algorithm, max_steps, ridge, feature_map=feature_map, space=space)
      traj_w[name] = implicit_weights_steps(fn, prompts, independent_queries=True)
  return match_layers(preds, prompts, trajectories, key, layer_weights=layer_w,
                      trajectory_weights=traj_w, num_bootstrap=num_bootstrap)


__all__ = (
    "ALGORITHMS", "LayerMatch", "LinearReadout", "Matching", "READOUTS", "SPACES",
    "algorithm_trajectories", "candidate_names", "fit_linear_readout", "implicit_weights_steps",
    "layer_predictions", "layer_predictor", "match_layers", "match_subject",
    "newton_schulz_trajectory", "trajectory",
)
