"""ActivationSource: the teacher's activations that neighbourhood students learn from.

One teacher forward pass per batch, through a single multi-output extractor,
yields every tensor the neighbourhoods need (each cut tensor once, though it
is one neighbourhood's output and the next one's input). Three modes:

* cached (``cache_dir`` given): the activations are written once to sharded
  files and streamed back through tf.data on every epoch;
* online (no ``cache_dir``): the extractor runs in the input pipeline each
  step (for caches too large to store, or with data augmentation);
* noise (`ActivationSource.from_noise`): neighbourhood inputs drawn from
  Gaussian noise, targets computed by the teacher's neighbourhoods (data-free).

Cache layout (``cache_dir``)::

  shard-00000.bin ...   records of `records_batch` examples (a batch of more
                        than 4 MiB is cut into equal records); a record
                        holds, key after key, the raw bytes of [n, *shape]
                        arrays
  manifest.json         written last and atomically: teacher fingerprint, data
                        fingerprint, keys, shapes, dtype, counts, per-shard
                        sizes and CRC-32 checksums, and the build's seconds

A directory without a manifest is an interrupted build and is rebuilt; one
whose manifest does not match the request is refused. The manifest is synced
to disk, the shards are not (syncing them made a build up to 2.5x slower than
the teacher pass on a disk of a few hundred MB/s): a killed process loses
nothing the operating system has accepted, and shards that a power cut or a
crash of the machine tore fail their size or CRC-32 check when the cache is
next opened, which refuses them and names the shard.
"""

import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
import warnings
import weakref
import zlib

import numpy as np

from keras_nd import files, graph
from keras_nd._keras import keras, tf
from keras_nd.batches import as_batches
from keras_nd.neighbourhood import checked_hoods

MANIFEST = "manifest.json"
_FORMAT = "keras_nd.activations/1"
_DTYPES = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32}
# A teacher batch of more bytes is written as several equal records. Reading copies a record
# three times (file buffer, string, tensor) and decoding once more; records of a few MiB keep
# those copies in the CPU caches and below malloc's mmap threshold (beyond 32 MiB every read
# page-faults fresh memory). FixedLengthRecordDataset read a ResNet-20 cache (all 12 tensors,
# 4096 examples) with 2.5x less CPU in 6 MiB records than in 54 MiB ones.
_RECORD_BYTES = 4 * 2**20
_IDENTITY_AT_INFERENCE = (keras.layers.Dropout, keras.layers.GaussianNoise,
                          keras.layers.GaussianDropout)
# {teacher: {keys: _Extraction}}: sources of one teacher share the extractor and its traced
# pass, so building a second cache (other data, or a rebuild) does not trace the teacher again.
_EXTRACTIONS = weakref.WeakKeyDictionary()


def tensor_key(tensor):
  """A stable name for a tensor of a functional model: the layer that produced it."""
  layer, node_index, tensor_index = tensor._keras_history  # pylint: disable=protected-access
  key = layer.name
  if node_index:
    key += f"@{node_index}"
  if tensor_index:
    key += f":{tensor_index}"
  return key


def teacher_fingerprint(model):
  """SHA-256 of a model's architecture and weights (BatchNorm statistics included)."""
  digest = hashlib.sha256(model.to_json().encode())
  for weight in model.weights:
    digest.update(weight.name.encode())
    digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
  return digest.hexdigest()


# How far (in the teacher's own standard deviations) a batch's channel means may lie from the
# means the teacher's first BatchNormalization learned, and how far their spread may be from its
# (a factor), before the inputs are taken to be given otherwise than in training.
_DRIFT_MEANS = 3.0
_DRIFT_SCALE = 5.0


def check_inputs(teacher, x):
  """Warns when a batch of inputs `x` looks unlike the data `teacher` was trained on.

  At the teacher's first BatchNormalization, the batch's per-channel means
  and standard deviations are compared with the moving statistics it learned
  in training: images standardised for a teacher trained on raw pixels (or
  the other way round) lie tens of standard deviations off, the same images
  as in training well within one. Returns the median distance of the means,
  in the teacher's standard deviations, and the median ratio of spreads
  (None, None for a teacher without BatchNormalization).
  """
  norm = next((layer for layer in teacher.layers
               if isinstance(layer, keras.layers.BatchNormalization)), None)
  if norm is None or len(norm.inbound_nodes) != 1 or norm.axis not in ([-1], [len(
      norm.input_shape) - 1]):
    return None, None
  features = keras.Model(teacher.inputs, norm.input)(tf.cast(x, teacher.inputs[0].dtype),
                                                    training=False)
  axes = list(range(len(features.shape) - 1))
  mean, variance = (t.numpy().astype(np.float64) for t in tf.nn.moments(features, axes))
  std = np.sqrt(norm.moving_variance.numpy().astype(np.float64) + norm.epsilon)
  distance = float(np.median(np.abs(mean - norm.moving_mean.numpy()) / std))
  scale = float(np.median(np.sqrt(variance + norm.epsilon) / std))
  if distance > _DRIFT_MEANS or not 1 / _DRIFT_SCALE < scale < _DRIFT_SCALE:
    warnings.warn(
        f"The inputs look unlike the data teacher '{teacher.name}' was trained on: at its first "
        f"BatchNormalization '{norm.name}' their channel means lie a median {distance:.1f} of "
        f"its standard deviations from the means it learned, and their spread is {scale:.2g}x "
        "its. Give them the preprocessing the teacher was trained with (standardised, or raw; "
        "the binaries' --preprocessing), or its results will be wrong.", stacklevel=3)
  return distance, scale


def noise_statistics(hood, input_mean=0.0, input_std=1.0):
  """Per-channel mean and standard deviation of `hood`'s input, read from the teacher itself.

  No data is used. The teacher's input is taken as N(input_mean, input_std^2)
  per channel (standardised images: N(0, 1)), and the first two moments are
  carried forward to the neighbourhood's input through the layers that set
  them: a BatchNormalization layer in inference mode outputs mean `beta` and
  standard deviation `|gamma| sqrt(v / (v + eps))` when its input has the
  running mean and variance (m, v) it was trained on; a ReLU turns N(mu,
  sigma^2) into a rectified Gaussian, whose moments are exact; Add sums means
  and variances (its inputs taken as independent), and a ReLU after it treats
  the sum as Gaussian, an approximation (within 11% on the test's small
  residual model); ZeroPadShortcut,
  padding, pooling and dropout keep each channel's moments (padded channels
  are 0); dropout and Gaussian noise layers are the identity at inference.
  Anything else (e.g. a convolution with no BatchNormalization after it)
  raises, naming the layer.

  The paper draws neighbourhood inputs from N(0, 1); these statistics add the
  scale and offset each neighbourhood actually sees, still without reading
  any data, and `ActivationSource.from_noise(mean="teacher")` also gives
  inputs that a ReLU produces the rectified shape (a unit after a ReLU never
  sees negative inputs).

  Returns:
    (mean, std): float32 arrays with one value per input channel.
  """
  return _moments_at(hood.input_tensor, hood.input_shape[-1], input_mean, input_std)


def _moments_at(tensor, channels, input_mean, input_std):
  """(mean, std) per channel of `tensor` for N(input_mean, input_std^2) teacher inputs."""
  memo = {}

  def moments(t):
    if id(t) not in memo:
      memo[id(t)] = _moments(t, moments, channels, input_mean, input_std)
    return memo[id(t)]

  mean, variance = moments(tensor)
  return (np.asarray(mean, np.float32) * np.ones(channels, np.float32),
          np.sqrt(np.maximum(variance, 0.0)).astype(np.float32) * np.ones(channels, np.float32))


def _relu_input(tensor):
  """The input of the ReLU that produced `tensor` (through noise or dropout layers), or None."""
  layer, node_index, _ = tensor._keras_history  # pylint: disable=protected-access
  while isinstance(layer, _IDENTITY_AT_INFERENCE):
    tensor = layer._inbound_nodes[node_index].keras_inputs[0]  # pylint: disable=protected-access
    layer, node_index, _ = tensor._keras_history  # pylint: disable=protected-access
  if _is_relu(layer):
    return layer._inbound_nodes[node_index].keras_inputs[0]  # pylint: disable=protected-access
  return None


def _is_relu(layer):
  return isinstance(layer, keras.layers.ReLU) or (
      isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] == "relu")


def _teacher_noise(hood):
  """(mean, std, rectify) of the noise for `hood`'s input under mean="teacher".

  An input produced by a ReLU is drawn as ReLU(N(mean, std^2)) with the
  moments of the ReLU's input, so that it is non-negative with the teacher's
  share of zeros; its moments are then `noise_statistics(hood)`. Any other
  input is drawn as N(`noise_statistics(hood)`).
  """
  before = _relu_input(hood.input_tensor)
  mean, std = _moments_at(hood.input_tensor if before is None else before,
                          hood.input_shape[-1], 0.0, 1.0)
  return mean, std, before is not None


def _moments(tensor, moments, channels, input_mean, input_std):
  """(mean, variance) per channel of `tensor`, from those of its producer's inputs."""
  layer, node_index, _ = tensor._keras_history  # pylint: disable=protected-access
  node = layer._inbound_nodes[node_index]  # pylint: disable=protected-access
  inputs = node.keras_inputs
  kind = type(layer).__name__
  if isinstance(layer, keras.layers.InputLayer) or not inputs:
    width = tensor.shape[-1]
    return (np.full(width, input_mean, np.float64), np.full(width, input_std**2, np.float64))
  if isinstance(layer, keras.layers.BatchNormalization):
    gamma = layer.gamma.numpy() if layer.scale else 1.0
    beta = layer.beta.numpy() if layer.center else 0.0
    variance = layer.moving_variance.numpy()
    width = tensor.shape[-1]
    return (np.broadcast_to(beta, width).astype(np.float64),
            np.broadcast_to(gamma**2 * variance / (variance + layer.epsilon), width))
  if _is_relu(layer):
    return _rectified(*moments(inputs[0]))
  if isinstance(layer, keras.layers.Add):
    parts = [moments(t) for t in inputs]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)
  if kind == "ZeroPadShortcut":
    mean, variance = moments(inputs[0])
    extra = layer.filters - len(mean)
    pad = (extra // 2, extra - extra // 2)
    return np.pad(mean, pad), np.pad(variance, pad)
  if isinstance(layer, (keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D,
                        keras.layers.AveragePooling2D) + _IDENTITY_AT_INFERENCE):
    return moments(inputs[0])
  raise ValueError(
      f"Cannot derive noise statistics through layer '{layer.name}' ({kind}): only "
      "BatchNormalization, ReLU, Add, padding, pooling and dropout carry them. Pass mean and "
      "stddev to ActivationSource.from_noise yourself.")


def _rectified(mean, variance):
  """Mean and variance of max(0, X) for X ~ N(mean, variance), per channel."""
  mean, std = np.asarray(mean, np.float64), np.sqrt(np.asarray(variance, np.float64))
  safe = np.where(std > 0, std, 1.0)
  alpha = mean / safe
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(alpha / math.sqrt(2.0)))
  pdf = np.exp(-0.5 * alpha**2) / math.sqrt(2.0 * math.pi)
  first = mean * cdf + std * pdf
  second = (mean**2 + std**2) * cdf + mean * std * pdf
  first = np.where(std > 0, first, np.maximum(mean, 0.0))
  second = np.where(std > 0, second, np.maximum(mean, 0.0)**2)
  return first, np.maximum(second - first**2, 0.0)


def _nbytes(shape, dtype):
  return int(np.prod(shape, dtype=np.int64)) * dtype.size


def free_bytes(path):
  """Free space on the file system holding `path` (a seam for tests)."""
  return shutil.disk_usage(path).free


class ActivationSource:
  """Batches of `{neighbourhood name: (a_i, T_i(a_i))}` for neighbourhood distillation.

  Args:
    teacher: the trained functional teacher model.
    hoods: the neighbourhoods to serve (from `split` or `split_layers` of
      `teacher`).
    dataset: a `tf.data.Dataset` of teacher inputs, batched or not, of
      `x` or `(x, y, ...)` elements (labels are ignored), or a numpy array
      of teacher inputs. For a cache it should be deterministic (no
      shuffling or augmentation): the cache is keyed by a digest of all its
      inputs, streamed once before the cache is opened (a dataset whose
      content changed anywhere never meets the old cache).
    cache_dir: where to store the activations; None for online extraction.
    dtype: storage dtype of the cache: "float16", "bfloat16" or "float32".
      Batches are always served as float32.
    lookahead: also serve the teacher's outputs of the `lookahead`
      neighbourhoods that follow each one (for look-ahead losses).
    records_batch: examples per teacher pass when building the cache.
    shard_bytes: approximate size of one cache shard file.
    data_fingerprint: a string naming the data, used instead of hashing
      the dataset's inputs to recognise the cache.
    verify: check every shard's CRC-32 when opening an existing cache.
    verbose: 1 prints the cache size and a progress bar while building.

  Raises:
    ValueError: neighbourhoods from another model, a bad dtype, an empty
      dataset, or a cache in `cache_dir` built for another teacher, data or
      spec (named in the message).
    OSError: too little free disk for the cache.

  Example:
    >>> source = nd.ActivationSource(teacher, hoods, images, cache_dir="cache")
    >>> for batch in source.dataset(batch_size=128).take(1):
    ...   a, t = batch[hoods[1].name]
  """

  def __init__(self, teacher, hoods, dataset, cache_dir=None, dtype="float16", lookahead=0,
               records_batch=256, shard_bytes=256 * 2**20, data_fingerprint=None, verify=True,
               verbose=1):
    self.teacher = teacher
    self.hoods = checked_hoods(teacher, hoods, "teacher")
    if dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}.")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
      raise ValueError(f"lookahead must be a non-negative integer; got {lookahead!r}.")
    self.dtype = dtype
    self.lookahead = lookahead
    if cache_dir is not None:
      cache_dir = files.writable_directory(cache_dir, "cache_dir")
    self.cache_dir = cache_dir
    self.verbose = verbose
    self._layout = _layout(self.hoods, lookahead)
    self._keys = sorted({key for in_key, out_key, ahead in self._layout.values()
                         for key in (in_key, out_key, *ahead)})
    self._extraction = _extraction(teacher, self._keys)
    self._extractor = self._extraction.model
    self._shapes = {k: tuple(t.shape[1:]) for k, t in zip(self._keys, self._extractor.outputs)}
    self._noise = None
    if dataset is None:
      self.manifest = None
      return
    self._inputs, self._examples_hint, self._exact = _batched_inputs(teacher, dataset,
                                                                     records_batch)
    first = next(iter(self._inputs.take(1)), None)
    if first is not None:
      check_inputs(teacher, first)
    self.manifest = None
    if cache_dir is not None:
      self.manifest = _CacheBuilder(self, records_batch, shard_bytes, data_fingerprint,
                                    verify).open_or_build()

  @classmethod
  def from_noise(cls, teacher, hoods, steps_per_epoch, mean=0.0, stddev=1.0, seed=0,
                 lookahead=0):
    """A data-free source: each neighbourhood's input is Gaussian noise.

    Inputs are drawn as `mean + stddev * N(0, 1)` in the neighbourhood's input
    shape (`mean`/`stddev` broadcast over the channel axis); targets are the
    teacher neighbourhood's outputs on that noise (and, for look-ahead, the
    following teacher neighbourhoods' outputs on those).

    Args:
      teacher: the trained functional teacher model.
      hoods: neighbourhoods of `teacher`.
      steps_per_epoch: batches per epoch of the served dataset.
      mean, stddev: per-channel statistics of the noise (scalars or vectors),
        the same for every neighbourhood or dicts {neighbourhood name: value};
        or mean="teacher" for statistics read from the teacher (stddev is then
        ignored): an input that a ReLU produces is drawn as ReLU(N(m, s^2))
        with the moments (m, s^2) of the ReLU's input, so it is non-negative,
        with as many zeros as the teacher's model of it predicts, and has the
        moments `noise_statistics(hood)`; any other input is drawn as
        N(`noise_statistics(hood)`).
      seed: the noise of step s in every epoch is a function of (seed, s).
      lookahead: as for the constructor.

    Returns:
      An `ActivationSource` in noise mode.
    """
    source = cls(teacher, hoods, None, lookahead=lookahead, verbose=0)
    if isinstance(mean, str):
      if mean != "teacher":
        raise ValueError(f"mean must be a number, a vector, a dict or 'teacher'; got {mean!r}.")
      statistics = {hood.name: _teacher_noise(hood) for hood in hoods}
      mean = {name: m for name, (m, _, _) in statistics.items()}
      stddev = {name: s for name, (_, s, _) in statistics.items()}
      rectify = {name for name, (_, _, r) in statistics.items() if r}
    else:
      rectify = set()
    if steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch must be positive; got {steps_per_epoch}.")
    source._noise = (int(steps_per_epoch), mean, stddev, int(seed), rectify)  # pylint: disable=protected-access
    return source

  @property
  def mode(self):
    if self._noise is not None:
      return "noise"
    return "online" if self.cache_dir is None else "cached"

  @property
  def num_examples(self):
    """Examples per epoch: those of the cache, or online those of a dataset whose length is
    known exactly (arrays, unbatched datasets of known cardinality); None otherwise."""
    if self.manifest:
      return self.manifest["examples"]
    return self._examples_hint if self._noise is None and self._exact else None

  def extract(self, x):
    """All needed activations of a batch of teacher inputs, one forward pass: {key: tensor}."""
    return dict(zip(self._keys, tf.nest.flatten(self._extractor(x, training=False))))

  def dataset(self, batch_size=128, shuffle=True, seed=None, shuffle_bytes=256 * 2**20):
    """The served `tf.data.Dataset` of `{neighbourhood name: (a, t[, lookahead targets])}`.

    Args:
      batch_size: examples per batch.
      shuffle: shuffle examples (cached mode: shard order, then the
        examples within windows of about `shuffle_bytes / 2`, a new order
        every epoch; when all served activations fit in `shuffle_bytes`
        they are read once, kept in memory and permuted as a whole every
        epoch; online mode serves the dataset's own order).
      seed: shuffling seed.
      shuffle_bytes: memory budget for shuffling.

    Returns:
      A dataset of dicts keyed by neighbourhood name; each value is
      `(a_i, T_i(a_i))`, or `(a_i, T_i(a_i), (t_{i+1}, ..., t_{i+j}))` when
      the source has look-ahead. All tensors are float32.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if self.mode == "noise":
      return self._noise_dataset(batch_size).prefetch(tf.data.AUTOTUNE)
    if self.mode == "online":
      ds = self._inputs.unbatch().batch(batch_size).map(
          self.extract, num_parallel_calls=tf.data.AUTOTUNE)
      if self.num_examples:  # fit can then tell how many steps an epoch has
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            -(-self.num_examples // batch_size)))
    else:
      ds = self._cached_dataset(batch_size, shuffle, seed, shuffle_bytes)
    return ds.map(self._arrange, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

  def _arrange(self, tensors):
    # Each tensor is cast once, though a cut is one neighbourhood's output and the next one's
    # input (and maybe look-ahead targets too): the batch shares the float32 tensor.
    tensors = {k: tf.cast(t, tf.float32) for k, t in tensors.items()}
    batch = {}
    for name, (in_key, out_key, ahead) in self._layout.items():
      item = (tensors[in_key], tensors[out_key])
      if self.lookahead:
        item += (tuple(tensors[k] for k in ahead),)
      batch[name] = item
    return batch

  def _cached_dataset(self, batch_size, shuffle, seed, shuffle_bytes):
    manifest = self.manifest
    files = [os.path.join(self.cache_dir, s["file"]) for s in manifest["shards"]]
    record_bytes = [s["record_bytes"] for s in manifest["shards"]]
    storage = _DTYPES[manifest["dtype"]]
    # A record of n examples holds, key after key, [n, *shape] arrays: the key at element
    # offset `start` of an example spans elements [n * start, n * (start + size)) of the record.
    parts, per_example = {}, 0
    for key in manifest["keys"]:
      shape = manifest["shapes"][key]
      size = int(np.prod(shape, dtype=np.int64))
      if key in self._keys:
        parts[key] = (per_example, size, shape)
      per_example += size
    served = sum(size for _, size, _ in parts.values())

    def read(path, nbytes):
      examples = nbytes // (per_example * storage.size)
      return tf.data.FixedLengthRecordDataset(path, nbytes, buffer_size=4 * 2**20).map(
          lambda record: (record, examples))

    def decode(record, n):
      if 2 * served >= per_example:  # decode it all once; the slices are views of it
        flat = tf.io.decode_raw(record, storage)
        return {k: tf.reshape(flat[n * start:n * (start + size)], [-1] + shape)
                for k, (start, size, shape) in parts.items()}
      # Mostly other keys: copy out only the served ones.
      item = storage.size
      return {k: tf.reshape(tf.io.decode_raw(tf.strings.substr(record, n * start * item,
                                                               n * size * item), storage),
                            [-1] + shape)
              for k, (start, size, shape) in parts.items()}

    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(record_bytes, tf.int64)))
    if shuffle:
      ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # Unshuffled, shards are read one after another so examples come in dataset order. Reading
    # is deterministic either way: the batches of a seed are the same in every job and run.
    ds = ds.interleave(read, cycle_length=min(4, len(files)) if shuffle else 1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if not shuffle:
      return ds.rebatch(batch_size)
    # Examples are shuffled within windows: a window is permuted and served by one gather per
    # batch, where a per-example shuffle buffer (unbatch, shuffle, batch) would copy every
    # example twice and handle each one alone.
    # The order of examples depends on the cache, the seed and the served neighbourhoods (the
    # window sizes): jobs that share the work build their sources over the same neighbourhoods
    # (all of them) and so serve the same batches, whichever ones each job distils.
    examples = manifest["examples"]
    if examples * served * storage.size <= shuffle_bytes:
      # Everything served fits the budget: one window, decoded once and kept, permuted anew
      # every epoch (as in-memory arrays would be).
      windows = ds.rebatch(examples).cache()
    else:
      # Two windows are held (one served, the next one read meanwhile): each is half the
      # budget, in whole batches.
      window = shuffle_bytes // 2 // (served * storage.size) // batch_size
      windows = ds.rebatch(max(1, window) * batch_size)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    windows = tf.data.Dataset.zip((windows, seeds)).prefetch(1)
    return windows.flat_map(lambda tensors, pair: _shuffled_batches(tensors, pair, batch_size))

  def _noise_dataset(self, batch_size):
    steps, mean, stddev, seed, rectify = self._noise

    def make(step):
      batch = {}
      for hood in self.hoods:
        shape = tf.concat([[batch_size], hood.input_shape[1:]], 0)
        step_seed = tf.stack([tf.cast(seed, tf.int64), step * 1009 + hood.index])
        hood_mean = mean[hood.name] if isinstance(mean, dict) else mean
        hood_std = stddev[hood.name] if isinstance(stddev, dict) else stddev
        a = (tf.random.stateless_normal(shape, seed=step_seed) * tf.cast(hood_std, tf.float32) +
             tf.cast(hood_mean, tf.float32))
        if hood.name in rectify:
          a = tf.nn.relu(a)
        t = hood.teacher(a, training=False)
        item = (a, t)
        if self.lookahead:
          ahead = []
          for nxt in hood.following(self.lookahead):
            ahead.append(nxt.teacher(ahead[-1] if ahead else t, training=False))
          item += (tuple(ahead),)
        batch[hood.name] = item
      return batch

    return tf.data.Dataset.range(steps).map(make)


def _shuffled_batches(tensors, seed, batch_size):
  """The examples of a window in batches, in a random order (one order shared by every key)."""
  count = tf.shape(next(iter(tensors.values())), out_type=tf.int64)[0]
  order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=seed)
  return tf.data.Dataset.range(0, count, batch_size).map(
      lambda start: {k: tf.gather(v, order[start:start + batch_size]) for k, v in tensors.items()})


def _layout(hoods, lookahead):
  """{hood name: (input key, output key, [look-ahead target keys])}."""
  return {
      h.name: (tensor_key(h.input_tensor), tensor_key(h.output_tensor),
               [tensor_key(n.output_tensor) for n in h.following(lookahead)]) for h in hoods
  }


class _Extraction:
  """One model from the teacher's input to every needed tensor, and its traced storing pass."""

  def __init__(self, teacher, keys):
    tensors = {}
    for node_tensor in _all_tensors(teacher):
      tensors.setdefault(tensor_key(node_tensor), node_tensor)
    self.model = keras.Model(teacher.inputs, [tensors[k] for k in keys],
                             name=f"{teacher.name}_extractor")
    # Any batch size, so a partial last batch does not trace the teacher a second time.
    self._signature = [tf.TensorSpec((None,) + tuple(teacher.inputs[0].shape[1:]),
                                     teacher.inputs[0].dtype)]
    self._passes = {}

  def storing_pass(self, storage):
    """A tf.function: inputs -> every output, cast to `storage` inside the traced graph."""
    if storage not in self._passes:
      model = self.model
      self._passes[storage] = tf.function(
          lambda x: [tf.cast(t, storage) for t in tf.nest.flatten(model(x, training=False))],
          input_signature=self._signature)
    return self._passes[storage]


def _extraction(teacher, keys):
  """The `_Extraction` of `keys` for `teacher`, shared by every source of that teacher."""
  extractions = _EXTRACTIONS.setdefault(teacher, {})
  if tuple(keys) not in extractions:
    extractions[tuple(keys)] = _Extraction(teacher, keys)
  return extractions[tuple(keys)]


def _all_tensors(model):
  for node in graph.model_nodes(model):
    yield from graph.output_tensors(node)


def _batched_inputs(teacher, dataset, batch_size):
  """The dataset's teacher inputs, in batches of `batch_size`, whatever its own batching; the
  number of examples (an upper bound, negative when unknown) and whether it is exact."""
  if isinstance(dataset, np.ndarray):
    dataset = tf.data.Dataset.from_tensor_slices(dataset)
  dataset = as_batches(dataset, batch_size)
  spec = dataset.element_spec
  if isinstance(spec, (tuple, list)):
    dataset = dataset.map(lambda *xs: xs[0])
    spec = spec[0]
  if not isinstance(spec, tf.TensorSpec):
    raise ValueError(f"dataset elements must be x or (x, y, ...) with x one tensor; got {spec}.")
  want = tuple(teacher.inputs[0].shape[1:])
  got = tuple(spec.shape)
  examples = int(dataset.cardinality())  # negative when unknown
  exact = examples >= 0  # of examples, or of batches of a static size (drop_remainder)
  if len(got) == len(want) + 1:
    exact = exact and got[0] is not None
    examples = examples * got[0] if exact else -1
    dataset = dataset.unbatch()
    got = got[1:]
  if len(got) != len(want) or any(g is not None and w is not None and g != w
                                  for g, w in zip(got, want)):
    raise ValueError(f"dataset examples have shape {got} but teacher '{teacher.name}' takes "
                     f"{want}.")
  dtype = teacher.inputs[0].dtype
  return dataset.map(lambda x: tf.cast(x, dtype)).batch(batch_size), examples, exact


class _CacheBuilder:
  """Opens a complete matching cache, or builds one; reading and writing are kept apart."""

  def __init__(self, source, records_batch, shard_bytes, data_fingerprint, verify):
    self.source = source
    self.dir = source.cache_dir
    self.records_batch = records_batch
    self.shard_bytes = shard_bytes
    self.data_fingerprint = data_fingerprint
    self.verify = verify

  def _spec(self):
    data_id = self.data_fingerprint
    if data_id is None:  # every input, streamed: reading them is cheap beside the teacher
      digest = hashlib.sha256()
      count = 0
      for x in self.source._inputs:  # pylint: disable=protected-access
        digest.update(np.ascontiguousarray(x.numpy()).tobytes())
        count += int(x.shape[0])
      if not count:
        raise ValueError(f"The dataset for the activation cache in '{self.dir}' is empty.")
      data_id = f"sha256:{digest.hexdigest()}:{count}"
    return {
        "format": _FORMAT,
        "teacher": self.source.teacher.name,
        "teacher_fingerprint": teacher_fingerprint(self.source.teacher),
        "data_fingerprint": data_id,
        "dtype": self.source.dtype,
    }

  def open_or_build(self):
    if next(iter(self.source._inputs.take(1)), None) is None:  # pylint: disable=protected-access
      raise ValueError(f"The dataset for the activation cache in '{self.dir}' is empty.")
    spec = self._spec()
    # Jobs sharing the directory take turns: one builds, the others then find it complete.
    with files.locked(os.path.join(self.dir, ".lock")):
      manifest = read_manifest(self.dir)
      if manifest is not None:
        self._check_matches(manifest, spec)
        check_shards(self.dir, manifest, checksums=self.verify)
        if self.source.verbose:
          print(f"Reusing the activation cache in {self.dir} ({manifest['examples']} examples).")
        return manifest
      return self._build(spec)

  def _check_matches(self, manifest, spec):
    for field in ("format", "teacher_fingerprint", "data_fingerprint", "dtype"):
      if manifest.get(field) != spec[field]:
        raise ValueError(
            f"The activation cache in '{self.dir}' was built for another {field.replace('_', ' ')}"
            f" ({manifest.get(field)!r}, requested {spec[field]!r}). Use another cache_dir, or "
            "delete this one to rebuild it.")
    missing = [k for k in self.source._keys if k not in manifest["keys"]]  # pylint: disable=protected-access
    if missing:
      raise ValueError(f"The activation cache in '{self.dir}' lacks the activations {missing} "
                       "that these neighbourhoods need; use another cache_dir, or delete this one "
                       "to rebuild it.")

  def _build(self, spec):
    source = self.source
    os.makedirs(self.dir, exist_ok=True)
    for name in os.listdir(self.dir):  # leftovers of an interrupted build
      if name.startswith("shard-") or name.startswith(MANIFEST):
        os.remove(os.path.join(self.dir, name))
    storage = _DTYPES[source.dtype]
    keys = source._keys  # pylint: disable=protected-access
    shapes = source._shapes  # pylint: disable=protected-access
    example_bytes = sum(_nbytes(shapes[k], storage) for k in keys)
    examples = source._examples_hint  # pylint: disable=protected-access
    if examples < 0:  # unknown: count them (reading the inputs is cheap beside the teacher)
      examples = int(source._inputs.reduce(0, lambda n, x: n + tf.shape(x)[0]))  # pylint: disable=protected-access
    if examples == 0:
      raise ValueError(f"The dataset for the activation cache in '{self.dir}' is empty.")
    batches = -(-examples // self.records_batch)
    self._check_space(example_bytes, examples)
    start = time.perf_counter()
    writer = _ShardWriter(self.dir, example_bytes, self.shard_bytes)
    extract = source._extraction.storing_pass(storage)  # pylint: disable=protected-access
    progbar = keras.utils.Progbar(batches, unit_name="batch", verbose=source.verbose)
    examples = 0
    with writer:
      for step, x in enumerate(source._inputs):  # pylint: disable=protected-access
        if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(x, tf.float32)))):
          raise ValueError(f"The dataset for the activation cache in '{self.dir}' has NaN or "
                           f"infinite values in batch {step} (examples {examples}.."
                           f"{examples + int(tf.shape(x)[0]) - 1}); the cache was not completed.")
        # np.asarray views the tensor's memory (`.numpy()` would copy it); the view keeps the
        # buffer alive until the writer thread has written it.
        arrays = [np.asarray(t) for t in extract(x)]
        writer.put(arrays)
        examples += arrays[0].shape[0]
        progbar.update(min(step + 1, batches))
    manifest = dict(spec, keys=keys, shapes={k: list(shapes[k]) for k in keys},
                    examples=examples, example_bytes=example_bytes, shards=writer.shards,
                    build_seconds=time.perf_counter() - start)
    write_manifest(self.dir, manifest)
    return manifest

  def _check_space(self, example_bytes, examples):
    estimate = examples * example_bytes
    free = free_bytes(self.dir)
    if self.source.verbose:
      print(f"Building the activation cache in {self.dir}: about {estimate / 2**20:.1f} MiB "
            f"({example_bytes / 2**10:.1f} KiB per example, {free / 2**30:.1f} GiB free).")
    if estimate > free:
      raise OSError(f"The activation cache needs about {estimate / 2**20:.1f} MiB but only "
                    f"{free / 2**20:.1f} MiB are free in '{self.dir}'. Free space, choose another "
                    "cache_dir, use dtype='float16', or use online mode (cache_dir=None).")


class _ShardWriter:
  """Writes records to shard files on a background thread, overlapping the teacher's passes."""

  def __init__(self, directory, example_bytes, shard_bytes):
    self.dir = directory
    self.example_bytes = example_bytes
    self.shard_bytes = shard_bytes
    self.shards = []
    self._queue = queue.Queue(maxsize=4)
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._error = None
    self._file = None

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, exc_type, *_):
    self._queue.put(None)
    self._thread.join()
    if self._error is not None and exc_type is None:
      raise self._error

  def put(self, arrays):
    if self._error is not None:
      raise self._error
    self._queue.put(arrays)

  def _run(self):
    try:
      while (arrays := self._queue.get()) is not None:
        self._write(arrays)
      self._close()
    except Exception as e:  # pylint: disable=broad-except
      self._error = e
      if files.disk_full(e):
        self._error = OSError(e.errno, f"The disk holding the activation cache in '{self.dir}' "
                              "is full: free space, choose another cache_dir, use "
                              "dtype='float16', or use online mode (cache_dir=None). The "
                              "incomplete cache is removed by the next build.")
      while self._queue.get() is not None:
        pass

  def _write(self, arrays):
    n = arrays[0].shape[0]
    size = n // _records_per_batch(n, self.example_bytes)
    for start in range(0, n, size):
      self._write_record([array[start:start + size] for array in arrays])

  def _write_record(self, arrays):
    n = arrays[0].shape[0]
    record_bytes = n * self.example_bytes
    shard = self.shards[-1] if self.shards else None
    if (self._file is None or shard["record_bytes"] != record_bytes or
        shard["bytes"] + record_bytes > self.shard_bytes):
      self._close()
      name = f"shard-{len(self.shards):05d}.bin"
      self._file = open(os.path.join(self.dir, name), "wb")
      shard = {"file": name, "record_bytes": record_bytes, "records": 0, "examples": 0,
               "bytes": 0, "crc32": 0}
      self.shards.append(shard)
    for array in arrays:
      data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)  # bfloat16 has no buffer format
      self._file.write(data)
      shard["crc32"] = zlib.crc32(data, shard["crc32"])
    shard["records"] += 1
    shard["examples"] += n
    shard["bytes"] += record_bytes

  def _close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


def _records_per_batch(n, example_bytes):
  """Into how many equal records a batch of n examples is cut: the fewest of at most _RECORD_BYTES.

  Equal cuts keep every full batch's records the same length, so shards stay uniform.
  """
  count = max(1, -(-n * example_bytes // _RECORD_BYTES))
  while n % count:
    count += 1
  return count


def read_manifest(directory):
  """The cache's manifest, or None if the cache is absent or incomplete."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"The activation cache manifest '{path}' is corrupt ({e}); delete the "
                     "directory to rebuild the cache.") from None


def write_manifest(directory, manifest):
  """Writes the manifest atomically: the cache counts as complete only once this returns."""
  files.write_json(os.path.join(directory, MANIFEST), manifest)


def check_shards(directory, manifest, checksums=True):
  """Raises ValueError naming the first shard that is missing, truncated or corrupt."""
  for shard in manifest["shards"]:
    path = os.path.join(directory, shard["file"])
    if not os.path.exists(path):
      raise ValueError(f"Activation cache shard '{path}' is missing; delete '{directory}' to "
                       "rebuild the cache.")
    size = os.path.getsize(path)
    if size != shard["bytes"]:
      raise ValueError(f"Activation cache shard '{path}' has {size} bytes, the manifest says "
                       f"{shard['bytes']}: it is truncated or damaged; delete '{directory}' to "
                       "rebuild the cache.")
    if checksums:
      crc = 0
      with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
          crc = zlib.crc32(chunk, crc)
      if crc != shard["crc32"]:
        raise ValueError(f"Activation cache shard '{path}' fails its CRC-32 check: it is "
                         f"corrupt; delete '{directory}' to rebuild the cache.")

