"""Prompt encoding shared by compiled and learned models."""

from kcg._src.prompt import InterleavedLayout
from kcg._src.prompt import PromptLayout
from kcg._src.prompt import encode
from kcg._src.prompt import encode_interleaved
from kcg._src.prompt import interleaved_predictions
from kcg._src.prompt import make_interleaved_layout
from kcg._src.prompt import make_layout
from kcg._src.prompt import query_outputs
from kcg._src.prompt import validate_prompt

__all__ = ["InterleavedLayout", "PromptLayout", "encode", "encode_interleaved",
           "interleaved_predictions", "make_interleaved_layout", "make_layout", "query_outputs",
           "validate_prompt"]
