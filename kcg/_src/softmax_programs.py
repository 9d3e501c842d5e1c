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

import numpy as np

from kcg._src import reciprocal as recip
from kcg._src.craft import Block, Head, ReluUnits, ResidualLayout, linear_units, product_units
from kcg._src.programs import (AGG, Program, StateLocation, _flag_channels, _flag_embedding,
                               _holders, _scalar_channels, _linear_from, product_units_from)

HARD = 80.0
ROLES = ("is_support", AGG, "is_query")


def _head(real_q, real_k, value, output, name, *, real_dims, idle_from, idle_to):
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
              name)


def _broadcast(value: str, output: str, name: str) -> Head:
  """Every token reads the aggregator's `value` (hard attention)."""
  return Head(tuple((r, np.array([[HARD]])) for r in ROLES), ((AGG, np.array([[1.0]])),),
              ((value, 1.0),), ((output, 1.0),), name)


def _sum_over_supports(value: str, output: str, num_support: int, name: str) -> Head:
  """The aggregator reads sum_j value_j over the supports (k times a hard uniform average);
  supports and queries read the aggregator, whose `value` is 0."""
  return _head(((AGG, np.array([[HARD]])),), (("is_support", np.array([[1.0]])),),
               ((value, 1.0),), ((output, float(num_support)),), name, real_dims=1,
               idle_from=("is_support", "is_query"), idle_to=(AGG,))


def _silencing_offset(spec) -> float:
  """A pre-activation offset that keeps a unit off at tokens whose flag is 0.

  There a channel holds only hard attention's leak, at most ~1e6 e^-80 times the largest value of
  the channel elsewhere (<= high); units read it with weights up to 1/low. 3.6e31 for both dtypes
  (their high/low is 1e60), so it fits float32.
  """
  return -2.0 * (1.0 + 1e6 * np.exp(-HARD) * spec.high / spec.low)


def _aggregator_relu(source: str, target: str, coef: float, offset: float, spec) -> ReluUnits:
  """target += relu(coef * source + offset) at the aggregator; exactly 0 at other tokens."""
  off = np.array([[_silencing_offset(spec)]])
  pre = ((source, np.array([[coef]])), (AGG, np.array([[offset]])),
         ("is_support", off), ("is_query", off))
  return ReluUnits(pre, ((target, np.ones((1, 1))),), f"relu({coef:g} {source} + {offset:g})")


def _token_newton_blocks(pairs, spec, prefix, extra_second=()):
  """Per token: x <- x (2 - s x) for each (s, x, scratch), two gated layers per step.

  `extra_second`: more units for the second layer of the first step."""
  blocks = []
  for i in range(spec.newton_steps):
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (s x)", units=tuple(
        product_units_from(s, x, [(scratch, 1.0)]) for s, x, scratch in pairs)))
    units = []
    for s, x, scratch in pairs:
      units += [product_units_from(x, scratch, [(x, -1.0)]), _linear_from(x, [(x, 1.0)]),
                _linear_from(scratch, [(scratch, -1.0)])]
    if i == 0:
      units += list(extra_second)
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (x (2 - s x))",
                        units=tuple(units)))
  return blocks


def _guess(source: str, target: str, flags, spec) -> ReluUnits:
  """Initial guess of 1/source at the tokens with one of `flags`; exactly 0 at every other token.

  Hard attention leaves ~e^-80 of other tokens' values in a token's channels, so `source` is only
  ~0 (1e-35, of either sign) where it should be 0; relu(-source / t_i) with 1/t_i up to 1e40 would
  turn that into up to 1e5 per unit. The other roles' flags push every unit's pre-activation far
  below 0 instead (`_silencing_offset`).
  """
  on_s, on_flag, post = recip.guess_units_matrices(spec)
  off = np.full((1, len(on_s)), _silencing_offset(spec))
  pre = ((source, on_s[None, :]),) + tuple((flag, on_flag[None, :]) for flag in flags) + tuple(
      (role, off) for role in ROLES if role not in flags)
  return ReluUnits(pre, ((target, post[:, None]),), f"guess 1/{source}")


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
                                (1.0,), 0.0, projection, spec, "exponential_support_state")


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
                                f"dot_product_support_state[{len(temperatures)} heads]")


def _softmax_support_state(num_support, feature_dim, num_steps, ridge, temperatures, coefficients,
                           subtract, projection, spec, name) -> Program:
  """(Kp)_i = sum_m c_m (K~_{tau_m} p)_i - subtract * sum_j p_j, then CG (see module docstring)."""
  k, p = num_support, feature_dim
  projection = np.asarray(projection, np.float64)
  m = projection.shape[0]
  h = len(temperatures)
  scalars = [n for n, _ in _scalar_channels()]
  per_temperature = [f"{base}_{i}" for i in range(h)
                     for base in ("Kp_raw", "kq_raw", "inv_Z", "Z", "Z_scratch")]
  per_token = (["alpha", "r", "p", "p_prev", "Kp", "kq_p", "f", "pAp_i", "rr_i", "gamma_local",
                "beta_local"] + per_temperature + (["p_sum_s", "p_sum_q"] if subtract else []))
  agg_scratch = ["pAp_scratch", "rr_scratch", "pAp_pos", "pAp_ok_a", "pAp_ok", "gamma_ungated"]
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1)]
                     + [(n, 1) for n in per_token] + [(n, 1) for n in scalars + agg_scratch]
                     + _flag_channels()),
      holders=_holders([("f", "queries"), ("kq_p", "queries"), ("p_sum_s", "supports"),
                        ("p_sum_q", "queries")][:None if subtract else -2]
                       + [(f"{base}_{i}", "supports and queries") for i in range(h)
                          for base in ("inv_Z", "Z", "Z_scratch")]
                       + [(f"kq_raw_{i}", "queries") for i in range(h)]
                       + [(n, "supports") for n in ("alpha", "r", "p", "p_prev", "Kp", "pAp_i",
                                                    "rr_i")]
                       + [(f"Kp_raw_{i}", "supports") for i in range(h)]
                       + [(n, "aggregator") for n in scalars + agg_scratch]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("y", "r", 1.0), ("y", "p", 1.0)] + _flag_embedding()
  k_map = projection.T

  def matvec(q_channel, value, output, idle_to, name, temperature):
    # q . k = <U phi_i, U phi_j> / tau
    idle_from = tuple(r for r in ROLES if r != ("is_support" if q_channel == "phi_support"
                                                else "is_query"))
    return _head(((q_channel, projection.T / temperature),), (("phi_support", k_map),),
                 ((value, 1.0),), ((output, 1.0),), name, real_dims=m, idle_from=idle_from,
                 idle_to=idle_to)

  init_heads, init_units = [], []
  for i, tau in enumerate(temperatures):
    init_heads += [matvec("phi_support", AGG, f"inv_Z_{i}", ("is_support",), f"1/Z_{i} at supports", tau),
                   matvec("phi_query", AGG, f"inv_Z_{i}", ("is_support",), f"1/Z_{i} at queries", tau)]
    init_units.append(_guess(f"inv_Z_{i}", f"Z_{i}", ("is_support", "is_query"), spec))
  init = [Block("init: 1/Z_i (sink heads)", heads=tuple(init_heads), units=tuple(init_units))]
  init += _token_newton_blocks([(f"inv_Z_{i}", f"Z_{i}", f"Z_scratch_{i}") for i in range(h)],
                               spec, "init: Z")
  init += [
      Block("init: r_i^2", units=(product_units_from("r", "r", [("rr_i", 1.0)]),)),
      Block("init: rr = sum r_i^2", heads=(_sum_over_supports("rr_i", "rr", k, "sum r_i^2"),),
            units=(_guess("rr", "inv_rr_next", (AGG,), spec),
                   _linear_from("rr_i", [("rr_i", -1.0)]))),
  ]

  matvec_heads, matvec_units = [], []
  for i, (tau, c) in enumerate(zip(temperatures, coefficients)):
    matvec_heads += [
        matvec("phi_support", "p", f"Kp_raw_{i}", (AGG,), f"sum_j e^(s_ij/tau_{i}) p_j / Z", tau),
        matvec("phi_query", "p", f"kq_raw_{i}", (AGG,), f"sum_j e^(s_qj/tau_{i}) p_j / Z", tau)]
    matvec_units += [
        product_units_from(f"Kp_raw_{i}", f"Z_{i}", [("Kp", c)]),
        product_units_from(f"kq_raw_{i}", f"Z_{i}", [("kq_p", c)]),
        _linear_from(f"Kp_raw_{i}", [(f"Kp_raw_{i}", -1.0)]),
        _linear_from(f"kq_raw_{i}", [(f"kq_raw_{i}", -1.0)])]
  if subtract:
    # One head per role, so that each role subtracts only from its own channel: a query also
    # reads itself, so any junk left in its support-only channels would reach its prediction.
    matvec_heads += [_sum_to_role("p", "p_sum_s", "is_support", k, "sum_j p_j at supports"),
                     _sum_to_role("p", "p_sum_q", "is_query", k, "sum_j p_j at queries")]
    matvec_units += [_linear_from("p_sum_s", [("p_sum_s", -1.0), ("Kp", -subtract)]),
                     _linear_from("p_sum_q", [("p_sum_q", -1.0), ("kq_p", -subtract)])]
  matvec_units += [
      _linear_from("gamma", [("gamma", -1.0)]),
      _linear_from("beta", [("beta", -1.0)]),
      _linear_from("inv_rr_next", [("inv_rr", 1.0), ("inv_rr_next", -1.0)]),
  ]

  def step():
    s = "softmax-cg"
    return [
        Block(f"{s} mat-vec (K~ p)_i / Z_i", heads=tuple(matvec_heads), units=tuple(matvec_units)),
        Block(f"{s} p_i (Ap)_i", units=(
            product_units_from("p", "Kp", [("pAp_i", 1.0)]),
            product_units_from("p", "p", [("pAp_i", ridge)]),
        )),
        Block(f"{s} pAp = sum_i p_i (Ap)_i", heads=(
            _sum_over_supports("pAp_i", "pAp", k, "sum p_i (Ap)_i"),),
            units=(_guess("pAp", "inv_pAp", (AGG,), spec), _linear_from("pAp_i", [("pAp_i", -1.0)]),
                   _aggregator_relu("pAp", "pAp_pos", 1.0, 0.0, spec),
                   _aggregator_relu("pAp", "pAp_ok_a", -1.0 / spec.low, 1.0, spec))),
        *_token_newton_blocks([("pAp_pos", "inv_pAp", "pAp_scratch"), ("rr", "inv_rr", "rr_scratch")],
                              spec, s, extra_second=(
                                  _aggregator_relu("pAp_ok_a", "pAp_ok", -1.0, 1.0, spec),
                                  _linear_from("pAp_ok_a", [("pAp_ok_a", -1.0)]))),
        Block(f"{s} gamma = rr / pAp", units=(
            product_units_from("rr", "inv_pAp", [("gamma_ungated", 1.0)]),
            _linear_from("pAp", [("pAp", -1.0)]),
            _linear_from("pAp_pos", [("pAp_pos", -1.0)]),
            _linear_from("inv_pAp", [("inv_pAp", -1.0)]),
        )),
        Block(f"{s} gamma *= [pAp > 0] (breakdown guard)", units=(
            product_units_from("gamma_ungated", "pAp_ok", [("gamma", 1.0)]),
            _linear_from("gamma_ungated", [("gamma_ungated", -1.0)]),
            _linear_from("pAp_ok", [("pAp_ok", -1.0)]),
        )),
        Block(f"{s} update alpha, r, f", heads=(_broadcast("gamma", "gamma_local", "gamma to all"),),
              units=(
                  product_units_from("gamma_local", "p", [("alpha", 1.0), ("r", -ridge)]),
                  product_units_from("gamma_local", "Kp", [("r", -1.0)]),
                  product_units_from("gamma_local", "kq_p", [("f", 1.0)]),
                  _linear_from("gamma_local", [("gamma_local", -1.0)]),
                  _linear_from("Kp", [("Kp", -1.0)]),
                  _linear_from("kq_p", [("kq_p", -1.0)]),
                  _linear_from("p", [("p_prev", 1.0), ("p", -1.0)]),
                  _linear_from("rr", [("rr", -1.0)]),
              )),
        Block(f"{s} r_i^2", units=(product_units_from("r", "r", [("rr_i", 1.0)]),)),
        Block(f"{s} rr_next = sum r_i^2", heads=(_sum_over_supports("rr_i", "rr_next", k, "sum r_i^2"),),
              units=(_guess("rr_next", "inv_rr_next", (AGG,), spec),
                     _linear_from("rr_i", [("rr_i", -1.0)]))),
        Block(f"{s} beta = rr_next / rr", units=(
            product_units_from("rr_next", "inv_rr", [("beta", 1.0)]),
            _linear_from("rr_next", [("rr", 1.0), ("rr_next", -1.0)]),
            _linear_from("inv_rr", [("inv_rr", -1.0)]),
        )),
        Block(f"{s} p = r + beta p", heads=(_broadcast("beta", "beta_local", "beta to all"),), units=(
            product_units_from("beta_local", "p_prev", [("p", 1.0)]),
            _linear_from("r", [("p", 1.0)]),
            _linear_from("p_prev", [("p_prev", -1.0)]),
            _linear_from("beta_local", [("beta_local", -1.0)]),
        )),
    ]

  from kcg._src.programs import _finish  # pylint: disable=g-import-not-at-top
  state = {"alpha": StateLocation("alpha", "support"), "r": StateLocation("r", "support"),
           "p": StateLocation("p", "support"), "gamma": StateLocation("gamma", "aggregator"),
           "beta": StateLocation("beta", "aggregator")}
  return _finish(name, layout, embedding, init, step, num_steps, state, spec)


def _sum_to_role(value: str, output: str, role: str, num_support: int, name: str) -> Head:
  """Tokens of `role` read sum_j value_j over the supports; the others read the aggregator (0)."""
  return _head(((role, np.array([[HARD]])),), (("is_support", np.array([[1.0]])),),
               ((value, 1.0),), ((output, float(num_support)),), name, real_dims=1,
               idle_from=tuple(r for r in ROLES if r != role), idle_to=(AGG,))
