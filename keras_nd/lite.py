"""LiteRT (TensorFlow Lite) export of a tf_keras model, and running an exported model.

`export_tflite` converts a keras_nd teacher or student with TensorFlow's
converter, float or quantised, sparse kernels in the converter's sparse
encoding; `evaluate_tflite` scores the file's top-1 accuracy as
`keras_nd.metrics.accuracy` scores a Keras model; `interpreter` makes the
interpreter that runs it (what a latency measurement times); `op_counts`
says what the converter wrote.

The interpreter is LiteRT's own, from the `ai-edge-litert` package: it
installed next to TensorFlow 2.21 and NumPy 2.4 with nothing but itself and
a small backport, runs every file the TensorFlow converter writes here (float,
dynamic-range, int8, sparse-encoded) with the same results as
`tf.lite.Interpreter` (within float rounding), and is where LiteRT's runtime
goes on: `tf.lite.Interpreter` is deprecated and warns so on every use.

What the sparse encoding does (`sparse=True`, TensorFlow 2.21): a kernel with
enough zeros is stored with its output and spatial axes dense and its input
channels compressed (CSR: a 2-byte offset per output row, a 1-byte channel
index and the value per non-zero), and a DENSIFY op in front of its
convolution expands it when the interpreter prepares the model. The
convolutions then run as dense ones (no sparse kernel runs on the CPU, 2:4
included), so latency is unchanged; what shrinks is the file: a ResNet-20's
float file with 50% of its kernels zero takes 0.65 of its dense size, with 70%
0.41 (gzipped, the gain is 3-8%: gzip squeezes the zeros too). An int8
value is as small as its index, so int8 kernels grow at 50% (and 2:4) and
shrink only at higher sparsity; dynamic-range kernels are never encoded, since
LiteRT's default CPU delegate (XNNPACK) cannot run a densified dynamic-range
kernel and the file would not load.
"""

import os
import warnings

import numpy as np
from ai_edge_litert import interpreter as litert
from ai_edge_litert import schema_py_generated as schema

from keras_nd import files, graph, metrics, sparsity
from keras_nd._keras import tf
from keras_nd.batches import as_batches

__all__ = ["QUANTIZE", "REPRESENTATIVE_IMAGES", "evaluate_tflite", "export_tflite", "interpreter",
           "op_counts"]

QUANTIZE = (None, "dynamic", "int8")
# Calibration runs every representative image through the model one at a time; a few hundred
# give the int8 ranges as well as thousands do.
REPRESENTATIVE_IMAGES = 512


def export_tflite(model, path, quantize=None, sparse=True, representative=None):
  """Writes `model` as a LiteRT (.tflite) file at `path`, complete or not at all.

  Args:
    model: a single-input, single-output functional tf_keras model (a
      keras_nd teacher or student), or a Keras 3 one (converted first, as
      every entry point of keras_nd does). tfmot pruning wrappers are
      stripped first (`sparsity.strip`, which applies their masks in place
      and refuses a layer short of its target).
    path: the file to write. It is written through a temporary file beside
      it and renamed (`files.atomic`): on any failure nothing is left at
      `path` (a file already there stays as it was).
    quantize: None (float32), "dynamic" (int8 weights, activations
      quantised on the fly; no data needed) or "int8" (full integer: weights
      and activations int8, biases int32, activation ranges calibrated on
      `representative`; no op falls back to float). Every export keeps float32 input and output,
      so it takes the Keras model's own images and gives its logits; the
      int8 file quantises its input and dequantises its output itself.
    sparse: store kernels with enough zeros in the converter's sparse
      encoding (see the module's docstring) for float and int8 exports;
      dynamic-range exports stay dense, which LiteRT's CPU delegate needs.
    representative: images for int8's calibration (required by it, checked
      whenever given): a numpy array `(N,) + input shape`, a tuple `(x, y)`
      of arrays, or a `tf.data.Dataset` of batches of images or of `(images,
      labels, ...)` (unbatched images are batched). The first
      `REPRESENTATIVE_IMAGES` are used.

  Returns:
    `path`.

  Raises:
    TypeError: `model` is not a functional Keras model, or `representative`
      is of a type not accepted.
    ValueError: an unknown `quantize`; int8 without `representative`; a
      representative set that is empty, of another image shape than the
      model's input (both shapes named) or holds NaN or infinite values; a
      model of several inputs or outputs.
    RuntimeError: the converted file does not load in the interpreter.
  """
  model = graph.check_functional(model)  # a Keras 3 model: its tf_keras conversion
  if quantize not in QUANTIZE:
    raise ValueError(f"quantize must be one of {list(QUANTIZE)}; got {quantize!r}.")
  if quantize == "int8" and representative is None:
    raise ValueError("quantize='int8' calibrates its ranges on data: pass representative= a few "
                     "hundred images in the layout the model takes.")
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"'{path}' is a directory; pass the path of the .tflite file.")
  images = None if representative is None else _representative(model, representative)
  if sparsity.prunes(model):
    model = sparsity.strip(model)
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  converter.optimizations = [tf.lite.Optimize.DEFAULT] if quantize else []
  if sparse and quantize != "dynamic":
    converter.optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
  if quantize == "int8":
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    # Full integer: conversion fails rather than leave an op in float.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  with warnings.catch_warnings():
    # Said of every int8 model with float inputs, which is what is asked for here.
    warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
    content = converter.convert()
  try:
    litert.Interpreter(model_content=content).allocate_tensors()
  except (RuntimeError, ValueError) as error:
    raise RuntimeError(f"The LiteRT file converted from model '{model.name}' (quantize="
                       f"{quantize!r}, sparse={sparse}) does not load in the interpreter, so it "
                       f"was not written: {error}") from None
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic(path, "wb") as f:
    f.write(content)
  return path


def _representative(model, representative):
  """The first `REPRESENTATIVE_IMAGES` images of `representative`, float32, checked."""
  if isinstance(representative, np.ndarray):  # no copy of a whole training set into a tensor
    representative = representative[:REPRESENTATIVE_IMAGES]
  unbatched = isinstance(representative, tf.data.Dataset)  # arrays are sliced into batches
  dataset = as_batches(representative, what="representative")
  expected = tuple(model.input_shape[1:])
  spec = dataset.element_spec
  spec = spec[0] if isinstance(spec, (tuple, list)) else spec
  if unbatched and isinstance(spec, tf.TensorSpec) and spec.shape.rank == len(expected):
    dataset = dataset.batch(64)  # a dataset of single images
  chunks, count = [], 0
  for batch in dataset:
    x = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch)
    if x.ndim != len(expected) + 1 or any(
        e is not None and e != s for e, s in zip(expected, x.shape[1:])):
      raise ValueError(f"representative holds images of shape {x.shape[1:]} (a batch "
                       f"{x.shape}); model '{model.name}' takes images of shape {expected}.")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
      raise TypeError(f"representative holds {x.dtype} values; pass real-valued images.")
    x = x[:REPRESENTATIVE_IMAGES - count].astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
      first = count + int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0, 0])
      raise ValueError(f"representative holds {int(bad.sum())} non-finite values (NaN or "
                       f"infinite), the first in image {first}; calibrate on finite images.")
    chunks.append(x)
    count += len(x)
    if count >= REPRESENTATIVE_IMAGES:
      break
  if not count:
    raise ValueError("representative holds no images.")
  return np.concatenate(chunks)


def interpreter(path, batch_size=1, num_threads=1, xnnpack=True):
  """A LiteRT interpreter of the file at `path`, its input resized to `batch_size`, allocated.

  Args:
    path: a .tflite file (e.g. from `export_tflite`).
    batch_size: the batch its input takes.
    num_threads: CPU threads of its kernels (LiteRT's own default is 1).
    xnnpack: run through LiteRT's default CPU delegate, XNNPACK (False: its
      built-in reference-optimised kernels only).

  Returns:
    An `ai_edge_litert.interpreter.Interpreter`, ready for `set_tensor` and
    `invoke`.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: a file the interpreter cannot read, named.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No LiteRT model at '{path}'.")
  options = {} if xnnpack else {
      "experimental_op_resolver_type": litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
  try:
    runner = litert.Interpreter(model_path=path, num_threads=num_threads, **options)
  except (RuntimeError, ValueError) as error:
    raise ValueError(f"'{path}' is not a LiteRT model the interpreter can read: {error}") from None
  _resize(runner, batch_size)
  return runner


def _resize(runner, batch_size):
  detail = runner.get_input_details()[0]
  runner.resize_tensor_input(detail["index"], [batch_size] + list(detail["shape"][1:]))
  runner.allocate_tensors()


class _Model:
  """An interpreter called as `metrics.accuracy` calls a Keras model: a batch in, outputs out."""

  def __init__(self, path, num_threads):
    self.runner = interpreter(path, num_threads=num_threads)
    self.input = self.runner.get_input_details()[0]
    self.output = self.runner.get_output_details()[0]["index"]
    if self.input["dtype"] != np.float32:
      raise ValueError(f"'{path}' takes {np.dtype(self.input['dtype']).name} inputs; "
                       "evaluate_tflite runs models with float32 inputs (export_tflite's).")
    self.batch_size = 1

  def __call__(self, x, training=False):
    x = np.asarray(x, np.float32)
    if len(x) != self.batch_size:
      self.batch_size = len(x)
      _resize(self.runner, self.batch_size)
    self.runner.set_tensor(self.input["index"], x)
    self.runner.invoke()
    return tf.convert_to_tensor(self.runner.get_tensor(self.output))


def evaluate_tflite(path, dataset, batch_size=256, num_threads=1):
  """Top-1 accuracy of the LiteRT model at `path` on labelled batches (`metrics.accuracy`'s).

  Args:
    path: a .tflite file with float32 input (every `export_tflite` file).
    dataset: a `tf.data.Dataset` of batches `(x, y, ...)`, or a tuple of
      arrays `(x, y)`, batched by `batch_size`.
    batch_size: the batch size of arrays.
    num_threads: CPU threads of the interpreter.

  Returns:
    The fraction of examples whose largest output is their label.
  """
  return metrics.accuracy(_Model(path, num_threads), dataset, batch_size)


def op_counts(path):
  """{op name: how many} of the LiteRT file at `path` (e.g. "CONV_2D", "DENSIFY": one per
  sparse-encoded kernel, "QUANTIZE")."""
  with open(os.fspath(path), "rb") as f:
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(f.read(), 0))
  names = {code: name for name, code in vars(schema.BuiltinOperator).items()
           if not name.startswith("_")}
  counts = {}
  for subgraph in model.subgraphs:
    for op in subgraph.operators:
      code = model.operatorCodes[op.opcodeIndex]
      # Codes past 127 are in builtinCode alone; the deprecated field caps at 127.
      name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
      counts[name] = counts.get(name, 0) + 1
  return counts
