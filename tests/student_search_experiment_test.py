"""Smoke test of the Student Search experiment (examples/student_search.py's logic)."""

import os
from unittest import mock

import keras_nd as nd
from keras_nd import data
from keras_nd._keras import tf
from keras_nd.experiments import plot, student_search


class StudentSearchExperimentTest(tf.test.TestCase):

  def test_runs_and_a_second_run_trains_no_candidate(self):
    workdir = self.get_temp_dir()
    dataset = data.get("embedded", num_train=64, num_test=32, num_validation=32)
    kwargs = dict(model="resnet8", multipliers=(0.25, 0.5, 1.0), drops=(0.5,),
                  uniform=(0.5,), epochs=dict(teacher=1, nd=1, ft=1), batch_size=16,
                  verbose=0)
    results = student_search.run(dataset, workdir, **kwargs)
    self.assertTrue(os.path.exists(os.path.join(workdir, "student_search_results.json")))
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
      self.assertEqual(plot.read_png(path).shape, (480, 720, 3))
    with mock.patch.object(nd.NeighbourhoodDistiller, "fit",
                           side_effect=AssertionError("a candidate was trained again")):
      again = student_search.run(dataset, workdir, **dict(kwargs, uniform=(), drops=(0.5,)))
    self.assertLen(again["rows"], 1)

  def test_the_default_uniform_multipliers_are_default_candidates(self):
    self.assertContainsSubset(student_search.UNIFORM, student_search.MULTIPLIERS)

  def test_uniform_multipliers_must_be_candidates(self):
    dataset = data.get("embedded", num_train=32, num_test=16, num_validation=16)
    with self.assertRaisesRegex(ValueError, "0.3"):
      student_search.run(dataset, self.get_temp_dir(), model="resnet8", multipliers=(0.5, 1.0),
                         uniform=(0.3,), verbose=0)


if __name__ == "__main__":
  tf.test.main()
