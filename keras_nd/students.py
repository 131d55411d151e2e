"""Student builders for neighbourhoods: `bottleneck`, `clone`; `narrowable` units for them;
`as_student_model` for a student given as a model, a layer or a builder.

A student neighbourhood is any model with the neighbourhood's input and output
shapes. These builders rebuild the teacher neighbourhood's own graph (through
`keras_nd.graph.rebuild`, the one graph-rewriting mechanism) with fresh layers:
narrower inner layers for `bottleneck`, the same ones for `clone`. Student
layers are named after the teacher's with a `_s` suffix, so a composed model
never holds two layers of one name.
"""

import numpy as np

from keras_nd import _checks, graph, keras3, layer_types
from keras_nd._keras import keras
from keras_nd.neighbourhood import split

__all__ = ["CHANNEL_WISE", "SUFFIX", "bottleneck", "clone", "inner_layers", "narrowable",
           "scaled_width", "slice_outputs"]

# The suffix of every student layer's name (after its teacher layer's).
SUFFIX = "_s"

# Layers through which a tensor keeps its channel count, so a narrower producer
# stays invisible as long as a channel-mixing layer follows.
_CHANNEL_PRESERVING = tuple(
    getattr(keras.layers, name) for name in (
        "BatchNormalization", "LayerNormalization", "Activation", "ReLU", "LeakyReLU", "ELU",
        "PReLU", "Softmax", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
        "GaussianNoise", "GaussianDropout", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D", "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
        "AveragePooling1D", "AveragePooling2D", "AveragePooling3D", "UpSampling1D",
        "UpSampling2D", "UpSampling3D", "DepthwiseConv2D", "DepthwiseConv1D")
    if hasattr(keras.layers, name))
# Of those, the layers that act on each channel alone (no kernel, no normalisation across
# channels): a narrowed producer's kept channels pass through them unchanged.
CHANNEL_WISE = tuple(layer for layer in _CHANNEL_PRESERVING if layer.__name__ not in (
    "DepthwiseConv2D", "DepthwiseConv1D", "Softmax", "LayerNormalization"))


def scaled_width(width, k):
  """The width of a layer scaled by a bottleneck multiplier `k`.

  Shared by `bottleneck` and the model builders in `keras_nd.models`, so that a
  student distilled for one unit has exactly the shapes and parameter count of
  that unit in a model built directly with the same multiplier.

  Args:
    width: the teacher's number of channels (filters or units).
    k: the multiplier, in (0, 1].

  Returns:
    `floor(k * width)`, at least 1. Rounding down is what reproduces the
    parameter counts of the paper's Table 1 (rounding to nearest misses
    k = 0.4 by 5%); the epsilon keeps e.g. 0.7 * 10 from flooring to 6.
  """
  return max(1, int(k * width + 1e-6))


def _width_key(layer):
  if isinstance(layer, layer_types.CONVOLUTIONS) and not isinstance(
      layer, keras.layers.DepthwiseConv2D):
    return "filters"
  if isinstance(layer, keras.layers.Dense):
    return "units"
  return None


def inner_layers(hood):
  """The layers of a neighbourhood whose width can change without changing its output shape.

  A convolution or Dense layer is inner when every path from its output meets
  another channel-mixing layer (convolution or Dense) before reaching a merge
  (Add, Concatenate, ...) or the neighbourhood's output: in a basic residual
  unit the first conv, in a bottleneck unit the two inner convs, in an
  inverted residual the expansion conv.
  """
  consumers = graph.consumers(hood.nodes)
  output_id = id(hood.output_tensor)

  def absorbed(tensor):
    if id(tensor) == output_id or id(tensor) not in consumers:
      return False
    for node in consumers[id(tensor)]:
      if _width_key(node.layer):
        continue
      if not isinstance(node.layer, _CHANNEL_PRESERVING) or not all(
          absorbed(t) for t in graph.output_tensors(node)):
        return False
    return True

  return [node.layer for node in hood.nodes
          if _width_key(node.layer) and all(absorbed(t) for t in graph.output_tensors(node))]


def narrowable(model):
  """The neighbourhoods of `model` that bottleneck students can stand for, and what was done.

  `split(model)` less its first and last neighbourhoods (the stem and the
  head, which the paper leaves to the teacher). A residual unit is a
  neighbourhood as it is. A plain chain gives one neighbourhood per
  convolution, none of which a bottleneck can narrow alone (its only
  convolution is its output): consecutive ones are distilled in twos (an odd
  run ends in a three), the first convolution of each group narrowed, the
  next one absorbing it; one left alone, or a group that still has nothing
  to narrow, stays the teacher's.

  Returns:
    (neighbourhoods, note): the neighbourhoods, in order (those of
    `split(model)` when nothing was grouped), and a one-line description of
    the grouping ("" when there was none).

  Raises:
    ValueError: no neighbourhood between the first and the last.
  """
  hoods = split(model)
  middle = hoods[1:-1]
  if not middle:
    raise ValueError(f"Model '{model.name}' has no neighbourhood between its first and its last "
                     f"({[h.name for h in hoods]}) for students to replace.")
  groups, run = [], []

  def end_run():
    if len(run) == 1:
      groups.append(run[:])
    for start in range(0, len(run) - 1, 2):
      groups.append(run[start:start + 2] if start + 3 < len(run) or len(run) - start == 2
                    else run[start:])
    run.clear()

  for hood in middle:
    if inner_layers(hood):
      end_run()
      groups.append([hood])
    else:
      run.append(hood)
  end_run()
  if all(len(group) == 1 for group in groups) and all(inner_layers(h) for h in middle):
    return middle, ""
  ends = [hoods[0]] + [group[-1] for group in groups]
  regrouped = {h.name: h for h in split(model, boundaries=[h.nodes[-1].layer.name for h in ends])}
  chosen, grouped, left = [], [], []
  for group in groups:
    hood = regrouped[group[-1].nodes[-1].layer.name]
    if inner_layers(hood):
      chosen.append(hood)
      if len(group) > 1:
        grouped.append("+".join(h.name for h in group))
    else:
      left.append("+".join(h.name for h in group))
  if not chosen:
    raise ValueError(f"No neighbourhood of model '{model.name}' has a layer a bottleneck can "
                     f"narrow, alone or with its neighbours ({[h.name for h in middle]}).")
  note = "; ".join(part for part in (
      grouped and f"distilled together (no layer to narrow alone): {', '.join(grouped)}",
      left and f"left to the teacher (nothing to narrow): {', '.join(left)}") if part)
  return chosen, note


def _student(hood, name, configure):
  """Rebuilds `hood`'s graph with new layers made by `configure(layer)` -> config overrides."""
  copies = {}

  def layer_fn(layer):
    if id(layer) not in copies:
      copies[id(layer)] = graph.copy_layer(layer, name=layer.name + SUFFIX, **configure(layer))
    return copies[id(layer)]

  model = graph.rebuild(hood.nodes, hood.input_tensor, hood.output_tensor, name,
                        layer_fn=layer_fn)
  return model, copies


def _check_hood(hood):
  if not hasattr(hood, "nodes"):
    raise TypeError(f"Expected a keras_nd.Neighbourhood; got {type(hood).__name__}.")


def bottleneck(hood, k, init="teacher"):
  """A student with the inner width of a residual unit scaled by `k`.

  The inner layers (see `inner_layers`) get `scaled_width(width, k)` channels;
  everything else keeps its configuration, so the student has the
  neighbourhood's input and output shapes.

  Args:
    hood: a `Neighbourhood`, typically a residual unit from `split`.
    k: the bottleneck multiplier, 0 < k <= 1.
    init: "teacher" (the default, as in every result of the README) starts
      from the teacher's weights with, in each inner layer, the output
      channels of largest L1 norm kept (magnitude channel pruning) and the
      layers they feed sliced to match: the student starts close to its
      teacher and needs far fewer distillation steps. "random" initialises
      the layers afresh, as the paper's students (which need the paper's
      tens of thousands of steps: README, "students from scratch").

  Returns:
    A functional `keras.Model` named `<hood name>_k<k>`.

  Raises:
    ValueError: `k` outside (0, 1], or a neighbourhood without an inner
      layer to narrow (e.g. a stem or a head).

  Example:
    >>> students = {h: nd.students.bottleneck(h, k=0.5) for h in hoods[1:-1]}
  """
  _check_hood(hood)
  _check_init(init)
  if not _checks.is_number(k) or not 0 < k <= 1:
    raise ValueError(f"The bottleneck multiplier k must be in (0, 1]; got {k!r} for "
                     f"neighbourhood '{hood.name}'.")
  inner = {id(layer) for layer in inner_layers(hood)}
  if not inner:
    raise ValueError(
        f"Neighbourhood '{hood.name}' has no inner layer whose width a bottleneck can scale "
        "(it needs a convolution or Dense layer followed by another one, as in a residual unit); "
        "use students.clone for it, or leave it out.")

  def configure(layer):
    if id(layer) not in inner:
      return {}
    key = _width_key(layer)
    return {key: scaled_width(layer.get_config()[key], k)}

  model, copies = _student(hood, f"{hood.name}_k{k:g}", configure)
  if init == "teacher":
    _init_from_teacher(hood, copies)
  return model


def _check_init(init):
  if init not in ("teacher", "random"):
    raise ValueError(f"init must be 'teacher' or 'random'; got {init!r}.")


def _init_from_teacher(hood, copies):
  """Sets each student layer from its teacher layer, slicing the channels the student dropped.

  In an inner layer the kept output channels are those of largest L1 kernel
  norm; the channel-preserving layers they pass through keep the same
  channels, and the channel-mixing layers they reach keep the same inputs.
  """
  consumers = graph.consumers(hood.nodes)
  kept_out, kept_in = {}, {}  # id(teacher layer) -> channel indices kept
  for layer in inner_layers(hood):
    kernel = layer.get_weights()[0]
    width = copies[id(layer)].get_config()[_width_key(layer)]
    norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    keep = np.sort(np.argsort(-norms, kind="stable")[:width])
    kept_out[id(layer)] = keep
    pending = [n for t in _outputs_of(hood, layer) for n in consumers.get(id(t), [])]
    while pending:
      node = pending.pop()
      if _width_key(node.layer):
        kept_in[id(node.layer)] = keep
      else:  # channel-preserving, as inner_layers guarantees
        kept_out[id(node.layer)] = keep
        pending.extend(n for t in graph.output_tensors(node) for n in consumers.get(id(t), []))
  for layer in hood.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if id(layer) in kept_in:
      weights[0] = weights[0][..., kept_in[id(layer)], :]
    if id(layer) in kept_out:
      weights = slice_outputs(layer, weights, kept_out[id(layer)])
    copies[id(layer)].set_weights(weights)


def _outputs_of(hood, layer):
  return [t for node in hood.nodes if node.layer is layer for t in graph.output_tensors(node)]


def slice_outputs(layer, weights, keep):
  """`layer`'s weights with only the output channels `keep`."""
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    kernel = weights[0][:, :, keep, :]
    rest = [w.reshape(-1, kernel.shape[-1])[keep].reshape(-1) for w in weights[1:]]
    return [kernel] + rest
  # Kernels [..., out] and biases; per-channel parameters (BatchNormalization, ...).
  return [w[..., keep] for w in weights]


def clone(hood, init="teacher"):
  """A student with the teacher neighbourhood's architecture.

  Args:
    hood: a `Neighbourhood`.
    init: "teacher" copies the teacher's weights (and BatchNorm statistics);
      "random" initialises the layers afresh.

  Returns:
    A functional `keras.Model` named `<hood name>_clone`.

  Raises:
    ValueError: an unknown `init`.
  """
  _check_hood(hood)
  _check_init(init)
  model, copies = _student(hood, f"{hood.name}_clone", lambda layer: {})
  if init == "teacher":
    for layer in hood.layers:
      copies[id(layer)].set_weights(layer.get_weights())
  return model


def as_student_model(hood, student):
  """A Keras model for a student given as a model, a layer, or a builder `f(hood) -> model`."""
  if keras3.is_keras3(student):
    raise TypeError(
        f"The student for neighbourhood '{hood.name}' is a Keras 3 model; keras_nd trains "
        "tf_keras models. Pass its conversion, `keras_nd.keras3.to_tf_keras(student)`.")
  if not isinstance(student, keras.layers.Layer) and callable(student):
    student = student(hood)
  if not isinstance(student, keras.layers.Layer):
    raise TypeError(
        f"The student for neighbourhood '{hood.name}' must be a tf_keras Model or Layer, or a "
        f"function of the neighbourhood returning one; got {type(student).__name__}.")
  graph.check_replacement(hood, student)
  if not isinstance(student, keras.Model):
    inputs = keras.Input(hood.input_shape[1:])
    student = keras.Model(inputs, student(inputs), name=f"{hood.name}_student")
  return student
