"""Compiled CG transformers against references, step by step (used by experiments and notebooks)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from kcg._src import bounds
from kcg._src import solvers


class StepComparison(NamedTuple):
  """Errors at steps t = 0..T, each an RMS over prompts and queries divided by the RMS of f*.

  Attributes:
    compiled_vs_oracle: |f_t(compiled) - f*|.
    reference_vs_oracle: |f_t(reference CG) - f*|.
    compiled_vs_reference: |f_t(compiled) - f_t(reference CG)|.
    bound: the theorem's pointwise bound on |f_t - f*|, same aggregate (dual CG only).
    compiled_test_mse: mean (f_t(compiled) - y_query)^2.
    oracle_test_mse: mean (f* - y_query)^2 (constant in t).
    bound_holds: |f_t(compiled) - f*| <= bound + 10 eps kappa max|f*| at every prompt, query, t
      (None for the primal form: the theorem bounds dual CG).
    condition_numbers: [B] cond(K + ridge I).
  """

  compiled_vs_oracle: np.ndarray
  reference_vs_oracle: np.ndarray
  compiled_vs_reference: np.ndarray
  bound: np.ndarray
  compiled_test_mse: np.ndarray
  oracle_test_mse: float
  bound_holds: bool | None
  condition_numbers: np.ndarray


def _rms(x, axis=None):
  return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), axis=axis))


def bound_per_step(phi_support, y_support, phi_query, ridge, num_steps, kernel=None) -> np.ndarray:
  """The theorem's pointwise bound on |f_t - f*| at every t = 0..num_steps: [B, t+1, q]."""
  kw = {} if kernel is None else {"kernel": kernel}
  return np.stack([np.asarray(bounds.cg_error_bound(phi_support, y_support, phi_query, ridge, t, **kw))
                   for t in range(num_steps + 1)], axis=1)


def compare_steps(compiled, phi_support, y_support, phi_query, y_query) -> StepComparison:
  """Runs `compiled` (a kcg.CompiledCG on identity features) and the references on [B,...] prompts."""
  num_steps = compiled.num_steps
  ridge = compiled.ridge
  f_BxTxQ = np.asarray(compiled.predict_steps(phi_support, y_support, phi_query))
  if compiled.form == "dual":
    ref = solvers.cg_predict(phi_support, y_support, phi_query, ridge, num_steps)
  else:
    ref = solvers.primal_cg_predict(phi_support, y_support, phi_query, ridge, num_steps)
  ref = np.asarray(ref)
  f_star = np.asarray(solvers.krr_predict(phi_support, y_support, phi_query, ridge))
  scale = max(float(_rms(f_star)), 1e-300)
  bound = bound_per_step(phi_support, y_support, phi_query, ridge, num_steps)
  kappa = np.asarray(bounds.condition_number(phi_support, ridge))
  eps = float(jnp.finfo(f_BxTxQ.dtype).eps)
  floor = 10 * eps * float(kappa.max()) * float(np.abs(f_star).max())
  holds = (bool(np.all(np.abs(f_BxTxQ - f_star[:, None]) <= bound + floor))
           if compiled.form == "dual" else None)
  y_query = np.asarray(y_query)
  return StepComparison(
      compiled_vs_oracle=_rms(f_BxTxQ - f_star[:, None], axis=(0, 2)) / scale,
      reference_vs_oracle=_rms(ref - f_star[:, None], axis=(0, 2)) / scale,
      compiled_vs_reference=_rms(f_BxTxQ - ref, axis=(0, 2)) / scale,
      bound=_rms(bound, axis=(0, 2)) / scale,
      compiled_test_mse=np.mean(np.square(f_BxTxQ - y_query[:, None]), axis=(0, 2)),
      oracle_test_mse=float(np.mean(np.square(f_star - y_query))),
      bound_holds=holds,
      condition_numbers=kappa,
  )


def format_comparison(comparison: StepComparison, every: int = 1) -> str:
  """Fixed-width table: t, compiled and reference errors vs f*, their difference, bound, test MSEs."""
  columns = ("compiled", "reference", "comp-ref", "bound", "test_mse", "oracle_mse")
  num_rows = len(comparison.bound)
  rows = sorted(set(range(0, num_rows, max(1, every))) | {num_rows - 1})
  lines = [f"{'t':>4}" + "".join(f"{c:>12}" for c in columns)]
  for t in rows:
    values = (comparison.compiled_vs_oracle[t], comparison.reference_vs_oracle[t],
              comparison.compiled_vs_reference[t], comparison.bound[t],
              comparison.compiled_test_mse[t], comparison.oracle_test_mse)
    lines.append(f"{t:>4}" + "".join(f"{v:>12.3e}" for v in values))
  return "\n".join(lines)


def rounding_spread(reference_fn, phi_support, y_support, phi_query, ridge: float, num_steps: int, *,
                    seed: int = 0, draws: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """How far a reference trajectory moves under eps-sized relative perturbations of its inputs.

  The tolerance for comparing two correct float CGs is a property of the problem: while the
  Krylov basis loses orthogonality, rounding is amplified (two textbook float64 CGs disagree by
  up to ~0.3 relative at k = 64, kappa = 1e4). Returns (reference [t+1, ...], spread [t+1]), the
  spread being the running max over steps of max |f_t(perturbed) - f_t| over `draws` draws.
  `reference_fn(phi, y, query, ridge, num_steps)` is e.g. `kcg.solvers.cg_predict`.
  """
  rng = np.random.default_rng(seed)
  phi_support, y_support = np.asarray(phi_support), np.asarray(y_support)
  eps = np.finfo(phi_support.dtype).eps
  ref = np.asarray(reference_fn(phi_support, y_support, phi_query, ridge, num_steps))
  spread = np.zeros(num_steps + 1)
  for _ in range(draws):
    phi_p = phi_support * (1 + eps * rng.standard_normal(phi_support.shape))
    y_p = y_support * (1 + eps * rng.standard_normal(y_support.shape))
    moved = np.asarray(reference_fn(phi_p, y_p, phi_query, ridge, num_steps)) - ref
    spread = np.maximum(spread, np.abs(moved).reshape(num_steps + 1, -1).max(-1))
  return ref, np.maximum.accumulate(spread)
