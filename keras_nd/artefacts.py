"""Distilled students as files, so that any number of jobs can share the work.

Every trained student is an artefact: `<directory>/teacher-<fingerprint>/
<neighbourhood>/<label>.keras`, with `<label>.json` beside it (its final
distillation loss, epochs, training seconds, its solve's report). Both are
written under temporary names and renamed when complete, so an artefact that
exists is finished. `distil` trains only the students that have no artefact and loads
the others; jobs given different neighbourhoods (by hand, or `shard`) can
therefore run at once, on any scheduler, into one shared directory, and
`load` assembles their work, naming any neighbourhood that is not finished.
A job that is killed loses at most its current epoch: training is backed
up after every epoch (`keras.callbacks.BackupAndRestore`) and resumes from
there when the same job is started again, with the same result as if it had
not stopped (epoch j's batches depend only on the seed and j).

```python
hoods = nd.split(teacher)[1:-1]
mine = artefacts.shard(hoods, "0/2")          # the other job takes "1/2"
artefacts.distil(teacher, mine, {"k0.5": builder}, source, "workdir/students", epochs=3)
...                                           # once every job has finished:
students = artefacts.load(teacher, hoods, "k0.5", "workdir/students")
student = nd.compose(teacher, students)
```
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time

from keras_nd import _checks, files, sparsity, training
from keras_nd._keras import keras, tf
from keras_nd.batch_norm import frozen_batch_norms
from keras_nd.cache import teacher_fingerprint
from keras_nd.distiller import NeighbourhoodDistiller
from keras_nd.reconstruct import reconstruct
from keras_nd.students import as_student_model
from keras_nd.training import epoch_line

__all__ = ["SOLVERS", "distil", "finished", "info", "load", "path", "shard", "store"]

# How a student's weights are found: gradient steps on its neighbourhood loss; the exact
# least-squares solve of its linear layers (`keras_nd.reconstruct`); or the solve, then steps.
SOLVERS = ("gradient", "lstsq", "lstsq+gradient")


def store(directory, teacher):
  """The folder of `teacher`'s artefacts in `directory` (named by its weights' fingerprint)."""
  return os.path.join(directory, f"teacher-{teacher_fingerprint(teacher)[:12]}")


def path(store_dir, hood_name, label):
  """The artefact of one student: `<store>/<neighbourhood>/<label>.keras`."""
  return os.path.join(store_dir, hood_name, f"{label}.keras")


def info(store_dir, hood_name, label):
  """The `.json` of an artefact: {"loss", "epochs", "seconds", "solver", ...[, "solve"]}."""
  with open(path(store_dir, hood_name, label)[:-len(".keras")] + ".json") as f:
    return json.load(f)


def finished(store_dir, hood_name, label):
  """Whether the artefact exists (it is renamed into place only when complete)."""
  return os.path.exists(path(store_dir, hood_name, label))


def shard(hoods, spec):
  """The neighbourhoods of shard "i/n" (0 <= i < n): every n-th one, starting at the i-th."""
  try:
    index, count = (int(part) for part in str(spec).split("/"))
  except ValueError:
    raise ValueError(f"A shard is 'i/n' with integers 0 <= i < n; got {spec!r}.") from None
  if not 0 <= index < count:
    raise ValueError(f"A shard is 'i/n' with integers 0 <= i < n; got {spec!r}.")
  if count > len(hoods):
    raise ValueError(f"Shard {spec!r}: {count} shards for only {len(hoods)} neighbourhoods.")
  return list(hoods)[index::count]


def _check_candidates(hoods, candidates):
  """`{hood name: {label: builder}}` from one family for all or a family per neighbourhood."""
  if not isinstance(candidates, dict) or not candidates:
    raise ValueError(f"candidates must be a non-empty dict {{label: builder}} or {{neighbourhood "
                     f"name: {{label: builder}}}}; got {candidates!r}.")
  names = [hood.name for hood in hoods]
  if all(isinstance(v, dict) for v in candidates.values()):
    missing = [n for n in names if n not in candidates]
    if missing:
      raise ValueError(f"No candidates for the neighbourhoods {missing}.")
    family = {n: candidates[n] for n in names}
  else:
    family = {n: candidates for n in names}
  for name, builders in family.items():
    if not builders:
      raise ValueError(f"Neighbourhood '{name}' has an empty list of candidates.")
  return family


def _seeded(builder, seed):
  """A builder that seeds Keras first: every student starts the same, whoever else is trained."""

  def build(hood):
    keras.utils.set_random_seed(seed)
    return as_student_model(hood, builder)

  return build


def _epoch_seed(seed, epoch):
  """The shuffling seed of one epoch: a resumed job serves the batches it would have served."""
  return seed + 10007 * epoch


class _EpochLog(keras.callbacks.Callback):
  """Keeps each epoch's logs and seconds in a JSON file, so that a resumed job still knows them.

  Listed before `BackupAndRestore`: an epoch's entry is written before its
  backup, so a job killed between the two repeats the epoch, and the entry
  of the resumed job's first epoch replaces it.
  """

  def __init__(self, log_path, epochs, backup, verbose):
    super().__init__()
    self.path = log_path
    self._total, self._backup, self._verbose = epochs, backup, verbose
    self._resumed = False
    self.epochs = []
    if os.path.exists(log_path):
      with open(log_path) as f:
        self.epochs = json.load(f)

  def on_epoch_begin(self, epoch, logs=None):
    if not self._resumed:  # the first epoch of this job: `epoch` of them are backed up
      self._resumed = True
      self.epochs = self.epochs[:epoch]
      if epoch and self._verbose:
        print(f"Resuming after epoch {epoch} of {self._total} ({self._backup}).", flush=True)
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.epochs.append(dict({k: float(v) for k, v in (logs or {}).items()},
                            seconds=time.perf_counter() - self._start))
    files.write_json(self.path, self.epochs)


class _EpochLines(keras.callbacks.Callback):
  """Prints each epoch's line once it is backed up (listed after `BackupAndRestore`): a job
  killed once it printed the line loses nothing of that epoch."""

  def __init__(self, log, epochs):
    super().__init__()
    self._log, self._total = log, epochs

  def on_epoch_end(self, epoch, logs=None):
    last = self._log.epochs[-1]
    print(epoch_line(epoch, self._total, last["loss"], last["seconds"]), flush=True)


class _EpochData(keras.callbacks.Callback):
  """The data of one `fit` over all epochs: epoch j serves `source.dataset` of seed (seed, j).

  Keras iterates the dataset afresh every epoch. A cache's batches depend on
  the seed, so the pipeline reads which epoch it serves from a variable when
  an iteration starts, and builds that epoch's dataset: the variable is set
  once `BackupAndRestore` has restored the optimizer (listed after it: its
  step count over the steps per epoch, so a resumed job's first epoch serves
  the batches it would have served) and after every epoch. A source in
  another mode serves the same dataset every epoch, whatever the seed.
  """

  def __init__(self, source, batch_size, seed, epochs, steps_per_epoch, distributed):
    super().__init__()
    self._steps = steps_per_epoch
    self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    if source.mode != "cached":
      dataset = source.dataset(batch_size, seed=_epoch_seed(seed, 0))
    else:
      spec = source.dataset(batch_size, seed=seed).element_spec
      # One branch per epoch, each building its dataset with a constant seed: only the chosen
      # one runs, so an epoch's dataset is built and iterated once, as a dataset of its own.
      branches = [functools.partial(_as_variant, source, batch_size, _epoch_seed(seed, epoch))
                  for epoch in range(epochs)]
      dataset = tf.data.Dataset.from_tensors(0).map(lambda _: self._epoch.read_value())
      dataset = dataset.flat_map(lambda epoch: tf.data.experimental.from_variant(
          tf.switch_case(tf.cast(epoch, tf.int32), branches), spec))
      dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps_per_epoch))
    if distributed:  # workers split each batch (the cache is not split by files)
      options = tf.data.Options()
      options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
      dataset = dataset.with_options(options)
    self.dataset = dataset

  def on_train_begin(self, logs=None):
    if self._steps:
      self._epoch.assign(int(self.model.optimizer.iterations.numpy()) // self._steps)

  def on_epoch_end(self, epoch, logs=None):
    self._epoch.assign(epoch + 1)


def _as_variant(source, batch_size, seed):
  return tf.data.experimental.to_variant(source.dataset(batch_size, seed=seed))


class _SolveFirst(keras.callbacks.Callback):
  """Solves the students when training starts from the beginning (listed after
  `BackupAndRestore`: a resumed job has the solve in its backup) and records its seconds."""

  def __init__(self, solve, record):
    super().__init__()
    self._solve, self._record = solve, record

  def on_train_begin(self, logs=None):
    if not int(self.model.optimizer.iterations.numpy()):
      files.write_json(self._record, self._solve())


def distil(teacher, hoods, candidates, source, directory, epochs=None, batch_size=128,
           learning_rate=2e-3, seed=0, lookahead=0, devices=None, calibrate_steps=50,
           strategy=None, solver="gradient", ridge=1e-3, channels=None, subsample=1, verbose=1,
           callbacks=None):
  """Distils every student that has no artefact yet, all at once; loads the rest.

  Args:
    teacher: the teacher the neighbourhoods were split from.
    hoods: the neighbourhoods this job is responsible for.
    candidates: `{label: builder}` for every neighbourhood, or
      `{neighbourhood name: {label: builder}}`; a builder is
      `f(neighbourhood) -> model` or a model. A label names a student's
      recipe: artefacts of one label are taken to come from the same
      settings, so give different settings different labels.
    source: an `ActivationSource` over (at least) the neighbourhoods, with at
      least `lookahead` look-ahead; jobs that share the work give it the same
      neighbourhoods.
    directory: the shared directory of artefacts.
    epochs, batch_size, learning_rate, seed: the gradient distillation's
      settings (`epochs`, required for them, is not used by solver="lstsq")
      (Adam, cosine decay). Every student is built right after seeding Keras
      with `seed`, and a source's batches depend only on `seed` and the
      neighbourhoods it serves, so a student comes out the same whichever
      others are trained beside it (up to floating-point summation order) as
      long as every job builds its source over the same neighbourhoods (all
      of them, on one cache).
    lookahead: look-ahead depth of the loss (Eq. 5).
    devices: `NeighbourhoodDistiller`'s placement of neighbourhoods on devices.
    calibrate_steps: batches over which the students' BatchNorm statistics
      are re-estimated after training (`calibrate_batch_norm`); 0 keeps
      them (an exact solve sets the statistics its BatchNorms need).
    strategy: a `tf.distribute` strategy to train under (e.g.
      `MultiWorkerMirroredStrategy`: every worker calls `distil` with the
      same arguments and the same, shared `directory`; each batch is split
      between them; only the chief writes artefacts and backups, from which
      every worker resumes).
    solver: "gradient" (Adam on each neighbourhood's loss), "lstsq" (each
      student's linear layers solved exactly by `keras_nd.reconstruct`, in a
      pass over `source`; no gradient step), or "lstsq+gradient" (the solve,
      then `epochs` of gradient steps from it, with the students'
      BatchNorms frozen as the solve set them).
    ridge, channels, subsample: `reconstruct`'s settings of the solve
      (channels="greedy" chooses the teacher channels that bottleneck
      students keep).
    verbose: 0 silent, 1 a line, 2 Keras progress bars too.
    callbacks: more Keras callbacks for the gradient epochs' `fit`, before their backup (e.g.
      Keras's TensorBoard: an epoch's logs hold each student's `<neighbourhood>_<label>_loss`).

  Returns:
    `{neighbourhood name: {label: trained model}}` for `hoods`.
  """
  family = _check_candidates(hoods, candidates)
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {list(SOLVERS)}; got {solver!r}.")
  if solver != "gradient" and strategy is not None:
    raise ValueError(f"solver={solver!r} solves in one process: distil without a strategy "
                     "(the solve is a pass or two over the data), or use solver='gradient'.")
  if solver != "lstsq" and not (_checks.is_integer(epochs) and epochs >= 1):
    raise ValueError(f"solver={solver!r} trains for `epochs` gradient epochs: pass a positive "
                     f"integer; got epochs={epochs!r}.")
  gradient_epochs = 0 if solver == "lstsq" else epochs
  store_dir = store(directory, teacher)
  trained, pending = {}, {}
  for hood in hoods:
    trained[hood.name] = {}
    for label, builder in family[hood.name].items():
      if finished(store_dir, hood.name, label):
        trained[hood.name][label] = files.load_model(path(store_dir, hood.name, label))
      else:
        pending.setdefault(hood, {})[label] = _seeded(builder, seed)
  if not pending:
    return trained
  count = sum(len(v) for v in pending.values())
  done = sum(len(v) for v in trained.values())
  if verbose:
    print(f"Distilling {count} students of {len(pending)} neighbourhoods at once"
          + (f" ({done} already finished)" if done else "") + "...", flush=True)
  # One backup per set of students trained together: a restarted job resumes its own.
  job = sorted(f"{hood.name}/{label}" for hood, labels in pending.items() for label in labels)
  backup = os.path.join(store_dir, ".backup",
                        hashlib.sha256(json.dumps(job).encode()).hexdigest()[:16])
  if strategy is not None:
    _check_same_teacher(strategy, teacher)
  chief = strategy is None or strategy.extended.should_checkpoint
  # The chief's backup is every worker's (BackupAndRestore); each worker keeps its own log of
  # epochs, and saves its copy of the artefacts (the saves are collective) beside it.
  own = backup if chief else f"{backup}.worker{strategy.cluster_resolver.task_id}"
  os.makedirs(own, exist_ok=True)
  steps_per_epoch = -(-source.num_examples // batch_size) if source.num_examples else None
  steps = gradient_epochs * steps_per_epoch if steps_per_epoch and gradient_epochs else None
  # Gradient steps from a solve keep its BatchNorms as the solve fitted through them: frozen,
  # in inference mode (training-mode batch statistics would undo the solve).
  with contextlib.ExitStack() as frozen:
    with strategy.scope() if strategy else contextlib.nullcontext():
      # Calibrated once after training, below.
      distiller = NeighbourhoodDistiller(pending, lookahead=lookahead, devices=devices,
                                         calibrate_steps=0)
      if solver != "gradient":  # before compile, which fixes what fit trains
        frozen.enter_context(frozen_batch_norms(distiller.student_models))
      distiller.compile(training.cosine_adam(learning_rate, steps))
      if sparsity.prunes(distiller):  # the schedules of the whole training
        sparsity.derive_schedules(distiller, steps)
      distiller.optimizer.build(distiller.trainable_variables)
    solve = functools.partial(_solve, distiller, source, batch_size, verbose, ridge=ridge,
                              channels=channels, subsample=subsample)
    if gradient_epochs:
      epoch_logs = _train(distiller, source, batch_size, seed, gradient_epochs, steps_per_epoch,
                          backup, own, strategy, solve if solver != "gradient" else None,
                          verbose, callbacks or [])
    else:
      epoch_logs = []
      files.write_json(os.path.join(own, "solve.json"), solve())
  start = time.perf_counter()
  if calibrate_steps:
    distiller.calibrate_batch_norm(source.dataset(batch_size, seed=seed + 1),
                                   steps=calibrate_steps)
  seconds = sum(epoch["seconds"] for epoch in epoch_logs) + time.perf_counter() - start
  solved = {}
  if solver != "gradient":
    with open(os.path.join(own, "solve.json")) as f:
      solved = json.load(f)
    seconds += solved["seconds"]
  if epoch_logs:
    losses = epoch_logs[-1]
  else:  # solved only: each neighbourhood's loss, measured once (not counted as training time)
    losses = distiller.evaluate(source.dataset(batch_size, shuffle=False), verbose=0,
                                return_dict=True)
  for name, hood, label, model in distiller.entries:
    loss = float(losses[f"{name}_loss"])
    solve = solved.get("report", {}).get(name)  # its loss is the solve's when solved only
    extra = {"solve": solve if epoch_logs else dict(solve, loss_after=loss)} if solve else {}
    if sparsity.prunes(model):  # pruned students are stored as plain sparse layers
      model = sparsity.strip(model)
    # Saving is collective under a multi-worker strategy: the other workers save a copy into
    # a directory of their own, deleted below.
    files.save_model(path(store_dir if chief else own, hood.name, label), model,
                     {"loss": loss, "epochs": gradient_epochs, "seconds": seconds,
                      "solver": solver, "trained_with": len(job),
                      "job": os.path.basename(backup), **extra})
    trained[hood.name][label] = model
  shutil.rmtree(own, ignore_errors=True)
  if chief:
    shutil.rmtree(backup, ignore_errors=True)
  return trained


def _train(distiller, source, batch_size, seed, epochs, steps_per_epoch, backup, own, strategy,
           solve, verbose, extra):
  """Trains for `epochs` in one `fit`, backed up after every epoch: the logs of its epochs.

  A job started again resumes from its last backup (`BackupAndRestore`) and
  ends with the students an uninterrupted job gives: epoch j's batches depend
  only on the seed and j (`_EpochData`).
  """
  log = _EpochLog(os.path.join(own, "epochs.json"), epochs, backup, verbose)
  data = _EpochData(source, batch_size, seed, epochs, steps_per_epoch, strategy is not None)
  callbacks = [log, *extra, keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False), data]
  if solve is not None:
    callbacks.append(_SolveFirst(solve, os.path.join(own, "solve.json")))
  if verbose:
    callbacks.append(_EpochLines(log, epochs))
  distiller.fit(data.dataset, epochs=epochs, verbose=0, callbacks=callbacks)
  return log.epochs


def _solve(distiller, source, batch_size, verbose, **settings):
  """Solves the students in place, every label in one `reconstruct`: {"seconds", "report"}."""
  start = time.perf_counter()
  by_label = {}
  for _, hood, label, model in distiller.entries:
    by_label.setdefault(label, {})[hood] = model
  reports = dict(zip(by_label, reconstruct(list(by_label.values()), source, errors=False,
                                           batch_size=max(batch_size, 256), **settings)))
  seconds = time.perf_counter() - start
  report = {name: reports[label][hood.name] for name, hood, label, _ in distiller.entries}
  if verbose:
    print(f"Solved {len(distiller.entries)} students exactly ({seconds:.1f}s).", flush=True)
  return {"seconds": seconds, "report": report}


def _check_same_teacher(strategy, teacher):
  """Raises ValueError unless every replica (every worker) distils from the same teacher.

  Workers that do not share a work directory would each train their own
  teacher, and their gradients would be averaged over different problems.
  """
  mine = tf.constant([int(teacher_fingerprint(teacher)[:12], 16)], tf.int64)
  everyone = strategy.gather(strategy.run(lambda: tf.identity(mine)), axis=0).numpy()
  prints = sorted({f"{v:012x}" for v in everyone.tolist()})
  if len(prints) > 1:
    raise ValueError(
        f"The workers have different teachers (fingerprints {prints}): give every worker the "
        "same teacher (a shared work directory, or the same .keras file copied to each).")


def load(teacher, hoods, label, directory):
  """`{Neighbourhood: student}` from the artefacts of `label`, as `compose` takes them.

  Raises:
    FileNotFoundError: naming every neighbourhood that has no finished
      artefact (not distilled yet, or its job still running or killed).
  """
  store_dir = store(directory, teacher)
  missing = [hood.name for hood in hoods if not finished(store_dir, hood.name, label)]
  if missing:
    raise FileNotFoundError(
        f"No finished student '{label}' for the neighbourhoods {missing} in '{store_dir}' "
        f"({len(hoods) - len(missing)} of {len(hoods)} finished): distil them first.")
  return {hood: files.load_model(path(store_dir, hood.name, label)) for hood in hoods}
