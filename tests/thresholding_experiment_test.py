"""Smoke tests of the thresholding experiment (examples/thresholding.py's logic)."""

import dataclasses
import json
import os

import testing
from absl.testing import parameterized

from keras_nd import data
from keras_nd._keras import tf
from keras_nd.experiments import common, harness, thresholding

_UNITS = [f"stage{s}_unit1_out" for s in (1, 2, 3)]  # ResNet-8's three residual units


def _easy_task():
  """A task ResNet-8 learns in two epochs (the label is in the images' mean; 3 classes)."""
  x, y = testing.images(160)
  return data.Dataset.from_arrays("easy", (x[:96], y[:96]), (x[128:], y[128:]),
                                  validation=(x[96:128], y[96:128])).with_preprocessing("none")


class ThresholdingExperimentTest(tf.test.TestCase, parameterized.TestCase):

  def test_runs_and_writes_results_figures_and_table(self):
    workdir = self.get_temp_dir()
    board = os.path.join(workdir, "tensorboard")
    config = thresholding.Config(model="resnet8", epsilons=(0.0, 0.5), seeds=(0,), sigma=0.1,
                                 weight_epsilons=(0.3,), epochs=dict(teacher=2, nd=1),
                                 batch_size=16, verbose=0, tensorboard=board)
    results = thresholding.run(_easy_task(), workdir, config)
    with open(os.path.join(workdir, "thresholding_results.json")) as f:
      written = json.load(f)
    self.assertEqual(written, json.loads(json.dumps(results)))
    self.assertEqual(written["config"], json.loads(json.dumps(dataclasses.asdict(config))))
    # Chance is 1/3: both teachers learnt the task, and the ND students of half their width,
    # solved from their units' activations, keep most of it without fine-tuning.
    for row in results["table4"]:
      self.assertGreater(row["teacher_accuracy"], 0.6, msg=row["teacher"])
      self.assertGreater(row["nd_accuracy"], 0.5, msg=row["teacher"])

    sweeps = results["sweeps"]
    self.assertEqual([(r["hoods"], r["epsilon"]) for r in sweeps["each"]],
                     [([u], e) for u in _UNITS for e in (0.0, 0.5)])
    self.assertEqual([r["hoods"] for r in sweeps["all"]], [_UNITS, _UNITS])
    self.assertEqual([len(r["hoods"]) for r in sweeps["cumulative"]], [1, 1, 2, 2, 3, 3])
    self.assertEqual([r["hoods"] for r in sweeps["regularised_all"]], [_UNITS, _UNITS])
    for rows in sweeps.values():
      self.assertTrue(all(r["relative"] for r in rows))
    # Without noise every configuration scores the clean validation accuracy.
    clean = results["teacher"]["validation_accuracy"]
    for mode in ("each", "all", "cumulative"):
      for row in sweeps[mode]:
        if row["epsilon"] == 0.0:
          self.assertAlmostEqual(row["accuracy_mean"], clean)
    self.assertEqual(set(results["teacher"]["output_rms"]), set(_UNITS))

    thresholds = results["thresholds"]
    self.assertEqual(set(thresholds["each"]), set(_UNITS))
    self.assertEqual(set(thresholds["cumulative"]), {"1", "2", "3"})
    for value in (thresholds["all"], thresholds["regularised_all"],
                  *thresholds["cumulative"].values()):
      self.assertIn(value, (0.0, 0.5))  # a threshold is one of the swept amplitudes
    self.assertEqual(thresholds["each_min"], min(thresholds["each"].values()))
    self.assertAlmostEqual(thresholds["each_mean"], sum(thresholds["each"].values()) / 3)

    [weights] = results["weight_sweeps"]
    self.assertEqual(weights["epsilon"], 0.3)
    self.assertLen(weights["cumulative"], 8)  # 1 stem + 6 unit convolutions + the logits

    self.assertEqual([(r["teacher"], r["unit_noise"]) for r in results["table4"]],
                     [("plain", 0.0), ("regularised", 0.1)])
    for row in results["table4"]:
      testing.assert_over_whole_split(self, row["nd_accuracy"], 32)  # the test split
      self.assertLess(row["params"], results["teacher"]["params"])
    self.assertEqual([r["hood"] for r in results["diagnosis"]], _UNITS)
    self.assertEqual({r["threshold"] for r in results["diagnosis"]},
                     set(thresholds["each"].values()))

    # The two teachers have their own keys and files in one work directory (the exact solver,
    # the default, reads their activations online: no cache).
    keys = results["teacher"]["key"], results["regularised_teacher"]["key"]
    self.assertNotEqual(*keys)
    with open(os.path.join(workdir, f"teacher-{keys[1]}.json")) as f:
      self.assertEqual(json.load(f)["unit_noise"], 0.1)
    for key in keys:
      self.assertTrue(os.path.exists(os.path.join(workdir, f"teacher-{key}.keras")))
      self.assertFalse(os.path.exists(os.path.join(workdir, f"cache-{key}-lookahead0")))
    self.assertEqual(results["config"]["solver"], "lstsq")

    self.assertEqual([os.path.basename(p) for p in results["figures"]],
                     ["figure1.png", "figure1_units.png", "figure4.png", "figure5.png"])
    for path in results["figures"]:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", msg=path)

    # TensorBoard: both teachers' training and ND solve, the regularised one's under its noise;
    # the four figures in the summary.
    logs = testing.tensorboard_logs(board)
    for prefix in ("", "unit_noise0.1/"):
      self.assertEqual(sorted(logs[f"{prefix}teacher/train"]["epoch_loss"]), [0, 1])
      [solve] = [run for run in logs if run.startswith(f"{prefix}nd-") and run.endswith("/solve")]
      self.assertLen([tag for tag in logs[solve] if tag.endswith("/loss_after")], 3)
    self.assertEqual(sorted(tag for tag in logs["summary"] if tag.startswith("figures/")),
                     ["figures/figure1", "figures/figure1_units", "figures/figure4",
                      "figures/figure5"])
    self.assertEqual(logs["summary"]["thresholds/all"][0], thresholds["all"])
    self.assertAlmostEqual(logs["summary"]["accuracy/nd@regularised"][0],
                           results["table4"][1]["nd_accuracy"], places=6)

    text = thresholding.table(results)
    for label in ("Thresholds", "each stage2_unit1_out", "first 1 unit ", "first 2 units",
                  "all units", "noise-trained", "Kernel noise (Fig. 4)", "Table 4",
                  "plain teacher", "regularised teacher (sigma=0.1)", "Diagnosis",
                  "neighbourhoods over their threshold"):
      self.assertIn(label, text)

  @parameterized.named_parameters(
      ("negative_epsilon", dict(epsilons=(0.0, -0.1)), r"epsilons\[1\]=-0.1"),
      ("no_epsilons", dict(epsilons=()), "epsilons is empty"),
      ("negative_weight_epsilon", dict(weight_epsilons=(-1.0,)), "weight_epsilons"),
      ("no_seeds", dict(seeds=()), "seeds"),
      ("sigma_zero", dict(sigma=0.0), "sigma=0.0"),
      ("multiplier_above_one", dict(multiplier=1.5), "multiplier=1.5"),
      ("unknown_model", dict(model="resnet7"), "resnet7"),
  )
  def test_bad_arguments_are_named(self, kwargs, fragment):
    dataset = data.get("embedded", num_train=32, num_test=16, num_validation=16)
    with self.assertRaisesRegex(ValueError, fragment):
      thresholding.run(dataset, self.get_temp_dir(),
                       thresholding.Config(**dict(dict(model="resnet8", verbose=0), **kwargs)))

  def test_a_dataset_without_validation_split_is_refused(self):
    dataset = data.get("embedded", num_train=32, num_test=16)
    with self.assertRaisesRegex(ValueError, "num_validation"):
      thresholding.run(dataset, self.get_temp_dir(), thresholding.Config(model="resnet8"))

  def test_unit_noise_enters_the_teacher_key_only_when_set(self):
    dataset = data.get("embedded", num_train=32, num_test=16, num_validation=16)

    def experiment(**kwargs):
      return harness.Experiment(dataset, self.get_temp_dir(),
                                common.Settings(model="resnet8", verbose=0), dict(teacher=1),
                                **kwargs)

    plain, zero, noisy = experiment(), experiment(unit_noise=0.0), experiment(unit_noise=0.1)
    self.assertEqual(zero.key, plain.key)
    self.assertNotEqual(noisy.key, plain.key)
    # unit_noise enters the plain spec only when it is set.
    self.assertEqual(set(plain.teacher_spec), {"data", "num_train", "model", "epochs",
                                               "batch_size", "learning_rate", "seed"})
    self.assertEqual(noisy.teacher_spec, dict(plain.teacher_spec, unit_noise=0.1))


if __name__ == "__main__":
  tf.test.main()
