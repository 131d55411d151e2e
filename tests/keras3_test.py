"""Tests for Keras 3 models in and out: keras_nd.keras3, keras3_layers, keras3_ops, and files'
Keras 3 loading and export."""

import json
import os
import subprocess
import sys
import zipfile
from unittest import mock

import keras as k3  # Keras 3: what users hand in and what export_keras3 must satisfy
import numpy as np
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import files, keras3, keras3_ops, sparsity
from keras_nd._keras import keras, tf
from keras_nd.data.dataset import Dataset
from keras_nd.experiments.teacher import load_teacher
from tests import testing

K3 = k3.layers


def _rng(seed=0):
  return np.random.default_rng(seed)


def _close(test, got, want):
  """Outputs equal within 1e-5 of the largest output (the converter's own promise)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  test.assertEqual(got.shape, want.shape)
  test.assertLessEqual(np.max(np.abs(got - want)), 1e-5 * max(np.max(np.abs(want)), 1e-30))


def _modules(config):
  if isinstance(config, dict):
    found = [config["module"]] if isinstance(config.get("module"), str) else []
    return found + [m for value in config.values() for m in _modules(value)]
  if isinstance(config, list):
    return [m for value in config for m in _modules(value)]
  return []


def _file_modules(path):
  with zipfile.ZipFile(path) as archive:
    return set(_modules(json.loads(archive.read("config.json"))))


def k3_cnn(seed=0, input_shape=(8, 8, 3), num_classes=3):
  """A small Keras 3 CNN with a residual unit: a teacher as a Keras 3 user would write it."""
  k3.utils.set_random_seed(seed)
  inputs = k3.Input(input_shape, name="image")
  x = K3.Rescaling(0.5, name="rescale")(inputs)
  x = K3.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(x)
  x = K3.BatchNormalization(name="stem_bn")(x)
  x = K3.ReLU(name="stem_relu")(x)
  y = K3.Conv2D(8, 3, padding="same", use_bias=False, name="unit_conv1")(x)
  y = K3.BatchNormalization(name="unit_bn1")(y)
  y = K3.Activation("relu6", name="unit_relu1")(y)
  y = K3.Conv2D(8, 3, padding="same", use_bias=False, name="unit_conv2")(y)
  y = K3.BatchNormalization(name="unit_bn2")(y)
  x = K3.ReLU(name="unit_out")(K3.Add(name="unit_add")([x, y]))
  x = K3.GlobalAveragePooling2D(name="pool")(x)
  return k3.Model(inputs, K3.Dense(num_classes, name="logits")(x), name="k3_cnn")


def _randomize_batch_norm(model, seed=0):
  rng = _rng(seed)
  for layer in model.layers:
    if isinstance(layer, K3.BatchNormalization):
      for weight in layer.weights:
        low_high = (0.5, 1.5) if weight.name in ("gamma", "moving_variance") else (-0.2, 0.2)
        weight.assign(rng.uniform(*low_high, weight.shape).astype("float32"))
  return model


def k3_layer_zoo():
  """One Keras 3 model through many of the layer types keras.applications use, with a residual
  branch, raw operations on constants and activations tf_keras lacks or defines otherwise."""
  k3.utils.set_random_seed(1)
  inputs = k3.Input((8, 8, 3), name="zoo_in")
  x = K3.Rescaling(1 / 2, offset=0.1)(inputs)
  x = K3.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 0.5])(x)
  y = K3.Conv2D(8, 3, padding="same", activation="hard_sigmoid",
                kernel_regularizer=k3.regularizers.L2(1e-4),
                kernel_constraint=k3.constraints.MaxNorm(3.0))(x)
  y = K3.BatchNormalization(epsilon=1e-3)(y)
  y = K3.LeakyReLU(negative_slope=0.1)(y)
  z = K3.DepthwiseConv2D(3, padding="same", activation="relu6")(y)
  z = K3.SeparableConv2D(8, 3, padding="same", activation="hard_swish")(z)
  z = K3.PReLU(shared_axes=[1, 2], alpha_initializer=k3.initializers.Constant(0.2))(z)
  z = K3.LayerNormalization()(z)
  z = K3.GroupNormalization(groups=2)(z)
  x = K3.Add()([y, z])
  x = K3.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)  # MobileNetV3's hard sigmoid: Add and Multiply nodes
  x = k3.ops.maximum(-x / 2.0, -0.4) - 0.1
  x = K3.ZeroPadding2D(1)(x)
  x = K3.Cropping2D(1)(x)
  x = K3.Conv2DTranspose(6, 3, strides=2, padding="same", activation="elu")(x)
  x = K3.MaxPooling2D()(x)
  x = K3.AveragePooling2D(2, padding="same")(x)
  x = K3.UpSampling2D()(x)
  x = K3.SpatialDropout2D(0.1)(x)
  x = K3.GaussianNoise(0.1)(x)
  x = K3.Dropout(0.2)(x)
  a = K3.GlobalAveragePooling2D(keepdims=True)(x)
  x = K3.Multiply()([x, K3.Activation("sigmoid")(a)])
  x = K3.Concatenate()([K3.Subtract()([x, a]), K3.Average()([x, a]), K3.Maximum()([x, a]),
                        K3.Minimum()([x, a])])
  x = K3.Permute((2, 1, 3))(x)
  x = K3.Reshape((64, 24))(x)
  x = K3.Conv1D(6, 3, activation="silu")(x)
  x = K3.MaxPooling1D()(x)
  x = K3.Identity()(x)
  x = K3.ELU()(K3.Flatten()(x))
  x = K3.Dense(5, activation="gelu")(x)
  x = K3.Dense(4, activation="log_softmax")(x)
  return k3.Model(inputs, K3.Softmax()(x), name="zoo")


def k3_operations():
  """A Keras 3 model of operation nodes only, one output each (a tensor with a constant, two
  tensors, reductions and reshapes)."""
  inputs = k3.Input((4, 6), name="ops_in")
  x, y = inputs, K3.Dense(6, name="other")(inputs)
  ops = k3.ops
  outputs = [
      x + 1.5, 2.0 - x, x * y, x / (ops.abs(y) + 1.0), ops.true_divide(x, 3.0), ops.maximum(x, y),
      ops.minimum(x, 0.5), ops.power(ops.abs(x) + 1.0, 2.0), ops.negative(x), ops.square(x),
      ops.sqrt(ops.abs(x)), ops.exp(x), ops.log(ops.abs(x) + 1.0), ops.sign(x), ops.floor(x),
      ops.ceil(x), ops.tanh(x), ops.sigmoid(x), ops.relu(x), ops.relu6(x), ops.silu(x),
      ops.hard_sigmoid(x), ops.hard_silu(x), ops.leaky_relu(x, 0.3), ops.elu(x, 0.5),
      ops.gelu(x), ops.softplus(x), ops.softmax(x, axis=1), ops.log_softmax(x),
      ops.clip(x, -0.5, 0.5), ops.mean(x, axis=1, keepdims=True), ops.sum(x, axis=-1),
      ops.max(x, axis=(1, 2)), ops.min(x, axis=1), ops.reshape(x, (-1, 24)),
      ops.transpose(x, (0, 2, 1)), ops.expand_dims(x, 1), ops.concatenate([x, y], axis=-1),
      ops.matmul(x, ops.transpose(y, (0, 2, 1))), x * np.linspace(-1, 1, 6, dtype="float32"),
  ]
  return k3.Model(inputs, outputs, name="operations")


class ApplicationsTest(tf.test.TestCase, parameterized.TestCase):
  """keras.applications models built by Keras 3 (weights=None, small inputs), converted."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    k3.utils.set_random_seed(0)
    small = dict(weights=None, input_shape=(32, 32, 3), classes=10)
    cls.models = {
        "mobilenet_v2": k3.applications.MobileNetV2(alpha=0.35, **small),
        "mobilenet_v3_small": k3.applications.MobileNetV3Small(**small),
        "efficientnet_b0": k3.applications.EfficientNetB0(**small),
    }
    for i, model in enumerate(cls.models.values()):
      _randomize_batch_norm(model, seed=i)
    cls.converted = {name: keras3.to_tf_keras(model) for name, model in cls.models.items()}
    cls.x = _rng(5).uniform(0, 255, (3, 32, 32, 3)).astype("float32")

  @parameterized.named_parameters((name, name) for name in (
      "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"))
  def test_application_converts_to_tf_keras_with_the_same_outputs(self, name):
    converted = self.converted[name]
    self.assertIsInstance(converted, keras.Model)
    self.assertFalse(keras3.is_keras3(converted))
    self.assertEqual(converted.name, self.models[name].name)
    _close(self, converted(self.x, training=False), self.models[name](self.x, training=False))

  def test_operation_nodes_and_keras3_activations_become_keras_nd_tf_keras_objects(self):
    converted = self.converted["mobilenet_v3_small"]
    ops = [layer for layer in converted.layers if isinstance(layer, keras3_ops.Keras3Op)]
    self.assertEqual(sorted({op.operation["class_name"] for op in ops}), ["Add", "Multiply"])
    self.assertIn(keras3_ops.hard_silu, [getattr(layer, "activation", None)
                                         for layer in converted.layers])

  def test_efficientnet_normalization_weights_are_copied_by_name(self):
    model = self.models["efficientnet_b0"]
    normalization = [layer for layer in model.layers if isinstance(layer, K3.Normalization)][0]
    rng = _rng(2)
    mean, variance = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    normalization.adapt_mean.assign(mean.astype("float32"))
    normalization.adapt_variance.assign(variance.astype("float32"))
    normalization.finalize_state()
    converted = keras3.to_tf_keras(model)
    self.assertIs(converted, self.converted["efficientnet_b0"])  # the same model, updated
    layer = converted.get_layer(normalization.name)
    self.assertAllClose(layer.adapt_mean.numpy(), mean)
    self.assertAllClose(layer.adapt_variance.numpy(), variance)
    _close(self, converted(self.x, training=False), model(self.x, training=False))

  def test_export_of_a_converted_application_loads_in_keras3_safe_mode(self):
    path = os.path.join(self.get_temp_dir(), "mobilenet_v3.keras")
    files.export_keras3(self.converted["mobilenet_v3_small"], path)
    self.assertTrue(all(m == "keras" or m.startswith("keras.") for m in _file_modules(path)))
    loaded = k3.saving.load_model(path, safe_mode=True)
    _close(self, loaded(self.x, training=False),
           self.models["mobilenet_v3_small"](self.x, training=False))


class ConversionTest(tf.test.TestCase, parameterized.TestCase):
  """Hand-built Keras 3 models, and what the converter refuses."""

  def test_layer_zoo_converts_and_exports_back_with_the_same_outputs(self):
    model = k3_layer_zoo()
    converted = keras3.to_tf_keras(model)
    x = _rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    _close(self, converted(x, training=False), model(x, training=False))
    # The residual branch stays a branch: the Add has two tf_keras inputs.
    add = [layer for layer in converted.layers if isinstance(layer, keras.layers.Add)][0]
    self.assertLen(add.input, 2)
    path = os.path.join(self.get_temp_dir(), "zoo.keras")
    files.export_keras3(converted, path)
    exported = k3.saving.load_model(path, safe_mode=True)
    self.assertEqual(sorted(type(layer).__name__ for layer in exported.layers),
                     sorted(type(layer).__name__ for layer in model.layers))
    _close(self, exported(x, training=False), model(x, training=False))

  def test_every_operation_converts_and_exports_back_with_the_same_outputs(self):
    model = k3_operations()
    converted = keras3.to_tf_keras(model)
    x = _rng(2).normal(size=(3, 4, 6)).astype("float32")
    for got, want in zip(converted(x), model(x)):
      _close(self, got, want)
    self.assertGreater(len([layer for layer in converted.layers
                            if isinstance(layer, keras3_ops.Keras3Op)]), len(model.outputs))
    exported = keras3.to_keras3(converted)
    self.assertEqual(sorted(type(op).__name__ for op in exported.operations),
                     sorted(type(op).__name__ for op in model.operations))
    for got, want in zip(exported(x), model(x)):
      _close(self, got, want)

  @parameterized.named_parameters((name, name) for name in sorted(keras3_ops.ACTIVATIONS))
  def test_activation_computes_keras3s_definition(self, name):
    x = np.linspace(-6, 6, 97, dtype="float32").reshape(1, 97)
    x = np.concatenate([x, x[:, ::-1] * 0.3], axis=0)
    want = k3.activations.get(name)(x)
    got = keras.activations.get(keras3_ops.ACTIVATIONS[name])(tf.constant(x))
    self.assertAllClose(got, want, atol=1e-6, rtol=1e-6)

  def test_application_layers_of_convnext_and_inception_resnet_convert_and_export(self):
    from keras.src.applications import convnext, inception_resnet_v2  # pylint: disable=g-import-not-at-top

    inputs = k3.Input((4, 4, 6))
    x = convnext.LayerScale(0.5, 6, name="scale")(K3.Dense(6)(inputs))
    x = convnext.StochasticDepth(0.1)(x)
    x = inception_resnet_v2.CustomScaleLayer(0.17, name="mix")([inputs, x])
    model = k3.Model(inputs, x)
    model.get_layer("scale").weights[0].assign(np.linspace(-1, 1, 6, dtype="float32"))
    converted = keras3.to_tf_keras(model)
    self.assertAllClose(converted.get_layer("scale").gamma, np.linspace(-1, 1, 6))
    x = _rng().normal(size=(2, 4, 4, 6)).astype("float32")
    _close(self, converted(x), model(x, training=False))
    path = os.path.join(self.get_temp_dir(), "applications.keras")
    files.export_keras3(converted, path)
    _close(self, k3.saving.load_model(path, safe_mode=True)(x), model(x, training=False))

  def test_keras3_and_tf_keras_hard_sigmoid_differ_and_the_conversion_keeps_keras3s(self):
    x = np.array([[-2.8, -1.0, 1.0, 2.8]], "float32")
    self.assertNotAllClose(keras.activations.hard_sigmoid(tf.constant(x)),
                           k3.activations.hard_sigmoid(x))
    inputs = k3.Input((4,))
    model = k3.Model(inputs, K3.Activation("hard_sigmoid")(inputs))
    self.assertAllClose(keras3.to_tf_keras(model)(x), k3.activations.hard_sigmoid(x))

  def test_mixed_precision_model_keeps_its_dtype_policies(self):
    inputs = k3.Input((8, 8, 3))
    x = K3.Conv2D(4, 3, dtype="mixed_float16", name="half")(inputs)
    x = K3.GlobalAveragePooling2D(dtype="mixed_float16")(x)
    model = k3.Model(inputs, K3.Dense(3, dtype="float32", name="out")(x))
    converted = keras3.to_tf_keras(model)
    self.assertEqual(converted.get_layer("half").dtype_policy.name, "mixed_float16")
    self.assertEqual(converted.get_layer("out").compute_dtype, "float32")

  def test_sequential_converts(self):
    model = k3.Sequential([k3.Input((6,)), K3.Dense(5, activation="tanh"), K3.Dropout(0.5),
                           K3.Dense(2)], name="seq")
    x = _rng().normal(size=(3, 6)).astype("float32")
    converted = keras3.to_tf_keras(model)
    self.assertEqual(converted.name, "seq")
    _close(self, converted(x), model(x))

  def test_nested_models_are_flattened_into_one_graph(self):
    inner_seq = k3.Sequential([K3.Dense(5, name="d"), K3.ReLU(name="r")], name="inner_seq")
    a = k3.Input((5,))
    inner_fn = k3.Model(a, K3.Dense(5, name="d")(a) + a, name="inner_fn")  # reuses the name "d"
    inputs = k3.Input((4,))
    x = inner_fn(inner_seq(inputs))
    model = k3.Model(inputs, inner_fn(x), name="outer")  # inner_fn is shared
    converted = keras3.to_tf_keras(model)
    self.assertFalse([layer for layer in converted.layers if isinstance(layer, keras.Model)])
    dense = [layer for layer in converted.layers if isinstance(layer, keras.layers.Dense)]
    self.assertLen(dense, 2)  # the shared model's Dense is one layer, called twice
    x = _rng().normal(size=(3, 4)).astype("float32")
    _close(self, converted(x), model(x))

  def test_custom_layer_is_refused_naming_it_and_its_class(self):

    class Doubler(K3.Layer):

      def call(self, x):
        return 2 * x

    inputs = k3.Input((3,))
    model = k3.Model(inputs, Doubler(name="twice")(K3.Dense(3)(inputs)))
    with self.assertRaisesRegex(ValueError, r"'twice' \(Doubler\).*built-in layers"):
      keras3.to_tf_keras(model)

  def test_lambda_layer_is_refused(self):
    inputs = k3.Input((3,))
    model = k3.Model(inputs, K3.Lambda(lambda x: x + 1, name="plus")(inputs))
    with self.assertRaisesRegex(ValueError, r"'plus' \(Lambda\) runs Python code"):
      keras3.to_tf_keras(model)

  def test_unknown_operation_is_refused_naming_it(self):
    inputs = k3.Input((3,))
    model = k3.Model(inputs, k3.ops.sin(inputs))
    with self.assertRaisesRegex(ValueError, r"Operation 'sin.*' \(Sin\).*'Sin'"):
      keras3.to_tf_keras(model)

  def test_subclassed_model_is_refused_naming_it(self):

    class Mine(k3.Model):

      def call(self, x):
        return x

    with self.assertRaisesRegex(TypeError, r"'mine'.*subclassed.*\(Mine\)"):
      nd.split(Mine(name="mine"))

  def test_two_inputs_and_two_outputs_are_refused_by_split(self):
    a, b = k3.Input((3,)), k3.Input((3,))
    two_in = k3.Model([a, b], K3.Add()([K3.Dense(2)(a), K3.Dense(2)(b)]), name="two_in")
    two_out = k3.Model(a, [K3.Dense(2)(a), K3.Dense(3)(a)], name="two_out")
    with self.assertRaisesRegex(ValueError, "'two_in' has 2 inputs and 1 outputs"):
      nd.split(two_in)
    with self.assertRaisesRegex(ValueError, "'two_out' has 1 inputs and 2 outputs"):
      nd.split(two_out)

  def test_a_conversion_that_computes_otherwise_is_refused(self):
    model = k3_cnn()
    with mock.patch.object(keras3.keras3_layers, "copy_weights"):  # weights left as initialised
      with self.assertRaisesRegex(ValueError, "'k3_cnn' computes other outputs"):
        keras3.to_tf_keras(model)

  def test_converted_model_saves_and_loads_in_tf_keras_safe_mode(self):
    model = k3_layer_zoo()
    path = os.path.join(self.get_temp_dir(), "zoo.keras")
    keras3.to_tf_keras(model).save(path)
    reloaded = files.load_model(path)
    self.assertFalse(keras3.is_keras3(reloaded))
    x = _rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    _close(self, reloaded(x, training=False), model(x, training=False))


class TeacherTest(tf.test.TestCase):
  """A Keras 3 teacher through keras_nd's entry points, and back out to Keras 3."""

  def setUp(self):
    super().setUp()
    self.teacher = _randomize_batch_norm(k3_cnn())
    self.x, self.y = testing.images(n=32)

  def test_one_conversion_serves_split_source_and_compose(self):
    hoods = nd.split(self.teacher)
    converted = keras3.to_tf_keras(self.teacher)
    self.assertIs(hoods[0].model, converted)
    self.assertEqual([h.name for h in hoods], ["stem_relu", "unit_out", "logits"])
    source = nd.ActivationSource(self.teacher, hoods, self.x, verbose=0)
    a, t = next(iter(source.dataset(batch_size=8, shuffle=False)))[hoods[1].name][:2]
    _close(self, hoods[1].teacher(a), t)
    student = nd.compose(self.teacher, {hoods[1]: hoods[1].teacher})
    _close(self, student(self.x), self.teacher(self.x, training=False))

  def test_changed_keras3_weights_are_copied_again_into_the_same_conversion(self):
    converted = keras3.to_tf_keras(self.teacher)
    kernel = self.teacher.get_layer("logits").kernel
    kernel.assign(kernel.numpy() * 3.0)
    self.assertIs(keras3.to_tf_keras(self.teacher), converted)
    _close(self, converted(self.x), self.teacher(self.x, training=False))

  def test_calibrate_batch_norm_changes_the_keras3_model(self):
    before = self.teacher.get_layer("stem_bn").moving_mean.numpy().copy()
    nd.calibrate_batch_norm(self.teacher, self.x, steps=2)
    after = self.teacher.get_layer("stem_bn").moving_mean.numpy()
    self.assertNotAllClose(after, before)
    self.assertAllClose(keras3.to_tf_keras(self.teacher).get_layer("stem_bn").moving_mean, after)

  def test_knowledge_distiller_takes_a_keras3_teacher_and_refuses_a_keras3_student(self):
    student = nd.compose(self.teacher, {})
    kd = nd.KnowledgeDistiller(teacher=self.teacher, student=student)
    self.assertIs(kd.student, student)
    with self.assertRaisesRegex(TypeError, "student 'k3_cnn' is a Keras 3 model"):
      nd.KnowledgeDistiller(teacher=student, student=self.teacher)

  def test_keras3_teacher_end_to_end_to_a_keras3_file(self):
    hoods = nd.split(self.teacher)
    source = nd.ActivationSource(self.teacher, hoods, self.x, verbose=0)
    students = {hoods[1]: nd.students.bottleneck(hoods[1], k=0.5)}
    nd.reconstruct(students, source)
    distiller = nd.NeighbourhoodDistiller(students, calibrate_steps=0)
    distiller.compile(optimizer="adam")
    distiller.fit(source.dataset(batch_size=16), epochs=1, verbose=0)
    student = nd.compose(self.teacher, students)
    self.assertLess(student.count_params(), keras3.to_tf_keras(self.teacher).count_params())
    path = os.path.join(self.get_temp_dir(), "student.keras")
    self.assertEqual(files.export_keras3(student, path), path)
    self.assertTrue(all(m == "keras" or m.startswith("keras.") for m in _file_modules(path)))
    loaded = k3.saving.load_model(path, safe_mode=True)
    self.assertIsInstance(loaded, k3.Model)
    _close(self, loaded(self.x, training=False), student(self.x, training=False))

  def test_keras3_file_loads_as_tf_keras_as_the_binaries_load_teachers(self):
    inputs = k3.Input((8, 8, 3))
    x = K3.GlobalAveragePooling2D()(inputs)
    # One answer whatever the images: the same score however they are preprocessed.
    logits = K3.Dense(3, kernel_initializer="zeros", bias_initializer=k3.initializers.Constant(
        [1.0, 0.0, 0.0]))(x)
    path = os.path.join(self.get_temp_dir(), "teacher.keras")
    k3.Model(inputs, logits, name="k3_teacher").save(path)
    self.assertEqual(files.keras_version(path), k3.__version__)
    data = Dataset.from_arrays("tiny", (self.x, self.y % 3), (self.x[:8], self.y[:8] % 3))
    teacher = load_teacher(path, data)
    self.assertIsInstance(teacher, keras.Model)
    self.assertEqual(teacher.name, "k3_teacher")
    self.assertAllClose(teacher(self.x[:2]), [[1.0, 0.0, 0.0]] * 2)

  def test_corrupt_keras3_file_is_refused_naming_it(self):
    path = os.path.join(self.get_temp_dir(), "teacher.keras")
    self.teacher.save(path)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])
    with self.assertRaisesRegex(ValueError, f"'{path}' is not a readable Keras model"):
      files.load_model(path)
    with zipfile.ZipFile(path + ".keras", "w") as archive:  # metadata says Keras 3, no model
      archive.writestr("metadata.json", json.dumps({"keras_version": k3.__version__}))
      archive.writestr("config.json", "{not json")
    with self.assertRaisesRegex(ValueError, f"'{path}.keras' is not a readable Keras model"):
      files.load_model(path + ".keras")


class ExportTest(tf.test.TestCase):
  """files.export_keras3: Keras 3 built-ins only, the same outputs, complete or absent."""

  def setUp(self):
    super().setUp()
    self.path = os.path.join(self.get_temp_dir(), "out.keras")
    self.x = _rng(4).normal(size=(2, 8, 8, 3)).astype("float32")

  def test_project_resnet_exports_its_zero_pad_shortcuts_as_keras3_built_ins(self):
    model = testing.randomize_batch_norm(testing.tiny_resnet(input_shape=(8, 8, 3)))
    self.assertTrue(any(type(layer).__name__ == "ZeroPadShortcut" for layer in model.layers))
    files.export_keras3(model, self.path)
    modules = _file_modules(self.path)
    self.assertTrue(all(m == "keras" or m.startswith("keras.") for m in modules), modules)
    loaded = k3.saving.load_model(self.path, safe_mode=True)
    _close(self, loaded(self.x, training=False), model(self.x, training=False))

  def test_tf_keras_hard_sigmoid_exports_as_keras3_operations(self):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="hard_sigmoid")(inputs))
    files.export_keras3(model, self.path)
    loaded = k3.saving.load_model(self.path, safe_mode=True)
    x = _rng().normal(size=(5, 4)).astype("float32") * 4
    _close(self, loaded(x), model(x))

  def test_pruned_student_of_a_keras3_teacher_keeps_its_zeros(self):
    teacher = k3_cnn()
    hood = nd.split_layers(teacher)[1]
    x, _ = testing.images(n=32)
    students = sparsity.sparse_students([hood], 0.5, steps=4, kind="constant")
    source = nd.ActivationSource(teacher, [hood], x, verbose=0)
    distiller = nd.NeighbourhoodDistiller(students, calibrate_steps=0)
    distiller.compile(optimizer="adam")
    distiller.fit(source.dataset(batch_size=8), epochs=1, verbose=0)
    name = hood.layers[0].name + sparsity.SUFFIX
    kernel = nd.compose(teacher, students).get_layer(name).kernel.numpy()
    self.assertGreaterEqual(int(np.sum(kernel == 0)), kernel.size // 2)
    wrapped = nd.substitute(teacher, students)  # export strips the pruning wrappers itself
    self.assertTrue(sparsity.prunes(wrapped))
    files.export_keras3(wrapped, self.path)
    loaded = k3.saving.load_model(self.path, safe_mode=True)
    self.assertAllEqual(loaded.get_layer(name).kernel.numpy() == 0, kernel == 0)

  def test_failed_export_leaves_nothing_at_the_path(self):

    class Mine(keras.layers.Layer):

      def call(self, x):
        return x

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Mine(name="mine")(keras.layers.Dense(2)(inputs)))
    with self.assertRaisesRegex(ValueError, r"'mine' \(Mine\) has no Keras 3 built-in"):
      files.export_keras3(model, self.path)
    self.assertEqual(os.listdir(self.get_temp_dir()), [])
    good = testing.tiny_chain()
    with mock.patch.object(keras3, "check_outputs", side_effect=ValueError("differs")):
      with self.assertRaisesRegex(ValueError, "differs"):
        files.export_keras3(good, self.path)
    self.assertEqual(os.listdir(self.get_temp_dir()), [])

  def test_export_refuses_a_path_without_keras_suffix_and_a_subclassed_model(self):
    with self.assertRaisesRegex(ValueError, "must end in '.keras'"):
      files.export_keras3(testing.tiny_chain(), self.path[:-6] + ".h5")

    class Sub(keras.Model):

      def call(self, x):
        return x

    with self.assertRaisesRegex(TypeError, "'sub' is a subclassed"):
      files.export_keras3(Sub(name="sub"), self.path)


class LazyImportTest(tf.test.TestCase):

  def test_importing_keras_nd_does_not_import_keras3(self):
    code = "import sys, keras_nd; print('keras.src.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    self.assertEqual(out.stdout.strip(), "False")


if __name__ == "__main__":
  tf.test.main()
