"""Tests for the PNG charts of keras_nd.experiments.plot."""

import json
import os
from unittest import mock

import numpy as np
from absl.testing import parameterized

from keras_nd._keras import tf
from keras_nd.experiments import plot

_BLUE = (31, 119, 180)  # matplotlib's first default colour, "C0"


def _read(path):
  """The PNG at `path` as an (height, width, 3) uint8 array."""
  return tf.io.decode_png(tf.io.read_file(path), channels=3).numpy()


class LineChartTest(tf.test.TestCase, parameterized.TestCase):

  def _chart(self, name="chart.png", series=(("a", [0, 10], [0, 10]),), **kwargs):
    path = os.path.join(self.get_temp_dir(), name)
    plot.line_chart(path, list(series), "title", "x", "y", **kwargs)
    return path

  @parameterized.named_parameters(("default", None), ("small", (400, 300)),
                                  ("odd", (333, 217)), ("tall", (480, 720)))
  def test_chart_has_the_requested_pixel_size(self, size):
    path = self._chart(**({} if size is None else {"size": size}))
    width, height = size or (720, 480)
    self.assertEqual(_read(path).shape, (height, width, 3))

  def test_chart_draws_the_series_where_its_points_are(self):
    path = self._chart(series=[("rises", [0, 5, 10], [0, 5, 10])], size=(400, 300))
    image = _read(path)
    self.assertGreater(len(np.unique(image.reshape(-1, 3), axis=0)), 1)
    # The right half, clear of the legend (upper left): the line rises (larger x, smaller row).
    rows, cols = np.nonzero(np.all(image[:, 200:] == _BLUE, axis=-1))
    self.assertGreater(len(rows), 50)
    self.assertLess(np.corrcoef(cols, rows)[0, 1], -0.9)

  def test_points_are_joined_in_the_order_of_x(self):
    ordered = _read(self._chart("a.png", [("a", [0, 1, 2, 3], [0, 3, 1, 2])]))
    shuffled = _read(self._chart("b.png", [("a", [2, 0, 3, 1], [1, 0, 2, 3])]))
    self.assertAllEqual(ordered, shuffled)

  def test_legend_leaves_the_data_alone_in_the_requested_corner(self):
    # A thick cluster of points in the lower right, where the legend was asked to go: the
    # series' pixels there must stay visible (a legend over them would hide most of them).
    xs = np.linspace(8, 10, 30)
    series = [("corner", xs, np.linspace(0, 2, 30)), ("other", [0, 10], [10, 10])]
    image = _read(self._chart(series=series, legend="lower right", size=(400, 300)))
    lower_right = image[200:280, 280:390]
    self.assertGreater(np.count_nonzero(np.all(lower_right == _BLUE, axis=-1)), 100)

  def test_many_series_get_a_legend_that_fits(self):
    series = [(f"stage{i // 9 + 1}_unit{i % 9 + 1}_out", [0, 1], [i, i + 1]) for i in range(27)]
    self.assertEqual(_read(self._chart(series=series)).shape, (480, 720, 3))

  @parameterized.named_parameters(
      ("no_series", [], "the series are empty"),
      ("empty_series", [("a", [], [])], "series 'a' is empty"),
      ("lengths", [("a", [0, 1, 2], [0, 1])], "'a' .* needs as many ys as xs"),
      ("not_numbers", [("a", [0, "one"], [0, 1])], "'a' .* must hold numbers"),
      ("not_finite", [("a", [0, 1], [0, float("inf")])], "'a' .* must hold finite numbers"),
      ("nested", [("a", [[0, 1]], [[0, 1]])], "'a' .* flat lists"),
      ("not_a_triple", [("a", [0, 1])], r"must be \(label, xs, ys\)"))
  def test_bad_series_are_refused(self, series, message):
    with self.assertRaisesRegex(ValueError, message):
      self._chart("bad.png", series)
    self.assertFalse(os.path.exists(os.path.join(self.get_temp_dir(), "bad.png")))

  @parameterized.named_parameters(("legend", {"legend": "top"}, "legend must be one of"),
                                  ("size", {"size": (720,)}, r"size must be \(width, height\)"),
                                  ("width", {"size": (0, 480)}, "width must be a positive"),
                                  ("height", {"size": (720, 4.5)}, "height must be a positive"))
  def test_bad_settings_are_refused(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      self._chart("bad.png", **kwargs)

  def test_a_failed_write_leaves_the_previous_chart_and_no_temporary_file(self):
    path = self._chart()
    with open(path, "rb") as f:
      before = f.read()

    def half_written(figure, f, **kwargs):
      del figure, kwargs
      f.write(b"\x89PNG partial")
      raise RuntimeError("disk went away")

    with mock.patch("matplotlib.figure.Figure.savefig", half_written):
      with self.assertRaisesRegex(RuntimeError, "disk went away"):
        self._chart(series=[("b", [0, 1], [1, 0])])
      with self.assertRaisesRegex(RuntimeError, "disk went away"):
        self._chart("new.png")
    with open(path, "rb") as f:
      self.assertEqual(f.read(), before)
    self.assertEqual(sorted(os.listdir(self.get_temp_dir())), ["chart.png"])


class AccuracyAgainstTimeTest(tf.test.TestCase, parameterized.TestCase):

  def _curves(self):
    """Curves as distill.run's results.json holds them (pairs read back as lists)."""
    curves = {"ce@0.5": [(0.0, 0.1), (30.0, 0.5), (60.0, 0.7)],
              "kd@0.5": [(0.0, 0.1), (34.0, 0.6), (68.0, 0.8)],
              "nd_ft@0.5/lookahead0": [(40.0, 0.75), (74.0, 0.81)]}
    return json.loads(json.dumps(curves))

  def test_writes_a_chart_of_the_requested_size(self):
    path = os.path.join(self.get_temp_dir(), "time.png")
    plot.accuracy_against_time(path, self._curves(), size=(600, 400))
    image = _read(path)
    self.assertEqual(image.shape, (400, 600, 3))
    self.assertTrue(np.any(np.all(image == _BLUE, axis=-1)))

  def test_target_is_drawn_as_a_line_across_the_axes(self):
    with_target, without = (os.path.join(self.get_temp_dir(), name) for name in ("t.png", "n.png"))
    plot.accuracy_against_time(with_target, self._curves(), target=0.795)
    plot.accuracy_against_time(without, self._curves())

    def dark_rows(path):
      """Rows with dark grey (the target's colour) over more than a third of the width."""
      image = _read(path).astype(int)
      grey = np.all(np.abs(image - 77) < 40, axis=-1)
      return np.count_nonzero(grey.sum(axis=1) > image.shape[1] / 3)

    self.assertEqual(dark_rows(without), 0)
    self.assertGreater(dark_rows(with_target), 0)

  @parameterized.named_parameters(
      ("no_curves", {}, None, "no curves"),
      ("empty_curve", {"kd@0.5": []}, None, "series 'KD \\(k=0.5\\)' is empty"),
      ("not_pairs", {"kd@0.5": [[1.0, 0.5, 3.0]]}, None, "'kd@0.5' .* \\(seconds, accuracy\\)"),
      ("ragged", {"kd@0.5": [[1.0, 0.5], [2.0]]}, None, "'kd@0.5' .* \\(seconds, accuracy\\)"),
      ("not_a_list", {"kd@0.5": None}, None, "'kd@0.5' .* \\(seconds, accuracy\\)"),
      ("target", {"kd@0.5": [[1.0, 0.5]]}, 1.5, r"target must be a number in \[0, 1\]"))
  def test_bad_curves_are_refused(self, curves, target, message):
    path = os.path.join(self.get_temp_dir(), "bad.png")
    with self.assertRaisesRegex(ValueError, message):
      plot.accuracy_against_time(path, curves, target=target)
    self.assertFalse(os.path.exists(path))


if __name__ == "__main__":
  tf.test.main()
