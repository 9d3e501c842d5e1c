r"""Throughput of a Pythia-shaped LM through kcg.lm, and the lm_icl runtime it implies (see config).

  python -m experiments.lm_bench --workdir=DIR [--config=experiments/configs/lm_bench.py[:runlocal]]

Writes `DIR/results.json` and prints one line per measurement.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import jax
import numpy as np

from experiments import _cli
from experiments.configs import lm_bench as lm_bench_config
from experiments.configs import lm_icl as lm_icl_config

from kcg import lm as kcg_lm
from kcg._src.lm import prompts as prompts_lib
from kcg._src.lm import tiny

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "lm_bench.py")


def lm_icl_tokens(icl_config, tokenizer: kcg_lm.Tokenizer) -> dict[str, int]:
  """Tokens that `experiments.lm_icl` runs through the model at `icl_config`: every forward pass of
  every sequence (greedy decoding re-runs the prompt once per new token)."""
  fmt = kcg_lm.TextFormat(**icl_config.format.to_dict())
  r, f, c = icl_config.regression, icl_config.features, icl_config.classification
  control = 1 if icl_config.random_control else 0
  greedy = r.max_new_tokens if "greedy" in r.readouts else 0
  expected = 1 if "expected" in r.readouts else 0
  rng = np.random.default_rng(0)

  def prompt_tokens(d, k, q, b):
    """Tokens of the `b * q` prediction sequences (supports + one query each); x, y ~ N(0, 1) like
    kcg.tasks' unit-variance prompts (only the written lengths matter here)."""
    labels = [[str(v) for v in row] for row in fmt.encode_labels(rng.normal(size=(b, k)))[0]]
    sup = prompts_lib.numeric_texts(fmt, rng.normal(size=(b, k, d)))
    qry = prompts_lib.numeric_texts(fmt, rng.normal(size=(b, q, d)))
    seqs = prompts_lib.build(tokenizer, fmt, [sup[i] for i in range(b) for _ in range(q)],
                             [labels[i] for i in range(b) for _ in range(q)],
                             [qry[i][j] for i in range(b) for j in range(q)])
    return int(seqs.lengths.sum())

  regression = sum(prompt_tokens(d, k, r.num_query, r.batch_size) * (expected + greedy + control)
                   for _ in r.families for d in r.input_dims for k in r.num_supports)
  # kcg.lm.analyse_lm on the LM and the control: prediction passes on the evaluation and fit prompts;
  # per reading, an as_query read asks k + q inputs per prompt ((k + q) / q times a prediction pass;
  # a context-free read is one line of the k + 1); central differences 2 k passes on the smoother
  # prompts; the y-nonlinearity index 4 passes. The control reads phi_l the primary way only.
  k, q = f.num_support, f.num_query
  per_eval = prompt_tokens(f.input_dim, k, q, f.batch_size)
  per_fit = per_eval * f.num_fit_prompts / f.batch_size
  read = (per_eval + per_fit) * (k + q) / q

  def analysis(readings):
    reads = sum(read / (k + 1) if r == "context_free" else read for r in readings)
    smoother = 2 * k * per_eval * min(f.smoother_prompts, f.batch_size) / f.batch_size
    return per_eval + per_fit + reads + smoother + 4 * per_eval

  features = len(r.families) * (analysis(f.readings) + control * analysis(("zero_labels",)))
  classification = len(c.inputs) * prompt_tokens(c.input_dim, c.num_support, c.num_query,
                                                 c.batch_size) * (1 + (2 if greedy else 0) + control)
  return {"regression": int(regression), "features": int(features),
          "classification": int(classification),
          "total": int(regression + features + classification)}


def run(config, workdir: str) -> dict[str, Any]:
  """Times `LanguageModel.run` at the configured shape; writes results.json; returns the results."""
  os.makedirs(workdir, exist_ok=True)
  if config.shape not in lm_bench_config.SHAPES:
    raise ValueError(f"Unknown shape {config.shape!r}; choose one of {sorted(lm_bench_config.SHAPES)}.")
  shape = dict(lm_bench_config.SHAPES[config.shape])
  tokenizer = tiny.tiny_tokenizer(config.seed)
  vocab = max(shape.pop("vocab_size"), tokenizer.vocab_size)
  model_config = kcg_lm.tiny_config(vocab, **shape)
  start = time.time()
  lm = kcg_lm.build_random(model_config, tokenizer, jax.random.key(config.seed), source=config.shape)
  build_s = time.time() - start
  rng = np.random.default_rng(config.seed)
  ids = rng.integers(0, tokenizer.vocab_size, size=(config.batch, config.length)).astype(np.int32)
  positions = np.tile(np.arange(0, config.length, 16), (config.batch, 1))
  start = time.time()
  lm.run(ids, positions, chunk_size=config.batch)
  first_s = time.time() - start
  times = []
  for _ in range(config.repeats):
    start = time.time()
    lm.run(ids, positions, chunk_size=config.batch)
    times.append(time.time() - start)
  tokens_per_s = config.batch * config.length / min(times)
  icl_tokens = lm_icl_tokens(lm_icl_config.get_config(), tokenizer)
  results = {
      "config": config.to_dict(), "num_parameters": lm.num_parameters,
      "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "build_s": build_s, "first_call_s": first_s, "steady_s": times, "tokens_per_s": tokens_per_s,
      "flops_per_token_estimate": 2 * (lm.num_parameters - 2 * vocab * lm.width),
      "lm_icl_default_tokens": icl_tokens,
      "lm_icl_default_estimated_s": icl_tokens["total"] / tokens_per_s,
  }
  print(f"{config.shape}: {lm.num_parameters:,} parameters on {results['device']}: first call "
        f"{first_s:.1f} s, {tokens_per_s:.0f} tokens/s; lm_icl default scale = {icl_tokens['total']:,} "
        f"tokens -> {results['lm_icl_default_estimated_s'] / 3600:.2f} h at this rate")
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=1)
  return results


if __name__ == "__main__":
  _cli.run_main(run, _DEFAULT_CONFIG, "results.json")
