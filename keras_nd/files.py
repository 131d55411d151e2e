"""Files: an exclusive lock for jobs that share a directory, writes that are complete or absent,
and loading models safely.
"""

import contextlib
import errno
import json
import os
import tempfile
import zipfile

from keras_nd import (
  keras3,
  models,  # noqa: F401  (registers its layers, so that load_model knows them)
  sparsity,
)
from keras_nd._keras import keras

__all__ = ["atomic", "disk_full", "export_keras3", "keras_version", "load_model", "locked",
           "save_model", "writable_directory", "write_json"]

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


def keras_version(path):
  """The version of Keras that wrote the `.keras` file `path` ("2.21.0", "3.15.1"), or None where
  the file does not say (not a zip archive, or no readable metadata.json in it)."""
  try:
    with zipfile.ZipFile(path) as archive:
      version = json.loads(archive.read("metadata.json")).get("keras_version")
  except (OSError, KeyError, ValueError, zipfile.BadZipFile, AttributeError):
    return None
  return version if isinstance(version, str) else None


def load_model(path, trusted=False):
  """A tf_keras model from a `.keras` file, loaded with `safe_mode=True`.

  TensorFlow models are programs. `.keras` files are loaded in safe mode,
  which refuses the Python code a Lambda layer would run; other formats
  (`.h5`, SavedModel directories) can run code on loading and are refused
  unless `trusted` is True, which also turns safe mode off. A file Keras 3
  wrote (its metadata says so) is loaded by Keras 3, in safe mode unless
  `trusted`, and converted to tf_keras (`keras_nd.keras3.to_tf_keras`).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: a format that is not trusted, or a file that is not a
      readable model (corrupt, truncated, or from another program), or a
      Keras 3 model that cannot be converted, naming the path.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No model at '{path}'.")
  if not trusted and not path.endswith(".keras"):
    raise ValueError(f"'{path}' is not a .keras file; other formats (.h5, SavedModel) can run code "
                     "when loaded. Convert it to .keras, or pass trusted=True if you trust it.")
  version = keras_version(path) if path.endswith(".keras") else None
  loader = keras.models.load_model
  if version is not None and version.startswith("3."):
    loader = keras3.load_keras3
  try:
    model = loader(path, safe_mode=not trusted)
  except (OSError, ValueError, TypeError, KeyError) as error:
    message = str(error)
    if "safe_mode" in message:  # Keras's advice names its own argument, not this function's
      raise ValueError(f"'{path}' holds a Lambda layer (Python code that would run when it is "
                       "loaded), which safe mode refuses. If you trust the file, load it with "
                       "trusted=True.") from None
    raise ValueError(f"'{path}' is not a readable Keras model: {type(error).__name__}: "
                     f"{message[:500]}") from None
  try:
    return keras3.to_tf_keras(model)
  except (TypeError, ValueError) as error:
    raise type(error)(f"The Keras 3 model in '{path}' cannot be converted to tf_keras: "
                      f"{error}") from None


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


def export_keras3(model, path):
  """Writes the tf_keras `model` to `path` as a `.keras` file of Keras 3 built-ins only.

  The file loads with Keras 3's `keras.saving.load_model(path, safe_mode=True)`
  in a process that never imports keras_nd (`keras_nd.keras3.to_keras3` says
  how keras_nd's own layers are written). Before the file appears at `path`,
  it is read back by Keras 3 and checked to compute `model`'s outputs on
  random inputs; a failure at any step leaves nothing at `path`. tfmot pruning
  wrappers are stripped first (their kernels keep their zeros).

  Args:
    model: a functional or Sequential tf_keras model (or a Keras 3 one).
    path: where to write it; must end in ".keras".

  Returns:
    `path`.

  Raises:
    TypeError: a subclassed model.
    ValueError: a path without ".keras", a layer Keras 3 has no built-in
      for (named), or a file that does not compute the model's outputs.
  """
  path = os.fspath(path)
  if not path.endswith(".keras"):
    raise ValueError(f"The path to export to must end in '.keras'; got '{path}'.")
  model = keras3.to_tf_keras(model)
  if not isinstance(model, keras.Model):
    raise TypeError(f"model must be a tf_keras Model; got {type(model).__name__}.")
  if sparsity.prunes(model):
    model = sparsity.strip(model)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as directory:
    written = os.path.join(directory, os.path.basename(path))
    keras3.to_keras3(model).save(written)
    _check_export(written, model)
    with open(written, "rb") as f, atomic(path, "wb") as out:
      out.write(f.read())
  return path


def _modules(config):
  """The "module" of every object serialised in a Keras config."""
  if isinstance(config, dict):
    if isinstance(config.get("module"), str):
      yield config["module"]
    for value in config.values():
      yield from _modules(value)
  elif isinstance(config, list):
    for value in config:
      yield from _modules(value)


def _check_export(path, model):
  """Raises ValueError unless Keras 3 reads `path` as built-ins only that compute `model`."""
  with zipfile.ZipFile(path) as archive:
    config = json.loads(archive.read("config.json"))
  foreign = sorted({m for m in _modules(config) if m != "keras" and not m.startswith("keras.")})
  if foreign:
    raise ValueError(f"The Keras 3 file written for '{model.name}' names modules other than Keras "
                     f"3's ({foreign}); it would not load without them.")
  keras3.check_outputs(model, keras3.load_keras3(path),
                       f"The Keras 3 file written for '{model.name}'")
