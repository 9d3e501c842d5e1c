"""From compiled to trained: does gradient descent keep CG, and can it find it? (`experiments/finetune.py`)

Starts from `kcg.compile_cg` weights (dual CG with per-support state under the prefix mask; primal CG
in the aggregator under the causal mask), trains on the task they solve with kcg's loss and optimizer,
in five ways (`kcg.finetune.MODES`): every weight (`plain`), every weight but the division
(`freeze_reciprocal`), a gain per layer and head on frozen weights (`gains`), gains only on the heads
that compute a value, bookkeeping and division held at 1 (`compute_gains`), and the same
architecture from random init (`random`); then trains the architecture from random init to imitate
CG_t (`imitate`). Two task families (`config.features`, `kcg.finetune.Setup.features`): "identity",
noisy linear regression on x; "random_relu", targets w^T phi(x) + noise with phi(x) = relu(W x) /
sqrt(m) a fixed random-ReLU layer (W from `feature_seed`, m = `feature_dim`) that the compiled model
computes in its first layer (kcg.tasks' "relu_features"; the references are KRR and CG_t on phi).
Writes DIR/report.md (one section and figure per family, construction and t), DIR/results.json,
PNGs; models in DIR/models/<family>_<construction>_t<t>_<run>; a rerun resumes.

Scales (`--config=experiments/configs/finetune.py[:runlocal|:smoke]`):

* default (full): t = 2, 4, 6, 8; d = 4, k = 8, q = 4, noise 0.3; 400 steps of batch 32, evaluated
  every 100 on 128 held-out prompts. Linear family, both constructions: plain, gains, compute_gains
  and random in float32, compute_gains in float64, and the imitation (400 steps); relu_features
  (m = 16), dual_prefix: plain, gains, compute_gains and random in float32 (64 runs; the
  relu_features primal_causal model is wider, width 193 vs 79 at m = 24, and its runs did not fit
  the session that ran this).
  Measured 2026-12-05 on the shared 2-core machine (load average 4-8, the test suite running
  beside it): 2447 s CPU (user) in all, peak RSS 2.2 GB; run as two processes over disjoint runs
  into one workdir (43 min wall), then the default command once more (6.5 min: it resumed the
  finished runs and wrote the report). The sizes first planned (d = 6, k = 12, 2000 steps,
  every mode in both dtypes) cost ~12 CPU min per run at t = 8 (measured: 74 layers of width 79 for
  relu_features dual_prefix, ~35 CPU s per 100 steps with an evaluation), i.e. many hours on 2 cores.

      python -m experiments.finetune --config=experiments/configs/finetune.py --workdir=/tmp/ft

* `runlocal`: t = 2, d = 3, k = 6, q = 4; 300 steps (eval every 100). Linear family, both
  constructions: every mode in float32, plain, gains and compute_gains also in float64, imitation
  300 steps (18 runs). relu_features family (m = 12): dual_prefix, plain, gains, compute_gains and
  random in float32 (4 runs). Measured 2026-12-05 on the 2-core machine, nothing else running: 333 s
  wall, 483 s CPU (user), peak RSS 2.4 GB. With an
  evaluation every 50 steps it took 521 s CPU (user), 11.1 min wall beside the test suite's two
  workers, peak RSS 2.6 GB.

      python -m experiments.finetune --config=experiments/configs/finetune.py:runlocal --workdir=/tmp/ftl

* `smoke`: dual_prefix, t = 1; linear: modes plain and gains and the imitation; relu_features (m = 4):
  gains; 2 steps of batch 4, float32: the fast test.

report.md ends its summary with the run's own wall and CPU seconds.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = {a for a in (arg or "").split(",") if a}
  unknown = options - {"runlocal", "smoke"}
  if unknown or len(options) > 1:
    raise ValueError(f"Unknown or conflicting config option(s) {sorted(options)}; pick one of "
                     "'runlocal', 'smoke' (or none for the full scale).")
  config = ml_collections.ConfigDict()
  config.scale = "full"
  config.seed = 0
  config.constructions = ("dual_prefix", "primal_causal")
  config.cg_steps = (2, 4, 6, 8)
  config.input_dim = 4
  config.num_support = 8
  config.num_query = 4
  config.noise_std = 0.3
  # Task families (`kcg.finetune.Setup.features`): "identity" is noisy linear regression on x (the
  # compiled model runs CG on x); "random_relu" has targets w^T phi(x), phi(x) = relu(W x) / sqrt(m)
  # with (W, b) fixed by feature_seed, and the compiled model computes the same phi in its first layer.
  config.features = ("identity", "random_relu")
  config.feature_dim = 16
  config.feature_seed = 0
  # What the random_relu family runs ("identity" uses constructions, modes, float64_modes, imitate).
  config.random_relu = ml_collections.ConfigDict(dict(
      constructions=("dual_prefix",), modes=("plain", "gains", "compute_gains", "random"),
      float64_modes=(), imitate=False))
  # Runs from the compiled weights (and the random-init control), per dtype.
  # freeze_reciprocal (non-finite at step 1 in both dtypes at runlocal) is left to runlocal.
  config.modes = ("plain", "gains", "compute_gains", "random")
  config.dtypes = ("float32", "float64")
  # Modes that also run in float64.
  config.float64_modes = ("compute_gains",)
  config.num_steps = 400
  config.batch_size = 32
  config.learning_rate = 1e-3
  # Gains are O(1) multipliers of exact blocks: a larger step (they are few).
  config.gains_learning_rate = 1e-2
  config.eval_every = 100
  config.num_eval_prompts = 128
  # Random init of the compiled architecture (no norm, attention scale 1): small q/k/v keep the
  # cubic layers near the identity.
  config.qkv_init_scale = 0.2
  # Random init (task and imitation): a smaller step with a warmup (at 1e-3 it diverged in runlocal).
  config.random_learning_rate = 3e-4
  config.random_warmup_steps = 50
  # Learning CG: random init trained to imitate CG_t (float32).
  config.imitate = True
  config.imitate_steps = 400

  if "runlocal" in options:
    config.scale = "runlocal"
    config.cg_steps = (2,)
    config.input_dim = 3
    config.num_support = 6
    config.modes = ("plain", "freeze_reciprocal", "gains", "compute_gains", "random")
    config.float64_modes = ("plain", "gains", "compute_gains")
    config.num_steps = 300
    config.imitate_steps = 300
    config.eval_every = 100
    config.num_eval_prompts = 64
    config.feature_dim = 12
    config.random_relu = ml_collections.ConfigDict(dict(
        constructions=("dual_prefix",), modes=("plain", "gains", "compute_gains", "random"),
        float64_modes=(),
        imitate=False))
  elif "smoke" in options:
    config.scale = "smoke"
    config.constructions = ("dual_prefix",)
    config.cg_steps = (1,)
    config.input_dim = 2
    config.num_support = 4
    config.num_query = 2
    config.modes = ("plain", "gains")
    config.dtypes = ("float32",)
    config.float64_modes = ()
    config.num_steps = 2
    config.imitate_steps = 2
    config.eval_every = 1
    config.batch_size = 4
    config.num_eval_prompts = 8
    config.feature_dim = 4
    config.random_relu = ml_collections.ConfigDict(dict(
        constructions=("dual_prefix",), modes=("gains",), float64_modes=(), imitate=False))
  return config
