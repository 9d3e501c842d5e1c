"""Block CG (O'Leary 1980) for r outputs: the reference `solvers.block_cg` and the compiled program.

Tolerances. Reference against Cholesky: after ceil(k/r) + 2 steps the error of X is at most
462 eps kappa |X*| (measured over 144 problems: 6 seeds, k in {8, 12, 16} with p >= k,
kappa in {10, 100}, r in {2, 3, 4}; finite precision needs the two extra steps, as CG does), so
1e3 eps kappa. The compiled program against the reference step by step runs in the construction
table (tests/test_matches_reference.py, entries "block/..."); here: its state and Newton-Schulz
inverse in named channels, rank-deficient targets, its size and its builder's checks. The
Newton-Schulz inverse reaches the rounding floor of the r x r inverse (~eps cond(S)) on full-rank
steps, and at a rank-deficient step goes a fraction ~ r * 1e4 * k eps of the way along the
rounding-level direction that the reference drops (measured 3e-12 relative, block_programs
docstring).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from kcg import kernels
from kcg import problems
from kcg._src import block_programs
from kcg._src import craft
from kcg._src import lowering
from kcg._src import prompt
from kcg._src import reciprocal as recip
from kcg._src import solvers

EPS64 = np.finfo(np.float64).eps
SPEC = recip.default_spec(np.float64)


def _problem(k, p, kappa, r, seed=0, num_query=3, ridge=0.1):
  prob = problems.krr_problem(jax.random.key(seed), num_support=k, feature_dim=p,
                              num_query=num_query, condition_number=kappa, ridge=ridge)
  y = np.random.default_rng(seed).normal(size=(k, r))
  return np.asarray(prob.phi_support), y, np.asarray(prob.phi_query), ridge


def _steps_to_converge(k, r):
  return -(-k // r)


# ---------------------------------------------------------------------------------------------
# Reference. One batch of problems per r (k = 12, p = 12) so that each r compiles once.

K_REF = 12
REF_KAPPAS = (10.0, 100.0, 100.0)


@functools.lru_cache(maxsize=None)
def _reference_batch(r):
  """K [3, 12, 12], Y [3, 12, r], the block CG trace for ceil(k/r) + 2 steps, Cholesky X*."""
  problems_ = [_problem(K_REF, K_REF, kappa, r, seed=10 * r + i)
               for i, kappa in enumerate(REF_KAPPAS)]
  ridge = problems_[0][3]
  k_matrices = np.stack([phi @ phi.T for phi, _, _, _ in problems_])
  ys = np.stack([y for _, y, _, _ in problems_])
  trace = solvers.block_cg(k_matrices, ys, ridge, _steps_to_converge(K_REF, r) + 2)
  x_star = np.stack([scipy.linalg.cho_solve(scipy.linalg.cho_factor(a + ridge * np.eye(K_REF)), y)
                     for a, y in zip(k_matrices, ys)])
  return k_matrices, ys, ridge, trace, x_star


@pytest.mark.parametrize("r", [2, 3, 4])
def test_reference_converges_to_cholesky_krr_in_about_k_over_r_steps(r):
  """Exact arithmetic: X_t = X* at t = ceil(k/r). Float64: at kappa = 10 the error there is
  <= 1e4 eps kappa (measured worst over 72 problems: 1e4 eps kappa = 2.2e-11; bound used
  5e-10), one step earlier it
  is still >= 1e-6; two steps later it is <= 1e3 eps kappa at kappa <= 100 (module docstring)."""
  _, _, _, trace, x_star = _reference_batch(r)
  steps = _steps_to_converge(K_REF, r)
  scale = np.abs(x_star).max(axis=(1, 2))
  err = np.abs(np.asarray(trace.alpha) - x_star[:, None]).max(axis=(2, 3)) / scale[:, None]
  assert err[0, steps] <= 5e-10 and err[0, steps - 1] >= 1e-6, err[0]
  assert np.all(err[:, -1] <= 1e3 * EPS64 * np.asarray(REF_KAPPAS)), err[:, -1]
  assert np.all(np.asarray(trace.rank)[:, :steps - 1] == r)
  assert trace.alpha.shape == (3, steps + 3, K_REF, r) and trace.gram.shape == (3, steps + 2, r, r)


def _oleary(a, y, num_steps):
  """Textbook block CG (O'Leary 1980, two r x r solves per step), NumPy."""
  x, r, p = np.zeros_like(y), y.copy(), y.copy()
  xs, lams, psis = [x], [], []
  for _ in range(num_steps):
    ap = a @ p
    rr = r.T @ r
    lam = np.linalg.solve(p.T @ ap, rr)
    x = x + p @ lam
    r_next = r - ap @ lam
    psi = np.linalg.solve(rr, r_next.T @ r_next)
    p = r_next + p @ psi
    r = r_next
    xs.append(x)
    lams.append(lam)
    psis.append(psi)
  return np.stack(xs), np.stack(lams), np.stack(psis)


@pytest.mark.parametrize("r", [2, 3])
def test_reference_matches_textbook_oleary(r):
  """One r x r inverse per step gives O'Leary's iterates; Lambda and Psi equal his.

  Compared while the residual is >= 1e-6 |Y| (later the two differ by rounding amplified as CG's
  do); rounding there is ~eps kappa per step: tolerance 1e-11 (kappa = 100).
  """
  k_matrices, ys, ridge, trace, _ = _reference_batch(r)
  a, y = k_matrices[1] + ridge * np.eye(K_REF), ys[1]
  res = np.linalg.norm(np.asarray(trace.r[1]), axis=(1, 2)) / np.linalg.norm(y)
  steps = int(np.sum(res >= 1e-6))
  xs, lams, psis = _oleary(a, y, steps)
  np.testing.assert_allclose(np.asarray(trace.alpha[1, :steps + 1]), xs, rtol=0,
                             atol=1e-11 * np.abs(xs).max())
  for s in range(steps):
    np.testing.assert_allclose(np.asarray(trace.gamma[1, s]), lams[s], rtol=0,
                               atol=1e-11 * np.abs(lams[s]).max())
    if res[s + 1] >= 1e-6:
      np.testing.assert_allclose(np.asarray(trace.beta[1, s]), psis[s], rtol=0,
                                 atol=1e-11 * np.abs(psis[s]).max())


def test_reference_with_one_output_is_cg():
  """r = 1: the same recurrences as kcg.solvers.cg up to rounding (G^{-1} P^T R vs r.r / p.Ap):
  <= 1e-12 relative while CG is far from rounding (kappa = 10, t <= k/2)."""
  k_matrices, ys, ridge, _, _ = _reference_batch(2)
  k_matrix, y = k_matrices[0], ys[0][:, :1]
  block = solvers.block_cg(k_matrix, y, ridge, 6)
  cg = solvers.cg(k_matrix + ridge * np.eye(K_REF), y[:, 0], 6)
  for name in ("alpha", "r", "p"):
    want = np.asarray(getattr(cg, name))
    np.testing.assert_allclose(np.asarray(getattr(block, name))[..., 0], want, rtol=0,
                               atol=1e-12 * np.abs(want).max(), err_msg=name)
  np.testing.assert_allclose(np.asarray(block.gamma)[:, 0, 0], np.asarray(cg.gamma), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(block.beta)[:, 0, 0], np.asarray(cg.beta), rtol=1e-10)


@pytest.mark.parametrize("kind", ["duplicate", "combination", "zero_column", "all_zero"])
def test_reference_rank_deficient_block_is_reported_not_nan(kind):
  """Dependent columns make G singular: the pseudo-inverse steps along the directions the block
  has (rank reported < r), every column still converges to its own KRR solution, nothing is NaN."""
  k = 8
  phi, y, _, ridge = _problem(k, k, 10.0, 2, seed=5)
  y = {"duplicate": np.stack([y[:, 0], y[:, 1], y[:, 0]], 1),
       "combination": np.stack([y[:, 0], y[:, 1], y[:, 0] - 2 * y[:, 1]], 1),
       "zero_column": np.stack([y[:, 0], np.zeros(k), y[:, 1]], 1),
       "all_zero": np.zeros((k, 3))}[kind]
  num_steps = k // 2 + 2  # the block has two independent columns: ceil(k / 2) steps, plus two
  trace = solvers.block_cg(phi @ phi.T, y, ridge, num_steps)
  for field in trace:
    assert np.all(np.isfinite(np.asarray(field)))
  want = np.linalg.solve(phi @ phi.T + ridge * np.eye(k), y)
  np.testing.assert_allclose(np.asarray(trace.alpha[-1]), want, rtol=0,
                             atol=1e3 * EPS64 * 10 * max(np.abs(want).max(), 1e-300))
  expected_rank = 0 if kind == "all_zero" else 2
  assert int(trace.rank[0]) == expected_rank
  if kind == "zero_column":
    assert np.all(np.asarray(trace.alpha)[:, :, 1] == 0)


def test_scaled_pseudo_inverse():
  pinv = jax.jit(solvers.scaled_pseudo_inverse)
  g = np.array([[4.0, 2.0], [2.0, 3.0]])
  inverse, rank = pinv(jnp.asarray(g), jnp.asarray(1e-8))
  np.testing.assert_allclose(np.asarray(inverse), np.linalg.inv(g), rtol=1e-14)
  assert int(rank) == 2
  singular = np.array([[1.0, 1.0], [1.0, 1.0]]) * 1e-30
  inverse, rank = pinv(jnp.asarray(singular), jnp.asarray(1e-8))
  assert int(rank) == 1
  np.testing.assert_allclose(singular @ np.asarray(inverse) @ singular, singular, rtol=0,
                             atol=1e-45)  # a generalised inverse: G G^- G = G
  inverse, rank = pinv(jnp.zeros((2, 2)), jnp.asarray(1e-8))
  assert int(rank) == 0 and np.all(np.asarray(inverse) == 0)


def test_reference_forms_batches_jit_and_dtype():
  phi, y, query, ridge = _problem(6, 4, 10.0, 2, seed=1)
  by_matrix = solvers.block_cg(phi @ phi.T, y, ridge, 3)
  by_features = solvers.block_cg(phi, y, ridge, 3, kernel=kernels.linear_kernel)
  np.testing.assert_allclose(np.asarray(by_features.alpha), np.asarray(by_matrix.alpha),
                             rtol=1e-13, atol=1e-14)
  batch = solvers.block_cg(np.stack([phi @ phi.T, 2 * phi @ phi.T]), np.stack([y, -y]),
                           np.array([ridge, 2 * ridge]), 3)
  assert batch.alpha.shape == (2, 4, 6, 2) and batch.gamma.shape == (2, 3, 2, 2)
  assert batch.rank.shape == (2, 3)
  np.testing.assert_allclose(np.asarray(batch.alpha[0]), np.asarray(by_matrix.alpha), rtol=1e-13)
  # Scaling K, Y, ridge by (2, -1, 2): X -> -X/2.
  np.testing.assert_allclose(np.asarray(batch.alpha[1]), -np.asarray(by_matrix.alpha) / 2,
                             rtol=1e-12, atol=1e-15)
  jitted = jax.jit(solvers.block_cg_predict, static_argnames="num_steps")
  got = np.asarray(jitted(phi, y, query, ridge, num_steps=3))
  assert got.shape == (4, query.shape[0], 2)
  np.testing.assert_allclose(got, np.einsum("qk,tkr->tqr", query @ phi.T, by_matrix.alpha),
                             rtol=1e-12, atol=1e-14)
  single = solvers.block_cg(np.float32(phi @ phi.T), np.float32(y), ridge, 2)
  assert single.alpha.dtype == jnp.float32 and single.gram.dtype == jnp.float32


class TestReferenceValueErrors:

  def setup_method(self):
    self.phi, self.y, self.query, self.ridge = _problem(4, 3, 10.0, 2)
    self.k_matrix = self.phi @ self.phi.T

  def test_targets_need_an_output_axis(self):
    with pytest.raises(ValueError, match=r"\[\.\.\., k, r\]"):
      solvers.block_cg(self.k_matrix, self.y[:, 0], self.ridge, 2)

  def test_zero_outputs(self):
    with pytest.raises(ValueError, match="r = 0"):
      solvers.block_cg(self.k_matrix, np.zeros((4, 0)), self.ridge, 2)

  def test_mismatched_rows(self):
    with pytest.raises(ValueError, match="support points"):
      solvers.block_cg(self.k_matrix, self.y[:3], self.ridge, 2)

  def test_non_square_kernel_matrix(self):
    with pytest.raises(ValueError, match="square"):
      solvers.block_cg(self.phi, self.y, self.ridge, 2)

  def test_ridge_steps_nan_rtol(self):
    with pytest.raises(ValueError, match="ridge"):
      solvers.block_cg(self.k_matrix, self.y, 0.0, 2)
    with pytest.raises(ValueError, match="num_steps"):
      solvers.block_cg(self.k_matrix, self.y, self.ridge, -1)
    bad = self.y.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
      solvers.block_cg(self.k_matrix, bad, self.ridge, 2)
    with pytest.raises(ValueError, match="rank_rtol"):
      solvers.block_cg(self.k_matrix, self.y, self.ridge, 2, rank_rtol=1.5)

  def test_predict_shapes(self):
    with pytest.raises(ValueError, match="feature dimension"):
      solvers.block_cg_predict(self.phi, self.y, self.query[:, :2], self.ridge, 2)


# ---------------------------------------------------------------------------------------------
# Compiled program.


@functools.lru_cache(maxsize=None)
def _compiled(k, p, r, num_steps, ridge, num_query=3):
  """The program and its model, built by the compiler's stages (lead: compile_cg will do this)."""
  program = block_programs.block_support_state(p, r, num_steps, ridge, SPEC)
  layout = prompt.make_layout(k, num_query, p, num_outputs=r)
  config = lowering.config_for_program(program, layout, "prefix", jnp.float64)
  assert config.output_dim == r and config.activation == "reglu"
  model = lowering.assemble(config, lowering.lower(program, layout, config), jnp.float64)
  return program, layout, nnx.split(model)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, tokens, num_prefix):
  return nnx.merge(graphdef, state)(tokens, num_prefix=num_prefix, return_residuals=True)


def _run(k, p, r, num_steps, phi, y, query, ridge):
  """(program, layout, model outputs, predictions [t+1, q, r] read at the step ends)."""
  program, layout, (graphdef, state) = _compiled(k, p, r, num_steps, ridge, query.shape[0])
  tokens = prompt.encode(layout, phi[None], y[None], query[None])
  out = _forward(graphdef, state, tokens, layout.num_prefix)
  steps = out.residuals[np.asarray(program.step_ends)][:, 0, layout.query_slice,
                                                       program.layout.slice(program.readout)]
  return program, layout, out, np.asarray(steps)


# (k, p, kappa, r): r = 3 does not divide k = 8, so the last step has a rank-deficient block.
COMPILED_CASES = [(8, 8, 10.0, 3), (12, 12, 100.0, 2)]


def test_compiled_state_and_inverse_in_named_channels():
  """X, R, P at the step ends equal the reference trace while the residual is large (rounding ~eps
  kappa per step, kappa = 100: 1e-10 relative); so do Lambda and Psi at steps whose scaled Gram
  D^{-1/2} G D^{-1/2} has condition <= 1e3 (elsewhere they amplify the ~1e-14 state difference by
  that condition; X, R, P are checked there anyway). The Newton-Schulz inverse reaches the rounding
  floor wherever the unit-diagonal Gram S = D^{-1/2} G D^{-1/2} has lambda_min(S) >= 1e-4 (the
  default assumption; here every step): ||I - D^{1/2} X G D^{-1/2}|| <= 10 eps cond(S)^2 (the
  exactly rounded inverse leaves ~eps cond(S); each iteration's rounding in X (2 I - G X) is
  amplified by up to cond(S) again). Measured: 3e-17 .. 4e-13 for cond(S) <= 300, 1.2e-9 at
  cond(S) = 1.3e4."""
  k, p, kappa, r = COMPILED_CASES[1]
  phi, y, query, ridge = _problem(k, p, kappa, r, seed=3)
  num_steps = _steps_to_converge(k, r) + 1
  program, _, out, _ = _run(k, p, r, num_steps, phi, y, query, ridge)
  state = block_programs.read_state(program, out.residuals, k)
  trace = solvers.block_cg(phi @ phi.T, y, ridge, num_steps)
  res = np.linalg.norm(np.asarray(trace.r), axis=(1, 2)) / np.linalg.norm(y)
  early = int(np.sum(res > 1e-4))
  for name in ("alpha", "r", "p"):
    want = np.asarray(getattr(trace, name))[:early]
    got = np.asarray(getattr(state, name))[0, :early]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max(), err_msg=name)
  grams, inverses = block_programs.read_inverses(program, out.residuals, k)
  checked = inverted = 0
  for s in range(num_steps):
    g_ref = np.asarray(trace.gram[s])
    d_ref = np.sqrt(np.diag(g_ref))
    eigenvalues = np.linalg.eigvalsh(g_ref / d_ref[:, None] / d_ref[None, :])
    if s < early and eigenvalues.max() <= 1e3 * eigenvalues.min():
      checked += 1
      for name in ("gamma", "beta"):
        want = np.asarray(getattr(trace, name))[s]
        np.testing.assert_allclose(np.asarray(getattr(state, name))[0, s], want, rtol=0,
                                   atol=1e-10 * np.abs(want).max(), err_msg=f"{name}[{s}]")
    if int(trace.rank[s]) == r and eigenvalues.min() >= 1 / block_programs.DEFAULT_GRAM_CONDITION:
      g, x = np.asarray(grams[0, s]), np.asarray(inverses[0, s])
      d = np.sqrt(np.diag(g))
      scaled = np.eye(r) - (x * d[:, None] * d[None, :]) @ (g / d[:, None] / d[None, :])
      condition = eigenvalues.max() / eigenvalues.min()
      assert np.abs(scaled).max() <= 10 * EPS64 * condition ** 2, (s, np.abs(scaled).max())
      inverted += 1
  assert checked >= 4 and inverted == num_steps


def test_compiled_rank_deficient_targets_stay_finite_and_converge():
  """Y = [y1, y2, y1]: G is singular at every step. Newton-Schulz does not invert the null
  direction (x_n(0) = 0); P annihilates it. The block has two directions per step, so
  ceil(8 / 2) = 4 steps converge in exact arithmetic. That last step's Gram is ill-conditioned (the
  residual is nearly spent) and 12 Newton-Schulz iterations invert scaled eigenvalues above ~2^-12
  only, so it is incomplete: measured over 24 seeds, max relative error 4.9e-9 after step 4,
  7.6e-11 after step 5 (median 7e-12), against 1e-14 for the reference's exact r x r solve. We
  check step 4 to 1e-7 and step 5 to 1e-9 (the margins ~20x and ~13x absorb CPU-dependent rounding:
  a 1e-10 bound at step 4 failed on an AVX-512 machine at 1.35x)."""
  k, p, kappa, r = COMPILED_CASES[0]
  phi, y, query, ridge = _problem(k, p, kappa, 2, seed=4)
  y = np.stack([y[:, 0], y[:, 1], y[:, 0]], 1)
  converge = -(-k // 2)
  _, _, out, got = _run(k, p, r, converge + 1, phi, y, query, ridge)
  assert np.all(np.isfinite(np.asarray(out.residuals)))
  krr = np.asarray(solvers.krr_predict(phi, y, query, ridge))
  np.testing.assert_allclose(got[converge], krr, rtol=0, atol=1e-7 * np.abs(krr).max())
  np.testing.assert_allclose(got[-1], krr, rtol=0, atol=1e-9 * np.abs(krr).max())
  np.testing.assert_allclose(got[-1][:, 0], got[-1][:, 2], rtol=0, atol=1e-14 * np.abs(krr).max())


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_dimensions_are_the_documented_functions(r):
  p, num_steps = 5, 3
  program = block_programs.block_support_state(p, r, num_steps, 0.1, SPEC)
  n = len(block_programs.newton_schulz_coefficients(r))
  assert n == (11 if r == 1 else 12)
  per_step = block_programs.layers_per_step(n)
  assert per_step == n + 6
  assert program.step_ends == tuple(1 + per_step * t for t in range(num_steps + 1))
  req = craft.requirements(program.layout, program.blocks)
  assert req.num_layers == 1 + per_step  # stored blocks: init + one step
  assert len(program.schedule) == 1 + num_steps * per_step
  assert req.num_heads == max(r * r, 2 * r, r + 2)
  assert program.layout.width == 2 * p + 8 * r + 7 * r * r + 3
  assert req.mlp_hidden == max(r * SPEC.num_units, 2 * r ** 3 + 4 * r * r)
  assert req.gated
  assert len(block_programs.inverse_ends(program)) == num_steps


def test_newton_schulz_coefficients_reach_eps_from_the_assumed_bounds():
  for r in (2, 4):
    for condition in (1e2, 1e4):
      low, high = 1 / (r * condition), 1 + SPEC.guess_error
      coefficients = block_programs.newton_schulz_coefficients(r, condition)
      for c in coefficients:
        assert c * high < 2  # every eigenvalue stays in (0, 2): no divergence
        low, high = c * low * (2 - c * low), 1.0
      assert 1 - low <= EPS64


class TestCompiledValueErrors:

  def test_builder_arguments(self):
    with pytest.raises(ValueError, match="num_outputs"):
      block_programs.block_support_state(3, 0, 2, 0.1, SPEC)
    with pytest.raises(ValueError, match="num_outputs"):
      block_programs.block_support_state(3, 2.5, 2, 0.1, SPEC)
    with pytest.raises(ValueError, match="feature_dim"):
      block_programs.block_support_state(0, 2, 2, 0.1, SPEC)
    with pytest.raises(ValueError, match="num_steps"):
      block_programs.block_support_state(3, 2, -1, 0.1, SPEC)
    with pytest.raises(ValueError, match="ridge"):
      block_programs.block_support_state(3, 2, 2, -0.1, SPEC)
    with pytest.raises(ValueError, match="newton_schulz"):
      block_programs.block_support_state(3, 2, 2, 0.1, SPEC, newton_schulz=())
    with pytest.raises(ValueError, match="newton_schulz"):
      block_programs.block_support_state(3, 2, 2, 0.1, SPEC, newton_schulz=(2.5,))

  def test_coefficient_arguments(self):
    with pytest.raises(ValueError, match="gram_condition"):
      block_programs.newton_schulz_coefficients(2, 0.5)
    with pytest.raises(ValueError, match="num_outputs"):
      block_programs.newton_schulz_coefficients(0)
