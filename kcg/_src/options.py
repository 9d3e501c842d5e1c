"""What to compile: one frozen record of every option, and its validation (compiler stage 0).

`compile_cg` and `compile_chebyshev` turn their arguments into `CompileOptions`; `validate` checks
every field and returns the options in canonical form (Python ints and floats, resolved defaults,
read-only float64 arrays), so that every later stage reads validated values only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kcg._src import checks
from kcg._src import model as model_lib

MASKS = model_lib.MASKS
FORMS = ("dual", "primal")
STATE_PLACEMENTS = ("auto", "support", "aggregator")
FEATURES = ("identity", "random_relu")
ALGORITHMS = ("cg", "chebyshev")
ATTENTIONS = ("linear", "softmax")
KERNELS = ("exponential", "linear")
PRECONDITIONERS = (None, "jacobi")
MULTI_OUTPUTS = ("independent", "block")
NEWTON_STEPS = (4, 3, 2)  # kcg._src.reciprocal.RATIO_FOR_NEWTON_STEPS


@dataclasses.dataclass(frozen=True, eq=False)
class CompileOptions:
  """Every option of `compile_cg` / `compile_chebyshev` (see their docstrings).

  After `validate`: `state_placement` is "support" or "aggregator", `kernel` is set,
  `temperature_heads` is 1 unless the kernel is Route B's, `input_dim` is set, `projection` and
  `feature_params` are read-only float64 arrays and `eig_bounds` a pair of floats.
  """

  num_support: int
  feature_dim: int
  num_steps: int
  ridge: float
  algorithm: str = "cg"
  mask: str = "causal"
  form: str = "dual"
  state_placement: str = "auto"
  attention: str = "linear"
  kernel: str | None = None
  temperature: float | None = None
  temperature_heads: int = 2
  projection: Any = None
  preconditioner: str | None = None
  features: str = "identity"
  feature_params: Any = None
  input_dim: int | None = None
  eig_bounds: Any = None
  num_outputs: int = 1
  multi_output: str = "independent"
  norm: str | None = None
  newton_steps: int = 4
  carry_matvec: bool = False

  @property
  def rank(self) -> int:
    """The size of the feature channels: feature_dim, or m for a linear-attention projection."""
    if self.projection is not None and self.attention == "linear":
      return int(np.shape(self.projection)[0])
    return self.feature_dim

  def replace(self, **changes) -> CompileOptions:
    return dataclasses.replace(self, **changes)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}.")


def _positive_float(name: str, value, what: str) -> float:
  if isinstance(value, (bool, str)):
    raise ValueError(f"{name} must be a positive number, got {value!r}.")
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive number, got {value!r}.") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be finite and > 0{what}, got {value!r}.")
  return value


def _read_only(array: np.ndarray) -> np.ndarray:
  array = np.array(array, np.float64)
  array.setflags(write=False)
  return array


def check_projection(projection, feature_dim: int) -> np.ndarray:
  """The projection as a read-only float64 [m, feature_dim] array, or ValueError."""
  checks.check_real("projection", projection)
  try:
    projection = np.asarray(projection, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"projection must be a [m, feature_dim={feature_dim}] matrix.") from None
  if projection.ndim != 2 or projection.shape[1] != feature_dim or projection.shape[0] < 1:
    raise ValueError(f"projection must be a [m >= 1, feature_dim={feature_dim}] matrix, got shape "
                     f"{projection.shape}.")
  if not np.all(np.isfinite(projection)):
    raise ValueError("projection contains NaN or Inf.")
  return _read_only(projection)


LAYERNORM_CG = (
    "norm='layernorm' cannot carry CG: its centring switches on the reciprocal's ReLU units "
    "(weights up to 1e40) at tokens where they must stay off (kcg.routes.layernorm_departure). "
    "Use norm='rmsnorm', or compile_chebyshev (no division), which runs under LayerNorm.")


def validate(options: CompileOptions, *, refuse_inexact: bool = True) -> CompileOptions:
  """Checks every option; returns them in canonical form. ValueError says what is wrong.

  refuse_inexact: refuse the combinations that compile to a model known to be wrong (CG under
  LayerNorm). kcg.routes.layernorm_departure passes False to build that model and show why.
  """
  o = options
  num_support = _positive_int("num_support", o.num_support)
  feature_dim = _positive_int("feature_dim", o.feature_dim)
  if (isinstance(o.num_steps, bool) or not isinstance(o.num_steps, (int, np.integer))
      or o.num_steps < 0):
    raise ValueError(f"num_steps must be an int >= 0 (the number of steps), got {o.num_steps!r}.")
  ridge = checks.scalar_ridge(o.ridge)
  _choice("algorithm", o.algorithm, ALGORITHMS)
  _choice("mask", o.mask, MASKS)
  _choice("form", o.form, FORMS)
  _choice("attention", o.attention, ATTENTIONS)
  _choice("features", o.features, FEATURES)
  _choice("state_placement", o.state_placement, STATE_PLACEMENTS)
  _choice("preconditioner", o.preconditioner, PRECONDITIONERS)
  _choice("multi_output", o.multi_output, MULTI_OUTPUTS)
  _choice("norm", o.norm, model_lib.NORMS)
  if o.state_placement == "support" and (o.form != "dual" or o.mask != "prefix"):
    raise ValueError(
        "state_placement='support' needs form='dual' and mask='prefix' (under a causal mask a "
        "support cannot read later ones); use mask='prefix' or state_placement='aggregator'.")
  placement = o.state_placement
  if placement == "auto":
    placement = "support" if (o.form == "dual" and o.mask == "prefix") else "aggregator"
  input_dim, feature_params = _check_features(o, feature_dim)
  kernel = o.kernel or ("exponential" if o.attention == "softmax" else "linear")
  if (isinstance(o.temperature_heads, bool) or not isinstance(o.temperature_heads, int)
      or not 1 <= o.temperature_heads <= 6):
    raise ValueError(f"temperature_heads must be an int in [1, 6], got {o.temperature_heads!r}.")
  projection, temperature = _check_kernel(o, kernel, feature_dim)
  if o.preconditioner == "jacobi" and (o.form != "dual" or o.mask != "prefix"
                                       or o.state_placement == "aggregator"):
    raise ValueError(
        "preconditioner='jacobi' needs form='dual', mask='prefix' and per-support state; use "
        "those options.")
  num_outputs = o.num_outputs
  if (isinstance(num_outputs, bool) or not isinstance(num_outputs, (int, np.integer))
      or num_outputs < 1):
    raise ValueError(f"num_outputs must be a positive int (targets per support), got "
                     f"{num_outputs!r}.")
  if o.multi_output == "block" and (o.attention != "linear" or o.form != "dual"
                                    or o.mask != "prefix" or o.preconditioner is not None):
    raise ValueError("multi_output='block' (block CG) is compiled for linear attention, "
                     "form='dual', mask='prefix' and no preconditioner. Use "
                     "multi_output='independent' for the other constructions.")
  eig_bounds = _check_algorithm(o)
  if (isinstance(o.newton_steps, bool) or not isinstance(o.newton_steps, (int, np.integer))
      or o.newton_steps not in NEWTON_STEPS):
    raise ValueError(f"newton_steps={o.newton_steps!r} is not one of {NEWTON_STEPS} (fewer steps "
                     "need a finer reciprocal guess: 345, 884 or 9284 MLP units for 4, 3, 2).")
  if not isinstance(o.carry_matvec, (bool, np.bool_)):
    raise ValueError(f"carry_matvec must be True or False, got {o.carry_matvec!r}.")
  if o.carry_matvec and (o.algorithm != "cg" or o.attention != "linear"
                         or o.preconditioner is not None or o.multi_output == "block"):
    raise ValueError("carry_matvec=True is built for plain CG (algorithm='cg', linear attention, "
                     "no preconditioner, multi_output='independent'); drop it for the others.")
  if refuse_inexact and o.norm == "layernorm" and o.algorithm == "cg":
    raise ValueError(LAYERNORM_CG)
  return dataclasses.replace(
      o, num_support=num_support, feature_dim=feature_dim, num_steps=int(o.num_steps),
      ridge=ridge, state_placement=placement, kernel=kernel, temperature=temperature,
      temperature_heads=o.temperature_heads if kernel == "linear" else 1, projection=projection,
      feature_params=feature_params, input_dim=input_dim, eig_bounds=eig_bounds,
      num_outputs=int(num_outputs), newton_steps=int(o.newton_steps),
      carry_matvec=bool(o.carry_matvec))


def _check_features(o: CompileOptions, feature_dim: int):
  """(input_dim, feature_params as read-only float64 arrays or None)."""
  if o.input_dim is not None:
    _positive_int("input_dim", o.input_dim)
  if o.features == "identity":
    if o.input_dim is not None and o.input_dim != feature_dim:
      raise ValueError(f"features='identity' needs input_dim == feature_dim, got "
                       f"input_dim={o.input_dim} and feature_dim={feature_dim}.")
    if o.feature_params is not None:
      raise ValueError("feature_params is only used with features='random_relu'.")
    return feature_dim, None
  if o.feature_params is None:
    raise ValueError("features='random_relu' needs feature_params=kcg.features.random_relu(m)"
                     ".init(key, input_dim) (the weights the first layer uses).")
  for array in o.feature_params:
    checks.check_real("feature_params", array)
  params = tuple(_read_only(a) for a in o.feature_params)
  weights = params[0]
  if weights.ndim != 2 or weights.shape[0] != feature_dim:
    raise ValueError(f"feature_params weights must have shape [feature_dim={feature_dim}, "
                     f"input_dim], got {weights.shape}.")
  if o.input_dim is not None and weights.shape[1] != o.input_dim:
    raise ValueError(f"feature_params weights have input dim {weights.shape[1]}, but "
                     f"input_dim={o.input_dim}.")
  return int(weights.shape[1]), params


def _check_kernel(o: CompileOptions, kernel: str, feature_dim: int):
  """(projection or None, temperature or None) for the attention and kernel options."""
  if o.attention == "linear":
    if kernel != "linear":
      raise ValueError(f"kernel={kernel!r} needs attention='softmax' (linear attention computes "
                       "the dot-product kernel).")
    if o.temperature is not None:
      raise ValueError("temperature is an option of attention='softmax'.")
    projection = None if o.projection is None else check_projection(o.projection, feature_dim)
    return projection, None
  _choice("kernel", kernel, KERNELS)
  if o.temperature is None:
    raise ValueError("attention='softmax' needs a temperature > 0, got None.")
  temperature = _positive_float("temperature", o.temperature, "")
  if o.mask != "prefix" or o.form != "dual":
    raise ValueError("attention='softmax' (Routes A and B) is compiled with per-support state: it "
                     "needs mask='prefix' and form='dual'.")
  if o.preconditioner is not None or o.features != "identity":
    raise ValueError("attention='softmax' supports neither a preconditioner nor feature layers.")
  projection = (np.eye(feature_dim) if o.projection is None
                else check_projection(o.projection, feature_dim))
  return _read_only(projection), temperature


def _check_algorithm(o: CompileOptions):
  """eig_bounds as (low, high) floats for Chebyshev (None for CG)."""
  if o.algorithm == "cg":
    if o.eig_bounds is not None:
      raise ValueError("eig_bounds is an option of compile_chebyshev.")
    return None
  if o.attention != "linear" or o.preconditioner is not None or o.multi_output != "independent":
    raise ValueError("compile_chebyshev compiles linear attention, no preconditioner and "
                     "independent outputs.")
  try:
    low, high = (float(b) for b in o.eig_bounds)
  except (TypeError, ValueError):
    raise ValueError(f"eig_bounds must be a pair (low, high), got {o.eig_bounds!r}.") from None
  if not (0 < low <= high and math.isfinite(high)):
    raise ValueError(f"eig_bounds must satisfy 0 < low <= high < inf, got {o.eig_bounds!r}; the "
                     "spectrum of K + ridge I lies in [ridge, ridge + ||Phi||_2^2].")
  return (low, high)
