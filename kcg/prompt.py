"""Prompt encoding shared by compiled and learned models."""

from kcg._src.prompt import PromptLayout
from kcg._src.prompt import encode
from kcg._src.prompt import make_layout
from kcg._src.prompt import query_outputs
from kcg._src.prompt import validate_prompt

__all__ = ["PromptLayout", "encode", "make_layout", "query_outputs", "validate_prompt"]
