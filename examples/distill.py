"""The paper's parameter-reduction experiment: CE, KD, ND and ND+FT students of a ResNet teacher.

Run with no flags, it is keras_nd's main job on the embedded dataset (no
download, no GPU, a few minutes on a 2-core CPU):

  python examples/distill.py
  python examples/distill.py --multipliers=1,0.75,0.5,0.4 --ablation --time_neighbourhoods
  python examples/distill.py --dataset=cifar10 --data_dir=~/tensorflow_datasets --model=resnet20

It writes WORKDIR/results.json (the configuration, one row per method and
multiplier, timings, time-to-accuracy speed-ups, accuracy curves) and prints
tables shaped like the paper's Tables 1, 5 and 6.
"""

from absl import app, flags

from keras_nd import data
from keras_nd.experiments import distill

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "embedded", "'embedded' (generated offline), 'npz:PATH', or a "
                    "tensorflow-datasets name such as 'cifar10' (prepared under --data_dir).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_integer("num_train", None, "Training examples (default: all; for the embedded "
                     "dataset 3000, which keeps the main job within 5 minutes on 2 cores).")
flags.DEFINE_integer("num_validation", 400, "Examples held out of training for early stopping.")
flags.DEFINE_string("model", "resnet20", "resnetN (N = 6n+2) or resnet50.")
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
flags.DEFINE_integer("teacher_epochs", 15, "Teacher training epochs.")
flags.DEFINE_integer("ce_epochs", 6, "Cross-entropy student epochs.")
flags.DEFINE_integer("kd_epochs", 6, "Most epochs of end-to-end KD (early stopping).")
flags.DEFINE_integer("nd_epochs", 3, "Neighbourhood distillation epochs.")
flags.DEFINE_integer("ft_epochs", 3, "Most fine-tuning epochs (early stopping).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the data split and the models.")
flags.DEFINE_string("workdir", "workdir/distill", "Output directory; the teacher is reused.")
flags.DEFINE_integer("verbose", 1, "0 quiet, 1 a line per phase, 2 Keras progress bars.")


def main(argv):
  del argv
  num_train = FLAGS.num_train
  if num_train is None and FLAGS.dataset == "embedded":
    num_train = 3000
  dataset = data.get(FLAGS.dataset, data_dir=FLAGS.data_dir, num_train=num_train,
                     num_validation=FLAGS.num_validation, seed=FLAGS.seed)
  results = distill.run(
      dataset, FLAGS.workdir, model=FLAGS.model,
      multipliers=[float(k) for k in FLAGS.multipliers], methods=FLAGS.methods,
      lookahead=FLAGS.lookahead, ablation=FLAGS.ablation,
      time_neighbourhoods=FLAGS.time_neighbourhoods,
      epochs=dict(teacher=FLAGS.teacher_epochs, ce=FLAGS.ce_epochs, kd=FLAGS.kd_epochs,
                  nd=FLAGS.nd_epochs, ft=FLAGS.ft_epochs),
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, student_init=FLAGS.student_init,
      verbose=FLAGS.verbose)
  print(distill.table(results))
  print(f"Results written to {FLAGS.workdir}/results.json")


if __name__ == "__main__":
  app.run(main)
