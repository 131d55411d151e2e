"""Tests for keras_nd.perturb: output and weight noise on a trained model."""

import contextlib
import functools
import io
from unittest import mock

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import graph, metrics, perturb
from keras_nd._keras import keras, tf


@functools.lru_cache(maxsize=None)
def _teacher():
  """A tiny ResNet trained to (nearly) fit its data: (teacher, hoods, x, y, dataset)."""
  x, y = testing.images(128)
  teacher = testing.trained(testing.tiny_resnet(), x, y, epochs=5)
  return teacher, nd.split(teacher), x, y, testing.dataset(x, y, batch_size=32)


def _layer_outputs(model, names):
  """A model from `model`'s input to the outputs of its layers called `names`."""
  tensors = {node.layer.name: graph.output_tensors(node)[0]
             for node in graph.model_nodes(model) if not node.is_input}
  return keras.Model(model.inputs, [tensors[name] for name in names])


class _TeacherTestCase(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teacher, cls.hoods, cls.x, cls.y, cls.data = _teacher()

  def clean(self, hood):
    """The teacher's output of `hood` on self.x."""
    return _layer_outputs(self.teacher, [hood.name])(self.x, training=False).numpy()


class WithOutputNoiseTest(_TeacherTestCase):

  def test_zero_epsilon_leaves_the_outputs_unchanged(self):
    noisy = perturb.with_output_noise(self.teacher, self.hoods, 0.0)
    self.assertAllEqual(noisy(self.x, training=False), self.teacher(self.x, training=False))

  @parameterized.named_parameters(("first_unit", 1), ("last_unit", 3), ("head", 4))
  def test_noise_is_added_only_at_the_chosen_neighbourhood(self, index):
    hood = self.hoods[index]
    noisy = perturb.with_output_noise(self.teacher, [hood], 0.5)
    before = [h.name for h in self.hoods[:index]]
    outputs = _layer_outputs(noisy, before + [hood.name, f"{hood.name}_noise"])(
        self.x, training=False)
    clean = _layer_outputs(self.teacher, before + [hood.name])(self.x, training=False)
    outputs, clean = tf.nest.flatten(outputs), tf.nest.flatten(clean)
    for name, got, want in zip(before + [hood.name], outputs, clean):
      self.assertAllEqual(got, want, msg=name)
    self.assertGreater(np.abs(outputs[-1] - clean[-1]).max(), 0.1)

  def test_noise_acts_at_inference_and_is_deterministic_for_a_seed(self):
    hood = self.hoods[2]
    first = perturb.with_output_noise(self.teacher, hood, 0.5, seed=7)(self.x, training=False)
    again = perturb.with_output_noise(self.teacher, hood, 0.5, seed=7)(self.x, training=False)
    other = perturb.with_output_noise(self.teacher, hood, 0.5, seed=8)(self.x, training=False)
    self.assertAllEqual(first, again)
    self.assertNotAllClose(first, other)
    self.assertNotAllClose(first, self.teacher(self.x, training=False))

  def test_every_call_draws_new_noise(self):
    noisy = perturb.with_output_noise(self.teacher, self.hoods[4], 0.5)
    self.assertNotAllClose(noisy(self.x, training=False), noisy(self.x, training=False))

  @parameterized.named_parameters(("absolute", None, 0.3), ("relative", {"stage1_unit1_out": 2.0},
                                                            0.6))
  def test_noise_has_the_requested_standard_deviation(self, scales, stddev):
    hood = self.hoods[1]
    noisy = perturb.with_output_noise(self.teacher, hood, 0.3, scales=scales)
    got = _layer_outputs(noisy, [f"{hood.name}_noise"])(self.x, training=False).numpy()
    noise = got - self.clean(hood)
    # 128 x 8 x 8 x 16 draws: the sample deviation is within 1% of the true one.
    self.assertAllClose(noise.std(), stddev, rtol=0.02)
    self.assertAllClose(noise.mean(), 0.0, atol=0.01 * stddev)

  def test_the_teachers_weights_are_never_changed(self):
    before = testing.weights_of(self.teacher)
    noisy = perturb.with_output_noise(self.teacher, self.hoods, 1.0)
    noisy(self.x, training=False)
    perturb.output_sweep(self.teacher, self.hoods[:2], self.data, [0.0, 1.0], seeds=(0,))
    for want, got in zip(before, testing.weights_of(self.teacher)):
      self.assertAllEqual(got, want)

  def test_output_noise_layer_config_round_trips(self):
    layer = perturb.OutputNoise(0.3, seed=5, stream=2, name="noise")
    x = np.ones((4, 3), "float32")
    expected = layer(x)
    copy = perturb.OutputNoise.from_config(layer.get_config())
    self.assertEqual(copy.get_config(), layer.get_config())
    self.assertAllEqual(copy(x), expected)

  def test_output_rms_is_the_root_mean_square_of_each_output(self):
    rms = perturb.output_rms(self.teacher, self.hoods[:2], self.data)
    for hood in self.hoods[:2]:
      self.assertAllClose(rms[hood.name], np.sqrt(np.mean(self.clean(hood)**2)), rtol=1e-5)

  def test_rejects_a_negative_epsilon(self):
    with self.assertRaisesRegex(ValueError, r"epsilon must be a number in \[0, inf\); got -0.1"):
      perturb.with_output_noise(self.teacher, self.hoods, -0.1)

  def test_rejects_neighbourhoods_of_another_model(self):
    other = testing.tiny_resnet(seed=1)
    with self.assertRaisesRegex(ValueError, "'stem_relu' was split from model"):
      perturb.with_output_noise(other, self.hoods, 0.1)

  def test_rejects_no_neighbourhoods(self):
    with self.assertRaisesRegex(ValueError, "No neighbourhoods given"):
      perturb.with_output_noise(self.teacher, [], 0.1)

  def test_rejects_scales_missing_a_neighbourhood(self):
    with self.assertRaisesRegex(ValueError, r"no value for the neighbourhoods \['stem_relu'\]"):
      perturb.with_output_noise(self.teacher, self.hoods[:2], 0.1,
                                scales={"stage1_unit1_out": 1.0})


class OutputSweepTest(_TeacherTestCase):

  @parameterized.named_parameters(
      ("each", "each", [["stem_relu"], ["stage1_unit1_out"], ["stage2_unit1_out"]]),
      ("all", "all", [["stem_relu", "stage1_unit1_out", "stage2_unit1_out"]]),
      ("cumulative", "cumulative", [["stem_relu"], ["stem_relu", "stage1_unit1_out"],
                                    ["stem_relu", "stage1_unit1_out", "stage2_unit1_out"]]))
  def test_rows_per_perturbed_set_and_amplitude(self, mode, groups):
    rows = perturb.output_sweep(self.teacher, self.hoods[:3], self.data, [0.0, 0.5], mode=mode,
                                seeds=(0, 1))
    self.assertEqual([row["hoods"] for row in rows], [g for g in groups for _ in range(2)])
    self.assertEqual([row["epsilon"] for row in rows], [0.0, 0.5] * len(groups))
    for row in rows:
      self.assertLen(row["accuracies"], 2)
      self.assertAllClose(row["accuracy_mean"], np.mean(row["accuracies"]))
      self.assertAllClose(row["accuracy_std"], np.std(row["accuracies"]))
      self.assertFalse(row["relative"])

  def test_accuracy_at_zero_epsilon_is_the_clean_accuracy(self):
    clean = metrics.accuracy(self.teacher, self.data)
    reference = keras.metrics.SparseCategoricalAccuracy()  # Keras's own, batch by batch
    for x, y in self.data:
      reference.update_state(y, self.teacher(x, training=False))
    self.assertAllClose(clean, reference.result())
    rows = perturb.output_sweep(self.teacher, self.hoods, self.data, [0.0], mode="all",
                                relative=True)
    self.assertEqual(rows[0]["accuracies"], [clean] * 3)

  def test_large_relative_noise_on_all_neighbourhoods_lowers_the_accuracy(self):
    clean = metrics.accuracy(self.teacher, self.data)
    self.assertGreater(clean, 0.9)  # the trained teacher fits its data
    rows = perturb.output_sweep(self.teacher, self.hoods, self.data, [3.0], mode="all",
                                relative=True)
    self.assertLess(rows[0]["accuracy_mean"], clean - 0.2)
    self.assertTrue(rows[0]["relative"])

  def test_a_sweep_is_deterministic(self):
    def sweep():
      return perturb.output_sweep(self.teacher, self.hoods[3:], self.data, [1.0], seeds=(0, 1))

    self.assertEqual(sweep(), sweep())

  def test_verbose_shows_progress_over_every_evaluation_and_is_silent_by_default(self):
    for verbose in (1, 0):
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        perturb.output_sweep(self.teacher, self.hoods[:2], self.data, [0.0, 1.0], seeds=(0,),
                             verbose=verbose)  # 2 neighbourhoods x 2 amplitudes x 1 seed
      if verbose:
        self.assertStartsWith(out.getvalue().strip().splitlines()[-1], "4/4 ")
      else:
        self.assertEqual(out.getvalue(), "")

  def test_rejects_empty_epsilons(self):
    with self.assertRaisesRegex(ValueError, "epsilons is empty"):
      perturb.output_sweep(self.teacher, self.hoods, self.data, [])

  def test_rejects_a_negative_epsilon_naming_it(self):
    with self.assertRaisesRegex(ValueError, r"epsilons\[1\] must be a number in \[0, inf\)"):
      perturb.output_sweep(self.teacher, self.hoods, self.data, [0.1, -1.0])

  def test_rejects_an_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, "mode must be one of.*'every'"):
      perturb.output_sweep(self.teacher, self.hoods, self.data, [0.1], mode="every")

  def test_rejects_a_dataset_without_labels(self):
    with self.assertRaisesRegex(ValueError, r"batches \(x, y\)"):
      perturb.output_sweep(self.teacher, self.hoods, testing.dataset(self.x), [0.1])


class WeightSweepTest(_TeacherTestCase):

  def test_restores_the_weights_exactly_and_predicts_by_summing_drops(self):
    before = testing.weights_of(self.teacher)
    result = perturb.weight_sweep(self.teacher, self.data, 1.0, seeds=(0, 1))
    for want, got in zip(before, testing.weights_of(self.teacher)):
      self.assertAllEqual(got, want)
    names = [row["layer"] for row in result["individual"]]
    self.assertEqual(names[0], "stem_conv")
    self.assertEqual(names[-1], "head_logits")
    self.assertLen(names, 8)  # 7 convolutions and the logits layer of the ResNet-8
    drops = [row["drop_mean"] for row in result["individual"]]
    self.assertAllClose([row["predicted_drop"] for row in result["cumulative"]], np.cumsum(drops))
    self.assertEqual([row["layers"] for row in result["cumulative"]], list(range(1, 9)))
    # The first cumulative step perturbs the first layer alone, with the same draws.
    self.assertEqual(result["cumulative"][0]["measured_drop_mean"], drops[0])
    self.assertEqual(result["accuracy"], metrics.accuracy(self.teacher, self.data))

  def test_verbose_counts_the_clean_and_every_perturbed_evaluation(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      perturb.weight_sweep(self.teacher, self.data, 0.1, layers=["stem_conv", "head_logits"],
                           seeds=(0,), verbose=1)
    # The clean accuracy, then 2 layers alone and cumulatively.
    self.assertStartsWith(out.getvalue().strip().splitlines()[-1], "5/5 ")

  def test_zero_epsilon_drops_nothing(self):
    result = perturb.weight_sweep(self.teacher, self.data, 0.0, layers=["stem_conv", "head_logits"],
                                  seeds=(0,))
    self.assertEqual([row["layer"] for row in result["individual"]], ["stem_conv", "head_logits"])
    for row in result["individual"]:
      self.assertEqual(row["drop_mean"], 0.0)
    for row in result["cumulative"]:
      self.assertEqual(row["measured_drop_mean"], 0.0)

  def test_restores_the_weights_when_interrupted(self):
    before = testing.weights_of(self.teacher)
    # Clean accuracy, the first perturbed one, then a failure with the next kernel perturbed.
    with mock.patch.object(metrics.Scorer, "__call__",  # pylint: disable=protected-access
                           side_effect=[0.9, 0.8, RuntimeError("interrupted")]):
      with self.assertRaisesRegex(RuntimeError, "interrupted"):
        perturb.weight_sweep(self.teacher, self.data, 10.0)
    for want, got in zip(before, testing.weights_of(self.teacher)):
      self.assertAllEqual(got, want)

  def test_noise_is_relative_to_the_kernels_standard_deviation(self):
    kernel = self.teacher.get_layer("stage1_unit1_conv1").kernel
    original = kernel.numpy()
    seen = []

    def record():
      seen.append(kernel.numpy() - original)
      return 0.5

    with mock.patch.object(metrics.Scorer, "__call__",  # pylint: disable=protected-access
                           side_effect=record):
      perturb.weight_sweep(self.teacher, self.data, 0.5, layers=["stage1_unit1_conv1"],
                           seeds=(0,))
    # 3 x 3 x 16 x 16 draws of N(0, (0.5 std)^2).
    self.assertAllClose(seen[1].std(), 0.5 * original.std(), rtol=0.1)
    self.assertAllEqual(kernel, original)

  def test_rejects_an_unknown_layer(self):
    with self.assertRaisesRegex(ValueError, "'stage9_conv' is not a layer of model"):
      perturb.weight_sweep(self.teacher, self.data, 0.1, layers=["stage9_conv"])

  def test_rejects_a_layer_without_kernel(self):
    with self.assertRaisesRegex(ValueError, "'stem_bn' .*has no kernel"):
      perturb.weight_sweep(self.teacher, self.data, 0.1, layers=["stem_bn"])

  def test_rejects_a_negative_epsilon(self):
    with self.assertRaisesRegex(ValueError, r"epsilon must be a number in \[0, inf\); got -1"):
      perturb.weight_sweep(self.teacher, self.data, -1)


if __name__ == "__main__":
  tf.test.main()
