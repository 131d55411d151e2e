"""How much error each neighbourhood tolerates, and whether its student stays within it.

`output_sweep(..., mode="each", relative=True)` (`keras_nd.perturb`) measures
the accuracy of a model with noise on one neighbourhood's output at a time;
`thresholds_from_sweep` reads each neighbourhood's threshold off it, and
`diagnose` compares each distilled student's relative error
`RMS(S_i(a) - T_i(a)) / RMS(T_i(a))` with its neighbourhood's threshold (the
same scale as relative noise).

```python
rows = perturb.output_sweep(teacher, hoods, validation, [0.0, 0.1, 0.3, 1.0], relative=True)
thresholds = tolerance.thresholds_from_sweep(rows, metrics.accuracy(teacher, validation))
print(tolerance.format_diagnosis(tolerance.diagnose(teacher, students, validation, thresholds)))
```
"""

import math

import numpy as np

from keras_nd import _checks, graph
from keras_nd._keras import tf
from keras_nd.activations import ActivationSource
from keras_nd.neighbourhood import checked_hoods
from keras_nd.students import as_student_model

__all__ = ["diagnose", "format_diagnosis", "threshold", "thresholds_from_sweep"]


def thresholds_from_sweep(rows, teacher_accuracy, drop=0.01):
  """Each neighbourhood's threshold, read off an `output_sweep(..., mode="each")`.

  A neighbourhood's threshold is the largest amplitude up to which the mean
  accuracy stays within `drop` of `teacher_accuracy`: the amplitudes are
  taken in increasing order and the last one before the first that falls
  below `teacher_accuracy - drop` is kept (0.0 if even the smallest fails).

  Args:
    rows: the rows of a relative "each" sweep.
    teacher_accuracy: the clean accuracy (e.g. `accuracy(teacher, data)`).
    drop: the tolerated accuracy drop, as a fraction (0.01 = one point).

  Returns:
    `{hood name: epsilon}`, ready for `diagnose`.

  Raises:
    ValueError: rows of several neighbourhoods at once (not an "each"
      sweep), rows of absolute noise, or no rows.
  """
  if not rows:
    raise ValueError("thresholds_from_sweep needs the rows of an output_sweep; got none.")
  _checks.number(teacher_accuracy, "teacher_accuracy")
  _checks.number(drop, "drop", low=0)
  curves = {}
  for row in rows:
    if len(row["hoods"]) != 1:
      raise ValueError(f"thresholds_from_sweep needs the rows of a mode='each' sweep; a row "
                       f"perturbs {row['hoods']} together.")
    if not row.get("relative", True):
      raise ValueError(
          f"The sweep row of '{row['hoods'][0]}' at epsilon={row['epsilon']} is of absolute "
          "noise; thresholds compare with relative errors, so sweep with relative=True.")
    curves.setdefault(row["hoods"][0], []).append((row["epsilon"], row["accuracy_mean"]))
  return {name: threshold(curve, teacher_accuracy, drop) for name, curve in curves.items()}


def threshold(curve, reference, drop=0.01):
  """The largest amplitude of `curve` before the first whose accuracy is under `reference - drop`.

  Args:
    curve: `[(epsilon, accuracy)]` points, in any order.
    reference: the clean accuracy.
    drop: the tolerated accuracy drop, as a fraction.

  Returns:
    That amplitude, or 0.0 if even the smallest one fails.
  """
  found = 0.0
  for epsilon, value in sorted(curve):
    if value < reference - drop:
      break
    found = float(epsilon)
  return found


def diagnose(teacher, students, dataset, thresholds=None, steps=10, batch_size=128):
  """Each student's relative error against its neighbourhood's threshold.

  A student's error amplitude is `RMS(S_i(a) - T_i(a)) / RMS(T_i(a))` over
  the teacher's own activations `a` of the first `steps` batches of
  `dataset` (one teacher pass per batch, through an online
  `keras_nd.ActivationSource`); every part runs in inference mode. An error
  above its threshold predicts that the student alone already costs
  accuracy: distil it longer, or make it larger.

  Args:
    teacher: the functional teacher model.
    students: `{Neighbourhood: student model}` for neighbourhoods of
      `teacher` (as for `keras_nd.compose`).
    dataset: a `tf.data.Dataset` of teacher inputs `x` or `(x, y, ...)`.
    thresholds: None (nothing flagged), one relative amplitude for every
      neighbourhood, or `{hood name: epsilon}` naming every student's
      neighbourhood (e.g. `thresholds_from_sweep` of a relative sweep).
    steps: batches of activations to measure on.
    batch_size: examples per batch.

  Returns:
    A list of rows `{"hood", "error", "threshold", "flagged"}` in the
    teacher's order; `flagged` is True when error > threshold.

  Raises:
    TypeError, ValueError: naming the bad argument: a student's
      neighbourhood of another model, a student of the wrong shapes, a
      threshold missing for a student or given for a neighbourhood that has
      none.
  """
  teacher = graph.check_functional(teacher, "teacher")
  pairs = _checked_students(teacher, students)
  limits = _checked_thresholds(pairs, thresholds)
  _checks.integer(steps, "steps")
  source = ActivationSource(teacher, [hood for hood, _ in pairs], dataset, cache_dir=None,
                            verbose=0)

  @tf.function(reduce_retracing=True)
  def squares(batch):
    sums = []
    for hood, student in pairs:
      a, t = batch[hood.name][:2]
      s = tf.cast(student(a, training=False), tf.float64)
      t = tf.cast(t, tf.float64)
      sums.append((tf.reduce_sum(tf.square(s - t)), tf.reduce_sum(tf.square(t))))
    return sums

  errors, norms = np.zeros(len(pairs)), np.zeros(len(pairs))
  for batch in source.dataset(batch_size=batch_size, shuffle=False).take(steps):
    for i, (error, norm) in enumerate(squares(batch)):
      errors[i] += float(error)
      norms[i] += float(norm)
  rows = []
  for (hood, _), error, norm in zip(pairs, errors, norms):
    if norm > 0:
      amplitude = math.sqrt(error / norm)
    else:
      amplitude = 0.0 if error == 0 else math.inf
    threshold = limits[hood.name]
    rows.append({"hood": hood.name, "error": amplitude, "threshold": threshold,
                 "flagged": threshold is not None and amplitude > threshold})
  return rows


def format_diagnosis(rows):
  """A printable table of `diagnose`'s rows: one line per neighbourhood, flagged ones marked."""
  width = max([len("neighbourhood")] + [len(row["hood"]) for row in rows])
  lines = [f"{'neighbourhood':<{width}}  {'error':>9}  {'threshold':>9}  flagged"]
  for row in rows:
    threshold = "-" if row["threshold"] is None else f"{row['threshold']:9.4f}"
    mark = "OVER" if row["flagged"] else ""
    lines.append(f"{row['hood']:<{width}}  {row['error']:9.4f}  {threshold:>9}  {mark}".rstrip())
  if all(row["threshold"] is None for row in rows):
    lines.append("No thresholds given: nothing flagged.")
  else:
    flagged = sum(row["flagged"] for row in rows)
    lines.append(f"{flagged} of {len(rows)} neighbourhoods over their threshold.")
  return "\n".join(lines)


def _checked_hoods(model, hoods):
  return checked_hoods(graph.check_functional(model), hoods)


def _checked_students(teacher, students):
  if not isinstance(students, dict):
    raise TypeError(f"students must be a dict {{Neighbourhood: student model}}; got "
                    f"{type(students).__name__}.")
  if not students:
    raise ValueError("students is empty; pass {Neighbourhood: student model}.")
  hoods = _checked_hoods(teacher, list(students))
  return [(hood, as_student_model(hood, students[hood]))
          for hood in sorted(hoods, key=lambda h: h.index)]


def _checked_thresholds(pairs, thresholds):
  names = [hood.name for hood, _ in pairs]
  if thresholds is None:
    return dict.fromkeys(names)
  if not isinstance(thresholds, dict):
    return dict.fromkeys(names, _checks.number(thresholds, "threshold", low=0))
  missing = [name for name in names if name not in thresholds]
  if missing:
    raise ValueError(f"thresholds has no value for the neighbourhoods {missing} of the students; "
                     f"it has {sorted(thresholds)}.")
  unknown = sorted(set(thresholds) - set(names))
  if unknown:
    raise ValueError(f"thresholds names neighbourhoods {unknown} that have no student (students "
                     f"are missing for them); the students' neighbourhoods are {names}.")
  return {name: _checks.number(thresholds[name], f"threshold of '{name}'", low=0) for name in names}
