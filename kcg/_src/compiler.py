"""`compile_cg`: transformer weights whose forward pass runs t steps of CG for kernel ridge regression.

Compiling is a pure pipeline of named stages, each a function of the previous stage's output:

0. `options.validate`: every option checked and put in canonical form (`CompileOptions`).
1. `build_program(options, dtype)`: the construction as blocks on named residual channels
   (kcg._src.programs, chebyshev_programs, softmax_programs, block_programs), then the rewrites
   the options ask for (kcg._src.multi_output, kcg._src.transforms).
2. `lowering.lower`: each block to the arrays of one layer, shaped from the model's own abstract
   state.
3. `lowering.assemble`: the arrays into the NNX state of `kcg.Transformer`, checked against a
   freshly initialised model of the same config.

`compile_program(options, dtype)` runs stages 1-3 and returns an `Assembled` record (program,
prompt layout, model config, graph definition, parameters). `CompiledCG` runs it: it predicts
`f_t(x) = k(x)^T alpha_t` (dual) or `phi(x)^T w_t` (primal) for a batch of prompts, in the dtype of
its inputs, assembling (and keeping) one record per dtype.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kcg._src import block_programs
from kcg._src import chebyshev_programs
from kcg._src import craft
from kcg._src import dynamic_range
from kcg._src import lowering
from kcg._src import model as model_lib
from kcg._src import multi_output as multi_output_lib
from kcg._src import programs
from kcg._src import prompt as prompt_lib
from kcg._src import reciprocal as recip
from kcg._src import softmax_programs
from kcg._src import transforms
from kcg._src.options import CompileOptions, validate


class Dimensions(NamedTuple):
  """Size of a compiled CG transformer (see `dimensions`)."""

  num_layers: int
  layers_per_step: int
  init_layers: int
  width: int
  num_heads: int
  head_dim: int
  value_dim: int
  mlp_hidden: int


class CompiledState(NamedTuple):
  """CG state read from a compiled model's residual streams, batch-first.

  alpha, r, p: [B, t+1, n] (n = k for dual, p for primal); gamma, beta: [B, t]. With r > 1
  outputs every field gets a trailing axis of size r (one CG per output); for block CG gamma and
  beta are the r x r step matrices Lambda, Psi: [B, t, r, r].
  """

  alpha: jax.Array
  r: jax.Array
  p: jax.Array
  gamma: jax.Array
  beta: jax.Array


class Assembled(NamedTuple):
  """The result of compiling for one dtype (stages 1-3).

  Attributes:
    program: the program that was lowered (built with this dtype's reciprocal table and pins).
    prompt_layout: how prompts are encoded into tokens.
    config: the model's `ModelConfig` (param_dtype = this dtype).
    graphdef, params: `nnx.split` of the assembled `kcg.Transformer`.
  """

  program: craft.Program
  prompt_layout: prompt_lib.PromptLayout
  config: model_lib.ModelConfig
  graphdef: Any
  params: nnx.State


def build_program(options: CompileOptions, dtype=np.float64) -> craft.Program:
  """Stage 1: the construction `options` asks for, as blocks on named channels.

  `options` must be validated. The dtype selects the reciprocal's table and the pre-norm pins;
  the architecture (layout, blocks, schedule) is the same for every dtype (`compile_program`
  checks it).
  """
  o = options
  spec = recip.spec_for(dtype, o.newton_steps)
  rank = o.rank
  if o.attention == "softmax" and o.kernel == "exponential":
    program = softmax_programs.exponential_support_state(
        o.num_support, rank, o.num_steps, o.ridge, o.temperature, o.projection, spec)
  elif o.attention == "softmax":
    temperatures = tuple(o.temperature * (i + 1) for i in range(o.temperature_heads))
    program = softmax_programs.dot_product_support_state(
        o.num_support, rank, o.num_steps, o.ridge, temperatures, o.projection, spec)
  elif o.multi_output == "block" and o.num_outputs > 1:
    program = block_programs.block_support_state(rank, o.num_outputs, o.num_steps, o.ridge, spec)
  elif o.algorithm == "chebyshev":
    low, high = o.eig_bounds
    if o.form == "primal":
      program = chebyshev_programs.chebyshev_aggregator_primal(rank, o.num_steps, o.ridge, low,
                                                               high)
    elif o.state_placement == "support":
      program = chebyshev_programs.chebyshev_support_state(rank, o.num_steps, o.ridge, low, high)
    else:
      program = chebyshev_programs.chebyshev_aggregator_dual(o.num_support, rank, o.num_steps,
                                                             o.ridge, low, high)
  elif o.preconditioner == "jacobi":
    program = programs.jacobi_support_state(rank, o.num_steps, o.ridge, spec)
  elif o.form == "primal":
    program = programs.aggregator_primal(rank, o.num_steps, o.ridge, spec, o.carry_matvec)
  elif o.state_placement == "support":
    program = programs.support_state(rank, o.num_steps, o.ridge, spec, o.carry_matvec)
  else:
    program = programs.aggregator_dual(o.num_support, rank, o.num_steps, o.ridge, spec,
                                       o.carry_matvec)
  if o.multi_output != "block":
    program = multi_output_lib.with_outputs(program, o.num_outputs)
  sketch = o.projection if o.attention == "linear" else None
  if o.features == "random_relu":
    program = transforms.with_random_relu_features(program, *o.feature_params, sketch)
  elif sketch is not None:
    program = transforms.with_projection(program, sketch)
  if o.norm is not None:
    program = transforms.with_norm_pins(program, transforms.norm_pin(dtype), o.norm == "layernorm")
  return program


def check_same_architecture(reference: craft.Program, program: craft.Program) -> None:
  """Raises RuntimeError unless two builds of one construction differ only in numbers that
  depend on the dtype: the reciprocal's guess units and the pre-norm pins.

  Heads must be equal to the last coefficient; unit groups must have the same names, ops and
  channels (their sizes may differ: the guess has fewer breakpoints on a narrower range).
  """
  def heads(p):
    return [(b.name, b.op, [(h.name, h.op, h.query, h.key, h.value, h.output) for h in b.heads])
            for b in p.blocks]

  def units(p):
    return [[(u.name, u.op, [c for c, _ in u.pre + u.post + (u.value or ())]) for u in b.units]
            for b in p.blocks]

  def same_heads(a, b):
    try:
      np.testing.assert_equal(a, b)
    except AssertionError:
      return False
    return True

  checks = {
      "construction": reference.construction == program.construction,
      "transforms": reference.transforms == program.transforms,
      "layout": reference.layout == program.layout,
      "schedule": reference.schedule == program.schedule,
      "step_ends": reference.step_ends == program.step_ends,
      "readout": reference.readout == program.readout,
      "state": dict(reference.state) == dict(program.state),
      "baked": dict(reference.baked) == dict(program.baked),
      "embedding routes": ([(f, c) for f, c, _ in reference.embedding]
                           == [(f, c) for f, c, _ in program.embedding]),
      "heads": same_heads(heads(reference), heads(program)),
      "units": units(reference) == units(program),
  }
  differ = [name for name, same in checks.items() if not same]
  if differ:
    raise RuntimeError(f"The builds of {reference.name!r} for two dtypes differ in {differ}: a "
                       "builder depends on the dtype beyond the reciprocal's table and the pins.")


def _uses_position(program: craft.Program) -> bool:
  return any(name == "position" for name, _ in program.layout.channels)


def compile_program(options: CompileOptions, dtype) -> Assembled:
  """Stages 1-3 for validated `options`, parameters in `dtype`.

  The architecture (the model config) comes from the float64 build; the weights from the build
  for `dtype`, which must agree with it (`check_same_architecture`). The parameters are concrete
  even when this runs inside a trace (`CompiledCG` builds a dtype's model on its first call, which
  may be under jax.jit): a model cached from a trace would hold its tracers.
  """
  with jax.ensure_compile_time_eval():
    return _compile_program(options, jnp.dtype(dtype))


def _compile_program(options: CompileOptions, dtype) -> Assembled:
  architecture = build_program(options, np.float64)
  program = architecture if dtype == jnp.float64 else build_program(options, dtype)
  check_same_architecture(architecture, program)
  prompt_layout = prompt_lib.make_layout(options.num_support, 1, options.input_dim,
                                         positional=_uses_position(architecture),
                                         num_outputs=options.num_outputs)
  config = lowering.config_for_program(architecture, prompt_layout, options.mask, dtype,
                                 options.attention, options.norm)
  model = lowering.assemble(config, lowering.lower(program, prompt_layout, config), dtype)
  graphdef, params = nnx.split(model)
  return Assembled(program, prompt_layout, config, graphdef, params)


def _default_dtype():
  return jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 iff x64 is enabled


class CompiledCG:
  """A compiled solver transformer: runs the `Assembled` model of its options in any float dtype.

  Attributes:
    options: the validated `CompileOptions`; each option is also an attribute (num_support,
      feature_dim, num_steps, ridge, mask, form, state_placement ("support" or "aggregator"),
      algorithm, eig_bounds, attention, kernel, temperature, temperature_heads, projection,
      preconditioner, features, feature_params, input_dim, num_outputs, multi_output, norm).
    rank: the size of the feature channels: feature_dim, or m for a linear-attention projection
      S [m, feature_dim] (sketched KRR on psi(x) = S phi(x)).
    dtype: the parameter dtype of `.model`.
    model: the NNX model holding the compiled parameters (in `dtype`).
    params: `nnx.state(model, nnx.Param)`.
    config: its `ModelConfig`.
    program: the construction (layout, blocks, where the state lives), as lowered for `dtype`.
    prompt_layout: the prompt encoding (one query; `encode` sets the number of queries).
  """

  def __init__(self, options: CompileOptions, assembled: Assembled, dtype):
    self.options = options
    self.dtype = jnp.dtype(dtype)
    # One assembled model per dtype that prompts have come in, kept on the instance.
    self._assembled = {self.dtype: assembled}
    self.program = assembled.program
    self.prompt_layout = assembled.prompt_layout
    self.config = assembled.config
    self.params = assembled.params
    self.model = nnx.merge(assembled.graphdef, assembled.params)
    o = options
    self.num_support, self.feature_dim, self.num_steps = o.num_support, o.feature_dim, o.num_steps
    self.ridge, self.mask, self.form = o.ridge, o.mask, o.form
    self.state_placement, self.algorithm, self.eig_bounds = (o.state_placement, o.algorithm,
                                                             o.eig_bounds)
    self.attention, self.kernel, self.temperature = o.attention, o.kernel, o.temperature
    self.temperature_heads, self.projection = o.temperature_heads, o.projection
    self.preconditioner, self.features = o.preconditioner, o.features
    self.feature_params, self.input_dim = o.feature_params, o.input_dim
    self.num_outputs, self.multi_output, self.norm = o.num_outputs, o.multi_output, o.norm
    self.rank = o.rank

  def _assembled_for(self, dtype) -> Assembled:
    dtype = jnp.dtype(dtype)
    if dtype not in self._assembled:
      self._assembled[dtype] = compile_program(self.options, dtype)
    return self._assembled[dtype]

  def norm_pin_for(self, dtype) -> float | None:
    """M of the pre-norm pins of this model in `dtype` (`transforms.norm_pin`), or None."""
    return None if self.norm is None else transforms.norm_pin(dtype)

  @property
  def dimensions(self) -> Dimensions:
    """Depth and width of this model, read from its own program and config."""
    ends = self.program.step_ends
    return Dimensions(num_layers=self.config.num_layers,
                      layers_per_step=(ends[1] - ends[0]) if len(ends) > 1 else 0,
                      init_layers=ends[0], width=self.config.width,
                      num_heads=self.config.num_heads, head_dim=self.config.head_dim,
                      value_dim=self.config.resolved_value_dim, mlp_hidden=self.config.mlp_hidden)

  def kernel_features(self, x) -> jax.Array:
    """The features `[..., rank]` the model's kernel reads at inputs `x [..., d]`.

    `S phi(x)`: phi the identity or the random-ReLU layer `relu(W x + b) / sqrt(m)`, S the
    linear-attention projection (softmax routes keep U inside their kernel: phi(x) there). The
    model's CG is KRR on these features, so this is what references and oracles take as `phi`.
    """
    x = jnp.asarray(x)
    highest = jax.lax.Precision.HIGHEST
    if self.feature_params is not None:
      weights, bias = (jnp.asarray(a, x.dtype) for a in self.feature_params)
      bias = bias.reshape((1,) * (x.ndim - 1) + bias.shape)
      x = jax.nn.relu(jnp.matmul(x, weights.T, precision=highest) + bias) / jnp.sqrt(
          jnp.asarray(weights.shape[0], x.dtype))
    if self.projection is not None and self.attention == "linear":
      x = jnp.matmul(x, jnp.asarray(self.projection, x.dtype).T, precision=highest)
    return x

  def encode(self, x_support, y_support, x_query) -> tuple[jax.Array, prompt_lib.PromptLayout]:
    """The prompt's input tokens `[B, k + 1 + q, token_dim]` and their layout (q from x_query)."""
    x_query = jnp.asarray(x_query)
    num_query = x_query.shape[1] if x_query.ndim == 3 else 0
    if num_query < 1:
      raise ValueError(f"x_query must have shape [batch, num_query >= 1, {self.input_dim}], "
                       f"got {x_query.shape}.")
    layout = self.prompt_layout._replace(num_query=num_query)
    return prompt_lib.encode(layout, x_support, y_support, x_query), layout

  def forward(self, x_support, y_support, x_query, *, return_residuals=False, head_mask=None,
              layer_mask=None) -> model_lib.ForwardOutput:
    """Runs the model on encoded prompts; see `kcg.Transformer.__call__`.

    Unlike `predict`, no dynamic-range check: the residual streams of any prompt can be read.
    """
    tokens, layout = self.encode(x_support, y_support, x_query)
    assembled = self._assembled_for(tokens.dtype)
    return _apply(assembled.graphdef, assembled.params, tokens, layout.num_prefix,
                  return_residuals, head_mask, layer_mask)

  def predict(self, x_support, y_support, x_query, *, normalize: bool = False) -> jax.Array:
    """f_t(x_query) [B, q] for x_support [B,k,d], y_support [B,k], x_query [B,q,d].

    The model divides with a reciprocal that is exact on a fixed interval, so a prompt whose
    scale can push a divided quantity (r.r, p.Ap, ...) out of it raises ValueError, naming the
    quantity and the fix (kcg._src.dynamic_range; ranges in BUILD.md). normalize=True instead
    divides each prompt's y (each output column) by a power of two that centres those quantities
    and multiplies the prediction back, exactly (KRR is linear in y); x cannot be rescaled here,
    the ridge being a weight. Both need concrete inputs: under jax.jit the check cannot run (the
    prompt is not checked) and normalize=True raises.
    """
    y_support, scale = dynamic_range.prepare(self, x_support, y_support, x_query, normalize)
    tokens, layout = self.encode(x_support, y_support, x_query)
    assembled = self._assembled_for(tokens.dtype)
    outputs = _apply(assembled.graphdef, assembled.params, tokens, layout.num_prefix, False, None,
                     None).outputs
    predictions = prompt_lib.query_outputs(layout, outputs)
    dynamic_range.check_finite(predictions, tokens.dtype)
    return dynamic_range.restore(predictions, scale)

  def predict_steps(self, x_support, y_support, x_query, *, normalize: bool = False) -> jax.Array:
    """f_t(x_query) for every t = 0..num_steps from one forward pass: [B, t+1, q] ([.., r]).

    Read from the prediction channel of the query tokens after the layers of each step. Range
    check and `normalize` as in `predict`.
    """
    y_support, scale = dynamic_range.prepare(self, x_support, y_support, x_query, normalize)
    out = self.forward(x_support, y_support, x_query, return_residuals=True)
    at_step_ends = out.residuals[jnp.asarray(self.program.step_ends)]  # [t+1, B, T, D]
    columns = self.program.layout.slice(self.program.readout)
    first_query = self.prompt_layout.num_prefix
    steps = jnp.moveaxis(at_step_ends[:, :, first_query:, columns], 0, 1)
    dynamic_range.check_finite(steps, steps.dtype)
    return dynamic_range.restore(steps[..., 0] if self.num_outputs == 1 else steps, scale)

  def read_state(self, residuals_LxBxTxD: jax.Array) -> CompiledState:
    """The CG state after each step, read from the named channels of the residual streams."""
    ends = jnp.asarray(self.program.step_ends)
    at_step_ends = residuals_LxBxTxD[ends]  # [t+1, B, T, D]
    agg = self.prompt_layout.aggregator_index
    k = self.num_support
    r = self.num_outputs
    if self.multi_output == "block" and r > 1:  # Lambda and Psi are r x r: [B, t, r, r]
      return CompiledState(*block_programs.read_state(self.program, residuals_LxBxTxD, k))

    def read(name):
      location = self.program.state[name]
      cols = self.program.layout.slice(location.channel)
      if location.tokens == "support":
        values = at_step_ends[:, :, :k, cols]  # [t+1, B, k, r]
      else:  # output c in entries [c n, (c + 1) n): [t+1, B, r n] -> [t+1, B, n, r]
        flat = at_step_ends[:, :, agg, cols]
        values = jnp.swapaxes(flat.reshape(flat.shape[:2] + (r, flat.shape[-1] // r)), -1, -2)
      values = jnp.moveaxis(values, 0, 1)
      return values[..., 0] if r == 1 else values

    alpha = read("alpha")
    scalars = []
    for name in ("gamma", "beta"):
      if name in self.program.baked:  # step sizes that are weights (Chebyshev)
        constants = jnp.asarray(self.program.baked[name], alpha.dtype)
        shape = (alpha.shape[0], len(constants)) + ((r,) if r > 1 else ())
        scalars.append(jnp.broadcast_to(constants.reshape((1, -1) + (1,) * (r > 1)), shape))
      else:
        scalars.append(read(name)[:, 1:, 0])
    return CompiledState(alpha, read("r"), read("p"), *scalars)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _apply(graphdef, state, tokens, num_prefix, return_residuals, head_mask, layer_mask):
  model = nnx.merge(graphdef, state)
  return model(tokens, num_prefix=num_prefix, return_residuals=return_residuals,
               head_mask=head_mask, layer_mask=layer_mask)


def compile_options(options: CompileOptions, *, dtype=None,
                    refuse_inexact: bool = True) -> CompiledCG:
  """Validates `options`, compiles them for `dtype` (default: float64 iff x64 is enabled) and
  returns the runner. `refuse_inexact` as in `options.validate`."""
  options = validate(options, refuse_inexact=refuse_inexact)
  dtype = _default_dtype() if dtype is None else dtype
  return CompiledCG(options, compile_program(options, dtype), dtype)


def compile_chebyshev(num_support: int, feature_dim: int, num_steps: int, ridge: float, *,
                      eig_bounds, mask: str = "causal", form: str = "dual",
                      features: str = "identity", state_placement: str = "auto",
                      input_dim: int | None = None, feature_params=None, projection=None,
                      num_outputs: int = 1, norm: str | None = None, dtype=None) -> CompiledCG:
  """Compiles t steps of Chebyshev semi-iteration for KRR, given eig(A) in eig_bounds = (lo, hi).

  A = K + ridge I (dual) or Phi^T Phi + ridge I (primal). The step sizes depend only on (lo, hi),
  so they are weights of each layer: no reductions, no division, one layer per step (two for the
  dual form under the causal mask). Worst-case rate 2 ((sqrt(kappa)-1)/(sqrt(kappa)+1))^t with
  kappa = hi/lo, CG's bound; unlike CG it needs the bounds and does not adapt to the spectrum.
  Arguments and result as in `compile_cg` (`projection` as for linear attention there);
  norm="layernorm" is accepted (no division: 1e-12 of the plain model, BUILD.md).
  """
  return compile_options(CompileOptions(
      num_support, feature_dim, num_steps, ridge, algorithm="chebyshev", eig_bounds=eig_bounds,
      mask=mask, form=form, features=features, state_placement=state_placement,
      input_dim=input_dim, feature_params=feature_params, projection=projection,
      num_outputs=num_outputs, norm=norm), dtype=dtype)


def dimensions(num_support: int, feature_dim: int, num_steps: int, *, mask: str = "causal",
               form: str = "dual", state_placement: str = "auto", preconditioner=None,
               num_outputs: int = 1, multi_output: str = "independent",
               norm: str | None = None, newton_steps: int = 4,
               carry_matvec: bool = False) -> Dimensions:
  """Depth and width of `compile_cg(...)` (linear attention) as explicit functions of k, p, t, r.

  num_layers(t) = init_layers + t * layers_per_step; width(k, p, r) is the layout's size. A model
  compiled with a projection S [m, p] (linear attention) has the dimensions of feature_dim = m.
  Builds the programs only (no weights), so it is cheap at any t.
  """
  options = validate(CompileOptions(
      num_support, feature_dim, num_steps, 1.0, mask=mask, form=form,
      state_placement=state_placement, preconditioner=preconditioner, num_outputs=num_outputs,
      multi_output=multi_output, norm=norm, newton_steps=newton_steps,
      carry_matvec=carry_matvec))
  full, one, zero = (build_program(options.replace(num_steps=t)) for t in (num_steps, 1, 0))
  req = craft.requirements(full.layout, full.blocks)
  init_layers = len(zero.schedule)
  per_step = len(one.schedule) - init_layers
  return Dimensions(num_layers=init_layers + num_steps * per_step, layers_per_step=per_step,
                    init_layers=init_layers, width=full.layout.width, num_heads=req.num_heads,
                    head_dim=req.head_dim, value_dim=req.value_dim, mlp_hidden=req.mlp_hidden)


def compile_cg(num_support: int, feature_dim: int, num_steps: int, ridge: float, *,
               mask: str = "causal", form: str = "dual", attention: str = "linear",
               features: str = "identity", state_placement: str = "auto",
               input_dim: int | None = None, feature_params=None, preconditioner=None,
               kernel: str | None = None, temperature: float | None = None, projection=None,
               temperature_heads: int = 2, num_outputs: int = 1,
               multi_output: str = "independent", norm: str | None = None,
               newton_steps: int = 4, carry_matvec: bool = False, dtype=None) -> CompiledCG:
  """Compiles t-step CG for kernel ridge regression into a `kcg.Transformer`.

  Args:
    num_support: k, supports per prompt.
    feature_dim: p, size of phi(x) (= input dim for features="identity").
    num_steps: t >= 0 CG steps.
    ridge: lambda > 0.
    mask: "causal" (default) or "prefix".
    form: "dual" (default; CG on (K + ridge I) alpha = y, as in the theorem) or "primal"
      (CG on (Phi^T Phi + ridge I) w = Phi^T y).
    attention: "linear" (unnormalised) or "softmax".
    kernel: with attention="softmax": "exponential" (Route A, exact: KRR with the kernel
      exp(<U phi_i, U phi_j> / temperature), per-support state, mask="prefix") or
      "linear" (Route B, approximate: the dot-product kernel from softmax heads at temperatures
      tau, 2 tau, .., h tau combined by Richardson extrapolation, h = temperature_heads:
      sum_m w_m tau_m ((K~_{tau_m} p)_i - sum_j p_j) = (K p)_i + O(tau^-h); the mat-vec error
      eps(h, tau) is measured in BUILD.md). Default: "linear" for linear attention,
      "exponential" for softmax.
    temperature: tau > 0 of the softmax kernels.
    projection: U [m, p] of the kernel (identity by default). With attention="softmax" it sits
      inside the exponential; with linear attention the model runs on psi(x) = U phi(x): KRR on
      the rank-m sketch K_m = Phi U^T U Phi^T, in a residual stream sized for m features
      (`kcg.dimensions(k, m, t)`), the construction for width below the feature dimension.
    temperature_heads: h for Route B (heads at tau, 2 tau, ..., h tau).
    features: "identity" (phi(x) = x) or "random_relu" (a first ReLU layer computes
      phi(x) = relu(W x + b) / sqrt(m), m = feature_dim, from `feature_params`).
    state_placement: "auto" (per-support state for dual + prefix, the aggregator otherwise),
      "support" or "aggregator".
    input_dim: d, defaults to feature_dim (identity) or the feature weights' input size.
    feature_params: for features="random_relu": `kcg.features.random_relu(m).init(key, d)`.
    preconditioner: None, or "jacobi" for PCG with M = diag(K) + ridge I (form="dual",
      mask="prefix": each support scales its residual by 1/M_ii; needs a gated MLP, so the
      model gets activation="reglu").
    num_outputs: r, the number of targets per support (y_support [B, k, r]; predictions
      [B, q, r]). Solves (K + ridge I) A = Y.
    multi_output: with r > 1, "independent" (r CGs, one per column, in one model: the kernel
      mat-vec head is shared by all columns, the reductions and step sizes are per column, so
      heads per layer grow r-fold and depth does not; see kcg._src.multi_output) or "block"
      (block CG: one r x r step matrix per step, converges in ~k/r steps; dual form, prefix mask).
    norm: None or "rmsnorm": the pre-norm variant of the model (a norm before every attention
      and MLP, and before the readout), as the trained models use. Pinning channels (+M, -M, ..)
      make every token's normaliser the same power of two, which the norm gains undo
      (kcg._src.transforms.with_norm_pins): the outputs equal norm=None's bit for bit in float64,
      and in float32 until CG has converged below the reciprocal's range (then to ~1e-8; BUILD.md).
      "layernorm" is refused with the reason (its centring breaks the reciprocal; see
      `kcg.routes.layernorm_departure`); `compile_chebyshev` has no division and accepts it.
    newton_steps: 4 (default), 3 or 2 Newton steps per reciprocal, each one layer of every CG
      step (plain CG: 4 + newton_steps layers per step); fewer steps take a finer initial guess,
      345, 884 or 9284 MLP units (BUILD.md, "Layers per CG step"). Exact in float64 either way.
    carry_matvec: plain CG only: form the next mat-vec together with p = r + beta p_prev
      (Kp = K r + beta Kp_prev), one layer less per step (two for the causal dual): 4 +
      newton_steps layers. Exact as well; kcg.ablations refuses these models (removing a mat-vec
      head would damage every later step through Kp_prev, which its damaged reference does not
      model).
    dtype: parameter dtype of `.model`; default float64 when x64 is enabled, else float32.
      `predict` computes in the dtype of its inputs whatever this is.

  Returns:
    A `CompiledCG` with `.model`, `.params`, `.predict(x_support, y_support, x_query)`.
  """
  return compile_options(CompileOptions(
      num_support, feature_dim, num_steps, ridge, mask=mask, form=form, attention=attention,
      features=features, state_placement=state_placement, input_dim=input_dim,
      feature_params=feature_params, preconditioner=preconditioner, kernel=kernel,
      temperature=temperature, projection=projection, temperature_heads=temperature_heads,
      num_outputs=num_outputs, multi_output=multi_output, norm=norm, newton_steps=newton_steps,
      carry_matvec=carry_matvec), dtype=dtype)
