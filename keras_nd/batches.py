"""What keras_nd takes wherever it takes data: a `tf.data.Dataset` of batches, or arrays."""

import numpy as np

from keras_nd._keras import tf

__all__ = ["as_batches"]


def as_batches(data, batch_size=128, what="dataset"):
  """`data` as a `tf.data.Dataset`: a dataset as it is; arrays (or a tuple `(x, y, ...)` of
  arrays, or a `Dataset`'s split) sliced along their first axis into batches of `batch_size`."""
  if isinstance(data, tf.data.Dataset):
    return data
  if isinstance(data, (np.ndarray, tf.Tensor)) or (
      isinstance(data, tuple) and data and all(isinstance(a, (np.ndarray, tf.Tensor))
                                               for a in data)):
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
  raise TypeError(f"{what} must be a tf.data.Dataset, a numpy array of inputs or a tuple of "
                  f"arrays (x, y); got {type(data).__name__}.")
