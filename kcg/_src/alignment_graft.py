"""Grafting: a model's first l layers, then compiled CG on their representation.

The hybrid is two `kcg.Transformer` forwards composed through the residual stream:

1. the lower model's first l blocks read every support and query input as a query of the prompt with
   its labels withheld (`kcg.alignment.hidden_features`, reading "zero_labels" by default), so the
   representation carries no answer;
2. a fixed linear map of that residual (`ResidualMap`, e.g. a standardisation fitted on held-out
   prompts) gives `phi(x) [p]` per input;
3. a compiled CG transformer (`kcg.compile_cg(k, p, T, ridge, mask="prefix")`) reads those features as
   its inputs, with the prompt's real labels, and runs t = 0..T CG steps; its prediction after step t
   is read from its own prediction channel (`CompiledCG.predict_steps`).

The compiled part is the real compiled model (its reciprocal, reductions and updates), not a
re-implementation of CG. KRR is scale-equivariant (`f` on `s phi` with ridge `s^2 lam` is `f` on `phi`
with ridge `lam`), and so is every CG iterate, so one compiled model with ridge `lam_c` serves any
ridge `lam` of the features: scale the map by `sqrt(lam_c / lam)` (`graft_map`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from kcg._src import alignment_features as features_lib
from kcg._src import checks
from kcg._src import probes


@functools.lru_cache(maxsize=8)
def compiled_solver(num_support: int, feature_dim: int, num_steps: int, ridge: float = 1.0):
  """`kcg.compile_cg(k, p, T, ridge, mask="prefix")` (per-support state), cached per size."""
  from kcg._src import compiler  # pylint: disable=g-import-not-at-top
  return compiler.compile_cg(num_support, feature_dim, num_steps, ridge, mask="prefix")


def graft_map(readout: features_lib.ResidualMap, ridge: float, compiled_ridge: float = 1.0
              ) -> features_lib.ResidualMap:
  """`readout` scaled so that the compiled model's `compiled_ridge` acts as `ridge` on `readout`'s
  features (KRR and CG on `s phi` with ridge `s^2 lam` equal those on `phi` with `lam`)."""
  checks.check_ridge(ridge)
  checks.check_ridge(compiled_ridge)
  return readout.scaled(math.sqrt(compiled_ridge / ridge))


class Graft(NamedTuple):
  """The hybrid model: `lower`'s first `layer` blocks, `readout`, then `compiled` CG.

  Attributes:
    lower: the subject whose layers make the representation.
    layer: l, the number of its blocks used (0 = the embedding only).
    readout: the linear map of the residual stream to the compiled model's features.
    compiled: the compiled CG (`feature_dim = readout.output_dim`).
    reading: how the lower layers read each input (`kcg.alignment.READINGS`, not "with_labels").
  """

  lower: probes.Subject
  layer: int
  readout: features_lib.ResidualMap
  compiled: Any
  reading: str = "zero_labels"

  def features(self, x_support: Any, y_support: Any, x_query: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(phi_support [B, k, p], phi_query [B, q, p])`: the lower layers' representation, mapped."""
    hidden = features_lib.hidden_features(self.lower, x_support, y_support, x_query,
                                          reading=self.reading)
    support, query = hidden.layer(self.layer)
    return self.readout(support), self.readout(query)

  def predict_steps(self, x_support: Any, y_support: Any, x_query: Any) -> np.ndarray:
    """The hybrid's predictions after t = 0..T compiled CG steps, `[B, T+1, q]`."""
    hidden = features_lib.hidden_features(self.lower, x_support, y_support, x_query,
                                          reading=self.reading)
    return graft_predict_steps(self.compiled, self.readout, *hidden.layer(self.layer), y_support)


def graft_predict_steps(compiled: Any, readout: features_lib.ResidualMap, h_support: Any,
                        h_query: Any, y_support: Any) -> np.ndarray:
  """The upper half of a graft on residuals already read (`h_support [B, k, D]`, `h_query [B, q, D]`
  of one layer): `compiled.predict_steps(readout(h_support), y, readout(h_query))`, `[B, T+1, q]`."""
  phi_support, phi_query = readout(h_support), readout(h_query)
  y = np.asarray(y_support, phi_support.dtype)
  return np.asarray(compiled.predict_steps(phi_support, y, phi_query))


def build_graft(lower: probes.Subject, layer: int, readout: features_lib.ResidualMap, *,
                num_support: int, num_steps: int, ridge: float, compiled_ridge: float = 1.0,
                reading: str = "zero_labels") -> Graft:
  """The `Graft` of `lower`'s first `layer` blocks and `num_steps`-step compiled CG with `ridge` on the
  features `readout(h_layer)` (the map is rescaled by `graft_map`; the compiled model is cached)."""
  if reading not in features_lib.READINGS or reading == "with_labels":
    raise ValueError(f"a graft reads the lower layers without the answer: reading must be one of "
                     f"{[r for r in features_lib.READINGS if r != 'with_labels']}, got {reading!r}.")
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (
      0 <= layer <= lower.num_layers):
    raise ValueError(f"layer must be an int in [0, {lower.num_layers}] (blocks of {lower.name}), got "
                     f"{layer!r}.")
  if readout.offset.shape[0] != lower.config.width:
    raise ValueError(f"readout reads width {readout.offset.shape[0]}, the lower model's residual "
                     f"stream is {lower.config.width} wide.")
  num_steps = checks.check_num_steps(num_steps)
  compiled = compiled_solver(checks.check_positive_int("num_support", num_support),
                             readout.output_dim, num_steps, float(compiled_ridge))
  return Graft(lower, int(layer), graft_map(readout, ridge, compiled_ridge), compiled, reading)


__all__ = ("Graft", "build_graft", "compiled_solver", "graft_map", "graft_predict_steps")
