"""The paper's preprocessing: per-channel standardisation and random translations.

Appendix A of the Neighbourhood Distillation paper trains on images
standardised per channel with statistics of the training split, augmented by
random translations of up to 4 pixels. Both live here as plain functions so
that `Dataset.pipeline` and anyone building their own input pipeline apply the
same operations.
"""

import numpy as np

from keras_nd._keras import tf

__all__ = ["channel_stats", "random_flip", "random_translate", "standardize"]


def channel_stats(batches):
  """Per-channel mean and standard deviation of images, in their own units.

  Accumulates sums in float64 so that millions of uint8 pixels do not lose
  precision.

  Args:
    batches: an array of images `(N, H, W, C)`, or an iterable of such arrays
      (e.g. a batched `tf.data.Dataset` iterated with `as_numpy_iterator`).

  Returns:
    (mean, std): float32 arrays of shape `(C,)`. A channel that is constant
    gets std 1, so that standardising it gives zeros rather than NaNs.

  Raises:
    ValueError: if there are no images, or they are not 4-D.
  """
  if isinstance(batches, np.ndarray):
    batches = [batches]
  count, total, total_sq = 0, None, None
  for batch in batches:
    batch = np.asarray(batch)
    if batch.ndim != 4:
      raise ValueError(f"channel_stats needs images of shape (N, H, W, C); got shape "
                       f"{batch.shape}.")
    pixels = batch.reshape(-1, batch.shape[-1]).astype("float64")
    if total is None:
      total, total_sq = np.zeros(pixels.shape[1]), np.zeros(pixels.shape[1])
    count += pixels.shape[0]
    total += pixels.sum(0)
    total_sq += np.square(pixels).sum(0)
  if not count:
    raise ValueError("channel_stats got no images.")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  std[std == 0] = 1.0
  return mean.astype("float32"), std.astype("float32")


def standardize(images, mean, std):
  """`(images - mean) / std` per channel, as float32: numpy for numpy input, else a tensor."""
  if tf.is_tensor(images):
    return (tf.cast(images, tf.float32) - mean) / std
  return ((np.asarray(images, "float32") - mean) / std).astype("float32")


def random_translate(images, max_shift, seed):
  """Shifts every image of a batch by its own random offset of up to `max_shift` pixels.

  The batch is zero-padded by `max_shift` on each side and every image is
  cropped back at a random offset, i.e. translated by `dy, dx` drawn
  uniformly from `[-max_shift, max_shift]`; what comes in from outside is
  zero, which after standardisation is the training set's mean colour. The
  crop is two batched gathers, so the whole batch costs a few ops rather than
  one op per image.

  Args:
    images: a float tensor `(B, H, W, C)`.
    max_shift: largest shift in pixels, along each axis.
    seed: a stateless seed, shape `(2,)` int (e.g. from
      `tf.data.Dataset.random`): the same seed gives the same shifts.

  Returns:
    The translated images, same shape and dtype.
  """
  if not max_shift:
    return images
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  offsets = tf.random.stateless_uniform([batch, 2], seed=seed, minval=0,
                                        maxval=2 * max_shift + 1, dtype=tf.int32)
  padded = tf.pad(images, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
  rows = offsets[:, :1] + tf.range(height)[None, :]
  cols = offsets[:, 1:] + tf.range(width)[None, :]
  cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped, cols, axis=2, batch_dims=1)


def random_flip(images, seed):
  """Flips each image of a batch left-right with probability 1/2.

  Args:
    images: a tensor `(B, H, W, C)`.
    seed: a stateless seed, shape `(2,)` int.

  Returns:
    The batch with about half of its images mirrored.
  """
  flip = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed=seed) < 0.5
  return tf.where(flip, tf.reverse(images, axis=[2]), images)
