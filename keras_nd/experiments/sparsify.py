"""The paper's sparsification experiment (Table 3a): sparse students without fine-tuning.

Every convolution and Dense layer of a trained teacher is its own
neighbourhood (`keras_nd.split_layers`). For each target sparsity:

  nd:  each layer's student starts from the teacher layer and is pruned by
       magnitude (tfmot, polynomial ramp over the first half of its steps,
       held for the second) while learning the layer's output from the
       teacher's activations; all layers at once, from one activation cache;
       then composed, and the composed student's BatchNorm statistics
       re-estimated on the training images (`keras_nd.calibrate_batch_norm`:
       the BatchNorm after each pruned convolution is the teacher's, with the
       teacher's statistics; no weight changes). No fine-tuning.
  kd:  the whole student, started from the teacher, pruned with the same
       schedule while trained end to end by knowledge distillation.

As in the paper the first convolution and the classifier stay dense. The
teacher is trained to convergence (60 epochs by default: a teacher trained
for less ends under the KD students, which learn from the labels too). Both
methods train for the same number of epochs; accuracy is on the test split,
the measured sparsity is that of the composed, stripped student's pruned
kernels, and the seconds are training time (ND's include the cache build).
"""

import dataclasses
import os
import time

import keras_nd as nd
from keras_nd import _checks, layer_types, least_squares, metrics, sparsity
from keras_nd._keras import keras
from keras_nd.experiments.board import accuracies
from keras_nd.experiments.common import Settings, checked_methods, data_summary, write_results
from keras_nd.experiments.harness import Experiment
from keras_nd.training import cosine_adam

__all__ = ["Config", "EPOCHS", "METHODS", "RATES", "SPARSITIES", "run", "table"]

METHODS = ("nd", "kd")
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Epoch budgets: a teacher trained to convergence (one trained for 15 epochs ends under the KD
# students, which learn from the labels too).
EPOCHS = {"teacher": 60, "nd": 3, "kd": 3}
# Peak learning rates: of 2e-3, 5e-3, 1e-2 and 2e-2, the best for each method (see the README).
RATES = {"nd": 1e-2, "kd": 5e-3}


@dataclasses.dataclass
class Config(Settings):
  """The settings of a run (written, as they are, under "config" in sparsify_results.json).

  Attributes:
    sparsities: target sparsities, each in [0, 1); with `m_by_n`, (m / n,).
    methods: a subset of ("nd", "kd").
    epochs: epoch budgets over `EPOCHS`: teacher (60), nd (3), kd (3).
    skip: names of the layers kept dense; None keeps the teacher's first and
      last prunable layers dense, as the paper (for the ResNets,
      "stem_conv" and "head_logits").
    calibrate: re-estimate the ND student's BatchNorm statistics after
      composing (its rows keep the accuracy before, `accuracy_uncalibrated`).
    rates: peak learning rates (Adam, cosine decay) of the sparse students
      over `RATES`: nd 1e-2 and kd 5e-3 (of 2e-3, 5e-3, 1e-2 and 2e-2, the
      best for each method on the embedded dataset; see the README).
    solver: how ND's sparse students are found: "gradient" (tfmot magnitude
      pruning while each layer learns, from the activation cache) or "lstsq"
      (`reconstruct(sparsity=...)`: the teacher's entries of least magnitude
      zeroed, exactly the target, each output's surviving weights solved
      exactly, from one online pass; no gradient step).
    mask: with solver="lstsq", which entries are zeroed: "magnitude" or
      "obs" (`reconstruct`'s mask).
    m_by_n: (m, n), e.g. (2, 4): structured sparsity instead of
      `sparsities`, m zeros in every n consecutive input-channel weights of
      every pruned layer, for ND and KD alike (tfmot's `sparsity_m_by_n`;
      `reconstruct`'s `m_by_n`); the rows are those of sparsity m / n.
    The rest: the `Settings` every experiment has (`learning_rate` is the
      teacher's).

  Raises:
    ValueError: naming the bad setting.
  """
  sparsities: tuple = SPARSITIES
  methods: tuple = METHODS
  epochs: dict = dataclasses.field(default_factory=dict)
  skip: tuple = None
  calibrate: bool = True
  rates: dict = dataclasses.field(default_factory=dict)
  solver: str = "gradient"
  mask: str = "magnitude"
  m_by_n: tuple = None

  def __post_init__(self):
    super().__post_init__()
    self.methods = checked_methods(self.methods, METHODS)
    self.epochs = dict(EPOCHS, **self.epochs)
    for s in self.sparsities:
      if not _checks.is_number(s) or not 0 <= s < 1:
        raise ValueError(f"Sparsities must be in [0, 1); got {s!r}.")
    if self.m_by_n is not None:
      m_by_n = least_squares.check_m_by_n(self.m_by_n)
      self.m_by_n = m_by_n
      self.sparsities = (m_by_n[0] / m_by_n[1],)
    self.sparsities = tuple(self.sparsities)
    if self.solver not in ("gradient", "lstsq"):
      raise ValueError(f"solver must be 'gradient' or 'lstsq' for sparse students; got "
                       f"{self.solver!r}.")
    self.rates = dict(RATES, **self.rates)
    for method, rate in self.rates.items():
      if method not in METHODS or not _checks.is_number(rate) or not rate > 0:
        raise ValueError(f"rates must map 'nd' and 'kd' to positive learning rates; got "
                         f"{method!r}: {rate!r}.")
    if self.skip is not None:
      self.skip = tuple(self.skip)
      if not all(isinstance(name, str) for name in self.skip):
        raise ValueError(f"skip must be names of layers; got {self.skip!r}.")


def run(data, workdir, config=None):
  """Runs the experiment and writes `workdir/sparsify_results.json`.

  Args:
    data: a `keras_nd.data` dataset with a validation split (see
      `harness.Experiment`, whose teacher this reuses).
    workdir: output directory (the teacher is reused from it).
    config: a `Config` (default: `Config()`).

  Returns:
    {"config", "data", "teacher", "pruning": {"skip", "layers", "nd_steps",
    "kd_steps"}, "rows": [{"method", "sparsity", "accuracy", "seconds",
    "measured_sparsity", "compressed_bytes"[, "accuracy_uncalibrated"]}],
    "timings"}.
  """
  config = config or Config()
  if not data.num_validation:
    raise ValueError(f"Dataset {data.name!r} has no validation split; get it with "
                     "keras_nd.data.get(..., num_validation=N) (the teacher is trained by "
                     "harness.Experiment, which needs one).")
  methods, solver, m_by_n, rates = config.methods, config.solver, config.m_by_n, config.rates
  budget = config.epochs
  experiment = Experiment(data, workdir, config, budget)
  say = experiment.say
  teacher = experiment.teacher()
  test = experiment.test
  teacher_row = {"architecture": experiment.architecture, "params": teacher.count_params(),
                 "accuracy": metrics.accuracy(teacher, test),
                 "compressed_bytes": sparsity.compressed_size(teacher)}
  say(f"  teacher params={teacher_row['params']} accuracy={teacher_row['accuracy']:.4f}")
  hoods = nd.split_layers(teacher, layer_types.PRUNABLE)
  skip = config.skip
  if skip is None:
    skip = (hoods[0].nodes[0].layer.name, hoods[-1].nodes[0].layer.name)
  trained = sparsity.not_skipped(hoods, skip)
  timings = {"teacher": experiment.timings["teacher"]}
  rows = []
  source = None
  if "nd" in methods and solver == "lstsq":  # one pass per sparsity: online, no cache
    source = nd.ActivationSource(teacher, trained, experiment.train_plain)
    timings["cache"] = 0.0
  elif "nd" in methods:
    start = time.perf_counter()
    source = nd.ActivationSource(teacher, trained, experiment.train_plain,
                                 cache_dir=os.path.join(workdir, f"cache-layers-{experiment.key}"),
                                 verbose=int(config.verbose > 1))
    timings["cache"] = source.manifest.get("build_seconds", time.perf_counter() - start)
  nd_steps = budget["nd"] * -(-((source and source.num_examples) or data.num_train) //
                              experiment.batch_size)
  kd_steps = budget["kd"] * experiment.steps_per_epoch
  fit_verbose = 2 if config.verbose > 1 else 0
  board = experiment.board
  for target in config.sparsities:
    if "nd" in methods and solver == "lstsq":
      students = {h: nd.students.clone(h) for h in trained}
      start = time.perf_counter()
      report = nd.reconstruct(students, source, errors=False, mask=config.mask,
                              **({"m_by_n": m_by_n} if m_by_n else {"sparsity": target}))
      seconds = time.perf_counter() - start
      board.solve(f"nd-s{target:g}", report)
      student = nd.compose(teacher, students)
    elif "nd" in methods:
      keras.utils.set_random_seed(experiment.seed)
      distiller = nd.NeighbourhoodDistiller(
          sparsity.sparse_students(trained, target, steps=nd_steps, m_by_n=m_by_n))
      distiller.compile(cosine_adam(rates["nd"], nd_steps))
      start = time.perf_counter()
      distiller.fit(source.dataset(experiment.batch_size, seed=experiment.seed),
                    epochs=budget["nd"], verbose=fit_verbose,
                    callbacks=board.callbacks(f"nd-s{target:g}"))
      seconds = time.perf_counter() - start
      student = nd.compose(teacher, distiller.students)
    if "nd" in methods:
      extra = {}
      if config.calibrate:
        extra["accuracy_uncalibrated"] = metrics.accuracy(student, test)  # not timed
        start = time.perf_counter()
        nd.calibrate_batch_norm(student, experiment.train_plain,
                                steps=experiment.steps_per_epoch)
        seconds += time.perf_counter() - start
      timings[f"nd@{target:g}"] = seconds
      rows.append(dict(_row("nd", target, student, test, seconds + timings["cache"], say),
                       **extra))
      experiment.keep(f"nd-{_name(target, m_by_n)}", student)
    if "kd" in methods:
      keras.utils.set_random_seed(experiment.seed)
      student = sparsity.prune(teacher, target, steps=kd_steps, m_by_n=m_by_n, skip=skip)
      kd = nd.KnowledgeDistiller(teacher=teacher, student=student,
                                 temperature=experiment.temperature,
                                 label_weight=experiment.label_weight)
      kd.compile(cosine_adam(rates["kd"], kd_steps), metrics=["accuracy"])
      start = time.perf_counter()
      kd.fit(experiment.train, epochs=budget["kd"], verbose=fit_verbose,
             callbacks=board.callbacks(f"kd-s{target:g}"))
      seconds = time.perf_counter() - start
      timings[f"kd@{target:g}"] = seconds
      student = sparsity.strip(student)
      rows.append(_row("kd", target, student, test, seconds, say))
      experiment.keep(f"kd-{_name(target, m_by_n)}", student)
  pruning = {"skip": [str(s) for s in skip], "layers": [h.name for h in trained],
             "nd_steps": nd_steps, "kd_steps": kd_steps}
  results = {"config": dataclasses.asdict(config), "data": data_summary(data),
             "teacher": teacher_row, "pruning": pruning, "rows": rows, "timings": timings}
  board.summary({"timings": timings,
                 "accuracy": accuracies(teacher_row["accuracy"], rows, "sparsity")})
  write_results(workdir, results, "sparsify")
  return results


def _name(target, m_by_n):
  """How a sparse student's files are named: by its sparsity, or its m:n pattern."""
  return f"{m_by_n[0]}by{m_by_n[1]}" if m_by_n else f"s{target:g}"


def _row(method, target, student, test, seconds, say):
  report = sparsity.report(student)
  row = {"method": method, "sparsity": target, "accuracy": metrics.accuracy(student, test),
         "seconds": seconds, "measured_sparsity": report["total"]["sparsity"],
         "compressed_bytes": sparsity.compressed_size(student)}
  say(f"  {method:<3} sparsity={target:<4g} measured={row['measured_sparsity']:.4f} "
      f"accuracy={row['accuracy']:.4f}  {seconds:.1f}s")
  return row


def table(results):
  """The results as text, shaped like the paper's Table 3a, with a speed-up row."""
  rows = results["rows"]
  targets = results["config"]["sparsities"]
  width = 10
  lines = ["Test accuracy (%) without fine-tuning, by target sparsity (Table 3a)",
           f"teacher (dense): {100 * results['teacher']['accuracy']:.2f}",
           f"{'sparsity':<20}" + "".join(f"{s:>{width}g}" for s in targets)]

  def cell(method, target, key, scale=1.0, fmt=".2f"):
    match = [r for r in rows if r["method"] == method and r["sparsity"] == target]
    return f"{scale * match[0][key]:>{width}{fmt}}" if match else f"{'-':>{width}}"

  for method, label in (("kd", "KD"), ("nd", "ND")):
    if any(r["method"] == method for r in rows):
      lines.append(f"{label:<20}" + "".join(cell(method, s, "accuracy", 100) for s in targets))
      if any("accuracy_uncalibrated" in r for r in rows if r["method"] == method):
        lines.append(f"{'  teacher BN stats':<20}" + "".join(
            cell(method, s, "accuracy_uncalibrated", 100) for s in targets))
      lines.append(f"{'  measured sparsity':<20}" +
                   "".join(cell(method, s, "measured_sparsity", 100, ".1f") for s in targets))
      lines.append(f"{'  seconds':<20}" + "".join(cell(method, s, "seconds", 1, ".1f")
                                                for s in targets))
  speedups = []
  for s in targets:
    kd = [r for r in rows if r["method"] == "kd" and r["sparsity"] == s]
    nd_ = [r for r in rows if r["method"] == "nd" and r["sparsity"] == s]
    speedups.append(f"{kd[0]['seconds'] / nd_[0]['seconds']:>{width}.2f}" if kd and nd_
                    else f"{'-':>{width}}")
  lines.append(f"{'speed-up KD/ND':<20}" + "".join(speedups))
  return "\n".join(lines)
