"""Tests for keras_nd.students (bottleneck and clone student builders)."""

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import models
from keras_nd._keras import keras, tf

# Residual units of ResNet-20 (3 stages of 3 basic units).
_RESNET20_UNITS = [f"stage{s}_unit{u}" for s in (1, 2, 3) for u in (1, 2, 3)]
_SMALL = (8, 8, 3)  # parameter counts and inner widths do not depend on the resolution


def _by_name(hoods, name):
  return next(hood for hood in hoods if hood.name == name)


def _params(layers):
  return sum(layer.count_params() for layer in layers)


def _config_without(layer, *keys):
  config = dict(layer.get_config())
  for key in ("name",) + keys:
    config.pop(key, None)
  return config


class ScaledWidthTest(tf.test.TestCase, parameterized.TestCase):

  # Expected widths are floor(k * width), at least 1, computed by hand.
  @parameterized.named_parameters(
      ("0.7_of_10_is_7_despite_float_error", 0.7, 10, 7),  # 0.7 * 10 = 6.999999...
      ("0.4_of_16_floors_to_6", 0.4, 16, 6),  # 6.4
      ("0.01_of_16_is_at_least_1", 0.01, 16, 1),  # 0.16
      ("0.5_of_16_is_8", 0.5, 16, 8),
      ("1.0_keeps_the_width", 1.0, 64, 64),
      ("0.75_of_10_floors_to_7", 0.75, 10, 7))  # 7.5
  def test_scaled_width_floors_and_keeps_at_least_one(self, k, width, expected):
    self.assertEqual(nd.students.scaled_width(width, k), expected)


class BottleneckResNetV1Test(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher = models.resnet_v1(depth=20, input_shape=_SMALL)
    cls.hoods = nd.split(cls.teacher)
    cls.units = [_by_name(cls.hoods, f"{unit}_out") for unit in _RESNET20_UNITS]

  def test_bottleneck_narrows_only_conv1_of_each_unit(self):
    k = 0.5
    for hood in self.units:
      student = nd.students.bottleneck(hood, k)
      for layer in hood.layers:
        copy = student.get_layer(layer.name + "_s")
        if layer.name.endswith("_conv1"):
          self.assertEqual(copy.filters, nd.students.scaled_width(layer.filters, k),
                           msg=layer.name)
          self.assertEqual(_config_without(copy, "filters"), _config_without(layer, "filters"),
                           msg=layer.name)
        else:
          self.assertEqual(_config_without(copy), _config_without(layer), msg=layer.name)

  @parameterized.named_parameters(("k_1.0", 1.0), ("k_0.1", 0.1))
  def test_bottleneck_keeps_the_neighbourhood_input_and_output_shapes(self, k):
    for hood in self.units:
      student = nd.students.bottleneck(hood, k)
      self.assertEqual(student.input_shape, hood.input_shape, msg=hood.name)
      self.assertEqual(student.output_shape, hood.output_shape, msg=hood.name)
      a = np.zeros((2,) + hood.input_shape[1:], "float32")
      self.assertEqual(student(a).shape, (2,) + hood.output_shape[1:])

  @parameterized.named_parameters(
      (f"k_{k}", k) for k in (1.0, 0.9, 0.75, 0.5, 0.4, 0.1))
  def test_bottleneck_params_equal_the_unit_of_a_resnet20_built_with_k(self, k):
    direct = models.resnet_v1(depth=20, multipliers=k, input_shape=_SMALL)
    # A unit that downsamples (with a shortcut layer) and two identity units.
    for unit in ("stage1_unit2", "stage2_unit1", "stage2_unit2"):
      student = nd.students.bottleneck(_by_name(self.hoods, f"{unit}_out"), k)
      direct_unit = [layer for layer in direct.layers if layer.name.startswith(unit + "_")]
      self.assertEqual(_params(student.layers), _params(direct_unit), msg=unit)
      self.assertEqual(
          sum(int(np.prod(w.shape)) for w in student.trainable_weights),
          sum(int(np.prod(w.shape)) for layer in direct_unit for w in layer.trainable_weights),
          msg=unit)
      # Layer by layer, too: the student's `<name>_s` is the direct model's `<name>`.
      for layer in direct_unit:
        self.assertEqual(student.get_layer(layer.name + "_s").count_params(),
                         layer.count_params(), msg=layer.name)

  def test_bottleneck_names_the_model_after_the_neighbourhood_and_k(self):
    hood = _by_name(self.hoods, "stage2_unit2_out")
    self.assertEqual(nd.students.bottleneck(hood, 0.5).name, "stage2_unit2_out_k0.5")

  def test_student_layer_names_end_with_s_and_do_not_clash_with_the_teacher(self):
    hood = _by_name(self.hoods, "stage2_unit1_out")
    teacher_names = {layer.name for layer in self.teacher.layers}
    for student in (nd.students.bottleneck(hood, 0.5), nd.students.clone(hood)):
      layers = [layer for layer in student.layers
                if not isinstance(layer, keras.layers.InputLayer)]
      self.assertLen(layers, len(hood.layers))
      for layer in layers:
        self.assertTrue(layer.name.endswith("_s"), msg=layer.name)
      self.assertEmpty(teacher_names & {layer.name for layer in student.layers})
      # So the student fits into the teacher's graph without a name clash.
      swapped = nd.substitute(self.teacher, {hood: student})
      self.assertEqual(swapped.output_shape, self.teacher.output_shape)

  @parameterized.named_parameters(
      ("zero", 0), ("negative", -0.5), ("above_one", 1.5), ("bool_true", True),
      ("string", "0.5"))
  def test_bottleneck_rejects_k_outside_0_1_naming_value_and_neighbourhood(self, k):
    hood = _by_name(self.hoods, "stage1_unit2_out")
    with self.assertRaisesRegex(ValueError, rf"{k!r}.*'stage1_unit2_out'"):
      nd.students.bottleneck(hood, k)

  @parameterized.named_parameters(("stem", "stem_relu"), ("head", "head_logits"))
  def test_bottleneck_rejects_neighbourhood_without_inner_layer(self, name):
    with self.assertRaisesRegex(ValueError, f"'{name}'.*no inner layer"):
      nd.students.bottleneck(_by_name(self.hoods, name), 0.5)

  def test_bottleneck_rejects_non_neighbourhood(self):
    with self.assertRaisesRegex(TypeError, "Neighbourhood.*Functional"):
      nd.students.bottleneck(self.teacher, 0.5)


class BottleneckOtherArchitecturesTest(tf.test.TestCase):

  def test_resnet50_bottleneck_unit_narrows_conv1_and_conv2_not_conv3(self):
    teacher = models.resnet50_v1(input_shape=(32, 32, 3), num_classes=3)
    hoods = nd.split(teacher)
    for name in ("stage1_unit1", "stage2_unit2"):  # with projection shortcut, with identity
      hood = _by_name(hoods, f"{name}_out")
      student = nd.students.bottleneck(hood, 0.5)
      inner = teacher.get_layer(f"{name}_conv1").filters
      for conv, expected in (("conv1", inner // 2), ("conv2", inner // 2),
                             ("conv3", 4 * inner)):
        self.assertEqual(student.get_layer(f"{name}_{conv}_s").filters, expected,
                         msg=f"{name}_{conv}")
      if name == "stage1_unit1":
        self.assertEqual(student.get_layer(f"{name}_shortcut_conv_s").filters, 4 * inner)
      self.assertEqual(student.input_shape, hood.input_shape)
      self.assertEqual(student.output_shape, hood.output_shape)
      self.assertLess(student.count_params(), _params(hood.layers))

  def test_mobilenet_v2_inverted_residual_narrows_the_expand_conv(self):
    teacher = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=3)
    hood = _by_name(nd.split(teacher), "block_2_add")
    student = nd.students.bottleneck(hood, 0.5)
    # block_2 expands 24 channels 6x to 144; k = 0.5 gives 72.
    self.assertEqual(teacher.get_layer("block_2_expand").filters, 144)
    self.assertEqual(student.get_layer("block_2_expand_s").filters, 72)
    self.assertEqual(student.get_layer("block_2_project_s").filters, 24)
    self.assertEqual(student.get_layer("block_2_depthwise_s").output_shape[-1], 72)
    self.assertEqual(student.input_shape, hood.input_shape)
    self.assertEqual(student.output_shape, hood.output_shape)


_INNER_AND_CONSUMER = {
    "stage1_unit1_out": [("stage1_unit1_conv1", "stage1_unit1_conv2")],
    "stage2_unit1_out": [("stage2_unit1_conv1", "stage2_unit1_conv2")],
    "stage1_unit2_out": [("stage1_unit2_conv1", "stage1_unit2_conv2"),
                         ("stage1_unit2_conv2", "stage1_unit2_conv3")],
    "block_2_add": [("block_2_expand", "block_2_project")],
}


def _drop_weakest_inner_channels(teacher, hood, k):
  """Zeroes, in `teacher`, the inputs that the weakest inner channels of `hood` feed.

  The channels are chosen by hand as the L1-smallest output channels of each
  inner layer; with their contribution zeroed, a student keeping only the
  other channels computes exactly what the teacher computes.
  """
  for name, consumer in _INNER_AND_CONSUMER[hood.name]:
    kernel = teacher.get_layer(name).get_weights()[0]
    norms = [np.abs(kernel[..., c]).sum() for c in range(kernel.shape[-1])]
    dropped = np.argsort(norms, kind="stable")[:kernel.shape[-1] - int(k * kernel.shape[-1])]
    weights = teacher.get_layer(consumer).get_weights()
    weights[0][..., dropped, :] = 0.0
    teacher.get_layer(consumer).set_weights(weights)


class BottleneckTeacherInitTest(tf.test.TestCase, parameterized.TestCase):

  def _input(self, hood):
    return np.random.RandomState(3).normal(size=(4,) + hood.input_shape[1:]).astype("float32")

  def _teacher(self, kind):
    keras.utils.set_random_seed(1)
    if kind == "resnet":
      x, y = testing.images(32)
      return testing.trained(testing.tiny_resnet(), x, y)  # BatchNorm statistics not 0 and 1
    if kind == "resnet50":
      return testing.randomize_batch_norm(models.resnet50_v1(input_shape=(32, 32, 3),
                                                             num_classes=3))
    return testing.randomize_batch_norm(
        keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=3))

  @parameterized.named_parameters(
      ("basic_unit", "resnet", "stage1_unit1_out"),
      ("downsampling_unit", "resnet", "stage2_unit1_out"),
      ("resnet50_unit", "resnet50", "stage1_unit2_out"),
      ("inverted_residual", "mobilenet", "block_2_add"))
  def test_keeping_the_strongest_channels_reproduces_a_teacher_without_the_weakest(self, kind,
                                                                                  name):
    teacher = self._teacher(kind)
    hood = _by_name(nd.split(teacher), name)
    _drop_weakest_inner_channels(teacher, hood, 0.5)
    student = nd.students.bottleneck(hood, 0.5, init="teacher")
    self.assertLess(student.count_params(), _params(hood.layers))
    a = self._input(hood)
    self.assertAllClose(student(a, training=False), hood.teacher(a, training=False),
                        atol=1e-4, rtol=1e-4)

  @parameterized.named_parameters(("resnet", "resnet", "stage2_unit1_out"),
                                  ("resnet50", "resnet50", "stage1_unit2_out"),
                                  ("mobilenet", "mobilenet", "block_2_add"))
  def test_k_1_from_the_teacher_is_the_teacher(self, kind, name):
    teacher = self._teacher(kind)
    hood = _by_name(nd.split(teacher), name)
    student = nd.students.bottleneck(hood, 1.0, init="teacher")
    a = self._input(hood)
    self.assertAllClose(student(a, training=False), hood.teacher(a, training=False), atol=1e-5)

  def test_the_teacher_is_left_unchanged(self):
    teacher = self._teacher("resnet")
    before = testing.weights_of(teacher)
    nd.students.bottleneck(nd.split(teacher)[1], 0.5, init="teacher")
    for old, new in zip(before, testing.weights_of(teacher)):
      self.assertAllEqual(old, new)

  def test_random_init_differs_from_the_teacher(self):
    teacher = self._teacher("resnet")
    hood = _by_name(nd.split(teacher), "stage1_unit1_out")
    student = nd.students.bottleneck(hood, 1.0, init="random")
    a = self._input(hood)
    self.assertNotAllClose(student(a, training=False), hood.teacher(a, training=False))

  def test_unknown_init_is_named(self):
    hood = nd.split(testing.tiny_resnet())[1]
    with self.assertRaisesRegex(ValueError, "init.*'pruned'"):
      nd.students.bottleneck(hood, 0.5, init="pruned")


class CloneTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    x, y = testing.images(32)
    # Trained, so BatchNorm moving statistics are not their initial 0 and 1.
    cls.teacher = testing.trained(testing.tiny_resnet(), x, y)
    cls.hoods = nd.split(cls.teacher)

  def _input(self, hood):
    return np.random.RandomState(3).normal(size=(4,) + hood.input_shape[1:]).astype("float32")

  @parameterized.named_parameters(
      ("stem", "stem_relu"), ("unit", "stage1_unit1_out"),
      ("downsampling_unit", "stage2_unit1_out"), ("head", "head_logits"))
  def test_clone_from_teacher_reproduces_teacher_outputs(self, name):
    hood = _by_name(self.hoods, name)
    student = nd.students.clone(hood, init="teacher")
    a = self._input(hood)
    self.assertAllClose(student(a, training=False), hood.teacher(a, training=False), atol=1e-5)
    self.assertEqual(student.name, f"{name}_clone")

  def test_clone_shares_no_layer_or_weight_with_teacher(self):
    hood = _by_name(self.hoods, "stage2_unit1_out")
    student = nd.students.clone(hood)
    self.assertEmpty({id(layer) for layer in student.layers} &
                     {id(layer) for layer in self.teacher.layers})
    self.assertEmpty({id(w) for w in student.weights} & {id(w) for w in self.teacher.weights})
    before = testing.weights_of(self.teacher)
    for weight in student.weights:
      weight.assign(weight + 1.0)
    for old, new in zip(before, testing.weights_of(self.teacher)):
      self.assertAllEqual(old, new)

  def test_clone_random_init_differs_from_teacher(self):
    hood = _by_name(self.hoods, "stage1_unit1_out")
    student = nd.students.clone(hood, init="random")
    a = self._input(hood)
    self.assertNotAllClose(student(a, training=False), hood.teacher(a, training=False))
    self.assertEqual(student.count_params(), _params(hood.layers))

  @parameterized.named_parameters(("unknown", "zeros"), ("none", None), ("capitalised", "Teacher"))
  def test_clone_rejects_unknown_init(self, init):
    with self.assertRaisesRegex(ValueError, rf"init.*{init!r}"):
      nd.students.clone(self.hoods[1], init=init)


if __name__ == "__main__":
  tf.test.main()
