"""The statistics of `reconstruct`'s systems, accumulated in one streaming pass over a source.

For each solved layer the pass sums, over every example (and output
position), the moments of its normal equations: `X^T X`, `X^T Y`, the sums of
X and Y and of `Y^2`, and the count, from the layer's input (a convolution's
patches) and its target. Layers whose statistics are the same (the teacher's
channels, read by candidates of several widths) are computed once.
"""

import numpy as np

from keras_nd import layer_types
from keras_nd._keras import keras, tf
from keras_nd.reconstruct_plan import kind

__all__ = ["MAX_FEATURES", "MAX_STATISTICS_BYTES", "accumulate", "check_size", "extractor"]

# The most inputs (patch size, plus the intercept) of one layer's system: its statistics take
# (d + 1)^2 float64 numbers, 512 MiB here. ResNet-50's widest convolution has 3 * 3 * 512 = 4608.
MAX_FEATURES = 8192
# The most bytes of statistics held at once (all layers solved from one pass).
MAX_STATISTICS_BYTES = 4 * 2**30


def check_size(items):
  """Refuses a layer with too many inputs, or statistics too large for one pass (ValueError)."""
  total = 0
  for item in _distinct(items):
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
    groups = layer_types.kernel(item.layer).shape[-2] if kind(item.layer) == "depthwise" else 1
    total += groups * d * (d + layer_types.kernel(item.layer).shape[-1]) * 8
  if total > MAX_STATISTICS_BYTES:
    raise ValueError(
        f"The layers solved together need {total / 2**30:.1f} GiB of statistics, more than "
        f"{MAX_STATISTICS_BYTES / 2**30:.0f} GiB; reconstruct fewer neighbourhoods at a time.")


def _features(layer):
  """The number of inputs of one output of `layer`'s system (without the intercept)."""
  kernel = layer_types.kernel(layer)
  if kind(layer) == "depthwise":
    return int(np.prod(kernel.shape[:-2]))
  return int(np.prod(kernel.shape[:-1]))


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


def extractor(sets, group, with_errors, subsample=1):
  """What one pass computes from each batch: the statistics of `group`, and the errors.

  Args:
    sets: the student dicts `{Neighbourhood: student}` of the call.
    group: the `SolvedLayer`s whose statistics the pass accumulates.
    with_errors: also the error of every student of `sets`.
    subsample: s > 1 samples every s-th output position along each spatial
      axis, from offsets that move with the batch number.

  Returns:
    (run, computed_by): `run(batch, number)` gives `{"layers": [the distinct
    statistics, each {G, s, C, t, yy, n}], "errors": {"i:name": (e, |t|^2,
    size)}}`; item i's statistics are `layers[computed_by[i]]`, those that
    items share computed once.
  """
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


def accumulate(source, batch_size, extract):
  """One streaming pass over `source`: the sums (float64) of `extract(batch, batch number)`.

  Raises:
    ValueError: the source served no batch.
  """
  fn = tf.function(extract)
  totals = None
  for number, batch in enumerate(source.dataset(batch_size, shuffle=False)):
    moments = tf.nest.map_structure(lambda t: t.numpy().astype(np.float64),
                                    fn(batch, tf.constant(number, tf.int64)))
    totals = moments if totals is None else tf.nest.map_structure(np.add, totals, moments)
  if totals is None:
    raise ValueError("The source served no batch: its dataset is empty.")
  return totals


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
  layout = kind(layer)
  subsample = subsample if len(y.shape) > 2 else 1  # positions to sample
  phase = _phases(batch, subsample, len(y.shape) - 2) if subsample > 1 else None
  if layout == "dense":
    x = tf.reshape(_sampled(x, subsample, phase), [-1, x.shape[-1]])
    y = tf.reshape(_sampled(y, subsample, phase), [-1, y.shape[-1]])
    return {"G": tf.matmul(x, x, transpose_a=True), "s": tf.reduce_sum(x, 0),
            "C": tf.matmul(x, y, transpose_a=True), "t": tf.reduce_sum(y, 0),
            "yy": tf.reduce_sum(y * y, 0), "n": tf.cast(tf.shape(x)[0], tf.float32)}
  p = _patches(layer, x, subsample, phase)
  p = tf.reshape(p, [-1, p.shape[-1]])
  y = _sampled(y, subsample, phase)
  rows = tf.cast(tf.shape(p)[0], tf.float32)
  if layout == "depthwise":
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


def _before_norm(norm, z):
  """The input that `norm` maps to `z` in inference: (z - beta) sqrt(var + eps) / gamma + mean."""
  gamma = norm.gamma if norm.gamma is not None else 1.0
  beta = norm.beta if norm.beta is not None else 0.0
  # A channel whose scale is zero ignores its input: any value is right, its mean is one.
  gamma = tf.where(tf.abs(gamma) < 1e-12, tf.ones_like(gamma) * 1e-12, gamma)
  return (z - beta) * tf.sqrt(norm.moving_variance + norm.epsilon) / gamma + norm.moving_mean
