"""Graph rewriting: `substitute` and `rebuild`.

Every place in keras_nd that mixes teacher and student parts, or copies part of
a graph, goes through `_replay`: it re-executes the nodes of a functional
model's graph on new input tensors, optionally swapping neighbourhoods for
replacement models and layers for copies. `substitute` is its public face
(`keras_nd.compose` is built on it).
"""

from keras_nd import keras3
from keras_nd._keras import KerasTensor, keras, tf

__all__ = ["check_functional", "check_replacement", "consumers", "copy_layer", "model_nodes",
           "output_tensors", "rebuild", "shape_str", "substitute"]


def check_functional(model, what="model"):
  """The tf_keras model keras_nd works on for `model`, checked to be single-input, single-output
  and functional: `model` itself, or a Keras 3 model's conversion (`keras3.to_tf_keras`).

  Raises:
    TypeError, ValueError: naming the model and what is wrong with it.
  """
  model = keras3.to_tf_keras(model)
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"The {what} must be a tf_keras (or Keras 3) functional Model; you passed an object of "
        f"type {type(model).__name__}.")
  if not getattr(model, "_is_graph_network", False):
    if isinstance(model, keras.Sequential):
      raise ValueError(
          f"The {what} '{model.name}' is a Sequential model without a known input shape; build it "
          "with `keras.Input(shape)` as its first layer so that it has a graph to cut.")
    raise TypeError(
        f"The {what} '{model.name}' is a subclassed model ({type(model).__name__}); keras_nd needs "
        "a functional model (built with keras.Input and layer calls) to see its graph.")
  if len(model.inputs) != 1 or len(model.outputs) != 1:
    raise ValueError(
        f"The {what} '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} "
        "outputs; "
        "keras_nd supports models with exactly one input and one output.")
  return model


def model_nodes(model):
  """The nodes of a functional model's own graph, inputs first, in topological order."""
  ranked = []
  layer_rank = {id(layer): i for i, layer in enumerate(model.layers)}
  for depth, nodes in model._nodes_by_depth.items():  # pylint: disable=protected-access
    for node in nodes:
      ranked.append((-depth, layer_rank.get(id(node.layer), -1), len(ranked), node))
  return [node for *_, node in sorted(ranked, key=lambda r: r[:3])]


def output_tensors(node):
  """The tensors a node outputs, as a flat list."""
  return tf.nest.flatten(node.outputs)


def consumers(nodes):
  """{id(tensor): [the nodes among `nodes` that take it as input]}."""
  found = {}
  for node in nodes:
    for tensor in node.keras_inputs:
      found.setdefault(id(tensor), []).append(node)
  return found


def _call_node(node, layer, values):
  """Calls `layer` the way `node` called its layer, with tensors looked up in `values`."""

  def lookup(x):
    return values[id(x)] if isinstance(x, KerasTensor) else x

  args = tf.nest.map_structure(lookup, node.call_args)
  kwargs = tf.nest.map_structure(lookup, node.call_kwargs)
  return layer(*args, **kwargs)


def _is_inlinable(layer, node):
  return (isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False) and
          len(layer.inputs) == 1 and len(layer.outputs) == 1 and
          len(node.keras_inputs) == 1 and not node.call_kwargs)


def _replay(nodes, input_tensor, output_tensor, input_value, layer_fn, replacements=()):
  """Re-executes a graph on `input_value`, inlining nested functional models.

  Args:
    nodes: the graph's nodes in a topological order (see `model_nodes`).
    input_tensor, output_tensor: the graph's boundary tensors.
    input_value: the tensor to feed in place of `input_tensor`.
    layer_fn: maps each original layer to the layer to call in its place.
    replacements: (neighbourhood, replacement) pairs; each neighbourhood is
      computed by its replacement instead of by its own nodes.

  Returns:
    The tensor that stands for `output_tensor`.
  """
  values = {id(input_tensor): input_value}
  owner = {}
  for hood, replacement in replacements:
    for node in hood.nodes:
      owner[id(node)] = (hood, replacement)
  for node in nodes:
    if node.is_input:
      continue
    if id(node) in owner:
      hood, replacement = owner[id(node)]
      if id(hood.output_tensor) not in values:
        values[id(hood.output_tensor)] = _apply(replacement, values[id(hood.input_tensor)],
                                                layer_fn)
      continue
    if _is_inlinable(node.layer, node):
      outputs = _apply(node.layer, values[id(node.keras_inputs[0])], layer_fn)
    else:
      outputs = _call_node(node, layer_fn(node.layer), values)
    for tensor, value in zip(output_tensors(node), tf.nest.flatten(outputs)):
      values[id(tensor)] = value
  return values[id(output_tensor)]


def _apply(replacement, value, layer_fn):
  if isinstance(replacement, keras.Model) and getattr(replacement, "_is_graph_network", False):
    return _replay(model_nodes(replacement), replacement.inputs[0], replacement.outputs[0], value,
                   layer_fn)
  if isinstance(replacement, keras.layers.Layer):
    return layer_fn(replacement)(value)
  return replacement(value)


def copy_layer(layer, **config):
  """A fresh, unbuilt layer of the same class and configuration, with `config` overriding it."""
  try:
    return layer.__class__.from_config(dict(layer.get_config(), **config))
  except (NotImplementedError, TypeError, ValueError) as e:
    raise ValueError(
        f"Cannot copy layer '{layer.name}' ({type(layer).__name__}): it cannot be rebuilt from its "
        f"config ({e}). Give it a get_config/from_config, or use a functional model.") from None


class _Copier:
  """`layer_fn` that gives every layer an independent copy with the same weights."""

  def __init__(self):
    self._copies = {}
    self._pending = []

  def __call__(self, layer):
    if id(layer) not in self._copies:
      self._copies[id(layer)] = copy_layer(layer)
      self._pending.append(layer)
    return self._copies[id(layer)]

  def copy_weights(self):
    """Copies weights once every copy has been built by being called."""
    for layer in self._pending:
      self._copies[id(layer)].set_weights(layer.get_weights())
    self._pending = []


def _identity(layer):
  return layer


def rebuild(nodes, input_tensor, output_tensor, name, layer_fn=_identity, replacements=()):
  """Builds a new flat functional model from a graph (see `_replay`)."""
  inputs = keras.Input(shape=tuple(input_tensor.shape[1:]), dtype=input_tensor.dtype,
                       name=f"{name}_input")
  outputs = _replay(nodes, input_tensor, output_tensor, inputs, layer_fn, replacements)
  try:
    return keras.Model(inputs, outputs, name=name)
  except ValueError as e:
    if "unique" not in str(e):
      raise
    raise ValueError(
        f"Rebuilding '{name}' would put two different layers under one name ({e}) Give the "
        "replacement's layers names that the rest of the model does not use.") from None


def shape_str(shape):
  """A shape as "(None, 32, 32, 3)"."""
  return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def check_replacement(hood, replacement):
  """Raises ValueError unless `replacement` maps the neighbourhood's input to its output shape."""
  if not callable(replacement):
    raise TypeError(
        f"The replacement for neighbourhood '{hood.name}' must be a tf_keras Model or a callable "
        f"on tensors; got {type(replacement).__name__}.")
  if isinstance(replacement, keras.Model) and replacement.inputs:
    given = tuple(replacement.inputs[0].shape[1:])
    if len(replacement.inputs) != 1 or not _compatible(given, hood.input_shape[1:]):
      raise ValueError(
          f"The replacement '{replacement.name}' for neighbourhood '{hood.name}' takes input "
          f"{shape_str((None,) + given)} but the neighbourhood's input is "
          f"{shape_str(hood.input_shape)}.")
  probe = keras.Input(shape=hood.input_shape[1:], dtype=hood.input_tensor.dtype)
  try:
    out = replacement(probe)
  except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
    raise ValueError(
        f"The replacement for neighbourhood '{hood.name}' cannot take the neighbourhood's input "
        f"{shape_str(hood.input_shape)}: {e}") from None
  if not isinstance(out, KerasTensor) and not tf.is_tensor(out):
    raise ValueError(
        f"The replacement for neighbourhood '{hood.name}' must return one tensor; it returned "
        f"{type(out).__name__}.")
  if not _compatible(tuple(out.shape[1:]), hood.output_shape[1:]):
    raise ValueError(
        f"The replacement for neighbourhood '{hood.name}' outputs shape "
        f"{shape_str(tuple(out.shape))} but the neighbourhood outputs "
        f"{shape_str(hood.output_shape)}.")


def _compatible(a, b):
  return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _checked_replacements(model, replacements):
  if not isinstance(replacements, dict):
    raise TypeError("replacements must be a dict {Neighbourhood: model}; got "
                    f"{type(replacements).__name__}.")
  node_ids = {id(node) for node in model_nodes(model)}
  claimed = {}
  converted = {}
  for hood, replacement in replacements.items():
    replacement = converted[hood] = keras3.to_tf_keras(replacement)
    if not hasattr(hood, "nodes"):
      raise TypeError(f"replacements keys must be keras_nd.Neighbourhood objects; got {hood!r}.")
    for node in hood.nodes:
      if id(node) not in node_ids:
        raise ValueError(f"Neighbourhood '{hood.name}' is not part of model '{model.name}' "
                         f"(layer '{node.layer.name}' is not in its graph).")
      if id(node) in claimed:
        raise ValueError(f"Neighbourhoods '{claimed[id(node)]}' and '{hood.name}' overlap (both "
                         f"hold layer '{node.layer.name}'); replace one or the other.")
      claimed[id(node)] = hood.name
    check_replacement(hood, replacement)
  return list(converted.items())


def substitute(model, replacements, copy=False, name=None):
  """Rebuilds `model` as one flat functional model with some neighbourhoods replaced.

  This is keras_nd's one graph-rewriting mechanism: composing a student,
  scoring a search candidate and perturbing a neighbourhood are all
  substitutions. Functional replacements are inlined (their layers become
  layers of the result); other callables are called as layers.

  Args:
    model: a single-input, single-output functional tf_keras (or Keras 3)
      model.
    replacements: dict `{Neighbourhood: replacement}`; each neighbourhood must
      belong to `model`, and its replacement (a model, tf_keras or Keras 3, or
      a callable) must map the neighbourhood's input shape to its output
      shape.
    copy: if False the result shares layers (and weights) with `model` and the
      replacements; if True every layer is an independent copy with the same
      weights (made from its config), so training the result leaves the
      originals untouched. Plain Python functions are called as they are.
    name: the result's name (default: `model.name`).

  Returns:
    A new functional `keras.Model` with the same input and output shapes.

  Raises:
    TypeError, ValueError: naming the model or neighbourhood at fault, e.g. a
      replacement whose shapes differ from its neighbourhood's.

  Example:
    >>> hoods = nd.split(teacher)
    >>> same = nd.substitute(teacher, {h: h.teacher for h in hoods})
  """
  model = check_functional(model)
  pairs = _checked_replacements(model, replacements)
  copier = _Copier() if copy else _identity
  result = rebuild(model_nodes(model), model.inputs[0], model.outputs[0], name or model.name,
                   layer_fn=copier, replacements=pairs)
  if copy:
    copier.copy_weights()
  return result
