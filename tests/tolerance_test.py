"""Tests for keras_nd.tolerance: thresholds read off a sweep, and the diagnosis of students."""

import numpy as np
import testing

import keras_nd as nd
from keras_nd import metrics, perturb, tolerance
from keras_nd._keras import tf


class ThresholdsFromSweepTest(tf.test.TestCase):

  @staticmethod
  def _row(name, epsilon, accuracy, relative=True):
    return {"hoods": [name], "epsilon": epsilon, "relative": relative, "accuracy_mean": accuracy}

  def test_reads_the_last_amplitude_before_the_first_failure(self):
    rows = [self._row("a", e, acc) for e, acc in ((0.0, 0.90), (0.3, 0.85), (0.1, 0.895),
                                                  (1.0, 0.90))]
    rows += [self._row("b", e, acc) for e, acc in ((0.1, 0.80), (0.3, 0.70))]
    # Teacher 0.90, drop 0.01: "a" holds at 0.1 (0.895) and fails at 0.3; the recovery at 1.0
    # does not count. "b" fails from its smallest amplitude.
    self.assertEqual(tolerance.thresholds_from_sweep(rows, 0.90, drop=0.01), {"a": 0.1, "b": 0.0})
    # drop 0.06: every amplitude of "a" holds.
    self.assertEqual(tolerance.thresholds_from_sweep(rows, 0.90, drop=0.06)["a"], 1.0)

  def test_rejects_rows_of_several_neighbourhoods(self):
    rows = [{"hoods": ["a", "b"], "epsilon": 0.1, "accuracy_mean": 0.9}]
    with self.assertRaisesRegex(ValueError, r"mode='each'.*\['a', 'b'\]"):
      tolerance.thresholds_from_sweep(rows, 0.9)

  def test_rejects_rows_of_absolute_noise(self):
    with self.assertRaisesRegex(ValueError, "'a' at epsilon=0.1 is of absolute noise"):
      tolerance.thresholds_from_sweep([self._row("a", 0.1, 0.9, relative=False)], 0.9)


class DiagnoseTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    x, y = testing.images(128)
    cls.teacher = testing.trained(testing.tiny_resnet(), x, y, epochs=5)
    cls.hoods = nd.split(cls.teacher)
    cls.data = testing.dataset(x, y, batch_size=32)

  def _broken(self, hood):
    student = nd.students.clone(hood)
    student.set_weights([np.zeros_like(w) for w in student.get_weights()])
    return student

  def test_copies_of_the_teacher_have_no_error(self):
    units = self.hoods[1:-1]
    students = {units[0]: nd.students.clone(units[0], init="teacher"),
                units[1]: units[1].teacher, units[2]: nd.students.clone(units[2])}
    rows = tolerance.diagnose(self.teacher, students, self.data, thresholds=0.01, steps=2)
    self.assertEqual([row["hood"] for row in rows], [h.name for h in units])
    for row in rows:
      self.assertAllClose(row["error"], 0.0, atol=1e-6, msg=row["hood"])
      self.assertEqual(row["threshold"], 0.01)
      self.assertFalse(row["flagged"])

  def test_flags_a_broken_student_with_thresholds_from_a_sweep(self):
    units = self.hoods[1:-1]
    rows = perturb.output_sweep(self.teacher, units, self.data, [0.0, 0.1, 0.3], seeds=(0,),
                                relative=True)
    thresholds = tolerance.thresholds_from_sweep(rows, metrics.accuracy(self.teacher, self.data),
                                               drop=0.05)
    students = {hood: nd.students.clone(hood) for hood in units}
    students[units[1]] = self._broken(units[1])
    rows = tolerance.diagnose(self.teacher, students, self.data, thresholds=thresholds)
    self.assertEqual([row["flagged"] for row in rows], [False, True, False])
    self.assertGreater(rows[1]["error"], 0.3)
    self.assertEqual(rows[1]["threshold"], thresholds[units[1].name])
    table = tolerance.format_diagnosis(rows)
    self.assertRegex(table, r"stage2_unit1_out\s+\d+\.\d{4}\s+\d\.\d{4}\s+OVER")
    self.assertIn("1 of 3 neighbourhoods over their threshold.", table)

  def test_without_thresholds_nothing_is_flagged(self):
    hood = self.hoods[2]
    rows = tolerance.diagnose(self.teacher, {hood: self._broken(hood)}, self.data, steps=1)
    self.assertIsNone(rows[0]["threshold"])
    self.assertFalse(rows[0]["flagged"])
    table = tolerance.format_diagnosis(rows)
    self.assertRegex(table, r"(?m)^stage2_unit1_out\s+\d\.\d{4}\s+-$")
    self.assertIn("No thresholds given", table)

  def test_rejects_thresholds_for_a_neighbourhood_without_student(self):
    hood = self.hoods[1]
    with self.assertRaisesRegex(ValueError, r"\['stage2_unit1_out'\] that have no student"):
      tolerance.diagnose(self.teacher, {hood: hood.teacher}, self.data,
                       thresholds={hood.name: 0.1, "stage2_unit1_out": 0.1})

  def test_rejects_a_student_without_threshold(self):
    students = {hood: hood.teacher for hood in self.hoods[1:3]}
    with self.assertRaisesRegex(ValueError, r"no value for the neighbourhoods \['stage2_unit1"):
      tolerance.diagnose(self.teacher, students, self.data, thresholds={"stage1_unit1_out": 0.1})

  def test_rejects_a_student_of_another_models_neighbourhood(self):
    other = nd.split(testing.tiny_resnet(seed=1))[1]
    with self.assertRaisesRegex(ValueError, "'stage1_unit1_out' was split from model"):
      tolerance.diagnose(self.teacher, {other: other.teacher}, self.data)

  def test_rejects_a_student_of_the_wrong_shape(self):
    hood = self.hoods[2]
    with self.assertRaisesRegex(ValueError, "'stage2_unit1_out'"):
      tolerance.diagnose(self.teacher, {hood: self.hoods[1].teacher}, self.data)

  def test_rejects_no_students(self):
    with self.assertRaisesRegex(ValueError, "students is empty"):
      tolerance.diagnose(self.teacher, {}, self.data)


if __name__ == "__main__":
  tf.test.main()
