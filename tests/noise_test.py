"""Tests for keras_nd.noise (statistics of neighbourhood inputs read from the teacher)."""

import numpy as np
import testing

import keras_nd as nd
from keras_nd import models, noise
from keras_nd._keras import keras, tf


class NoiseStatisticsTest(tf.test.TestCase):
  """Statistics read from BatchNorm layers, checked against Monte Carlo samples drawn by hand."""

  def _model(self):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 1, name="c0")(inputs)
    x = keras.layers.BatchNormalization(epsilon=0.01, name="bn0")(x)
    x = keras.layers.ReLU(name="r0")(x)
    y = keras.layers.Conv2D(3, 1, name="c1")(x)
    y = keras.layers.BatchNormalization(epsilon=0.01, name="bn1")(y)
    z = keras.layers.ReLU(name="r1")(keras.layers.Add(name="add")([x, y]))
    z = keras.layers.Conv2D(3, 1, name="c2")(z)
    outputs = keras.layers.Dense(2, name="d")(keras.layers.GlobalAveragePooling2D(name="gap")(z))
    model = keras.Model(inputs, outputs)
    bn = {"bn0": ([1.5, 0.5, 2.0], [0.3, -1.0, 0.0], [0.2, 0.1, -0.4], [2.0, 0.5, 1.0]),
          "bn1": ([0.7, 1.2, 0.1], [-0.2, 0.5, 2.0], [0.0, 0.0, 0.0], [0.04, 3.0, 1.0])}
    for name, (gamma, beta, mean, variance) in bn.items():
      model.get_layer(name).set_weights([np.array(v, np.float32) for v in
                                         (gamma, beta, mean, variance)])
    return model, bn

  def _sample_bn(self, rng, params, n):
    gamma, beta, _, variance = (np.array(v) for v in params)
    std = np.abs(gamma) * np.sqrt(variance / (variance + 0.01))
    return beta + std * rng.normal(size=(n, 3))

  def test_statistics_match_samples_through_bn_relu_and_add(self):
    model, bn = self._model()
    hoods = {h.name: h for h in nd.split_layers(model, keras.layers.Conv2D)}
    rng = np.random.RandomState(0)
    n = 1_000_000
    x = np.maximum(self._sample_bn(rng, bn["bn0"], n), 0.0)
    z = np.maximum(x + self._sample_bn(rng, bn["bn1"], n), 0.0)
    # c1's input is ReLU of a Gaussian: exact. c2's is ReLU of (rectified + Gaussian), which
    # the moments treat as Gaussian: an approximation, here within 11% of the samples.
    for name, samples, rtol in (("c1", x, 0.0), ("c2", z, 0.12)):
      mean, std = noise.noise_statistics(hoods[name])
      self.assertAllClose(mean, samples.mean(axis=0), atol=5e-3, rtol=rtol, msg=name)
      self.assertAllClose(std, samples.std(axis=0), atol=5e-3, rtol=rtol, msg=name)
    mean, std = noise.noise_statistics(hoods["c0"], input_mean=0.5, input_std=2.0)
    self.assertAllClose(mean, [0.5, 0.5])
    self.assertAllClose(std, [2.0, 2.0])

  def test_a_layer_without_statistics_is_named(self):
    model, _ = self._model()
    hood = next(h for h in nd.split_layers(model, keras.layers.Dense))
    with self.assertRaisesRegex(ValueError, "'gap'.*GlobalAveragePooling2D"):
      noise.noise_statistics(hood)

  def test_resnet_padded_shortcut_channels_carry_only_the_residual_branch(self):
    teacher = testing.randomize_batch_norm(testing.tiny_resnet())
    hood = next(h for h in nd.split(teacher) if h.name == "stage3_unit1_out")
    mean, std = noise.noise_statistics(hood)  # input: stage2_unit1's output, 32 channels
    bn2 = teacher.get_layer("stage2_unit1_bn2")
    gamma, beta, _, variance = bn2.get_weights()
    branch = beta + np.abs(gamma) * np.sqrt(variance / (variance + bn2.epsilon)) * \
        np.random.RandomState(1).normal(size=(400_000, 32))
    relu = np.maximum(branch, 0.0)
    padded = np.r_[0:8, 24:32]  # 16 channels padded to 32: 8 zeros before, 8 after
    self.assertAllClose(mean[padded], relu.mean(axis=0)[padded], atol=1e-2)
    self.assertAllClose(std[padded], relu.std(axis=0)[padded], atol=1e-2)
    self.assertTrue(np.all(mean >= 0))

  def test_from_noise_with_teacher_statistics_serves_them(self):
    model, _ = self._model()
    hoods = [h for h in nd.split_layers(model, keras.layers.Conv2D) if h.name in ("c1", "c2")]
    source = nd.ActivationSource.from_noise(model, hoods, steps_per_epoch=4, mean="teacher")
    batch = next(iter(source.dataset(batch_size=512)))
    for hood in hoods:
      mean, std = noise.noise_statistics(hood)
      a = batch[hood.name][0].numpy().reshape(-1, 3)
      self.assertAllClose(a.mean(axis=0), mean, atol=0.05)
      self.assertAllClose(a.std(axis=0), std, atol=0.05)
      # Both inputs come out of a ReLU: drawn rectified, never negative, some exactly 0.
      self.assertGreaterEqual(a.min(), 0.0)
      self.assertBetween(np.mean(a == 0), 0.05, 0.95)
    with self.assertRaisesRegex(ValueError, "'data'"):
      nd.ActivationSource.from_noise(model, hoods, steps_per_epoch=4, mean="data")

  def test_a_noise_regularised_teachers_statistics_are_the_plain_ones(self):
    keras.utils.set_random_seed(0)
    plain = models.resnet_v1(depth=8)
    noisy = models.resnet_v1(depth=8, unit_noise=0.1)
    noisy.set_weights(plain.get_weights())
    for hood, noisy_hood in zip(nd.split(plain)[1:-1], nd.split(noisy)[1:-1]):
      for got, want in zip(noise.noise_statistics(noisy_hood),
                           noise.noise_statistics(hood)):
        self.assertAllClose(got, want)
    source = nd.ActivationSource.from_noise(noisy, nd.split(noisy)[2:-1], steps_per_epoch=1,
                                            mean="teacher")
    for a, _ in next(iter(source.dataset(batch_size=4))).values():  # unit outputs: rectified
      self.assertGreaterEqual(float(tf.reduce_min(a)), 0.0)

  def _after(self, layer):
    """A model whose conv 'c1' reads `layer`'s output of a BatchNorm's (statistics known)."""
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(3, 1)(inputs))
    x = keras.layers.Conv2D(3, 1, name="c1")(layer(x))
    model = keras.Model(inputs, x)
    model.get_layer("bn").set_weights([np.array(v, np.float32) for v in
                                       ([1.0, 2.0, 3.0], [0.5, 0.0, -0.5], [0] * 3, [1] * 3)])
    return next(h for h in nd.split_layers(model, keras.layers.Conv2D) if h.name == "c1")

  def test_a_parameter_free_layer_that_moves_channels_carries_them(self):
    hood = self._after(_Reversed())
    mean, std = noise.noise_statistics(hood)
    self.assertAllClose(mean, [-0.5, 0.0, 0.5])
    self.assertAllClose(std, np.array([3.0, 2.0, 1.0]) * np.sqrt(1 / 1.001))

  def test_a_parameter_free_layer_that_changes_values_is_named(self):
    with self.assertRaisesRegex(ValueError, "'doubled'.*_Doubled"):
      noise.noise_statistics(self._after(_Doubled(name="doubled")))


class _Reversed(keras.layers.Layer):

  def call(self, inputs):
    return tf.reverse(inputs, [-1])


class _Doubled(keras.layers.Layer):

  def call(self, inputs):
    return 2.0 * inputs


if __name__ == "__main__":
  tf.test.main()
