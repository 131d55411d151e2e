"""Keras 3 models in and out: a Keras 3 functional or Sequential model as the tf_keras model
keras_nd works on, and a tf_keras model as a Keras 3 one of built-in layers and operations only.

Both directions walk the model's graph node by node and rebuild it in the other
Keras (nested models flattened into one graph), each layer translated by
`keras3_layers` and each Keras 3 operation node (`x + 3.0`) by `keras3_ops`;
weights are copied by name. A conversion is then run against its original on
random inputs, and refused if their outputs differ: a wrong conversion is never
silent. Every Keras 3 model is converted once (`to_tf_keras` keeps its
conversion while the model lives), so that `split`, `ActivationSource` and
`compose` given the same Keras 3 teacher all work on the same tf_keras model.

Example:
  >>> teacher = to_tf_keras(keras.applications.MobileNetV2(weights=None))
"""

import hashlib
import weakref

import numpy as np

from keras_nd import keras3_layers
from keras_nd._keras import KerasTensor, keras, keras3, tf
from keras_nd.keras3_ops import Keras3Op, constant_argument, operation, tensor_argument

__all__ = ["check_outputs", "copy_back", "is_keras3", "load_keras3", "to_keras3", "to_tf_keras"]

# The outputs of a conversion may differ from the original's by rounding: this much, relative to
# the largest output, in float32, and more where layers compute in 16 bits (mixed precision).
_TOLERANCES = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
_CHECK_BATCH = 2
_CHECK_SIZE = 32  # a dimension the model leaves open (None), in the check's random inputs
# Keras 3 model -> its _Conversion, for as long as the model lives.
_CONVERSIONS = weakref.WeakKeyDictionary()


def is_keras3(model):
  """Whether `model` is a Keras 3 model (without importing Keras 3)."""
  k3 = keras3(imported_only=True)
  return k3 is not None and isinstance(model, k3.Model)


def _nodes(model):
  """A functional model's nodes (either Keras) in an order that computes each after its inputs."""
  by_depth = model._nodes_by_depth  # pylint: disable=protected-access
  return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


class _Names:
  """Unique layer names for a flattened graph (nested models may repeat their parents' names)."""

  def __init__(self):
    self._taken = set()

  def __call__(self, name):
    unique, count = name, 1
    while unique in self._taken:
      count += 1
      unique = f"{name}_{count}"
    self._taken.add(unique)
    return unique


def _graph_of_keras3(model):
  """A Keras 3 model's functional graph, or a clear error for one without."""
  k3 = keras3()
  if isinstance(model, k3.Sequential):
    functional = getattr(model, "_functional", None)
    if functional is None:
      raise ValueError(f"The Keras 3 Sequential model '{model.name}' has no input shape; build "
                       "it with `keras.Input(shape)` as its first layer so that it has a graph.")
    return functional
  if not hasattr(model, "_nodes_by_depth"):
    raise TypeError(
        f"The Keras 3 model '{model.name}' is a subclassed model ({type(model).__name__}); "
        "keras_nd converts functional and Sequential models only (their graphs can be read).")
  return model


class _ToTfKeras:
  """Rebuilds a Keras 3 graph in tf_keras."""

  def __init__(self):
    self.layers = {}  # id(Keras 3 layer) -> its tf_keras layer
    self.pairs = []  # (Keras 3 layer, tf_keras layer), for the weights
    self.names = _Names()

  def graph(self, model, inputs):
    model = _graph_of_keras3(model)
    values = {id(t): v for t, v in zip(model.inputs, inputs)}
    k3 = keras3()
    for node in _nodes(model):
      if node.is_input:
        continue
      operation = node.operation
      args, kwargs = node.arguments.fill_in(values)
      kwargs = {k: v for k, v in kwargs.items() if v is not None}
      composite = _COMPOSITE.get(type(operation).__name__)
      if composite is not None and type(operation).__module__.startswith(_APPLICATIONS):
        outputs = composite(self, operation, *args)
      elif isinstance(operation, k3.Model):
        outputs = self.graph(operation, [v for v in tf.nest.flatten(args)
                                         if isinstance(v, KerasTensor)])
      elif isinstance(operation, k3.layers.Layer):
        outputs = self.layer(operation)(*args, **kwargs)
      else:
        outputs = self.operation(operation, node, kwargs)(
            [values[id(t)] for t in node.arguments.keras_tensors])
      for tensor, value in zip(node.outputs, tf.nest.flatten(outputs)):
        values[id(tensor)] = value
    return [values[id(t)] for t in model.outputs]

  def layer(self, layer):
    if id(layer) not in self.layers:
      self.layers[id(layer)] = keras3_layers.tf_keras_layer(layer, self.names(layer.name))
      self.pairs.append((layer, self.layers[id(layer)]))
    return self.layers[id(layer)]

  def custom_scale(self, layer, inputs):
    """Keras 3 InceptionResNetV2's CustomScaleLayer, `inputs[0] + inputs[1] * scale`."""
    scaled = Keras3Op(operation("Multiply"), [tensor_argument(0), float(layer.scale)],
                      name=self.names(f"{layer.name}_scale"))([inputs[1]])
    return Keras3Op(operation("Add"), [tensor_argument(0), tensor_argument(1)],
                    name=self.names(layer.name))([inputs[0], scaled])

  def operation(self, operation, node, kwargs):
    where = f"Operation '{operation.name}' ({type(operation).__name__})"
    if kwargs:
      raise ValueError(f"{where} is called with keyword arguments {sorted(kwargs)}, which "
                       "keras_nd does not convert; pass them positionally.")
    positions = {id(t): i for i, t in enumerate(node.arguments.keras_tensors)}

    def encode(value):
      if id(value) in positions:
        return tensor_argument(positions[id(value)])
      if isinstance(value, (np.ndarray, np.generic)) or tf.is_tensor(value):
        return constant_argument(value)
      return value

    arguments, _ = node.arguments.convert(encode)
    try:
      return Keras3Op(keras3().saving.serialize_keras_object(operation), list(arguments),
                      name=self.names(operation.name))
    except ValueError as e:
      raise ValueError(f"{where} cannot be converted: {e}") from None


# Layers of keras.applications' own modules that become several tf_keras nodes.
_APPLICATIONS = "keras.src.applications."
_COMPOSITE = {"CustomScaleLayer": _ToTfKeras.custom_scale}


def _fingerprint(layers):
  digest = hashlib.sha1()
  for layer in layers:
    for variable in layer.weights:
      digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
  return digest.hexdigest()


class _Conversion:

  def __init__(self, model, pairs, fingerprint):
    self.model = model
    self.pairs = pairs
    self.fingerprint = fingerprint


def _random_inputs(model, seed=0):
  rng = np.random.default_rng(seed)
  inputs = []
  for tensor in model.inputs:
    shape = (_CHECK_BATCH,) + tuple(_CHECK_SIZE if d is None else d for d in tensor.shape[1:])
    dtype = tf.as_dtype(tensor.dtype)
    inputs.append(rng.integers(0, 2, shape).astype(dtype.as_numpy_dtype) if dtype.is_integer
                  else rng.standard_normal(shape).astype(dtype.as_numpy_dtype))
  return inputs


def check_outputs(reference, converted, what):
  """Raises ValueError unless `converted` computes `reference`'s outputs on random inputs (within
  1e-5 of the largest output; 1e-2 and 5e-2 where layers compute in float16 or bfloat16).

  Outputs that are equal (infinities and NaNs included) count as equal.

  Args:
    reference, converted: models of either Keras with the same inputs.
    what: how the message names the conversion, e.g. "The conversion of 'mobilenet'".
  """
  inputs = _random_inputs(converted)
  tolerance = max(_TOLERANCES.get(str(getattr(layer, "compute_dtype", None)), 1e-5)
                  for model in (reference, converted) for layer in model.layers)
  outputs = []
  for model in (reference, converted):
    result = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs.append([np.asarray(keras3().ops.convert_to_numpy(r) if is_keras3(model) else r,
                               dtype=np.float64) for r in tf.nest.flatten(result)])
  for i, (want, got) in enumerate(zip(*outputs)):
    if want.shape != got.shape:
      raise ValueError(f"{what} outputs shape {got.shape} where the original outputs "
                       f"{want.shape} (output {i}).")
    same = (want == got) | (np.isnan(want) & np.isnan(got))
    scale = max(float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)),
                np.finfo(np.float32).tiny)
    with np.errstate(invalid="ignore"):  # inf - inf, where `same` already holds
      difference = float(np.max(np.where(same, 0.0, np.abs(want - got)), initial=0.0))
    if not difference <= tolerance * scale:
      raise ValueError(
          f"{what} computes other outputs than the original: on random inputs, output {i} "
          f"differs by up to {difference:.3g} (relative to its largest value {scale:.3g}, more "
          f"than {tolerance:g}). Some layer is not converted exactly; please report "
          "the model.")


def to_tf_keras(model):
  """The tf_keras model keras_nd works on: `model` itself, or a Keras 3 model's conversion.

  A Keras 3 functional or Sequential model (nested models flattened) is
  rebuilt layer by layer in tf_keras, weights copied, and checked to compute
  the same outputs on random inputs. It is converted once: later calls with
  the same model return the same tf_keras model, its weights first copied
  again if the Keras 3 model's have changed.

  Args:
    model: a Keras 3 model; anything else is returned as it is.

  Returns:
    A tf_keras functional model (or `model`).

  Raises:
    TypeError: a subclassed Keras 3 model.
    ValueError: a layer or operation that cannot be converted (named, with
      its class), or a conversion whose outputs differ.
  """
  if not is_keras3(model):
    return model
  conversion = _CONVERSIONS.get(model)
  if conversion is not None:
    fingerprint = _fingerprint(k3_layer for k3_layer, _ in conversion.pairs)
    if fingerprint != conversion.fingerprint:
      for k3_layer, layer in conversion.pairs:
        keras3_layers.copy_weights(k3_layer, layer)
      conversion.fingerprint = fingerprint
    return conversion.model
  builder = _ToTfKeras()
  graph = _graph_of_keras3(model)
  inputs = [keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype,
                        name=builder.names(t._keras_history.operation.name))  # pylint: disable=protected-access
            for t in graph.inputs]
  outputs = builder.graph(graph, inputs)
  converted = keras.Model(inputs if len(inputs) > 1 else inputs[0],
                          outputs if len(outputs) > 1 else outputs[0], name=model.name)
  for k3_layer, layer in builder.pairs:
    keras3_layers.copy_weights(k3_layer, layer)
  check_outputs(model, converted, f"The tf_keras conversion of the Keras 3 model '{model.name}'")
  _CONVERSIONS[model] = _Conversion(converted, builder.pairs,
                                    _fingerprint(k3_layer for k3_layer, _ in builder.pairs))
  return converted


def copy_back(model):
  """Copies the weights of a Keras 3 model's conversion (`to_tf_keras`) back into `model`."""
  conversion = _CONVERSIONS[model]
  for k3_layer, layer in conversion.pairs:
    keras3_layers.copy_weights(layer, k3_layer)
  conversion.fingerprint = _fingerprint(k3_layer for k3_layer, _ in conversion.pairs)


def _check_graph_network(model):
  if not getattr(model, "_is_graph_network", False):
    raise TypeError(f"The model '{model.name}' is a subclassed tf_keras model "
                    f"({type(model).__name__}); only functional and Sequential models (whose "
                    "graphs can be read) can be exported to Keras 3.")


class _ToKeras3:
  """Rebuilds a tf_keras graph in Keras 3."""

  def __init__(self):
    self.layers = {}
    self.pairs = []  # (tf_keras layer, Keras 3 layer), for the weights
    self.names = _Names()

  def graph(self, model, inputs):
    _check_graph_network(model)
    values = {id(t): v for t, v in zip(model.inputs, inputs)}

    def lookup(x):
      return values[id(x)] if isinstance(x, KerasTensor) else x

    for node in _nodes(model):
      if node.is_input:
        continue
      layer = node.layer
      args = tf.nest.map_structure(lookup, node.call_args)
      kwargs = {k: v for k, v in tf.nest.map_structure(lookup, node.call_kwargs).items()
                if v is not None}
      if isinstance(layer, keras.Model):
        outputs = self.graph(layer, [values[id(t)] for t in node.keras_inputs])
      elif hasattr(layer, "to_keras3"):  # keras_nd's own layers say how Keras 3 computes them
        outputs = layer.to_keras3(*args, **kwargs)
      else:
        outputs = self.layer(layer, args, kwargs)
      for tensor, value in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
        values[id(tensor)] = value
    return [values[id(t)] for t in model.outputs]

  def layer(self, layer, args, kwargs):
    if id(layer) not in self.layers:
      k3_layer, after = keras3_layers.keras3_layer(layer, self.names(layer.name))
      self.layers[id(layer)] = k3_layer, after
      self.pairs.append((layer, k3_layer))
    k3_layer, after = self.layers[id(layer)]
    outputs = k3_layer(*args, **kwargs)
    return outputs if after is None else after(outputs)


def to_keras3(model):
  """A Keras 3 functional model of built-in layers and operations computing the tf_keras `model`.

  keras_nd's own layers (`Keras3Op`, the ResNets' `ZeroPadShortcut`) and
  activations become Keras 3 built-ins or operation nodes, so that the model
  saves to a file Keras 3 loads in safe mode without keras_nd; tfmot pruning
  wrappers must be stripped first (`keras_nd.sparsity.strip`).

  Its outputs are not checked here: `keras_nd.files.export_keras3` checks the
  file it writes (`check_outputs`).

  Raises:
    TypeError: a subclassed model.
    ValueError: a layer Keras 3 has no built-in counterpart for (named).
  """
  _check_graph_network(model)
  k3 = keras3()
  builder = _ToKeras3()
  inputs = [k3.Input(shape=tuple(t.shape[1:]), dtype=t.dtype.name, name=builder.names(name))
            for t, name in zip(model.inputs, model.input_names)]
  outputs = builder.graph(model, inputs)
  exported = k3.Model(inputs if len(inputs) > 1 else inputs[0],
                      outputs if len(outputs) > 1 else outputs[0], name=model.name)
  for layer, k3_layer in builder.pairs:
    keras3_layers.copy_weights(layer, k3_layer)
  return exported


def load_keras3(path, safe_mode=True):
  """The Keras 3 model in the `.keras` file `path`, loaded by Keras 3 (uncompiled)."""
  return keras3().saving.load_model(path, safe_mode=safe_mode, compile=False)
