"""Losses of neighbourhood distillation and knowledge distillation."""

import numpy as np

from keras_nd._keras import tf

__all__ = ["kd_loss", "logits_of", "lookahead_loss", "neighbourhood_mse"]


def neighbourhood_mse(target, prediction):
  """L_i,0 of the paper: `1/F E||S_i(a) - T_i(a)||^2`, F the output's feature size.

  Dividing the summed squared error by the feature size is the mean over all
  elements, so neighbourhoods of different sizes get losses of one scale.

  Args:
    target: the teacher neighbourhood's output, [batch, ...].
    prediction: the student's output, same shape.

  Returns:
    A scalar: the mean over the batch and the features.
  """
  return tf.reduce_mean(tf.math.squared_difference(tf.cast(prediction, tf.float32),
                                                   tf.cast(target, tf.float32)))


def lookahead_loss(prediction, targets, following, weights):
  """Eq. 5's look-ahead terms `sum_j alpha_j L_i,j`.

  The student's output is passed through the frozen teacher neighbourhoods
  that follow it (always with training=False); after the j-th one it is
  compared with the teacher's own activation there.

  Args:
    prediction: the student's output S_i(a).
    targets: the teacher's activations T_{i+j} o ... o T_i(a), j = 1..J.
    following: the teacher sub-models T_{i+1}, ..., T_{i+J}.
    weights: alpha_1, ..., alpha_J.

  Returns:
    A scalar.
  """
  total = 0.0
  x = prediction
  for teacher, target, weight in zip(following, targets, weights):
    x = teacher(x, training=False)
    total += weight * neighbourhood_mse(target, x)
  return total


def logits_of(outputs, from_logits):
  """Logits from a model's outputs; for probabilities, their log.

  softmax(log p / tau) = softmax(z / tau) for p = softmax(z), because the
  log-sum-exp shift cancels: a softmax classifier's log-probabilities serve
  as its logits exactly.
  """
  outputs = tf.cast(outputs, tf.float32)
  if from_logits:
    return outputs
  # Floor only exact zeros: a confident float32 softmax holds probabilities far below 1e-12, and
  # clipping them there would flatten its soft targets.
  return tf.math.log(tf.maximum(outputs, np.finfo(np.float32).tiny))


def kd_loss(teacher_logits, student_logits, labels=None, temperature=1.0, label_weight=0.0,
            scale_soft=True):
  """Hinton knowledge distillation, Eq. 3 of the paper.

  `L = CE(softmax(T/tau), softmax(S/tau)) + lambda CE(y, softmax(S))`.

  With `scale_soft=True` the soft term is multiplied by tau^2 (Hinton et al.,
  2015): its gradients scale as 1/tau^2, so without the factor raising the
  temperature would silently shrink the soft term against the label term and
  change what `label_weight` means. Eq. 3 as printed omits it; set
  `scale_soft=False` for the literal form.

  Args:
    teacher_logits, student_logits: [batch, classes] logits.
    labels: integer class ids [batch] (or [batch, 1]) or one-hot [batch,
      classes]; may be None when `label_weight` is 0.
    temperature: tau > 0.
    label_weight: lambda >= 0.
    scale_soft: multiply the soft term by tau^2.

  Returns:
    (total, soft term, label term), scalars averaged over the batch.
  """
  teacher_logits = tf.cast(teacher_logits, tf.float32)
  student_logits = tf.cast(student_logits, tf.float32)
  tau = tf.cast(temperature, tf.float32)
  soft_targets = tf.nn.softmax(teacher_logits / tau)
  soft = tf.reduce_mean(
      tf.nn.softmax_cross_entropy_with_logits(labels=soft_targets, logits=student_logits / tau))
  if scale_soft:
    soft *= tau * tau
  hard = tf.constant(0.0)
  if labels is not None and label_weight:
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == student_logits.shape.rank and labels.shape[-1] != 1:
      hard = tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32),
                                                     logits=student_logits)
    else:
      hard = tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.reshape(tf.cast(labels, tf.int32), [-1]), logits=student_logits)
    hard = tf.reduce_mean(hard)
  return soft + label_weight * hard, soft, hard
