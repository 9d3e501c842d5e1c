"""Tests for kcg.tasks: shapes and dtypes of every family, determinism, the maths of each family and shift,
jit/vmap, and that every config check fires.

Each distinct `TaskConfig` costs one XLA compilation (about a second on CPU), so the tests share a few
configs: `FAMILY_CONFIGS` has one per family and the shift tests reuse the linear one.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kcg import tasks

B, K, Q, D = 8, 12, 4, 4
MULTI = 2


def _family_config(family):
  outputs = 1 if family in ("logistic", "poisson") else MULTI
  return tasks.TaskConfig(
      family=family, input_dim=D, num_support=K, num_query=Q, batch_size=B, num_outputs=outputs
  )


FAMILY_CONFIGS = {family: _family_config(family) for family in tasks.FAMILIES}
LINEAR = FAMILY_CONFIGS["linear"]
NOISELESS = ("linear", "linear_anisotropic", "sparse_linear", "mixture_linear", "relu_network",
             "kernel_prior", "relu_features")
EPS64 = float(np.finfo(np.float64).eps)


def _shift_config(kind, **knobs):
  return tasks.with_shift(LINEAR, kind, **knobs)


ORTHOGONAL_QUERY = tasks.with_shift(dataclasses.replace(LINEAR, num_support=D - 1),
                                    "orthogonal_query")
FIXED_ROTATION = tasks.TaskConfig(family="linear_anisotropic", input_dim=D, num_support=60,
                                  num_query=4, batch_size=64, condition_number=30.0,
                                  input_rotation="fixed")
HETEROSKEDASTIC_1D = tasks.TaskConfig(family="heteroskedastic", input_dim=2, num_support=20_000,
                                      num_query=1, batch_size=1, noise_std=0.3)
MIXTURE_PER_PROMPT = dataclasses.replace(FAMILY_CONFIGS["mixture_linear"], mixture_mode="per_prompt",
                                         batch_size=16)
LOGISTIC_MEAN = dataclasses.replace(FAMILY_CONFIGS["logistic"], glm_targets="mean")
RELU_SCALED = tasks.with_shift(FAMILY_CONFIGS["relu_network"], "scaled_inputs", shift_scale=2.0)

# Every (config, seed) the fast tests sample. Sampled one by one, each config costs an XLA compilation
# of about a second; compiled together as one program they take about half the CPU time.
_PRESAMPLED = (
    [(config, 0) for config in FAMILY_CONFIGS.values()]
    + [(FIXED_ROTATION, 0), (FIXED_ROTATION, 1), (HETEROSKEDASTIC_1D, 0), (MIXTURE_PER_PROMPT, 0),
       (LOGISTIC_MEAN, 0), (RELU_SCALED, 0), (ORTHOGONAL_QUERY, 0)]
    + [(_shift_config(kind), 0) for kind in ("orthant", "subspace")]
    + [(_shift_config("scaled_outputs", shift_scale=3.0), 0),
       (_shift_config("added_noise", shift_noise_std=0.25), 0)]
)


@functools.cache
def _presampled():
  keys = jnp.stack([jax.random.key(seed) for _, seed in _PRESAMPLED])
  configs = [config for config, _ in _PRESAMPLED]
  batch = jax.jit(lambda ks: [tasks.sample(k, c) for k, c in zip(ks, configs)])(keys)
  return dict(zip(_PRESAMPLED, batch))


def _sample(config, seed=0):
  """`tasks.sample(jax.random.key(seed), config)`, from the shared compiled batch when listed there."""
  presampled = _presampled()
  if (config, seed) in presampled:
    return presampled[(config, seed)]
  return tasks.sample(jax.random.key(seed), config)


def _lstsq_fit(x_NxD, y_NxR):
  w, *_ = np.linalg.lstsq(x_NxD, y_NxR, rcond=None)
  return w


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_every_family_has_the_documented_shapes_dtype_and_scale(family):
  config = FAMILY_CONFIGS[family]
  prompts = _sample(config)
  r = config.num_outputs
  out = () if r == 1 else (r,)
  assert isinstance(prompts, tasks.Prompts)
  assert prompts._fields[:4] == ("x_support", "y_support", "x_query", "y_query")
  assert prompts.x_support.shape == (B, K, D) and prompts.x_query.shape == (B, Q, D)
  assert prompts.y_support.shape == prompts.f_support.shape == (B, K, *out)
  assert prompts.y_query.shape == prompts.f_query.shape == (B, Q, *out)
  for array in prompts:
    assert array.dtype == jnp.float64
    assert np.all(np.isfinite(array))
  if family in NOISELESS:
    np.testing.assert_array_equal(prompts.y_support, prompts.f_support)
    np.testing.assert_array_equal(prompts.y_query, prompts.f_query)
  else:
    assert not np.allclose(prompts.y_support, prompts.f_support)
  if family not in ("logistic", "poisson"):
    # Task parameters are normalised so that Var f(x) ~= 1; B * (K + Q) = 128 correlated values
    # (8 independent tasks) leave a wide margin.
    f_std = float(np.std(np.concatenate([prompts.f_support, prompts.f_query], axis=1)))
    assert 0.4 < f_std < 2.5, f_std


def test_sampling_is_deterministic_per_key_and_accepts_raw_keys():
  first = tasks.sample(jax.random.key(0), LINEAR)
  again, other = tasks.sample(jax.random.key(0), LINEAR), tasks.sample(jax.random.key(1), LINEAR)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  # Inside a larger jitted program (the tests' shared batch) the draws are the same to rounding.
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12), first,
               _sample(LINEAR, 0))
  assert not np.allclose(first.x_support, other.x_support)
  raw = tasks.sample(jax.random.PRNGKey(0), LINEAR)
  assert raw.x_support.shape == first.x_support.shape
  # Prompts within a batch are different tasks.
  assert not np.allclose(first.x_support[0], first.x_support[1])


def test_jit_and_vmap_over_keys():
  # One compilation covers both transformations (each costs about a second on CPU).
  keys = jax.random.split(jax.random.key(2), 3)
  batched = jax.jit(jax.vmap(lambda key: tasks.sample(key, LINEAR)))(keys)
  assert batched.x_support.shape == (3, B, K, D)
  # The batched sampler is the sampler applied per key; same float64 ops, a few ulps apart.
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
  for i in range(3):
    jax.tree.map(close, jax.tree.map(lambda a: a[i], batched), tasks.sample(keys[i], LINEAR))


@pytest.mark.parametrize("family", ["linear", "linear_anisotropic"])
def test_linear_targets_come_from_one_weight_matrix_per_prompt(family):
  """Noiseless linear prompts: the supports determine w (K > D), which then predicts the queries."""
  prompts = _sample(FAMILY_CONFIGS[family])
  for b in range(B):
    w = _lstsq_fit(np.asarray(prompts.x_support[b]), np.asarray(prompts.y_support[b]))
    # Least squares on K x D with condition number up to ~100 (anisotropic): error ~ eps * kappa^2.
    np.testing.assert_allclose(np.asarray(prompts.x_query[b]) @ w, prompts.y_query[b],
                               atol=1e4 * EPS64 * 100)


def test_sparse_linear_weights_have_sparsity_nonzeros_shared_by_outputs():
  config = FAMILY_CONFIGS["sparse_linear"]
  assert config.sparsity == 3  # default min(3, d)
  prompts = _sample(config)
  for b in range(B):
    w = _lstsq_fit(np.asarray(prompts.x_support[b]), np.asarray(prompts.y_support[b]))
    nonzero_rows = np.sum(np.any(np.abs(w) > 1e-8, axis=1))  # Exact zeros up to lstsq rounding.
    assert nonzero_rows == config.sparsity


def test_input_covariance_eigenvalues():
  eig = tasks.input_covariance_eigenvalues(tasks.TaskConfig(input_dim=6, condition_number=50.0))
  np.testing.assert_allclose(eig.max() / eig.min(), 50.0, rtol=1e-12)
  np.testing.assert_allclose(eig.mean(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(np.diff(np.log(eig)), np.log(50.0) / -5, rtol=1e-12)  # log-spaced
  skewed = tasks.input_covariance_eigenvalues(
      tasks.TaskConfig(input_dim=6, shift="skewed_covariance"))
  np.testing.assert_allclose(skewed / skewed[0], 1.0 / np.arange(1, 7) ** 2, rtol=1e-12)
  np.testing.assert_allclose(skewed.mean(), 1.0, rtol=1e-12)
  assert tasks.TaskConfig(family="linear_anisotropic").condition_number == 100.0
  np.testing.assert_array_equal(tasks.input_covariance_eigenvalues(tasks.TaskConfig()), 1.0)


def test_fixed_rotation_gives_the_target_covariance():
  config = FIXED_ROTATION
  a, b = _sample(config, 0), _sample(config, 1)
  x = np.concatenate([a.x_support, a.x_query, b.x_support, b.x_query], axis=1).reshape(-1, D)
  n = x.shape[0]  # 8192 samples
  eig_sample = np.linalg.eigvalsh(x.T @ x / n)[::-1]
  eig_true = tasks.input_covariance_eigenvalues(config)
  # Sample-covariance eigenvalues have relative standard deviation about sqrt(2 / n) = 1.6%; 6 sigma.
  np.testing.assert_allclose(eig_sample, eig_true, rtol=6 * math.sqrt(2 / n))
  # The same fixed eigenbasis in both calls: x^T x of each call is diagonalised by the same vectors.
  cov_a = np.einsum("bnd,bne->de", a.x_support, a.x_support) / (64 * 60)
  cov_b = np.einsum("bnd,bne->de", b.x_support, b.x_support) / (64 * 60)
  _, vec_a = np.linalg.eigh(cov_a)
  _, vec_b = np.linalg.eigh(cov_b)
  np.testing.assert_allclose(np.abs(np.sum(vec_a * vec_b, axis=0)), 1.0, atol=0.05)


def test_glm_targets():
  logistic = _sample(FAMILY_CONFIGS["logistic"])
  assert set(np.unique(logistic.y_support)) <= {0.0, 1.0}
  assert np.all((logistic.f_support > 0) & (logistic.f_support < 1))
  poisson = _sample(FAMILY_CONFIGS["poisson"])
  y = np.asarray(poisson.y_support)
  np.testing.assert_array_equal(y, np.round(y))
  assert np.all(y >= 0) and np.all(poisson.f_support > 0)
  # Counts are unbiased for the rate: mean(y - f) over 96 counts with Var = f (mean ~1.6): 6 sigma.
  diff = (poisson.y_support - poisson.f_support).ravel()
  assert abs(float(diff.mean())) < 6 * math.sqrt(float(poisson.f_support.mean()) / diff.size) + 0.1
  # glm_targets="mean" observes the link mean itself (one family: each config costs a compilation).
  means = _sample(LOGISTIC_MEAN)
  np.testing.assert_array_equal(means.y_query, means.f_query)
  np.testing.assert_array_equal(means.f_query, logistic.f_query)  # Same key, same task.


def test_heteroskedastic_noise_scale_depends_on_one_direction():
  """y - f = s |v.x| eps: E[(y-f)^2 x x^T] = s^2 (I + 2 v v^T) for isotropic x, eigenvalues s^2 (1, 3)."""
  prompts = _sample(HETEROSKEDASTIC_1D)
  x, e = np.asarray(prompts.x_support[0]), np.asarray(prompts.y_support[0] - prompts.f_support[0])
  weighted = np.einsum("n,nd,ne->de", e**2, x, x) / x.shape[0]
  eig = np.linalg.eigvalsh(weighted) / 0.3**2
  # The top entry averages (v.x)^4 eps^2 (variance 306) over 20000 points: standard deviation 0.12,
  # the other about 0.05; bounds at about 6 sigma (homoskedastic noise would give (1, 1)).
  assert 0.7 < eig[0] < 1.3 and 2.3 < eig[1] < 3.7, eig


def test_mixture_modes():
  """per_prompt: each prompt is one of `num_components` linear tasks; per_point: not one linear task."""
  per_point = _sample(FAMILY_CONFIGS["mixture_linear"])
  residuals = []
  for b in range(B):
    x, y = np.asarray(per_point.x_support[b]), np.asarray(per_point.y_support[b])
    residuals.append(np.linalg.norm(x @ _lstsq_fit(x, y) - y))
  assert max(residuals) > 1e-3  # Two components mixed within a prompt.

  config = MIXTURE_PER_PROMPT
  per_prompt = _sample(config)
  weights = []
  for b in range(16):
    x, y = np.asarray(per_prompt.x_support[b]), np.asarray(per_prompt.y_support[b])
    w = _lstsq_fit(x, y)
    np.testing.assert_allclose(x @ w, y, atol=1e-10)  # One linear task per prompt (well conditioned).
    weights.append(w.ravel())
  distinct = []
  for w in weights:
    if not any(np.allclose(w, u, atol=1e-8) for u in distinct):
      distinct.append(w)
  assert len(distinct) == config.num_components  # 16 prompts, 2 components: both used w.p. 1 - 2^-15.


def test_relu_network_target_is_positively_homogeneous_through_scaled_inputs():
  """f(c x) = c f(x) for c > 0: sample the same key with inputs scaled by 2."""
  base = FAMILY_CONFIGS["relu_network"]
  plain, scaled = _sample(base), _sample(RELU_SCALED)
  np.testing.assert_allclose(scaled.x_query, 2.0 * plain.x_query, rtol=1e-15)
  np.testing.assert_allclose(scaled.f_query, 2.0 * plain.f_query, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Distribution shifts (the linear config; same key, so unshifted draws coincide).


@pytest.fixture(scope="module")
def linear_prompts():
  return _sample(LINEAR)


def test_shift_orthant(linear_prompts):
  shifted = _sample(_shift_config("orthant"))
  signs = np.sign(shifted.x_support)
  np.testing.assert_array_equal(signs, np.broadcast_to(signs[:, :1, :], signs.shape))
  np.testing.assert_array_equal(np.abs(shifted.x_support), np.abs(linear_prompts.x_support))
  np.testing.assert_array_equal(shifted.x_query, linear_prompts.x_query)  # queries unrestricted
  assert not np.all(np.sign(shifted.x_query) == signs[:, :1, :])


def test_shift_orthogonal_query():
  shifted = _sample(ORTHOGONAL_QUERY)
  inner = np.einsum("bkd,bqd->bkq", shifted.x_support, shifted.x_query)
  # Projection by a float64 QR: orthogonal to rounding, relative to |x_s| |x_q| ~ D.
  assert np.max(np.abs(inner)) < 100 * EPS64 * D
  # Queries keep their norm: E|x_q|^2 = D = 4 (a projection alone would leave D - (D - 1) = 1).
  # The mean of B Q = 32 chi-square(4) values has standard deviation 0.5; 3 sigma.
  mean_sq_norm = float(np.mean(np.sum(np.square(shifted.x_query), axis=-1)))
  assert abs(mean_sq_norm - D) < 1.5, mean_sq_norm
  np.testing.assert_array_equal(shifted.y_query, shifted.f_query)


def test_shift_subspace():
  config = _shift_config("subspace")
  assert config.shift_subspace_dim == D // 2
  shifted = _sample(config)
  for b in range(B):
    x = np.concatenate([shifted.x_support[b], shifted.x_query[b]])
    singular = np.linalg.svd(x, compute_uv=False)
    assert singular[D // 2 - 1] > 1e-3 and np.all(singular[D // 2:] < 1e-12 * singular[0])


# skewed_covariance only changes the spectrum: see test_input_covariance_eigenvalues (and the slow
# grid below, which samples every family under every shift).


def test_shift_scaled_outputs(linear_prompts):
  # scaled_inputs is tested with the relu_network family above.
  outputs = _sample(_shift_config("scaled_outputs", shift_scale=3.0))
  np.testing.assert_array_equal(outputs.x_support, linear_prompts.x_support)
  np.testing.assert_allclose(outputs.y_support, 3.0 * linear_prompts.y_support, rtol=1e-15)
  np.testing.assert_allclose(outputs.f_query, 3.0 * linear_prompts.f_query, rtol=1e-15)


def test_shift_added_noise(linear_prompts):
  noisy = _sample(_shift_config("added_noise", shift_noise_std=0.25))
  np.testing.assert_array_equal(noisy.x_support, linear_prompts.x_support)
  np.testing.assert_array_equal(noisy.f_support, linear_prompts.f_support)
  noise = np.asarray(noisy.y_support - noisy.f_support).ravel()
  # Sample std of 192 Gaussians: relative standard deviation 1/sqrt(2 * 192) = 5%; 5 sigma.
  np.testing.assert_allclose(noise.std(), 0.25, rtol=0.25)


# ----------------------------------------------------------------------------------------------
# Validation: every check fires.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"family": "quadratic"}, "Unknown TaskConfig.family 'quadratic'; choose one of linear, "),
        ({"input_dim": 0}, "input_dim must be an integer >= 1"),
        ({"input_dim": 2.0}, "input_dim must be an integer >= 1"),
        ({"num_support": 0}, "num_support must be an integer >= 1"),
        ({"num_query": 0}, "num_query must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_outputs": 0}, "num_outputs must be an integer >= 1"),
        ({"noise_std": -0.1}, "noise_std must be a finite number >= 0"),
        ({"noise_std": float("nan")}, "noise_std must be a finite number >= 0"),
        ({"condition_number": 0.5}, "condition_number must be a finite number >= 1"),
        ({"condition_number": float("inf")}, "condition_number must be a finite number >= 1"),
        ({"condition_number": 10.0, "input_dim": 1}, "needs input_dim >= 2"),
        ({"family": "linear_anisotropic", "condition_number": 1.0}, "needs condition_number > 1"),
        ({"family": "noisy_linear", "noise_std": 0.0}, "needs noise_std > 0"),
        ({"family": "heteroskedastic", "noise_std": 0.0}, "needs noise_std > 0"),
        ({"family": "logistic", "noise_std": 0.1}, "set noise_std=0"),
        ({"family": "poisson", "num_outputs": 2}, "scalar link and supports num_outputs=1 only"),
        ({"family": "logistic", "num_outputs": 3}, "scalar link"),
        ({"input_rotation": "random"}, "Unknown TaskConfig.input_rotation"),
        ({"covariance_seed": -1}, "covariance_seed must be an integer >= 0"),
        ({"sparsity": 0}, "sparsity must be an integer >= 1"),
        ({"sparsity": 9, "input_dim": 8}, "sparsity=9 exceeds input_dim=8"),
        ({"glm_targets": "labels"}, "Unknown TaskConfig.glm_targets"),
        ({"glm_scale": 0.0}, "glm_scale must be a finite number > 0"),
        ({"num_components": 0}, "num_components must be an integer >= 1"),
        ({"mixture_mode": "per_token"}, "Unknown TaskConfig.mixture_mode"),
        ({"hidden_units": 0}, "hidden_units must be an integer >= 1"),
        ({"feature_seed": -1}, "feature_seed must be an integer >= 0"),
        ({"kernel_num_features": 0}, "kernel_num_features must be an integer >= 1"),
        ({"kernel_bandwidth": -1.0}, "kernel_bandwidth must be a finite number > 0"),
        ({"shift": "rotated"}, "Unknown TaskConfig.shift 'rotated'; choose one of none, orthant"),
        ({"shift_scale": 0.0}, "shift_scale must be a finite number > 0"),
        ({"shift_noise_std": -1.0}, "shift_noise_std must be a finite number >= 0"),
        ({"shift_subspace_dim": 0}, "shift_subspace_dim must be an integer >= 1"),
        ({"shift_subspace_dim": 9, "input_dim": 8}, "shift_subspace_dim=9 exceeds input_dim=8"),
        ({"shift": "orthogonal_query", "num_support": 8, "input_dim": 8},
         "needs num_support < input_dim"),
        ({"shift": "skewed_covariance", "condition_number": 10.0}, "replaces the input spectrum"),
    ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tasks.TaskConfig(**kwargs)


def test_bad_sample_and_with_shift_arguments_raise():
  with pytest.raises(ValueError, match="config must be a kcg.tasks.TaskConfig"):
    tasks.sample(jax.random.key(0), {"family": "linear"})
  with pytest.raises(ValueError, match="key must be a single PRNG key"):
    tasks.sample(0, LINEAR)
  with pytest.raises(ValueError, match="key must be a single PRNG key"):
    tasks.sample(jax.random.split(jax.random.key(0), 2), LINEAR)
  with pytest.raises(ValueError, match="Unknown TaskConfig.shift 'upside_down'"):
    tasks.with_shift(LINEAR, "upside_down")
  with pytest.raises(ValueError, match="with_shift: unknown knob 'noise'"):
    tasks.with_shift(LINEAR, "added_noise", noise=1.0)


def test_config_is_hashable_and_resolves_defaults():
  config = tasks.TaskConfig(family="noisy_linear")
  assert config.noise_std == 0.5 and config.condition_number == 1.0
  assert hash(config) == hash(tasks.TaskConfig(family="noisy_linear", noise_std=0.5))
  assert tasks.TaskConfig(input_dim=2).sparsity == 2
  assert tasks.TaskConfig(input_dim=9).kernel_bandwidth == 3.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.noise_std = 1.0  # type: ignore[misc]


@pytest.mark.slow
@pytest.mark.parametrize("shift", tasks.SHIFTS)
@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_every_family_under_every_shift_samples_finite_prompts(family, shift):
  base = dataclasses.replace(FAMILY_CONFIGS[family], num_support=3)
  if shift == "skewed_covariance":
    if family == "linear_anisotropic":  # Its log-spaced spectrum and the skewed one exclude each other.
      with pytest.raises(ValueError, match="replaces the input spectrum"):
        tasks.with_shift(base, shift)
      return
    base = dataclasses.replace(base, condition_number=1.0)
  prompts = tasks.sample(jax.random.key(0), tasks.with_shift(base, shift))
  assert all(np.all(np.isfinite(a)) for a in prompts)


@pytest.mark.parametrize("family", ["kernel_prior", "relu_network", "logistic"])
def test_sample_targets_on_given_inputs(family):
  """The same key reproduces `sample`'s tasks on its inputs exactly; another key draws other tasks
  on the same inputs (what the y-linearity test needs)."""
  config = tasks.TaskConfig(family=family, input_dim=3, num_support=5, num_query=2, batch_size=4,
                            **({"glm_targets": "mean"} if family == "logistic" else {}))
  prompts = tasks.sample(jax.random.key(3), config)
  again = tasks.sample_targets(jax.random.key(3), config, prompts.x_support, prompts.x_query)
  for field in ("y_support", "y_query", "f_support", "f_query"):
    np.testing.assert_array_equal(np.asarray(getattr(again, field)), np.asarray(getattr(prompts, field)))
  other = tasks.sample_targets(jax.random.key(4), config, prompts.x_support, prompts.x_query)
  np.testing.assert_array_equal(np.asarray(other.x_support), np.asarray(prompts.x_support))
  assert np.max(np.abs(np.asarray(other.f_support) - np.asarray(prompts.f_support))) > 1e-2
  # Sizes come from the arrays, not from the config.
  more = tasks.sample_targets(jax.random.key(4), config, np.zeros((2, 7, 3)), np.zeros((2, 1, 3)))
  assert more.y_support.shape == (2, 7) and more.y_query.shape == (2, 1)
  with pytest.raises(ValueError, match="input_dim"):
    tasks.sample_targets(jax.random.key(0), config, np.zeros((2, 7, 4)), np.zeros((2, 1, 4)))
  with pytest.raises(ValueError, match=r"\[B, k, d\]"):
    tasks.sample_targets(jax.random.key(0), config, np.zeros((7, 3)), np.zeros((2, 1, 3)))
  with pytest.raises(ValueError, match="NaN"):
    tasks.sample_targets(jax.random.key(0), config, np.full((2, 7, 3), np.nan), np.zeros((2, 1, 3)))
