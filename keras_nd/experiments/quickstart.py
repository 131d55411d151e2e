"""The quick-start job: teacher, split, cache, distil, compose, fine-tune, on generated data."""

import dataclasses
import os
import time

import keras_nd as nd
from keras_nd import data, files, metrics, models
from keras_nd._keras import keras, tf
from keras_nd.experiments import exports
from keras_nd.experiments.board import Board
from keras_nd.experiments.common import write_results
from keras_nd.training import cosine_adam

__all__ = ["Config", "run", "summary"]


@dataclasses.dataclass
class Config:
  """The settings of the quick-start job (written, as they are, under "config" in
  quickstart_results.json).

  Attributes:
    num_train, num_test: sizes of the generated dataset.
    depth: ResNet depth (6n+2).
    k: bottleneck multiplier of the students.
    teacher_epochs, nd_epochs, ft_epochs: training lengths.
    batch_size: batch size everywhere.
    seed: seed of the data and the models.
    verbose: 0 silent, 1 progress and a summary table.
    tensorboard: the directory of the TensorBoard logs (`board.Board`: runs
      teacher, nd-k<k>, ft-k<k>, summary); None writes none.
    export: the formats the teacher and the student are also written in,
      under `workdir/export/<format>/` (`exports.export`); () none.
  """
  num_train: int = 2000
  num_test: int = 500
  depth: int = 8
  k: float = 0.5
  teacher_epochs: int = 8
  nd_epochs: int = 4
  ft_epochs: int = 2
  batch_size: int = 64
  seed: int = 0
  verbose: int = 1
  tensorboard: str = None
  export: tuple = ()

  def __post_init__(self):
    self.export = exports.checked_formats(self.export)


def run(workdir, config=None):
  """Runs neighbourhood distillation end to end and writes `quickstart_results.json` in `workdir`.

  Trains a ResNet teacher on `keras_nd.data.synthetic_images` (or reuses the
  one saved in `workdir`), splits it, caches its activations, distils a
  bottleneck-k student for every residual unit concurrently, composes them
  and fine-tunes the result with knowledge distillation.

  Args:
    workdir: directory for the teacher, the activation cache, the student
      and quickstart_results.json.
    config: a `Config` (default: `Config()`).

  Returns:
    The results dict written to quickstart_results.json.
  """
  config = config or Config()
  num_train, num_test, depth, k = config.num_train, config.num_test, config.depth, config.k
  batch_size, seed, verbose = config.batch_size, config.seed, config.verbose
  files.writable_directory(workdir, "work directory")
  keras.utils.set_random_seed(seed)
  (x_train, y_train), (x_test, y_test) = data.synthetic_images(num_train, num_test, seed=seed)
  fit_verbose = 2 if verbose else 0
  board = Board(config.tensorboard)
  seconds = {}

  teacher_path = os.path.join(workdir, "teacher.keras")
  start = time.time()
  if os.path.exists(teacher_path):
    teacher = files.load_model(teacher_path)
  else:
    teacher = models.resnet_v1(depth=depth, input_shape=x_train.shape[1:], num_classes=10)
    teacher.compile(cosine_adam(2e-3),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    teacher.fit(x_train, y_train, batch_size=batch_size, epochs=config.teacher_epochs,
                verbose=fit_verbose, callbacks=board.callbacks("teacher"))
    files.save_model(teacher_path, teacher)
  seconds["teacher"] = time.time() - start

  hoods = nd.split(teacher)
  units = hoods[1:-1]
  start = time.time()
  source = nd.ActivationSource(teacher, units, tf.data.Dataset.from_tensor_slices(x_train),
                               cache_dir=os.path.join(workdir, "cache"), verbose=verbose)
  seconds["cache"] = time.time() - start

  start = time.time()
  distiller = nd.NeighbourhoodDistiller({h: nd.students.bottleneck(h, k) for h in units})
  distiller.compile(cosine_adam(2e-3))
  history = distiller.fit(source.dataset(batch_size, seed=seed), epochs=config.nd_epochs,
                          verbose=fit_verbose, callbacks=board.callbacks(f"nd-k{k:g}"))
  seconds["nd"] = time.time() - start
  student = nd.compose(teacher, distiller.students)
  accuracy_nd = metrics.accuracy(student, (x_test, y_test))

  start = time.time()
  kd = nd.KnowledgeDistiller(teacher=teacher, student=student, temperature=2.5, label_weight=1.0)
  kd.compile(cosine_adam(5e-4), metrics=["accuracy"])
  kd.fit(x_train, y_train, batch_size=batch_size, epochs=config.ft_epochs, verbose=fit_verbose,
         callbacks=board.callbacks(f"ft-k{k:g}"))
  seconds["fine_tune"] = time.time() - start
  student_path = os.path.join(workdir, "student.keras")
  kd.save(student_path)
  exports.export(teacher, workdir, "teacher", config.export)
  exports.export(student, workdir, f"nd_ft-k{k:g}", config.export)

  results = {
      "config": dataclasses.asdict(config),
      "teacher": {"params": teacher.count_params(),
                  "accuracy": metrics.accuracy(teacher, (x_test, y_test))},
      "student": {"params": student.count_params(), "accuracy_nd": accuracy_nd,
                  "accuracy_nd_ft": metrics.accuracy(student, (x_test, y_test)),
                  "path": student_path},
      "neighbourhood_loss": {h.name: [float(v) for v in history.history[f"{h.name}_loss"]]
                             for h in units},
      "seconds": seconds,
  }
  board.summary({"timings": seconds,
                 "accuracy": {"teacher": results["teacher"]["accuracy"],
                              "nd": accuracy_nd, "nd_ft": results["student"]["accuracy_nd_ft"]}})
  path = write_results(workdir, results, "quickstart")
  if verbose:
    print(summary(results))
    print(f"Results written to {path}")
  return results


def summary(results):
  """A small table of the results."""
  t, s = results["teacher"], results["student"]
  lines = [f"{'model':<22}{'params':>10}{'accuracy':>10}",
           f"{'teacher':<22}{t['params']:>10}{t['accuracy']:>10.3f}",
           f"{'student, ND':<22}{s['params']:>10}{s['accuracy_nd']:>10.3f}",
           f"{'student, ND+FT':<22}{s['params']:>10}{s['accuracy_nd_ft']:>10.3f}"]
  lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
  return "\n".join(lines)
