"""The paper's data-free experiment (Table 3b): students distilled from Gaussian noise alone.

For each bottleneck multiplier k:

  ce:      reference WITH data: the student trained from scratch by
           cross-entropy on the training split (`harness.Experiment.ce`);
  gnd:     G-ND: every residual unit distilled from Gaussian-noise inputs
           (`ActivationSource.from_noise`), then composed, no fine-tuning;
  gnd_ft:  G-ND, then fine-tuned by knowledge distillation on Gaussian-noise
           images (the teacher's soft labels on noise, no labels);
  gnkd:    GN-KD: the whole student trained end to end by knowledge
           distillation on Gaussian-noise images, the baseline the paper
           shows failing.

The data-free methods read nothing of the dataset but its test split, for
evaluation: given `teacher` (a model or a `.keras` path) and without "ce",
the training split is never opened (tested with a dataset that raises when
read). Without `teacher`, one is trained on the training split, or reused
from `workdir` (`harness.Experiment.teacher`): the teacher is trained on
data, the students are not.

Noise. Images are standardised per channel by the data pipeline, so
Gaussian-noise images are N(0, 1) in every channel. The inputs of each
residual unit are drawn either from N(0, 1) (noise="standard", the paper's
choice) or from per-channel statistics read from the teacher's BatchNorm
layers (noise="teacher", `activations.noise_statistics`): the activations a
unit sees are not standard normal (after a ReLU they are non-negative, with
the scale the BatchNorm sets), and matching their first two moments puts the
noise where the unit works on real data.

BatchNorm. The students' BatchNorm statistics are estimated on noise that
matches the teacher's statistics (G-ND), but noise images do not make a real
image's activations: while fine-tuning or training on noise images (G-ND+FT,
GN-KD) the students' BatchNorm layers are frozen (inference mode), so they
keep the statistics they had instead of learning those of noise.
"""

import contextlib
import dataclasses
import time

import keras_nd as nd
from keras_nd import _checks, files, metrics
from keras_nd._keras import keras, tf
from keras_nd.batch_norm import frozen_batch_norms
from keras_nd.experiments import exports
from keras_nd.experiments.board import Board, accuracies
from keras_nd.experiments.catalogue import from_scratch
from keras_nd.experiments.common import (
  Settings,
  complete_runs,
  data_summary,
  fit_progress,
  write_results,
)
from keras_nd.experiments.harness import Experiment
from keras_nd.experiments.teacher import load_teacher
from keras_nd.training import cosine_adam

__all__ = ["Config", "DataFree", "LABELS", "METHODS", "MULTIPLIERS", "NOISES", "noise_images",
           "run", "table"]

METHODS = ("ce", "gnd", "gnd_ft", "gnkd")
MULTIPLIERS = (1.0, 0.9, 0.75, 0.5)
NOISES = ("teacher", "standard")
LABELS = {"ce": "CE (with data)", "gnd": "G-ND", "gnd_ft": "G-ND+FT", "gnkd": "GN-KD"}
_EPOCHS = {"teacher": 15, "ce": 6, "gnd": 10, "ft": 3, "gnkd": 10}


def noise_images(input_shape, batch_size, steps, seed):
  """A dataset of `steps` batches of N(0, 1) images, a function of (seed, step)."""
  shape = [batch_size, *input_shape]
  return tf.data.Dataset.range(steps).map(
      lambda step: tf.random.stateless_normal(shape, seed=tf.stack([tf.cast(seed, tf.int64),
                                                                    step])))


@dataclasses.dataclass
class Config(Settings):
  """The settings of a run (written, as they are, under "config" in data_free_results.json).

  Attributes:
    multipliers: bottleneck multipliers k, each in (0, 1].
    methods: a subset of ("ce", "gnd", "gnd_ft", "gnkd").
    noise: "teacher" or "standard" (see the module docstring).
    student_init: "random" (the paper's setting) or "teacher" (the teacher's
      strongest channels: at k = 1 the student IS the teacher).
    epochs: epoch budgets over the defaults: teacher 15, ce 6, gnd 10, ft 3,
      gnkd 10.
    steps_per_epoch: noise batches per epoch (of G-ND, its fine-tuning and
      GN-KD alike).
    solver: how G-ND finds its students (`artefacts.SOLVERS`; see
      `DataFree.gnd`).
    The rest: the `Settings` every experiment has; `teacher` None trains one
      on the training split (or reuses it from the work directory).

  Raises:
    ValueError: naming the bad setting.
  """
  multipliers: tuple = MULTIPLIERS
  methods: tuple = METHODS
  noise: str = "teacher"
  student_init: str = "random"
  epochs: dict = dataclasses.field(default_factory=dict)
  steps_per_epoch: int = 100
  solver: str = "gradient"

  def __post_init__(self):
    super().__post_init__()
    complete_runs(self, METHODS, _EPOCHS)
    if self.noise not in NOISES:
      raise ValueError(f"noise must be one of {list(NOISES)}; got {self.noise!r}.")
    _checks.integer(self.steps_per_epoch, "steps_per_epoch")


class DataFree:
  """One teacher; methods train students of a given multiplier without data.

  Args:
    teacher: the trained teacher.
    input_shape, num_classes: of the teacher.
    test: the test split's batches of (image, label), for evaluation only.
    config: the run's `Config` (its epochs, noise, students and training
      settings).
    workdir: where its final students are exported (`config.export`; None
      with no export).

  Attributes:
    board: the `board.Board` of `config.tensorboard`, where every phase logs.
  """

  def __init__(self, teacher, input_shape, num_classes, test, config, workdir=None):
    self.teacher = teacher
    self.workdir = workdir
    self.input_shape = tuple(input_shape)
    self.num_classes = num_classes
    self.test = test
    self.config = config
    self.board = Board(config.tensorboard)
    self.units, note = nd.students.narrowable(teacher)
    if note:
      self.say(f"Neighbourhoods: {note}.")

  def say(self, text):
    if self.config.verbose:
      print(text, flush=True)

  def students(self, multiplier):
    """The students of every unit at `multiplier`, as `student_init` starts them."""
    keras.utils.set_random_seed(self.config.seed)
    return {h: nd.students.bottleneck(h, multiplier, init=self.config.student_init)
            for h in self.units}

  def _source(self, seed):
    return nd.ActivationSource.from_noise(
        self.teacher, self.units, self.config.steps_per_epoch, seed=seed,
        mean="teacher" if self.config.noise == "teacher" else 0.0)

  def _noise(self, seed):
    """Batches of every unit's noise inputs and the teacher's outputs for them."""
    return self._source(seed).dataset(self.config.batch_size)

  def gnd(self, multiplier):
    """G-ND: (composed student, seconds, {unit: final loss}).

    With solver="lstsq" the students are solved exactly from one epoch of
    noise (`keras_nd.reconstruct`, the teacher's channels chosen greedily
    for teacher-initialised students); "lstsq+gradient" then takes the G-ND
    epochs from there, BatchNorms frozen.
    """
    students = self.students(multiplier)
    distiller = nd.NeighbourhoodDistiller(students, calibrate_steps=0)  # on fresh noise, below
    steps = self.config.epochs["gnd"] * self.config.steps_per_epoch
    phase = f"gnd-k{multiplier:g}"
    start = time.perf_counter()
    report = None
    if self.config.solver != "gradient":
      report = nd.reconstruct(students, self._source(self.config.seed), errors=False,
                              channels="greedy" if self.config.student_init == "teacher" else None)
    history = None
    # Frozen before compile, which fixes what fit trains.
    with (frozen_batch_norms(students.values()) if self.config.solver == "lstsq+gradient"
          else contextlib.nullcontext()):
      distiller.compile(cosine_adam(self.config.nd_learning_rate, steps))
      if self.config.solver != "lstsq":
        history = distiller.fit(self._noise(self.config.seed), epochs=self.config.epochs["gnd"],
                                **fit_progress(self.config.verbose, *self.board.callbacks(phase)))
    if self.config.solver == "gradient":
      # Fresh noise (another seed) for the statistics, as for data (see calibrate_batch_norm).
      distiller.calibrate_batch_norm(self._noise(self.config.seed + 1),
                                     steps=self.config.steps_per_epoch)
    seconds = time.perf_counter() - start
    if report is not None:
      self.board.solve(phase, report)
    if history is not None:
      losses = {h.name: history.history[f"{h.name}_loss"][-1] for h in self.units}
    else:  # measured once on fresh noise, not counted
      measured = distiller.evaluate(self._noise(self.config.seed + 1),
                                    verbose=0, return_dict=True)
      losses = {h.name: float(measured[f"{h.name}_loss"]) for h in self.units}
    return nd.compose(self.teacher, distiller.students), seconds, losses

  def kd_on_noise(self, student, epochs, learning_rate, phase=None):
    """Trains `student` by KD from the teacher on noise images, BatchNorm frozen; seconds. It
    logs to the TensorBoard run `phase` (None: none)."""
    with frozen_batch_norms([student]):  # inference mode: keeps their statistics
      distiller = nd.KnowledgeDistiller(teacher=self.teacher, student=student,
                                        temperature=self.config.temperature, label_weight=0.0)
      distiller.compile(cosine_adam(learning_rate, epochs * self.config.steps_per_epoch))
      images = noise_images(self.input_shape, self.config.batch_size,
                            self.config.steps_per_epoch, self.config.seed + 2)
      start = time.perf_counter()
      distiller.fit(images, epochs=epochs,
                    **fit_progress(self.config.verbose, *self.board.callbacks(phase)))
    return time.perf_counter() - start

  def gnkd(self, multiplier):
    """GN-KD: (student, seconds). From scratch, or the teacher's channels as G-ND starts."""
    if self.config.student_init == "random":
      keras.utils.set_random_seed(self.config.seed)
      student = from_scratch(self.teacher, self.units, multiplier)
      learning_rate = self.config.learning_rate
    else:
      student = nd.compose(self.teacher, self.students(multiplier))
      learning_rate = self.config.learning_rate / 4
    return student, self.kd_on_noise(student, self.config.epochs["gnkd"], learning_rate,
                                     phase=f"gnkd-k{multiplier:g}")

  def keep(self, name, model):
    """Writes a final `model` of the run in its export formats (`exports.export`)."""
    exports.export(model, self.workdir, name, self.config.export)

  def row(self, method, multiplier, student, seconds, **extra):
    self.keep(f"{method}-k{multiplier:g}", student)
    row = dict({"method": method, "multiplier": multiplier, "params": student.count_params(),
                "accuracy": metrics.accuracy(student, self.test), "seconds": seconds}, **extra)
    self.say(f"  {method:<6} k={multiplier:<5g} params={row['params']:<8} "
             f"accuracy={row['accuracy']:.4f}  {seconds:.1f}s")
    return row


def run(data, workdir, config=None):
  """Runs the experiment and writes `workdir/data_free_results.json`.

  Args:
    data: a `keras_nd.data` dataset. The data-free methods use its test split
      only; "ce" and training a teacher use its training split (and
      validation split, for the teacher's shared settings).
    workdir: output directory.
    config: a `Config` (default: `Config()`).

  Returns:
    {"config", "data", "teacher", "rows": [{"method", "multiplier", "params",
    "accuracy", "seconds"}], "timings"}.
  """
  config = config or Config()
  methods, budget, steps_per_epoch = config.methods, config.epochs, config.steps_per_epoch
  experiment = None
  timings = {}
  given = config.teacher is not None
  if not given or "ce" in methods:
    if not data.num_validation:
      raise ValueError(f"Dataset {data.name!r} has no validation split, which training the "
                       "teacher needs: get it with keras_nd.data.get(..., num_validation=N).")
    experiment = Experiment(data, workdir, config, budget)
  if experiment is not None:
    teacher = experiment.teacher()
    if not given:
      timings["teacher"] = experiment.timings["teacher"]
  else:
    teacher = load_teacher(config.teacher, data, config.trusted, split="test")
    files.writable_directory(workdir, "work directory")
  test = experiment.test if experiment else data.pipeline("test", 256, training=False)
  runner = DataFree(teacher, data.input_shape, data.num_classes, test, config, workdir)
  if experiment is None:  # else the experiment wrote it
    runner.keep("teacher", teacher)
  architecture = experiment.architecture if experiment else f"given:{config.teacher}"
  teacher_row = {"architecture": architecture, "params": teacher.count_params(),
                 "accuracy": metrics.accuracy(teacher, test)}
  runner.say(f"  teacher params={teacher_row['params']} accuracy={teacher_row['accuracy']:.4f}")
  rows = []
  for k in config.multipliers:
    if "ce" in methods:
      runner.say(f"CE with data, k={k:g}: {budget['ce']} epochs...")
      rows.append(experiment.ce(k)[0])
    if "gnd" in methods or "gnd_ft" in methods:
      runner.say(f"G-ND, k={k:g}: {budget['gnd']} epochs of {steps_per_epoch} noise batches...")
      student, seconds, losses = runner.gnd(k)
      timings[f"gnd@{k:g}"] = seconds
      timings[f"gnd_losses@{k:g}"] = losses
      row = runner.row("gnd", k, student, seconds)
      if "gnd" in methods:
        rows.append(row)
      if "gnd_ft" in methods:
        runner.say(f"G-ND+FT, k={k:g}: KD on noise images, {budget['ft']} epochs...")
        ft_seconds = runner.kd_on_noise(student, budget["ft"], config.learning_rate / 4,
                                        phase=f"gnd_ft-k{k:g}")
        timings[f"ft@{k:g}"] = ft_seconds
        rows.append(runner.row("gnd_ft", k, student, seconds + ft_seconds,
                               accuracy_before_ft=row["accuracy"]))
    if "gnkd" in methods:
      runner.say(f"GN-KD, k={k:g}: KD on noise images, {budget['gnkd']} epochs...")
      student, seconds = runner.gnkd(k)
      timings[f"gnkd@{k:g}"] = seconds
      rows.append(runner.row("gnkd", k, student, seconds))
  results = {"config": dataclasses.asdict(config), "data": data_summary(data),
             "teacher": teacher_row, "rows": rows, "timings": timings}
  runner.board.summary({"timings": timings,
                        "accuracy": accuracies(teacher_row["accuracy"], rows, "multiplier")})
  write_results(workdir, results, "data_free")
  return results


def table(results):
  """The results as text, shaped like the paper's Table 3b."""
  ks = results["config"]["multipliers"]
  rows = results["rows"]
  width = 10
  params = {r["multiplier"]: r["params"] for r in rows}
  lines = ["Test accuracy (%) without training data, by bottleneck multiplier k (Table 3b)",
           f"noise: {results['config']['noise']}, students: {results['config']['student_init']} "
           "init",
           f"{'k':<18}" + "".join(f"{k:>{width}g}" for k in ks),
           f"{'params':<18}" + "".join(f"{params.get(k, 0):>{width},}" for k in ks),
           f"{'teacher':<18}{100 * results['teacher']['accuracy']:>{width}.2f}"]
  for method in METHODS:
    if not any(r["method"] == method for r in rows):
      continue
    cells = []
    for k in ks:
      match = [r for r in rows if r["method"] == method and r["multiplier"] == k]
      cells.append(f"{100 * match[0]['accuracy']:>{width}.2f}" if match else f"{'-':>{width}}")
    lines.append(f"{LABELS[method]:<18}" + "".join(cells))
  return "\n".join(lines)
