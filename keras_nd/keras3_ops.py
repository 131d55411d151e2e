"""What Keras 3 computes and tf_keras has no name for: Keras 3's activations and operations.

Keras 3 defines some activations that tf_keras lacks (`relu6`, `hard_silu`,
`log_softmax`, ...) and one differently (Keras 3's `hard_sigmoid` is
`relu6(x + 3) / 6`, tf_keras's `clip(0.2 x + 0.5, 0, 1)`), and a Keras 3
functional graph can hold raw operations (`x + 3.0` is a `keras.ops.add` node).
Each gets a tf_keras counterpart here, registered under the package
"keras_nd" so that models holding them save and load in safe mode: the
activations as functions with Keras 3's definitions, the operations as one
layer, `Keras3Op`, which keeps the Keras 3 operation's own serialisation (so
that `keras_nd.files.export_keras3` writes it back as the same node).
"""

import inspect

import numpy as np

from keras_nd._keras import keras, keras3, tf

__all__ = ["ACTIVATIONS", "Keras3Op", "LayerScale", "OPERATIONS", "operation",
           "constant_argument", "tensor_argument", "tf_keras_activation"]


def _register(fn):
  return keras.utils.register_keras_serializable(package="keras_nd")(fn)


# Keras 3's definitions (keras.src.backend.tensorflow.nn), at their default arguments: a layer's
# activation is given by name, so only the defaults can occur.
@_register
def relu6(x):
  return tf.nn.relu6(x)


@_register
def leaky_relu(x):
  return tf.nn.leaky_relu(x, alpha=0.2)


@_register
def hard_sigmoid(x):
  return tf.nn.relu6(x + 3.0) / 6.0


@_register
def hard_silu(x):
  return x * hard_sigmoid(x)


@_register
def log_softmax(x):
  return tf.nn.log_softmax(x, axis=-1)


@_register
def log_sigmoid(x):
  return tf.math.log_sigmoid(x)


@_register
def celu(x):
  return tf.maximum(x, 0.0) + tf.math.expm1(tf.minimum(x, 0.0))


@_register
def hard_tanh(x):
  return tf.clip_by_value(x, -1.0, 1.0)


@_register
def tanh_shrink(x):
  return x - tf.math.tanh(x)


@_register
def soft_shrink(x):
  return tf.where(x > 0.5, x - 0.5, tf.where(x < -0.5, x + 0.5, tf.zeros_like(x)))


@_register
def hard_shrink(x):
  return tf.where(tf.abs(x) > 0.5, x, tf.zeros_like(x))


@_register
def squareplus(x):
  return (x + tf.sqrt(tf.square(x) + 4.0)) / 2.0


@_register
def sparse_plus(x):
  return tf.where(x <= -1.0, tf.zeros_like(x), tf.where(x < 1.0, (x + 1.0)**2 / 4.0, x))


@_register
def sparse_sigmoid(x):
  return tf.where(x <= -1.0, tf.zeros_like(x),
                  tf.where(x >= 1.0, tf.ones_like(x), 0.5 * (x + 1.0)))


# Keras 3's activation names -> tf_keras's: the same function under the same or another name, or
# one of the functions above (under Keras 3's name).
ACTIVATIONS = dict(
    {name: name for name in ("elu", "exponential", "gelu", "linear", "mish", "relu", "selu",
                             "sigmoid", "softmax", "softplus", "softsign", "tanh")},
    silu="swish", swish="swish", hard_swish=hard_silu,
    **{fn.__name__: fn for fn in (
        relu6, leaky_relu, hard_sigmoid, hard_silu, log_softmax, log_sigmoid, celu, hard_tanh,
        tanh_shrink, soft_shrink, hard_shrink, squareplus, sparse_plus, sparse_sigmoid)})


def tf_keras_activation(name, where):
  """The tf_keras activation (a name or a registered function) computing Keras 3's `name`.

  Raises:
    ValueError: an activation that is not one of Keras 3's by name (a
      custom function), naming `where` (the layer).
  """
  if not isinstance(name, str) or name not in ACTIVATIONS:
    raise ValueError(
        f"{where} uses the activation {name!r}, which keras_nd cannot convert to tf_keras; "
        f"it converts Keras 3's built-in activations by name: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


# Keras 3 operations (by class name; keras.ops.numpy and keras.ops.nn) -> a TensorFlow function
# taking the operation's tensor arguments positionally and its configuration as keywords.
OPERATIONS = {
    "Add": lambda x, y: tf.add(x, y),
    "Subtract": lambda x, y: tf.subtract(x, y),
    "Multiply": lambda x, y: tf.multiply(x, y),
    "Divide": lambda x, y: tf.math.truediv(x, y),
    "TrueDivide": lambda x, y: tf.math.truediv(x, y),
    "Maximum": lambda x, y: tf.maximum(x, y),
    "Minimum": lambda x, y: tf.minimum(x, y),
    "Power": lambda x, y: tf.pow(x, y),
    "Matmul": lambda x, y: tf.linalg.matmul(x, y),
    "Negative": lambda x: tf.negative(x),
    "Absolute": lambda x: tf.abs(x),
    "Abs": lambda x: tf.abs(x),
    "Square": lambda x: tf.square(x),
    "Sqrt": lambda x: tf.sqrt(x),
    "Rsqrt": lambda x: tf.math.rsqrt(x),
    "Reciprocal": lambda x: tf.math.reciprocal(x),
    "Exp": lambda x: tf.exp(x),
    "Log": lambda x: tf.math.log(x),
    "Erf": lambda x: tf.math.erf(x),
    "Sign": lambda x: tf.sign(x),
    "Floor": lambda x: tf.floor(x),
    "Ceil": lambda x: tf.math.ceil(x),
    "Tanh": lambda x: tf.tanh(x),
    "Sigmoid": lambda x: tf.sigmoid(x),
    "Relu": lambda x: tf.nn.relu(x),
    "Relu6": lambda x: tf.nn.relu6(x),
    "Silu": lambda x: tf.nn.silu(x),
    "Selu": lambda x: tf.nn.selu(x),
    "Softplus": lambda x: tf.math.softplus(x),
    "Softsign": lambda x: tf.nn.softsign(x),
    "HardSigmoid": hard_sigmoid,
    "HardSilu": hard_silu,
    "LeakyRelu": lambda x, negative_slope=0.2: tf.nn.leaky_relu(x, alpha=negative_slope),
    "Elu": lambda x, alpha=1.0: tf.where(x > 0, x, alpha * tf.math.expm1(x)),
    "Gelu": lambda x, approximate=True: tf.nn.gelu(x, approximate=approximate),
    "Softmax": lambda x, axis=-1: tf.nn.softmax(x, axis=axis),
    "LogSoftmax": lambda x, axis=-1: tf.nn.log_softmax(x, axis=axis),
    "Clip": lambda x, x_min, x_max: tf.clip_by_value(x, x_min, x_max),
    "Mean": lambda x, axis=None, keepdims=False: tf.reduce_mean(x, axis, keepdims),
    "Sum": lambda x, axis=None, keepdims=False: tf.reduce_sum(x, axis, keepdims),
    "Max": lambda x, axis=None, keepdims=False: tf.reduce_max(x, axis, keepdims),
    "Min": lambda x, axis=None, keepdims=False: tf.reduce_min(x, axis, keepdims),
    "Reshape": lambda x, newshape: tf.reshape(x, newshape),
    "Transpose": lambda x, axes=None: tf.transpose(x, axes),
    "Squeeze": lambda x, axis=None: tf.squeeze(x, axis),
    "ExpandDims": lambda x, axis: tf.expand_dims(x, axis),
    "Concatenate": lambda xs, axis=0: tf.concat(xs, axis),
}

_INPUT = "keras_nd_input"  # marks the place of a tensor input among an operation's arguments
_CONSTANT = "keras_nd_constant"  # marks an array constant (kept with its dtype)


def tensor_argument(index):
  """The mark, among a `Keras3Op`'s arguments, of its `index`-th tensor input."""
  return {_INPUT: index}


def constant_argument(array):
  """An array constant among a `Keras3Op`'s arguments, as its configuration keeps it."""
  array = np.asarray(array)
  return {_CONSTANT: array.tolist(), "dtype": array.dtype.name}


def operation(class_name, module="numpy"):
  """Keras 3's serialisation of its operation `class_name` (of keras.ops' `module`)."""
  return {"module": f"keras.src.ops.{module}", "class_name": class_name, "config": {},
          "registered_name": class_name}


def _fill(value, inputs, array):
  """An operation's arguments with its tensor inputs in place, and array constants made by
  `array(values, dtype)`."""
  if isinstance(value, dict) and set(value) == {_INPUT}:
    return inputs[value[_INPUT]]
  if isinstance(value, dict) and set(value) == {_CONSTANT, "dtype"}:
    return array(value[_CONSTANT], value["dtype"])
  if isinstance(value, (list, tuple)):
    return [_fill(v, inputs, array) for v in value]
  return value


@keras.utils.register_keras_serializable(package="keras_nd")
class Keras3Op(keras.layers.Layer):
  """A Keras 3 operation node (`x + 3.0`, `keras.ops.mean(x, axis=1)`) as a tf_keras layer.

  Args:
    operation: Keras 3's serialisation of the operation
      (`{"module", "class_name", "config"}`); `class_name` must be one of
      `OPERATIONS`.
    arguments: the positional arguments it was called with, each tensor
      replaced by `{"keras_nd_input": i}` for the layer's i-th input, the
      others constants (numbers, nested lists).
    **kwargs: passed on to `keras.layers.Layer`.

  Raises:
    ValueError: an operation not in `OPERATIONS`, or arguments it does not
      take.
  """

  def __init__(self, operation, arguments, **kwargs):
    super().__init__(**kwargs)
    self.operation = dict(operation)
    self.arguments = list(arguments)
    name = self.operation.get("class_name")
    if name not in OPERATIONS:
      raise ValueError(f"The Keras 3 operation '{name}' has no tf_keras counterpart in keras_nd; "
                       f"it converts {sorted(OPERATIONS)}.")
    self._options = {k: v for k, v in self.operation.get("config", {}).items()
                     if k != "name" and v is not None}
    self._fn = OPERATIONS[name]
    try:
      inspect.signature(self._fn).bind(*self.arguments, **self._options)
    except TypeError as e:
      raise ValueError(f"The Keras 3 operation '{name}' is called with arguments or options "
                       f"keras_nd does not convert ({e}): options {self._options}.") from None

  def call(self, inputs):
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return self._fn(*_fill(self.arguments, inputs, tf.constant), **self._options)

  def to_keras3(self, inputs):
    """The operation as a Keras 3 node, on Keras 3 tensors (for `keras_nd.keras3.to_keras3`)."""
    operation = keras3().saving.deserialize_keras_object(
        dict(self.operation, config=dict(self.operation.get("config", {}), name=self.name)))
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return operation(*_fill(self.arguments, inputs, np.asarray))

  def get_config(self):
    config = super().get_config()
    config.update(operation=self.operation, arguments=self.arguments)
    return config


@keras.utils.register_keras_serializable(package="keras_nd")
class LayerScale(keras.layers.Layer):
  """`x * gamma`, a learned scale of each channel (the last axis): Keras 3 ConvNeXt's LayerScale.

  Args:
    init_values: the scales' initial value.
    **kwargs: passed on to `keras.layers.Layer`.
  """

  def __init__(self, init_values=1e-6, **kwargs):
    super().__init__(**kwargs)
    self.init_values = float(init_values)

  def build(self, input_shape):
    self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],),
                                 initializer=keras.initializers.Constant(self.init_values))
    super().build(input_shape)

  def call(self, inputs):
    return inputs * self.gamma

  def to_keras3(self, inputs):
    """A Keras 3 multiplication by the current scales (Keras 3 has no built-in LayerScale)."""
    return keras3().ops.multiply(inputs, self.gamma.numpy())

  def get_config(self):
    config = super().get_config()
    config.update(init_values=self.init_values)
    return config
