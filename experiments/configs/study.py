"""The formal-vs-learned study: trained transformers against compiled CG, probes, ablations, laws.

Three scales (`--config=experiments/configs/study.py[:runlocal|:smoke]`):

* default (full): noisy linear regression d = 8, k = 16, q = 4 (Bayes ridge 2.0); linear-attention and
  softmax models of depth L = 1..8 trained 10000 steps each (batch 128); compiled CG with t = 4 in
  all three constructions; larger grids. Depth sweeps (`depth_sweeps`): linear and softmax models of
  depth 1, 2, 4, 8 trained 3000 steps afresh at input condition numbers 1, 10, 100, 1000 and at
  ridges 0.02, 0.2, 2 (56 more models), against compiled CG / PCG / Chebyshev and reference GD.
  Measured on 2 CPU cores (machine otherwise idle): about 95 minutes from scratch, peak memory
  4.6 GB. Per section: training the 16 models 2687 s (~250 steps/s at L = 1 down to ~35 steps/s for
  softmax L = 8), depth sweeps 2540 s (56 models), depth comparison 12 s, laws and reference sweeps
  ~60 s, compiled models ~150 s (layer matching with gradients on the 49-layer causal model 61 s),
  trained analyses 207 s. Trained models (main and depth-sweep ones) are checkpointed under
  `WORKDIR/models`, so a rerun into the same workdir resumes them and takes ~8 minutes.
  Other input conditioning: add `--config.task.condition_number=100 --config.task.input_rotation=fixed`.

      python -m experiments.study --config=experiments/configs/study.py --workdir=/tmp/study

* `runlocal`: d = 4, k = 8, q = 4; linear attention L = 1, 2, 3 and softmax L = 2, 400 steps each;
  compiled CG with t = 3; depth sweeps over condition numbers 1, 100 and ridges 0.1, 1 (linear
  L = 1, 2, 3, 500 steps: 12 more models); small grids. About 3 minutes on 2 CPU cores: measured
  2 min 54 s with the machine otherwise idle (depth sweeps 47 s, compiled section 42 s, training
  15 s) and 8 min 17 s while other jobs held both cores (load ~2.5); the slow test runs it (2 min
  56 s). Peak memory ~6 GB.

      python -m experiments.study --config=experiments/configs/study.py:runlocal --workdir=/tmp/study_local

* `smoke`: one linear model of depth 1 trained 20 steps, t = 1, two points per sweep, no gradients,
  CG and GD only (compiled CG only in the depth comparison, no PCG / Chebyshev / Route A ablation
  tables), one point per depth sweep, and only the sections that exercise distinct code (no
  condition-number, temperature, failure-mode and width sweeps of the reference solvers): under a
  minute (the fast test runs it in-process).

Every field can be overridden on the command line, e.g. `--config.train.depths=1,2`.
"""

from __future__ import annotations

import ml_collections


def _parse(arg: str | None) -> set[str]:
  options = {a for a in (arg or "").split(",") if a}
  unknown = options - {"runlocal", "smoke"}
  if unknown:
    raise ValueError(f"Unknown config option(s) {sorted(unknown)}; known: 'runlocal', 'smoke'.")
  if len(options) > 1:
    raise ValueError("Pick one scale: 'runlocal' or 'smoke'.")
  return options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  options = _parse(arg)
  config = ml_collections.ConfigDict()
  config.scale = "full"
  config.seed = 0
  # Parts of the study to run (the trained models are always trained; see experiments/study.py).
  config.sections = ("depth_comparison", "depth_sweeps", "depth_law", "ridge_sweep",
                     "condition_sweep", "temperature_sweep", "failure_modes", "feature_perturbation",
                     "width_sweep", "compiled", "trained")

  config.task = ml_collections.ConfigDict()
  config.task.family = "noisy_linear"
  config.task.input_dim = 8
  config.task.num_support = 16
  config.task.num_query = 4
  config.task.noise_std = 0.5
  config.task.condition_number = 1.0
  config.task.input_rotation = "per_prompt"
  # KRR / CG ridge of every comparison; 0 = the Bayes ridge noise_std^2 * d (floored at 1e-3).
  config.ridge = 0.0

  config.train = ml_collections.ConfigDict()
  config.train.depths = (1, 2, 3, 4, 5, 6, 7, 8)
  config.train.attentions = ("linear", "softmax")
  # Depths of the softmax models; empty = the same as `depths`.
  config.train.softmax_depths = ()
  config.train.width = 32
  config.train.num_heads = 2
  config.train.head_dim = 16
  config.train.mlp_hidden = 0
  config.train.num_steps = 10000
  config.train.batch_size = 128
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 500
  config.train.qkv_init_scale = 0.5
  config.train.save_models = True

  # Error vs depth across tasks: models trained afresh at each input condition number (eigenbasis
  # fixed) and at each ridge (task noise sqrt(ridge / d), so the Bayes ridge is the value; the
  # oracle and solvers use it), against compiled solvers with t = L on held-out prompts.
  config.sweeps = ml_collections.ConfigDict()
  config.sweeps.condition_numbers = (1.0, 10.0, 100.0, 1000.0)
  config.sweeps.ridges = (0.02, 0.2, 2.0)
  config.sweeps.depths = (1, 2, 4, 8)
  config.sweeps.attentions = ("linear", "softmax")
  config.sweeps.num_steps = 3000
  config.sweeps.num_prompts = 256
  # Prompts whose largest ||Phi||_2^2 sets the compiled Chebyshev interval.
  config.sweeps.num_calibration_prompts = 256

  config.eval = ml_collections.ConfigDict()
  config.eval.num_prompts = 256
  config.eval.num_fit_prompts = 256

  config.compiled = ml_collections.ConfigDict()
  config.compiled.num_steps = 4
  config.compiled.constructions = ("dual/prefix", "dual/causal", "primal/causal")
  # Probe prompts: the aggregator site has one row per prompt, and the dual/causal construction keeps
  # the state in ~50 varying aggregator columns (k = 16), so 5-fold probes need > 64 prompts.
  config.compiled.num_prompts = 256
  # Compiled solvers of the depth comparisons ("cg", "pcg", "chebyshev"; GD has no compiled version).
  config.compiled.depth_solvers = ("cg", "pcg", "chebyshev")
  # Further constructions whose ablations are tabulated: "pcg", "chebyshev", "softmax" (Route A).
  config.compiled.ablation_extras = ("pcg", "chebyshev", "softmax")
  # Temperature of the Route A model (exp(<x, x'>/tau)); 0 = the input dimension d.
  config.compiled.softmax_temperature = 0.0
  # The CG step (0-based) at which those tables remove each operation.
  config.compiled.ablation_step = 1

  config.probes = ml_collections.ConfigDict()
  config.probes.num_folds = 5
  config.probes.ridge = 1e-6
  config.probes.cosine_threshold = 0.9

  config.matching = ml_collections.ConfigDict()
  config.matching.readouts = ("logit_lens", "linear_readout")
  config.matching.algorithms = ("cg", "primal_cg", "pcg", "gd", "chebyshev", "newton_schulz")
  config.matching.spaces = ("data", "feature")
  config.matching.max_steps = 12
  config.matching.gradients = True
  # Ridge of the per-layer linear readouts (per standardised feature).
  config.matching.readout_ridge = 1e-3
  # Feature space for the feature-vs-data comparison: random ReLU features of this width.
  config.matching.feature_dim = 64

  config.laws = ml_collections.ConfigDict()
  config.laws.num_prompts = 32
  config.laws.depth_support = 16
  config.laws.depth_max_steps = 14
  config.laws.depth_kappas = (10.0, 100.0, 1000.0)
  config.laws.depth_ridge = 0.1
  config.laws.num_steps = 4
  config.laws.ridges = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
  config.laws.condition_numbers = (1.0, 10.0, 100.0, 1000.0)
  config.laws.temperatures = (0.1, 0.3, 1.0, 3.0, 10.0)
  config.laws.collinearity = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
  config.laws.small_ridges = (1.0, 1e-2, 1e-4, 1e-6, 1e-8)
  config.laws.perturbation_scales = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
  config.laws.widths = (1, 2, 4, 6, 8, 12, 16)

  if "runlocal" in options:
    config.scale = "runlocal"
    config.task.input_dim = 4
    config.task.num_support = 8
    config.train.depths = (1, 2, 3)
    config.train.attentions = ("linear", "softmax")
    config.train.softmax_depths = (2,)
    config.train.width = 24
    config.train.num_heads = 2
    config.train.head_dim = 12
    config.train.num_steps = 400
    config.train.batch_size = 64
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 50
    config.eval.num_prompts = 64
    config.eval.num_fit_prompts = 64
    config.compiled.num_steps = 3
    config.compiled.constructions = ("dual/prefix", "primal/causal")
    config.compiled.num_prompts = 48
    config.sweeps.condition_numbers = (1.0, 100.0)
    config.sweeps.ridges = (0.1, 1.0)
    config.sweeps.depths = (1, 2, 3)
    config.sweeps.attentions = ("linear",)
    config.sweeps.num_steps = 500
    config.sweeps.num_prompts = 64
    config.sweeps.num_calibration_prompts = 64
    config.matching.max_steps = 8
    config.matching.feature_dim = 16
    config.laws.num_prompts = 16
    config.laws.depth_support = 8
    config.laws.depth_max_steps = 8
    config.laws.ridges = (1e-3, 1e-2, 1e-1, 1.0)
    config.laws.condition_numbers = (1.0, 10.0, 100.0)
    config.laws.temperatures = (0.1, 1.0, 10.0)
    config.laws.collinearity = (1.0, 1e-2, 1e-4, 1e-6)
    config.laws.small_ridges = (1.0, 1e-3, 1e-6, 1e-9)
    config.laws.perturbation_scales = (1e-4, 1e-2, 1.0)
    config.laws.widths = (1, 2, 4, 8, 16)
  elif "smoke" in options:
    config.scale = "smoke"
    config.sections = ("depth_comparison", "depth_sweeps", "depth_law", "ridge_sweep",
                       "feature_perturbation", "compiled", "trained")
    config.task.input_dim = 3
    config.task.num_support = 5
    config.task.num_query = 2
    config.train.depths = (1,)
    config.train.attentions = ("linear",)
    config.train.width = 8
    config.train.num_heads = 1
    config.train.head_dim = 8
    config.train.num_steps = 20
    config.train.batch_size = 8
    config.train.warmup_steps = 2
    config.train.save_models = False
    config.eval.num_prompts = 16
    config.eval.num_fit_prompts = 16
    config.sweeps.condition_numbers = (10.0,)
    config.sweeps.ridges = (1.0,)
    config.sweeps.depths = (1,)
    config.sweeps.attentions = ("linear",)
    config.sweeps.num_steps = 20
    config.sweeps.num_prompts = 8
    config.sweeps.num_calibration_prompts = 8
    config.compiled.num_steps = 1
    config.compiled.constructions = ("dual/prefix",)
    config.compiled.num_prompts = 16
    config.compiled.depth_solvers = ("cg",)
    config.compiled.ablation_extras = ()
    config.probes.num_folds = 2
    config.matching.readouts = ("logit_lens",)
    config.matching.algorithms = ("cg", "gd")
    config.matching.spaces = ("data",)
    config.matching.max_steps = 2
    config.matching.gradients = False
    config.matching.feature_dim = 4
    config.laws.num_prompts = 4
    config.laws.depth_support = 4
    config.laws.depth_max_steps = 3
    config.laws.depth_kappas = (10.0,)
    config.laws.num_steps = 2
    config.laws.ridges = (1e-2, 1.0)
    config.laws.condition_numbers = (1.0, 10.0)
    config.laws.temperatures = (0.3, 3.0)
    config.laws.collinearity = (1.0, 1e-4)
    config.laws.small_ridges = (1.0, 1e-6)
    config.laws.perturbation_scales = (1e-3, 1.0)
    config.laws.widths = (1, 4)
  return config
