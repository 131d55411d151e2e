"""The paper's parameter-reduction experiment: CE, KD, ND and ND+FT students of a ResNet teacher.

Run with no flags, it is keras_nd's main job on the embedded dataset (no
download, no GPU, a few minutes on a 2-core CPU):

  python examples/distill.py
  python examples/distill.py --multipliers=1,0.75,0.5,0.4 --ablation --time_neighbourhoods
  python examples/distill.py --dataset=cifar10 --data_dir=~/tensorflow_datasets --model=resnet20

Split across jobs (any number at once, any scheduler, one shared --workdir):

  python examples/distill.py --shard=0/2 &     # or --neighbourhoods=1,2,5
  python examples/distill.py --shard=1/2 &
  wait; python examples/distill.py --compose   # refuses, naming them, if students are missing

Several machines distilling together (tf.distribute.MultiWorkerMirroredStrategy
from TF_CONFIG; each worker runs the same command, then one runs --compose):

  TF_CONFIG='{"cluster": {"worker": ["host1:port", "host2:port"]},
              "task": {"type": "worker", "index": 0}}' python examples/distill.py --multi_worker

A killed run started again with the same command resumes: finished work is
reused, ND, KD and fine-tuning go on from their last epoch.

It writes WORKDIR/distill_results.json (the configuration, one row per method and
multiplier, timings, time-to-accuracy speed-ups, accuracy curves) and TensorBoard
logs of every phase (WORKDIR/tensorboard; see --tensorboard), and prints tables
shaped like the paper's Tables 1, 5 and 6.
"""

import os

from absl import app, flags

# TensorFlow's C++ log (CUDA probing errors, floods of notes from its kernels) hidden unless
# asked for: TF_CPP_MIN_LOG_LEVEL=0 shows it. Set before keras_nd imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_nd.experiments import common, distill  # noqa: E402

FLAGS = flags.FLAGS
common.define_flags(workdir="workdir/distill")
flags.adopt_module_key_flags(common)  # --help lists the shared data and teacher flags too
flags.DEFINE_list("multipliers", ["0.5"], "Bottleneck multipliers k of the students.")
flags.DEFINE_list("methods", list(distill.METHODS), "Any of ce, kd, nd, nd_ft.")
flags.DEFINE_integer("lookahead", 0, "Look-ahead depth of neighbourhood distillation.")
flags.DEFINE_bool("ablation", False, "Also run ND and ND+FT with 2-neighbourhood look-ahead "
                  "(Table 5).")
flags.DEFINE_bool("time_neighbourhoods", False, "Also time each neighbourhood distilled alone "
                  "(Table 6).")
flags.DEFINE_enum("student_init", "teacher", ["teacher", "random"], "How KD and ND students "
                  "start: from the teacher's strongest inner channels, or from scratch (the "
                  "paper). CE students always start from scratch.")
flags.DEFINE_enum("solver", "lstsq", ["lstsq", "gradient", "lstsq+gradient"], "How ND finds "
                  "the students' weights: solved exactly from the teacher's activations "
                  "(least squares, no gradient step), by --nd_epochs of gradient steps, or both.")
flags.DEFINE_enum("channels", "greedy", ["greedy", "l1"], "Which teacher channels ND students "
                  "keep (--student_init=teacher): chosen by reconstruction error, or largest L1 "
                  "norm.")
flags.DEFINE_integer("ce_epochs", 6, "Cross-entropy student epochs.")
flags.DEFINE_integer("kd_epochs", 6, "Most epochs of end-to-end KD (early stopping).")
flags.DEFINE_integer("nd_epochs", 3, "Gradient epochs of neighbourhood distillation (--solver="
                     "gradient or lstsq+gradient).")
flags.DEFINE_integer("ft_epochs", 3, "Most fine-tuning epochs (early stopping).")
flags.DEFINE_list("neighbourhoods", None, "Only distil these residual units (indices in split "
                  "order, or names) into --workdir, then stop: one job of a split run.")
flags.DEFINE_string("shard", None, "'i/n': only distil every n-th residual unit from the i-th, "
                    "then stop.")
flags.DEFINE_bool("compose", False, "Assemble ND students from the jobs' artefacts; train none "
                  "(fails, naming them, if any is missing).")
flags.DEFINE_bool("multi_worker", False, "Distil with tf.distribute.MultiWorkerMirroredStrategy "
                  "(cluster from TF_CONFIG), then stop; compose with --compose afterwards.")
flags.DEFINE_list("devices", None, "Spread whole neighbourhoods over these devices for ND "
                  "(e.g. /gpu:0,/gpu:1); default: one device.")


def main(argv):
  del argv
  common.quiet_logs()
  strategy = None
  if FLAGS.multi_worker:  # first: the strategy must exist before TensorFlow runs anything
    try:
      strategy = distill.multi_worker_strategy(FLAGS.solver)
    except ValueError as error:
      raise app.UsageError(str(error)) from None
  config = distill.Config(
      multipliers=[float(k) for k in FLAGS.multipliers], methods=FLAGS.methods,
      lookahead=FLAGS.lookahead, ablation=FLAGS.ablation,
      time_neighbourhoods=FLAGS.time_neighbourhoods,
      epochs=dict(teacher=FLAGS.teacher_epochs, ce=FLAGS.ce_epochs, kd=FLAGS.kd_epochs,
                  nd=FLAGS.nd_epochs, ft=FLAGS.ft_epochs),
      student_init=FLAGS.student_init, solver=FLAGS.solver, channels=FLAGS.channels,
      neighbourhoods=FLAGS.neighbourhoods, shard=FLAGS.shard, compose=FLAGS.compose,
      devices=FLAGS.devices, **common.settings_from_flags(FLAGS))
  results = distill.run(common.dataset_from_flags(FLAGS), FLAGS.workdir, config,
                        strategy=strategy)
  if "distilled" in results:
    print(f"Distilled {', '.join(results['distilled'])}: students written to "
          f"{results['directory']}")
    return
  print(distill.table(results))
  print(f"Results written to {common.results_path(FLAGS.workdir, 'distill')}")


if __name__ == "__main__":
  app.run(main)
