"""The tiny randomly initialised checkpoint: the real loading path without downloading weights.

Its tokenizer is a byte-level BPE trained on lines of the prompts' own grammar (every label code and
word is one token), its model a 3-layer GPT-NeoX at penzai's random initialisation. Its numbers test
the pipeline; they say nothing about language models (`LanguageModel.random_init` is True and every
report says so).
"""

from __future__ import annotations

import jax
import numpy as np

from kcg._src.lm import model as model_lib
from kcg._src.lm import prompts as prompts_lib
from kcg._src.lm import tokenizer as tokenizer_lib

SOURCE = "tiny random GPT-NeoX (kcg.lm.write_tiny_checkpoint)"


def tiny_tokenizer(seed: int = 0, fmt: prompts_lib.TextFormat | None = None) -> tokenizer_lib.Tokenizer:
  """A byte-level BPE trained on the prompts' grammar in about a second."""
  lines = prompts_lib.corpus_lines(np.random.default_rng(seed), fmt or prompts_lib.TextFormat())
  return tokenizer_lib.train_tiny_tokenizer(lines)


def tiny_model(seed: int = 0, *, num_layers: int = 3, width: int = 32) -> model_lib.LanguageModel:
  """The tiny random LM in memory."""
  tokenizer = tiny_tokenizer(seed)
  config = model_lib.tiny_config(tokenizer.vocab_size, num_layers=num_layers, width=width)
  return model_lib.build_random(config, tokenizer, jax.random.key(seed), source=SOURCE)


def write_tiny_checkpoint(path: str, seed: int = 0, *, num_layers: int = 3, width: int = 32) -> str:
  """Writes the tiny random LM as a kcg LM checkpoint at `path` (a new directory); returns the path."""
  return model_lib.save(path, tiny_model(seed, num_layers=num_layers, width=width))
