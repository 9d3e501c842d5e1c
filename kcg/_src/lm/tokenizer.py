"""Tokenizers in Hugging Face's `tokenizer.json` format (the `tokenizers` library; no PyTorch).

Pythia / GPT-NeoX (the family `kcg.lm` loads) ship their byte-level BPE tokenizer as `tokenizer.json`,
which `tokenizers` reads offline. `train_tiny_tokenizer` trains a small byte-level BPE of the same kind
from a few thousand lines in about a second, so tests and the tiny random checkpoint use the real
tokenizer code path without downloading anything.

Char offsets: `encode(text)` returns each token's `[start, end)` span in `text`, which is how prompt
builders find the tokens of each input (`token_span`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

END_OF_TEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class Encoding:
  """Token ids `[T]` and each token's char span `offsets [T, 2]` in the encoded text."""
  ids: np.ndarray
  offsets: np.ndarray


class Tokenizer:
  """A `tokenizers.Tokenizer` with the few operations kcg needs.

  Attributes:
    bos_id: the id prepended to every sequence (`None`: nothing is prepended; Pythia prepends nothing).
  """

  def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None):
    self._backend = backend
    self.bos_id = None
    if bos_token is not None:
      self.bos_id = backend.token_to_id(bos_token)
      if self.bos_id is None:
        raise ValueError(f"bos_token {bos_token!r} is not in the vocabulary; pass one of its special "
                         "tokens, or None to prepend nothing.")
    self.bos_token = bos_token

  @classmethod
  def from_file(cls, path: str, bos_token: str | None = None) -> "Tokenizer":
    """Reads a `tokenizer.json` file."""
    if not os.path.isfile(path):
      raise ValueError(f"No tokenizer file at {path!r}; a checkpoint directory needs tokenizer.json "
                       "(Hugging Face format, e.g. from the model's Hugging Face repository).")
    return cls(tokenizers.Tokenizer.from_file(path), bos_token)

  def save(self, path: str) -> None:
    self._backend.save(path)

  @property
  def vocab_size(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> Encoding:
    """Token ids and char offsets of `text` (no special tokens added; `bos_id` is the caller's)."""
    enc = self._backend.encode(text, add_special_tokens=False)
    return Encoding(np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2))

  def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
    encs = self._backend.encode_batch(list(texts), add_special_tokens=False)
    return [Encoding(np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2))
            for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def id_to_token(self, token_id: int) -> str | None:
    return self._backend.id_to_token(int(token_id))

  def single_token_id(self, text: str) -> int | None:
    """The id of `text` if it encodes to exactly one token (e.g. `" 57"`), else None."""
    ids = self.encode(text).ids
    return int(ids[0]) if ids.shape[0] == 1 else None

  def to_json(self) -> str:
    return self._backend.to_str()


def token_span(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
  """Indices of the tokens whose char span overlaps `[start, end)` (a token straddling the edge counts).

  Raises ValueError if no token covers the span (it would mean the text was not what was encoded).
  """
  hit = (offsets[:, 0] < end) & (offsets[:, 1] > start)
  idx = np.nonzero(hit)[0]
  if idx.size == 0:
    raise ValueError(f"No token covers chars [{start}, {end}); the offsets do not belong to this text.")
  return idx


def train_tiny_tokenizer(lines: Iterable[str], vocab_size: int = 640) -> Tokenizer:
  """A byte-level BPE (GPT-NeoX's kind) trained on `lines`, with `<|endoftext|>` as special token 0.

  Deterministic for the same lines (the trainer breaks count ties by the pair's ids). Takes about a
  second for a few thousand short lines.
  """
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  backend.train_from_iterator(list(lines), trainer)
  return Tokenizer(backend, bos_token=END_OF_TEXT)


def vocabulary(tokenizer: Tokenizer) -> dict[str, int]:
  """The token -> id map (for diagnostics)."""
  return json.loads(tokenizer.to_json())["model"]["vocab"]
