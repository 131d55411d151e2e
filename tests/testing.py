"""Builders shared by the test suites: tiny models and data, fast to build and train."""

import contextlib
import functools
import os
from unittest import mock

import numpy as np

from keras_nd import models
from keras_nd._keras import keras, tf

L = keras.layers


def tiny_resnet(input_shape=(8, 8, 3), num_classes=3, seed=0, softmax=False):
  """A ResNet-8 (stem, three basic units, head) from the project's builders."""
  keras.utils.set_random_seed(seed)
  model = models.resnet_v1(depth=8, input_shape=input_shape, num_classes=num_classes,
                           weight_decay=0.0)
  if softmax:
    model = keras.Model(model.inputs, L.Softmax(name="probabilities")(model.outputs[0]),
                        name=model.name + "_softmax")
  return model


def tiny_chain(input_shape=(8, 8, 3), num_classes=3, seed=0):
  """A plain VGG-like chain: conv-bn-relu-pool, conv-relu, flatten, dense."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(input_shape, name="image")
  x = L.Conv2D(4, 3, padding="same", name="c1")(inputs)
  x = L.BatchNormalization(name="bn1")(x)
  x = L.ReLU(name="r1")(x)
  x = L.MaxPooling2D(name="p1")(x)
  x = L.Conv2D(6, 3, padding="same", name="c2")(x)
  x = L.ReLU(name="r2")(x)
  x = L.Flatten(name="flat")(x)
  outputs = L.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="tiny_chain")


def own_cnn(input_shape=(8, 8, 3), num_classes=3, seed=0, width=8, rescale=False):
  """A user's own CNN, not a ResNet of the project's: a stem, a plain chain of two
  conv-BN-ReLU layers, two residual blocks, a head; Keras's default BatchNorm momentum. With
  `rescale`, its first layer maps raw 8-bit pixels to [0, 1] (it preprocesses its own images)."""
  keras.utils.set_random_seed(seed)

  def conv_bn_relu(x, name, filters=width):
    x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)

  inputs = keras.Input(input_shape, name="image")
  x = L.Rescaling(1 / 255, name="rescale")(inputs) if rescale else inputs
  x = conv_bn_relu(x, "stem")
  x = conv_bn_relu(x, "chain1")
  x = conv_bn_relu(x, "chain2")
  for block in ("block1", "block2"):
    y = conv_bn_relu(x, f"{block}_a")
    y = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"{block}_b_conv")(y)
    y = L.BatchNormalization(name=f"{block}_b_bn")(y)
    x = L.ReLU(name=f"{block}_out")(L.Add(name=f"{block}_add")([x, y]))
  x = L.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, L.Dense(num_classes, name="logits")(x), name="own_cnn")


def two_inputs():
  """A functional model with two inputs (which keras_nd refuses)."""
  a, b = keras.Input((3,)), keras.Input((3,))
  return keras.Model([a, b], L.Add()([L.Dense(2)(a), L.Dense(2)(b)]), name="two_in")


def two_outputs():
  """A functional model with two outputs (which keras_nd refuses)."""
  a = keras.Input((3,))
  return keras.Model(a, [L.Dense(2)(a), L.Dense(3)(a)], name="two_out")


def images(n=64, shape=(8, 8, 3), num_classes=3, seed=0):
  """Random images and labels that a model can partly learn (the label is in the mean)."""
  rng = np.random.RandomState(seed)
  y = rng.randint(0, num_classes, n)
  x = rng.normal(size=(n,) + tuple(shape)).astype("float32") + y[:, None, None, None] * 0.5
  return x, y


def assert_over_whole_split(test, accuracy, num_examples):
  """`accuracy` was measured over all `num_examples` of a split: a whole number of them is right
  (not a batch, not another split)."""
  test.assertAlmostEqual(accuracy * num_examples, round(accuracy * num_examples), places=3)


def trained(model, x, y, epochs=1):
  """`model` after a short fit, with BatchNorm statistics that differ from their initial values."""
  model.compile(keras.optimizers.Adam(1e-2),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
  return model


def dataset(x, y=None, batch_size=16):
  data = x if y is None else (x, y)
  return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)


def weights_of(model):
  return [w.numpy().copy() for w in model.weights]


def randomize_batch_norm(model, seed=0):
  """Gives every BatchNormalization layer random affine weights and statistics, as training would.

  Freshly built BN layers are the identity at inference, which would hide a
  sub-model that forgets them or runs them in training mode.
  """
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, L.BatchNormalization):
      values = []
      for weight in layer.weights:
        if "gamma" in weight.name or "moving_variance" in weight.name:
          values.append(rng.uniform(0.5, 1.5, weight.shape))
        else:
          values.append(rng.normal(0.0, 0.1, weight.shape))
      layer.set_weights(values)
  return model


def reference_teachers(input_shape=(32, 32, 3), num_classes=4, seed=0):
  """The architectures the paper distils, at a small input size: {name: model}.

  The project's ResNet-20 and ResNet-50 and keras.applications' ResNet50 and
  MobileNetV2 (`weights=None`: nothing is downloaded), all with logits out
  and random BatchNorm statistics (see `randomize_batch_norm`).
  """
  keras.utils.set_random_seed(seed)
  teachers = {
      "resnet20": models.resnet_v1(depth=20, input_shape=input_shape, num_classes=num_classes),
      "resnet50_v1": models.resnet50_v1(input_shape=input_shape, num_classes=num_classes),
      "keras_resnet50": keras.applications.ResNet50(
          weights=None, input_shape=input_shape, classes=num_classes, classifier_activation=None),
      "keras_mobilenet_v2": keras.applications.MobileNetV2(
          weights=None, input_shape=input_shape, classes=num_classes, classifier_activation=None),
  }
  for i, model in enumerate(teachers.values()):
    randomize_batch_norm(model, seed + i)
  return teachers


@functools.lru_cache(maxsize=None)
def mirrored_strategy():
  """The one MirroredStrategy over the two logical CPUs of conftest.py, shared by all tests.

  A second MirroredStrategy on the same devices restarts the collective
  all-reduce instance keys and its first step fails with "Shape mismatch in the
  collective instance 100" (tensorflow/tensorflow#62790), so tests must not
  create their own.
  """
  return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@contextlib.contextmanager
def mock_tfds(num_examples):
  """`tfds.testing.mock_data` under which keras_nd.data.load_tfds accepts the mocked datasets.

  mock_data (tfds 4.9.10) replaces `as_dataset` with random examples but not
  `is_prepared`, which still looks for real files: the loader checks it so
  as to never download, so it must be told the mocked dataset is prepared.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=num_examples), mock.patch.object(
      tfds.core.DatasetBuilder, "is_prepared", return_value=True):
    yield


def tensorboard_logs(directory):
  """What TensorBoard would read under `directory`: {run: {tag: {step: value}}}, a run being
  an event directory's path relative to `directory` ("kd-k0.5/train"); a scalar's value is a
  float, an image's its (width, height) as written."""
  logs = {}
  event_files = [os.path.join(folder, name) for folder, _, names in os.walk(directory)
                 for name in names if name.startswith("events.out.tfevents.")]
  for event_file in sorted(event_files):
    run = os.path.relpath(os.path.dirname(event_file), directory)
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if value.metadata.plugin_data.plugin_name == "images":
          array = tuple(int(v) for v in array[:2])
        else:
          array = float(array)
        logs.setdefault(run, {}).setdefault(value.tag, {})[event.step] = array
  return logs
