"""Pretrained causal LMs through penzai: checkpoints on disk, loading, and one jitted forward pass.

The architecture and its forward pass are penzai's (`penzai.models.transformer.variants.gpt_neox`,
the GPT-NeoX / Pythia family); kcg adds a checkpoint layout, loading with validation, and a forward
pass that returns the log-probabilities and every layer's residual stream at chosen token positions.

Checkpoint directory (written by `save`, read by `load`):

    DIR/kcg_lm.json      format tag, family, the penzai config, every parameter's label/axes/shape/
                         dtype, the tokenizer's BOS token, `random_init` and `source`
    DIR/params/          orbax checkpoint (StandardSave) of the parameter arrays, keyed by index
    DIR/tokenizer.json   Hugging Face tokenizer file

Real weights: `convert_huggingface(HF_DIR, DIR)` turns a Hugging Face GPT-NeoX checkpoint (e.g.
EleutherAI/pythia-160m, downloaded by the user) into this layout with penzai's own converter; it
needs PyTorch and transformers (the `lm-convert` extra) once, at conversion time; `load` does not.

Layers: `hidden[:, 0]` is the residual stream entering the first block (token embedding, after the
activation-dtype cast), `hidden[:, l]` the stream after block `l` (1..L), before the final norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import gpt_neox

from kcg._src.lm import tokenizer as tokenizer_lib

FORMAT = "kcg-penzai-lm/1"
MANIFEST = "kcg_lm.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"

_FAMILIES = {"gpt_neox": (gpt_neox.GPTNeoXTransformerConfig, gpt_neox.build_gpt_neox_transformer)}
FAMILIES = tuple(_FAMILIES)
_DTYPE_FIELDS = ("parameter_dtype", "activation_dtype")


@contextlib.contextmanager
def _penzai_numerics():
  """penzai mixes int positions with float arrays and broadcasts by rank; kcg's tests run JAX strict."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def _final_norm_epsilon(model: Any, config: Any) -> Any:
  """penzai 0.2.5 builds GPT-NeoX's final LayerNorm with its default epsilon 1e-6 instead of the
  config's `layernorm_epsilon` (Hugging Face uses `layer_norm_eps`, 1e-5 for Pythia, in every norm).
  Measured on a tiny random Pythia: 4e-3 in the log-probabilities. kcg sets the config's value."""
  final_norm = model.body.sublayers[-2]
  if not isinstance(final_norm, pz.nn.LayerNorm):
    raise ValueError(f"Unexpected GPT-NeoX layout: {type(final_norm).__name__} where the final "
                     "LayerNorm should be; is this penzai version supported?")
  return (pz.select(model).at(lambda m: m.body.sublayers[-2]).at_instances_of(pz.nn.Standardize)
          .apply(lambda layer: dataclasses.replace(layer, epsilon=config.layernorm_epsilon)))


def _build(family: str, config: Any, key: Any) -> Any:
  """penzai's model of `family` (parameter slots if `key` is None), with `_final_norm_epsilon`."""
  return _final_norm_epsilon(_FAMILIES[family][1](config, init_base_rng=key), config)


# ----------------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict[str, Any]:
  out = dataclasses.asdict(config)
  for name in _DTYPE_FIELDS:
    out[name] = jnp.dtype(out[name]).name
  return out


def config_from_dict(family: str, raw: dict[str, Any]) -> Any:
  cls = _FAMILIES[_check_family(family)][0]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(raw) - known
  if unknown:
    raise ValueError(f"{MANIFEST}: unknown {family} config fields {sorted(unknown)}; was it written by a "
                     "newer kcg?")
  raw = dict(raw)
  for name in _DTYPE_FIELDS:
    raw[name] = jnp.dtype(raw[name])
  return cls(**raw)


def _check_family(family: str) -> str:
  if family not in _FAMILIES:
    raise ValueError(f"Unknown LM family {family!r}; kcg loads {', '.join(FAMILIES)}.")
  return family


def tiny_config(vocab_size: int, *, num_layers: int = 3, width: int = 32, num_heads: int = 2,
                mlp_hidden: int = 128) -> gpt_neox.GPTNeoXTransformerConfig:
  """A GPT-NeoX config of a few ten thousand parameters (Pythia's layout: parallel residual, partial
  rotary on a quarter of each head, exact GELU), for tests and the pipeline check."""
  for name, value in (("vocab_size", vocab_size), ("num_layers", num_layers), ("width", width),
                      ("num_heads", num_heads), ("mlp_hidden", mlp_hidden)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"tiny_config: {name} must be an integer >= 1, got {value!r}.")
  if width % num_heads:
    raise ValueError(f"tiny_config: width {width} must be divisible by num_heads {num_heads}.")
  head_dim = width // num_heads
  return gpt_neox.GPTNeoXTransformerConfig(
      num_attention_heads=num_heads, embedding_dim=width, projection_dim=head_dim,
      mlp_hidden_dim=mlp_hidden, num_decoder_blocks=num_layers, vocab_size=int(vocab_size),
      activation_fn="gelu_exact", rope_subset_size=max(2, head_dim // 4), rope_wavelength=10_000.0,
      layernorm_epsilon=1e-5, parameter_dtype=jnp.dtype("float32"),
      activation_dtype=jnp.dtype("float32"))


# ----------------------------------------------------------------------------------------------------
# The loaded model.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """A penzai causal LM with frozen parameters, its tokenizer and where it came from.

  Attributes:
    model: the penzai `TransformerLM` (parameters frozen, so it is a pytree of arrays).
    tokenizer: a `kcg.lm.Tokenizer`.
    family: one of `FAMILIES`.
    config: the penzai config the model was built from.
    random_init: True when the weights are random (the tiny test checkpoint or the untrained
      control); such a model's numbers are pipeline checks, never findings about language models.
    source: where the weights came from (a Hugging Face name, "tiny random", ...).
    path: the checkpoint directory it was loaded from (None if built in memory).
  """
  model: Any
  tokenizer: tokenizer_lib.Tokenizer
  family: str
  config: Any
  random_init: bool
  source: str
  path: str | None = None

  @property
  def num_layers(self) -> int:
    return int(self.config.num_decoder_blocks)

  @property
  def width(self) -> int:
    return int(self.config.embedding_dim)

  @property
  def num_parameters(self) -> int:
    return int(sum(np.prod(p.value.data_array.shape) for p in parameter_values(self.model)))

  def run(self, token_ids: Any, positions: Any, *, chunk_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities and residual streams at `positions`.

    Args:
      token_ids: `[N, T]` ints (right-padded: causal attention, so padding never reaches earlier
        positions).
      positions: `[N, P]` token indices to read, `0 <= position < T`.
      chunk_size: sequences per forward pass (memory is `chunk_size x T x (width + vocab)`).

    Returns:
      `log_probs [N, P, V]` of the next token after each position (float32) and
      `hidden [N, L + 1, P, D]` (layer 0 = embeddings, layer l = after block l), in the model's
      activation dtype.
    """
    token_ids = np.asarray(token_ids)
    positions = np.asarray(positions)
    if token_ids.ndim != 2 or positions.ndim != 2 or positions.shape[0] != token_ids.shape[0]:
      raise ValueError(f"run: token_ids must be [N, T] and positions [N, P] with the same N; got "
                       f"{token_ids.shape} and {positions.shape}.")
    if token_ids.dtype.kind not in "iu" or positions.dtype.kind not in "iu":
      raise ValueError("run: token_ids and positions must be integer arrays.")
    n, t = token_ids.shape
    if positions.size and (positions.min() < 0 or positions.max() >= t):
      raise ValueError(f"run: positions must lie in [0, {t}), got [{positions.min()}, {positions.max()}].")
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size):
      raise ValueError(f"run: token ids must lie in [0, {self.config.vocab_size}); got "
                       f"[{token_ids.min()}, {token_ids.max()}] (tokenizer and model do not match).")
    # Pad sizes to buckets (chunk: always chunk_size; length: 64s; positions: a power of two >= 8),
    # so that calls of similar sizes reuse one compilation (a compilation costs seconds).
    chunk = int(chunk_size)
    if chunk < 1:
      raise ValueError(f"run: chunk_size must be >= 1, got {chunk_size}.")
    t_pad = -(-t // 64) * 64
    p_pad = max(8, 1 << (positions.shape[1] - 1).bit_length())
    ids = np.zeros((-(-n // chunk) * chunk, t_pad), np.int32)
    ids[:n, :t] = token_ids
    pos = np.zeros((ids.shape[0], p_pad), np.int32)
    pos[:n, :positions.shape[1]] = positions
    log_probs, hidden = [], []
    for start in range(0, ids.shape[0], chunk):
      lp, h = _forward_at(self.model, jnp.asarray(ids[start:start + chunk]),
                          jnp.asarray(pos[start:start + chunk]))
      log_probs.append(np.asarray(lp))
      hidden.append(np.asarray(h))
    p = positions.shape[1]
    return np.concatenate(log_probs)[:n, :p], np.concatenate(hidden)[:n, :, :p]

  def logits(self, token_ids: Any) -> np.ndarray:
    """Penzai's own forward pass, `model(tokens)`: logits `[N, T, V]` (the reference `run` is tested
    against)."""
    with _penzai_numerics():
      tokens = pz.nx.wrap(jnp.asarray(token_ids, jnp.int32)).tag("batch", "seq")
      return np.asarray(self.model(tokens).unwrap("batch", "seq", "vocabulary"))


@jax.jit
def _forward_at(model, tokens_NxT, positions_NxP):
  """The body's sublayers one by one (they are penzai's), keeping the residual after each block.

  The layers after the last block (final norm, unembedding) act token by token, so they run on the
  gathered positions only: `[N, P, V]` logits instead of `[N, T, V]`.
  """
  with _penzai_numerics():
    n, t = tokens_NxT.shape
    token_positions = pz.nx.wrap(jnp.broadcast_to(jnp.arange(t), (n, t))).tag("batch", "seq")
    x = pz.nx.wrap(tokens_NxT).tag("batch", "seq")
    sublayers = list(model.body.sublayers)
    blocks = [i for i, s in enumerate(sublayers) if isinstance(s, model_parts.TransformerBlock)]
    streams = []
    for i, layer in enumerate(sublayers[:blocks[-1] + 1]):
      if i == blocks[0]:
        streams.append(x)
      x = layer(x, token_positions=token_positions)
      if isinstance(layer, model_parts.TransformerBlock):
        streams.append(x)
    hidden_NxLxTxD = jnp.stack([s.unwrap("batch", "seq", "embedding") for s in streams], axis=1)
    hidden = jnp.take_along_axis(hidden_NxLxTxD, positions_NxP[:, None, :, None], axis=2)
    y = pz.nx.wrap(hidden[:, -1]).tag("batch", "seq", "embedding")
    gathered_positions = pz.nx.wrap(positions_NxP).tag("batch", "seq")
    for layer in sublayers[blocks[-1] + 1:]:
      y = layer(y, token_positions=gathered_positions)
    logits_NxPxV = y.unwrap("batch", "seq", "vocabulary").astype(jnp.float32)
  return jax.nn.log_softmax(logits_NxPxV), hidden


# ----------------------------------------------------------------------------------------------------
# Building, saving, loading.
# ----------------------------------------------------------------------------------------------------


def parameter_values(model: Any) -> list[Any]:
  """The model's parameters as frozen `pz.ParameterValue`s (label + named array), in tree order."""
  leaves = jax.tree_util.tree_leaves(
      pz.freeze_params(model), is_leaf=lambda x: isinstance(x, pz.ParameterValue))
  return [leaf for leaf in leaves if isinstance(leaf, pz.ParameterValue)]


def build_random(config: Any, tokenizer: tokenizer_lib.Tokenizer, key: Any, *, family: str = "gpt_neox",
                 source: str = "random init") -> LanguageModel:
  """The architecture of `config` at penzai's random initialisation (the untrained control)."""
  _check_family(family)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only "
                     f"{config.vocab_size}; they do not belong together.")
  with _penzai_numerics():
    model = _build(family, config, key)
  return LanguageModel(pz.freeze_params(model), tokenizer, family, config, True, source)


def random_like(lm: LanguageModel, key: Any) -> LanguageModel:
  """The same architecture and tokenizer as `lm`, untrained (penzai's initialisers)."""
  return build_random(lm.config, lm.tokenizer, key, family=lm.family,
                      source=f"random init of the {lm.source} architecture")


def save(path: str, lm: LanguageModel) -> str:
  """Writes `lm` as a kcg LM checkpoint directory (see the module docstring); returns the path."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, MANIFEST)):
    raise ValueError(f"{path} already holds an LM checkpoint; pass a new directory.")
  os.makedirs(path, exist_ok=True)
  entries, arrays = [], {}
  for i, p in enumerate(parameter_values(lm.model)):
    value = p.value
    if value.positional_shape:
      raise ValueError(f"Parameter {p.label} has positional axes {value.positional_shape}; kcg stores "
                       "named axes only.")
    axes = list(value.named_shape)
    arrays[f"{i:05d}"] = np.asarray(value.unwrap(*axes))
    entries.append({"label": p.label, "axes": axes, "shape": list(arrays[f"{i:05d}"].shape),
                    "dtype": arrays[f"{i:05d}"].dtype.name})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, PARAMS_DIR), arrays)
  checkpointer.wait_until_finished()
  lm.tokenizer.save(os.path.join(path, TOKENIZER_FILE))
  manifest = {"format": FORMAT, "family": lm.family, "config": config_to_dict(lm.config),
              "params": entries, "bos_token": lm.tokenizer.bos_token,
              "random_init": bool(lm.random_init), "source": lm.source}
  with open(os.path.join(path, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return path


def read_manifest(path: str) -> dict[str, Any]:
  file = os.path.join(path, MANIFEST)
  if not os.path.isfile(file):
    raise ValueError(f"{path!r} is not a kcg LM checkpoint (no {MANIFEST}); convert Hugging Face "
                     "weights with kcg.lm.convert_huggingface(HF_DIR, DIR), or write the tiny random "
                     "one with kcg.lm.write_tiny_checkpoint(DIR).")
  with open(file) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
  return manifest


def load(path: str, *, activation_dtype: str | None = "float32") -> LanguageModel:
  """Reads a kcg LM checkpoint directory and binds its parameters into penzai's architecture.

  Every parameter's label, axes, shape and dtype are checked against the architecture the config
  builds (a ValueError names the first mismatch).

  Args:
    path: the directory `save` or `convert_huggingface` wrote.
    activation_dtype: dtype of the activations (None: the checkpoint's); float32 by default, so that
      bfloat16 weights are analysed in float32.
  """
  manifest = read_manifest(path)
  family = _check_family(manifest["family"])
  config = config_from_dict(family, manifest["config"])
  if activation_dtype is not None:
    config = dataclasses.replace(config, activation_dtype=jnp.dtype(activation_dtype))
  with _penzai_numerics():
    model_def = _build(family, config, None)
    expected = jax.eval_shape(
        lambda key: parameter_values(_build(family, config, key)), jax.random.key(0))
  want = {p.label: p.value for p in expected}
  entries = manifest["params"]
  have_labels = [e["label"] for e in entries]
  missing = sorted(set(want) - set(have_labels))
  extra = sorted(set(have_labels) - set(want))
  if missing or extra:
    raise ValueError(f"{path}: parameters do not match the {family} architecture of its config; "
                     f"missing {missing[:3]}, unexpected {extra[:3]}.")
  checkpointer = ocp.StandardCheckpointer()
  abstract = {f"{i:05d}": jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]))
              for i, e in enumerate(entries)}
  arrays = checkpointer.restore(os.path.join(os.path.abspath(path), PARAMS_DIR), abstract)
  params = []
  for i, entry in enumerate(entries):
    value = pz.nx.wrap(jnp.asarray(arrays[f"{i:05d}"])).tag(*entry["axes"])
    ref = want[entry["label"]]
    if dict(value.named_shape) != dict(ref.named_shape) or value.dtype != ref.dtype:
      raise ValueError(f"{path}: parameter {entry['label']} has axes {dict(value.named_shape)} and "
                       f"dtype {value.dtype}; the architecture wants {dict(ref.named_shape)}, {ref.dtype}.")
    params.append(pz.Parameter(value=value, label=entry["label"]))
  model = pz.bind_variables(model_def, params)
  pz.nn.assert_no_parameter_slots(model)
  tokenizer = tokenizer_lib.Tokenizer.from_file(os.path.join(path, TOKENIZER_FILE),
                                                manifest.get("bos_token"))
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}.")
  return LanguageModel(pz.freeze_params(model), tokenizer, family, config,
                       bool(manifest["random_init"]), manifest["source"], os.path.abspath(path))


def convert_huggingface(hf_dir: str, out_dir: str, *, dtype: str = "float32") -> str:
  """Converts a Hugging Face GPT-NeoX / Pythia checkpoint directory into a kcg LM checkpoint.

  Uses penzai's `gpt_neox_from_huggingface_model`; needs `torch` (a CPU build is enough) and
  `transformers`: `pip install -e ".[lm-convert]"`. `hf_dir` holds `config.json`, the weights and
  `tokenizer.json` (e.g. a local download of EleutherAI/pythia-160m).
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("convert_huggingface needs torch and transformers: pip install -e '.[lm-convert]' "
                      "(a CPU build of torch is enough); loading the converted checkpoint does not.") from e
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
  if torch_dtype is None:
    raise ValueError(f"dtype must be 'float32' or 'bfloat16' (what penzai converts), got {dtype!r}.")
  dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
  hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(hf_dir, **{dtype_arg: torch_dtype})
  return save(out_dir, from_huggingface_model(hf_model, os.path.join(hf_dir, TOKENIZER_FILE),
                                              source=os.path.basename(os.path.normpath(hf_dir))))


_HF_METADATA = ("_name_or_path", "dtype")


def from_huggingface_model(hf_model: Any, tokenizer_file: str, *, source: str) -> LanguageModel:
  """An in-memory HF `GPTNeoXForCausalLM` as a `LanguageModel` (penzai's converter; needs torch)."""
  hf = hf_model.config
  if not hasattr(hf, "rotary_emb_base"):
    raise ValueError("This Hugging Face config has no rotary_emb_base (transformers >= 5 moved it); "
                     "penzai 0.2.5's converter needs transformers < 5: pip install 'transformers<5'.")
  # penzai 0.2.5 refuses config attributes it does not know; transformers >= 5 adds two that are
  # metadata only (the model's dtype is read from the model itself). Hide them during conversion.
  metadata = {name: getattr(hf, name) for name in _HF_METADATA if hasattr(hf, name)}
  defaults = type(hf)().to_dict()
  try:
    for name in metadata:
      setattr(hf, name, defaults.get(name))
    model = gpt_neox.gpt_neox_from_huggingface_model(hf_model)
  finally:
    for name, value in metadata.items():
      setattr(hf, name, value)
  head_dim = hf.hidden_size // hf.num_attention_heads
  dtype = jnp.dtype({"torch.float32": "float32", "torch.bfloat16": "bfloat16"}[str(hf_model.dtype)])
  # The same config penzai's converter builds internally (it does not return it).
  config = gpt_neox.GPTNeoXTransformerConfig(
      num_attention_heads=hf.num_attention_heads, embedding_dim=hf.hidden_size,
      projection_dim=head_dim, mlp_hidden_dim=hf.intermediate_size,
      num_decoder_blocks=hf.num_hidden_layers, vocab_size=hf.vocab_size,
      activation_fn={"gelu": "gelu_exact", "gelu_new": "gelu_approx", "relu": "relu",
                     "silu": "silu"}[hf.hidden_act],
      rope_subset_size=int(hf.rotary_pct * head_dim), rope_wavelength=hf.rotary_emb_base,
      layernorm_epsilon=hf.layer_norm_eps, parameter_dtype=dtype, activation_dtype=dtype)
  tokenizer = tokenizer_lib.Tokenizer.from_file(tokenizer_file)
  model = _final_norm_epsilon(model, config)
  return LanguageModel(pz.freeze_params(model), tokenizer, "gpt_neox", config, False, source)

