"""Tests for keras_nd.activations (ActivationSource: cached, online and noise modes)."""

import contextlib
import io
import json
import os
import re
import warnings
import zlib
from unittest import mock

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import activations, cache
from keras_nd._keras import keras, tf

# 50 examples in records of 16: three full records and a partial one of 2.
_EXAMPLES = 50
_RECORDS_BATCH = 16
# Storage precision of each cache dtype: float16 keeps 11 significant bits,
# bfloat16 8, so their relative rounding errors are 2^-11 and 2^-8.
_TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


class _CountingIdentity(keras.layers.Layer):
  """The identity, counting its executions: one per teacher forward pass."""

  def build(self, input_shape):
    self.calls = self.add_weight(name="calls", shape=(), dtype="int64", initializer="zeros",
                                 trainable=False)
    super().build(input_shape)

  def call(self, inputs):
    self.calls.assign_add(1)
    return tf.identity(inputs)


def _counting_teacher():
  """A small chain whose first layer counts the teacher's forward passes."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((8, 8, 3), name="image")
  x = _CountingIdentity(name="counter")(inputs)
  x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)
  x = keras.layers.ReLU(name="r1")(x)
  x = keras.layers.Conv2D(6, 3, padding="same", name="c2")(x)
  x = keras.layers.Flatten(name="flat")(x)
  outputs = keras.layers.Dense(3, name="logits")(x)
  return keras.Model(inputs, outputs, name="counting_chain")


def _served(dataset):
  """{hood name: list of the served components, each concatenated over the epoch}."""
  parts = {}
  for batch in dataset:
    for name, item in batch.items():
      flat = tf.nest.flatten(item)
      parts.setdefault(name, [[] for _ in flat])
      for store, tensor in zip(parts[name], flat):
        store.append(tensor.numpy())
  return {name: [np.concatenate(p) for p in components] for name, components in parts.items()}


class ActivationSourceTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    x, y = testing.images(64)
    cls.teacher = testing.trained(testing.tiny_resnet(), x, y)
    cls.hoods = nd.split(cls.teacher)
    cls.x, cls.y = x[:_EXAMPLES], y[:_EXAMPLES]
    tensors = {h.input_tensor.ref(): h.input_tensor for h in cls.hoods}
    tensors.update({h.output_tensor.ref(): h.output_tensor for h in cls.hoods})
    refs = list(tensors)
    values = keras.Model(cls.teacher.input, [tensors[r] for r in refs])(cls.x, training=False)
    cls.ref = {r: v.numpy() for r, v in zip(refs, values)}

  def _activation(self, tensor):
    return self.ref[tensor.ref()]

  def _cache_dir(self, name="cache"):
    return os.path.join(self.get_temp_dir(), self._testMethodName, name)

  def _source(self, cache_dir, dataset=None, hoods=None, teacher=None, **kwargs):
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("verbose", 0)
    return nd.ActivationSource(teacher or self.teacher, self.hoods if hoods is None else hoods,
                               dataset if dataset is not None else testing.dataset(self.x),
                               cache_dir=cache_dir, records_batch=_RECORDS_BATCH, **kwargs)

  def _shard_paths(self, cache_dir):
    return sorted(os.path.join(cache_dir, f) for f in os.listdir(cache_dir)
                  if f.startswith("shard-"))

  # Served values.

  @parameterized.named_parameters(("float32", "float32"), ("float16", "float16"),
                                  ("bfloat16", "bfloat16"))
  def test_cache_serves_teacher_activations_within_dtype_precision(self, dtype):
    source = self._source(self._cache_dir(), dtype=dtype)
    served = _served(source.dataset(batch_size=16, shuffle=False))
    tol = _TOLERANCE[dtype]
    self.assertCountEqual(served, [h.name for h in self.hoods])
    for hood in self.hoods:
      a, t = served[hood.name]
      self.assertEqual(a.dtype, np.float32)
      self.assertEqual(t.dtype, np.float32)
      self.assertAllClose(a, self._activation(hood.input_tensor), rtol=tol, atol=tol)
      self.assertAllClose(t, self._activation(hood.output_tensor), rtol=tol, atol=tol)

  @parameterized.named_parameters(
      # A partial last record starts a shard of its own.
      ("partial_last_record", _EXAMPLES, 1),
      # Full records, two per shard: several shards of equal records.
      ("several_shards_of_two_records", 96, 2))
  def test_unshuffled_cache_serves_examples_in_dataset_order(self, examples, records_per_shard):
    x = testing.images(examples, seed=1)[0].astype("float32")
    keys = {activations.tensor_key(t): t for h in self.hoods
            for t in (h.input_tensor, h.output_tensor)}
    example_bytes = sum(4 * int(np.prod(t.shape[1:])) for t in keys.values())
    shard_bytes = (records_per_shard * _RECORDS_BATCH * example_bytes
                   if records_per_shard > 1 else 256 * 2**20)
    source = self._source(self._cache_dir(), dataset=testing.dataset(x), shard_bytes=shard_bytes)
    self.assertGreater(len(source.manifest["shards"]), 1)
    served = _served(source.dataset(batch_size=16, shuffle=False))
    self.assertAllEqual(served[self.hoods[0].name][0], x)

  def test_float32_cache_targets_are_the_teacher_neighbourhood_of_the_inputs(self):
    source = self._source(self._cache_dir())
    served = _served(source.dataset(batch_size=16, shuffle=False))
    for hood in self.hoods:
      a, t = served[hood.name]
      self.assertAllClose(t, hood.teacher(a, training=False), rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(("cached", True), ("online", False))
  def test_lookahead_serves_following_teacher_outputs_and_fewer_at_the_end(self, cached):
    source = self._source(self._cache_dir() if cached else None, lookahead=2)
    batch = next(iter(source.dataset(batch_size=16, shuffle=False)))
    for hood in self.hoods:
      a, t, ahead = batch[hood.name]
      following = self.hoods[hood.index + 1:hood.index + 3]
      self.assertLen(ahead, len(following))
      self.assertAllClose(a, self._activation(hood.input_tensor)[:16], rtol=1e-5, atol=1e-5)
      self.assertAllClose(t, self._activation(hood.output_tensor)[:16], rtol=1e-5, atol=1e-5)
      for target, nxt in zip(ahead, following):
        self.assertEqual(target.dtype, tf.float32)
        self.assertAllClose(target, self._activation(nxt.output_tensor)[:16], rtol=1e-5,
                            atol=1e-5)
    self.assertLen(batch[self.hoods[-2].name][2], 1)
    self.assertEmpty(batch[self.hoods[-1].name][2])

  @parameterized.named_parameters(("cached", True), ("online", False))
  def test_batches_have_hood_shapes_and_an_epoch_holds_every_example(self, cached):
    source = self._source(self._cache_dir() if cached else None)
    sizes = []
    for batch in source.dataset(batch_size=16, shuffle=False):
      sizes.append(int(batch[self.hoods[0].name][0].shape[0]))
      for hood in self.hoods:
        a, t = batch[hood.name]
        self.assertEqual(tuple(a.shape), (sizes[-1],) + hood.input_shape[1:])
        self.assertEqual(tuple(t.shape), (sizes[-1],) + hood.output_shape[1:])
    self.assertEqual(sizes, [16, 16, 16, 2])
    if cached:
      self.assertEqual(source.num_examples, _EXAMPLES)

  @parameterized.named_parameters(
      ("batched_with_labels", True, True, False),
      ("batched_without_labels", True, False, False),
      ("unbatched_with_labels", False, True, False),
      ("unbatched_without_labels", False, False, False),
      ("batched_of_unknown_size", True, True, True))
  def test_cache_accepts_batched_or_unbatched_data_with_or_without_labels(
      self, batched, labels, unknown_size):
    data = tf.data.Dataset.from_tensor_slices((self.x, self.y) if labels else self.x)
    if batched:
      data = data.batch(7)
    if unknown_size:
      data = data.filter(lambda *_: True)
    source = self._source(self._cache_dir(), dataset=data)
    self.assertEqual(source.num_examples, _EXAMPLES)
    served = _served(source.dataset(batch_size=16, shuffle=False))
    first = self.hoods[0]
    self.assertAllClose(served[first.name][0], self.x, rtol=1e-5, atol=1e-5)
    self.assertAllClose(served[first.name][1], self._activation(first.output_tensor), rtol=1e-5,
                        atol=1e-5)

  def test_shuffle_serves_the_same_pairs_in_another_order(self):
    source = self._source(self._cache_dir())
    served = _served(source.dataset(batch_size=16, shuffle=True, seed=3))
    mid = self.hoods[2]
    a, t = served[mid.name]
    want_a, want_t = self._activation(mid.input_tensor), self._activation(mid.output_tensor)
    self.assertLen(a, _EXAMPLES)
    distances = np.abs(a.reshape(len(a), 1, -1) - want_a.reshape(1, len(want_a), -1)).sum(-1)
    order = distances.argmin(1)
    self.assertAllEqual(np.sort(order), np.arange(_EXAMPLES))
    self.assertNotAllEqual(order, np.arange(_EXAMPLES))
    self.assertAllClose(a, want_a[order], rtol=1e-5, atol=1e-5)
    self.assertAllClose(t, want_t[order], rtol=1e-5, atol=1e-5)

  def test_online_serves_the_same_values_as_a_float32_cache(self):
    cached = _served(self._source(self._cache_dir()).dataset(batch_size=16, shuffle=False))
    online_source = self._source(None)
    self.assertEqual(online_source.mode, "online")
    online = _served(online_source.dataset(batch_size=16, shuffle=False))
    for hood in self.hoods:
      for got, want in zip(online[hood.name], cached[hood.name]):
        self.assertEqual(got.dtype, np.float32)
        self.assertAllClose(got, want, rtol=1e-5, atol=1e-5)

  def test_cache_of_all_hoods_serves_a_subset(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    subset = self.hoods[1:3]
    served = _served(self._source(cache_dir, hoods=subset).dataset(16, shuffle=False))
    self.assertCountEqual(served, [h.name for h in subset])
    for hood in subset:
      self.assertAllClose(served[hood.name][1], self._activation(hood.output_tensor), rtol=1e-5,
                          atol=1e-5)

  # One teacher forward pass per batch.

  def test_cache_build_runs_the_teacher_once_per_record_not_per_hood(self):
    teacher = _counting_teacher()
    hoods = nd.split(teacher)
    self.assertGreater(len(hoods), 2)
    counter = teacher.get_layer("counter").calls
    nd.ActivationSource(teacher, hoods, testing.dataset(self.x), cache_dir=self._cache_dir(),
                        dtype="float32", records_batch=_RECORDS_BATCH, verbose=0)
    # Exactly one pass per record: the data fingerprint hashes the *inputs*
    # and the example count comes from the dataset, so neither runs the
    # teacher.
    self.assertEqual(int(counter.numpy()), -(-_EXAMPLES // _RECORDS_BATCH))

  def test_online_dataset_runs_the_teacher_once_per_batch(self):
    teacher = _counting_teacher()
    counter = teacher.get_layer("counter").calls
    source = nd.ActivationSource(teacher, nd.split(teacher), testing.dataset(self.x),
                                 verbose=0)
    self.assertEqual(int(counter.numpy()), 0)
    for _ in source.dataset(batch_size=10, shuffle=False):
      pass
    self.assertEqual(int(counter.numpy()), _EXAMPLES // 10)

  # Cache lifecycle.

  def test_complete_cache_is_reused_without_rewriting(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    files = self._shard_paths(cache_dir) + [os.path.join(cache_dir, cache.MANIFEST)]
    for path in files:
      os.utime(path, ns=(10**18, 10**18))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      source = self._source(cache_dir, verbose=1)
    self.assertIn("Reusing", out.getvalue())
    self.assertEqual([os.stat(p).st_mtime_ns for p in files], [10**18] * len(files))
    self.assertEqual(source.num_examples, _EXAMPLES)

  def test_cache_without_manifest_is_rebuilt(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    # An interrupted build: shards of garbage, no manifest.
    for path in self._shard_paths(cache_dir):
      with open(path, "r+b") as f:
        f.write(b"\xff" * os.path.getsize(path))
    os.remove(os.path.join(cache_dir, cache.MANIFEST))
    source = self._source(cache_dir)
    self.assertTrue(os.path.exists(os.path.join(cache_dir, cache.MANIFEST)))
    served = _served(source.dataset(batch_size=16, shuffle=False))
    last = self.hoods[-1]
    self.assertAllClose(served[last.name][1], self._activation(last.output_tensor), rtol=1e-5,
                        atol=1e-5)

  def test_manifest_records_shapes_dtype_counts_and_shard_checksums(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir, dtype="float16")
    with open(os.path.join(cache_dir, cache.MANIFEST)) as f:
      manifest = json.load(f)
    self.assertEqual(manifest["dtype"], "float16")
    self.assertEqual(manifest["examples"], _EXAMPLES)
    for hood in self.hoods:
      for tensor in (hood.input_tensor, hood.output_tensor):
        key = activations.tensor_key(tensor)
        self.assertEqual(manifest["shapes"][key], list(tensor.shape[1:]))
    self.assertEqual(sum(s["examples"] for s in manifest["shards"]), _EXAMPLES)
    for shard in manifest["shards"]:
      path = os.path.join(cache_dir, shard["file"])
      with open(path, "rb") as f:
        data = f.read()
      self.assertEqual(shard["bytes"], len(data))
      self.assertEqual(shard["crc32"], zlib.crc32(data))
    example_bytes = sum(2 * int(np.prod(s)) for s in manifest["shapes"].values())
    self.assertEqual(sum(s["bytes"] for s in manifest["shards"]), _EXAMPLES * example_bytes)

  def test_cache_refuses_other_teacher(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    other = testing.tiny_resnet(seed=1)
    with self.assertRaisesRegex(ValueError, f"(?s){re.escape(cache_dir)}.*teacher"):
      self._source(cache_dir, teacher=other, hoods=nd.split(other))

  def test_cache_refuses_other_data(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    with self.assertRaisesRegex(ValueError, f"(?s){re.escape(cache_dir)}.*data"):
      self._source(cache_dir, dataset=testing.dataset(self.x + 1.0))
    changed = self.x.copy()  # the same first batch, one later example changed
    changed[-1] += 1.0
    with self.assertRaisesRegex(ValueError, f"(?s){re.escape(cache_dir)}.*data"):
      self._source(cache_dir, dataset=testing.dataset(changed))
    self._source(cache_dir, dataset=testing.dataset(self.x, batch_size=7))  # same content

  def test_cache_refuses_other_dtype(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir, dtype="float16")
    with self.assertRaisesRegex(ValueError, f"(?s){re.escape(cache_dir)}.*dtype"):
      self._source(cache_dir, dtype="float32")

  def test_cache_of_some_hoods_refuses_more_hoods_naming_missing_activations(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir, hoods=self.hoods[:2])
    with self.assertRaises(ValueError) as caught:
      self._source(cache_dir)
    message = str(caught.exception)
    self.assertIn(cache_dir, message)
    for hood in self.hoods[2:]:
      self.assertIn(activations.tensor_key(hood.output_tensor), message)

  def test_cache_refuses_truncated_shard_naming_it(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    shard = self._shard_paths(cache_dir)[0]
    with open(shard, "r+b") as f:
      f.truncate(os.path.getsize(shard) - 3)
    with self.assertRaisesRegex(ValueError, f"{re.escape(shard)}.*truncated"):
      self._source(cache_dir)

  def _flip_a_byte(self, cache_dir):
    shard = self._shard_paths(cache_dir)[0]
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0x10]))
    self.assertEqual(os.path.getsize(shard), size)
    return shard

  def test_cache_refuses_bit_flipped_shard_by_crc(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    shard = self._flip_a_byte(cache_dir)
    with self.assertRaisesRegex(ValueError, f"{re.escape(shard)}.*CRC"):
      self._source(cache_dir)

  def test_verify_false_skips_the_checksum(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    self._flip_a_byte(cache_dir)
    source = self._source(cache_dir, verify=False)
    self.assertEqual(source.num_examples, _EXAMPLES)

  def test_cache_refuses_corrupt_manifest_naming_it(self):
    cache_dir = self._cache_dir()
    self._source(cache_dir)
    manifest = os.path.join(cache_dir, cache.MANIFEST)
    with open(manifest, "w") as f:
      f.write("not json {{{")
    with self.assertRaisesRegex(ValueError, re.escape(manifest)):
      self._source(cache_dir)

  def test_too_little_disk_raises_oserror_and_writes_nothing(self):
    cache_dir = self._cache_dir()
    with mock.patch.object(cache, "free_bytes", return_value=1000):
      sizes_and_dir = rf"(?s)needs about \d+\.\d MiB.*only 0\.0 MiB.*{re.escape(cache_dir)}"
      with self.assertRaisesRegex(OSError, sizes_and_dir):
        self._source(cache_dir)
    written = os.listdir(cache_dir) if os.path.exists(cache_dir) else []
    self.assertEmpty([name for name in written if name != ".lock"])  # the builders' lock only

  # Noise mode.

  def test_noise_serves_steps_of_gaussian_inputs_and_teacher_targets(self):
    source = nd.ActivationSource.from_noise(self.teacher, self.hoods, steps_per_epoch=3,
                                            mean=0.5, stddev=2.0, seed=7)
    self.assertEqual(source.mode, "noise")
    batches = list(source.dataset(batch_size=256))
    self.assertLen(batches, 3)
    for hood in self.hoods:
      a, t = batches[0][hood.name]
      self.assertEqual(tuple(a.shape), (256,) + hood.input_shape[1:])
      self.assertEqual(a.dtype, tf.float32)
      self.assertEqual(t.dtype, tf.float32)
      self.assertNear(float(tf.reduce_mean(a)), 0.5, 0.05)
      self.assertNear(float(tf.math.reduce_std(a)), 2.0, 0.05)
      self.assertAllClose(t, hood.teacher(a, training=False), rtol=1e-5, atol=1e-5)

  def test_noise_mean_and_stddev_broadcast_over_channels(self):
    hoods = self.hoods[1:3]  # both take 16 channels
    mean, stddev = np.arange(16, dtype="float32"), np.linspace(0.5, 2.0, 16, dtype="float32")
    source = nd.ActivationSource.from_noise(self.teacher, hoods, steps_per_epoch=1, mean=mean,
                                            stddev=stddev)
    batch = next(iter(source.dataset(batch_size=256)))
    for hood in hoods:
      a = batch[hood.name][0].numpy().reshape(-1, 16)
      self.assertAllClose(a.mean(0), mean, atol=0.1)
      self.assertAllClose(a.std(0), stddev, rtol=0.05)

  def test_noise_is_deterministic_for_a_seed(self):

    def first_inputs(seed):
      source = nd.ActivationSource.from_noise(self.teacher, self.hoods[:2], steps_per_epoch=2,
                                              seed=seed)
      return [b[self.hoods[1].name][0].numpy() for b in source.dataset(batch_size=8)]

    same = first_inputs(1)
    self.assertAllEqual(first_inputs(1), same)
    self.assertNotAllClose(same[0], same[1])
    self.assertNotAllClose(first_inputs(2)[0], same[0])

  # Bad input.

  def test_rejects_no_hoods(self):
    with self.assertRaisesRegex(ValueError, "neighbourhood"):
      self._source(None, hoods=[])
    with self.assertRaisesRegex(ValueError, "neighbourhood"):
      nd.ActivationSource(self.teacher, [], testing.dataset(self.x), verbose=0)

  def test_rejects_hoods_of_another_model_naming_it(self):
    other = testing.tiny_chain()
    with self.assertRaisesRegex(ValueError, "tiny_chain"):
      self._source(None, hoods=nd.split(other))

  @parameterized.named_parameters(("float64", "float64"), ("int8", "int8"), ("none", None))
  def test_rejects_bad_dtype(self, dtype):
    with self.assertRaisesRegex(ValueError, "dtype"):
      self._source(None, dtype=dtype)

  @parameterized.named_parameters(("negative", -1), ("float", 1.5), ("bool", True))
  def test_rejects_bad_lookahead(self, lookahead):
    with self.assertRaisesRegex(ValueError, "lookahead"):
      self._source(None, lookahead=lookahead)

  def test_inputs_unlike_the_teachers_training_data_are_warned_about(self):
    # The teacher learned its BatchNorm statistics on these images; the same images as raw
    # 8-bit pixels would be, or scaled down a hundredfold, are not what it was trained on.
    teacher = testing.own_cnn()
    testing.trained(teacher, self.x, self.y, epochs=3)
    hood = nd.split(teacher)[1:2]
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      nd.ActivationSource(teacher, hood, self.x, verbose=0)
    for changed in (self.x * 60.0 + 128.0, self.x / 100.0):
      with self.assertWarnsRegex(UserWarning, r"inputs look unlike the data teacher 'own_cnn'.*"
                                 r"'stem_bn'.*preprocessing"):
        nd.ActivationSource(teacher, hood, changed, verbose=0)

  def test_a_numpy_array_is_its_examples(self):
    from_array = self._source(None, dataset=self.x)
    from_dataset = self._source(None, dataset=testing.dataset(self.x))
    for a, b in zip(from_array.dataset(8, shuffle=False), from_dataset.dataset(8, shuffle=False)):
      for name in a:
        self.assertAllClose(a[name][1], b[name][1])
    with self.assertRaisesRegex(TypeError, "a numpy array of inputs.*got list"):
      self._source(None, dataset=list(self.x))

  @parameterized.named_parameters(("batched", True), ("unbatched", False))
  def test_rejects_examples_of_the_wrong_shape_naming_both(self, batched):
    data = tf.data.Dataset.from_tensor_slices(np.zeros((10, 4, 4, 3), "float32"))
    if batched:
      data = data.batch(5)
    with self.assertRaisesRegex(ValueError, r"\(4, 4, 3\).*\(8, 8, 3\)"):
      self._source(None, dataset=data)

  def test_rejects_empty_dataset_for_a_cache(self):
    empty = testing.dataset(np.zeros((0, 8, 8, 3), "float32"))
    with self.assertRaisesRegex(ValueError, "empty"):
      self._source(self._cache_dir(), dataset=empty)

  @parameterized.named_parameters(("zero", 0), ("negative", -4), ("float", 8.0))
  def test_dataset_rejects_bad_batch_size(self, batch_size):
    source = self._source(None)
    with self.assertRaisesRegex(ValueError, "batch_size"):
      source.dataset(batch_size=batch_size)

  def test_noise_rejects_no_steps(self):
    with self.assertRaisesRegex(ValueError, "steps_per_epoch"):
      nd.ActivationSource.from_noise(self.teacher, self.hoods, steps_per_epoch=0)


if __name__ == "__main__":
  tf.test.main()
