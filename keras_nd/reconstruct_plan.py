"""What `reconstruct` solves in a student: its linear layers and their teacher counterparts.

A planned layer (`SolvedLayer`) knows where its input comes from (the
student's graph), what it is fitted to (its teacher counterpart's output, or
the teacher BatchNorm's after it), its solve order, and, for
`channels="greedy"`, the narrowed layer before it whose channels it chooses
(`ChannelChoice`).
"""

import dataclasses
import warnings

from keras_nd import graph, layer_types
from keras_nd import students as builders
from keras_nd._keras import keras

__all__ = ["ChannelChoice", "SolvedLayer", "intercept", "kind", "plan", "target_sparsity"]


@dataclasses.dataclass
class SolvedLayer:
  """One solved layer: where its input and its target come from."""

  hood: object
  layer: object            # the student's layer, solved in place
  input_tensor: object     # in the student's graph
  target_tensor: object    # the teacher's output to match, in the neighbourhood's teacher graph
  order: int
  batch_norm: object = None  # the BatchNormalization after the layer, whose output is matched
  choice: object = None      # a ChannelChoice: the narrowed layer before it, its channels chosen
  student: object = None     # the student model it belongs to


@dataclasses.dataclass
class ChannelChoice:
  """A narrowed layer whose kept channels are chosen by the solved layer it feeds."""

  narrowed: object       # the student's narrowed layer
  teacher: object        # its teacher counterpart
  between: list          # [(student layer, teacher layer)]: channel-wise layers in between
  teacher_input: object  # the solved layer's teacher counterpart's input (all the channels)


def kind(layer):
  """How a layer's system is laid out: "conv", "depthwise", "dense", or None (not solved)."""
  if isinstance(layer, layer_types.TRANSPOSED):
    return None
  if isinstance(layer, layer_types.DEPTHWISE):
    return "depthwise"
  if isinstance(layer, layer_types.CONVOLUTIONS):
    return "conv"
  if isinstance(layer, keras.layers.Dense):
    return "dense"
  return None


def intercept(item):
  """Whether the solve has an intercept: the layer's bias, or its BatchNorm's moving mean."""
  return bool(item.layer.get_config().get("use_bias")) or item.batch_norm is not None


def target_sparsity(item, sparsity):
  """The fraction of `item`'s kernel to zero: `sparsity` (a number, or by layer name), or 0."""
  if isinstance(sparsity, dict):
    return sparsity.get(item.layer.name, sparsity.get(_base_name(item.layer.name), 0.0))
  return sparsity or 0.0


def _unsupported(layer):
  """Why the solve cannot handle a layer of a supported kind, or None."""
  config = layer.get_config()
  if config.get("data_format", "channels_last") != "channels_last":
    return "it is channels_first"
  if config.get("groups", 1) != 1:
    return f"it is a grouped convolution (groups={config['groups']})"
  if isinstance(layer, keras.layers.Conv3D) and max(config["dilation_rate"]) > 1:
    return "it is a dilated Conv3D"
  return None


def plan(hood, student, channels=None):
  """The solved layers of one student, in graph order, with their solve order.

  Args:
    hood: the student's `Neighbourhood`.
    student: a functional student model of `hood`.
    channels: "greedy" also plans the channel choice of narrowed layers that
      see the teacher's input; None keeps the student's channels.

  Returns:
    A list of `SolvedLayer`.

  Raises:
    ValueError: a nested model with weighted layers, a weighted layer without
      a teacher counterpart (or of another type), one called on several
      tensors, or one whose output differs from its counterpart's other than
      in channels.
  """
  teacher_nodes = {node.layer.name: node for node in graph.model_nodes(hood.teacher)
                   if not node.is_input}
  nodes = graph.model_nodes(student)
  consumers = graph.consumers(nodes)
  producers = {id(t): node for node in nodes for t in graph.output_tensors(node)}
  depth = {id(student.inputs[0]): 0}  # the order of the last solved layer upstream of a tensor
  planned = []
  for node in nodes:
    if node.is_input:
      continue
    layer = node.layer
    upstream = max((depth.get(id(t), 0) for t in node.keras_inputs), default=0)
    if isinstance(layer, keras.Model) and any(kind(sub) for sub in layer_types.leaf_layers(layer)):
      raise ValueError(
          f"Student '{student.name}' for neighbourhood '{hood.name}' holds the nested model "
          f"'{layer.name}' with weighted layers; flatten it first (nd.substitute(student, {{}}) "
          "gives a flat model).")
    order = upstream
    if kind(layer):
      counterpart = _checked_counterpart(hood, node, teacher_nodes)
      why = _unsupported(layer)
      target = graph.output_tensors(counterpart)[0]
      output = graph.output_tensors(node)[0]
      if why is None and tuple(output.shape[1:]) == tuple(target.shape[1:]):
        order = upstream + 1
        batch_norm, target = _normalised_target(consumers.get(id(output), []), target,
                                                teacher_nodes)
        choice = (_choice(node, producers, consumers, teacher_nodes, counterpart)
                  if channels == "greedy" and upstream == 0 else None)
        planned.append(SolvedLayer(hood, layer, node.keras_inputs[0], target, order, batch_norm,
                                   choice, student))
      elif why is not None:
        warnings.warn(f"reconstruct leaves layer '{layer.name}' of '{hood.name}' as it is: {why}.",
                      stacklevel=3)
      elif tuple(output.shape[1:-1]) != tuple(target.shape[1:-1]):
        raise ValueError(
            f"Layer '{layer.name}' of the student for '{hood.name}' has output shape "
            f"{tuple(output.shape)} but its teacher counterpart has {tuple(target.shape)}: only "
            "the channel count may differ (a narrowed layer, kept as it is).")
    for tensor in graph.output_tensors(node):
      depth[id(tensor)] = order
  return planned


def _checked_counterpart(hood, node, teacher_nodes):
  """The teacher node of a weighted student layer's counterpart, or a ValueError saying why not."""
  layer = node.layer
  counterpart = _counterpart(layer, teacher_nodes)
  if counterpart is None:
    raise ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) of the student for neighbourhood "
        f"'{hood.name}' has no teacher counterpart: the neighbourhood has no layer named "
        f"'{layer.name}' or '{_base_name(layer.name)}'. reconstruct solves students whose "
        "weighted layers are named after the teacher's (students.bottleneck, clone, "
        "sparsity.sparse_student).")
  if type(counterpart.layer) is not type(layer):
    raise ValueError(
        f"Layer '{layer.name}' of the student for '{hood.name}' is a {type(layer).__name__} "
        f"but its teacher counterpart '{counterpart.layer.name}' is a "
        f"{type(counterpart.layer).__name__}.")
  if len(node.keras_inputs) != 1 or len(graph.output_tensors(node)) != 1:
    raise ValueError(f"Layer '{layer.name}' of the student for '{hood.name}' is called on "
                     "several tensors; reconstruct solves layers with one input and output.")
  return counterpart


def _choice(node, producers, consumers, teacher_nodes, counterpart):
  """The `ChannelChoice` of the narrowed layer that feeds `node`'s layer, or None if none.

  There is one when, going back from the layer's input through channel-wise
  layers only (each feeding nothing else), a Conv or Dense layer is reached
  that has fewer output channels than its teacher counterpart, and that layer
  sees the teacher's own input: it is reached from the student's input
  through layers without weights.
  """
  between, tensor = [], node.keras_inputs[0]
  while True:
    producer = producers[id(tensor)]
    if producer.is_input or len(consumers.get(id(tensor), [])) != 1 or \
        len(producer.keras_inputs) != 1:
      return None
    layer = producer.layer
    if kind(layer) in ("conv", "dense"):
      break
    if not isinstance(layer, builders.CHANNEL_WISE) or _counterpart(layer, teacher_nodes) is None:
      return None
    between.append((layer, _counterpart(layer, teacher_nodes).layer))
    tensor = producer.keras_inputs[0]
  teacher = _counterpart(layer, teacher_nodes)
  if teacher is None or type(teacher.layer) is not type(layer) or _unsupported(layer) or \
      layer_types.kernel(layer).shape[-1] >= layer_types.kernel(teacher.layer).shape[-1]:
    return None
  upstream = producer.keras_inputs[0]
  while not producers[id(upstream)].is_input:  # the teacher's input, unchanged?
    before = producers[id(upstream)]
    if before.layer.weights or len(before.keras_inputs) != 1:
      return None
    upstream = before.keras_inputs[0]
  return ChannelChoice(layer, teacher.layer, between, counterpart.keras_inputs[0])


def _normalised_target(followers, target, teacher_nodes):
  """(BatchNorm, target): the BatchNorm alone after the layer, and its teacher's output.

  Fitting the BatchNorm's output to the teacher BatchNorm's output, rather than
  the layer's output to the teacher layer's, holds for students whose
  BatchNorm differs from the teacher's (a random one, or after gradient
  steps): the target is mapped back through the student's BatchNorm.
  """
  if len(followers) != 1 or not _is_last_axis_norm(followers[0].layer):
    return None, target
  counterpart = _counterpart(followers[0].layer, teacher_nodes)
  if counterpart is None or counterpart.keras_inputs[0] is not target:
    return None, target
  return followers[0].layer, graph.output_tensors(counterpart)[0]


def _is_last_axis_norm(layer):
  return isinstance(layer, keras.layers.BatchNormalization) and list(layer.axis) in (
      [-1], [len(layer.input_shape) - 1])


def _base_name(name):
  return name[:-len(builders.SUFFIX)] if name.endswith(builders.SUFFIX) else name


def _counterpart(layer, teacher_nodes):
  return teacher_nodes.get(layer.name) or teacher_nodes.get(_base_name(layer.name))
