"""An experiment's final models written in the formats a user deploys: tf_keras and Keras 3
`.keras` files, LiteRT."""

import os

from keras_nd import files, lite

__all__ = ["FORMATS", "checked_formats", "export"]

FORMATS = ("keras", "keras3", "tflite")


def checked_formats(formats):
  """`formats` as a tuple, if each is one of `FORMATS`; else a ValueError names them."""
  if isinstance(formats, str):
    raise TypeError(f"export must be a list of formats, e.g. ('keras3',); got the string "
                    f"{formats!r}.")
  formats = tuple(formats)
  unknown = [f for f in formats if f not in FORMATS]
  if unknown:
    raise ValueError(f"Unknown export formats {unknown}; choose from {list(FORMATS)}.")
  return formats


def export(model, workdir, name, formats):
  """Writes `model` in each of `formats` under `workdir/export/<format>/`; returns the paths.

  keras: `<name>.keras`, a tf_keras file (`keras_nd.files.load_model` loads it);
  keras3: `<name>.keras`, a Keras 3 file of built-in layers only, which
  `keras.saving.load_model(path, safe_mode=True)` loads without keras_nd
  (`files.export_keras3`); tflite: `<name>.tflite`, a float LiteRT file with
  pruned kernels in the sparse encoding (`lite.export_tflite`; quantised
  files: call it yourself). Each file is complete or absent.
  """
  paths = []
  for kind in formats:
    directory = os.path.join(workdir, "export", kind)
    os.makedirs(directory, exist_ok=True)
    if kind == "keras":
      path = os.path.join(directory, f"{name}.keras")
      files.save_model(path, model)
    elif kind == "keras3":
      path = files.export_keras3(model, os.path.join(directory, f"{name}.keras"))
    else:
      path = lite.export_tflite(model, os.path.join(directory, f"{name}.tflite"))
    paths.append(path)
  return paths
