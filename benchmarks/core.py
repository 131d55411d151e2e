"""The core performance ratios of keras_nd, measured side by side in one run.

  python benchmarks/core.py [--examples=4096] [--repeats=3] [--cache_dir=...]

P1  building the activation cache of ALL neighbourhoods of a ResNet-20 teacher
    (one ActivationSource, float16) / one plain teacher inference pass over the
    same batched dataset (the faster of `model.predict` and a compiled
    tf.function loop).                                          target <= 1.3
P2  steps/s of cache-fed NeighbourhoodDistiller training of one mid unit
    (bottleneck k=0.5 of stage1_unit2) / steps/s of plain `model.fit` of an
    identical fresh student on in-memory numpy arrays of the same
    activations (MSE, same optimizer and batch size).           target >= 0.9
    The cache is that unit's own (`ActivationSource(teacher, [unit], ...)`:
    on disk exactly what the numpy arrays hold), served with the default
    `shuffle_bytes` (256 MiB: this unit's 4096 examples, 256 MiB in float16,
    fit, so they are read once and kept). Extra rows, same target:
      P2s  shuffle_bytes=32 MiB, less than the data, so every epoch streams
           from the cache files (as with real data sets: CIFAR-10's 50k
           examples are 3.2 GB for this unit);
      P2*  fed from P1's cache of all neighbourhoods, which stores 3.3x the
           bytes this unit needs.
P4  the exact solver: `reconstruct` of the 9 units' k=0.5 students (teacher
    channels chosen greedily in the solve, from an online source: the
    teacher pass, the statistics and every solve) / one teacher inference
    pass.                                                       target <= 2
      P4s  the same with subsample=2 (the main job's setting).
    And its peak memory (maximum resident set of a process doing only the
    solve, data generated batch by batch) at --examples and 4x as many.
P3  fused training of all 9 unit neighbourhoods in one distiller for S steps
    / 9 sequential one-neighbourhood distillers of S steps each, all fed from
    P1's cache, default shuffle_bytes (the fused run's 800 MB stream from the
    files, each single unit's data fits and is kept).           target <= 0.8
      P3s  the same with shuffle_bytes=32 MiB: every run streams.

Every measurement is warmed up first (tracing excluded) and repeated; within a
repeat the compared runs alternate, so a busy machine slows both sides alike.
Medians are reported. The "cpu ratio" column is the same ratio computed from
this process's CPU seconds (all threads) instead of wall time: the work each
side costs, which other processes on the machine disturb much less. The
teacher is untrained (timing does not depend on the weights) and the data
random, held in memory with a known size (so no counting pass is needed).
Writes benchmarks/results/core.json with the configuration and raw timings.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# TensorFlow's C++ log hidden, as in the binaries (a run printed 'Tensor RefCount' notes by the
# thousand); TF_CPP_MIN_LOG_LEVEL=0 shows it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras_nd as nd  # noqa: E402
from keras_nd import models  # noqa: E402
from keras_nd._keras import keras, tf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 4096, "Images in the dataset (a multiple of the batch sizes).")
flags.DEFINE_integer("infer_batch", 256, "Batch size of the teacher passes (and records_batch).")
flags.DEFINE_integer("train_batch", 128, "Batch size of all training runs.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions of each P1 measurement (median taken).")
flags.DEFINE_integer("p2_epochs", 4, "P2 epochs per run; the first (tracing) is not timed.")
flags.DEFINE_integer("p2_repeats", 2, "P2 runs of each side (median of steps/s taken).")
flags.DEFINE_integer("p3_steps", 8, "P3 steps per epoch.")
flags.DEFINE_integer("p3_epochs", 3, "P3 epochs per fit; the first (tracing) is not timed.")
flags.DEFINE_integer("p3_repeats", 2, "P3 runs of each side (median taken).")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate of every training run.")
flags.DEFINE_string("cache_dir", None, "Where to build the activation cache (default: a temporary "
                    "directory, removed afterwards).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "core.json"), "Where to write the results.")
flags.DEFINE_integer("seed", 0, "Seed of the data and the models.")
flags.DEFINE_list("parts", ["P1", "P2", "P3", "P4"], "Which measurements to run.")
flags.DEFINE_integer("p4_repeats", 3, "P4 timed runs of each side (median taken).")
flags.DEFINE_integer("solve_only", 0, "Internal: run one solve with this subsample and print the "
                     "peak memory (P4's memory rows).")

TARGETS = {"P1": ("<=", 1.3), "P2": (">=", 0.9), "P2s": (">=", 0.9), "P2*": (">=", 0.9),
           "P3": ("<=", 0.8), "P3s": ("<=", 0.8), "P4": ("<=", 2.0), "P4s": ("<=", 2.0)}
# The shuffle budget of the "streamed" rows: below what any run serves (64 MiB per epoch for the
# smallest unit), so every epoch reads the cache files.
STREAMED_SHUFFLE_BYTES = 32 * 2**20
ROWS = (("P1", "cache build / teacher pass"), ("P2", "distiller / keras-numpy steps/s"),
        ("P2s", "same, streamed (data > shuffle_bytes)"),
        ("P2*", "same, from P1's all-hoods cache"), ("P3", "fused / sequential"),
        ("P3s", "same, streamed (shuffle_bytes=32 MiB)"), ("P4", "exact solve / teacher pass"),
        ("P4s", "same, subsample=2"))
UNIT = "stage1_unit2_out"
K = 0.5


def _cpu_s():
  times = os.times()
  return times.user + times.system


def _timed(fn):
  """(wall seconds, CPU seconds of this process, all threads) of fn(), from a quiet disk.

  os.sync() first (not timed) so that no measurement waits on the write-back of an earlier one.
  """
  os.sync()
  start, cpu = time.perf_counter(), _cpu_s()
  fn()
  return time.perf_counter() - start, _cpu_s() - cpu


class _EpochTimer(keras.callbacks.Callback):
  """Wall and CPU time of every epoch after the first (the first traces the step)."""

  def __init__(self):
    super().__init__()
    self.times = []
    self.cpu = 0.0
    self._start = None

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter(), _cpu_s()

  def on_epoch_end(self, epoch, logs=None):
    if epoch > 0:
      self.times.append(time.perf_counter() - self._start[0])
      self.cpu += _cpu_s() - self._start[1]


def _optimizer():
  return keras.optimizers.Adam(FLAGS.lr)


# --- P1: cache build vs one teacher inference pass --------------------------------------------

def bench_cache_build(teacher, hoods, dataset, cache_dir):
  infer = tf.function(lambda x: teacher(x, training=False))

  def loop():
    for x in dataset:
      infer(x)

  def predict():
    teacher.predict(dataset, verbose=0)

  def build():
    nd.ActivationSource(teacher, hoods, dataset, cache_dir=cache_dir, dtype="float16",
                        records_batch=FLAGS.infer_batch, verbose=0)

  def fresh_build():
    shutil.rmtree(cache_dir, ignore_errors=True)  # not timed
    return _timed(build)

  # Warm-up: traces the loop, predict and the cache extractor (sources of one teacher share it).
  loop()
  predict()
  cold_build = fresh_build()
  runs = {"loop": [], "predict": [], "build": []}
  for _ in range(FLAGS.repeats):
    runs["loop"].append(_timed(loop))
    runs["build"].append(fresh_build())
    runs["predict"].append(_timed(predict))
  wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
  cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
  baseline = min(("loop", "predict"), key=wall.get)
  return {
      "ratio": wall["build"] / wall[baseline],
      "measured_s": wall["build"],
      "baseline_s": wall[baseline],
      "baseline": baseline,
      # CPU seconds of this process (all threads; not the kernel's background writeback): how
      # much work the build adds, whatever else runs on the machine.
      "cpu_ratio": cpu["build"] / cpu[baseline],
      "cold_build_s": cold_build[0],
      "wall_s": {k: [w for w, _ in v] for k, v in runs.items()},
      "cpu_s": {k: [c for _, c in v] for k, v in runs.items()},
  }


# --- P2: one neighbourhood, cache-fed distiller vs keras fit on numpy ---------------------------

def _arrays(source, hood):
  a, t = [], []
  for batch in source.dataset(batch_size=FLAGS.infer_batch, shuffle=False):
    a.append(batch[hood.name][0].numpy())
    t.append(batch[hood.name][1].numpy())
  return np.concatenate(a), np.concatenate(t)


def _steps_per_s(timer, steps_per_epoch):
  return steps_per_epoch * len(timer.times) / sum(timer.times)


def bench_one_hood(teacher, hood, dataset, own_cache_dir, shared_cache_dir):
  """Results of P2, P2s and P2*."""
  own = nd.ActivationSource(teacher, [hood], dataset, cache_dir=own_cache_dir, verbose=0)
  shared = nd.ActivationSource(teacher, [hood], dataset, cache_dir=shared_cache_dir, verbose=0)
  a, t = _arrays(own, hood)
  steps = len(a) // FLAGS.train_batch
  runs = {"P2": (own, {}), "P2s": (own, {"shuffle_bytes": STREAMED_SHUFFLE_BYTES}),
          "P2*": (shared, {})}

  def distiller_run(source, kwargs):
    distiller = nd.NeighbourhoodDistiller({hood: nd.students.bottleneck(hood, k=K)},
                                          calibrate_steps=0)
    distiller.compile(optimizer=_optimizer())
    timer = _EpochTimer()
    data = source.dataset(batch_size=FLAGS.train_batch, shuffle=True, seed=FLAGS.seed, **kwargs)
    distiller.fit(data, epochs=FLAGS.p2_epochs, callbacks=[timer], verbose=0)
    return timer

  def keras_run():
    student = nd.students.bottleneck(hood, k=K)
    student.compile(optimizer=_optimizer(), loss="mse")
    timer = _EpochTimer()
    student.fit(a, t, batch_size=FLAGS.train_batch, shuffle=True, epochs=FLAGS.p2_epochs,
                callbacks=[timer], verbose=0)
    return timer

  timers = {"keras_numpy": [], **{name: [] for name in runs}}
  for _ in range(FLAGS.p2_repeats):
    timers["keras_numpy"].append(keras_run())
    for name, (source, kwargs) in runs.items():
      timers[name].append(distiller_run(source, kwargs))
  rates = {k: [_steps_per_s(timer, steps) for timer in v] for k, v in timers.items()}
  # CPU seconds per step: the work a step costs, whatever else runs on the machine.
  cpu = {k: statistics.median(timer.cpu / (steps * len(timer.times)) for timer in v)
         for k, v in timers.items()}
  medians = {k: statistics.median(v) for k, v in rates.items()}
  return {name: {
      "ratio": medians[name] / medians["keras_numpy"],
      "measured_steps_per_s": medians[name],
      "baseline_steps_per_s": medians["keras_numpy"],
      "cpu_ratio": cpu["keras_numpy"] / cpu[name],
      "cpu_ms_per_step": {"distiller": 1e3 * cpu[name], "keras_numpy": 1e3 * cpu["keras_numpy"]},
      "steps_per_epoch": steps,
      "dataset_kwargs": kwargs,
      "steps_per_s": {"distiller": rates[name], "keras_numpy": rates["keras_numpy"]},
  } for name, (_, kwargs) in runs.items()}


# --- P3: fused vs sequential training of all unit neighbourhoods ---------------------------------

def _fit_distiller(teacher, unit_hoods, dataset, cache_dir, **dataset_kwargs):
  """(wall, CPU) seconds of the timed epochs of one distiller over `unit_hoods`."""
  source = nd.ActivationSource(teacher, unit_hoods, dataset, cache_dir=cache_dir, verbose=0)
  distiller = nd.NeighbourhoodDistiller({h: nd.students.bottleneck(h, k=K) for h in unit_hoods},
                                        calibrate_steps=0)
  distiller.compile(optimizer=_optimizer())
  timer = _EpochTimer()
  data = source.dataset(batch_size=FLAGS.train_batch, shuffle=True, seed=FLAGS.seed,
                        **dataset_kwargs).repeat()
  distiller.fit(data, epochs=FLAGS.p3_epochs, steps_per_epoch=FLAGS.p3_steps, callbacks=[timer],
                verbose=0)
  return sum(timer.times), timer.cpu


def bench_fused(teacher, unit_hoods, dataset, cache_dir, **dataset_kwargs):
  runs = {"fused": [], "sequential": []}
  parts = []
  for _ in range(FLAGS.p3_repeats):
    parts.append([_fit_distiller(teacher, [h], dataset, cache_dir, **dataset_kwargs)
                  for h in unit_hoods])
    runs["sequential"].append(tuple(map(sum, zip(*parts[-1]))))
    runs["fused"].append(_fit_distiller(teacher, unit_hoods, dataset, cache_dir,
                                        **dataset_kwargs))
  wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
  cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
  return {
      "ratio": wall["fused"] / wall["sequential"],
      "measured_s": wall["fused"],
      "baseline_s": wall["sequential"],
      "cpu_ratio": cpu["fused"] / cpu["sequential"],
      "timed_steps": FLAGS.p3_steps * (FLAGS.p3_epochs - 1),
      "dataset_kwargs": dataset_kwargs,
      "wall_s": {k: [w for w, _ in v] for k, v in runs.items()},
      "cpu_s": {k: [c for _, c in v] for k, v in runs.items()},
      "sequential_parts_wall_s": [dict(zip([h.name for h in unit_hoods], [w for w, _ in p]))
                                  for p in parts],
  }


# --- P4: the exact solver vs one teacher inference pass -----------------------------------------

def _solve(teacher, unit_hoods, dataset, subsample):
  students = {h: nd.students.bottleneck(h, K, init="teacher") for h in unit_hoods}
  source = nd.ActivationSource(teacher, unit_hoods, dataset, verbose=0)  # online
  return lambda: nd.reconstruct(students, source, errors=False, channels="greedy",
                                subsample=subsample)


def bench_solver(teacher, unit_hoods, dataset):
  infer = tf.function(lambda x: teacher(x, training=False))

  def teacher_pass():
    for x in dataset:
      infer(x).numpy()

  teacher_pass()  # traced
  results = {}
  for key, subsample in (("P4", 1), ("P4s", 2)):
    _solve(teacher, unit_hoods, dataset, subsample)()  # warm: the first solve of a process
    runs = {"measured": [], "baseline": []}
    for _ in range(FLAGS.p4_repeats):  # alternating: a busy machine slows both alike
      runs["measured"].append(_timed(_solve(teacher, unit_hoods, dataset, subsample)))
      runs["baseline"].append(_timed(teacher_pass))
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    results[key] = {"measured_s": wall["measured"], "baseline_s": wall["baseline"],
                    "ratio": wall["measured"] / wall["baseline"],
                    "cpu_ratio": cpu["measured"] / cpu["baseline"], "runs": runs,
                    "peak_rss_mib": {n: _peak_memory(n, subsample) for n in
                                     (FLAGS.examples, 4 * FLAGS.examples)}}
  return results


def _peak_memory(examples, subsample):
  """The peak resident memory (MiB) of a process that only solves, over `examples` images."""
  done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--examples={examples}",
                         f"--solve_only={subsample}", f"--seed={FLAGS.seed}"],
                        capture_output=True, text=True, check=True)
  return float(done.stdout.strip().splitlines()[-1])


def _solve_only():
  """One solve over generated batches (nothing held in memory); prints the peak RSS in MiB."""
  keras.utils.set_random_seed(FLAGS.seed)
  teacher = models.resnet_v1(depth=20)
  unit_hoods = [h for h in nd.split(teacher) if "_unit" in h.name]
  batch = FLAGS.infer_batch
  dataset = tf.data.Dataset.range(FLAGS.examples // batch).map(
      lambda i: tf.random.stateless_normal([batch, 32, 32, 3], seed=tf.stack([i, FLAGS.seed])))
  _solve(teacher, unit_hoods, dataset, FLAGS.solve_only)()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _passes(key, value):
  op, target = TARGETS[key]
  return value <= target if op == "<=" else value >= target


def main(argv):
  del argv
  if FLAGS.solve_only:
    _solve_only()
    return
  batch = FLAGS.infer_batch
  if FLAGS.examples % batch or FLAGS.examples % FLAGS.train_batch:
    raise app.UsageError(f"--examples must be a multiple of {batch} and {FLAGS.train_batch}.")
  keras.utils.set_random_seed(FLAGS.seed)
  teacher = models.resnet_v1(depth=20)
  hoods = nd.split(teacher)
  unit_hoods = [h for h in hoods if "_unit" in h.name]
  hood = next(h for h in hoods if h.name == UNIT)
  images = np.random.RandomState(FLAGS.seed).normal(
      size=(FLAGS.examples, 32, 32, 3)).astype("float32")
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch)

  load_start = os.getloadavg()
  workdir = FLAGS.cache_dir or tempfile.mkdtemp(prefix="keras_nd_bench_")
  shared_cache = os.path.join(workdir, "all_hoods")
  start = time.perf_counter()
  results = {}
  try:
    if "P1" in FLAGS.parts:
      results["P1"] = bench_cache_build(teacher, hoods, dataset, shared_cache)
      print(f"P1 done ({time.perf_counter() - start:.0f}s)", flush=True)
    elif {"P2", "P3"} & set(FLAGS.parts):  # P2* and P3 read the cache of all neighbourhoods
      nd.ActivationSource(teacher, hoods, dataset, cache_dir=shared_cache, verbose=0)
    if "P2" in FLAGS.parts:
      results.update(bench_one_hood(teacher, hood, dataset, os.path.join(workdir, UNIT),
                                    shared_cache))
      print(f"P2 done ({time.perf_counter() - start:.0f}s)", flush=True)
    if "P3" in FLAGS.parts:
      results["P3"] = bench_fused(teacher, unit_hoods, dataset, shared_cache)
      results["P3s"] = bench_fused(teacher, unit_hoods, dataset, shared_cache,
                                   shuffle_bytes=STREAMED_SHUFFLE_BYTES)
      print(f"P3 done ({time.perf_counter() - start:.0f}s)", flush=True)
    if "P4" in FLAGS.parts:
      results.update(bench_solver(teacher, unit_hoods, dataset))
      print(f"P4 done ({time.perf_counter() - start:.0f}s)", flush=True)
  finally:
    if FLAGS.cache_dir is None:
      shutil.rmtree(workdir, ignore_errors=True)

  print(f"\n{'':5}{'ratio':38}{'target':>8}{'measured':>10}  {'pass?':6}{'cpu ratio':>10}  "
        "absolute (median)")
  for key, name in ROWS:
    if key not in results:
      continue
    r = results[key]
    if "measured_s" in r:
      absolute = f"{r['measured_s']:.2f}s / {r['baseline_s']:.2f}s"
    else:
      absolute = f"{r['measured_steps_per_s']:.2f} / {r['baseline_steps_per_s']:.2f} steps/s"
    if key == "P1":
      absolute += f" ({r['baseline']})"
    op, target = TARGETS[key]
    ratio = results[key]["ratio"]
    results[key]["target"] = f"{op} {target}"
    results[key]["pass"] = _passes(key, ratio)
    print(f"{key:5}{name:38}{op + ' ' + str(target):>8}{ratio:>10.3f}  "
          f"{'yes' if results[key]['pass'] else 'NO':6}{r['cpu_ratio']:>10.3f}  {absolute}")
    if "peak_rss_mib" in r:
      print(f"{'':5}peak memory of the solve alone: " + ", ".join(
          f"{mib:.0f} MiB at {n} images" for n, mib in r["peak_rss_mib"].items()))
  print(f"total {time.perf_counter() - start:.0f}s")

  config = {name: FLAGS[name].value for name in (
      "examples", "infer_batch", "train_batch", "repeats", "p2_epochs", "p2_repeats", "p3_steps",
      "p3_epochs", "p3_repeats", "p4_repeats", "lr", "seed", "parts")}
  config.update(teacher="resnet_v1(depth=20), untrained", unit=UNIT, k=K, dtype="float16",
                cpus=os.cpu_count(), tensorflow=tf.__version__, load_average_start=load_start,
                load_average_end=os.getloadavg(), shuffle_bytes_streamed=STREAMED_SHUFFLE_BYTES)
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"config": config, "results": results}, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
