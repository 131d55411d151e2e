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

Time-to-accuracy: the target is KD's best test accuracy
minus 0.5 points; KD's time is its training time until its first epoch at
the target, ND+FT's is cache + ND + fine-tuning until its first evaluation at
the target (evaluated right after ND too). Evaluation time is not counted.
Fine-tuning and KD stop early on a validation split held out from training.

Scale-out and resumption: ND students are artefacts
(`keras_nd.artefacts`) in `workdir/students`, one per neighbourhood and
recipe; a run trains only those not finished. `Config(neighbourhoods=...)` or
`Config(shard="i/n")` distils only some neighbourhoods and stops there (any
number of such jobs may share the work directory, at once: the teacher and
the activation cache are built by whichever job comes first, under a lock);
`Config(compose=True)` then assembles the students and refuses to train any.
Anything killed resumes: the teacher and the cache are used only when
complete, ND resumes from its last epoch, and KD and fine-tuning resume from
their last epoch with their early-stopping state (`workdir/backups`, removed
once distill_results.json is written). CE students are retrained.
"""

import contextlib
import dataclasses
import os
import shutil
import time

import keras_nd as nd
from keras_nd import metrics
from keras_nd._keras import keras, tf
from keras_nd.batch_norm import frozen_batch_norms
from keras_nd.experiments import plot
from keras_nd.experiments.board import accuracies
from keras_nd.experiments.common import (
  Settings,
  complete_runs,
  data_summary,
  write_results,
)
from keras_nd.experiments.harness import Experiment, select
from keras_nd.experiments.tracker import time_to
from keras_nd.training import cosine_adam

__all__ = ["Config", "METHODS", "figures", "multi_worker_strategy", "run", "table"]

METHODS = ("ce", "kd", "nd", "nd_ft")
_EPOCHS = {"teacher": 15, "ce": 6, "kd": 6, "nd": 3, "ft": 3}


@dataclasses.dataclass
class Config(Settings):
  """The settings of a run (written, as they are, under "config" in distill_results.json).

  Attributes:
    multipliers: bottleneck multipliers k of the students, each in (0, 1].
    methods: a subset of ("ce", "kd", "nd", "nd_ft").
    lookahead: look-ahead depth of ND (Eq. 5).
    ablation: also run ND and ND+FT with 0 and 2-neighbourhood look-ahead
      (Table 5).
    time_neighbourhoods: also time each neighbourhood distilled alone
      (Table 6's per-neighbourhood and sequential rows).
    epochs: epoch budgets, over the defaults: teacher 15, ce 6, kd 6, nd 3,
      ft 3.
    neighbourhoods: distil only these residual units (indices in `split`
      order, or names) for every multiplier and look-ahead, and stop: no
      other method, no distill_results.json (a job of a split run).
    shard: "i/n": distil only every n-th residual unit from the i-th, and
      stop (as `neighbourhoods`).
    compose: train no ND student: assemble them from the artefacts the jobs
      wrote, and refuse (FileNotFoundError naming them) if any is missing.
    devices: spread whole neighbourhoods over these devices for ND (None:
      the default device).
    The rest: the `Settings` every experiment has.

  Raises:
    ValueError: naming an unknown method or a multiplier out of range.
  """
  multipliers: tuple = (0.5,)
  methods: tuple = METHODS
  lookahead: int = 0
  ablation: bool = False
  time_neighbourhoods: bool = False
  epochs: dict = dataclasses.field(default_factory=dict)
  neighbourhoods: tuple = None
  shard: str = None
  compose: bool = False
  devices: tuple = None

  def __post_init__(self):
    super().__post_init__()
    complete_runs(self, METHODS, _EPOCHS)
    if self.neighbourhoods is not None:
      self.neighbourhoods = tuple(self.neighbourhoods)
    if self.devices is not None:
      self.devices = tuple(self.devices)


def multi_worker_strategy(solver):
  """The `tf.distribute.MultiWorkerMirroredStrategy` of a multi-worker run, its cluster read from
  the TF_CONFIG environment variable; make it before TensorFlow runs anything else.

  Raises:
    ValueError: TF_CONFIG is not set, or `solver` is not "gradient" (the workers all-reduce
      gradient steps; the exact solve runs in one process, in seconds).
  """
  if "TF_CONFIG" not in os.environ:
    raise ValueError("A multi-worker run needs the cluster in the TF_CONFIG environment "
                     "variable.")
  if solver != "gradient":
    raise ValueError(f"A multi-worker run all-reduces gradient steps: add --solver=gradient "
                     f"(--solver={solver} solves in one process, in seconds).")
  return tf.distribute.MultiWorkerMirroredStrategy()


def run(data, workdir, config=None, strategy=None):
  """Runs the experiment and writes `workdir/distill_results.json`.

  Args:
    data: a `keras_nd.data` dataset with a validation split (see
      `harness.Experiment`).
    workdir: output directory (the teacher is reused from it).
    config: a `Config` (default: `Config()`).
    strategy: a `tf.distribute` strategy for ND (e.g. multi-worker); with
      one, the run is a distillation job (of the given neighbourhoods, or
      all) and stops there.

  Returns:
    The results dict: {"config", "data", "teacher", "rows", "timings",
    "speedup", "curves"}; for a job of a split run, {"distilled": [names],
    "directory": where the students are}.
  """
  config = config or Config()
  if not data.num_validation:
    raise ValueError(f"Dataset {data.name!r} has no validation split, which early stopping "
                     "needs: get it with keras_nd.data.get(..., num_validation=N).")
  lookahead, methods = config.lookahead, config.methods
  experiment = Experiment(
      data, workdir, config, config.epochs, devices=config.devices, strategy=strategy,
      max_lookahead=max(lookahead, 2 if config.ablation else 0))
  if experiment.solver == "lstsq" and (lookahead or config.ablation):
    raise ValueError("Look-ahead shapes the loss of gradient steps; the exact solver alone "
                     "(solver='lstsq') has none: use solver='gradient' or 'lstsq+gradient' for "
                     "look-ahead and the ablation.")
  teacher = experiment.teacher()
  variants = sorted({lookahead, 2} if config.ablation else {lookahead})
  if config.neighbourhoods is not None or config.shard is not None or strategy is not None:
    if config.compose:
      raise ValueError("A job distils some neighbourhoods or composes them all, not both.")
    units = experiment.units(teacher)
    mine = units if config.neighbourhoods is None and config.shard is None else select(
        units, config.neighbourhoods, config.shard)
    experiment.say(f"Distilling {[h.name for h in mine]} into {experiment.students_dir}.")
    for k in config.multipliers:
      for la in variants:
        experiment.distil(teacher, k, la, hoods=mine)
    return {"distilled": [h.name for h in mine], "directory": experiment.students_dir}
  teacher_row = {"architecture": experiment.architecture, "params": teacher.count_params(),
                 "accuracy": metrics.accuracy(teacher, experiment.test)}
  experiment.say(f"  teacher params={teacher_row['params']} "
                  f"accuracy={teacher_row['accuracy']:.4f}")
  rows, curves, speedup, timings = [], {}, {}, {"teacher": experiment.timings["teacher"]}
  for k in config.multipliers:
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
            teacher, k, la, fine_tune="nd_ft" in methods, train=not config.compose)
        rows.extend(r for r in nd_rows if r["method"] in methods)
        curves[f"nd_ft@{k:g}/lookahead{la}"] = curve
        timings[f"cache@{k:g}"] = experiment.timings["cache"]
        timings[f"nd_all_fused@{k:g}/lookahead{la}"] = nd_seconds
        timings[f"nd_losses@{k:g}/lookahead{la}"] = losses
        if "nd_ft" in methods:
          timings[f"ft@{k:g}/lookahead{la}"] = nd_rows[-1]["seconds"] - nd_rows[0]["seconds"]
        if "kd" in methods and "nd_ft" in methods:
          speedup[f"{k:g}/lookahead{la}"] = _speedup(curves[f"kd@{k:g}"], curve)
    if config.time_neighbourhoods and ("nd" in methods or "nd_ft" in methods):
      each = _time_each_neighbourhood(experiment, teacher, k)
      timings[f"nd_each@{k:g}"] = each
      timings[f"nd_all_sequential@{k:g}"] = sum(each.values())
  results = {"config": dataclasses.asdict(config), "data": data_summary(data),
             "teacher": teacher_row, "rows": rows, "timings": timings, "speedup": speedup,
             "curves": curves, "figures": figures(curves, speedup, config, workdir)}
  experiment.board.summary(
      {"timings": timings, "speedup": speedup,
       "accuracy": accuracies(teacher_row["accuracy"], rows, "multiplier", "lookahead")},
      results["figures"])
  write_results(workdir, results, "distill")
  # The run is complete: a later one starts KD and fine-tuning afresh (ND students are kept).
  shutil.rmtree(os.path.join(workdir, "backups"), ignore_errors=True)
  return results


def _time_each_neighbourhood(experiment, teacher, multiplier):
  """Seconds to distil each unit alone for the ND epochs (Table 6), from the same cache."""
  hoods, source = experiment.source(teacher, 0)
  solver, seed, batch_size = experiment.solver, experiment.seed, experiment.batch_size
  seconds = {}
  for hood in hoods:
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    students = {hood: nd.students.bottleneck(hood, multiplier, init=experiment.student_init)}
    if solver != "gradient":
      nd.reconstruct(students, source, errors=False, **experiment.solve_settings())
    distiller = nd.NeighbourhoodDistiller(students, calibrate_steps=0)  # calibrated below
    if solver != "lstsq":
      with (frozen_batch_norms(students.values()) if solver != "gradient"
            else contextlib.nullcontext()):  # as artefacts.distil trains after a solve
        distiller.compile(cosine_adam(experiment.nd_learning_rate))
        distiller.fit(source.dataset(batch_size, seed=seed), epochs=experiment.epochs["nd"],
                      verbose=0)
    if experiment.calibrate_steps():
      distiller.calibrate_batch_norm(source.dataset(batch_size, seed=seed + 1),
                                     steps=experiment.calibrate_steps())
    seconds[hood.name] = time.perf_counter() - start
  return seconds


def figures(curves, speedup, config, directory):
  """Draws accuracy against training seconds for each multiplier (CE, KD, ND+FT, with KD's
  target of the speed-up dashed) as `accuracy_vs_time_k<k>.png`; returns the files' paths."""
  paths = []
  for k in config.multipliers:
    mine = {name: curve for name, curve in curves.items()
            if name.split("@", 1)[1].split("/", 1)[0] == f"{k:g}" and curve}
    if not mine:
      continue
    target = speedup.get(f"{k:g}/lookahead{config.lookahead}", {}).get("target")
    path = os.path.join(directory, f"accuracy_vs_time_k{k:g}.png")
    plot.accuracy_against_time(path, mine, target=target,
                               title=f"Test accuracy against training time (k = {k:g})")
    paths.append(path)
  return paths


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
