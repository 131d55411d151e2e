"""The paper's sparsification experiment (Table 3a): sparse students by ND and KD, no fine-tuning.

  python examples/sparsify.py
  python examples/sparsify.py --sparsities=0.5,0.9 --nd_epochs=6 --kd_epochs=6
  python examples/sparsify.py --dataset=cifar10 --data_dir=~/tensorflow_datasets

Every convolution but the first (and not the classifier) is pruned by
magnitude with tfmot's polynomial schedule. It writes WORKDIR/results.json
(one row per method and sparsity: accuracy, seconds, measured sparsity, gzip
size of the weights) and prints a table shaped like the paper's Table 3a.
"""

from absl import app, flags

from keras_nd import data
from keras_nd.experiments import sparsify

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "embedded", "'embedded' (generated offline), 'npz:PATH', or a "
                    "tensorflow-datasets name such as 'cifar10' (prepared under --data_dir).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_integer("num_train", None, "Training examples (default: all; for the embedded "
                     "dataset 3000, as examples/distill.py).")
flags.DEFINE_integer("num_validation", 400, "Examples held out of training (as distill.py).")
flags.DEFINE_string("model", "resnet20", "resnetN (N = 6n+2) or resnet50.")
flags.DEFINE_list("sparsities", [str(s) for s in sparsify.SPARSITIES], "Target sparsities.")
flags.DEFINE_list("methods", list(sparsify.METHODS), "Any of nd, kd.")
flags.DEFINE_integer("teacher_epochs", 15, "Teacher training epochs.")
flags.DEFINE_integer("nd_epochs", 3, "Neighbourhood distillation epochs per sparsity.")
flags.DEFINE_integer("kd_epochs", 3, "End-to-end KD epochs per sparsity.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the data split and the models.")
flags.DEFINE_string("workdir", "workdir/sparsify", "Output directory; the teacher is reused.")
flags.DEFINE_integer("verbose", 1, "0 quiet, 1 a line per run, 2 Keras progress bars.")


def main(argv):
  del argv
  num_train = FLAGS.num_train
  if num_train is None and FLAGS.dataset == "embedded":
    num_train = 3000
  dataset = data.get(FLAGS.dataset, data_dir=FLAGS.data_dir, num_train=num_train,
                     num_validation=FLAGS.num_validation, seed=FLAGS.seed)
  results = sparsify.run(
      dataset, FLAGS.workdir, model=FLAGS.model,
      sparsities=[float(s) for s in FLAGS.sparsities], methods=FLAGS.methods,
      epochs=dict(teacher=FLAGS.teacher_epochs, nd=FLAGS.nd_epochs, kd=FLAGS.kd_epochs),
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, verbose=FLAGS.verbose)
  print(sparsify.table(results))
  print(f"Results written to {FLAGS.workdir}/results.json")


if __name__ == "__main__":
  app.run(main)
