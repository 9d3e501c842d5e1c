"""Fine-tuning measures read from the model's inside: CG-state probes, candidate agreement, layer matching.

Three measures of a model of the compiled architecture (compiled start, random init, or an imitation
run), on held-out prompts, at every checkpoint (`checkpoint_measures`, called by
`kcg.finetune.evaluate`):

* *State probes* (`state_probes`). The compiled program says after which layer the state of CG step s is
  in place (`step_end_layers`: `program.step_ends`, residual index = layers applied). At that layer, on
  the site where the construction keeps the state (`kcg.probes.compiled_state_site`: one entry per
  support token for dual CG, the vector at the aggregator for primal CG), a cross-validated linear probe
  (`kcg.probes.probe`, k-fold over prompts, shuffled-target control) is fitted from the whole residual
  to the reference `alpha_s`, `r_s`, `p_s` (`kcg.probes.state_targets`, float64), s = 1..t; the held-out
  pooled R^2 is reported. The compiled model holds these in named channels, so its R^2 is 1 to rounding;
  a model that computes something else need not hold them linearly anywhere.
  The probes cost milliseconds (ridge fits of a residual width of a few dozen), so they run at every
  checkpoint, on every run. Primal CG keeps its state at the aggregator, one row per prompt: at 64
  eval prompts and 4 folds that is ~1.4 training rows per varying residual column, so a low R^2 there
  bounds what a linear probe finds from that few prompts (`kcg.probes` module doc), no more; the
  compiled model's exact channels still give R^2 = 1 to ~1e-9.
* *Candidate agreement* (`candidate_predictions`, `candidate_agreement`): the model's predictions
  against every candidate solver of `kcg.matching` / `kcg.alignment` after t steps (the compiled
  model's step count) on the compiled features phi(x) (x, or the random-ReLU layer) and the compiled ridge: dual CG,
  primal CG, Jacobi-PCG, GD, Chebyshev, Newton-Schulz, and GD++, heavy-ball momentum and the best fixed
  polynomial, fitted to the noiseless targets of a separate set of prompts; and the KRR solution
  ("krr"). Pooled R^2 of the candidate as a description of the model's predictions
  (`kcg.alignment.agreement`) and relative distance; `closest` is the candidate of highest R^2.
* *Layer matching* (`layer_matching`): every layer's logit-lens prediction at the query tokens against
  every per-prompt candidate's trajectory of up to 2t steps (`kcg.matching.match_layers`): per layer the
  best-matching (algorithm, step) and its relative distance; compiled CG matches CG step s at layer
  `step_ends[s]`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import alignment_candidates as candidates_lib
from kcg._src import matching
from kcg._src import probes
from kcg._src import train_data as data_lib
from kcg._src.alignment_measures import agreement

PROBE_QUANTITIES = ("alpha", "r", "p")
# Per-prompt candidates on the compiled features (data space), and the ones fitted to the task distribution.
PER_PROMPT = ("cg", "primal_cg", "pcg", "gd", "chebyshev", "newton_schulz")
FITTED = candidates_lib.FITTED
CANDIDATES = PER_PROMPT + FITTED + ("krr",)
# Folds of the state probes: 4 keeps 48 training prompts per fold at 64 eval prompts.
PROBE_FOLDS = 4
PROBE_RIDGE = 1e-6
# Separate prompts the fitted candidates are fitted on (an eval stream of the run's seed, never the
# eval prompts themselves nor a training batch).
_FIT_STREAM = 11
_NUM_FIT_PROMPTS = 128
# A state entry this small relative to the quantity's largest (float64 reference) is converged CG's 0.
_CONVERGED = 1e-9


def step_end_layers(program: Any) -> tuple[int, ...]:
  """`(l_0, ..., l_t)`: the residual index (layers applied) after which CG step s's state is in place.

  Read from the compiled program (`Program.step_ends`), so it follows any change of the layer schedule.
  """
  ends = tuple(int(l) for l in program.step_ends)
  if not ends or any(b <= a for a, b in zip(ends, ends[1:])):
    raise ValueError(f"program {getattr(program, 'name', program)!r} has step_ends {ends}; expected "
                     "an increasing tuple, one entry per step 0..t.")
  return ends


def _base_and_masks(model) -> tuple[Any, Any, Any]:
  """The `kcg.Transformer` behind `model` and the head/layer masks it runs with (a gained model's gains)."""
  base = getattr(model, "base", model)
  if base is model:
    return base, None, None
  return base, model.head_gain[...], model.layer_gain[...]


def model_residuals(model, input_dim: int, x_support, y_support, x_query, dtype) -> tuple[np.ndarray,
                                                                                          Any]:
  """`(residuals [L+1, B, T, D] float64, readout)` of `model` (a `kcg.Transformer` or a gained model)
  on the prompts in `dtype`; `readout` is the model's own readout of a residual (the logit lens)."""
  base, head_mask, layer_mask = _base_and_masks(model)
  subject = probes.subject_from_model(base, input_dim=input_dim)
  cast = lambda a: jnp.asarray(a, dtype)
  out = subject.forward(cast(x_support), cast(y_support), cast(x_query), return_residuals=True,
                        head_mask=head_mask, layer_mask=layer_mask)
  return np.asarray(out.residuals, np.float64), subject.readout


class StateProbes(NamedTuple):
  """Held-out probe R^2 of the CG state at the compiled step-end layers.

  Attributes:
    layers: `[t]` the residual index probed for step s = 1..t.
    r2: `{quantity: [t]}` pooled held-out R^2 of `quantity_s` at `layers[s - 1]`; NaN where CG has
      converged (`r_s = p_s = 0` to rounding once s reaches the rank: nothing to probe).
    shuffled_r2: `{quantity: [t]}` the same probe with targets shuffled across prompts (control).
  """

  layers: tuple[int, ...]
  r2: dict
  shuffled_r2: dict

  @property
  def mean_r2(self) -> float:
    """Mean of `r2` over quantities and steps, converged (NaN) entries left out (NaN if all are)."""
    values = [v for q in self.r2 for v in self.r2[q] if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def state_probes(residuals_LxBxTxD: Any, program: Any, targets: probes.StateTargets, key: Any, *,
                 num_support: int, num_query: int, num_folds: int = PROBE_FOLDS,
                 layers: tuple[int, ...] | None = None) -> StateProbes:
  """Probes `alpha_s, r_s, p_s` (`targets`: `kcg.probes.state_targets`, `[B, t+1, n]`) at the step-end
  layers of `program` (or `layers[s]`, s = 0..t, to probe elsewhere), each at the site where `program`
  keeps it."""
  ends = step_end_layers(program) if layers is None else tuple(layers)
  num_steps = len(ends) - 1
  h = np.asarray(residuals_LxBxTxD)
  if h.ndim != 4 or max(ends) >= h.shape[0]:
    raise ValueError(f"residuals must be [L+1, B, T, D] with L+1 > {max(ends)}; got {h.shape}.")
  r2, shuffled = {}, {}
  for quantity in PROBE_QUANTITIES:
    site = program.state[quantity].tokens
    values = np.asarray(getattr(targets, quantity))
    if values.shape[1] != num_steps + 1:
      raise ValueError(f"targets.{quantity} has {values.shape[1]} steps; the program runs {num_steps} "
                       "(pass state_targets(..., num_steps=t)).")
    features = probes.site_features(h, site, num_support)
    scale = float(np.max(np.abs(values)))
    r2[quantity], shuffled[quantity] = [], []
    for s in range(1, num_steps + 1):
      if float(np.max(np.abs(values[:, s]))) <= _CONVERGED * scale:
        # CG has converged (r_s = p_s = 0 once s reaches the rank): the target is rounding noise.
        r2[quantity].append(math.nan)
        shuffled[quantity].append(math.nan)
        continue
      result = probes.probe(features[ends[s]], probes.site_targets(values[:, s], site, num_query),
                            jax.random.fold_in(key, s), num_folds=num_folds, ridge=PROBE_RIDGE)
      r2[quantity].append(float(result.score.r2))
      shuffled[quantity].append(float(result.shuffled.r2))
  return StateProbes(ends[1:], r2, shuffled)


class _Prompts(NamedTuple):
  x_support: Any
  y_support: Any
  x_query: Any
  y_query: Any = None


class _Hashed:
  """Eval prompts keyed by their bytes, so that the candidates of one eval set are computed once."""

  def __init__(self, setup, seed, ev):
    self.setup, self.seed, self.ev = setup, int(seed), ev
    digest = hashlib.sha1()
    for a in (ev.x_support, ev.y_support, ev.x_query):
      digest.update(np.ascontiguousarray(a, np.float64).tobytes())
    self.key = (setup, self.seed, digest.hexdigest())

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Hashed) and self.key == other.key


def candidate_predictions(setup: Any, seed: int, ev: Any) -> dict[str, np.ndarray]:
  """`{name: [B, q]}` of every `CANDIDATES` entry after `setup.num_steps` steps on `ev`'s prompts
  (float64, on the setup's features `setup.phi(x)`, `setup.ridge`); the fitted ones fitted on other prompts of `seed`'s eval stream.

  Cached per (setup, seed, prompts): it does not depend on the model.
  """
  return _candidate_predictions(_Hashed(setup, seed, ev))


@functools.lru_cache(maxsize=8)
def _candidate_predictions(hashed: _Hashed) -> dict[str, np.ndarray]:
  setup, ev = hashed.setup, hashed.ev
  t, ridge = int(setup.num_steps), float(setup.ridge)
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  # Every candidate runs on the features the compiled model solves on: x, or its random-ReLU phi(x).
  prompts = _Prompts(f64(setup.phi(ev.x_support)), f64(ev.y_support), f64(setup.phi(ev.x_query)))
  with jax.numpy_dtype_promotion("standard"):
    per_prompt = matching.algorithm_trajectories(prompts, ridge, t, algorithms=PER_PROMPT,
                                                 spaces=("data",))
    out = {name: np.asarray(per_prompt[f"{name}/data"], np.float64)[:, t] for name in PER_PROMPT}
    key = jax.random.fold_in(data_lib.eval_key(hashed.seed), _FIT_STREAM)
    fit = data_lib.sample_prompts(key, setup.data, batch_size=_NUM_FIT_PROMPTS)
    fit_problem = candidates_lib.FeatureProblem(f64(setup.phi(fit.x_support)), f64(fit.y_support),
                                                f64(setup.phi(fit.x_query)), f64(fit.f_query))
    fitted = candidates_lib.fit_candidates(fit_problem, ridge, t)
    traj = candidates_lib.trajectories(candidates_lib.FeatureProblem(*prompts[:3]), ridge, t,
                                       names=FITTED, fitted=fitted)
  out.update({name: np.asarray(traj[name], np.float64)[:, t] for name in FITTED})
  out["krr"] = np.asarray(ev.krr, np.float64)
  return out


def candidate_agreement(pred_BxQ: Any, candidates: dict[str, Any]) -> dict:
  """`{"r2": {name: R^2}, "relative": {name: |c - f| / |f|}, "closest": name of the highest R^2}` of
  each candidate `c` as a description of the model's predictions `f` (`kcg.alignment.agreement`)."""
  r2, relative = {}, {}
  for name, values in candidates.items():
    a = agreement(np.asarray(values, np.float64), np.asarray(pred_BxQ, np.float64), num_bootstrap=1)
    r2[name], relative[name] = a.r2, a.relative_distance
  closest = max(r2, key=lambda n: r2[n] if math.isfinite(r2[n]) else -math.inf)
  return {"r2": r2, "relative": relative, "closest": closest}


def layer_matching(layer_predictions_LxBxQ: Any, ev: Any, ridge: float, max_steps: int,
                   key: Any, phi: Any = None) -> dict:
  """Per layer, the best-matching per-prompt candidate (`PER_PROMPT`, on `phi(x)`: raw inputs by
  default) and step among
  0..max_steps (`kcg.matching.match_layers`): `{"name", "step", "relative", "squared_difference"}`,
  each `[L+1]` (relative distance |f_l - f_t| / |f_t|: inf at a step-0 match, where f_0 = 0)."""
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  phi = (lambda x: x) if phi is None else phi
  prompts = _Prompts(f64(phi(ev.x_support)), f64(ev.y_support), f64(phi(ev.x_query)),
                     f64(ev.f_query))
  with jax.numpy_dtype_promotion("standard"):
    traj = matching.algorithm_trajectories(prompts, ridge, max_steps, algorithms=PER_PROMPT,
                                           spaces=("data",))
    preds = f64(layer_predictions_LxBxQ)
    finite = jnp.all(jnp.isfinite(preds), axis=(1, 2))
    # A layer that overflowed matches nothing: zero it so the others are still matched, then mark it.
    result = matching.match_layers(jnp.where(finite[:, None, None], preds, 0.0), prompts,
                                   {n.split("/")[0]: v for n, v in traj.items()}, key,
                                   num_bootstrap=1)
  finite = np.asarray(finite)
  return {"name": [m.name if finite[m.layer] else None for m in result.layers],
          "step": [m.step if finite[m.layer] else None for m in result.layers],
          "relative": [m.relative_distance if finite[m.layer] else math.inf for m in result.layers],
          "squared_difference": [m.squared_difference if finite[m.layer] else math.inf
                                 for m in result.layers]}


def checkpoint_measures(model, compiled: Any, setup: Any, run: Any, ev: Any,
                        pred_BxQ: Any = None) -> dict:
  """The measures of the module docstring for `kcg.finetune.evaluate` (keys `probe_layers`,
  `probe_r2` {quantity: [t]}, `probe_shuffled_r2`, `probe_r2_mean`, `candidate_r2`,
  `candidate_relative`, `closest_candidate`, `layer_match` {name, step, relative: [L+1]}).

  `setup` and `run` are a `kcg.finetune.Setup` / `Run` (read: num_steps, form, ridge, data; dtype,
  seed); `pred_BxQ` the model's predictions on `ev` (default: its readout of the last layer's query
  tokens, which is what it predicts).
  """
  dtype = jnp.dtype(run.dtype)
  program = compiled.program
  num_support, num_query = ev.x_support.shape[1], ev.x_query.shape[1]
  residuals, readout = model_residuals(model, setup.input_dim, ev.x_support, ev.y_support,
                                       ev.x_query, dtype)
  targets = probes.state_targets(setup.phi(ev.x_support), ev.y_support, setup.ridge,
                                 setup.num_steps, form=setup.form)
  key = jax.random.key(int(run.seed))
  found = state_probes(residuals, program, targets, key, num_support=num_support,
                       num_query=num_query)
  out = {"probe_layers": list(found.layers), "probe_r2": found.r2,
         "probe_shuffled_r2": found.shuffled_r2, "probe_r2_mean": found.mean_r2}
  with np.errstate(over="ignore", invalid="ignore"):
    lens = np.asarray(readout(jnp.asarray(residuals[:, :, -num_query:], dtype)), np.float64)
  pred = lens[-1] if pred_BxQ is None else pred_BxQ
  agree = candidate_agreement(pred, candidate_predictions(setup, run.seed, ev))
  out.update(candidate_r2=agree["r2"], candidate_relative=agree["relative"],
             closest_candidate=agree["closest"])
  out["layer_match"] = layer_matching(lens, ev, setup.ridge, 2 * int(setup.num_steps),
                                      jax.random.fold_in(key, 1), phi=setup.phi)
  return out


__all__ = ("CANDIDATES", "FITTED", "PER_PROMPT", "PROBE_QUANTITIES", "StateProbes",
           "candidate_agreement", "candidate_predictions", "checkpoint_measures", "layer_matching",
           "model_residuals", "state_probes", "step_end_layers")
