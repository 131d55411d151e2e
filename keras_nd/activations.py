"""ActivationSource: the teacher's activations that neighbourhood students learn from.

One teacher forward pass per batch, through a single multi-output extractor,
yields every tensor the neighbourhoods need (each cut tensor once, though it
is one neighbourhood's output and the next one's input). Three modes:

* cached (``cache_dir`` given): the activations are written once to sharded
  files (`keras_nd.cache`) and streamed back through tf.data on every epoch;
* online (no ``cache_dir``): the extractor runs in the input pipeline each
  step (for caches too large to store, or with data augmentation);
* noise (`ActivationSource.from_noise`): neighbourhood inputs drawn from
  Gaussian noise (`keras_nd.noise`), targets computed by the teacher's
  neighbourhoods (data-free).
"""

import warnings
import weakref

import numpy as np

from keras_nd import _checks, cache, files, graph, keras3, noise
from keras_nd._keras import keras, tf
from keras_nd.batches import as_batches
from keras_nd.neighbourhood import checked_hoods

__all__ = ["ActivationSource", "check_inputs", "tensor_key"]

# {teacher: {keys: _Extraction}}: sources of one teacher share the extractor and its traced
# pass, so building a second cache (other data, or a rebuild) does not trace the teacher again.
_EXTRACTIONS = weakref.WeakKeyDictionary()


def tensor_key(tensor):
  """A stable name for a tensor of a functional model: the layer that produced it."""
  node = tensor.node
  key = node.layer.name
  node_index = next(i for i, n in enumerate(node.layer.inbound_nodes) if n is node)
  if node_index:
    key += f"@{node_index}"
  tensor_index = next(i for i, t in enumerate(graph.output_tensors(node)) if t is tensor)
  if tensor_index:
    key += f":{tensor_index}"
  return key


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
  teacher = keras3.to_tf_keras(teacher)
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
      content changed anywhere never meets the old cache). Or
      `noise.GaussianInputs` for the noise mode (see `from_noise`).
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
    self.teacher = teacher = keras3.to_tf_keras(teacher)
    self.hoods = checked_hoods(teacher, hoods, "teacher")
    if dtype not in cache.DTYPES:
      raise ValueError(f"dtype must be one of {sorted(cache.DTYPES)}; got {dtype!r}.")
    self.dtype = dtype
    self.lookahead = _checks.integer(lookahead, "lookahead", minimum=0)
    if cache_dir is not None:
      cache_dir = files.writable_directory(cache_dir, "cache_dir")
    self.cache_dir = cache_dir
    self.verbose = verbose
    self._layout = _layout(self.hoods, self.lookahead)
    self._keys = sorted({key for in_key, out_key, ahead in self._layout.values()
                         for key in (in_key, out_key, *ahead)})
    self._extraction = _extraction(teacher, self._keys)
    self.manifest = None
    if isinstance(dataset, noise.GaussianInputs):
      if cache_dir is not None:
        raise ValueError("Gaussian noise inputs are drawn anew each step, not cached; pass "
                         "cache_dir=None.")
      self._mode = _Noise(dataset, self.hoods, self.lookahead)
      return
    inputs, examples, exact = _batched_inputs(teacher, dataset, records_batch)
    first = next(iter(inputs.take(1)), None)
    if first is not None:
      check_inputs(teacher, first)
    arrange = self._arrange
    if cache_dir is None:
      self._mode = _Online(inputs, self.extract, examples if exact else None, arrange)
      return
    shapes = {k: tuple(t.shape[1:]) for k, t in zip(self._keys, self._extraction.model.outputs)}
    self.manifest = cache.open_or_build(
        cache_dir, teacher, inputs, shapes, self._extraction.storing_pass(cache.DTYPES[dtype]),
        dtype, examples=examples, records_batch=records_batch, shard_bytes=shard_bytes,
        data_fingerprint=data_fingerprint, verify=verify, verbose=verbose)
    self._mode = _Cached(cache_dir, self.manifest, self._keys, arrange)

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
        moments `noise.noise_statistics(hood)`; any other input is drawn as
        N(`noise.noise_statistics(hood)`).
      seed: the noise of step s in every epoch is a function of (seed, s).
      lookahead: as for the constructor.

    Returns:
      An `ActivationSource` in noise mode.
    """
    teacher = keras3.to_tf_keras(teacher)
    hoods = checked_hoods(teacher, hoods, "teacher")
    inputs = noise.GaussianInputs(hoods, steps_per_epoch, mean=mean, stddev=stddev, seed=seed)
    return cls(teacher, hoods, inputs, lookahead=lookahead, verbose=0)

  @property
  def mode(self):
    """"cached", "online" or "noise"."""
    return self._mode.name

  @property
  def num_examples(self):
    """Examples per epoch: those of the cache, or online those of a dataset whose length is
    known exactly (arrays, unbatched datasets of known cardinality); None otherwise."""
    return self._mode.examples

  def extract(self, x):
    """All needed activations of a batch of teacher inputs, one forward pass: {key: tensor}."""
    return dict(zip(self._keys, tf.nest.flatten(self._extraction.model(x, training=False))))

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
    batch_size = _checks.integer(batch_size, "batch_size")
    return self._mode.batches(batch_size, shuffle, seed, shuffle_bytes).prefetch(
        tf.data.AUTOTUNE)

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


# The modes: each serves batches of {hood name: item} and knows its examples per epoch.


class _Cached:
  """Activations streamed from a complete cache."""

  name = "cached"

  def __init__(self, directory, manifest, keys, arrange):
    self._args = (directory, manifest, keys)
    self._arrange = arrange
    self.examples = manifest["examples"]

  def batches(self, batch_size, shuffle, seed, shuffle_bytes):
    return cache.dataset(*self._args, batch_size, shuffle, seed, shuffle_bytes).map(
        self._arrange, num_parallel_calls=tf.data.AUTOTUNE)


class _Online:
  """Activations extracted in the input pipeline, in the dataset's own order."""

  name = "online"

  def __init__(self, inputs, extract, examples, arrange):
    self._inputs, self._extract, self._arrange = inputs, extract, arrange
    self.examples = examples

  def batches(self, batch_size, shuffle, seed, shuffle_bytes):
    del shuffle, seed, shuffle_bytes  # online mode serves the dataset's own order
    ds = self._inputs.unbatch().batch(batch_size).map(self._extract,
                                                      num_parallel_calls=tf.data.AUTOTUNE)
    if self.examples:  # fit can then tell how many steps an epoch has
      ds = ds.apply(tf.data.experimental.assert_cardinality(-(-self.examples // batch_size)))
    return ds.map(self._arrange, num_parallel_calls=tf.data.AUTOTUNE)


class _Noise:
  """Gaussian inputs drawn each step, targets computed by the teacher's neighbourhoods."""

  name = "noise"
  examples = None

  def __init__(self, inputs, hoods, lookahead):
    self._inputs, self._hoods, self._lookahead = inputs, hoods, lookahead

  def batches(self, batch_size, shuffle, seed, shuffle_bytes):
    del shuffle, seed, shuffle_bytes  # the noise of a step depends on its own seed only
    return self._inputs.dataset(self._hoods, batch_size, self._lookahead)


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

