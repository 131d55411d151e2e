"""Smoke test of the Student Search experiment (examples/student_search.py's logic)."""

import dataclasses
import json
import os
from unittest import mock

import testing

import keras_nd as nd
from keras_nd import data
from keras_nd._keras import tf
from keras_nd.experiments import student_search


def _easy_task():
  """A task ResNet-8 learns in two epochs (the label is in the images' mean; 3 classes)."""
  x, y = testing.images(160)
  return data.Dataset.from_arrays("easy", (x[:96], y[:96]), (x[128:], y[128:]),
                                  validation=(x[96:128], y[96:128])).with_preprocessing("none")


class StudentSearchExperimentTest(tf.test.TestCase):

  def test_runs_and_a_second_run_trains_no_candidate(self):
    workdir = self.get_temp_dir()
    dataset = _easy_task()
    board = os.path.join(workdir, "tensorboard")
    kwargs = dict(model="resnet8", multipliers=(0.25, 0.5, 1.0), drops=(0.5,),
                  uniform=(0.5,), epochs=dict(teacher=2, nd=1, ft=1), batch_size=16,
                  verbose=0, tensorboard=board)
    config = student_search.Config(**kwargs)
    results = student_search.run(dataset, workdir, config)
    with open(os.path.join(workdir, "student_search_results.json")) as f:
      self.assertEqual(json.load(f)["config"],
                       json.loads(json.dumps(dataclasses.asdict(config))))
    # Chance is 1/3: the teacher learnt the task, and a full-width candidate, solved from its
    # unit's activations, scores as the teacher does on the validation split.
    teacher = results["teacher"]["validation_accuracy"]
    self.assertGreater(teacher, 0.6)
    for unit, candidates in results["candidates"].items():
      full = next(c for c in candidates if c["label"] == "k1")
      self.assertAlmostEqual(full["accuracy"], teacher, delta=0.07, msg=unit)
    for row in results["rows"]:  # students composed of candidates keep most of it
      self.assertGreater(row["accuracy"], 0.5, msg=row["method"])
    methods = [(r["method"], r["setting"]) for r in results["rows"]]
    self.assertEqual(methods, [("greedy", 0.5), ("uniform", 0.5),
                               ("budgeted", results["rows"][2]["setting"])])
    uniform, budgeted = results["rows"][1], results["rows"][2]
    # The budgeted choice is within the uniform student's size and predicts no larger drop.
    self.assertLessEqual(budgeted["params"], uniform["params"])
    self.assertLessEqual(budgeted["predicted_drop"], uniform["predicted_drop"] + 1e-9)
    self.assertEqual(set(results["candidates"]), {f"stage{s}_unit1_out" for s in (1, 2, 3)})
    self.assertIn("budgeted", student_search.table(results))
    for path in results["figures"]:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", msg=path)
    # TensorBoard: every candidate's solve, each student's fine-tuning, the two figures.
    logs = testing.tensorboard_logs(board)
    solve = logs["nd-candidates/solve"]
    for unit in results["candidates"]:
      for label in ("k0.25", "k0.5", "k1"):
        self.assertIn(f"{unit}_{label}/loss_after", solve)
    for row in results["rows"]:
      run = f"ft-{row['method']}-{row['setting']}"
      self.assertEqual(sorted(logs[f"{run}/validation"]["epoch_accuracy"]), [0], msg=run)
      self.assertAlmostEqual(logs["summary"][f"accuracy/{row['method']}@{row['setting']:g}"][0],
                             row["accuracy"], places=6)
    self.assertEqual(logs["summary"]["figures/search_vs_uniform"], {0: (720, 480)})
    self.assertIn("figures/unit_accuracy_vs_k", logs["summary"])
    with mock.patch.object(nd.NeighbourhoodDistiller, "fit",
                           side_effect=AssertionError("a candidate was trained again")):
      again = student_search.run(dataset, workdir,
                                 student_search.Config(**dict(kwargs, uniform=())))
    self.assertLen(again["rows"], 1)

  def test_the_default_uniform_multipliers_are_default_candidates(self):
    self.assertContainsSubset(student_search.UNIFORM, student_search.MULTIPLIERS)

  def test_uniform_multipliers_must_be_candidates(self):
    with self.assertRaisesRegex(ValueError, "0.3"):
      student_search.Config(multipliers=(0.5, 1.0), uniform=(0.3,))


if __name__ == "__main__":
  tf.test.main()
