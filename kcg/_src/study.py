"""The formal-vs-learned study as library functions: each sweep returns its numbers and draws a figure.

Every study function takes explicit sizes, a PRNG key and an optional `path` (PNG, drawn with the
style helpers of `kcg._src.plotting`, no global state) and returns a JSON-ready dict (floats, lists,
nested dicts). `experiments/study.py` runs them at a chosen scale and writes `report.md` and
`results.json`. By topic:

* `kcg._src.study_depth`: error vs depth L of trained models against compiled CG, PCG and Chebyshev
  and reference GD with t = L (`depth_comparison`, `depth_sweep`, `compiled_solvers`).
* `kcg._src.study_laws`: the laws and their bounds: depth (`depth_law`), ridge and condition number
  (`solver_sweep`), temperature (`temperature_sweep`), failure modes, feature perturbation
  (`perturbation_bound`, `feature_perturbation`) and width (`width_sweep`).
* `kcg._src.study_subjects`: probes, ablations and layer-wise matching of one model with their
  figures (`probe_study`, `compiled_ablation_table`, `trained_ablation`, `matching_study`).

This module holds what they share: RMS errors, `fitted_rate` and `jsonable`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

# Denominators are floored here, so a relative error of two zeros is 0, not NaN.
FLOOR = 1e-300


def rms(x: Any, axis=None) -> np.ndarray:
  """`sqrt(mean(x^2))` over `axis`, in float64."""
  return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), axis=axis))


def relative_rms(a: Any, b: Any, axis=None) -> np.ndarray:
  """`rms(a - b) / rms(b)` over `axis` (the plain difference where `b` vanishes)."""
  num = rms(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis)
  den = rms(b, axis)
  return np.where(den > 0, num / np.maximum(den, FLOOR), num)


def mse(a: Any, b: Any) -> float:
  """`mean((a - b)^2)` in float64."""
  return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def fitted_rate(errors: Sequence[float], floor: float = 1e-10) -> float:
  """`exp(slope)` of a least-squares line through `log(errors[t])` for the t >= 1 with error > floor.

  t = 0 is left out (`f_0 = 0` for every method). NaN when fewer than two steps lie above the floor.
  """
  e = np.asarray(errors, np.float64)
  steps = np.arange(len(e))
  keep = np.isfinite(e) & (e > floor) & (steps >= 1)
  if np.count_nonzero(keep) < 2:
    return float("nan")
  slope = np.polyfit(steps[keep], np.log(e[keep]), 1)[0]
  return float(np.exp(slope))


def jsonable(x: Any) -> Any:
  """Nested dicts/lists of numbers with NumPy and JAX values converted (NaN and inf become None)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray)):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x
