"""TensorBoard logs of an experiment: a run per training phase, and a `summary` run.

Every `fit` of an experiment logs through Keras's own
`keras.callbacks.TensorBoard` (`Board.callbacks`) into the run of its phase
(`teacher`, `ce-k0.5`, `kd-k0.5`, `nd-<label>`, `ft-<label>`, ...): the
metrics of each epoch, under `<phase>/train` (a distiller's loss terms,
one loss per neighbourhood for `NeighbourhoodDistiller`, accuracy) and
`<phase>/validation` (the `EpochTracker`'s validation accuracy). What no
`fit` logs goes through `tf.summary`: the test accuracies of the
time-to-accuracy curve (`<phase>/test`), an exact solve's errors
(`<phase>/solve`), and the run's timings, final accuracies and figures
(`summary`).

Logging changes nothing of the training: no histograms, no graph, no
profiler, one write per epoch.
"""

import contextlib
import importlib.util
import math
import os

from keras_nd._keras import keras, tf

__all__ = ["Board", "SUMMARY", "accuracies"]

# The run of what a whole experiment measured.
SUMMARY = "summary"


class Board:
  """Where an experiment's TensorBoard logs go: `directory/<phase>`, a run per phase.

  Args:
    directory: TensorBoard's log directory (`tensorboard --logdir`), or None
      to write nothing: `callbacks` are then empty and the other methods do
      nothing.
    prefix: put before every phase's name (e.g. "unit_noise0.1/" for a
      second teacher of the same run).

  Raises:
    ImportError: a directory is given but the tensorboard package, which
      writes the summaries, is not installed.

  Example:
    >>> board = Board(None)
    >>> board.callbacks("kd-k0.5")
    []
  """

  def __init__(self, directory, prefix=""):
    if directory is not None and importlib.util.find_spec("tensorboard") is None:
      raise ImportError(f"TensorBoard logs were asked for in '{directory}' but the tensorboard "
                        "package, which writes them, is not installed: pip install tensorboard, "
                        "or turn the logs off (--tensorboard= on a binary's command line, "
                        "tensorboard=None in a configuration).")
    self.directory = None if directory is None else os.fspath(directory)
    self.prefix = prefix

  def callbacks(self, phase):
    """[`keras.callbacks.TensorBoard`] for the `fit` of `phase` ([] when off, or for no phase).

    List it after the callbacks that add to an epoch's logs (the
    `EpochTracker` adds the validation accuracy).
    """
    if self.directory is None or phase is None:
      return []
    # No histograms, graph or profile: each would cost some of the time the phases measure.
    return [keras.callbacks.TensorBoard(self._run(phase), histogram_freq=0, write_graph=False,
                                        update_freq="epoch", profile_batch=0)]

  def curve(self, phase, curve, epochs=None):
    """Writes a time-to-accuracy curve in `<phase>/test`.

    Args:
      phase: the training's run.
      curve: [(training seconds, test accuracy)], as `EpochTracker.curve`.
      epochs: the 0-based epoch after which each point was measured (-1:
        before training), as `EpochTracker.epochs`; None for points of no
        epoch (ND's student).

    The points go in as `accuracy_vs_seconds` at the seconds (rounded) as the
    step, one chart for every phase's curve, and those of epochs as
    `epoch_accuracy` and `epoch_seconds` at the epoch, the step of Keras's
    own `epoch_accuracy` of the training and validation data.
    """
    epochs = [-1] * len(curve) if epochs is None else epochs
    with self._writing(phase, "test") as write:
      if write:
        for (seconds, accuracy), epoch in zip(curve, epochs):
          tf.summary.scalar("accuracy_vs_seconds", accuracy, step=round(seconds))
          if epoch >= 0:
            tf.summary.scalar("epoch_accuracy", accuracy, step=epoch)
            tf.summary.scalar("epoch_seconds", seconds, step=epoch)

  def solve(self, phase, report):
    """Writes an exact solve's errors in `<phase>/solve`.

    Args:
      phase: the solve's run.
      report: `keras_nd.reconstruct`'s report, `{student: {"layers": {layer:
        {"error_before", "error_after", ...}}, ...}}`: each layer's error
        before and after is written as `<student>/<layer>/error_before`,
        `error_after`, and the student's own errors and losses, where
        measured, as `<student>/error_before`, `loss_after`, ...
    """
    values = {}
    for student, entry in report.items():
      errors = {key: value for key, value in entry.items() if key.startswith(("error", "loss"))}
      for layer, info in entry.get("layers", {}).items():
        errors[layer] = {key: info.get(key) for key in ("error_before", "error_after")}
      values[student] = errors
    self.scalars(phase, values, subdirectory="solve")

  def summary(self, values, figures=()):
    """Writes the `summary` run: every number of `values` and each PNG file of `figures`.

    Args:
      values: nested dicts of numbers, e.g. {"timings": {...}, "accuracy":
        {...}}: a number at keys a, b, c is the scalar "a/b/c".
      figures: paths of PNG files, each written as the image "figures/<file
        name less .png>".
    """
    self.scalars(SUMMARY, values)
    with self._writing(SUMMARY) as write:
      if write:
        for path in figures:
          image = tf.io.decode_png(tf.io.read_file(path))
          name = os.path.splitext(os.path.basename(path))[0]
          tf.summary.image(f"figures/{name}", image[tf.newaxis], step=0)

  def scalars(self, run, values, step=0, subdirectory=""):
    """Writes every finite number of the nested dicts `values` in `run` (in its
    `subdirectory`) at `step` (see `summary`); anything else (None, text, lists) is left
    out."""
    numbers = list(_numbers(values))
    with self._writing(run if numbers else None, subdirectory) as write:
      if write:
        for tag, value in numbers:
          tf.summary.scalar(tag, value, step=step)

  def _run(self, run, subdirectory=""):
    return os.path.normpath(os.path.join(self.directory, self.prefix + run, subdirectory))

  @contextlib.contextmanager
  def _writing(self, run, subdirectory=""):
    """Makes the writer of `run` (in its `subdirectory`) the default while the context lasts;
    gives False when off, or for no run."""
    if self.directory is None or run is None:
      yield False
      return
    writer = tf.summary.create_file_writer(self._run(run, subdirectory))
    try:
      with writer.as_default():
        yield True
    finally:
      writer.close()


def _numbers(values, prefix=""):
  """(tag, number) of every finite number in nested dicts, keys joined by "/"."""
  for key, value in values.items():
    tag = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _numbers(value, tag + "/")
    elif (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value)):
      yield tag, value


def accuracies(teacher, rows, *settings):
  """A results table's accuracies by name, for `Board.summary`.

  Args:
    teacher: the teacher's accuracy, named "teacher".
    rows: dicts with a "method" and the `settings` keys, e.g. {"method":
      "nd_ft", "multiplier": 0.5, "lookahead": 2, "accuracy": 0.8}.
    *settings: the keys that tell rows of one method apart; the first is
      named by its value, the others by key and value ("nd_ft@0.5/lookahead2").

  Returns:
    {"teacher": teacher, "<method>@<setting>...": accuracy}.
  """
  named = {"teacher": teacher}
  for row in rows:
    first, *rest = settings
    name = f"{row['method']}@{_shown(row[first])}" + "".join(
        f"/{s}{_shown(row[s])}" for s in rest if s in row)
    named[name] = row["accuracy"]
  return named


def _shown(value):
  """A setting in a name: 0.5 as "0.5", 1.0 as "1", a count as its digits."""
  return f"{value:g}" if isinstance(value, float) else str(value)
