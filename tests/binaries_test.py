"""The experiment binaries in examples/ run from the command line and say where they wrote."""

import json
import os
import re
import subprocess
import sys

from absl.testing import parameterized

from keras_nd._keras import tf

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
_TINY = ["--num_train=48", "--num_validation=16", "--model=resnet8", "--teacher_epochs=1",
         "--batch_size=16", "--verbose=0"]


class BinariesTest(tf.test.TestCase, parameterized.TestCase):

  def _run(self, binary, *flags):
    workdir = self.get_temp_dir()
    done = subprocess.run([sys.executable, os.path.join(_EXAMPLES, binary), *_TINY,
                           f"--workdir={workdir}", *flags],
                          capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(done.returncode, 0, msg=done.stderr[-3000:])
    path = os.path.join(workdir, binary.replace(".py", "_results.json"))
    self.assertIn(f"Results written to {path}", done.stdout)
    with open(path) as f:
      return json.load(f), done.stdout

  # examples/distill.py runs in scale_out_test.py (sharded, composed, killed and resumed).

  def test_sparsify(self):
    results, out = self._run("sparsify.py", "--sparsities=0.5", "--methods=nd", "--nd_epochs=1")
    self.assertEqual([(r["method"], r["sparsity"]) for r in results["rows"]], [("nd", 0.5)])
    self.assertIn("Table 3a", out)

  def test_student_search(self):
    # One greedy student only (the experiment's own test covers uniform and budgeted ones).
    results, out = self._run("student_search.py", "--multipliers=0.5,1", "--drops=0.5",
                             "--uniform=", "--nd_epochs=1", "--ft_epochs=1")
    self.assertEqual([r["method"] for r in results["rows"]], ["greedy"])
    self.assertIn("before FT", out)

  def test_data_free(self):
    results, out = self._run("data_free.py", "--multipliers=0.5", "--methods=gnd,gnkd",
                             "--gnd_epochs=1", "--gnkd_epochs=1", "--steps_per_epoch=2",
                             "--verbose=1")
    self.assertEqual([r["method"] for r in results["rows"]], ["gnd", "gnkd"])
    self.assertIn("Table 3b", out)
    # A line per epoch of the teacher, G-ND and GN-KD: the last two take minutes by default.
    self.assertLen(re.findall(r"(?m)^  epoch 1/1: loss \S+ \(\d+\.\ds\)$", out), 3)
    self.assertIn("G-ND, k=0.5: 1 epochs of 2 noise batches...\n  epoch 1/1: loss", out)

  def test_thresholding(self):
    figures = os.path.join(self.get_temp_dir(), "figures")
    results, out = self._run("thresholding.py", "--epsilons=0,0.5", "--seeds=0",
                             "--weight_epsilons=0.3", "--nd_epochs=1", f"--figures_dir={figures}",
                             "--verbose=1")
    self.assertEqual([r["teacher"] for r in results["table4"]], ["plain", "regularised"])
    self.assertTrue(os.path.exists(os.path.join(figures, "figure5.png")))
    self.assertIn("Table 4", out)
    # Progress bars over the sweeps' evaluations: 3 units x 2 amplitudes alone, then the clean
    # ResNet-8 and its 8 kernels alone and cumulatively.
    self.assertRegex(out, r"(?m)^6/6 ")
    self.assertRegex(out, r"(?m)^17/17 ")

  @parameterized.named_parameters(("distill", "distill.py", "--methods=ce,dk", "dk"),
                                  ("sparsify", "sparsify.py", "--sparsities=1.5", "1.5"),
                                  ("data_free", "data_free.py", "--multipliers=0", "0.0"))
  def test_bad_flag_values_are_named(self, binary, flag, fragment):
    done = subprocess.run([sys.executable, os.path.join(_EXAMPLES, binary), *_TINY, flag,
                           f"--workdir={self.get_temp_dir()}"],
                          capture_output=True, text=True, timeout=600, check=False)
    self.assertNotEqual(done.returncode, 0)
    self.assertIn(fragment, done.stderr)


if __name__ == "__main__":
  tf.test.main()
