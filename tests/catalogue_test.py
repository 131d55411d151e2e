"""The catalogue of bad inputs: each gets a clear error naming what is wrong.

One table, across the public API and the experiments behind the binaries
(the binaries' flag checks run in binaries_test.py). Every case asserts the
exception's type and that its message names the offending thing, and that
it is not a TensorFlow error raised from inside a graph.
"""

import functools
import os
import tempfile

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import artefacts, cache, data, files, sparsity
from keras_nd._keras import keras, tf
from keras_nd.experiments import distill, harness

L = keras.layers


@functools.lru_cache(maxsize=None)
def _teacher():
  x, y = testing.images(32)
  return testing.trained(testing.tiny_resnet(), x, y), x


def _hoods():
  return nd.split(_teacher()[0])


def _unit():
  return _hoods()[1]


def _layer_hoods():
  return {h.name: h for h in nd.split_layers(_teacher()[0])}


class _Subclassed(keras.Model):

  def call(self, inputs):
    return inputs * 2.0


def _subclassed():
  model = _Subclassed(name="my_subclassed_net")
  model(np.zeros((1, 3), "float32"))
  return model


def _source(dataset, **kwargs):
  return nd.ActivationSource(_teacher()[0], [_unit()], dataset, verbose=0, **kwargs)


def _images(shape=(8, 8, 3), n=8):
  return tf.data.Dataset.from_tensor_slices(np.zeros((n,) + shape, "float32")).batch(4)


def _cache(tmp):
  """A complete cache of one unit in a new directory: (directory, manifest)."""
  directory = os.path.join(tmp, "cache")
  source = _source(testing.dataset(_teacher()[1]), cache_dir=directory)
  return directory, source.manifest


def _damaged_shard(tmp, damage):
  directory, manifest = _cache(tmp)
  path = os.path.join(directory, manifest["shards"][0]["file"])
  with open(path, "r+b") as f:
    damage(f)
  return lambda: _source(testing.dataset(_teacher()[1]), cache_dir=directory)


def _truncate(f):
  f.truncate(100)


def _flip_a_bit(f):
  f.seek(10)
  byte = f.read(1)
  f.seek(10)
  f.write(bytes([byte[0] ^ 1]))


def _other_teachers_cache(tmp):
  directory, _ = _cache(tmp)
  other = testing.tiny_resnet(seed=7)
  return lambda: nd.ActivationSource(other, [nd.split(other)[1]], testing.dataset(_teacher()[1]),
                                     cache_dir=directory, verbose=0)


def _npz(tmp, **arrays):
  path = os.path.join(tmp, "data.npz")
  base = dict(x_train=np.zeros((4, 8, 8, 3), "float32"), y_train=np.arange(4) % 2,
              x_test=np.zeros((2, 8, 8, 3), "float32"), y_test=np.arange(2))
  base.update(arrays)
  np.savez(path, **{k: v for k, v in base.items() if v is not None})
  return lambda: data.get(f"npz:{path}")


def _pickled_npz(tmp):
  path = os.path.join(tmp, "pickled.npz")
  np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
           x_test=np.zeros((1, 2, 2)), y_test=np.zeros(1))
  return lambda: data.get(f"npz:{path}")


def _corrupt_keras(tmp):
  path = os.path.join(tmp, "teacher.keras")
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 this is not a model")
  return lambda: files.load_model(path)


def _h5_model(tmp):
  path = os.path.join(tmp, "model.h5")
  keras.Sequential([keras.Input((3,)), L.Dense(2)]).save(path)
  return lambda: files.load_model(path)


def _lambda_model(tmp):
  path = os.path.join(tmp, "lambda_model.keras")
  inputs = keras.Input((3,))
  keras.Model(inputs, L.Lambda(lambda x: x * 2.0)(inputs)).save(path)
  return lambda: files.load_model(path)


def _not_a_directory(tmp):
  path = os.path.join(tmp, "a_file")
  with open(path, "w") as f:
    f.write("x")
  dataset = data.get("embedded", num_train=32, num_test=16, num_validation=16)
  return lambda: distill.run(dataset, os.path.join(path, "workdir"),
                             distill.Config(model="resnet8", verbose=0))


def _shape_mismatch():
  wrong = keras.Sequential([keras.Input(_unit().input_shape[1:]), L.Conv2D(5, 1)],
                           name="wrong_student")
  return lambda: nd.substitute(_teacher()[0], {_unit(): wrong})


def _too_little_disk(tmp):
  from unittest import mock  # pylint: disable=g-import-not-at-top

  def build():
    with mock.patch.object(cache, "free_bytes", return_value=10):
      _source(testing.dataset(_teacher()[1]), cache_dir=os.path.join(tmp, "small"))

  return build


def _cache_dir_a_file(tmp):
  path = os.path.join(tmp, "a_file")
  with open(path, "w") as f:
    f.write("x")
  return lambda: _source(testing.dataset(_teacher()[1]), cache_dir=path)


def _cache_dir_not_writable(tmp):
  from unittest import mock  # pylint: disable=g-import-not-at-top  (root may write anywhere)

  def build():
    with mock.patch.object(os, "access", return_value=False):
      _source(testing.dataset(_teacher()[1]), cache_dir=os.path.join(tmp, "read_only"))

  return build


def _disk_full_while_writing(tmp):
  import errno  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top

  def build():
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch.object(cache._ShardWriter, "_write_record", side_effect=full):  # pylint: disable=protected-access
      _source(testing.dataset(_teacher()[1]), cache_dir=os.path.join(tmp, "full"))

  return build


def _short_of_its_target():
  hood = _layer_hoods()["stage1_unit1_conv2"]
  student = sparsity.sparse_student(hood, 0.5, steps=2000)
  a = np.zeros((8,) + hood.input_shape[1:], "float32")
  distiller = nd.NeighbourhoodDistiller({hood: student})
  distiller.compile("adam")
  distiller.fit(tf.data.Dataset.from_tensor_slices({hood.name: (a, a)}).batch(4), verbose=0)
  return lambda: nd.compose(_teacher()[0], {hood: student})


def _pruning_of_unknown_length():
  hood = _layer_hoods()["stage1_unit1_conv2"]
  a = np.zeros((8,) + hood.input_shape[1:], "float32")
  distiller = nd.NeighbourhoodDistiller({hood: sparsity.sparse_student(hood, 0.5)})
  distiller.compile("adam")
  data_ = tf.data.Dataset.from_tensor_slices({hood.name: (a, a)}).batch(4).repeat()
  return lambda: distiller.fit(data_, epochs=1, verbose=0)


def _teacher_for_raw_images(tmp):
  # It reads the class off the raw brightness; standardised images all look alike to it.
  labels = np.arange(32) % 2
  images = (50 + 150 * labels[:, None, None, None] + np.zeros((32, 8, 8, 3))).astype("uint8")
  dataset = data.Dataset.from_arrays("bright", (images, labels), (images, labels),
                                     validation=(images, labels))
  inputs = keras.Input((8, 8, 3))
  dense = L.Dense(2)
  teacher = keras.Model(inputs, dense(L.GlobalAveragePooling2D()(inputs)))
  dense.set_weights([np.tile([[-1.0, 1.0]], (3, 1)) / 3, np.array([125.0, -125.0])])
  return lambda: harness.Experiment(dataset, tmp, teacher=teacher)


# name: (make(tmp) -> zero-argument callable that must raise, exception types, regex the
# message must match).
CASES = {
    # Models and neighbourhoods.
    "subclassed_teacher": (lambda tmp: lambda: nd.split(_subclassed()), TypeError,
                           "my_subclassed_net.*subclassed"),
    "sequential_without_input": (lambda tmp: lambda: nd.split(keras.Sequential([L.Dense(2)])),
                                 ValueError, "Sequential.*Input"),
    "two_inputs": (lambda tmp: lambda: nd.split(testing.two_inputs()), ValueError,
                   "two_in.*2 inputs"),
    "two_outputs": (lambda tmp: lambda: nd.split(testing.two_outputs()), ValueError,
                    "two_out.*2 outputs"),
    "unknown_boundary": (lambda tmp: lambda: nd.split(_teacher()[0], boundaries=["nope"]),
                         ValueError, "'nope'"),
    "boundary_not_a_cut": (
        lambda tmp: lambda: nd.split(_teacher()[0], boundaries=["stage1_unit1_conv1"]),
        ValueError, "stage1_unit1_conv1.*cut"),
    "group_not_dividing": (lambda tmp: lambda: nd.split(_teacher()[0], group=4), ValueError,
                           "group"),
    "layer_types_not_classes": (lambda tmp: lambda: nd.split_layers(_teacher()[0], ["Conv2D"]),
                                TypeError, "layer_types"),
    "student_shape_mismatch": (lambda tmp: _shape_mismatch(), ValueError,
                               r"stage1_unit1_out.*\(None, 8, 8, 5\).*\(None, 8, 8, 16\)|"
                               r"\(None, 8, 8, 16\).*\(None, 8, 8, 5\)"),
    "hoods_of_another_model": (
        lambda tmp: lambda: nd.ActivationSource(testing.tiny_resnet(seed=3), [_unit()], None),
        ValueError, "stage1_unit1_out"),
    # Students.
    "k_zero": (lambda tmp: lambda: nd.students.bottleneck(_unit(), 0.0), ValueError,
               r"k must be in \(0, 1\]; got 0\.0"),
    "k_above_one": (lambda tmp: lambda: nd.students.bottleneck(_unit(), 1.5), ValueError,
                    "1.5"),
    "sparsity_one": (
        lambda tmp: lambda: sparsity.sparse_student(_layer_hoods()["stage1_unit1_conv1"], 1.0,
                                                    steps=10),
        ValueError, "stage1_unit1_conv1.*1.0"),
    "sparsity_of_a_batch_norm": (
        lambda tmp: lambda: sparsity.sparse_student(
            nd.split_layers(_teacher()[0], L.BatchNormalization)[0], 0.5, steps=10),
        ValueError, "stem_bn"),
    "sparsity_of_a_unit": (lambda tmp: lambda: sparsity.sparse_student(_unit(), 0.5, steps=10),
                           ValueError, "stage1_unit1_out"),
    # Activation sources and caches.
    "storage_dtype": (lambda tmp: lambda: _source(_images(), dtype="int8"), ValueError, "int8"),
    "empty_dataset": (lambda tmp: lambda: _source(_images(n=0), cache_dir=tmp), ValueError,
                      "empty"),
    "images_of_the_wrong_shape": (lambda tmp: lambda: _source(_images(shape=(16, 16, 3))),
                                  ValueError, r"\(16, 16, 3\).*\(8, 8, 3\)"),
    "nan_in_the_images": (
        lambda tmp: lambda: _source(tf.data.Dataset.from_tensor_slices(
            np.full((4, 8, 8, 3), np.nan, "float32")).batch(4), cache_dir=tmp),
        ValueError, "NaN"),
    "truncated_shard": (lambda tmp: _damaged_shard(tmp, _truncate), ValueError,
                        "shard-.*truncated"),
    "bit_flipped_shard": (lambda tmp: _damaged_shard(tmp, _flip_a_bit), ValueError,
                          "shard-.*CRC-32"),
    "cache_of_another_teacher": (lambda tmp: _other_teachers_cache(tmp), ValueError,
                                 "another teacher fingerprint"),
    "disk_too_small": (lambda tmp: _too_little_disk(tmp), OSError, "needs about .* MiB"),
    # Distillers.
    "no_students": (lambda tmp: lambda: nd.NeighbourhoodDistiller({}), ValueError, "students"),
    "student_not_a_model": (
        lambda tmp: lambda: nd.NeighbourhoodDistiller({_unit(): "conv"}), TypeError,
        "stage1_unit1_out.*str"),
    "global_clipnorm": (
        lambda tmp: lambda: nd.NeighbourhoodDistiller({_unit(): nd.students.clone(_unit())})
        .compile(keras.optimizers.Adam(global_clipnorm=1.0)), ValueError, "global_clipnorm"),
    "unknown_device": (
        lambda tmp: lambda: nd.NeighbourhoodDistiller({_unit(): nd.students.clone(_unit())},
                                                      devices=["/gpu:9"]),
        ValueError, "'/gpu:9'"),
    "distiller_not_compiled": (
        lambda tmp: lambda: nd.NeighbourhoodDistiller({_unit(): nd.students.clone(_unit())}).fit(
            _source(_images()).dataset(4), epochs=1, verbose=0),
        RuntimeError, "compile"),
    "temperature_zero": (
        lambda tmp: lambda: nd.KnowledgeDistiller(teacher=_teacher()[0], student=_teacher()[0],
                                                  temperature=0.0),
        ValueError, "temperature"),
    "calibration_steps": (
        lambda tmp: lambda: nd.calibrate_batch_norm(_teacher()[0], _images(), steps=0),
        ValueError, "steps.*0"),
    # Data.
    "unknown_dataset_offline": (lambda tmp: lambda: data.get("no_such_dataset_xyz"), ValueError,
                                "no_such_dataset_xyz"),
    "npz_missing": (lambda tmp: lambda: data.get(f"npz:{tmp}/absent.npz"), FileNotFoundError,
                    "absent.npz"),
    "npz_pickled": (lambda tmp: _pickled_npz(tmp), ValueError, "pickled.npz.*pickled"),
    "npz_missing_keys": (lambda tmp: _npz(tmp, y_test=None), ValueError, r"\['y_test'\]"),
    "npz_negative_labels": (lambda tmp: _npz(tmp, y_train=np.array([0, 1, -1, 0])), ValueError,
                            r"y_train must hold integer class labels >= 0.*\[-1, 1\]"),
    "npz_nan_images": (lambda tmp: _npz(tmp, x_test=np.full((2, 8, 8, 3), np.nan, "float32")),
                       ValueError, "x_test.*NaN"),
    "npz_channels_first": (lambda tmp: _npz(tmp, x_train=np.zeros((4, 3, 8, 8), "float32"),
                                            x_test=np.zeros((2, 3, 8, 8), "float32")),
                           ValueError, r"channels-first.*np\.transpose"),
    "npz_scores_as_labels": (lambda tmp: _npz(tmp, y_train=np.full((4, 2), 0.5)), ValueError,
                             r"y_train has shape \(4, 2\).*np\.argmax"),
    "npz_fractional_labels": (lambda tmp: _npz(tmp, y_train=np.array([0, 0.5, 1, 1])),
                              ValueError, "y_train must hold integer class labels"),
    "calibration_data_a_list": (lambda tmp: lambda: nd.calibrate_batch_norm(
        _teacher()[0], [np.zeros((8, 8, 3))]), TypeError, "numpy array of inputs.*got list"),
    "pruned_short_of_its_target": (lambda tmp: _short_of_its_target(), ValueError,
                                   r"stage1_unit1_conv2_s' at 0\.0% of 50\.0%"),
    "pruning_of_unknown_length": (lambda tmp: _pruning_of_unknown_length(), ValueError,
                                  "stage1_unit1_conv2_s.*pass steps_per_epoch"),
    "kd_calibration_steps": (lambda tmp: lambda: nd.KnowledgeDistiller(
        _teacher()[0], _teacher()[0], calibrate_steps=-1), ValueError, "calibrate_steps"),
    "npz_images_of_two_sizes": (lambda tmp: _npz(tmp, x_test=np.zeros((2, 4, 4, 3), "float32")),
                                ValueError, r"\(8, 8, 3\).*\(4, 4, 3\)"),
    # Files and work directories.
    "corrupt_keras_file": (lambda tmp: _corrupt_keras(tmp), ValueError, "teacher.keras"),
    "h5_model_untrusted": (lambda tmp: _h5_model(tmp), ValueError, r"model\.h5.*trusted=True"),
    "lambda_layer_untrusted": (lambda tmp: _lambda_model(tmp), ValueError,
                               r"lambda_model\.keras.*Lambda.*trusted=True"),
    "teacher_for_other_images": (lambda tmp: lambda: harness.Experiment(
        data.get("embedded", num_train=32, num_test=16, num_validation=16), tmp,
        teacher=testing.own_cnn()), ValueError, r"own_cnn.*\(8, 8, 3\).*\(32, 32, 3\)"),
    "teacher_trained_on_raw_images": (lambda tmp: _teacher_for_raw_images(tmp), ValueError,
                                      r"'standardize'.*--preprocessing=none"),
    "teacher_of_no_kind": (lambda tmp: lambda: harness.Experiment(
        data.get("embedded", num_train=32, num_test=16, num_validation=16), tmp,
        teacher=3.5), TypeError, "tf_keras Model or a path.*float"),
    "unknown_preprocessing": (lambda tmp: lambda: data.get("embedded", num_train=32, num_test=16)
                              .with_preprocessing("minmax"), ValueError, "minmax"),
    "cache_dir_a_file": (lambda tmp: _cache_dir_a_file(tmp), NotADirectoryError,
                         r"cache_dir '.*a_file' is a file"),
    "cache_dir_not_writable": (lambda tmp: _cache_dir_not_writable(tmp), PermissionError,
                               r"cache_dir '.*read_only' is not writable"),
    "disk_full_while_writing": (lambda tmp: _disk_full_while_writing(tmp), OSError,
                                r"disk holding the activation cache in '.*full' is full"),
    "workdir_under_a_file": (lambda tmp: _not_a_directory(tmp), (NotADirectoryError, OSError),
                             "a_file"),
    "missing_student_artefact": (
        lambda tmp: lambda: artefacts.load(_teacher()[0], [_unit()], "k0.5", tmp),
        FileNotFoundError, "stage1_unit1_out.*0 of 1 finished"),
    "bad_shard_spec": (lambda tmp: lambda: artefacts.shard(_hoods(), "3/2"), ValueError, "3/2"),
    "unknown_method": (lambda tmp: lambda: distill.Config(methods=("dk",)), ValueError, "dk"),
}


class CatalogueTest(tf.test.TestCase, parameterized.TestCase):

  def test_the_catalogue_has_at_least_thirty_cases(self):
    self.assertGreaterEqual(len(CASES), 30)

  @parameterized.named_parameters(*[(name, name) for name in CASES])
  def test_bad_input_gets_a_clear_error(self, name):
    make, types, pattern = CASES[name]
    tmp = tempfile.mkdtemp(prefix=f"catalogue_{name}_", dir=self.get_temp_dir())
    call = make(tmp)
    with self.assertRaises(types) as raised:
      call()
    error = raised.exception
    self.assertNotIsInstance(error, tf.errors.OpError, msg=f"{name}: a TensorFlow error")
    self.assertRegex(str(error), pattern, msg=f"{name}: {type(error).__name__}: {error}")


if __name__ == "__main__":
  tf.test.main()
