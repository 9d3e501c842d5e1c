r"""Benchmark: compiled CG transformer forwards against CG written directly in JAX.

  python -m experiments.bench --workdir=/tmp/kcg/bench          # default grid
  python -m experiments.bench --smoke --workdir=/tmp/kcg/smoke  # tiny grid (run by the tests)

Every method maps the same prompts `(x_support [B,k,p], y_support [B,k], x_query [B,q,p])`, float32,
matmuls at `Precision.HIGHEST`, to t-step predictions `[B, q]`; each is `jax.jit`-ed, called once to
compile (the first-call time is kept), then timed with `jax.block_until_ready`:

  plain_cg                 dual CG on (Phi Phi^T + ridge I) alpha = y, batched over prompts, with the
                           factored mat-vec Phi (Phi^T v): two passes over Phi per step. The baseline.
  plain_cg_primal          CG on (Phi^T Phi + ridge I) w = Phi^T y, factored: also two passes.
  plain_cg_kernel          dual CG with K = Phi Phi^T formed first (its formation is timed too).
  jax_cg_vmap              `jax.scipy.sparse.linalg.cg` (tol=0, maxiter=t) under `vmap`.
  cholesky                 the closed form (K + ridge I)^{-1} y (converged KRR, not t steps).
  compiled_dual_prefix     `kcg.compile_cg(k, p, t, ridge, mask="prefix").predict`.
  compiled_primal_causal   `kcg.compile_cg(k, p, t, ridge, form="primal").predict` (causal mask).

Sections "train" and "training_throughput" (experiments/bench_training.py) time training steps:
kcg's gpt_icl step against a Flax NNX GPT and PyTorch + Hugging Face GPT2Model (the optional
`pip install -e ".[bench]"`; without it those rows are skipped and the output says so):

  python -m experiments.bench --sections=training_throughput --workdir=/tmp/kcg/tput

See experiments/configs/bench.py for the sections, grid and runtime, BENCHMARKS.md for a run's
results and timings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, NamedTuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import _cli
import kcg
from experiments import bench_training
from kcg._src import model as model_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "bench.py")
HIGHEST = jax.lax.Precision.HIGHEST
BASELINE = "plain_cg"
COMPILED = ("compiled_dual_prefix", "compiled_primal_causal")
KERNEL_METHODS = ("plain_cg_kernel", "cholesky")


class Point(NamedTuple):
  """One grid point: batch B, supports k, features p, CG steps t."""

  batch: int
  num_support: int
  feature_dim: int
  num_steps: int

  @property
  def label(self) -> str:
    return f"B={self.batch} k={self.num_support} p={self.feature_dim} t={self.num_steps}"


def parse_point(text: str, fields: int = 4) -> tuple[int, ...]:
  """Parses "256x1024x64x16" (B x k x p x t) into (256, 1024, 64, 16)."""
  parts = text.lower().split("x")
  if len(parts) != fields or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"Grid point {text!r} must be {fields} positive ints joined by 'x' "
                     "(B x k x p x t, e.g. 256x1024x64x16).")
  return tuple(int(p) for p in parts)


class Timing(NamedTuple):
  """Wall-clock seconds: first call (trace + compile + run), best and median of the timed calls."""

  first_call_s: float
  best_s: float
  median_s: float
  runs: int


def time_call(fn: Callable, args: tuple, repeats: int, seconds_budget: float) -> tuple[Timing, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  runs = []
  while len(runs) < max(1, repeats) and (not runs or sum(runs) < seconds_budget):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - start)
  return Timing(first, min(runs), statistics.median(runs), len(runs)), out


# ---------------------------------------------------------------------------------------------
# Baselines, written directly in JAX.


def _safe_divide(a, b):
  return a / jnp.where(b == 0, jnp.ones_like(b), b)


def batched_cg(matvec: Callable, b_BxN: jax.Array, num_steps: int) -> jax.Array:
  """t steps of textbook CG on A x = b for a batch of systems (x_0 = 0); returns x_t [B, N]."""

  def step(_, state):
    x, r, d, rr = state
    ad = matvec(d)
    gamma = _safe_divide(rr, jnp.sum(d * ad, axis=-1))[:, None]
    x = x + gamma * d
    r = r - gamma * ad
    rr_next = jnp.sum(r * r, axis=-1)
    d = r + _safe_divide(rr_next, rr)[:, None] * d
    return x, r, d, rr_next

  init = (jnp.zeros_like(b_BxN), b_BxN, b_BxN, jnp.sum(b_BxN * b_BxN, axis=-1))
  return jax.lax.fori_loop(0, num_steps, step, init)[0]


def _predict_dual(x_support, alpha_BxK, x_query):
  w = jnp.einsum("bkp,bk->bp", x_support, alpha_BxK, precision=HIGHEST)
  return jnp.einsum("bqp,bp->bq", x_query, w, precision=HIGHEST)


def plain_cg(x_support, y_support, x_query, *, ridge, num_steps):
  def matvec(v_BxK):  # Phi (Phi^T v) + ridge v: two passes over Phi
    u = jnp.einsum("bkp,bk->bp", x_support, v_BxK, precision=HIGHEST)
    return jnp.einsum("bkp,bp->bk", x_support, u, precision=HIGHEST) + ridge * v_BxK
  return _predict_dual(x_support, batched_cg(matvec, y_support, num_steps), x_query)


def plain_cg_primal(x_support, y_support, x_query, *, ridge, num_steps):
  def matvec(w_BxP):  # Phi^T (Phi w) + ridge w
    u = jnp.einsum("bkp,bp->bk", x_support, w_BxP, precision=HIGHEST)
    return jnp.einsum("bkp,bk->bp", x_support, u, precision=HIGHEST) + ridge * w_BxP
  rhs = jnp.einsum("bkp,bk->bp", x_support, y_support, precision=HIGHEST)
  w = batched_cg(matvec, rhs, num_steps)
  return jnp.einsum("bqp,bp->bq", x_query, w, precision=HIGHEST)


def plain_cg_kernel(x_support, y_support, x_query, *, ridge, num_steps):
  kernel = jnp.einsum("bip,bjp->bij", x_support, x_support, precision=HIGHEST)

  def matvec(v_BxK):
    return jnp.einsum("bij,bj->bi", kernel, v_BxK, precision=HIGHEST) + ridge * v_BxK
  return _predict_dual(x_support, batched_cg(matvec, y_support, num_steps), x_query)


def jax_cg_vmap(x_support, y_support, x_query, *, ridge, num_steps):
  def one(phi_KxP, y_K, phi_QxP):
    def matvec(v_K):
      u = jnp.matmul(phi_KxP.T, v_K, precision=HIGHEST)
      return jnp.matmul(phi_KxP, u, precision=HIGHEST) + ridge * v_K
    alpha, _ = jax.scipy.sparse.linalg.cg(matvec, y_K, tol=0.0, atol=0.0, maxiter=num_steps)
    return jnp.matmul(phi_QxP, jnp.matmul(phi_KxP.T, alpha, precision=HIGHEST), precision=HIGHEST)
  return jax.vmap(one)(x_support, y_support, x_query)


def cholesky(x_support, y_support, x_query, *, ridge, num_steps):
  del num_steps  # the closed form: the limit of CG

  def one(phi_KxP, y_K):
    k = phi_KxP.shape[0]
    gram = jnp.matmul(phi_KxP, phi_KxP.T, precision=HIGHEST)
    factor = jax.scipy.linalg.cho_factor(gram + ridge * jnp.eye(k, dtype=gram.dtype), lower=True)
    return jax.scipy.linalg.cho_solve(factor, y_K)
  return _predict_dual(x_support, jax.vmap(one)(x_support, y_support), x_query)


BASELINES = {"plain_cg": plain_cg, "plain_cg_primal": plain_cg_primal,
             "plain_cg_kernel": plain_cg_kernel, "jax_cg_vmap": jax_cg_vmap, "cholesky": cholesky}


def compiled_model(name: str, point: Point, ridge: float) -> kcg.CompiledCG:
  k, p, t = point.num_support, point.feature_dim, point.num_steps
  if name == "compiled_dual_prefix":
    return kcg.compile_cg(k, p, t, ridge, mask="prefix", dtype=jnp.float32)
  if name == "compiled_primal_causal":
    return kcg.compile_cg(k, p, t, ridge, form="primal", dtype=jnp.float32)
  raise ValueError(f"Unknown compiled method {name!r}; known: {COMPILED}.")


# ---------------------------------------------------------------------------------------------
# Cost model: where the compiled forward's work goes.


def forward_flops(config: model_lib.ModelConfig, batch: int, num_tokens: int,
                  num_prefix: int | None) -> dict[str, float]:
  """Multiply-add FLOP (x2) of one `Transformer` forward, by term."""
  c = config
  n = batch * num_tokens
  layers, d, h, dk, dv, m = (c.num_layers, c.width, c.num_heads, c.head_dim,
                             c.resolved_value_dim, c.mlp_hidden)
  if c.attention == "softmax":
    impl = "quadratic"
  else:
    impl = model_lib._resolved_linear_impl(c.linear_attention_impl, c.mask, num_tokens)
  if impl == "quadratic":
    attention = 2.0 * batch * h * num_tokens ** 2 * (dk + dv)
  elif c.mask == "prefix":
    attention = 2.0 * batch * h * ((num_prefix + num_tokens) * dk * dv + num_tokens * (dk + dv))
  else:
    chunk = model_lib._causal_chunk(num_tokens, dk, dv)
    attention = 2.0 * batch * h * num_tokens * (2 * dk * dv + chunk * (dk + dv))
  return {
      "q,k projections": layers * 2 * 2.0 * n * d * h * dk,
      "v projection": layers * 2.0 * n * d * h * dv,
      "attention": layers * attention,
      "output projection": layers * 2.0 * n * h * dv * d,
      "mlp": layers * 2 * 2.0 * n * d * m,
      "embed + readout": 2.0 * n * (c.token_dim + c.output_dim) * d,
  }


def compiled_flops(config: model_lib.ModelConfig, point: Point, batch: int,
                   num_query: int) -> float:
  num_tokens = point.num_support + 1 + num_query
  return sum(forward_flops(config, batch, num_tokens, point.num_support + 1).values())


def plain_cg_flops(point: Point, batch: int) -> float:
  return 4.0 * batch * point.num_support * point.feature_dim * point.num_steps


def minimum_bytes(config: model_lib.ModelConfig, point: Point, batch: int, num_query: int,
                  itemsize: int = 4) -> float:
  """A floor on the compiled forward's memory traffic: each layer reads and writes the residual."""
  num_tokens = point.num_support + 1 + num_query
  return 2.0 * config.num_layers * batch * num_tokens * config.width * itemsize


def plain_cg_bytes(point: Point, batch: int, itemsize: int = 4) -> float:
  """Plain CG reads Phi twice per step."""
  return 2.0 * point.num_steps * batch * point.num_support * point.feature_dim * itemsize


# ---------------------------------------------------------------------------------------------
# Sections.


def machine_info() -> dict:
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
          "python": platform.python_version(), "load_average": load}


def run_probe(config) -> dict:
  """Roofline numbers of this machine: matmul GFLOP/s, streaming GB/s, dispatch floor."""
  n = int(config.probe_matmul)
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: jnp.matmul(x, x, precision=HIGHEST))
  t_mm, _ = time_call(matmul, (a,), 3, 10.0)
  count = int(config.probe_megabytes * 2 ** 20 // 4)
  v = jnp.ones((count,), jnp.float32)
  read = jax.jit(jnp.sum)  # a streaming read, like CG's passes over Phi
  t_bw, _ = time_call(read, (v,), 5, 10.0)
  tiny = jax.jit(lambda x: x + 1.0)
  t_tiny, _ = time_call(tiny, (jnp.ones((4,), jnp.float32),), 50, 1.0)
  result = {"matmul_gflops": 2.0 * n ** 3 / t_mm.best_s / 1e9,
            "read_gb_per_s": 4.0 * count / t_bw.best_s / 1e9,
            "dispatch_floor_us": t_tiny.best_s * 1e6}
  print(f"probe: float32 matmul {n}^3 {result['matmul_gflops']:.1f} GFLOP/s; read "
        f"{result['read_gb_per_s']:.1f} GB/s ({config.probe_megabytes} MB); dispatch floor "
        f"{result['dispatch_floor_us']:.0f} us")
  return result


def make_prompts(point: Point, num_query: int, seed: int):
  """Linear-regression prompts, float32: x ~ N(0, I/p), y = x.w + 0.1 noise."""
  rng = np.random.default_rng(seed)
  b, k, p = point.batch, point.num_support, point.feature_dim
  x_support = rng.standard_normal((b, k, p), np.float32) / np.float32(np.sqrt(p))
  x_query = rng.standard_normal((b, num_query, p), np.float32) / np.float32(np.sqrt(p))
  w = rng.standard_normal((b, p), np.float32)
  y_support = np.einsum("bkp,bp->bk", x_support, w) + 0.1 * rng.standard_normal((b, k), np.float32)
  return (jnp.asarray(x_support), jnp.asarray(y_support.astype(np.float32)), jnp.asarray(x_query))


def _method_batch(name, point, config, compiled_cfg) -> tuple[int, str]:
  """Batch a method runs at, and why it is smaller than the point's (empty if not)."""
  b = point.batch
  if name in COMPILED:
    per_prompt = compiled_flops(compiled_cfg, point, 1, config.num_query)
    limit = max(1, int(config.compiled_flop_budget // per_prompt))
    if limit < b:
      return limit, (f"B={b} would cost {per_prompt * b:.2g} FLOP per call (> compiled_flop_budget "
                     f"{config.compiled_flop_budget:.2g}); timed at B={limit}")
  if name in KERNEL_METHODS:
    per_prompt = 3.0 * 4 * point.num_support ** 2
    limit = max(1, int(config.kernel_memory_budget_gb * 1e9 // per_prompt))
    if limit < b:
      return limit, (f"K for B={b} needs {per_prompt * b / 1e9:.2g} GB (> kernel_memory_budget_gb "
                     f"{config.kernel_memory_budget_gb:g}); timed at B={limit}")
  return b, ""


# What each method's predictions are checked against (same algorithm, same t), on shared prompts.
REFERENCE = {"plain_cg_kernel": "plain_cg", "jax_cg_vmap": "plain_cg",
             "compiled_dual_prefix": "plain_cg", "compiled_primal_causal": "plain_cg_primal"}


def run_point(point: Point, config, kind: str) -> list[dict]:
  """Times every method at one point; ratios against plain CG at the same batch and prompts."""
  x_support, y_support, x_query = make_prompts(point, config.num_query, config.seed)
  methods = [BASELINE] + [m for m in config.methods if m != BASELINE]
  compiled, build_s, plans = {}, {}, {}
  for name in methods:
    if name in COMPILED:
      start = time.perf_counter()
      compiled[name] = compiled_model(name, point, config.ridge)
      build_s[name] = time.perf_counter() - start
    plans[name] = _method_batch(name, point, config,
                                compiled[name].config if name in compiled else None)
  # Plain CG is timed at every batch some method runs at, so that each ratio compares equal work.
  baseline_batches = sorted({b for b, _ in plans.values()} | {point.batch}, reverse=True)
  jobs = [(BASELINE, b, "" if b == point.batch else "baseline for the methods timed at this B")
          for b in baseline_batches]
  jobs += [(name, *plans[name]) for name in methods if name != BASELINE]
  rows, outputs, baseline_s = [], {}, {}
  for name, batch, reason in jobs:
    if reason and name != BASELINE:
      print(f"  {point.label}: {name}: {reason}")
    args = (x_support[:batch], y_support[:batch], x_query[:batch])
    if name in compiled:
      fn = jax.jit(compiled[name].predict)
    else:
      fn = jax.jit(functools.partial(BASELINES[name], ridge=config.ridge,
                                     num_steps=point.num_steps))
    timing, out = time_call(fn, args, config.repeats, config.seconds_per_method)
    out = np.asarray(out, np.float64)
    if name not in outputs or out.shape[0] > outputs[name].shape[0]:
      outputs[name] = out
    if name == BASELINE:
      baseline_s[batch] = timing.best_s
    row = {"kind": kind, "batch": point.batch, "num_support": point.num_support,
           "feature_dim": point.feature_dim, "num_steps": point.num_steps, "method": name,
           "timed_batch": batch, "scaled_reason": reason, "first_call_s": timing.first_call_s,
           "seconds": timing.best_s, "median_s": timing.median_s, "runs": timing.runs,
           "ms_per_prompt": 1e3 * timing.best_s / batch,
           "ratio_to_plain_cg": timing.best_s / baseline_s[batch]}
    if name != BASELINE and batch != point.batch:
      row["extrapolated_ratio_at_full_batch"] = (timing.best_s * point.batch / batch
                                                 / baseline_s[point.batch])
    if name in compiled:
      cfg = compiled[name].config
      flops = forward_flops(cfg, batch, point.num_support + 1 + config.num_query,
                            point.num_support + 1)
      row.update(build_s=build_s[name], layers=cfg.num_layers, width=cfg.width,
                 heads=cfg.num_heads, head_dim=cfg.head_dim, value_dim=cfg.resolved_value_dim,
                 mlp_hidden=cfg.mlp_hidden, flops=sum(flops.values()), flops_by_term=flops,
                 flop_ratio_to_plain=sum(flops.values()) / plain_cg_flops(point, batch),
                 min_bytes_ratio_to_plain=(minimum_bytes(cfg, point, batch, config.num_query)
                                           / plain_cg_bytes(point, batch)))
    rows.append(row)
    del fn
  for row in rows:
    reference = REFERENCE.get(row["method"])
    row["reference"] = reference
    row["max_rel_diff_vs_reference"] = None
    if reference in outputs:
      n = min(row["timed_batch"], outputs[reference].shape[0])
      ref = outputs[reference][:n]
      mine = outputs[row["method"]][:n]
      row["max_rel_diff_vs_reference"] = float(np.max(np.abs(mine - ref)) / np.max(np.abs(ref)))
  return rows


def run_forward(config, points_override) -> list[dict]:
  rows = []
  if points_override:
    jobs = [("point", Point(*parse_point(p))) for p in points_override]
  else:
    jobs = [("sweep", Point(config.sweep_batch, k, config.sweep_features, config.sweep_steps))
            for k in config.sweep_supports]
    jobs += [("target", Point(*parse_point(p))) for p in config.targets]
  for kind, point in jobs:
    start = time.perf_counter()
    point_rows = run_point(point, config, kind)
    rows.extend(point_rows)
    print(f"[forward] {kind} {point.label}: {time.perf_counter() - start:.1f} s")
    print(format_forward(point_rows))
  return rows


def run_compile(config) -> list[dict]:
  """Build and first-call time of the compiled forwards for deep t."""
  b, k, p = parse_point(config.compile_point, 3)
  rows = []
  for name in COMPILED:
    for t in config.compile_steps:
      point = Point(b, k, p, t)
      x_support, y_support, x_query = make_prompts(point, config.num_query, config.seed)
      start = time.perf_counter()
      model = compiled_model(name, point, config.ridge)
      build = time.perf_counter() - start
      fn = jax.jit(model.predict)
      start = time.perf_counter()
      lowered = fn.lower(x_support, y_support, x_query)
      trace = time.perf_counter() - start
      start = time.perf_counter()
      executable = lowered.compile()
      xla = time.perf_counter() - start
      timing, _ = time_call(executable, (x_support, y_support, x_query), config.repeats,
                            config.seconds_per_method)
      row = {"method": name, "batch": b, "num_support": k, "feature_dim": p, "num_steps": t,
             "layers": model.config.num_layers, "build_s": build, "trace_s": trace,
             "xla_compile_s": xla, "run_s": timing.best_s}
      rows.append(row)
      print(f"[compile] {name} k={k} p={p} t={t}: {row['layers']} layers; build {build:.2f} s, "
            f"trace {trace:.2f} s, XLA compile {xla:.2f} s, run {timing.best_s * 1e3:.1f} ms")
  return rows


def _attention_model(mask, impl, heads, dim, num_tokens):
  config = model_lib.ModelConfig(
      token_dim=8, width=max(16, heads * dim), num_layers=1, num_heads=heads, head_dim=dim,
      value_dim=dim, mlp_hidden=0, attention="linear", mask=mask, linear_attention_impl=impl,
      param_dtype=jnp.float32)
  return model_lib.Transformer(config, rngs=nnx.Rngs(0))


def run_attention(config) -> list[dict]:
  """One linear-attention layer, quadratic vs associative, against T (where `auto` switches)."""
  rows = []
  rng = np.random.default_rng(config.seed)
  for mask in ("causal", "prefix"):
    for dim in config.attention_dims:
      for num_tokens in config.attention_tokens:
        tokens = jnp.asarray(rng.standard_normal((config.attention_batch, num_tokens, 8)),
                             jnp.float32)
        times = {}
        for impl in ("quadratic", "associative"):
          model = _attention_model(mask, impl, config.attention_heads, dim, num_tokens)
          graphdef, state = nnx.split(model)

          def forward(state, tokens, graphdef=graphdef):
            return nnx.merge(graphdef, state)(tokens, num_prefix=num_tokens - 1).outputs
          timing, _ = time_call(jax.jit(forward), (state, tokens), max(5, config.repeats),
                                config.seconds_per_method / 4)
          times[impl] = timing.best_s
        resolved = model_lib._resolved_linear_impl("auto", mask, num_tokens)
        row = {"mask": mask, "dim": dim, "num_tokens": num_tokens, "batch": config.attention_batch,
               "heads": config.attention_heads, "quadratic_s": times["quadratic"],
               "associative_s": times["associative"], "auto_picks": resolved,
               "faster": "associative" if times["associative"] < times["quadratic"] else "quadratic"}
        rows.append(row)
        print(f"[attention] {mask:6s} dk=dv={dim:3d} T={num_tokens:5d}: quadratic "
              f"{times['quadratic'] * 1e3:8.2f} ms, associative {times['associative'] * 1e3:8.2f} ms,"
              f" auto picks {resolved}")
  return rows


def run_ablation(config) -> list[dict]:
  """The compiled configs with random weights (same cost), minus one term at a time."""
  point = Point(*parse_point(config.ablation_point))
  rows = []
  rng = np.random.default_rng(config.seed)
  for name in config.ablation_constructions:
    base = compiled_model(name, point, config.ridge).config
    p = point.feature_dim
    num_tokens = point.num_support + 1 + config.num_query
    num_prefix = point.num_support + 1
    r = functools.partial(dataclasses.replace, base)
    wide_heads = 2 if name == "compiled_dual_prefix" else 1
    variants = {
        "compiled": ("as compiled", base),
        "mlp16": ("MLP only for the linear units (16)", r(mlp_hidden=16)),
        "no_mlp": ("no MLP", r(mlp_hidden=0)),
        "wide_heads": (f"{wide_heads} unpadded wide heads (dk=p) instead of {base.num_heads}",
                       r(num_heads=wide_heads)),
        "one_phi": (f"one phi channel (width {base.width} -> {base.width - p})",
                    r(width=base.width - p)),
        "all_three": ("MLP 16 + wide heads only + one phi channel",
                      r(mlp_hidden=16, num_heads=wide_heads, width=base.width - p)),
        "quadratic": ("quadratic attention", r(linear_attention_impl="quadratic")),
    }
    unknown = set(config.ablation_variants) - set(variants)
    if unknown:
      raise ValueError(f"Unknown ablation variants {sorted(unknown)}; known: {sorted(variants)}.")
    variants = {variants[key][0]: variants[key][1]
                for key in ["compiled"] + [v for v in config.ablation_variants if v != "compiled"]}
    tokens = jnp.asarray(rng.standard_normal((point.batch, num_tokens, base.token_dim)),
                         jnp.float32)
    reference = None
    for label, cfg in variants.items():
      model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(model)

      def forward(state, tokens, graphdef=graphdef):
        return nnx.merge(graphdef, state)(tokens, num_prefix=num_prefix).outputs
      timing, _ = time_call(jax.jit(forward), (state, tokens), config.repeats,
                            config.seconds_per_method)
      flops = forward_flops(cfg, point.batch, num_tokens, num_prefix)
      reference = reference or timing.best_s
      row = {"construction": name, "variant": label, "batch": point.batch,
             "num_support": point.num_support, "feature_dim": p, "num_steps": point.num_steps,
             "layers": cfg.num_layers, "width": cfg.width, "heads": cfg.num_heads,
             "head_dim": cfg.head_dim, "value_dim": cfg.resolved_value_dim,
             "mlp_hidden": cfg.mlp_hidden, "seconds": timing.best_s,
             "fraction_of_compiled": timing.best_s / reference, "flops": sum(flops.values()),
             "flops_by_term": flops}
      rows.append(row)
      print(f"[ablation] {name} {point.label}: {label:45s} {timing.best_s * 1e3:9.1f} ms "
            f"({row['fraction_of_compiled']:.2f} of compiled), {row['flops']:.3g} FLOP")
  return rows


# ---------------------------------------------------------------------------------------------
# Reporting.


def _fmt_s(seconds: float) -> str:
  if seconds >= 1.0:
    return f"{seconds:.2f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds * 1e6:.0f} us"


def format_forward(rows: list[dict]) -> str:
  lines = ["| point | method | timed B | time | per prompt | ratio to plain CG | "
           "ratio at full B (extrap.) | first call | max rel diff (vs) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    point = f"B={r['batch']} k={r['num_support']} p={r['feature_dim']} t={r['num_steps']}"
    ratio = r.get("ratio_to_plain_cg")
    extrap = r.get("extrapolated_ratio_at_full_batch")
    diff = r["max_rel_diff_vs_reference"]
    diff_text = "" if diff is None else f"{diff:.1e} ({r['reference']})"
    lines.append(
        f"| {point} | {r['method']} | {r['timed_batch']} | {_fmt_s(r['seconds'])} | "
        f"{r['ms_per_prompt']:.3g} ms | {'' if ratio is None else f'{ratio:.3g}x'} | "
        f"{'' if extrap is None else f'{extrap:.3g}x'} | {_fmt_s(r['first_call_s'])} | "
        f"{diff_text} |")
  return "\n".join(lines)


def format_compiled_costs(rows: list[dict]) -> str:
  lines = ["| point | construction | layers | width | heads x dk (dv) | MLP | FLOP | FLOP / plain CG | "
           "min bytes / plain CG | dominant term |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "flops" not in r:
      continue
    terms = r["flops_by_term"]
    top = max(terms, key=terms.get)
    lines.append(
        f"| B={r['timed_batch']} k={r['num_support']} p={r['feature_dim']} t={r['num_steps']} | "
        f"{r['method']} | {r['layers']} | {r['width']} | {r['heads']} x {r['head_dim']} "
        f"({r['value_dim']}) | {r['mlp_hidden']} | {r['flops']:.3g} | "
        f"{r['flop_ratio_to_plain']:.3g} | {r['min_bytes_ratio_to_plain']:.3g} | {top} "
        f"({terms[top] / r['flops']:.0%}) |")
  return "\n".join(lines)


def _sweep_per_prompt(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """method -> [(k, seconds per prompt)] over the sweep, one entry per k (largest timed batch)."""
  best = {}
  for r in rows:
    if r["kind"] != "sweep":
      continue
    key = (r["method"], r["num_support"])
    if key not in best or r["timed_batch"] > best[key]["timed_batch"]:
      best[key] = r
  curves = {}
  for (method, k), r in best.items():
    curves.setdefault(method, []).append((k, r["seconds"] / r["timed_batch"]))
  return {m: sorted(v) for m, v in curves.items()}


def linearity(rows: list[dict]) -> dict[str, float]:
  """Slope of log(time per prompt) against log(k) over the sweep's two largest k, per method."""
  slopes = {}
  for method, pts in _sweep_per_prompt(rows).items():
    if len(pts) >= 2:
      (k0, t0), (k1, t1) = pts[-2], pts[-1]
      slopes[method] = math.log(t1 / t0) / math.log(k1 / k0)
  return slopes


def plot_time_vs_k(path: str, rows: list[dict]) -> None:
  curves = _sweep_per_prompt(rows)
  figure, ((axes,),) = kcg.plotting.new_figure(size=(6.4, 4.6))
  for i, (method, pts) in enumerate(curves.items()):
    ks, ts = zip(*pts)
    axes.loglog(ks, np.asarray(ts) * 1e3, "-", label=method, **kcg.plotting.line_style(i))
  sweep = [r for r in rows if r["kind"] == "sweep"]
  if sweep:
    ks = np.asarray(sorted({r["num_support"] for r in sweep}), np.float64)
    t_ref = max(pts[0][1] for pts in curves.values()) * 1e3
    axes.loglog(ks, t_ref * ks / ks[0], "--", alpha=0.4, label="slope 1 (linear in k)",
                **kcg.plotting.REFERENCE)
    first = sweep[0]
    axes.set_title(f"time per prompt vs k (p={first['feature_dim']}, t={first['num_steps']}, "
                   f"B={first['batch']} or less; {jax.default_backend()})", fontsize=9)
  axes.set_xlabel("supports k")
  axes.set_ylabel("time per prompt (ms)")
  axes.grid(True, which="both", alpha=0.3)
  kcg.plotting.add_legend(axes)
  kcg.plotting.save_figure(figure, path)


def markdown_report(results: dict) -> str:
  parts = [f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
           f"{results['machine']['backend']}; jax {results['machine']['jax']}; load average at "
           f"start {results['machine']['load_average']}.", ""]
  if "probe" in results:
    p = results["probe"]
    parts += [f"Probe: float32 matmul {p['matmul_gflops']:.1f} GFLOP/s, read "
              f"{p['read_gb_per_s']:.1f} GB/s, dispatch floor {p['dispatch_floor_us']:.0f} us.", ""]
  if "forward" in results:
    parts += ["Forward times:", "", format_forward(results["forward"]), "",
              "Compiled forwards, cost model:", "", format_compiled_costs(results["forward"]), ""]
    parts += ["Slope of log time vs log k (largest two k of the sweep): " + ", ".join(
        f"{m} {s:.2f}" for m, s in results.get("linearity", {}).items()), ""]
  if "compile" in results:
    parts += ["| compiled forward | k | p | t | layers | build | trace | XLA compile | run |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["compile"]:
      parts.append(f"| {r['method']} | {r['num_support']} | {r['feature_dim']} | {r['num_steps']} | "
                   f"{r['layers']} | {_fmt_s(r['build_s'])} | {_fmt_s(r['trace_s'])} | "
                   f"{_fmt_s(r['xla_compile_s'])} | {_fmt_s(r['run_s'])} |")
    parts.append("")
  if "attention" in results:
    parts += ["| mask | dk = dv | T | quadratic | associative | auto picks |", "|---|---|---|---|---|---|"]
    for r in results["attention"]:
      parts.append(f"| {r['mask']} | {r['dim']} | {r['num_tokens']} | {_fmt_s(r['quadratic_s'])} | "
                   f"{_fmt_s(r['associative_s'])} | {r['auto_picks']} |")
    parts.append("")
  if "ablation" in results:
    parts += ["| construction | variant | layers | width | heads x dk | MLP | time | fraction | FLOP |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["ablation"]:
      parts.append(f"| {r['construction']} | {r['variant']} | {r['layers']} | {r['width']} | "
                   f"{r['heads']} x {r['head_dim']} | {r['mlp_hidden']} | {_fmt_s(r['seconds'])} | "
                   f"{r['fraction_of_compiled']:.2f} | {r['flops']:.3g} |")
    parts.append("")
  if "train" in results:
    parts += ["| training step | compute | params | B | T | step | first step | loss (first -> last) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
      parts.append(f"| GPT-style {r['layers']}L w{r['width']} | {r['compute_dtype']} | {r['params']} | "
                   f"{r['batch']} | {r['tokens']} | {_fmt_s(r['step_s'])} | "
                   f"{_fmt_s(r['first_step_s'])} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    parts.append("")
  if "training_throughput" in results:
    parts += ["Training throughput:", "",
              bench_training.format_table(results["training_throughput"]), ""]
  return "\n".join(parts)


def run(config, workdir: str, *, points: list[str] | None = None,
        sections: list[str] | None = None, command: str = "") -> dict:
  """Runs the selected sections; writes bench.json, bench.md and time_vs_k.png; returns results."""
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  sections = list(sections or config.sections)
  unknown = set(sections) - {"probe", "forward", "compile", "attention", "ablation", "train",
                             "training_throughput"}
  if unknown:
    raise ValueError(f"Unknown sections {sorted(unknown)}.")
  unknown = set(config.methods) - set(BASELINES) - set(COMPILED)
  if unknown:
    raise ValueError(f"Unknown methods {sorted(unknown)}; known: {sorted(BASELINES) + list(COMPILED)}.")
  for p in points or []:
    parse_point(p)
  results = {"command": command, "machine": machine_info(), "config": config.to_dict(),
             "precision": "float32 inputs and parameters, matmuls at Precision.HIGHEST"}
  print(f"machine: {results['machine']}")
  if "probe" in sections:
    results["probe"] = run_probe(config)
  if "forward" in sections:
    results["forward"] = run_forward(config, points)
    results["linearity"] = linearity(results["forward"])
    print("slope of log time vs log k:", {m: round(s, 2) for m, s in results["linearity"].items()})
    print(format_compiled_costs(results["forward"]))
    if any(r["kind"] == "sweep" for r in results["forward"]):
      plot_time_vs_k(os.path.join(workdir, "time_vs_k.png"), results["forward"])
  if "compile" in sections:
    results["compile"] = run_compile(config)
  if "attention" in sections:
    results["attention"] = run_attention(config)
  if "ablation" in sections:
    results["ablation"] = run_ablation(config)
  if "train" in sections:
    results["train"] = bench_training.run_train(config)
  if "training_throughput" in sections:
    results["training_throughput"] = bench_training.run_training_throughput(config.throughput)
    print(bench_training.format_table(results["training_throughput"]))
  results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  results["runtime_s"] = time.time() - start
  with open(os.path.join(workdir, "bench.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  with open(os.path.join(workdir, "bench.md"), "w") as f:
    f.write(markdown_report(results))
  print(f"wrote {workdir}/bench.json, bench.md, time_vs_k.png in {results['runtime_s']:.0f} s")
  return results


def _flags() -> dict[str, flags.FlagHolder]:
  return {
      "smoke": flags.DEFINE_bool("smoke", False,
                                 "Tiny grid that runs in seconds (the config's 'smoke' variant)."),
      "points": flags.DEFINE_list("points", None,
                                  "Grid points BxKxPxT replacing the sweep and the targets."),
      "sections": flags.DEFINE_list("sections", None, "Sections to run (default: all in the config)."),
      "methods": flags.DEFINE_list("methods", None, "Methods of the forward section (default: all; "
                                   "plain_cg is always timed, as the baseline)."),
  }


def main(config, workdir: str, *, smoke: bool = False, points: list[str] | None = None,
         sections: list[str] | None = None, methods: list[str] | None = None) -> dict:
  """The binary: `--smoke` swaps in the smoke config, `--methods` narrows it, then `run`."""
  if smoke:
    from experiments.configs import bench as bench_config  # pylint: disable=g-import-not-at-top
    config = bench_config.get_config("smoke")
  if methods:
    config.methods = tuple(methods)
  return run(config, workdir, points=points, sections=sections,
             command="python -m experiments.bench " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  _cli.run_main(main, _DEFAULT_CONFIG, "bench.json, bench.md and time_vs_k.png", extra_flags=_flags)
