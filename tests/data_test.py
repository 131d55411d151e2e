"""Tests for keras_nd.data: the embedded task, npz and tfds loaders, preprocessing, pipelines."""

import os
import tempfile

import numpy as np
import testing
from absl.testing import parameterized

from keras_nd import data
from keras_nd._keras import tf


def _write_npz(directory, name="data.npz", **overrides):
  rng = np.random.RandomState(0)
  arrays = dict(x_train=rng.randint(0, 256, (20, 8, 8, 3)).astype("uint8"),
                y_train=np.arange(20) % 4,
                x_test=rng.randint(0, 256, (6, 8, 8, 3)).astype("uint8"),
                y_test=np.arange(6) % 4)
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  path = os.path.join(directory, name)
  np.savez(path, **arrays)
  return path


class EmbeddedTest(tf.test.TestCase, parameterized.TestCase):

  def test_embedded_is_deterministic_for_a_seed(self):
    first, second = data.embedded(200, 50, seed=3), data.embedded(200, 50, seed=3)
    for (x1, y1), (x2, y2) in zip(first, second):
      self.assertAllEqual(x1, x2)
      self.assertAllEqual(y1, y2)

  def test_embedded_differs_across_seeds(self):
    (x1, _), _ = data.embedded(200, 50, seed=0)
    (x2, _), _ = data.embedded(200, 50, seed=1)
    self.assertGreater(np.mean(x1 != x2), 0.5)

  @parameterized.named_parameters(("small", 30, 11), ("default_sizes", None, None))
  def test_embedded_shapes_dtypes_and_labels(self, num_train, num_test):
    kwargs = {} if num_train is None else dict(num_train=num_train, num_test=num_test)
    (x_train, y_train), (x_test, y_test) = data.embedded(**kwargs)
    num_train, num_test = num_train or 4000, num_test or 1000
    self.assertEqual(x_train.shape, (num_train, 32, 32, 3))
    self.assertEqual(x_test.shape, (num_test, 32, 32, 3))
    self.assertEqual(x_train.dtype, np.uint8)
    self.assertEqual(y_train.shape, (num_train,))
    self.assertEqual(y_train.dtype, np.int32)
    self.assertAllInRange(y_train, 0, 9)
    self.assertAllInRange(y_test, 0, 9)

  def test_embedded_classes_are_balanced(self):
    (_, y_train), (_, y_test) = data.embedded(1003, 200)
    self.assertAllInRange(np.bincount(y_train, minlength=10), 100, 101)
    self.assertAllEqual(np.bincount(y_test, minlength=10), [20] * 10)

  def test_embedded_test_split_does_not_depend_on_num_train(self):
    (_, _), (x1, y1) = data.embedded(50, 40)
    (_, _), (x2, y2) = data.embedded(300, 40)
    self.assertAllEqual(x1, x2)
    self.assertAllEqual(y1, y2)

  def test_embedded_uses_the_pixel_range(self):
    (x_train, _), _ = data.embedded(200, 10)
    self.assertBetween(x_train.std(), 10, 80)
    self.assertLess(np.mean((x_train == 0) | (x_train == 255)), 0.01)

  @parameterized.named_parameters(("zero", 0), ("negative", -1), ("float", 2.5))
  def test_embedded_rejects_bad_sizes(self, num_train):
    with self.assertRaisesRegex(ValueError, "num_train"):
      data.embedded(num_train=num_train)

  def test_embedded_rejects_negative_seed(self):
    with self.assertRaisesRegex(ValueError, "seed"):
      data.embedded(10, 10, seed=-1)

  def test_get_embedded_is_the_default(self):
    ds = data.get(num_train=40, num_test=20, seed=2)
    self.assertEqual(ds.name, "embedded")
    self.assertEqual(ds.input_shape, (32, 32, 3))
    self.assertEqual(ds.num_classes, 10)
    self.assertEqual((ds.num_train, ds.num_test), (40, 20))
    self.assertAllEqual(ds.train[0], data.embedded(40, 20, seed=2)[0][0])
    self.assertEqual(ds.num_validation, 0)
    self.assertIsNone(ds.validation)
    with self.assertRaisesRegex(ValueError, "no validation split.*num_validation"):
      ds.pipeline("validation", batch_size=8)

  @parameterized.named_parameters(("not_a_string", 3), ("empty", ""))
  def test_get_rejects_bad_specs(self, spec):
    with self.assertRaisesRegex(ValueError, "spec"):
      data.get(spec)

  def test_get_rejects_tfds_arguments_for_the_embedded_task(self):
    with self.assertRaisesRegex(ValueError, "image_size.*'embedded'"):
      data.get("embedded", image_size=32)

  def test_get_embedded_validation_is_held_out_before_train(self):
    ds = data.get(num_train=40, num_test=20, num_validation=10)
    (x, y), _ = data.embedded(50, 20)
    self.assertAllEqual(ds.validation[0], x[:10])
    self.assertAllEqual(ds.train[1], y[10:])
    self.assertEqual((ds.num_train, ds.num_validation, ds.num_test), (40, 10, 20))
    self.assertAllClose(ds.mean, data.channel_stats(x[10:])[0])


class NpzTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp(dir=self.get_temp_dir())

  def test_npz_round_trip(self):
    path = _write_npz(self.dir)
    ds = data.get(f"npz:{path}")
    with np.load(path) as archive:
      self.assertAllEqual(ds.train[0], archive["x_train"])
      self.assertAllEqual(ds.test[1], archive["y_test"])
    self.assertEqual(ds.input_shape, (8, 8, 3))
    self.assertEqual(ds.num_classes, 4)
    self.assertEqual((ds.num_train, ds.num_test), (20, 6))
    self.assertEqual(ds.name, f"npz:{path}")

  def test_npz_grey_images_get_a_channel_axis_and_labels_are_flattened(self):
    rng = np.random.RandomState(1)
    path = _write_npz(self.dir, x_train=rng.rand(10, 5, 5).astype("float32"),
                      y_train=(np.arange(10) % 3)[:, None],
                      x_test=rng.rand(4, 5, 5).astype("float32"), y_test=np.arange(4)[:, None] % 3)
    ds = data.load_npz(path)
    self.assertEqual(ds.input_shape, (5, 5, 1))
    self.assertEqual(ds.train[0].shape, (10, 5, 5, 1))
    self.assertEqual(ds.train[1].shape, (10,))
    self.assertEqual(ds.train[1].dtype, np.int32)

  def test_npz_num_train_keeps_the_first_examples(self):
    path = _write_npz(self.dir)
    ds = data.get(f"npz:{path}", num_train=7, num_test=2)
    with np.load(path) as archive:
      self.assertAllEqual(ds.train[0], archive["x_train"][:7])
    self.assertEqual((ds.num_train, ds.num_test), (7, 2))

  def test_npz_validation_is_held_out_from_train(self):
    path = _write_npz(self.dir)
    ds = data.get(f"npz:{path}", num_validation=5)
    with np.load(path) as archive:
      self.assertAllEqual(ds.validation[0], archive["x_train"][:5])
      self.assertAllEqual(ds.train[0], archive["x_train"][5:])
    with self.assertRaisesRegex(ValueError, r"num_train=16 .* 15 examples after 5 held out"):
      data.get(f"npz:{path}", num_train=16, num_validation=5)

  def test_npz_missing_key_names_key_and_file(self):
    path = _write_npz(self.dir, name="nolabels.npz", y_test=None)
    with self.assertRaisesRegex(ValueError, r"nolabels\.npz.*y_test"):
      data.get(f"npz:{path}")

  def test_npz_object_array_names_the_file(self):
    path = os.path.join(self.dir, "pickled.npz")
    np.savez(path, x_train=np.array([np.zeros(3), np.zeros(2)], dtype=object),
             y_train=np.zeros(2), x_test=np.zeros((1, 2, 2)), y_test=np.zeros(1))
    with self.assertRaisesRegex(ValueError, r"pickled\.npz.*object arrays"):
      data.get(f"npz:{path}")

  def test_npz_missing_file_names_it(self):
    with self.assertRaisesRegex(FileNotFoundError, "absent.npz"):
      data.get(f"npz:{os.path.join(self.dir, 'absent.npz')}")

  def test_npz_label_count_mismatch_names_the_split(self):
    path = _write_npz(self.dir, y_train=np.zeros(3))
    with self.assertRaisesRegex(ValueError, "x_train has 20 images but y_train 3"):
      data.load_npz(path)


  def test_raw_images_are_translated_with_their_mean_colour_coming_in(self):
    # Given as stored (a teacher trained on raw pixels), a translation brings in the training
    # set's mean colour, as it does for standardised images (where it is zero), not black.
    images = np.full((8, 8, 8, 3), 200, "uint8")
    images[..., 1] = 50
    dataset = data.Dataset.from_arrays("flat", (images, np.arange(8) % 2),
                                       (images[:2], np.arange(2))).with_preprocessing("none")
    batch, _ = next(iter(dataset.pipeline("train", 8, training=True, max_shift=4)))
    self.assertAllClose(batch[..., 0], np.full((8, 8, 8), 200.0))
    self.assertAllClose(batch[..., 1], np.full((8, 8, 8), 50.0))
    x, _ = dataset.arrays("test")
    self.assertEqual(float(x.max()), 200.0)  # as stored, not standardised

  def test_npz_channels_first_images_are_refused_with_the_transpose(self):
    rng = np.random.RandomState(0)
    path = _write_npz(self.dir, x_train=rng.rand(20, 3, 8, 8), x_test=rng.rand(6, 3, 8, 8))
    with self.assertRaisesRegex(ValueError, r"\(20, 3, 8, 8\).*channels-first.*"
                                r"np.transpose\(x, \(0, 2, 3, 1\)\)"):
      data.load_npz(path)

  def test_one_hot_labels_are_read_as_indices_with_a_warning(self):
    eye = np.eye(4, dtype="float32")
    path = _write_npz(self.dir, y_train=eye[np.arange(20) % 4], y_test=eye[np.arange(6) % 4])
    with self.assertWarnsRegex(UserWarning, r"one-hot \(20, 4\).*np.argmax"):
      ds = data.load_npz(path)
    self.assertAllEqual(ds.train[1], np.arange(20) % 4)
    self.assertEqual(ds.num_classes, 4)

  @parameterized.named_parameters(
      ("scores", dict(y_train=np.full((20, 4), 0.25)), r"\(20, 4\).*np.argmax\(y, 1\)"),
      ("fractions", dict(y_train=np.arange(20) / 3), "integer class labels"),
      ("negative", dict(y_train=np.arange(20) - 1), r"values in \[-1, 18\]"))
  def test_labels_that_are_not_class_indices_are_refused(self, overrides, fragment):
    path = _write_npz(self.dir, **overrides)
    with self.assertRaisesRegex(ValueError, fragment):
      data.load_npz(path)
    with self.assertRaisesRegex(ValueError, fragment):  # arrays too
      data.Dataset.from_arrays("own", (np.zeros((20, 4, 4, 3)), overrides["y_train"]),
                               (np.zeros((2, 4, 4, 3)), np.zeros(2)))


class TfdsTest(tf.test.TestCase, parameterized.TestCase):

  def _fresh_dir(self):
    return tempfile.mkdtemp(dir=self.get_temp_dir())

  @parameterized.named_parameters(("cifar10", "cifar10", (32, 32, 3)),
                                  ("mnist", "mnist", (28, 28, 1)))
  def test_tfds_shape_and_classes_come_from_metadata(self, name, shape):
    with testing.mock_tfds(num_examples=12):
      ds = data.get(name, data_dir=self._fresh_dir())
      images, labels = next(iter(ds.pipeline("train", batch_size=5, training=True)))
    self.assertEqual(ds.input_shape, shape)
    self.assertEqual(ds.num_classes, 10)
    self.assertEqual((ds.num_train, ds.num_test), (12, 12))
    self.assertEqual(images.shape, (5,) + shape)
    self.assertEqual(images.dtype, tf.float32)
    self.assertEqual(labels.dtype, tf.int32)
    self.assertIsNone(ds.train)
    with self.assertRaisesRegex(ValueError, "not held in memory"):
      ds.arrays("test")

  def test_tfds_split_sizes(self):
    with testing.mock_tfds(num_examples=12):
      ds = data.get("mnist", num_train=5, num_test=3, num_validation=4)
      counts = [sum(int(tf.shape(y)[0]) for _, y in ds.pipeline(split, batch_size=2))
                for split in ("train", "validation", "test")]
    self.assertEqual(counts, [5, 4, 3])
    self.assertEqual((ds.num_train, ds.num_validation, ds.num_test), (5, 4, 3))

  def test_tfds_variable_size_images_need_image_size(self):
    with testing.mock_tfds(num_examples=2):
      with self.assertRaisesRegex(ValueError, r"'imagenet2012'.*image_size"):
        data.get("imagenet2012", stats=([0.0] * 3, [1.0] * 3))

  def test_tfds_image_size_resizes_variable_size_images(self):
    with testing.mock_tfds(num_examples=3):
      ds = data.get("imagenet2012", image_size=24, stats=([0.0] * 3, [1.0] * 3))
      images, labels = next(iter(ds.pipeline("test", batch_size=3)))
    self.assertEqual(ds.input_shape, (24, 24, 3))
    self.assertEqual(ds.num_classes, 1000)
    self.assertEqual(images.shape, (3, 24, 24, 3))
    self.assertAllInRange(labels, 0, 999)

  def test_tfds_unprepared_dataset_names_directory_and_downloads_nothing(self):
    data_dir = self._fresh_dir()
    with self.assertRaisesRegex(FileNotFoundError,
                                rf"(?s)'cifar10'.*{data_dir}.*Nothing was downloaded.*tfds build"):
      data.get("cifar10", data_dir=data_dir)
    self.assertEqual(_files_under(data_dir), [])

  def test_tfds_unprepared_manual_dataset_names_the_manual_directory(self):
    data_dir = self._fresh_dir()
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    with self.assertRaisesRegex(FileNotFoundError, rf"(?s)'imagenet2012'.*{manual_dir}"):
      data.get("imagenet2012", data_dir=data_dir, image_size=64)

  @parameterized.named_parameters(("unknown", "no_such_dataset_xyz"),
                                  ("unknown_version", "cifar10:9.9.9"),
                                  ("malformed", "not a name"))
  def test_unknown_dataset_name_is_a_value_error_naming_it(self, name):
    with self.assertRaisesRegex(ValueError, f"'{name}'"):
      data.get(name, data_dir=self._fresh_dir())

  def test_tfds_statistics_come_from_the_train_split_or_are_given(self):
    with testing.mock_tfds(num_examples=6):
      ds = data.get("mnist", num_validation=2)
      # Identity statistics make the pipeline serve the raw pixels.
      raw = data.get("mnist", num_validation=2, stats=([0.0], [1.0]))
      raw_train = np.concatenate([x for x, _ in raw.pipeline("train", batch_size=6)])
      raw_test = np.concatenate([x for x, _ in raw.pipeline("test", batch_size=6)])
      given = data.get("mnist", stats=([10.0], [2.0]))
      test = np.concatenate([x for x, _ in given.pipeline("test", batch_size=6)])
    self.assertLen(raw_train, 4)
    self.assertAllClose(ds.mean, [raw_train.mean()], rtol=1e-5)
    self.assertAllClose(ds.std, [raw_train.std()], rtol=1e-4)
    self.assertAllClose(test, (raw_test - 10.0) / 2.0)

  def test_tfds_stats_must_match_the_channels(self):
    with testing.mock_tfds(num_examples=2):
      with self.assertRaisesRegex(ValueError, r"stats for 'mnist' .* 1 values"):
        data.get("mnist", stats=([1.0, 2.0], [1.0, 1.0]))


class PreprocessingTest(tf.test.TestCase, parameterized.TestCase):

  def test_standardisation_uses_training_statistics(self):
    rng = np.random.RandomState(0)
    x_train = (rng.normal(size=(200, 4, 4, 3)) * [1, 2, 3] + [10, 20, 30]).astype("float32")
    x_test = (rng.normal(size=(100, 4, 4, 3)) * 5 + 100).astype("float32")
    ds = data.Dataset.from_arrays("t", (x_train, np.arange(200) % 2), (x_test, np.arange(100) % 2))
    self.assertAllClose(ds.mean, x_train.mean((0, 1, 2)), rtol=1e-5)
    self.assertAllClose(ds.std, x_train.std((0, 1, 2)), rtol=1e-4)
    train, _ = ds.arrays("train")
    self.assertAllClose(train.mean((0, 1, 2)), [0, 0, 0], atol=1e-4)
    self.assertAllClose(train.std((0, 1, 2)), [1, 1, 1], atol=1e-4)
    test, _ = ds.arrays("test")
    self.assertAllClose(test, (x_test - x_train.mean((0, 1, 2))) / x_train.std((0, 1, 2)),
                        rtol=1e-4, atol=1e-4)
    batch, _ = next(iter(ds.pipeline("test", batch_size=100)))
    self.assertAllClose(batch, test, atol=1e-5)

  def test_channel_stats_of_constant_channel_is_one(self):
    mean, std = data.channel_stats(np.full((2, 3, 3, 1), 7, "uint8"))
    self.assertAllClose(mean, [7.0])
    self.assertAllClose(std, [1.0])

  def test_random_translate_moves_each_image_by_at_most_max_shift(self):
    rng = np.random.RandomState(0)
    images = rng.uniform(1, 2, (64, 12, 12, 1)).astype("float32")
    shifted = data.random_translate(tf.constant(images), 4, tf.constant([1, 2])).numpy()
    shifts = set()
    for image, moved in zip(images, shifted):
      matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(_shift(image, dy, dx), moved)]
      self.assertLen(matches, 1)
      shifts.add(matches[0])
    self.assertGreater(len(shifts), 20)  # Offsets differ across the batch.

  def test_pipeline_translates_by_at_most_4_pixels_only_in_training_mode(self):
    ds = _constant_pixel_dataset()
    x_train, _ = ds.arrays("train")
    evaluation = np.concatenate([x for x, _ in ds.pipeline("train", batch_size=8)])
    self.assertAllEqual(evaluation, x_train)
    training = np.concatenate([x for x, _ in ds.pipeline("train", batch_size=8, training=True)])
    shifts = []
    for image in training:
      matches = [(dy, dx) for x in x_train for dy in range(-4, 5) for dx in range(-4, 5)
                 if np.array_equal(_shift(x, dy, dx), image)]
      self.assertLen(matches, 1)
      shifts.extend(matches)
    self.assertGreater(len(set(shifts)), 10)

  def test_pipeline_training_is_reproducible_for_a_seed_and_varies_across_epochs(self):
    ds = _constant_pixel_dataset()
    def epochs(seed):
      pipeline = ds.pipeline("train", batch_size=8, training=True, seed=seed)
      return [np.concatenate([x for x, _ in pipeline]) for _ in range(2)]
    first, again = epochs(0), epochs(0)
    self.assertAllEqual(first[0], again[0])
    self.assertAllEqual(first[1], again[1])
    self.assertNotAllClose(first[0], first[1])

  @parameterized.named_parameters(("training", True), ("evaluation", False))
  def test_pipeline_batch_shapes(self, training):
    ds = data.get(num_train=50, num_test=20)
    sizes = [(tuple(x.shape), tuple(y.shape))
             for x, y in ds.pipeline("train", batch_size=16, training=training)]
    self.assertEqual(sizes, [((16, 32, 32, 3), (16,))] * 3 + [((2, 32, 32, 3), (2,))])

  def test_pipeline_flip_mirrors_some_images(self):
    ds = _constant_pixel_dataset()
    x_train, _ = ds.arrays("train")
    images, _ = next(iter(ds.pipeline("train", batch_size=32, training=True, max_shift=0,
                                      flip=True)))
    mirrored = [any(np.array_equal(image[:, ::-1], x) for x in x_train) for image in images.numpy()]
    self.assertBetween(np.mean(mirrored), 0.2, 0.8)

  @parameterized.named_parameters(("split", dict(split="valid", batch_size=2), "split"),
                                  ("empty_split", dict(split="validation", batch_size=2),
                                   "no validation split"),
                                  ("batch_size", dict(split="train", batch_size=0), "batch_size"))
  def test_pipeline_rejects_bad_arguments(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      _constant_pixel_dataset().pipeline(**kwargs)


def _shift(image, dy, dx):
  """`image` translated by (dy, dx) with zeros coming in."""
  height, width = image.shape[:2]
  out = np.zeros_like(image)
  out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = (
      image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)])
  return out


def _constant_pixel_dataset():
  """32 distinct 10x10 grey images whose standardised pixels are all non-zero."""
  rng = np.random.RandomState(0)
  x = rng.choice([1.0, 3.0], (32, 10, 10, 1)).astype("float32")
  return data.Dataset.from_arrays("c", (x, np.arange(32) % 2), (x[:4], np.arange(4) % 2))


def _files_under(directory):
  return [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files]


if __name__ == "__main__":
  tf.test.main()
