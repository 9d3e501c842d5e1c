"""kcg.lm: loading a penzai LM from disk, reading logits and hidden states, prompts and readouts.

The checkpoint is the tiny random GPT-NeoX the tests write themselves; every equality is against
penzai's own forward pass (`model(tokens)` and its `SaveIntermediate` instrumentation).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("penzai")
pytest.importorskip("tokenizers")

from penzai import pz  # noqa: E402
from penzai.models.transformer import model_parts  # noqa: E402
from penzai.toolshed import save_intermediates  # noqa: E402

import kcg  # noqa: E402
from kcg import lm as kcg_lm  # noqa: E402
from kcg._src.lm import model as model_lib  # noqa: E402
from kcg._src.lm import prompts as prompts_lib  # noqa: E402
from kcg._src.lm import readout as readout_lib  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return kcg_lm.write_tiny_checkpoint(str(tmp_path_factory.mktemp("lm") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def lm(checkpoint):
  return kcg_lm.load(checkpoint)


@pytest.fixture(scope="module")
def prompts():
  task = kcg.tasks.TaskConfig(family="linear", input_dim=2, num_support=5, num_query=3, batch_size=4)
  p = kcg.tasks.sample(jax.random.key(0), task)
  return tuple(np.asarray(a) for a in (p.x_support, p.y_support, p.x_query))


def _penzai_streams(lm, tokens):
  """penzai's own instrumentation: a SaveIntermediate after the embedding and after every block."""
  model = (pz.select(lm.model)
           .at_instances_of(pz.nn.EmbeddingLookup | model_parts.TransformerBlock)
           .apply(lambda layer: pz.nn.Sequential([layer, save_intermediates.SaveIntermediate()])))
  with model_lib._penzai_numerics():
    logits = model(pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"))
  saved = pz.select(model).at_instances_of(save_intermediates.SaveIntermediate).get_sequence()
  hidden = np.stack([np.asarray(s.saved.value.unwrap("batch", "seq", "embedding")) for s in saved], 1)
  return np.asarray(logits.unwrap("batch", "seq", "vocabulary")), hidden


def _all_positions(tokens):
  return np.tile(np.arange(tokens.shape[1]), (tokens.shape[0], 1))


def _tokens(lm, n=3, t=11, seed=0):
  return np.random.default_rng(seed).integers(0, lm.tokenizer.vocab_size, size=(n, t)).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# Loading and the forward pass.
# ----------------------------------------------------------------------------------------------------


def test_logits_and_hidden_states_equal_penzais_forward(lm):
  tokens = _tokens(lm)
  log_probs, hidden = lm.run(tokens, _all_positions(tokens))
  ref_logits, ref_hidden = _penzai_streams(lm, tokens)
  assert hidden.shape == (3, lm.num_layers + 1, 11, lm.width)
  # float32, the same ops jitted vs eager: rounding-level differences only (logits are O(1..10)).
  np.testing.assert_allclose(log_probs, jax.nn.log_softmax(ref_logits), atol=2e-5)
  np.testing.assert_allclose(hidden, ref_hidden, atol=2e-5 * np.abs(ref_hidden).max())


@pytest.mark.slow
def test_float64_forward_matches_to_rounding():
  tiny = kcg_lm.tiny_model(1)
  config = dataclasses.replace(tiny.config, parameter_dtype=jnp.dtype("float64"),
                               activation_dtype=jnp.dtype("float64"))
  lm64 = kcg_lm.build_random(config, tiny.tokenizer, jax.random.key(1))
  tokens = _tokens(lm64, seed=1)
  _, hidden = lm64.run(tokens, _all_positions(tokens))
  ref_logits, ref_hidden = _penzai_streams(lm64, tokens)
  assert hidden.dtype == np.float64
  np.testing.assert_allclose(hidden, ref_hidden, rtol=0, atol=1e-12 * np.abs(ref_hidden).max())
  np.testing.assert_allclose(lm64.logits(tokens), ref_logits, rtol=0, atol=1e-12)


def test_reading_a_position_sees_only_the_past(lm):
  """Right padding is safe: what follows a position never changes what is read there."""
  tokens = _tokens(lm, t=12)
  changed = tokens.copy()
  changed[:, 8:] = (changed[:, 8:] + 1) % lm.tokenizer.vocab_size
  pos = np.tile(np.arange(8), (3, 1))
  a, ha = lm.run(tokens, pos)
  b, hb = lm.run(changed, pos)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(ha, hb, atol=1e-6 * np.abs(ha).max())


def test_checkpoint_round_trip_is_exact(checkpoint, lm):
  rebuilt = kcg_lm.tiny_model(0)  # the model write_tiny_checkpoint saved, rebuilt from the seed
  saved = {p.label: np.asarray(p.value.unwrap(*p.value.named_shape))
           for p in model_lib.parameter_values(rebuilt.model)}
  loaded = model_lib.parameter_values(lm.model)
  assert len(saved) == len(loaded) and lm.num_parameters == rebuilt.num_parameters
  for p in loaded:
    np.testing.assert_array_equal(np.asarray(p.value.unwrap(*p.value.named_shape)), saved[p.label])
  assert lm.random_init and "tiny random" in lm.source
  assert lm.tokenizer.to_json() == rebuilt.tokenizer.to_json()


def test_load_rejects_what_is_not_a_matching_checkpoint(checkpoint, tmp_path):
  with pytest.raises(ValueError, match="not a kcg LM checkpoint"):
    kcg_lm.load(str(tmp_path))
  with pytest.raises(ValueError, match="already holds"):
    kcg_lm.save(checkpoint, kcg_lm.load(checkpoint))
  manifest = json.loads(open(os.path.join(checkpoint, model_lib.MANIFEST)).read())

  def write(m):
    d = tmp_path / f"bad{len(os.listdir(tmp_path))}"
    os.makedirs(d)
    for name in (model_lib.PARAMS_DIR, model_lib.TOKENIZER_FILE):
      os.symlink(os.path.join(checkpoint, name), d / name)
    (d / model_lib.MANIFEST).write_text(json.dumps(m))
    return str(d)

  with pytest.raises(ValueError, match="Unknown LM family"):
    kcg_lm.load(write({**manifest, "family": "gpt5"}))
  with pytest.raises(ValueError, match="format"):
    kcg_lm.load(write({**manifest, "format": "other/1"}))
  wider = {**manifest, "config": {**manifest["config"], "mlp_hidden_dim": 64}}
  with pytest.raises(ValueError, match="the architecture wants"):
    kcg_lm.load(write(wider))
  fewer = {**manifest, "params": manifest["params"][1:]}
  with pytest.raises(ValueError, match="missing"):
    kcg_lm.load(write(fewer))


def test_random_control_is_the_same_architecture_untrained(lm):
  control = kcg_lm.random_like(lm, jax.random.key(7))
  assert control.config == lm.config and control.random_init
  a = {p.label: p.value.named_shape for p in model_lib.parameter_values(lm.model)}
  b = {p.label: p.value.named_shape for p in model_lib.parameter_values(control.model)}
  assert a == b
  tokens = _tokens(lm)
  assert not np.allclose(control.logits(tokens), lm.logits(tokens))


def test_run_validates_its_inputs(lm):
  tokens = _tokens(lm)
  with pytest.raises(ValueError, match="positions must lie"):
    lm.run(tokens, np.full((3, 1), 11))
  with pytest.raises(ValueError, match="token ids must lie"):
    lm.run(tokens + 10_000, np.zeros((3, 1), np.int64))
  with pytest.raises(ValueError, match="same N"):
    lm.run(tokens, np.zeros((2, 1), np.int64))


# ----------------------------------------------------------------------------------------------------
# Tokenizer, prompts, readouts.
# ----------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_labels_are_single_tokens(lm):
  again = kcg_lm.tiny_model(0).tokenizer
  assert again.to_json() == lm.tokenizer.to_json()
  fmt = kcg_lm.TextFormat()
  ids = readout_lib.label_token_ids(lm.tokenizer, fmt, [str(c) for c in range(100)])
  assert len(set(ids.tolist())) == 100
  with pytest.raises(ValueError, match="not a single token"):
    readout_lib.label_token_ids(lm.tokenizer, fmt, ["12345"])


def test_prompt_positions_cover_each_input(lm):
  fmt = kcg_lm.TextFormat()
  sup = [["0.31, -1.20", "2.00, 0.05"], ["whale", "ant"]]
  seqs = prompts_lib.build(lm.tokenizer, fmt, sup, [["57", "3"], ["red", "?"]], ["-0.42, 0.88", "cat"])
  assert seqs.texts[0] == "x: 0.31, -1.20 -> y: 57\nx: 2.00, 0.05 -> y: 3\nx: -0.42, 0.88 -> y:"
  for i, inputs in enumerate([sup[0] + ["-0.42, 0.88"], sup[1] + ["cat"]]):
    assert seqs.token_ids[i, 0] == lm.tokenizer.bos_id
    for j, text in enumerate(inputs):
      toks = seqs.token_ids[i, seqs.x_tokens[i, j][seqs.x_mask[i, j]]]
      assert lm.tokenizer.decode(toks).strip() == text
    assert lm.tokenizer.decode(seqs.token_ids[i, seqs.answer[i]:seqs.answer[i] + 1]) == ":"
    assert seqs.answer[i] == seqs.lengths[i] - 1


def test_label_codes_round_trip_and_count_clipping():
  fmt = kcg_lm.TextFormat()
  codes, clipped = fmt.encode_labels([0.0, 0.57, -1.23, 7.0, -9.0])
  np.testing.assert_array_equal(codes, [50, 56, 38, 99, 0])
  np.testing.assert_array_equal(clipped, [False, False, False, True, True])
  np.testing.assert_allclose(fmt.decode_labels(codes[:3]), [0.0, 0.6, -1.2])
  assert fmt.resolution == 0.1
  a, b = fmt.written([0.31, -1.26]), fmt.written([0.44, 0.52])
  np.testing.assert_array_equal(fmt.encode_labels(a + b)[0], fmt.encode_labels(a)[0]
                                + fmt.encode_labels(b)[0] - 50)
  for bad in (dict(label_scale=0.0), dict(label_max=0), dict(label_offset=200.0),
              dict(input_decimals=-1)):
    with pytest.raises(ValueError):
      kcg_lm.TextFormat(**bad)
  with pytest.raises(ValueError, match="finite"):
    fmt.encode_labels([np.nan])


def test_expected_value_over_label_tokens():
  log_probs = np.log(np.asarray([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.25, 0.25]]) + 1e-300)
  ids, values = np.asarray([1, 2]), np.asarray([10.0, 20.0])
  code, mass = readout_lib.expected_code(log_probs, ids, values)
  np.testing.assert_allclose(code, [(0.2 * 10 + 0.3 * 20) / 0.5, 20.0], rtol=1e-12)
  np.testing.assert_allclose(mass, [0.5, 0.25], rtol=1e-12)


@pytest.mark.parametrize("text, code", [(" 57\nx", 57), ("57", 57), (" 57 b61", 57), (" 5.7", None),
                                        (" -3", None), (" 100", None), (" red", None), ("\n57", None),
                                        ("", None)])
def test_greedy_parser(text, code):
  assert readout_lib.parse_code(text, kcg_lm.TextFormat()) == code


# ----------------------------------------------------------------------------------------------------
# The LM as an in-context learner.
# ----------------------------------------------------------------------------------------------------


def test_regressor_predicts_from_the_written_labels(lm, prompts):
  xs, ys, xq = prompts
  reg = kcg_lm.LMRegressor(lm)
  pred = reg.predict(xs, ys, xq)
  assert pred.values.shape == (4, 3) and np.all(np.isfinite(pred.values)) and pred.valid.all()
  assert np.all((pred.label_mass > 0) & (pred.label_mass <= 1))
  # A change of y below the label resolution is not written, so it cannot change the prediction ...
  np.testing.assert_array_equal(reg(xs, ys + 0.2 * reg.fmt.resolution * (np.round(ys * 10) == ys * 10),
                                    xq), reg(xs, ys, xq))
  # ... while changing a written label changes it.
  assert not np.allclose(reg(xs, ys + 1.0, xq), pred.values)
  with pytest.raises(ValueError, match="x_support"):
    reg(xs[0], ys, xq)
  with pytest.raises(ValueError, match="NaN"):
    reg(xs, ys * np.nan, xq)


def test_greedy_readout_counts_invalid_outputs(lm, prompts):
  pred = kcg_lm.LMRegressor(lm, readout="greedy").predict(*prompts)
  assert pred.valid.shape == (4, 3) and len(pred.texts) == 4
  assert np.array_equal(np.isnan(pred.values), ~pred.valid)
  for row, valid_row in zip(pred.texts, pred.valid):
    for text, valid in zip(row, valid_row):
      assert (readout_lib.parse_code(text, kcg_lm.TextFormat()) is not None) == valid


@pytest.mark.parametrize("reading", kcg_lm.READINGS)
def test_features_have_the_shapes_the_instruments_want(lm, prompts, reading):
  xs, ys, xq = prompts
  feats = kcg_lm.read_features(kcg_lm.LMRegressor(lm), xs, ys, xq, reading=reading)
  assert feats.phi_support.shape == (lm.num_layers + 1, 4, 5, lm.width)
  assert feats.phi_query.shape == (lm.num_layers + 1, 4, 3, lm.width)
  assert feats.y_support.shape == (4, 5) and feats.predictions.shape == (4, 3)
  phi_s, phi_q = feats.layer(lm.num_layers)
  assert phi_s.shape == (4, 5, lm.width) and phi_q.shape == (4, 3, lm.width)
  with pytest.raises(ValueError, match="out of range"):
    feats.layer(lm.num_layers + 1)


@pytest.mark.parametrize("reading", ["as_query", "in_context"])
@pytest.mark.parametrize("labels", ["shuffled", "placeholder"])
def test_withheld_labels_make_features_independent_of_the_answer(lm, prompts, reading, labels):
  xs, ys, xq = prompts
  reg = kcg_lm.LMRegressor(lm)
  a = kcg_lm.read_features(reg, xs, ys, xq, reading=reading, labels=labels)
  b = kcg_lm.read_features(reg, xs, ys + 1.0, xq, reading=reading, labels=labels)
  if labels == "placeholder":
    np.testing.assert_array_equal(a.phi_support, b.phi_support)
    np.testing.assert_array_equal(a.phi_query, b.phi_query)
  else:  # shuffled: prompt b's features depend on prompt b+1's labels only
    y2 = ys.copy()
    y2[0] += 1.0  # changes what prompt 3 (the last) reads, and no other prompt
    c = kcg_lm.read_features(reg, xs, y2, xq, reading=reading, labels=labels)
    np.testing.assert_array_equal(a.phi_query[:, :3], c.phi_query[:, :3])
    assert not np.array_equal(a.phi_query[:, 3], c.phi_query[:, 3])
  assert not np.array_equal(a.predictions, b.predictions)


def test_true_labels_reach_the_features_the_circular_control(lm, prompts):
  xs, ys, xq = prompts
  reg = kcg_lm.LMRegressor(lm)
  a = kcg_lm.read_features(reg, xs, ys, xq, reading="in_context", labels="true")
  b = kcg_lm.read_features(reg, xs, ys + 1.0, xq, reading="in_context", labels="true")
  # Support 0 precedes every label (causal): unchanged; later supports and the queries see labels.
  np.testing.assert_array_equal(a.phi_support[:, :, 0], b.phi_support[:, :, 0])
  assert not np.allclose(a.phi_support[-1, :, 1:], b.phi_support[-1, :, 1:])
  assert not np.allclose(a.phi_query[-1], b.phi_query[-1])


def test_context_free_features_ignore_the_supports(lm, prompts):
  xs, ys, xq = prompts
  reg = kcg_lm.LMRegressor(lm)
  a = kcg_lm.read_features(reg, xs, ys, xq, reading="context_free", token="mean")
  b = kcg_lm.read_features(reg, xs[::-1], ys[::-1], xq, reading="context_free", token="mean")
  np.testing.assert_allclose(a.phi_query, b.phi_query, atol=1e-5 * np.abs(a.phi_query).max())


def test_in_context_query_features_are_the_prediction_pass_states(lm, prompts):
  """The query's feature is read in the very sequence whose answer is the prediction."""
  xs, ys, xq = prompts
  reg = kcg_lm.LMRegressor(lm)
  feats = kcg_lm.read_features(reg, xs, ys, xq, reading="in_context", labels="true")
  seqs = reg.sequences(xs, ys, xq)
  _, hidden = lm.run(seqs.token_ids, seqs.x_tokens[:, -1, -1:])
  np.testing.assert_allclose(feats.phi_query, hidden[:, :, 0].reshape(4, 3, -1, lm.width)
                             .transpose(2, 0, 1, 3), atol=1e-6 * np.abs(hidden).max())


def test_classification_numbers_and_words(lm):
  fmt = kcg_lm.TextFormat()
  rng = np.random.default_rng(0)
  for inputs in ("numbers", "words"):
    cp = kcg_lm.sample_classification(rng, fmt, inputs=inputs, num_classes=3, num_support=6,
                                      num_query=2, batch_size=3)
    pred = kcg_lm.classify(lm, fmt, cp)
    assert pred.probs.shape == (3, 2, 3)
    np.testing.assert_allclose(pred.probs.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(pred.predicted, pred.probs.argmax(-1))
    feats = kcg_lm.read_class_features(lm, fmt, cp)
    assert feats.phi_support.shape == (lm.num_layers + 1, 3, 6, lm.width)
  with pytest.raises(ValueError, match="lexicon"):
    kcg_lm.sample_classification(rng, fmt, inputs="words", num_classes=2, num_support=40,
                                 num_query=2, batch_size=1)


@pytest.mark.slow
def test_greedy_classification_counts_invalid_words(lm):
  fmt = kcg_lm.TextFormat()
  cp = kcg_lm.sample_classification(np.random.default_rng(1), fmt, inputs="words", num_classes=3,
                                    num_support=6, num_query=2, batch_size=3)
  greedy = kcg_lm.classify(lm, fmt, cp, readout="greedy")
  assert np.array_equal(greedy.predicted < 0, ~greedy.valid)
