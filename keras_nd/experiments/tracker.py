"""The time-to-accuracy curve of a training: its epochs timed, each followed by an untimed
evaluation, with Keras's early stopping on the validation accuracy, resumable."""

import json
import math
import os
import time

import numpy as np

import keras_nd as nd
from keras_nd import files, metrics
from keras_nd._keras import keras

__all__ = ["EpochTracker", "time_to"]


class EpochTracker(keras.callbacks.Callback):
  """Times training epochs, evaluates after each (untimed), stops early on validation accuracy.

  Early stopping and the best weights are Keras's own
  (`keras.callbacks.EarlyStopping(restore_best_weights=True)`, on the
  validation accuracy each evaluation puts in the epoch's logs), with one
  addition: with `evaluate_first`, the weights before training are a
  candidate too (fine-tuning ends with the ND student if it never beats it).

  With `calibration` (batches of training inputs), the model's BatchNorm
  statistics are re-estimated before each evaluation (untimed too), so that
  every point of the curve is the accuracy of the weights as they are, as the
  final one is: at Keras's default momentum the moving averages of a model
  trained a few epochs lag its weights, and the curve would understate it.

  With a `state_path`, the curve and the early-stopping state are written
  there after every epoch, before `keras.callbacks.BackupAndRestore` (which
  must come after this tracker in `fit`'s callbacks) backs the epoch up: Keras
  keeps no callback's state, and a resumed training must go on with the curve
  and the best weights it had.

  Args:
    validation, test: batches of (image, label).
    patience: stop after `patience` + 1 evaluations in a row without a better
      validation accuracy; None never stops (the best weights still win).
    offset: seconds the clock starts at.
    evaluate_first: evaluate before the first epoch too.
    student: the model scored, inside a distiller (default: the model fit).
    state_path: where the state of a resumable training goes.
    calibration: batches of training inputs (see above).

  Attributes:
    curve: [(training seconds so far, test accuracy)], starting with the
      evaluation before the first epoch when `evaluate_first`.
    seconds: training seconds so far.
  """

  def __init__(self, validation, test, patience=None, offset=0.0, evaluate_first=False,
               student=None, state_path=None, calibration=None):
    super().__init__()
    self._calibration = calibration
    self._validation = validation
    self._test = test
    self.seconds = offset
    self.curve = []
    self._stopper = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", restore_best_weights=True,
        patience=math.inf if patience is None else patience + 1)
    self._evaluate_first = evaluate_first
    self._student = student
    self._state_path = state_path
    self._saved = None  # the early-stopping state a resumed training starts from
    self._written = None  # the epoch of the best weights on disk
    self._scorers = None
    self._epochs = []  # the epoch of each point of the curve (-1: before training)

  def set_model(self, model):
    super().set_model(model)
    # The student's weights only are kept and restored (not a distiller's teacher's too).
    self._stopper.set_model(self._student or model)

  @property
  def epochs(self):
    """The 0-based epoch after which each point of `curve` was measured (-1: before
    training)."""
    return list(self._epochs)

  def _evaluate(self, epoch):
    """Scores the model's weights as they are; returns the validation accuracy."""
    scored = self._stopper.model
    if self._scorers is None:  # one traced step each, for every evaluation
      self._scorers = (metrics.Scorer(scored, self._validation), metrics.Scorer(scored, self._test))
    if self._calibration is not None:
      nd.calibrate_batch_norm(scored, self._calibration)
    validation, test = (scorer() for scorer in self._scorers)
    self.curve.append((self.seconds, test))
    self._epochs.append(epoch)
    return validation

  def resume(self):
    """Loads the state a killed job saved (if any); True if its training had already stopped."""
    if not self._state_path or not os.path.exists(self._state_path):
      return False
    with open(self._state_path) as f:
      state = json.load(f)
    self.curve = [tuple(point) for point in state["curve"]]
    self._epochs = state["epochs"]
    self.seconds = state["seconds"]
    weights = None
    if os.path.exists(self._state_path + ".npz"):
      with np.load(self._state_path + ".npz", allow_pickle=False) as saved:
        weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    self._saved = dict(state["stopper"], best_weights=weights)
    self._written = state["stopper"]["best_epoch"] if weights is not None else None
    self._evaluate_first = False
    return state["stopped"]

  def on_train_begin(self, logs=None):
    self._stopper.on_train_begin(logs)
    self._stopper.model.stop_training = False
    if self._saved is not None:
      for name, value in self._saved.items():
        setattr(self._stopper, name, value)
    elif self._evaluate_first:
      self._stopper.best = self._evaluate(-1)
      self._stopper.best_weights = self._stopper.model.get_weights()
      self._stopper.best_epoch = -1

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()
    # A job killed after saving this state but before its backup repeats the epoch.
    while self._epochs and self._epochs[-1] >= epoch:
      self._epochs.pop()
      self.curve.pop()
    if self.curve:
      self.seconds = self.curve[-1][0]

  def on_epoch_end(self, epoch, logs=None):
    self.seconds += time.perf_counter() - self._start
    logs = logs if logs is not None else {}
    logs["val_accuracy"] = self._evaluate(epoch)
    self._stopper.on_epoch_end(epoch, logs)
    if self._stopper.model.stop_training:  # a distiller's student: the distiller stops
      self.model.stop_training = True
    if self._state_path:
      self._save(epoch)

  def _save(self, epoch):
    """Keeps the curve and what early stopping knows on disk (before the epoch's backup: see
    on_epoch_begin)."""
    os.makedirs(os.path.dirname(self._state_path), exist_ok=True)
    # The best weights only when they change: after an epoch that is no better they are on disk.
    if self._stopper.best_weights is not None and self._stopper.best_epoch != self._written:
      with files.atomic(self._state_path + ".npz", "wb") as f:
        np.savez(f, *self._stopper.best_weights)
      self._written = self._stopper.best_epoch
    stopper = {name: getattr(self._stopper, name)
               for name in ("best", "wait", "best_epoch", "stopped_epoch")}
    files.write_json(self._state_path, {
        "curve": self.curve, "epochs": self._epochs, "seconds": self.seconds,
        "stopper": {k: float(v) if k == "best" else int(v) for k, v in stopper.items()},
        "epoch": epoch, "stopped": bool(self.model.stop_training)})

  def on_train_end(self, logs=None):
    self._stopper.on_train_end(logs)


def time_to(curve, target):
  """The training seconds of the first point of `curve` at or above `target`, or None."""
  for seconds, value in curve:
    if value >= target:
      return seconds
  return None
