"""Tests of the experiments' TensorBoard logs (keras_nd/experiments/board.py)."""

import importlib.util
import os
import pathlib
from unittest import mock

import testing

from keras_nd._keras import keras, tf
from keras_nd.experiments import board as board_module
from keras_nd.experiments import common
from keras_nd.experiments.board import Board, accuracies


class BoardTest(tf.test.TestCase):

  def test_off_writes_nothing(self):
    off = Board(None)
    self.assertEqual(off.callbacks("kd-k0.5"), [])
    off.curve("kd-k0.5", [(1.0, 0.5)], [0])
    off.solve("nd", {"unit": {"layers": {"conv": {"error_after": 0.1}}}})
    off.summary({"timings": {"teacher": 1.0}})
    on = Board(self.get_temp_dir())
    self.assertEqual(on.callbacks(None), [])  # a training of no phase logs nothing either
    self.assertEqual(os.listdir(self.get_temp_dir()), [])

  def test_keras_callback_per_phase_without_costly_extras(self):
    directory = self.get_temp_dir()
    [callback] = Board(directory, prefix="unit_noise0.1/").callbacks("teacher")
    self.assertIsInstance(callback, keras.callbacks.TensorBoard)
    self.assertEqual(callback.log_dir, os.path.join(directory, "unit_noise0.1", "teacher"))
    self.assertEqual((callback.histogram_freq, callback.write_graph, callback.update_freq),
                     (0, False, "epoch"))

  def test_numbers_of_nested_values_become_scalars(self):
    directory = self.get_temp_dir()
    logs = Board(directory)
    logs.summary({"timings": {"teacher": 2.5, "nd_losses@0.5": {"unit1": 0.25}},
                  "accuracy": {"kd@0.5": 0.75}, "speedup": {"ratio": None, "note": "x",
                                                            "stopped": True,
                                                            "bad": float("nan")}})
    logs.curve("ft", [(3.4, 0.5), (7.6, 0.75)], [-1, 0])  # before training, then an epoch
    logs.solve("nd", {"unit1": {"layers": {"conv_s": {"error_before": None, "error_after": 0.5,
                                                      "features": 27}},
                                "loss_after": 0.125}})
    self.assertEqual(testing.tensorboard_logs(directory), {
        "summary": {"timings/teacher": {0: 2.5}, "timings/nd_losses@0.5/unit1": {0: 0.25},
                    "accuracy/kd@0.5": {0: 0.75}},
        "ft/test": {"accuracy_vs_seconds": {3: 0.5, 8: 0.75}, "epoch_accuracy": {0: 0.75},
                    "epoch_seconds": {0: tf.constant(7.6).numpy().item()}},
        "nd/solve": {"unit1/conv_s/error_after": {0: 0.5}, "unit1/loss_after": {0: 0.125}}})

  def test_accuracies_are_named_by_method_and_settings(self):
    rows = [{"method": "ce", "multiplier": 0.5, "accuracy": 0.5},
            {"method": "nd_ft", "multiplier": 1.0, "lookahead": 2, "accuracy": 0.75},
            {"method": "budgeted", "multiplier": 12345678, "accuracy": 0.25}]
    self.assertEqual(accuracies(0.875, rows, "multiplier", "lookahead"),
                     {"teacher": 0.875, "ce@0.5": 0.5, "nd_ft@1/lookahead2": 0.75,
                      "budgeted@12345678": 0.25})

  def test_a_configuration_holds_the_directory_as_a_path(self):
    self.assertEqual(common.Settings(tensorboard=pathlib.Path("logs")).tensorboard, "logs")
    with self.assertRaisesRegex(TypeError, "tensorboard must be a directory's path.*int"):
      common.Settings(tensorboard=42)

  def test_a_missing_tensorboard_package_is_named(self):
    found = importlib.util.find_spec
    with mock.patch.object(board_module.importlib.util, "find_spec",
                           lambda name: None if name == "tensorboard" else found(name)):
      with self.assertRaisesRegex(ImportError, "pip install tensorboard.*--tensorboard="):
        Board("logs")
      self.assertIsNone(Board(None).directory)  # off needs no package


if __name__ == "__main__":
  tf.test.main()
