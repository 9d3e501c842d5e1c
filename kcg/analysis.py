"""Compiled CG transformers against the references, step by step."""

from kcg._src.analysis import StepComparison
from kcg._src.analysis import compare_steps
from kcg._src.analysis import format_comparison
from kcg._src.analysis import rounding_spread

__all__ = ["StepComparison", "compare_steps", "format_comparison", "rounding_spread"]
