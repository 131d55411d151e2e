"""Loading a `Dataset` by name: the embedded task, an `.npz` file, or a tensorflow-datasets dataset.

Nothing here downloads anything: tfds datasets must have been prepared
beforehand, and a missing one is an error that says where it was looked for
and how to prepare it.
"""

import os
import zipfile

import numpy as np

from keras_nd import _checks
from keras_nd._keras import tf
from keras_nd.data import preprocessing
from keras_nd.data.dataset import SPLITS, Dataset, checked_images, checked_labels
from keras_nd.data.embedded import NUM_TEST, NUM_TRAIN, embedded

__all__ = ["get", "load_npz", "load_tfds"]

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def get(spec="embedded", data_dir=None, seed=0, num_train=None, num_test=None, num_validation=0,
        **tfds_kwargs):
  """The dataset named by `spec`, ready for `Dataset.pipeline`.

  Example:

  ```python
  ds = keras_nd.data.get("embedded", num_train=256, num_test=64, seed=1)
  assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
  ```

  Args:
    spec: "embedded" (the generated task of `keras_nd.data.embedded`),
      "npz:PATH" (a file with x_train, y_train, x_test, y_test; see
      `load_npz`), or the name of a tensorflow-datasets image classification
      dataset such as "cifar10", "mnist" or "imagenet2012" (see `load_tfds`).
    data_dir: tfds data directory (tfds's default if None); tfds only.
    seed: seed of the embedded task; ignored by the other sources.
    num_train, num_test: numbers of examples: the sizes of the embedded
      task (default 4000 and 1000), or the first examples of each split of an
      npz file or tfds dataset (default all).
    num_validation: examples held out from the source's training data as the
      "validation" split: its first `num_validation` examples, with "train"
      the `num_train` that follow (for the embedded task, `num_train +
      num_validation` training images are generated).
    **tfds_kwargs: further arguments of `load_tfds` (image_size, stats,
      stats_examples, test_split).

  Returns:
    A `Dataset`.

  Raises:
    ValueError: for an unknown name or bad data (see the loaders).
    FileNotFoundError: for a missing npz file or an unprepared tfds dataset.
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"Dataset spec must be 'embedded', 'npz:PATH' or a tensorflow-datasets name; "
                     f"got {spec!r}.")
  if tfds_kwargs and (spec == "embedded" or spec.startswith("npz:")):
    raise ValueError(f"Arguments {sorted(tfds_kwargs)} apply to tensorflow-datasets datasets only, "
                     f"not to {spec!r}.")
  _checks.integer(num_validation, "num_validation", minimum=0)
  if spec == "embedded":
    num_train = NUM_TRAIN if num_train is None else num_train
    num_test = NUM_TEST if num_test is None else num_test
    _checks.integer(num_train, "num_train")
    (x, y), test = embedded(num_train + num_validation, num_test, seed=seed)
    validation = (x[:num_validation], y[:num_validation]) if num_validation else None
    return Dataset.from_arrays("embedded", (x[num_validation:], y[num_validation:]), test,
                               validation=validation, num_classes=10)
  if spec.startswith("npz:"):
    return load_npz(spec[len("npz:"):], num_train=num_train, num_test=num_test,
                    num_validation=num_validation)
  return load_tfds(spec, data_dir=data_dir, num_train=num_train, num_test=num_test,
                   num_validation=num_validation, **tfds_kwargs)


def load_npz(path, num_train=None, num_test=None, num_validation=0):
  """A dataset from an `.npz` file holding x_train, y_train, x_test and y_test.

  The file is read with `allow_pickle=False`: it must hold plain numeric
  arrays. Images are channels-last `(N, H, W, C)` of any real dtype (a
  layout that looks channels-first, `(N, C, H, W)`, is refused with the
  transpose that fixes it); grey images `(N, H, W)` get a channel axis.
  Labels are class indices `(N,)` or `(N, 1)`, cast to int32 (one-hot rows
  are read as their argmax, with a warning). The number of classes is the
  largest label + 1.

  Args:
    path: the `.npz` file.
    num_train, num_test: keep only the first examples of each split.
    num_validation: hold out the first `num_validation` training examples
      as the "validation" split ("train" is then the `num_train` after them).

  Returns:
    A `Dataset` named "npz:PATH".

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the file is not an npz archive, lacks one of the keys,
      holds pickled (object) arrays, its arrays have bad shapes, or it has
      fewer examples than asked for.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No npz dataset file at {path!r}.")
  try:
    with np.load(path, allow_pickle=False) as archive:
      present = archive.files
      arrays = {key: archive[key] for key in _NPZ_KEYS if key in present}
  except ValueError as error:
    if "allow_pickle" not in str(error):
      raise ValueError(f"npz dataset {path!r} cannot be read: {error}") from None
    # numpy says this both for object arrays in an npz and for a file that is no npz at all.
    raise ValueError(f"npz dataset {path!r} holds pickled data (object arrays, or it is not an "
                     f"npz archive); keras_nd loads plain numeric arrays only "
                     f"(allow_pickle=False). Save the images and labels as numeric arrays with "
                     f"np.savez.") from None
  except (zipfile.BadZipFile, OSError) as error:
    raise ValueError(f"npz dataset {path!r} is not a readable npz archive: {error}") from None
  missing = [key for key in _NPZ_KEYS if key not in arrays]
  if missing:
    raise ValueError(f"npz dataset {path!r} lacks the keys {missing}; it must hold "
                     f"{list(_NPZ_KEYS)} (it holds {sorted(present)}).")

  _checks.integer(num_validation, "num_validation", minimum=0)
  splits = {}
  for split in ("train", "test"):
    name = f"npz:{path}"
    x = checked_images(name, split, arrays[f"x_{split}"])
    y = checked_labels(name, split, arrays[f"y_{split}"])
    if len(y) != len(x):
      raise ValueError(f"npz dataset {path!r}: x_{split} has {len(x)} images but y_{split} "
                       f"{len(y)} labels.")
    splits[split] = (x, y)
  x, y = splits["train"]
  splits["validation"] = (x[:num_validation], y[:num_validation]) if num_validation else None
  splits["train"] = (x[num_validation:], y[num_validation:])
  for split, count in (("train", num_train), ("test", num_test)):
    available = len(splits[split][0])
    if count is not None:
      _checks.integer(count, f"num_{split}")
      if count > available:
        held_out = f" after {num_validation} held out for validation" if split == "train" else ""
        raise ValueError(f"npz dataset {path!r}: num_{split}={count} but its {split} split has "
                         f"{available} examples{held_out}.")
      splits[split] = tuple(a[:count] for a in splits[split])
  try:
    return Dataset.from_arrays(f"npz:{path}", splits["train"], splits["test"],
                               validation=splits["validation"])
  except ValueError as error:
    raise ValueError(f"npz dataset {path!r}: {error}") from None


def load_tfds(name, data_dir=None, num_train=None, num_test=None, num_validation=0,
              image_size=None, stats=None, stats_examples=None, test_split=None):
  """A prepared tensorflow-datasets image classification dataset, never downloaded.

  The image shape and the number of classes come from the dataset's
  metadata (`builder.info`). The per-channel statistics of standardisation
  are computed from the training split in one pass over it (after resizing,
  if any); for a large dataset pass known statistics as `stats`, or compute
  them from the first `stats_examples` training images.

  Args:
    name: a tfds dataset name, e.g. "cifar10", "mnist", "imagenet2012"
      (optionally with a config or version, "name/config:1.0.0").
    data_dir: the tfds data directory (tfds's default, usually
      ~/tensorflow_datasets, if None). Datasets with manual downloads
      (imagenet2012) read them from `data_dir/downloads/manual` when prepared.
    num_train, num_test: keep only the first examples of each split.
    num_validation: hold out the first `num_validation` examples of the
      tfds train split as the "validation" split ("train" is then the
      `num_train` after them).
    image_size: side of the square images to produce from a dataset whose
      images vary in size (imagenet2012): the shorter side is resized to it
      and the centre cropped. Required for such datasets, and also resizes
      fixed-size images.
    stats: `(mean, std)` per channel, in raw pixel units, to use instead of
      computing them.
    stats_examples: compute the statistics from only this many training
      images.
    test_split: the split to evaluate on; "test" if the dataset has one,
      else "validation" (imagenet2012).

  Returns:
    A `Dataset` named `name`, with no numpy arrays (`train`, `validation`
    and `test` are None): use its `pipeline`.

  Raises:
    ValueError: if `name` is not a tfds dataset (or names an unknown config
      or version), is not an image classification dataset, has images of
      variable size and no `image_size` was given, or has no `test_split`.
    FileNotFoundError: if the dataset is not prepared in `data_dir`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"Unknown dataset {name!r}: it is not 'embedded', not 'npz:PATH' and not a "
                     f"tensorflow-datasets dataset name (e.g. 'cifar10', 'mnist', "
                     f"'imagenet2012').") from None
  except (ValueError, AssertionError) as error:
    # A malformed name, or an unknown config or version: tfds says which in its first line.
    raise ValueError(f"Cannot use tensorflow-datasets dataset {name!r}: "
                     f"{str(error).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(name, builder))

  image_key, label_key = _supervised_keys(name, builder.info)
  image_shape = tuple(builder.info.features[image_key].shape)
  num_classes = builder.info.features[label_key].num_classes
  if image_size is not None:
    _checks.integer(image_size, "image_size")
    image_shape = (image_size, image_size, image_shape[-1])
  elif None in image_shape:
    raise ValueError(f"Dataset {name!r} has images of variable size {image_shape}; pass "
                     f"image_size= to resize them.")
  split_names = list(builder.info.splits)
  if test_split is None:
    # ImageNet-style datasets publish their labelled held-out images as "validation".
    test_split = next((s for s in ("test", "validation") if s in split_names), "test")
  if split_names and test_split not in split_names:
    raise ValueError(f"Dataset {name!r} has no split {test_split!r}; it has {split_names}.")
  _checks.integer(num_validation, "num_validation", minimum=0)
  for arg, count in (("num_train", num_train), ("num_test", num_test),
                     ("stats_examples", stats_examples)):
    if count is not None:
      _checks.integer(count, arg)
  tfds_splits = {"train": "train", "validation": "train", "test": test_split}
  skips = {"train": num_validation, "validation": 0, "test": 0}
  counts = {"train": num_train, "validation": num_validation, "test": num_test}

  def examples(split):
    # Files in a fixed order, so that "the first N examples" is always the same N.
    data = builder.as_dataset(split=tfds_splits[split], as_supervised=True, shuffle_files=False)
    data = data.skip(skips[split])
    if counts[split] is not None:
      data = data.take(counts[split])
    if image_size is not None:
      data = data.map(lambda image, label: (_resize_and_crop(image, image_size), label),
                      num_parallel_calls=tf.data.AUTOTUNE)
    return data

  if stats is None:
    train = examples("train")
    if stats_examples is not None:
      train = train.take(stats_examples)
    stats = preprocessing.channel_stats(
        images for images, _ in train.batch(1024).as_numpy_iterator())
  mean, std = (np.asarray(v, "float32").reshape(-1) for v in stats)
  channels = image_shape[-1]
  if mean.shape != (channels,) or std.shape != (channels,) or np.any(std <= 0):
    raise ValueError(f"stats for {name!r} must be (mean, std) with {channels} values each and std "
                     f"> 0; got mean {mean.tolist()}, std {std.tolist()}.")
  sizes = {split: int(examples(split).cardinality()) for split in SPLITS}
  return Dataset(name, image_shape, num_classes, mean, std, examples,
                 sizes={split: size if size >= 0 else None for split, size in sizes.items()})


def _not_prepared_message(name, builder):
  root = str(builder.data_dir_root)
  message = (f"tensorflow-datasets dataset {name!r} is not prepared: found no prepared data in "
             f"{builder.data_dir} (data_dir={root!r}). Nothing was downloaded: keras_nd never "
             f"downloads at run time. Prepare it once where the network is reachable, with "
             f"`tfds build {name} --data_dir={root}` (or tfds.builder({name!r}, "
             f"data_dir={root!r}).download_and_prepare()), and make that directory available "
             f"here.")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual_dir = os.path.join(root, "downloads", "manual")
    message += (f" {name!r} needs files you download yourself, placed in {manual_dir} before "
                f"preparing: {' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}")
  return message


def _supervised_keys(name, info):
  """The image and label feature names of an image classification dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  keys = info.supervised_keys
  if (not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys)
      or not isinstance(info.features[keys[0]], tfds.features.Image)
      or not isinstance(info.features[keys[1]], tfds.features.ClassLabel)):
    raise ValueError(f"Dataset {name!r} is not an image classification dataset: it needs "
                     f"supervised keys (image, label) naming an Image and a ClassLabel feature; "
                     f"its supervised keys are {keys!r}.")
  return keys


def _resize_and_crop(image, size):
  """Resizes the shorter side to `size` and crops the centre square (the usual ImageNet eval)."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = size / tf.minimum(height, width)
  new_size = tf.cast(tf.math.ceil([height * scale, width * scale]), tf.int32)
  resized = tf.image.resize(image, tf.maximum(new_size, size))
  return tf.image.resize_with_crop_or_pad(resized, size, size)
