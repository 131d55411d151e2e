"""Exact solves of student neighbourhoods: `reconstruct`.

With everything before it fixed, a convolution or Dense layer's output is
linear in its weights, so the weights that bring its output closest to its
teacher counterpart's output are the solution of a ridge least-squares
problem: with X the layer's inputs (a convolution's patches) and Y the teacher
layer's outputs, `W = (X^T X + lambda I)^-1 X^T Y`. `X^T X` and `X^T Y` are
accumulated in one streaming pass over an `ActivationSource`; memory is
bounded by the size of those statistics, never by the number of examples.

The solve is sequential through each neighbourhood, as in He et al. (2017) and
ThiNet: a layer sees the student's *own* input, produced by the layers before
it already solved, so later layers correct the errors of earlier ones. Layers
at the same depth (counting only solved layers) are solved from the same pass,
in every neighbourhood at once; a ResNet basic unit whose first convolution
was narrowed needs one pass in all.

Which layers are solved: every Conv1D/2D/3D, DepthwiseConv1D/2D and Dense
layer of a student whose teacher counterpart (the teacher layer of the same
name, or of its name less the student suffix `_s`) has an output of the same
shape. A layer whose output was narrowed (a bottleneck's inner layer) has no
teacher target of its shape and keeps its weights; the layers it feeds are
solved. A layer without a bias whose output feeds a BatchNormalization gets
its intercept through that BatchNormalization's moving mean.

Which channels a narrowed layer keeps can be chosen in the same pass
(`channels="greedy"`, as ThiNet and He et al. choose them): from the
statistics of all the teacher's channels at the next layer's input, channels
are removed one at a time, each time the one whose weights cost the least
error, with the exact group update of Optimal Brain Surgeon.
"""

import dataclasses
import warnings

import numpy as np

from keras_nd import graph, layer_types
from keras_nd import students as builders
from keras_nd._keras import keras, tf

# The most inputs (patch size, plus the intercept) of one layer's system: its statistics take
# (d + 1)^2 float64 numbers, 512 MiB here. ResNet-50's widest convolution has 3 * 3 * 512 = 4608.
MAX_FEATURES = 8192
# The most bytes of statistics held at once (all layers solved from one pass).
MAX_STATISTICS_BYTES = 4 * 2**30

_TRANSPOSED = tuple(getattr(keras.layers, name) for name in (
    "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "SeparableConv1D",
    "SeparableConv2D") if hasattr(keras.layers, name))
_DEPTHWISE = tuple(getattr(keras.layers, name) for name in ("DepthwiseConv1D", "DepthwiseConv2D")
                   if hasattr(keras.layers, name))
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


@dataclasses.dataclass
class _Layer:
  """One solved layer: where its input and its target come from."""

  hood: object
  layer: object            # the student's layer, solved in place
  input_tensor: object     # in the student's graph
  target_tensor: object    # the teacher's output to match, in the neighbourhood's teacher graph
  order: int
  batch_norm: object = None  # the BatchNormalization after the layer, whose output is matched
  choice: object = None      # a _Choice: the narrowed layer before it, whose channels are chosen
  student: object = None     # the student model it belongs to


@dataclasses.dataclass
class _Choice:
  """A narrowed layer whose kept channels are chosen by the solved layer it feeds."""

  narrowed: object       # the student's narrowed layer
  teacher: object        # its teacher counterpart
  between: list          # [(student layer, teacher layer)]: channel-wise layers in between
  teacher_input: object  # the solved layer's teacher counterpart's input (all the channels)


def _kind(layer):
  if isinstance(layer, _TRANSPOSED):
    return None
  if isinstance(layer, _DEPTHWISE):
    return "depthwise"
  if isinstance(layer, _CONV):
    return "conv"
  if isinstance(layer, keras.layers.Dense):
    return "dense"
  return None


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


def _plan(hood, student, channels=None):
  """The solved layers of one student, in graph order, with their solve order."""
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
    if isinstance(layer, keras.Model) and any(_kind(sub) for sub in layer_types.leaf_layers(layer)):
      raise ValueError(
          f"Student '{student.name}' for neighbourhood '{hood.name}' holds the nested model "
          f"'{layer.name}' with weighted layers; flatten it first (nd.substitute(student, {{}}) "
          "gives a flat model).")
    order = upstream
    if _kind(layer):
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
      why = _unsupported(layer)
      target = graph.output_tensors(counterpart)[0]
      output = graph.output_tensors(node)[0]
      if why is None and tuple(output.shape[1:]) == tuple(target.shape[1:]):
        order = upstream + 1
        batch_norm, target = _normalised_target(consumers.get(id(output), []), target,
                                                teacher_nodes)
        choice = (_choice(node, producers, consumers, teacher_nodes, counterpart)
                  if channels == "greedy" and upstream == 0 else None)
        planned.append(_Layer(hood, layer, node.keras_inputs[0], target, order, batch_norm,
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


def _choice(node, producers, consumers, teacher_nodes, counterpart):
  """The `_Choice` of the narrowed layer that feeds `node`'s layer, or None if there is none.

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
    if _kind(layer) in ("conv", "dense"):
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
  return _Choice(layer, teacher.layer, between, counterpart.keras_inputs[0])


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


def _before_norm(norm, z):
  """The input that `norm` maps to `z` in inference: (z - beta) sqrt(var + eps) / gamma + mean."""
  gamma = norm.gamma if norm.gamma is not None else 1.0
  beta = norm.beta if norm.beta is not None else 0.0
  # A channel whose scale is zero ignores its input: any value is right, its mean is one.
  gamma = tf.where(tf.abs(gamma) < 1e-12, tf.ones_like(gamma) * 1e-12, gamma)
  return (z - beta) * tf.sqrt(norm.moving_variance + norm.epsilon) / gamma + norm.moving_mean


def _is_last_axis_norm(layer):
  return isinstance(layer, keras.layers.BatchNormalization) and list(layer.axis) in (
      [-1], [len(layer.input_shape) - 1])


def _base_name(name):
  return name[:-len(builders.SUFFIX)] if name.endswith(builders.SUFFIX) else name


def _counterpart(layer, teacher_nodes):
  return teacher_nodes.get(layer.name) or teacher_nodes.get(_base_name(layer.name))


def _features(layer):
  """The number of inputs of one output of `layer`'s system (without the intercept)."""
  kernel = layer_types.kernel(layer)
  if _kind(layer) == "depthwise":
    return int(np.prod(kernel.shape[:-2]))
  return int(np.prod(kernel.shape[:-1]))


def _patches(layer, x, subsample=1, phase=None):
  """A convolution's input patches, [..., prod(kernel size) * channels] in its kernel's order.

  With `subsample` s > 1, those of every s-th output position along each
  spatial axis only, from the offsets `phase` (see `_phases`).
  """
  config = layer.get_config()
  size, strides, rates = config["kernel_size"], config["strides"], config["dilation_rate"]
  x = _padded(layer, x)
  channels = x.shape[-1]
  if subsample > 1:  # output position o + s q reads the input from c o on, every c s
    begin = tf.stack([0] + [c * o for c, o in zip(strides, phase)] + [0])
    x = tf.strided_slice(x, begin, tf.shape(x, out_type=tf.int64), [1] * len(x.shape))
    x.set_shape([None] * (len(x.shape) - 1) + [channels])
    strides = [c * subsample for c in strides]
  if len(size) == 1:
    p = tf.image.extract_patches(x[:, None], [1, 1, size[0], 1], [1, 1, strides[0], 1],
                                 [1, 1, rates[0], 1], "VALID")
    return p[:, 0]
  if len(size) == 2:
    return tf.image.extract_patches(x, [1, *size, 1], [1, *strides, 1], [1, *rates, 1], "VALID")
  return tf.extract_volume_patches(x, [1, *size, 1], [1, *strides, 1], "VALID")


def _padded(layer, x):
  """`x` padded as the layer pads it ("same": TensorFlow's split; "causal": all before)."""
  config = layer.get_config()
  if config["padding"] == "valid":
    return x
  pads = [[0, 0]]
  shape = tf.shape(x, out_type=tf.int64)
  for axis, (k, c, r) in enumerate(zip(config["kernel_size"], config["strides"],
                                       config["dilation_rate"])):
    extent = r * (k - 1) + 1
    if config["padding"] == "causal":
      pads.append(tf.constant([extent - 1, 0], tf.int64))
      continue
    length = shape[axis + 1]
    total = tf.maximum((-(-length // c) - 1) * c + extent - length, 0)
    pads.append(tf.stack([total // 2, total - total // 2]))
  pads.append([0, 0])
  padded = tf.pad(x, tf.stack([tf.cast(p, tf.int64) for p in pads]))
  padded.set_shape([None] * (len(x.shape) - 1) + [x.shape[-1]])
  return padded


def _phases(batch, subsample, axes):
  """The offsets of batch number `batch` along `axes` spatial axes: all s^axes combinations
  in turn, so that over s^axes batches every position is sampled."""
  phase, offsets = tf.cast(batch, tf.int64), []
  for _ in range(axes):
    offsets.append(tf.math.floormod(phase, subsample))
    phase = tf.math.floordiv(phase, subsample)
  return offsets


def _sampled(t, subsample, phase):
  """Every `subsample`-th position of `t` [n, *spatial, c] from the offsets `phase`."""
  if subsample == 1:
    return t
  begin = tf.stack([tf.constant(0, tf.int64), *phase, tf.constant(0, tf.int64)])
  sampled = tf.strided_slice(t, begin, tf.shape(t, out_type=tf.int64),
                             [1] + [subsample] * len(phase) + [1])
  sampled.set_shape([None] * (len(t.shape) - 1) + [t.shape[-1]])
  return sampled


def _moments(layer, x, y, subsample=1, batch=0):
  """This batch's statistics of `layer`'s system, float32: {G, s, C, t, yy, n}.

  With `subsample` > 1, of every s-th output position along each spatial
  axis, from offsets that move with the batch number `batch`.
  """
  kind = _kind(layer)
  subsample = subsample if len(y.shape) > 2 else 1  # positions to sample
  phase = _phases(batch, subsample, len(y.shape) - 2) if subsample > 1 else None
  if kind == "dense":
    x = tf.reshape(_sampled(x, subsample, phase), [-1, x.shape[-1]])
    y = tf.reshape(_sampled(y, subsample, phase), [-1, y.shape[-1]])
    return {"G": tf.matmul(x, x, transpose_a=True), "s": tf.reduce_sum(x, 0),
            "C": tf.matmul(x, y, transpose_a=True), "t": tf.reduce_sum(y, 0),
            "yy": tf.reduce_sum(y * y, 0), "n": tf.cast(tf.shape(x)[0], tf.float32)}
  p = _patches(layer, x, subsample, phase)
  p = tf.reshape(p, [-1, p.shape[-1]])
  y = _sampled(y, subsample, phase)
  rows = tf.cast(tf.shape(p)[0], tf.float32)
  if kind == "depthwise":
    channels = layer_types.kernel(layer).shape[-2]
    p = tf.reshape(p, [-1, p.shape[-1] // channels, channels])   # [rows, taps, c]
    y = tf.reshape(y, [-1, channels, y.shape[-1] // channels])    # [rows, c, multiplier]
    return {"G": tf.einsum("npc,nqc->cpq", p, p), "s": tf.transpose(tf.reduce_sum(p, 0)),
            "C": tf.einsum("npc,ncm->cpm", p, y), "t": tf.reduce_sum(y, 0),
            "yy": tf.reduce_sum(y * y, 0), "n": rows}
  y = tf.reshape(y, [-1, y.shape[-1]])
  return {"G": tf.matmul(p, p, transpose_a=True), "s": tf.reduce_sum(p, 0),
          "C": tf.matmul(p, y, transpose_a=True), "t": tf.reduce_sum(y, 0),
          "yy": tf.reduce_sum(y * y, 0), "n": rows}


def _intercept(item):
  """Whether the solve has an intercept: the layer's bias, or its BatchNorm's moving mean."""
  return bool(item.layer.get_config().get("use_bias")) or item.batch_norm is not None


def _system(stats, intercept):
  """The augmented normal equations [G s; s^T n], [C; t] as float64 (leading channel axis kept)."""
  g, s, c, t, n = (stats[k] for k in ("G", "s", "C", "t", "n"))
  if not intercept:
    return g, c
  n = np.broadcast_to(n, s.shape[:-1] + (1, 1))
  a = np.concatenate([np.concatenate([g, s[..., :, None]], -1),
                      np.concatenate([s[..., None, :], n], -1)], -2)
  return a, np.concatenate([c, t[..., None, :]], -2)


def _solve(item, stats, a, b, ridge):
  """Solves one layer's system `a W = b`; returns (W with the intercept last, info)."""
  d = a.shape[-1] - int(_intercept(item))
  regularised = _regularised(a, d, ridge)
  constant = _constant_inputs(stats, a, d)
  try:
    w = np.linalg.solve(regularised, b)
  except np.linalg.LinAlgError:
    warnings.warn(
        f"reconstruct: the system of layer '{item.layer.name}' ({item.hood.name}) is singular "
        f"with ridge={ridge:g} ({constant} of its {d} inputs are constant over the data); solved "
        "by least squares of minimum norm instead. Pass ridge > 0 to regularise it.",
        stacklevel=3)
    w = np.linalg.lstsq(regularised, b, rcond=None)[0] if regularised.ndim == 2 else np.stack(
        [np.linalg.lstsq(r, v, rcond=None)[0] for r, v in zip(regularised, b)])
  return w, {"constant_inputs": constant, "features": d}


def _constant_inputs(stats, a, d, rows=None):
  """How many of the inputs (of `rows`, default all d) do not vary over the data, e.g. a channel
  a ReLU always zeroes: they make the system rank-deficient, and the ridge gives them no weight."""
  diag = np.einsum("...ii->...i", a)[..., :d]
  mean = stats["s"] / stats["n"]
  if rows is not None:
    diag, mean = diag[..., rows], mean[..., rows]
  scale = np.maximum(diag.mean(-1, keepdims=True), 1e-12)
  variance = diag / stats["n"] - mean * mean
  return int(np.sum(variance <= 1e-10 * scale / stats["n"]))


def _total(stats, intercept):
  """||Y||^2, the scale of a layer's residual; about its mean with an intercept, so that it does
  not depend on where the intercept is kept (a BatchNorm's moving mean shifts the target)."""
  total = stats["yy"] - (stats["t"] ** 2 / stats["n"] if intercept else 0.0)
  return max(float(np.sum(total)), 1e-30)


def _regularised(a, d, ridge):
  """a + ridge * mean(diag) on the first d diagonal entries: the intercept is not regularised."""
  scale = np.maximum(np.einsum("...ii->...i", a)[..., :d].mean(-1, keepdims=True), 1e-12)
  regularised = a.copy()
  idx = np.arange(d)
  regularised[..., idx, idx] += ridge * scale
  return regularised


def _residual(stats, a, b, w):
  """sum ||Y - X W||^2 from the statistics: yy - 2 tr(W^T B) + tr(W^T A W)."""
  return max(0.0, float(np.sum(stats["yy"]) - 2 * np.sum(w * b) + np.sum(w * (a @ w))))


def _current(item):
  """The layer's weights now, in the solve's layout (intercept last, if any)."""
  layer = item.layer
  kernel = layer_types.kernel(layer).numpy().astype(np.float64)
  if _kind(layer) == "depthwise":
    channels = kernel.shape[-2]
    w = np.transpose(kernel.reshape(-1, channels, kernel.shape[-1]), (1, 0, 2))
  else:
    w = kernel.reshape(-1, kernel.shape[-1])
  if not _intercept(item):
    return w
  if layer.get_config().get("use_bias"):
    bias = layer.bias.numpy().astype(np.float64).reshape(w.shape[:-2] + (1, w.shape[-1]))
  else:  # folded into the BatchNorm's moving mean: y + b - mean == y - (mean - b)
    bias = np.zeros(w.shape[:-2] + (1, w.shape[-1]))
  return np.concatenate([w, bias], -2)


def _assign(item, w):
  layer = item.layer
  kernel = layer_types.kernel(layer)
  intercept = _intercept(item)
  weights, bias = (w[..., :-1, :], w[..., -1, :]) if intercept else (w, None)
  if _kind(layer) == "depthwise":
    weights = np.transpose(weights, (1, 0, 2))
  kernel.assign(weights.reshape(kernel.shape).astype(np.float32))
  if bias is None:
    return
  bias = bias.reshape(-1)
  if layer.get_config().get("use_bias"):
    layer.bias.assign(bias.astype(np.float32))
  else:
    item.batch_norm.moving_mean.assign((item.batch_norm.moving_mean.numpy() - bias)
                                       .astype(np.float32))


def _check(students, source, ridge):
  if not isinstance(students, dict) or not students:
    raise TypeError("students must be a non-empty dict {Neighbourhood: student model}; got "
                    f"{type(students).__name__}.")
  served = {hood.name: hood for hood in getattr(source, "hoods", ())}
  if not served or not hasattr(source, "dataset"):
    raise TypeError(f"source must be a keras_nd.ActivationSource; got {type(source).__name__}.")
  for hood, student in students.items():
    if not hasattr(hood, "nodes"):
      raise TypeError(f"students' keys must be keras_nd.Neighbourhood objects; got {hood!r}.")
    if served.get(hood.name) is not hood:
      raise ValueError(
          f"The source does not serve neighbourhood '{hood.name}' (it serves "
          f"{sorted(served)}); build it over the neighbourhoods of the students.")
    if not isinstance(student, keras.Model) or not getattr(student, "_is_graph_network", False):
      raise TypeError(
          f"The student for neighbourhood '{hood.name}' must be a functional tf_keras Model "
          f"(reconstruct changes its weights in place); got {type(student).__name__}.")
    graph.check_replacement(hood, student)
    if graph.prunes(student):
      raise ValueError(
          f"The student for neighbourhood '{hood.name}' is pruned while it trains (tfmot "
          "wrappers), which reconstruct does not solve: distil it with gradient steps, or solve "
          "it before wrapping it.")
  if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
    raise ValueError(f"ridge must be a non-negative number; got {ridge!r}.")


def _check_size(items):
  total = 0
  for item in items:
    features = _features(item.layer)
    if item.choice is not None:  # the statistics of every channel of the teacher
      narrowed = layer_types.kernel(item.choice.narrowed).shape[-1]
      features = features // narrowed * layer_types.kernel(item.choice.teacher).shape[-1]
    d = features + 1
    if d > MAX_FEATURES:
      raise ValueError(
          f"Layer '{item.layer.name}' of '{item.hood.name}' has {d - 1} inputs per output "
          f"(kernel {tuple(layer_types.kernel(item.layer).shape)}); reconstruct solves at most "
          f"{MAX_FEATURES - 1}. Leave it to gradient distillation.")
    groups = layer_types.kernel(item.layer).shape[-2] if _kind(item.layer) == "depthwise" else 1
    total += groups * d * (d + layer_types.kernel(item.layer).shape[-1]) * 8
  if total > MAX_STATISTICS_BYTES:
    raise ValueError(
        f"The layers solved together need {total / 2**30:.1f} GiB of statistics, more than "
        f"{MAX_STATISTICS_BYTES / 2**30:.0f} GiB; reconstruct fewer neighbourhoods at a time.")


def _pass(source, batch_size, extractors):
  """One streaming pass: the sums (float64) of `extractors(batch, batch number)` over it."""
  fn = tf.function(extractors)
  totals = None
  for number, batch in enumerate(source.dataset(batch_size, shuffle=False)):
    moments = tf.nest.map_structure(lambda t: t.numpy().astype(np.float64),
                                    fn(batch, tf.constant(number, tf.int64)))
    totals = moments if totals is None else tf.nest.map_structure(np.add, totals, moments)
  if totals is None:
    raise ValueError("The source served no batch: its dataset is empty.")
  return totals


def reconstruct(students, source, ridge=1e-3, batch_size=256, errors=True, channels=None,
                subsample=1, sparsity=None, mask="magnitude", m_by_n=None, verbose=0):
  """Solves the weighted layers of each student in closed form, in place.

  Each solved layer gets the ridge least-squares weights (and bias) that make
  its output, given the student's own input to it, closest to its teacher
  counterpart's output on the teacher's input; see the module docstring for
  which layers are solved and in what order. Statistics are accumulated in
  one pass over `source` per solve order (plus one pass each to measure the
  errors before and after, if `errors`), so any number of examples fits in
  the same memory: `(d + 1) * (d + outputs)` float64 numbers per solved layer,
  d its inputs per output (3 * 3 * 512 = 4608 for ResNet-50's widest layer;
  at most `MAX_FEATURES - 1`, above which a ValueError names the layer).

  Args:
    students: `{Neighbourhood: student model}`, students built by keras_nd
      (`students.bottleneck`, `students.clone`) or any functional model whose
      weighted layers are named after the teacher layers they stand for; or
      a list of such dicts (e.g. Student Search's candidates of several
      widths), all solved from the same passes, statistics they share
      (those of the teacher's channels, with channels="greedy") computed
      once. A list gives a list of reports.
    source: an `ActivationSource` serving (at least) these neighbourhoods:
      cached, online or noise.
    ridge: the regularisation, relative to the mean diagonal of each
      layer's `X^T X`. It keeps rank-deficient systems (constant inputs, e.g.
      dead ReLU channels) solvable; 0 solves exactly, falling back to minimum
      norm least squares with a warning where the system is singular.
    batch_size: examples per batch of the passes.
    errors: also measure each neighbourhood's relative error before and after.
    channels: "greedy" also chooses which teacher channels each narrowed
      layer keeps (a bottleneck's inner convolution, which sees the
      teacher's input), by how well the solved layer after it reconstructs
      its target from them (ThiNet, He et al. 2017): from the teacher's
      activations of all the channels, in the same pass, by greedy exact
      removal. The narrowed layer and the channel-wise layers after it
      (BatchNorm, activation) are then set from the teacher at the kept
      channels. None keeps the channels the students have.
    sparsity: a fraction in [0, 1) of each solved layer's kernel to make
      zero, or `{layer name: fraction}` (teacher or student names): the
      entries of least magnitude (tfmot's criterion, over the whole layer)
      are zeroed, exactly that many, and the surviving weights of each
      output solved exactly on them; the layer stays a plain layer with
      zeros (the students of `split_layers` neighbourhoods, e.g.
      `students.clone`, give a sparse model as `compose` gives today).
    mask: which entries `sparsity` zeroes: "magnitude" (least magnitude
      over the layer) or "obs" (for each output, as many, chosen one at a
      time by Optimal Brain Surgeon from its least-squares solution, as
      OBC does: `w_p^2 / [H^-1]_pp` least first, the rest updated; slower,
      an `outputs x d x d` inverse per layer).
    m_by_n: (m, n), e.g. (2, 4): structured sparsity instead of `sparsity`,
      m zeros in every n consecutive weights along the input channels of
      every solved Conv1D/2D/3D and Dense layer (tfmot's `sparsity_m_by_n`),
      chosen by `mask` within each block; the input channels must be a
      multiple of n.
    subsample: s > 1 accumulates the statistics of every s-th output
      position along each spatial axis only (s^2 times fewer rows for a 2D
      layer, and as much less time in X^T X), from offsets that move with
      the batch, so that over s^2 batches every position is visited.
      Neighbouring positions are strongly correlated: on the main job s = 2
      loses nothing measurable (README).
    verbose: 1 prints a line per pass.

  Returns:
    `{neighbourhood name: {"layers": {layer name: {"order", "features",
    "constant_inputs", "error_before", "error_after"[, "channels"]}},
    "error_before", "error_after", "loss_before", "loss_after"}}`: the
    layers' relative residuals `||Y - XW||^2 / ||Y - mean(Y)||^2` (the
    mean only where the layer has an intercept; before: with the weights it
    had, on the same inputs; None where its input's channels were chosen,
    with "channels" the kept ones) and, with `errors`, the neighbourhood's
    relative error `||S(a) - T(a)||^2 / ||T(a)||^2` and mean squared error
    (the distiller's loss) over the source.

  Raises:
    ValueError, TypeError: a student layer with no teacher counterpart, a
      source that does not serve a neighbourhood, a layer too large to solve.

  Example:
    >>> students = {h: nd.students.bottleneck(h, 0.5, init="teacher") for h in units}
    >>> report = nd.reconstruct(students, source)
  """
  several = isinstance(students, (list, tuple))
  sets = list(students) if several else [students]
  if several and not sets:
    raise TypeError("students must be a dict {Neighbourhood: student model} or a non-empty list "
                    "of such dicts.")
  for one in sets:
    _check(one, source, ridge)
  if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
    raise ValueError(f"subsample must be a positive integer; got {subsample!r}.")
  values = list(sparsity.values()) if isinstance(sparsity, dict) else [sparsity or 0.0]
  if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1
         for v in values):
    raise ValueError(f"sparsity must be a fraction in [0, 1) or {{layer name: fraction}}; got "
                     f"{sparsity!r}.")
  if mask not in ("magnitude", "obs"):
    raise ValueError(f"mask must be 'magnitude' or 'obs'; got {mask!r}.")
  if m_by_n is not None:
    if (not isinstance(m_by_n, (tuple, list)) or len(m_by_n) != 2 or
        not all(isinstance(v, int) and not isinstance(v, bool) for v in m_by_n) or
        not 0 < m_by_n[0] < m_by_n[1]):
      raise ValueError(f"m_by_n must be (m, n) with 0 < m < n, m zeros in every n weights; got "
                       f"{m_by_n!r}.")
    if any(values):
      raise ValueError("pass sparsity or m_by_n, not both: m_by_n sets m / n of every solved "
                       "layer.")
  if channels is not None and (any(values) or m_by_n is not None):
    raise ValueError("reconstruct either chooses channels or prunes weights: pass channels or "
                     "sparsity, not both.")
  if channels not in (None, "greedy"):
    raise ValueError(f"channels must be None or 'greedy'; got {channels!r}.")
  items, owner = [], {}
  for index, one in enumerate(sets):
    for hood, student in one.items():
      owner[id(student)] = index
      items.extend(_plan(hood, student, channels))
  if m_by_n is not None:
    for item in items:
      _check_blocks(item.layer, m_by_n[1])
  reports = [{hood.name: {"layers": {}} for hood in one} for one in sets]
  orders = sorted({item.order for item in items})
  for order in orders:
    group = [item for item in items if item.order == order]
    _check_size(_distinct(group))
    measure = errors and order == orders[0]
    extract, computed_by = _extractors(sets, group, with_errors=measure, subsample=subsample)
    totals = _pass(source, batch_size, extract)
    if verbose:
      print(f"reconstruct: pass {order} of {len(orders)}, {len(group)} layers", flush=True)
    if measure:
      _record_errors(reports, totals["errors"], "before")
    for item, stats in zip(group, (totals["layers"][k] for k in computed_by)):
      a, b = _system(stats, _intercept(item))
      total = _total(stats, _intercept(item))
      target = m_by_n[0] / m_by_n[1] if m_by_n else _target_sparsity(item, sparsity)
      if target:
        before = _residual(stats, a, b, _current(item)) / total
        w, info = _masked_solve(item, stats, a, b, ridge, target, mask, m_by_n)
        info.update(error_before=before, error_after=_residual(stats, a, b, w) / total)
      elif item.choice is None:
        w, info = _solve(item, stats, a, b, ridge)
        info.update(error_before=_residual(stats, a, b, _current(item)) / total,
                    error_after=_residual(stats, a, b, w) / total)
      else:
        w, info = _choose(item, stats, a, b, ridge)
        info["error_after"] /= total
      info["order"] = order
      _assign(item, w)
      reports[owner[id(item.student)]][item.hood.name]["layers"][item.layer.name] = info
  if errors:
    totals = _pass(source, batch_size, _extractors(sets, [], with_errors=True)[0])
    _record_errors(reports, totals["errors"], "after")
    if not orders:  # nothing was solved
      _record_errors(reports, totals["errors"], "before")
  return reports if several else reports[0]


def _target_sparsity(item, sparsity):
  """The fraction of `item`'s kernel to zero: `sparsity` (a number, or by layer name), or 0."""
  if isinstance(sparsity, dict):
    return sparsity.get(item.layer.name, sparsity.get(_base_name(item.layer.name), 0.0))
  return sparsity or 0.0


def _check_blocks(layer, n):
  """m-by-n blocks run along the input channels: a layer they fit, or a ValueError."""
  if _kind(layer) == "depthwise":
    raise ValueError(f"m_by_n sparsity applies to Conv1D/2D/3D and Dense layers; layer "
                     f"'{layer.name}' is a {type(layer).__name__}.")
  channels = layer_types.kernel(layer).shape[-2]
  if channels % n:
    raise ValueError(f"m_by_n blocks of {n} do not fit layer '{layer.name}': its {channels} "
                     f"input channels are not a multiple of {n}.")


def _magnitude_mask(kernel_rows, target, m_by_n=None):
  """The kept entries (True) of `kernel_rows` [d, outputs]: all but the round(target * size) of
  least magnitude, over the whole layer, as tfmot's magnitude pruning chooses them; or, with
  `m_by_n` (m, n), all but the m of least magnitude in every block of n consecutive rows."""
  if m_by_n is not None:
    m, n = m_by_n
    blocks = np.abs(kernel_rows).T.reshape(kernel_rows.shape[1], -1, n)
    keep = np.ones(blocks.shape, bool)
    np.put_along_axis(keep, np.argsort(blocks, -1, kind="stable")[..., :m], False, -1)
    return keep.reshape(kernel_rows.shape[1], -1).T
  flat = np.abs(kernel_rows).reshape(-1)
  pruned = int(round(target * flat.size))
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind="stable")[:pruned]] = False
  return keep.reshape(kernel_rows.shape)


def _obs_mask(h, rhs, d, counts, m_by_n=None):
  """The kept inputs [d, outputs] when output j loses `counts[j]` of them by Optimal Brain
  Surgeon: from its least-squares solution, the input of least `w_p^2 / [H^-1]_pp` goes first,
  and the output's other weights and its H^-1 are updated exactly (OBC's row-wise greedy).
  With `m_by_n` (m, n), a block of n consecutive inputs that has lost m loses no more."""
  outputs = rhs.shape[-1]
  block = np.arange(d) // (m_by_n[1] if m_by_n else d)
  lost = np.zeros((outputs, block[-1] + 1), int)
  hinv = np.repeat(np.linalg.inv(h)[None], outputs, 0)  # [outputs, D, D], one per output
  w = np.einsum("jab,bj->ja", hinv, rhs)
  alive = np.ones((outputs, d), bool)
  counts = np.asarray(counts).reshape(-1)
  every = np.arange(outputs)
  for step in range(int(counts.max(initial=0))):
    active = counts > step  # the counts differ by one at most: all outputs but a few
    diag = np.einsum("jaa->ja", hinv)[:, :d]
    open_ = lost[:, block] < (m_by_n[0] if m_by_n else d)
    cost = np.where(alive & open_, w[:, :d] ** 2 / np.maximum(diag, 1e-30), np.inf)
    p = np.argmin(cost, 1)
    column = hinv[every, :, p]  # H^-1 is symmetric: its row p too
    scale = active / hinv[every, p, p]
    w -= (w[every, p] * scale)[:, None] * column
    hinv -= column[:, :, None] * (column * scale[:, None])[:, None, :]
    alive[every[active], p[active]] = False
    lost[every[active], block[p[active]]] += 1
  return alive.T


def _masked_solve(item, stats, a, b, ridge, target, mask, m_by_n=None):
  """The layer solved with `target` of its kernel zero: (W, info).

  The zeros are the kernel's entries of least magnitude now (the teacher's,
  for a student that starts from it), or, with mask="obs", chosen for each
  output by Optimal Brain Surgeon (`_obs_mask`, the same number per output);
  each output's surviving weights (and its intercept) are then the exact
  ridge least-squares solution, one small solve per output on its rows.
  """
  intercept = _intercept(item)
  d = a.shape[-1] - int(intercept)
  current = _current(item)
  regularised = _regularised(a, d, ridge)
  if mask == "magnitude":
    keep = _magnitude_mask(current[..., :d, :], target, m_by_n)
  else:  # the zeros spread evenly over the outputs (of every channel, for a depthwise layer)
    outputs = int(np.prod(b.shape[:-2])) * b.shape[-1]
    total = int(round(target * outputs * d))
    counts = (total // outputs + (np.arange(outputs) < total % outputs)).reshape(
        b.shape[:-2] + (b.shape[-1],))
    keep = (_obs_mask(regularised, b, d, counts, m_by_n) if regularised.ndim == 2 else np.stack(
        [_obs_mask(h, rhs, d, c) for h, rhs, c in zip(regularised, b, counts)]))
  w = np.zeros_like(current)
  # Depthwise systems have a leading channel axis; others are one system.
  systems = [(regularised, b, keep, w)] if regularised.ndim == 2 else list(
      zip(regularised, b, keep, w))
  for h, rhs, kept, out in systems:
    for j in range(rhs.shape[-1]):
      rows = np.concatenate([np.flatnonzero(kept[:, j]), np.arange(d, h.shape[-1])])
      if rows.size:
        out[rows, j] = np.linalg.solve(h[np.ix_(rows, rows)], rhs[rows, j])
  return w, {"features": d, "constant_inputs": _constant_inputs(stats, a, d),
             "sparsity": float(1 - keep.sum() / keep.size)}


def _choose(item, stats, a, b, ridge):
  """Chooses the narrowed layer's channels and solves the layer on them; (W, info).

  Greedy backward elimination, exact for least squares: the channel whose
  weights (one group of rows of W, a row per tap) cost least to zero goes
  first, `dE = tr(W_g^T [H^-1]_gg^-1 W_g)`, and W and H^-1 are updated as
  Optimal Brain Surgeon does, a group at a time. The cost is weighted by the
  following BatchNorm's scale, as the neighbourhood's output sees the error.
  The narrowed layer and the channel-wise layers after it are then sliced
  from their teacher counterparts at the kept channels.
  """
  choice = item.choice
  channels = layer_types.kernel(choice.teacher).shape[-1]
  width = layer_types.kernel(choice.narrowed).shape[-1]
  d = a.shape[-1] - int(_intercept(item))
  taps = d // channels
  weight = np.ones(b.shape[-1])
  norm = item.batch_norm
  if norm is not None:
    gamma = norm.gamma.numpy() if norm.gamma is not None else 1.0
    weight = gamma ** 2 / (norm.moving_variance.numpy() + norm.epsilon)
  h = _regularised(a, d, ridge)
  hinv = np.linalg.inv(h)
  w = hinv @ b
  groups = {q: np.arange(taps) * channels + q for q in range(channels)}
  while len(groups) > width:
    costs = {q: float(np.sum(weight * np.sum(w[g] * np.linalg.solve(hinv[np.ix_(g, g)], w[g]), 0)))
             for q, g in groups.items()}
    g = groups.pop(min(costs, key=costs.get))
    block = np.linalg.inv(hinv[np.ix_(g, g)])
    w -= hinv[:, g] @ (block @ w[g])
    hinv -= hinv[:, g] @ block @ hinv[g, :]
  keep = np.array(sorted(groups))
  rows = (np.arange(taps)[:, None] * channels + keep[None, :]).reshape(-1)
  rows = np.append(rows, np.arange(d, a.shape[-1]))  # the intercept, if any
  kept = np.linalg.solve(h[np.ix_(rows, rows)], b[rows])
  full = np.zeros_like(b)
  full[rows] = kept
  constant = _constant_inputs(stats, a, d, rows[:taps * width])
  narrowed = choice.teacher.get_weights()
  choice.narrowed.set_weights(builders.slice_outputs(choice.teacher, narrowed, keep))
  for student_layer, teacher_layer in choice.between:
    if teacher_layer.weights:
      student_layer.set_weights(
          builders.slice_outputs(teacher_layer, teacher_layer.get_weights(), keep))
  return kept, {"features": taps * width, "constant_inputs": constant, "error_before": None,
                "error_after": _residual(stats, a, b, full), "channels": keep.tolist()}


def _record_errors(reports, sums, when):
  for key, (err, norm, count) in sums.items():
    index, name = key.split(":", 1)
    reports[int(index)][name][f"error_{when}"] = float(err / max(norm, 1e-30))
    reports[int(index)][name][f"loss_{when}"] = float(err / max(count, 1))


def _shared(item):
  """What makes two items' statistics the same, or None: a layer whose input's channels are
  chosen reads the teacher's input and target, so students of several widths of one
  neighbourhood (Student Search's candidates) share them, if their BatchNorms agree."""
  if item.choice is None:
    return None
  config = item.layer.get_config()
  norm = () if item.batch_norm is None else tuple(
      w.tobytes() for w in item.batch_norm.get_weights())
  return (id(item.choice.teacher_input), id(item.target_tensor), str(config.get("kernel_size")),
          str(config.get("strides")), config.get("padding"), str(config.get("dilation_rate")),
          type(item.layer).__name__, norm)


def _distinct(items):
  """`items` with one of each set that shares its statistics (what one pass holds)."""
  seen, kept = set(), []
  for item in items:
    key = _shared(item)
    if key is None or key not in seen:
      kept.append(item)
      seen.add(key)
  return kept


def _extractors(sets, group, with_errors, subsample=1):
  """(run, computed_by): `run(batch, number)` gives {"layers": [the distinct statistics],
  "errors": {"i:name": (e, |t|, size)}}; item i's statistics are layers[computed_by[i]], those
  that items share (`_shared`) computed once."""
  by_student, wanted = {}, {}
  for item in group:
    by_student.setdefault(id(item.student), []).append(item)
    tensors = wanted.setdefault(item.hood, {})
    tensors[id(item.target_tensor)] = item.target_tensor
    if item.choice:  # the teacher's input, all its channels
      tensors[id(item.choice.teacher_input)] = item.choice.teacher_input
  teacher_models = {hood: (list(tensors), keras.Model(hood.teacher.inputs, list(tensors.values())))
                    for hood, tensors in wanted.items()}
  student_models = {}
  for key, student_items in by_student.items():
    own = [item for item in student_items if item.choice is None]
    if own:
      student_models[key] = (own, keras.Model(own[0].student.inputs,
                                              [item.input_tensor for item in own]))
  first = {}  # the position of each distinct set of statistics (decided here, eagerly)
  computed_by = [first.setdefault(_shared(item) or ("own", i), len(first))
                 for i, item in enumerate(group)]
  computing = [group[computed_by.index(k)] for k in range(len(first))]

  def run(batch, number):
    out = {"layers": [], "errors": {}}
    values = {}
    for hood, (keys, model) in teacher_models.items():
      values.update(zip(keys, tf.nest.flatten(model(batch[hood.name][0], training=False))))
    for own, model in student_models.values():
      inputs = tf.nest.flatten(model(batch[own[0].hood.name][0], training=False))
      values.update(zip([("own", id(item)) for item in own], inputs))
    for item in computing:
      x = values[id(item.choice.teacher_input)] if item.choice else values[("own", id(item))]
      y = values[id(item.target_tensor)]
      if item.batch_norm is not None:
        y = _before_norm(item.batch_norm, y)
      out["layers"].append(_moments(item.layer, x, y, subsample, number))
    if with_errors:
      for index, one in enumerate(sets):
        for hood, student in one.items():
          a, t = batch[hood.name][:2]
          diff = student(a, training=False) - t
          out["errors"][f"{index}:{hood.name}"] = (
              tf.reduce_sum(diff * diff), tf.reduce_sum(t * t), tf.cast(tf.size(t), tf.float32))
    return out

  return run, computed_by

