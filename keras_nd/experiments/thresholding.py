"""The paper's thresholding effect (Figures 1, 4, 5, Table 4) and the diagnosis of ND students.

`run` trains (or reuses) a teacher and measures, on the validation split:

* Figure 1: accuracy against relative Gaussian noise on the outputs of the
  residual units, each unit alone, all at once, and the first 1, 2, ..., n;
* Figure 4: accuracy drops from relative noise on the kernels, each layer
  alone and the first 1, 2, ..., n together, against their sum (the
  prediction of additive drops);
* Figure 5 and Table 4: a noise-regularised teacher (the same ResNet trained
  with the same budget, with Gaussian noise of standard deviation `sigma`
  after every residual unit in training) against the plain one: its
  all-units noise curve, and the test accuracy of both teachers' ND students
  (bottleneck multiplier `multiplier`, no fine-tuning);
* the diagnosis: each ND student of the plain teacher, its relative error
  against its unit's threshold (read off the each-unit curves).

Noise is relative: `epsilon` times the clean RMS of the unit's output (see
`keras_nd.perturb`), so thresholds of different units and teachers, and the
students' relative errors, are on one scale. Every curve is a mean over
`seeds`. The results go to `workdir/thresholding_results.json`, the figures to PNG files.
"""

import dataclasses
import math
import os
import time

from keras_nd import _checks, metrics, perturb, tolerance
from keras_nd.experiments import plot
from keras_nd.experiments.common import Settings, data_summary, write_results
from keras_nd.experiments.harness import Experiment

__all__ = ["Config", "EPSILONS", "WEIGHT_EPSILONS", "figures", "run", "table"]

EPSILONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
# Relative kernel noise of Figure 4: a small amplitude (drops that add up sub-linearly) and a
# larger one (super-linearly).
WEIGHT_EPSILONS = (0.1, 0.3)
_EPOCHS = {"teacher": 15, "nd": 3}
# Cumulative curves drawn in Figure 1 (all of them are in thresholding_results.json).
_MAX_CUMULATIVE_CURVES = 4


@dataclasses.dataclass
class Config(Settings):
  """The settings of a run (written, as they are, under "config" in thresholding_results.json).

  Attributes:
    epsilons: relative output-noise amplitudes (numbers >= 0).
    seeds: noise seeds every point is averaged over.
    sigma: standard deviation of the training noise after every unit of the
      regularised teacher (> 0).
    multiplier: bottleneck multiplier k of the ND students (Table 4 and the
      diagnosis).
    weight_epsilons: relative kernel-noise amplitudes of Figure 4.
    drop: accuracy drop (a fraction) that defines a threshold: the largest
      amplitude whose mean accuracy stays within `drop` of the clean one.
    epochs: epoch budgets over the defaults: teacher (both teachers) 15, nd 3.
    figures_dir: where the PNG figures go (default the work directory).
    The rest: the `Settings` every experiment has, for both teachers. The
      solver defaults to "lstsq" (the exact solve measured 71.3% / 64.3% for
      Table 4's two teachers, against 59.6% / 53.5% for 3 epochs of the
      paper's gradient ND).

  Raises:
    ValueError, TypeError: naming the bad setting (a negative or empty
      epsilon list, no seeds, sigma <= 0, a multiplier outside (0, 1], a
      drop outside [0, 1)).
  """
  epsilons: tuple = EPSILONS
  seeds: tuple = (0, 1, 2)
  sigma: float = 0.1
  multiplier: float = 0.5
  weight_epsilons: tuple = WEIGHT_EPSILONS
  drop: float = 0.01
  epochs: dict = dataclasses.field(default_factory=dict)
  figures_dir: str = None

  def __post_init__(self):
    super().__post_init__()
    self.epsilons = _amplitudes(self.epsilons, "epsilons")
    self.weight_epsilons = _amplitudes(self.weight_epsilons, "weight_epsilons")
    self.seeds = tuple(self.seeds)
    if not self.seeds or not all(_checks.is_integer(s) for s in self.seeds):
      raise ValueError(f"seeds must be a non-empty list of integers; got {list(self.seeds)!r}.")
    self.seeds = tuple(int(s) for s in self.seeds)
    if not _checks.is_number(self.sigma) or not self.sigma > 0:
      raise ValueError(f"sigma (the regularised teacher's unit noise) must be a number > 0; "
                       f"got sigma={self.sigma!r}.")
    if not _checks.is_number(self.multiplier) or not 0 < self.multiplier <= 1:
      raise ValueError(f"multiplier must be in (0, 1]; got multiplier={self.multiplier!r}.")
    if not _checks.is_number(self.drop) or not 0 <= self.drop < 1:
      raise ValueError(f"drop must be a fraction in [0, 1); got drop={self.drop!r}.")
    # The teachers' budgets; no student of this experiment trains by CE, KD or fine-tuning.
    self.epochs = dict(_EPOCHS, **self.epochs, ce=0, kd=0, ft=0)
    if isinstance(self.figures_dir, os.PathLike):
      self.figures_dir = os.fspath(self.figures_dir)


def run(data, workdir, config=None):
  """Runs the experiment, writes `workdir/thresholding_results.json` and the figures.

  Args:
    data: a `keras_nd.data` dataset with a validation split.
    workdir: output directory; both teachers and their activation caches are
      reused from it.
    config: a `Config` (default: `Config()`).

  Returns:
    {"config", "data", "teacher", "regularised_teacher", "sweeps": {"each",
    "all", "cumulative", "regularised_all": `perturb.output_sweep` rows},
    "thresholds", "weight_sweeps": `perturb.weight_sweep` results, "table4",
    "diagnosis": `tolerance.diagnose` rows, "timings", "figures": PNG paths}.

  Raises:
    ValueError: a dataset without a validation split, an unknown model.
  """
  config = config or Config()
  if not data.num_validation:
    raise ValueError(f"Dataset {data.name!r} has no validation split, which the noise sweeps "
                     "run on: get it with keras_nd.data.get(..., num_validation=N).")
  epsilons, seeds, multiplier, drop = (config.epsilons, config.seeds, config.multiplier,
                                       config.drop)
  budget = config.epochs
  plain = Experiment(data, workdir, config, budget)
  regular = None
  if plain.given is None:
    regular = Experiment(data, workdir, config, budget, unit_noise=config.sigma)
  else:
    plain.say("A given teacher has no noise-trained twin: Figure 5 and Table 4 show it alone.")
  timings = {}

  teacher = plain.teacher()
  timings["teacher"] = plain.timings["teacher"]
  summary, sweeps = _measure(plain, teacher, epsilons, seeds, ("each", "all", "cumulative"),
                             timings, "")
  summary["unit_noise"] = 0.0
  weight_sweeps = []
  for epsilon in config.weight_epsilons:
    plain.say(f"Kernel noise sweep, epsilon={epsilon:g}...")
    start = time.perf_counter()
    weight_sweeps.append(perturb.weight_sweep(teacher, plain.validation, epsilon, seeds=seeds,
                                              verbose=int(bool(plain.verbose))))
    timings[f"weight_sweep@{epsilon:g}"] = time.perf_counter() - start
  table4 = [_nd_row("plain", 0.0, plain, teacher, summary, multiplier, timings)]
  students = plain.students

  thresholds = tolerance.thresholds_from_sweep(sweeps["each"], summary["validation_accuracy"],
                                             drop)
  start = time.perf_counter()
  diagnosis = tolerance.diagnose(teacher, students, plain.validation, thresholds,
                               steps=-(-data.num_validation // plain.batch_size),
                               batch_size=plain.batch_size)
  timings["diagnosis"] = time.perf_counter() - start
  plain.say(tolerance.format_diagnosis(diagnosis))

  regular_summary = None
  if regular is not None:
    regularised = regular.teacher()
    timings["regularised_teacher"] = regular.timings["teacher"]
    regular_summary, regular_sweeps = _measure(regular, regularised, epsilons, seeds, ("all",),
                                               timings, "regularised_")
    regular_summary["unit_noise"] = config.sigma
    sweeps["regularised_all"] = regular_sweeps["all"]
    table4.append(_nd_row("regularised", config.sigma, regular, regularised, regular_summary,
                          multiplier, timings, suffix="_regularised"))

  results = {
      "config": dataclasses.asdict(config),
      "data": data_summary(data),
      "teacher": summary,
      "regularised_teacher": regular_summary,
      "sweeps": sweeps,
      "thresholds": _thresholds(sweeps, thresholds, summary["validation_accuracy"],
                                regular_summary and regular_summary["validation_accuracy"],
                                drop),
      "weight_sweeps": weight_sweeps,
      "table4": table4,
      "diagnosis": diagnosis,
      "timings": timings,
  }
  results["figures"] = figures(results, config.figures_dir or workdir)
  plain.board.summary(
      {"timings": timings,
       "accuracy": {f"{what}@{row['teacher']}": row[f"{what}_accuracy"]
                    for row in table4 for what in ("teacher", "nd")},
       "thresholds": results["thresholds"]},
      results["figures"])
  write_results(workdir, results, "thresholding")
  return results


def _measure(experiment, teacher, epsilons, seeds, modes, timings, prefix):
  """The teacher's accuracies and unit output RMS, and its relative output sweeps by mode."""
  units = experiment.units(teacher)
  validation = experiment.validation
  summary = {"key": experiment.key, "architecture": experiment.architecture,
             "params": teacher.count_params(),
             "accuracy": metrics.accuracy(teacher, experiment.test),
             "validation_accuracy": metrics.accuracy(teacher, validation)}
  experiment.say(f"  teacher {experiment.key}: params={summary['params']} test "
                 f"accuracy={summary['accuracy']:.4f} validation "
                 f"accuracy={summary['validation_accuracy']:.4f}")
  start = time.perf_counter()
  scales = perturb.output_rms(teacher, units, validation)
  timings[f"{prefix}output_rms"] = time.perf_counter() - start
  summary["output_rms"] = scales
  sweeps = {}
  for mode in modes:
    experiment.say(f"Output noise sweep, mode={mode} ({len(units)} units, {len(epsilons)} "
                   f"amplitudes, {len(seeds)} seeds)...")
    start = time.perf_counter()
    sweeps[mode] = perturb.output_sweep(teacher, units, validation, epsilons, mode=mode,
                                        seeds=seeds, relative=scales,
                                        verbose=int(bool(experiment.verbose)))
    timings[f"{prefix}sweep_{mode}"] = time.perf_counter() - start
  return summary, sweeps


def _nd_row(name, unit_noise, experiment, teacher, summary, multiplier, timings, suffix=""):
  """A row of Table 4: ND (no fine-tuning) of every unit of `teacher` at `multiplier`."""
  rows, _, losses, nd_seconds = experiment.nd_and_ft(teacher, multiplier, fine_tune=False)
  timings[f"cache{suffix}"] = experiment.timings["cache"]
  timings[f"nd{suffix}"] = nd_seconds
  return {"teacher": name, "unit_noise": unit_noise, "multiplier": multiplier,
          "teacher_accuracy": summary["accuracy"], "nd_accuracy": rows[0]["accuracy"],
          "params": rows[0]["params"], "losses": losses}


def _curve(rows, hoods=None):
  """[(epsilon, mean accuracy)] of the rows perturbing exactly `hoods` (all rows if None)."""
  return [(r["epsilon"], r["accuracy_mean"]) for r in rows
          if hoods is None or r["hoods"] == hoods]


def _each_mean(rows):
  """[(epsilon, accuracy averaged over the units perturbed alone)]."""
  by_epsilon = {}
  for row in rows:
    by_epsilon.setdefault(row["epsilon"], []).append(row["accuracy_mean"])
  return [(e, sum(v) / len(v)) for e, v in sorted(by_epsilon.items())]


def _cumulative_curves(rows):
  """{k: [(epsilon, mean accuracy)]} of the first-k-units rows."""
  curves = {}
  for row in rows:
    curves.setdefault(len(row["hoods"]), []).append((row["epsilon"], row["accuracy_mean"]))
  return dict(sorted(curves.items()))


def _thresholds(sweeps, each, reference, regular_reference, drop):
  """Thresholds of every curve: per unit (`each`), all units, the first k, the regularised one
  (None without a regularised teacher)."""
  return {"drop": drop, "each": each, "each_min": min(each.values()),
          "each_mean": sum(each.values()) / len(each),
          "all": tolerance.threshold(_curve(sweeps["all"]), reference, drop),
          "cumulative": {str(k): tolerance.threshold(curve, reference, drop)
                         for k, curve in _cumulative_curves(sweeps["cumulative"]).items()},
          "regularised_all": None if regular_reference is None else tolerance.threshold(
              _curve(sweeps["regularised_all"]), regular_reference, drop)}


def figures(results, directory):
  """Draws Figures 1, 4 and 5 (and the each-unit curves of Figure 1) as PNGs.

  Returns:
    The files' paths: figure1.png, figure1_units.png, figure4.png, figure5.png.
  """
  os.makedirs(directory, exist_ok=True)
  sweeps = results["sweeps"]

  def series(label, curve):
    return (label, [e for e, _ in curve], [100 * a for _, a in curve])

  cumulative = _cumulative_curves(sweeps["cumulative"])
  # "all" is the cumulative curve of every unit (same noise), so it is not drawn twice.
  partial = list(cumulative)[:-1]
  ks = sorted({partial[round(i * (len(partial) - 1) / (_MAX_CUMULATIVE_CURVES - 1))]
               for i in range(_MAX_CUMULATIVE_CURVES)}) if partial else []
  figure1 = os.path.join(directory, "figure1.png")
  plot.line_chart(figure1, [series("each unit (mean)", _each_mean(sweeps["each"])),
                            series("all units", _curve(sweeps["all"]))] +
                  [series(f"first {k}", cumulative[k]) for k in ks],
                  "Accuracy with noise on unit outputs (Fig. 1)",
                  "relative noise amplitude epsilon", "validation accuracy %",
                  legend="lower right")
  units = list(dict.fromkeys(r["hoods"][0] for r in sweeps["each"]))
  figure1_units = os.path.join(directory, "figure1_units.png")
  plot.line_chart(figure1_units, [series(u, _curve(sweeps["each"], [u])) for u in units],
                  "Accuracy with noise on one unit (Fig. 1)",
                  "relative noise amplitude epsilon", "validation accuracy %",
                  legend="lower right")
  figure4 = os.path.join(directory, "figure4.png")
  lines = []
  for sweep in results["weight_sweeps"]:
    n = [c["layers"] for c in sweep["cumulative"]]
    lines.append((f"measured e={sweep['epsilon']:g}", n,
                  [100 * c["measured_drop_mean"] for c in sweep["cumulative"]]))
    lines.append((f"predicted e={sweep['epsilon']:g}", n,
                  [100 * c["predicted_drop"] for c in sweep["cumulative"]]))
  plot.line_chart(figure4, lines, "Kernel noise, measured vs additive (Fig. 4)",
                  "layers perturbed", "accuracy drop %")
  figure5 = os.path.join(directory, "figure5.png")
  curves = [series("plain teacher", _curve(sweeps["all"]))]
  if results["regularised_teacher"] is not None:
    sigma = results["regularised_teacher"]["unit_noise"]
    curves.append(series(f"noise-trained, sigma={sigma:g}", _curve(sweeps["regularised_all"])))
  plot.line_chart(figure5, curves,
                  "Noise on all unit outputs (Fig. 5)", "relative noise amplitude epsilon",
                  "validation accuracy %", legend="lower right")
  return [figure1, figure1_units, figure4, figure5]


def table(results):
  """The results as text: thresholds by mode, kernel-noise accumulation, Table 4, diagnosis."""
  config, teacher = results["config"], results["teacher"]
  regular, thresholds = results["regularised_teacher"], results["thresholds"]
  lines = [f"Teacher ({teacher['architecture']}): {100 * teacher['accuracy']:.2f}% test, "
           f"{100 * teacher['validation_accuracy']:.2f}% validation, {teacher['params']:,} "
           "params",
           (f"Noise-trained teacher (sigma={regular['unit_noise']:g}): "
            f"{100 * regular['accuracy']:.2f}% test, "
            f"{100 * regular['validation_accuracy']:.2f}% validation" if regular else
            "No noise-trained teacher (the teacher was given)"),
           "",
           f"Thresholds: largest relative output noise within {100 * thresholds['drop']:g} "
           "point(s) of the clean validation accuracy (Fig. 1, 5)"]
  rows = [(f"each {name}", f"{value:g}") for name, value in thresholds["each"].items()]
  rows.append(("each, min / mean",
               f"{thresholds['each_min']:g} / {thresholds['each_mean']:.3g}"))
  rows += [(f"first {k} unit{'' if k == '1' else 's'}", f"{value:g}")
           for k, value in thresholds["cumulative"].items()]
  rows.append(("all units", f"{thresholds['all']:g}"))
  if regular:
    rows.append(("all units, noise-trained teacher", f"{thresholds['regularised_all']:g}"))
  width = max(len(label) for label, _ in rows)
  lines += [f"  {label:<{width}}  {value}" for label, value in rows]
  lines.append("")
  lines.append("Kernel noise (Fig. 4): accuracy drop with every layer perturbed, in points")
  for sweep in results["weight_sweeps"]:
    last = sweep["cumulative"][-1]
    lines.append(f"  epsilon={sweep['epsilon']:<6g} sum of single-layer drops "
                 f"{100 * last['predicted_drop']:6.2f}, measured "
                 f"{100 * last['measured_drop_mean']:6.2f} ({last['layers']} layers)")
  lines.append("")
  lines.append(f"Table 4: ND without fine-tuning, k={config['multiplier']:g} (test accuracy %)")
  lines.append(f"  {'':<36}{'teacher':>10}{'ND':>10}")
  for row in results["table4"]:
    label = (f"{row['teacher']} teacher" +
             (f" (sigma={row['unit_noise']:g})" if row["unit_noise"] else ""))
    lines.append(f"  {label:<36}{100 * row['teacher_accuracy']:>10.2f}"
                 f"{100 * row['nd_accuracy']:>10.2f}")
  lines.append("")
  lines.append("Diagnosis: each ND student's relative error against its unit's threshold "
               "(plain teacher)")
  lines.append(tolerance.format_diagnosis(results["diagnosis"]))
  return "\n".join(lines)


def _amplitudes(values, what):
  """`values` as a list of finite floats >= 0; errors name `what` and the bad value."""
  if (_checks.is_number(values) or isinstance(values, (str, bytes)) or
      not hasattr(values, "__iter__")):
    raise TypeError(f"{what} must be a sequence of amplitudes; got {values!r}.")
  values = list(values)
  if not values:
    raise ValueError(f"{what} is empty; pass the amplitudes to try, e.g. [0.0, 0.1, 0.5].")
  for i, value in enumerate(values):
    if not _checks.is_number(value) or not math.isfinite(value) or value < 0:
      raise ValueError(f"{what} must be finite numbers >= 0; got {what}[{i}]={value!r}.")
  return [float(value) for value in values]
