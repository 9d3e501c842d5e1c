"""Pretrained causal language models in kcg's instruments (needs the `lm` extra; see `kcg.lm`)."""
