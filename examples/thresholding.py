"""The thresholding effect (the paper's Figures 1, 4, 5 and Table 4) and the diagnosis of ND.

  python examples/thresholding.py
  python examples/thresholding.py --epsilons=0,0.1,0.3,1 --seeds=0 --sigma=0.2

It trains (or reuses) a teacher and a noise-trained teacher, sweeps relative
Gaussian noise on the residual units' outputs and on the kernels, distils both
teachers' units, and checks each ND student's error against its unit's
threshold. It writes WORKDIR/thresholding_results.json, figure1.png, figure1_units.png,
figure4.png and figure5.png (in --figures_dir, default WORKDIR), and prints
the thresholds, Table 4 and the diagnosis.
"""

import os

from absl import app, flags

# TensorFlow's C++ log (CUDA probing errors, floods of notes from its kernels) hidden unless
# asked for: TF_CPP_MIN_LOG_LEVEL=0 shows it. Set before keras_nd imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_nd.experiments import common, thresholding  # noqa: E402

FLAGS = flags.FLAGS
common.define_flags(workdir="workdir/thresholding")
flags.adopt_module_key_flags(common)  # --help lists the shared data and teacher flags too
flags.DEFINE_list("epsilons", [f"{e:g}" for e in thresholding.EPSILONS],
                  "Relative output-noise amplitudes (times each unit's output RMS).")
flags.DEFINE_list("weight_epsilons", [f"{e:g}" for e in thresholding.WEIGHT_EPSILONS],
                  "Relative kernel-noise amplitudes (times each kernel's standard deviation).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Noise seeds every point is averaged over.")
flags.DEFINE_float("sigma", 0.1, "Training noise after every unit of the noise-trained teacher.")
flags.DEFINE_float("multiplier", 0.5, "Bottleneck multiplier k of the ND students.")
flags.DEFINE_float("drop", 0.01, "Accuracy drop (a fraction) that defines a threshold.")
flags.DEFINE_enum("solver", "lstsq", ["lstsq", "gradient", "lstsq+gradient"], "How Table 4's "
                  "ND students are distilled: solved exactly from the teacher's activations, "
                  "--nd_epochs of gradient steps (the paper's), or both.")
flags.DEFINE_integer("nd_epochs", 3, "Gradient epochs of neighbourhood distillation.")
flags.DEFINE_string("figures_dir", None, "Where the PNG figures go (default: --workdir).")


def main(argv):
  del argv
  common.quiet_logs()
  config = thresholding.Config(
      epsilons=[float(e) for e in FLAGS.epsilons], seeds=[int(s) for s in FLAGS.seeds],
      sigma=FLAGS.sigma, multiplier=FLAGS.multiplier,
      weight_epsilons=[float(e) for e in FLAGS.weight_epsilons], drop=FLAGS.drop,
      epochs=dict(teacher=FLAGS.teacher_epochs, nd=FLAGS.nd_epochs),
      figures_dir=FLAGS.figures_dir, solver=FLAGS.solver, **common.settings_from_flags(FLAGS))
  results = thresholding.run(common.dataset_from_flags(FLAGS), FLAGS.workdir, config)
  print(thresholding.table(results))
  print(f"Results written to {common.results_path(FLAGS.workdir, 'thresholding')}")


if __name__ == "__main__":
  app.run(main)
