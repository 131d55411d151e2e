"""A small image classification task generated offline from a seed."""

import numpy as np

__all__ = ["synthetic_images"]


def synthetic_images(num_train=2000, num_test=500, shape=(16, 16, 3), num_classes=10, noise=0.6,
                     seed=0):
  """Images of class-specific smooth patterns, randomly shifted, plus noise.

  Each class template is a background of random Gaussian blobs shared by all
  classes plus a fainter class-specific blob pattern; an example is its class
  template rolled by up to 3 pixels each way, scaled by a random contrast,
  plus white noise. Nothing is downloaded; the same seed always
  gives the same arrays.

  Args:
    num_train, num_test: numbers of examples.
    shape: (height, width, channels).
    num_classes: number of classes.
    noise: standard deviation of the white noise (templates have unit scale).
    seed: the seed of everything.

  Returns:
    (x_train, y_train), (x_test, y_test): float32 images, int32 labels.
  """
  if num_train < 1 or num_test < 1 or num_classes < 2:
    raise ValueError(f"Need num_train, num_test >= 1 and num_classes >= 2; got {num_train}, "
                     f"{num_test}, {num_classes}.")
  rng = np.random.RandomState(seed)
  height, width, channels = shape
  rows, cols = np.mgrid[0:height, 0:width].astype("float32")
  def blobs(count):
    image = np.zeros(shape, "float32")
    for _ in range(count):
      r, q = rng.uniform(0, height), rng.uniform(0, width)
      s = rng.uniform(1.5, 3.5)
      blob = np.exp(-((rows - r)**2 + (cols - q)**2) / (2 * s * s))
      image += blob[..., None] * rng.normal(size=channels).astype("float32")
    return image / image.std()

  # Every class shares one background; classes differ by a fainter pattern of their own.
  shared = blobs(4)
  templates = np.stack([shared + 0.5 * blobs(2) for _ in range(num_classes)])

  def sample(n):
    y = rng.randint(0, num_classes, n).astype("int32")
    x = np.empty((n,) + tuple(shape), "float32")
    for i, c in enumerate(y):
      shift = rng.randint(-3, 4, 2)
      x[i] = np.roll(templates[c], tuple(shift), axis=(0, 1)) * rng.uniform(0.5, 1.5)
    x += rng.normal(scale=noise, size=x.shape).astype("float32")
    return x, y

  return sample(num_train), sample(num_test)
