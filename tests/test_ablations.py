"""Ablations of compiled models against the CG that drops the same operation.

Tolerances. The damaged reference (`damaged_cg_predict`) performs the compiled program's arithmetic
(products with the compiled reciprocal, the same recurrences) in float64, so damaged model and damaged
reference differ only by the order of float64 sums: relative 1e-16 to 1e-14 measured on these
well-conditioned problems (k = 6, kappa(A) < 50, t = 3). We require 1e-11, and that the ablation
changed the model by much more (> 1e-3; the Newton layer, whose removal changes 1/x by
e^(2^3) ~ 1e-11 relative, by > 100x the match).

The same holds for PCG, Chebyshev and softmax Route A (measured: match <= 2e-15 for PCG and
Chebyshev; <= 5e-14 for Route A, whose exponential kernel and 1/Z_i reciprocal add rounding, the level
at which its healthy model equals textbook exponential-kernel CG). The PCG preconditioner ablation
(M^-1 = the unrefined ReLU guess, within 4.2%) changes the model by ~1e-2. The compiler's variants
(pre-norm, feature layer, projection, r outputs) match to <= 1.8e-14 (the rank-2 projection, whose
features pass through S before the kernel; the others <= 3.9e-15).
"""

import functools

import jax
import numpy as np
import pytest

import kcg
from kcg import ablations
from kcg import probes
from kcg import solvers
from kcg import tasks
from kcg._src import craft
from kcg.ops import Construction, Op

K, D, Q, T, RIDGE = 6, 4, 3, 3, 0.5
CONSTRUCTIONS = {"support_state": ("dual", "prefix"), "aggregator_dual": ("dual", "causal"),
                 "aggregator_primal": ("primal", "causal")}
OPERATIONS = {
    "support_state": ("matvec", "query_matvec", "curvature_reduction", "ridge_reduction",
                      "residual_norm", "newton", "step"),
    "aggregator_dual": ("matvec", "matvec_u", "curvature_reduction", "ridge_reduction",
                        "residual_norm", "newton", "step"),
    "aggregator_primal": ("matvec", "query_matvec", "ridge_reduction", "residual_norm", "newton",
                          "step"),
}
# PCG, Chebyshev (eig_bounds: [ridge, ridge + max ||Phi||^2] of the test prompts, see _bounds) and
# softmax Route A.
OTHER = {
    "jacobi_support_state": lambda: kcg.compile_cg(K, D, T, RIDGE, mask="prefix",
                                                   preconditioner="jacobi"),
    "chebyshev_support_state": lambda: kcg.compile_chebyshev(K, D, T, RIDGE, eig_bounds=_bounds(),
                                                             mask="prefix"),
    "chebyshev_aggregator_dual": lambda: kcg.compile_chebyshev(K, D, T, RIDGE, eig_bounds=_bounds(),
                                                               mask="causal"),
    "chebyshev_aggregator_primal": lambda: kcg.compile_chebyshev(
        K, D, T, RIDGE, eig_bounds=_bounds(), mask="causal", form="primal"),
    "exponential_support_state": lambda: kcg.compile_cg(K, D, T, RIDGE, mask="prefix",
                                                        attention="softmax", kernel="exponential",
                                                        temperature=2.0),
}
OPERATIONS.update({
    "jacobi_support_state": ("matvec", "query_matvec", "curvature_reduction", "ridge_reduction",
                             "residual_norm", "newton", "preconditioner", "step"),
    "chebyshev_support_state": ("matvec", "query_matvec", "step"),
    "chebyshev_aggregator_dual": ("matvec", "matvec_u", "query_matvec", "step"),
    "chebyshev_aggregator_primal": ("matvec", "query_matvec", "step"),
    "exponential_support_state": ("matvec", "query_matvec", "pap_reduction", "residual_norm",
                                  "newton", "step"),
})
FAST = [("support_state", op) for op in OPERATIONS["support_state"]] + [
    ("aggregator_dual", "matvec_u"), ("aggregator_primal", "matvec"),
    ("aggregator_primal", "ridge_reduction"),
    ("jacobi_support_state", "preconditioner"), ("jacobi_support_state", "residual_norm"),
    ("chebyshev_support_state", "matvec"), ("chebyshev_support_state", "step"),
    ("exponential_support_state", "pap_reduction"), ("exponential_support_state", "residual_norm"),
    ("exponential_support_state", "newton")]
SLOW = [(c, op) for c, ops in OPERATIONS.items() for op in ops if (c, op) not in FAST]


def _bounds():
  x = np.asarray(_prompts())
  return RIDGE, RIDGE + float(np.max(np.linalg.norm(x, ord=2, axis=(1, 2)) ** 2))


@functools.lru_cache(maxsize=None)
def _compiled(construction):
  if construction in OTHER:
    return OTHER[construction]()
  form, mask = CONSTRUCTIONS[construction]
  return kcg.compile_cg(K, D, T, RIDGE, mask=mask, form=form)


def _prompts():
  return _sample().x_support


@functools.lru_cache(maxsize=None)
def _sample():
  config = tasks.TaskConfig(family="noisy_linear", input_dim=D, num_support=K, num_query=Q,
                            batch_size=48, condition_number=10.0)
  return tasks.sample(jax.random.key(0), config)


def _textbook(compiled, prompts):
  """The healthy algorithm from kcg.solvers (independent of the damaged references)."""
  args = (prompts.x_support, prompts.y_support, prompts.x_query, RIDGE, T)
  if compiled.program.name == "jacobi_support_state":
    return solvers.pcg_predict(*args)
  if compiled.program.name.startswith("chebyshev"):
    return solvers.chebyshev_predict(*args, compiled.eig_bounds)
  if compiled.attention == "softmax":
    return solvers.cg_predict(*args, kernel=kcg.kernels.ExponentialKernel(2.0))
  return (solvers.cg_predict if compiled.form == "dual" else solvers.primal_cg_predict)(*args)


@pytest.fixture(scope="module")
def prompts():
  return _sample()


def _check(construction, operation, prompts, steps):
  compiled = _compiled(construction)
  report = ablations.ablate_compiled(compiled, operation, prompts, steps=steps)
  assert report.damaged.shape == (48, T + 1, Q)
  assert report.match < 1e-11, report.match
  threshold = 100 * report.match if operation == "newton" else 1e-3
  assert report.damage_size > threshold, (report.damage_size, report.match)
  # The healthy model is the algorithm as compiled, which is the textbook algorithm to rounding.
  np.testing.assert_allclose(np.asarray(report.healthy), np.asarray(_textbook(compiled, prompts)),
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("construction,operation", FAST)
def test_ablation_matches_damaged_cg(construction, operation, prompts):
  steps = None if operation in ("query_matvec", "preconditioner") else (1,)
  _check(construction, operation, prompts, steps)


@pytest.mark.slow
@pytest.mark.parametrize("construction,operation", SLOW)
@pytest.mark.parametrize("steps", [None, (0,), (1,)], ids=["all", "step0", "step1"])
def test_ablation_matches_damaged_cg_all(construction, operation, steps, prompts):
  if operation == "residual_norm" and steps == (T - 1,):
    pytest.skip("r.r of the last step is never used")
  if operation == "preconditioner" and steps is not None:
    pytest.skip("the preconditioner is formed before the first step")
  _check(construction, operation, prompts, steps)


# The compiler's variants keep the ablation tables: pre-norm pins, a random-ReLU feature layer, a
# linear-attention projection S [m, d] and r independent outputs (every per-output copy removed).
_S = np.random.default_rng(7).normal(size=(2, D)) / np.sqrt(D)
_RELU = kcg.features.random_relu(5)
VARIANTS = {
    "support_state+prenorm": (lambda: kcg.compile_cg(K, D, T, RIDGE, mask="prefix", norm="rmsnorm"), 1),
    "aggregator_primal+prenorm": (lambda: kcg.compile_cg(K, D, T, RIDGE, form="primal",
                                                         norm="rmsnorm"), 1),
    "support_state+rank2": (lambda: kcg.compile_cg(K, D, T, RIDGE, mask="prefix", projection=_S), 1),
    "aggregator_dual+random_relu": (lambda: kcg.compile_cg(
        K, 5, T, RIDGE, features="random_relu",
        feature_params=_RELU.init(jax.random.key(3), D)), 1),
    "support_state x2 outputs": (lambda: kcg.compile_cg(K, D, T, RIDGE, mask="prefix",
                                                        num_outputs=2), 2),
    "aggregator_dual x3 outputs": (lambda: kcg.compile_cg(K, D, T, RIDGE, num_outputs=3), 3),
    "jacobi_support_state x2 outputs": (lambda: kcg.compile_cg(
        K, D, T, RIDGE, mask="prefix", num_outputs=2, preconditioner="jacobi"), 2),
    "chebyshev_support_state+prenorm": (lambda: kcg.compile_chebyshev(
        K, D, T, RIDGE, eig_bounds=_bounds(), mask="prefix", norm="layernorm"), 1),
}


@functools.lru_cache(maxsize=None)
def _variant(name):
  make, num_outputs = VARIANTS[name]
  compiled = make()
  sample = _sample()
  y = sample.y_support
  if num_outputs > 1:  # more columns: y, and y pushed through a fixed nonlinearity per column
    y = np.stack([np.asarray(y) * (c + 1) + np.sin(c * np.asarray(y)) for c in range(num_outputs)], -1)
  return compiled, sample._replace(y_support=y)


def _textbook_columns(compiled, prompts):
  """Each column's textbook solver (kcg.solvers) on features built here, not by the compiled model."""
  x_s, x_q = np.asarray(prompts.x_support), np.asarray(prompts.x_query)
  if compiled.features == "random_relu":
    params = _RELU.init(jax.random.key(3), D)
    x_s, x_q = (np.asarray(_RELU.apply(params, x)) for x in (x_s, x_q))
  if compiled.projection is not None:
    x_s, x_q = x_s @ _S.T, x_q @ _S.T
  y = np.asarray(prompts.y_support)
  columns = [y] if y.ndim == 2 else [y[..., c] for c in range(y.shape[-1])]
  out = []
  for column in columns:
    args = (x_s, column, x_q, RIDGE, T)
    if compiled.preconditioner == "jacobi":
      out.append(solvers.pcg_predict(*args))
    elif compiled.algorithm == "chebyshev":
      out.append(solvers.chebyshev_predict(*args, compiled.eig_bounds))
    else:
      out.append((solvers.cg_predict if compiled.form == "dual" else solvers.primal_cg_predict)(*args))
  return np.stack(out, -1) if y.ndim == 3 else out[0]


_SLOW_VARIANTS = ("aggregator_primal+prenorm", "aggregator_dual x3 outputs",
                  "jacobi_support_state x2 outputs")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_VARIANTS
                                  else n for n in VARIANTS])
def test_variants_keep_the_ablation_tables(name):
  compiled, prompts = _variant(name)
  assert compiled.program.name == name
  ops = ablations.available_operations(compiled.program)
  base = name.split(" x")[0].split("+")[0]
  assert ops == OPERATIONS[base]
  r = VARIANTS[name][1]
  shape = (48, T + 1, Q) + ((r,) if r > 1 else ())
  for op in ops:
    steps = None if op in ("query_matvec", "preconditioner") else (1,)
    report = ablations.ablate_compiled(compiled, op, prompts, steps=steps)
    assert report.damaged.shape == shape
    assert report.match < 1e-11, (op, report.match)
    threshold = 100 * report.match if op == "newton" else 1e-3
    assert report.damage_size > threshold, (op, report.damage_size, report.match)
  np.testing.assert_allclose(np.asarray(report.healthy), _textbook_columns(compiled, prompts),
                             rtol=1e-10, atol=1e-12)


def test_kernel_features_are_the_features_the_model_reads():
  compiled, prompts = _variant("aggregator_dual+random_relu")
  expected = np.asarray(_RELU.apply(_RELU.init(jax.random.key(3), D), prompts.x_support))
  np.testing.assert_allclose(np.asarray(compiled.kernel_features(prompts.x_support)), expected,
                             rtol=1e-14, atol=1e-15)
  compiled, prompts = _variant("support_state+rank2")
  np.testing.assert_allclose(np.asarray(compiled.kernel_features(prompts.x_query)),
                             np.asarray(prompts.x_query) @ _S.T, rtol=1e-14, atol=1e-15)


def test_block_cg_has_no_ablation_table():
  compiled = kcg.compile_cg(K, D, 1, RIDGE, mask="prefix", num_outputs=2, multi_output="block")
  with pytest.raises(ValueError, match="no ablation table"):
    ablations.available_operations(compiled.program)


def test_every_construction_has_its_operations():
  for construction, ops in OPERATIONS.items():
    assert ablations.available_operations(_compiled(construction).program) == ops, construction


def test_chebyshev_has_no_reductions_and_pcg_preconditioner_is_init(prompts):
  program = _compiled("chebyshev_support_state").program
  for op in ("curvature_reduction", "residual_norm", "newton"):
    with pytest.raises(ValueError, match="no reductions"):
      ablations.operation_ablation(program, op)
  pcg = _compiled("jacobi_support_state").program
  with pytest.raises(ValueError, match="steps=None"):
    ablations.operation_ablation(pcg, "preconditioner", steps=(0,))
  ablation, damage = ablations.operation_ablation(pcg, "preconditioner")
  assert all(l < pcg.step_ends[0] for l in ablation.layers)  # init layers only
  assert all(d.preconditioner_guess_only for d in damage)
  # "step" removes every layer of the step.
  ablation, _ = ablations.operation_ablation(pcg, "step", steps=(1,))
  assert ablation.layers == tuple(ablations.step_layers(pcg, 1))


def test_damaged_step_repeats_the_previous_prediction(prompts):
  args = (prompts.x_support, prompts.y_support, prompts.x_query, RIDGE)
  skip = (ablations.HEALTHY, ablations.Damage(skipped=True), ablations.HEALTHY)
  for got in (ablations.damaged_cg_predict(*args, skip), ablations.damaged_pcg_predict(*args, skip)):
    np.testing.assert_array_equal(np.asarray(got[:, 2]), np.asarray(got[:, 1]))
    # After the skipped step the algorithm resumes: its third prediction is the healthy second.
  healthy = ablations.damaged_cg_predict(*args, (ablations.HEALTHY,) * 2)
  np.testing.assert_allclose(np.asarray(ablations.damaged_cg_predict(*args, skip)[:, 3]),
                             np.asarray(healthy[:, 2]), rtol=1e-12, atol=1e-14)


def test_heads_are_found_by_op():
  program = _compiled("support_state").program
  found = ablations.find_heads(program, Op.MATVEC)
  assert len(found) == T  # one mat-vec head per CG step
  for layer, head in found:
    assert program.blocks[program.schedule[layer]].heads[head].name == (
        "(Kp)_i = sum_j (phi_i . phi_j) p_j")
  assert {ablations.find_heads(program, Op.MATVEC, steps=(s,))[0][0] for s in range(T)} == {
      l for l, _ in found}
  layers = ablations.find_layers(program, Op.RESIDUAL_NORM, steps=(2,))
  assert craft.layer_names(program)[layers[0]] == "step[2] cg rr_next = r.r"
  # Renaming a head for display does not change what it is.
  renamed = program._replace(blocks=tuple(
      block._replace(heads=tuple(h._replace(name=h.name.upper()) for h in block.heads))
      for block in program.blocks))
  assert ablations.operation_ablation(renamed, "matvec") == ablations.operation_ablation(
      program, "matvec")


def test_healthy_damaged_reference_is_cg(prompts):
  args = (prompts.x_support, prompts.y_support, prompts.x_query, RIDGE)
  for form, ref in (("dual", solvers.cg_predict), ("primal", solvers.primal_cg_predict)):
    got = ablations.damaged_cg_predict(*args, (ablations.HEALTHY,) * 4, form=form)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(*args, 4)), rtol=1e-10, atol=1e-12)


def test_matvec_ablation_is_cg_with_ridge_times_p(prompts):
  """Dropping K p at every step leaves A p = ridge p: the step is r.r/(ridge p.p) = 1/ridge, so
  alpha_1 = y / ridge and the residual vanishes (A restricted to ridge I is solved in one step)."""
  x, y, xq = prompts.x_support, prompts.y_support, prompts.x_query
  damaged = ablations.damaged_cg_predict(x, y, xq, RIDGE, (ablations.Damage(kernel_matvec=True),) * 2)
  k_query = np.einsum("bqd,bkd->bqk", np.asarray(xq), np.asarray(x))
  np.testing.assert_allclose(np.asarray(damaged[:, 1]),
                             np.einsum("bqk,bk->bq", k_query, np.asarray(y)) / RIDGE, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(damaged[:, 2]), np.asarray(damaged[:, 1]), rtol=1e-12)


def test_degradation_on_any_model(prompts):
  # The same architecture as the random subjects of test_probes and test_matching (shared compiles).
  template = probes.Subject("template", kcg.ModelConfig(
      token_dim=kcg.prompt.make_layout(K, Q, D).token_dim, width=12, num_layers=2, num_heads=2,
      head_dim=4, mask="prefix"), None, None, ("a", "b"), input_dim=D)
  subject = probes.random_init_like(template, seed=1)
  d = ablations.degradation(subject, prompts, heads=[(1, 0)])
  assert d.damaged.shape == (48, Q)
  assert np.isfinite(d.mse_damaged) and d.relative_change > 0
  full = ablations.degradation_map(subject, prompts)
  assert full.head_mse.shape == (2, 2) and full.layer_mse.shape == (2,)
  np.testing.assert_allclose(full.head_mse[1, 0], d.mse_damaged, rtol=1e-12)
  assert np.all(full.layer_change > 0)
  with pytest.raises(ValueError, match="targets must have shape"):
    ablations.degradation(subject, prompts, layers=(0,), targets=np.zeros((48, Q + 1)))


def test_masks():
  config = _compiled("support_state").config
  head_mask, layer_mask = ablations.masks(config, ablations.Ablation(((1, 0), (2, 1)), (3,)))
  assert head_mask.shape == (config.num_layers, config.num_heads)
  assert float(head_mask.sum()) == config.num_layers * config.num_heads - 2
  assert float(layer_mask[3]) == 0 and float(layer_mask.sum()) == config.num_layers - 1


def test_validation_errors(prompts):
  compiled = _compiled("support_state")
  program = compiled.program
  with pytest.raises(ValueError, match="unknown operation"):
    ablations.operation_ablation(program, "softmax")
  with pytest.raises(ValueError, match="no ablation table"):
    ablations.operation_ablation(program._replace(construction=Construction.BLOCK_SUPPORT_STATE),
                                 "matvec")
  with pytest.raises(ValueError, match="no head of its own"):
    ablations.operation_ablation(program, "matvec_u")
  with pytest.raises(ValueError, match="no head of its own"):
    ablations.operation_ablation(_compiled("aggregator_primal").program, "curvature_reduction")
  with pytest.raises(ValueError, match="outside the program's CG steps"):
    ablations.operation_ablation(program, "matvec", steps=(T,))
  with pytest.raises(ValueError, match="no head with op"):
    ablations.find_heads(program, Op.NEWTON_SCHULZ)
  with pytest.raises(ValueError, match="no block with op"):
    ablations.find_layers(program, Op.GUARD)
  with pytest.raises(ValueError, match="display names are not identities"):
    ablations.find_heads(program, "(Kp)_i = sum_j (phi_i . phi_j) p_j")
  with pytest.raises(ValueError, match="outside the model"):
    ablations.masks(compiled.config, ablations.Ablation(((0, 99),)))
  with pytest.raises(ValueError, match="outside the model"):
    ablations.masks(compiled.config, ablations.Ablation((), (compiled.config.num_layers,)))
  with pytest.raises(ValueError, match="nothing to ablate"):
    ablations.degradation(probes.subject_from_compiled(compiled), prompts)
  args = (prompts.x_support, prompts.y_support, prompts.x_query)
  with pytest.raises(ValueError, match="ridge"):
    ablations.damaged_cg_predict(*args, 0.0, (ablations.HEALTHY,))
  with pytest.raises(ValueError, match="form"):
    ablations.damaged_cg_predict(*args, RIDGE, (ablations.HEALTHY,), form="mixed")
  with pytest.raises(ValueError, match="Damage"):
    ablations.damaged_cg_predict(*args, RIDGE, ("matvec",))
  with pytest.raises(ValueError, match="dual"):
    ablations.damaged_cg_predict(*args, RIDGE, (ablations.Damage(curvature=True),), form="primal")
  with pytest.raises(ValueError, match="shapes"):
    ablations.damaged_cg_predict(prompts.x_support, prompts.y_support[:, :-1], prompts.x_query,
                                 RIDGE, (ablations.HEALTHY,))
  with pytest.raises(ValueError, match="NaN"):
    ablations.damaged_cg_predict(np.full((1, 2, 2), np.nan), np.zeros((1, 2)), np.zeros((1, 1, 2)),
                                 RIDGE, (ablations.HEALTHY,))
  guess = ablations.Damage(preconditioner_guess_only=True)
  with pytest.raises(ValueError, match="damaged_pcg_predict"):
    ablations.damaged_cg_predict(*args, RIDGE, (guess,))
  with pytest.raises(ValueError, match="every step or for none"):
    ablations.damaged_pcg_predict(*args, RIDGE, (guess, ablations.HEALTHY))
  with pytest.raises(ValueError, match="form='dual' only"):
    ablations.damaged_cg_predict(*args, RIDGE, (ablations.HEALTHY,), form="primal",
                                 kernel=kcg.kernels.ExponentialKernel(1.0))
  with pytest.raises(ValueError, match="no reductions or reciprocals"):
    ablations.damaged_chebyshev_predict(*args, RIDGE, (RIDGE, 10.0),
                                        (ablations.Damage(residual_norm=True),))
  with pytest.raises(ValueError, match="form"):
    ablations.damaged_chebyshev_predict(*args, RIDGE, (RIDGE, 10.0), (ablations.HEALTHY,),
                                        form="mixed")
