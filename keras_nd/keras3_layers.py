"""One layer between Keras 3 and tf_keras: its class, its configuration, its weights.

A layer is translated by name: the other Keras's class of the same name, built
from the layer's configuration with every value translated generically (dtype
policies, activations, initializers, regularizers and constraints); an option
the other class lacks is dropped only where it holds its default, and refused
otherwise. Weights are copied by name (`kernel`, `moving_mean`, ...), never by
position. Where the two Keras differ for one class, the tables below say how.
"""

import functools
import inspect

import numpy as np

from keras_nd import keras3_ops
from keras_nd._keras import keras, keras3

__all__ = ["copy_weights", "keras3_layer", "tf_keras_layer"]

# Options one Keras names differently from the other: {class: {Keras 3 name: tf_keras name}}.
_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}}
# Weights one Keras names differently from the other: {class: {Keras 3 name: tf_keras name}}.
_WEIGHTS_RENAMED = {"DepthwiseConv1D": {"kernel": "depthwise_kernel"},
                    "DepthwiseConv2D": {"kernel": "depthwise_kernel"}}
# Options the tf_keras conversion of a Keras 3 layer is given. Fused, tf_keras's BatchNormalization
# rounds otherwise than Keras 3's (1e-7 relative per layer, past 1e-5 after EfficientNetV2S's 500
# layers); unfused it runs Keras 3's very arithmetic. (Not saved: a copy of it is fused again.)
_TF_KERAS_OPTIONS = {"BatchNormalization": {"fused": False}}
# Options Keras 3 takes through **kwargs, with their defaults.
_KWARGS_DEFAULTS = {"rms_scaling": False}
# The layers of keras.applications' own modules that keras_nd converts: {class: tf_keras layer
# of that Keras 3 layer and a name}. StochasticDepth is the identity in inference, which is how
# keras_nd runs a teacher.
_APPLICATION_LAYERS = {
    "LayerScale": lambda layer, name: keras3_ops.LayerScale(layer.init_values, name=name),
    "StochasticDepth": lambda layer, name: keras.layers.Identity(name=name),
}
# Keys of serialised objects ({"class_name", "config"}) by the module they come from.
_OBJECT_MODULES = ("initializers", "regularizers", "constraints")
# Options that describe a layer's input, which the graph being rebuilt gives instead.
_INPUT_OPTIONS = ("batch_input_shape", "batch_shape", "input_shape", "input_dim", "batch_size")
# tf_keras activations Keras 3 names differently.
_KERAS3_NAMES = {"swish": "silu"}


@functools.lru_cache(maxsize=None)
def _parameters(cls):
  """{name: default} of every named argument `cls` takes: its constructor's, and its parents'
  as far as each passes on **kwargs."""
  found = {}
  for klass in cls.__mro__:
    init = vars(klass).get("__init__")
    if init is None:
      continue
    parameters = inspect.signature(init).parameters.values()
    for parameter in parameters:
      if parameter.name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL,
                                                             parameter.VAR_KEYWORD):
        found.setdefault(parameter.name, parameter.default)
    if not any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters):
      return found
  found.setdefault("activity_regularizer", None)  # tf_keras's Layer takes it through **kwargs
  return found


def _same(a, b):
  try:
    return bool(np.all(np.asarray(a, dtype=object) == np.asarray(b, dtype=object))) and (
        np.shape(a) == np.shape(b))
  except (TypeError, ValueError):
    return a is b


def _dtype(value, where):
  """A dtype policy as its name ("float32", "mixed_float16"), which both Keras take."""
  if isinstance(value, dict):
    name = value.get("config", {}).get("name")
    if not isinstance(name, str) or "Quantized" in str(value.get("class_name")):
      raise ValueError(f"{where} has the dtype policy {value}; keras_nd converts float policies "
                       "(float32, float16, bfloat16, mixed_float16, mixed_bfloat16) only.")
    return name
  return value


def _object_module(value):
  """"initializers", "regularizers" or "constraints" for a serialised object of theirs, or None."""
  if isinstance(value, dict) and "class_name" in value:
    module = str(value.get("module", "")).rpartition(".")[2]
    return module if module in _OBJECT_MODULES else None
  return None


def _is_default(value, default, source):
  """Whether an option's `value` is its `default` in the `source` Keras (a serialised object, its
  default given by name, too)."""
  module = _object_module(value)
  if module is not None and isinstance(default, str):
    objects = getattr(source, module)
    return objects.serialize(objects.get(default)) == value
  return _same(value, default)


def _object(value, target, where):
  """A serialised initializer, regularizer or constraint as an object of the `target` Keras."""
  module = _object_module(value)
  name = value.get("class_name")
  source = keras if target is not keras else keras3()
  source_cls = getattr(getattr(source, module), name, None)
  target_cls = getattr(getattr(target, module), name, None)
  if source_cls is None or target_cls is None:
    raise ValueError(f"{where} uses the {module[:-1]} '{name}', which the other Keras lacks "
                     f"(keras_nd converts built-in {', '.join(_OBJECT_MODULES)} by name).")
  return target_cls(**_options(value.get("config", {}), source_cls, target_cls, where, {}))


def _options(config, source_cls, target_cls, where, renamed):
  """`config` of a `source_cls` object as keyword arguments of `target_cls`."""
  accepted, defaults = _parameters(target_cls), {**_KWARGS_DEFAULTS, **_parameters(source_cls)}
  to_keras3 = target_cls.__module__.startswith("keras.")
  source = keras if to_keras3 else keras3()
  options = {}
  for key, value in config.items():
    if key in _INPUT_OPTIONS:
      continue
    target_key = renamed.get(key, key)
    if target_key not in accepted:
      if key in defaults and _is_default(value, defaults[key], source):
        continue  # an option the other Keras lacks, at the value that means "not used"
      raise ValueError(
          f"{where} sets '{key}'={value!r}, which {target_cls.__module__.split('.')[0]}'s "
          f"{target_cls.__name__} does not have; keras_nd cannot convert it.")
    if key == "dtype":
      value = _dtype(value, where)
    elif key == "activation" and value is not None and not to_keras3:  # (keras3_layer's own)
      value = keras3_ops.tf_keras_activation(value, where)
    elif _object_module(value) is not None:
      value = _object(value, keras3() if to_keras3 else keras, where)
    options[target_key] = value
  return options


def _where(layer):
  return f"Layer '{layer.name}' ({type(layer).__name__})"


def _check_not_lambda(layer):
  if type(layer).__name__ == "Lambda":
    raise ValueError(f"{_where(layer)} runs Python code, which keras_nd does not convert (nor "
                     "would safe mode load it); replace it with built-in layers or operations.")


def tf_keras_layer(layer, name):
  """A new tf_keras layer, named `name`, that computes what the Keras 3 `layer` computes.

  Its weights are set by `copy_weights` once it is built.

  Raises:
    ValueError: a layer that is not one of Keras 3's own, one tf_keras has no
      class for, or an option it cannot take; the message names the layer and
      its class.
  """
  cls = type(layer)
  where = _where(layer)
  _check_not_lambda(layer)
  if cls.__module__.startswith("keras.src.applications.") and cls.__name__ in _APPLICATION_LAYERS:
    return _APPLICATION_LAYERS[cls.__name__](layer, name)
  if not cls.__module__.startswith("keras.src.layers."):
    raise ValueError(
        f"{where} is not one of Keras 3's built-in layers (its class comes from "
        f"{cls.__module__}); keras_nd converts built-in layers only. Rebuild the model with "
        "built-in layers, or build it in tf_keras.")
  target = getattr(keras.layers, cls.__name__, None)
  if target is None:
    raise ValueError(f"{where} has no tf_keras counterpart (tf_keras has no layer "
                     f"'{cls.__name__}'); replace it with layers both Keras have.")
  options = _options(layer.get_config(), cls, target, where, _RENAMED.get(cls.__name__, {}))
  options.update(_TF_KERAS_OPTIONS.get(cls.__name__, {}), name=name)
  return target(**options)


def _keras3_activation(value, where):
  """(Keras 3 activation name, None) for a tf_keras activation's serialisation, or ("linear",
  a function of a Keras 3 tensor) where Keras 3 has no activation of that definition."""
  name = value.get("config") if isinstance(value, dict) else value
  if isinstance(name, str) and name.startswith("keras_nd>"):
    name = name.partition(">")[2]
    return ("hard_silu" if name == "hard_swish" else name), None
  if name == "hard_sigmoid":  # tf_keras's, not Keras 3's: clip(0.2 x + 0.5, 0, 1)
    return "linear", lambda x: keras3().ops.clip(x * 0.2 + 0.5, 0.0, 1.0)
  if not isinstance(name, str) or not hasattr(keras3().activations, _KERAS3_NAMES.get(name, name)):
    raise ValueError(f"{where} uses the activation {value!r}, which Keras 3 has no built-in "
                     "for; keras_nd exports tf_keras's built-in activations and its own.")
  return _KERAS3_NAMES.get(name, name), None


def keras3_layer(layer, name):
  """(a new Keras 3 layer named `name` computing what the tf_keras `layer` computes, a function
  of its output for an activation Keras 3 lacks (or None)).

  Raises:
    ValueError: a layer Keras 3 has no built-in class for, or an option it
      cannot take; the message names the layer and its class.
  """
  cls = type(layer)
  where = _where(layer)
  _check_not_lambda(layer)
  target = getattr(keras3().layers, cls.__name__, None)
  if target is None or not cls.__module__.startswith("tf_keras."):
    raise ValueError(
        f"{where} has no Keras 3 built-in counterpart, so a file holding it would not load in a "
        "Keras 3 process without keras_nd; replace it with built-in layers.")
  config = layer.get_config()
  after = None
  if config.get("activation") is not None:
    config["activation"], after = _keras3_activation(config["activation"], where)
  axis = config.get("axis")
  if cls.__name__ == "BatchNormalization" and isinstance(axis, (list, tuple)) and len(axis) == 1:
    config["axis"] = axis[0]  # tf_keras's reports its axis as a list; Keras 3's takes one int
  renamed = {v: k for k, v in _RENAMED.get(cls.__name__, {}).items()}
  options = _options(config, cls, target, where, renamed)
  options["name"] = name
  return target(**options), after


def _variables(layer):
  """{tf_keras's name: variable} of a layer's weights ("kernel", "moving_mean", ...)."""
  found = {}
  renamed = {} if type(layer).__module__.startswith("tf_keras.") else _WEIGHTS_RENAMED.get(
      type(layer).__name__, {})
  attributes = {id(value): name for name, value in vars(layer).items()}
  for variable in layer.weights:
    key = variable.name.rpartition("/")[2].partition(":")[0]
    if key.startswith("variable"):  # made without a name: known by the attribute holding it
      key = attributes.get(id(variable), key)
    key = renamed.get(key, key)
    if key in found:
      raise ValueError(f"{_where(layer)} has two weights named '{key}'; keras_nd matches "
                       "weights by name and cannot tell them apart.")
    found[key] = variable
  return found


def copy_weights(source, target):
  """Sets each weight of the built `target` layer from the `source` layer's weight of that name.

  Raises:
    ValueError: weights that do not pair up by name and shape (naming both
      layers and the weights).
  """
  have, want = _variables(source), _variables(target)
  if set(have) != set(want):
    raise ValueError(f"{_where(source)} has weights {sorted(have)} but its conversion "
                     f"{_where(target)} has {sorted(want)}; they do not pair up by name.")
  for key, variable in want.items():
    value = np.asarray(have[key].numpy())
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f"Weight '{key}' of {_where(source)} has shape {value.shape} but its "
                       f"conversion's has {tuple(variable.shape)}.")
    variable.assign(value)
  if hasattr(target, "finalize_state"):  # Normalization reads its mean and variance there
    target.finalize_state()
