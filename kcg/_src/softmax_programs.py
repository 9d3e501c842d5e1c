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

Per step: 17 layers (mat-vec, p.Ap, 4 Newton steps of 2 gated layers each, gamma, broadcast and
update, r.r, beta, broadcast and direction). Init: 11 layers (1/Z by Newton, r.r).
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


def _token_newton_blocks(pairs, spec, prefix):
  """Per token: x <- x (2 - s x) for each (s, x, scratch), two gated layers per step."""
  blocks = []
  for i in range(spec.newton_steps):
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (s x)", units=tuple(
        product_units_from(s, x, [(scratch, 1.0)]) for s, x, scratch in pairs)))
    units = []
    for s, x, scratch in pairs:
      units += [product_units_from(x, scratch, [(x, -1.0)]), _linear_from(x, [(x, 1.0)]),
                _linear_from(scratch, [(scratch, -1.0)])]
    blocks.append(Block(f"{prefix} newton {i + 1}/{spec.newton_steps} (x (2 - s x))",
                        units=tuple(units)))
  return blocks


def _guess(source: str, target: str, flags, spec) -> ReluUnits:
  on_s, on_flag, post = recip.guess_units_matrices(spec)
  pre = ((source, on_s[None, :]),) + tuple((flag, on_flag[None, :]) for flag in flags)
  return ReluUnits(pre, ((target, post[:, None]),), f"guess 1/{source}")


def exponential_support_state(num_support: int, feature_dim: int, num_steps: int, ridge: float,
                              temperature: float, projection: np.ndarray,
                              spec: recip.ReciprocalSpec) -> Program:
  """Route A: dual CG on (K~ + ridge I) alpha = y, K~ the exponential kernel, softmax heads."""
  k, p = num_support, feature_dim
  projection = np.asarray(projection, np.float64)
  m = projection.shape[0]
  scalars = [n for n, _ in _scalar_channels()]
  per_token = ["alpha", "r", "p", "p_prev", "Kp_raw", "Kp", "kq_raw", "kq_p", "f", "inv_Z", "Z",
               "Z_scratch", "pAp_i", "rr_i", "gamma_local", "beta_local"]
  agg_scratch = ["pAp_scratch", "rr_scratch"]
  layout = ResidualLayout(
      channels=tuple([("phi_support", p), ("phi_query", p), ("y", 1)]
                     + [(n, 1) for n in per_token] + [(n, 1) for n in scalars + agg_scratch]
                     + _flag_channels()),
      holders=_holders([("phi_support", "supports"), ("phi_query", "queries"), ("y", "supports"),
                        ("f", "queries"), ("kq_raw", "queries"), ("kq_p", "queries"),
                        ("Z", "supports and queries"), ("inv_Z", "supports and queries")]
                       + [(n, "supports") for n in ("alpha", "r", "p", "p_prev", "Kp_raw", "Kp",
                                                    "pAp_i", "rr_i")]
                       + [(n, "aggregator") for n in scalars + agg_scratch]))
  embedding = [("x_support", "phi_support", 1.0), ("x_query", "phi_query", 1.0), ("y", "y", 1.0),
               ("y", "r", 1.0), ("y", "p", 1.0)] + _flag_embedding()
  q_map = projection.T / temperature  # q . k = <U phi_i, U phi_j> / tau
  k_map = projection.T

  def matvec(q_channel, value, output, idle_to, name):
    idle_from = tuple(r for r in ROLES if r != ("is_support" if q_channel == "phi_support"
                                                else "is_query"))
    return _head(((q_channel, q_map),), (("phi_support", k_map),), ((value, 1.0),),
                 ((output, 1.0),), name, real_dims=m, idle_from=idle_from, idle_to=idle_to)

  init = [Block("init: 1/Z_i (sink head)", heads=(
      matvec("phi_support", AGG, "inv_Z", ("is_support",), "1/Z at supports"),
      matvec("phi_query", AGG, "inv_Z", ("is_support",), "1/Z at queries"),
  ), units=(_guess("inv_Z", "Z", ("is_support", "is_query"), spec),))]
  init += _token_newton_blocks([("inv_Z", "Z", "Z_scratch")], spec, "init: Z")
  init += [
      Block("init: r_i^2", units=(product_units_from("r", "r", [("rr_i", 1.0)]),)),
      Block("init: rr = sum r_i^2", heads=(_sum_over_supports("rr_i", "rr", k, "sum r_i^2"),),
            units=(_guess("rr", "inv_rr_next", (AGG,), spec),
                   _linear_from("rr_i", [("rr_i", -1.0)]))),
  ]

  def step():
    s = "exp-cg"
    return [
        Block(f"{s} mat-vec (K~ p)_i / Z_i", heads=(
            matvec("phi_support", "p", "Kp_raw", (AGG,), "sum_j e^{s_ij} p_j / Z_i"),
            matvec("phi_query", "p", "kq_raw", (AGG,), "sum_j e^{s_qj} p_j / Z_q"),
        ), units=(
            product_units_from("Kp_raw", "Z", [("Kp", 1.0)]),
            product_units_from("kq_raw", "Z", [("kq_p", 1.0)]),
            _linear_from("Kp_raw", [("Kp_raw", -1.0)]),
            _linear_from("kq_raw", [("kq_raw", -1.0)]),
            _linear_from("gamma", [("gamma", -1.0)]),
            _linear_from("beta", [("beta", -1.0)]),
            _linear_from("inv_rr_next", [("inv_rr", 1.0), ("inv_rr_next", -1.0)]),
        )),
        Block(f"{s} p_i (Ap)_i", units=(
            product_units_from("p", "Kp", [("pAp_i", 1.0)]),
            product_units_from("p", "p", [("pAp_i", ridge)]),
        )),
        Block(f"{s} pAp = sum_i p_i (Ap)_i", heads=(
            _sum_over_supports("pAp_i", "pAp", k, "sum p_i (Ap)_i"),),
            units=(_guess("pAp", "inv_pAp", (AGG,), spec), _linear_from("pAp_i", [("pAp_i", -1.0)]))),
        *_token_newton_blocks([("pAp", "inv_pAp", "pAp_scratch"), ("rr", "inv_rr", "rr_scratch")],
                              spec, s),
        Block(f"{s} gamma = rr / pAp", units=(
            product_units_from("rr", "inv_pAp", [("gamma", 1.0)]),
            _linear_from("pAp", [("pAp", -1.0)]),
            _linear_from("inv_pAp", [("inv_pAp", -1.0)]),
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
  return _finish("exponential_support_state", layout, embedding, init, step, num_steps, state, spec)
