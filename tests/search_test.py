"""Tests for keras_nd.search's selections, on hand-made quality tables with known answers."""

import itertools
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import artefacts, search, sparsity
from keras_nd._keras import keras, tf


def _c(label, params, accuracy):
  return {"label": label, "params": params, "flops": 10 * params, "accuracy": accuracy}


# Teacher accuracy 0.90. Unit "a" is easy to shrink, unit "b" is not.
_TABLE = {
    "a": [_c("a0.25", 10, 0.895), _c("a0.5", 20, 0.898), _c("a1", 40, 0.90)],
    "b": [_c("b0.25", 10, 0.80), _c("b0.5", 20, 0.87), _c("b1", 40, 0.899)],
}


def _brute_force_frontier(table, teacher):
  """Every choice, then the Pareto-optimal ones by definition."""
  names = list(table)
  points = []
  for chosen in itertools.product(*table.values()):
    points.append((sum(c["params"] for c in chosen),
                   sum(teacher - c["accuracy"] for c in chosen), dict(zip(names, chosen))))
  optimal = [p for p in points
             if not any((q[0] <= p[0] and q[1] < p[1] - 1e-12) or
                        (q[0] < p[0] and q[1] <= p[1] + 1e-12) for q in points)]
  best = {}
  for p in optimal:  # one per cost
    best.setdefault(p[0], p)
  return sorted(best.values(), key=lambda p: p[0])


class GreedyTest(tf.test.TestCase):

  def test_picks_the_cheapest_candidate_within_the_drop(self):
    choice = search.greedy(_TABLE, 0.90, max_drop=0.01)
    # a: a0.25 drops 0.5 points; b: only b1 (0.1 point) is within one point.
    self.assertEqual({n: c["label"] for n, c in choice.items()}, {"a": "a0.25", "b": "b1"})

  def test_a_looser_threshold_picks_smaller_students(self):
    choice = search.greedy(_TABLE, 0.90, max_drop=0.05)
    self.assertEqual({n: c["label"] for n, c in choice.items()}, {"a": "a0.25", "b": "b0.5"})

  def test_no_candidate_within_the_drop_takes_the_most_accurate(self):
    choice = search.greedy(_TABLE, 0.95, max_drop=0.001)
    self.assertEqual({n: c["label"] for n, c in choice.items()}, {"a": "a1", "b": "b1"})


class FrontierTest(tf.test.TestCase, parameterized.TestCase):

  def test_known_frontier(self):
    points = search.frontier(_TABLE, 0.90)
    labels = [sorted(c["label"] for c in p["choice"].values()) for p in points]
    # cost 20: a0.25+b0.25 (drop .105); 30: a0.25+b0.5 (.035); 40: a0.5+b0.5 (.032);
    # 50: a0.25+b1 (.006); 60: a0.5+b1 (.003); 80: a1+b1 (.001). Dominated, e.g.:
    # a1+b0.5 (60, .030), a1+b0.25 (50, .100).
    self.assertEqual([p["cost"] for p in points], [20, 30, 40, 50, 60, 80])
    self.assertEqual(labels, [["a0.25", "b0.25"], ["a0.25", "b0.5"], ["a0.5", "b0.5"],
                              ["a0.25", "b1"], ["a0.5", "b1"], ["a1", "b1"]])
    self.assertAllClose([p["drop"] for p in points], [0.105, 0.035, 0.032, 0.006, 0.003, 0.001])

  @parameterized.parameters(range(5))
  def test_equals_brute_force_on_random_tables(self, seed):
    rng = np.random.RandomState(seed)
    table = {f"u{i}": [_c(f"u{i}c{j}", int(rng.randint(1, 30)), float(rng.uniform(0.5, 0.9)))
                       for j in range(rng.randint(1, 5))] for i in range(4)}
    got = search.frontier(table, 0.9)
    expected = _brute_force_frontier(table, 0.9)
    self.assertEqual([p["cost"] for p in got], [p[0] for p in expected])
    self.assertAllClose([p["drop"] for p in got], [p[1] for p in expected])

  def test_flops_as_the_cost(self):
    points = search.frontier(_TABLE, 0.90, cost="flops")
    self.assertEqual(points[0]["cost"], 200)

  def test_budgeted_takes_the_best_choice_within_the_budget(self):
    best = search.budgeted(_TABLE, 0.90, budget=55)
    self.assertEqual(best["cost"], 50)
    self.assertEqual({n: c["label"] for n, c in best["choice"].items()}, {"a": "a0.25", "b": "b1"})

  def test_a_budget_below_the_cheapest_student_is_named(self):
    with self.assertRaisesRegex(ValueError, "budget of 19.*cheapest.*20"):
      search.budgeted(_TABLE, 0.90, budget=19)

  @parameterized.named_parameters(
      ("empty_table", {}, "non-empty"),
      ("empty_candidates", {"a": []}, "'a' has no candidates"),
      ("missing_key", {"a": [{"label": "x", "accuracy": 0.5}]}, "lacks \\['params'\\]"))
  def test_bad_tables_are_named(self, table, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      search.frontier(table, 0.9)

  def test_unknown_cost_is_named(self):
    with self.assertRaisesRegex(ValueError, "'bytes'"):
      search.greedy(_TABLE, 0.9, 0.01, cost="bytes")


if __name__ == "__main__":
  tf.test.main()


class DistilAndScoreTest(tf.test.TestCase):
  """Candidates of two units of a trained tiny ResNet, distilled once and reused."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    x, y = testing.images(64)
    cls.x, cls.y = x, y
    cls.teacher = testing.trained(testing.tiny_resnet(), x, y)
    cls.units = nd.split(cls.teacher)[1:3]
    cls.source = nd.ActivationSource(cls.teacher, cls.units, testing.dataset(x), verbose=0)
    cls.directory = tempfile.mkdtemp(prefix="nd_search_")
    cls.trained = artefacts.distil(cls.teacher, cls.units, search.multipliers((0.25, 1.0)),
                                   cls.source, cls.directory, epochs=2, batch_size=16, verbose=0)

  def test_every_candidate_is_trained_and_stored(self):
    self.assertEqual({n: sorted(m) for n, m in self.trained.items()},
                     {h.name: ["k0.25", "k1"] for h in self.units})
    stored = [f for _, _, files in os.walk(self.directory) for f in files]
    self.assertLen([f for f in stored if f.endswith(".keras")], 4)
    self.assertLen([f for f in stored if f.endswith(".json")], 4)

  def test_a_second_search_trains_only_the_new_candidates(self):
    directory = os.path.join(self.get_temp_dir(), "copy")  # the shared store stays as it is
    shutil.copytree(self.directory, directory)
    with mock.patch.object(nd.NeighbourhoodDistiller, "fit",
                           side_effect=AssertionError("trained again")):
      again = artefacts.distil(self.teacher, self.units, search.multipliers((0.25, 1.0)),
                               self.source, directory, epochs=2, batch_size=16, verbose=0)
    a = np.random.RandomState(0).normal(size=(2,) + self.units[0].input_shape[1:])
    name = self.units[0].name
    self.assertAllClose(again[name]["k0.25"](a, training=False),
                        self.trained[name]["k0.25"](a, training=False), atol=1e-6)
    fits = []
    original = nd.NeighbourhoodDistiller.fit

    def counting_fit(distiller, *args, **kwargs):
      fits.append(sorted(label for _, _, label, _ in distiller.entries))
      return original(distiller, *args, **kwargs)

    with mock.patch.object(nd.NeighbourhoodDistiller, "fit", counting_fit):
      more = artefacts.distil(self.teacher, self.units, search.multipliers((0.25, 0.5, 1.0)),
                              self.source, directory, epochs=1, batch_size=16, verbose=0)
    self.assertEqual(fits, [["k0.5", "k0.5"]])
    self.assertEqual(sorted(more[name]), ["k0.25", "k0.5", "k1"])

  def test_score_measures_each_candidate_alone_in_the_teacher(self):
    table = search.score(self.teacher, self.units, self.trained, testing.dataset(self.x, self.y),
                         self.directory)
    unit = self.units[0]
    row = next(r for r in table[unit.name] if r["label"] == "k0.25")
    swapped = nd.substitute(self.teacher, {unit: self.trained[unit.name]["k0.25"]})
    predicted = np.argmax(swapped.predict(self.x, verbose=0), axis=-1)
    self.assertAllClose(row["accuracy"], np.mean(predicted == self.y))
    self.assertEqual(row["params"], self.trained[unit.name]["k0.25"].count_params())
    self.assertGreater(row["mse"], 0.0)
    k1 = next(r for r in table[unit.name] if r["label"] == "k1")
    self.assertGreater(k1["flops"], row["flops"])
    self.assertGreater(k1["params"], row["params"])

  def test_the_chosen_student_composes(self):
    table = search.score(self.teacher, self.units, self.trained, testing.dataset(self.x, self.y))
    choice = search.greedy(table, 1.0, max_drop=1.0)  # anything goes: the smallest everywhere
    student = search.compose_choice(self.teacher, self.units, self.trained, choice)
    self.assertLess(student.count_params(), self.teacher.count_params())
    self.assertEqual(student.predict(self.x[:4], verbose=0).shape, (4, 3))

  def test_empty_candidates_and_missing_neighbourhoods_are_named(self):
    with self.assertRaisesRegex(ValueError, "empty"):
      search.multipliers(())
    with self.assertRaisesRegex(ValueError, "No candidates for the neighbourhoods"):
      artefacts.distil(self.teacher, self.units, {self.units[0].name: search.multipliers((0.5,))},
                       self.source, self.directory, epochs=1)

  def test_a_candidate_of_the_wrong_shape_is_named(self):
    wrong = {"bad": keras.Sequential([keras.Input((4, 4, 5)), keras.layers.Conv2D(3, 1)])}
    with self.assertRaisesRegex(ValueError, self.units[0].name):
      artefacts.distil(self.teacher, self.units[:1], wrong, self.source, self.get_temp_dir(),
                       epochs=1, verbose=0)


class SparseCandidatesTest(tf.test.TestCase):

  def test_sparsity_levels_as_candidates_are_pruned_stored_plain_and_scored(self):
    x, y = testing.images(32)
    teacher = testing.trained(testing.tiny_resnet(), x, y)
    hoods = [h for h in nd.split_layers(teacher) if h.name in ("stage1_unit1_conv1",
                                                                 "stage2_unit1_conv2")]
    source = nd.ActivationSource(teacher, hoods, testing.dataset(x), verbose=0)
    directory = self.get_temp_dir()
    trained = artefacts.distil(teacher, hoods, search.sparsities((0.25, 0.75), steps=8), source,
                               directory, epochs=4, batch_size=16, verbose=0)
    for name, models in trained.items():
      for label, level in (("s0.25", 0.25), ("s0.75", 0.75)):
        self.assertFalse(sparsity.prunes(models[label]), msg=(name, label))
        kernel = models[label].layers[-1].kernel.numpy()
        self.assertAllClose(np.mean(kernel == 0), level, atol=0.01, msg=(name, label))
    # Stored plain, so they load with safe_mode and without tfmot's scope.
    with mock.patch.object(nd.NeighbourhoodDistiller, "fit", side_effect=AssertionError):
      again = artefacts.distil(teacher, hoods, search.sparsities((0.25, 0.75), steps=8), source,
                               directory, epochs=4, batch_size=16, verbose=0)
    self.assertEqual(sorted(again["stage1_unit1_conv1"]), ["s0.25", "s0.75"])
    table = search.score(teacher, hoods, trained, testing.dataset(x, y), directory)
    self.assertEqual([c["label"] for c in table["stage2_unit1_conv2"]], ["s0.25", "s0.75"])
    with self.assertRaisesRegex(ValueError, "empty"):
      search.sparsities((), steps=8)
