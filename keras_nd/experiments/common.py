"""What the experiments and their binaries share: the settings of every configuration, the data
and training flags, writing results."""

import dataclasses
import logging as std_logging
import os

from absl import flags, logging

from keras_nd import _checks, artefacts, data, files
from keras_nd.experiments import exports
from keras_nd.training import EpochLines

__all__ = ["EMBEDDED_NUM_TRAIN", "Settings", "checked_methods", "checked_multipliers",
           "complete_runs", "data_summary", "dataset_from_flags", "define_export_flag",
           "define_flags", "define_tensorboard_flag", "fit_progress", "quiet_logs",
           "results_path", "settings_from_flags", "tensorboard_from_flags", "write_results"]

# The embedded dataset's training size in the binaries: keeps examples/distill.py, the main
# job, within 5 minutes on 2 cores.
EMBEDDED_NUM_TRAIN = 3000


@dataclasses.dataclass
class Settings:
  """The settings every experiment's configuration has: its teacher and its training.

  Attributes:
    model: the teacher's architecture (`catalogue.build_model`'s names),
      trained when `teacher` is None.
    teacher: the path of your own trained teacher (a tf_keras or Keras 3
      `.keras` file) instead of training one (see `Experiment`).
    trusted: load `teacher` with safe mode off (`files.load_model`).
    batch_size, learning_rate, nd_learning_rate, temperature, label_weight,
      patience, seed, student_init, solver, channels: as `Experiment` takes
      them.
    verbose: 0 silent, 1 one line per phase, 2 Keras progress bars too.
    tensorboard: the directory of the run's TensorBoard logs, one run per
      training phase (`board.Board`); None writes none.
    export: the formats (of `exports.FORMATS`: "keras", "keras3", "tflite")
      its teacher and final students are written in, under
      `workdir/export/<format>/` (`exports.export`); () writes none.

  Raises:
    TypeError: `teacher` or `tensorboard` is not a path, `export` a string.
    ValueError: an unknown `student_init`, `solver`, `channels` or export
      format.
  """
  model: str = "resnet20"
  teacher: str = None
  trusted: bool = False
  batch_size: int = 128
  learning_rate: float = 2e-3
  nd_learning_rate: float = 2e-3
  temperature: float = 2.5
  label_weight: float = 1.0
  patience: int = 2
  seed: int = 0
  student_init: str = "teacher"
  solver: str = "lstsq"
  channels: str = "greedy"
  verbose: int = 1
  tensorboard: str = None
  export: tuple = ()

  def __post_init__(self):
    self.export = exports.checked_formats(self.export)
    if isinstance(self.teacher, os.PathLike):
      self.teacher = os.fspath(self.teacher)
    if isinstance(self.tensorboard, os.PathLike):
      self.tensorboard = os.fspath(self.tensorboard)
    if self.tensorboard is not None and not isinstance(self.tensorboard, str):
      raise TypeError(f"tensorboard must be a directory's path or None; got "
                      f"{type(self.tensorboard).__name__}.")
    # A model in memory goes to `Experiment` itself: a configuration is written as JSON.
    if self.teacher is not None and not isinstance(self.teacher, str):
      raise TypeError(f"teacher must be the path of a .keras file; got "
                      f"{type(self.teacher).__name__}.")
    if self.student_init not in ("teacher", "random"):
      raise ValueError(f"student_init must be 'teacher' or 'random'; got "
                       f"{self.student_init!r}.")
    if self.solver not in artefacts.SOLVERS:
      raise ValueError(f"solver must be one of {list(artefacts.SOLVERS)}; got {self.solver!r}.")
    if self.channels not in ("greedy", "l1"):
      raise ValueError(f"channels must be 'greedy' or 'l1'; got {self.channels!r}.")


def checked_methods(methods, known):
  """`methods` as a tuple, if it is a non-empty subset of `known`; else a ValueError names them."""
  methods = tuple(methods)
  unknown = sorted(set(methods) - set(known))
  if unknown or not methods:
    raise ValueError(f"Unknown methods {unknown or list(methods)}; choose from {list(known)}.")
  return methods


def complete_runs(config, methods, epochs):
  """Checks a configuration's `methods` (against `methods`) and `multipliers`, and completes its
  `epochs` with the default budgets `epochs`, in place."""
  config.methods = checked_methods(config.methods, methods)
  config.multipliers = checked_multipliers(config.multipliers)
  config.epochs = dict(epochs, **config.epochs)


def checked_multipliers(multipliers):
  """`multipliers` as a tuple, if each is a number in (0, 1]; else a ValueError names it."""
  for k in multipliers:
    if not _checks.is_number(k) or not 0 < k <= 1:
      raise ValueError(f"Multipliers must be in (0, 1]; got {k!r}.")
  return tuple(multipliers)


def define_flags(workdir, teacher_epochs=15):
  """Defines the flags every experiment binary has: data, model, teacher, batch, seed, output."""
  flags.DEFINE_string("dataset", "embedded", "'embedded' (generated offline); 'npz:PATH', a file "
                      "of numeric arrays x_train, y_train, x_test, y_test (images (N, H, W, C) "
                      "channels-last, any real dtype; labels (N,) class indices); or a "
                      "tensorflow-datasets name such as 'cifar10' (prepared under --data_dir).")
  flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
  flags.DEFINE_integer("num_train", None, "Training examples (default: all; for the embedded "
                       f"dataset {EMBEDDED_NUM_TRAIN}).")
  flags.DEFINE_integer("num_validation", 400, "Examples held out of training (early stopping).")
  flags.DEFINE_string("model", "resnet20", "resnetN (N = 6n+2) or resnet50: the teacher trained "
                      "when --teacher is not given.")
  flags.DEFINE_string("teacher", None, "Your own trained teacher (a tf_keras or Keras 3 .keras "
                      "file) instead of training one: it must take the dataset's images as "
                      "--preprocessing gives them and give its classes.")
  flags.DEFINE_enum("preprocessing", "standardize", list(data.PREPROCESSING), "How the teacher "
                    "expects its images: standardised with the training split's per-channel mean "
                    "and std (the binaries' own teachers), 'none' (as stored, cast to float32), or "
                    "'model' (as stored: the teacher's own first layers preprocess).")
  flags.DEFINE_bool("trusted", False, "Load --teacher with Keras's safe mode off (it may run the "
                    "file's Python code, e.g. a Lambda layer): only for a file you trust.")
  flags.DEFINE_integer("teacher_epochs", teacher_epochs, "Teacher training epochs (the teacher "
                       "is reused from --workdir when trained before with the same settings).")
  flags.DEFINE_integer("batch_size", 128, "Batch size.")
  flags.DEFINE_integer("seed", 0, "Seed of the data split and the models.")
  flags.DEFINE_string("workdir", workdir, "Output directory.")
  flags.DEFINE_integer("verbose", 1, "0 quiet, 1 a line per phase, 2 Keras progress bars.")
  define_tensorboard_flag()
  define_export_flag()


def define_export_flag():
  """Defines --export, the formats a binary writes its teacher and final students in."""
  flags.DEFINE_list("export", ["keras"], "Formats the teacher and the final students are "
                    "written in, under WORKDIR/export/<format>/: keras (tf_keras .keras files), "
                    "keras3 (Keras 3 .keras files that keras.saving.load_model loads in safe mode "
                    "without keras_nd), tflite (LiteRT, float, pruned kernels sparse-encoded). "
                    "--export= writes none.")


def define_tensorboard_flag():
  """Defines --tensorboard, the directory of a binary's TensorBoard logs (see
  `tensorboard_from_flags`)."""
  flags.DEFINE_string("tensorboard", None, "Directory of the TensorBoard logs: a run per "
                      "training phase (its metrics each epoch) and a 'summary' run (timings, "
                      "accuracies, figures); view with tensorboard --logdir=DIR. Default: "
                      "WORKDIR/tensorboard; --tensorboard= (empty) writes none.")


def tensorboard_from_flags(values):
  """The TensorBoard directory --tensorboard gives (`values` is absl's FLAGS): by default
  `<--workdir>/tensorboard`; None, no logs, when it is given empty."""
  if values.tensorboard is None:
    return os.path.join(values.workdir, "tensorboard")
  return values.tensorboard or None


def quiet_logs():
  """Logs warnings and errors only, unless the command line sets --verbosity.

  absl turns a binary's log up to INFO when --verbosity is not given, which
  shows TensorFlow's notes on every checkpoint and collective. Each binary
  calls this first in `main`; `--verbosity=0` brings the notes back.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # TensorFlow gave its logger a handler of its own when it was imported, before absl's went on
  # the root logger, which its records reach too: each line would print twice.
  tensorflow_logger = std_logging.getLogger("tensorflow")
  for handler in list(tensorflow_logger.handlers):
    tensorflow_logger.removeHandler(handler)


def dataset_from_flags(values):
  """The dataset the data flags name (`values` is absl's FLAGS)."""
  num_train = values.num_train
  if num_train is None and values.dataset == "embedded":
    num_train = EMBEDDED_NUM_TRAIN
  dataset = data.get(values.dataset, data_dir=values.data_dir, num_train=num_train,
                     num_validation=values.num_validation, seed=values.seed)
  return dataset.with_preprocessing(values.preprocessing)


def settings_from_flags(values):
  """The `Settings` that `define_flags`' flags give (`values` is absl's FLAGS), as keyword
  arguments of a configuration."""
  return dict(model=values.model, teacher=values.teacher, trusted=values.trusted,
              batch_size=values.batch_size, seed=values.seed, verbose=values.verbose,
              tensorboard=tensorboard_from_flags(values), export=values.export)


def data_summary(dataset):
  """What the results say of the data a run read: its name, sizes and preprocessing."""
  return {"name": dataset.name, "num_train": dataset.num_train,
          "num_validation": dataset.num_validation, "preprocessing": dataset.preprocessing}


def results_path(workdir, experiment):
  """Where `experiment`'s results go: `workdir/<experiment>_results.json`, one file per binary,
  so that binaries sharing a work directory (and its teacher) keep each other's results."""
  return os.path.join(workdir, f"{experiment}_results.json")


def write_results(workdir, results, experiment):
  """Writes `results_path(workdir, experiment)` atomically (a temporary file renamed); returns
  its path."""
  path = results_path(workdir, experiment)
  files.write_json(path, results)
  return path


def fit_progress(verbose, *callbacks):
  """`fit` keyword arguments for a verbosity (0 silent, 1 a line per epoch, 2 Keras's own),
  with `callbacks` after the progress lines'."""
  if verbose > 1:
    return {"verbose": 2, "callbacks": list(callbacks)}
  return {"verbose": 0, "callbacks": ([EpochLines()] if verbose else []) + list(callbacks)}
