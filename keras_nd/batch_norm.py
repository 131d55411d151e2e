"""BatchNorm statistics: re-estimating them on data (`calibrate_batch_norm`) and keeping them
fixed while other weights train (`frozen_batch_norms`)."""

import contextlib

from keras_nd import _checks, keras3
from keras_nd._keras import keras
from keras_nd.batches import as_batches

__all__ = ["average_batch_statistics", "batch_norms", "calibrate_batch_norm",
           "frozen_batch_norms"]


def batch_norms(model):
  """The BatchNormalization layers of `model`, nested models' included."""
  return [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]


@contextlib.contextmanager
def frozen_batch_norms(models):
  """Inside the block, the trainable BatchNorms of `models` run in inference mode, untrained.

  A BatchNormalization with trainable=False normalises with its moving
  statistics even when called with training=True, and its scale and offset
  are not trained: gradient steps then keep the statistics a solve or a
  teacher set. They are trainable again after the block. Compile inside the
  block: Keras's `fit` trains what was trainable when the model was compiled.
  """
  layers = [layer for model in models for layer in batch_norms(model) if layer.trainable]
  for layer in layers:
    layer.trainable = False
  try:
    yield layers
  finally:
    for layer in layers:
      layer.trainable = True


def average_batch_statistics(layers, dataset, steps, forward):
  """Sets the moving statistics of BatchNorm `layers` to the average over `steps` batches.

  `forward(batch)` runs the layers in training mode; with momentum (n-1)/n at
  the n-th batch, moving = (n-1)/n * moving + 1/n * batch is a running mean.
  Returns the number of batches used.
  """
  steps = _checks.integer(steps, "steps")
  momenta = [layer.momentum for layer in layers]
  used = 0
  try:
    for used, batch in enumerate(dataset.take(steps), start=1):
      for layer in layers:
        layer.momentum = (used - 1) / used
      forward(batch)
  finally:
    for layer, momentum in zip(layers, momenta):
      layer.momentum = momentum
  if not used:
    raise ValueError("The dataset for calibrate_batch_norm is empty.")
  return used


def calibrate_batch_norm(model, dataset, steps=100):
  """Re-estimates a model's BatchNorm moving statistics on data, weights fixed.

  A composed student keeps the teacher's BatchNorm statistics wherever a
  neighbourhood's BatchNorm was not part of a student (one-layer
  neighbourhoods: the convolution is the student, the BatchNorm after it is
  the teacher's). The student's small errors shift those statistics, more so
  deeper in the network; re-estimating them on the composed student's own
  activations removes that shift without training any weight. Each moving
  mean and variance becomes the plain average of the batch statistics over
  `steps` batches (Dropout, if any, also runs in training mode meanwhile).

  Args:
    model: a Keras model (e.g. from `keras_nd.compose`); it is changed in place
      (a Keras 3 model through its conversion, `keras_nd.keras3.to_tf_keras`,
      whose statistics are copied back into it).
    dataset: a `tf.data.Dataset` of batches of `x` or `(x, y, ...)` (labels
      are not used), or a numpy array of inputs (taken in batches of 128).
    steps: number of batches to average over (fewer if the dataset ends).

  Returns:
    The number of batches used.
  """
  original, model = model, keras3.to_tf_keras(model)
  if not isinstance(model, keras.Model):
    raise TypeError(f"model must be a tf_keras (or Keras 3) Model; got {type(model).__name__}.")
  dataset = as_batches(dataset)

  def forward(batch):
    model(batch[0] if isinstance(batch, (tuple, list)) else batch, training=True)

  used = average_batch_statistics(batch_norms(model), dataset, steps, forward)
  if original is not model:
    keras3.copy_back(original)
  return used
