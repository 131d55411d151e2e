"""Tests of the data-free experiment (examples/data_free.py's logic)."""

import dataclasses
import functools
import json
import os
import tempfile

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import data, files
from keras_nd._keras import keras, tf
from keras_nd.experiments import catalogue, data_free

_TINY = dict(teacher=1, ce=1, gnd=1, ft=1, gnkd=1)


def _config(**kwargs):
  return data_free.Config(**dict(dict(model="resnet8", epochs=_TINY, steps_per_epoch=2,
                                      batch_size=16, verbose=0), **kwargs))


class _TrainingSplitRead(Exception):
  pass


class _TestSplitOnly:
  """A dataset whose every split but the test split raises when read; it records what is asked."""

  def __init__(self, dataset):
    self._dataset = dataset
    self.asked = []

  def __getattr__(self, name):
    return getattr(self._dataset, name)

  def pipeline(self, split, batch_size, **kwargs):
    self.asked.append(split)
    if split == "test":
      return self._dataset.pipeline(split, batch_size, **kwargs)

    def read():
      raise _TrainingSplitRead(f"the {split} split was read")
      yield  # pylint: disable=unreachable

    # The same element spec as the real split, so that only iterating it can fail.
    spec = self._dataset.pipeline(split, batch_size, **kwargs).element_spec
    return tf.data.Dataset.from_generator(read, output_signature=spec)


@functools.lru_cache(maxsize=None)
def _teacher_path():
  """A resnet8 teacher trained for one epoch on the embedded data, saved once."""
  dataset = data.get("embedded", num_train=64, num_test=32, num_validation=16)
  keras.utils.set_random_seed(0)
  teacher = catalogue.build_model("resnet8", dataset.input_shape, dataset.num_classes)
  teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  teacher.fit(dataset.pipeline("train", 16, training=True), epochs=1, verbose=0)
  path = os.path.join(tempfile.mkdtemp(), "teacher.keras")
  teacher.save(path)
  return path


class DataFreeExperimentTest(tf.test.TestCase, parameterized.TestCase):

  def _dataset(self):
    return data.get("embedded", num_train=64, num_test=32, num_validation=16)

  def test_every_method_runs_and_writes_results(self):
    workdir = self.get_temp_dir()
    # The exact solver, its losses measured as the untrained students' below.
    board = os.path.join(workdir, "tensorboard")
    config = _config(multipliers=(0.5,), steps_per_epoch=4, solver="lstsq", tensorboard=board)
    results = data_free.run(self._dataset(), workdir, config)
    with open(os.path.join(workdir, "data_free_results.json")) as f:
      written = json.load(f)
    self.assertEqual(written["rows"], results["rows"])
    self.assertEqual(written["config"], json.loads(json.dumps(dataclasses.asdict(config))))
    # G-ND learnt from noise alone: each unit's student is nearer its teacher unit than the
    # same student untrained, on fresh noise.
    [teacher] = [f for f in os.listdir(workdir) if f.startswith("teacher-") and
                 f.endswith(".keras")]
    runner = data_free.DataFree(files.load_model(os.path.join(workdir, teacher)),
                                (32, 32, 3), 10, None, config)
    for k in (0.5,):
      untrained = nd.NeighbourhoodDistiller(runner.students(k), calibrate_steps=0)
      untrained.compile()
      noise = nd.ActivationSource.from_noise(runner.teacher, runner.units, 4, seed=1,
                                             mean="teacher")
      before = untrained.evaluate(noise.dataset(16), verbose=0, return_dict=True)
      for unit, loss in results["timings"][f"gnd_losses@{k:g}"].items():
        self.assertLess(loss, float(before[f"{unit}_loss"]), msg=(k, unit))
    self.assertEqual([(r["method"], r["multiplier"]) for r in results["rows"]],
                     [(m, 0.5) for m in data_free.METHODS])
    for row in results["rows"]:
      testing.assert_over_whole_split(self, row["accuracy"], 32)  # the test split
      self.assertGreater(row["seconds"], 0.0)
    for k in (0.5,):  # fine-tuning starts from the G-ND student of the same width
      gnd, gnd_ft = ([r for r in results["rows"] if r["method"] == m and r["multiplier"] == k][0]
                     for m in ("gnd", "gnd_ft"))
      self.assertEqual(gnd_ft["accuracy_before_ft"], gnd["accuracy"])
    self.assertIsNone(results["config"]["teacher"])
    self.assertIn("teacher", results["timings"])
    text = data_free.table(results)
    for label in ("Table 3b", "CE (with data)", "G-ND", "G-ND+FT", "GN-KD", "teacher"):
      self.assertIn(label, text)
    # TensorBoard: G-ND's solve, each fit's epochs (KD on noise has no labels: its soft loss),
    # the timings and accuracies.
    logs = testing.tensorboard_logs(board)
    for k in ("0.5",):
      self.assertTrue(any(tag.endswith("/error_after") for tag in logs[f"gnd-k{k}/solve"]))
      for run in (f"gnd_ft-k{k}/train", f"gnkd-k{k}/train"):
        self.assertEqual(sorted(logs[run]["epoch_soft_loss"]), [0], msg=run)
      self.assertIn("epoch_accuracy", logs[f"ce-k{k}/validation"])
      self.assertAlmostEqual(logs["summary"][f"timings/gnd@{k}"][0],
                             results["timings"][f"gnd@{k}"], places=4)
    for row in results["rows"]:
      self.assertAlmostEqual(logs["summary"][f"accuracy/{row['method']}@{row['multiplier']:g}"][0],
                             row["accuracy"], places=6)

  @parameterized.named_parameters(("teacher_noise_random_students", "teacher", "random"),
                                  ("standard_noise_teacher_students", "standard", "teacher"))
  def test_data_free_methods_never_read_the_training_split(self, noise, student_init):
    guarded = _TestSplitOnly(self._dataset())
    results = data_free.run(guarded, self.get_temp_dir(),
                            _config(multipliers=(0.5,), methods=("gnd", "gnd_ft", "gnkd"),
                                    teacher=_teacher_path(), noise=noise,
                                    student_init=student_init))
    self.assertEqual(set(guarded.asked), {"test"})
    self.assertLen(results["rows"], 3)
    self.assertEqual(results["config"]["teacher"], _teacher_path())

  def test_students_solved_from_noise_beat_gradient_steps_on_noise(self):
    # The exact solver from one epoch of noise, no data: its students' neighbourhood losses on
    # fresh noise are below two epochs of gradient G-ND's.
    losses = {}
    board = os.path.join(self.get_temp_dir(), "tensorboard")
    for solver in ("lstsq", "gradient"):
      results = data_free.run(self._dataset(), self.get_temp_dir(),
                              _config(multipliers=(0.5,), methods=("gnd",),
                                      teacher=_teacher_path(), student_init="teacher",
                                      epochs=dict(_TINY, gnd=2), steps_per_epoch=4,
                                      solver=solver, tensorboard=f"{board}-{solver}"))
      self.assertEqual(results["config"]["solver"], solver)
      losses[solver] = results["timings"]["gnd_losses@0.5"]
    self.assertLess(sum(losses["lstsq"].values()), sum(losses["gradient"].values()))
    # Gradient G-ND: Keras's callback logs each unit's own loss, each epoch.
    logs = testing.tensorboard_logs(f"{board}-gradient")["gnd-k0.5/train"]
    for unit, loss in losses["gradient"].items():
      self.assertEqual(sorted(logs[f"epoch_{unit}_loss"]), [0, 1])
      self.assertAlmostEqual(logs[f"epoch_{unit}_loss"][1], loss, places=5)

  def test_the_guard_catches_a_read_of_the_training_split(self):
    # The reference method reads the data: the guard must stop it, or it proves nothing above.
    guarded = _TestSplitOnly(self._dataset())
    with self.assertRaises(Exception) as raised:
      data_free.run(guarded, self.get_temp_dir(),
                    _config(multipliers=(0.5,), methods=("ce",), teacher=_teacher_path()))
    self.assertIn("split was read", str(raised.exception))

  def test_with_teacher_init_a_full_width_student_starts_as_the_teacher(self):
    teacher = files.load_model(_teacher_path())
    dataset = self._dataset()
    runner = data_free.DataFree(teacher, dataset.input_shape, dataset.num_classes,
                                dataset.pipeline("test", 16),
                                _config(student_init="teacher", verbose=1))
    student = runner.students(1.0)
    x = next(iter(dataset.pipeline("test", 16)))[0]
    for hood, model in student.items():
      a = keras.Model(teacher.input, hood.input_tensor)(x)
      self.assertAllClose(model(a), hood.teacher(a), atol=1e-5)

  def test_kd_on_noise_keeps_batch_norm_statistics_and_trains_the_rest(self):
    teacher = files.load_model(_teacher_path())
    dataset = self._dataset()
    runner = data_free.DataFree(teacher, dataset.input_shape, dataset.num_classes,
                                dataset.pipeline("test", 16),
                                _config(steps_per_epoch=3, batch_size=8, verbose=1))
    keras.utils.set_random_seed(1)
    student = catalogue.build_model("resnet8", dataset.input_shape, dataset.num_classes, 0.5)
    bns = [layer for layer in student.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    statistics = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in bns]
    kernels = [layer.kernel.numpy() for layer in student.layers
               if isinstance(layer, keras.layers.Conv2D)]
    runner.kd_on_noise(student, epochs=1, learning_rate=1e-2)
    for bn, (mean, variance) in zip(bns, statistics):
      self.assertAllEqual(bn.moving_mean, mean)
      self.assertAllEqual(bn.moving_variance, variance)
      self.assertTrue(bn.trainable)  # restored
    after = [layer.kernel.numpy() for layer in student.layers
             if isinstance(layer, keras.layers.Conv2D)]
    self.assertTrue(all(not np.array_equal(a, b) for a, b in zip(after, kernels)))

  def test_noise_images_are_standard_normal_and_reproducible(self):
    images = data_free.noise_images((8, 8, 3), 64, 3, seed=5)
    batches = [b.numpy() for b in images]
    self.assertLen(batches, 3)
    self.assertEqual(batches[0].shape, (64, 8, 8, 3))
    values = np.concatenate(batches).ravel()
    self.assertAllClose([values.mean(), values.std()], [0.0, 1.0], atol=0.03)
    self.assertAllEqual(batches[1], list(data_free.noise_images((8, 8, 3), 64, 3, seed=5))[1])
    self.assertNotAllEqual(batches[0], batches[1])

  @parameterized.named_parameters(
      ("unknown_method", dict(methods=("gnd", "kd")), ValueError, "kd"),
      ("multiplier_zero", dict(multipliers=(0.0,)), ValueError, "0.0"),
      ("multiplier_above_one", dict(multipliers=(1.5,)), ValueError, "1.5"),
      ("unknown_noise", dict(noise="uniform"), ValueError, "uniform"),
      ("unknown_init", dict(student_init="zeros"), ValueError, "zeros"),
      ("bad_steps", dict(steps_per_epoch=0), ValueError, "steps_per_epoch"),
      ("teacher_not_a_path", dict(teacher=42), TypeError, "path of a .keras file.*int"),
      ("teacher_missing", dict(teacher="missing/teacher.keras"), FileNotFoundError,
       "missing/teacher.keras"))
  def test_bad_arguments_are_named(self, kwargs, error, fragment):
    kwargs = dict(dict(methods=("gnd",), teacher=_teacher_path()), **kwargs)
    with self.assertRaisesRegex(error, fragment):
      data_free.run(self._dataset(), self.get_temp_dir(), _config(**kwargs))


if __name__ == "__main__":
  tf.test.main()
