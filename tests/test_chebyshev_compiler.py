"""compile_chebyshev: the division-free solver, coefficients baked into per-layer weights.

Matching the reference at every step, structure, no leakage and bad bounds run in the construction
table (tests/construction_table.py, entries "chebyshev/..."); here: one layer per step and the
state, the layer names, and the coefficients' residual polynomial.
"""

import numpy as np
import pytest

import kcg
from kcg import solvers
from kcg._src import chebyshev_programs
from kcg._src import craft

CONSTRUCTIONS = [("dual", "prefix"), ("dual", "causal"), ("primal", "causal")]


def _system(phi, ridge, form):
  gram = phi @ phi.T if form == "dual" else phi.T @ phi
  return gram + ridge * np.eye(gram.shape[0])


def test_layers_per_step_and_state():
  k, p, t = 8, 3, 6
  compiled = kcg.compile_chebyshev(k, p, t, 0.5, eig_bounds=(0.5, 20.0), mask="prefix")
  assert compiled.config.num_layers == t  # one layer per step, no init layer
  assert compiled.config.num_heads == 2
  rng = np.random.default_rng(0)
  phi, y, query = rng.normal(size=(k, p)), rng.normal(size=k), rng.normal(size=(2, p))
  state = compiled.read_state(compiled.forward(phi[None], y[None], query[None],
                                               return_residuals=True).residuals)
  trace = solvers.chebyshev(_system(phi, 0.5, "dual"), y, t, (0.5, 20.0))
  for name in ("alpha", "r", "p", "gamma", "beta"):
    np.testing.assert_allclose(np.asarray(getattr(state, name))[0], np.asarray(getattr(trace, name)),
                               rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_layer_names_count_steps(form):
  # Chebyshev lists every step's blocks separately; the step label must still advance.
  t = 4
  compiled = kcg.compile_chebyshev(5, 2, t, 0.2, eig_bounds=(0.2, 9.0), form=form)
  names = craft.layer_names(compiled.program)
  ends = compiled.program.step_ends
  for step in range(t):
    for layer in range(ends[step], ends[step + 1]):
      assert names[layer].startswith(f"step[{step}] "), (layer, names[layer])
  assert not any(n.startswith("step[") for n in names[:ends[0]])


def test_coefficients_give_the_chebyshev_residual_polynomial():
  """r_t = P_t(A) r_0 with P_t(lam) = T_t((theta - lam)/delta) / T_t(theta/delta)."""
  low, high, t = 0.3, 7.0, 5
  gammas, betas = chebyshev_programs.chebyshev_coefficients(low, high, t)
  lam = np.linspace(low, high, 7)
  residual, direction = np.ones_like(lam), np.ones_like(lam)
  for g, b in zip(gammas, betas):
    residual = residual - g * lam * direction
    direction = residual + b * direction
  theta, delta = (high + low) / 2, (high - low) / 2
  chebyshev_t = np.polynomial.chebyshev.Chebyshev.basis(t)
  np.testing.assert_allclose(residual, chebyshev_t((theta - lam) / delta) / chebyshev_t(theta / delta),
                             rtol=1e-12, atol=1e-14)
