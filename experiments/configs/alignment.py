"""The central test: do trained transformers run KRR, by CG, on their own hidden features?

Trains in-context learners on nonlinear task families (and linear regression as the control where raw x
suffices) and asks, layer by layer, whether KRR / CG on the model's own hidden features phi_l explains
its predictions (`kcg.alignment`). Model names are `<arch>_L<depth>`: `gpt` (softmax attention, GELU
MLP, pre-LayerNorm), `fts` ("features, then solver": the first `train.feature_layers` blocks are
token-wise MLPs without attention, then GPT blocks) and `lsa` (linear attention, no MLP, no norm). A
model of task T trains into `WORKDIR/models/<T>_<model>` (loadable with `kcg.load_trained`) and a rerun
resumes it.

Scales (`--config=experiments/configs/alignment.py[:runlocal|:smoke]`):

* default (full): tasks linear, relu_network, kernel_prior, logistic (mean targets, glm_scale 3); d = 4,
  k = 24 supports, q = 8 queries, noise 0.1; models gpt_L2, gpt_L4, gpt_L8, fts_L6 (2 feature layers),
  lsa_L4; width 48, 4 heads of 12, MLP 96; 3000 steps of batch 32 each (20 models); 128 evaluation and
  128 held-out fitting prompts; candidates up to T = 8 steps; grafts at every layer, T = 8. Measured on
  the shared 2-core CPU under other users' load (no GPU is needed at this size): training 2 h 03 min
  wall / 2470 s CPU; analysis 53 min wall / 880 s CPU for linear + relu_network, 28 min wall / 485 s
  CPU for kernel_prior (`--config.tasks=...` runs a subset; analyses are cached per model); peak
  memory 2.0 GB.

      python -m experiments.alignment --config=experiments/configs/alignment.py --workdir=/tmp/align

* `runlocal`: tasks linear and kernel_prior, d = 3, k = 12, q = 4; models gpt_L2, fts_L3 (1 feature
  layer), lsa_L2; width 32, 1500 steps of batch 32; 96 + 96 prompts; T = 4. Measured: 232 s of CPU
  time (training 388 s and analysis 898 s of wall time at load average ~17 on the shared 2 cores,
  22 min in all), peak memory 1.5 GB.

      python -m experiments.alignment --config=experiments/configs/alignment.py:runlocal --workdir=/tmp/al

* `smoke`: one task (kernel_prior), one fts_L2 model trained 30 steps, 24 prompts, T = 2: the fast test.

Every field can be overridden on the command line, e.g. `--config.models=gpt_L2,fts_L3`.
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
  # Train (or resume) the models and stop: the analysis reruns on the checkpoints.
  config.train_only = False
  config.tasks = ("linear", "relu_network", "kernel_prior", "logistic")

  config.task = ml_collections.ConfigDict()
  config.task.input_dim = 4
  config.task.num_support = 24
  config.task.num_query = 8
  # Observation noise of the regression families (linear, relu_network, kernel_prior); the logistic
  # family predicts its mean sigmoid(glm_scale w.x) without noise.
  config.task.noise_std = 0.1
  config.task.glm_scale = 3.0

  config.models = ("gpt_L2", "gpt_L4", "gpt_L8", "fts_L6", "lsa_L4")
  config.train = ml_collections.ConfigDict()
  config.train.width = 48
  config.train.num_heads = 4
  config.train.head_dim = 12
  config.train.mlp_hidden = 96
  # Attention-free leading blocks of the "fts" (features, then solver) models.
  config.train.feature_layers = 2
  config.train.num_steps = 3000
  config.train.batch_size = 32
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 200

  config.analysis = ml_collections.ConfigDict()
  config.analysis.num_prompts = 128
  config.analysis.num_fit_prompts = 128
  # How phi_l is read (kcg.alignment.READINGS); "with_labels" is the circular control.
  config.analysis.readings = ("zero_labels", "other_labels", "context_free", "with_labels")
  config.analysis.candidates = ("cg", "pcg", "gd", "chebyshev", "newton_schulz", "gd_plus",
                                "momentum", "polynomial")
  config.analysis.max_steps = 8
  # Layers analysed (residual index: 0 = embedding, l = after l blocks); empty = every layer.
  config.analysis.layers = ()
  # Ridges of KRR on features, relative to the mean kernel diagonal; chosen on held-out prompts.
  config.analysis.relative_ridges = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
  config.analysis.rbf_bandwidths = (0.5, 1.0, 2.0, 4.0)
  # Also fit the best linear kernel on phi_l (KRR on phi A, A fitted to the model on held-out prompts,
  # Adam with early stopping); candidates, grafts and probes then read phi_l through it.
  config.analysis.fit_metric = True
  config.analysis.metric_steps = 300
  config.analysis.num_bootstrap = 200
  # A model whose y-nonlinearity index is below this fraction of the largest index of CG_t
  # (t = 1..max_steps) on its own best-matching features is reported as linear in y.
  config.analysis.linear_in_y_ratio = 0.25

  config.graft = ml_collections.ConfigDict()
  config.graft.max_steps = 8
  config.graft.layers = ()  # empty = every layer
  # The compiled CG forward (1 + 11 T layers, ~345 MLP units) dominates the cost: grafts run on the
  # first num_prompts evaluation prompts.
  config.graft.num_prompts = 64

  config.probes = ml_collections.ConfigDict()
  config.probes.site = "support"
  config.probes.steps = (1, 2, 4)
  config.probes.num_folds = 5
  config.probes.ridge = 1e-6

  config.compiled = ml_collections.ConfigDict()
  config.compiled.ridge = 0.1
  config.compiled.cg_steps = (1, 2, 4)

  if "runlocal" in options:
    config.scale = "runlocal"
    config.tasks = ("linear", "kernel_prior")
    config.task.input_dim = 3
    config.task.num_support = 12
    config.task.num_query = 4
    config.models = ("gpt_L2", "fts_L3", "lsa_L2")
    config.train.width = 32
    config.train.num_heads = 2
    config.train.head_dim = 16
    config.train.mlp_hidden = 64
    config.train.feature_layers = 1
    config.train.num_steps = 1500
    config.train.batch_size = 32
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 100
    config.analysis.num_prompts = 96
    config.analysis.num_fit_prompts = 96
    config.analysis.max_steps = 4
    config.analysis.num_bootstrap = 100
    config.graft.max_steps = 4
    config.graft.num_prompts = 48
    config.probes.steps = (1, 2)
    config.probes.num_folds = 4
    config.compiled.cg_steps = (1, 2)
  elif "smoke" in options:
    config.scale = "smoke"
    config.tasks = ("kernel_prior",)
    config.task.input_dim = 2
    config.task.num_support = 6
    config.task.num_query = 2
    config.models = ("fts_L2",)
    config.train.width = 16
    config.train.num_heads = 1
    config.train.head_dim = 8
    config.train.mlp_hidden = 16
    config.train.feature_layers = 1
    config.train.num_steps = 30
    config.train.batch_size = 8
    config.train.warmup_steps = 5
    config.analysis.num_prompts = 24
    config.analysis.num_fit_prompts = 24
    config.analysis.max_steps = 2
    config.analysis.relative_ridges = (1e-2, 0.1, 1.0)
    config.analysis.rbf_bandwidths = (1.0, 2.0)
    config.analysis.metric_steps = 20
    config.analysis.num_bootstrap = 20
    config.graft.max_steps = 2
    config.graft.num_prompts = 16
    config.probes.steps = (1,)
    config.probes.num_folds = 2
    config.compiled.cg_steps = (1,)
  return config
