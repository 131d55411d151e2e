"""README.md's code runs as written.

Every Python block, in order and in one namespace, runs on a small CNN that is not one of the
project's ResNets (`testing.own_cnn`: a stem, a plain chain of two conv-BN-ReLU layers, two
residual blocks), given the names the README says it needs; what the text claims is then checked.
Every shell command names only flags its binary defines.
"""

import os
import re

import numpy as np
import testing

from keras_nd import sparsity
from keras_nd._keras import keras, tf

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_README = os.path.join(_ROOT, "README.md")


def _blocks(*languages):
  """The README's fenced code blocks in `languages`, in order: [(first line number, code)]."""
  blocks, current, start = [], None, 0
  with open(_README) as f:
    for number, line in enumerate(f, 1):
      fence = re.match(r"^```(\w*)\s*$", line)
      if fence and current is None:
        current, start, language = [], number + 1, fence.group(1)
      elif fence:
        if language in languages:
          blocks.append((start, "".join(current)))
        current = None
      elif current is not None:
        current.append(line)
  return blocks


def _defined_flags(binary):
  """The flags `examples/<binary>` defines, read from its source and the shared flags."""
  sources = [os.path.join(_ROOT, "examples", binary)]
  with open(sources[0]) as f:
    if "common.define_flags" in f.read():
      sources.append(os.path.join(_ROOT, "keras_nd", "experiments", "common.py"))
  names = {"help", "helpfull", "helpshort", "verbosity", "logtostderr"}
  for path in sources:
    with open(path) as f:
      names |= set(re.findall(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"", f.read()))
  return names


class ReadmeTest(tf.test.TestCase):

  def test_every_python_block_runs_on_a_cnn_that_is_not_a_resnet(self):
    rng = np.random.RandomState(0)
    y = rng.randint(0, 3, 384)
    x = rng.normal(size=(384, 8, 8, 3)).astype("float32") + y[:, None, None, None] * 0.7
    teacher = testing.trained(testing.own_cnn(), x[:256], y[:256], epochs=4)
    namespace = {"teacher": teacher, "x_train": x[:256], "y_train": y[:256],
                 "x_test": x[256:], "y_test": y[256:]}
    blocks = _blocks("python")
    self.assertGreaterEqual(len(blocks), 8)
    self.addCleanup(os.chdir, os.getcwd())
    os.chdir(self.get_temp_dir())  # the blocks write student.keras, candidates/, cache/, students/
    for line, code in blocks:
      with self.subTest(line=line):
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)  # pylint: disable=exec-used
    ns = namespace
    # The plain chain was grouped, and said so.
    self.assertIn("distilled together", ns["note"])
    self.assertEqual([h.name for h in ns["units"]], ["chain2_relu", "block1_out", "block2_out"])
    # KD's student, its BN statistics re-estimated, scores on test data near its training score.
    self.assertLess(abs(ns["history"].history["accuracy"][-1] - ns["test_accuracy"]), 0.15)
    self.assertGreater(ns["test_accuracy"], 0.6)
    # The saved student is the one trained.
    self.assertAllClose(ns["reloaded"].predict(ns["x_test"], verbose=0),
                        ns["student"].predict(ns["x_test"], verbose=0), atol=1e-5)
    # The Keras 3 file computes the student, and the Keras 3 teacher's neighbourhoods are tf_keras.
    self.assertAllClose(ns["exported"](ns["x_test"][:8], training=False),
                        ns["student"](ns["x_test"][:8], training=False), atol=1e-5)
    self.assertIsInstance(ns["k3_hoods"][0].model, keras.Model)
    # Every pruned layer, by gradient or exactly, is at its target; the skipped ones are dense.
    for model in (ns["sparse"], ns["sparse_exact"]):
      layers = {r["layer"]: r["sparsity"] for r in sparsity.report(model)["layers"]}
      for name, value in layers.items():
        if name in ns["skip"]:
          self.assertEqual(value, 0.0, name)
        else:
          self.assertAllClose(value, 0.5, atol=0.01, msg=f"{model.name}: {name}")
    # The searched student fits its budget.
    self.assertLessEqual(ns["searched"].count_params(), teacher.count_params())
    self.assertLen(ns["jobs_students"], 3)

  def test_shell_commands_name_only_flags_their_binaries_define(self):
    commands = 0
    for line, code in _blocks("sh", "bash"):
      for command in re.findall(r"python (examples/\w+\.py)([^&|\n]*)", code):
        binary, arguments = os.path.basename(command[0]), command[1]
        self.assertTrue(os.path.exists(os.path.join(_ROOT, "examples", binary)), binary)
        used = set(re.findall(r"--(\w+)", arguments))
        unknown = used - _defined_flags(binary) - {f"no{n}" for n in _defined_flags(binary)}
        self.assertEmpty(unknown, msg=f"README.md line {line}: {binary} {sorted(unknown)}")
        commands += 1
    self.assertGreaterEqual(commands, 5)


if __name__ == "__main__":
  tf.test.main()
