"""Headless plots (Agg): error curves with bounds, pictures of the residual stream's layout."""

from kcg._src.plotting import error_curves
from kcg._src.plotting import residual_stream

__all__ = ["error_curves", "residual_stream"]
