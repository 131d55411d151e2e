"""What keras_nd's training shares: the optimizer every distillation and fine-tuning uses."""

from keras_nd._keras import keras

__all__ = ["cosine_adam"]


def cosine_adam(learning_rate, steps=None):
  """Adam whose learning rate decays from `learning_rate` to zero over `steps` by a cosine.

  Args:
    learning_rate: the initial learning rate.
    steps: the steps of the whole training (at least 1); None keeps the rate
      constant (a training of unknown length).

  Returns:
    A `keras.optimizers.Adam`.
  """
  if steps is None:
    return keras.optimizers.Adam(learning_rate)
  return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate,
                                                                      max(1, int(steps))))
