"""KnowledgeDistiller: end-to-end knowledge distillation (Eq. 3)."""

from keras_nd import _checks, keras3, losses
from keras_nd._keras import keras, tf
from keras_nd.batch_norm import calibrate_batch_norm
from keras_nd.batches import as_batches
from keras_nd.training import (
  StopOnNonFinite,
  Untracked,
  build_step,
  fit_arguments,
  with_pruning_step,
)

__all__ = ["KnowledgeDistiller"]


def _outputs_logits(model):
  """Whether a classifier outputs logits (False when its last layer applies a softmax)."""
  last = model.layers[-1]
  activation = getattr(last, "activation", None)
  if isinstance(last, keras.layers.Softmax):
    return False
  return getattr(activation, "__name__", None) != "softmax"


class KnowledgeDistiller(keras.Model):
  """Trains `student` to match a frozen `teacher` (Hinton KD), and the labels.

  Used both to fine-tune a composed student and as the end-to-end KD
  baseline. The teacher is frozen: it always runs with training=False and its
  weights are not part of this model, so they never change. Calling, evaluating and saving this
  model call, evaluate and save the student: `evaluate` reports the compiled
  metrics of the student's predictions, and `save` writes the student alone.

  Classifiers that end in a softmax are handled through their
  log-probabilities (see `keras_nd.losses.logits_of`).

  Args:
    teacher: the trained teacher model (tf_keras, or Keras 3: converted by
      `keras_nd.keras3.to_tf_keras`).
    student: the tf_keras model to train; same output shape as the teacher.
    temperature: tau of Eq. 3, > 0.
    label_weight: lambda of Eq. 3, >= 0; 0 for data without labels.
    scale_soft: multiply the soft term by tau^2 (see `losses.kd_loss`).
    calibrate_steps: at the end of every `fit`, the student's BatchNorm
      moving statistics are re-estimated on this many batches of fit's
      training data, its weights fixed (`calibrate_batch_norm`): moving
      averages (momentum 0.99 by default) lag weights that were still
      changing, and a student fine-tuned for a few epochs can score far
      below its training accuracy on test data without it. 0 keeps the
      moving averages.

  Example:
    >>> kd = nd.KnowledgeDistiller(teacher=teacher, student=student, temperature=2.5)
    >>> kd.compile(optimizer="adam", metrics=["accuracy"])
    >>> kd.fit(train_ds, epochs=1)
  """

  def __init__(self, teacher, student, temperature=1.0, label_weight=1.0, scale_soft=True,
               calibrate_steps=100, **kwargs):
    kwargs.setdefault("name", "knowledge_distiller")
    super().__init__(**kwargs)
    if keras3.is_keras3(student):
      raise TypeError(
          f"The student '{student.name}' is a Keras 3 model; keras_nd trains tf_keras models. "
          "Train its conversion, `keras_nd.keras3.to_tf_keras(student)`, and export the result "
          "with `keras_nd.files.export_keras3`.")
    teacher = keras3.to_tf_keras(teacher)
    for what, model in (("teacher", teacher), ("student", student)):
      if not isinstance(model, keras.Model):
        raise TypeError(f"The {what} must be a tf_keras Model; got {type(model).__name__}.")
    if tuple(teacher.output_shape[1:]) != tuple(student.output_shape[1:]):
      raise ValueError(f"The student '{student.name}' outputs {student.output_shape} but the "
                       f"teacher '{teacher.name}' outputs {teacher.output_shape}.")
    temperature = _checks.number(temperature, "temperature", low=0, low_open=True)
    label_weight = _checks.number(label_weight, "label_weight", low=0)
    self.calibrate_steps = _checks.integer(calibrate_steps, "calibrate_steps", minimum=0)
    # Untracked: the teacher's weights are not this model's, so fit cannot train them, and its
    # layers' `trainable` flags (which compose would copy) stay as the user set them.
    self._teacher = Untracked(teacher)
    self.student = student
    self.temperature = float(temperature)
    self.label_weight = float(label_weight)
    self.scale_soft = scale_soft
    self._teacher_logits = _outputs_logits(teacher)
    self._student_logits = _outputs_logits(student)
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.soft_tracker = keras.metrics.Mean(name="soft_loss")
    self.label_tracker = keras.metrics.Mean(name="label_loss")
    # Every weight exists already (the student is a built model): saying so lets checkpoint
    # callbacks such as BackupAndRestore restore into it before the first step.
    self.built = True

  @property
  def teacher(self):
    return self._teacher.value

  def fit(self, *args, callbacks=None, **kwargs):
    """Keras `fit`, plus tfmot's `UpdatePruningStep` when the student is being pruned, a stop at
    the first non-finite loss (`StopOnNonFinite`), and the student's BatchNorm statistics
    re-estimated at the end (`calibrate_steps`)."""
    callbacks = list(callbacks or []) + [StopOnNonFinite(self.student.weights)]
    given = fit_arguments(args, kwargs)
    build_step(self, self.student.trainable_variables, given.get("x"), given.get("y"),
               self.student)
    history = super().fit(*args, callbacks=with_pruning_step(self, callbacks, args, kwargs),
                          **kwargs)
    if self.calibrate_steps and any(isinstance(layer, keras.layers.BatchNormalization)
                                    for layer in self.student.submodules):
      calibrate_batch_norm(self.student, as_batches(given.get("x"), given.get("batch_size") or 32,
                                                    "fit's x"), steps=self.calibrate_steps)
    return history

  def call(self, inputs, training=False):
    return self.student(inputs, training=training)

  def _step(self, data, training):
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    if y is None and self.label_weight:
      raise ValueError(f"label_weight={self.label_weight} needs labels, but the data has none; "
                       "pass (x, y) batches or set label_weight=0.")
    teacher_logits = losses.logits_of(self.teacher(x, training=False), self._teacher_logits)
    prediction = self.student(x, training=training)
    student_logits = losses.logits_of(prediction, self._student_logits)
    total, soft, hard = losses.kd_loss(teacher_logits, student_logits, y, self.temperature,
                                       self.label_weight, self.scale_soft)
    if training and self.student.losses:
      total += tf.add_n(self.student.losses)
    return y, prediction, total, soft, hard

  def _track(self, y, prediction, total, soft, hard):
    if y is not None:
      self.compiled_metrics.update_state(y, prediction)
    self.loss_tracker.update_state(total)
    self.soft_tracker.update_state(soft)
    self.label_tracker.update_state(hard)
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    with tf.GradientTape() as tape:
      y, prediction, total, soft, hard = self._step(data, training=True)
      scaled = total / tf.distribute.get_strategy().num_replicas_in_sync
    self.optimizer.minimize(scaled, self.student.trainable_variables, tape=tape)
    return self._track(y, prediction, total, soft, hard)

  def test_step(self, data):
    return self._track(*self._step(data, training=False))

  def save(self, filepath, *args, **kwargs):
    """Saves the student (the model being trained), not the distiller."""
    return self.student.save(filepath, *args, **kwargs)
