"""Student Search: choosing one distilled candidate per neighbourhood.

Every neighbourhood has candidates (students of several sizes, distilled
independently); a candidate's quality is measured alone, as the accuracy of
the teacher with only that neighbourhood replaced by it. Choosing a student
then needs no training:

* `greedy` is the paper's rule: in each neighbourhood the cheapest candidate
  whose accuracy drop is below a threshold;
* `frontier` is exact: assuming drops add up across neighbourhoods, it
  returns every choice that no other beats in both cost and predicted drop
  (the whole cost-versus-quality curve, in one call), and `budgeted` reads
  the best choice within a budget off it.

A candidate is a dict with at least "label", "accuracy" and the cost key
("params" by default; "flops" works the same); the table is
`{neighbourhood name: [candidates]}`. `keras_nd.artefacts.distil` trains the
candidates (all at once, from one activation source) and stores them, so that
later searches train nothing; `score` builds the table.

```python
candidates = search.multipliers()                       # {"k0.1": builder, ..., "k1": builder}
trained = artefacts.distil(teacher, units, candidates, source, "workdir/search", epochs=3)
table = search.score(teacher, units, trained, validation, "workdir/search")
best = search.budgeted(table, teacher_accuracy, budget=150_000)
student = search.compose_choice(teacher, units, trained, best["choice"])
```
"""

import functools

from keras_nd import artefacts, graph, layer_types, metrics, sparsity, students
from keras_nd._keras import keras
from keras_nd.composition import compose

__all__ = ["MULTIPLIERS", "budgeted", "compose_choice", "flops", "frontier", "greedy",
           "multipliers", "score", "sparsities"]

_COST_KEYS = ("params", "flops")
MULTIPLIERS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def multipliers(ks=MULTIPLIERS, init="teacher"):
  """Candidate builders `{"k<k>": f(hood) -> bottleneck student}`, one per multiplier (`init` as
  for `students.bottleneck`)."""
  if not ks:
    raise ValueError("The list of candidate multipliers is empty.")
  return {f"k{k:g}": functools.partial(students.bottleneck, k=k, init=init) for k in ks}


def sparsities(levels, steps=None, kind="polynomial"):
  """Candidate builders `{"s<level>": f(hood) -> sparse student}` for one-layer neighbourhoods.

  `steps` is the number of training steps the candidates get (the pruning
  schedule ramps over half of them); None: all the steps `artefacts.distil`
  trains them for; see `keras_nd.sparsity.sparse_student`.
  Stored candidates are the stripped, plain sparse layers.
  """
  if not levels:
    raise ValueError("The list of candidate sparsities is empty.")
  return {f"s{level:g}": functools.partial(sparsity.sparse_student, target=level, steps=steps,
                                           kind=kind) for level in levels}


def flops(model):
  """Multiply-accumulates of one example through `model`'s convolutions and Dense layers."""
  total = 0
  for layer in layer_types.leaf_layers(model):
    if isinstance(layer, keras.layers.DepthwiseConv2D):
      kernel = layer.depthwise_kernel.shape
      total += int(_positions(layer) * kernel[0] * kernel[1] * kernel[2] * kernel[3])
    elif isinstance(layer, layer_types.CONVOLUTIONS + (keras.layers.Dense,)):
      total += int(_positions(layer) * layer.kernel.shape.num_elements())
  return total


def _positions(layer):
  """How many times the layer's kernel is applied per example (output positions)."""
  shape = layer.output_shape[1:-1]
  count = 1
  for size in shape:
    count *= size
  return count


def score(teacher, hoods, trained, dataset, directory=None):
  """The quality table: each candidate alone in the teacher, with its cost and distillation loss.

  Args:
    teacher, hoods: as for `artefacts.distil`.
    trained: `artefacts.distil`'s result.
    dataset: held-out batches of (image, label) to measure accuracy on.
    directory: `artefacts.distil`'s directory, to read each candidate's
      final loss ("mse"); None leaves it out.

  Returns:
    `{neighbourhood name: [{"label", "params", "flops", "accuracy", "mse"}]}`,
    candidates in the order given.
  """
  teacher = graph.check_functional(teacher, "teacher")
  table = {}
  by_name = {hood.name: hood for hood in hoods}
  store = artefacts.store(directory, teacher) if directory is not None else None
  for name, models in trained.items():
    hood = by_name[name]
    rows = []
    for label, model in models.items():
      row = {"label": label, "params": int(model.count_params()), "flops": flops(model),
             "accuracy": metrics.accuracy(graph.substitute(teacher, {hood: model}), dataset)}
      if directory is not None:
        row["mse"] = artefacts.info(store, name, label)["loss"]
      rows.append(row)
    table[name] = rows
  return table


def compose_choice(teacher, hoods, trained, choice):
  """The student of a selection (`greedy`, `budgeted` or a `frontier` point's "choice")."""
  by_name = {hood.name: hood for hood in hoods}
  return compose(teacher, {by_name[name]: trained[name][candidate["label"]]
                           for name, candidate in choice.items()})


def _check_table(table, cost):
  if cost not in _COST_KEYS:
    raise ValueError(f"cost must be one of {list(_COST_KEYS)}; got {cost!r}.")
  if not isinstance(table, dict) or not table:
    raise ValueError(f"The candidate table must be a non-empty dict {{neighbourhood: "
                     f"[candidates]}}; got {table!r}.")
  for name, candidates in table.items():
    if not candidates:
      raise ValueError(f"Neighbourhood '{name}' has no candidates.")
    for candidate in candidates:
      missing = [k for k in ("label", "accuracy", cost) if k not in candidate]
      if missing:
        raise ValueError(f"Candidate {candidate!r} of neighbourhood '{name}' lacks {missing}.")


def greedy(table, teacher_accuracy, max_drop, cost="params"):
  """The paper's rule: per neighbourhood, the cheapest candidate dropping accuracy by < `max_drop`.

  Args:
    table: `{neighbourhood name: [candidate dicts]}`.
    teacher_accuracy: the teacher's accuracy on the same split.
    max_drop: the largest accepted drop, as a fraction (0.01 = one point).
    cost: "params" or "flops".

  Returns:
    `{neighbourhood name: candidate}`; a neighbourhood where no candidate is
    within `max_drop` gets its most accurate candidate.
  """
  _check_table(table, cost)
  choice = {}
  for name, candidates in table.items():
    within = [c for c in candidates if teacher_accuracy - c["accuracy"] < max_drop]
    if within:
      choice[name] = min(within, key=lambda c: (c[cost], -c["accuracy"]))
    else:
      choice[name] = max(candidates, key=lambda c: (c["accuracy"], -c[cost]))
  return choice


def frontier(table, teacher_accuracy, cost="params"):
  """Every Pareto-optimal choice of one candidate per neighbourhood, cheapest first.

  The predicted drop of a choice is the sum of its candidates' drops
  (teacher accuracy minus candidate accuracy, each measured alone). The
  frontier is built exactly by merging neighbourhoods one at a time and
  discarding dominated partial choices (a dynamic programme over the
  separable problem), so it needs no discretisation of the costs.

  Returns:
    A list of dicts {"cost", "drop", "choice": {name: candidate}}, with cost
    strictly increasing and drop strictly decreasing.
  """
  _check_table(table, cost)
  points = [(0, 0.0, ())]  # (cost, drop, chosen candidates in table order)
  for candidates in table.values():
    merged = sorted(((c0 + c[cost], d0 + teacher_accuracy - c["accuracy"], chosen + (c,))
                     for c0, d0, chosen in points for c in candidates),
                    key=lambda p: (p[0], p[1]))
    points = []
    for point in merged:  # cheapest first: keep a point only if it lowers the drop
      if not points or point[1] < points[-1][1] - 1e-12:
        points.append(point)
  names = list(table)
  return [{"cost": c, "drop": d, "choice": dict(zip(names, chosen))} for c, d, chosen in points]


def budgeted(table, teacher_accuracy, budget, cost="params"):
  """The choice with the smallest predicted drop whose total cost is within `budget`.

  Raises:
    ValueError: if even the cheapest choice costs more than `budget`.
  """
  points = frontier(table, teacher_accuracy, cost)
  within = [p for p in points if p["cost"] <= budget]
  if not within:
    raise ValueError(f"A {cost} budget of {budget} is below the cheapest student, which costs "
                     f"{points[0]['cost']}.")
  return within[-1]
