"""The LM as an in-context learner: numeric predictors, hidden features per layer, classification.

What the alignment instruments consume (all plain numpy arrays):

* `LMRegressor(lm, fmt)` is a predictor `(x_support [B, k, d], y_support [B, k], x_query [B, q, d])
  -> [B, q]` like `kcg.baselines`' (not jittable: it writes text and runs the LM), so y-linearity
  `f(y_a + y_b) - f(y_a) - f(y_b) + f(0)` and finite-difference smoother weights `d f / d y_i` can be
  computed from it. The LM sees labels as integer codes (`TextFormat`), so a change of y below
  `fmt.resolution` does not reach it: finite-difference steps must be multiples of the resolution.
* `read_features(...)` returns `LMFeatures`: per layer `phi_support [B, k, p]`, `phi_query [B, q, p]`,
  with `y_support [B, k]` (the labels as the LM saw them) and the LM's `predictions [B, q]`.

Where features are read (`reading`), and what the read tokens can see (attention is causal, so a
token reads itself and everything before it, nothing after):

* `"as_query"` (default): every input, support or query, is asked as the query of a prompt whose
  supports are the prompt's supports with the context labels, and phi is read at the asked input's
  tokens. The read tokens see the k support inputs, the k context labels and the asked input: every
  input is read in the same position and context. With `labels="zero"`, `"placeholder"` or
  `"shuffled"` the context holds no label of the prompt, so the features cannot carry the answer (a
  support asked as query also appears earlier in its context, with a withheld label). With
  `labels="true"` they see every label of the prompt, a support's own label included: the circular
  control.
* `"in_context"`: one pass per query prompt; phi of support i at its own tokens in the prompt, phi of
  a query at its tokens. Support i sees x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i: never its own label,
  but (with `labels="true"`) the real labels of the supports before it, so its feature depends on
  other supports' answers and on its position; a query sees every context label (with `"true"`, it
  is read in the very pass that makes the prediction). Leak-free only with withheld labels.
* `"context_free"`: the asked input alone, `"x: <input> -> y:"`: it sees nothing of the prompt.

`labels`: `"true"` (the circular control), `"zero"` (every label written as y = 0, the code of 0:
`kcg.alignment`'s "zero_labels"), `"shuffled"` (each prompt's supports carry the labels of the next
prompt in the batch: `kcg.alignment`'s "other_labels"), `"placeholder"` (every label is `"?"`).
`token`: `"last"` (the token holding the input's last character: it has read the whole input) or
`"mean"` (mean over the input's tokens). `kcg.lm.hidden_features` reads them under
`kcg.alignment`'s reading names.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kcg._src.lm import model as model_lib
from kcg._src.lm import prompts as prompts_lib
from kcg._src.lm import readout as readout_lib

READINGS = ("as_query", "in_context", "context_free")
LABEL_MODES = ("true", "zero", "shuffled", "placeholder")
TOKENS = ("last", "mean")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")
  return value


def _check_regression_arrays(x_support, y_support, x_query):
  x_support, y_support, x_query = (np.asarray(a, np.float64) for a in (x_support, y_support, x_query))
  if x_support.ndim != 3 or x_query.ndim != 3 or y_support.shape != x_support.shape[:2]:
    raise ValueError(f"Expected x_support [B, k, d], y_support [B, k], x_query [B, q, d]; got "
                     f"{x_support.shape}, {y_support.shape}, {x_query.shape}.")
  if x_query.shape[0] != x_support.shape[0] or x_query.shape[2] != x_support.shape[2]:
    raise ValueError(f"x_query {x_query.shape} must match x_support {x_support.shape} in B and d.")
  for name, a in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has NaN or Inf entries.")
  return x_support, y_support, x_query


# ----------------------------------------------------------------------------------------------------
# Regression predictions.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The LM's answers to `[B, q]` queries.

  Attributes:
    values: predictions in y units (NaN where `valid` is False).
    valid: the answer was a label (always True for `"expected"`; greedy: the text parsed).
    label_mass: probability on label tokens at the answer position (both readouts report it).
    clipped_support_labels: how many support labels were clipped into the code range.
    readout: `"expected"` or `"greedy"`.
    texts: greedy continuations `[B][q]` (empty for `"expected"`).
  """
  values: np.ndarray
  valid: np.ndarray
  label_mass: np.ndarray
  clipped_support_labels: int
  readout: str
  texts: tuple[tuple[str, ...], ...] = ()


class LMRegressor:
  """The LM as a numeric in-context predictor `(x_support, y_support, x_query) -> [B, q]`.

  Each query is asked in its own prompt (supports, then the query), so queries never see each other.
  `__call__` returns `predict(...).values`; with `readout="greedy"` those can be NaN (invalid
  outputs, counted in `Prediction.valid`).
  """

  def __init__(self, lm: model_lib.LanguageModel, fmt: prompts_lib.TextFormat | None = None, *,
               readout: str = "expected", max_new_tokens: int = 3, chunk_size: int = 64):
    self.lm = lm
    self.fmt = fmt or prompts_lib.TextFormat()
    self.readout = _choice("readout", readout, readout_lib.READOUTS)
    self.max_new_tokens = max_new_tokens
    self.chunk_size = chunk_size
    self.codes = self.fmt.label_values()
    self.label_ids = readout_lib.label_token_ids(lm.tokenizer, self.fmt, [str(c) for c in self.codes])

  def support_labels(self, y_support) -> tuple[list[list[str]], int]:
    codes, clipped = self.fmt.encode_labels(y_support)
    return [[str(c) for c in row] for row in codes], int(clipped.sum())

  def sequences(self, x_support, y_support, x_query) -> prompts_lib.Sequences:
    """`B * q` sequences, prompt-major."""
    labels, _ = self.support_labels(y_support)
    sup = prompts_lib.numeric_texts(self.fmt, x_support)
    qry = prompts_lib.numeric_texts(self.fmt, x_query)
    b, q = len(qry), len(qry[0])
    return prompts_lib.build(self.lm.tokenizer, self.fmt, [sup[i] for i in range(b) for _ in range(q)],
                             [labels[i] for i in range(b) for _ in range(q)],
                             [qry[i][j] for i in range(b) for j in range(q)])

  def predict(self, x_support, y_support, x_query) -> Prediction:
    x_support, y_support, x_query = _check_regression_arrays(x_support, y_support, x_query)
    b, q = x_query.shape[:2]
    _, clipped = self.support_labels(y_support)
    seqs = self.sequences(x_support, y_support, x_query)
    log_probs, _ = self.lm.run(seqs.token_ids, seqs.answer[:, None], chunk_size=self.chunk_size)
    code, mass = readout_lib.expected_code(log_probs[:, 0], self.label_ids, self.codes)
    mass = mass.reshape(b, q)
    if self.readout == "expected":
      return Prediction(self.fmt.decode_labels(code).reshape(b, q), np.ones((b, q), bool), mass,
                        clipped, "expected")
    texts = readout_lib.greedy_continuations(self.lm, seqs, self.max_new_tokens)
    parsed = [readout_lib.parse_code(t, self.fmt) for t in texts]
    valid = np.asarray([p is not None for p in parsed]).reshape(b, q)
    values = np.asarray([np.nan if p is None else p for p in parsed], np.float64)
    return Prediction(self.fmt.decode_labels(values).reshape(b, q), valid, mass, clipped, "greedy",
                      tuple(tuple(texts[i * q:(i + 1) * q]) for i in range(b)))

  def __call__(self, x_support, y_support, x_query) -> np.ndarray:
    return self.predict(x_support, y_support, x_query).values


# ----------------------------------------------------------------------------------------------------
# Hidden features.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMFeatures:
  """Hidden features of every input at every layer, and the LM's predictions.

  Attributes:
    phi_support: `[L + 1, B, k, p]` (layer 0 = embeddings, layer l = after block l).
    phi_query: `[L + 1, B, q, p]`.
    y_support: `[B, k]` the support labels as the LM saw them in the true prompt (codes decoded; for
      classification the class indices).
    predictions: `[B, q]` the LM's predictions with the true labels (expected readout; classification:
      the most probable class).
    label_mass: `[B, q]` probability on label tokens at those answers.
    reading, labels, token: how the features were read (see the module docstring).
  """
  phi_support: np.ndarray
  phi_query: np.ndarray
  y_support: np.ndarray
  predictions: np.ndarray
  label_mass: np.ndarray
  reading: str
  labels: str
  token: str

  @property
  def num_layers(self) -> int:
    """Feature sites, `L + 1`."""
    return self.phi_support.shape[0]

  def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`(phi_support [B, k, p], phi_query [B, q, p])` at layer `index` (0 = embeddings)."""
    if not 0 <= index < self.num_layers:
      raise ValueError(f"layer {index} out of range: this model has layers 0..{self.num_layers - 1}.")
    return self.phi_support[index], self.phi_query[index]


def context_label_texts(true_labels: list[list[str]], labels: str, zero_label: str | None = None
                        ) -> list[list[str]]:
  """The label texts written into the context: the true ones, `zero_label` (the code of y = 0)
  everywhere, the next prompt's (shuffled) or the placeholder (module docstring)."""
  labels = _choice("labels", labels, LABEL_MODES)
  if labels == "true":
    return true_labels
  if labels == "placeholder":
    return [[prompts_lib.PLACEHOLDER] * len(row) for row in true_labels]
  if labels == "zero":
    if zero_label is None:
      raise ValueError("labels='zero' writes the label of y = 0, which word labels do not have; use "
                       "labels='placeholder' or 'shuffled'.")
    return [[zero_label] * len(row) for row in true_labels]
  if len(true_labels) < 2:
    raise ValueError("labels='shuffled' takes each prompt's labels from the next prompt; it needs a "
                     "batch of at least 2 prompts (or use labels='zero' or 'placeholder').")
  return true_labels[1:] + true_labels[:1]


def _reduce(hidden: np.ndarray, mask: np.ndarray, token: str) -> np.ndarray:
  """hidden `[N, L+1, n, M, D]`, mask `[N, n, M]` -> `[N, L+1, n, D]` (last real token or mean)."""
  if token == "last":
    return hidden[:, :, :, -1]
  weights = mask / mask.sum(-1, keepdims=True)
  return np.einsum("nlxmd,nxm->nlxd", hidden, weights.astype(hidden.dtype))


def read_input_features(lm: model_lib.LanguageModel, fmt: prompts_lib.TextFormat,
                        support_text: Sequence[Sequence[str]], context_labels: Sequence[Sequence[str]],
                        query_text: Sequence[Sequence[str]], *, reading: str, token: str,
                        chunk_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """`phi_support [L+1, B, k, D]`, `phi_query [L+1, B, q, D]` for prompts with the given context labels."""
  reading = _choice("reading", reading, READINGS)
  token = _choice("token", token, TOKENS)
  b, k, q = len(support_text), len(support_text[0]), len(query_text[0])
  if reading == "in_context":
    seqs = prompts_lib.build(lm.tokenizer, fmt, [support_text[i] for i in range(b) for _ in range(q)],
                             [context_labels[i] for i in range(b) for _ in range(q)],
                             [query_text[i][j] for i in range(b) for j in range(q)])
  else:
    asked = [list(support_text[i]) + list(query_text[i]) for i in range(b)]
    ctx = (lambda i: list(support_text[i])) if reading == "as_query" else (lambda i: [])
    ctx_labels = (lambda i: list(context_labels[i])) if reading == "as_query" else (lambda i: [])
    seqs = prompts_lib.build(lm.tokenizer, fmt, [ctx(i) for i in range(b) for _ in range(k + q)],
                             [ctx_labels(i) for i in range(b) for _ in range(k + q)],
                             [asked[i][j] for i in range(b) for j in range(k + q)])
  n, n_x, m = seqs.x_tokens.shape
  _, hidden = lm.run(seqs.token_ids, seqs.x_tokens.reshape(n, n_x * m), chunk_size=chunk_size)
  hidden = hidden.reshape(n, hidden.shape[1], n_x, m, hidden.shape[-1])
  phi = _reduce(hidden, seqs.x_mask, token)  # [N, L+1, n_x, D]
  if reading == "in_context":
    phi = phi.reshape(b, q, *phi.shape[1:])
    phi_support = phi[:, 0, :, :k]                       # supports: identical in every query's prompt
    phi_query = phi[:, :, :, k].transpose(0, 2, 1, 3)    # [B, L+1, q, D]
  else:
    phi = phi[:, :, -1].reshape(b, k + q, phi.shape[1], phi.shape[-1]).transpose(0, 2, 1, 3)
    phi_support, phi_query = phi[:, :, :k], phi[:, :, k:]
  return (np.ascontiguousarray(phi_support.transpose(1, 0, 2, 3)),
          np.ascontiguousarray(phi_query.transpose(1, 0, 2, 3)))


def read_features(regressor: LMRegressor, x_support, y_support, x_query, *, reading: str = "as_query",
                  labels: str = "shuffled", token: str = "last") -> LMFeatures:
  """Hidden features of the regression prompts' inputs at every layer, read with `labels` in the
  context (see the module docstring), plus the LM's predictions with the true labels."""
  x_support, y_support, x_query = _check_regression_arrays(x_support, y_support, x_query)
  labels = _choice("labels", labels, LABEL_MODES)
  fmt = regressor.fmt
  true_labels, _ = regressor.support_labels(y_support)
  phi_support, phi_query = read_input_features(
      regressor.lm, fmt, prompts_lib.numeric_texts(fmt, x_support),
      context_label_texts(true_labels, labels, str(fmt.encode_labels(0.0)[0])),
      prompts_lib.numeric_texts(fmt, x_query), reading=reading, token=token,
      chunk_size=regressor.chunk_size)
  pred = _expected(regressor, x_support, y_support, x_query)
  seen = fmt.decode_labels(fmt.encode_labels(y_support)[0])
  return LMFeatures(phi_support, phi_query, seen, pred.values, pred.label_mass, reading, labels, token)


def _expected(regressor: LMRegressor, x_support, y_support, x_query) -> Prediction:
  if regressor.readout == "expected":
    return regressor.predict(x_support, y_support, x_query)
  expected = LMRegressor(regressor.lm, regressor.fmt, readout="expected", chunk_size=regressor.chunk_size)
  return expected.predict(x_support, y_support, x_query)


# ----------------------------------------------------------------------------------------------------
# Classification.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassPrediction:
  """The LM's answers to classification queries.

  Attributes:
    probs: `[B, q, C]` probabilities of the classes' label tokens, normalised over the labels.
    predicted: `[B, q]` the class the LM answers (expected: argmax of `probs`; greedy: the parsed
      word, -1 where invalid).
    valid: `[B, q]` the answer was a label word.
    label_mass: `[B, q]` probability on the label tokens.
    readout: `"expected"` or `"greedy"`.
  """
  probs: np.ndarray
  predicted: np.ndarray
  valid: np.ndarray
  label_mass: np.ndarray
  readout: str


def classify(lm: model_lib.LanguageModel, fmt: prompts_lib.TextFormat,
             prompts: prompts_lib.ClassificationPrompts, *, readout: str = "expected",
             max_new_tokens: int = 2, chunk_size: int = 64) -> ClassPrediction:
  """Asks the LM each query of `prompts` (supports with their label words, then the query)."""
  readout = _choice("readout", readout, readout_lib.READOUTS)
  b, q = prompts.c_query.shape
  seqs = prompts_lib.build(
      lm.tokenizer, fmt, [prompts.support_text[i] for i in range(b) for _ in range(q)],
      [[prompts.label_words[i][c] for c in prompts.c_support[i]] for i in range(b) for _ in range(q)],
      [prompts.query_text[i][j] for i in range(b) for j in range(q)])
  log_probs, _ = lm.run(seqs.token_ids, seqs.answer[:, None], chunk_size=chunk_size)
  probs, mass = [], []
  for i in range(b):
    ids = readout_lib.label_token_ids(lm.tokenizer, fmt, prompts.label_words[i])
    p, m = readout_lib.label_distribution(log_probs[i * q:(i + 1) * q, 0], ids)
    probs.append(p)
    mass.append(m)
  probs, mass = np.stack(probs), np.stack(mass)
  if readout == "expected":
    return ClassPrediction(probs, probs.argmax(-1), np.ones((b, q), bool), mass, readout)
  texts = readout_lib.greedy_continuations(lm, seqs, max_new_tokens)
  parsed = np.asarray([readout_lib.parse_word(t, prompts.label_words[n // q]) for n, t in enumerate(texts)],
                      dtype=object)
  valid = np.asarray([p is not None for p in parsed]).reshape(b, q)
  predicted = np.asarray([-1 if p is None else p for p in parsed], np.int64).reshape(b, q)
  return ClassPrediction(probs, predicted, valid, mass, readout)


def read_class_features(lm: model_lib.LanguageModel, fmt: prompts_lib.TextFormat,
                        prompts: prompts_lib.ClassificationPrompts, *, reading: str = "as_query",
                        labels: str = "shuffled", token: str = "last") -> LMFeatures:
  """`LMFeatures` of classification prompts (`y_support` = class indices, `predictions` = the LM's
  most probable class)."""
  labels = _choice("labels", labels, LABEL_MODES)
  true_labels = [[prompts.label_words[i][c] for c in prompts.c_support[i]]
                 for i in range(len(prompts.label_words))]
  phi_support, phi_query = read_input_features(
      lm, fmt, prompts.support_text, context_label_texts(true_labels, labels), prompts.query_text,
      reading=reading, token=token)
  pred = classify(lm, fmt, prompts)
  return LMFeatures(phi_support, phi_query, prompts.c_support.astype(np.float64),
                    pred.predicted.astype(np.float64), pred.label_mass, reading, labels, token)
