"""Sparse students: one-layer neighbourhoods pruned by magnitude with tfmot.

The paper's sparsification (Table 3a) treats every convolution or Dense layer
as its own neighbourhood (`keras_nd.split_layers`), starts its student from
the teacher layer's weights and prunes it by weight magnitude while it learns
to reproduce the teacher layer's output: the sparsity ramps from 0 to the
target over the first half of the neighbourhood's steps (tfmot's
`PolynomialDecay`) and holds for the second half, the surviving weights still
training. No fine-tuning follows.

```python
hoods = nd.split_layers(teacher)
students = sparsity.sparse_students(hoods, 0.5, skip=("stem_conv", "head_logits"))
distiller = nd.NeighbourhoodDistiller(students)   # fit() adds tfmot's UpdatePruningStep itself
distiller.compile("adam"); distiller.fit(source.dataset(128), epochs=3)  # the schedule: 3 epochs
student = nd.compose(teacher, distiller.students)  # pruning wrappers stripped
print(sparsity.report(student)["total"])
```

`compose` strips the wrappers (tfmot's `strip_pruning`), so the composed
student is a plain model whose pruned kernels hold exact zeros. A student
whose pruning has not reached its target (trained fewer steps than its
schedule asks) is refused there with a ValueError, never stripped short.

The schedule's length is the number of steps the first `fit` will run
(epochs times steps per epoch), unless `steps` fixes it.
"""

import functools
import gzip
import os
import tempfile

import numpy as np

from keras_nd import _checks, graph, layer_types
from keras_nd._keras import keras, tfmot
from keras_nd.neighbourhood import split_layers
from keras_nd.students import SUFFIX

__all__ = ["compressed_size", "derive_schedules", "not_skipped", "prune", "prunes",
           "pruning_callbacks", "report", "schedule", "sparse_student", "sparse_students",
           "strip"]


def _prune():
  """tfmot's Keras pruning API (tfmot is imported on first use)."""
  return tfmot().sparsity.keras


@functools.cache
def _prunable_depthwise():
  """DepthwiseConv2D whose kernel tfmot prunes (its registry leaves depthwise kernels dense);
  made on first use, since it subclasses tfmot's `PrunableLayer`."""

  class PrunableDepthwiseConv2D(keras.layers.DepthwiseConv2D, _prune().PrunableLayer):

    def get_prunable_weights(self):
      return [self.depthwise_kernel]

  return PrunableDepthwiseConv2D


def _pruning_wrappers(model):
  """The tfmot pruning wrappers (`PruneLowMagnitude`) in `model`.

  Without tfmot imported no model can hold one, so this does not import it.
  """
  module = tfmot("python.core.sparsity.keras.pruning_wrapper", imported_only=True)
  if module is None or not isinstance(model, keras.layers.Layer):
    return []
  return [layer for layer in model.submodules if isinstance(layer, module.PruneLowMagnitude)]


def prunes(model):
  """Whether `model` (or a model inside it) holds tfmot pruning wrappers."""
  return bool(_pruning_wrappers(model))


def schedule(target, steps, kind="polynomial"):
  """The tfmot pruning schedule for `steps` training steps.

  Args:
    target: the final sparsity, in [0, 1).
    steps: the steps the student trains for; None: the steps of the first
      `fit` of a distiller that trains it (`derive_schedules`).
    kind: "polynomial": from 0 to `target` over the first half of the steps
      (tfmot's cubic `PolynomialDecay`), then held; "constant": `target` from
      the first step.

  Returns:
    A `tfmot.sparsity.keras.PruningSchedule`. The mask is updated every
    `frequency` steps (at most 100, about 8 updates over the ramp), and the
    last update of the ramp falls at its last step, so the final mask has
    exactly the target sparsity.
  """
  _check_target(target, "the schedule")
  if steps is None:  # a placeholder until the first fit says how many steps it runs
    deferred = schedule(target, 2, kind)
    deferred.keras_nd_deferred = (target, kind)
    return deferred
  steps = _checks.integer(steps, "steps", minimum=2)
  ramp = steps // 2
  frequency = max(1, min(100, ramp // 8))
  end = frequency * (ramp // frequency)
  if kind == "polynomial":
    return _prune().PolynomialDecay(initial_sparsity=0.0, final_sparsity=float(target),
                                  begin_step=0, end_step=end, frequency=frequency)
  if kind == "constant":
    return _prune().ConstantSparsity(float(target), begin_step=0, frequency=frequency)
  raise ValueError(f"Schedule kind must be 'polynomial' or 'constant'; got {kind!r}.")


def derive_schedules(model, steps):
  """Gives every pruning schedule of `model` made with steps=None the length `steps`.

  The distillers call it at the start of `fit` with the steps that fit will
  run (epochs times steps per epoch); schedules already given a length are
  left alone.

  Raises:
    ValueError: a schedule still to be derived and `steps` unknown (None),
      or under 2.
  """
  for wrapper in _pruning_wrappers(model):
    deferred = getattr(wrapper.pruning_schedule, "keras_nd_deferred", None)
    if deferred is None:
      continue
    if steps is None or steps < 2:
      raise ValueError(
          f"Layer '{wrapper.layer.name}' is pruned over the steps of this fit, but fit does not "
          f"say how many it runs ({steps}): pass steps_per_epoch to fit (or a dataset of known "
          f"length), or steps=N to sparse_students / prune.")
    target, kind = deferred
    # The wrapper's pruning object holds this very schedule: it is changed in place.
    vars(wrapper.pruning_schedule).update(vars(schedule(target, steps, kind)))
    del wrapper.pruning_schedule.keras_nd_deferred


def _target_of(wrapper):
  """The sparsity a wrapper's schedule ends at."""
  if wrapper.sparsity_m_by_n:
    m, n = wrapper.sparsity_m_by_n
    return m / n
  sched = wrapper.pruning_schedule
  return float(getattr(sched, "final_sparsity", getattr(sched, "target_sparsity", 0.0)))


def _check_finished(model):
  """A ValueError naming every layer whose mask is short of its schedule's target sparsity."""
  short = []
  for wrapper in _pruning_wrappers(model):
    target = _target_of(wrapper)
    for _, mask, _ in wrapper.pruning_vars:
      values = mask.numpy()
      reached = 1 - np.count_nonzero(values) / max(1, values.size)
      if reached < target - max(0.005, 1.5 / max(1, values.size)):
        steps = max(0, int(wrapper.pruning_step.numpy()))
        short.append(f"'{wrapper.layer.name}' at {100 * reached:.1f}% of {100 * target:.1f}% "
                     f"after {steps} steps (its schedule ends at step "
                     f"{getattr(wrapper.pruning_schedule, 'end_step', -1)})")
  if short:
    raise ValueError(
        f"Pruning has not reached its target: {'; '.join(short)}. Train for the steps the "
        "schedule asks, or build the students without steps= (sparse_students, prune) so that "
        "their schedule is the length of their first fit.")


def _check_target(target, where):
  _checks.number(target, f"The target sparsity of {where}", low=0, high=1, high_open=True)


def _layer_of(hood):
  """The one layer of a one-layer neighbourhood, checked to be prunable."""
  if not hasattr(hood, "nodes"):
    raise TypeError(f"Expected a keras_nd.Neighbourhood; got {type(hood).__name__}.")
  if len(hood.nodes) != 1:
    raise ValueError(
        f"A sparse student replaces one layer, but neighbourhood '{hood.name}' has "
        f"{len(hood.nodes)} ({[n.layer.name for n in hood.nodes]}); use "
        "keras_nd.split_layers for one-layer neighbourhoods.")
  layer = hood.nodes[0].layer
  if not isinstance(layer, layer_types.PRUNABLE):
    raise ValueError(
        f"Layer '{layer.name}' of neighbourhood '{hood.name}' is a {type(layer).__name__}, which "
        f"cannot be pruned; prunable types: {[t.__name__ for t in layer_types.PRUNABLE]}.")
  return layer


def sparse_student(hood, target, steps=None, kind="polynomial", m_by_n=None):
  """A pruned copy of a one-layer neighbourhood, starting from the teacher layer's weights.

  Args:
    hood: a one-layer `Neighbourhood` (from `keras_nd.split_layers`) of a
      Conv1D/2D/3D, DepthwiseConv2D or Dense layer.
    target: the final sparsity of its kernel, in [0, 1).
    steps: the steps it will train for (the schedule ramps over half);
      None (the default): as many as the first `fit` that trains it runs.
    kind: "polynomial" or "constant" (see `schedule`).
    m_by_n: e.g. (2, 4) for structured sparsity, m zeros in every n
      consecutive weights along the input channels (tfmot's
      `sparsity_m_by_n`); `target` is then ignored for the mask. Conv2D and
      Dense only.

  Returns:
    A functional model, named `<hood name>_sparse`, whose one layer is the
    teacher layer's copy wrapped in tfmot's `PruneLowMagnitude`. Train it with
    `NeighbourhoodDistiller`, which adds tfmot's `UpdatePruningStep` callback.
  """
  layer = _layer_of(hood)
  _check_target(target, f"layer '{layer.name}'")
  config = dict(layer.get_config(), name=layer.name + SUFFIX)
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    copy = _prunable_depthwise().from_config(config)
  else:
    copy = layer.__class__.from_config(config)
  options = {}
  if m_by_n is not None:
    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) or isinstance(
        layer, keras.layers.DepthwiseConv2D):
      raise ValueError(f"m-by-n sparsity applies to Conv2D and Dense layers; layer "
                       f"'{layer.name}' is a {type(layer).__name__}.")
    options["sparsity_m_by_n"] = tuple(m_by_n)
  wrapper = _prune().prune_low_magnitude(copy, pruning_schedule=schedule(target, steps, kind),
                                         **options)
  inputs = keras.Input(hood.input_shape[1:])
  model = keras.Model(inputs, wrapper(inputs), name=f"{hood.name}_sparse")
  copy.set_weights(layer.get_weights())
  return model


def sparse_students(hoods, targets, steps=None, kind="polynomial", m_by_n=None, skip=()):
  """`{hood: sparse_student(hood, ...)}` for the one-layer neighbourhoods not skipped.

  Args:
    hoods: one-layer neighbourhoods (`keras_nd.split_layers`).
    targets: one sparsity for all, a dict `{layer name: sparsity}` (layers not
      in it are skipped), or a function `f(layer) -> sparsity or None` (None
      skips the layer).
    steps, kind, m_by_n: as for `sparse_student`.
    skip: layer names or layer classes to leave dense and out of training
      (the paper keeps the first convolution and the classifier).

  Returns:
    dict `{Neighbourhood: student}` for `NeighbourhoodDistiller`.
  """
  known = {h.nodes[0].layer.name for h in hoods if len(h.nodes) == 1}
  unknown = sorted((set(targets) if isinstance(targets, dict) else set()) - known)
  if unknown:
    raise ValueError(f"No one-layer neighbourhood has the layer(s) {unknown}; the layers are "
                     f"{sorted(known)}.")
  students = {}
  for hood in not_skipped(hoods, skip):
    layer = _layer_of(hood)
    if isinstance(targets, dict):
      target = targets.get(layer.name)
    elif callable(targets):
      target = targets(layer)
    else:
      target = targets
    if target is not None:
      students[hood] = sparse_student(hood, target, steps, kind, m_by_n)
  if not students:
    raise ValueError("Every layer was skipped: there is nothing to sparsify.")
  return students


def not_skipped(hoods, skip):
  """The one-layer neighbourhoods whose layer is neither named in `skip` nor of a class in it."""
  names = {s for s in skip if isinstance(s, str)}
  types = tuple(s for s in skip if isinstance(s, type))
  if len(names) + len(types) != len(tuple(skip)):
    raise TypeError(f"skip must hold layer names or layer classes; got {skip!r}.")
  layers = [_layer_of(hood) for hood in hoods]
  unknown = sorted(names - {layer.name for layer in layers})
  if unknown:
    raise ValueError(f"No one-layer neighbourhood has the layer(s) {unknown}; the layers are "
                     f"{sorted(layer.name for layer in layers)}.")
  return [hood for hood, layer in zip(hoods, layers)
          if layer.name not in names and not (types and isinstance(layer, types))]


def pruning_callbacks(model, callbacks):
  """`callbacks` with tfmot's `UpdatePruningStep` added if `model` prunes and it is missing."""
  callbacks = list(callbacks or [])
  if prunes(model) and not any(isinstance(c, _prune().UpdatePruningStep) for c in callbacks):
    callbacks.append(_prune().UpdatePruningStep())
  return callbacks


def strip(model):
  """`model` without pruning wrappers: plain layers holding the masked (sparse) weights.

  Masks are applied first, so weights trained after the last mask update
  (e.g. outside `fit`) are sparse too. Pruning wrappers of depthwise
  convolutions come back as plain `DepthwiseConv2D` layers.

  Raises:
    ValueError: a layer whose pruning is short of its schedule's target
      (it trained fewer steps than the schedule asks), naming it.
  """
  _check_finished(model)
  for wrapper in _pruning_wrappers(model):
    wrapper.pruning_obj.weight_mask_op()
  stripped = _prune().strip_pruning(model)
  prunable = _prunable_depthwise()

  def plain(layer):
    if isinstance(layer, prunable):
      return keras.layers.DepthwiseConv2D.from_config(layer.get_config())
    return layer

  if not any(isinstance(layer, prunable) for layer in stripped.layers):
    return stripped
  nodes = graph.model_nodes(stripped)
  copies = {}

  def layer_fn(layer):
    copies.setdefault(id(layer), (layer, plain(layer)))
    return copies[id(layer)][1]

  result = graph.rebuild(nodes, stripped.inputs[0], stripped.outputs[0], stripped.name,
                         layer_fn=layer_fn)
  for layer, copy in copies.values():
    if copy is not layer:
      copy.set_weights(layer.get_weights())
  return result


def _kernels(model):
  """[(layer name, kernel)] of the prunable layers of a (stripped) model."""
  return [(layer.name, layer_types.kernel(layer)) for layer in layer_types.leaf_layers(model)
          if isinstance(layer, layer_types.PRUNABLE)]


def report(model):
  """Per-layer and whole-model sparsity of a stripped model's kernels.

  Returns:
    dict with "layers": [{"layer", "weights", "zeros", "sparsity"}] for every
    convolution and Dense kernel, and "total": the same over all of them plus
    "params" (every parameter of the model, biases and BatchNorm included)
    and "params_sparsity" (zeros over all parameters).
  """
  if prunes(model):
    raise ValueError(f"Model '{model.name}' still holds pruning wrappers; report on "
                     "sparsity.strip(model) (or nd.compose's result).")
  rows = []
  for name, kernel in _kernels(model):
    values = kernel.numpy()
    zeros = int(np.count_nonzero(values == 0))
    rows.append({"layer": name, "weights": int(values.size), "zeros": zeros,
                 "sparsity": zeros / max(1, values.size)})
  weights = sum(r["weights"] for r in rows)
  zeros = sum(r["zeros"] for r in rows)
  every = [w.numpy() for w in model.weights]
  params = int(sum(w.size for w in every))
  params_zeros = int(sum(np.count_nonzero(w == 0) for w in every))
  return {"layers": rows,
          "total": {"weights": weights, "zeros": zeros, "sparsity": zeros / max(1, weights),
                    "params": params, "params_sparsity": params_zeros / max(1, params)}}


def compressed_size(model):
  """Bytes of the model's weights saved (`save_weights`, HDF5) and compressed with gzip."""
  with tempfile.TemporaryDirectory(prefix="keras_nd_size_") as directory:
    path = os.path.join(directory, "weights.h5")
    model.save_weights(path)
    with open(path, "rb") as f:
      return len(gzip.compress(f.read(), compresslevel=9))


def prune(model, targets, steps=None, kind="polynomial", m_by_n=None, skip=()):
  """An independent copy of `model` with its prunable layers wrapped for pruning (the KD baseline).

  The same schedule as `sparse_students`, applied to the whole model trained
  end to end. Arguments as for `sparse_students`; `compose`/`strip` remove
  the wrappers afterwards.
  """
  copy = graph.substitute(model, {}, copy=True)
  students = sparse_students(split_layers(copy, layer_types.PRUNABLE), targets, steps, kind,
                             m_by_n, skip)
  return graph.substitute(copy, students)

