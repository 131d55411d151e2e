"""Tests for keras_nd.KnowledgeDistiller (end-to-end KD, Eq. 3)."""

import functools
import os

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import models
from keras_nd._keras import keras, tf


@functools.lru_cache(maxsize=None)
def _trained_teacher():
  """A trained tiny ResNet (BatchNorm statistics moved off 0 and 1) and its data, built once.

  Shared by all tests: none may change its weights (that is what they check).
  """
  x, y = testing.images(64)
  return testing.trained(testing.tiny_resnet(), x, y), x, y


def _student(seed=1, num_classes=3):
  """A narrower ResNet-8 (k = 0.5) with the teacher's input and output shapes."""
  keras.utils.set_random_seed(seed)
  return models.resnet_v1(depth=8, multipliers=0.5, input_shape=(8, 8, 3),
                          num_classes=num_classes, weight_decay=0.0, name="student")


def _changed(before, model):
  return any(not np.array_equal(old, new) for old, new in zip(before, testing.weights_of(model)))


class _TeacherCase:
  """Mixed into the test cases: the shared teacher and its data."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher, cls.x, cls.y = _trained_teacher()

  def assertTeacherUnchanged(self, before):
    weights = self.teacher.weights
    self.assertLen(weights, len(before))
    self.assertNotEmpty([w for w in weights if "moving" in w.name])
    for weight, old in zip(weights, before):
      self.assertAllEqual(weight.numpy(), old, msg=weight.name)


class KnowledgeDistillerFitTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):
  """One fit of a student, examined by several tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher_before = testing.weights_of(cls.teacher)
    cls.student = _student()
    cls.student_before = testing.weights_of(cls.student)
    cls.kd = nd.KnowledgeDistiller(teacher=cls.teacher, student=cls.student, temperature=2.0,
                                   label_weight=0.5)
    cls.kd.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    cls.history = cls.kd.fit(testing.dataset(cls.x, cls.y), epochs=4, verbose=0).history

  def test_fit_trains_the_student_and_its_loss_falls(self):
    self.assertTrue(_changed(self.student_before, self.student))
    for name in ("loss", "soft_loss", "label_loss", "accuracy"):
      self.assertLen(self.history[name], 4, msg=name)
    self.assertLess(self.history["loss"][-1], self.history["loss"][0])
    # Total = soft + lambda * label, per batch and so in the epoch means too.
    expected = np.add(self.history["soft_loss"], 0.5 * np.array(self.history["label_loss"]))
    self.assertAllClose(self.history["loss"], expected, rtol=1e-5)

  def test_fit_traces_its_step_once(self):
    # The optimizer's slots and the accuracy's totals are made before fit: a first trace that
    # made them would be traced again.
    self.assertEqual(self.kd.train_function.experimental_get_tracing_count(), 1)
    self.assertIn("accuracy", self.history)

  def test_fit_ends_with_the_students_batchnorm_statistics_matching_its_weights(self):
    # Re-estimating them again on the same batches, weights fixed, changes nothing; the
    # moving averages a fit without calibration leaves are far from them.
    def moving(model):
      return [w.numpy() for w in model.weights if "moving" in w.name]
    after_fit = moving(self.student)
    again = keras.models.clone_model(self.student)
    again.set_weights(self.student.get_weights())
    nd.calibrate_batch_norm(again, testing.dataset(self.x, self.y))
    for got, want in zip(after_fit, moving(again)):
      self.assertAllClose(got, want, atol=1e-5)
    lagging = _student()
    kd = nd.KnowledgeDistiller(teacher=self.teacher, student=lagging, calibrate_steps=0)
    kd.compile(optimizer=keras.optimizers.Adam(1e-2))
    kd.fit(testing.dataset(self.x, self.y), epochs=4, verbose=0)
    before = moving(lagging)
    nd.calibrate_batch_norm(lagging, testing.dataset(self.x, self.y))
    self.assertGreater(max(float(np.max(np.abs(a - b))) for a, b in zip(before, moving(lagging))),
                       0.05)
    with self.assertRaisesRegex(ValueError, "calibrate_steps must be a non-negative integer"):
      nd.KnowledgeDistiller(teacher=self.teacher, student=lagging, calibrate_steps=-1)

  def test_fit_leaves_teacher_weights_and_batchnorm_statistics_unchanged(self):
    self.assertTeacherUnchanged(self.teacher_before)

  def test_evaluate_reports_the_accuracy_of_the_student(self):
    results = self.kd.evaluate(self.x, self.y, batch_size=16, return_dict=True, verbose=0)
    # By hand, from the student's own predictions.
    predicted = np.argmax(self.student.predict(self.x, verbose=0), axis=-1)
    self.assertAllClose(results["accuracy"], np.mean(predicted == self.y))

  def test_evaluate_scores_the_student_not_the_teacher(self):
    # An untrained student, so that it disagrees with the teacher somewhere.
    student = _student(seed=2)
    kd = nd.KnowledgeDistiller(teacher=self.teacher, student=student)
    kd.compile(metrics=["accuracy"])
    student_predicted = np.argmax(student.predict(self.x, verbose=0), axis=-1)
    teacher_predicted = np.argmax(self.teacher.predict(self.x, verbose=0), axis=-1)
    agreement = np.mean(student_predicted == teacher_predicted)
    self.assertLess(agreement, 1.0)
    # Labelled with the student's own predictions the student is always right,
    # with the teacher's only where the two agree.
    for labels, expected in ((student_predicted, 1.0), (teacher_predicted, agreement)):
      results = kd.evaluate(self.x, labels, batch_size=16, return_dict=True, verbose=0)
      self.assertAllClose(results["accuracy"], expected)

  def test_evaluate_reports_the_kd_loss_of_the_student_by_numpy(self):
    results = self.kd.evaluate(self.x, self.y, batch_size=64, return_dict=True, verbose=0)
    tau = 2.0
    teacher_logits = self.teacher.predict(self.x, verbose=0).astype("float64")
    student_logits = self.student.predict(self.x, verbose=0).astype("float64")

    def log_softmax(z):
      z = z - z.max(-1, keepdims=True)
      return z - np.log(np.exp(z).sum(-1, keepdims=True))

    soft = tau**2 * np.mean(-(np.exp(log_softmax(teacher_logits / tau)) *
                              log_softmax(student_logits / tau)).sum(-1))
    label = np.mean(-log_softmax(student_logits)[np.arange(len(self.y)), self.y])
    self.assertAllClose(results["soft_loss"], soft, rtol=1e-4)
    self.assertAllClose(results["label_loss"], label, rtol=1e-4)
    self.assertAllClose(results["loss"], soft + 0.5 * label, rtol=1e-4)

  def test_calling_the_distiller_calls_the_student(self):
    x = self.x[:5]
    self.assertAllClose(self.kd(x), self.student(x, training=False))
    self.assertAllClose(self.kd.predict(x, verbose=0), self.student.predict(x, verbose=0))

  def test_save_writes_the_student_that_loads_in_safe_mode(self):
    path = os.path.join(self.get_temp_dir(), "student.keras")
    self.kd.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    self.assertEqual(loaded.name, "student")
    self.assertEqual(loaded.count_params(), self.student.count_params())
    self.assertAllClose(loaded.predict(self.x, verbose=0), self.student.predict(self.x, verbose=0),
                        atol=1e-5)


class KnowledgeDistillerTeacherOutputTest(tf.test.TestCase):
  """A teacher that ends in a softmax against the same network ending in logits."""

  def setUp(self):
    super().setUp()
    self.x, self.y = testing.images(32)
    self.logits_teacher = testing.tiny_resnet(seed=3)
    self.softmax_teacher = testing.tiny_resnet(seed=3, softmax=True)
    # Same seed, same weights (the Softmax layer has none): a premise of the comparison.
    for one, other in zip(self.logits_teacher.get_weights(), self.softmax_teacher.get_weights()):
      self.assertAllEqual(one, other)

  def test_softmax_teacher_gives_the_soft_targets_of_its_logits(self):
    tau = 3.0
    log_p = nd.losses.logits_of(self.softmax_teacher(self.x, training=False), from_logits=False)
    self.assertAllClose(tf.nn.softmax(log_p / tau),
                        tf.nn.softmax(self.logits_teacher(self.x, training=False) / tau),
                        atol=1e-6)
    student = _student()
    results = {}
    for name, teacher in (("logits", self.logits_teacher), ("softmax", self.softmax_teacher)):
      kd = nd.KnowledgeDistiller(teacher=teacher, student=student, temperature=tau,
                                 label_weight=1.0)
      kd.compile(metrics=["accuracy"])
      results[name] = kd.evaluate(self.x, self.y, batch_size=32, return_dict=True, verbose=0)
    # The soft term is the cross-entropy against the soft targets: the same.
    self.assertAllClose(results["softmax"], results["logits"], rtol=1e-5)

  def test_softmax_teacher_trains_the_student_like_the_logits_teacher(self):
    trained = {}
    for name, teacher in (("logits", self.logits_teacher), ("softmax", self.softmax_teacher)):
      student = _student(seed=5)
      kd = nd.KnowledgeDistiller(teacher=teacher, student=student, temperature=3.0,
                                 label_weight=0.0)
      kd.compile(optimizer=keras.optimizers.SGD(0.1))
      kd.fit(testing.dataset(self.x), epochs=1, verbose=0)
      trained[name] = testing.weights_of(student)
    for one, other in zip(trained["softmax"], trained["logits"]):
      self.assertAllClose(one, other, rtol=1e-4, atol=1e-5)


class KnowledgeDistillerArgumentsTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):

  def test_rejects_student_of_other_output_shape_naming_both_shapes(self):
    with self.assertRaisesRegex(ValueError, r"'student'.*\(None, 4\).*\(None, 3\)"):
      nd.KnowledgeDistiller(teacher=self.teacher, student=_student(num_classes=4))

  @parameterized.named_parameters(("zero", 0.0), ("negative", -1.0))
  def test_rejects_non_positive_temperature(self, temperature):
    with self.assertRaisesRegex(ValueError, rf"temperature.*{temperature!r}"):
      nd.KnowledgeDistiller(teacher=self.teacher, student=_student(), temperature=temperature)

  def test_rejects_negative_label_weight(self):
    with self.assertRaisesRegex(ValueError, r"label_weight.*-0\.5"):
      nd.KnowledgeDistiller(teacher=self.teacher, student=_student(), label_weight=-0.5)

  @parameterized.named_parameters(
      ("layer", lambda: keras.layers.Dense(3)), ("function", lambda: (lambda x: x)),
      ("none", lambda: None))
  def test_rejects_teacher_that_is_not_a_model(self, make):
    with self.assertRaisesRegex(TypeError, "teacher"):
      nd.KnowledgeDistiller(teacher=make(), student=_student())

  def test_rejects_student_that_is_not_a_model(self):
    with self.assertRaisesRegex(TypeError, "student"):
      nd.KnowledgeDistiller(teacher=self.teacher, student=keras.layers.Dense(3))

  def test_fit_without_labels_needs_label_weight_0(self):
    kd = nd.KnowledgeDistiller(teacher=self.teacher, student=_student(), label_weight=1.0)
    kd.compile()
    with self.assertRaisesRegex(ValueError, "labels"):
      kd.fit(testing.dataset(self.x), epochs=1, verbose=0)

  def test_fit_without_labels_and_label_weight_0_trains_the_student(self):
    # The data-free use: only the teacher's soft targets.
    before = testing.weights_of(self.teacher)
    student = _student()
    student_before = testing.weights_of(student)
    kd = nd.KnowledgeDistiller(teacher=self.teacher, student=student, temperature=2.0,
                               label_weight=0.0)
    kd.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = kd.fit(testing.dataset(self.x), epochs=3, verbose=0).history
    self.assertLess(history["loss"][-1], history["loss"][0])
    self.assertAllEqual(history["label_loss"], [0.0] * 3)
    self.assertAllClose(history["loss"], history["soft_loss"])
    self.assertTrue(_changed(student_before, student))
    self.assertTeacherUnchanged(before)


class KnowledgeDistillerStrategyTest(_TeacherCase, tf.test.TestCase):

  def test_fit_under_mirrored_strategy_on_two_cpus(self):
    strategy = testing.mirrored_strategy()
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    before = testing.weights_of(self.teacher)
    with strategy.scope():
      student = _student()
      kd = nd.KnowledgeDistiller(teacher=self.teacher, student=student, temperature=2.0,
                                 label_weight=1.0)
      kd.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    student_before = testing.weights_of(student)
    history = kd.fit(testing.dataset(self.x, self.y), epochs=1, verbose=0).history
    for name in ("loss", "soft_loss", "label_loss", "accuracy"):
      self.assertTrue(np.all(np.isfinite(history[name])), msg=name)
    self.assertTrue(_changed(student_before, student))
    self.assertTeacherUnchanged(before)

  def test_mirrored_step_equals_a_single_device_step_on_the_whole_batch(self):
    # A student without BatchNorm, so that each replica's half batch gives the
    # gradient of the whole batch's mean loss once the replicas' are summed.
    data = testing.dataset(self.x[:16], self.y[:16])

    def step(strategy, weights):
      with strategy.scope():
        inputs = keras.Input((8, 8, 3))
        student = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
        kd = nd.KnowledgeDistiller(teacher=self.teacher, student=student, temperature=2.0,
                                   label_weight=1.0)
        kd.compile(optimizer=keras.optimizers.SGD(0.1))
      if weights is not None:
        student.set_weights(weights)
      initial = student.get_weights()
      loss = kd.fit(data, epochs=1, verbose=0).history["loss"][0]
      return initial, student.get_weights(), loss

    initial, single, single_loss = step(tf.distribute.get_strategy(), None)
    _, mirrored, mirrored_loss = step(testing.mirrored_strategy(), initial)
    self.assertNotAllClose(initial[0], single[0])
    self.assertAllClose(mirrored_loss, single_loss, rtol=1e-5)
    for one, other in zip(mirrored, single):
      self.assertAllClose(one, other, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  tf.test.main()
