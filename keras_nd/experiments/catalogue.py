"""The experiments' models: the project's ResNets by name, and a given teacher's architecture
narrowed and initialised afresh."""

import keras_nd as nd
from keras_nd import models
from keras_nd._keras import keras

__all__ = ["build_model", "from_scratch"]


def build_model(name, input_shape, num_classes, multipliers=1.0, unit_noise=0.0):
  """`resnetN` (N = 6n+2: the CIFAR ResNetV1) or `resnet50` with bottleneck multipliers.

  `unit_noise` > 0 adds Gaussian noise of that standard deviation after every
  residual unit while training (the noise-regularised teacher of App. B.1).

  Raises:
    ValueError: naming an unknown model and the names accepted.
  """
  if name == "resnet50":
    return models.resnet50_v1(multipliers, input_shape=input_shape, num_classes=num_classes,
                              unit_noise=unit_noise)
  depth = name[len("resnet"):]
  if name.startswith("resnet") and depth.isdigit() and int(depth) >= 8 and int(depth) % 6 == 2:
    return models.resnet_v1(depth=int(depth), multipliers=multipliers,
                            input_shape=input_shape, num_classes=num_classes,
                            unit_noise=unit_noise)
  raise ValueError(f"Unknown model {name!r}: use resnet20, resnet32, resnet44, resnet56 (any "
                   "resnetN with N = 6n+2) or resnet50.")


def from_scratch(teacher, units, multiplier):
  """The teacher's architecture with `units` narrowed by `multiplier`, every weight initialised
  afresh (a student to train from scratch, for a teacher that is not one of `build_model`'s)."""
  student = nd.compose(teacher, {h: nd.students.bottleneck(h, multiplier, init="random")
                                 for h in units})
  return keras.models.clone_model(student)
