"""The activation cache: teacher activations stored once on disk and streamed back.

Layout of a cache directory::

  shard-00000.bin ...   records of `records_batch` examples (a batch of more
                        than 4 MiB is cut into equal records); a record
                        holds, key after key, the raw bytes of [n, *shape]
                        arrays
  manifest.json         written last and atomically: teacher fingerprint, data
                        fingerprint, keys, shapes, dtype, counts, per-shard
                        sizes and CRC-32 checksums, and the build's seconds

A directory without a manifest is an interrupted build and is rebuilt; one
whose manifest does not match the request is refused. The manifest is synced
to disk, the shards are not (syncing them made a build up to 2.5x slower than
the teacher pass on a disk of a few hundred MB/s): a killed process loses
nothing the operating system has accepted, and shards that a power cut or a
crash of the machine tore fail their size or CRC-32 check when the cache is
next opened, which refuses them and names the shard.

Reading (`read_manifest`, `check_shards`, `dataset`), writing (the shard
writer, `write_manifest`) and computing (the teacher pass the builder is
given) are separate pieces; `open_or_build` joins them.
"""

import hashlib
import json
import os
import queue
import shutil
import threading
import time
import zlib

import numpy as np

from keras_nd import files, keras3
from keras_nd._keras import keras, tf

__all__ = ["DTYPES", "MANIFEST", "check_shards", "dataset", "free_bytes", "open_or_build",
           "read_manifest", "teacher_fingerprint", "write_manifest"]

MANIFEST = "manifest.json"
_FORMAT = "keras_nd.activations/1"
# The storage dtypes a cache accepts, by name.
DTYPES = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32}
# A teacher batch of more bytes is written as several equal records. Reading copies a record
# three times (file buffer, string, tensor) and decoding once more; records of a few MiB keep
# those copies in the CPU caches and below malloc's mmap threshold (beyond 32 MiB every read
# page-faults fresh memory). FixedLengthRecordDataset read a ResNet-20 cache (all 12 tensors,
# 4096 examples) with 2.5x less CPU in 6 MiB records than in 54 MiB ones.
_RECORD_BYTES = 4 * 2**20


def teacher_fingerprint(model):
  """SHA-256 of a model's architecture and weights (BatchNorm statistics included); a Keras 3
  model's are its tf_keras conversion's."""
  model = keras3.to_tf_keras(model)
  digest = hashlib.sha256(model.to_json().encode())
  for weight in model.weights:
    digest.update(weight.name.encode())
    digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
  return digest.hexdigest()


def free_bytes(path):
  """Free space on the file system holding `path` (a seam for tests)."""
  return shutil.disk_usage(path).free


# Reading.


def read_manifest(directory):
  """The cache's manifest, or None if the cache is absent or incomplete."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"The activation cache manifest '{path}' is corrupt ({e}); delete the "
                     "directory to rebuild the cache.") from None


def check_shards(directory, manifest, checksums=True):
  """Raises ValueError naming the first shard that is missing, truncated or corrupt."""
  for shard in manifest["shards"]:
    path = os.path.join(directory, shard["file"])
    if not os.path.exists(path):
      raise ValueError(f"Activation cache shard '{path}' is missing; delete '{directory}' to "
                       "rebuild the cache.")
    size = os.path.getsize(path)
    if size != shard["bytes"]:
      raise ValueError(f"Activation cache shard '{path}' has {size} bytes, the manifest says "
                       f"{shard['bytes']}: it is truncated or damaged; delete '{directory}' to "
                       "rebuild the cache.")
    if checksums:
      crc = 0
      with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
          crc = zlib.crc32(chunk, crc)
      if crc != shard["crc32"]:
        raise ValueError(f"Activation cache shard '{path}' fails its CRC-32 check: it is "
                         f"corrupt; delete '{directory}' to rebuild the cache.")


def dataset(directory, manifest, keys, batch_size, shuffle, seed, shuffle_bytes):
  """The cache's examples of `keys`, in batches of `batch_size`: a dataset of {key: tensor}.

  Args:
    directory, manifest: the cache (see `read_manifest`).
    keys: the activations to serve (a subset of the manifest's).
    batch_size: examples per batch.
    shuffle: shard order, then the examples within windows of about
      `shuffle_bytes / 2`, a new order every epoch; when all served
      activations fit in `shuffle_bytes` they are read once, kept in memory
      and permuted as a whole every epoch. Unshuffled: the dataset's order.
    seed: shuffling seed.
    shuffle_bytes: memory budget for shuffling.
  """
  paths = [os.path.join(directory, s["file"]) for s in manifest["shards"]]
  record_bytes = [s["record_bytes"] for s in manifest["shards"]]
  storage = DTYPES[manifest["dtype"]]
  # A record of n examples holds, key after key, [n, *shape] arrays: the key at element
  # offset `start` of an example spans elements [n * start, n * (start + size)) of the record.
  parts, per_example = {}, 0
  for key in manifest["keys"]:
    shape = manifest["shapes"][key]
    size = int(np.prod(shape, dtype=np.int64))
    if key in keys:
      parts[key] = (per_example, size, shape)
    per_example += size
  served = sum(size for _, size, _ in parts.values())

  def read(path, nbytes):
    examples = nbytes // (per_example * storage.size)
    return tf.data.FixedLengthRecordDataset(path, nbytes, buffer_size=4 * 2**20).map(
        lambda record: (record, examples))

  def decode(record, n):
    if 2 * served >= per_example:  # decode it all once; the slices are views of it
      flat = tf.io.decode_raw(record, storage)
      return {k: tf.reshape(flat[n * start:n * (start + size)], [-1] + shape)
              for k, (start, size, shape) in parts.items()}
    # Mostly other keys: copy out only the served ones.
    item = storage.size
    return {k: tf.reshape(tf.io.decode_raw(tf.strings.substr(record, n * start * item,
                                                             n * size * item), storage),
                          [-1] + shape)
            for k, (start, size, shape) in parts.items()}

  ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(record_bytes, tf.int64)))
  if shuffle:
    ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
  # Unshuffled, shards are read one after another so examples come in dataset order. Reading
  # is deterministic either way: the batches of a seed are the same in every job and run.
  ds = ds.interleave(read, cycle_length=min(4, len(paths)) if shuffle else 1,
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if not shuffle:
    return ds.rebatch(batch_size)
  # Examples are shuffled within windows: a window is permuted and served by one gather per
  # batch, where a per-example shuffle buffer (unbatch, shuffle, batch) would copy every
  # example twice and handle each one alone.
  # The order of examples depends on the cache, the seed and the served neighbourhoods (the
  # window sizes): jobs that share the work build their sources over the same neighbourhoods
  # (all of them) and so serve the same batches, whichever ones each job distils.
  examples = manifest["examples"]
  if examples * served * storage.size <= shuffle_bytes:
    # Everything served fits the budget: one window, decoded once and kept, permuted anew
    # every epoch (as in-memory arrays would be).
    windows = ds.rebatch(examples).cache()
  else:
    # Two windows are held (one served, the next one read meanwhile): each is half the
    # budget, in whole batches.
    window = shuffle_bytes // 2 // (served * storage.size) // batch_size
    windows = ds.rebatch(max(1, window) * batch_size)
  seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
  windows = tf.data.Dataset.zip((windows, seeds)).prefetch(1)
  return windows.flat_map(lambda tensors, pair: _shuffled_batches(tensors, pair, batch_size))


def _shuffled_batches(tensors, seed, batch_size):
  """The examples of a window in batches, in a random order (one order shared by every key)."""
  count = tf.shape(next(iter(tensors.values())), out_type=tf.int64)[0]
  order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=seed)
  return tf.data.Dataset.range(0, count, batch_size).map(
      lambda start: {k: tf.gather(v, order[start:start + batch_size]) for k, v in tensors.items()})


# Writing.


def write_manifest(directory, manifest):
  """Writes the manifest atomically: the cache counts as complete only once this returns."""
  files.write_json(os.path.join(directory, MANIFEST), manifest)


class _ShardWriter:
  """Writes records to shard files on a background thread, overlapping the teacher's passes."""

  def __init__(self, directory, example_bytes, shard_bytes):
    self.dir = directory
    self.example_bytes = example_bytes
    self.shard_bytes = shard_bytes
    self.shards = []
    self._queue = queue.Queue(maxsize=4)
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._error = None
    self._file = None

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, exc_type, *_):
    self._queue.put(None)
    self._thread.join()
    if self._error is not None and exc_type is None:
      raise self._error

  def put(self, arrays):
    if self._error is not None:
      raise self._error
    self._queue.put(arrays)

  def _run(self):
    try:
      while (arrays := self._queue.get()) is not None:
        self._write(arrays)
      self._close()
    except Exception as e:  # pylint: disable=broad-except
      self._error = e
      if files.disk_full(e):
        self._error = OSError(e.errno, f"The disk holding the activation cache in '{self.dir}' "
                              "is full: free space, choose another cache_dir, use "
                              "dtype='float16', or use online mode (cache_dir=None). The "
                              "incomplete cache is removed by the next build.")
      while self._queue.get() is not None:
        pass

  def _write(self, arrays):
    n = arrays[0].shape[0]
    size = n // _records_per_batch(n, self.example_bytes)
    for start in range(0, n, size):
      self._write_record([array[start:start + size] for array in arrays])

  def _write_record(self, arrays):
    n = arrays[0].shape[0]
    record_bytes = n * self.example_bytes
    shard = self.shards[-1] if self.shards else None
    if (self._file is None or shard["record_bytes"] != record_bytes or
        shard["bytes"] + record_bytes > self.shard_bytes):
      self._close()
      name = f"shard-{len(self.shards):05d}.bin"
      self._file = open(os.path.join(self.dir, name), "wb")
      shard = {"file": name, "record_bytes": record_bytes, "records": 0, "examples": 0,
               "bytes": 0, "crc32": 0}
      self.shards.append(shard)
    for array in arrays:
      data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)  # bfloat16 has no buffer format
      self._file.write(data)
      shard["crc32"] = zlib.crc32(data, shard["crc32"])
    shard["records"] += 1
    shard["examples"] += n
    shard["bytes"] += record_bytes

  def _close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


def _records_per_batch(n, example_bytes):
  """Into how many equal records a batch of n examples is cut: the fewest of at most _RECORD_BYTES.

  Equal cuts keep every full batch's records the same length, so shards stay uniform.
  """
  count = max(1, -(-n * example_bytes // _RECORD_BYTES))
  while n % count:
    count += 1
  return count


# Building: the teacher's pass computes, the writer writes.


def open_or_build(directory, teacher, inputs, shapes, storing_pass, dtype, examples=-1,
                  records_batch=256, shard_bytes=256 * 2**20, data_fingerprint=None, verify=True,
                  verbose=1):
  """Opens the complete cache in `directory` that matches the request, or builds it.

  Args:
    directory: the cache directory (writable).
    teacher: the model whose activations are cached (its fingerprint keys
      the cache).
    inputs: a dataset of batches of teacher inputs.
    shapes: {key: shape of one example} of the activations to store, in the
      order `storing_pass` returns them.
    storing_pass: inputs -> the list of activations, cast to `dtype`.
    dtype: the storage dtype's name (a key of `DTYPES`).
    examples: how many examples `inputs` holds (negative: unknown, counted).
    records_batch: examples per batch of `inputs` (the last may be fewer).
    shard_bytes: approximate size of one shard file.
    data_fingerprint: a string naming the data; None hashes every input.
    verify: check every shard's CRC-32 of an existing cache.
    verbose: 1 prints the cache's size and a progress bar while building.

  Returns:
    The cache's manifest.

  Raises:
    ValueError: an empty dataset, NaN or infinite inputs, or a cache in
      `directory` built for another teacher, data, dtype or fewer keys.
    OSError: too little free disk.
  """
  if next(iter(inputs.take(1)), None) is None:
    raise ValueError(f"The dataset for the activation cache in '{directory}' is empty.")
  spec = _spec(directory, teacher, inputs, dtype, data_fingerprint)
  # Jobs sharing the directory take turns: one builds, the others then find it complete.
  with files.locked(os.path.join(directory, ".lock")):
    manifest = read_manifest(directory)
    if manifest is not None:
      _check_matches(directory, manifest, spec, list(shapes))
      check_shards(directory, manifest, checksums=verify)
      if verbose:
        print(f"Reusing the activation cache in {directory} ({manifest['examples']} examples).")
      return manifest
    return _build(directory, spec, inputs, shapes, storing_pass, examples, records_batch,
                  shard_bytes, verbose)


def _spec(directory, teacher, inputs, dtype, data_fingerprint):
  data_id = data_fingerprint
  if data_id is None:  # every input, streamed: reading them is cheap beside the teacher
    digest = hashlib.sha256()
    count = 0
    for x in inputs:
      digest.update(np.ascontiguousarray(x.numpy()).tobytes())
      count += int(x.shape[0])
    if not count:
      raise ValueError(f"The dataset for the activation cache in '{directory}' is empty.")
    data_id = f"sha256:{digest.hexdigest()}:{count}"
  return {"format": _FORMAT, "teacher": teacher.name,
          "teacher_fingerprint": teacher_fingerprint(teacher), "data_fingerprint": data_id,
          "dtype": dtype}


def _check_matches(directory, manifest, spec, keys):
  for field in ("format", "teacher_fingerprint", "data_fingerprint", "dtype"):
    if manifest.get(field) != spec[field]:
      raise ValueError(
          f"The activation cache in '{directory}' was built for another "
          f"{field.replace('_', ' ')} ({manifest.get(field)!r}, requested {spec[field]!r}). Use "
          "another cache_dir, or delete this one to rebuild it.")
  missing = [k for k in keys if k not in manifest["keys"]]
  if missing:
    raise ValueError(f"The activation cache in '{directory}' lacks the activations {missing} "
                     "that these neighbourhoods need; use another cache_dir, or delete this one "
                     "to rebuild it.")


def _build(directory, spec, inputs, shapes, storing_pass, examples, records_batch, shard_bytes,
           verbose):
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):  # leftovers of an interrupted build
    if name.startswith("shard-") or name.startswith(MANIFEST):
      os.remove(os.path.join(directory, name))
  storage = DTYPES[spec["dtype"]]
  keys = list(shapes)
  example_bytes = sum(int(np.prod(shapes[k], dtype=np.int64)) * storage.size for k in keys)
  if examples < 0:  # unknown: count them (reading the inputs is cheap beside the teacher)
    examples = int(inputs.reduce(0, lambda n, x: n + tf.shape(x)[0]))
  if examples == 0:
    raise ValueError(f"The dataset for the activation cache in '{directory}' is empty.")
  batches = -(-examples // records_batch)
  _check_space(directory, example_bytes, examples, verbose)
  start = time.perf_counter()
  writer = _ShardWriter(directory, example_bytes, shard_bytes)
  progbar = keras.utils.Progbar(batches, unit_name="batch", verbose=verbose)
  examples = 0
  with writer:
    for step, x in enumerate(inputs):
      if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(x, tf.float32)))):
        raise ValueError(f"The dataset for the activation cache in '{directory}' has NaN or "
                         f"infinite values in batch {step} (examples {examples}.."
                         f"{examples + int(tf.shape(x)[0]) - 1}); the cache was not completed.")
      # np.asarray views the tensor's memory (`.numpy()` would copy it); the view keeps the
      # buffer alive until the writer thread has written it.
      arrays = [np.asarray(t) for t in storing_pass(x)]
      writer.put(arrays)
      examples += arrays[0].shape[0]
      progbar.update(min(step + 1, batches))
  manifest = dict(spec, keys=keys, shapes={k: list(shapes[k]) for k in keys},
                  examples=examples, example_bytes=example_bytes, shards=writer.shards,
                  build_seconds=time.perf_counter() - start)
  write_manifest(directory, manifest)
  return manifest


def _check_space(directory, example_bytes, examples, verbose):
  estimate = examples * example_bytes
  free = free_bytes(directory)
  if verbose:
    print(f"Building the activation cache in {directory}: about {estimate / 2**20:.1f} MiB "
          f"({example_bytes / 2**10:.1f} KiB per example, {free / 2**30:.1f} GiB free).")
  if estimate > free:
    raise OSError(f"The activation cache needs about {estimate / 2**20:.1f} MiB but only "
                  f"{free / 2**20:.1f} MiB are free in '{directory}'. Free space, choose another "
                  "cache_dir, use dtype='float16', or use online mode (cache_dir=None).")
