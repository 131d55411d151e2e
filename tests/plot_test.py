"""Tests for the PNG line charts of keras_nd.experiments.plot."""

import os

import numpy as np

from keras_nd._keras import tf
from keras_nd.experiments import plot


class PlotTest(tf.test.TestCase):

  def test_png_round_trip(self):
    image = np.random.RandomState(0).randint(0, 256, size=(7, 5, 3)).astype(np.uint8)
    path = os.path.join(self.get_temp_dir(), "x.png")
    plot.write_png(path, image)
    self.assertAllEqual(plot.read_png(path), image)

  def test_chart_draws_each_series_in_its_colour_where_its_points_are(self):
    path = os.path.join(self.get_temp_dir(), "chart.png")
    plot.line_chart(path, [("a", [0, 10], [0, 10]), ("b", [0, 10], [10, 0])], "title", "x", "y",
                    size=(400, 300))
    image = plot.read_png(path)
    self.assertEqual(image.shape, (300, 400, 3))
    a, b = plot.COLOURS[0], plot.COLOURS[1]
    rows_a, cols_a = np.nonzero(np.all(image == a, axis=-1))
    rows_b, cols_b = np.nonzero(np.all(image == b, axis=-1))
    self.assertNotEmpty(rows_a)
    self.assertNotEmpty(rows_b)
    # Series a rises (larger x, smaller row), series b falls: check by correlation, legend aside.
    plot_area = cols_a > 150
    self.assertLess(np.corrcoef(cols_a[plot_area], rows_a[plot_area])[0, 1], -0.9)
    plot_area = cols_b > 150
    self.assertGreater(np.corrcoef(cols_b[plot_area], rows_b[plot_area])[0, 1], 0.9)

  def test_text_is_drawn_in_ink(self):
    canvas = np.full((20, 60, 3), 255, np.uint8)
    plot.draw_text(canvas, "k=0.5", 0, 0)
    self.assertGreater(np.count_nonzero(np.all(canvas == (30, 30, 30), axis=-1)), 20)
    self.assertEqual(plot.text_width("k=0.5"), 40)

  def test_empty_series_are_refused(self):
    with self.assertRaisesRegex(ValueError, "empty"):
      plot.line_chart(os.path.join(self.get_temp_dir(), "e.png"), [("a", [], [])], "", "", "")


if __name__ == "__main__":
  tf.test.main()
