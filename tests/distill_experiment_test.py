"""Smoke tests of the parameter-reduction experiment (examples/distill.py's logic)."""

import dataclasses
import json
import os
import tempfile
from unittest import mock

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import _keras, data, files, lite, models
from keras_nd._keras import keras, tf
from keras_nd.experiments import catalogue, common, distill, harness, tracker

_TINY = dict(teacher=1, ce=1, kd=2, nd=1, ft=1)


def _config(**kwargs):
  return distill.Config(**dict(dict(model="resnet8", epochs=_TINY, batch_size=32, verbose=0),
                               **kwargs))


def _easy_task():
  """A task ResNet-8 learns in two epochs (the label is in the images' mean; 3 classes)."""
  x, y = testing.images(160)
  return data.Dataset.from_arrays("easy", (x[:96], y[:96]), (x[128:], y[128:]),
                                  validation=(x[96:128], y[96:128])).with_preprocessing("none")


class _Killed(Exception):
  pass


class DistillExperimentTest(tf.test.TestCase, parameterized.TestCase):

  def _run(self, dataset, **kwargs):
    workdir = self.get_temp_dir()
    config = _config(**kwargs)
    results = distill.run(dataset, workdir, config)
    with open(os.path.join(workdir, "distill_results.json")) as f:
      written = json.load(f)
    self.assertEqual(written["rows"], results["rows"])
    self.assertEqual(written["config"], json.loads(json.dumps(dataclasses.asdict(config))))
    return results, workdir

  def test_every_method_runs_and_nd_ft_learns_the_task(self):
    board = os.path.join(self.get_temp_dir(), "tensorboard")
    results, _ = self._run(_easy_task(), multipliers=(0.5,), time_neighbourhoods=True,
                           batch_size=16, epochs=dict(_TINY, teacher=2, kd=1), tensorboard=board)
    methods = [row["method"] for row in results["rows"]]
    self.assertEqual(methods, ["ce", "kd", "nd", "nd_ft"])
    accuracy = {row["method"]: row["accuracy"] for row in results["rows"]}
    # Measured 0.875 (teacher), 0.81 (ND+FT) and 0.56 (CE, one epoch from scratch); chance is
    # 1/3: only students that learnt from the teacher are far above it.
    self.assertGreater(results["teacher"]["accuracy"], 0.6)
    self.assertGreater(accuracy["nd_ft"], accuracy["ce"] + 0.1)
    self.assertGreater(accuracy["nd"], 0.5)
    for row in results["rows"]:
      testing.assert_over_whole_split(self, row["accuracy"], 32)  # the test split
      self.assertGreater(row["seconds"], 0.0)
      self.assertLess(row["params"], results["teacher"]["params"])
    nd_ft = results["rows"][-1]
    # Fine-tuning starts from the ND student: its accuracy before is ND's row.
    self.assertEqual(nd_ft["accuracy_before_ft"], results["rows"][2]["accuracy"])
    # ND+FT time includes the cache and ND (Table 6 accounting).
    self.assertGreater(nd_ft["seconds"], results["rows"][2]["seconds"])
    timings = results["timings"]
    for key in ("teacher", "kd@0.5", "cache@0.5", "nd_all_fused@0.5/lookahead0",
                "ft@0.5/lookahead0", "nd_all_sequential@0.5"):
      self.assertIn(key, timings)
    self.assertLen(timings["nd_each@0.5"], 3)  # ResNet-8 has three residual units
    self.assertIn("0.5/lookahead0", results["speedup"])
    # One figure of the three curves, at the requested size.
    self.assertEqual([os.path.basename(p) for p in results["figures"]],
                     ["accuracy_vs_time_k0.5.png"])
    png = tf.io.decode_png(tf.io.read_file(results["figures"][0]), channels=3).numpy()
    self.assertEqual(png.shape, (480, 720, 3))
    self.assertGreater(len(np.unique(png.reshape(-1, 3), axis=0)), 8)  # lines, not a blank page
    text = distill.table(results)
    for label in ("CE", "KD", "ND", "ND+FT", "before FT", "Seconds (Table 6)"):
      self.assertIn(label, text)
    self._assert_logged(testing.tensorboard_logs(board), results)

  def _assert_logged(self, logs, results):
    """The TensorBoard runs of every phase of `results`' run, with what each measured."""
    [label] = {run.split("/")[0][len("nd-"):] for run in logs if run.startswith("nd-")}
    self.assertEqual(set(logs), {
        "teacher/train", "summary", f"nd-{label}/solve", f"nd-{label}/test",
        *(f"{phase}/{split}" for phase in ("ce-k0.5", "kd-k0.5", f"ft-{label}")
          for split in ("train", "validation", "test"))})
    self.assertEqual(sorted(logs["teacher/train"]["epoch_loss"]), [0, 1])  # a point per epoch
    # KD's loss terms and accuracy, each epoch's; its validation and test accuracies, the
    # latter against the epoch and the training seconds too (its curve).
    for phase in ("kd-k0.5", f"ft-{label}"):
      self.assertContainsSubset({"epoch_loss", "epoch_soft_loss", "epoch_label_loss",
                                 "epoch_accuracy"}, logs[f"{phase}/train"])
      self.assertEqual(sorted(logs[f"{phase}/validation"]["epoch_accuracy"]), [0])
    kd, nd_ft = results["curves"]["kd@0.5"], results["curves"]["nd_ft@0.5/lookahead0"]
    # (Accuracies over 32 test images are exact in float32; seconds are not.)
    self.assertEqual(logs["kd-k0.5/test"]["epoch_accuracy"], {0: kd[0][1]})
    self.assertEqual(logs["kd-k0.5/test"]["accuracy_vs_seconds"], {round(kd[0][0]): kd[0][1]})
    self.assertAlmostEqual(logs["kd-k0.5/test"]["epoch_seconds"][0], kd[0][0], places=4)
    # ND+FT's curve starts with the ND student, before fine-tuning: not an epoch's.
    self.assertEqual(set(logs[f"ft-{label}/test"]["accuracy_vs_seconds"]),
                     {round(seconds) for seconds, _ in nd_ft})
    self.assertEqual(logs[f"ft-{label}/test"]["epoch_accuracy"], {0: nd_ft[1][1]})
    # The exact solve (the default solver): each unit's solved layer's error, its loss.
    losses = results["timings"]["nd_losses@0.5/lookahead0"]
    solve = logs[f"nd-{label}/solve"]
    for unit in losses:
      self.assertAlmostEqual(solve[f"{unit}/loss_after"][0], losses[unit], places=6)
      self.assertBetween(solve[f"{unit}/{unit[:-len('out')]}conv2_s/error_after"][0], 0, 1)
    summary = logs["summary"]
    for key in ("teacher", "kd@0.5", "nd_all_fused@0.5/lookahead0", "ft@0.5/lookahead0"):
      self.assertAlmostEqual(summary[f"timings/{key}"][0], results["timings"][key], places=4)
    for row in results["rows"]:
      name = f"{row['method']}@0.5" + ("/lookahead0" if "lookahead" in row else "")
      self.assertAlmostEqual(summary[f"accuracy/{name}"][0], row["accuracy"], places=6)
    self.assertEqual(summary["figures/accuracy_vs_time_k0.5"], {0: (720, 480)})

  def test_kd_killed_after_an_epoch_goes_on_from_there_with_its_curve(self):
    board = os.path.join(self.get_temp_dir(), "tensorboard")
    settings = common.Settings(model="resnet8", batch_size=32, patience=5, verbose=0,
                               tensorboard=board)
    experiment = harness.Experiment(_easy_task(), self.get_temp_dir(), settings,
                                    dict(teacher=1, kd=3))
    teacher = experiment.teacher()
    backed_up = keras.callbacks.BackupAndRestore.on_epoch_end

    def killed_after_the_second_backup(callback, epoch, logs=None):
      backed_up(callback, epoch, logs)
      if epoch == 1:
        raise _Killed()

    with mock.patch.object(keras.callbacks.BackupAndRestore, "on_epoch_end",
                           killed_after_the_second_backup):
      with self.assertRaises(_Killed):
        experiment.kd(teacher, 0.5)
    trained, begin = [], keras.callbacks.BackupAndRestore.on_epoch_begin

    def counted(callback, epoch, logs=None):
      trained.append(epoch)
      begin(callback, epoch, logs)

    with mock.patch.object(keras.callbacks.BackupAndRestore, "on_epoch_begin", counted):
      _, curve = experiment.kd(teacher, 0.5)  # as a job started again would
    self.assertEqual(trained, [2])  # the third epoch only
    self.assertLen(curve, 3)  # the two epochs before the kill, then the third
    self.assertEqual([s for s, _ in curve], sorted(s for s, _ in curve))
    # TensorBoard logged each epoch once, the two before the kill (each before its backup) and
    # the third; the test accuracies of the whole curve once it ended.
    logs = testing.tensorboard_logs(board)
    for split in ("train", "validation"):
      self.assertEqual(sorted(logs[f"kd-k0.5/{split}"]["epoch_accuracy"]), [0, 1, 2])
    self.assertEqual(logs["kd-k0.5/test"]["epoch_accuracy"], dict(enumerate(a for _, a in curve)))

  def test_runs_offline_on_mock_tfds_cifar10_with_ablation(self):
    with testing.mock_tfds(num_examples=48):
      dataset = data.get("cifar10", num_validation=16)
      board = os.path.join(self.get_temp_dir(), "tensorboard")
      results, _ = self._run(dataset, multipliers=(0.5,), methods=("nd",), ablation=True,
                             solver="gradient", tensorboard=board)
    lookaheads = sorted({row["lookahead"] for row in results["rows"]})
    self.assertEqual(lookaheads, [0, 2])
    # Gradient ND: Keras's callback logs every unit's own loss, each epoch, for each look-ahead.
    logs = testing.tensorboard_logs(board)
    runs = sorted(run for run in logs if run.startswith("nd-") and run.endswith("/train"))
    self.assertEqual([run.split("-")[2] for run in runs], ["lookahead0", "lookahead2"])
    for run in runs:
      label = run[len("nd-"):-len("/train")]
      for unit, loss in results["timings"][f"nd_losses@0.5/{label.split('-')[1]}"].items():
        self.assertAlmostEqual(logs[run][f"epoch_{unit}_{label}_loss"][0], loss, places=5)
    self.assertNotIn(f"{runs[0][:-len('/train')]}/solve", logs)  # nothing solved
    self.assertIn("ND (look-ahead 2)", distill.table(results))

  def test_students_from_scratch_as_in_the_paper(self):
    dataset = data.get("embedded", num_train=64, num_test=32, num_validation=32)
    results, workdir = self._run(dataset, methods=("kd", "nd_ft"), student_init="random")
    self.assertEqual(results["config"]["student_init"], "random")
    self.assertEqual([row["method"] for row in results["rows"]], ["kd", "nd_ft"])
    # TensorBoard is off by default in the library: no event file anywhere.
    self.assertIsNone(results["config"]["tensorboard"])
    self.assertEqual(testing.tensorboard_logs(workdir), {})

  def test_the_exact_solver_has_no_lookahead(self):
    dataset = data.get("embedded", num_train=32, num_test=16, num_validation=16)
    with self.assertRaisesRegex(ValueError, r"solver='gradient' or 'lstsq\+gradient'"):
      distill.run(dataset, self.get_temp_dir(), _config(lookahead=1))

  def test_the_teacher_is_trained_once_and_reused_by_each_solver(self):
    dataset = data.get("embedded", num_train=64, num_test=32, num_validation=32)
    first, workdir = self._run(dataset, methods=("nd",), export=("keras", "keras3", "tflite"))
    # The teacher and the student, in each format: the Keras 3 file loads without keras_nd's
    # classes and computes what the tf_keras one does; the LiteRT file scores the row's accuracy.
    exported = {kind: sorted(os.listdir(os.path.join(workdir, "export", kind)))
                for kind in ("keras", "keras3", "tflite")}
    self.assertEqual(exported, {"keras": ["nd-k0.5.keras", "teacher.keras"],
                                "keras3": ["nd-k0.5.keras", "teacher.keras"],
                                "tflite": ["nd-k0.5.tflite", "teacher.tflite"]})
    student = files.load_model(os.path.join(workdir, "export", "keras", "nd-k0.5.keras"))
    k3 = _keras.keras3().saving.load_model(
        os.path.join(workdir, "export", "keras3", "nd-k0.5.keras"), safe_mode=True)
    x = dataset.arrays("test")[0][:8]
    self.assertAllClose(np.asarray(k3(x)), student(x).numpy(), atol=1e-5)
    test = dataset.pipeline("test", 256, training=False)
    self.assertEqual(lite.evaluate_tflite(
        os.path.join(workdir, "export", "tflite", "nd-k0.5.tflite"), test),
                     first["rows"][0]["accuracy"])
    teachers = [f for f in os.listdir(workdir) if f.endswith(".keras")]
    self.assertLen(teachers, 1)
    mtime = os.path.getmtime(os.path.join(workdir, teachers[0]))
    second = distill.run(dataset, workdir, _config(methods=("nd",)))
    self.assertEqual(os.path.getmtime(os.path.join(workdir, teachers[0])), mtime)
    self.assertEqual(first["teacher"], second["teacher"])
    # The ND students are artefacts: the second run composed the first run's.
    self.assertEqual(first["rows"], second["rows"])
    # The exact solver (the default) solves with no cache; the gradient solver distils from the
    # cache; each recipe has its own artefacts.
    gradient = distill.run(dataset, workdir, _config(methods=("nd",), solver="gradient"))
    self.assertEqual(os.path.getmtime(os.path.join(workdir, teachers[0])), mtime)
    self.assertEqual((first["config"]["solver"], gradient["config"]["solver"]),
                     ("lstsq", "gradient"))
    self.assertEqual(first["timings"]["cache@0.5"], 0.0)
    self.assertGreater(gradient["timings"]["cache@0.5"], 0.0)
    store = [os.path.join(workdir, "students", d) for d in os.listdir(
        os.path.join(workdir, "students")) if d.startswith("teacher-")][0]
    labels = os.listdir(os.path.join(store, "stage1_unit1_out"))
    self.assertLen([f for f in labels if f.endswith(".keras")], 2)
    solved = first["timings"]["nd_losses@0.5/lookahead0"]
    self.assertEqual(sorted(solved), ["stage1_unit1_out", "stage2_unit1_out", "stage3_unit1_out"])
    with self.assertRaisesRegex(FileNotFoundError, r"'k0\.25-lookahead0-\w+' .*stage1_unit1_out"):
      distill.run(dataset, workdir, _config(methods=("nd",), multipliers=(0.25,), compose=True))

  def test_the_teacher_is_keyed_by_the_data_not_by_how_its_path_is_spelled(self):
    directory = tempfile.mkdtemp(dir=self.get_temp_dir())
    rng = np.random.RandomState(0)
    arrays = dict(x_train=rng.randint(0, 256, (40, 8, 8, 3)).astype("uint8"),
                  y_train=np.arange(40) % 4, x_test=rng.randint(0, 256, (8, 8, 8, 3)),
                  y_test=np.arange(8) % 4)
    path = os.path.join(directory, "own.npz")
    np.savez(path, **arrays)

    def key(spec):
      return harness.Experiment(data.get(spec, num_validation=8), directory,
                                common.Settings(model="resnet8", verbose=0), dict(teacher=1)).key

    absolute = key(f"npz:{path}")
    self.assertEqual(key(f"npz:{os.path.relpath(path)}"), absolute)
    self.assertEqual(key(f"npz:{os.path.join(directory, '.', 'own.npz')}"), absolute)
    arrays["x_train"][-1] += 1  # the last training image: not in the first batch
    np.savez(path, **arrays)
    self.assertNotEqual(key(f"npz:{path}"), absolute)

  def test_a_job_selects_its_units(self):
    units = nd.split(models.resnet_v1(depth=8, input_shape=(8, 8, 3), num_classes=3))[1:-1]
    self.assertEqual(harness.select(units, ["3", "stage1_unit1_out"]), [units[0], units[2]])
    self.assertEqual(harness.select(units, shard="1/2"), [units[1]])
    for kwargs, fragment in ((dict(neighbourhoods=["0"]), r"\['0'\].*by index 1\.\.3"),
                             (dict(neighbourhoods=["7", "x"]), r"\['7', 'x'\]"),
                             (dict(neighbourhoods=[]), "empty"),
                             (dict(neighbourhoods=["1"], shard="0/2"), "not both"),
                             (dict(shard="3/2"), "'i/n'")):
      with self.assertRaisesRegex(ValueError, fragment, msg=kwargs):
        harness.select(units, **kwargs)

  @parameterized.named_parameters(
      ("unknown_method", dict(methods=("ce", "dk")), "dk"),
      ("multiplier_above_one", dict(multipliers=(1.5,)), "1.5"),
      ("multiplier_zero", dict(multipliers=(0.0,)), "0.0"),
      ("student_init", dict(student_init="pruned"), "pruned"),
      ("solver", dict(solver="adam"), "solver must be one of.*'adam'"),
      ("channels", dict(channels="thinet"), "channels must be 'greedy' or 'l1'"),
      ("export", dict(export=("keras", "onnx")), r"Unknown export formats \['onnx'\]"),
  )
  def test_bad_arguments_are_named(self, kwargs, fragment):
    dataset = data.get("embedded", num_train=32, num_test=16, num_validation=16)
    with self.assertRaisesRegex(ValueError, fragment):
      distill.run(dataset, self.get_temp_dir(), _config(**kwargs))

  def test_a_dataset_without_validation_split_is_refused(self):
    dataset = data.get("embedded", num_train=32, num_test=16)
    with self.assertRaisesRegex(ValueError, "num_validation"):
      distill.run(dataset, self.get_temp_dir(), _config())

  def test_unknown_model_is_named(self):
    with self.assertRaisesRegex(ValueError, "resnet7"):
      catalogue.build_model("resnet7", (8, 8, 3), 3)

  def test_a_multi_worker_run_needs_tf_config_and_the_gradient_solver(self):
    without = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    with mock.patch.dict(os.environ, without, clear=True):
      with self.assertRaisesRegex(ValueError, "TF_CONFIG"):
        distill.multi_worker_strategy("gradient")
    cluster = json.dumps({"cluster": {"worker": ["localhost:1"]},
                          "task": {"type": "worker", "index": 0}})
    with mock.patch.dict(os.environ, {"TF_CONFIG": cluster}):
      with self.assertRaisesRegex(ValueError, "add --solver=gradient"):
        distill.multi_worker_strategy("lstsq")

  def test_time_to_reads_the_first_point_at_the_target(self):
    curve = [(1.0, 0.5), (2.0, 0.8), (3.0, 0.9)]
    self.assertEqual(tracker.time_to(curve, 0.8), 2.0)
    self.assertIsNone(tracker.time_to(curve, 0.95))

if __name__ == "__main__":
  tf.test.main()
