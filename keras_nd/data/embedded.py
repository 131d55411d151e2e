"""The embedded task: a CIFAR-sized image classification problem generated offline from a seed.

The paper's experiments need a task on which a ResNet-20 teacher is good but
not perfect and a thinner student trained from scratch is clearly worse:
otherwise there is nothing for distillation to recover. Blobs or class
templates are learnt perfectly by any network. Here a class is a
*combination* of small textures ("textons") placed at random positions among
distractor textons shared by all classes, each drawn in a random colour, over
a smooth random background with noise, so a network must detect many
colour-invariant local patterns anywhere in the image and combine their
presence; with fewer inner channels it detects them less reliably.
"""

import numpy as np

from keras_nd import _checks

__all__ = ["NUM_TEST", "NUM_TRAIN", "embedded"]

# Default sizes: what the main experiments train and test on.
NUM_TRAIN, NUM_TEST = 4000, 1000

_SIZE = 32
_CHANNELS = 3
_NUM_CLASSES = 10
_NUM_TEXTONS = 20
_TEXTON_SIZE = 6
# Fraction of a texton's pixels that are bright (+1); the others are dark (-1).
_TEXTON_DENSITY = 0.45
_TEXTONS_PER_CLASS = 2
_DISTRACTORS = 2
_TEXTON_AMPLITUDE = 1.8
_BACKGROUND_AMPLITUDE = 0.3
# The background is a random field on this coarse grid, upsampled bilinearly.
_BACKGROUND_GRID = 4
_NOISE = 0.15
_CONTRAST = (0.7, 1.3)
# Maps the generated intensities (about unit scale) to uint8 around mid-grey.
_PIXEL_SCALE = 32.0
# Independent random streams of one seed, so the test set does not depend on num_train.
_TRAIN_STREAM, _TEST_STREAM = 1, 2


def embedded(num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0):
  """The embedded task: 32x32 RGB images of 10 classes made of textons.

  A seed fixes a *world*: 20 random 6x6 binary textures ("textons") and, for
  each of the 10 classes, a distinct pair of them. An image of class `c`
  contains the two textons of `c` and 2 distractor textons drawn from all 20,
  resampled until the image holds no other class's complete pair; each
  texton is placed at a uniformly random position (overlaps allowed) and
  drawn in its own random colour of fixed norm (its bright pixels add the
  colour, its dark ones subtract it). Under them lies a smooth
  random colour field; white noise and a random contrast complete the image.
  Classes are exactly balanced (within 1) and shuffled. Only numpy is used;
  nothing is downloaded, and the same arguments always give the same arrays
  (about 1 s for 5000 images).

  Calibration: ResNet-20 (`resnet_v1(depth=20)`) and the k = 0.4 student
  (`resnet_v1(depth=20, multipliers=0.4)`) trained from scratch with
  cross-entropy on 4000 training images (`get("embedded")`'s
  `pipeline("train", 128, training=True)`: standardised, random 4-pixel
  translations), batch 128, Adam with learning rate 2e-3 and cosine decay to
  0, weight decay 1e-4 (the model's), test accuracy on the 1000 test images:

  | data seed, model seed*, epochs | ResNet-20 | k = 0.4 |
  |--------------------------------|-----------|---------|
  | 0, 0, 15                       | 86.2%     | 77.5%   |
  | 1, 0, 15                       | 89.5%     | 80.1%   |
  | 0, 1, 15                       | 85.7%     | 73.4%   |
  | 0, 0, 12                       | 84.7%     | 73.5%   |

  (*`keras.utils.set_random_seed` and the pipeline's seed), and with SGD
  (Nesterov momentum 0.9, learning rate 0.1, cosine decay), seeds 0, 15
  epochs: 89.8% and 83.4%. Both networks underfit (training
  accuracy near test accuracy: 89% and 80% for seeds 0 with Adam), the
  student more, so capacity is what separates them. On 2 CPU cores 15
  epochs of ResNet-20 took 71 s (about 850 images/s) and 12 epochs of the
  student 57 s; runs repeat exactly for the same seeds.

  Example:

  ```python
  (x_train, y_train), (x_test, y_test) = embedded(num_train=100, num_test=50)
  assert x_train.shape == (100, 32, 32, 3) and x_train.dtype == "uint8"
  ```

  Args:
    num_train: number of training images.
    num_test: number of test images. The test set depends only on `seed`
      and `num_test`, not on `num_train`.
    seed: seed of the world and of both splits.

  Returns:
    (x_train, y_train), (x_test, y_test): uint8 images in [0, 255] of shape
    (N, 32, 32, 3) and int32 labels in [0, 10).

  Raises:
    ValueError: if `num_train` or `num_test` is not a positive integer, or
      `seed` not an integer in [0, 2**32).
  """
  for arg, value in (("num_train", num_train), ("num_test", num_test)):
    _checks.integer(value, arg, context="embedded: ")
  if not _checks.is_integer(seed) or not 0 <= seed < 2**32:
    raise ValueError(f"embedded: seed must be an integer in [0, 2**32); got {seed!r}.")
  textons, class_textons = _world(np.random.RandomState(seed))
  return tuple(
      _sample(np.random.RandomState([seed, stream]), count, textons, class_textons)
      for stream, count in ((_TRAIN_STREAM, num_train), (_TEST_STREAM, num_test)))


def _world(rng):
  """The textons `(T, S, S)` in {-1, 1} and each class's texton indicator `(classes, T)`."""
  textons = np.where(rng.rand(_NUM_TEXTONS, _TEXTON_SIZE, _TEXTON_SIZE) < _TEXTON_DENSITY,
                     1.0, -1.0).astype("float32")
  pairs = set()
  while len(pairs) < _NUM_CLASSES:
    pairs.add(tuple(sorted(rng.choice(_NUM_TEXTONS, _TEXTONS_PER_CLASS, replace=False))))
  class_textons = np.zeros((_NUM_CLASSES, _NUM_TEXTONS), bool)
  for label, pair in enumerate(sorted(pairs)):
    class_textons[label, list(pair)] = True
  return textons, class_textons


def _sample(rng, count, textons, class_textons):
  """`count` uint8 images and their int32 labels."""
  labels = np.arange(count) % _NUM_CLASSES
  rng.shuffle(labels)
  placed = np.concatenate([np.nonzero(class_textons[labels])[1].reshape(count, -1),
                           _distractors(rng, labels, class_textons)], axis=1)

  images = _BACKGROUND_AMPLITUDE * _upsample(
      rng.normal(size=(count, _BACKGROUND_GRID, _BACKGROUND_GRID, _CHANNELS)), _SIZE)
  offsets = np.arange(_TEXTON_SIZE)
  index = np.arange(count)[:, None, None]
  for slot in range(placed.shape[1]):
    corners = rng.randint(0, _SIZE - _TEXTON_SIZE + 1, (count, 2))
    colours = rng.normal(size=(count, _CHANNELS))
    colours *= _TEXTON_AMPLITUDE * np.sqrt(_CHANNELS) / np.linalg.norm(colours, axis=1,
                                                                         keepdims=True)
    rows = (corners[:, 0, None] + offsets)[:, :, None]
    cols = (corners[:, 1, None] + offsets)[:, None, :]
    # One texton per image in this slot, so the fancy-indexed pixels never repeat.
    images[index, rows, cols] += textons[placed[:, slot]][..., None] * colours[:, None, None, :]
  images += rng.normal(scale=_NOISE, size=images.shape).astype("float32")
  images *= rng.uniform(*_CONTRAST, size=(count, 1, 1, 1))
  images = np.clip(np.round(128.0 + _PIXEL_SCALE * images), 0, 255).astype("uint8")
  return images, labels.astype("int32")


def _distractors(rng, labels, class_textons):
  """Distractor textons `(N, D)` that never complete the texton pair of another class."""
  count = len(labels)
  distractors = rng.randint(0, _NUM_TEXTONS, (count, _DISTRACTORS))
  redo = np.arange(count)
  while redo.size:
    distractors[redo] = rng.randint(0, _NUM_TEXTONS, (redo.size, _DISTRACTORS))
    present = class_textons[labels[redo]].copy()
    present[np.arange(redo.size)[:, None], distractors[redo]] = True
    complete = (present[:, None, :] >= class_textons[None]).all(-1)
    complete[np.arange(redo.size), labels[redo]] = False
    redo = redo[complete.any(-1)]
  return distractors


def _upsample(low, size):
  """Bilinear upsampling of `(N, h, w, C)` to `(N, size, size, C)` (pixel centres aligned)."""
  grid = low.shape[1]
  position = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
  lower = np.floor(position).astype(int)
  upper = np.minimum(lower + 1, grid - 1)
  weights = np.zeros((size, grid), "float32")
  weights[np.arange(size), lower] += 1 - (position - lower)
  weights[np.arange(size), upper] += position - lower
  channels_first = low.astype("float32").transpose(0, 3, 1, 2)
  return (weights @ channels_first @ weights.T).transpose(0, 2, 3, 1)
