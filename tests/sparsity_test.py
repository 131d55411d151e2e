"""Tests for keras_nd.sparsity: pruned one-layer students, the schedule, stripping, reports."""

import os

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import sparsity, students
from keras_nd._keras import keras, tf

_FIRST, _LAST = "stem_conv", "head_logits"  # the layers the paper keeps dense


def _ramp(target, step, end):
  """tfmot's cubic PolynomialDecay from 0 to `target` over `end` steps, by hand."""
  t = min(1.0, step / end)
  return target * (1.0 - (1.0 - t) ** 3)


def _zeros(array):
  array = np.asarray(array)
  return np.count_nonzero(array == 0) / array.size


def _depthwise_model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((8, 8, 8))
  x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(inputs)
  x = keras.layers.Conv2D(8, 1, name="pw")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


class ScheduleTest(tf.test.TestCase, parameterized.TestCase):

  def test_polynomial_ramps_over_the_first_half_and_holds(self):
    schedule = sparsity.schedule(0.6, steps=40)  # ramp of 20 steps, mask every 2
    for step, expected in ((0, 0.0), (10, _ramp(0.6, 10, 20)), (20, 0.6), (30, 0.6), (40, 0.6)):
      self.assertAllClose(schedule(step)[1], expected, atol=1e-6, msg=f"step {step}")
    # The mask is updated every 2 steps up to the end of the ramp, its last update at step 20.
    self.assertTrue(schedule(20)[0])
    self.assertFalse(schedule(21)[0])
    self.assertFalse(schedule(22)[0])

  def test_frequency_is_at_most_100_and_the_last_update_ends_the_ramp(self):
    schedule = sparsity.schedule(0.5, steps=40000)  # the paper's 20k + 20k steps
    self.assertEqual(schedule.frequency, 100)
    self.assertEqual(schedule.end_step, 20000)

  def test_constant_holds_the_target_from_the_start(self):
    schedule = sparsity.schedule(0.3, steps=40, kind="constant")
    self.assertAllClose(schedule(0)[1], 0.3)
    self.assertAllClose(schedule(39)[1], 0.3)

  @parameterized.named_parameters(("one", 1.0), ("negative", -0.1), ("string", "0.5"),
                                  ("bool", True))
  def test_rejects_targets_outside_0_1(self, target):
    with self.assertRaisesRegex(ValueError, "sparsity.*must be a number in"):
      sparsity.schedule(target, steps=10)

  def test_rejects_unknown_kind_and_too_few_steps(self):
    with self.assertRaisesRegex(ValueError, "'cubic'"):
      sparsity.schedule(0.5, steps=10, kind="cubic")
    with self.assertRaisesRegex(ValueError, "steps"):
      sparsity.schedule(0.5, steps=1)


class SparseNeighbourhoodDistillationTest(tf.test.TestCase, parameterized.TestCase):
  """One ND run of sparse students for every conv of a trained tiny ResNet but the first."""

  STEPS = 40

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x, y = testing.images(64)
    cls.teacher = testing.trained(testing.tiny_resnet(), cls.x, y)
    cls.teacher_before = testing.weights_of(cls.teacher)
    cls.hoods = nd.split_layers(cls.teacher)
    cls.targets = {"stage1_unit1_conv1": 0.3}  # one layer differs; the rest 0.7
    cls.students = sparsity.sparse_students(
        cls.hoods, lambda layer: cls.targets.get(layer.name, 0.7), steps=cls.STEPS,
        skip=(_FIRST, _LAST))
    source = nd.ActivationSource(cls.teacher, list(cls.students), testing.dataset(cls.x),
                                 verbose=0)
    probed = next(h for h in cls.students if h.name == "stage1_unit1_conv2")  # target 0.7
    cls.probe = cls.students[probed].layers[-1]  # its pruning wrapper, for the mask

    class Record(keras.callbacks.Callback):
      masks = {}

      def on_epoch_end(self, epoch, logs=None):
        mask = cls.probe.pruning_vars[0][1].numpy()
        self.masks[(epoch + 1) * 4] = _zeros(mask)

    cls.record = Record()
    cls.distiller = nd.NeighbourhoodDistiller(cls.students)
    cls.distiller.compile(keras.optimizers.Adam(1e-3))
    # 64 examples in batches of 16: 4 steps an epoch, 10 epochs = STEPS. No UpdatePruningStep
    # given: fit adds it.
    cls.history = cls.distiller.fit(source.dataset(batch_size=16, seed=0).repeat(), epochs=10,
                                    steps_per_epoch=4, callbacks=[cls.record], verbose=0).history
    cls.composed = nd.compose(cls.teacher, cls.distiller.students)

  def test_students_are_the_prunable_layers_but_the_skipped(self):
    names = sorted(h.nodes[0].layer.name for h in self.students)
    every = sorted(h.nodes[0].layer.name for h in self.hoods)
    self.assertEqual(names, sorted(set(every) - {_FIRST, _LAST}))

  def test_the_mask_follows_the_schedule_at_begin_middle_and_end(self):
    target = 0.7
    masks = self.record.masks
    end = self.STEPS // 2
    # Step 4 and 8 are in the ramp (the mask is updated every 2 steps), 20 ends it, 40 holds.
    for step in (4, 8):
      self.assertBetween(masks[step], _ramp(target, step - 2, end) - 0.02,
                         _ramp(target, step, end) + 0.02)
    self.assertAllClose(masks[end], target, atol=0.01)
    self.assertAllClose(masks[self.STEPS], target, atol=0.01)
    self.assertLess(masks[4], masks[8])

  def test_the_composed_student_is_plain_with_exactly_the_requested_sparsity(self):
    self.assertFalse(sparsity.prunes(self.composed))
    rows = {r["layer"]: r for r in sparsity.report(self.composed)["layers"]}
    for hood in self.students:
      name = hood.nodes[0].layer.name + students.SUFFIX
      expected = self.targets.get(hood.nodes[0].layer.name, 0.7)
      self.assertAllClose(rows[name]["sparsity"], expected, atol=0.005, msg=name)
    for name in (_FIRST, _LAST):  # kept dense, straight from the teacher
      self.assertEqual(rows[name]["zeros"], 0)
    total = sparsity.report(self.composed)["total"]
    self.assertEqual(total["weights"], sum(r["weights"] for r in rows.values()))
    self.assertBetween(total["sparsity"], 0.3, 0.7)

  def test_the_teacher_is_untouched(self):
    for weight, old in zip(testing.weights_of(self.teacher), self.teacher_before):
      self.assertAllEqual(weight, old)

  def test_distillation_losses_fell(self):
    name = next(iter(self.students)).name
    self.assertLess(self.history[f"{name}_loss"][-1], self.history[f"{name}_loss"][2])

  def test_the_composed_student_saves_and_reloads(self):
    path = os.path.join(self.get_temp_dir(), "sparse.keras")
    self.composed.save(path)
    reloaded = keras.models.load_model(path, safe_mode=True)
    self.assertAllClose(reloaded.predict(self.x, verbose=0),
                        self.composed.predict(self.x, verbose=0), atol=1e-6)
    self.assertEqual(sparsity.report(reloaded), sparsity.report(self.composed))

  def test_compressed_size_is_smaller_than_the_dense_teachers(self):
    self.assertLess(sparsity.compressed_size(self.composed), sparsity.compressed_size(self.teacher))

  def test_report_refuses_a_model_still_wrapped(self):
    with self.assertRaisesRegex(ValueError, "pruning wrappers"):
      sparsity.report(next(iter(self.students.values())))


class SparseStudentTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher = testing.tiny_resnet()
    cls.hoods = {h.name: h for h in nd.split_layers(cls.teacher)}

  def test_a_student_starts_as_the_teacher_layer(self):
    hood = self.hoods["stage1_unit1_conv2"]
    student = sparsity.sparse_student(hood, 0.5, steps=10)
    a = np.random.RandomState(0).normal(size=(2,) + hood.input_shape[1:]).astype("float32")
    self.assertAllClose(student(a, training=False), hood.teacher(a, training=False), atol=1e-6)

  def test_two_by_four_structured_sparsity(self):
    hood = self.hoods["stage1_unit1_conv2"]  # 16 input channels: blocks of 4 fit
    students = {hood: sparsity.sparse_student(hood, 0.5, steps=8, m_by_n=(2, 4))}
    a = np.random.RandomState(0).normal(size=(32,) + hood.input_shape[1:]).astype("float32")
    t = hood.teacher(a, training=False)
    distiller = nd.NeighbourhoodDistiller(students)
    distiller.compile("adam")
    data = tf.data.Dataset.from_tensor_slices({hood.name: (a, t)}).batch(8).repeat()
    distiller.fit(data, epochs=1, steps_per_epoch=8, verbose=0)
    kernel = sparsity.strip(students[hood]).layers[-1].kernel.numpy()
    # In every run of 4 consecutive input channels, at least 2 zeros.
    blocks = np.moveaxis(kernel, 2, -1).reshape(-1, 4)
    self.assertTrue(np.all(np.count_nonzero(blocks == 0, axis=1) >= 2))
    self.assertAllClose(_zeros(kernel), 0.5, atol=0.005)

  def test_depthwise_kernels_are_pruned_and_strip_to_plain_layers(self):
    model = _depthwise_model()
    hood = next(h for h in nd.split_layers(model) if h.name == "dw")
    student = sparsity.sparse_student(hood, 0.5, steps=4, kind="constant")
    a = np.random.RandomState(0).normal(size=(8, 8, 8, 8)).astype("float32")
    distiller = nd.NeighbourhoodDistiller({hood: student})
    distiller.compile("adam")
    data = tf.data.Dataset.from_tensor_slices(
        {hood.name: (a, hood.teacher(a, training=False))}).batch(4).repeat()
    distiller.fit(data, epochs=1, steps_per_epoch=4, verbose=0)
    composed = nd.compose(model, {hood: student})
    layer = composed.get_layer("dw" + students.SUFFIX)
    self.assertIs(type(layer), keras.layers.DepthwiseConv2D)
    self.assertAllClose(_zeros(layer.depthwise_kernel), 0.5, atol=0.005)
    composed.save(os.path.join(self.get_temp_dir(), "dw.keras"))
    keras.models.load_model(os.path.join(self.get_temp_dir(), "dw.keras"), safe_mode=True)

  def _fit(self, student, hood, epochs, steps_per_epoch=None, repeat=False):
    a = np.random.RandomState(0).normal(size=(32,) + hood.input_shape[1:]).astype("float32")
    data = tf.data.Dataset.from_tensor_slices(
        {hood.name: (a, hood.teacher(a, training=False))}).batch(8)  # 4 batches
    distiller = nd.NeighbourhoodDistiller({hood: student})
    distiller.compile("adam")
    distiller.fit(data.repeat() if repeat else data, epochs=epochs,
                  steps_per_epoch=steps_per_epoch, verbose=0)
    return distiller

  def test_without_steps_the_schedule_is_the_length_of_the_first_fit(self):
    # 3 epochs of 4 batches: the ramp ends at step 6 and the student is at its target.
    hood = self.hoods["stage1_unit1_conv2"]
    student = sparsity.sparse_student(hood, 0.5)
    self._fit(student, hood, epochs=3)
    self.assertEqual(student.layers[-1].pruning_schedule.end_step,
                     sparsity.schedule(0.5, 12).end_step)
    kernel = nd.compose(self.teacher, {hood: student}).get_layer(
        "stage1_unit1_conv2" + students.SUFFIX).kernel.numpy()
    self.assertAllClose(_zeros(kernel), 0.5, atol=0.005)
    repeated = sparsity.sparse_student(hood, 0.5)  # steps_per_epoch says it for a repeat()
    self._fit(repeated, hood, epochs=2, steps_per_epoch=5, repeat=True)
    self.assertEqual(repeated.layers[-1].pruning_schedule.end_step,
                     sparsity.schedule(0.5, 10).end_step)

  def test_a_fit_of_unknown_length_asks_for_its_steps(self):
    hood = self.hoods["stage1_unit1_conv2"]
    with self.assertRaisesRegex(ValueError, "pass steps_per_epoch to fit.*or steps=N"):
      self._fit(sparsity.sparse_student(hood, 0.5), hood, epochs=1, repeat=True,
                steps_per_epoch=None)

  def test_a_student_short_of_its_target_is_refused_when_composed(self):
    # The schedule asks for 2000 steps; 4 were run: the mask is still empty.
    hood = self.hoods["stage1_unit1_conv2"]
    student = sparsity.sparse_student(hood, 0.5, steps=2000)
    self._fit(student, hood, epochs=1)
    with self.assertRaisesRegex(ValueError, r"'stage1_unit1_conv2_s' at 0.0% of 50.0% after 4 "
                                r"steps \(its schedule ends at step 1000\).*without steps="):
      nd.compose(self.teacher, {hood: student})

  def test_a_user_given_update_pruning_step_is_not_doubled(self):
    hood = self.hoods["stage1_unit1_conv2"]
    distiller = nd.NeighbourhoodDistiller({hood: sparsity.sparse_student(hood, 0.5, steps=10)})
    import tensorflow_model_optimization as tfmot  # pylint: disable=g-import-not-at-top

    given = [tfmot.sparsity.keras.UpdatePruningStep()]
    self.assertEqual(sparsity.pruning_callbacks(distiller, given), given)
    self.assertLen(sparsity.pruning_callbacks(distiller, None), 1)

  def test_targets_as_a_dict_leave_the_other_layers_out(self):
    students = sparsity.sparse_students(list(self.hoods.values()), {"stage1_unit1_conv1": 0.5},
                                        steps=10)
    self.assertEqual([h.name for h in students], ["stage1_unit1_conv1"])

  def test_skip_by_layer_type(self):
    students = sparsity.sparse_students(list(self.hoods.values()), 0.5, steps=10,
                                        skip=(keras.layers.Dense,))
    self.assertNotIn("head_logits", [h.name for h in students])
    self.assertIn("stem_conv", [h.name for h in students])

  @parameterized.named_parameters(("one", 1.0), ("negative", -0.2))
  def test_bad_targets_name_the_layer(self, target):
    with self.assertRaisesRegex(ValueError, f"stage1_unit1_conv1.*{target}"):
      sparsity.sparse_student(self.hoods["stage1_unit1_conv1"], target, steps=10)

  def test_m_by_n_on_a_depthwise_layer_is_named(self):
    hood = next(h for h in nd.split_layers(_depthwise_model()) if h.name == "dw")
    with self.assertRaisesRegex(ValueError, "'dw'.*DepthwiseConv2D"):
      sparsity.sparse_student(hood, 0.5, steps=10, m_by_n=(2, 4))

  def test_a_layer_tfmot_cannot_prune_is_named(self):
    bn = nd.split_layers(self.teacher, keras.layers.BatchNormalization)[0]
    with self.assertRaisesRegex(ValueError, f"'{bn.nodes[0].layer.name}'.*BatchNormalization"):
      sparsity.sparse_student(bn, 0.5, steps=10)

  def test_a_neighbourhood_of_several_layers_is_named(self):
    unit = nd.split(self.teacher)[1]
    with self.assertRaisesRegex(ValueError, f"'{unit.name}'.*split_layers"):
      sparsity.sparse_student(unit, 0.5, steps=10)

  def test_unknown_skip_name_is_named(self):
    with self.assertRaisesRegex(ValueError, "stem_konv"):
      sparsity.sparse_students(list(self.hoods.values()), 0.5, steps=10, skip=("stem_konv",))

  def test_skipping_everything_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "nothing to sparsify"):
      sparsity.sparse_students(list(self.hoods.values()), 0.5, steps=10,
                               skip=(keras.layers.Conv2D, keras.layers.Dense))


class PruneWholeModelTest(tf.test.TestCase):

  def test_kd_baseline_prunes_end_to_end_and_leaves_the_teacher_alone(self):
    x, y = testing.images(32)
    teacher = testing.trained(testing.tiny_resnet(), x, y)
    before = testing.weights_of(teacher)
    student = sparsity.prune(teacher, 0.5, steps=8, skip=(_FIRST, _LAST))
    self.assertTrue(sparsity.prunes(student))
    kd = nd.KnowledgeDistiller(teacher=teacher, student=student, temperature=2.0)
    kd.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    kd.fit(testing.dataset(x, y, batch_size=8).repeat(), epochs=1, steps_per_epoch=8, verbose=0)
    plain = sparsity.strip(student)
    rows = {r["layer"]: r["sparsity"] for r in sparsity.report(plain)["layers"]}
    self.assertEqual(rows[_FIRST], 0.0)
    self.assertAllClose(rows["stage1_unit1_conv1" + students.SUFFIX], 0.5, atol=0.005)
    for weight, old in zip(testing.weights_of(teacher), before):
      self.assertAllEqual(weight, old)


if __name__ == "__main__":
  tf.test.main()
