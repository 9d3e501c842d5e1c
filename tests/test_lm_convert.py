"""Opt-in (`pip install -e ".[lm-convert]"` with a CPU torch): Hugging Face GPT-NeoX -> kcg checkpoint.

A tiny randomly initialised `GPTNeoXForCausalLM` (Pythia's configuration flags) is written in Hugging
Face's own format, converted with `kcg.lm.convert_huggingface` (penzai's converter), loaded with
`kcg.lm.load`, and its logits compared with the PyTorch forward pass. Skipped when torch or
transformers is missing (CI installs neither).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("penzai")
if int(transformers.__version__.split(".")[0]) >= 5:
  pytest.skip("penzai 0.2.5's GPT-NeoX converter reads the transformers 4.x config (rotary_pct, "
              "rotary_emb_base); the lm-convert extra pins transformers<5.", allow_module_level=True)

from kcg import lm as kcg_lm  # noqa: E402


def test_converted_pythia_matches_the_pytorch_forward(tmp_path):
  tokenizer = kcg_lm.tiny_model(0).tokenizer
  config = transformers.GPTNeoXConfig(
      vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, rotary_pct=0.25, max_position_embeddings=256, use_parallel_residual=True)
  torch.manual_seed(0)
  hf = transformers.GPTNeoXForCausalLM(config).eval()
  hf_dir = tmp_path / "hf"
  hf.save_pretrained(hf_dir)
  tokenizer.save(str(hf_dir / "tokenizer.json"))
  lm = kcg_lm.load(kcg_lm.convert_huggingface(str(hf_dir), str(tmp_path / "kcg")))
  assert not lm.random_init and lm.num_layers == 2
  tokens = np.random.default_rng(0).integers(0, tokenizer.vocab_size, size=(2, 9))
  with torch.no_grad():
    out = hf(torch.as_tensor(tokens), output_hidden_states=True)
  log_probs, hidden = lm.run(tokens, np.tile(np.arange(9), (2, 1)))
  ref = torch.log_softmax(out.logits, -1).numpy()
  # float32 on both sides, same operations in a different order: a few ulps of O(10) log-probs.
  np.testing.assert_allclose(log_probs, ref, atol=2e-5)
  # Hugging Face's last hidden state is after the final norm; the others are the residual stream.
  for layer in range(2):
    want = out.hidden_states[layer].numpy()
    np.testing.assert_allclose(hidden[:, layer], want, atol=1e-5 * np.abs(want).max())
