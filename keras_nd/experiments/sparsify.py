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

import os
import time

import keras_nd as nd
from keras_nd import sparsity
from keras_nd._keras import keras
from keras_nd.experiments import distill
from keras_nd.experiments.common import accuracy, scorable, write_results

METHODS = ("nd", "kd")
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Epoch budgets: a teacher trained to convergence (one trained for 15 epochs ends under the KD
# students, which learn from the labels too).
EPOCHS = {"teacher": 60, "nd": 3, "kd": 3}
# Peak learning rates: of 2e-3, 5e-3, 1e-2 and 2e-2, the best for each method (see the README).
RATES = {"nd": 1e-2, "kd": 5e-3}


def run(data, workdir, model="resnet20", sparsities=SPARSITIES, methods=METHODS, epochs=None,
        skip=None, calibrate=True, rates=None, solver="gradient",
        mask="magnitude", m_by_n=None, verbose=1, **settings):
  """Runs the experiment and writes `workdir/sparsify_results.json`.

  Args:
    data: a `keras_nd.data` dataset with a validation split (see
      `distill.Experiment`, whose teacher this reuses).
    workdir: output directory (the teacher is reused from it).
    model: `resnet20`, ..., `resnet50`.
    sparsities: target sparsities, each in [0, 1).
    methods: a subset of ("nd", "kd").
    epochs: dict overriding the epoch budgets of `EPOCHS`: teacher (60),
      nd (3), kd (3).
    skip: layers kept dense (names or classes); None keeps the teacher's first
      and last prunable layers dense, as the paper (for the ResNets,
      "stem_conv" and "head_logits").
    calibrate: re-estimate the ND student's BatchNorm statistics after
      composing (its rows keep the accuracy before, `accuracy_uncalibrated`).
    rates: dict overriding the peak learning rates (Adam, cosine decay) of
      the sparse students, `RATES`: nd 1e-2 and kd 5e-3 (of 2e-3, 5e-3, 1e-2
      and 2e-2, the best for each method on the embedded dataset; see the
      README).
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
    verbose: 0 silent, 1 one line per run, 2 Keras progress bars too.
    **settings: passed to `distill.Experiment` (batch_size, temperature,
      label_weight, seed, ...; its learning_rate is the teacher's).

  Returns:
    {"config", "teacher", "rows": [{"method", "sparsity", "accuracy",
    "seconds", "measured_sparsity", "compressed_bytes"[,
    "accuracy_uncalibrated"]}], "timings"}.
  """
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f"Unknown methods {unknown or list(methods)}; choose from {list(METHODS)}.")
  for s in sparsities:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
      raise ValueError(f"Sparsities must be in [0, 1); got {s!r}.")
  if not data.num_validation:
    raise ValueError(f"Dataset {data.name!r} has no validation split; get it with "
                     "keras_nd.data.get(..., num_validation=N) (the teacher is trained by "
                     "distill.Experiment, which needs one).")
  if m_by_n is not None:
    if (len(m_by_n) != 2 or not all(isinstance(v, int) for v in m_by_n) or
        not 0 < m_by_n[0] < m_by_n[1]):
      raise ValueError(f"m_by_n must be (m, n) with 0 < m < n; got {m_by_n!r}.")
    m_by_n = tuple(m_by_n)
    sparsities = [m_by_n[0] / m_by_n[1]]
  if solver not in ("gradient", "lstsq"):
    raise ValueError(f"solver must be 'gradient' or 'lstsq' for sparse students; got {solver!r}.")
  rates = dict(RATES, **(rates or {}))
  for method, rate in rates.items():
    number = isinstance(rate, (int, float)) and not isinstance(rate, bool)
    if method not in METHODS or not number or not rate > 0:
      raise ValueError(f"rates must map 'nd' and 'kd' to positive learning rates; got "
                       f"{method!r}: {rate!r}.")
  budget = dict(EPOCHS)
  budget.update(epochs or {})
  experiment = distill.Experiment(data, model, workdir, budget, verbose=verbose, **settings)
  say = experiment.say
  teacher = experiment.teacher()
  test = experiment.test
  teacher_row = {"params": teacher.count_params(), "accuracy": accuracy(teacher, test),
                 "compressed_bytes": sparsity.compressed_size(teacher)}
  say(f"  teacher params={teacher_row['params']} accuracy={teacher_row['accuracy']:.4f}")
  hoods = nd.split_layers(teacher, sparsity.PRUNABLE_TYPES)
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
                                 verbose=int(verbose > 1))
    timings["cache"] = source.manifest.get("build_seconds", time.perf_counter() - start)
  nd_steps = budget["nd"] * -(-((source and source.num_examples) or data.num_train) //
                              experiment.batch_size)
  kd_steps = budget["kd"] * experiment.steps_per_epoch
  fit_verbose = 2 if verbose > 1 else 0
  for target in sparsities:
    if "nd" in methods and solver == "lstsq":
      students = {h: nd.students.clone(h) for h in trained}
      start = time.perf_counter()
      nd.reconstruct(students, source, errors=False, mask=mask,
                     **({"m_by_n": m_by_n} if m_by_n else {"sparsity": target}))
      seconds = time.perf_counter() - start
      student = scorable(nd.compose(teacher, students))
    elif "nd" in methods:
      keras.utils.set_random_seed(experiment.seed)
      distiller = nd.NeighbourhoodDistiller(
          sparsity.sparse_students(trained, target, steps=nd_steps, m_by_n=m_by_n))
      distiller.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
          rates["nd"], nd_steps)))
      start = time.perf_counter()
      distiller.fit(source.dataset(experiment.batch_size, seed=experiment.seed),
                    epochs=budget["nd"], verbose=fit_verbose)
      seconds = time.perf_counter() - start
      student = scorable(nd.compose(teacher, distiller.students))
    if "nd" in methods:
      extra = {}
      if calibrate:
        extra["accuracy_uncalibrated"] = accuracy(student, test)  # not timed
        start = time.perf_counter()
        nd.calibrate_batch_norm(student, experiment.train_plain,
                                steps=experiment.steps_per_epoch)
        seconds += time.perf_counter() - start
      timings[f"nd@{target:g}"] = seconds
      rows.append(dict(_row("nd", target, student, test, seconds + timings["cache"], say),
                       **extra))
    if "kd" in methods:
      keras.utils.set_random_seed(experiment.seed)
      student = sparsity.prune(teacher, target, steps=kd_steps, m_by_n=m_by_n, skip=skip)
      kd = nd.KnowledgeDistiller(teacher=teacher, student=student,
                                 temperature=experiment.temperature,
                                 label_weight=experiment.label_weight)
      kd.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
          rates["kd"], kd_steps)), metrics=["accuracy"])
      start = time.perf_counter()
      kd.fit(experiment.train, epochs=budget["kd"], verbose=fit_verbose)
      seconds = time.perf_counter() - start
      timings[f"kd@{target:g}"] = seconds
      rows.append(_row("kd", target, sparsity.strip(student), test, seconds, say))
  config = dict(dataset=data.name, model=experiment.architecture, sparsities=list(sparsities),
                methods=list(methods), epochs=budget, skip=[str(s) for s in skip],
                calibrate=calibrate, solver=solver, mask=mask,
                m_by_n=list(m_by_n) if m_by_n else None,
                batch_size=experiment.batch_size, rates=rates, seed=experiment.seed,
                num_train=data.num_train, nd_steps=nd_steps, kd_steps=kd_steps,
                layers=[h.name for h in trained])
  results = {"config": config, "teacher": teacher_row, "rows": rows, "timings": timings}
  write_results(workdir, results, "sparsify")
  return results


def _row(method, target, student, test, seconds, say):
  report = sparsity.report(student)
  row = {"method": method, "sparsity": target, "accuracy": accuracy(scorable(student), test),
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
