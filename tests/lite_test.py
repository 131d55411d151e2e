"""Tests of keras_nd.lite: LiteRT export, float and quantised, sparse encoding, bad input."""

import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import testing

from keras_nd import _keras, lite, metrics, sparsity
from keras_nd._keras import keras, tf


def _outputs(path, x):
  runner = lite.interpreter(path, batch_size=len(x))
  runner.set_tensor(runner.get_input_details()[0]["index"], x)
  runner.invoke()
  return runner.get_tensor(runner.get_output_details()[0]["index"])


def _zero_smallest(model, fraction, skip):
  """`model` with `fraction` of every kernel but those of `skip` zeroed, smallest first (what
  a pruned student holds; the export only sees its zeros)."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D) and layer.name not in skip:
      kernel, *rest = layer.get_weights()
      threshold = np.quantile(np.abs(kernel), fraction)
      layer.set_weights([np.where(np.abs(kernel) <= threshold, 0.0, kernel)] + rest)
  return model


class ExportTest(tf.test.TestCase):
  """One float, one dynamic-range and one int8 export of a tiny ResNet, shared."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.directory = tempfile.mkdtemp(prefix="lite_test_")
    cls.model = testing.randomize_batch_norm(testing.tiny_resnet())
    x, cls.y = testing.images(128)
    cls.x = x.astype(np.float32)
    # Calibrated on a dataset of single (image, label) pairs, which the export batches itself.
    representative = tf.data.Dataset.from_tensor_slices((cls.x[:64], cls.y[:64]))
    cls.paths = {q: lite.export_tflite(cls.model, os.path.join(cls.directory, f"{q}.tflite"),
                                       quantize=q, representative=representative)
                 for q in lite.QUANTIZE}
    cls.keras_outputs = cls.model(cls.x).numpy()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.directory)
    super().tearDownClass()

  def test_float_export_gives_the_keras_models_outputs(self):
    outputs = _outputs(self.paths[None], self.x)
    self.assertAllClose(outputs, self.keras_outputs, atol=1e-5, rtol=1e-5)
    self.assertAllClose(_outputs(self.paths[None], self.x[:1]), self.keras_outputs[:1],
                        atol=1e-5, rtol=1e-5)

  def test_quantised_exports_keep_most_top1_predictions_and_are_smaller(self):
    # Quantisation rounds weights (and, for int8, activations) to 1/255 of their range: the
    # logits move by a few percent of their range (measured: 1% dynamic, 3% int8, of these
    # random images' logit range of 7) and an image whose top two logits are closer than that
    # may change class (0.4% dynamic, 3% int8 measured). A quantisation that went wrong (wrong
    # ranges, a scale of the wrong tensor) moves them by the whole range.
    spread = np.ptp(self.keras_outputs)
    for quantize in ("dynamic", "int8"):
      outputs = _outputs(self.paths[quantize], self.x)
      agree = np.mean(outputs.argmax(-1) == self.keras_outputs.argmax(-1))
      self.assertGreaterEqual(agree, 0.9, quantize)
      self.assertLess(np.abs(outputs - self.keras_outputs).max(), 0.1 * spread, quantize)
      self.assertLess(os.path.getsize(self.paths[quantize]),
                      0.35 * os.path.getsize(self.paths[None]), quantize)

  def test_int8_export_is_full_integer_with_float_input_and_output(self):
    runner = lite.interpreter(self.paths["int8"])
    self.assertEqual(runner.get_input_details()[0]["dtype"], np.float32)
    self.assertEqual(runner.get_output_details()[0]["dtype"], np.float32)
    counts = lite.op_counts(self.paths["int8"])
    self.assertEqual((counts.get("QUANTIZE"), counts.get("DEQUANTIZE")), (1, 1))
    kernels = [t for t in runner.get_tensor_details() if "Conv2D" in t["name"]
               and len(t["shape"]) == 4 and t["shape"][0] > 3]
    self.assertNotEmpty(kernels)
    self.assertTrue(all(t["dtype"] == np.int8 for t in kernels), kernels)

  def test_a_dense_model_is_not_sparse_encoded(self):
    self.assertNotIn("DENSIFY", lite.op_counts(self.paths[None]))

  def test_evaluate_tflite_equals_the_keras_models_accuracy(self):
    expected = metrics.accuracy(self.model, (self.x, self.y))
    # A batch size that does not divide the examples: the last batch resizes the interpreter.
    self.assertEqual(lite.evaluate_tflite(self.paths[None], (self.x, self.y), batch_size=50),
                     expected)
    dataset = testing.dataset(self.x, self.y, batch_size=32)
    self.assertEqual(lite.evaluate_tflite(self.paths[None], dataset), expected)


class SparseExportTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.directory = tempfile.mkdtemp(prefix="lite_test_")
    cls.model = _zero_smallest(testing.randomize_batch_norm(testing.tiny_resnet()), 0.5,
                               skip=("stem_conv",))
    cls.pruned = sum(isinstance(layer, keras.layers.Conv2D) for layer in cls.model.layers) - 1

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.directory)
    super().tearDownClass()

  def _export(self, name, **kwargs):
    return lite.export_tflite(self.model, os.path.join(self.directory, name), **kwargs)

  def test_sparse_encoding_shrinks_a_pruned_students_float_file_to_the_same_outputs(self):
    sparse, dense = self._export("sparse.tflite"), self._export("dense.tflite", sparse=False)
    # Each pruned kernel stored compressed, expanded by one DENSIFY op when the model loads:
    # a non-zero float costs its 4 bytes and a 1-byte channel index, a zero nothing, so half
    # the kernel costs about 0.65 of it (the stem and the classifier stay dense).
    self.assertEqual(lite.op_counts(sparse).get("DENSIFY"), self.pruned)
    self.assertNotIn("DENSIFY", lite.op_counts(dense))
    self.assertLess(os.path.getsize(sparse), 0.75 * os.path.getsize(dense))
    x = testing.images(8)[0].astype(np.float32)
    self.assertAllClose(_outputs(sparse, x), _outputs(dense, x), atol=1e-6, rtol=1e-6)

  def test_dynamic_range_export_keeps_sparse_kernels_dense_so_it_loads(self):
    # A densified dynamic-range kernel fails XNNPACK's preparation; the export leaves it dense.
    path = self._export("dynamic.tflite", quantize="dynamic")
    self.assertNotIn("DENSIFY", lite.op_counts(path))
    self.assertEqual(_outputs(path, np.zeros((1, 8, 8, 3), np.float32)).shape, (1, 3))


class BadInputTest(tf.test.TestCase):
  """Every refusal comes before anything is written: a file at the path stays as it was."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = testing.tiny_chain()

  def setUp(self):
    super().setUp()
    self.path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "model.tflite")

  def assert_refused(self, error, pattern, model=None, **kwargs):
    with self.assertRaisesRegex(error, pattern):
      lite.export_tflite(self.model if model is None else model, self.path, **kwargs)
    self.assertFalse(os.path.exists(self.path))
    self.assertEqual(os.listdir(os.path.dirname(self.path)), [])

  def test_refuses_an_unknown_quantize(self):
    self.assert_refused(ValueError, r"quantize must be one of \[None, 'dynamic', 'int8'\]; got "
                        "'float16'", quantize="float16")

  def test_int8_needs_representative_images(self):
    self.assert_refused(ValueError, "representative", quantize="int8")

  def test_refuses_a_non_finite_representative_set_naming_it(self):
    x = testing.images(16)[0].astype(np.float32)
    x[5, 1, 2, 0] = np.nan
    x[9, 0, 0, 1] = np.inf
    self.assert_refused(ValueError, "representative holds 2 non-finite values.*image 5",
                        quantize="int8", representative=x)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(16))).batch(4)
    self.assert_refused(ValueError, "representative holds 1 non-finite values.*image 5",
                        quantize="int8", representative=dataset)

  def test_refuses_a_representative_set_of_another_shape_naming_both(self):
    channels_first = np.zeros((4, 3, 8, 8), np.float32)
    self.assert_refused(ValueError, r"\(3, 8, 8\).*takes images of shape \(8, 8, 3\)",
                        quantize="int8", representative=channels_first)
    self.assert_refused(ValueError, r"\(8, 8\).*\(8, 8, 3\)", quantize="int8",
                        representative=np.zeros((4, 8, 8), np.float32))

  def test_refuses_what_is_not_a_model_naming_its_type(self):
    self.assert_refused(TypeError, "functional Model.*type ndarray", model=np.zeros(3))

  def test_a_keras_3_model_is_exported_through_its_conversion(self):
    keras3 = _keras.keras3()
    keras3.utils.set_random_seed(0)
    inputs = keras3.Input((8, 8, 3))
    x = keras3.layers.Conv2D(4, 3, activation="relu6")(inputs)
    outputs = keras3.layers.Dense(3)(keras3.layers.GlobalAveragePooling2D()(x))
    model = keras3.Model(inputs, outputs)
    path = lite.export_tflite(model, os.path.join(self.get_temp_dir(), "k3.tflite"))
    x = np.random.RandomState(0).rand(4, 8, 8, 3).astype(np.float32)
    runner = lite.interpreter(path, batch_size=4)
    runner.set_tensor(runner.get_input_details()[0]["index"], x)
    runner.invoke()
    got = runner.get_tensor(runner.get_output_details()[0]["index"])
    self.assertAllClose(got, model(x).numpy(), atol=1e-5)

  def test_refuses_a_model_of_two_inputs(self):
    self.assert_refused(ValueError, "2 inputs", model=testing.two_inputs())

  def test_refuses_pruning_wrappers_short_of_their_target(self):
    self.assert_refused(ValueError, "Pruning has not reached its target: .*'c1_s' at 0.0%",
                        model=sparsity.prune(self.model, 0.5))

  def test_a_failed_export_leaves_the_file_already_at_path_as_it_was(self):
    with open(self.path, "w") as f:
      f.write("previous")
    with self.assertRaisesRegex(ValueError, "non-finite"):
      lite.export_tflite(self.model, self.path, quantize="int8",
                         representative=np.full((2, 8, 8, 3), np.inf, np.float32))
    with mock.patch.object(lite.litert, "Interpreter", side_effect=RuntimeError("no kernel")):
      with self.assertRaisesRegex(RuntimeError, "does not load.*no kernel"):
        lite.export_tflite(self.model, self.path)
    with open(self.path) as f:
      self.assertEqual(f.read(), "previous")
    self.assertEqual(os.listdir(os.path.dirname(self.path)), ["model.tflite"])


if __name__ == "__main__":
  tf.test.main()
