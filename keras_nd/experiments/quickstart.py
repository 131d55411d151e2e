"""The quick-start job: teacher, split, cache, distil, compose, fine-tune, on generated data."""

import os
import time

import keras_nd as nd
from keras_nd import data, files, models
from keras_nd._keras import keras, tf
from keras_nd.experiments.common import write_results


def _accuracy(model, x, y):
  logits = model.predict(x, batch_size=256, verbose=0)
  return float((logits.argmax(-1) == y).mean())


def run(workdir, num_train=2000, num_test=500, depth=8, k=0.5, teacher_epochs=8, nd_epochs=4,
        ft_epochs=2, batch_size=64, seed=0, verbose=1):
  """Runs neighbourhood distillation end to end and writes `quickstart_results.json` in `workdir`.

  Trains a ResNet teacher on `keras_nd.data.synthetic_images` (or reuses the
  one saved in `workdir`), splits it, caches its activations, distils a
  bottleneck-k student for every residual unit concurrently, composes them
  and fine-tunes the result with knowledge distillation.

  Args:
    workdir: directory for the teacher, the activation cache, the student
      and quickstart_results.json.
    num_train, num_test: sizes of the generated dataset.
    depth: ResNet depth (6n+2).
    k: bottleneck multiplier of the students.
    teacher_epochs, nd_epochs, ft_epochs: training lengths.
    batch_size: batch size everywhere.
    seed: seed of the data and the models.
    verbose: 0 silent, 1 progress and a summary table.

  Returns:
    The results dict written to quickstart_results.json.
  """
  files.writable_directory(workdir, "work directory")
  config = dict(num_train=num_train, num_test=num_test, depth=depth, k=k,
                teacher_epochs=teacher_epochs, nd_epochs=nd_epochs, ft_epochs=ft_epochs,
                batch_size=batch_size, seed=seed)
  keras.utils.set_random_seed(seed)
  (x_train, y_train), (x_test, y_test) = data.synthetic_images(num_train, num_test, seed=seed)
  fit_verbose = 2 if verbose else 0
  seconds = {}

  teacher_path = os.path.join(workdir, "teacher.keras")
  start = time.time()
  if os.path.exists(teacher_path):
    teacher = files.load_model(teacher_path)
  else:
    teacher = models.resnet_v1(depth=depth, input_shape=x_train.shape[1:], num_classes=10)
    teacher.compile(keras.optimizers.Adam(2e-3),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    teacher.fit(x_train, y_train, batch_size=batch_size, epochs=teacher_epochs,
                verbose=fit_verbose)
    files.save_model(teacher_path, teacher)
  seconds["teacher"] = time.time() - start

  hoods = nd.split(teacher)
  units = hoods[1:-1]
  start = time.time()
  source = nd.ActivationSource(teacher, units, tf.data.Dataset.from_tensor_slices(x_train),
                               cache_dir=os.path.join(workdir, "cache"), verbose=verbose)
  seconds["cache"] = time.time() - start

  start = time.time()
  distiller = nd.NeighbourhoodDistiller({h: nd.students.bottleneck(h, k) for h in units})
  distiller.compile(keras.optimizers.Adam(2e-3))
  history = distiller.fit(source.dataset(batch_size, seed=seed), epochs=nd_epochs,
                          verbose=fit_verbose)
  seconds["nd"] = time.time() - start
  student = nd.compose(teacher, distiller.students)
  accuracy_nd = _accuracy(student, x_test, y_test)

  start = time.time()
  kd = nd.KnowledgeDistiller(teacher=teacher, student=student, temperature=2.5, label_weight=1.0)
  kd.compile(keras.optimizers.Adam(5e-4), metrics=["accuracy"])
  kd.fit(x_train, y_train, batch_size=batch_size, epochs=ft_epochs, verbose=fit_verbose)
  seconds["fine_tune"] = time.time() - start
  student_path = os.path.join(workdir, "student.keras")
  kd.save(student_path)

  results = {
      "config": config,
      "teacher": {"params": teacher.count_params(), "accuracy": _accuracy(teacher, x_test, y_test)},
      "student": {"params": student.count_params(), "accuracy_nd": accuracy_nd,
                  "accuracy_nd_ft": _accuracy(student, x_test, y_test), "path": student_path},
      "neighbourhood_loss": {h.name: [float(v) for v in history.history[f"{h.name}_loss"]]
                             for h in units},
      "seconds": seconds,
  }
  path = write_results(workdir, results, "quickstart")
  if verbose:
    print(summary(results))
    print(f"Results written to {path}")
  return results


def summary(results):
  """A small table of the results."""
  t, s = results["teacher"], results["student"]
  lines = [f"{'model':<22}{'params':>10}{'accuracy':>10}",
           f"{'teacher':<22}{t['params']:>10}{t['accuracy']:>10.3f}",
           f"{'student, ND':<22}{s['params']:>10}{s['accuracy_nd']:>10.3f}",
           f"{'student, ND+FT':<22}{s['params']:>10}{s['accuracy_nd_ft']:>10.3f}"]
  lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
  return "\n".join(lines)
