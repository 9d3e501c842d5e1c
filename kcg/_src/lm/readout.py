"""Reading an LM's answer: expected value over the label tokens, or greedy decoding with a parser.

`"expected"` (the default, what the instruments use): every label (regression code " 0" .. " 99" or
class word) is one token, so the next-token distribution after "y:" restricted to the label tokens
is a distribution over labels. The prediction is its mean, `sum_c p(c) c / sum_c p(c)` (decoded to
y), or for classification the label probabilities. It is a smooth function of the LM's logits, so
finite differences in the support labels and the y-linearity index are meaningful, and it never
fails; `label_mass = sum_c p(c)` says how much probability the LM put on valid labels at all.

`"greedy"`: decode `max_new_tokens` tokens greedily and parse the first field of the first line as a
label (so `" 57\n"` and `" 57 x"` read 57; `" 5.7"`, `" -3"` or `" red"` are invalid for a regression). What the LM would "say", but piecewise constant in its inputs (useless for finite
differences), and it can fail: unparsable outputs are counted (`valid = False`, value NaN), never
dropped.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from kcg._src.lm import model as model_lib
from kcg._src.lm import prompts as prompts_lib

READOUTS = ("expected", "greedy")
_INTEGER = re.compile(r"^\s*(-?\d+)\s*$")


def label_token_ids(tokenizer, fmt: prompts_lib.TextFormat, labels: Sequence[str]) -> np.ndarray:
  """The single token of each label's text (`fmt.label_text`); ValueError if one is not one token
  or two labels share it."""
  ids = []
  for label in labels:
    token = tokenizer.single_token_id(fmt.label_text(label))
    if token is None:
      raise ValueError(
          f"The label {fmt.label_text(label)!r} is not a single token in this tokenizer, so the expected "
          "value over label tokens is undefined; use readout='greedy', a smaller label_max, or other "
          "label words.")
    ids.append(token)
  if len(set(ids)) != len(ids):
    raise ValueError(f"Labels {list(labels)} share tokens; choose labels with distinct tokens.")
  return np.asarray(ids, np.int64)


def label_distribution(log_probs_NxV: np.ndarray, label_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`p(label | label)` `[N, C]` (normalised over the labels) and the mass `[N]` on label tokens."""
  lp = np.asarray(log_probs_NxV, np.float64)[..., label_ids]
  top = lp.max(axis=-1, keepdims=True)
  w = np.exp(lp - top)
  total = w.sum(-1, keepdims=True)
  return w / total, np.exp(top[..., 0] + np.log(total[..., 0]))


def expected_code(log_probs_NxV: np.ndarray, label_ids: np.ndarray,
                  values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`E[code] = sum_c p(c) v_c` over the label tokens, `[N]`, and the label mass `[N]`."""
  probs, mass = label_distribution(log_probs_NxV, label_ids)
  return probs @ np.asarray(values, np.float64), mass


@dataclasses.dataclass(frozen=True)
class Decoded:
  """Greedy continuations: `text [N]` (up to the first newline) and `valid [N]`."""
  text: tuple[str, ...]
  valid: np.ndarray


def greedy_continuations(lm: model_lib.LanguageModel, seqs: prompts_lib.Sequences,
                         max_new_tokens: int) -> tuple[str, ...]:
  """Greedy decoding of `max_new_tokens` tokens after each sequence (no KV cache: one full forward
  pass per token, fine for answers of a few tokens)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  n = seqs.token_ids.shape[0]
  ids = np.zeros((n, seqs.token_ids.shape[1] + max_new_tokens), np.int32)
  ids[:, :seqs.token_ids.shape[1]] = seqs.token_ids
  lengths = seqs.lengths.copy()
  new = np.zeros((n, max_new_tokens), np.int64)
  for step in range(max_new_tokens):
    log_probs, _ = lm.run(ids[:, :int(lengths.max())], (lengths - 1)[:, None])
    token = np.argmax(log_probs[:, 0], axis=-1)
    new[:, step] = token
    ids[np.arange(n), lengths] = token
    lengths = lengths + 1
  return tuple(lm.tokenizer.decode(row) for row in new)


def _first_field(text: str) -> str:
  fields = text.split("\n", 1)[0].split()
  return fields[0] if fields else ""


def parse_code(text: str, fmt: prompts_lib.TextFormat) -> int | None:
  """The label code that `text` starts with (its first whitespace-separated field on the first line,
  which must be an integer in `[0, label_max]`), else None."""
  match = _INTEGER.match(_first_field(text))
  if match is None:
    return None
  code = int(match.group(1))
  return code if 0 <= code <= fmt.label_max else None


def parse_word(text: str, words: Sequence[str]) -> int | None:
  """The index of the label word that `text` starts with (first field of the first line), else None."""
  head = _first_field(text)
  return list(words).index(head) if head in words else None
