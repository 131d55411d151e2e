"""ResNetV1 builders whose residual units take per-unit bottleneck multipliers.

`resnet_v1` is the CIFAR variant of He et al. (2016), `resnet50_v1` the
ImageNet ResNet-50. A bottleneck multiplier `k` scales only the *inner* width
of a residual unit (what Neighbourhood Distillation shrinks); every unit's
output width, and therefore every cut between units, stays the same as in the
teacher. Widths are scaled with `keras_nd.students.scaled_width`, the rule the
student builders use, so a model built here with multipliers `ks` has exactly
the shapes of the teacher with each unit replaced by its bottleneck student.

Every layer has a deterministic name (`stem_conv`, `stage2_unit1_conv1`, ...,
`head_logits`) so neighbourhoods, boundaries and checkpoints can refer to
layers by name.
"""

from keras_nd import _checks
from keras_nd._keras import keras, keras3, tf
from keras_nd.students import scaled_width

__all__ = ["ZeroPadShortcut", "resnet50_v1", "resnet_v1"]

_CIFAR_STAGE_FILTERS = (16, 32, 64)
# BatchNorm momentum of the CIFAR ResNets: 0.9, the usual choice for them, so that the moving
# statistics keep up with the weights in runs of a few hundred steps (Keras's 0.99 lags there).
_CIFAR_BN_MOMENTUM = 0.9
_RESNET50_STAGE_UNITS = (3, 4, 6, 3)
_RESNET50_STAGE_FILTERS = (64, 128, 256, 512)
_RESNET50_EXPANSION = 4
# keras.applications.ResNet50 uses this epsilon; matching it keeps weights
# ported from there numerically equivalent.
_RESNET50_BN_EPSILON = 1.001e-5


@keras.utils.register_keras_serializable(package="keras_nd")
class ZeroPadShortcut(keras.layers.Layer):
  """Parameter-free shortcut of He et al.'s option A.

  Subsamples the input spatially by `strides` (taking every `strides`-th row
  and column, like a 1x1 convolution with that stride would) and zero-pads the
  channel axis to `filters`, split as evenly as possible before and after the
  input channels.

  A named layer rather than a `Lambda` so that models containing it save to
  `.keras` and load back with `safe_mode=True`.

  Args:
    filters: number of output channels; at least the input's channel count.
    strides: spatial subsampling factor.
    **kwargs: passed on to `keras.layers.Layer`.
  """

  def __init__(self, filters, strides=2, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.strides = int(strides)

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None or channels > self.filters:
      raise ValueError(
          f"ZeroPadShortcut {self.name!r} pads channels up to "
          f"filters={self.filters}, but its input has {channels} channels "
          f"(input shape {tuple(input_shape)}).")
    super().build(input_shape)

  def call(self, inputs):
    subsampled = inputs[:, ::self.strides, ::self.strides, :]
    extra = self.filters - inputs.shape[-1]
    before = extra // 2
    return tf.pad(subsampled,
                  [[0, 0], [0, 0], [0, 0], [before, extra - before]])

  def to_keras3(self, inputs):
    """The same shortcut of Keras 3 built-ins, on a Keras 3 tensor (for
    `keras_nd.files.export_keras3`): a 1x1 max pooling with `strides` takes every
    `strides`-th row and column, a pad operation adds the channels."""
    k3 = keras3()
    subsampled = k3.layers.MaxPooling2D(1, self.strides, name=f"{self.name}_subsample")(inputs)
    extra = self.filters - inputs.shape[-1]
    return k3.ops.pad(subsampled, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

  def compute_output_shape(self, input_shape):
    def subsample(size):
      return None if size is None else -(-size // self.strides)

    return tf.TensorShape([input_shape[0], subsample(input_shape[1]),
                           subsample(input_shape[2]), self.filters])

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, strides=self.strides)
    return config


def resnet_v1(depth=20, multipliers=1.0, input_shape=(32, 32, 3),
              num_classes=10, weight_decay=1e-4, name=None, unit_noise=0.0):
  """ResNetV1 for small images (He et al. 2016, Sec. 4.2, CIFAR-10).

  A 3x3 convolution with 16 filters (+BN+ReLU), then 3 stages of `n` basic
  units with 16, 32 and 64 filters, where `depth = 6n + 2`; the first unit of
  stages 2 and 3 halves the resolution. A basic unit is
  conv3x3(w)-BN-ReLU-conv3x3(filters)-BN, added to its shortcut, then ReLU,
  with `w = scaled_width(filters, k)` for that unit's multiplier `k`.

  Shortcuts are He et al.'s option A: identity, or, where a unit changes the
  shape, spatial subsampling plus zero channel padding (`ZeroPadShortcut`), so
  shortcuts add no parameters. This is the choice that reproduces the
  parameter counts of the Neighbourhood Distillation paper's Table 1; 1x1
  projection shortcuts would add 2,944 parameters to ResNet-20 at every `k`.
  Those counts are of *trainable* parameters (BN moving statistics excluded),
  e.g. 269,722 for ResNet-20 at k = 1; `model.count_params()` is larger by the
  BN moving means and variances (1,376 for ResNet-20 at k = 1). Convolutions
  have no bias, as each is followed by BN, whose momentum is 0.9.

  The head is global average pooling and a `Dense(num_classes)` that outputs
  LOGITS: there is no softmax, so train with
  `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.

  Layer names: `stem_conv`, `stem_bn`, `stem_relu`;
  `stage{s}_unit{u}_{conv1,bn1,relu1,conv2,bn2,add,out}` with `s` and `u`
  counting from 1, plus `stage{s}_unit1_shortcut` where the shape changes;
  `head_pool`, `head_logits`.

  With `unit_noise` > 0 (the noise-regularised teacher of the paper's App.
  B.1) each unit ends with `keras.layers.GaussianNoise(unit_noise)` after its
  final ReLU, active in training only. The noise layer then carries the name
  `stage{s}_unit{u}_out` and the ReLU becomes `stage{s}_unit{u}_out_relu`, so
  `keras_nd.split` gives the same neighbourhoods, with the same names, as
  for the plain model, each unit's noise inside its own neighbourhood.

  Example:

  ```python
  teacher = resnet_v1(depth=20)
  student = resnet_v1(depth=20, multipliers=0.5)
  assert student.get_layer("stage1_unit1_conv1").filters == 8
  ```

  Args:
    depth: total number of weighted layers, `6n + 2` (20, 32, 44, 56, ...).
    multipliers: one bottleneck multiplier in (0, 1] for every unit, or a
      sequence of `3n` of them, one per unit in the order of the stages.
    input_shape: shape of one image, `(height, width, channels)`.
    num_classes: number of logits.
    weight_decay: L2 factor of the kernel regularizer of every convolution and
      of the logits layer; 0 disables it.
    name: model name; defaults to `f"resnet{depth}_v1"`.
    unit_noise: standard deviation of the Gaussian noise added to every
      residual unit's output while training; 0 adds no layer.

  Returns:
    A functional `keras.Model` mapping images to logits.

  Raises:
    ValueError: if `depth` is not `6n + 2` with `n >= 1`, `multipliers` has
      the wrong length or a value outside (0, 1], or `num_classes`,
      `weight_decay` or `unit_noise` is out of range.
  """
  if not _checks.is_integer(depth) or depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...); got "
        f"depth={depth!r}.")
  units_per_stage = (depth - 2) // 6
  ks = _unit_multipliers(multipliers, 3 * units_per_stage)
  _check_head(num_classes, weight_decay)
  _check_unit_noise(unit_noise)
  regularizer = _regularizer(weight_decay)

  inputs = keras.Input(shape=input_shape, name="input")
  x = _conv(16, 3, 1, regularizer, "stem_conv")(inputs)
  x = keras.layers.BatchNormalization(momentum=_CIFAR_BN_MOMENTUM, name="stem_bn")(x)
  x = keras.layers.ReLU(name="stem_relu")(x)
  unit_index = 0
  for stage, filters in enumerate(_CIFAR_STAGE_FILTERS, start=1):
    for unit in range(1, units_per_stage + 1):
      strides = 2 if stage > 1 and unit == 1 else 1
      x = _basic_unit(x, filters, strides, ks[unit_index], regularizer,
                      prefix=f"stage{stage}_unit{unit}", noise=unit_noise)
      unit_index += 1
  outputs = _head(x, num_classes, regularizer)
  return keras.Model(inputs, outputs, name=name or f"resnet{depth}_v1")


def resnet50_v1(multipliers=1.0, input_shape=(224, 224, 3), num_classes=1000,
                weight_decay=1e-4, name=None, unit_noise=0.0):
  """ResNetV1-50 for ImageNet (He et al. 2016) with bottleneck multipliers.

  The stem is that of `keras.applications.ResNet50`: 3-pixel zero padding,
  7x7/2 convolution with 64 filters, BN, ReLU, 1-pixel zero padding and 3x3/2
  max pooling. Then 4 stages of 3, 4, 6 and 3 bottleneck units with inner
  widths 64, 128, 256 and 512 and output widths 4 times those. A bottleneck
  unit is conv1x1(w)-BN-ReLU-conv3x3(w)-BN-ReLU-conv1x1(4 * filters)-BN, added
  to its shortcut, then ReLU, with `w = scaled_width(filters, k)` for that
  unit's multiplier `k`: the multiplier scales the two inner convolutions,
  never the expanding one, so every unit's output keeps its width.

  As in the original ResNetV1 (and `keras.applications.ResNet50`) the first
  unit of stages 2-4 downsamples with stride 2 in its first 1x1 convolution.
  The first unit of every stage has a projection shortcut (1x1 convolution
  with the unit's stride + BN), the others an identity. Convolutions have no
  bias, as each is followed by BN, so at k = 1 the model has 25,610,152
  parameters for 1000 classes (`count_params()`, BN moving statistics
  included): keras.applications' 25,636,712 less its 26,560 conv biases.

  The head is global average pooling and a `Dense(num_classes)` that outputs
  LOGITS (no softmax).

  Layer names: `stem_pad`, `stem_conv`, `stem_bn`, `stem_relu`,
  `stem_pool_pad`, `stem_pool`;
  `stage{s}_unit{u}_{conv1,bn1,relu1,conv2,bn2,relu2,conv3,bn3,add,out}`,
  plus `stage{s}_unit1_shortcut_conv` and `stage{s}_unit1_shortcut_bn`;
  `head_pool`, `head_logits`. `unit_noise` works as in `resnet_v1`.

  Example:

  ```python
  student = resnet50_v1(multipliers=0.5, input_shape=(64, 64, 3))
  assert student.get_layer("stage1_unit1_conv2").filters == 32
  ```

  Args:
    multipliers: one bottleneck multiplier in (0, 1] for every unit, or a
      sequence of 16 of them, one per unit in the order of the stages.
    input_shape: shape of one image, `(height, width, channels)`.
    num_classes: number of logits.
    weight_decay: L2 factor of the kernel regularizer of every convolution and
      of the logits layer; 0 disables it.
    name: model name; defaults to `"resnet50_v1"`.
    unit_noise: standard deviation of the Gaussian noise added to every
      residual unit's output while training; 0 adds no layer.

  Returns:
    A functional `keras.Model` mapping images to logits.

  Raises:
    ValueError: if `multipliers` has the wrong length or a value outside
      (0, 1], or `num_classes`, `weight_decay` or `unit_noise` is out of
      range.
  """
  ks = _unit_multipliers(multipliers, sum(_RESNET50_STAGE_UNITS))
  _check_head(num_classes, weight_decay)
  _check_unit_noise(unit_noise)
  regularizer = _regularizer(weight_decay)

  inputs = keras.Input(shape=input_shape, name="input")
  x = keras.layers.ZeroPadding2D(3, name="stem_pad")(inputs)
  x = _conv(64, 7, 2, regularizer, "stem_conv", padding="valid")(x)
  x = keras.layers.BatchNormalization(epsilon=_RESNET50_BN_EPSILON,
                                      name="stem_bn")(x)
  x = keras.layers.ReLU(name="stem_relu")(x)
  x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
  x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
  unit_index = 0
  for stage, (units, filters) in enumerate(
      zip(_RESNET50_STAGE_UNITS, _RESNET50_STAGE_FILTERS), start=1):
    for unit in range(1, units + 1):
      strides = 2 if stage > 1 and unit == 1 else 1
      x = _bottleneck_unit(x, filters, strides, ks[unit_index], regularizer,
                           projection=unit == 1,
                           prefix=f"stage{stage}_unit{unit}", noise=unit_noise)
      unit_index += 1
  outputs = _head(x, num_classes, regularizer)
  return keras.Model(inputs, outputs, name=name or "resnet50_v1")


def _unit_multipliers(multipliers, num_units):
  """One validated multiplier per residual unit.

  Args:
    multipliers: a number, or a sequence of `num_units` numbers.
    num_units: the model's number of residual units.

  Returns:
    A list of `num_units` floats in (0, 1].

  Raises:
    ValueError: if the sequence has the wrong length or a value is not a
      number in (0, 1].
  """
  if _checks.is_number(multipliers):
    ks = [float(multipliers)] * num_units
    if not 0.0 < ks[0] <= 1.0:
      raise ValueError(
          f"multipliers must be in (0, 1]; got multipliers={multipliers!r} "
          f"(applied to every unit, from unit 0).")
    return ks
  try:
    ks = list(multipliers)
  except TypeError:
    raise ValueError(
        f"multipliers must be a number or a sequence of {num_units} numbers "
        f"(one per residual unit); got {multipliers!r}.") from None
  if len(ks) != num_units:
    raise ValueError(
        f"multipliers must have one value per residual unit: expected length "
        f"{num_units}, got length {len(ks)}.")
  for index, k in enumerate(ks):
    if not _checks.is_number(k) or not 0.0 < float(k) <= 1.0:
      raise ValueError(
          f"multipliers must be in (0, 1]; got {k!r} for unit {index} "
          f"(counting from 0).")
  return [float(k) for k in ks]


def _check_head(num_classes, weight_decay):
  _checks.integer(num_classes, "num_classes")
  if not _checks.is_number(weight_decay) or weight_decay < 0:
    raise ValueError(
        f"weight_decay must be a number >= 0; got {weight_decay!r}.")


def _check_unit_noise(unit_noise):
  if not _checks.is_number(unit_noise) or not unit_noise >= 0:
    raise ValueError(
        f"unit_noise must be a number >= 0 (the stddev of the noise after each "
        f"residual unit); got unit_noise={unit_noise!r}.")


def _regularizer(weight_decay):
  return keras.regularizers.L2(weight_decay) if weight_decay else None


def _conv(filters, kernel_size, strides, regularizer, name, padding="same"):
  return keras.layers.Conv2D(
      filters, kernel_size, strides=strides, padding=padding, use_bias=False,
      kernel_initializer="he_normal", kernel_regularizer=regularizer,
      name=name)


def _basic_unit(x, filters, strides, k, regularizer, prefix, noise=0.0):
  """One CIFAR basic unit; returns its output tensor."""
  shortcut = x
  if strides != 1 or x.shape[-1] != filters:
    shortcut = ZeroPadShortcut(filters, strides,
                               name=f"{prefix}_shortcut")(x)
  x = _conv(scaled_width(filters, k), 3, strides, regularizer,
            f"{prefix}_conv1")(x)
  x = keras.layers.BatchNormalization(momentum=_CIFAR_BN_MOMENTUM, name=f"{prefix}_bn1")(x)
  x = keras.layers.ReLU(name=f"{prefix}_relu1")(x)
  x = _conv(filters, 3, 1, regularizer, f"{prefix}_conv2")(x)
  x = keras.layers.BatchNormalization(momentum=_CIFAR_BN_MOMENTUM, name=f"{prefix}_bn2")(x)
  x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
  return _unit_output(x, prefix, noise)


def _bottleneck_unit(x, filters, strides, k, regularizer, projection,
                     prefix, noise=0.0):
  """One ResNet-50 bottleneck unit; returns its output tensor."""
  def batch_norm(name):
    return keras.layers.BatchNormalization(epsilon=_RESNET50_BN_EPSILON,
                                           name=f"{prefix}_{name}")

  out_filters = _RESNET50_EXPANSION * filters
  inner = scaled_width(filters, k)
  shortcut = x
  if projection:
    shortcut = _conv(out_filters, 1, strides, regularizer,
                     f"{prefix}_shortcut_conv")(x)
    shortcut = batch_norm("shortcut_bn")(shortcut)
  x = _conv(inner, 1, strides, regularizer, f"{prefix}_conv1")(x)
  x = batch_norm("bn1")(x)
  x = keras.layers.ReLU(name=f"{prefix}_relu1")(x)
  x = _conv(inner, 3, 1, regularizer, f"{prefix}_conv2")(x)
  x = batch_norm("bn2")(x)
  x = keras.layers.ReLU(name=f"{prefix}_relu2")(x)
  x = _conv(out_filters, 1, 1, regularizer, f"{prefix}_conv3")(x)
  x = batch_norm("bn3")(x)
  x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
  return _unit_output(x, prefix, noise)


def _unit_output(x, prefix, noise):
  """A unit's final ReLU, followed by GaussianNoise(noise) when noise > 0.

  The unit's output keeps the name `{prefix}_out` either way: with noise it
  is the GaussianNoise layer's (the ReLU becomes `{prefix}_out_relu`). A
  chain of parameter-free layers after the Add joins the unit's
  neighbourhood, so `split` names the neighbourhoods of a noise-regularised
  model exactly as those of the plain one, and the cut between two units
  lies after the noise: each unit's neighbourhood holds its own noise.
  """
  if not noise:
    return keras.layers.ReLU(name=f"{prefix}_out")(x)
  x = keras.layers.ReLU(name=f"{prefix}_out_relu")(x)
  return keras.layers.GaussianNoise(noise, name=f"{prefix}_out")(x)


def _head(x, num_classes, regularizer):
  x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
  return keras.layers.Dense(num_classes, kernel_initializer="he_normal",
                            kernel_regularizer=regularizer,
                            name="head_logits")(x)
