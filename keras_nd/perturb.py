"""The thresholding effect: how much error a trained model's neighbourhoods tolerate.

Neighbourhood Distillation works because a trained network absorbs small errors
in the outputs of its neighbourhoods: accuracy holds until the error passes a
threshold, which falls as more neighbourhoods are perturbed together (Shao et
al., arXiv:2010.01189, Fig. 1 and App. B.1). This module measures that
tolerance and checks distilled students against it:

* `with_output_noise` and `output_sweep`: Gaussian noise added to the outputs
  of neighbourhoods (each alone, all at once, or the first 1, 2, ..., n), at
  inference, through `keras_nd.substitute`;
* `weight_sweep`: noise on the kernels, layer by layer and cumulatively,
  against the prediction that the drops add up (Fig. 4).

`keras_nd.tolerance` reads the thresholds off a sweep and checks each
student's relative error against its neighbourhood's.

Amplitudes. Output noise is absolute (standard deviation `epsilon`) or
*relative*: `epsilon` times the neighbourhood's clean output RMS, i.e.
`sqrt(mean(T_i(a)^2))` over all examples and elements (`output_rms`). A
student's error amplitude in `tolerance.diagnose` is `RMS(S_i(a) - T_i(a)) /
RMS(T_i(a))`, a relative amplitude on the same scale, so thresholds from a
relative `output_sweep` compare with it directly. Weight noise is relative to
each kernel's own standard deviation.

```python
teacher_accuracy = metrics.accuracy(teacher, validation)
rows = perturb.output_sweep(teacher, hoods, validation, [0.0, 0.1, 0.3, 1.0], relative=True)
thresholds = tolerance.thresholds_from_sweep(rows, teacher_accuracy, drop=0.01)
print(tolerance.format_diagnosis(tolerance.diagnose(teacher, students, validation, thresholds)))
```
"""

import math

import numpy as np

from keras_nd import _checks, graph, keras3, layer_types, metrics
from keras_nd._keras import keras, tf
from keras_nd.activations import ActivationSource
from keras_nd.neighbourhood import checked_hoods

__all__ = ["OutputNoise", "output_rms", "output_sweep", "weight_sweep", "with_output_noise"]

_MODES = ("each", "all", "cumulative")


class OutputNoise(keras.layers.Layer):
  """Adds Gaussian noise of a set standard deviation to its input, in training and inference alike.

  The noise is a function of (`seed`, `stream`, number of calls so far):
  two layers with the same seed and stream draw the same noise on their n-th
  call, and every call draws afresh (batches of one evaluation get
  independent noise). The standard deviation and the seed are variables, so
  a traced model is re-used for every amplitude and seed; `reset` sets them
  and restarts the call count.

  Args:
    stddev: the noise's standard deviation (>= 0).
    seed: an integer seed.
    stream: an integer telling apart layers of one model that share a seed
      (`with_output_noise` uses the neighbourhood's index).
    **kwargs: passed on to `keras.layers.Layer`.
  """

  def __init__(self, stddev=0.0, seed=0, stream=0, **kwargs):
    super().__init__(**kwargs)
    self._initial_stddev = float(stddev)
    self._initial_seed = int(seed)
    self.stream = int(stream)

  def build(self, input_shape):
    self.stddev = self.add_weight(
        "stddev", shape=(), dtype=tf.float32, trainable=False,
        initializer=keras.initializers.Constant(self._initial_stddev))
    self.seed = self.add_weight("seed", shape=(), dtype=tf.int64, trainable=False,
                                initializer=keras.initializers.Constant(self._initial_seed))
    self.calls = self.add_weight("calls", shape=(), dtype=tf.int64, trainable=False,
                                 initializer="zeros")
    super().build(input_shape)

  def call(self, inputs):
    seed = tf.random.experimental.stateless_fold_in(
        tf.stack([self.seed, tf.constant(self.stream, tf.int64)]), self.calls)
    noise = tf.random.stateless_normal(tf.shape(inputs), seed, dtype=inputs.dtype)
    self.calls.assign_add(1)
    return inputs + tf.cast(self.stddev, inputs.dtype) * noise

  def reset(self, stddev, seed):
    """Sets the standard deviation and the seed, and restarts the noise sequence."""
    self.stddev.assign(stddev)
    self.seed.assign(seed)
    self.calls.assign(0)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    stddev, seed = ((float(self.stddev.numpy()), int(self.seed.numpy())) if self.built else
                    (self._initial_stddev, self._initial_seed))
    config.update(stddev=stddev, seed=seed, stream=self.stream)
    return config


def with_output_noise(model, hoods, epsilon, seed=0, scales=None, name=None):
  """`model` with Gaussian noise added to the output of each of `hoods`, also at inference.

  Built with `keras_nd.substitute` (sharing `model`'s layers and weights:
  nothing of `model` changes): each neighbourhood `T_i` is replaced by
  `T_i` followed by an `OutputNoise` layer named `<hood name>_noise`. Call
  the result with `training=False`, as any teacher part (training mode
  would update the shared BatchNorm statistics).

  Args:
    model: a functional tf_keras model.
    hoods: neighbourhoods of `model` (from `keras_nd.split` or
      `split_layers`), or one neighbourhood.
    epsilon: the noise amplitude, >= 0.
    seed: an integer; the same seed gives the same noise (on the n-th call).
    scales: None for absolute noise (standard deviation `epsilon`), or
      `{hood name: scale}` for relative noise (standard deviation `epsilon *
      scale`), e.g. `output_rms(model, hoods, data)`.
    name: the result's name (default: model's name + "_noisy").

  Returns:
    A flat functional `keras.Model` with `model`'s input and output shapes.

  Raises:
    TypeError, ValueError: naming the bad argument: a neighbourhood of
      another model, a negative epsilon, scales missing a neighbourhood.

  Example:
    >>> noisy = perturb.with_output_noise(teacher, hoods[2], epsilon=0.1)
    >>> logits = noisy(images, training=False)
  """
  model, hoods = _checked_hoods(model, hoods)
  epsilon = _checked_epsilon(epsilon)
  seed = _checked_seed(seed)
  scales = _checked_scales(hoods, scales)
  noisy, layers = _noisy(model, hoods, name)
  _reset(layers, {hood.name: epsilon * scales[hood.name] for hood in hoods}, seed)
  return noisy


def output_rms(model, hoods, dataset, steps=None, batch_size=256):
  """Each neighbourhood's clean output RMS, `sqrt(mean(T_i(a)^2))`: `{hood name: rms}`.

  The mean runs over every element of every example of the first `steps`
  batches (of `batch_size` examples) of `dataset`, all of them if None, in
  one teacher pass per batch (an online `ActivationSource`). These are the
  scales of relative noise.

  Args:
    model: a functional tf_keras model.
    hoods: neighbourhoods of `model`.
    dataset: a `tf.data.Dataset` of `x` or `(x, y, ...)`, batched or not.
    steps: batches to read, or None for all.
    batch_size: examples per teacher pass.
  """
  model, hoods = _checked_hoods(model, hoods)
  if steps is not None:
    _checks.integer(steps, "steps")
  batches = ActivationSource(model, hoods, dataset, verbose=0).dataset(batch_size, shuffle=False)
  totals, count = np.zeros(len(hoods)), 0
  for batch in batches if steps is None else batches.take(steps):
    targets = [batch[hood.name][1] for hood in hoods]
    totals += [float(tf.reduce_sum(tf.square(tf.cast(t, tf.float64)))) for t in targets]
    count += int(tf.shape(targets[0])[0])
  if not count:
    raise ValueError("The dataset for output_rms is empty.")
  sizes = [int(np.prod(hood.output_shape[1:])) for hood in hoods]
  return {hood.name: math.sqrt(total / (count * size))
          for hood, total, size in zip(hoods, totals, sizes)}


def output_sweep(model, hoods, dataset, epsilons, mode="each", seeds=(0, 1, 2), relative=False,
                 verbose=0):
  """Accuracy of `model` with noise of each amplitude on the outputs of neighbourhoods (Fig. 1).

  One noisy model (noise after every neighbourhood of `hoods`, its amplitude
  a variable) serves the whole sweep: a configuration sets the amplitudes,
  zero where unperturbed, and nothing is traced again.

  Args:
    model: a trained functional tf_keras model.
    hoods: neighbourhoods of `model`, in order.
    dataset: a batched `tf.data.Dataset` of `(x, y)` with class-index
      (or one-hot) labels.
    epsilons: the amplitudes to try (a non-empty sequence of numbers >= 0).
    mode: "each" perturbs each neighbourhood alone, "all" all of them at
      once, "cumulative" the first 1, 2, ..., n of `hoods`.
    seeds: the seeds to average over; a seed gives the same noise at every
      amplitude (common random numbers, so curves are smooth).
    relative: False for absolute noise; True for noise relative to each
      neighbourhood's clean output RMS on `dataset` (`output_rms`), the scale
      `tolerance.diagnose` and `tolerance.thresholds_from_sweep` need; or `{hood name: scale}`.
    verbose: 1 shows a progress bar over the evaluations.

  Returns:
    A list of rows, one per perturbed set of neighbourhoods and amplitude:
    `{"hoods": [names], "epsilon", "relative", "accuracy_mean",
    "accuracy_std", "accuracies"}`, with the mean and (population) standard
    deviation of the accuracies over the seeds.

  Raises:
    TypeError, ValueError: naming the bad argument (empty epsilons, a
      negative epsilon, an unknown mode, a neighbourhood of another model, a
      dataset without labels).
  """
  model, hoods = _checked_hoods(model, hoods)
  epsilons = _checked_epsilons(epsilons)
  if mode not in _MODES:
    raise ValueError(f"mode must be one of {list(_MODES)}; got {mode!r}.")
  seeds = _checked_seeds(seeds)
  if relative is True:
    scales = output_rms(model, hoods, dataset)
  elif relative is False:
    scales = None
  else:
    scales = relative
  scales = _checked_scales(hoods, scales)
  noisy, layers = _noisy(model, hoods, None)
  if mode == "each":
    groups = [[hood] for hood in hoods]
  elif mode == "all":
    groups = [hoods]
  else:
    groups = [hoods[:n] for n in range(1, len(hoods) + 1)]
  score = metrics.Scorer(noisy, dataset, len(groups) * len(epsilons) * len(seeds), verbose)
  rows = []
  for group in groups:
    for epsilon in epsilons:
      accuracies = []
      for seed in seeds:
        _reset(layers, {hood.name: epsilon * scales[hood.name] for hood in group}, seed)
        accuracies.append(score())
      rows.append({"hoods": [hood.name for hood in group], "epsilon": epsilon,
                   "relative": relative is not False, "accuracy_mean": float(np.mean(accuracies)),
                   "accuracy_std": float(np.std(accuracies)), "accuracies": accuracies})
  return rows


def weight_sweep(model, dataset, epsilon, layers=None, seeds=(0, 1, 2), verbose=0):
  """Accuracy drops from noise on the kernels, layer by layer and cumulatively (App. B.1, Fig. 4).

  A kernel `W` gets noise `N(0, (epsilon * std(W))^2)`, relative to the
  standard deviation of its own elements; biases and other weights are left
  alone. Each layer is perturbed alone, then the first 1, 2, ..., n layers
  together; the noise of a layer for a seed is the same draw in both, so the
  cumulative measurement at 1 equals the first individual one, and
  `predicted_drop` (the sum of the individual mean drops of the first n
  layers) is what additive drops would give. A drop is the clean accuracy
  minus the perturbed one.

  Every kernel is restored exactly afterwards, also when an error
  interrupts the sweep.

  Args:
    model: a trained tf_keras model.
    dataset: a batched `tf.data.Dataset` of `(x, y)`.
    epsilon: the relative amplitude, >= 0.
    layers: the layers to perturb, in order: names or layer objects, each
      with a kernel; default every layer of `layer_types.PRUNABLE`
      (convolutions, DepthwiseConv2D and Dense; nested models included), in
      the model's order.
    seeds: the seeds to average over.
    verbose: 1 shows a progress bar over the evaluations.

  Returns:
    `{"accuracy": clean accuracy, "epsilon",
    "individual": [{"layer", "drop_mean", "drop_std"}],
    "cumulative": [{"layers": n, "layer": name of the n-th,
    "measured_drop_mean", "measured_drop_std", "predicted_drop"}]}`.

  Raises:
    TypeError, ValueError: a negative epsilon, an unknown layer or one
      without a kernel, no layer to perturb.
  """
  model = keras3.to_tf_keras(model)
  if not isinstance(model, keras.Model):
    raise TypeError(f"model must be a tf_keras (or Keras 3) Model; got {type(model).__name__}.")
  epsilon = _checked_epsilon(epsilon)
  seeds = _checked_seeds(seeds)
  kernels = _kernels(model, layers)
  originals = [kernel.numpy() for _, kernel in kernels]
  score = metrics.Scorer(model, dataset, 1 + 2 * len(kernels) * len(seeds), verbose)

  def perturb(index, seed):
    original = originals[index]
    rng = np.random.default_rng([seed, index])
    noise = rng.normal(0.0, epsilon * float(np.std(original)), original.shape)
    kernels[index][1].assign_add(noise.astype(original.dtype))

  def restore():
    for (_, kernel), original in zip(kernels, originals):
      kernel.assign(original)

  clean = score()
  individual_drops = np.zeros((len(kernels), len(seeds)))
  cumulative_drops = np.zeros((len(kernels), len(seeds)))
  try:
    for index in range(len(kernels)):
      for s, seed in enumerate(seeds):
        perturb(index, seed)
        individual_drops[index, s] = clean - score()
        restore()
    for s, seed in enumerate(seeds):
      for index in range(len(kernels)):
        perturb(index, seed)
        cumulative_drops[index, s] = clean - score()
      restore()
  finally:
    restore()
  means = individual_drops.mean(axis=1)
  predicted = np.cumsum(means)
  return {
      "accuracy": clean,
      "epsilon": epsilon,
      "individual": [{"layer": name, "drop_mean": float(means[i]),
                      "drop_std": float(individual_drops[i].std())}
                     for i, (name, _) in enumerate(kernels)],
      "cumulative": [{"layers": i + 1, "layer": name,
                      "measured_drop_mean": float(cumulative_drops[i].mean()),
                      "measured_drop_std": float(cumulative_drops[i].std()),
                      "predicted_drop": float(predicted[i])}
                     for i, (name, _) in enumerate(kernels)],
  }


def _noisy(model, hoods, name):
  """`model` with an OutputNoise layer (zero amplitude) after each hood: (model, {name: layer})."""
  layers, replacements = {}, {}
  for hood in hoods:
    noise = OutputNoise(stream=hood.index, name=f"{hood.name}_noise")
    inputs = keras.Input(hood.input_shape[1:], dtype=hood.input_tensor.dtype)
    replacements[hood] = keras.Model(inputs, noise(hood.teacher(inputs)),
                                     name=f"{hood.name}_noisy")
    layers[hood.name] = noise
  noisy = graph.substitute(model, replacements, name=name or f"{model.name}_noisy")
  return noisy, layers


def _reset(layers, amplitudes, seed):
  for name, layer in layers.items():
    layer.reset(amplitudes.get(name, 0.0), seed)


def _kernels(model, layers):
  """[(layer name, kernel variable)] of the layers to perturb, in order."""
  if layers is None:
    found = [(layer.name, layer_types.kernel(layer)) for layer in layer_types.leaf_layers(model)
             if isinstance(layer, layer_types.PRUNABLE)]
    if not found:
      raise ValueError(f"Model '{model.name}' has no convolution, DepthwiseConv2D or Dense layer "
                       "to perturb; name the layers with `layers`.")
    return found
  if isinstance(layers, (str, keras.layers.Layer)):
    layers = [layers]
  if not layers:
    raise ValueError("layers is empty; pass None for every convolution, DepthwiseConv2D and "
                     "Dense layer.")
  by_name = {layer.name: layer for layer in layer_types.leaf_layers(model)}
  found = []
  for item in layers:
    name = item if isinstance(item, str) else getattr(item, "name", None)
    if name not in by_name or (not isinstance(item, str) and by_name[name] is not item):
      raise ValueError(f"Layer {item if isinstance(item, str) else name!r} is not a layer of "
                       f"model '{model.name}'.")
    kernel = layer_types.kernel(by_name[name])
    if kernel is None:
      raise ValueError(f"Layer '{name}' ({type(by_name[name]).__name__}) of model "
                       f"'{model.name}' has no kernel to perturb.")
    found.append((name, kernel))
  names = [name for name, _ in found]
  if len(set(names)) != len(names):
    raise ValueError(f"layers names a layer more than once: {names}.")
  return found


def _checked_hoods(model, hoods):
  """(the tf_keras model of `model`, `hoods` checked to be its neighbourhoods)."""
  model = graph.check_functional(model)
  return model, checked_hoods(model, hoods)


def _checked_scales(hoods, scales):
  if scales is None:
    return {hood.name: 1.0 for hood in hoods}
  if not isinstance(scales, dict):
    raise TypeError(f"scales must be None or a dict {{hood name: scale}}; got {scales!r}.")
  missing = [hood.name for hood in hoods if hood.name not in scales]
  if missing:
    raise ValueError(f"scales has no value for the neighbourhoods {missing}; it has "
                     f"{sorted(scales)}.")
  return {hood.name: _checked_epsilon(scales[hood.name], f"scale of '{hood.name}'")
          for hood in hoods}


def _checked_epsilon(epsilon, what="epsilon"):
  return _checks.number(epsilon, what, low=0)


def _checked_epsilons(epsilons):
  if _checks.is_number(epsilons) or not hasattr(epsilons, "__iter__"):
    raise TypeError(f"epsilons must be a sequence of amplitudes; got {epsilons!r}.")
  epsilons = [_checked_epsilon(e, f"epsilons[{i}]") for i, e in enumerate(epsilons)]
  if not epsilons:
    raise ValueError("epsilons is empty; pass the amplitudes to try, e.g. [0.0, 0.1, 0.3, 1.0].")
  return epsilons


def _checked_seed(seed):
  if not _checks.is_integer(seed):
    raise TypeError(f"seed must be an integer; got {seed!r}.")
  return int(seed)


def _checked_seeds(seeds):
  seeds = [seeds] if _checks.is_integer(seeds) else list(seeds)
  if not seeds:
    raise ValueError("seeds is empty; pass at least one seed.")
  return [_checked_seed(seed) for seed in seeds]
