"""The experiments' figures: line charts written as PNG files with matplotlib.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot,
so no global figure state and no display needed). Every chart is `size`
pixels exactly. Its legend never covers a line or a marker: it goes where it
was asked to if the data leaves room there, else where matplotlib finds room
inside the axes, else to the right of the axes.
"""

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keras_nd import _checks, files

__all__ = ["accuracy_against_time", "line_chart"]

_LEGEND_LOCATIONS = ("best", "upper right", "upper left", "lower left", "lower right", "right",
                    "center left", "center right", "lower center", "upper center", "center")
_DPI = 100
_MARKER_SIZE = 4  # points
_LINE_STYLES = ("-", "--", ":", "-.")
_METHODS = {"ce": "CE", "kd": "KD", "nd": "ND", "nd_ft": "ND+FT"}


def line_chart(path, series, title, xlabel, ylabel, size=(720, 480), legend="upper left"):
  """Writes a PNG line chart, atomically (a file at `path` is always a whole chart).

  Args:
    path: the file to write.
    series: [(label, xs, ys)]; each is drawn as a line through its points
      sorted by x, with round markers, in matplotlib's default colours.
    title: the chart's title.
    xlabel: the x axis's label.
    ylabel: the y axis's label.
    size: (width, height) of the PNG in pixels.
    legend: where the legend goes inside the axes, a matplotlib location
      ("upper left", "lower right", "best", "center right", ...); where it
      would cover the data there it goes elsewhere (see the module's
      docstring).

  Raises:
    ValueError: no series, a series with no points, with xs and ys of
      different lengths or with values that are not finite numbers, a bad
      size or an unknown legend location.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "chart.png")
    >>> line_chart(path, [("a", [0, 1, 2], [1, 4, 9])], "Squares", "x", "x squared")
    >>> os.path.getsize(path) > 0
    True
  """
  _write(path, _chart(path, series, title, xlabel, ylabel, size, legend))


def accuracy_against_time(path, curves, target=None,
                          title="Test accuracy against training time", size=(720, 480)):
  """Writes a PNG of accuracy against training seconds, one line per method.

  Args:
    path: the file to write.
    curves: {name: [(training seconds, accuracy in [0, 1])]}, as the
      "curves" of distill.run's results ("ce@0.5", "kd@0.5",
      "nd_ft@0.5/lookahead0", ...; pairs may be lists, as JSON reads them).
      Names of that form are labelled "CE (k=0.5)", "ND+FT (k=0.5,
      look-ahead 2)", ...; others are used as they are.
    target: an accuracy in [0, 1] (as distill.run's speedup "target", the
      accuracy KD must reach) drawn as a dashed horizontal line; None for none.
    title: the chart's title.
    size: (width, height) of the PNG in pixels.

  Raises:
    ValueError: no curves, a curve with no points or with points that are
      not (seconds, accuracy) pairs, or a target that is not a number in
      [0, 1].
  """
  if not curves:
    raise ValueError(f"Nothing to plot in '{path}': no curves.")
  series = []
  for name, points in curves.items():
    try:
      pairs = np.asarray(points, float).reshape(-1, 2) if len(points) else np.zeros((0, 2))
      if len(pairs) != len(points):
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f"Curve {name!r} for '{path}' must be a list of (seconds, accuracy) "
                       f"pairs; got {points!r}.") from None
    series.append((_method_label(name), pairs[:, 0], 100 * pairs[:, 1]))
  if target is not None:
    target = _checks.number(target, "target", 0, 1, context=f"'{path}': ")
  figure = _chart(path, series, title, "training seconds", "test accuracy %", size, "lower right",
                  target=None if target is None else (100 * target, f"target {100 * target:.2f}%"))
  _write(path, figure)


def _method_label(name):
  """'nd_ft@0.5/lookahead2' -> 'ND+FT (k=0.5, look-ahead 2)'; other names unchanged."""
  method, at, rest = str(name).partition("@")
  if not at or method not in _METHODS:
    return str(name)
  multiplier, _, variant = rest.partition("/lookahead")
  settings = [f"k={multiplier}"] + ([f"look-ahead {variant}"] if variant not in ("", "0") else [])
  return f"{_METHODS[method]} ({', '.join(settings)})"


def _points(path, series):
  """The series as [(label, xs, ys)] of float arrays, sorted by x; ValueError naming a bad one."""
  if not series:
    raise ValueError(f"Nothing to plot in '{path}': the series are empty.")
  checked = []
  for entry in series:
    if len(entry) != 3:
      raise ValueError(f"Each series for '{path}' must be (label, xs, ys); got {entry!r}.")
    label, xs, ys = entry
    try:
      xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    except (TypeError, ValueError):
      raise ValueError(f"Series {label!r} for '{path}' must hold numbers; got xs={xs!r}, "
                       f"ys={ys!r}.") from None
    if xs.ndim != 1 or xs.shape != ys.shape:
      raise ValueError(f"Series {label!r} for '{path}' needs as many ys as xs, in flat lists; "
                       f"got xs of shape {xs.shape} and ys of shape {ys.shape}.")
    if not xs.size:
      raise ValueError(f"Nothing to plot in '{path}': series {label!r} is empty.")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
      raise ValueError(f"Series {label!r} for '{path}' must hold finite numbers; got xs={xs}, "
                       f"ys={ys}.")
    order = np.argsort(xs, kind="stable")
    checked.append((str(label), xs[order], ys[order]))
  return checked


def _chart(path, series, title, xlabel, ylabel, size, legend, target=None):
  """The Figure of a line chart; `target` is (y, label) of a dashed horizontal line, or None."""
  if legend not in _LEGEND_LOCATIONS:
    raise ValueError(f"legend must be one of {list(_LEGEND_LOCATIONS)}; got {legend!r}.")
  if np.ndim(size) != 1 or len(size) != 2:
    raise ValueError(f"size must be (width, height) in pixels; got {size!r}.")
  width, height = (_checks.integer(v, name, context=f"'{path}': ")
                   for v, name in zip(size, ("width", "height")))
  series = _points(path, series)
  figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for i, (label, xs, ys) in enumerate(series):
    # Past the ten default colours, the line style tells series of one colour apart.
    axes.plot(xs, ys, marker="o", markersize=_MARKER_SIZE, linewidth=1.5, label=label,
              linestyle=_LINE_STYLES[i // 10 % len(_LINE_STYLES)])
  if target is not None:
    axes.axhline(target[0], color="0.3", linestyle="--", linewidth=1, label=target[1])
  axes.set_title(title, fontsize=12)
  axes.set_xlabel(xlabel, fontsize=11)
  axes.set_ylabel(ylabel, fontsize=11)
  axes.tick_params(labelsize=10)
  axes.grid(True, color="0.9")
  _place_legend(figure, axes, legend)
  return figure


def _place_legend(figure, axes, location):
  """The legend at `location`, or matplotlib's best place, where it fits and covers no line or
  marker; else to the right of the axes (the layout then narrows the axes to make room)."""
  figure.canvas.draw()  # lays the axes out as they are without a legend
  room = axes.get_window_extent().height
  renderer = figure.canvas.get_renderer()
  for loc in dict.fromkeys((location, "best")):
    box = axes.legend(loc=loc, fontsize=9, framealpha=0.9)
    if box.get_window_extent(renderer).height < room:
      figure.canvas.draw()
      if not _covers_data(axes, box.get_window_extent()):
        return
    box.remove()
  outside = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9)
  box = axes.legend(**outside)
  columns = math.ceil(box.get_window_extent(renderer).height / room)
  if columns > 1:  # many entries (a deep teacher's units): more columns, not off the figure
    box.remove()
    axes.legend(ncols=columns, **outside)


def _covers_data(axes, box):
  """Whether the display-space Bbox `box` meets any line of `axes`, or comes within a marker."""
  margin = _MARKER_SIZE * _DPI / 72
  box = box.padded(margin)
  return any(line.get_transform().transform_path(line.get_path()).intersects_bbox(box, False)
             for line in axes.get_lines())


def _write(path, figure):
  """Saves `figure` as PNG to `path` through a temporary file renamed once complete."""
  with files.atomic(path, "wb") as f:
    figure.savefig(f, format="png", dpi=_DPI)
