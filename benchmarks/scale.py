"""Scale-out ratios of neighbourhood distillation, measured side by side in one run.

  python benchmarks/scale.py [--examples=2048] [--epochs=2] [--repeats=2]

Every variant distils the same 9 residual units of a ResNet-20 teacher (k=0.5
bottleneck students, `keras_nd.artefacts.distil`) from one activation cache
built beforehand, and is timed as whole processes, start-up included (what a
user waits for):

  one job        one process, all 9 units fused in one distiller;
  2 jobs         two processes at once (--shard 0/2 and 1/2), until both end;
  sequential     one process, the 9 units one after another (9 distillers);
  placed         one process with 2 logical CPU devices, the units spread over
                 them (NeighbourhoodDistiller(devices=...), model parallel).

Reported: the speed-up of 2 jobs over one (one / 2 jobs), fused over
sequential (sequential / one), and placed over one (one / placed); and, from
each job's own log, the seconds spent training (without start-up). Within a
repeat the variants run back to back; medians over repeats. The teacher is
untrained and the images random (timing does not depend on them). Writes
benchmarks/results/scale.json.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("examples", 2048, "Images in the dataset.")
flags.DEFINE_integer("epochs", 2, "Distillation epochs of every variant.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions of every variant (median taken).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "scale.json"), "Where to write the results.")
# A child process (one job of a variant):
flags.DEFINE_string("job", None, "Internal: run one job over this shard ('i/n') and exit.")
flags.DEFINE_string("workdir", None, "Internal: the teacher, images and cache of the run.")
flags.DEFINE_string("students", None, "Internal: where the job's students go.")
flags.DEFINE_enum("mode", "fused", ["fused", "sequential", "placed"], "Internal: how the job "
                  "trains its units.")

VARIANTS = ("one job", "2 jobs", "sequential", "placed")
K = 0.5


def _units(nd, teacher):
  return [h for h in nd.split(teacher) if "_unit" in h.name]


def child():
  """One job: distils its shard of the units, prints its training seconds as JSON."""
  if FLAGS.mode == "placed":  # before TensorFlow initialises its devices
    from keras_nd._keras import tf  # pylint: disable=g-import-not-at-top
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  import functools  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  import keras_nd as nd  # pylint: disable=g-import-not-at-top
  from keras_nd import artefacts, models  # pylint: disable=g-import-not-at-top
  from keras_nd._keras import keras, tf  # pylint: disable=g-import-not-at-top

  del models  # imported for its layers, which the saved teacher uses
  teacher = keras.models.load_model(os.path.join(FLAGS.workdir, "teacher.keras"), safe_mode=True)
  images = np.load(os.path.join(FLAGS.workdir, "images.npy"), allow_pickle=False)
  units = _units(nd, teacher)
  source = nd.ActivationSource(teacher, units, tf.data.Dataset.from_tensor_slices(images),
                               cache_dir=os.path.join(FLAGS.workdir, "cache"), verbose=0)
  candidates = {f"k{K:g}": functools.partial(nd.students.bottleneck, k=K)}
  settings = dict(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, verbose=0)
  mine = artefacts.shard(units, FLAGS.job)
  start = time.perf_counter()
  if FLAGS.mode == "sequential":
    for unit in mine:
      artefacts.distil(teacher, [unit], candidates, source, FLAGS.students, **settings)
  else:
    devices = ["/cpu:0", "/cpu:1"] if FLAGS.mode == "placed" else None
    artefacts.distil(teacher, mine, candidates, source, FLAGS.students, devices=devices,
                     **settings)
  print(json.dumps({"train_s": time.perf_counter() - start}))


def _start(workdir, students, shard, mode):
  return subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f"--job={shard}", f"--workdir={workdir}",
       f"--students={students}", f"--mode={mode}", f"--epochs={FLAGS.epochs}",
       f"--batch_size={FLAGS.batch_size}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _variant(workdir, name):
  """(wall seconds of the variant, training seconds of each of its jobs)."""
  students = tempfile.mkdtemp(prefix="students_", dir=workdir)
  jobs = {"one job": [("0/1", "fused")], "2 jobs": [("0/2", "fused"), ("1/2", "fused")],
          "sequential": [("0/1", "sequential")], "placed": [("0/1", "placed")]}[name]
  os.sync()
  start = time.perf_counter()
  running = [_start(workdir, students, shard, mode) for shard, mode in jobs]
  outputs = [job.communicate() for job in running]
  wall = time.perf_counter() - start
  for job, (out, err) in zip(running, outputs):
    if job.returncode:
      raise RuntimeError(f"The {name!r} job failed:\n{err[-3000:]}")
  shutil.rmtree(students)
  return wall, [json.loads(out.strip().splitlines()[-1])["train_s"] for out, _ in outputs]


def main(argv):
  del argv
  if FLAGS.job:
    child()
    return
  import numpy as np  # pylint: disable=g-import-not-at-top

  import keras_nd as nd  # pylint: disable=g-import-not-at-top
  from keras_nd import models  # pylint: disable=g-import-not-at-top
  from keras_nd._keras import keras, tf  # pylint: disable=g-import-not-at-top

  workdir = tempfile.mkdtemp(prefix="keras_nd_scale_")
  try:
    keras.utils.set_random_seed(0)
    teacher = models.resnet_v1(depth=20)
    teacher.save(os.path.join(workdir, "teacher.keras"))
    images = np.random.RandomState(0).normal(size=(FLAGS.examples, 32, 32, 3)).astype("float32")
    np.save(os.path.join(workdir, "images.npy"), images)
    nd.ActivationSource(teacher, _units(nd, teacher), tf.data.Dataset.from_tensor_slices(images),
                        cache_dir=os.path.join(workdir, "cache"), verbose=0)
    load_start = os.getloadavg()
    walls = {name: [] for name in VARIANTS}
    train = {name: [] for name in VARIANTS}
    for repeat in range(FLAGS.repeats):
      for name in VARIANTS:
        wall, seconds = _variant(workdir, name)
        walls[name].append(wall)
        train[name].append(seconds)
        print(f"repeat {repeat + 1}: {name:<11} {wall:6.1f}s  (training "
              f"{', '.join(f'{s:.1f}s' for s in seconds)})", flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  median = {name: statistics.median(values) for name, values in walls.items()}
  ratios = {"2 jobs over one job": median["one job"] / median["2 jobs"],
            "fused over sequential": median["sequential"] / median["one job"],
            "placed over one job": median["one job"] / median["placed"]}
  print("\nspeed-up (median wall, whole processes)")
  for name, value in ratios.items():
    print(f"  {name:<24}{value:6.2f}x")
  print("median wall: " + ", ".join(f"{name} {value:.1f}s" for name, value in median.items()))
  config = {name: FLAGS[name].value for name in ("examples", "epochs", "batch_size", "repeats")}
  config.update(teacher="resnet_v1(depth=20), untrained", units=9, k=K, cpus=os.cpu_count(),
                tensorflow=tf.__version__, load_average_start=load_start,
                load_average_end=os.getloadavg())
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"config": config, "wall_s": walls, "train_s": train, "speedup": ratios}, f,
              indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
