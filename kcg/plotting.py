"""Headless plots (Agg): error curves with bounds, the residual stream's layout, and the style helpers
(distinct colours and markers, integer ticks, legends that do not hide data) every kcg figure uses."""

from kcg._src.plotting import DPI
from kcg._src.plotting import LEGEND_FONTSIZE
from kcg._src.plotting import MARKERS
from kcg._src.plotting import PALETTE
from kcg._src.plotting import PLOT_FLOOR
from kcg._src.plotting import REFERENCE
from kcg._src.plotting import add_figure_legend
from kcg._src.plotting import add_legend
from kcg._src.plotting import error_curves
from kcg._src.plotting import integer_ticks
from kcg._src.plotting import line_style
from kcg._src.plotting import line_styles
from kcg._src.plotting import new_figure
from kcg._src.plotting import residual_stream
from kcg._src.plotting import save_figure

__all__ = [
    "DPI", "LEGEND_FONTSIZE", "MARKERS", "PALETTE", "PLOT_FLOOR", "REFERENCE", "add_figure_legend",
    "add_legend", "error_curves", "integer_ticks", "line_style", "line_styles", "new_figure",
    "residual_stream", "save_figure",
]
