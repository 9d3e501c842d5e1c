"""CG for KRR with the exponential kernel in a softmax transformer (Route A, exact).

Kernel: K~_ij = exp(<U phi_i, U phi_j> / tau). Every head is a softmax head; every product is a
gated MLP unit (activation="reglu"). Per-support state (alpha_i, r_i, p_i in support token i),
prefix mask.

* Mat-vec. A head with scores s_ij = <U phi_i, U phi_j>/tau over the supports and the aggregator
  (key 0, so score 0, value 0: an attention sink) gives (K~ p)_i / Z_i with
  Z_i = 1 + sum_j exp(s_ij). A second head with the same scores and value 1 at the sink only gives
  1/Z_i. Z_i does not change across CG steps, so 1/(1/Z_i) is computed once (ReLU guess + Newton,
  per token) and each step multiplies by it: (K~ p)_i exactly, up to rounding.
* Reductions (r.r, p.Ap at the aggregator) and broadcasts (gamma, beta to every token) are hard
  attention: scores of +-`HARD` (80) put weight e^-80 ~ 1.8e-35 on the other tokens, below float64
  eps, and those tokens carry 0 in the head's value channels anyway.
* A softmax head cannot be silent: a token whose query is 0 averages every value it sees. So every
  head also gives the tokens it should not serve a query that hard-selects tokens whose value is 0
  (`idle` below); the real tokens' scores do not change because their idle query part is 0.

Per step: 18 layers (mat-vec, p.Ap, 4 Newton steps of 2 gated layers each, gamma, breakdown
guard, broadcast and update, r.r, beta, broadcast and direction). Init: 11 layers (1/Z, r.r).

Breakdown guard: with an approximate mat-vec (Route B) the operator is not positive definite at its
noise floor, so p.Ap can come out <= 0 once CG has converged. Newton then runs on relu(p.Ap) (it
cannot diverge) and gamma is multiplied by ok = relu(1 - relu(1 - p.Ap / low)), exactly 1 for
p.Ap >= low and exactly 0 for p.Ap <= 0: a breakdown freezes the iterate, as the reference CG does
when p.Ap = 0.
"""

from __future__ import annotations

import functools

import numpy as np

from kcg._src import blocks as B
from kcg._src import reciprocal as recip
from kcg._src.craft import (Block, Head, Program, ReluUnits, ResidualLayout, StateLocation,
                            linear_units, looped_program, product_units)
from kcg._src.ops import Construction, Op

AGG = B.AGGREGATOR
HARD = 80.0
ROLES = B.FLAGS


def _head(real_q, real_k, value, output, name, op, *, real_dims, idle_from, idle_to):
  """A softmax head: real part (dims 0..real_dims-1) plus the idle part (dim real_dims)."""
  dims = real_dims + 1

  def pad(terms, idle_flags, idle_coef):
    out = [(ch, np.pad(np.asarray(m, np.float64), ((0, 0), (0, dims - np.shape(m)[1]))))
           for ch, m in terms]
    for flag in idle_flags:
      column = np.zeros((1, dims))
      column[0, real_dims] = idle_coef
      out.append((flag, column))
    return tuple(out)

  return Head(pad(real_q, idle_from, HARD), pad(real_k, idle_to, 1.0), tuple(value), tuple(output),
              name, op)


def _broadcast(value: str, output: str, name: str) -> Head:
  """Every token reads the aggregator's `value` (hard attention)."""
  return Head(tuple((r, np.array([[HARD]])) for r in ROLES), ((AGG, np.array([[1.0]])),),
              ((value, 1.0),), ((output, 1.0),), name, Op.BROADCAST)


def _sum_over_supports(value: str, output: str, num_support: int, name: str, op: Op) -> Head:
  """The aggregator reads sum_j value_j over the supports (k times a hard uniform average);
  supports and queries read the aggregator, whose `value` is 0."""
  return _head(((AGG, np.array([[HARD]])),), (("is_support", np.array([[1.0]])),),
               ((value, 1.0),), ((output, float(num_support)),), name, op, real_dims=1,
               idle_from=("is_support", "is_query"), idle_to=(AGG,))


def _silencing_offset(spec) -> float:
  """A pre-activation offset that keeps a unit off at tokens whose flag is 0.

  There a channel holds only hard attention's leak, at most ~1e6 e^-80 times the largest value of
  the channel elsewhere (<= high); units read it with weights up to 1/low. 3.6e31 for both dtypes
  (their high/low is 1e60), so it fits float32.
  """
  return -2.0 * (1.0 + 1e6 * np.exp(-HARD) * spec.high / spec.low)


def _aggregator_relu(source: str, target: str, coef: float, offset: float, spec,
                     name: str) -> ReluUnits:
  """target += relu(coef * source + offset) at the aggregator; exactly 0 at other tokens."""
  off = np.array([[_silencing_offset(spec)]])
  pre = ((source, np.array([[coef]])), (AGG, np.array([[offset]])),
         ("is_support", off), ("is_query", off))
  return ReluUnits(pre, ((target, np.ones((1, 1))),), name, Op.GUARD)


def _guess(source: str, target: str, flags, spec) -> ReluUnits:
  """Initial guess of 1/source at the tokens with one of `flags`; exactly 0 at every other token.

  Hard attention leaves ~e^-80 of other tokens' values in a token's channels, so `source` is only
  ~0 (1e-35, of either sign) where it should be 0; relu(-source / t_i) with 1/t_i up to 1e40 would
  turn that into up to 1e5 per unit. The other roles' flags push every unit's pre-activation far
  below 0 instead (`_silencing_offset`).
  """
  return B.guess_units(source, target, spec, on=tuple(flags),
                       off=tuple(role for role in ROLES if role not in flags),
                       off_offset=_silencing_offset(spec))


def richardson_weights(temperatures) -> np.ndarray:
  """w with sum_m w_m g(tau_m) = s + O(tau^-h) for g(tau) = tau (e^{s/tau} - 1) = s + s^2/(2 tau) + ...

  Conditions: sum_m w_m = 1 and sum_m w_m tau_m^-j = 0 for j = 1 .. h-1 (a Vandermonde system).
  """
  inverse = 1.0 / np.asarray(temperatures, np.float64)
  h = len(inverse)
  system = np.stack([inverse ** j for j in range(h)])
  rhs = np.zeros(h)
  rhs[0] = 1.0
  return np.linalg.solve(system, rhs)


def exponential_support_state(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                              temperature: float, projection: np.ndarray,
                              spec: recip.ReciprocalSpec) -> Program:
  """Route A: dual CG on (K~ + ridge I) alpha = y, K~ the exponential kernel, softmax heads."""
  return _softmax_support_state(num_support, feature_dim, num_steps, ridge, (temperature,),
                                (1.0,), 0.0, projection, spec,
                                Construction.EXPONENTIAL_SUPPORT_STATE)


def dot_product_support_state(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                              temperatures, projection: np.ndarray,
                              spec: recip.ReciprocalSpec) -> Program:
  """Route B: dual CG on (K + ridge I) alpha = y, K = <U phi_i, U phi_j>, approximated by softmax.

  tau (e^{s/tau} - 1) = s + s^2/(2 tau) + ..., so with h heads at temperatures tau_m and
  Richardson weights w_m, sum_m w_m tau_m ((K~_{tau_m} p)_i - sum_j p_j) = (K p)_i + O(tau^-h):
  the mat-vec's truncation error falls like tau^-h while its cancellation error (subtracting
  sum_j p_j from e^{s/tau}-weighted sums ~ sum_j p_j) grows like eps tau.
  """
  temperatures = tuple(float(t) for t in temperatures)
  weights = richardson_weights(temperatures)
  coefficients = tuple(float(w * t) for w, t in zip(weights, temperatures))
  return _softmax_support_state(num_support, feature_dim, num_steps, ridge, temperatures,
                                coefficients, float(sum(coefficients)), projection, spec,
                                Construction.DOT_PRODUCT_SUPPORT_STATE)


def _softmax_support_state(num_support, feature_dim, num_steps, ridge, temperatures, coefficients,
                           subtract, projection, spec, construction) -> Program:
  """(Kp)_i = sum_m c_m (K~_{tau_m} p)_i - subtract * sum_j p_j, then CG (see module docstring)."""
  k, dim = num_support, feature_dim
  projection = np.asarray(projection, np.float64)
  m = projection.shape[0]
  h = len(temperatures)
  scalars = list(B.SCALARS)
  per_temperature = [f"{base}_{i}" for i in range(h)
                     for base in ("Kp_raw", "kq_raw", "inv_Z", "Z", "Z_scratch")]
  per_token = (["alpha", "r", "p", "p_prev", "Kp", "kq_p", "f", "pAp_i", "rr_i", "gamma_local",
                "beta_local"] + per_temperature + (["p_sum_s", "p_sum_q"] if subtract else []))
  agg_scratch = ["pAp_scratch", "rr_scratch", "pAp_pos", "pAp_ok_a", "pAp_ok", "gamma_ungated"]
  layout = ResidualLayout(
      channels=tuple([("phi_support", dim), ("phi_query", dim), ("y", 1)]
                     + [(n, 1) for n in per_token] + [(n, 1) for n in scalars + agg_scratch]
                     + B.flag_channels()),
      holders=B.holders([("f", "queries"), ("kq_p", "queries"), ("p_sum_s", "supports"),
                         ("p_sum_q", "queries")][:None if subtract else -2]
                        + [(f"{base}_{i}", "supports and queries") for i in range(h)
                           for base in ("inv_Z", "Z", "Z_scratch")]
                        + [(f"kq_raw_{i}", "queries") for i in range(h)]
                        + [(n, "supports") for n in ("alpha", "r", "p", "p_prev", "Kp", "pAp_i",
                                                     "rr_i")]
                        + [(f"Kp_raw_{i}", "supports") for i in range(h)]
                        + [(n, "aggregator") for n in scalars + agg_scratch]))
  embedding = B.feature_embedding() + [("y", "r", 1.0), ("y", "p", 1.0)]
  k_map = projection.T
  linear = functools.partial(linear_units, layout)
  product = functools.partial(product_units, layout)

  def matvec(q_channel, value, output, idle_to, name, temperature, op):
    # q . k = <U phi_i, U phi_j> / tau
    idle_from = tuple(r for r in ROLES if r != ("is_support" if q_channel == "phi_support"
                                                else "is_query"))
    return _head(((q_channel, projection.T / temperature),), (("phi_support", k_map),),
                 ((value, 1.0),), ((output, 1.0),), name, op, real_dims=m, idle_from=idle_from,
                 idle_to=idle_to)

  init_heads, init_units = [], []
  for i, tau in enumerate(temperatures):
    init_heads += [matvec("phi_support", AGG, f"inv_Z_{i}", ("is_support",),
                          f"1/Z_{i} at supports", tau, Op.NORMALISER),
                   matvec("phi_query", AGG, f"inv_Z_{i}", ("is_support",), f"1/Z_{i} at queries",
                          tau, Op.NORMALISER)]
    init_units.append(_guess(f"inv_Z_{i}", f"Z_{i}", ("is_support", "is_query"), spec))
  init = [Block("init: 1/Z_i (sink heads)", Op.NORMALISER, heads=tuple(init_heads),
                units=tuple(init_units))]
  init += B.token_newton_blocks(layout, [(f"inv_Z_{i}", f"Z_{i}", f"Z_scratch_{i}")
                                         for i in range(h)], spec, "init: Z")
  init += [
      Block("init: r_i^2", Op.INIT,
            units=(product("r", "r", [("rr_i", 1.0)], op=Op.RESIDUAL_NORM),)),
      Block("init: rr = sum r_i^2", Op.INIT,
            heads=(_sum_over_supports("rr_i", "rr", k, "sum r_i^2", Op.RESIDUAL_NORM),),
            units=(_guess("rr", "inv_rr_next", (AGG,), spec), linear("rr_i", [("rr_i", -1.0)]))),
  ]

  matvec_heads, matvec_units = [], []
  for i, (tau, c) in enumerate(zip(temperatures, coefficients)):
    matvec_heads += [
        matvec("phi_support", "p", f"Kp_raw_{i}", (AGG,), f"sum_j e^(s_ij/tau_{i}) p_j / Z", tau,
               Op.MATVEC),
        matvec("phi_query", "p", f"kq_raw_{i}", (AGG,), f"sum_j e^(s_qj/tau_{i}) p_j / Z", tau,
               Op.QUERY_MATVEC)]
    matvec_units += [
        product(f"Kp_raw_{i}", f"Z_{i}", [("Kp", c)], op=Op.MATVEC),
        product(f"kq_raw_{i}", f"Z_{i}", [("kq_p", c)], op=Op.QUERY_MATVEC),
        linear(f"Kp_raw_{i}", [(f"Kp_raw_{i}", -1.0)]),
        linear(f"kq_raw_{i}", [(f"kq_raw_{i}", -1.0)])]
  if subtract:
    # One head per role, so that each role subtracts only from its own channel: a query also
    # reads itself, so any junk left in its support-only channels would reach its prediction.
    matvec_heads += [_sum_to_role("p", "p_sum_s", "is_support", k, "sum_j p_j at supports",
                                  Op.MATVEC),
                     _sum_to_role("p", "p_sum_q", "is_query", k, "sum_j p_j at queries",
                                  Op.QUERY_MATVEC)]
    matvec_units += [linear("p_sum_s", [("p_sum_s", -1.0), ("Kp", -subtract)], op=Op.MATVEC),
                     linear("p_sum_q", [("p_sum_q", -1.0), ("kq_p", -subtract)],
                            op=Op.QUERY_MATVEC)]
  matvec_units += [
      linear("gamma", [("gamma", -1.0)]),
      linear("beta", [("beta", -1.0)]),
      linear("inv_rr_next", [("inv_rr", 1.0), ("inv_rr_next", -1.0)]),
  ]

  s = "softmax-cg"
  step = [
      Block(f"{s} mat-vec (K~ p)_i / Z_i", Op.MATVEC, heads=tuple(matvec_heads),
            units=tuple(matvec_units)),
      Block(f"{s} p_i (Ap)_i", Op.PAP, units=(
          product("p", "Kp", [("pAp_i", 1.0)], op=Op.CURVATURE),
          product("p", "p", [("pAp_i", ridge)], op=Op.RIDGE),
      )),
      Block(f"{s} pAp = sum_i p_i (Ap)_i", Op.PAP, heads=(
          _sum_over_supports("pAp_i", "pAp", k, "sum p_i (Ap)_i", Op.PAP),),
          units=(_guess("pAp", "inv_pAp", (AGG,), spec), linear("pAp_i", [("pAp_i", -1.0)]),
                 _aggregator_relu("pAp", "pAp_pos", 1.0, 0.0, spec, "relu(pAp)"),
                 _aggregator_relu("pAp", "pAp_ok_a", -1.0 / spec.low, 1.0, spec,
                                  "relu(1 - pAp / low)"))),
      *B.token_newton_blocks(layout, [("pAp_pos", "inv_pAp", "pAp_scratch"),
                                      ("rr", "inv_rr", "rr_scratch")], spec, s, extra_second=(
                                          _aggregator_relu("pAp_ok_a", "pAp_ok", -1.0, 1.0, spec,
                                                           "relu(1 - relu(1 - pAp / low))"),
                                          linear("pAp_ok_a", [("pAp_ok_a", -1.0)]))),
      Block(f"{s} gamma = rr / pAp", Op.STEP_SIZE, units=(
          product("rr", "inv_pAp", [("gamma_ungated", 1.0)], op=Op.STEP_SIZE),
          linear("pAp", [("pAp", -1.0)]),
          linear("pAp_pos", [("pAp_pos", -1.0)]),
          linear("inv_pAp", [("inv_pAp", -1.0)]),
      )),
      Block(f"{s} gamma *= [pAp > 0] (breakdown guard)", Op.GUARD, units=(
          product("gamma_ungated", "pAp_ok", [("gamma", 1.0)], op=Op.GUARD),
          linear("gamma_ungated", [("gamma_ungated", -1.0)]),
          linear("pAp_ok", [("pAp_ok", -1.0)]),
      )),
      Block(f"{s} update alpha, r, f", Op.UPDATE,
            heads=(_broadcast("gamma", "gamma_local", "gamma to all"),), units=(
                product("gamma_local", "p", [("alpha", 1.0), ("r", -ridge)], op=Op.UPDATE),
                product("gamma_local", "Kp", [("r", -1.0)], op=Op.UPDATE),
                product("gamma_local", "kq_p", [("f", 1.0)], op=Op.UPDATE),
                linear("gamma_local", [("gamma_local", -1.0)]),
                linear("Kp", [("Kp", -1.0)]),
                linear("kq_p", [("kq_p", -1.0)]),
                linear("p", [("p_prev", 1.0), ("p", -1.0)]),
                linear("rr", [("rr", -1.0)]),
            )),
      Block(f"{s} r_i^2", Op.RESIDUAL_NORM,
            units=(product("r", "r", [("rr_i", 1.0)], op=Op.RESIDUAL_NORM),)),
      Block(f"{s} rr_next = sum r_i^2", Op.RESIDUAL_NORM,
            heads=(_sum_over_supports("rr_i", "rr_next", k, "sum r_i^2", Op.RESIDUAL_NORM),),
            units=(_guess("rr_next", "inv_rr_next", (AGG,), spec),
                   linear("rr_i", [("rr_i", -1.0)]))),
      Block(f"{s} beta = rr_next / rr", Op.BETA, units=(
          product("rr_next", "inv_rr", [("beta", 1.0)], op=Op.BETA),
          linear("rr_next", [("rr", 1.0), ("rr_next", -1.0)]),
          linear("inv_rr", [("inv_rr", -1.0)]),
      )),
      Block(f"{s} p = r + beta p", Op.DIRECTION,
            heads=(_broadcast("beta", "beta_local", "beta to all"),), units=(
                product("beta_local", "p_prev", [("p", 1.0)], op=Op.DIRECTION),
                linear("r", [("p", 1.0)], op=Op.DIRECTION),
                linear("p_prev", [("p_prev", -1.0)]),
                linear("beta_local", [("beta_local", -1.0)]),
            )),
  ]
  state = {"alpha": StateLocation("alpha", "support"), "r": StateLocation("r", "support"),
           "p": StateLocation("p", "support"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  return looped_program(construction, layout, embedding, init, step, num_steps, state, spec)


def _sum_to_role(value: str, output: str, role: str, num_support: int, name: str, op: Op) -> Head:
  """Tokens of `role` read sum_j value_j over the supports; the others read the aggregator (0)."""
  return _head(((role, np.array([[HARD]])),), (("is_support", np.array([[1.0]])),),
               ((value, 1.0),), ((output, float(num_support)),), name, op, real_dims=1,
               idle_from=tuple(r for r in ROLES if r != role), idle_to=(AGG,))
