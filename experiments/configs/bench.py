"""Benchmark grid: compiled CG transformer forwards against CG in JAX; training throughput.

Run (from the repository root):

  python -m experiments.bench --workdir=/tmp/kcg/bench

Expected runtime: about 10 min on 2 idle CPU cores, 18 min when the machine is shared (most of it
in the compiled forwards at k = 4096).
Prints the tables and writes `WORKDIR/bench.json`, `WORKDIR/bench.md` and `WORKDIR/time_vs_k.png`.
The seconds-long variant that the tests run:

  python -m experiments.bench --smoke --workdir=/tmp/kcg/bench_smoke

(`--smoke` is `--config=experiments/configs/bench.py:smoke`). Any field is a flag, e.g.
`--config.repeats=5`; `--points=256x1024x64x16,64x4096x128x16` replaces the sweep and the targets by
these (B x k x p x t) points, `--sections=forward,compile` runs only some sections and
`--methods=plain_cg,compiled_dual_prefix` only some methods.

Sections:
  probe      matmul GFLOP/s, memory GB/s and the dispatch floor of this machine (the roofline).
  forward    every method on the same prompts: the sweep over k (time vs k, linearity) and the
             target points (`targets`). A method whose estimated cost exceeds its budget
             (`compiled_flop_budget`, `kernel_memory_budget_gb`) runs on the first B' < B prompts
             instead; its ratio is then taken against plain CG timed at the same B' on the same
             prompts, and the reason is printed.
  compile    build time (`kcg.compile_cg`) and first-call (trace + XLA compile) time for deep t.
  attention  linear attention, quadratic vs associative, against T (the `auto` crossover).
  ablation   which term of the compiled forward dominates: the same configs with parts removed.
  train      one training step of the GPT-style config (kcg.Transformer + optax.adamw), float32
             and bfloat16 compute.
  training_throughput
             kcg's gpt_icl training step and forward against a Flax NNX reference GPT and PyTorch
             eager with Hugging Face GPT2Model (Garg et al.'s setup), in interleaved rounds: s/step,
             CPU s/step, ratios to PyTorch and the fraction of the matmul peak measured in the same
             run (experiments/bench_training.py). Alone (the PyTorch rows need
             `pip install -e ".[bench]"`; without it they are skipped and the output says so):

               python -m experiments.bench --sections=training_throughput --workdir=/tmp/kcg/tput

             Runtime: 11 min measured with 5 rounds on the shared machine (load ~12, bench at
             nice -19; 2 min of it compilation); about 5 min expected with the default 7 rounds on
             2 idle cores (~25 s per round).
"""

import ml_collections

METHODS = ("plain_cg", "plain_cg_primal", "plain_cg_kernel", "jax_cg_vmap", "cholesky",
           "compiled_dual_prefix", "compiled_primal_causal")
SECTIONS = ("probe", "forward", "compile", "attention", "ablation", "train", "training_throughput")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default grid; `arg="smoke"` (or "runlocal") shrinks every size to a seconds-long run."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.ridge = 1e-2
  config.num_query = 1
  config.sections = SECTIONS
  config.methods = METHODS
  config.repeats = 3
  # A method stops repeating once its timed calls add up to this many seconds (at least one).
  config.seconds_per_method = 20.0
  # Time vs k at fixed (B, p, t).
  config.sweep_batch = 4
  config.sweep_features = 64
  config.sweep_steps = 16
  config.sweep_supports = (64, 256, 1024, 4096)
  # Target points (B x k x p x t): a mid-size and a long-prompt batch, as "BxKxPxT".
  config.targets = ("256x1024x64x16", "64x4096x128x16")
  # FLOP per timed call of a compiled forward before its batch is scaled down (BENCHMARKS.md
  # gives the time this costs on the measured machine).
  config.compiled_flop_budget = 1e12
  # Bytes of K [B, k, k] (times 3: K, its factor, workspace) before kernel methods are scaled down.
  config.kernel_memory_budget_gb = 4.0
  # Compile time of the compiled forwards for deep t, at (B, k, p).
  config.compile_steps = (16, 64, 256)
  config.compile_point = "1x64x16"
  # Linear attention microbenchmark: one attention-only layer, B x H heads of dk = dv.
  config.attention_batch = 8
  config.attention_heads = 4
  config.attention_dims = (1, 64)
  config.attention_tokens = (64, 128, 256, 512, 1024, 2048)
  # Ablation point (t small: every CG step has the same layers, so fractions do not depend on t).
  config.ablation_point = "2x1024x64x2"
  config.ablation_constructions = ("compiled_dual_prefix", "compiled_primal_causal")
  config.ablation_variants = ("compiled", "mlp16", "no_mlp", "wide_heads", "one_phi", "all_three",
                              "quadratic")
  # GPT-style training step (experiments/configs/gpt_icl.py): interleaved tokens, T = 2 x points.
  config.train = ml_collections.ConfigDict()
  config.train.num_layers = 12
  config.train.width = 256
  config.train.num_heads = 8
  config.train.head_dim = 32
  config.train.mlp_hidden = 1024
  config.train.input_dim = 20
  config.train.num_points = 41
  config.train.batch_size = 64
  config.train.steps = 5
  config.train.learning_rate = 1e-4
  config.train.clip_norm = 1.0
  config.train.compute_dtypes = ("float32", "bfloat16")
  config.probe_matmul = 2048
  config.probe_megabytes = 256
  # Training throughput against references (Garg et al. 2022's GPT-2 setup, gpt_icl's model).
  config.throughput = ml_collections.ConfigDict()
  config.throughput.num_layers = 12
  config.throughput.width = 256
  config.throughput.num_heads = 8
  config.throughput.head_dim = 32
  config.throughput.mlp_hidden = 1024
  config.throughput.input_dim = 20
  config.throughput.num_points = 41
  config.throughput.batch_size = 64
  config.throughput.learning_rate = 1e-4
  config.throughput.seed = 0
  # Interleaved rounds: each runs every implementation once; medians and spreads are over rounds.
  config.throughput.rounds = 7
  # Pause before each timed call, so that the previous implementation's worker threads stop spinning.
  config.throughput.settle_s = 0.2
  config.throughput.peak_matmul = 4096
  # torch intra-op threads (0: torch's default, one per core). XLA's are set by the environment, e.g.
  # XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for one thread.
  config.throughput.torch_threads = 0
  # Also time the kcg step as earlier implementations of kcg.Transformer traced it
  # (experiments/bench_training.py, KCG_VARIANTS): "before" is the model before this section's
  # fixes, "scan_layers" and "softmax_first" undo one fix each.
  config.throughput.kcg_variants = ("before", "scan_layers", "softmax_first")
  if arg in ("smoke", "runlocal"):
    config.repeats = 2
    config.seconds_per_method = 2.0
    config.sweep_batch = 2
    config.sweep_features = 4
    config.sweep_steps = 2
    config.sweep_supports = (8, 16)
    config.targets = ()
    config.compile_steps = (2,)
    config.compile_point = "1x4x2"
    config.attention_batch = 2
    config.attention_heads = 2
    config.attention_dims = (4,)
    config.attention_tokens = (20,)
    config.ablation_point = "2x8x4x1"
    config.ablation_constructions = ("compiled_dual_prefix",)
    config.ablation_variants = ("compiled", "all_three")
    config.train.num_layers = 2
    config.train.width = 16
    config.train.num_heads = 2
    config.train.head_dim = 8
    config.train.mlp_hidden = 32
    config.train.input_dim = 3
    config.train.num_points = 5
    config.train.batch_size = 4
    config.train.steps = 2
    config.train.compute_dtypes = ("float32",)
    config.probe_matmul = 64
    config.probe_megabytes = 1
    config.throughput.num_layers = 2
    config.throughput.width = 16
    config.throughput.num_heads = 2
    config.throughput.head_dim = 8
    config.throughput.mlp_hidden = 32
    config.throughput.input_dim = 3
    config.throughput.num_points = 5
    config.throughput.batch_size = 4
    config.throughput.rounds = 2
    config.throughput.settle_s = 0.0
    config.throughput.peak_matmul = 64
    config.throughput.kcg_variants = ()
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config variant {arg!r}; use no argument or 'smoke'.")
  return config
