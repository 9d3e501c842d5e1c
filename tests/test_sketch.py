"""Width below the feature dimension: sketched KRR, its projections, its error bound, compiled models.

Tolerances (float64, eps = 2.2e-16).
* Reference vs scikit-learn / KRR on psi / full KRR at m = p: both sides are direct solves of a system
  with condition number <= ridge^-1 (||Psi||^2 + ridge) <= 1e3 here, so they agree to ~eps * 1e3 *
  (a few) relative; we allow 1e-11 relative (1e-12 for the m = p check, whose kappa <= 1e2).
* The bound is an inequality: measured <= bound (1 + 1e-9) + 1e-10 * max|f|. The absolute term covers
  problems where the sketch loses nothing (E = 0 up to rounding: both sides are rounding noise of size
  eps * kappa(K + ridge I) * |f| <= 2.2e-16 * 1e4 * |f|).
* Compiled vs reference: the compiled model runs CG to convergence (t = m primal, t = k dual) in
  float64 on systems with kappa <= ~50; CG's converged error is ~eps * kappa * (a few), so we allow
  1e-10 relative to max|f_m| (measured: <= 1e-14).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.kernel_ridge import KernelRidge

import kcg
from kcg import features
from kcg import problems
from kcg import sketch
from kcg import solvers
from kcg import tasks


def _random_problem(seed, batch, k, p, q, decay=1.0):
  rng = np.random.default_rng(seed)
  scale = decay ** np.arange(p)
  return (rng.standard_normal((batch, k, p)) * scale, rng.standard_normal((batch, k)),
          rng.standard_normal((batch, q, p)) * scale)


def _relative(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ----------------------------------------------------------------------------------------------------
# The reference.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, p, m", [(8, 6, 3), (4, 10, 7), (12, 12, 1)])  # primal and dual paths
def test_reference_equals_sklearn_and_krr_on_psi(k, p, m):
  phi, y, phi_q = _random_problem(k + p + m, 3, k, p, 5)
  ridge = 0.3
  s = np.asarray(sketch.gaussian_projection(jax.random.key(m), m, p))
  got = np.asarray(sketch.sketched_krr_predict(phi, y, phi_q, ridge, s))
  assert got.shape == (3, 5)
  psi, psi_q = phi @ s.T, phi_q @ s.T
  # KRR on psi (kcg's dual Cholesky) and scikit-learn with the sketched kernel K_m = Phi P Phi^T.
  np.testing.assert_allclose(got, solvers.krr_predict(psi, y, psi_q, ridge), rtol=0,
                             atol=1e-11 * np.max(np.abs(got)))
  projector = s.T @ s
  for b in range(3):
    model = KernelRidge(alpha=ridge, kernel="precomputed").fit(phi[b] @ projector @ phi[b].T, y[b])
    expected = model.predict(phi_q[b] @ projector @ phi[b].T)
    np.testing.assert_allclose(got[b], expected, rtol=0, atol=1e-11 * np.max(np.abs(got)))


def test_full_width_orthogonal_sketch_is_full_krr():
  phi, y, phi_q = _random_problem(0, 4, 9, 6, 3)
  full = solvers.krr_predict(phi, y, phi_q, 0.5)
  for s in (sketch.gaussian_projection(jax.random.key(1), 6, 6),
            sketch.principal_projection(6, features=phi)):
    assert _relative(sketch.sketched_krr_predict(phi, y, phi_q, 0.5, s), full) < 1e-12
    bound = sketch.sketch_error_bound(phi, y, phi_q, 0.5, s)
    assert float(np.max(np.asarray(bound.bound))) < 1e-12 * float(np.max(np.abs(full)))


def test_reference_under_jit_vmap_and_in_float32():
  phi, y, phi_q = _random_problem(1, 4, 6, 5, 2)
  s = sketch.gaussian_projection(jax.random.key(0), 3, 5)
  eager = np.asarray(sketch.sketched_krr_predict(phi, y, phi_q, 0.2, s))
  jitted = jax.jit(sketch.sketched_krr_predict)(phi, y, phi_q, 0.2, s)
  mapped = jax.vmap(sketch.sketched_krr_predict, in_axes=(0, 0, 0, None, None))(phi, y, phi_q, 0.2, s)
  np.testing.assert_allclose(jitted, eager, rtol=1e-13)
  np.testing.assert_allclose(mapped, eager, rtol=1e-13)
  bound = jax.jit(sketch.sketch_error_bound)(phi, y, phi_q, 0.2, s)
  assert bound.bound.shape == (4, 2) and bound.kernel_distance.shape == (4,)
  f32 = sketch.sketched_krr_predict(*(jnp.asarray(a, jnp.float32) for a in (phi, y, phi_q)), 0.2,
                                    jnp.asarray(s, jnp.float32))
  assert f32.dtype == jnp.float32
  # float32: eps 1.2e-7 times kappa <= ~1e2.
  np.testing.assert_allclose(f32, eager, atol=1e-4 * np.max(np.abs(eager)))
  # A per-prompt projection [B, m, p] broadcasts against the batch.
  per_prompt = sketch.prompt_projection(phi, 3)
  assert per_prompt.shape == (4, 3, 5)
  assert sketch.sketched_krr_predict(phi, y, phi_q, 0.2, per_prompt).shape == (4, 2)


# ----------------------------------------------------------------------------------------------------
# Projections and the three readings of E^2.
# ----------------------------------------------------------------------------------------------------


def test_projections_have_orthonormal_rows_and_span_the_right_subspace():
  p = 7
  rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((p, p)))
  mu = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.01])
  covariance = rotation @ np.diag(mu) @ rotation.T
  for m in (1, 3, p):
    for s in (sketch.principal_projection(m, covariance=covariance),
              sketch.gaussian_projection(jax.random.key(m), m, p)):
      s = np.asarray(s)
      assert s.shape == (m, p)
      np.testing.assert_allclose(s @ s.T, np.eye(m), atol=1e-13)
    top = np.asarray(sketch.principal_projection(m, covariance=covariance))
    np.testing.assert_allclose(top.T @ top, rotation[:, :m] @ rotation[:, :m].T, atol=1e-12)
  # From features: the pooled second moment F^T F / N of every leading axis.
  feats = np.random.default_rng(1).standard_normal((3, 50, p)) @ np.diag(np.sqrt(mu)) @ rotation.T
  pooled = feats.reshape(-1, p)
  from_features = np.asarray(sketch.principal_projection(2, features=feats))
  from_moment = np.asarray(sketch.principal_projection(2, covariance=pooled.T @ pooled / 150))
  np.testing.assert_allclose(from_features.T @ from_features, from_moment.T @ from_moment, atol=1e-12)
  assert sketch.gaussian_projection(jax.random.key(0), 2, p, np.dtype("float32")).dtype == jnp.float32
  # Same key, same projection.
  np.testing.assert_array_equal(sketch.gaussian_projection(jax.random.key(3), 2, p),
                                sketch.gaussian_projection(jax.random.key(3), 2, p))


def test_prompt_projection_gives_the_eigenvalue_tail_exactly():
  phi, _, _ = _random_problem(2, 5, 6, 9, 1)
  eig = np.linalg.eigvalsh(phi @ np.swapaxes(phi, 1, 2))[:, ::-1]  # descending, [B, k]
  for m in (1, 3, 5):
    e2 = np.asarray(sketch.kernel_distance(phi, sketch.prompt_projection(phi, m)))
    np.testing.assert_allclose(e2, eig[:, m], rtol=1e-10)  # lambda_{m+1}(K), 1-indexed
  # m >= rank(Phi) = k: nothing is lost.
  assert float(np.max(sketch.kernel_distance(phi, sketch.prompt_projection(phi, 6)))) < 1e-20


def test_spectral_tail_is_the_mean_frobenius_tail_and_exceeds_the_mean_E2():
  mu = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
  assert sketch.spectral_tail(mu[::-1], 2, 10) == pytest.approx(10 * (1 + 0.5 + 0.25 + 0.125))
  assert sketch.spectral_tail(mu, 6, 10) == 0.0
  # Monte Carlo over 4000 prompts: E||Phi (I-P)||_F^2 = k sum_{i>m} mu_i (std error ~0.3% here).
  k, m = 10, 2
  phi = np.random.default_rng(3).standard_normal((4000, k, 6)) * np.sqrt(mu)
  s = np.asarray(sketch.principal_projection(m, covariance=np.diag(mu)))
  tail = sketch.spectral_tail(mu, m, k)
  frobenius = np.sum((phi - phi @ s.T @ s) ** 2, axis=(1, 2))
  assert np.mean(frobenius) == pytest.approx(tail, rel=0.02)
  assert float(np.mean(sketch.kernel_distance(phi, s))) <= tail


# ----------------------------------------------------------------------------------------------------
# The bound.
# ----------------------------------------------------------------------------------------------------


def _check_bound(phi, y, phi_q, ridge, s, kernel_distance=None):
  """Asserts measured <= sharp <= bound; returns measured / bound per query (NaN where the bound is
  at rounding level, below 1e-8 max|f|: nothing is lost there and the ratio is noise over noise)."""
  f = np.asarray(solvers.krr_predict(phi, y, phi_q, ridge))
  measured = np.abs(f - np.asarray(sketch.sketched_krr_predict(phi, y, phi_q, ridge, s)))
  b = sketch.sketch_error_bound(phi, y, phi_q, ridge, s)
  bound, sharp = np.asarray(b.bound), np.asarray(b.sharp)
  slack = 1e-10 * np.max(np.abs(f))
  assert np.all(measured <= sharp * (1 + 1e-9) + slack)
  assert np.all(sharp <= bound * (1 + 1e-9) + slack)
  resolved = bound > 1e-8 * np.max(np.abs(f))
  return np.where(resolved, measured / np.where(resolved, bound, 1.0), np.nan), bound


def test_bound_holds_on_random_problems():
  ratios, num_problems = [], 0
  # 128 problems with a prescribed condition number (kcg.problems): pooled principal, Gaussian and
  # per-prompt sketches. Two shapes only (each shape and width compiles the references once).
  p = 12
  for i, (k, kappa, ridge) in enumerate([(8, 10.0, 0.1), (16, 1e4, 0.01), (8, 100.0, 1.0),
                                         (16, 1e3, 0.1)]):
    prob = problems.batched_krr_problem(jax.random.key(i), 32, num_support=k, feature_dim=p,
                                        num_query=4, condition_number=kappa, ridge=ridge)
    num_problems += 32
    for m in (1, 4, 11):
      for s in (sketch.principal_projection(m, features=prob.phi_support),
                sketch.gaussian_projection(jax.random.key(100 + m), m, p),
                sketch.prompt_projection(prob.phi_support, m)):
        ratios.append(_check_bound(prob.phi_support, prob.y_support, prob.phi_query, ridge, s)[0])
  # 96 prompts with a controlled input spectrum (kcg.tasks): the population principal sketch.
  for cond, k, ridge in ((10.0, 8, 1.0), (100.0, 16, 0.1), (1e4, 16, 1e-3)):
    config = tasks.TaskConfig(family="linear_anisotropic", input_dim=12, num_support=k, num_query=4,
                              batch_size=32, condition_number=cond, input_rotation="none")
    prompts = tasks.sample(jax.random.key(int(cond)), config)
    mu = tasks.input_covariance_eigenvalues(config)
    num_problems += 32
    for m in (1, 4, 11):
      s = sketch.principal_projection(m, covariance=np.diag(mu))
      ratios.append(_check_bound(prompts.x_support, prompts.y_support, prompts.x_query, ridge, s)[0])
  assert num_problems >= 200
  worst = max(float(np.nanmax(r)) for r in ratios if np.any(np.isfinite(r)))
  assert worst <= 1.0  # measured: 0.59 (largest over 5504 resolved queries; median 3e-3)


def test_bound_is_attained():
  # One support (k = 1) and the query x = (I-P) phi_1: f_m(x) = 0, f(x) = x^T (I-P) w with
  # (I-P) w = alpha (I-P) phi_1 parallel to x, so both Cauchy-Schwarz steps are equalities and
  # measured / bound = 1 (to rounding).
  rng = np.random.default_rng(4)
  p, m = 6, 2
  s = np.asarray(sketch.gaussian_projection(jax.random.key(0), m, p))
  phi = rng.standard_normal((16, 1, p))
  perp = phi - phi @ s.T @ s
  ratio, _ = _check_bound(phi, rng.standard_normal((16, 1)), perp, 0.3, s)
  np.testing.assert_allclose(ratio, 1.0, rtol=1e-10)
  # A natural family: few supports and a large ridge on the task ladder (measured: 0.47).
  config = tasks.TaskConfig(family="linear_anisotropic", input_dim=16, num_support=4, num_query=8,
                            batch_size=32, condition_number=10.0, input_rotation="none")
  prompts = tasks.sample(jax.random.key(1), config)
  s = sketch.principal_projection(2, covariance=np.diag(tasks.input_covariance_eigenvalues(config)))
  ratio, _ = _check_bound(prompts.x_support, prompts.y_support, prompts.x_query, 1.0, s)
  assert float(np.nanmax(ratio)) > 0.3


def test_tail_estimate_uses_the_given_kernel_distance():
  phi, y, phi_q = _random_problem(5, 3, 8, 6, 2, decay=0.6)
  s = sketch.principal_projection(2, covariance=np.diag(0.36 ** np.arange(6)))
  own = sketch.sketch_error_bound(phi, y, phi_q, 0.1, s)
  same = sketch.sketch_error_bound(phi, y, phi_q, 0.1, s, kernel_distance=own.kernel_distance)
  np.testing.assert_allclose(same.bound, own.bound, rtol=1e-14)
  tail = sketch.spectral_tail(0.36 ** np.arange(6), 2, 8)
  estimate = sketch.sketch_error_bound(phi, y, phi_q, 0.1, s, kernel_distance=tail)
  np.testing.assert_allclose(estimate.kernel_distance, np.full(3, tail))


# ----------------------------------------------------------------------------------------------------
# Every check fires.
# ----------------------------------------------------------------------------------------------------


def test_every_value_error_fires():
  phi, y, phi_q = _random_problem(6, 2, 5, 4, 2)
  s = np.asarray(sketch.gaussian_projection(jax.random.key(0), 2, 4))
  key = jax.random.key(0)
  cases = [
      (lambda: sketch.principal_projection(0, covariance=np.eye(4)), "rank must be an int in"),
      (lambda: sketch.principal_projection(5, covariance=np.eye(4)), "rank must be an int in"),
      (lambda: sketch.principal_projection(True, covariance=np.eye(4)), "rank must be an int in"),
      (lambda: sketch.principal_projection(2), "exactly one of"),
      (lambda: sketch.principal_projection(2, features=phi, covariance=np.eye(4)), "exactly one of"),
      (lambda: sketch.principal_projection(2, covariance=np.ones((4, 3))), "square"),
      (lambda: sketch.principal_projection(2, covariance=np.triu(np.ones((4, 4)))), "symmetric"),
      (lambda: sketch.principal_projection(2, covariance=np.full((4, 4), np.nan)), "NaN or Inf"),
      (lambda: sketch.principal_projection(2, features=np.ones(4)), "at least 2 dimensions"),
      (lambda: sketch.gaussian_projection(key, 5, 4), "rank must be an int in"),
      (lambda: sketch.gaussian_projection(key, 1, 0), "dim must be"),
      (lambda: sketch.gaussian_projection(key, 1, 4, jnp.int32), "floating dtype"),
      (lambda: sketch.prompt_projection(phi, 9), "rank must be an int in"),
      (lambda: sketch.sketched_krr_predict(phi, y[:, :-1], phi_q, 0.1, s), "same k and p"),
      (lambda: sketch.sketched_krr_predict(phi, y, phi_q[..., :-1], 0.1, s), "same k and p"),
      (lambda: sketch.sketched_krr_predict(phi, y, phi_q, 0.1, s[:, :-1]), "same k and p"),
      (lambda: sketch.sketched_krr_predict(phi, y, phi_q, 0.1, np.eye(5, 4)), "1 <= m <= p"),
      (lambda: sketch.sketched_krr_predict(phi, y, phi_q, 0.0, s), "ridge must be finite and > 0"),
      (lambda: sketch.sketched_krr_predict(phi, y, phi_q, np.ones(2), s), "ridge must be a scalar"),
      (lambda: sketch.sketched_krr_predict(phi, y * np.nan, phi_q, 0.1, s), "NaN or Inf"),
      (lambda: sketch.sketched_krr_predict(phi, y, phi_q, 0.1, np.ones((3, 2, 4))), "do not broadcast"),
      (lambda: sketch.sketch_error_bound(phi, y, phi_q, 0.1, 2 * s), "orthonormal rows"),
      (lambda: sketch.sketch_error_bound(phi, y, phi_q, 0.1, s, kernel_distance=-1.0), ">= 0"),
      (lambda: sketch.sketch_error_bound(phi, y, phi_q, 0.1, s, kernel_distance=np.ones(3)),
       "broadcast to the batch"),
      (lambda: sketch.kernel_distance(phi, s[:, :-1]), "same p"),
      (lambda: sketch.kernel_distance(phi, 2 * s), "orthonormal rows"),
      (lambda: sketch.spectral_tail(np.ones((2, 2)), 1, 4), "finite 1-d"),
      (lambda: sketch.spectral_tail(np.array([1.0, -1.0]), 1, 4), ">= 0"),
      (lambda: sketch.spectral_tail(np.ones(3), 4, 4), "rank must be an int in"),
      (lambda: sketch.spectral_tail(np.ones(3), 1, 0), "num_support must be"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()


# ----------------------------------------------------------------------------------------------------
# Compiled width-m models.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, p, m, form, mask", [
    (6, 8, 3, "dual", "prefix"), (6, 8, 3, "dual", "causal"), (6, 8, 3, "primal", "prefix"),
    (6, 8, 3, "primal", "causal"), (4, 10, 6, "dual", "prefix"), (4, 10, 6, "primal", "causal"),
])
def test_compiled_width_m_model_is_sketched_krr(k, p, m, form, mask):
  prob = problems.batched_krr_problem(jax.random.key(k * m), 3, num_support=k, feature_dim=p,
                                      num_query=2, condition_number=30.0, ridge=0.5)
  phi, y, phi_q = (np.asarray(a) for a in prob[:3])
  s = np.asarray(sketch.gaussian_projection(jax.random.key(p), m, p))
  num_steps = m if form == "primal" else k  # CG converges in <= n steps on an n x n system
  compiled = kcg.compile_cg(k, p, num_steps, 0.5, mask=mask, form=form, projection=s)
  reference = sketch.sketched_krr_predict(phi, y, phi_q, 0.5, s)
  assert _relative(compiled.predict(phi, y, phi_q), reference) < 1e-10
  width = compiled.dimensions.width
  assert width == kcg.dimensions(k, m, num_steps, mask=mask, form=form).width
  assert width < kcg.dimensions(k, p, num_steps, mask=mask, form=form).width


def test_compiled_random_relu_features_with_projection():
  k, d, num_features, m = 6, 3, 10, 4
  params = features.random_relu(num_features).init(jax.random.key(0), d)
  rng = np.random.default_rng(7)
  x, y, x_q = rng.standard_normal((3, k, d)), rng.standard_normal((3, k)), rng.standard_normal((3, 2, d))
  feature_map = features.random_relu(num_features)
  phi, phi_q = feature_map.apply(params, x), feature_map.apply(params, x_q)
  s = sketch.principal_projection(m, features=phi)
  compiled = kcg.compile_cg(k, num_features, m, 0.5, mask="prefix", form="primal",
                            features="random_relu", feature_params=params, projection=s)
  reference = sketch.sketched_krr_predict(phi, y, phi_q, 0.5, s)
  assert _relative(compiled.predict(x, y, x_q), reference) < 1e-10
  full = kcg.compile_cg(k, num_features, m, 0.5, mask="prefix", form="primal",
                        features="random_relu", feature_params=params)
  assert compiled.dimensions.width < full.dimensions.width
