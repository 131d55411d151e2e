"""Top-1 accuracy: the one way keras_nd scores a model on labelled batches.

Each model is called in inference mode, batch by batch; nothing is compiled,
so scoring many models (a Student Search's candidates, a noise sweep's
perturbed teachers) builds no Keras test function per model. A one-off score
(`accuracy`) calls the model eagerly; a `Scorer`, made to score one model
many times (after each change of its weights), traces its step once.
"""

from keras_nd import keras3
from keras_nd._keras import keras, tf
from keras_nd.batches import as_batches

__all__ = ["Scorer", "accuracy"]


def accuracy(model, dataset, batch_size=256):
  """Top-1 accuracy of `model`'s outputs (argmax) on labelled batches.

  Args:
    model: a model of logits or probabilities.
    dataset: a `tf.data.Dataset` of batches `(x, y, ...)`, or a tuple of
      arrays `(x, y)`, batched by `batch_size`. Labels are class indices or
      one-hot rows.
    batch_size: the batch size of arrays.

  Returns:
    The fraction of examples whose largest output is their label.

  Raises:
    ValueError: if the dataset is empty or its elements are not `(x, y)`.
  """
  # Eager: tracing a model costs more than the few batches of a split it is scored on once.
  return Scorer(model, as_batches(dataset, batch_size), traced=False)()


class Scorer:
  """Top-1 accuracy of one model on one dataset, through a single traced step.

  Call it once per evaluation (e.g. after each change of the weights); with
  `evaluations` and `verbose`, a progress bar counts them. `traced=False`
  calls the model eagerly instead (for a model scored once).
  """

  def __init__(self, model, dataset, evaluations=None, verbose=0, traced=True):
    self.model = model = keras3.to_tf_keras(model)
    self.dataset = dataset
    # One step per evaluation: a sweep of hundreds of them takes minutes.
    self._progbar = keras.utils.Progbar(evaluations, unit_name="evaluation", verbose=verbose)
    x_spec, y_spec = _labelled_specs(dataset)

    def counts(x, y):
      outputs = model(x, training=False)
      predicted = tf.argmax(outputs, axis=-1)
      if y.shape.rank == outputs.shape.rank and y.shape[-1] == outputs.shape[-1] != 1:
        labels = tf.argmax(y, axis=-1)
      else:
        labels = tf.cast(tf.reshape(y, [-1]), tf.int64)
      return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64)), tf.size(labels)

    # Traced here, once, and called as a concrete function: every Scorer traces `counts` anew
    # (for its own model), and TensorFlow, which counts traces by the function's code, would
    # warn of retracing when a search or a sweep makes many Scorers.
    self._counts = (tf.function(counts).get_concrete_function(x_spec, y_spec) if traced
                    else counts)

  def __call__(self):
    correct = total = 0
    for batch in self.dataset:
      c, n = self._counts(batch[0], batch[1])
      correct += int(c)
      total += int(n)
    if not total:
      raise ValueError("The dataset to score accuracy on is empty.")
    self._progbar.add(1)
    return correct / total


def _labelled_specs(dataset):
  """Specs of a batched (x, y) dataset's elements, any batch size."""
  if not isinstance(dataset, tf.data.Dataset):
    raise TypeError(f"dataset must be a tf.data.Dataset; got {type(dataset).__name__}.")
  spec = dataset.element_spec
  if not isinstance(spec, (tuple, list)) or len(spec) < 2 or not all(
      isinstance(s, tf.TensorSpec) for s in spec[:2]):
    raise ValueError(f"dataset elements must be batches (x, y) of images and labels to score "
                     f"accuracy on; got elements {spec}.")
  if spec[0].shape.rank is None or spec[0].shape.rank < 1:
    raise ValueError(f"dataset elements must be batches (x, y); got x of shape {spec[0].shape}.")
  return [tf.TensorSpec([None] + spec[i].shape.as_list()[1:], spec[i].dtype) for i in (0, 1)]
