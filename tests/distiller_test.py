"""Tests for keras_nd.NeighbourhoodDistiller."""

import functools
import tempfile

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd._keras import keras, tf
from keras_nd.training import NonFiniteLoss

_A, _B = "stage1_unit1_out", "stage2_unit1_out"  # two residual units of tiny_resnet


def _by_name(hoods, name):
  return next(hood for hood in hoods if hood.name == name)


def _finite(history):
  return all(np.all(np.isfinite(values)) for values in history.values())


@functools.lru_cache(maxsize=None)
def _trained_teacher():
  """A trained tiny ResNet (BatchNorm statistics moved off 0 and 1) and its data, built once.

  Shared by all tests: none may change its weights (that is what they check).
  """
  x, y = testing.images(64)
  return testing.trained(testing.tiny_resnet(), x, y), x, y


class _TeacherCase:
  """Mixed into the test cases: the shared teacher, its split and data."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher, cls.x, cls.y = _trained_teacher()
    cls.hoods = nd.split(cls.teacher)
    cls.a, cls.b = _by_name(cls.hoods, _A), _by_name(cls.hoods, _B)

  def online(self, hoods, lookahead=0):
    return nd.ActivationSource(self.teacher, hoods, testing.dataset(self.x), lookahead=lookahead,
                               verbose=0)

  def assertTeacherUnchanged(self, before):
    weights = self.teacher.weights
    self.assertLen(weights, len(before))
    for weight, old in zip(weights, before):
      self.assertAllEqual(weight.numpy(), old, msg=weight.name)


class DistillerFitTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):
  """One cached-source fit of bottleneck students for three units, examined by several tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher_before = testing.weights_of(cls.teacher)
    cls.units = cls.hoods[1:4]
    cls.source = nd.ActivationSource(cls.teacher, cls.units, testing.dataset(cls.x),
                                     cache_dir=tempfile.mkdtemp(prefix="nd_cache_"), verbose=0)
    keras.utils.set_random_seed(1)
    cls.given = {hood: nd.students.bottleneck(hood, 0.5) for hood in cls.units}
    cls.students_before = {hood: testing.weights_of(m) for hood, m in cls.given.items()}
    cls.distiller = nd.NeighbourhoodDistiller(cls.given)
    cls.distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    cls.history = cls.distiller.fit(cls.source.dataset(batch_size=16, seed=0), epochs=4,
                                    verbose=0).history

  def test_fit_ends_with_batchnorm_statistics_that_match_the_students_weights(self):
    # Re-estimated at the end of fit on fit's own batches: doing it again on the same batches,
    # weights fixed, changes nothing; without it they are Keras's lagging moving averages.
    def moving(models):
      return [w.numpy() for m in models for w in m.weights if "moving" in w.name]

    data = self.source.dataset(batch_size=16, shuffle=False)
    for steps in (50, 0):
      keras.utils.set_random_seed(2)
      students = {hood: nd.students.bottleneck(hood, 0.5) for hood in self.units}
      distiller = nd.NeighbourhoodDistiller(students, calibrate_steps=steps)
      distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
      distiller.fit(data, epochs=2, verbose=0)
      after_fit = moving(students.values())
      distiller.calibrate_batch_norm(data, steps=50)
      changes = [float(np.max(np.abs(a - b))) for a, b in zip(after_fit, moving(students.values()))]
      if steps:
        self.assertLess(max(changes), 1e-5)
      else:
        self.assertGreater(max(changes), 1e-2)
    with self.assertRaisesRegex(ValueError, "calibrate_steps must be a non-negative integer"):
      nd.NeighbourhoodDistiller(self.given, calibrate_steps=-1)

  def test_fit_traces_its_step_once(self):
    # The optimizer's slots are made before fit: a first trace that made them would be traced
    # again.
    self.assertEqual(self.distiller.train_function.experimental_get_tracing_count(), 1)

  def test_fit_reports_each_neighbourhoods_loss_and_it_falls(self):
    for hood in self.units:
      losses = self.history[f"{hood.name}_loss"]
      self.assertLen(losses, 4)
      self.assertLess(losses[-1], losses[0], msg=hood.name)
    self.assertTrue(_finite(self.history))
    # The total is the sum of the neighbourhoods' losses (no regulariser here).
    self.assertAllClose(self.history["loss"],
                        np.sum([self.history[f"{h.name}_loss"] for h in self.units], axis=0),
                        rtol=1e-5)

  def test_fit_leaves_teacher_weights_and_batchnorm_statistics_bit_identical(self):
    moving = [w for w in self.teacher.weights if "moving" in w.name]
    self.assertNotEmpty(moving)
    self.assertTeacherUnchanged(self.teacher_before)

  def test_students_are_the_trained_models_keyed_by_neighbourhood(self):
    students = self.distiller.students
    self.assertEqual(list(students), self.units)
    for hood, model in students.items():
      self.assertIs(model, self.given[hood])
      changed = [not np.array_equal(w, old)
                 for w, old in zip(testing.weights_of(model), self.students_before[hood])]
      self.assertTrue(any(changed), msg=hood.name)

  def test_evaluate_returns_each_neighbourhoods_mse_of_the_student_in_inference_mode(self):
    data = self.source.dataset(batch_size=64, shuffle=False)  # one batch: the whole cache
    results = self.distiller.evaluate(data, return_dict=True, verbose=0)
    batch = next(iter(data))
    for hood in self.units:
      a, t = batch[hood.name]
      expected = np.mean((self.given[hood].predict(a, verbose=0) - t.numpy())**2)  # numpy
      self.assertAllClose(results[f"{hood.name}_loss"], expected, rtol=1e-4)
    self.assertAllClose(results["loss"],
                        sum(results[f"{h.name}_loss"] for h in self.units), rtol=1e-5)


class DistillerCandidatesTest(_TeacherCase, tf.test.TestCase):

  def test_several_candidates_per_neighbourhood_train_independently(self):
    keras.utils.set_random_seed(4)
    small, large = nd.students.bottleneck(self.a, 0.25), nd.students.bottleneck(self.a, 1.0)
    other = nd.students.bottleneck(self.b, 0.5)
    distiller = nd.NeighbourhoodDistiller({self.a: {"small": small, "large": large},
                                           self.b: other})
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(self.online([self.a, self.b]).dataset(batch_size=16, seed=0),
                            epochs=2, verbose=0).history
    for name in (f"{_A}_small_loss", f"{_A}_large_loss", f"{_B}_loss"):
      self.assertLess(history[name][-1], history[name][0], msg=name)
    self.assertAllClose(history["loss"][-1],
                        sum(history[n][-1] for n in (f"{_A}_small_loss", f"{_A}_large_loss",
                                                     f"{_B}_loss")), rtol=1e-5)
    students = distiller.students
    self.assertEqual(students[self.a], {"small": small, "large": large})
    self.assertIs(students[self.b], other)
    self.assertEqual([e[:3] for e in distiller.entries],
                     [(f"{_A}_small", self.a, "small"), (f"{_A}_large", self.a, "large"),
                      (_B, self.b, None)])

  def test_an_empty_candidate_dict_is_named(self):
    with self.assertRaisesRegex(ValueError, f"'{_A}' has an empty dict"):
      nd.NeighbourhoodDistiller({self.a: {}})


class CalibrateBatchNormTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):

  def _distiller(self):
    keras.utils.set_random_seed(2)
    distiller = nd.NeighbourhoodDistiller({self.a: nd.students.bottleneck(self.a, 0.5)})
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    distiller.fit(self.online([self.a]).dataset(batch_size=16, seed=0), epochs=1, verbose=0)
    return distiller

  def test_moving_statistics_become_the_average_of_the_batch_statistics(self):
    distiller = self._distiller()
    student = distiller.students[self.a]
    teacher_before = testing.weights_of(self.teacher)
    kernels_before = [w.numpy() for w in student.trainable_weights]
    momenta = [layer.momentum for layer in student.layers
               if isinstance(layer, keras.layers.BatchNormalization)]
    data = self.online([self.a]).dataset(batch_size=16, shuffle=False)
    self.assertEqual(distiller.calibrate_batch_norm(data, steps=100), 4)  # 64 examples
    bns = [layer for layer in student.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    self.assertLen(bns, 2)
    for bn, momentum in zip(bns, momenta):
      # The BN layer's input, by hand, from a model of the student's graph up to it.
      probe = keras.Model(student.input, bn.input)
      means, variances = [], []
      for batch in data:
        x = probe(batch[self.a.name][0], training=True).numpy()
        x = x.reshape(-1, x.shape[-1])
        means.append(x.mean(axis=0))
        variances.append(x.var(axis=0))
      self.assertAllClose(bn.moving_mean, np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
      # Keras may Bessel-correct the batch variance (n = 16 * 8 * 8 here): within 1%.
      self.assertAllClose(bn.moving_variance, np.mean(variances, axis=0), rtol=1e-2)
      self.assertEqual(bn.momentum, momentum)  # restored
    for weight, old in zip(student.trainable_weights, kernels_before):
      self.assertAllEqual(weight.numpy(), old)
    self.assertTeacherUnchanged(teacher_before)

  @parameterized.named_parameters(("zero", 0), ("negative", -3), ("float", 2.5), ("bool", True))
  def test_rejects_bad_steps(self, steps):
    distiller = nd.NeighbourhoodDistiller({self.a: nd.students.bottleneck(self.a, 0.5)})
    with self.assertRaisesRegex(ValueError, "steps"):
      distiller.calibrate_batch_norm(self.online([self.a]).dataset(batch_size=16), steps=steps)


class CalibrateComposedModelTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):
  """keras_nd.calibrate_batch_norm: a model's BatchNorm statistics from its own activations."""

  def test_statistics_are_the_composed_models_own_and_the_teacher_is_untouched(self):
    teacher_before = testing.weights_of(self.teacher)
    keras.utils.set_random_seed(3)
    student = nd.compose(self.teacher, {self.a: nd.students.bottleneck(self.a, 0.5)})
    weights_before = [w.numpy() for w in student.trainable_weights]
    data = tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(16)
    self.assertEqual(nd.calibrate_batch_norm(student, data), 4)  # 64 examples
    bns = [layer for layer in student.layers if isinstance(layer, keras.layers.BatchNormalization)]
    self.assertGreater(len(bns), 2)
    for bn in bns:
      probe = keras.Model(student.input, bn.input)
      inputs = [probe(x, training=True).numpy() for x, _ in data]
      means = [x.reshape(-1, x.shape[-1]).mean(axis=0) for x in inputs]
      self.assertAllClose(bn.moving_mean, np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
    for weight, old in zip(student.trainable_weights, weights_before):
      self.assertAllEqual(weight.numpy(), old)
    self.assertTeacherUnchanged(teacher_before)

  def test_unlabelled_batches_are_accepted(self):
    student = nd.compose(self.teacher, {})
    data = tf.data.Dataset.from_tensor_slices(self.x).batch(32)
    self.assertEqual(nd.calibrate_batch_norm(student, data, steps=1), 1)

  def test_arrays_are_taken_in_batches_of_128(self):
    student = nd.compose(self.teacher, {})
    x = np.concatenate([self.x] * -(-300 // len(self.x)))[:300]
    self.assertEqual(nd.calibrate_batch_norm(student, x), 3)  # 128 + 128 + 44

  def test_bad_input_is_named(self):
    data = tf.data.Dataset.from_tensor_slices(self.x).batch(32)
    with self.assertRaisesRegex(TypeError, r"tf_keras \(or Keras 3\) Model"):
      nd.calibrate_batch_norm(lambda x: x, data)
    with self.assertRaisesRegex(TypeError, "tf.data.Dataset, a numpy array.*got list"):
      nd.calibrate_batch_norm(self.teacher, list(self.x))
    with self.assertRaisesRegex(ValueError, "steps"):
      nd.calibrate_batch_norm(self.teacher, data, steps=0)
    with self.assertRaisesRegex(ValueError, "empty"):
      nd.calibrate_batch_norm(nd.compose(self.teacher, {}), data.take(0))


class DistillerIndependenceTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):

  def _trained_a(self, hoods):
    keras.utils.set_random_seed(7)
    students = {hood: nd.students.clone(hood, init="random") for hood in hoods}
    initial = testing.weights_of(students[self.a])
    distiller = nd.NeighbourhoodDistiller(students)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05))
    distiller.fit(self.online(hoods).dataset(batch_size=16, shuffle=False), epochs=2,
                  shuffle=False, verbose=0)
    return initial, testing.weights_of(students[self.a])

  def test_training_two_neighbourhoods_together_gives_a_the_weights_of_training_it_alone(self):
    initial_together, together = self._trained_a([self.a, self.b])
    initial_alone, alone = self._trained_a([self.a])
    for before, after in zip(initial_together, together):
      self.assertNotAllClose(before, after)
    # Same start (a premise of the comparison), same end: nothing couples the problems.
    for one, other in zip(initial_together, initial_alone):
      self.assertAllEqual(one, other)
    for one, other in zip(together, alone):
      self.assertAllClose(one, other, rtol=1e-6, atol=1e-7)


class DistillerOptionsTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):

  def test_compile_rejects_global_clipnorm(self):
    distiller = nd.NeighbourhoodDistiller({self.a: nd.students.clone(self.a)})
    with self.assertRaisesRegex(ValueError, "global_clipnorm"):
      distiller.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=1.0))

  def test_compile_accepts_per_variable_clipnorm(self):
    student = nd.students.clone(self.a, init="random")
    before = [w.numpy() for w in student.trainable_weights]
    distiller = nd.NeighbourhoodDistiller({self.a: student})
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=1e-3))
    distiller.fit(self.online([self.a]).dataset(batch_size=16), epochs=1, steps_per_epoch=1,
                  verbose=0)
    steps = [np.linalg.norm(w.numpy() - old) for w, old in zip(student.trainable_weights, before)]
    self.assertGreater(max(steps), 0.0)  # the step trained the student
    for step in steps:  # each variable's gradient clipped to norm 1e-3: an SGD step of <= 1e-4
      self.assertLessEqual(step, 1e-4 * 1.01)

  def test_lookahead_trains_reports_and_leaves_teacher_unchanged(self):
    before = testing.weights_of(self.teacher)
    distiller = nd.NeighbourhoodDistiller(
        {self.a: nd.students.bottleneck(self.a, 0.5), self.b: nd.students.bottleneck(self.b, 0.5)},
        lookahead=1, lookahead_weights=[0.5])
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(self.online([self.a, self.b], lookahead=1).dataset(batch_size=16),
                            epochs=2, verbose=0).history
    self.assertContainsSubset([f"{_A}_loss", f"{_B}_loss", "loss"], history)
    self.assertTrue(_finite(history))
    self.assertTeacherUnchanged(before)

  def test_lookahead_loss_adds_the_weighted_mse_after_the_next_teacher_neighbourhood(self):
    student = nd.students.clone(self.a, init="random")
    distiller = nd.NeighbourhoodDistiller({self.a: student}, lookahead=1, lookahead_weights=[0.5])
    distiller.compile()
    data = self.online([self.a], lookahead=1).dataset(batch_size=64)
    results = distiller.evaluate(data, return_dict=True, verbose=0)
    a, t, (t_next,) = next(iter(data))[_A]
    s = student.predict(a, verbose=0)
    s_next = self.b.teacher.predict(s, verbose=0)
    # L = L_0 + 0.5 L_1, in numpy.
    expected = np.mean((s - t.numpy())**2) + 0.5 * np.mean((s_next - t_next.numpy())**2)
    self.assertAllClose(results[f"{_A}_loss"], expected, rtol=1e-4)

  def test_lookahead_distillation_leaves_the_composed_student_trainable(self):
    # The teacher neighbourhood after the last student (here the head) is copied
    # into the composed student; fine-tuning that student must train it too.
    last = self.hoods[-2]
    nd.NeighbourhoodDistiller({last: nd.students.clone(last, init="random")}, lookahead=1)
    composed = nd.compose(self.teacher, {last: nd.students.clone(last)})
    self.assertEqual([layer.name for layer in composed.layers if not layer.trainable], [])

  def test_lookahead_needs_a_source_with_lookahead(self):
    distiller = nd.NeighbourhoodDistiller({self.a: nd.students.clone(self.a)}, lookahead=1)
    distiller.compile()
    with self.assertRaisesRegex(ValueError, f"'{_A}'.*lookahead=1"):
      distiller.fit(self.online([self.a]).dataset(batch_size=16), epochs=1, verbose=0)

  @parameterized.named_parameters(
      ("negative", -1, None), ("float", 1.0, None), ("bool", True, None),
      ("weights_of_wrong_length", 1, [0.5, 0.5]))
  def test_rejects_bad_lookahead(self, lookahead, weights):
    with self.assertRaisesRegex(ValueError, "lookahead"):
      nd.NeighbourhoodDistiller({self.a: nd.students.clone(self.a)}, lookahead=lookahead,
                                lookahead_weights=weights)

  def test_fit_rejects_data_without_the_students_neighbourhood(self):
    distiller = nd.NeighbourhoodDistiller({self.b: nd.students.clone(self.b)})
    distiller.compile()
    with self.assertRaisesRegex(ValueError, f"'{_B}'.*{_A}"):
      distiller.fit(self.online([self.a]).dataset(batch_size=16), epochs=1, verbose=0)


class DistillerStudentsArgumentTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("list", "list"), ("empty", "empty"), ("none", "none"))
  def test_rejects_students_that_are_not_a_non_empty_dict(self, kind):
    students = {"list": [nd.students.clone(self.a)], "empty": {}, "none": None}[kind]
    with self.assertRaisesRegex(ValueError, "non-empty dict"):
      nd.NeighbourhoodDistiller(students)

  def test_rejects_student_of_wrong_input_shape_naming_both_shapes(self):
    inputs = keras.Input((4, 4, 32))
    wrong = keras.Model(inputs, keras.layers.Conv2D(32, 1)(inputs))  # B's output shape only
    with self.assertRaisesRegex(ValueError, rf"'{_B}'.*\(None, 4, 4, 32\).*\(None, 8, 8, 16\)"):
      nd.NeighbourhoodDistiller({self.b: wrong})

  def test_rejects_student_of_wrong_output_shape_naming_both_shapes(self):
    # Unit A's clone maps (8, 8, 16) to (8, 8, 16); unit B takes (8, 8, 16) but
    # outputs (4, 4, 32).
    with self.assertRaisesRegex(ValueError, rf"'{_B}'.*\(None, 8, 8, 16\).*\(None, 4, 4, 32\)"):
      nd.NeighbourhoodDistiller({self.b: nd.students.clone(self.a)})

  @parameterized.named_parameters(("number", 3), ("string", "resnet"))
  def test_rejects_student_that_is_not_a_model_naming_the_neighbourhood(self, student):
    with self.assertRaisesRegex(TypeError, f"'{_A}'"):
      nd.NeighbourhoodDistiller({self.a: student})

  def test_rejects_keys_that_are_not_neighbourhoods(self):
    with self.assertRaisesRegex(TypeError, "Neighbourhood"):
      nd.NeighbourhoodDistiller({_A: nd.students.clone(self.a)})

  def test_accepts_builder_function_and_bare_layer(self):
    # Unit B downsamples 8x8x16 to 4x4x32; a strided conv does the same.
    layer = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="b_as_layer")
    distiller = nd.NeighbourhoodDistiller({
        self.a: lambda hood: nd.students.clone(hood),
        self.b: layer,
    })
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(self.online([self.a, self.b]).dataset(batch_size=32), epochs=2,
                            verbose=0).history
    self.assertTrue(_finite(history))
    self.assertLess(history[f"{_B}_loss"][-1], history[f"{_B}_loss"][0])
    students = distiller.students
    self.assertIsInstance(students[self.a], keras.Model)
    self.assertEqual(students[self.a].name, f"{_A}_clone")
    self.assertIsInstance(students[self.b], keras.Model)
    self.assertIn(layer, students[self.b].layers)
    self.assertEqual(students[self.b].output_shape, self.b.output_shape)


class DistillerStrategyTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):

  def test_fit_under_mirrored_strategy_on_two_cpus(self):
    strategy = testing.mirrored_strategy()
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    before = testing.weights_of(self.teacher)
    source = self.online([self.a, self.b])
    with strategy.scope():
      students = {h: nd.students.bottleneck(h, 0.5) for h in (self.a, self.b)}
      distiller = nd.NeighbourhoodDistiller(students)
      distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    initial = testing.weights_of(students[self.a])
    history = distiller.fit(source.dataset(batch_size=16), epochs=1, verbose=0).history
    self.assertContainsSubset([f"{_A}_loss", f"{_B}_loss"], history)
    self.assertTrue(_finite(history))
    self.assertTrue(any(not np.array_equal(w, old)
                        for w, old in zip(testing.weights_of(students[self.a]), initial)))
    self.assertTeacherUnchanged(before)

  def test_mirrored_step_equals_a_single_device_step_on_the_whole_batch(self):
    # A student without BatchNorm, so that each replica's half batch gives the
    # gradient of the whole batch's mean loss once the replicas' are summed.
    data = self.online([self.b]).dataset(batch_size=16).take(1)

    def step(strategy, weights):
      with strategy.scope():
        layer = keras.layers.Conv2D(32, 3, strides=2, padding="same")
        distiller = nd.NeighbourhoodDistiller({self.b: layer})
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
      if weights is not None:
        layer.set_weights(weights)
      initial = layer.get_weights()
      loss = distiller.fit(data, epochs=1, verbose=0).history[f"{_B}_loss"][0]
      return initial, layer.get_weights(), loss

    initial, single, single_loss = step(tf.distribute.get_strategy(), None)
    _, mirrored, mirrored_loss = step(testing.mirrored_strategy(), initial)
    self.assertNotAllClose(initial[0], single[0])
    self.assertAllClose(mirrored_loss, single_loss, rtol=1e-5)
    for one, other in zip(mirrored, single):
      self.assertAllClose(one, other, rtol=1e-5, atol=1e-6)


class NonFiniteLossTest(_TeacherCase, tf.test.TestCase):

  def test_a_nan_loss_stops_naming_the_neighbourhood_and_step_keeping_good_weights(self):
    batches = list(self.online([self.a, self.b]).dataset(batch_size=16))  # 4 batches
    a_in, a_out = batches[2][_B]
    batches[2][_B] = (a_in, a_out * np.nan)  # the third batch's targets of one unit

    def generator():
      yield from batches

    spec = {name: tuple(tf.TensorSpec.from_tensor(t) for t in item)
            for name, item in batches[0].items()}
    data = tf.data.Dataset.from_generator(generator, output_signature=spec)
    keras.utils.set_random_seed(2)
    students = {h: nd.students.bottleneck(h, 0.5) for h in (self.a, self.b)}
    distiller = nd.NeighbourhoodDistiller(students)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    distiller.fit(data.take(2), epochs=1, verbose=0)  # a good epoch first
    good = {h: testing.weights_of(m) for h, m in students.items()}
    with self.assertRaisesRegex(NonFiniteLoss, rf"neighbourhood '{_B}' became nan at epoch 1, "
                                r"batch 3 \(step 3\).*start of epoch 1"):
      distiller.fit(data, epochs=1, verbose=0)
    for hood, model in students.items():
      for weight, old in zip(testing.weights_of(model), good[hood]):
        self.assertAllEqual(weight, old)
        self.assertTrue(np.all(np.isfinite(weight)))

  def test_the_knowledge_distiller_stops_too(self):
    student = keras.models.clone_model(self.teacher)
    student.set_weights(self.teacher.get_weights())
    start = testing.weights_of(student)

    class Poison(keras.callbacks.Callback):
      """Makes the student's output NaN after the first batch (as a diverging step would)."""

      def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
          bias = student.layers[-1].bias
          bias.assign(bias * np.nan)

    distiller = nd.KnowledgeDistiller(teacher=self.teacher, student=student)
    distiller.compile(optimizer="adam")
    with self.assertRaisesRegex(NonFiniteLoss, r"the student became nan at epoch 1, batch 2"):
      distiller.fit(testing.dataset(self.x, self.y), epochs=1, verbose=0, callbacks=[Poison()])
    for weight, old in zip(testing.weights_of(student), start):
      self.assertAllEqual(weight, old)


class DistillerPlacementTest(_TeacherCase, tf.test.TestCase, parameterized.TestCase):
  """Whole neighbourhoods on different (logical CPU) devices, no all-reduce."""

  def _trained(self, devices):
    keras.utils.set_random_seed(3)
    builders = {h: functools.partial(nd.students.bottleneck, k=0.5) for h in (self.a, self.b)}
    distiller = nd.NeighbourhoodDistiller(builders, devices=devices)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(self.online([self.a, self.b]).dataset(batch_size=16), epochs=2,
                            verbose=0).history
    return distiller, history

  def test_each_neighbourhood_trains_on_its_device_as_it_would_on_one(self):
    before = testing.weights_of(self.teacher)
    placed, history = self._trained({_A: "/cpu:0", _B: "/cpu:1"})
    self.assertEqual(placed.placement, {_A: "/cpu:0", _B: "/cpu:1"})
    students = placed.students
    self.assertTrue(all(w.device.endswith("CPU:0") for w in students[self.a].weights))
    self.assertTrue(all(w.device.endswith("CPU:1") for w in students[self.b].weights))
    slots = [v for v in placed.optimizer.variables() if "stage2_unit1" in v.name]
    self.assertNotEmpty(slots)
    self.assertTrue(all(v.device.endswith("CPU:1") for v in slots))
    single, single_history = self._trained(None)
    self.assertIsNone(single.placement)
    self.assertAllClose(history[f"{_B}_loss"], single_history[f"{_B}_loss"], rtol=1e-5)
    for hood in (self.a, self.b):
      for one, other in zip(students[hood].get_weights(), single.students[hood].get_weights()):
        self.assertAllClose(one, other, rtol=1e-4, atol=1e-5)
    self.assertTeacherUnchanged(before)

  def test_a_list_of_devices_balances_parameters(self):
    units = self.hoods[1:4]
    distiller = nd.NeighbourhoodDistiller(
        {h: nd.students.clone(h) for h in units}, devices=["/cpu:0", "/cpu:1"])
    placement = distiller.placement
    self.assertLen(set(placement.values()), 2)
    largest = max(units, key=lambda h: h.teacher.count_params())
    # The largest goes alone onto one device, the others share the other one.
    alone = placement[largest.name]
    self.assertEqual([n for n, d in placement.items() if d == alone], [largest.name])

  @parameterized.named_parameters(
      ("unknown_device", {_A: "/cpu:0", _B: "/gpu:7"}, "'/gpu:7'"),
      ("missing_hood", {_A: "/cpu:0"}, _B),
      ("empty", [], "devices"),
      ("string", "/cpu:0", "devices"))
  def test_bad_placements_are_named(self, devices, fragment):
    with self.assertRaisesRegex(ValueError, fragment):
      nd.NeighbourhoodDistiller({h: nd.students.clone(h) for h in (self.a, self.b)},
                                devices=devices)

  def test_placement_is_refused_under_a_strategy(self):
    with testing.mirrored_strategy().scope():
      with self.assertRaisesRegex(ValueError, "strategy"):
        nd.NeighbourhoodDistiller({self.a: nd.students.clone(self.a)}, devices=["/cpu:0"])


if __name__ == "__main__":
  tf.test.main()
