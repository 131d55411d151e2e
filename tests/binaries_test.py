"""The experiment binaries in examples/ run from the command line and say where they wrote."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import testing

from keras_nd._keras import tf

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
_TINY = ["--num_train=48", "--num_validation=16", "--model=resnet8", "--teacher_epochs=1",
         "--batch_size=16", "--verbose=0"]


# The environment a binary is started in: without the log level this process (importing
# keras_nd) set, so that the binary sets its own.
_AS_RUN = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


class BinariesTest(tf.test.TestCase):

  def _run(self, binary, *flags):
    workdir = self._workdir = self.get_temp_dir()
    done = subprocess.run([sys.executable, os.path.join(_EXAMPLES, binary), *_TINY,
                           f"--workdir={workdir}", *flags],
                          capture_output=True, text=True, timeout=600, check=False,
                          env=_AS_RUN)
    self.assertEqual(done.returncode, 0, msg=done.stderr[-3000:])
    # Each log line once: TensorFlow's own handler (its "WARNING:tensorflow:" format) is gone,
    # absl's prints its records; the lines its libraries print while they load are hidden.
    self.assertNotIn("WARNING:tensorflow:", done.stderr)
    self.assertNotIn("oneDNN custom operations", done.stderr)
    path = os.path.join(workdir, binary.replace(".py", "_results.json"))
    self.assertIn(f"Results written to {path}", done.stdout)
    # TensorBoard logs by default, under the work directory.
    self.assertNotEmpty(os.listdir(os.path.join(workdir, "tensorboard", "summary")))
    with open(path) as f:
      return json.load(f), done.stdout

  # examples/distill.py runs in scale_out_test.py (sharded, composed, killed and resumed). A bad
  # flag value becomes a bad configuration, which each experiment's test shows named
  # (test_bad_arguments_are_named), before anything runs.

  def test_sparsify_on_your_own_teacher_and_npz_data(self):
    # A CNN that is not one of the project's ResNets, preprocessing its own raw images, on an
    # npz file: given with --teacher, --preprocessing=model and --dataset=npz:.
    directory = self.get_temp_dir()
    rng = np.random.RandomState(0)
    npz = os.path.join(directory, "own.npz")
    np.savez(npz, x_train=rng.randint(0, 256, (64, 8, 8, 3)).astype("uint8"),
             y_train=np.arange(64) % 3, x_test=rng.randint(0, 256, (16, 8, 8, 3)),
             y_test=np.arange(16) % 3)
    path = os.path.join(directory, "own.keras")
    testing.own_cnn(rescale=True).save(path)
    results, out = self._run("sparsify.py", "--sparsities=0.5", "--solver=lstsq",
                             f"--dataset=npz:{npz}", f"--teacher={path}", "--preprocessing=model")
    self.assertEqual([(r["method"], r["sparsity"]) for r in results["rows"]],
                     [("nd", 0.5), ("kd", 0.5)])
    self.assertEqual(results["teacher"]["architecture"], f"given:{path}")
    self.assertEqual(results["config"]["teacher"], path)
    self.assertIn("Table 3a", out)

  def test_student_search(self):
    # One greedy student only (the experiment's own test covers uniform and budgeted ones).
    results, out = self._run("student_search.py", "--multipliers=0.5,1", "--drops=0.5",
                             "--uniform=", "--nd_epochs=1", "--ft_epochs=1")
    self.assertEqual([r["method"] for r in results["rows"]], ["greedy"])
    # The configuration the flags made, as the run had it.
    self.assertEqual({k: results["config"][k] for k in ("model", "multipliers", "uniform")},
                     {"model": "resnet8", "multipliers": [0.5, 1.0], "uniform": []})
    self.assertIn("before FT", out)
    # The teacher and the chosen student, as tf_keras files (--export's default).
    self.assertEqual(sorted(os.listdir(os.path.join(self._workdir, "export", "keras"))),
                     ["greedy-0.5.keras", "teacher.keras"])

  def test_data_free(self):
    results, out = self._run("data_free.py", "--multipliers=0.5", "--methods=gnd,gnkd",
                             "--gnd_epochs=1", "--gnkd_epochs=1", "--steps_per_epoch=2",
                             "--verbose=1")
    self.assertEqual([r["method"] for r in results["rows"]], ["gnd", "gnkd"])
    self.assertEqual(results["config"]["epochs"], dict(teacher=1, ce=6, gnd=1, ft=3, gnkd=1))
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
    self.assertEqual(results["config"]["figures_dir"], figures)
    self.assertTrue(os.path.exists(os.path.join(figures, "figure5.png")))
    self.assertIn("Table 4", out)
    # Progress bars over the sweeps' evaluations: 3 units x 2 amplitudes alone, then the clean
    # ResNet-8 and its 8 kernels alone and cumulatively.
    self.assertRegex(out, r"(?m)^6/6 ")
    self.assertRegex(out, r"(?m)^17/17 ")


if __name__ == "__main__":
  tf.test.main()
