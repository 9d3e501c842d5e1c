"""Typed identities of compiled programs: what a head, unit group or block does, and what was built.

Display names (`Head.name`, `Block.name`) are for people and may change; code that needs to know
what a piece of a program does (ablations, probes, rewrites of a program) reads these constants.
"""

from __future__ import annotations

import enum


class Op(enum.Enum):
  """What a head, a group of MLP units or a whole block (one layer) computes."""

  INIT = "init"  # the initial state: r = p = y, r = Phi^T y, R = P = Y
  FEATURES = "features"  # phi(x) from the raw inputs (the random-ReLU layer)
  MATVEC = "matvec"  # the kernel mat-vec: (Kp)_i, Kp = Phi u, Phi^T Phi p, softmax (K~ p)_i / Z_i
  MATVEC_U = "matvec_u"  # first half of the aggregator mat-vec, u = Phi^T p
  QUERY_MATVEC = "query_matvec"  # k(x_q) . p at queries, or the prediction update that reads it
  CURVATURE = "curvature"  # p . Kp at the aggregator (block CG: the Gram matrix P^T A P)
  RIDGE = "ridge"  # ridge p . p (dual) or ridge p (primal A p)
  PAP = "pap"  # the whole p . Ap in one reduction (primal; softmax sum_i p_i (Ap)_i)
  RESIDUAL_NORM = "residual_norm"  # r . r (PCG: r . z; softmax: r_i^2 and their sum)
  PROJECTION = "projection"  # block CG: P^T R and (AP)^T R
  GUESS = "guess"  # the ReLU initial guess of a reciprocal
  NEWTON = "newton"  # one Newton refinement x <- x (2 - s x) of a reciprocal
  NEWTON_SCHULZ = "newton_schulz"  # block CG: X <- c X (2 I - c G X)
  STEP_SIZE = "step_size"  # gamma = rho / pAp (block CG: Lambda = X P^T R)
  BETA = "beta"  # beta = rho_next / rho (block CG: Psi)
  UPDATE = "update"  # alpha += gamma p, r -= gamma A p, f += gamma k(x) . p
  DIRECTION = "direction"  # p = r + beta p (PCG: z + beta p)
  PRECONDITION = "precondition"  # Jacobi: d_i = phi_i . phi_i + ridge and z = r / d
  NORMALISER = "normaliser"  # softmax: 1/Z_i and its inverse
  BROADCAST = "broadcast"  # an aggregator scalar copied to every token
  GUARD = "guard"  # softmax breakdown guard, gamma *= [p.Ap > 0]
  MOVE = "move"  # bookkeeping: clear a channel, or move a value to another channel


class Construction(enum.Enum):
  """Which construction a program is (before any transform)."""

  SUPPORT_STATE = "support_state"  # dual CG, alpha_i, r_i, p_i in support token i (prefix mask)
  AGGREGATOR_DUAL = "aggregator_dual"  # dual CG, alpha, r, p in R^k in the aggregator
  AGGREGATOR_PRIMAL = "aggregator_primal"  # primal CG, w, r, p in R^p in the aggregator
  # The same three with the mat-vec carried across steps (Kp = K r + beta Kp_prev; carry_matvec).
  CARRIED_SUPPORT_STATE = "carried_support_state"
  CARRIED_AGGREGATOR_DUAL = "carried_aggregator_dual"
  CARRIED_AGGREGATOR_PRIMAL = "carried_aggregator_primal"
  JACOBI_SUPPORT_STATE = "jacobi_support_state"  # PCG, M = diag(K) + ridge I
  CHEBYSHEV_SUPPORT_STATE = "chebyshev_support_state"
  CHEBYSHEV_AGGREGATOR_DUAL = "chebyshev_aggregator_dual"
  CHEBYSHEV_AGGREGATOR_PRIMAL = "chebyshev_aggregator_primal"
  EXPONENTIAL_SUPPORT_STATE = "exponential_support_state"  # softmax Route A
  DOT_PRODUCT_SUPPORT_STATE = "dot_product_support_state"  # softmax Route B
  BLOCK_SUPPORT_STATE = "block_support_state"  # block CG, r outputs


class Transform(enum.Enum):
  """A rewrite applied to a construction (`Program.transforms`, in the order applied)."""

  OUTPUTS = "outputs"  # r independent right-hand sides (kcg._src.multi_output)
  RANDOM_RELU = "random_relu"  # a first layer computing random-ReLU features
  PROJECTION = "projection"  # the embedding writes S phi(x), S [m, p]
  NORM_PINS = "norm_pins"  # pinning channels for a pre-norm model
