"""The distillation binary split across processes: sharded jobs at once, one killed, then the
whole job; two workers.

Each test runs examples/distill.py in subprocesses on a tiny ResNet-8 (the
in-process equivalents are in artefacts_test.py).
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

from keras_nd._keras import tf

_BINARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "distill.py")
_TINY = ["--num_train=192", "--num_validation=16", "--model=resnet8", "--teacher_epochs=1",
         "--batch_size=16", "--nd_epochs=3", "--ft_epochs=3", "--methods=nd,nd_ft",
         "--solver=gradient"]  # epochs to resume, gradients to all-reduce


def _command(workdir, *flags):
  return [sys.executable, _BINARY, *_TINY, f"--workdir={workdir}", *flags]


def _free_ports(count):
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in sockets:
      s.bind(("localhost", 0))
    return [s.getsockname()[1] for s in sockets]


class ScaleOutTest(tf.test.TestCase):

  def _run(self, workdir, *flags, env=None):
    done = subprocess.run(_command(workdir, "--verbose=1", *flags), capture_output=True, text=True,
                          timeout=600, check=False, env=env)
    return done.returncode, done.stdout, done.stderr

  def _succeeds(self, workdir, *flags):
    code, out, err = self._run(workdir, *flags)
    self.assertEqual(code, 0, msg=err[-3000:])
    return out

  def _artefacts(self, workdir):
    return sorted(name for _, _, names in os.walk(os.path.join(workdir, "students"))
                  for name in names if name.endswith(".keras"))

  def _killed(self, workdir, *flags, markers):
    """Runs the binary, SIGKILLs it once `markers` have appeared in order; returns the output."""
    job = subprocess.Popen(_command(workdir, *flags), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen, lines = 0, []
    for line in job.stdout:
      lines.append(line)
      if markers[seen] in line:
        seen += 1
        if seen == len(markers):
          job.send_signal(signal.SIGKILL)
          break
    job.wait(timeout=600)
    self.assertEqual(job.returncode, -signal.SIGKILL, msg="".join(lines)[-3000:])
    return "".join(lines)

  def test_shard_jobs_at_once_one_killed_then_a_run_finishes_their_work(self):
    workdir = self.get_temp_dir()
    # Two jobs at once into one work directory: one trains the teacher and builds the cache,
    # the other waits for them (a lock), then each distils its own units (ResNet-8 has three:
    # 1 and 3 by index in split order, and the second of shard 1/2). The second is killed
    # (SIGKILL) once its first ND epoch is checkpointed.
    first = subprocess.Popen(_command(workdir, "--verbose=1", "--neighbourhoods=1,3"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = self._killed(workdir, "--verbose=1", "--shard=1/2",
                          markers=("Distilling", "epoch 1/3:"))
    out, err = first.communicate(timeout=600)
    self.assertEqual(first.returncode, 0, msg=err[-3000:])
    self.assertEqual(sum("Training the teacher" in o for o in (out, killed)), 1)
    self.assertEqual(sum("Reusing the teacher" in o for o in (out, killed)), 1)
    trainer = out if "Training the teacher" in out else killed
    # Every training phase reports each epoch at --verbose=1.
    self.assertRegex(trainer, r"Training the teacher \(resnet8, 1 epochs\)\.\.\.\n"
                              r"  epoch 1/1: loss \S+ \(\d+\.\ds\)\n")
    self.assertIn("Distilled stage1_unit1_out, stage3_unit1_out: students written to", out)
    self.assertLen(self._artefacts(workdir), 2)

    # The whole job: the teacher, the cache and the first job's students are reused, the killed
    # job's unit goes on from its checkpoint, then fine-tuning and the results.
    out = self._succeeds(workdir, "--verbose=2")
    self.assertIn("Reusing the teacher", out)
    self.assertIn("Reusing the activation cache", out)
    self.assertIn("(2 already finished)", out)
    self.assertRegex(out, r"Resuming after epoch [12] of 3")
    self.assertLen(self._artefacts(workdir), 3)
    with open(os.path.join(workdir, "distill_results.json")) as f:
      results = json.load(f)
    self.assertEqual([r["method"] for r in results["rows"]], ["nd", "nd_ft"])
    self.assertLen(results["curves"]["nd_ft@0.5/lookahead0"], 4)  # before FT and 3 epochs
    self.assertFalse(os.path.exists(os.path.join(workdir, "backups")))

  def test_two_workers_on_loopback(self):
    workdir = self.get_temp_dir()
    ports = _free_ports(2)
    jobs = []
    for index in range(2):
      config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                "task": {"type": "worker", "index": index}}
      env = dict(os.environ, TF_CONFIG=json.dumps(config))
      jobs.append(subprocess.Popen(_command(workdir, "--verbose=1", "--multi_worker",
                                            "--nd_epochs=2", "--verbosity=0"), env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [job.communicate(timeout=600) for job in jobs]
    for job, (out, err) in zip(jobs, outputs):
      self.assertEqual(job.returncode, 0, msg=err[-3000:])
      self.assertIn("Distilled stage1_unit1_out, stage2_unit1_out, stage3_unit1_out:", out)
    self.assertIn("num_devices = 1, group_size = 2", outputs[0][1])  # TensorFlow's INFO log
    # Gradients and metrics are all-reduced: both workers report the same losses, though each
    # trains on its own half of every batch.
    losses = [re.findall(r"epoch \d/2: loss (\S+)", out) for out, _ in outputs]
    self.assertLen(losses[0], 2)
    self.assertEqual(losses[0], losses[1])
    self.assertLen(self._artefacts(workdir), 3)  # written by the chief only


if __name__ == "__main__":
  tf.test.main()
