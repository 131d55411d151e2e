"""Neighbourhood distillation end to end on generated data (no download, no GPU).

  python examples/quickstart.py --workdir=/tmp/keras_nd_quickstart
"""

import os

from absl import app, flags

# TensorFlow's C++ log (CUDA probing errors, floods of notes from its kernels) hidden unless
# asked for: TF_CPP_MIN_LOG_LEVEL=0 shows it. Set before keras_nd imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_nd.experiments import common, quickstart  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/quickstart", "Where to write the teacher, cache, student "
                    "and quickstart_results.json.")
flags.DEFINE_float("k", 0.5, "Bottleneck multiplier of the students, in (0, 1].")
flags.DEFINE_integer("depth", 8, "ResNet depth (6n+2).")
flags.DEFINE_integer("teacher_epochs", 8, "Teacher training epochs (skipped if already trained).")
flags.DEFINE_integer("nd_epochs", 4, "Neighbourhood distillation epochs.")
flags.DEFINE_integer("ft_epochs", 2, "Fine-tuning (knowledge distillation) epochs.")
flags.DEFINE_integer("seed", 0, "Seed of the data and the models.")
common.define_tensorboard_flag()
common.define_export_flag()
for shared in ("tensorboard", "export"):
  flags.declare_key_flag(shared)  # --help lists it with the binary's own


def main(argv):
  del argv
  common.quiet_logs()
  quickstart.run(FLAGS.workdir, quickstart.Config(
      depth=FLAGS.depth, k=FLAGS.k, teacher_epochs=FLAGS.teacher_epochs,
      nd_epochs=FLAGS.nd_epochs, ft_epochs=FLAGS.ft_epochs, seed=FLAGS.seed,
      tensorboard=common.tensorboard_from_flags(FLAGS), export=FLAGS.export))


if __name__ == "__main__":
  app.run(main)
