"""The harness every experiment runs on: one teacher and one dataset (`Experiment`), and the
choice of a job's neighbourhoods (`select`).

KD and fine-tuning resume from their last epoch when a job is killed: Keras
backs each epoch up (`keras.callbacks.BackupAndRestore`, in
`workdir/backups/<teacher key>/<name>`), the `EpochTracker` beside it keeps
the curve and the early-stopping state. A teacher's training resumes the same
way (Keras removes its backup when its fit ends).

Every phase logs to TensorBoard (`board.Board`, when `settings.tensorboard`
names a directory): the teacher's, CE's, KD's, ND's and fine-tuning's fits
through Keras's callback, each in the run of its phase (`teacher`, `ce-k0.5`,
`kd-k0.5`, `nd-<label>`, `ft-<label>`, as `nd_label` names ND's recipe), with
the test accuracies of their curves, and the errors of ND's solve.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time

import keras_nd as nd
from keras_nd import artefacts, cache, files, metrics
from keras_nd._keras import keras
from keras_nd.experiments import exports
from keras_nd.experiments.board import Board
from keras_nd.experiments.catalogue import build_model, from_scratch
from keras_nd.experiments.common import Settings, fit_progress
from keras_nd.experiments.teacher import load_teacher
from keras_nd.experiments.tracker import EpochTracker
from keras_nd.training import build_step, cosine_adam

__all__ = ["Experiment", "select"]

# The exact solver's statistics from every other position along each axis: a quarter of the
# cost of X^T X, with the same ND accuracy on the main job (71.3% against 71.1%).
SUBSAMPLE = 2


def _compiled(model, learning_rate, steps, data):
  """`model` compiled for cross-entropy training on `data`, its step's variables made."""
  model.compile(cosine_adam(learning_rate, steps),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  build_step(model, model.trainable_variables, data, outputs_like=model)
  return model


class Experiment:
  """One teacher and one dataset; methods train students of a given multiplier.

  Args:
    data: a `keras_nd.data` dataset with `pipeline(split, batch_size,
      training)`, `input_shape`, `num_classes`, `num_train`.
    workdir: where the teacher, caches and results go.
    settings: the `common.Settings` of the run (an experiment's `Config`
      is one); default `Settings()`. Each of its fields is an attribute of
      the experiment (`experiment.batch_size`, ...); its `tensorboard`, a
      directory or None, is where `board` writes.
    epochs: dict of epoch budgets: teacher, ce, kd, nd, ft.
    teacher: your own trained teacher, a tf_keras model or a `.keras` path,
      in place of `settings.teacher` (a configuration holds paths only).
    max_lookahead: the largest look-ahead any ND run will use (the
      activation cache is built once, for it).
    unit_noise: standard deviation of the Gaussian noise after every residual
      unit of the teacher while it trains (App. B.1); 0, the default, for the
      plain teacher. It enters the teacher key only when non-zero, so plain
      teachers keep their keys (and caches).
    devices: `NeighbourhoodDistiller`'s placement of neighbourhoods on devices
      for ND (None: the default device).
    strategy: a `tf.distribute` strategy for ND (e.g. multi-worker); None for
      the default.

  A given teacher (`teacher`, or `settings.teacher`) is used instead of
  training one (`settings.model` then names nothing): it must take the
  dataset's images as `data` gives them (`Dataset.with_preprocessing`; a
  teacher that scores far better on the images given the other way is
  refused, naming the preprocessing to pass) and give its classes. Students
  of its architecture replace its `students.narrowable` neighbourhoods; CE's
  (and random KD's) are those students freshly initialised.

  Attributes:
    students: `{Neighbourhood: student}` of the latest `nd` call, as
      `keras_nd.compose` and `tolerance.diagnose` take them (None before).
    board: the `board.Board` of `settings.tensorboard`, where every phase
      logs (a teacher trained with `unit_noise` puts its phases under
      "unit_noise<sigma>/").
  """

  def __init__(self, data, workdir, settings=None, epochs=None, teacher=None, max_lookahead=0,
               unit_noise=0.0, devices=None, strategy=None):
    settings = Settings() if settings is None else settings
    for field in dataclasses.fields(Settings):
      if field.name != "teacher":  # `teacher()` gives the model itself
        setattr(self, field.name, getattr(settings, field.name))
    teacher = settings.teacher if teacher is None else teacher
    self.data = data
    self.workdir = workdir
    self.epochs = dict(epochs or {})
    self.unit_noise = unit_noise
    self.devices = devices
    self.strategy = strategy
    self.students = None
    self.timings = {}
    self.board = Board(settings.tensorboard,
                       prefix=f"unit_noise{unit_noise:g}/" if unit_noise else "")
    self.train = data.pipeline("train", self.batch_size, training=True, seed=self.seed)
    self.train_plain = data.pipeline("train", self.batch_size, training=False)
    self.validation = data.pipeline("validation", 256, training=False)
    self.test = data.pipeline("test", 256, training=False)
    self.steps_per_epoch = -(-data.num_train // self.batch_size)
    self.max_lookahead = max_lookahead
    self._sources = {}  # lookahead -> (units, ActivationSource)
    files.writable_directory(workdir, "work directory")
    self.given = None if teacher is None else load_teacher(teacher, data, self.trusted)
    # What the results call the teacher's architecture.
    self.architecture = self.model if teacher is None else (
        f"given:{os.fspath(teacher)}" if isinstance(teacher, (str, os.PathLike))
        else f"given:{self.given.name}")
    self._units = None
    self.key = self._teacher_key()
    # One cache per teacher and look-ahead: a retrained teacher never meets another's cache.
    self.cache_dir = os.path.join(workdir, f"cache-{self.key}-lookahead{max_lookahead}")
    self.students_dir = os.path.join(workdir, "students")

  def _teacher_key(self):
    """A digest of everything the teacher depends on: the data's content (not its name, nor
    how its path is spelled) and the training settings."""
    if self.given is not None:
      spec = {"data": self.data.fingerprint(),
              "teacher": cache.teacher_fingerprint(self.given)}
    else:
      spec = {"data": self.data.fingerprint(), "num_train": self.data.num_train,
              "model": self.model, "epochs": self.epochs["teacher"],
              "batch_size": self.batch_size, "learning_rate": self.learning_rate,
              "seed": self.seed}
    if self.data.preprocessing != "standardize":
      spec["preprocessing"] = self.data.preprocessing
    if self.unit_noise:
      spec["unit_noise"] = self.unit_noise
    self.teacher_spec = spec
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

  def say(self, text):
    if self.verbose:
      print(text, flush=True)

  def _fit_args(self, *callbacks):
    """`fit`'s verbose and callbacks: a line per epoch at verbose=1 (timing training alone)."""
    return fit_progress(self.verbose, *callbacks)

  def _new(self, multiplier, unit_noise=0.0):
    keras.utils.set_random_seed(self.seed)
    if self.given is not None:
      return from_scratch(self.given, self.units(self.given), multiplier)
    return build_model(self.model, self.data.input_shape, self.data.num_classes, multiplier,
                       unit_noise)

  def _calibration(self):
    """What the trackers re-estimate BatchNorm statistics on before each evaluation: for a given
    teacher's students (whose momentum may lag), the training images; the project's ResNets,
    at momentum 0.9, need none."""
    return None if self.given is None else self.train_plain.take(self.steps_per_epoch)

  def units(self, teacher):
    """The neighbourhoods students replace (`students.narrowable`), the grouping said once."""
    if self._units is None or self._units[0] is not teacher:
      units, note = nd.students.narrowable(teacher)
      if note:
        self.say(f"Neighbourhoods: {note}.")
      self._units = (teacher, units)
    return self._units[1]

  def teacher(self):
    """The teacher: loaded from the work directory when trained before with the same settings.

    Jobs sharing the work directory take turns: the first trains it, the
    others wait for it and load it.
    """
    if self.given is not None:
      self.timings["teacher"] = 0.0
      teacher = self.given
    else:
      path = os.path.join(self.workdir, f"teacher-{self.key}.keras")
      with files.locked(path[:-len(".keras")] + ".lock"):
        teacher = self._trained_teacher(path)
    self.keep("teacher", teacher)
    return teacher

  def keep(self, name, model):
    """Writes a final `model` of the run in its `export` formats (`exports.export`), as
    `<name>` (the noise-trained teacher's models as `unit_noise<sigma>-<name>`)."""
    if self.export:
      prefix = f"unit_noise{self.unit_noise:g}-" if self.unit_noise else ""
      exports.export(model, self.workdir, prefix + name, self.export)

  def _trained_teacher(self, path):
    if os.path.exists(path):
      teacher = files.load_model(path)
      with open(path[:-len(".keras")] + ".json") as f:
        self.timings["teacher"] = json.load(f)["seconds"]
      self.say(f"Reusing the teacher {path}.")
      return teacher
    teacher = _compiled(self._new(1.0, self.unit_noise), self.learning_rate,
                        self.epochs["teacher"] * self.steps_per_epoch, self.train)
    self.say(f"Training the teacher ({self.model}, {self.epochs['teacher']} epochs)...")
    # A killed job's successor goes on from the last epoch (the backup goes once fit ends).
    backup = keras.callbacks.BackupAndRestore(
        os.path.join(self.workdir, "backups", self.key, "teacher"))
    start = time.perf_counter()
    teacher.fit(self.train, epochs=self.epochs["teacher"],
                **self._fit_args(*self.board.callbacks("teacher"), backup))
    self.timings["teacher"] = time.perf_counter() - start
    # Written under a temporary name and renamed, so an interrupted save is never reused.
    files.save_model(path, teacher, dict(self.teacher_spec, seconds=self.timings["teacher"]))
    return teacher

  def ce(self, multiplier):
    """Cross-entropy from scratch: (row, curve)."""
    student = _compiled(self._new(multiplier), self.learning_rate,
                        self.epochs["ce"] * self.steps_per_epoch, self.train)
    tracker = EpochTracker(self.validation, self.test, patience=None,
                           calibration=self._calibration())
    phase = f"ce-k{multiplier:g}"
    student.fit(self.train, epochs=self.epochs["ce"],
                **self._fit_args(tracker, *self.board.callbacks(phase)))
    self.board.curve(phase, tracker.curve, tracker.epochs)
    return self._row("ce", multiplier, student, tracker.seconds), tracker.curve

  def fine_tune(self, teacher, student, epochs, learning_rate, offset=0.0, evaluate_first=False,
                name=None, phase=None):
    """Trains `student` by KD from `teacher`, evaluated every epoch; returns the `EpochTracker`.

    Stops early on validation accuracy and ends with the best epoch's weights;
    `offset` seconds start the tracker's clock (ND's time, for ND+FT). With a
    `name`, training is backed up every epoch in `workdir/backups/<teacher
    key>/<name>` and a killed job resumes from there (never from the backup of
    another teacher's, or another data's, student). It logs to the
    TensorBoard run `phase` (default `name`).
    """
    phase = phase or name
    distiller = nd.KnowledgeDistiller(teacher=teacher, student=student,
                                      temperature=self.temperature,
                                      label_weight=self.label_weight)
    distiller.compile(cosine_adam(learning_rate, epochs * self.steps_per_epoch),
                      metrics=["accuracy"])
    backup = os.path.join(self.workdir, "backups", self.key, name) if name else None
    tracker = EpochTracker(self.validation, self.test, patience=self.patience, offset=offset,
                           calibration=self._calibration(),
                           evaluate_first=evaluate_first, student=student,
                           state_path=backup and os.path.join(backup, "tracker.json"))
    if tracker.resume():  # it had stopped early: only the best weights are wanted
      tracker.set_model(distiller)
      tracker.on_train_begin()
      tracker.on_train_end()
      self.say(f"  {name}: finished before the restart ({len(tracker.curve)} evaluations).")
    else:
      # The tracker saves its state, and TensorBoard (after it: it logs the validation accuracy
      # the tracker adds) writes the epoch, before the epoch's backup.
      callbacks = [tracker, *self.board.callbacks(phase)]
      if backup:
        callbacks.append(keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False))
        if tracker.curve:
          self.say(f"  {name}: resuming after {len(tracker.curve)} evaluations ({backup}).")
      distiller.fit(self.train, epochs=epochs, **self._fit_args(*callbacks))
    self.board.curve(phase, tracker.curve, tracker.epochs)
    return tracker

  def _students(self, units, multiplier):
    keras.utils.set_random_seed(self.seed)
    return {h: nd.students.bottleneck(h, multiplier, init=self.student_init) for h in units}

  def kd(self, teacher, multiplier):
    """End-to-end KD, to its plateau (early stopping on validation): (row, curve).

    From scratch it learns at `learning_rate`; from the teacher's channels (the
    start ND's students have) at fine-tuning's rate, so that it is exactly
    ND+FT without ND.
    """
    if self.student_init == "random":
      student, learning_rate = self._new(multiplier), self.learning_rate
    else:
      student = nd.compose(teacher, self._students(self.units(teacher), multiplier))
      learning_rate = self.learning_rate / 4
    tracker = self.fine_tune(teacher, student, self.epochs["kd"], learning_rate,
                             name=f"kd-k{multiplier:g}")
    return self._row("kd", multiplier, student, tracker.seconds), tracker.curve

  def source(self, teacher, lookahead):
    """(residual units, activation source) for `lookahead`, all from one cache.

    The cache is built (or verified) once per run, for `max_lookahead`; a
    source of less look-ahead reads a subset of it, and each is opened once.
    The exact solver alone reads the teacher's activations once or twice: it
    computes them online instead (reading the cache is slower than the
    teacher on a CPU), and no cache is built.
    """
    if self.solver == "lstsq":
      if "online" not in self._sources:
        units = self.units(teacher)
        self._sources["online"] = (units, nd.ActivationSource(teacher, units, self.train_plain))
        self.timings["cache"] = 0.0
      return self._sources["online"]
    if not self._sources:
      units = self.units(teacher)
      start = time.perf_counter()
      built = nd.ActivationSource(teacher, units, self.train_plain, lookahead=self.max_lookahead,
                                  cache_dir=self.cache_dir, verbose=int(self.verbose > 1))
      self.timings["cache"] = built.manifest.get("build_seconds", time.perf_counter() - start)
      self._sources[self.max_lookahead] = (units, built)
    if lookahead not in self._sources:
      units = self._sources[self.max_lookahead][0]
      # Verified a moment ago by the source that built or opened it.
      self._sources[lookahead] = (units, nd.ActivationSource(
          teacher, units, self.train_plain, lookahead=lookahead, cache_dir=self.cache_dir,
          verify=False, verbose=0))
    return self._sources[lookahead]

  def nd_label(self, multiplier, lookahead):
    """The name of an ND student's recipe: its multiplier, look-ahead and a digest of the rest."""
    recipe = dict(self.distil_settings(), student_init=self.student_init)
    if self.solver == "lstsq":  # no gradient step: its settings change nothing
      for key in ("epochs", "learning_rate"):
        del recipe[key]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return f"k{multiplier:g}-lookahead{lookahead}-{digest}"

  def solve_settings(self):
    """`reconstruct`'s settings: channels chosen in the solve, every other position sampled."""
    if self.solver == "gradient":
      return {}
    greedy = self.student_init == "teacher" and self.channels == "greedy"
    return {"channels": "greedy" if greedy else None, "subsample": SUBSAMPLE}

  def calibrate_steps(self):
    """Steps of ND's BatchNorm re-estimation: an epoch after gradient steps alone, else none."""
    # An exact solve sets the BatchNorm statistics it fits through (gradient steps after it keep
    # them frozen); re-estimating them on the teacher's activations measured slightly worse
    # (composed: 70.1% against 71.0%).
    return 0 if self.solver != "gradient" else self.steps_per_epoch

  def distil(self, teacher, multiplier, lookahead=0, hoods=None):
    """Distils the students of `hoods` (default: every residual unit) that are not finished."""
    units, source = self.source(teacher, lookahead)
    builder = functools.partial(nd.students.bottleneck, k=multiplier, init=self.student_init)
    label = self.nd_label(multiplier, lookahead)
    artefacts.distil(teacher, units if hoods is None else hoods, {label: builder}, source,
                     self.students_dir, lookahead=lookahead, devices=self.devices,
                     strategy=self.strategy, verbose=self.verbose,
                     callbacks=self.board.callbacks(f"nd-{label}"), **self.distil_settings())

  def distil_settings(self):
    """`artefacts.distil`'s settings of this experiment's ND: solver, epochs, rate, seed..."""
    return dict(epochs=self.epochs["nd"], batch_size=self.batch_size,
                learning_rate=self.nd_learning_rate, seed=self.seed,
                calibrate_steps=self.calibrate_steps(), solver=self.solver,
                **self.solve_settings())

  def nd(self, teacher, multiplier, lookahead=0, train=True):
    """ND of every residual unit: (student, cache + ND seconds, ND seconds, per-hood losses).

    Students come from their artefacts; those not finished are distilled
    first, all at once, unless `train` is False (then they are refused,
    named). ND seconds are the training time of every job that made them.
    """
    units, _ = self.source(teacher, lookahead)
    if train:
      self.distil(teacher, multiplier, lookahead)
    label = self.nd_label(multiplier, lookahead)
    self.students = artefacts.load(teacher, units, label, self.students_dir)
    store = artefacts.store(self.students_dir, teacher)
    info = {h.name: artefacts.info(store, h.name, label) for h in units}
    seconds = sum({i["job"]: i["seconds"] for i in info.values()}.values())
    losses = {name: i["loss"] for name, i in info.items()}
    self.board.solve(f"nd-{label}", {name: i["solve"] for name, i in info.items() if "solve" in i})
    student = nd.compose(teacher, self.students)
    return student, self.timings["cache"] + seconds, seconds, losses

  def nd_and_ft(self, teacher, multiplier, lookahead=0, fine_tune=True, train=True):
    """ND, and ND+FT on top of it: ([rows], ND+FT curve, per-hood losses, ND seconds)."""
    student, seconds, nd_seconds, losses = self.nd(teacher, multiplier, lookahead, train)
    accuracy_nd = metrics.accuracy(student, self.test)
    rows = [dict(self._row("nd", multiplier, student, seconds, lookahead),
                 lookahead=lookahead)]
    curve = [(seconds, accuracy_nd)]
    self.board.curve(f"nd-{self.nd_label(multiplier, lookahead)}", curve)
    if fine_tune:
      tracker = self.fine_tune(teacher, student, self.epochs["ft"], self.learning_rate / 4,
                               offset=seconds, evaluate_first=True,
                               name=f"ft-{self.nd_label(multiplier, lookahead)}")
      curve = tracker.curve
      rows.append(dict(self._row("nd_ft", multiplier, student, tracker.seconds, lookahead),
                       lookahead=lookahead, accuracy_before_ft=accuracy_nd))
    return rows, curve, losses, nd_seconds

  def _row(self, method, multiplier, student, seconds, lookahead=0):
    self.keep(f"{method}-k{multiplier:g}" + (f"-lookahead{lookahead}" if lookahead else ""),
              student)
    row = {"method": method, "multiplier": multiplier, "params": student.count_params(),
           "accuracy": metrics.accuracy(student, self.test), "seconds": seconds}
    self.say(f"  {method:<6} k={multiplier:<5g} params={row['params']:<8} "
              f"accuracy={row['accuracy']:.4f}  {seconds:.1f}s")
    return row



def select(units, neighbourhoods=None, shard=None):
  """The residual units a job distils: by index in `split` order or name, or shard "i/n"."""
  if neighbourhoods is not None and shard is not None:
    raise ValueError("Give the neighbourhoods of a job or its shard, not both.")
  if shard is not None:
    return artefacts.shard(units, shard)
  if not neighbourhoods:
    raise ValueError("The list of neighbourhoods to distil is empty.")
  by_key = {str(h.index): h for h in units} | {h.name: h for h in units}
  unknown = [str(n) for n in neighbourhoods if str(n) not in by_key]
  if unknown:
    raise ValueError(f"Unknown neighbourhoods {unknown}: this experiment distils the residual "
                     f"units, by index {units[0].index}..{units[-1].index} or name "
                     f"({', '.join(h.name for h in units)}).")
  chosen = {by_key[str(n)].name: by_key[str(n)] for n in neighbourhoods}
  return [h for h in units if h.name in chosen]

