"""Throughput of `kcg.lm.LanguageModel.run` at a real model's shape, and the lm_icl runtime it implies.

Run (from the repository root; needs `pip install -e ".[lm]"`):

  python -m experiments.lm_bench --workdir=/tmp/kcg/lm_bench

Builds a randomly initialised GPT-NeoX of Pythia-160m's shape (162M parameters; the cost of a forward
pass does not depend on the weights), times `run` on `batch x length` tokens after one compiling
call, counts the tokens `experiments.lm_icl` processes at its default scale (with the tiny BPE, a
stand-in for GPT-NeoX's tokenizer on the same text), and divides. Measured on the 2-core CPU under a
load of ~17: ~1.5 min in all, 135 tokens/s (pythia-70m: 411 tokens/s). `:runlocal` uses the tiny
model (~20 s; the tests run it).
"""

import ml_collections

SHAPES = {
    # Pythia (Biderman et al. 2023), GPT-NeoX layout, vocabulary padded to 50304.
    "pythia-70m": dict(vocab_size=50304, num_layers=6, width=512, num_heads=8, mlp_hidden=2048),
    "pythia-160m": dict(vocab_size=50304, num_layers=12, width=768, num_heads=12, mlp_hidden=3072),
    "pythia-410m": dict(vocab_size=50304, num_layers=24, width=1024, num_heads=16, mlp_hidden=4096),
    "tiny": dict(vocab_size=640, num_layers=3, width=32, num_heads=2, mlp_hidden=128),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.shape = "pythia-160m"
  config.batch = 8
  config.length = 256
  config.repeats = 2
  config.seed = 0
  if arg == "runlocal":
    config.shape = "tiny"
    config.batch = 4
    config.length = 64
  elif arg not in (None, ""):
    raise ValueError(f"Unknown config variant {arg!r}; use no argument or 'runlocal'.")
  return config
