r"""Training benchmarks: kcg's training step against well-kept code of the same shape, and per dtype.

Section "training_throughput" of experiments/bench.py (`run_training_throughput`):

  python -m experiments.bench --sections=training_throughput --workdir=/tmp/kcg/tput

It times, in one process, at the same shapes (Garg et al. 2022's GPT-2 setup by default: 12
layers, width 256, 8 heads of 32, MLP 1024, pre-LayerNorm, d = 20, 41 points as 82 interleaved x/y
tokens, batch 64) and interleaved (round r runs every implementation once, in a fixed order, after
a short pause, before round r + 1 starts; medians, spreads and per-round ratios are over rounds):

  kcg_gpt_icl_step    the library's own training step (`kcg.training.train_step_fn`) of
                      experiments/configs/gpt_icl.py at these shapes, on a batch of its final
                      curriculum stage, on one device: every-prefix loss, clipping, AdamW.
  kcg_gpt_icl_step[v] the same step traced with an earlier `kcg.Transformer` (`KCG_VARIANTS`):
                      "before" (layers as one lax.scan, softmax normalised before the value
                      product), "scan_layers" and "softmax_first" (one of the two only).
  nnx_reference_step  a GPT written with Flax NNX layers (`nnx.MultiHeadAttention`, `nnx.LayerNorm`,
                      `nnx.Linear`, a Python loop over the blocks), the kcg step's loss and optimizer.
  torch_gpt2_step     PyTorch eager, Hugging Face `GPT2Model` as in Garg et al.'s `TransformerModel`
                      (read-in Linear(d, 256), GPT2Model(inputs_embeds=...), read-out Linear(256, 1)),
                      MSE at the x-tokens, `torch.optim.Adam`. Needs `pip install -e ".[bench]"`;
                      without torch/transformers these rows are skipped and the output says so.
  *_forward           the three models' forwards (torch under `torch.no_grad()`).

Each row has wall seconds and the process CPU seconds of the call. On a machine shared with other
work the wall times of multi-threaded code are dominated by the load (PyTorch's OpenMP threads
spin-wait for descheduled peers); CPU seconds of single-threaded runs are the load-robust measure:

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" python -m \
      experiments.bench --sections=training_throughput --config.throughput.torch_threads=1 ...

FLOPs are counted analytically (`transformer_flops`): per forward, 2 x multiply-adds of every
matmul: embedding 2 N F D, per layer q/k/v 3 x 2 N D H dk, scores and weighted values
2 B H T^2 (dk + dv) (the full T x T), output projection 2 N H dv D, MLP 2 x 2 N D M, readout
2 N D; N = B T tokens. A training step counts 3 x forward (the backward pass has two matmuls per
forward matmul). Norms, softmax, GELU and the optimizer are not counted. For the jax rows an
independent count is reported beside it: every dot_general of the traced jaxpr
(`jaxpr_dot_flops`); it equals the formula for a forward, and for a step is lower by the
embedding's input gradient (2 N F D), which is never formed. The fraction of peak divides FLOP/s by
the best float32 n^3 matmul rate measured in the same run (in jax and in torch, interleaved with the
rounds; the larger of the two).

Section "train" (`run_train`): one training step of the GPT-style model per compute dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kcg._src import model as model_lib
from kcg._src import prompt as prompt_lib
from kcg._src import tasks as tasks_lib
from kcg import training

KCG_STEP = "kcg_gpt_icl_step"
TORCH_STEP = "torch_gpt2_step"
STEPS = (KCG_STEP, "nnx_reference_step", TORCH_STEP)
FORWARDS = ("kcg_forward", "nnx_reference_forward", "torch_gpt2_forward")
TORCH_MISSING = ('PyTorch rows skipped: torch and transformers are not installed (they are the '
                 '"bench" extra: pip install -e ".[bench]").')


@dataclasses.dataclass(frozen=True)
class Shape:
  """Sizes shared by every implementation."""

  num_layers: int
  width: int
  num_heads: int
  head_dim: int
  mlp_hidden: int
  input_dim: int
  num_points: int
  batch_size: int

  @property
  def num_tokens(self) -> int:
    return 2 * self.num_points


def transformer_flops(shape: Shape, token_dim: int, *, training_step: bool) -> float:
  """Analytic FLOP of one forward (x 3 for a training step); see the module docstring."""
  s = shape
  b, t, d, h, dk, m = s.batch_size, s.num_tokens, s.width, s.num_heads, s.head_dim, s.mlp_hidden
  n = b * t
  per_layer = (3 * 2.0 * n * d * h * dk + 2.0 * b * h * t * t * (dk + dk) + 2.0 * n * h * dk * d
               + 2 * 2.0 * n * d * m)
  forward = 2.0 * n * token_dim * d + s.num_layers * per_layer + 2.0 * n * d
  return 3.0 * forward if training_step else forward


# ---------------------------------------------------------------------------------------------
# kcg: the library's training step of the gpt_icl config.


def gpt_icl_train_config(shape: Shape, learning_rate: float) -> training.TrainConfig:
  """experiments/configs/gpt_icl.py (linear family) at `shape`."""
  from experiments.configs import gpt_icl

  config = gpt_icl.get_config("linear")
  config.model.num_layers = shape.num_layers
  config.model.width = shape.width
  config.model.num_heads = shape.num_heads
  config.model.head_dim = shape.head_dim
  config.model.mlp_hidden = shape.mlp_hidden
  config.data.input_dim = shape.input_dim
  config.data.num_support = shape.num_points - 1
  config.curriculum.input_dim_start = min(config.curriculum.input_dim_start, shape.input_dim)
  config.curriculum.num_support_start = min(config.curriculum.num_support_start,
                                            shape.num_points - 1)
  config.batch_size = shape.batch_size
  config.optim.learning_rate = learning_rate
  return training.config_from_dict(config)


def final_stage_step(config: training.TrainConfig) -> int:
  """The first step at which the curriculum has reached the final input_dim and num_support."""
  c, data = config.curriculum, config.data
  stages = 0
  for start, increment, end in ((c.input_dim_start, c.input_dim_increment, data.input_dim),
                                (c.num_support_start, c.num_support_increment, data.num_support)):
    if start is not None and start < end:
      stages = max(stages, -(-(end - start) // increment))
  step = stages * c.interval
  assert training.curriculum_stage(config, step) == (data.input_dim, data.num_support)
  return step


class _Timed:
  """One implementation: `run()` does one call and blocks until its result is ready."""

  def __init__(self, run: Callable[[], Any], flops: float, dot_flops: float | None = None,
               note: str = ""):
    self.run, self.flops, self.dot_flops, self.note = run, flops, dot_flops, note


def jaxpr_dot_flops(fn: Callable, *args) -> float:
  """2 x multiply-adds of every dot_general in `fn`'s jaxpr (scan bodies times their length).

  An independent count of the matmul work that `transformer_flops` states by formula. (XLA's
  `cost_analysis()` counts a while loop's body once and adds elementwise work, so it is not used.)
  """

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        continue
      if eqn.primitive.name == "while":
        raise ValueError("jaxpr_dot_flops cannot count a while loop (unknown trip count).")
      inner = 0.0
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            inner = max(inner, count(sub.jaxpr))  # branches of a cond: the costliest
          elif isinstance(sub, jax.extend.core.Jaxpr):
            inner = max(inner, count(sub))
      total += inner * eqn.params.get("length", 1)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _step_runner(compiled_step, state, batch, name: str) -> Callable[[], None]:
  box = {"state": state}

  def train_step():
    box["state"], metrics = compiled_step(box["state"], batch)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{name}: non-finite loss {loss}.")

  return train_step


def _softmax_first(q, k, v, allowed, config):
  """kcg.Transformer's softmax attention before this benchmark: jax.nn.softmax, then the product."""
  precision = model_lib._precision(config)
  scores = jnp.einsum("bhid,bhjd->bhij", q, k, precision=precision)
  scores = jnp.where(allowed, scores, jnp.asarray(jnp.finfo(scores.dtype).min, scores.dtype))
  return jnp.einsum("bhij,bhje->bhie", jax.nn.softmax(scores, axis=-1), v, precision=precision)


# Earlier implementations of kcg.Transformer, traced by patching the model module: (layers as one
# lax.scan, softmax normalised before the value product).
KCG_VARIANTS = {"before": (True, True), "scan_layers": (True, False),
                "softmax_first": (False, True)}


@contextlib.contextmanager
def _model_variant(variant: str):
  scan, softmax_first = KCG_VARIANTS[variant]
  saved = model_lib._MAX_UNROLLED_LAYERS, model_lib._softmax_attention
  if scan:
    model_lib._MAX_UNROLLED_LAYERS = 0
  if softmax_first:
    model_lib._softmax_attention = _softmax_first
  try:
    yield
  finally:
    model_lib._MAX_UNROLLED_LAYERS, model_lib._softmax_attention = saved


def variant_name(variant: str) -> str:
  return f"{KCG_STEP}[{variant}]"


def kcg_implementations(shape: Shape, learning_rate: float, seed: int,
                        variants: tuple[str, ...] = ()) -> dict[str, _Timed]:
  """The library's step and forward, and the step as traced by earlier implementations
  (`KCG_VARIANTS`: "before" is kcg.Transformer as it was before unrolling and the softmax order)."""
  unknown = set(variants) - set(KCG_VARIANTS)
  if unknown:
    raise ValueError(f"Unknown kcg variants {sorted(unknown)}; known: {sorted(KCG_VARIANTS)}.")
  config = gpt_icl_train_config(shape, learning_rate)
  config = dataclasses.replace(config, seed=seed)
  mesh = training.make_mesh(jax.devices()[:1])
  step = final_stage_step(config)
  batch = jax.block_until_ready(training.make_batch_fn(config, mesh)(step))
  graphdef, state = training.init_state(config, mesh)
  step_fn = training.train_step_fn(config, mesh)
  step_dot_flops = jaxpr_dot_flops(step_fn, state, batch)
  compiled_step = step_fn.lower(state, batch).compile()
  step_flops = transformer_flops(shape, batch.tokens.shape[-1], training_step=True)
  out = {}
  for variant in variants:
    with _model_variant(variant):  # traced at lower(); the undecorated factory skips the cache
      variant_fn = training.train_step_fn.__wrapped__(config, mesh)
      variant_dot_flops = jaxpr_dot_flops(variant_fn, state, batch)
      compiled_variant = variant_fn.lower(state, batch).compile()
    _, variant_state = training.init_state(config, mesh)
    scan, softmax_first = KCG_VARIANTS[variant]
    note = ", ".join([f"{shape.num_layers} layers as one lax.scan" if scan else "unrolled layers",
                      "softmax before the value product" if softmax_first else "softmax after"])
    out[variant_name(variant)] = _Timed(
        _step_runner(compiled_variant, variant_state, batch, variant_name(variant)), step_flops,
        variant_dot_flops, note)
  # A copy: the step donates (and so deletes) the state it is given.
  model_graphdef, model_state = nnx.split(nnx.merge(graphdef, state)[0])
  model_state = jax.tree.map(jnp.copy, model_state)
  forward = jax.jit(lambda st, tokens: nnx.merge(model_graphdef, st)(tokens).outputs)
  compiled_forward = forward.lower(model_state, batch.tokens).compile()
  token_dim = batch.tokens.shape[-1]
  note = (f"gpt_icl step {step} (final curriculum stage d={config.data.input_dim}, "
          f"k={config.data.num_support}), tokens F={token_dim}")
  out[KCG_STEP] = _Timed(_step_runner(compiled_step, state, batch, KCG_STEP), step_flops,
                        step_dot_flops, note)
  out["kcg_forward"] = _Timed(
      lambda: jax.block_until_ready(compiled_forward(model_state, batch.tokens)),
      transformer_flops(shape, token_dim, training_step=False),
      jaxpr_dot_flops(forward, model_state, batch.tokens))
  return out


# ---------------------------------------------------------------------------------------------
# Flax NNX reference GPT.


class ReferenceBlock(nnx.Module):
  """Pre-LN GPT block: h + MHA(LN(h)), then h + MLP(LN(h)) with GELU."""

  def __init__(self, shape: Shape, *, rngs: nnx.Rngs):
    d = shape.width
    self.attn_norm = nnx.LayerNorm(d, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=shape.num_heads, in_features=d, qkv_features=shape.num_heads * shape.head_dim,
        out_features=d, decode=False, deterministic=True, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, shape.mlp_hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(shape.mlp_hidden, d, rngs=rngs)

  def __call__(self, h_BxTxD: jax.Array, mask_1x1xTxT: jax.Array) -> jax.Array:
    h_BxTxD = h_BxTxD + self.attention(self.attn_norm(h_BxTxD), mask=mask_1x1xTxT)
    return h_BxTxD + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(h_BxTxD))))


class ReferenceGPT(nnx.Module):
  """Read-in Linear(F, D), causal pre-LN blocks, final LayerNorm, read-out Linear(D, 1)."""

  def __init__(self, shape: Shape, token_dim: int, *, rngs: nnx.Rngs):
    self.read_in = nnx.Linear(token_dim, shape.width, rngs=rngs)
    self.blocks = nnx.List([ReferenceBlock(shape, rngs=rngs) for _ in range(shape.num_layers)])
    self.final_norm = nnx.LayerNorm(shape.width, rngs=rngs)
    self.read_out = nnx.Linear(shape.width, 1, rngs=rngs)

  def __call__(self, tokens_BxTxF: jax.Array) -> jax.Array:
    num_tokens = tokens_BxTxF.shape[1]
    mask = jnp.tril(jnp.ones((num_tokens, num_tokens), bool))[None, None]
    h = self.read_in(tokens_BxTxF)
    for block in self.blocks:
      h = block(h, mask)
    return self.read_out(self.final_norm(h))


def nnx_implementations(shape: Shape, learning_rate: float, seed: int, tokens_BxTxF: jax.Array,
                        targets_BxP: jax.Array) -> dict[str, _Timed]:
  """The NNX reference with the kcg step's loss (MSE at the x-tokens) and optimizer."""
  model = ReferenceGPT(shape, tokens_BxTxF.shape[-1], rngs=nnx.Rngs(seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, tokens, targets):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      return jnp.mean(jnp.square(model(tokens)[:, 0::2, 0] - targets))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
      optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  step_fn = jax.jit(step, donate_argnums=0)
  step_dot_flops = jaxpr_dot_flops(step_fn, state, tokens_BxTxF, targets_BxP)
  compiled_step = step_fn.lower(state, tokens_BxTxF, targets_BxP).compile()
  box = {"state": state}

  def train_step():
    box["state"], loss = compiled_step(box["state"], tokens_BxTxF, targets_BxP)
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"NNX reference step: non-finite loss {float(loss)}.")

  model_graphdef, model_state = nnx.split(model)
  model_state = jax.tree.map(jnp.copy, model_state)  # the step donates `state`
  forward = jax.jit(lambda st, tokens: nnx.merge(model_graphdef, st)(tokens))
  compiled_forward = forward.lower(model_state, tokens_BxTxF).compile()
  token_dim = tokens_BxTxF.shape[-1]
  return {
      "nnx_reference_step": _Timed(train_step, transformer_flops(shape, token_dim,
                                                                 training_step=True),
                                   step_dot_flops),
      "nnx_reference_forward": _Timed(
          lambda: jax.block_until_ready(compiled_forward(model_state, tokens_BxTxF)),
          transformer_flops(shape, token_dim, training_step=False),
          jaxpr_dot_flops(forward, model_state, tokens_BxTxF)),
  }


# ---------------------------------------------------------------------------------------------
# PyTorch + Hugging Face GPT2Model (optional).


def import_torch():
  """(torch, transformers), or None when either is missing."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  return torch, transformers


def torch_implementations(shape: Shape, learning_rate: float, seed: int, x_BxNxD: np.ndarray,
                          y_BxN: np.ndarray, threads: int = 0) -> tuple[dict[str, _Timed], dict]:
  """Garg et al.'s TransformerModel (GPT2Model backbone) with Adam; ({}, info) if torch is missing.

  `threads` > 0 sets torch's intra-op threads (0: torch's default, one per core).
  """
  modules = import_torch()
  if modules is None:
    return {}, {"skipped": TORCH_MISSING}
  torch, transformers = modules
  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  config = transformers.GPT2Config(
      n_positions=shape.num_tokens, n_embd=shape.width, n_layer=shape.num_layers,
      n_head=shape.num_heads, n_inner=shape.mlp_hidden, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, use_cache=False)
  if shape.width != shape.num_heads * shape.head_dim:
    raise ValueError(f"GPT2Model needs width = num_heads x head_dim, got {shape.width} != "
                     f"{shape.num_heads} x {shape.head_dim}.")

  class TransformerModel(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.read_in = torch.nn.Linear(shape.input_dim, shape.width)
      self.backbone = transformers.GPT2Model(config)
      self.read_out = torch.nn.Linear(shape.width, 1)

    def forward(self, zs):
      hidden = self.backbone(inputs_embeds=self.read_in(zs)).last_hidden_state
      return self.read_out(hidden)[:, ::2, 0]

  model = TransformerModel()
  optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
  xs, ys = torch.from_numpy(x_BxNxD), torch.from_numpy(y_BxN)
  # Garg et al.'s _combine: x-tokens, then y-tokens holding y in the first coordinate.
  ys_wide = torch.cat([ys[..., None], torch.zeros(*ys.shape, shape.input_dim - 1)], dim=2)
  zs = torch.stack([xs, ys_wide], dim=2).reshape(shape.batch_size, shape.num_tokens, shape.input_dim)

  def train_step():
    optimizer.zero_grad()
    loss = torch.mean(torch.square(model(zs) - ys))
    loss.backward()
    optimizer.step()
    if not np.isfinite(loss.item()):
      raise FloatingPointError(f"PyTorch step: non-finite loss {loss.item()}.")

  def forward():
    with torch.no_grad():
      model(zs)

  info = {"torch": torch.__version__, "transformers": transformers.__version__,
          "torch_threads": torch.get_num_threads(),
          "attention": model.backbone.config._attn_implementation,
          "params": int(sum(p.numel() for p in model.parameters()))}
  return {TORCH_STEP: _Timed(train_step, transformer_flops(shape, shape.input_dim,
                                                           training_step=True)),
          "torch_gpt2_forward": _Timed(forward, transformer_flops(shape, shape.input_dim,
                                                                  training_step=False))}, info


# ---------------------------------------------------------------------------------------------
# The "train" section: one model, float32 and bfloat16 compute.


def run_train(config) -> list[dict]:
  """Training steps of the GPT-style config with kcg.Transformer + optax.adamw, per compute dtype."""
  tc = config.train
  layout = prompt_lib.make_interleaved_layout(tc.num_points, tc.input_dim)
  rng = np.random.default_rng(config.seed)
  x = rng.standard_normal((tc.batch_size, tc.num_points, tc.input_dim)).astype(np.float32)
  w = rng.standard_normal((tc.batch_size, tc.input_dim)).astype(np.float32)
  y = np.einsum("bnd,bd->bn", x, w) / np.float32(np.sqrt(tc.input_dim))
  tokens32 = prompt_lib.encode_interleaved(layout, jnp.asarray(x), jnp.asarray(y))
  targets = jnp.asarray(y, jnp.float32)
  rows = []
  for compute in tc.compute_dtypes:
    compute_dtype = jnp.dtype(compute)
    model_config = model_lib.ModelConfig(
        token_dim=layout.token_dim, width=tc.width, num_layers=tc.num_layers,
        num_heads=tc.num_heads, head_dim=tc.head_dim, mlp_hidden=tc.mlp_hidden,
        attention="softmax", activation="gelu", norm="layernorm", mask="causal",
        precision="default", param_dtype=jnp.float32)
    model = model_lib.Transformer(model_config, rngs=nnx.Rngs(config.seed))
    # As experiments/configs/gpt_icl.py: AdamW, constant learning rate, gradient clipping at 1.
    tx = optax.chain(optax.clip_by_global_norm(tc.clip_norm), optax.adamw(tc.learning_rate))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split((model, optimizer))
    tokens = tokens32.astype(compute_dtype)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, tokens, targets, graphdef=graphdef):
      model, optimizer = nnx.merge(graphdef, state)

      def loss_fn(model):
        outputs = model(tokens).outputs  # computed in the tokens' dtype; float32 master params
        predictions = outputs[:, 0::2, 0].astype(jnp.float32)
        return jnp.mean(jnp.square(predictions - targets))
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      # optax's bias correction mixes Python floats and int32 counts: allow that promotion even
      # when the caller (the test suite) runs jax_numpy_dtype_promotion="strict".
      with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)
      return nnx.state((model, optimizer)), loss

    start = time.perf_counter()
    state, loss = train_step(state, tokens, targets)
    losses = [float(loss)]
    first = time.perf_counter() - start
    times = []
    for _ in range(tc.steps):
      start = time.perf_counter()
      state, loss = jax.block_until_ready(train_step(state, tokens, targets))
      times.append(time.perf_counter() - start)
      losses.append(float(loss))
    row = {"compute_dtype": compute, "param_dtype": "float32", "layers": tc.num_layers,
           "width": tc.width, "heads": tc.num_heads, "mlp_hidden": tc.mlp_hidden,
           "tokens": 2 * tc.num_points, "batch": tc.batch_size, "params": int(params),
           "first_step_s": first, "step_s": min(times), "median_step_s": statistics.median(times),
           "losses": losses}
    rows.append(row)
    print(f"[train] GPT-style {tc.num_layers}L w{tc.width} h{tc.num_heads}, B={tc.batch_size}, "
          f"T={2 * tc.num_points}, {compute} compute: step {min(times) * 1e3:.0f} ms (first "
          f"{first:.1f} s); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
  if len(rows) > 1:
    # Same initial parameters and batch: the first loss differs only by the compute dtype.
    ref = np.asarray(rows[0]["losses"])
    for row in rows[1:]:
      losses = np.asarray(row["losses"])
      row["initial_loss_rel_diff_vs_first"] = float(abs(losses[0] - ref[0]) / abs(ref[0]))
      row["max_rel_loss_diff_vs_first"] = float(np.max(np.abs(losses - ref) / np.abs(ref)))
      print(f"[train] {row['compute_dtype']} vs {rows[0]['compute_dtype']}: initial loss differs by "
            f"{row['initial_loss_rel_diff_vs_first']:.1e} (relative), the {tc.steps}-step "
            f"trajectory by at most {row['max_rel_loss_diff_vs_first']:.1e}")
  return rows


# ---------------------------------------------------------------------------------------------
# Peak and the interleaved rounds.


def _matmul_probes(size: int) -> dict[str, Callable[[], tuple[float, float]]]:
  """Callables that each time one float32 size^3 matmul: (wall seconds, process CPU seconds)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  matmul = jax.jit(lambda x: x @ x).lower(a).compile()
  jax.block_until_ready(matmul(a))

  def jax_matmul():
    start, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(matmul(a))
    return time.perf_counter() - start, time.process_time() - cpu

  probes = {"jax": jax_matmul}
  modules = import_torch()
  if modules is not None:
    torch = modules[0]
    t = torch.from_numpy(np.array(a))
    t @ t

    def torch_matmul():
      start, cpu = time.perf_counter(), time.process_time()
      t @ t
      return time.perf_counter() - start, time.process_time() - cpu

    probes["torch"] = torch_matmul
  return probes


def run_training_throughput(tc) -> dict:
  """Times every implementation in `tc.rounds` interleaved rounds; returns rows and the peak."""
  shape = Shape(tc.num_layers, tc.width, tc.num_heads, tc.head_dim, tc.mlp_hidden, tc.input_dim,
                tc.num_points, tc.batch_size)
  rng = np.random.default_rng(tc.seed)
  x = rng.standard_normal((shape.batch_size, shape.num_points, shape.input_dim)).astype(np.float32)
  w = rng.standard_normal((shape.batch_size, shape.input_dim)).astype(np.float32)
  y = (np.einsum("bnd,bd->bn", x, w) / np.float32(np.sqrt(shape.input_dim))).astype(np.float32)

  start = time.perf_counter()
  impls = kcg_implementations(shape, tc.learning_rate, tc.seed, tuple(tc.kcg_variants))
  kcg_tokens = training.make_batch(
      tasks_lib.Prompts(jnp.asarray(x[:, :-1]), jnp.asarray(y[:, :-1]),
                                 jnp.asarray(x[:, -1:]), jnp.asarray(y[:, -1:]), None, None),
      gpt_icl_train_config(shape, tc.learning_rate).data, jnp.float32).tokens
  impls.update(nnx_implementations(shape, tc.learning_rate, tc.seed, kcg_tokens, jnp.asarray(y)))
  torch_impls, torch_info = torch_implementations(shape, tc.learning_rate, tc.seed, x, y,
                                                  tc.torch_threads)
  impls.update(torch_impls)
  setup_s = time.perf_counter() - start
  if "skipped" in torch_info:
    print(f"[training_throughput] {torch_info['skipped']}")
  variants = [variant_name(v) for v in tc.kcg_variants]
  order = [name for name in STEPS[:1] + tuple(variants) + STEPS[1:] + FORWARDS if name in impls]
  probes = _matmul_probes(tc.peak_matmul)

  first_s = {}
  for name in order:  # first call: warms caches and allocators; compilation is already done
    t0 = time.perf_counter()
    impls[name].run()
    first_s[name] = time.perf_counter() - t0
  seconds = {name: [] for name in order}
  cpu_seconds = {name: [] for name in order}
  peak_s = {name: [] for name in probes}
  for r in range(tc.rounds):
    for name in order:
      time.sleep(tc.settle_s)  # let the previous implementation's spinning worker threads park
      t0, c0 = time.perf_counter(), time.process_time()
      impls[name].run()
      seconds[name].append(time.perf_counter() - t0)
      cpu_seconds[name].append(time.process_time() - c0)
    for name, probe in probes.items():
      time.sleep(tc.settle_s)
      peak_s[name].append(probe())
    print(f"[training_throughput] round {r + 1}/{tc.rounds}: " + ", ".join(
        f"{name} {seconds[name][-1]:.3g} s" for name in order), flush=True)

  peak_flops = {name: 2.0 * tc.peak_matmul ** 3 / min(w for w, _ in s) for name, s in peak_s.items()}
  peak = max(peak_flops.values())
  # Per CPU-second: robust to other processes' load, and it charges spin-waiting threads.
  peak_per_cpu_s = max(2.0 * tc.peak_matmul ** 3 / min(c for _, c in s) for s in peak_s.values())
  rows = []
  for name in order:
    s = seconds[name]
    impl = impls[name]
    median = statistics.median(s)
    row = {"implementation": name, "kind": "forward" if name in FORWARDS else "step",
           "median_s": median, "min_s": min(s), "max_s": max(s), "seconds": s,
           "median_cpu_s": statistics.median(cpu_seconds[name]), "cpu_seconds": cpu_seconds[name],
           "first_call_s": first_s[name], "flops": impl.flops, "jaxpr_dot_flops": impl.dot_flops,
           "flops_per_s": impl.flops / median, "fraction_of_peak": impl.flops / median / peak,
           "fraction_of_peak_per_cpu_s": (impl.flops / statistics.median(cpu_seconds[name])
                                          / peak_per_cpu_s),
           "note": impl.note}
    reference = TORCH_STEP if row["kind"] == "step" else "torch_gpt2_forward"
    if reference in seconds:
      ratios = [a / b for a, b in zip(s, seconds[reference])]
      cpu_ratios = [a / b for a, b in zip(cpu_seconds[name], cpu_seconds[reference])]
      row.update(ratio_to_torch_median=statistics.median(ratios),
                 ratio_to_torch_min=min(ratios), ratio_to_torch_max=max(ratios),
                 cpu_ratio_to_torch_median=statistics.median(cpu_ratios),
                 cpu_ratio_to_torch_min=min(cpu_ratios), cpu_ratio_to_torch_max=max(cpu_ratios))
    rows.append(row)
  return {"shape": dataclasses.asdict(shape), "rounds": tc.rounds, "rows": rows,
          "peak_matmul_size": tc.peak_matmul, "peak_flops_per_s": peak,
          "peak_flops_per_s_by_framework": peak_flops, "peak_flops_per_cpu_s": peak_per_cpu_s,
          "torch": torch_info, "setup_s": setup_s,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "flops_formula": "analytic, 2 x multiply-adds of the matmuls; step = 3 x forward "
                           "(experiments/bench_training.py)"}


def format_table(result: dict) -> str:
  lines = ["| implementation | s per call (median, min-max) | ratio to PyTorch (median, min-max) | "
           "CPU s (median) | CPU-s ratio to PyTorch (median, min-max) | GFLOP per call | GFLOP/s | "
           "fraction of peak | per CPU-s | jaxpr dot GFLOP |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    ratio = ""
    if "ratio_to_torch_median" in r:
      ratio = (f"{r['ratio_to_torch_median']:.2f}x ({r['ratio_to_torch_min']:.2f}-"
               f"{r['ratio_to_torch_max']:.2f})")
    cpu_ratio = ""
    if "cpu_ratio_to_torch_median" in r:
      cpu_ratio = (f"{r['cpu_ratio_to_torch_median']:.2f}x ({r['cpu_ratio_to_torch_min']:.2f}-"
                   f"{r['cpu_ratio_to_torch_max']:.2f})")
    dots = "" if r["jaxpr_dot_flops"] is None else f"{r['jaxpr_dot_flops'] / 1e9:.4g}"
    lines.append(f"| {r['implementation']} | {r['median_s']:.3g} ({r['min_s']:.3g}-"
                 f"{r['max_s']:.3g}) | {ratio} | {r['median_cpu_s']:.3g} | {cpu_ratio} | "
                 f"{r['flops'] / 1e9:.4g} | "
                 f"{r['flops_per_s'] / 1e9:.3g} | {r['fraction_of_peak']:.2f} | "
                 f"{r['fraction_of_peak_per_cpu_s']:.2f} | {dots} |")
  peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in result["peak_flops_per_s_by_framework"].items())
  lines += ["", f"Peak: float32 {result['peak_matmul_size']}^3 matmul, best of {result['rounds']}: "
            f"{peaks} GFLOP/s; fractions use {result['peak_flops_per_s'] / 1e9:.1f} (per wall "
            f"second) and {result['peak_flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second."]
  if "skipped" in result["torch"]:
    lines.append(result["torch"]["skipped"])
  return "\n".join(lines)
