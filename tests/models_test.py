"""Tests for keras_nd.models (ResNetV1 builders with bottleneck multipliers)."""

import os

import numpy as np
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import models
from keras_nd._keras import keras, tf

# Trainable parameters of ResNet-20 on CIFAR-10 for each bottleneck multiplier
# k, from Table 1 of Shao et al., "Neighbourhood Distillation"
# (arXiv:2010.01189).
_TABLE1_RESNET20_PARAMS = {
    1.0: 269_000,
    0.9: 239_000,
    0.8: 213_000,
    0.75: 202_000,
    0.6: 160_000,
    0.5: 136_000,
    0.4: 105_000,
}
# keras.applications.ResNet50(weights=None).count_params() for 1000 classes.
_KERAS_RESNET50_PARAMS = 25_636_712
_CIFAR_UNIT_NAMES = [f"stage{s}_unit{u}" for s in (1, 2, 3) for u in (1, 2, 3)]


def _trainable_params(model):
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


class ResNetV1Test(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      (f"k_{k}", k) for k in _TABLE1_RESNET20_PARAMS)
  def test_resnet20_trainable_params_match_table1_within_3_percent(self, k):
    model = models.resnet_v1(depth=20, multipliers=k)
    self.assertAllClose(_trainable_params(model), _TABLE1_RESNET20_PARAMS[k],
                        rtol=0.03, atol=0)

  def test_resnet20_count_params_adds_only_bn_moving_statistics(self):
    model = models.resnet_v1(depth=20)
    # 19 BN layers: stem 16, 6 x 16, 6 x 32, 6 x 64 channels, 2 statistics.
    bn_statistics = 2 * (16 + 6 * (16 + 32 + 64))
    self.assertEqual(model.count_params(),
                     _trainable_params(model) + bn_statistics)

  @parameterized.named_parameters(("depth_20", 20, 3), ("depth_32", 32, 5),
                                  ("depth_56", 56, 9))
  def test_resnet_v1_has_n_units_per_stage_and_default_name(self, depth, n):
    model = models.resnet_v1(depth=depth)
    self.assertEqual(model.name, f"resnet{depth}_v1")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    self.assertLen(convs, depth - 1)  # + head_logits = depth weighted layers
    model.get_layer(f"stage3_unit{n}_out")
    with self.assertRaises(ValueError):
      model.get_layer(f"stage3_unit{n + 1}_out")

  def test_resnet_v1_per_unit_multiplier_changes_only_that_units_conv1(self):
    ks = [1.0] * 9
    ks[4] = 0.5  # stage2_unit2
    model = models.resnet_v1(depth=20, multipliers=ks)
    reference = models.resnet_v1(depth=20)
    for prefix in _CIFAR_UNIT_NAMES:
      conv1 = model.get_layer(f"{prefix}_conv1").filters
      expected = reference.get_layer(f"{prefix}_conv1").filters
      if prefix == "stage2_unit2":
        expected //= 2
      self.assertEqual(conv1, expected, msg=prefix)
      self.assertEqual(model.get_layer(f"{prefix}_conv2").filters,
                       reference.get_layer(f"{prefix}_conv2").filters,
                       msg=prefix)
    self.assertEqual(model.get_layer("stage2_unit2_conv1").filters, 16)

  def test_resnet_v1_shortcut_adds_no_parameters_and_downsamples(self):
    model = models.resnet_v1(depth=20)
    shortcut = model.get_layer("stage2_unit1_shortcut")
    self.assertEmpty(shortcut.weights)
    self.assertEqual(shortcut.output_shape, (None, 16, 16, 32))
    self.assertEqual(model.get_layer("stage1_unit1_add").input_shape[0],
                     (None, 32, 32, 16))  # identity shortcut

  def test_zero_pad_shortcut_subsamples_and_pads_channels_evenly(self):
    x = tf.reshape(tf.range(1.0, 1.0 + 2 * 3 * 3 * 2), (2, 3, 3, 2))
    y = models.ZeroPadShortcut(6, strides=2)(x)
    self.assertEqual(y.shape, (2, 2, 2, 6))
    self.assertAllEqual(y[..., 2:4], x[:, ::2, ::2, :])
    self.assertAllEqual(y[..., :2], tf.zeros((2, 2, 2, 2)))
    self.assertAllEqual(y[..., 4:], tf.zeros((2, 2, 2, 2)))

  @parameterized.named_parameters(
      ("small_grayscale", (16, 16, 1), 5),
      ("rectangular", (24, 40, 3), 7),
      ("odd_rectangular", (17, 15, 2), 3))
  def test_resnet_v1_outputs_logits_of_shape_batch_by_classes(
      self, input_shape, num_classes):
    model = models.resnet_v1(depth=20, input_shape=input_shape,
                             num_classes=num_classes)
    images = np.random.default_rng(0).random((2,) + input_shape, "float32")
    logits = model(images, training=False)
    self.assertEqual(logits.shape, (2, num_classes))
    self.assertEqual(model.output_shape, (None, num_classes))
    # Logits, not probabilities: rows need not sum to 1.
    self.assertIsInstance(model.get_layer("head_logits"), keras.layers.Dense)
    self.assertEqual(model.get_layer("head_logits").get_config()["activation"],
                     "linear")

  def test_weight_decay_zero_disables_regularization(self):
    self.assertLen(models.resnet_v1(depth=20, weight_decay=0).losses, 0)
    # 19 convolutions and the logits layer.
    self.assertLen(models.resnet_v1(depth=20).losses, 20)

  def test_resnet_v1_saves_and_loads_in_safe_mode(self):
    model = models.resnet_v1(depth=8, multipliers=0.5, input_shape=(8, 8, 3),
                             num_classes=4)
    path = os.path.join(self.get_temp_dir(), "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    images = np.random.default_rng(1).random((2, 8, 8, 3), "float32")
    self.assertAllClose(loaded(images), model(images))
    self.assertEqual([layer.name for layer in loaded.layers],
                     [layer.name for layer in model.layers])

  @parameterized.named_parameters(("21", 21), ("15", 15), ("2", 2),
                                  ("float", 20.0))
  def test_resnet_v1_rejects_depth_not_6n_plus_2(self, depth):
    with self.assertRaisesRegex(ValueError, f"depth={depth!r}"):
      models.resnet_v1(depth=depth)

  def test_resnet_v1_rejects_multipliers_of_wrong_length(self):
    with self.assertRaisesRegex(ValueError,
                                "expected length 9, got length 8"):
      models.resnet_v1(depth=20, multipliers=[0.5] * 8)

  @parameterized.named_parameters(("zero", 0.0), ("negative", -0.5),
                                  ("above_one", 1.5))
  def test_resnet_v1_rejects_out_of_range_multiplier_naming_unit(self, k):
    ks = [1.0] * 9
    ks[3] = k
    with self.assertRaisesRegex(ValueError, rf"{k!r} for unit 3"):
      models.resnet_v1(depth=20, multipliers=ks)

  def test_resnet_v1_rejects_out_of_range_scalar_multiplier(self):
    with self.assertRaisesRegex(ValueError, "multipliers=1.5"):
      models.resnet_v1(depth=20, multipliers=1.5)

  def test_resnet_v1_rejects_non_positive_num_classes(self):
    with self.assertRaisesRegex(ValueError, "num_classes.*0"):
      models.resnet_v1(depth=20, num_classes=0)


class ResNet50V1Test(tf.test.TestCase):

  def test_resnet50_params_at_k_1_within_1_percent_of_keras_applications(self):
    # Small images keep the build fast; the parameter count does not depend on
    # the resolution.
    model = models.resnet50_v1(input_shape=(64, 64, 3), num_classes=1000)
    self.assertAllClose(model.count_params(), _KERAS_RESNET50_PARAMS,
                        rtol=0.01, atol=0)
    self.assertEqual(model.output_shape, (None, 1000))
    self.assertEqual(model.name, "resnet50_v1")

  def test_resnet50_k_0_5_halves_inner_widths_and_is_smaller(self):
    half = models.resnet50_v1(multipliers=0.5, input_shape=(64, 64, 3))
    self.assertLess(half.count_params(), 0.6 * _KERAS_RESNET50_PARAMS)
    for name, filters in (("conv1", 32), ("conv2", 32), ("conv3", 256),
                          ("shortcut_conv", 256)):
      self.assertEqual(half.get_layer(f"stage1_unit1_{name}").filters,
                       filters, msg=name)

  def test_resnet50_per_unit_multiplier_scales_only_that_units_inner_convs(
      self):
    ks = [1.0] * 16
    ks[7] = 0.25  # stage3_unit1
    model = models.resnet50_v1(multipliers=ks, input_shape=(32, 32, 3),
                               num_classes=10)
    self.assertEqual(model.get_layer("stage3_unit1_conv1").filters, 64)
    self.assertEqual(model.get_layer("stage3_unit1_conv2").filters, 64)
    self.assertEqual(model.get_layer("stage3_unit1_conv3").filters, 1024)
    self.assertEqual(model.get_layer("stage3_unit2_conv1").filters, 256)
    self.assertEqual(model.get_layer("stage2_unit4_conv2").filters, 128)
    logits = model(np.zeros((1, 32, 32, 3), "float32"), training=False)
    self.assertEqual(logits.shape, (1, 10))

  def test_resnet50_rejects_multipliers_of_wrong_length(self):
    with self.assertRaisesRegex(ValueError,
                                "expected length 16, got length 9"):
      models.resnet50_v1(multipliers=[1.0] * 9)


class UnitNoiseTest(tf.test.TestCase, parameterized.TestCase):
  """`unit_noise`: GaussianNoise after every residual unit, for the noise-regularised teacher."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    keras.utils.set_random_seed(0)
    shape = (8, 8, 3)
    cls.plain = models.resnet_v1(depth=8, input_shape=shape, num_classes=3, weight_decay=0.0)
    cls.noisy = models.resnet_v1(depth=8, input_shape=shape, num_classes=3, weight_decay=0.0,
                                 unit_noise=0.5)
    cls.noisy.set_weights(cls.plain.get_weights())
    cls.x = np.random.default_rng(0).normal(size=(4,) + shape).astype("float32")

  def test_unit_outputs_are_gaussian_noise_layers_after_the_final_relu(self):
    for prefix in ("stage1_unit1", "stage2_unit1", "stage3_unit1"):
      noise = self.noisy.get_layer(f"{prefix}_out")
      self.assertIsInstance(noise, keras.layers.GaussianNoise, msg=prefix)
      self.assertEqual(noise.stddev, 0.5)
      self.assertIsInstance(noise.input._keras_history.layer, keras.layers.ReLU)  # pylint: disable=protected-access
      self.assertEqual(noise.input._keras_history.layer.name, f"{prefix}_out_relu")  # pylint: disable=protected-access
    self.assertIsInstance(self.plain.get_layer("stage1_unit1_out"), keras.layers.ReLU)
    self.assertEqual(self.noisy.count_params(), self.plain.count_params())

  def test_inference_is_that_of_the_plain_model_with_the_same_weights(self):
    self.assertAllEqual(self.noisy(self.x, training=False), self.plain(self.x, training=False))

  def test_training_mode_adds_noise(self):
    self.assertNotAllClose(self.noisy(self.x, training=True), self.plain(self.x, training=True))

  def test_split_gives_the_plain_models_neighbourhoods_each_holding_its_noise(self):
    plain, noisy = nd.split(self.plain), nd.split(self.noisy)
    self.assertEqual([h.name for h in noisy], [h.name for h in plain])
    for hood in noisy[1:-1]:
      self.assertIsInstance(hood.layers[-1], keras.layers.GaussianNoise, msg=hood.name)
      self.assertEqual(hood.layers[-1].name, hood.name)

  def test_resnet50_split_gives_the_plain_models_neighbourhoods(self):
    plain = models.resnet50_v1(input_shape=(32, 32, 3), num_classes=10)
    noisy = models.resnet50_v1(input_shape=(32, 32, 3), num_classes=10, unit_noise=0.1)
    self.assertIsInstance(noisy.get_layer("stage4_unit3_out"), keras.layers.GaussianNoise)
    self.assertEqual([h.name for h in nd.split(noisy)], [h.name for h in nd.split(plain)])

  def test_noise_regularised_model_saves_and_loads_in_safe_mode(self):
    path = os.path.join(self.get_temp_dir(), "noisy.keras")
    self.noisy.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    self.assertAllClose(loaded(self.x, training=False), self.noisy(self.x, training=False))
    self.assertEqual(loaded.get_layer("stage2_unit1_out").stddev, 0.5)

  @parameterized.named_parameters(("negative", -0.1), ("string", "0.1"), ("nan", float("nan")))
  def test_rejects_a_bad_unit_noise(self, unit_noise):
    with self.assertRaisesRegex(ValueError, "unit_noise must be a number >= 0"):
      models.resnet_v1(depth=8, input_shape=(8, 8, 3), unit_noise=unit_noise)
    with self.assertRaisesRegex(ValueError, "unit_noise must be a number >= 0"):
      models.resnet50_v1(input_shape=(32, 32, 3), unit_noise=unit_noise)


if __name__ == "__main__":
  tf.test.main()
