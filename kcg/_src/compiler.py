"""`compile_cg`: transformer weights whose forward pass runs t steps of CG for kernel ridge regression.

One public entry point that validates its arguments, then runs named stages:

1. `program`: CG as blocks on named residual channels (kcg._src.programs).
2. `lower`: each block to the arrays of one layer, shaped from the model's own abstract state.
3. `assemble`: the arrays into the NNX state of `kcg.Transformer` (nnx.eval_shape -> nnx.state ->
   replace -> nnx.update), with a check that the tree structure, shapes and dtypes equal those of
   a freshly initialised model of the same config.

The result predicts `f_t(x) = k(x)^T alpha_t` (dual) or `phi(x)^T w_t` (primal) for a batch of
prompts, in the dtype of its inputs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kcg._src import block_programs
from kcg._src import checks
from kcg._src import craft
from kcg._src import dynamic_range
from kcg._src import model as model_lib
from kcg._src import multi_output as multi_output_lib
from kcg._src import programs
from kcg._src import prompt as prompt_lib
from kcg._src import reciprocal as recip
from kcg._src import softmax_programs

MASKS = ("causal", "prefix")
FORMS = ("dual", "primal")
STATE_PLACEMENTS = ("auto", "support", "aggregator")
FEATURES = ("identity", "random_relu")


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


def _validate(num_support, feature_dim, num_steps, ridge, mask, form, attention, features,
              state_placement, input_dim, feature_params=None):
  def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")

  positive_int("num_support", num_support)
  positive_int("feature_dim", feature_dim)
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
    raise ValueError(f"num_steps must be an int >= 0 (the number of CG steps), got {num_steps!r}.")
  ridge = checks.scalar_ridge(ridge)
  if mask not in MASKS:
    raise ValueError(f"mask={mask!r} is not one of {MASKS}.")
  if form not in FORMS:
    raise ValueError(f"form={form!r} is not one of {FORMS}.")
  if attention not in ("linear", "softmax"):
    raise ValueError(f"attention={attention!r} is not one of ('linear', 'softmax').")
  if features not in FEATURES:
    raise ValueError(f"features={features!r} is not one of {FEATURES}.")
  if state_placement not in STATE_PLACEMENTS:
    raise ValueError(f"state_placement={state_placement!r} is not one of {STATE_PLACEMENTS}.")
  if state_placement == "support" and (form != "dual" or mask != "prefix"):
    raise ValueError(
        "state_placement='support' (alpha_i, r_i, p_i in support token i) needs form='dual' and "
        "mask='prefix': under a causal mask support i cannot read supports j > i, so it can form "
        "neither (Kp)_i nor the reductions r.r and p.Ap. Use mask='prefix', or "
        "state_placement='aggregator' (the whole state in the aggregator token).")
  if features == "identity" and input_dim is not None and input_dim != feature_dim:
    raise ValueError(f"features='identity' needs input_dim == feature_dim, got input_dim={input_dim} "
                     f"and feature_dim={feature_dim}.")
  if features == "identity" and feature_params is not None:
    raise ValueError("feature_params is only used with features='random_relu'.")
  if features == "random_relu":
    if feature_params is None:
      raise ValueError("features='random_relu' needs feature_params=kcg.features.random_relu(m)"
                       ".init(key, input_dim) (the weights the first layer uses).")
    for array in feature_params:
      checks.check_real("feature_params", array)
    weights = np.asarray(feature_params[0])
    if weights.ndim != 2 or weights.shape[0] != feature_dim:
      raise ValueError(f"feature_params weights must have shape [feature_dim={feature_dim}, "
                       f"input_dim], got {weights.shape}.")
    if input_dim is not None and weights.shape[1] != input_dim:
      raise ValueError(f"feature_params weights have input dim {weights.shape[1]}, but "
                       f"input_dim={input_dim}.")
  return int(num_support), int(feature_dim), int(num_steps), ridge


def _resolve_placement(form, mask, state_placement):
  if state_placement != "auto":
    return state_placement
  return "support" if (form == "dual" and mask == "prefix") else "aggregator"


def build_program(num_support, feature_dim, num_steps, ridge, *, mask="causal", form="dual",
                  state_placement="auto", reciprocal_spec=None,
                  preconditioner=None) -> programs.Program:
  """Stage 1: the construction as blocks on named channels."""
  spec = reciprocal_spec or recip.default_spec(np.float64)
  placement = _resolve_placement(form, mask, state_placement)
  if preconditioner == "jacobi":
    return programs.jacobi_support_state(feature_dim, num_steps, ridge, spec)
  if form == "primal":
    return programs.aggregator_primal(feature_dim, num_steps, ridge, spec)
  if placement == "support":
    return programs.support_state(feature_dim, num_steps, ridge, spec)
  return programs.aggregator_dual(num_support, feature_dim, num_steps, ridge, spec)


def model_config(program: programs.Program, prompt_layout: prompt_lib.PromptLayout, mask: str,
                 param_dtype, attention: str = "linear", norm: str | None = None
                 ) -> model_lib.ModelConfig:
  """The smallest `ModelConfig` that carries the program (mask and attention as requested)."""
  req = craft.requirements(program.layout, program.blocks)
  return model_lib.ModelConfig(
      token_dim=prompt_layout.token_dim, width=program.layout.width,
      num_layers=len(program.schedule), param_layers=program.schedule, num_heads=req.num_heads, head_dim=req.head_dim,
      value_dim=req.value_dim, mlp_hidden=req.mlp_hidden, attention=attention,
      attention_scale=1.0, activation="reglu" if req.gated else "relu",
      norm=norm, mask=mask, output_dim=program.layout.size(program.readout), use_bias=True,
      precision="highest",
      param_dtype=param_dtype)


def lower(program: programs.Program, prompt_layout: prompt_lib.PromptLayout,
          config: model_lib.ModelConfig) -> dict:
  """Stage 2: float64 NumPy arrays for every parameter, shaped from the model's abstract state."""
  shapes = jax.tree.map(lambda s: s.shape, model_lib.param_shapes(config))
  block_shapes = dict(shapes["blocks"])
  arrays = {"blocks": craft.lower_blocks(program.layout, program.blocks, block_shapes)}
  embed = np.zeros(shapes["embed"]["kernel"], np.float64)
  for feature, channel, coef in program.embedding:
    rows = prompt_layout.feature_slice(feature)
    cols = program.layout.slice(channel)
    embed[rows, cols] += craft.as_matrix(coef, rows.stop - rows.start, cols.stop - cols.start)
  readout = np.zeros(shapes["readout"]["kernel"], np.float64)
  readout[program.layout.slice(program.readout), :] = np.eye(program.layout.size(program.readout))
  arrays["embed"] = {"kernel": embed, "bias": np.zeros(shapes["embed"]["bias"])}
  arrays["readout"] = {"kernel": readout, "bias": np.zeros(shapes["readout"]["bias"])}
  if config.norm is not None:
    _pin_norms(arrays, program, config)
  return arrays


# Parameters that read the (normalised) residual stream: [..., D, n] with D on axis -2.
_READS = ("query", "key", "value", "mlp_in", "mlp_value")


def _pin_norms(arrays: dict, program: programs.Program, config: model_lib.ModelConfig) -> None:
  """Pre-norm: gains that undo the pinned normaliser; zero-sum reads for LayerNorm's centring.

  See `programs.with_norm_pins`: with gains M sqrt(n / D) every norm is the identity (RMSNorm) or
  h - mean(h) (LayerNorm), and a read w with sum_c w_c = 0 sees w . h either way.
  """
  if program.norm_pin is None:
    raise ValueError("A pre-norm model needs a program with pinning channels "
                     "(programs.with_norm_pins).")
  num_pins = program.layout.size("norm_pin")
  gain = program.norm_pin * math.sqrt(num_pins / config.width)  # a power of two (norm_pin_count)
  names = [name for name in arrays["blocks"] if name.endswith("norm_scale")]
  for name in names:
    arrays["blocks"][name][...] = gain
  arrays["final_norm_scale"] = np.full((config.width,), gain)
  if config.norm == "layernorm":
    zero = program.layout.slice("norm_zero").start
    reads = [arrays["blocks"][name] for name in _READS if name in arrays["blocks"]]
    for w in reads + [arrays["readout"]["kernel"]]:
      w[..., zero, :] = 0.0
      w[..., zero, :] = -w.sum(axis=-2)
    arrays["final_norm_bias"] = np.zeros((config.width,))


def assemble(config: model_lib.ModelConfig, arrays: dict, dtype) -> model_lib.Transformer:
  """Stage 3: load the arrays into the model class through NNX's state API."""
  model = model_lib.abstract_model(config)
  reference = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(reference)
  filled = jax.tree.map(lambda shape_dtype, a: jnp.asarray(a, dtype), pure, arrays)
  chex.assert_trees_all_equal_shapes(pure, filled)
  chex.assert_trees_all_equal_structs(pure, filled)
  nnx.replace_by_pure_dict(reference, filled)
  nnx.update(model, reference)
  return model


def _build_program(spec, dtype, *, num_support, rank, num_steps, ridge, mask, form,
                   state_placement, algorithm="cg", eig_bounds=None, preconditioner=None,
                   attention="linear", kernel="linear", temperature=None, projection=None,
                   temperature_heads=1, num_outputs=1, multi_output="independent", norm=None,
                   features="identity", feature_params=None) -> programs.Program:
  """Stage 1 for every option of `compile_cg` / `compile_chebyshev` (validated by the caller).

  rank: the feature channels' size (feature_dim, or m for a linear-attention projection [m, p]);
  spec=None takes float64's reciprocal table (the architecture never depends on it).
  """
  spec = spec or recip.default_spec(np.float64)
  if attention == "softmax" and kernel == "exponential":
    program = softmax_programs.exponential_support_state(
        num_support, rank, num_steps, ridge, temperature, projection, spec)
  elif attention == "softmax":
    temperatures = tuple(temperature * (i + 1) for i in range(temperature_heads))
    program = softmax_programs.dot_product_support_state(
        num_support, rank, num_steps, ridge, temperatures, projection, spec)
  elif multi_output == "block" and num_outputs > 1:
    program = block_programs.block_support_state(rank, num_outputs, num_steps, ridge, spec)
  elif algorithm == "chebyshev":
    program = build_chebyshev_program(num_support, rank, num_steps, ridge, eig_bounds, mask=mask,
                                      form=form, state_placement=state_placement)
  else:
    program = build_program(num_support, rank, num_steps, ridge, mask=mask, form=form,
                            state_placement=state_placement, reciprocal_spec=spec,
                            preconditioner=preconditioner)
  if multi_output != "block":
    program = multi_output_lib.with_outputs(program, num_outputs)
  sketch = projection if attention == "linear" else None
  if features == "random_relu":
    program = programs.with_random_relu_features(program, *feature_params, sketch)
  elif sketch is not None:
    program = programs.with_projection(program, sketch)
  if norm is not None:
    program = programs.with_norm_pins(program, norm_pin(dtype), norm == "layernorm")
  return program


class CompiledCG:
  """A CG transformer: `.model` (kcg.Transformer with the compiled state), `.params`, `.predict`.

  Attributes:
    model: the NNX model holding the compiled parameters (in `dtype`).
    params: `nnx.state(model, nnx.Param)`.
    config: its `ModelConfig`.
    program: the construction (layout, blocks, where the CG state lives).
    num_support, feature_dim, num_steps, ridge, mask, form: what was compiled.
    rank: the size of the feature channels: feature_dim, or m for a linear-attention projection
      S [m, feature_dim] (sketched KRR on psi(x) = S phi(x)).
  """

  def __init__(self, *, num_support, feature_dim, num_steps, ridge, mask, form, state_placement,
               dtype, algorithm="cg", eig_bounds=None, features="identity",
               feature_params=None, preconditioner=None, attention="linear",
               kernel="linear", temperature=None, projection=None, temperature_heads=1,
               num_outputs=1, multi_output="independent", norm=None):
    self.num_support = num_support
    self.feature_dim = feature_dim
    self.num_steps = num_steps
    self.ridge = ridge
    self.mask = mask
    self.form = form
    self.algorithm = algorithm
    self.eig_bounds = eig_bounds
    self.preconditioner = preconditioner
    self.attention = attention
    self.kernel = kernel
    self.temperature = temperature
    self.projection = projection
    # Linear attention with a projection S [m, p] runs on psi = S phi: the stream is m wide.
    self.rank = (projection.shape[0] if (projection is not None and attention == "linear")
                 else feature_dim)
    self.temperature_heads = temperature_heads
    self.num_outputs = num_outputs
    self.multi_output = multi_output
    self.norm = norm
    self.features = features
    self.feature_params = (None if feature_params is None else
                           tuple(np.asarray(a, np.float64) for a in feature_params))
    self.input_dim = (feature_dim if self.feature_params is None
                      else self.feature_params[0].shape[1])
    self.dtype = jnp.dtype(dtype)
    placement = _resolve_placement(form, mask, state_placement)
    self.state_placement = placement
    # One program for every dtype: only the reciprocal's table differs, never the architecture.
    self.program = self._build(None, jnp.float64)
    self.prompt_layout = prompt_lib.make_layout(num_support, 1, self.input_dim,
                                                positional=_uses_position(self.program),
                                                num_outputs=num_outputs)
    self.config = model_config(self.program, self.prompt_layout, mask, self.dtype, attention, norm)
    self.model = self._model_for(self.dtype)
    self.params = nnx.state(self.model, nnx.Param)

  def _build(self, spec, dtype) -> programs.Program:
    return _build_program(
        spec, dtype, num_support=self.num_support, rank=self.rank, num_steps=self.num_steps,
        ridge=self.ridge, mask=self.mask, form=self.form, state_placement=self.state_placement,
        algorithm=self.algorithm, eig_bounds=self.eig_bounds, preconditioner=self.preconditioner,
        attention=self.attention, kernel=self.kernel, temperature=self.temperature,
        projection=self.projection, temperature_heads=self.temperature_heads,
        num_outputs=self.num_outputs, multi_output=self.multi_output, norm=self.norm,
        features=self.features, feature_params=self.feature_params)

  @functools.lru_cache(maxsize=4)
  def _model_for(self, dtype) -> model_lib.Transformer:
    dtype = jnp.dtype(dtype)
    program = self._build(recip.default_spec(dtype), dtype)
    arrays = lower(program, self.prompt_layout, self.config)
    return assemble(self.config, arrays, dtype)

  def norm_pin_for(self, dtype) -> float | None:
    """M of the pre-norm pins of this model in `dtype` (`norm_pin`), or None without a norm."""
    return None if self.norm is None else norm_pin(dtype)

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
    graphdef, state = self._split_for(tokens.dtype)
    return _apply(graphdef, state, tokens, layout.num_prefix, return_residuals, head_mask,
                  layer_mask)

  @functools.lru_cache(maxsize=4)
  def _split_for(self, dtype):
    return nnx.split(self._model_for(dtype))

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
    graphdef, state = self._split_for(tokens.dtype)
    outputs = _apply(graphdef, state, tokens, layout.num_prefix, False, None, None).outputs
    return dynamic_range.restore(prompt_lib.query_outputs(layout, outputs), scale)

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
      if not isinstance(self.program.state[name], programs.StateLocation):  # baked (Chebyshev)
        constants = jnp.asarray(self.program.state[name], alpha.dtype)
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


def norm_pin(dtype) -> float:
  """M of the pre-norm pinning channels, a power of two near sqrt(max float) / 2^8.

  Large enough that |rest|^2 / (4 M^2) is below rounding even for the reciprocal channels
  (up to ~1e40 in float64, 1e18 in float32); a power of two so that LayerNorm's mean absorbs
  the signal in any partial sum holding +-M exactly and +M - M cancels exactly: 2^500 in
  float64, 2^60 in float32 (see programs.with_norm_pins)."""
  finfo = jnp.finfo(dtype)
  return 2.0 ** (int(finfo.maxexp) // 2 - 12)


def _uses_position(program) -> bool:
  return any(name == "position" for name, _ in program.layout.channels)


def build_chebyshev_program(num_support, feature_dim, num_steps, ridge, eig_bounds, *,
                            mask="causal", form="dual", state_placement="auto") -> programs.Program:
  """Stage 1 for Chebyshev semi-iteration: coefficients baked into per-layer weights."""
  low, high = (float(b) for b in eig_bounds)
  placement = _resolve_placement(form, mask, state_placement)
  if form == "primal":
    return programs.chebyshev_aggregator_primal(feature_dim, num_steps, ridge, low, high)
  if placement == "support":
    return programs.chebyshev_support_state(feature_dim, num_steps, ridge, low, high)
  return programs.chebyshev_aggregator_dual(num_support, feature_dim, num_steps, ridge, low, high)


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
  Arguments and result as in `compile_cg` (`projection` as for linear attention there).
  """
  num_support, feature_dim, num_steps, ridge = _validate(
      num_support, feature_dim, num_steps, ridge, mask, form, "linear", features, state_placement,
      input_dim, feature_params)
  projection = None if projection is None else _check_projection(projection, feature_dim)
  _validate_outputs(num_outputs, "independent", "linear", form, mask, None)
  _validate_norm(norm)
  try:
    low, high = (float(b) for b in eig_bounds)
  except (TypeError, ValueError):
    raise ValueError(f"eig_bounds must be a pair (low, high), got {eig_bounds!r}.") from None
  if not (0 < low <= high and math.isfinite(high)):
    raise ValueError(f"eig_bounds must satisfy 0 < low <= high < inf, got {eig_bounds!r}; the "
                     "spectrum of K + ridge I lies in [ridge, ridge + ||Phi||_2^2].")
  if dtype is None:
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
  return CompiledCG(num_support=num_support, feature_dim=feature_dim, num_steps=num_steps,
                    ridge=ridge, mask=mask, form=form, state_placement=state_placement,
                    dtype=dtype, algorithm="chebyshev", eig_bounds=(low, high), features=features,
                    feature_params=feature_params, projection=projection,
                    num_outputs=int(num_outputs), norm=norm)


def dimensions(num_support: int, feature_dim: int, num_steps: int, *, mask: str = "causal",
               form: str = "dual", state_placement: str = "auto", preconditioner=None,
               num_outputs: int = 1, multi_output: str = "independent",
               norm: str | None = None) -> Dimensions:
  """Depth and width of `compile_cg(...)` (linear attention) as explicit functions of k, p, t, r.

  num_layers(t) = init_layers + t * layers_per_step; width(k, p, r) is the layout's size. A model
  compiled with a projection S [m, p] (linear attention) has the dimensions of feature_dim = m.
  Builds the programs only (no weights), so it is cheap at any t.
  """
  _validate(num_support, feature_dim, num_steps, 1.0, mask, form, "linear", "identity",
            state_placement, None)
  _validate_preconditioner(preconditioner, form, mask, state_placement)
  _validate_outputs(num_outputs, multi_output, "linear", form, mask, preconditioner)
  _validate_norm(norm)
  options = dict(num_support=num_support, rank=feature_dim, ridge=1.0, mask=mask, form=form,
                 state_placement=_resolve_placement(form, mask, state_placement),
                 preconditioner=preconditioner, num_outputs=int(num_outputs),
                 multi_output=multi_output, norm=norm)
  full, one, zero = (_build_program(None, jnp.float64, num_steps=t, **options)
                     for t in (num_steps, 1, 0))
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
               dtype=None) -> CompiledCG:
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
      exp(<U phi_i, U phi_j> / temperature), per-support state, mask="prefix"). Default: "linear"
      for linear attention, "exponential" for softmax.
    temperature: tau > 0 of the exponential kernel.
      "linear" (Route B, approximate: the dot-product kernel from softmax heads at temperatures
      tau, 2 tau, .., h tau combined by Richardson extrapolation, h = temperature_heads:
      sum_m w_m tau_m ((K~_{tau_m} p)_i - sum_j p_j) = (K p)_i + O(tau^-h); the mat-vec error
      eps(h, tau) is measured in BUILD.md).
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
      make every token's normaliser the same power of two, which the norm gains undo: the
      outputs equal norm=None's bit for bit (kcg._src.programs.with_norm_pins). "layernorm" is
      refused with the reason (its centring breaks the reciprocal; see
      `kcg.routes.layernorm_departure`); `compile_chebyshev` has no division and accepts it.
    dtype: parameter dtype of `.model`; default float64 when x64 is enabled, else float32.
      `predict` computes in the dtype of its inputs whatever this is.

  Returns:
    A `CompiledCG` with `.model`, `.params`, `.predict(x_support, y_support, x_query)`.
  """
  num_support, feature_dim, num_steps, ridge = _validate(
      num_support, feature_dim, num_steps, ridge, mask, form, attention, features,
      state_placement, input_dim, feature_params)
  kernel = kernel or ("exponential" if attention == "softmax" else "linear")
  if isinstance(temperature_heads, bool) or not isinstance(temperature_heads, int) or not (
      1 <= temperature_heads <= 6):
    raise ValueError(f"temperature_heads must be an int in [1, 6], got {temperature_heads!r}.")
  projection = _validate_kernel(attention, kernel, temperature, projection, feature_dim, mask, form,
                                preconditioner, features)
  _validate_preconditioner(preconditioner, form, mask, state_placement)
  _validate_outputs(num_outputs, multi_output, attention, form, mask, preconditioner)
  _validate_norm(norm)
  if norm == "layernorm":
    raise ValueError(
        "norm='layernorm' cannot carry CG: its division is a ReLU guess of 1/s whose units have "
        "weights up to 1e40 on s (the guess covers s in [1e-40, 1e20]) and stay off at "
        "non-aggregator tokens only because their pre-activation is exactly 0 there. LayerNorm's "
        "mean subtraction leaves ~eps |w| |token mean| absolute error in every read, so those "
        "units fire (measured: ~1e62 written into inv_rr at support tokens in the first layer), "
        "and the error spreads "
        "through the token means. kcg.routes.layernorm_departure shows the step. Use "
        "norm='rmsnorm' (exact, bit for bit equal to norm=None), or compile_chebyshev, which has no "
        "division and runs under LayerNorm.")
  if dtype is None:
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 iff x64 is enabled
  return CompiledCG(num_support=num_support, feature_dim=feature_dim, num_steps=num_steps,
                    ridge=ridge, mask=mask, form=form, state_placement=state_placement,
                    num_outputs=int(num_outputs), multi_output=multi_output, norm=norm,
                    dtype=dtype, features=features, feature_params=feature_params,
                    preconditioner=preconditioner, attention=attention, kernel=kernel,
                    temperature=None if temperature is None else float(temperature),
                    projection=projection,
                    temperature_heads=temperature_heads if kernel == "linear" else 1)


def _validate_preconditioner(preconditioner, form, mask, state_placement):
  if preconditioner not in (None, "jacobi"):
    raise ValueError(f"preconditioner={preconditioner!r} is not one of (None, 'jacobi').")
  if preconditioner == "jacobi" and (form != "dual" or mask != "prefix"
                                     or state_placement == "aggregator"):
    raise ValueError(
        "preconditioner='jacobi' is compiled for form='dual', mask='prefix' (per-support state): "
        "M^{-1} r is a scaling of each support token's own residual. With the state in the "
        "aggregator it would need k elementwise products per step; use mask='prefix'.")


def _validate_norm(norm):
  if norm not in model_lib.NORMS:
    raise ValueError(f"norm={norm!r} is not one of {model_lib.NORMS} (None: no normalisation).")


def _validate_outputs(num_outputs, multi_output, attention, form, mask, preconditioner):
  if isinstance(num_outputs, bool) or not isinstance(num_outputs, (int, np.integer)) or num_outputs < 1:
    raise ValueError(f"num_outputs must be a positive int (the number of targets per support), "
                     f"got {num_outputs!r}.")
  if multi_output not in ("independent", "block"):
    raise ValueError(f"multi_output={multi_output!r} is not one of ('independent', 'block').")
  if multi_output == "block" and (attention != "linear" or form != "dual" or mask != "prefix"
                                  or preconditioner is not None):
    raise ValueError("multi_output='block' (block CG) is compiled for linear attention, "
                     "form='dual', mask='prefix' and no preconditioner (per-support state with the "
                     "r x r step matrices in the aggregator). Use multi_output='independent' for "
                     "the other constructions.")


def _validate_kernel(attention, kernel, temperature, projection, feature_dim, mask, form,
                     preconditioner, features):
  """Checks the kernel options; returns the projection U as a float64 array (or None)."""
  if attention == "linear":
    if kernel != "linear":
      raise ValueError(f"kernel={kernel!r} needs attention='softmax' (linear attention computes "
                       "the dot-product kernel).")
    if temperature is not None:
      raise ValueError("temperature is an option of attention='softmax'.")
    return None if projection is None else _check_projection(projection, feature_dim)
  if kernel not in ("exponential", "linear"):
    raise ValueError(f"kernel={kernel!r} is not one of ('exponential', 'linear').")
  try:
    temperature = float(temperature)
  except (TypeError, ValueError):
    raise ValueError(f"attention='softmax' needs a temperature > 0, got {temperature!r}.") from None
  if not math.isfinite(temperature) or temperature <= 0:
    raise ValueError(f"temperature must be finite and > 0, got {temperature!r}.")
  if mask != "prefix" or form != "dual":
    raise ValueError("attention='softmax' (Routes A and B) is compiled with per-support state: it needs "
                     "mask='prefix' and form='dual' (each support forms its own row of K~ p).")
  if preconditioner is not None or features != "identity":
    raise ValueError("attention='softmax' supports neither a preconditioner nor feature layers yet.")
  return np.eye(feature_dim) if projection is None else _check_projection(projection, feature_dim)


def _check_projection(projection, feature_dim: int) -> np.ndarray:
  checks.check_real("projection", projection)
  try:
    projection = np.asarray(projection, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"projection must be a [m, feature_dim={feature_dim}] matrix.") from None
  if projection.ndim != 2 or projection.shape[1] != feature_dim or projection.shape[0] < 1:
    raise ValueError(f"projection must be a [m >= 1, feature_dim={feature_dim}] matrix, got shape "
                     f"{projection.shape}.")
  if not np.all(np.isfinite(projection)):
    raise ValueError("projection contains NaN or Inf.")
  return projection
