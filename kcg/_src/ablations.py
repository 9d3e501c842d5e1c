"""Ablations: remove a head or a layer; compare the damaged model with the algorithm missing that step.

Mechanics. `kcg.Transformer` multiplies each head's output by `head_mask[l, h]` and each block's residual
update by `layer_mask[l]`; an ablation is a set of `(layer, head)` pairs and layers set to 0 (`Ablation`,
`masks`). In a compiled model heads and layers are found by what they compute, the `op` of the
construction's `Head`s and `Block`s (`kcg.ops.Op`; `find_heads`, `find_layers`), never by index or by
display name; which construction a program is comes from `Program.construction`.

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

* `"step"` (every layer of CG step s): the step is skipped: the state, and the prediction, stay as
  they were after step s - 1, and step s + 1 runs as step s would have (Chebyshev: with the
  coefficients baked into its own layers, so the step-s coefficients are lost).

Removing the reduction head `r.r` alone (keeping the ReLU guess) would feed 0 into the reciprocal's
guess, after which `pAp` leaves the reciprocal's range and the recurrence depends on rounding in the
ramp above it; kcg ablates the whole layer instead, whose effect is exactly the restart above.

The other constructions (`_TABLES` lists which operation is which op of heads or layers in each):

* PCG (`jacobi_support_state`, `kcg.compile_cg(..., preconditioner="jacobi")`): the same heads as
  `support_state` (`matvec`, `query_matvec`, `curvature_reduction`, `ridge_reduction`), the layer
  `rz_next = r.z` (`residual_norm`: `r.z` is never formed, the same restart) and `newton`; the
  reference is PCG run as compiled (`damaged_pcg_predict`: `z = inv_diag * r`, `rho = r.z`).
  `"preconditioner"`: the scaling `z = r / d_i` itself is a gated-MLP unit of the update layer, which
  also updates alpha, r and f, so head and layer masks cannot remove it alone. What they can remove
  is the computation of `1/d_i`, `d_i = phi_i . phi_i + ridge`: the init layers of its Newton
  refinement. Then `M^-1` is the ReLU guess of `1/d_i` (relative error up to 4.2%): PCG with a
  perturbed diagonal preconditioner, which still converges to the KRR solution.
* Chebyshev (`chebyshev_*`, `kcg.compile_chebyshev`): the step sizes are weights, so there are no
  reductions and no reciprocals to remove. `matvec` (`K p := 0` in the update, `A p = ridge p`),
  `matvec_u` (aggregator_dual: `u = Phi^T p` feeds both `K p` and the query update),
  `query_matvec` (`f` not updated at step s) and `step` (one layer per step in the support-state
  and primal constructions, two in aggregator_dual); reference `damaged_chebyshev_predict`.
* Softmax Route A (`exponential_support_state`, `kcg.compile_cg(..., attention="softmax",
  kernel="exponential")`): `matvec` and `query_matvec` (the softmax heads that form `(K~ p)_i / Z_i`
  and `k~(x_q) . p / Z_q`), `"pap_reduction"` (its one reduction head sums `p_i (A p)_i`: without
  it `pAp = 0`, and the compiled breakdown guard `gamma *= clip(pAp / low, 0, 1)` makes
  `gamma_s = 0`: alpha, r and f are not updated at step s, then `beta_s = r.r/r.r = 1`, so
  `p_{s+1} = r + p_s`), `residual_norm` (the two layers `r_i^2` and `rr_next = sum r_i^2`: the same
  restart as CG; removing only the second would leave `r_i^2` uncleared), `newton` (both gated
  layers of the last Newton step, since the first step's second layer also forms the guard) and
  `step`. The reference is `damaged_cg_predict` with the exponential kernel and the guard.

The variants of these constructions (`Program.transforms`) carry the same tables. `norm="rmsnorm"` adds
pin channels and keeps every head and block; a random-ReLU feature layer or a linear-attention projection
S changes what the kernel reads, so the reference runs on `compiled.kernel_features(x)` (`S phi(x)`); r
independent outputs keep the shared heads and copy the per-output ones, every copy with the op of its
original, and an operation removes every copy, so each column's damaged model is the damaged reference
on that column (`[B, T+1, q, r]`). Block CG (`block_support_state`) and Route B have no table.

For trained models the meaning of a head is unknown, so `degradation` takes any `(layer, head)` pairs
and layers and reports how much the predictions and the error change (`degradation_map` does every head
and every layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kcg._src import chebyshev_programs
from kcg._src import checks
from kcg._src import craft
from kcg._src import probes
from kcg._src import reciprocal as recip
from kcg._src.ops import Construction, Op

Array = jax.Array

OPERATIONS = ("matvec", "matvec_u", "query_matvec", "curvature_reduction", "ridge_reduction",
              "pap_reduction", "residual_norm", "newton", "preconditioner", "step")


class _Layers(NamedTuple):
  """In each step, the layers whose block has `op`, indexed by `which` (a slice: first, last two, all)."""

  op: Op
  which: slice


class _Table(NamedTuple):
  """Which heads and layers of a construction perform which operation, and its reference.

  Attributes:
    reference: "cg", "pcg", "chebyshev" or "softmax" (which damaged reference applies).
    heads: operation -> the op of the heads (in every step) that perform it.
    layers: operation -> the layers removed in each step.
    init_layers: operation -> the op of the init layers removed (every one).
  """

  reference: str
  heads: Mapping[str, Op]
  layers: Mapping[str, tuple[_Layers, ...]] = {}
  init_layers: Mapping[str, Op] = {}


_FIRST, _LAST_TWO, _ALL = slice(0, 1), slice(-2, None), slice(None)
_CG_LAYERS = {"residual_norm": (_Layers(Op.RESIDUAL_NORM, _FIRST),),
              "newton": (_Layers(Op.NEWTON, _FIRST),)}
_SUPPORT_HEADS = {"matvec": Op.MATVEC, "query_matvec": Op.QUERY_MATVEC,
                  "curvature_reduction": Op.CURVATURE, "ridge_reduction": Op.RIDGE}
_TABLES = {
    Construction.SUPPORT_STATE: _Table("cg", _SUPPORT_HEADS, _CG_LAYERS),
    Construction.AGGREGATOR_DUAL: _Table("cg", {
        "matvec": Op.MATVEC, "matvec_u": Op.MATVEC_U, "curvature_reduction": Op.CURVATURE,
        "ridge_reduction": Op.RIDGE}, _CG_LAYERS),
    Construction.AGGREGATOR_PRIMAL: _Table("cg", {
        "matvec": Op.MATVEC, "query_matvec": Op.QUERY_MATVEC, "ridge_reduction": Op.RIDGE},
        _CG_LAYERS),
    # PCG's preconditioner: the Newton refinement of 1/d_i, all in the init layers.
    Construction.JACOBI_SUPPORT_STATE: _Table("pcg", _SUPPORT_HEADS, _CG_LAYERS,
                                              {"preconditioner": Op.NEWTON}),
    Construction.CHEBYSHEV_SUPPORT_STATE: _Table("chebyshev", {
        "matvec": Op.MATVEC, "query_matvec": Op.QUERY_MATVEC}),
    Construction.CHEBYSHEV_AGGREGATOR_DUAL: _Table("chebyshev", {
        "matvec": Op.MATVEC, "matvec_u": Op.MATVEC_U, "query_matvec": Op.QUERY_MATVEC}),
    Construction.CHEBYSHEV_AGGREGATOR_PRIMAL: _Table("chebyshev", {
        "matvec": Op.MATVEC, "query_matvec": Op.QUERY_MATVEC}),
    # Softmax: r.r is two layers (r_i^2, then their sum); a Newton step is two gated layers, and
    # the last one is removed (the first step's second layer also forms the breakdown guard).
    Construction.EXPONENTIAL_SUPPORT_STATE: _Table("softmax", {
        "matvec": Op.MATVEC, "query_matvec": Op.QUERY_MATVEC, "pap_reduction": Op.PAP},
        {"residual_norm": (_Layers(Op.RESIDUAL_NORM, _ALL),),
         "newton": (_Layers(Op.NEWTON, _LAST_TWO),)}),
}


@dataclasses.dataclass(frozen=True)
class Damage:
  """What one step of the damaged reference leaves out (see the module docstring).

  `preconditioner_guess_only` (PCG) holds for every step or none: `1/d_i` is formed once, at init.
  """

  kernel_matvec: bool = False
  query_matvec: bool = False
  curvature: bool = False
  ridge_term: bool = False
  residual_norm: bool = False
  newton_steps_removed: int = 0
  skipped: bool = False
  preconditioner_guess_only: bool = False


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
# Finding heads and layers of a compiled program by what they compute (their Op).
# ----------------------------------------------------------------------------------------------------


def step_layers(program: craft.Program, step: int) -> range:
  """The layers that run CG step `step` (0-based): `step_ends[step] .. step_ends[step + 1] - 1`."""
  num_steps = len(program.step_ends) - 1
  if not 0 <= step < num_steps:
    raise ValueError(f"step {step} is outside the program's CG steps 0..{num_steps - 1}.")
  return range(program.step_ends[step], program.step_ends[step + 1])


def _check_steps(program: craft.Program, steps: Sequence[int] | None) -> tuple[int, ...]:
  num_steps = len(program.step_ends) - 1
  if steps is None:
    return tuple(range(num_steps))
  steps = tuple(int(s) for s in steps)
  for s in steps:
    step_layers(program, s)
  return steps


def _check_op(op: Any) -> Op:
  if not isinstance(op, Op):
    raise ValueError(f"expected a kcg.ops.Op (what a head or block computes, e.g. Op.MATVEC), got "
                     f"{op!r}; display names are not identities.")
  return op


def find_heads(program: craft.Program, op: Op, *,
               steps: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
  """Every `(layer, head)` within CG `steps` whose head computes `op` (every per-output copy too)."""
  op = _check_op(op)
  layers = [l for s in _check_steps(program, steps) for l in step_layers(program, s)]
  found = tuple((layer, h) for layer in layers
                for h, head in enumerate(program.layer_block(layer).heads) if head.op == op)
  if not found:
    known = sorted({h.op.value for b in program.blocks for h in b.heads})
    raise ValueError(f"no head with op {op.value!r} in the CG steps of program {program.name!r}; "
                     f"its heads compute {known}.")
  return found


def find_layers(program: craft.Program, op: Op, *,
                steps: Sequence[int] | None = None) -> tuple[int, ...]:
  """Every layer of CG `steps` whose block computes `op`."""
  op = _check_op(op)
  layers = [l for s in _check_steps(program, steps) for l in step_layers(program, s)]
  found = tuple(l for l in layers if program.layer_block(l).op == op)
  if not found:
    known = sorted({b.op.value for b in program.blocks})
    raise ValueError(f"no block with op {op.value!r} in the CG steps of program {program.name!r}; "
                     f"its blocks compute {known}.")
  return found


_DAMAGE = {
    "matvec": Damage(kernel_matvec=True),
    "matvec_u": Damage(kernel_matvec=True, query_matvec=True),
    "query_matvec": Damage(query_matvec=True),
    "curvature_reduction": Damage(curvature=True),
    "ridge_reduction": Damage(ridge_term=True),
    "pap_reduction": Damage(curvature=True, ridge_term=True),
    "residual_norm": Damage(residual_norm=True),
    "newton": Damage(newton_steps_removed=1),
    "preconditioner": Damage(preconditioner_guess_only=True),
    "step": Damage(skipped=True),
}


def available_operations(program: craft.Program) -> tuple[str, ...]:
  """The operations of `OPERATIONS` that `program` has a head or layer for (its ablation table)."""
  table = _table(program)
  return tuple(op for op in OPERATIONS
               if op in table.heads or op in table.layers or op in table.init_layers or op == "step")


def _table(program: craft.Program) -> _Table:
  table = _TABLES.get(program.construction)
  if table is None:
    raise ValueError(f"no ablation table for program {program.name!r}; known constructions: "
                     f"{sorted(c.value for c in _TABLES)} (with any of their transforms).")
  return table


def _init_layers(program: craft.Program, op: Op) -> tuple[int, ...]:
  found = tuple(l for l in range(program.step_ends[0]) if program.layer_block(l).op == op)
  if not found:
    raise ValueError(f"no init layer with op {op.value!r} in program {program.name!r}.")
  return found


def operation_ablation(program: craft.Program, operation: str, *,
                       steps: Sequence[int] | None = None) -> tuple[Ablation, tuple[Damage, ...]]:
  """The heads/layers that perform `operation` in CG `steps`, and the damaged reference's schedule.

  Returns `(ablation, damage)` with `damage[s]` the `Damage` of step s (`HEALTHY` outside `steps`). For
  `"newton"` one Newton refinement per step is removed (CG and PCG: the first Newton layer of the
  step; softmax: both gated layers of the last). `"step"` removes every layer of each step in
  `steps`. `"preconditioner"` (PCG) removes init layers, so it takes `steps=None` and damages every
  step.
  """
  if operation not in OPERATIONS:
    raise ValueError(f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}.")
  table = _table(program)
  if operation not in available_operations(program):
    why = (" (Chebyshev's step sizes are weights: it has no reductions and no reciprocals)"
           if table.reference == "chebyshev" else "")
    raise ValueError(f"operation {operation!r} has no head of its own in construction "
                     f"{program.name!r}{why}; it has {list(available_operations(program))}.")
  if operation in table.init_layers and steps is not None:
    raise ValueError(f"operation {operation!r} removes init layers (before the first step), which "
                     "every step reads; pass steps=None.")
  steps = _check_steps(program, steps)
  num_steps = len(program.step_ends) - 1
  if operation == "step":
    layers = [l for s in steps for l in step_layers(program, s)]
    ablation = Ablation((), tuple(layers), f"step: every layer of steps {list(steps)}")
  elif operation in table.init_layers:
    layers = list(_init_layers(program, table.init_layers[operation]))
    ablation = Ablation((), tuple(layers), f"{operation}: init layers {layers}")
    steps = tuple(range(num_steps))
  elif operation in table.layers:
    layers = [l for s in steps for pick in table.layers[operation]
              for l in find_layers(program, pick.op, steps=(s,))[pick.which]]
    ablation = Ablation((), tuple(layers), f"{operation}: layers {layers}")
  else:
    heads = find_heads(program, table.heads[operation], steps=steps)
    ablation = Ablation(heads, (), f"{operation}: {table.heads[operation].value} heads at "
                                   f"{list(heads)}")
  damage = _DAMAGE[operation]
  schedule = tuple(damage if s in steps else HEALTHY for s in range(num_steps))
  return ablation, schedule


# ----------------------------------------------------------------------------------------------------
# The damaged CG reference.
# ----------------------------------------------------------------------------------------------------


def _reciprocal(spec: recip.ReciprocalSpec, s: Array) -> Array:
  """The compiled initial guess of 1/s (`kcg._src.reciprocal.evaluate_guess`) in the dtype of s."""
  return recip.evaluate_guess(spec, s, jnp)


def _newton(x: Array, s: Array, num_steps: int) -> Array:
  for _ in range(num_steps):
    x = 2 * x - s * x * x
  return x


def _dot(a: Array, b: Array) -> Array:
  return jnp.sum(a * b, axis=-1)


def _prompt_arrays(phi_support, y_support, phi_query, ridge, damage):
  """Validated `(phi [B,k,p], y [B,k], phi_q [B,q,p], damage tuple)` in one float dtype."""
  checks.check_ridge(ridge)
  dtype = checks.float_dtype(phi_support, y_support, phi_query)
  phi = checks.as_array("phi_support", phi_support, dtype, min_ndim=3, shape_doc="[B, k, p]")
  y = checks.as_array("y_support", y_support, dtype, min_ndim=2, shape_doc="[B, k]")
  phi_q = checks.as_array("phi_query", phi_query, dtype, min_ndim=3, shape_doc="[B, q, p]")
  if (phi.ndim != 3 or y.shape != phi.shape[:-1] or phi_q.ndim != 3 or phi_q.shape[0] != phi.shape[0]
      or phi_q.shape[-1] != phi.shape[-1]):
    raise ValueError(f"shapes must be phi_support [B, k, p], y_support [B, k], phi_query [B, q, p]; "
                     f"got {phi.shape}, {y.shape}, {phi_q.shape}.")
  damage = tuple(damage)
  for d in damage:
    if not isinstance(d, Damage):
      raise ValueError(f"damage must be a sequence of Damage, got {type(d).__name__}.")
  return phi, y, phi_q, damage


def _einsum(spec: str, *arrays: Array) -> Array:
  return jnp.einsum(spec, *arrays, precision=checks.HIGHEST)


def _dual_operators(phi, phi_q, kernel):
  """`(K p, k(x_q)^T p)` as functions of `p [B, k]`; `kernel(a, b) -> [B, n, m]` (None: linear)."""
  if kernel is None:
    gram, k_query = _einsum("bkp,bjp->bkj", phi, phi), _einsum("bqp,bkp->bqk", phi_q, phi)
  else:
    gram, k_query = kernel(phi, phi), kernel(phi_q, phi)
  return (lambda v: _einsum("bkj,bj->bk", gram, v)), (lambda v: _einsum("bqk,bk->bq", k_query, v))


def _operators(phi, y, phi_q, form, kernel=None):
  """`(A v, query read-out of v, r_0)` for the dual system (v in R^k, r_0 = y) or the primal one
  (A = Phi^T Phi without the ridge, v in R^p, r_0 = Phi^T y)."""
  if form == "dual":
    return _dual_operators(phi, phi_q, kernel) + (y,)
  return (lambda v: _einsum("bkp,bk->bp", phi, _einsum("bkp,bp->bk", phi, v)),
          lambda v: _einsum("bqp,bp->bq", phi_q, v),
          _einsum("bkp,bk->bp", phi, y))


def _krylov(matvec, query_dot, r, num_query_shape, ridge, damage, spec, *, inv_diag=None,
            breakdown_guard=False, dual=True):
  """CG (PCG when `inv_diag` is given) run as the compiled programs run it; `[B, T+1, q]`.

  `rho = r.z` with `z = inv_diag * r` (CG: `z = r`), `gamma = rho * inv(pAp)`,
  `beta = rho_next * inv(rho)`, `inv` the compiled reciprocal; `breakdown_guard` multiplies gamma by
  `relu(1 - relu(1 - pAp / low))` and refines `1/pAp` on `relu(pAp)` (the softmax programs).
  """
  dtype = r.dtype
  lam = jnp.asarray(ridge, dtype)
  zero = jnp.zeros((), dtype)
  precondition = (lambda v: v) if inv_diag is None else (lambda v: inv_diag * v)
  z = precondition(r)
  p = z
  f = jnp.zeros(num_query_shape, dtype)
  rho = _dot(r, z)
  inv_rho_guess = _reciprocal(spec, rho)
  outputs = [f]
  for d in damage:
    if d.skipped:
      outputs.append(f)
      continue
    steps = spec.newton_steps - d.newton_steps_removed
    kp = jnp.zeros_like(p) if d.kernel_matvec else matvec(p)
    if dual:
      p_ap = (zero if d.curvature else _dot(p, kp)) + (zero if d.ridge_term else lam * _dot(p, p))
      a_p = kp + lam * p
    else:
      a_p = kp + (zero if d.ridge_term else lam) * p
      if d.curvature:
        raise ValueError("curvature damage is defined for form='dual' only (primal p.Ap has no "
                         "ridge term left to fall back on).")
      p_ap = _dot(p, a_p)
    newton_on = jax.nn.relu(p_ap) if breakdown_guard else p_ap
    inv_pap = _newton(_reciprocal(spec, p_ap), newton_on, steps)
    inv_rho = _newton(inv_rho_guess, rho, steps)
    gamma = rho * inv_pap
    if breakdown_guard:
      low = jnp.asarray(spec.low, dtype)
      one = jnp.ones((), dtype)
      gamma = gamma * jax.nn.relu(one - jax.nn.relu(one - p_ap / low))
    if not d.query_matvec:
      f = f + gamma[:, None] * query_dot(p)
    r = r - gamma[:, None] * a_p
    z = precondition(r)
    if d.residual_norm:
      rho_next = jnp.zeros_like(rho)
      inv_rho_guess = jnp.zeros_like(rho)
    else:
      rho_next = _dot(r, z)
      inv_rho_guess = _reciprocal(spec, rho_next)
    beta = rho_next * inv_rho
    rho = rho_next
    p = z + beta[:, None] * p
    outputs.append(f)
  return jnp.stack(outputs, axis=1)


def damaged_cg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: float,
                       damage: Sequence[Damage], *, form: str = "dual",
                       reciprocal_spec: recip.ReciprocalSpec | None = None,
                       kernel: Callable | None = None, breakdown_guard: bool = False) -> Array:
  """Predictions `[B, T+1, q]` of CG run as the compiled program runs it, with `damage[s]` at step s.

  `T = len(damage)`; all `HEALTHY` gives textbook CG (with the compiled reciprocal instead of a
  division, equal to it to rounding). See the module docstring for what each `Damage` field removes.

  Args:
    phi_support: `[B, k, p]`; y_support: `[B, k]`; phi_query: `[B, q, p]`.
    ridge: `> 0`.
    damage: one `Damage` per step.
    form: "dual" (CG on `K + ridge I`) or "primal" (CG on `Phi^T Phi + ridge I`).
    reciprocal_spec: the reciprocal used (default: `kcg._src.reciprocal.default_spec(dtype)`).
    kernel: dual only, `kernel(a [B, n, p], b [B, m, p]) -> [B, n, m]` (e.g.
      `kcg.kernels.ExponentialKernel(tau)` for softmax Route A); None: the linear kernel.
    breakdown_guard: gamma times `relu(1 - relu(1 - pAp / low))`, as the softmax programs compute it.
  """
  if form not in ("dual", "primal"):
    raise ValueError(f"unknown form {form!r}; choose 'dual' or 'primal'.")
  if kernel is not None and form != "dual":
    raise ValueError("kernel is used by form='dual' only (the primal form works on phi itself).")
  phi, y, phi_q, damage = _prompt_arrays(phi_support, y_support, phi_query, ridge, damage)
  if any(d.preconditioner_guess_only for d in damage):
    raise ValueError("preconditioner damage needs the PCG reference, damaged_pcg_predict.")
  spec = reciprocal_spec or recip.default_spec(phi.dtype)
  matvec, query_dot, r = _operators(phi, y, phi_q, form, kernel)
  return _krylov(matvec, query_dot, r, phi_q.shape[:2], ridge, damage, spec,
                 breakdown_guard=breakdown_guard, dual=form == "dual")


def damaged_pcg_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: float,
                        damage: Sequence[Damage], *,
                        reciprocal_spec: recip.ReciprocalSpec | None = None) -> Array:
  """Jacobi-preconditioned CG `[B, T+1, q]` run as `kcg.compile_cg(..., preconditioner="jacobi")` runs it.

  `M = diag(d)`, `d_i = phi_i . phi_i + ridge`; `1/d_i` is the compiled reciprocal (ReLU guess and
  Newton steps), or its guess alone when every step's damage has `preconditioner_guess_only`.
  Otherwise as `damaged_cg_predict` (dual form) with `rho = r.z`, `z = r / d`.
  """
  phi, y, phi_q, damage = _prompt_arrays(phi_support, y_support, phi_query, ridge, damage)
  flags = {d.preconditioner_guess_only for d in damage}
  if len(flags) > 1:
    raise ValueError("preconditioner_guess_only must hold for every step or for none: 1/d_i is "
                     "formed once, before the first step.")
  spec = reciprocal_spec or recip.default_spec(phi.dtype)
  diag = jnp.sum(phi * phi, axis=-1) + jnp.asarray(ridge, phi.dtype)
  newton_steps = 0 if flags == {True} else spec.newton_steps
  inv_diag = _newton(_reciprocal(spec, diag), diag, newton_steps)
  matvec, query_dot = _dual_operators(phi, phi_q, None)
  return _krylov(matvec, query_dot, y, phi_q.shape[:2], ridge, damage, spec, inv_diag=inv_diag)


def damaged_chebyshev_predict(phi_support: Any, y_support: Any, phi_query: Any, ridge: float,
                              eig_bounds: tuple[float, float], damage: Sequence[Damage], *,
                              form: str = "dual") -> Array:
  """Chebyshev semi-iteration `[B, T+1, q]` with `damage[s]` at step s, as `kcg.compile_chebyshev` runs it.

  `alpha += g_s p; r -= g_s (K p + ridge p); p = r + b_s p; f += g_s k(x)^T p` with the baked
  coefficients `(g_s, b_s) = kcg._src.chebyshev_programs.chebyshev_coefficients(lo, hi, T)` (primal: on
  `Phi^T Phi + ridge I`). Only `kernel_matvec`, `query_matvec` and `skipped` apply: Chebyshev has
  no reductions and no reciprocals.
  """
  if form not in ("dual", "primal"):
    raise ValueError(f"unknown form {form!r}; choose 'dual' or 'primal'.")
  phi, y, phi_q, damage = _prompt_arrays(phi_support, y_support, phi_query, ridge, damage)
  allowed = {"kernel_matvec", "query_matvec", "skipped"}
  for d in damage:
    extra = [f.name for f in dataclasses.fields(d)
             if f.name not in allowed and getattr(d, f.name) != getattr(HEALTHY, f.name)]
    if extra:
      raise ValueError(f"Chebyshev has no reductions or reciprocals to damage; got {extra} "
                       "(use kernel_matvec, query_matvec or skipped).")
  gammas, betas = chebyshev_programs.chebyshev_coefficients(*(float(b) for b in eig_bounds), len(damage))
  dtype = phi.dtype
  lam = jnp.asarray(ridge, dtype)
  matvec, query_dot, r = _operators(phi, y, phi_q, form)
  p = r
  f = jnp.zeros(phi_q.shape[:2], dtype)
  outputs = [f]
  for d, g, b in zip(damage, gammas, betas):
    if not d.skipped:
      g, b = jnp.asarray(g, dtype), jnp.asarray(b, dtype)
      kp = jnp.zeros_like(p) if d.kernel_matvec else matvec(p)
      if not d.query_matvec:
        f = f + g * query_dot(p)
      r = r - g * (kp + lam * p)
      p = r + b * p
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
  columns = compiled.program.layout.slice(compiled.program.readout)
  first_query = compiled.prompt_layout.num_prefix
  steps_BxTxQxR = jnp.moveaxis(at_ends[:, :, first_query:, columns], 0, 1)
  return steps_BxTxQxR if compiled.num_outputs > 1 else steps_BxTxQxR[..., 0]


def _kernel_of(compiled: Any) -> Callable | None:
  """The kernel a compiled model runs KRR with (None: linear)."""
  if getattr(compiled, "attention", "linear") == "softmax":
    from kcg._src import kernels  # pylint: disable=g-import-not-at-top
    return kernels.ExponentialKernel(compiled.temperature, compiled.projection)
  return None


def reference_predict(compiled: Any, prompts: Any, damage: Sequence[Damage]) -> Array:
  """The damaged reference `[B, T+1, q]` (`[B, T+1, q, r]`) for `compiled`'s construction.

  Runs on `compiled.kernel_features(x)` (the features its kernel reads) and on each of the r columns of
  `y_support [B, k, r]` independently.
  """
  _table(compiled.program)  # no table, no reference
  phi, phi_q = compiled.kernel_features(prompts.x_support), compiled.kernel_features(prompts.x_query)
  y = jnp.asarray(prompts.y_support)
  if compiled.num_outputs > 1:
    return jnp.stack([_reference_column(compiled, phi, y[..., c], phi_q, damage)
                      for c in range(y.shape[-1])], axis=-1)
  return _reference_column(compiled, phi, y, phi_q, damage)


def _reference_column(compiled: Any, phi, y, phi_q, damage: Sequence[Damage]) -> Array:
  args = (phi, y, phi_q, compiled.ridge)
  reference = _table(compiled.program).reference
  if reference == "pcg":
    return damaged_pcg_predict(*args, damage)
  if reference == "chebyshev":
    return damaged_chebyshev_predict(*args, compiled.eig_bounds, damage, form=compiled.form)
  if reference == "softmax":
    return damaged_cg_predict(*args, damage, kernel=_kernel_of(compiled), breakdown_guard=True)
  return damaged_cg_predict(*args, damage, form=compiled.form)


def ablate_compiled(compiled: Any, operation: str, prompts: Any, *,
                    steps: Sequence[int] | None = None) -> AblationReport:
  """Removes `operation` at CG `steps` (None: every step) from `compiled` and compares with the reference.

  Args:
    compiled: a `kcg.CompiledCG`: CG in any construction, PCG (`preconditioner="jacobi"`),
      Chebyshev (`kcg.compile_chebyshev`) or softmax Route A, each also with `norm="rmsnorm"`,
      random-ReLU features, a linear-attention projection or r independent outputs.
    operation: one of `available_operations(compiled.program)`.
    prompts: with `x_support [B,k,d]`, `y_support [B,k]` (`[B,k,r]`), `x_query [B,q,d]`.
    steps: CG steps (0-based) at which to remove it.
  """
  program = compiled.program
  ablation, damage = operation_ablation(program, operation, steps=steps)
  subject = probes.subject_from_compiled(compiled)
  dtype = checks.float_dtype(prompts.x_support, prompts.y_support, prompts.x_query)
  head_mask, layer_mask = masks(compiled.config, ablation, dtype)
  healthy = _predict_steps(subject, compiled, prompts, None, None)
  damaged = _predict_steps(subject, compiled, prompts, head_mask, layer_mask)
  ref_damaged = reference_predict(compiled, prompts, damage)
  ref_healthy = reference_predict(compiled, prompts, (HEALTHY,) * len(damage))
  oracle = _oracle(prompts, compiled.ridge, _kernel_of(compiled), compiled.kernel_features)
  return AblationReport(
      operation, ablation, damaged, healthy, ref_damaged, ref_healthy,
      match=_relative(damaged, ref_damaged), damage_size=_relative(damaged, healthy),
      mse_healthy=float(jnp.mean(jnp.square(healthy[:, -1] - oracle))),
      mse_damaged=float(jnp.mean(jnp.square(damaged[:, -1] - oracle))))


def _oracle(prompts: Any, ridge: float, kernel: Callable | None = None,
            features: Callable | None = None) -> Array:
  from kcg._src import solvers  # pylint: disable=g-import-not-at-top
  features = features or (lambda x: x)
  args = (features(prompts.x_support), prompts.y_support, features(prompts.x_query), ridge)
  if kernel is None:
    return solvers.krr_predict(*args)
  return solvers.krr_predict(*args, kernel=kernel)


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
    "ablate_compiled", "available_operations", "damaged_cg_predict", "damaged_chebyshev_predict",
    "damaged_pcg_predict", "degradation", "degradation_map", "find_heads", "find_layers", "masks",
    "operation_ablation", "reference_predict", "step_layers",
)
