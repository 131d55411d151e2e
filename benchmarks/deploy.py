"""What the students gain on a CPU through LiteRT: file size, latency, accuracy, side by side.

  python benchmarks/deploy.py [--workdir=workdir/distill] [--threads=1] [--export_dir=DIR]

The models, made the fast way through the library (the harness of the main
job, `examples/distill.py`, whose teacher it reuses from --workdir when it is
there, or trains, about 80 s):
  teacher   the main job's ResNet-20;
  k=0.5     ND+FT: every residual unit's k = 0.5 bottleneck solved exactly
            (the main job's ND, its students reused from --workdir), then
            fine-tuned by KD as the main job's ND+FT (3 epochs at most);
  s0.5, s0.7, 2:4  every convolution but the first, and not the classifier,
            its teacher layer with its smallest weights zeroed (exactly half,
            70%, or 2 of every 4 consecutive input channels) and the rest
            solved exactly (`nd.reconstruct(..., sparsity=...)` /
            `m_by_n=(2, 4)`, from every other position as the main
            job's solves), then `nd.calibrate_batch_norm`, as
            `examples/sparsify.py --solver=lstsq` makes them.
Each is exported with `keras_nd.lite.export_tflite`: float (the sparse
students with the sparse encoding, `sparse=True`, and without it), and the
teacher and k = 0.5 also with dynamic-range and int8 quantisation (int8
calibrated on 256 training images). For each file: its size, raw and
gzipped (level 9), its top-1 accuracy on the test split through the LiteRT
interpreter next to the Keras model's, and the median latency of one
`invoke` for one image and for a batch of 32 (random inputs: the time does
not depend on them), over --rounds rounds in which every file takes its turn,
so a busy machine slows all of them alike. Targets: the k = 0.5 student's
latency <= 0.6x the teacher's (both batch sizes); each sparse student's
gzipped float file <= (1 - sparsity + 0.1)x the teacher's (2:4 as 0.5).
Writes benchmarks/results/deploy.json and prints a markdown table.
"""

import gzip
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# TensorFlow's C++ log hidden, as in the binaries; TF_CPP_MIN_LOG_LEVEL=0 shows it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras_nd as nd  # noqa: E402
from keras_nd import files, layer_types, lite, metrics, search, sparsity  # noqa: E402
from keras_nd.experiments import common, distill  # noqa: E402
from keras_nd.experiments.harness import Experiment  # noqa: E402

FLAGS = flags.FLAGS
common.define_flags(workdir="workdir/distill")
flags.adopt_module_key_flags(common)
flags.DEFINE_integer("threads", 1, "CPU threads of every interpreter.")
flags.DEFINE_bool("xnnpack", True, "Run through LiteRT's default CPU delegate (XNNPACK); "
                  "--noxnnpack: its built-in kernels alone.")
flags.DEFINE_integer("rounds", 5, "Rounds of latency measurement (every file in each).")
flags.DEFINE_integer("single_runs", 100, "Timed single-image invokes per file and round.")
flags.DEFINE_integer("batch_runs", 8, "Timed batch-32 invokes per file and round.")
flags.DEFINE_string("export_dir", None, "Where the .tflite files go (default: a temporary "
                    "directory, removed afterwards).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "deploy.json"), "Where to write the results.")

BATCH = 32
REPRESENTATIVE_BATCHES = 2  # of the training pipeline's 128: 256 images
SPARSE = {"s0.5": {"sparsity": 0.5}, "s0.7": {"sparsity": 0.7}, "2:4": {"m_by_n": (2, 4)}}
# The sparsity each sparse student's size target counts (2:4 as 0.5).
SIZE_TARGETS = {"s0.5": 0.5, "s0.7": 0.7, "2:4": 0.5}


def make_models(experiment, say):
  """{name: Keras model} of the teacher and the four students, and the seconds each took."""
  seconds = {}
  start = time.perf_counter()
  teacher = experiment.teacher()
  seconds["teacher"] = time.perf_counter() - start
  start = time.perf_counter()
  student, *_ = experiment.nd(teacher, 0.5)
  experiment.fine_tune(teacher, student, experiment.epochs["ft"], experiment.learning_rate / 4)
  seconds["k0.5"] = time.perf_counter() - start
  say(f"  k=0.5 ND+FT in {seconds['k0.5']:.1f} s")
  made = {"teacher": teacher, "k0.5": student}
  layers = nd.split_layers(teacher, layer_types.PRUNABLE)
  pruned = sparsity.not_skipped(layers, (layers[0].nodes[0].layer.name,
                                         layers[-1].nodes[0].layer.name))
  source = nd.ActivationSource(teacher, pruned, experiment.train_plain)
  for name, solve in SPARSE.items():
    start = time.perf_counter()
    clones = {h: nd.students.clone(h) for h in pruned}
    # Every other position's statistics, as the main job's solves (a quarter of the time).
    nd.reconstruct(clones, source, errors=False,
                   subsample=experiment.solve_settings()["subsample"], **solve)
    made[name] = nd.compose(teacher, clones)
    nd.calibrate_batch_norm(made[name], experiment.train_plain, steps=experiment.steps_per_epoch)
    seconds[name] = time.perf_counter() - start
    say(f"  {name} solved in {seconds[name]:.1f} s")
  return made, seconds


def exports(made, directory, representative):
  """[{"model", "export", "path"}]: every file the benchmark measures, written."""
  plan = [("teacher", "float", {}), ("teacher", "dynamic", {"quantize": "dynamic"}),
          ("teacher", "int8", {"quantize": "int8", "representative": representative}),
          ("k0.5", "float", {}), ("k0.5", "dynamic", {"quantize": "dynamic"}),
          ("k0.5", "int8", {"quantize": "int8", "representative": representative})]
  for name in SPARSE:
    plan += [(name, "float", {}), (name, "float, dense encoding", {"sparse": False})]
  rows = []
  for name, export, kwargs in plan:
    path = os.path.join(directory, f"{name}-{export.replace(', ', '-')}.tflite".replace(
        ":", "by").replace(" ", "_"))
    start = time.perf_counter()
    lite.export_tflite(made[name], path, **kwargs)
    rows.append({"model": name, "export": export, "path": path,
                 "convert_s": time.perf_counter() - start})
  return rows


def _invoke_times(runner, runs):
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    runner.invoke()
    times.append(time.perf_counter() - start)
  return times


def latencies(rows, input_shape):
  """Adds each row's median single-image and batch-32 latency (ms), all files in turn."""
  rng = np.random.default_rng(0)
  runners = {}
  for i, row in enumerate(rows):
    for batch, runs in ((1, FLAGS.single_runs), (BATCH, FLAGS.batch_runs)):
      runner = lite.interpreter(row["path"], batch, FLAGS.threads, FLAGS.xnnpack)
      runner.set_tensor(runner.get_input_details()[0]["index"],
                        rng.normal(size=(batch,) + input_shape).astype(np.float32))
      _invoke_times(runner, 3)  # warm-up: first-run allocations, densifying sparse kernels
      runners[i, batch] = (runner, runs, [])
  for _ in range(FLAGS.rounds):
    for runner, runs, times in runners.values():
      times.extend(_invoke_times(runner, runs))
  for (i, batch), (_, _, times) in runners.items():
    rows[i][f"latency_ms_{batch}"] = 1e3 * statistics.median(times)


def measure(made, rows, test):
  keras_accuracy = {name: metrics.accuracy(model, test) for name, model in made.items()}
  for row in rows:
    with open(row["path"], "rb") as f:
      content = f.read()
    row.update(bytes=len(content), gzip_bytes=len(gzip.compress(content, 9)),
               densify_ops=lite.op_counts(row["path"]).get("DENSIFY", 0),
               params=made[row["model"]].count_params(), macs=search.flops(made[row["model"]]),
               keras_accuracy=keras_accuracy[row["model"]],
               accuracy=lite.evaluate_tflite(row["path"], test, num_threads=FLAGS.threads))


def targets(rows):
  by = {(r["model"], r["export"]): r for r in rows}
  teacher, student = by["teacher", "float"], by["k0.5", "float"]
  checks = {}
  for batch in (1, BATCH):
    ratio = student[f"latency_ms_{batch}"] / teacher[f"latency_ms_{batch}"]
    checks[f"k0.5 latency, batch {batch}"] = {"ratio": ratio, "target": 0.6, "met": ratio <= 0.6}
  for name, level in SIZE_TARGETS.items():
    for export in ("float", "float, dense encoding"):
      ratio = by[name, export]["gzip_bytes"] / teacher["gzip_bytes"]
      target = 1 - level + 0.1
      checks[f"{name} gzipped size ({export})"] = {"ratio": ratio, "target": target,
                                                   "met": ratio <= target}
  return checks


def table(rows, checks):
  base = next(r for r in rows if (r["model"], r["export"]) == ("teacher", "float"))
  lines = ["| model | export | params | MACs | Keras acc. | LiteRT acc. | bytes | gzip bytes "
           "(x teacher float) | 1 image ms (x) | batch 32 ms (x) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['export']} | {r['params']:,} | {r['macs'] / 1e6:.1f}M | "
        f"{100 * r['keras_accuracy']:.2f} | {100 * r['accuracy']:.2f} | {r['bytes']:,} | "
        f"{r['gzip_bytes']:,} ({r['gzip_bytes'] / base['gzip_bytes']:.2f}) | "
        f"{r['latency_ms_1']:.2f} ({r['latency_ms_1'] / base['latency_ms_1']:.2f}) | "
        f"{r['latency_ms_32']:.1f} ({r['latency_ms_32'] / base['latency_ms_32']:.2f}) |")
  lines.append("")
  lines += [f"- {name}: {c['ratio']:.2f} (target <= {c['target']:.2f}) "
            f"{'met' if c['met'] else 'NOT met'}" for name, c in checks.items()]
  return "\n".join(lines)


def main(argv):
  del argv
  common.quiet_logs()
  start = time.perf_counter()
  load = os.getloadavg()
  config = distill.Config(epochs={"teacher": FLAGS.teacher_epochs},
                          **common.settings_from_flags(FLAGS))
  data = common.dataset_from_flags(FLAGS)
  experiment = Experiment(data, FLAGS.workdir, config, config.epochs)
  made, seconds = make_models(experiment, experiment.say)
  with tempfile.TemporaryDirectory(prefix="keras_nd_deploy_") as scratch:
    directory = FLAGS.export_dir or scratch
    os.makedirs(directory, exist_ok=True)
    rows = exports(made, directory, experiment.train_plain.take(REPRESENTATIVE_BATCHES))
    experiment.say(f"  {len(rows)} files exported in {sum(r['convert_s'] for r in rows):.1f} s")
    measure(made, rows, experiment.test)
    latencies(rows, tuple(data.input_shape))
  for row in rows:
    row["path"] = os.path.basename(row["path"])
  checks = targets(rows)
  results = {"config": {name: FLAGS[name].value for name in (
                 "workdir", "dataset", "teacher", "threads", "xnnpack", "rounds", "single_runs",
                 "batch_runs")},
             "teacher_key": experiment.key, "cpus": os.cpu_count(),
             "load_average_before": load, "load_average_after": os.getloadavg(),
             "seconds": dict(seconds, total=time.perf_counter() - start),
             "rows": rows, "targets": checks}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  files.write_json(FLAGS.out, results)
  print(table(rows, checks))
  print(f"Results written to {FLAGS.out} ({results['seconds']['total']:.0f} s).")


if __name__ == "__main__":
  app.run(main)
