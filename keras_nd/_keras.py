"""The one module that imports Keras.

tfmot's pruning wrappers accept only tf_keras (Keras 2) models, so keras_nd is
built on tf_keras throughout. `TF_USE_LEGACY_KERAS` must be set before
TensorFlow first touches Keras, which is why every other module takes `keras`
(and `tf`) from here instead of importing them itself.
"""

import contextlib
import importlib
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _start_up_lines_hidden():
  """At TF_CPP_MIN_LOG_LEVEL=3 (fatal only; the binaries' default), the lines TensorFlow's
  native libraries print while they load, before they read that setting (twice, one set per
  library), are hidden: standard error is closed for the import only."""
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
    yield
    return
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


with _start_up_lines_hidden():
  import tensorflow as tf  # noqa: E402
  import tf_keras as keras  # noqa: E402

KerasTensor = type(keras.Input((1,)))

_TFMOT = "tensorflow_model_optimization"
_KERAS3 = "keras"


def tfmot(submodule="", imported_only=False):
  """tensorflow_model_optimization (or its `submodule`, e.g. "python.core.sparsity.keras"),
  imported on first use: tfmot takes about a second to import, which `import keras_nd` and work
  without pruning should not pay.

  Args:
    submodule: a module inside tfmot, dotted; "" for tfmot itself.
    imported_only: return None instead of importing when nothing has imported
      tfmot yet (then no model can hold its pruning wrappers).
  """
  if imported_only and _TFMOT not in sys.modules:
    return None
  return importlib.import_module(f"{_TFMOT}.{submodule}" if submodule else _TFMOT)


def keras3(imported_only=False):
  """Keras 3 (the `keras` package), imported on first use: only converting a Keras 3 model in
  or out needs it, and `import keras_nd` should not pay for importing a second Keras.

  Args:
    imported_only: return None instead of importing when nothing has imported
      Keras 3 yet (then no Keras 3 model can exist in this process).
  """
  if imported_only and f"{_KERAS3}.src.models" not in sys.modules:
    return None
  return importlib.import_module(_KERAS3)


__all__ = ["tf", "keras", "KerasTensor", "keras3", "tfmot"]
