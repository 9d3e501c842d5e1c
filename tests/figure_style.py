"""The figure style rules, as a checker the tests apply to every figure kcg draws.

Every line tells itself apart by (colour, marker) and by (colour, marker, line style); layer, step
and depth axes have integer ticks; axes are labelled; legends are at least 7 pt and either outside
the axes (right, above or below) or at matplotlib's least-covering place with a see-through frame.
"""

from matplotlib.colors import to_hex
from matplotlib.ticker import MaxNLocator

from kcg import plotting
from kcg._src import plotting as plotting_src

# Axis labels that name a count: these axes need integer ticks.
COUNT_WORDS = ("layer", "step", "depth", "head", "width m")


def _no_marker(line) -> bool:
  return line.get_marker() in (None, "None", "none", "", " ")


def check_style(figure) -> None:
  """The style rules, asserted on every axes and legend of `figure`."""
  for ax in figure.axes:
    if ax.get_label() == "<colorbar>":
      continue
    lines = ax.get_lines()
    styled = [(to_hex(l.get_color()), l.get_marker(), l.get_linestyle()) for l in lines]
    assert len(set(styled)) == len(styled), f"two lines look alike in {ax.get_title()!r}: {styled}"
    marked = [(to_hex(l.get_color()), l.get_marker()) for l in lines if not _no_marker(l)]
    assert len(set(marked)) == len(marked), f"(colour, marker) repeats in {ax.get_title()!r}"
    if lines or ax.images or ax.patches:
      assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), f"unlabelled axes {ax.get_title()!r}"
    for axis, label, scale in (("x", ax.get_xlabel(), ax.get_xscale()),
                               ("y", ax.get_ylabel(), ax.get_yscale())):
      if scale == "linear" and any(w in label.lower() for w in COUNT_WORDS):
        locator = getattr(ax, f"{axis}axis").get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer, (  # pylint: disable=protected-access
            f"{axis} axis {label!r} needs integer ticks")
    legend = ax.get_legend()
    if legend is not None:
      assert min(t.get_fontsize() for t in legend.get_texts()) >= 7, "legend text below 7 pt"
      anchor = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
      # Right of, above or below the axes.
      outside = anchor.x0 >= 1.0 - 1e-9 or anchor.y0 >= 1.0 - 1e-9 or anchor.y1 <= 0.0
      # Inside the axes only at matplotlib's least-covering place, and see-through.
      assert outside or (legend._loc == 0 and legend.get_frame().get_alpha() < 1), (  # pylint: disable=protected-access
          f"legend of {ax.get_title()!r} may hide data")
  for legend in figure.legends:
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 7
    anchor = legend.get_bbox_to_anchor().transformed(figure.transFigure.inverted())
    assert anchor.x0 >= 1.0 - 1e-9, "a figure legend sits right of the panels"


def record(monkeypatch) -> list:
  """The Figures passed to `save_figure` (library and public name) for the rest of the test."""
  figures = []
  save = plotting_src.save_figure

  def keep(figure, path, **kwargs):
    figures.append(figure)
    save(figure, path, **kwargs)

  monkeypatch.setattr(plotting_src, "save_figure", keep)
  monkeypatch.setattr(plotting, "save_figure", keep)
  return figures
