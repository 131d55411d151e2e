"""The paper's sparsification experiment (Table 3a): sparse students by ND and KD, no fine-tuning.

  python examples/sparsify.py
  python examples/sparsify.py --sparsities=0.5,0.9 --nd_epochs=6 --kd_epochs=6
  python examples/sparsify.py --dataset=cifar10 --data_dir=~/tensorflow_datasets

Every convolution but the first (and not the classifier) is pruned by
magnitude with tfmot's polynomial schedule. It writes WORKDIR/sparsify_results.json
(one row per method and sparsity: accuracy, seconds, measured sparsity, gzip
size of the weights) and prints a table shaped like the paper's Table 3a.
"""

import os

from absl import app, flags

# TensorFlow's C++ log (CUDA probing errors, floods of notes from its kernels) hidden unless
# asked for: TF_CPP_MIN_LOG_LEVEL=0 shows it. Set before keras_nd imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_nd.experiments import common, sparsify  # noqa: E402

FLAGS = flags.FLAGS
common.define_flags(workdir="workdir/sparsify", teacher_epochs=sparsify.EPOCHS["teacher"])
flags.adopt_module_key_flags(common)  # --help lists the shared data and teacher flags too
flags.DEFINE_list("sparsities", [str(s) for s in sparsify.SPARSITIES], "Target sparsities.")
flags.DEFINE_list("methods", list(sparsify.METHODS), "Any of nd, kd.")
flags.DEFINE_enum("solver", "gradient", ["gradient", "lstsq"], "How ND's sparse students are "
                  "found: tfmot magnitude pruning while each layer learns (--nd_epochs), or the "
                  "teacher's smallest weights zeroed and the rest solved exactly (no gradient "
                  "step).")
flags.DEFINE_enum("mask", "magnitude", ["magnitude", "obs"], "With --solver=lstsq, which weights "
                  "are zeroed: least magnitude over each layer, or chosen for each output by "
                  "Optimal Brain Surgeon.")
flags.DEFINE_list("m_by_n", None, "'m,n', e.g. 2,4: structured sparsity instead of "
                  "--sparsities, m zeros in every n consecutive input-channel weights, for ND "
                  "and KD.")
flags.DEFINE_integer("nd_epochs", sparsify.EPOCHS["nd"],
                     "Neighbourhood distillation epochs per sparsity.")
flags.DEFINE_integer("kd_epochs", sparsify.EPOCHS["kd"], "End-to-end KD epochs per sparsity.")
flags.DEFINE_float("nd_learning_rate", sparsify.RATES["nd"],
                   "Peak learning rate of the ND students.")
flags.DEFINE_float("kd_learning_rate", sparsify.RATES["kd"],
                   "Peak learning rate of the end-to-end KD student.")
flags.DEFINE_bool("calibrate", True, "Re-estimate the ND student's BatchNorm statistics on the "
                  "training images after composing (no weight changes).")


def main(argv):
  del argv
  common.quiet_logs()
  config = sparsify.Config(
      sparsities=[float(s) for s in FLAGS.sparsities], methods=FLAGS.methods,
      epochs=dict(teacher=FLAGS.teacher_epochs, nd=FLAGS.nd_epochs, kd=FLAGS.kd_epochs),
      calibrate=FLAGS.calibrate, solver=FLAGS.solver, mask=FLAGS.mask,
      m_by_n=[int(v) for v in FLAGS.m_by_n] if FLAGS.m_by_n else None,
      rates=dict(nd=FLAGS.nd_learning_rate, kd=FLAGS.kd_learning_rate),
      **common.settings_from_flags(FLAGS))
  results = sparsify.run(common.dataset_from_flags(FLAGS), FLAGS.workdir, config)
  print(sparsify.table(results))
  print(f"Results written to {common.results_path(FLAGS.workdir, 'sparsify')}")


if __name__ == "__main__":
  app.run(main)
