"""Ablations: remove a head or a layer; compare the damaged model with the algorithm missing that step.

Mechanics. `kcg.Transformer` multiplies each head's output by `head_mask[l, h]` and each block's residual
update by `layer_mask[l]`; an ablation is a set of `(layer, head)` pairs and layers set to 0 (`Ablation`,
`masks`). In a compiled model heads and layers are found by name (`find_heads`, `find_layers`), never by
index: the names are those of the construction's `Head`s and `Block`s (`kcg._src.programs`).

Which operation is removed, and the algorithm that drops it (`OPERATIONS`). For every construction the
damaged CG reference (`damaged_cg_predict`) runs the recurrences exactly as the compiled program does:
`gamma = rr * inv(pAp)` and `beta = rr_next * inv(rr)` with `inv` the compiled reciprocal (a ReLU guess
refined by Newton steps, `kcg._src.reciprocal`), the prediction accumulated as
`f_{s+1} = f_s + gamma_s k(x)^T p_s`, and at a damaged step s:

* `"matvec"` (the mat-vec head, `K p`; primal `Phi^T Phi p`): `K p_s := 0`, so `A p_s` becomes
  `ridge p_s` in both `p.Ap` and the residual update: CG with the mat-vec replaced by `ridge * p`.
* `"matvec_u"` (aggregator_dual only, the first half `u = Phi^T p`): `K p_s := 0` and the query update
  `k(x)^T p_s := 0` (both read `u`).
* `"query_matvec"` (support_state: `k(x_q).p`; primal: `f += gamma phi(x).p`): the prediction is not
  updated at step s, while the solver state is.
* `"curvature_reduction"` (dual only: the aggregator head `p.Kp`): `pAp = ridge p.p`, so
  `gamma_s = r.r / (ridge p.p)` while the residual still subtracts `gamma_s A p_s`. (In the primal
  construction `p.Ap` is the whole of `pAp`; without it the reciprocal reads 0.)
* `"ridge_reduction"` (dual: the aggregator head `ridge p.p`; primal: the `ridge p` head, which also
  feeds the residual): `pAp = p.Kp` (primal: `A p = Phi^T Phi p` at that step).
* `"residual_norm"` (the whole layer `rr_next = r.r`: its reduction head and the ReLU guess of the
  reciprocal): `r.r` is never formed, so `beta_s = 0` (a restart, `p_{s+1} = r_{s+1}`) and, as `rr` is
  then 0, `gamma_{s+1} = 0`: one wasted step, then CG restarted from `alpha_{s+1}`.
* `"newton"` (one of the Newton layers of the reciprocal): `1/pAp` and `1/rr` at step s get one Newton
  refinement fewer (relative error `e^(2^3)` instead of `e^(2^4)`, e = 4.2%).

Removing the reduction head `r.r` alone (keeping the ReLU guess) would feed 0 into the reciprocal's
guess, after which `pAp` leaves the reciprocal's range and the recurrence depends on rounding in the
ramp above it; kcg ablates the whole layer instead, whose effect is exactly the restart above.

For trained models the meaning of a head is unknown, so `degradation` takes any `(layer, head)` pairs
and layers and reports how much the predictions and the error change (`degradation_map` does every head
and every layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import checks
from kcg._src import probes
from kcg._src import programs
from kcg._src import reciprocal as recip

Array = jax.Array

OPERATIONS = ("matvec", "matvec_u", "query_matvec", "curvature_reduction", "ridge_reduction",
              "residual_norm", "newton")

# Head names per construction (as written in kcg._src.programs); a rename there fails loudly here.
_HEAD_OPERATIONS = {
    "support_state": {
        "matvec": "(Kp)_i = sum_j (phi_i . phi_j) p_j",
        "query_matvec": "k(x_q) . p",
        "curvature_reduction": "p.Kp",
        "ridge_reduction": "ridge p.p",
    },
    "aggregator_dual": {
        "matvec": "Kp = sum_j (u . phi_j) e_j",
        "matvec_u": "u = sum_j p_j phi_j",
        "curvature_reduction": "p.Kp",
        "ridge_reduction": "ridge p.p",
    },
    "aggregator_primal": {
        "matvec": "sum_j phi_j (phi_j . p)",
        "query_matvec": "f += gamma phi(x).p",
        "ridge_reduction": "ridge p",
    },
}
# Layer operations: the suffix of the block name (after the construction's prefix such as "cg ").
_LAYER_OPERATIONS = {"residual_norm": "rr_next = r.r", "newton": "newton "}


@dataclasses.dataclass(frozen=True)
class Damage:
  """What one CG step of the damaged reference leaves out (see the module docstring)."""

  kernel_matvec: bool = False
  query_matvec: bool = False
  curvature: bool = False
  ridge_term: bool = False
  residual_norm: bool = False
  newton_steps_removed: int = 0


HEALTHY = Damage()


class Ablation(NamedTuple):
  """Heads and layers to remove.

  Attributes:
    heads: `((layer, head), ...)` pairs whose outputs are zeroed.
    layers: layers whose residual updates (attention and MLP) are zeroed.
    description: what is removed, in words.
  """

  heads: tuple[tuple[int, int], ...] = ()
  layers: tuple[int, ...] = ()
  description: str = ""


def masks(config: Any, ablation: Ablation, dtype: Any = None) -> tuple[Array, Array]:
  """`(head_mask [L, H], layer_mask [L])` with zeros at the ablated heads and layers."""
  num_layers, num_heads = config.num_layers, config.num_heads
  dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(np.float64)) if dtype is None else jnp.dtype(dtype)
  head_mask = np.ones((num_layers, num_heads))
  layer_mask = np.ones((num_layers,))
  for layer, head in ablation.heads:
    if not (0 <= layer < num_layers and 0 <= head < num_heads):
      raise ValueError(f"head (layer={layer}, head={head}) is outside the model's "
                       f"{num_layers} layers x {num_heads} heads.")
    head_mask[layer, head] = 0
  for layer in ablation.layers:
    if not 0 <= layer < num_layers:
      raise ValueError(f"layer {layer} is outside the model's {num_layers} layers.")
    layer_mask[layer] = 0
  return jnp.asarray(head_mask, dtype), jnp.asarray(layer_mask, dtype)


# ----------------------------------------------------------------------------------------------------
# Finding heads and layers of a compiled program by name.
# ----------------------------------------------------------------------------------------------------


def step_layers(program: programs.Program, step: int) -> range:
  """The layers that run CG step `step` (0-based): `step_ends[step] .. step_ends[step + 1] - 1`."""
  num_steps = len(program.step_ends) - 1
  if not 0 <= step < num_steps:
    raise ValueError(f"step {step} is outside the program's CG steps 0..{num_steps - 1}.")
  return range(program.step_ends[step], program.step_ends[step + 1])


def _check_steps(program: programs.Program, steps: Sequence[int] | None) -> tuple[int, ...]:
  num_steps = len(program.step_ends) - 1
  if steps is None:
    return tuple(range(num_steps))
  steps = tuple(int(s) for s in steps)
  for s in steps:
    step_layers(program, s)
  return steps


def find_heads(program: programs.Program, head_name: str, *,
               steps: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
  """Every `(layer, head)` whose head is named `head_name`, within the layers of CG `steps` (None: all)."""
  layers = [l for s in _check_steps(program, steps) for l in step_layers(program, s)]
  found = []
  for layer in layers:
    block = program.blocks[program.schedule[layer]]
    found += [(layer, h) for h, head in enumerate(block.heads) if head.name == head_name]
  if not found:
    known = sorted({h.name for b in program.blocks for h in b.heads})
    raise ValueError(f"no head named {head_name!r} in the CG steps of program {program.name!r}; "
                     f"its heads are {known}.")
  return tuple(found)


def find_layers(program: programs.Program, block_suffix: str, *,
                steps: Sequence[int] | None = None) -> tuple[int, ...]:
  """Every layer of CG `steps` whose block name ends in (or, for "newton ", contains) `block_suffix`."""
  layers = [l for s in _check_steps(program, steps) for l in step_layers(program, s)]
  found = tuple(l for l in layers if _block_matches(program.blocks[program.schedule[l]].name,
                                                    block_suffix))
  if not found:
    known = sorted({b.name for b in program.blocks})
    raise ValueError(f"no block matching {block_suffix!r} in program {program.name!r}; its blocks "
                     f"are {known}.")
  return found


def _block_matches(name: str, suffix: str) -> bool:
  return suffix in name if suffix.endswith(" ") else name.endswith(suffix)


def _damage_for(program_name: str, operation: str) -> Damage:
  if operation == "matvec":
    return Damage(kernel_matvec=True)
  if operation == "matvec_u":
    return Damage(kernel_matvec=True, query_matvec=True)
  if operation == "query_matvec":
    return Damage(query_matvec=True)
  if operation == "curvature_reduction":
    return Damage(curvature=True)
  if operation == "ridge_reduction":
    return Damage(ridge_term=True)
  if operation == "residual_norm":
    return Damage(residual_norm=True)
  return Damage(newton_steps_removed=1)


def operation_ablation(program: programs.Program, operation: str, *,
                       steps: Sequence[int] | None = None) -> tuple[Ablation, tuple[Damage, ...]]:
  """The heads/layers that perform `operation` in CG `steps`, and the damaged reference's schedule.

  Returns `(ablation, damage)` with `damage[s]` the `Damage` of step s (`HEALTHY` outside `steps`). For
  `"newton"` one Newton layer per step is removed (the first of the step).
  """
  if operation not in OPERATIONS:
    raise ValueError(f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}.")
  if program.name not in _HEAD_OPERATIONS:
    raise ValueError(f"no ablation table for program {program.name!r}; known: {sorted(_HEAD_OPERATIONS)}.")
  steps = _check_steps(program, steps)
  num_steps = len(program.step_ends) - 1
  if operation in _LAYER_OPERATIONS:
    layers = []
    for s in steps:
      found = find_layers(program, _LAYER_OPERATIONS[operation], steps=(s,))
      layers.append(found[0])
    ablation = Ablation((), tuple(layers), f"{operation}: layers {layers}")
  else:
    table = _HEAD_OPERATIONS[program.name]
    if operation not in table:
      raise ValueError(f"operation {operation!r} has no head of its own in construction "
                       f"{program.name!r}; it has {sorted(table) + sorted(_LAYER_OPERATIONS)}.")
    heads = find_heads(program, table[operation], steps=steps)
    ablation = Ablation(heads, (), f"{operation}: head {table[operation]!r} at {list(heads)}")
  damage = _damage_for(program.name, operation)
  schedule = tuple(damage if s in steps else HEALTHY for s in range(num_steps))
  return ablation, schedule


# ----------------------------------------------------------------------------------------------------
# The damaged CG reference.
# ----------------------------------------------------------------------------------------------------


def _reciprocal(spec: recip.ReciprocalSpec, s: Array) -> Array:
  """The compiled initial guess of 1/s (`kcg._src.reciprocal.guess`) in the dtype of s."""
  t, c, top = recip.guess_coefficients(spec)
  dtype = s.dtype
  ramp = top / (t[-1] * (spec.ratio - 1))
  # Breakpoints on a trailing axis, broadcast explicitly (rank promotion may be set to raise).
  expand = (1,) * s.ndim + (len(t),)
  t_arr, c_arr = jnp.asarray(t, dtype).reshape(expand), jnp.asarray(c, dtype).reshape(expand)
  x = jnp.asarray(top, dtype) + jnp.sum(c_arr * jax.nn.relu(t_arr - s[..., None]), axis=-1)
  x = x - jnp.asarray(ramp, dtype) * jax.nn.relu(s - jnp.asarray(t[-1], dtype))
  return x + jnp.asarray(ramp, dtype) * jax.nn.relu(s - jnp.asarray(spec.ratio * t[-1], dtype))


def _newton(x: Array, s: Array, num_steps: int) -> Array:
  for _ in range(num_steps):
    x = 2 * x - s * x * x
  return x


def _dot(a: Array, b: Array) -> Array:
  return jnp.sum(a * b, axis=-1)


def damaged_cg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: float,
                       damage: Sequence[Damage], *, form: str = "dual",
                       reciprocal_spec: recip.ReciprocalSpec | None = None) -> Array:
  """Predictions `[B, T+1, q]` of CG run as the compiled program runs it, with `damage[s]` at step s.

  `T = len(damage)`; all `HEALTHY` gives textbook CG (with the compiled reciprocal instead of a
  division, equal to it to rounding). See the module docstring for what each `Damage` field removes.

  Args:
    phi_support: `[B, k, p]`; y_support: `[B, k]`; phi_query: `[B, q, p]`.
    ridge: `> 0`.
    damage: one `Damage` per step.
    form: "dual" (CG on `K + ridge I`) or "primal" (CG on `Phi^T Phi + ridge I`).
    reciprocal_spec: the reciprocal used (default: `kcg._src.reciprocal.default_spec(dtype)`).
  """
  if form not in ("dual", "primal"):
    raise ValueError(f"unknown form {form!r}; choose 'dual' or 'primal'.")
  checks.check_ridge(ridge)
  dtype = checks.float_dtype(phi_support, y_support, phi_query)
  phi = checks.as_array("phi_support", phi_support, dtype, min_ndim=3, shape_doc="[B, k, p]")
  y = checks.as_array("y_support", y_support, dtype, min_ndim=2, shape_doc="[B, k]")
  phi_q = checks.as_array("phi_query", phi_query, dtype, min_ndim=3, shape_doc="[B, q, p]")
  if y.shape != phi.shape[:-1] or phi_q.shape[0] != phi.shape[0] or phi_q.shape[-1] != phi.shape[-1]:
    raise ValueError(f"shapes must be phi_support [B, k, p], y_support [B, k], phi_query [B, q, p]; "
                     f"got {phi.shape}, {y.shape}, {phi_q.shape}.")
  damage = tuple(damage)
  for d in damage:
    if not isinstance(d, Damage):
      raise ValueError(f"damage must be a sequence of Damage, got {type(d).__name__}.")
  spec = reciprocal_spec or recip.default_spec(dtype)
  lam = jnp.asarray(ridge, dtype)
  einsum = lambda s, *a: jnp.einsum(s, *a, precision=checks.HIGHEST)
  zero = jnp.zeros((), dtype)
  if form == "dual":
    gram = einsum("bkp,bjp->bkj", phi, phi)
    k_query = einsum("bqp,bkp->bqk", phi_q, phi)
    matvec = lambda v: einsum("bkj,bj->bk", gram, v)
    query_dot = lambda v: einsum("bqk,bk->bq", k_query, v)
    r = y
  else:
    matvec = lambda v: einsum("bkp,bk->bp", phi, einsum("bkp,bp->bk", phi, v))
    query_dot = lambda v: einsum("bqp,bp->bq", phi_q, v)
    r = einsum("bkp,bk->bp", phi, y)
  p = r
  f = jnp.zeros(phi_q.shape[:2], dtype)
  rr = _dot(r, r)
  inv_rr_guess = _reciprocal(spec, rr)
  outputs = [f]
  for d in damage:
    steps = spec.newton_steps - d.newton_steps_removed
    kp = jnp.zeros_like(p) if d.kernel_matvec else matvec(p)
    if form == "dual":
      p_ap = (zero if d.curvature else _dot(p, kp)) + (zero if d.ridge_term else lam * _dot(p, p))
      a_p = kp + lam * p
    else:
      a_p = kp + (zero if d.ridge_term else lam) * p
      if d.curvature:
        raise ValueError("curvature damage is defined for form='dual' only (primal p.Ap has no "
                         "ridge term left to fall back on).")
      p_ap = _dot(p, a_p)
    inv_pap = _newton(_reciprocal(spec, p_ap), p_ap, steps)
    inv_rr = _newton(inv_rr_guess, rr, steps)
    gamma = rr * inv_pap
    if not d.query_matvec:
      f = f + gamma[:, None] * query_dot(p)
    r = r - gamma[:, None] * a_p
    if d.residual_norm:
      rr_next = jnp.zeros_like(rr)
      inv_rr_guess = jnp.zeros_like(rr)
    else:
      rr_next = _dot(r, r)
      inv_rr_guess = _reciprocal(spec, rr_next)
    beta = rr_next * inv_rr
    rr = rr_next
    p = r + beta[:, None] * p
    outputs.append(f)
  return jnp.stack(outputs, axis=1)


# ----------------------------------------------------------------------------------------------------
# Compiled models: damaged model against damaged reference.
# ----------------------------------------------------------------------------------------------------


class AblationReport(NamedTuple):
  """A compiled model with an operation removed, against the CG that drops the same operation.

  Arrays are `[B, T+1, q]` predictions at every CG step end (the prediction channel), or scalars.

  Attributes:
    operation: the removed operation (see `OPERATIONS`).
    ablation: the heads and layers removed.
    damaged: the ablated model's predictions.
    healthy: the intact model's predictions.
    reference_damaged: `damaged_cg_predict` with the same damage.
    reference_healthy: `damaged_cg_predict` with no damage (CG as compiled).
    match: `|damaged - reference_damaged| / |reference_damaged|` (Frobenius, all steps).
    damage_size: `|damaged - healthy| / |healthy|`: how much the ablation changed the model.
    mse_healthy, mse_damaged: final-step mean squared error against the KRR oracle.
  """

  operation: str
  ablation: Ablation
  damaged: Array
  healthy: Array
  reference_damaged: Array
  reference_healthy: Array
  match: float
  damage_size: float
  mse_healthy: float
  mse_damaged: float


def _relative(a: Array, b: Array) -> float:
  num = float(jnp.sqrt(jnp.sum(jnp.square(a - b))))
  den = float(jnp.sqrt(jnp.sum(jnp.square(b))))
  return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _predict_steps(subject: probes.Subject, compiled: Any, prompts: Any, head_mask, layer_mask):
  out = subject.forward(prompts.x_support, prompts.y_support, prompts.x_query, return_residuals=True,
                        head_mask=head_mask, layer_mask=layer_mask)
  at_ends = out.residuals[jnp.asarray(compiled.program.step_ends)]
  column = compiled.program.layout.slice(compiled.program.readout).start
  k = prompts.x_support.shape[1]
  return jnp.moveaxis(at_ends[:, :, k + 1:, column], 0, 1)


def ablate_compiled(compiled: Any, operation: str, prompts: Any, *,
                    steps: Sequence[int] | None = None) -> AblationReport:
  """Removes `operation` at CG `steps` (None: every step) from `compiled` and compares with the reference.

  Args:
    compiled: a `kcg.CompiledCG` (identity features: `x` is `phi`).
    operation: one of `OPERATIONS` available in its construction.
    prompts: with `x_support [B,k,d]`, `y_support [B,k]`, `x_query [B,q,d]`.
    steps: CG steps (0-based) at which to remove it.
  """
  program = compiled.program
  ablation, damage = operation_ablation(program, operation, steps=steps)
  subject = probes.subject_from_compiled(compiled)
  dtype = checks.float_dtype(prompts.x_support, prompts.y_support, prompts.x_query)
  head_mask, layer_mask = masks(compiled.config, ablation, dtype)
  healthy = _predict_steps(subject, compiled, prompts, None, None)
  damaged = _predict_steps(subject, compiled, prompts, head_mask, layer_mask)
  args = (prompts.x_support, prompts.y_support, prompts.x_query, compiled.ridge)
  ref_damaged = damaged_cg_predict(*args, damage, form=compiled.form)
  ref_healthy = damaged_cg_predict(*args, (HEALTHY,) * len(damage), form=compiled.form)
  oracle = _oracle(prompts, compiled.ridge)
  return AblationReport(
      operation, ablation, damaged, healthy, ref_damaged, ref_healthy,
      match=_relative(damaged, ref_damaged), damage_size=_relative(damaged, healthy),
      mse_healthy=float(jnp.mean(jnp.square(healthy[:, -1] - oracle))),
      mse_damaged=float(jnp.mean(jnp.square(damaged[:, -1] - oracle))))


def _oracle(prompts: Any, ridge: float) -> Array:
  from kcg._src import solvers  # pylint: disable=g-import-not-at-top
  return solvers.krr_predict(prompts.x_support, prompts.y_support, prompts.x_query, ridge)


# ----------------------------------------------------------------------------------------------------
# Any model: degradation under arbitrary head / layer removal.
# ----------------------------------------------------------------------------------------------------


class Degradation(NamedTuple):
  """How removing heads/layers changes a model's query predictions `[B, q]`.

  Attributes:
    mse_healthy, mse_damaged: mean squared error against the targets.
    relative_change: `|damaged - healthy| / |healthy|`.
    damaged: the damaged predictions `[B, q]`.
  """

  mse_healthy: float
  mse_damaged: float
  relative_change: float
  damaged: Array


def _query_predictions(subject: probes.Subject, prompts: Any, head_mask=None, layer_mask=None):
  out = subject.forward(prompts.x_support, prompts.y_support, prompts.x_query, head_mask=head_mask,
                        layer_mask=layer_mask).outputs
  q = prompts.x_query.shape[1]
  return out[:, -q:, 0]


def degradation(subject: probes.Subject, prompts: Any, *, heads: Sequence[tuple[int, int]] = (),
                layers: Sequence[int] = (), targets: Any = None) -> Degradation:
  """Removes `heads` ((layer, head) pairs) and `layers` from any subject and reports the change.

  `targets` default to `prompts.y_query`.
  """
  ablation = Ablation(tuple((int(l), int(h)) for l, h in heads), tuple(int(l) for l in layers))
  if not ablation.heads and not ablation.layers:
    raise ValueError("nothing to ablate: pass heads=[(layer, head), ...] and/or layers=[...].")
  dtype = checks.float_dtype(prompts.x_support, prompts.y_support, prompts.x_query)
  head_mask, layer_mask = masks(subject.config, ablation, dtype)
  targets = prompts.y_query if targets is None else targets
  targets = jnp.asarray(targets, dtype)
  healthy = _query_predictions(subject, prompts)
  damaged = _query_predictions(subject, prompts, head_mask, layer_mask)
  if targets.shape != healthy.shape:
    raise ValueError(f"targets must have shape {healthy.shape} ([B, q]), got {targets.shape}.")
  return Degradation(float(jnp.mean(jnp.square(healthy - targets))),
                     float(jnp.mean(jnp.square(damaged - targets))),
                     _relative(damaged, healthy), damaged)


class DegradationMap(NamedTuple):
  """Every single head and every single layer removed in turn.

  Attributes:
    mse_healthy: the intact model's error.
    head_mse: `[L, H]` error with head (l, h) removed.
    layer_mse: `[L]` error with layer l removed.
    head_change, layer_change: the relative change of the predictions, same shapes.
  """

  mse_healthy: float
  head_mse: np.ndarray
  layer_mse: np.ndarray
  head_change: np.ndarray
  layer_change: np.ndarray


def degradation_map(subject: probes.Subject, prompts: Any, *, targets: Any = None) -> DegradationMap:
  """`degradation` for every `(layer, head)` and every layer of `subject`."""
  num_layers, num_heads = subject.config.num_layers, subject.config.num_heads
  head_mse = np.zeros((num_layers, num_heads))
  head_change = np.zeros((num_layers, num_heads))
  layer_mse = np.zeros((num_layers,))
  layer_change = np.zeros((num_layers,))
  healthy = None
  for layer in range(num_layers):
    for head in range(num_heads):
      d = degradation(subject, prompts, heads=((layer, head),), targets=targets)
      head_mse[layer, head], head_change[layer, head] = d.mse_damaged, d.relative_change
      healthy = d.mse_healthy
    d = degradation(subject, prompts, layers=(layer,), targets=targets)
    layer_mse[layer], layer_change[layer] = d.mse_damaged, d.relative_change
  return DegradationMap(float(healthy), head_mse, layer_mse, head_change, layer_change)


__all__ = (
    "Ablation", "AblationReport", "Damage", "Degradation", "DegradationMap", "HEALTHY", "OPERATIONS",
    "ablate_compiled", "damaged_cg_predict", "degradation", "degradation_map", "find_heads",
    "find_layers", "masks", "operation_ablation", "step_layers",
)
