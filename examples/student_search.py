"""Student Search (the paper's Figures 3, 6, 7): distil candidates once, then pick students.

  python examples/student_search.py
  python examples/student_search.py --multipliers=0.25,0.5,0.75,1 --drops=0.01,0.02

It writes WORKDIR/student_search_results.json (the candidates' quality table, the
params-versus-predicted-drop frontier, and every chosen student before and
after fine-tuning) and prints one line per student. Candidates are stored in
WORKDIR/candidates; a second run trains none of them again.
"""

import os

from absl import app, flags

# TensorFlow's C++ log (CUDA probing errors, floods of notes from its kernels) hidden unless
# asked for: TF_CPP_MIN_LOG_LEVEL=0 shows it. Set before keras_nd imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_nd.experiments import common, student_search  # noqa: E402

FLAGS = flags.FLAGS
common.define_flags(workdir="workdir/student_search")
flags.adopt_module_key_flags(common)  # --help lists the shared data and teacher flags too
flags.DEFINE_list("multipliers", [f"{k:g}" for k in student_search.MULTIPLIERS],
                  "Candidate bottleneck multipliers of every unit.")
flags.DEFINE_list("drops", [f"{d:g}" for d in student_search.DROPS],
                  "Accepted accuracy drops (fractions) of the greedy rule.")
flags.DEFINE_list("uniform", [f"{k:g}" for k in student_search.UNIFORM],
                  "Uniform multipliers to compare with (and whose sizes are the budgets).")
flags.DEFINE_enum("solver", "lstsq", ["lstsq", "gradient", "lstsq+gradient"], "How the "
                  "candidates are distilled: solved exactly from the teacher's activations, by "
                  "--nd_epochs of gradient steps, or both.")
flags.DEFINE_integer("nd_epochs", 3, "Gradient epochs of the candidates (--solver=gradient or "
                     "lstsq+gradient).")
flags.DEFINE_integer("ft_epochs", 3, "Most fine-tuning epochs of each chosen student.")


def main(argv):
  del argv
  common.quiet_logs()
  config = student_search.Config(
      multipliers=[float(k) for k in FLAGS.multipliers], drops=[float(d) for d in FLAGS.drops],
      uniform=[float(k) for k in FLAGS.uniform],
      epochs=dict(teacher=FLAGS.teacher_epochs, nd=FLAGS.nd_epochs, ft=FLAGS.ft_epochs),
      solver=FLAGS.solver, **common.settings_from_flags(FLAGS))
  results = student_search.run(common.dataset_from_flags(FLAGS), FLAGS.workdir, config)
  print(student_search.table(results))
  print(f"Results written to {common.results_path(FLAGS.workdir, 'student_search')}")


if __name__ == "__main__":
  app.run(main)
