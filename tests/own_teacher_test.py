"""A user's own teacher (not one of the project's ResNets) through the experiments."""

import functools
import json
import os

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import data
from keras_nd._keras import keras, tf
from keras_nd.experiments import data_free, distill, harness, sparsify, student_search, thresholding

L = keras.layers


@functools.lru_cache(maxsize=None)
def _dataset():
  return data.get("embedded", num_train=96, num_test=32, num_validation=32)


@functools.lru_cache(maxsize=None)
def _own_teacher_path():
  """The own CNN trained briefly on the standardised training images, saved as .keras."""
  dataset = _dataset()
  teacher = testing.own_cnn(dataset.input_shape, dataset.num_classes)
  x, y = dataset.arrays("train")
  testing.trained(teacher, x, y, epochs=2)
  nd.calibrate_batch_norm(teacher, x)  # as the refusal of a teacher whose statistics lag says
  path = os.path.join(tf.compat.v1.test.get_temp_dir(), "own_cnn.keras")
  teacher.save(path)
  return path


class NarrowableTest(tf.test.TestCase):

  def test_a_plain_chain_is_grouped_and_residual_units_are_kept(self):
    units, note = nd.students.narrowable(testing.own_cnn())
    self.assertEqual([h.name for h in units], ["chain2_relu", "block1_out", "block2_out"])
    self.assertEqual(note, "distilled together (no layer to narrow alone): "
                           "chain1_relu+chain2_relu")
    self.assertEqual([layer.name for layer in nd.students.inner_layers(units[0])],
                     ["chain1_conv"])
    for hood in units:  # every one of them takes a bottleneck
      nd.students.bottleneck(hood, 0.5)

  def test_a_resnet_gives_its_residual_units_as_split_does(self):
    teacher = testing.tiny_resnet()
    units, note = nd.students.narrowable(teacher)
    self.assertEqual([h.name for h in units], [h.name for h in nd.split(teacher)[1:-1]])
    self.assertEqual(note, "")

  def test_a_model_with_nothing_to_narrow_is_named(self):
    with self.assertRaisesRegex(ValueError, "tiny_chain.*narrow"):
      nd.students.narrowable(testing.tiny_chain())


class OwnTeacherExperimentsTest(tf.test.TestCase, parameterized.TestCase):

  def test_distill_runs_every_method_on_the_own_teacher(self):
    workdir = self.get_temp_dir()
    results = distill.run(_dataset(), workdir, distill.Config(
        epochs=dict(ce=1, kd=1, nd=1, ft=1), batch_size=32, verbose=0,
        teacher=_own_teacher_path()))
    self.assertEqual([r["method"] for r in results["rows"]], ["ce", "kd", "nd", "nd_ft"])
    teacher = keras.models.load_model(_own_teacher_path())
    self.assertEqual(results["teacher"]["params"], teacher.count_params())
    self.assertEqual(results["teacher"]["architecture"], f"given:{_own_teacher_path()}")
    self.assertEqual(results["timings"]["teacher"], 0.0)  # not trained here
    self.assertFalse([f for f in os.listdir(workdir) if f.startswith("teacher-")])
    params = {r["method"]: r["params"] for r in results["rows"]}
    # CE's student is the teacher's own architecture narrowed, as KD's and ND's.
    self.assertEqual(len(set(params.values())), 1)
    self.assertLess(params["ce"], teacher.count_params())
    testing.assert_over_whole_split(self, results["rows"][2]["accuracy"], 32)
    # The curves the speed-up is read from score the weights as they are (BatchNorm statistics
    # re-estimated before each evaluation): KD's last point is its row, up to the statistics of
    # the augmented batches its fit ends with.
    kd = next(r for r in results["rows"] if r["method"] == "kd")
    self.assertLess(abs(results["curves"]["kd@0.5"][-1][1] - kd["accuracy"]), 0.1)

  def test_sparsify_keeps_the_own_teachers_first_and_last_layers_dense(self):
    results = sparsify.run(_dataset(), self.get_temp_dir(), sparsify.Config(
        sparsities=(0.5,), epochs=dict(kd=1), batch_size=32, solver="lstsq", verbose=0,
        teacher=_own_teacher_path()))
    self.assertEqual(results["pruning"]["skip"], ["stem_conv", "logits"])
    self.assertNotIn("stem_conv", results["pruning"]["layers"])
    for row in results["rows"]:
      self.assertBetween(row["measured_sparsity"], 0.4, 0.5)

  def test_student_search_and_thresholding_run_on_the_own_teacher(self):
    workdir = self.get_temp_dir()
    search = student_search.run(_dataset(), workdir, student_search.Config(
        multipliers=(0.5, 1.0), drops=(0.5,), uniform=(0.5,), epochs=dict(ft=1), batch_size=32,
        verbose=0, teacher=_own_teacher_path()))
    self.assertEqual(sorted(search["candidates"]), ["block1_out", "block2_out", "chain2_relu"])
    curves = thresholding.run(_dataset(), workdir, thresholding.Config(
        epsilons=(0.0, 0.5), seeds=(0,), weight_epsilons=(0.1,), epochs=dict(nd=1),
        batch_size=32, verbose=0, teacher=_own_teacher_path()))
    self.assertIsNone(curves["regularised_teacher"])  # a given teacher has no noisy twin
    self.assertLen(curves["table4"], 1)
    self.assertIn("No noise-trained teacher", thresholding.table(curves))
    for path in curves["figures"]:
      self.assertTrue(os.path.exists(path), path)
    # The binaries sharing a work directory keep each other's results.
    for name in ("student_search", "thresholding"):
      with open(os.path.join(workdir, f"{name}_results.json")) as f:
        self.assertIn("config", json.load(f))

  def test_data_free_random_students_are_the_own_architecture(self):
    results = data_free.run(_dataset(), self.get_temp_dir(), data_free.Config(
        multipliers=(0.5,), methods=("gnd", "gnkd"), epochs=dict(gnd=1, gnkd=1),
        steps_per_epoch=2, batch_size=16, verbose=0, teacher=_own_teacher_path()))
    params = {r["method"]: r["params"] for r in results["rows"]}
    self.assertEqual(params["gnd"], params["gnkd"])

  def test_a_teacher_trained_on_raw_images_is_refused_with_the_preprocessing_to_pass(self):
    # The teacher reads its class off the raw mean brightness (dark: 0, bright: 1): on
    # standardised images it answers 0 whatever the image.
    rng = np.random.RandomState(0)
    labels = np.arange(64) % 2
    images = (50 + 150 * labels[:, None, None, None] +
              rng.randint(0, 20, (64, 8, 8, 3))).astype("uint8")
    dataset = data.Dataset.from_arrays("bright", (images[:48], labels[:48]),
                                       (images[48:], labels[48:]),
                                       validation=(images[:16], labels[:16]))
    inputs = keras.Input((8, 8, 3))
    x = L.GlobalAveragePooling2D()(inputs)
    dense = L.Dense(2)
    teacher = keras.Model(inputs, dense(x))
    dense.set_weights([np.tile([[-1.0, 1.0]], (3, 1)) / 3, np.array([125.0, -125.0])])
    with self.assertRaisesRegex(ValueError, r"scores 50\.0%.*'standardize'.*100\.0%.*'none'.*"
                                r"--preprocessing=none"):
      harness.Experiment(dataset, self.get_temp_dir(), teacher=teacher)
    raw = dataset.with_preprocessing("none")
    experiment = harness.Experiment(raw, self.get_temp_dir(), teacher=teacher)
    self.assertIs(experiment.teacher(), teacher)
    with self.assertRaisesRegex(ValueError, "no Rescaling or Normalization layer"):
      harness.Experiment(dataset.with_preprocessing("model"), self.get_temp_dir(),
                         teacher=teacher)

  def test_a_teacher_whose_batchnorm_statistics_lag_is_refused_with_the_fix(self):
    # An easy task the teacher learns well, then moving statistics far from its activations'
    # (as Keras's default momentum leaves them after few steps, exaggerated).
    rng = np.random.RandomState(0)
    y = rng.randint(0, 3, 320)
    x = rng.normal(size=(320, 8, 8, 3)).astype("float32") + y[:, None, None, None] * 0.7
    teacher = testing.trained(testing.own_cnn(), x[:256], y[:256], epochs=4)
    nd.calibrate_batch_norm(teacher, x[:256])
    dataset = data.Dataset.from_arrays("easy", (x[:256], y[:256]), (x[256:], y[256:]),
                                       validation=(x[256:], y[256:])).with_preprocessing("none")
    harness.Experiment(dataset, self.get_temp_dir(), teacher=teacher)  # accepted
    for layer in teacher.layers:
      if isinstance(layer, L.BatchNormalization):
        layer.moving_mean.assign(layer.moving_mean + 5.0 * tf.sqrt(layer.moving_variance))
    with self.assertRaisesRegex(ValueError, r"inference mode but .* own BatchNorm statistics.*"
                                r"nd\.calibrate_batch_norm\(teacher, x_train\)"):
      harness.Experiment(dataset, self.get_temp_dir(), teacher=teacher)

  def test_a_teacher_for_other_images_is_named(self):
    other = testing.own_cnn(input_shape=(16, 16, 3), num_classes=10)
    with self.assertRaisesRegex(ValueError, r"own_cnn.*\(16, 16, 3\).*\(32, 32, 3\)"):
      harness.Experiment(_dataset(), self.get_temp_dir(), teacher=other)


if __name__ == "__main__":
  tf.test.main()
