"""The paper's data-free experiment (Table 3b): students distilled from Gaussian noise, no data.

  python examples/data_free.py
  python examples/data_free.py --teacher=workdir/distill/teacher-KEY.keras --methods=gnd,gnd_ft,gnkd
  python examples/data_free.py --noise=standard --student_init=teacher

G-ND distils every residual unit from Gaussian-noise inputs, G-ND+FT
fine-tunes it by KD on Gaussian-noise images, GN-KD trains the whole student
by KD on Gaussian-noise images; CE (trained on the data) is the reference.
With --teacher and without ce, only the test split is read. It writes
WORKDIR/data_free_results.json and prints a table shaped like the paper's Table 3b.
"""

import os

from absl import app, flags

# TensorFlow's C++ log (CUDA probing errors, floods of notes from its kernels) hidden unless
# asked for: TF_CPP_MIN_LOG_LEVEL=0 shows it. Set before keras_nd imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_nd.experiments import common, data_free  # noqa: E402

FLAGS = flags.FLAGS
common.define_flags(workdir="workdir/data_free")
flags.adopt_module_key_flags(common)  # --help lists the shared data and teacher flags too
flags.DEFINE_list("multipliers", [f"{k:g}" for k in data_free.MULTIPLIERS],
                  "Bottleneck multipliers k of the students.")
flags.DEFINE_list("methods", list(data_free.METHODS), "Any of ce, gnd, gnd_ft, gnkd.")
flags.DEFINE_enum("noise", "teacher", list(data_free.NOISES), "Each unit's input noise: "
                  "per-channel statistics read from the teacher's BatchNorm layers, or N(0, 1) "
                  "(the paper).")
flags.DEFINE_enum("student_init", "random", ["random", "teacher"], "How students start: from "
                  "scratch (the paper), or from the teacher's strongest inner channels (at k=1 "
                  "the teacher itself).")
flags.DEFINE_integer("steps_per_epoch", 100, "Noise batches per epoch.")
flags.DEFINE_enum("solver", "gradient", ["gradient", "lstsq", "lstsq+gradient"], "How G-ND finds "
                  "its students: --gnd_epochs of gradient steps on noise, solved exactly from "
                  "one epoch of noise (no gradient step; with --student_init=teacher the kept "
                  "channels are chosen by the solve), or both.")
flags.DEFINE_float("nd_learning_rate", 2e-3, "Adam learning rate of G-ND (cosine decay).")
flags.DEFINE_integer("ce_epochs", 6, "Cross-entropy (with data) student epochs.")
flags.DEFINE_integer("gnd_epochs", 10, "G-ND epochs.")
flags.DEFINE_integer("ft_epochs", 3, "G-ND+FT fine-tuning epochs on noise images.")
flags.DEFINE_integer("gnkd_epochs", 10, "GN-KD epochs on noise images.")


def main(argv):
  del argv
  common.quiet_logs()
  config = data_free.Config(
      multipliers=[float(k) for k in FLAGS.multipliers], methods=FLAGS.methods,
      noise=FLAGS.noise, student_init=FLAGS.student_init,
      epochs=dict(teacher=FLAGS.teacher_epochs, ce=FLAGS.ce_epochs, gnd=FLAGS.gnd_epochs,
                  ft=FLAGS.ft_epochs, gnkd=FLAGS.gnkd_epochs),
      steps_per_epoch=FLAGS.steps_per_epoch, nd_learning_rate=FLAGS.nd_learning_rate,
      solver=FLAGS.solver, **common.settings_from_flags(FLAGS))
  results = data_free.run(common.dataset_from_flags(FLAGS), FLAGS.workdir, config)
  print(data_free.table(results))
  print(f"Results written to {common.results_path(FLAGS.workdir, 'data_free')}")


if __name__ == "__main__":
  app.run(main)
