"""Data-free neighbourhood inputs: Gaussian noise, with statistics read from the teacher itself.

`noise_statistics` carries the first two moments of the teacher's input
forward through the layers that set them, to a neighbourhood's input;
`GaussianInputs` is the noise an `ActivationSource` serves in place of data.
"""

import math

import numpy as np

from keras_nd import _checks, graph
from keras_nd._keras import keras, tf

__all__ = ["GaussianInputs", "noise_statistics"]

_IDENTITY_AT_INFERENCE = (keras.layers.Dropout, keras.layers.GaussianNoise,
                          keras.layers.GaussianDropout)
_CHANNEL_KEEPING = (keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D,
                    keras.layers.AveragePooling2D) + _IDENTITY_AT_INFERENCE


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
  residual model); padding, pooling and dropout keep each channel's moments,
  and so does a parameter-free layer that only subsamples, reorders or
  zero-pads channels (a ResNet's option-A shortcut; padded channels are 0);
  dropout and Gaussian noise layers are the identity at inference. Anything
  else (e.g. a convolution with no BatchNormalization after it) raises,
  naming the layer.

  The paper draws neighbourhood inputs from N(0, 1); these statistics add the
  scale and offset each neighbourhood actually sees, still without reading
  any data, and `ActivationSource.from_noise(mean="teacher")` also gives
  inputs that a ReLU produces the rectified shape (a unit after a ReLU never
  sees negative inputs).

  Returns:
    (mean, std): float32 arrays with one value per input channel.
  """
  return _Moments(hood.model, input_mean, input_std).at(hood.input_tensor, hood.input_shape[-1])


class GaussianInputs:
  """Gaussian noise in place of each neighbourhood's input, and how to serve it.

  Args:
    hoods: the neighbourhoods fed.
    steps_per_epoch: batches per epoch.
    mean, stddev: per-channel statistics (scalars or vectors), the same for
      every neighbourhood or dicts {neighbourhood name: value}; or
      mean="teacher" (see `ActivationSource.from_noise`).
    seed: the noise of step s in every epoch is a function of (seed, s).
  """

  def __init__(self, hoods, steps_per_epoch, mean=0.0, stddev=1.0, seed=0):
    self.rectify = set()
    if isinstance(mean, str):
      if mean != "teacher":
        raise ValueError(f"mean must be a number, a vector, a dict or 'teacher'; got {mean!r}.")
      statistics = {hood.name: _teacher_noise(hood) for hood in hoods}
      mean = {name: m for name, (m, _, _) in statistics.items()}
      stddev = {name: s for name, (_, s, _) in statistics.items()}
      self.rectify = {name for name, (_, _, r) in statistics.items() if r}
    self.steps = _checks.integer(steps_per_epoch, "steps_per_epoch")
    self.mean, self.stddev, self.seed = mean, stddev, int(seed)

  def dataset(self, hoods, batch_size, lookahead=0):
    """`steps` batches of {hood name: (noise, T_i(noise)[, look-ahead targets])}."""

    def make(step):
      batch = {}
      for hood in hoods:
        shape = tf.concat([[batch_size], hood.input_shape[1:]], 0)
        step_seed = tf.stack([tf.cast(self.seed, tf.int64), step * 1009 + hood.index])
        mean = self.mean[hood.name] if isinstance(self.mean, dict) else self.mean
        std = self.stddev[hood.name] if isinstance(self.stddev, dict) else self.stddev
        a = (tf.random.stateless_normal(shape, seed=step_seed) * tf.cast(std, tf.float32) +
             tf.cast(mean, tf.float32))
        if hood.name in self.rectify:
          a = tf.nn.relu(a)
        t = hood.teacher(a, training=False)
        item = (a, t)
        if lookahead:
          ahead = []
          for nxt in hood.following(lookahead):
            ahead.append(nxt.teacher(ahead[-1] if ahead else t, training=False))
          item += (tuple(ahead),)
        batch[hood.name] = item
      return batch

    return tf.data.Dataset.range(self.steps).map(make)


def _teacher_noise(hood):
  """(mean, std, rectify) of the noise for `hood`'s input under mean="teacher".

  An input produced by a ReLU is drawn as ReLU(N(mean, std^2)) with the
  moments of the ReLU's input, so that it is non-negative with the teacher's
  share of zeros; its moments are then `noise_statistics(hood)`. Any other
  input is drawn as N(`noise_statistics(hood)`).
  """
  moments = _Moments(hood.model, 0.0, 1.0)
  before = moments.relu_input(hood.input_tensor)
  mean, std = moments.at(hood.input_tensor if before is None else before, hood.input_shape[-1])
  return mean, std, before is not None


def _is_relu(layer):
  return isinstance(layer, keras.layers.ReLU) or (
      isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] == "relu")


class _Moments:
  """Per-channel (mean, variance) of a model's tensors for N(input_mean, input_std^2) inputs."""

  def __init__(self, model, input_mean, input_std):
    self._producer = {id(t): node for node in graph.model_nodes(model)
                      for t in graph.output_tensors(node)}
    self._input = (input_mean, input_std)
    self._memo = {}

  def at(self, tensor, channels):
    """(mean, std) per channel of `tensor`, as float32 arrays of `channels` values."""
    mean, variance = self._of(tensor)
    return (np.asarray(mean, np.float32) * np.ones(channels, np.float32),
            np.sqrt(np.maximum(variance, 0.0)).astype(np.float32) * np.ones(channels, np.float32))

  def relu_input(self, tensor):
    """The input of the ReLU that produced `tensor` (through noise or dropout layers), or None."""
    node = self._producer[id(tensor)]
    while isinstance(node.layer, _IDENTITY_AT_INFERENCE):
      node = self._producer[id(node.keras_inputs[0])]
    return node.keras_inputs[0] if _is_relu(node.layer) else None

  def _of(self, tensor):
    if id(tensor) not in self._memo:
      self._memo[id(tensor)] = self._through(tensor)
    return self._memo[id(tensor)]

  def _through(self, tensor):
    """(mean, variance) per channel of `tensor`, from those of its producer's inputs."""
    node = self._producer[id(tensor)]
    layer, inputs = node.layer, node.keras_inputs
    width = tensor.shape[-1]
    if node.is_input or not inputs:
      input_mean, input_std = self._input
      return (np.full(width, input_mean, np.float64), np.full(width, input_std**2, np.float64))
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma = layer.gamma.numpy() if layer.scale else 1.0
      beta = layer.beta.numpy() if layer.center else 0.0
      variance = layer.moving_variance.numpy()
      return (np.broadcast_to(beta, width).astype(np.float64),
              np.broadcast_to(gamma**2 * variance / (variance + layer.epsilon), width))
    if _is_relu(layer):
      return _rectified(*self._of(inputs[0]))
    if isinstance(layer, keras.layers.Add):
      parts = [self._of(t) for t in inputs]
      return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(layer, _CHANNEL_KEEPING):
      return self._of(inputs[0])
    sources = _channel_sources(layer, inputs, tensor)
    if sources is not None:
      mean, variance = self._of(inputs[0])
      kept = sources >= 0
      return (np.where(kept, mean[np.maximum(sources, 0)], 0.0),
              np.where(kept, variance[np.maximum(sources, 0)], 0.0))
    raise ValueError(
        f"Cannot derive noise statistics through layer '{layer.name}' ({type(layer).__name__}): "
        "only BatchNormalization, ReLU, Add, padding, pooling, dropout and parameter-free layers "
        "that only select or zero-pad channels carry them. Pass mean and stddev to "
        "ActivationSource.from_noise yourself.")


def _channel_sources(layer, inputs, output):
  """For a parameter-free layer that only moves channels: each output channel's source.

  The layer is called on two probes of distinct whole numbers: an output
  channel whose every value comes from one input channel (the same one in
  both probes) is a copy of it, possibly subsampled; one of zeros is padding.
  Returns the source channel of each output channel (-1: zeros), or None
  when the layer does anything else (mixes, averages or reshapes).
  """
  shape, out_shape = tuple(inputs[0].shape[1:]), tuple(output.shape[1:])
  if (layer.weights or len(inputs) != 1 or len(shape) != len(out_shape) or
      None in shape + out_shape):
    return None
  channels = shape[-1]
  found = None
  for seed in (0, 1):
    values = np.random.RandomState(seed).permutation(int(np.prod(shape))) + 1
    probe = values.reshape((1,) + shape).astype(np.float32)
    owner = np.empty(values.size + 1, np.int64)
    owner[probe.reshape(-1).astype(np.int64)] = np.arange(values.size) % channels
    owner[0] = -1
    try:
      out = np.asarray(layer(tf.constant(probe)), np.float64).reshape(-1, out_shape[-1])
    except (TypeError, ValueError, tf.errors.OpError):
      return None
    if np.any(out != np.round(out)) or np.any(out < 0) or np.any(out > values.size):
      return None
    owners = owner[out.astype(np.int64)]
    if np.any(owners != owners[:1]):
      return None
    if found is not None and np.any(owners[0] != found):
      return None
    found = owners[0]
  return found


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
