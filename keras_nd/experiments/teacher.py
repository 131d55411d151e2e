"""A user's own teacher: loaded, and checked against the data it will see."""

import os

import numpy as np

from keras_nd import files, metrics
from keras_nd._keras import keras

__all__ = ["load_teacher"]

_PREPROCESSING_LAYERS = tuple(getattr(keras.layers, name) for name in (
    "Rescaling", "Normalization") if hasattr(keras.layers, name))


def load_teacher(teacher, data, trusted=False, split=None):
  """A teacher given as a model or a `.keras` path, checked against the data it will see (its
  `split`, by default the validation split if there is one, else the test split).

  Raises:
    TypeError: it is neither a tf_keras model nor a path.
    ValueError: its input shape or classes differ from the data's, it
      scores far better on the images given with the other preprocessing
      (naming it), or preprocessing="model" and it has no preprocessing
      layer.
  """
  if isinstance(teacher, (str, os.PathLike)):
    teacher = files.load_model(teacher, trusted=trusted)
  if not isinstance(teacher, keras.Model):
    raise TypeError(f"teacher must be a tf_keras Model or a path to a .keras file; got "
                    f"{type(teacher).__name__}.")
  want = (tuple(data.input_shape), data.num_classes)
  got = (tuple(teacher.input_shape[1:]), teacher.output_shape[-1])
  if got != want:
    raise ValueError(f"The teacher '{teacher.name}' takes images {got[0]} and gives {got[1]} "
                     f"classes, but dataset {data.name!r} has images {want[0]} and {want[1]} "
                     "classes.")
  if data.preprocessing == "model" and not any(
      isinstance(layer, _PREPROCESSING_LAYERS) for layer in teacher.layers):
    raise ValueError(f"preprocessing='model' says the teacher '{teacher.name}' preprocesses its "
                     "own images, but it has no Rescaling or Normalization layer; pass "
                     "preprocessing='standardize' or 'none'.")
  split = split or ("validation" if data.num_validation else "test")
  other = "none" if data.preprocessing == "standardize" else "standardize"
  scores = {way: metrics.accuracy(teacher, data.with_preprocessing(way).pipeline(split, 256))
            for way in (data.preprocessing, other)}
  if scores[other] > scores[data.preprocessing] + 0.2:
    raise ValueError(
        f"The teacher '{teacher.name}' scores {100 * scores[data.preprocessing]:.1f}% on the "
        f"{split} images as preprocessing={data.preprocessing!r} gives them, and "
        f"{100 * scores[other]:.1f}% as {other!r} gives them: it was trained on images given "
        f"the other way. Pass preprocessing={other!r} (--preprocessing={other}).")
  batch_statistics = _accuracy_with_batch_statistics(teacher, data.pipeline(split, 256))
  if batch_statistics > scores[data.preprocessing] + 0.3:
    raise ValueError(
        f"The teacher '{teacher.name}' scores {100 * scores[data.preprocessing]:.1f}% on the "
        f"{split} images in inference mode but {100 * batch_statistics:.1f}% with each batch's "
        "own BatchNorm statistics: its moving statistics do not match its weights (they lag "
        "weights trained for few steps at Keras's default momentum). Re-estimate them, "
        "nd.calibrate_batch_norm(teacher, x_train), and save it again.")
  return teacher


def _accuracy_with_batch_statistics(model, batches):
  """`model`'s accuracy on `batches` with BatchNorm in training mode (each batch's statistics);
  every weight, the moving statistics included, is put back afterwards."""
  weights = model.get_weights()
  try:
    right = total = 0
    for x, y in batches:
      predicted = np.argmax(model(x, training=True).numpy(), -1)
      right += int(np.sum(predicted == y.numpy()))
      total += len(predicted)
  finally:
    model.set_weights(weights)
  return right / max(1, total)
