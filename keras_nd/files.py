"""Files that several jobs share: an exclusive lock, and writes that are complete or absent."""

import contextlib
import json
import os

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


def write_json(path, value):
  """Writes `value` as JSON to `path` atomically (a temporary file, flushed, then renamed)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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
