"""In-context tasks written as text, tokenized with the token positions the instruments read.

A prompt is one line per support pair and a last line that asks for the answer:

    x: 0.31, -1.20 -> y: 57
    x: -0.42, 0.88 -> y: 38
    x: 0.11, 0.50 -> y:

Labels. Regression targets are written as integer codes `c = round(offset + scale * y)` clipped to
`[0, label_max]` (default `c = round(50 + 10 y)` in `[0, 99]`, so y in [-5, 4.9] at resolution 0.1).
Integer codes make every label one token in byte-level BPE vocabularies (GPT-NeoX's holds " 0" ..
" 99"), so the LM's next-token distribution after "y:" is a distribution over labels and its
expected value is exact (`kcg.lm.readout`). Clipped labels are counted, never hidden. Classification
labels are words (" red", " blue", ...), assigned to classes at random per prompt.

Inputs are numbers (`input_decimals` digits, comma separated) or words from a lexicon with known
feature vectors (`LEXICON`).

Token positions. `Sequences.x_tokens [N, n_x, M]` holds, for every input written in a sequence, the
token indices that cover its text (right-aligned, `x_mask` marks the real ones; the last column is
the token holding the input's last character). `answer [N]` is the last token of the sequence, whose
next-token distribution is the LM's answer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kcg._src.lm import tokenizer as tokenizer_lib

LABEL_WORDS = ("red", "blue", "green", "gold", "pink", "gray")
PLACEHOLDER = "?"

# Animals with approximate known features: log10 adult body mass in kg, number of legs, flies (0/1),
# lives in water (0/1). The features are the "known features" the word-input task's labels and
# baselines use.
LEXICON: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("mouse", (-1.6, 4, 0, 0)), ("rat", (-0.5, 4, 0, 0)), ("cat", (0.6, 4, 0, 0)),
    ("dog", (1.3, 4, 0, 0)), ("sheep", (1.8, 4, 0, 0)), ("pig", (2.0, 4, 0, 0)),
    ("horse", (2.7, 4, 0, 0)), ("cow", (2.8, 4, 0, 0)), ("elephant", (3.7, 4, 0, 0)),
    ("bear", (2.5, 4, 0, 0)), ("lion", (2.3, 4, 0, 0)), ("rabbit", (0.3, 4, 0, 0)),
    ("sparrow", (-1.5, 2, 1, 0)), ("crow", (-0.3, 2, 1, 0)), ("eagle", (0.7, 2, 1, 0)),
    ("owl", (0.2, 2, 1, 0)), ("duck", (0.1, 2, 1, 1)), ("goose", (0.6, 2, 1, 1)),
    ("penguin", (1.4, 2, 0, 1)), ("ostrich", (2.0, 2, 0, 0)), ("bee", (-4.0, 6, 1, 0)),
    ("ant", (-5.5, 6, 0, 0)), ("spider", (-3.0, 8, 0, 0)), ("crab", (0.0, 10, 0, 1)),
    ("shark", (2.9, 0, 0, 1)), ("whale", (5.0, 0, 0, 1)), ("salmon", (0.7, 0, 0, 1)),
    ("frog", (-1.5, 4, 0, 1)), ("snake", (0.3, 0, 0, 0)), ("human", (1.8, 2, 0, 0)),
)


def lexicon_features() -> tuple[tuple[str, ...], np.ndarray]:
  """Words `[n]` and their features standardised per column, `[n, 4]` (float64)."""
  words = tuple(w for w, _ in LEXICON)
  feats = np.asarray([f for _, f in LEXICON], np.float64)
  return words, (feats - feats.mean(0)) / feats.std(0)


@dataclasses.dataclass(frozen=True)
class TextFormat:
  """How numbers and labels are written.

  Attributes:
    input_decimals: digits after the point of numeric inputs.
    label_scale, label_offset, label_max: regression label code `round(offset + scale y)` in
      `[0, label_max]`.
    input_name, label_name: the words before the input and the label ("x", "y").
  """
  input_decimals: int = 2
  label_scale: float = 10.0
  label_offset: float = 50.0
  label_max: int = 99
  input_name: str = "x"
  label_name: str = "y"

  def __post_init__(self):
    if not isinstance(self.input_decimals, int) or not 0 <= self.input_decimals <= 6:
      raise ValueError(f"input_decimals must be an integer in [0, 6], got {self.input_decimals!r}.")
    if not (np.isfinite(self.label_scale) and self.label_scale > 0):
      raise ValueError(f"label_scale must be a finite number > 0, got {self.label_scale!r}.")
    if not isinstance(self.label_max, int) or self.label_max < 1:
      raise ValueError(f"label_max must be an integer >= 1, got {self.label_max!r}.")
    if not 0 <= self.label_offset <= self.label_max:
      raise ValueError(f"label_offset {self.label_offset} must lie in [0, label_max={self.label_max}] "
                       "so that y = 0 has a code.")

  @property
  def resolution(self) -> float:
    """The smallest change of y that changes its code, `1 / label_scale`."""
    return 1.0 / self.label_scale

  def encode_labels(self, y) -> tuple[np.ndarray, np.ndarray]:
    """Codes `[...]` (int) and a mask of the labels that were clipped into `[0, label_max]`."""
    y = np.asarray(y, np.float64)
    if not np.all(np.isfinite(y)):
      raise ValueError("encode_labels: labels must be finite.")
    raw = np.rint(self.label_offset + self.label_scale * y)
    codes = np.clip(raw, 0, self.label_max)
    return codes.astype(np.int64), codes != raw

  def decode_labels(self, codes) -> np.ndarray:
    """`y = (code - offset) / scale` (float64; accepts fractional codes, e.g. expected values)."""
    return (np.asarray(codes, np.float64) - self.label_offset) / self.label_scale

  def written(self, y) -> np.ndarray:
    """The labels as the LM reads them, `decode(encode(y))`: y rounded to the resolution and clipped.

    Sums of written labels are written exactly (until they clip), so the y-linearity index should
    use written labels; otherwise rounding adds a nonlinearity that is the prompt's, not the LM's.
    """
    return self.decode_labels(self.encode_labels(y)[0])

  def label_values(self) -> np.ndarray:
    """Every code, `[label_max + 1]`."""
    return np.arange(self.label_max + 1)

  def number(self, x) -> str:
    """One input vector `[d]` as text, `"0.31, -1.20"`."""
    return ", ".join(f"{v:.{self.input_decimals}f}" for v in np.asarray(x, np.float64).reshape(-1))

  def label_text(self, label: str) -> str:
    """The text after "y:" for a label (a code or a word): `" 57"`."""
    return " " + label


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Tokenized prompts, `N` of them, right-padded.

  Attributes:
    token_ids: `[N, T]` int32 (padding is token 0; causal attention never reads it).
    lengths: `[N]` real lengths.
    x_tokens: `[N, n_x, M]` token indices of every input written in the sequence, in order of
      appearance (supports, then the asked input), right-aligned.
    x_mask: `[N, n_x, M]` which entries of `x_tokens` are real.
    answer: `[N]` the last token (whose next-token distribution is the answer).
    texts: the `N` prompt strings.
  """
  token_ids: np.ndarray
  lengths: np.ndarray
  x_tokens: np.ndarray
  x_mask: np.ndarray
  answer: np.ndarray
  texts: tuple[str, ...]


def build(tokenizer: tokenizer_lib.Tokenizer, fmt: TextFormat, support_inputs: Sequence[Sequence[str]],
          support_labels: Sequence[Sequence[str]], asked: Sequence[str]) -> Sequences:
  """One sequence per asked input: its supports' lines, then `"x: <asked> -> y:"`.

  Args:
    support_inputs: per sequence, the `n_s` support input texts (may be empty: context-free).
    support_labels: per sequence, the `n_s` label texts (codes, words or `PLACEHOLDER`).
    asked: per sequence, the input whose answer the sequence asks for.
  """
  if not (len(support_inputs) == len(support_labels) == len(asked)) or not asked:
    raise ValueError("build: support_inputs, support_labels and asked need one entry per sequence.")
  n_support = {len(s) for s in support_inputs}
  if len(n_support) != 1 or any(len(s) != len(l) for s, l in zip(support_inputs, support_labels)):
    raise ValueError("build: every sequence needs the same number of supports, each with one label.")
  texts, spans = [], []
  for inputs, labels, query in zip(support_inputs, support_labels, asked):
    parts, seq_spans, pos = [], [], 0
    for inp, lab in list(zip(inputs, labels)) + [(query, None)]:
      head = f"{fmt.input_name}: "
      seq_spans.append((pos + len(head), pos + len(head) + len(inp)))
      line = f"{head}{inp} -> {fmt.label_name}:"
      if lab is not None:
        line += fmt.label_text(lab) + "\n"
      parts.append(line)
      pos += len(line)
    texts.append("".join(parts))
    spans.append(seq_spans)
  encodings = tokenizer.encode_batch(texts)
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  shift = len(bos)
  lengths = np.asarray([len(e.ids) + shift for e in encodings])
  token_ids = np.zeros((len(texts), int(lengths.max())), np.int32)
  per_x = []
  for i, enc in enumerate(encodings):
    token_ids[i, :lengths[i]] = np.concatenate([np.asarray(bos, np.int32), enc.ids])
    per_x.append([tokenizer_lib.token_span(enc.offsets, a, b) + shift for a, b in spans[i]])
  width = max(len(t) for seq in per_x for t in seq)
  n_x = len(per_x[0])
  x_tokens = np.zeros((len(texts), n_x, width), np.int32)
  x_mask = np.zeros((len(texts), n_x, width), bool)
  for i, seq in enumerate(per_x):
    for j, toks in enumerate(seq):
      x_tokens[i, j, width - len(toks):] = toks
      x_mask[i, j, width - len(toks):] = True
  return Sequences(token_ids, lengths, x_tokens, x_mask, lengths - 1, tuple(texts))


# ----------------------------------------------------------------------------------------------------
# Tasks.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassificationPrompts:
  """A batch of classification prompts.

  Attributes:
    inputs: `"numbers"` or `"words"`.
    x_support, x_query: `[B, k, p]`, `[B, q, p]` feature vectors (the numbers written, or the known
      features of the words).
    support_text, query_text: `[B][k]`, `[B][q]` input texts.
    c_support, c_query: `[B, k]`, `[B, q]` class indices in `[0, C)`.
    label_words: `[B][C]` the word of each class in each prompt.
  """
  inputs: str
  x_support: np.ndarray
  x_query: np.ndarray
  support_text: tuple[tuple[str, ...], ...]
  query_text: tuple[tuple[str, ...], ...]
  c_support: np.ndarray
  c_query: np.ndarray
  label_words: tuple[tuple[str, ...], ...]


def sample_classification(rng: np.random.Generator, fmt: TextFormat, *, inputs: str, num_classes: int,
                          num_support: int, num_query: int, batch_size: int,
                          input_dim: int = 2) -> ClassificationPrompts:
  """Classes from a random linear rule `argmax_c (W^T x)_c`, `W ~ N(0, I)`, per prompt.

  `inputs="numbers"`: `x ~ N(0, I_d)` written as numbers. `inputs="words"`: words drawn without
  replacement from `LEXICON`, `x` their standardised known features (so `k + q <= len(LEXICON)`).
  Each prompt assigns `num_classes` of `LABEL_WORDS` to its classes in random order.
  """
  if inputs not in ("numbers", "words"):
    raise ValueError(f"inputs must be 'numbers' or 'words', got {inputs!r}.")
  if not 2 <= num_classes <= len(LABEL_WORDS):
    raise ValueError(f"num_classes must be in [2, {len(LABEL_WORDS)}], got {num_classes}.")
  n = num_support + num_query
  if inputs == "words":
    words, feats = lexicon_features()
    if n > len(words):
      raise ValueError(f"Word inputs: num_support + num_query = {n} exceeds the lexicon's {len(words)} words.")
    idx = np.stack([rng.permutation(len(words))[:n] for _ in range(batch_size)])
    x = feats[idx]
    text = [[words[j] for j in row] for row in idx]
  else:
    x = rng.normal(size=(batch_size, n, input_dim))
    text = [[fmt.number(v) for v in row] for row in x]
  w = rng.normal(size=(batch_size, x.shape[-1], num_classes))
  classes = np.argmax(np.einsum("bnp,bpc->bnc", x, w), axis=-1)
  label_words = tuple(tuple(LABEL_WORDS[j] for j in rng.permutation(len(LABEL_WORDS))[:num_classes])
                      for _ in range(batch_size))
  return ClassificationPrompts(
      inputs, x[:, :num_support], x[:, num_support:],
      tuple(tuple(t[:num_support]) for t in text), tuple(tuple(t[num_support:]) for t in text),
      classes[:, :num_support], classes[:, num_support:], label_words)


def numeric_texts(fmt: TextFormat, x) -> list[list[str]]:
  """`[B, n, d]` inputs as `[B][n]` texts."""
  x = np.asarray(x)
  return [[fmt.number(v) for v in row] for row in x]


def corpus_lines(rng: np.random.Generator, fmt: TextFormat, num_lines: int = 3000,
                 max_dim: int = 4) -> list[str]:
  """Lines of every kind the prompts use (numbers of 1..max_dim inputs, every label code, lexicon words
  and label words), for training the tiny tokenizer."""
  words, _ = lexicon_features()
  lines = []
  for i in range(num_lines):
    d = 1 + i % max_dim
    x = fmt.number(np.round(rng.normal(size=d) * 1.5, fmt.input_decimals))
    label = str(i % (fmt.label_max + 1))
    lines.append(f"{fmt.input_name}: {x} -> {fmt.label_name}:{fmt.label_text(label)}\n")
    word = words[i % len(words)]
    lines.append(f"{fmt.input_name}: {word} -> {fmt.label_name}:"
                 f"{fmt.label_text(LABEL_WORDS[i % len(LABEL_WORDS)])}\n")
  lines.append(f"{fmt.input_name}: 1.00 -> {fmt.label_name}: {PLACEHOLDER}\n")
  return lines
