"""The paper's parameter-reduction experiment (Tables 1, 2, 5, 6): CE, KD, ND, ND+FT.

`run` trains (or reuses) a teacher, then for each bottleneck multiplier k
trains the student by every requested method, measuring test accuracy after
every epoch and the training time of every phase, and writes distill_results.json.

Methods:
  ce:     the student trained from scratch with cross-entropy;
  kd:     the student trained end to end by knowledge distillation (Eq. 3);
  nd:     neighbourhood distillation of every residual unit, stem and head
          kept from the teacher, no fine-tuning;
  nd_ft:  nd, then fine-tuned with knowledge distillation.

Time-to-accuracy (item 5 of the issue): the target is KD's best test accuracy
minus 0.5 points; KD's time is its training time until its first epoch at
the target, ND+FT's is cache + ND + fine-tuning until its first evaluation at
the target (evaluated right after ND too). Evaluation time is not counted.
Fine-tuning and KD stop early on a validation split held out from training.

Scale-out and resumption (issue 8): ND students are artefacts
(`keras_nd.artefacts`) in `workdir/students`, one per neighbourhood and
recipe; a run trains only those not finished. `run(neighbourhoods=...)` or
`run(shard="i/n")` distils only some neighbourhoods and stops there (any
number of such jobs may share the work directory, at once: the teacher and
the activation cache are built by whichever job comes first, under a lock);
`run(compose=True)` then assembles the students and refuses to train any.
Anything killed resumes: the teacher and the cache are used only when
complete, ND resumes from its last epoch, and KD and fine-tuning resume from
their last epoch with their early-stopping state (`workdir/backups`, removed
once distill_results.json is written). CE students are retrained.
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time

import numpy as np

import keras_nd as nd
from keras_nd import activations, artefacts, files, models
from keras_nd._keras import keras
from keras_nd.distiller import frozen_batch_norms
from keras_nd.experiments.common import accuracy, fit_progress, scorable, write_results

METHODS = ("ce", "kd", "nd", "nd_ft")
# The exact solver's statistics from every other position along each axis: a quarter of the
# cost of X^T X, with the same ND accuracy on the main job (71.3% against 71.1%).
SUBSAMPLE = 2


def build_model(name, input_shape, num_classes, multipliers=1.0, unit_noise=0.0):
  """`resnetN` (N = 6n+2: the CIFAR ResNetV1) or `resnet50` with bottleneck multipliers.

  `unit_noise` > 0 adds Gaussian noise of that standard deviation after every
  residual unit while training (the noise-regularised teacher of App. B.1).
  """
  if name == "resnet50":
    return models.resnet50_v1(multipliers, input_shape=input_shape, num_classes=num_classes,
                              unit_noise=unit_noise)
  depth = name[len("resnet"):]
  if name.startswith("resnet") and depth.isdigit() and int(depth) >= 8 and int(depth) % 6 == 2:
    return models.resnet_v1(depth=int(depth), multipliers=multipliers,
                            input_shape=input_shape, num_classes=num_classes,
                            unit_noise=unit_noise)
  raise ValueError(f"Unknown model {name!r}: use resnet20, resnet32, resnet44, resnet56 (any "
                   "resnetN with N = 6n+2) or resnet50.")


def _compiled(model, learning_rate, steps):
  schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, steps))
  model.compile(keras.optimizers.Adam(schedule),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  return model


class EpochTracker(keras.callbacks.Callback):
  """Times training epochs, evaluates after each (untimed), stops early on validation accuracy.

  With `calibration` (batches of training inputs), the model's BatchNorm
  statistics are re-estimated before each evaluation (untimed too), so that
  every point of the curve is the accuracy of the weights as they are, as the
  final one is: at Keras's default momentum the moving averages of a model
  trained a few epochs lag its weights, and the curve would understate it.

  Attributes:
    curve: [(training seconds so far, test accuracy)], starting with the
      evaluation before the first epoch when `evaluate_first`.
    best_validation: best validation accuracy seen; the model ends with the
      weights of that epoch.
  """

  def __init__(self, validation, test, patience=None, offset=0.0, evaluate_first=False,
               student=None, state_path=None, calibration=None):
    super().__init__()
    self._calibration = calibration
    self.validation = validation
    self.test = test
    self.patience = patience
    self.seconds = offset
    self.curve = []
    self.best_validation = -1.0
    self._best_weights = None
    self._waited = 0
    self._evaluate_first = evaluate_first
    self._student = student
    self._state_path = state_path
    self._epochs = []  # the epoch of each point of the curve (-1: before training)

  def _scored(self):
    """The model that predicts: the student inside a distiller, else the model itself."""
    return self._student or self.model

  def _evaluate(self, epoch):
    scored = self._scored()
    if self._calibration is not None:
      nd.calibrate_batch_norm(scored, self._calibration)
    validation, test = accuracy(scored, self.validation), accuracy(scored, self.test)
    self.curve.append((self.seconds, test))
    self._epochs.append(epoch)
    if validation > self.best_validation:
      self.best_validation = validation
      self._best_weights = scored.get_weights()
      self._waited = 0
    else:
      self._waited += 1
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
    self.best_validation = state["best_validation"]
    self._waited = state["waited"]
    if os.path.exists(self._state_path + ".npz"):
      with np.load(self._state_path + ".npz", allow_pickle=False) as saved:
        self._best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    self._evaluate_first = False
    return state["stopped"]

  def on_train_begin(self, logs=None):
    if self._evaluate_first:
      self._evaluate(-1)

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
    self._evaluate(epoch)
    if self.patience is not None and self._waited > self.patience:
      self.model.stop_training = True
    if self._state_path:
      self._save(epoch)

  def _save(self, epoch):
    """Keeps what early stopping knows on disk (before the epoch's backup: see on_epoch_begin)."""
    os.makedirs(os.path.dirname(self._state_path), exist_ok=True)
    if self._best_weights is not None:
      with open(self._state_path + ".tmp.npz", "wb") as f:
        np.savez(f, *self._best_weights)
      os.replace(self._state_path + ".tmp.npz", self._state_path + ".npz")
    files.write_json(self._state_path, {
        "curve": self.curve, "epochs": self._epochs, "seconds": self.seconds,
        "best_validation": self.best_validation, "waited": self._waited, "epoch": epoch,
        "stopped": bool(self.model.stop_training)})

  def on_train_end(self, logs=None):
    if self._best_weights is not None:
      self._scored().set_weights(self._best_weights)


def time_to(curve, target):
  """The training seconds of the first point of `curve` at or above `target`, or None."""
  for seconds, value in curve:
    if value >= target:
      return seconds
  return None


class Experiment:
  """One teacher and one dataset; methods train students of a given multiplier.

  Args:
    data: a `keras_nd.data` dataset with `pipeline(split, batch_size,
      training)`, `input_shape`, `num_classes`, `num_train`.
    model: model name for `build_model`.
    workdir: where the teacher, caches and results go.
    epochs: dict of epoch budgets: teacher, ce, kd, nd, ft.
    batch_size, learning_rate, temperature, label_weight, patience, seed:
      training settings shared by all methods.
    max_lookahead: the largest look-ahead any ND run will use (the
      activation cache is built once, for it).
    student_init: how the KD and ND students start (`students.bottleneck`'s
      init): "teacher" (the teacher's strongest inner channels) or "random"
      (the paper's setting). CE students always start from scratch.
    solver: how ND finds the students' weights (`artefacts.SOLVERS`):
      "lstsq" solves each unit's layers exactly from the teacher's
      activations (`keras_nd.reconstruct`) with no gradient step, from an
      online source (a teacher pass per solve, no cache); "gradient" takes
      the ND epochs of Adam steps from the activation cache; "lstsq+gradient"
      both.
    channels: which teacher channels teacher-initialised ND students keep
      with the exact solver: "greedy" (chosen by reconstruction error in the
      solve, `reconstruct(channels="greedy")`) or "l1" (largest L1 norm, as
      gradient ND and KD's students).
    verbose: 0 silent, 1 one line per phase, 2 Keras progress too.
    unit_noise: standard deviation of the Gaussian noise after every residual
      unit of the teacher while it trains (App. B.1); 0, the default, for the
      plain teacher. It enters the teacher key only when non-zero, so plain
      teachers keep their keys (and caches).
    devices: `NeighbourhoodDistiller`'s placement of neighbourhoods on devices
      for ND (None: the default device).
    strategy: a `tf.distribute` strategy for ND (e.g. multi-worker); None for
      the default.
    teacher: your own trained teacher, a tf_keras model or a `.keras` path,
      instead of training one (`model` then names nothing): it must take the
      dataset's images as `data` gives them (`Dataset.with_preprocessing`;
      a teacher that scores far better on the images given the other way is
      refused, naming the preprocessing to pass) and give its classes.
      Students of its architecture replace its `students.narrowable`
      neighbourhoods; CE's (and random KD's) are those students freshly
      initialised.
    trusted: load a `teacher` path with safe mode off (`files.load_model`).

  Attributes:
    students: `{Neighbourhood: student}` of the latest `nd` call, as
      `keras_nd.compose` and `perturb.diagnose` take them (None before).
  """

  def __init__(self, data, model, workdir, epochs, batch_size=128, learning_rate=2e-3,
               nd_learning_rate=2e-3, temperature=2.5, label_weight=1.0, patience=2, seed=0,
               max_lookahead=0, student_init="teacher", verbose=1, unit_noise=0.0, devices=None,
               strategy=None, solver="lstsq", channels="greedy", teacher=None, trusted=False):
    self.data = data
    self.model = model
    self.workdir = workdir
    self.epochs = dict(epochs)
    self.batch_size = batch_size
    self.learning_rate = learning_rate
    self.nd_learning_rate = nd_learning_rate
    self.temperature = temperature
    self.label_weight = label_weight
    self.patience = patience
    self.seed = seed
    if student_init not in ("teacher", "random"):
      raise ValueError(f"student_init must be 'teacher' or 'random'; got {student_init!r}.")
    self.student_init = student_init
    if solver not in artefacts.SOLVERS:
      raise ValueError(f"solver must be one of {list(artefacts.SOLVERS)}; got {solver!r}.")
    if channels not in ("greedy", "l1"):
      raise ValueError(f"channels must be 'greedy' or 'l1'; got {channels!r}.")
    self.solver = solver
    self.channels = channels
    self.verbose = verbose
    self.unit_noise = unit_noise
    self.devices = devices
    self.strategy = strategy
    self.students = None
    self.timings = {}
    self.train = data.pipeline("train", batch_size, training=True, seed=seed)
    self.train_plain = data.pipeline("train", batch_size, training=False)
    self.validation = data.pipeline("validation", 256, training=False)
    self.test = data.pipeline("test", 256, training=False)
    self.steps_per_epoch = -(-data.num_train // batch_size)
    self.max_lookahead = max_lookahead
    self._sources = {}  # lookahead -> (units, ActivationSource)
    files.writable_directory(workdir, "work directory")
    self.given = None if teacher is None else load_teacher(teacher, data, trusted)
    # What the results call the teacher's architecture.
    self.architecture = model if teacher is None else (
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
              "teacher": activations.teacher_fingerprint(self.given)}
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
    args = fit_progress(self.verbose)
    return dict(args, callbacks=args["callbacks"] + list(callbacks))

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
      return self.given
    path = os.path.join(self.workdir, f"teacher-{self.key}.keras")
    with files.locked(path[:-len(".keras")] + ".lock"):
      return self._trained_teacher(path)

  def _trained_teacher(self, path):
    if os.path.exists(path):
      teacher = scorable(files.load_model(path))
      with open(path[:-len(".keras")] + ".json") as f:
        self.timings["teacher"] = json.load(f)["seconds"]
      self.say(f"Reusing the teacher {path}.")
      return teacher
    teacher = _compiled(self._new(1.0, self.unit_noise), self.learning_rate,
                        self.epochs["teacher"] * self.steps_per_epoch)
    self.say(f"Training the teacher ({self.model}, {self.epochs['teacher']} epochs)...")
    start = time.perf_counter()
    teacher.fit(self.train, epochs=self.epochs["teacher"], **self._fit_args())
    self.timings["teacher"] = time.perf_counter() - start
    # Written under a temporary name and renamed, so an interrupted save is never reused.
    files.save_model(path, teacher, dict(self.teacher_spec, seconds=self.timings["teacher"]))
    return teacher

  def ce(self, multiplier):
    """Cross-entropy from scratch: (row, curve)."""
    student = _compiled(self._new(multiplier), self.learning_rate,
                        self.epochs["ce"] * self.steps_per_epoch)
    tracker = EpochTracker(self.validation, self.test, patience=None,
                           calibration=self._calibration())
    student.fit(self.train, epochs=self.epochs["ce"], **self._fit_args(tracker))
    return self._row("ce", multiplier, student, tracker.seconds), tracker.curve

  def fine_tune(self, teacher, student, epochs, learning_rate, offset=0.0, evaluate_first=False,
                name=None):
    """Trains `student` by KD from `teacher`, evaluated every epoch; returns the `EpochTracker`.

    Stops early on validation accuracy and ends with the best epoch's weights;
    `offset` seconds start the tracker's clock (ND's time, for ND+FT). With a
    `name`, training is backed up every epoch in `workdir/backups/<teacher
    key>/<name>` and a killed job resumes from there (never from the backup of
    another teacher's, or another data's, student).
    """
    distiller = nd.KnowledgeDistiller(teacher=teacher, student=student,
                                      temperature=self.temperature,
                                      label_weight=self.label_weight)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate,
                                                      epochs * self.steps_per_epoch)
    distiller.compile(keras.optimizers.Adam(schedule), metrics=["accuracy"])
    backup = os.path.join(self.workdir, "backups", self.key, name) if name else None
    tracker = EpochTracker(self.validation, self.test, patience=self.patience, offset=offset,
                           calibration=self._calibration(),
                           evaluate_first=evaluate_first, student=scorable(student),
                           state_path=backup and os.path.join(backup, "tracker.json"))
    if tracker.resume():  # it had stopped early: only the best weights are wanted
      tracker.set_model(distiller)
      tracker.on_train_end()
      self.say(f"  {name}: finished before the restart ({len(tracker.curve)} evaluations).")
      return tracker
    callbacks = [tracker]  # the tracker saves its state before the epoch's backup
    if backup:
      callbacks.append(keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False))
      if tracker.curve:
        self.say(f"  {name}: resuming after {len(tracker.curve)} evaluations ({backup}).")
    distiller.fit(self.train, epochs=epochs, **self._fit_args(*callbacks))
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

  def _solve_settings(self):
    """`reconstruct`'s settings: channels chosen in the solve, every other position sampled."""
    if self.solver == "gradient":
      return {}
    greedy = self.student_init == "teacher" and self.channels == "greedy"
    return {"channels": "greedy" if greedy else None, "subsample": SUBSAMPLE}

  def _calibrate_steps(self):
    # An exact solve sets the BatchNorm statistics it fits through (gradient steps after it keep
    # them frozen); re-estimating them on the teacher's activations measured slightly worse
    # (composed: 70.1% against 71.0%).
    return 0 if self.solver != "gradient" else self.steps_per_epoch

  def distil(self, teacher, multiplier, lookahead=0, hoods=None):
    """Distils the students of `hoods` (default: every residual unit) that are not finished."""
    units, source = self.source(teacher, lookahead)
    builder = functools.partial(nd.students.bottleneck, k=multiplier, init=self.student_init)
    artefacts.distil(teacher, units if hoods is None else hoods,
                     {self.nd_label(multiplier, lookahead): builder}, source, self.students_dir,
                     lookahead=lookahead, devices=self.devices, strategy=self.strategy,
                     verbose=self.verbose, **self.distil_settings())

  def distil_settings(self):
    """`artefacts.distil`'s settings of this experiment's ND: solver, epochs, rate, seed..."""
    return dict(epochs=self.epochs["nd"], batch_size=self.batch_size,
                learning_rate=self.nd_learning_rate, seed=self.seed,
                calibrate_steps=self._calibrate_steps(), solver=self.solver,
                **self._solve_settings())

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
    student = scorable(nd.compose(teacher, self.students))
    return student, self.timings["cache"] + seconds, seconds, losses

  def nd_and_ft(self, teacher, multiplier, lookahead=0, fine_tune=True, train=True):
    """ND, and ND+FT on top of it: ([rows], ND+FT curve, per-hood losses, ND seconds)."""
    student, seconds, nd_seconds, losses = self.nd(teacher, multiplier, lookahead, train)
    accuracy_nd = accuracy(student, self.test)
    rows = [dict(self._row("nd", multiplier, student, seconds), lookahead=lookahead)]
    curve = [(seconds, accuracy_nd)]
    if fine_tune:
      tracker = self.fine_tune(teacher, student, self.epochs["ft"], self.learning_rate / 4,
                               offset=seconds, evaluate_first=True,
                               name=f"ft-{self.nd_label(multiplier, lookahead)}")
      curve = tracker.curve
      rows.append(dict(self._row("nd_ft", multiplier, student, tracker.seconds),
                       lookahead=lookahead, accuracy_before_ft=accuracy_nd))
    return rows, curve, losses, nd_seconds

  def time_each_neighbourhood(self, teacher, multiplier):
    """Seconds to distil each unit alone for the ND epochs (Table 6), from the same cache."""
    hoods, source = self.source(teacher, 0)
    seconds = {}
    for hood in hoods:
      start = time.perf_counter()
      keras.utils.set_random_seed(self.seed)
      students = {hood: nd.students.bottleneck(hood, multiplier, init=self.student_init)}
      if self.solver != "gradient":
        nd.reconstruct(students, source, errors=False, **self._solve_settings())
      distiller = nd.NeighbourhoodDistiller(students, calibrate_steps=0)  # calibrated below
      if self.solver != "lstsq":
        with (frozen_batch_norms(students.values()) if self.solver != "gradient"
              else contextlib.nullcontext()):  # as artefacts.distil trains after a solve
          distiller.compile(keras.optimizers.Adam(self.nd_learning_rate))
          distiller.fit(source.dataset(self.batch_size, seed=self.seed),
                        epochs=self.epochs["nd"], verbose=0)
      if self._calibrate_steps():
        distiller.calibrate_batch_norm(source.dataset(self.batch_size, seed=self.seed + 1),
                                       steps=self._calibrate_steps())
      seconds[hood.name] = time.perf_counter() - start
    return seconds

  def _row(self, method, multiplier, student, seconds):
    row = {"method": method, "multiplier": multiplier, "params": student.count_params(),
           "accuracy": accuracy(scorable(student), self.test), "seconds": seconds}
    self.say(f"  {method:<6} k={multiplier:<5g} params={row['params']:<8} "
              f"accuracy={row['accuracy']:.4f}  {seconds:.1f}s")
    return row


def from_scratch(teacher, units, multiplier):
  """The teacher's architecture with `units` narrowed by `multiplier`, every weight initialised
  afresh (a student to train from scratch, for a teacher that is not one of `build_model`'s)."""
  student = nd.compose(teacher, {h: nd.students.bottleneck(h, multiplier, init="random")
                                 for h in units})
  return keras.models.clone_model(student)


def load_teacher(teacher, data, trusted=False, split=None):
  """A teacher given as a model or a `.keras` path, checked against the data it will see (its
  `split`, by default the validation split if there is one, else the test split).

  Raises:
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
  teacher = scorable(teacher)
  split = split or ("validation" if data.num_validation else "test")
  other = "none" if data.preprocessing == "standardize" else "standardize"
  scores = {way: accuracy(teacher, data.with_preprocessing(way).pipeline(split, 256))
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


_PREPROCESSING_LAYERS = tuple(getattr(keras.layers, name) for name in (
    "Rescaling", "Normalization") if hasattr(keras.layers, name))


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


def run(data, workdir, model="resnet20", multipliers=(0.5,), methods=METHODS, lookahead=0,
        ablation=False, time_neighbourhoods=False, epochs=None, verbose=1, neighbourhoods=None,
        shard=None, compose=False, **settings):
  """Runs the experiment and writes `workdir/distill_results.json`.

  Args:
    data: a `keras_nd.data` dataset (see `Experiment`).
    workdir: output directory (the teacher is reused from it).
    model: `resnet20`, ..., `resnet50`.
    multipliers: bottleneck multipliers k of the students.
    methods: a subset of ("ce", "kd", "nd", "nd_ft").
    lookahead: look-ahead depth of ND (Eq. 5).
    ablation: also run ND and ND+FT with 0 and 2-neighbourhood look-ahead
      (Table 5).
    time_neighbourhoods: also time each neighbourhood distilled alone
      (Table 6's per-neighbourhood and sequential rows).
    epochs: dict overriding the default epoch budgets (teacher, ce, kd, nd, ft).
    verbose: 0 silent, 1 one line per phase, 2 Keras progress bars too.
    neighbourhoods: distil only these residual units (indices in `split`
      order, or names) for every multiplier and look-ahead, and stop: no
      other method, no distill_results.json (a job of a split run).
    shard: "i/n": distil only every n-th residual unit from the i-th, and
      stop (as `neighbourhoods`).
    compose: train no ND student: assemble them from the artefacts the jobs
      wrote, and refuse (FileNotFoundError naming them) if any is missing.
    **settings: passed to `Experiment` (batch_size, learning_rate, devices,
      strategy, ...). With a strategy the run is a distillation job (of the
      given neighbourhoods, or all) and stops there.

  Returns:
    The results dict: {"config", "teacher", "rows", "timings", "speedup",
    "curves"}; for a job of a split run, {"distilled": [names],
    "directory": where the students are}.
  """
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f"Unknown methods {unknown or list(methods)}; choose from {list(METHODS)}.")
  for k in multipliers:
    if not 0 < k <= 1:
      raise ValueError(f"Multipliers must be in (0, 1]; got {k}.")
  if not data.num_validation:
    raise ValueError(f"Dataset {data.name!r} has no validation split, which early stopping "
                     "needs: get it with keras_nd.data.get(..., num_validation=N).")
  budget = dict(teacher=15, ce=6, kd=6, nd=3, ft=3)
  budget.update(epochs or {})
  experiment = Experiment(data, model, workdir, budget, verbose=verbose,
                          max_lookahead=max(lookahead, 2 if ablation else 0), **settings)
  if experiment.solver == "lstsq" and (lookahead or ablation):
    raise ValueError("Look-ahead shapes the loss of gradient steps; the exact solver alone "
                     "(solver='lstsq') has none: use solver='gradient' or 'lstsq+gradient' for "
                     "look-ahead and the ablation.")
  config = dict(dataset=data.name, model=experiment.architecture, multipliers=list(multipliers),
                methods=list(methods), lookahead=lookahead, ablation=ablation, epochs=budget,
                batch_size=experiment.batch_size, learning_rate=experiment.learning_rate,
                nd_learning_rate=experiment.nd_learning_rate,
                temperature=experiment.temperature, label_weight=experiment.label_weight,
                patience=experiment.patience, seed=experiment.seed,
                student_init=experiment.student_init, solver=experiment.solver,
                channels=experiment.channels, num_train=data.num_train,
                num_validation=data.num_validation)
  teacher = experiment.teacher()
  variants = sorted({lookahead, 2} if ablation else {lookahead})
  if neighbourhoods is not None or shard is not None or experiment.strategy is not None:
    if compose:
      raise ValueError("A job distils some neighbourhoods or composes them all, not both.")
    units = experiment.units(teacher)
    mine = units if neighbourhoods is None and shard is None else select(units, neighbourhoods,
                                                                         shard)
    experiment.say(f"Distilling {[h.name for h in mine]} into {experiment.students_dir}.")
    for k in multipliers:
      for la in variants:
        experiment.distil(teacher, k, la, hoods=mine)
    return {"distilled": [h.name for h in mine], "directory": experiment.students_dir}
  teacher_row = {"params": teacher.count_params(), "accuracy": accuracy(teacher, experiment.test)}
  experiment.say(f"  teacher params={teacher_row['params']} "
                  f"accuracy={teacher_row['accuracy']:.4f}")
  rows, curves, speedup, timings = [], {}, {}, {"teacher": experiment.timings["teacher"]}
  for k in multipliers:
    if "ce" in methods:
      row, curves[f"ce@{k:g}"] = experiment.ce(k)
      rows.append(row)
    if "kd" in methods:
      row, curves[f"kd@{k:g}"] = experiment.kd(teacher, k)
      rows.append(row)
      timings[f"kd@{k:g}"] = row["seconds"]
    for la in variants:
      if "nd" in methods or "nd_ft" in methods:
        nd_rows, curve, losses, nd_seconds = experiment.nd_and_ft(
            teacher, k, la, fine_tune="nd_ft" in methods, train=not compose)
        rows.extend(r for r in nd_rows if r["method"] in methods)
        curves[f"nd_ft@{k:g}/lookahead{la}"] = curve
        timings[f"cache@{k:g}"] = experiment.timings["cache"]
        timings[f"nd_all_fused@{k:g}/lookahead{la}"] = nd_seconds
        timings[f"nd_losses@{k:g}/lookahead{la}"] = losses
        if "nd_ft" in methods:
          timings[f"ft@{k:g}/lookahead{la}"] = nd_rows[-1]["seconds"] - nd_rows[0]["seconds"]
        if "kd" in methods and "nd_ft" in methods:
          speedup[f"{k:g}/lookahead{la}"] = _speedup(curves[f"kd@{k:g}"], curve)
    if time_neighbourhoods and ("nd" in methods or "nd_ft" in methods):
      each = experiment.time_each_neighbourhood(teacher, k)
      timings[f"nd_each@{k:g}"] = each
      timings[f"nd_all_sequential@{k:g}"] = sum(each.values())
  results = {"config": config, "teacher": teacher_row, "rows": rows, "timings": timings,
             "speedup": speedup, "curves": curves}
  write_results(workdir, results, "distill")
  # The run is complete: a later one starts KD and fine-tuning afresh (ND students are kept).
  shutil.rmtree(os.path.join(workdir, "backups"), ignore_errors=True)
  return results


def _speedup(kd_curve, nd_ft_curve):
  """KD's time to its best accuracy minus 0.5 points over ND+FT's time to the same target."""
  target = max(value for _, value in kd_curve) - 0.005
  kd_time, nd_ft_time = time_to(kd_curve, target), time_to(nd_ft_curve, target)
  return {"target": target, "kd_seconds": kd_time, "nd_ft_seconds": nd_ft_time,
          "ratio": kd_time / nd_ft_time if nd_ft_time else None}


def table(results):
  """The results as text: a Table 1-shaped accuracy table, then timings (Table 6) and speed-ups."""
  rows = results["rows"]
  ks = results["config"]["multipliers"]
  teacher = results["teacher"]
  width = 12
  params = {r["multiplier"]: r["params"] for r in rows}
  lines = ["Test accuracy (%) by bottleneck multiplier k (Table 1)",
           f"{'k':<22}" + "".join(f"{k:>{width}g}" for k in ks),
           f"{'params':<22}" + "".join(f"{params.get(k, 0):>{width},}" for k in ks),
           f"{'teacher':<22}" + f"{100 * teacher['accuracy']:>{width}.2f}" +
           f"   ({teacher['params']:,} params)"]
  labels = {"ce": "CE", "kd": "KD", "nd": "ND", "nd_ft": "ND+FT"}
  variants = sorted({(r["method"], r.get("lookahead", 0)) for r in rows},
                    key=lambda v: (METHODS.index(v[0]), v[1]))
  for method, la in variants:
    label = labels[method] + (f" (look-ahead {la})" if la else "")
    cells = []
    for k in ks:
      match = [r for r in rows if r["method"] == method and r.get("lookahead", 0) == la and
               r["multiplier"] == k]
      cells.append(f"{100 * match[0]['accuracy']:>{width}.2f}" if match else f"{'-':>{width}}")
    lines.append(f"{label:<22}" + "".join(cells))
    if method == "nd_ft":
      before = [r for r in rows if r["method"] == "nd_ft" and r.get("lookahead", 0) == la]
      lines.append(f"{'  before FT':<22}" + "".join(
          f"{100 * r['accuracy_before_ft']:>{width}.2f}" for r in before))
  lines.append("")
  lines.append("Seconds (Table 6)")
  for name, value in results["timings"].items():
    if isinstance(value, dict):
      if name.startswith("nd_each"):
        values = list(value.values())
        lines.append(f"  {name:<32} mean {sum(values) / len(values):.1f} per neighbourhood "
                     f"({len(values)} neighbourhoods)")
      continue
    lines.append(f"  {name:<32} {value:.1f}")
  for key, s in results["speedup"].items():
    if s["ratio"] is None:
      lines.append(f"Time-to-accuracy speed-up k={key}: ND+FT never reached KD's best - 0.5 "
                   f"points ({100 * s['target']:.2f}%)")
    else:
      lines.append(f"Time-to-accuracy speed-up k={key}: {s['ratio']:.2f}x (target "
                   f"{100 * s['target']:.2f}%: KD {s['kd_seconds']:.1f}s, ND+FT "
                   f"{s['nd_ft_seconds']:.1f}s incl. cache and ND)")
  return "\n".join(lines)
