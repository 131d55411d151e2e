"""NeighbourhoodDistiller: trains every student neighbourhood at once, independently."""

import contextlib

from keras_nd import _checks, batch_norm, losses
from keras_nd._keras import keras, tf
from keras_nd.students import as_student_model
from keras_nd.training import (
  StopOnNonFinite,
  Untracked,
  build_step,
  fit_arguments,
  with_pruning_step,
)

__all__ = ["NeighbourhoodDistiller"]


def _on(device):
  """A `tf.device` scope, or no scope for None."""
  return contextlib.nullcontext() if device is None else tf.device(device)


def _placement(hoods, devices):
  """The device of each student (one per entry of `hoods`), or [None, ...] without placement."""
  if devices is None:
    return [None] * len(hoods)
  if tf.distribute.has_strategy():
    raise ValueError("devices= places whole neighbourhoods on devices itself; it cannot be "
                     "combined with a tf.distribute strategy, which replicates every student.")
  if isinstance(devices, str) or not isinstance(devices, (list, tuple, dict)) or not devices:
    raise ValueError("devices must be a non-empty list of device names or a dict {neighbourhood "
                     f"name: device}}; got {devices!r}.")
  known = {_canonical(d.name) for d in tf.config.list_logical_devices()}
  for device in (devices.values() if isinstance(devices, dict) else devices):
    if not isinstance(device, str) or _canonical(device) not in known:
      raise ValueError(f"Unknown device {device!r}; this process has {sorted(known)}.")
  if isinstance(devices, dict):
    names = {hood.name for hood in hoods}
    unknown = sorted(set(devices) - names)
    missing = sorted(names - set(devices))
    if unknown or missing:
      raise ValueError(f"devices must name every neighbourhood being distilled exactly: missing "
                       f"{missing}, unknown {unknown}.")
    return [devices[hood.name] for hood in hoods]
  # Largest first onto the least loaded device (parameters as the measure of work).
  sizes = [hood.teacher.count_params() for hood in hoods]
  load = {device: 0 for device in devices}
  placed = [None] * len(hoods)
  for i in sorted(range(len(hoods)), key=lambda i: -sizes[i]):
    placed[i] = min(devices, key=lambda d: load[d])
    load[placed[i]] += sizes[i]
  return placed


def _canonical(name):
  """'/device:CPU:0' for '/cpu:0', 'CPU:0', '/job:localhost/replica:0/task:0/device:CPU:0'."""
  spec = tf.DeviceSpec.from_string(name if name.startswith("/") else "/device:" + name)
  return f"/device:{(spec.device_type or '').upper()}:{spec.device_index or 0}"


class NeighbourhoodDistiller(keras.Model):
  """Distils each student neighbourhood from its teacher neighbourhood, all in one step.

  Every training step computes, for each neighbourhood i, the loss
  `L_i = L_i,0 + sum_j alpha_j L_i,j` (see `keras_nd.losses`) on that step's
  teacher activations and minimises their sum. Nothing couples the problems:
  the gradient of the sum with respect to student i's weights is the gradient
  of L_i, and optimizers with global-norm clipping are refused. Each
  neighbourhood's loss is its own metric (`<name>_loss`). Teacher parts (the
  neighbourhoods a look-ahead passes through) always run with training=False
  and are never among the trained variables, so the teacher never changes.

  Args:
    students: dict `{Neighbourhood: student}`; a student is a tf_keras Model
      (or Layer) with the neighbourhood's input and output shapes, or a
      function `f(neighbourhood) -> model`. A neighbourhood may also have
      several candidate students, `{Neighbourhood: {label: student}}`, each
      trained independently from the same activations (Student Search);
      their metrics are `<name>_<label>_loss`.
    lookahead: J, how many following teacher neighbourhoods each student's
      output is also passed through (Eq. 5); the data must come from an
      `ActivationSource` with at least this look-ahead.
    lookahead_weights: alpha_1..alpha_J (default all 1.0).
    devices: model-parallel placement on one machine: None (everything on the
      default device, or replicated by a `tf.distribute` strategy), a list of
      device names (whole neighbourhoods are spread over them, the largest
      first onto the least loaded device, by the teacher neighbourhoods'
      parameter counts), or a
      dict `{neighbourhood name: device}`. Each neighbourhood's forward pass,
      loss and gradients run on its device, and nothing is all-reduced: the
      problems are independent. A student given as a function
      `f(neighbourhood)` is built on its device, so its weights (and the
      optimizer's slots) live there; a student given as a built model keeps
      its weights where they were created (they are copied each step).
      Not combinable with a `tf.distribute` strategy.
    calibrate_steps: at the end of every `fit`, the students' BatchNorm
      moving statistics are re-estimated on this many batches of fit's data,
      their weights fixed (`calibrate_batch_norm`), so that they match the
      final weights; 0 keeps Keras's moving averages (which lag weights that
      were still changing, the more so at Keras's default momentum).

  Example:
    >>> distiller = nd.NeighbourhoodDistiller(students)
    >>> distiller.compile(optimizer="adam")
    >>> distiller.fit(source.dataset(batch_size=128), epochs=5)
    >>> student = nd.compose(teacher, distiller.students)
  """

  def __init__(self, students, lookahead=0, lookahead_weights=None, devices=None,
               calibrate_steps=50, **kwargs):
    kwargs.setdefault("name", "neighbourhood_distiller")
    super().__init__(**kwargs)
    if not isinstance(students, dict) or not students:
      raise ValueError("students must be a non-empty dict {Neighbourhood: student model}; got "
                       f"{students!r}.")
    lookahead = _checks.integer(lookahead, "lookahead", minimum=0)
    if lookahead_weights is None:
      lookahead_weights = [1.0] * lookahead
    if len(lookahead_weights) != lookahead:
      raise ValueError(f"lookahead_weights must have {lookahead} entries (one per look-ahead "
                       f"step); got {list(lookahead_weights)}.")
    hoods = list(students)
    for hood in hoods:
      if not hasattr(hood, "nodes"):
        raise TypeError(f"students keys must be keras_nd.Neighbourhood objects; got {hood!r}.")
    names = [hood.name for hood in hoods]
    if len(set(names)) != len(names):
      raise ValueError(f"Neighbourhood names must be unique; got {names}.")
    # One entry per student: (neighbourhood, candidate label or None, student).
    entries = []
    for hood in hoods:
      given = students[hood]
      if isinstance(given, dict):
        if not given:
          raise ValueError(f"Neighbourhood '{hood.name}' has an empty dict of candidate students.")
        entries += [(hood, str(label), student) for label, student in given.items()]
      else:
        entries.append((hood, None, given))
    self.lookahead = lookahead
    self.calibrate_steps = _checks.integer(calibrate_steps, "calibrate_steps", minimum=0)
    self.lookahead_weights = [float(w) for w in lookahead_weights]
    self._hoods = Untracked([hood for hood, _, _ in entries])
    self._labels = [label for _, label, _ in entries]
    self._devices = _placement([hood for hood, _, _ in entries], devices)
    self.student_models = []
    for (hood, _, student), device in zip(entries, self._devices):
      with _on(device):
        self.student_models.append(as_student_model(hood, student))
    # The teacher parts are not tracked, so they are not among the trained variables; their
    # `trainable` flags are left alone, since they are the user's teacher's layers.
    self._following = Untracked(
        {hood.name: [nxt.teacher for nxt in hood.following(lookahead)] for hood in hoods})
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.student_names = [hood.name if label is None else f"{hood.name}_{label}"
                          for hood, label, _ in entries]
    if len(set(self.student_names)) != len(self.student_names):
      raise ValueError(f"Student names must be unique; got {self.student_names}.")
    self.hood_trackers = [keras.metrics.Mean(name=f"{name}_loss") for name in self.student_names]
    # Every weight exists already (students are built models): saying so lets checkpoint
    # callbacks such as BackupAndRestore restore into it before the first step.
    self.built = True

  @property
  def placement(self):
    """{student name: device}, or None when the distiller does not place neighbourhoods."""
    if self._devices[0] is None:
      return None
    return dict(zip(self.student_names, self._devices))

  @property
  def entries(self):
    """[(student name, neighbourhood, candidate label or None, model)], one per student."""
    return list(zip(self.student_names, self._hoods.value, self._labels, self.student_models))

  @property
  def students(self):
    """The models being trained, as given: `{Neighbourhood: model or {label: model}}`.

    Without candidates this is what `compose` takes.
    """
    result = {}
    for hood, label, model in zip(self._hoods.value, self._labels, self.student_models):
      if label is None:
        result[hood] = model
      else:
        result.setdefault(hood, {})[label] = model
    return result

  def compile(self, optimizer="adam", **kwargs):
    super().compile(optimizer=optimizer, **kwargs)
    if getattr(self.optimizer, "global_clipnorm", None):
      raise ValueError(
          "NeighbourhoodDistiller trains independent problems; an optimizer with global_clipnorm "
          "couples them through one norm over all students. Use clipnorm (per variable) instead.")

  def fit(self, *args, callbacks=None, **kwargs):
    """Keras `fit`, plus tfmot's `UpdatePruningStep` when a student is being pruned, a stop at
    the first non-finite loss (`StopOnNonFinite`: naming the neighbourhood and the step), and
    the students' BatchNorm statistics re-estimated at the end (`calibrate_steps`)."""
    callbacks = list(callbacks or []) + [StopOnNonFinite(self.weights, self.student_names)]
    build_step(self, self.trainable_variables, None)
    history = super().fit(*args, callbacks=with_pruning_step(self, callbacks, args, kwargs),
                          **kwargs)
    data = fit_arguments(args, kwargs).get("x")
    if self.calibrate_steps and isinstance(data, tf.data.Dataset) and any(
        batch_norm.batch_norms(model) for model in self.student_models):
      self.calibrate_batch_norm(data, steps=self.calibrate_steps)
    return history

  def call(self, inputs, training=False):
    """{student name: output} for a batch of the source's dataset (see `student_names`)."""
    outputs = {}
    for name, hood, model, device in zip(self.student_names, self._hoods.value,
                                         self.student_models, self._devices):
      with _on(device):
        outputs[name] = model(self._item(inputs, hood)[0], training=training)
    return outputs

  def _item(self, data, hood):
    if not isinstance(data, dict) or hood.name not in data:
      have = sorted(data) if isinstance(data, dict) else type(data).__name__
      raise ValueError(f"The data has no activations for neighbourhood '{hood.name}' (it has "
                       f"{have}); build the ActivationSource with this neighbourhood.")
    item = data[hood.name]
    if self.lookahead and (len(item) < 3 or len(item[2]) < len(self._following.value[hood.name])):
      raise ValueError(f"The distiller looks {self.lookahead} neighbourhoods ahead but the data "
                       f"for '{hood.name}' has no look-ahead targets; build the ActivationSource "
                       f"with lookahead={self.lookahead}.")
    return item

  def _distillation_losses(self, data, training):
    """(total to minimise, [per-neighbourhood distillation loss])."""
    per_hood = []
    total = 0.0
    for hood, model, device in zip(self._hoods.value, self.student_models, self._devices):
      with _on(device):
        item = self._item(data, hood)
        prediction = model(item[0], training=training)
        loss = losses.neighbourhood_mse(item[1], prediction)
        if self.lookahead:
          loss += losses.lookahead_loss(prediction, item[2], self._following.value[hood.name],
                                        self.lookahead_weights)
        regularisation = tf.add_n(model.losses) if model.losses else 0.0
      per_hood.append(loss)
      total += loss + regularisation
    return total, per_hood

  def _track(self, total, per_hood):
    self.loss_tracker.update_state(total)
    for tracker, loss in zip(self.hood_trackers, per_hood):
      tracker.update_state(loss)
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    with tf.GradientTape() as tape:
      total, per_hood = self._distillation_losses(data, training=True)
      # Keras sums gradients over replicas; dividing keeps the step size independent of them.
      scaled = total / tf.distribute.get_strategy().num_replicas_in_sync
    self.optimizer.minimize(scaled, self.trainable_variables, tape=tape)
    return self._track(total, per_hood)

  def test_step(self, data):
    return self._track(*self._distillation_losses(data, training=False))

  def calibrate_batch_norm(self, dataset, steps=50):
    """Re-estimates the students' BatchNorm moving statistics with their weights fixed.

    During training a BatchNorm layer normalises with each batch's statistics
    and keeps moving averages (momentum 0.99 by default) for inference; after
    a few hundred steps of weights that were still changing those averages lag
    behind, and a composed student, whose errors add up across
    neighbourhoods, suffers from the lag. This sets each moving mean and
    variance to the plain average of the batch statistics over `steps`
    batches of `dataset` (the source's dataset, as for `fit`). For the
    composed student, `keras_nd.calibrate_batch_norm` does the same on data.

    Args:
      dataset: batches of `{neighbourhood name: (a, T(a), ...)}`.
      steps: number of batches to average over (fewer if the dataset ends).

    Returns:
      The number of batches used.
    """
    layers = [(hood, model, batch_norm.batch_norms(model))
              for hood, model in zip(self._hoods.value, self.student_models)]

    def forward(data):
      for (hood, model, bns), device in zip(layers, self._devices):
        if bns:
          with _on(device):
            model(self._item(data, hood)[0], training=True)

    return batch_norm.average_batch_statistics([bn for _, _, bns in layers for bn in bns], dataset,
                                     steps, forward)
