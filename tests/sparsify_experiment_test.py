"""Smoke tests of the sparsification experiment (examples/sparsify.py's logic)."""

import dataclasses
import json
import os

import testing
from absl.testing import parameterized

from keras_nd import data
from keras_nd._keras import tf
from keras_nd.experiments import sparsify


def _config(**kwargs):
  return sparsify.Config(**dict(dict(model="resnet8", batch_size=16, verbose=0), **kwargs))


def _easy_task():
  """A task ResNet-8 learns in two epochs (the label is in the images' mean; 3 classes)."""
  x, y = testing.images(160)
  return data.Dataset.from_arrays("easy", (x[:96], y[:96]), (x[128:], y[128:]),
                                  validation=(x[96:128], y[96:128])).with_preprocessing("none")


class SparsifyExperimentTest(tf.test.TestCase, parameterized.TestCase):

  def test_nd_and_kd_reach_the_requested_sparsity_and_keep_what_the_teacher_learnt(self):
    workdir = self.get_temp_dir()
    board = os.path.join(workdir, "tensorboard")
    config = _config(sparsities=(0.5, 0.8), epochs=dict(teacher=2, nd=2, kd=2), tensorboard=board)
    results = sparsify.run(_easy_task(), workdir, config)
    with open(os.path.join(workdir, "sparsify_results.json")) as f:
      written = json.load(f)
    self.assertEqual(written["rows"], results["rows"])
    self.assertEqual(written["config"], json.loads(json.dumps(dataclasses.asdict(config))))
    self.assertEqual([(r["method"], r["sparsity"]) for r in results["rows"]],
                     [("nd", 0.5), ("kd", 0.5), ("nd", 0.8), ("kd", 0.8)])
    for row in results["rows"]:
      # The first conv and the classifier stay dense, so the kernels' overall sparsity is a
      # little under the target; every pruned layer is at it (see sparsity_test).
      self.assertBetween(row["measured_sparsity"], row["sparsity"] - 0.1, row["sparsity"])
      testing.assert_over_whole_split(self, row["accuracy"], 32)  # the test split
      self.assertLess(row["compressed_bytes"], results["teacher"]["compressed_bytes"])
    # Chance is 1/3; half the weights gone, both students keep most of what the teacher learnt.
    self.assertGreater(results["teacher"]["accuracy"], 0.6)
    for row in results["rows"][:2]:
      self.assertGreater(row["accuracy"], 0.5, msg=row["method"])
    self.assertNotIn("stem_conv", results["pruning"]["layers"])
    self.assertNotIn("head_logits", results["pruning"]["layers"])
    for row in results["rows"]:  # ND's student is calibrated; the accuracy before is kept
      self.assertEqual("accuracy_uncalibrated" in row, row["method"] == "nd")
    text = sparsify.table(results)
    for label in ("KD", "ND", "teacher BN stats", "measured sparsity", "speed-up KD/ND"):
      self.assertIn(label, text)
    # TensorBoard: each pruned layer's own loss in ND's epochs, KD's accuracy, the summary.
    logs = testing.tensorboard_logs(board)
    for target in ("0.5", "0.8"):
      for layer in results["pruning"]["layers"]:
        self.assertEqual(sorted(logs[f"nd-s{target}/train"][f"epoch_{layer}_loss"]), [0, 1])
      self.assertContainsSubset({"epoch_accuracy", "epoch_soft_loss"}, logs[f"kd-s{target}/train"])
    for row in results["rows"]:
      self.assertAlmostEqual(logs["summary"][f"accuracy/{row['method']}@{row['sparsity']:g}"][0],
                             row["accuracy"], places=6)
    self.assertAlmostEqual(logs["summary"]["timings/nd@0.5"][0], results["timings"]["nd@0.5"],
                           places=4)

  def test_without_calibration_nd_rows_have_one_accuracy(self):
    dataset = data.get("embedded", num_train=64, num_test=32, num_validation=16)
    results = sparsify.run(dataset, self.get_temp_dir(),
                           _config(sparsities=(0.5,), methods=("nd",),
                                   epochs=dict(teacher=1, nd=1), calibrate=False))
    self.assertNotIn("accuracy_uncalibrated", results["rows"][0])
    self.assertNotIn("teacher BN stats", sparsify.table(results))

  def test_solved_sparse_students_hit_their_target_in_every_layer(self):
    # The exact solver: every pruned layer has exactly its target of zeros, without a cache.
    dataset = data.get("embedded", num_train=64, num_test=32, num_validation=16)
    workdir = self.get_temp_dir()
    board = os.path.join(workdir, "tensorboard")
    results = sparsify.run(dataset, workdir, _config(sparsities=(0.5,), methods=("nd",),
                                                     epochs=dict(teacher=1), solver="lstsq",
                                                     tensorboard=board))
    self.assertEqual(results["config"]["solver"], "lstsq")
    self.assertEqual(results["timings"]["cache"], 0.0)
    self.assertFalse([d for d in os.listdir(workdir) if d.startswith("cache-layers")])
    row = results["rows"][0]
    self.assertBetween(row["measured_sparsity"], 0.4, 0.5)
    self.assertIn("accuracy_uncalibrated", row)
    # TensorBoard: each layer's error before the solve (the teacher's dense layer: none) and
    # after (half its weights zeroed, the rest solved: some).
    solve = testing.tensorboard_logs(board)["nd-s0.5/solve"]
    for layer in results["pruning"]["layers"]:
      [before] = [v[0] for tag, v in solve.items() if tag.startswith(f"{layer}/") and
                  tag.endswith("/error_before")]
      [after] = [v[0] for tag, v in solve.items() if tag.startswith(f"{layer}/") and
                 tag.endswith("/error_after")]
      self.assertBetween(before, 0.0, 1e-4, msg=layer)
      self.assertBetween(after, 1e-4, 1.0, msg=layer)

  @parameterized.named_parameters(
      ("sparsity_one", dict(sparsities=(1.0,)), "1.0"),
      ("unknown_method", dict(methods=("nd", "ft")), "ft"),
      ("solver", dict(solver="lstsq+gradient"), "'gradient' or 'lstsq' for sparse"),
      ("m_by_n", dict(m_by_n=(4, 4)), r"m_by_n must be \(m, n\)"),
      ("rate", dict(rates=dict(nd=0.0)), "positive learning rates"))
  def test_bad_arguments_are_named(self, kwargs, fragment):
    with self.assertRaisesRegex(ValueError, fragment):
      _config(**kwargs)

  def test_a_dataset_without_validation_split_is_refused_before_training(self):
    dataset = data.get("embedded", num_train=32, num_test=16)
    with self.assertRaisesRegex(ValueError, "no validation split.*num_validation"):
      sparsify.run(dataset, self.get_temp_dir(), _config())

  def test_two_by_four_sparsity_for_both_methods(self):
    dataset = data.get("embedded", num_train=64, num_test=32, num_validation=16)
    results = sparsify.run(dataset, self.get_temp_dir(),
                           _config(sparsities=(0.9,), epochs=dict(teacher=1, kd=1),
                                   solver="lstsq", m_by_n=(2, 4)))
    self.assertEqual(results["config"]["m_by_n"], (2, 4))
    self.assertEqual([(r["method"], r["sparsity"]) for r in results["rows"]],
                     [("nd", 0.5), ("kd", 0.5)])
    for row in results["rows"]:  # every pruned layer at 2 zeros in 4; the first conv dense
      self.assertBetween(row["measured_sparsity"], 0.4, 0.5)


if __name__ == "__main__":
  tf.test.main()
