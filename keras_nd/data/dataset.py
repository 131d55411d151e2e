"""`Dataset`: one interface to every data source, with the paper's preprocessing built in."""

import hashlib
import warnings

import numpy as np

from keras_nd import _checks
from keras_nd._keras import tf
from keras_nd.data import preprocessing

__all__ = ["Dataset", "PREPROCESSING", "SPLITS", "checked_images", "checked_labels"]

SPLITS = ("train", "validation", "test")
# How a teacher expects its images: standardised with the training split's per-channel
# statistics (the binaries' own teachers), or as stored ("none"; also right for a model whose
# first layers preprocess, "model").
PREPROCESSING = ("standardize", "none", "model")
# Channel counts of images as they come: grey, RGB, RGBA.
_IMAGE_CHANNELS = (1, 3, 4)


def checked_images(name, split, x):
  """`x` as images (N, H, W, C), or a ValueError naming the fix for images laid out otherwise.

  Grey images (N, H, W) get a channel axis. Images whose second axis looks
  like channels (1, 3 or 4) while their last does not, `(N, C, H, W)`, are
  refused: read as channels-last they would be a different image, silently.
  """
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"Dataset {name!r}: x_{split} must be numeric images (N, H, W, C) or "
                     f"(N, H, W); got shape {x.shape}, dtype {x.dtype}.")
  if x.shape[1] in _IMAGE_CHANNELS and x.shape[-1] not in _IMAGE_CHANNELS:
    raise ValueError(f"Dataset {name!r}: x_{split} has shape {x.shape}, which looks channels-first "
                     f"(N, C, H, W); keras_nd reads images channels-last (N, H, W, C). Pass "
                     f"np.transpose(x, (0, 2, 3, 1)).")
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    raise ValueError(f"Dataset {name!r}: x_{split} has NaN or infinite values (first at image "
                     f"{int(np.argmin(np.isfinite(x).reshape(len(x), -1).all(1)))}).")
  return x


def checked_labels(name, split, y):
  """Integer class labels (N,) from `y`: (N,), (N, 1), or one-hot (N, classes) with a warning.

  Raises a ValueError for labels that are not whole numbers, or negative.
  """
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
    raise ValueError(f"Dataset {name!r}: y_{split} must hold integer class labels; got dtype "
                     f"{y.dtype}.")
  if y.ndim == 2 and y.shape[1] > 1:
    one_hot = np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1)
    if not one_hot:
      raise ValueError(f"Dataset {name!r}: y_{split} has shape {y.shape}; labels must be class "
                       f"indices (N,) (or one-hot rows). Pass np.argmax(y, 1) for scores.")
    warnings.warn(f"Dataset {name!r}: y_{split} is one-hot {y.shape}; read as class indices "
                  f"np.argmax(y, 1).", stacklevel=3)
    y = np.argmax(y, 1)
  y = y.reshape(-1) if y.ndim == 2 else y
  if y.ndim != 1 or np.any(y != np.round(y)) or (y.size and y.min() < 0):
    raise ValueError(f"Dataset {name!r}: y_{split} must hold integer class labels >= 0, shape "
                     f"(N,); got shape {y.shape}, dtype {y.dtype}" +
                     (f", values in [{y.min()}, {y.max()}]." if y.size else "."))
  return y.astype("int32")


class Dataset:
  """An image classification dataset together with the paper's preprocessing.

  Whatever the source (the embedded generated task, an `.npz` file or a
  tensorflow-datasets dataset), `pipeline` gives batches of standardised
  images and integer labels as a `tf.data.Dataset`, augmented with random
  translations in training mode. Datasets held in memory (embedded, npz) also
  give numpy arrays through `arrays`, which is the fast way to evaluate a model.

  Splits are "train", "validation" (held out from the source's training
  data; empty unless asked for) and "test". Standardisation uses per-channel
  statistics of the "train" split (`mean`, `std`, in the units of the raw
  images) for every split.

  Example:

  ```python
  ds = keras_nd.data.get("embedded", num_train=256, num_test=64)
  x_test, y_test = ds.arrays("test")
  for images, labels in ds.pipeline("train", batch_size=128, training=True):
    ...
  ```

  Attributes:
    name: what the data came from ("embedded", "npz:PATH", a tfds name).
    input_shape: shape of one image, `(height, width, channels)`.
    num_classes: number of classes; labels are in `[0, num_classes)`.
    num_train, num_validation, num_test: numbers of examples, or None where
      the source does not say (tfds datasets without split metadata).
    mean, std: float32 per-channel statistics of the training images (0
      and 1 when `preprocessing` is not "standardize").
    preprocessing: how `pipeline` and `arrays` give the images:
      "standardize" (the default) or as stored ("none", "model"); see
      `with_preprocessing`.
    train, validation, test: the raw `(images, labels)` numpy arrays of
      in-memory datasets, None for tfds ones (and for an empty validation
      split).
  """

  def __init__(self, name, input_shape, num_classes, mean, std, examples, sizes, arrays=None):
    """Use `get`, `from_arrays` or `keras_nd.data.load_tfds` rather than this.

    Args:
      name, input_shape, num_classes, mean, std: see the class attributes.
      examples: callable `split -> tf.data.Dataset` of raw, unbatched
        `(image, label)` pairs of one split, images of shape `input_shape`.
      sizes: `{split: number of examples or None}` for every split.
      arrays: `{split: (images, labels)}` for splits held in memory.
    """
    self.name = name
    self.input_shape = tuple(int(d) for d in input_shape)
    self.num_classes = int(num_classes)
    self.mean = np.asarray(mean, "float32")
    self.std = np.asarray(std, "float32")
    self._examples = examples
    self._sizes = dict(sizes)
    self._arrays = dict(arrays or {})
    self.num_train, self.num_validation, self.num_test = (self._sizes[s] for s in SPLITS)
    self.train, self.validation, self.test = (self._arrays.get(s) for s in SPLITS)
    self._fingerprint = None
    self.preprocessing = "standardize"
    # What a translation brings in from outside the image: the training set's mean colour, which
    # is zero once standardised.
    self._fill = np.zeros_like(self.mean)

  def fingerprint(self):
    """A digest of what the data is: every split's raw images and labels, in order.

    Computed once, streamed split by split (in-memory arrays hashed as they
    are); whatever the data's name or the spelling of its path, the same
    content gives the same digest, and a change anywhere another one.
    """
    if self._fingerprint is None:
      digest = hashlib.sha256()
      for split in SPLITS:
        if not self._sizes[split] and split not in self._arrays:
          continue
        digest.update(split.encode())
        if split in self._arrays:
          batches = [self._arrays[split]]
        else:
          batches = ((x.numpy(), y.numpy()) for x, y in self._examples(split).batch(1024))
        for batch in batches:
          for array in batch:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape[1:]}".encode())
            digest.update(array.tobytes())
      self._fingerprint = digest.hexdigest()
    return self._fingerprint

  @classmethod
  def from_arrays(cls, name, train, test, validation=None, num_classes=None):
    """A dataset held in memory, from raw `(images, labels)` pairs.

    Args:
      name: the dataset's name, used in messages.
      train, test, validation: `(images, labels)` with images `(N, H, W, C)`
        (or grey `(N, H, W)`) of any real dtype (e.g. uint8 in [0, 255]) and
        integer labels `(N,)` (or `(N, 1)`; one-hot rows are read as their
        argmax, with a warning); `validation` may be None (no validation
        split).
      num_classes: number of classes; defaults to the largest label + 1.

    Returns:
      A `Dataset` whose `train`, `validation` and `test` are the given arrays.

    Raises:
      ValueError: if the images are not 4-D or look channels-first, the
        splits disagree on the image shape, counts of images and labels
        differ, a split is empty, or a label is not a whole number in
        `[0, num_classes)`.
    """
    arrays = {"train": train, "test": test}
    if validation is not None:
      arrays["validation"] = validation
    arrays = {split: (checked_images(name, split, x), checked_labels(name, split, y))
              for split, (x, y) in arrays.items()}
    shape = arrays["train"][0].shape[1:]
    for split, (x, y) in arrays.items():
      if x.ndim != 4 or y.shape != x.shape[:1] or not len(x):
        raise ValueError(f"Dataset {name!r}: the {split} split needs images (N, H, W, C) and "
                         f"labels (N,) with N >= 1; got images {x.shape}, labels {y.shape}.")
      if x.shape[1:] != shape:
        raise ValueError(f"Dataset {name!r}: train images have shape {shape} but {split} "
                         f"images {x.shape[1:]}.")
    if num_classes is None:
      num_classes = max(int(y.max()) for _, y in arrays.values()) + 1
    for split, (_, y) in arrays.items():
      if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"Dataset {name!r}: {split} labels must be in [0, {num_classes}); got "
                         f"[{y.min()}, {y.max()}].")
    mean, std = preprocessing.channel_stats(arrays["train"][0])
    sizes = {split: len(arrays[split][0]) if split in arrays else 0 for split in SPLITS}
    return cls(name, shape, num_classes, mean, std,
               examples=lambda split: tf.data.Dataset.from_tensor_slices(arrays[split]),
               sizes=sizes, arrays=arrays)

  def with_preprocessing(self, preprocessing):
    """This dataset, giving images the way a teacher expects them (`PREPROCESSING`).

    "standardize" is this dataset; "none" and "model" give a copy whose
    `pipeline` and `arrays` pass the images as they are stored, cast to
    float32 (its `mean` is 0 and its `std` 1), for a teacher trained on raw
    values or one whose own first layers preprocess.
    """
    if preprocessing not in PREPROCESSING:
      raise ValueError(f"preprocessing must be one of {PREPROCESSING}; got {preprocessing!r}.")
    if preprocessing == "standardize":
      return self
    copy = Dataset(self.name, self.input_shape, self.num_classes,
                   np.zeros_like(self.mean), np.ones_like(self.std), self._examples,
                   self._sizes, self._arrays)
    copy._fingerprint = self._fingerprint  # pylint: disable=protected-access
    copy._fill = self.mean  # pylint: disable=protected-access  (translations bring in the mean)
    copy.preprocessing = preprocessing
    return copy

  def standardize(self, images):
    """Images standardised with the training statistics, as float32."""
    return preprocessing.standardize(images, self.mean, self.std)

  def arrays(self, split):
    """Standardised float32 images and int32 labels of `split`, as numpy arrays.

    Args:
      split: "train", "validation" or "test".

    Returns:
      (images, labels).

    Raises:
      ValueError: for a bad or empty split, or a dataset not held in memory
        (tfds).
    """
    self._check_split(split)
    if split not in self._arrays:
      raise ValueError(f"Dataset {self.name!r} is not held in memory; use "
                       f"pipeline({split!r}, batch_size) instead of arrays().")
    images, labels = self._arrays[split]
    return self.standardize(images), labels.astype("int32")

  def pipeline(self, split, batch_size, training=False, seed=0, max_shift=4, flip=False,
               shuffle_buffer=None):
    """Batches `(images, labels)` of `split`, standardised, augmented in training mode.

    In training mode the examples are shuffled (differently every epoch,
    reproducibly for a seed) and every image is translated by a random offset
    of up to `max_shift` pixels along each axis (`random_translate`, applied
    to whole batches: on CPU about twice as fast as tf.image.random_crop per
    image, for batches of 128 32x32 images),
    and flipped left-right with probability 1/2 if `flip`. Otherwise the order
    is fixed and nothing is augmented. The last batch may be smaller.

    Args:
      split: "train", "validation" or "test".
      batch_size: examples per batch.
      training: shuffle and augment.
      seed: seed of the shuffling and the augmentation.
      max_shift: largest translation in pixels (the paper: 4); 0 disables it.
      flip: also flip images left-right at random. Off by default: the paper
        names translations only.
      shuffle_buffer: size of the shuffle buffer; None shuffles the whole
        split of an in-memory dataset and 10,000 examples at a time of a
        tfds one.

    Returns:
      A `tf.data.Dataset` of `(float32 images (B, H, W, C), int32 labels (B,))`.

    Raises:
      ValueError: for a bad or empty split, or a bad batch size.
    """
    self._check_split(split)
    batch_size = _checks.integer(batch_size, "batch_size")
    examples = self._examples(split)
    if training:
      if shuffle_buffer is None:
        shuffle_buffer = len(self._arrays[split][0]) if split in self._arrays else 10_000
      examples = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    batches = examples.batch(batch_size)
    mean, std = self.mean, self.std

    def prepare(images, labels):
      return preprocessing.standardize(images, mean, std), tf.cast(labels, tf.int32)

    batches = batches.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    fill = tf.constant(self._fill, tf.float32)
    if training:
      # Stateless ops fed from one seeded stream: reproducible for a seed, new every epoch.
      seed_stream = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(4)

      def augment(batch, seeds):
        images, labels = batch
        images = preprocessing.random_translate(images - fill, max_shift, seeds[:2]) + fill
        if flip:
          images = preprocessing.random_flip(images, seeds[2:])
        return images, labels

      batches = tf.data.Dataset.zip((batches, seed_stream)).map(
          augment, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)

  def __repr__(self):
    return (f"Dataset(name={self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, num_train={self.num_train}, "
            f"num_validation={self.num_validation}, num_test={self.num_test})")

  def _check_split(self, split):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    if self._sizes[split] == 0:
      raise ValueError(f"Dataset {self.name!r} has no {split} split; ask for one with "
                       f"keras_nd.data.get(..., num_{split}=N).")
