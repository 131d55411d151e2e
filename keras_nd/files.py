"""Files: an exclusive lock for jobs that share a directory, writes that are complete or absent,
and loading models safely.
"""

import contextlib
import errno
import json
import os

from keras_nd import models  # noqa: F401  (registers its layers, so that load_model knows them)
from keras_nd._keras import keras

__all__ = ["atomic", "disk_full", "load_model", "locked", "save_model", "writable_directory",
           "write_json"]

try:
  import fcntl
except ImportError:  # not POSIX: jobs sharing a directory are not serialised
  fcntl = None


@contextlib.contextmanager
def locked(path):
  """Holds an exclusive lock on the file `path` (created if absent) for the `with` block.

  Jobs that would build the same thing (a teacher, an activation cache) take
  the lock first: one builds, the others wait and then find it built. The
  operating system releases the lock when its holder exits, killed or not.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    if fcntl is not None:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def writable_directory(path, what="directory"):
  """Makes sure `path` is a directory this process can write to (created if absent); returns it.

  Raises:
    NotADirectoryError: `path` is a file.
    PermissionError: it cannot be created, or is not writable.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"The {what} '{path}' is a file, not a directory; pass a directory "
                             "(it is created if absent).")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise PermissionError(f"The {what} '{path}' cannot be created: {error.strerror}. Choose a "
                          "directory you can write to.") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"The {what} '{path}' is not writable; choose a directory you can "
                          "write to, or fix its permissions.")
  return path


def disk_full(error):
  """Whether an OSError says the disk is full (or the quota is spent)."""
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic(path, mode="w"):
  """A file to write `path` through: a temporary file beside it, flushed to disk and renamed to
  `path` when the `with` block ends, removed if the block fails. A file at `path` is therefore
  always complete."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path, value):
  """Writes `value` as JSON to `path` atomically (`atomic`)."""
  with atomic(path) as f:
    json.dump(value, f, indent=1)


def load_model(path, trusted=False):
  """A tf_keras model from a `.keras` file, loaded with `safe_mode=True`.

  TensorFlow models are programs. `.keras` files are loaded in safe mode,
  which refuses the Python code a Lambda layer would run; other formats
  (`.h5`, SavedModel directories) can run code on loading and are refused
  unless `trusted` is True, which also turns safe mode off.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: a format that is not trusted, or a file that is not a
      readable model (corrupt, truncated, or from another program), naming
      the path.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No model at '{path}'.")
  if not trusted and not path.endswith(".keras"):
    raise ValueError(f"'{path}' is not a .keras file; other formats (.h5, SavedModel) can run code "
                     "when loaded. Convert it to .keras, or pass trusted=True if you trust it.")
  try:
    return keras.models.load_model(path, safe_mode=not trusted)
  except (OSError, ValueError, TypeError, KeyError) as error:
    message = str(error)
    if "safe_mode" in message:  # Keras's advice names its own argument, not this function's
      raise ValueError(f"'{path}' holds a Lambda layer (Python code that would run when it is "
                       "loaded), which safe mode refuses. If you trust the file, load it with "
                       "trusted=True.") from None
    raise ValueError(f"'{path}' is not a readable Keras model: {type(error).__name__}: "
                     f"{message[:500]}") from None


def save_model(path, model, info=None):
  """Saves `model` to `path` (.keras) and `info` beside it (.json), the model renamed last.

  A model file that exists is therefore complete, and so is its `.json`.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path[:-len('.keras')]}.tmp{os.getpid()}.keras"
  model.save(tmp)
  if info is not None:
    write_json(path[:-len(".keras")] + ".json", info)
  os.replace(tmp, path)
