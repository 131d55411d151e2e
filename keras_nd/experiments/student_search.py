"""The paper's Student Search (Figures 3, 6, 7): searched students against uniform multipliers.

Every residual unit gets candidates of several bottleneck multipliers, all
distilled at once from one activation cache and stored (a second run trains
nothing). Each candidate is scored alone in the teacher on the validation
split; then students are chosen by the paper's greedy rule for a sweep of
accepted drops, and by the exact budgeted selection at the parameter counts
of the uniform students, composed, and evaluated on the test split before and
after KD fine-tuning, beside students of uniform k built from the same
candidates.
"""

import dataclasses
import os
import time

from keras_nd import _checks, artefacts, metrics, search
from keras_nd.experiments import plot
from keras_nd.experiments.board import accuracies
from keras_nd.experiments.common import Settings, data_summary, write_results
from keras_nd.experiments.harness import Experiment

__all__ = ["Config", "DROPS", "MULTIPLIERS", "UNIFORM", "figures", "run", "table"]

MULTIPLIERS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DROPS = (0.005, 0.01, 0.02, 0.05)
UNIFORM = (0.3, 0.5, 0.7)
_EPOCHS = {"teacher": 15, "nd": 3, "ft": 3}


@dataclasses.dataclass
class Config(Settings):
  """The settings of a search (written, as they are, under "config" in
  student_search_results.json).

  Attributes:
    multipliers: the candidate bottleneck multipliers of every unit.
    drops: accepted accuracy drops (fractions) of the greedy rule.
    uniform: multipliers of the uniform students compared against; the
      budgeted selection is run at their parameter counts. Each must be
      among `multipliers`.
    epochs: epoch budgets over the defaults: teacher 15, nd (candidates) 3,
      ft 3.
    The rest: the `Settings` every experiment has.

  Raises:
    ValueError: a uniform multiplier is not a candidate, or a drop is not a
      fraction.
  """
  multipliers: tuple = MULTIPLIERS
  drops: tuple = DROPS
  uniform: tuple = UNIFORM
  epochs: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    super().__post_init__()
    self.multipliers, self.drops = tuple(self.multipliers), tuple(self.drops)
    self.uniform, self.epochs = tuple(self.uniform), dict(_EPOCHS, **self.epochs)
    missing = [k for k in self.uniform if k not in self.multipliers]
    if missing:
      raise ValueError(f"Uniform multipliers {missing} are not among the candidates "
                       f"{list(self.multipliers)}.")
    for drop in self.drops:
      if not _checks.is_number(drop) or not 0 <= drop < 1:
        raise ValueError(f"Accepted drops are fractions in [0, 1); got {drop!r}.")


def run(data, workdir, config=None):
  """Runs the search and writes `workdir/student_search_results.json`.

  Args:
    data: a `keras_nd.data` dataset with a validation split.
    workdir: output directory (teacher, cache and candidates are reused).
    config: a `Config` (default: `Config()`).

  Returns:
    {"config", "data", "teacher", "candidates": the quality table, "rows":
    [{"method", "setting", "params", "predicted_drop", "accuracy_before_ft",
    "accuracy"}], "timings", "figures": the paths of the two PNG plots}.
  """
  config = config or Config()
  labels = {k: f"k{k:g}" for k in config.multipliers}
  budget = config.epochs
  experiment = Experiment(data, workdir, config, dict(budget, kd=0, ce=0))
  teacher = experiment.teacher()
  teacher_accuracy = metrics.accuracy(teacher, experiment.validation)
  units, source = experiment.source(teacher, 0)
  start = time.perf_counter()
  # One directory of candidates per solver (their labels are their multipliers).
  candidates = os.path.join(workdir, "candidates" if experiment.solver == "gradient" else
                            f"candidates-{experiment.solver}")
  builders = search.multipliers(config.multipliers, init=experiment.student_init)
  trained = artefacts.distil(teacher, units, builders, source, candidates, verbose=config.verbose,
                             callbacks=experiment.board.callbacks("nd-candidates"),
                             **experiment.distil_settings())
  store = artefacts.store(candidates, teacher)
  infos = {f"{h.name}_{label}": artefacts.info(store, h.name, label)
           for h in units for label in builders}
  experiment.board.solve("nd-candidates",
                         {name: i["solve"] for name, i in infos.items() if "solve" in i})
  timings = {"teacher": experiment.timings["teacher"], "cache": experiment.timings["cache"],
             "candidates": time.perf_counter() - start}
  start = time.perf_counter()
  table = search.score(teacher, units, trained, experiment.validation, candidates)
  timings["scoring"] = time.perf_counter() - start

  choices = [("greedy", drop, search.greedy(table, teacher_accuracy, drop))
             for drop in config.drops]
  points = search.frontier(table, teacher_accuracy)
  for k in config.uniform:
    choice = {name: next(c for c in rows if c["label"] == labels[k])
              for name, rows in table.items()}
    choices.append(("uniform", k, choice))
    cost = sum(c["params"] for c in choice.values())
    choices.append(("budgeted", cost, search.budgeted(table, teacher_accuracy, cost)["choice"]))
  rows = []
  for method, setting, choice in choices:
    student = search.compose_choice(teacher, units, trained, choice)
    before = metrics.accuracy(student, experiment.test)
    tracker = experiment.fine_tune(teacher, student, budget["ft"], experiment.learning_rate / 4,
                                   phase=f"ft-{method}-{setting}")
    row = {"method": method, "setting": setting, "params": student.count_params(),
           "predicted_drop": sum(teacher_accuracy - c["accuracy"] for c in choice.values()),
           "choice": {name: c["label"] for name, c in choice.items()},
           "accuracy_before_ft": before, "accuracy": metrics.accuracy(student, experiment.test),
           "ft_seconds": tracker.seconds}
    experiment.say(f"  {method:<8} {setting:<8g} params={row['params']:<8} before FT "
                    f"{row['accuracy_before_ft']:.4f} after {row['accuracy']:.4f}")
    rows.append(row)
    experiment.keep(f"{method}-{setting:g}", student)
  results = {"config": dataclasses.asdict(config), "data": data_summary(data),
             "teacher": {"architecture": experiment.architecture,
                         "params": teacher.count_params(),
                         "accuracy": metrics.accuracy(teacher, experiment.test),
                         "validation_accuracy": teacher_accuracy},
             "candidates": table, "frontier": [{"cost": p["cost"], "drop": p["drop"]}
                                               for p in points],
             "rows": rows, "timings": timings}
  results["figures"] = figures(results, workdir)
  experiment.board.summary(
      {"timings": timings,
       "accuracy": accuracies(results["teacher"]["accuracy"], rows, "setting")},
      results["figures"])
  write_results(workdir, results, "student_search")
  return results


def figures(results, directory):
  """Draws the paper's Figure 3 (params vs accuracy) and Figure 6 (unit accuracy vs k) as PNGs.

  Returns:
    The two files' paths.
  """
  rows = results["rows"]
  searched = [r for r in rows if r["method"] in ("greedy", "budgeted")]
  uniform = [r for r in rows if r["method"] == "uniform"]
  series = [(name, [r["params"] for r in group], [100 * r["accuracy"] for r in group])
            for name, group in (("searched", searched), ("uniform k", uniform)) if group]
  accuracy_path = os.path.join(directory, "search_vs_uniform.png")
  plot.line_chart(accuracy_path, series, "Searched vs uniform students (after fine-tuning)",
                  "parameters", "test accuracy %")
  units = [(name, [float(c["label"][1:]) for c in candidates],
            [100 * c["accuracy"] for c in candidates])
           for name, candidates in results["candidates"].items()]
  units_path = os.path.join(directory, "unit_accuracy_vs_k.png")
  plot.line_chart(units_path, units, "Teacher with one unit replaced",
                  "bottleneck multiplier k", "validation accuracy %", legend="lower right")
  return [accuracy_path, units_path]


def table(results):
  """The results as text: one line per student, by method."""
  lines = [f"Teacher: {100 * results['teacher']['accuracy']:.2f}% test, "
           f"{results['teacher']['params']:,} params",
           f"{'method':<10}{'setting':>10}{'params':>10}{'before FT':>11}{'after FT':>10}"]
  for row in sorted(results["rows"], key=lambda r: (r["method"], r["params"])):
    lines.append(f"{row['method']:<10}{row['setting']:>10g}{row['params']:>10,}"
                 f"{100 * row['accuracy_before_ft']:>11.2f}{100 * row['accuracy']:>10.2f}")
  return "\n".join(lines)
