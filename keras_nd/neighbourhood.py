"""Neighbourhoods: cutting a teacher into sub-networks (`split`, `split_layers`).

A *cut* is a tensor that every path from the model's input to its output passes
through. In a topological order of the graph's nodes, a node's output is a cut
exactly when no edge jumps over the node: every node is then either an ancestor
or a descendant of it. `split` finds all cuts in one pass over the edges and
returns the sub-graphs between consecutive cuts.
"""

from keras_nd import _checks, graph
from keras_nd._keras import keras
from keras_nd.layer_types import WEIGHTED

__all__ = ["Neighbourhood", "checked_hoods", "split", "split_layers"]

_NORMALIZATION = tuple(
    getattr(keras.layers, name) for name in (
        "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
        "Normalization") if hasattr(keras.layers, name))


class Neighbourhood:
  """A sub-network of a teacher with exactly one input and one output tensor.

  Made by `split` or `split_layers`; use it as a key for students and
  replacements.

  Attributes:
    name: the name of its last layer (unique within one split).
    index: its position in the list it came from.
    model: the whole teacher model it belongs to.
    layers: its layers, in execution order.
    nodes: the teacher graph's nodes it consists of (internal).
    input_tensor, output_tensor: its boundary tensors in the teacher's graph.
    input_shape, output_shape: their shapes, batch dimension first (None).
  """

  def __init__(self, model, nodes, input_tensor, output_tensor, index, name):
    self.model = model
    self.nodes = tuple(nodes)
    self.input_tensor = input_tensor
    self.output_tensor = output_tensor
    self.index = index
    self.name = name
    self._teacher = None
    self._family = (self,)

  @property
  def layers(self):
    return [node.layer for node in self.nodes]

  @property
  def input_shape(self):
    return tuple(self.input_tensor.shape)

  @property
  def output_shape(self):
    return tuple(self.output_tensor.shape)

  @property
  def teacher(self):
    """The teacher's sub-model for this neighbourhood (sharing the teacher's layers and weights)."""
    if self._teacher is None:
      self._teacher = graph.rebuild(self.nodes, self.input_tensor, self.output_tensor,
                                    f"{self.name}_teacher")
    return self._teacher

  def following(self, count):
    """The (at most) `count` neighbourhoods that come right after this one in its split."""
    return list(self._family[self.index + 1:self.index + 1 + count])

  def __repr__(self):
    return (f"Neighbourhood({self.index}: '{self.name}', {len(self.nodes)} layers, "
            f"{graph.shape_str(self.input_shape)} -> {graph.shape_str(self.output_shape)})")


def _edges(nodes):
  position = {id(node): i for i, node in enumerate(nodes)}
  children = [[] for _ in nodes]
  for i, node in enumerate(nodes):
    for parent in node.parent_nodes:
      children[position[id(parent)]].append(i)
  return children


def _cut_positions(nodes):
  """Positions (in `nodes`, topologically ordered) of nodes whose output is a single-tensor cut."""
  children = _edges(nodes)
  cuts = []
  reach = 0  # the furthest position any edge from an earlier node lands on
  for i, node in enumerate(nodes):
    if reach <= i and len(graph.output_tensors(node)) == 1:
      cuts.append(i)
    reach = max([reach] + children[i])
  return cuts


class _Segment:
  """The graph between two consecutive cuts."""

  def __init__(self, nodes, start, end):
    self.nodes = nodes[start + 1:end + 1]
    self.input_tensor = graph.output_tensors(nodes[start])[0]
    self.output_tensor = graph.output_tensors(nodes[end])[0]

  @property
  def weighted(self):
    return any(n.layer.weights and not isinstance(n.layer, _NORMALIZATION) for n in self.nodes)

  @property
  def changes_rank(self):
    return self.input_tensor.shape.rank != self.output_tensor.shape.rank


def _segments(nodes, positions):
  return [_Segment(nodes, start, end) for start, end in zip(positions, positions[1:])]


def _merge_parameter_free(segments):
  """Groups segments so that each group holds a weighted layer.

  Normalisation, activation, padding and pooling follow the layer before them;
  a parameter-free segment that changes the tensor's rank (Flatten, global
  pooling) starts the next group instead: it belongs to the head.
  """
  groups, pending = [], []
  for segment in segments:
    if segment.weighted:
      groups.append(pending + [segment])
      pending = []
    elif pending or not groups or segment.changes_rank:
      pending.append(segment)
    else:
      groups[-1].append(segment)
  if pending and groups:
    groups[-1].extend(pending)
  elif pending:
    groups.append(pending)
  return groups


def _unique_name(name, taken):
  """`name`, or `name_2`, `name_3`, ... for a layer called more than once."""
  count = taken[name] = taken.get(name, 0) + 1
  return name if count == 1 else f"{name}_{count}"


def _to_hoods(model, groups):
  hoods, taken = [], {}
  for index, segments in enumerate(groups):
    nodes = [node for segment in segments for node in segment.nodes]
    hoods.append(Neighbourhood(model, nodes, segments[0].input_tensor, segments[-1].output_tensor,
                               index, _unique_name(nodes[-1].layer.name, taken)))
  for hood in hoods:
    hood._family = tuple(hoods)  # pylint: disable=protected-access
  return hoods


def _boundary_positions(model, nodes, cuts, boundaries):
  if isinstance(boundaries, str):
    raise TypeError(f"boundaries must be a list of layer names, not the string '{boundaries}'.")
  by_name = {}
  for i, node in enumerate(nodes):
    by_name.setdefault(node.layer.name, []).append(i)
  positions = {0, len(nodes) - 1}
  for name in boundaries:
    if name not in by_name:
      raise ValueError(f"Boundary '{name}' is not a layer of model '{model.name}'.")
    if len(by_name[name]) > 1:
      raise ValueError(f"Boundary '{name}' is a layer called {len(by_name[name])} times in "
                       f"model '{model.name}'; its output is not one tensor.")
    position = by_name[name][0]
    if position not in cuts:
      raise ValueError(
          f"Boundary '{name}' is not a single-tensor cut of model '{model.name}': some path from "
          "the input to the output bypasses its output (e.g. a residual shortcut), or the layer "
          "has several outputs.")
    positions.add(position)
  return sorted(positions)


def split(model, boundaries=None, group=1):
  """Cuts a functional model into neighbourhoods between consecutive single-tensor cuts.

  Without `boundaries`, every cut is found and segments are merged so that
  each neighbourhood holds at least one weighted layer: for a ResNet this
  gives the stem, one neighbourhood per residual unit, and the head; for a
  plain chain, one neighbourhood per weighted layer with its normalisation,
  activation, padding and pooling.

  Args:
    model: a trained single-input, single-output functional tf_keras model
      (a Keras 3 one is converted: `keras_nd.keras3.to_tf_keras`; the
      neighbourhoods then belong to its conversion).
    boundaries: optional list of layer names whose outputs are the cuts to
      use (instead of detecting them); each must be a single-tensor cut.
    group: merge this many consecutive segments into one neighbourhood (the
      paper's 2- or 3-layer neighbourhoods); must divide the segment count.

  Returns:
    A list of `Neighbourhood`s, in order, covering the whole model.

  Raises:
    TypeError: `model` is not a functional tf_keras or Keras 3 model.
    ValueError: several inputs/outputs, a bad boundary, or a bad `group`.

  Example:
    >>> hoods = nd.split(teacher)
    >>> [h.name for h in hoods]  # e.g. ['stem_relu', 'stage1_unit1_out', ..., 'head_logits']
  """
  model = graph.check_functional(model)
  group = _checks.integer(group, "group")
  nodes = graph.model_nodes(model)
  if len(nodes) < 2:
    raise ValueError(f"Model '{model.name}' has no layers to split.")
  cuts = _cut_positions(nodes)
  if boundaries is None:
    segments = _merge_parameter_free(_segments(nodes, cuts))
  else:
    positions = _boundary_positions(model, nodes, set(cuts), boundaries)
    segments = [[segment] for segment in _segments(nodes, positions)]
  if len(segments) % group:
    raise ValueError(
        f"group={group} does not divide the {len(segments)} segments of model '{model.name}' "
        f"(possible values: {[g for g in range(1, len(segments) + 1) if len(segments) % g == 0]}).")
  grouped = [sum(segments[i:i + group], []) for i in range(0, len(segments), group)]
  return _to_hoods(model, grouped)


def split_layers(model, layer_types=WEIGHTED):
  """One-layer neighbourhoods: every call of a layer of the given types (for sparsification).

  Unlike `split`, these need not be cuts: layers inside residual units are
  included; each neighbourhood's input is the layer's own input tensor.

  Args:
    model: a single-input, single-output functional tf_keras (or Keras 3)
      model.
    layer_types: a layer class or tuple of classes (default: convolutions and
      Dense).

  Returns:
    A list of one-layer `Neighbourhood`s in execution order.

  Raises:
    ValueError: no layer of those types, or such a layer with several input
      or output tensors.
  """
  model = graph.check_functional(model)
  types = tuple(layer_types) if isinstance(layer_types, (list, tuple)) else (layer_types,)
  if not types or not all(isinstance(t, type) for t in types):
    raise TypeError(f"layer_types must be layer classes; got {layer_types!r}.")
  hoods = []
  taken = {}
  for node in graph.model_nodes(model):
    if node.is_input or not isinstance(node.layer, types):
      continue
    inputs, outputs = node.keras_inputs, graph.output_tensors(node)
    if len(inputs) != 1 or len(outputs) != 1:
      raise ValueError(f"Layer '{node.layer.name}' has {len(inputs)} inputs and {len(outputs)} "
                       "outputs; a one-layer neighbourhood needs exactly one of each.")
    hoods.append(Neighbourhood(model, [node], inputs[0], outputs[0], len(hoods),
                               _unique_name(node.layer.name, taken)))
  if not hoods:
    raise ValueError(f"Model '{model.name}' has no layer of types "
                     f"{[t.__name__ for t in types]} to make one-layer neighbourhoods of.")
  return hoods


def checked_hoods(model, hoods, what="model"):
  """`hoods` as a list, checked to be distinct neighbourhoods split from `model`.

  Args:
    model: the model the neighbourhoods must come from.
    hoods: a `Neighbourhood` or an iterable of them.
    what: how messages name `model` (e.g. "teacher").

  Raises:
    TypeError: something other than neighbourhoods.
    ValueError: no neighbourhoods, one split from another model, or two of
      one name.
  """
  if isinstance(hoods, Neighbourhood):
    hoods = [hoods]
  if isinstance(hoods, (str, bytes)) or not hasattr(hoods, "__iter__"):
    raise TypeError(f"hoods must be a list of keras_nd.Neighbourhood objects; got {hoods!r}.")
  hoods = list(hoods)
  if not hoods:
    raise ValueError(f"No neighbourhoods given; pass neighbourhoods of the {what} "
                     "(keras_nd.split or split_layers of it).")
  for hood in hoods:
    if not isinstance(hood, Neighbourhood):
      raise TypeError(f"hoods must be keras_nd.Neighbourhood objects; got {hood!r}.")
    if hood.model is not model:
      raise ValueError(f"Neighbourhood '{hood.name}' was split from model '{hood.model.name}', "
                       f"not from the {what} '{model.name}'.")
  names = [hood.name for hood in hoods]
  if len(set(names)) != len(names):
    raise ValueError(f"Neighbourhood names must be unique; got {names}.")
  return hoods
