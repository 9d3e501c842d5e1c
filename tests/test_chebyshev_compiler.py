"""compile_chebyshev: the division-free solver, coefficients baked into per-layer weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kcg
from kcg import problems
from kcg import solvers
from kcg._src import model as model_lib
from kcg._src import chebyshev_programs
from kcg._src import craft

CONSTRUCTIONS = [("dual", "prefix"), ("dual", "causal"), ("primal", "causal")]


def _system(phi, ridge, form):
  gram = phi @ phi.T if form == "dual" else phi.T @ phi
  return gram + ridge * np.eye(gram.shape[0])


def _reference(phi, y, query, ridge, num_steps, bounds, form):
  if form == "dual":
    return np.asarray(solvers.chebyshev_predict(phi, y, query, ridge, num_steps, eig_bounds=bounds))
  trace = solvers.chebyshev(_system(phi, ridge, form), phi.T @ y, num_steps, bounds)
  return np.asarray(trace.alpha) @ query.T


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
@pytest.mark.parametrize("case_index", [0, 5, 9, 13])
def test_matches_reference_chebyshev_every_step(case_index, form, mask):
  """Chebyshev's recurrence contracts by a fixed factor per step and involves no ratios of
  shrinking quantities, so float64 rounding stays at ~eps * kappa: tolerance 1e-12 * kappa."""
  case = problems.TEST_CASES[case_index]
  prob = case.problem(jnp.float64)
  phi, y, query = (np.asarray(a) for a in (prob.phi_support, prob.y_support, prob.phi_query))
  eigenvalues = np.linalg.eigvalsh(_system(phi, case.ridge, form))
  bounds = (eigenvalues[0], eigenvalues[-1])
  num_steps = 12
  compiled = kcg.compile_chebyshev(case.num_support, case.feature_dim, num_steps, case.ridge,
                                   eig_bounds=bounds, mask=mask, form=form)
  got = np.asarray(compiled.predict_steps(phi[None], y[None], query[None])[0])
  want = _reference(phi, y, query, case.ridge, num_steps, bounds, form)
  scale = max(np.abs(want).max(), 1e-300)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * case.condition_number * scale)


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


@pytest.mark.parametrize("form,mask", CONSTRUCTIONS)
def test_structure_and_no_leakage(form, mask):
  compiled = kcg.compile_chebyshev(5, 2, 3, 0.2, eig_bounds=(0.2, 9.0), mask=mask, form=form)
  own = nnx.state(model_lib.abstract_model(compiled.config), nnx.Param)
  chex.assert_trees_all_equal_shapes_and_dtypes(own, compiled.params)
  rng = np.random.default_rng(1)
  xs, ys = rng.normal(size=(1, 5, 2)), rng.normal(size=(1, 5))
  jacobian = jax.jacfwd(lambda xq: compiled.forward(xs, ys, xq, return_residuals=True)
                        .residuals[:, :, :6])(jnp.asarray(rng.normal(size=(1, 2, 2))))
  assert np.all(np.asarray(jacobian) == 0.0)


def test_bad_eig_bounds():
  for bounds in [(0.0, 1.0), (2.0, 1.0), (1.0, float("inf")), None, (1.0,)]:
    with pytest.raises(ValueError, match="eig_bounds"):
      kcg.compile_chebyshev(4, 2, 2, 0.1, eig_bounds=bounds)
  with pytest.raises(ValueError, match="ridge"):
    kcg.compile_chebyshev(4, 2, 2, 0.0, eig_bounds=(0.1, 1.0))
