"""Exact solves of student neighbourhoods: `reconstruct`.

With everything before it fixed, a convolution or Dense layer's output is
linear in its weights, so the weights that bring its output closest to its
teacher counterpart's output are the solution of a ridge least-squares
problem: with X the layer's inputs (a convolution's patches) and Y the teacher
layer's outputs, `W = (X^T X + lambda I)^-1 X^T Y`. `X^T X` and `X^T Y` are
accumulated in one streaming pass over an `ActivationSource`; memory is
bounded by the size of those statistics, never by the number of examples.

The solve is sequential through each neighbourhood, as in He et al. (2017) and
ThiNet: a layer sees the student's *own* input, produced by the layers before
it already solved, so later layers correct the errors of earlier ones. Layers
at the same depth (counting only solved layers) are solved from the same pass,
in every neighbourhood at once; a ResNet basic unit whose first convolution
was narrowed needs one pass in all.

Which layers are solved: every Conv1D/2D/3D, DepthwiseConv1D/2D and Dense
layer of a student whose teacher counterpart (the teacher layer of the same
name, or of its name less the student suffix `_s`) has an output of the same
shape. A layer whose output was narrowed (a bottleneck's inner layer) has no
teacher target of its shape and keeps its weights; the layers it feeds are
solved. A layer without a bias whose output feeds a BatchNormalization gets
its intercept through that BatchNormalization's moving mean.

Which channels a narrowed layer keeps can be chosen in the same pass
(`channels="greedy"`, as ThiNet and He et al. choose them): from the
statistics of all the teacher's channels at the next layer's input, channels
are removed one at a time, each time the one whose weights cost the least
error, with the exact group update of Optimal Brain Surgeon.

The plan of what is solved is `reconstruct_plan`, the pass that accumulates
the statistics `reconstruct_statistics`, the solves `least_squares`.
"""

from keras_nd import (
  _checks,
  graph,
  least_squares,
  reconstruct_plan,
  reconstruct_statistics,
  sparsity,
)
from keras_nd._keras import keras

__all__ = ["reconstruct"]


def _check(students, source, ridge):
  """Refuses students, a source or a ridge that `reconstruct` cannot solve with."""
  if not isinstance(students, dict) or not students:
    raise TypeError("students must be a non-empty dict {Neighbourhood: student model}; got "
                    f"{type(students).__name__}.")
  served = {hood.name: hood for hood in getattr(source, "hoods", ())}
  if not served or not hasattr(source, "dataset"):
    raise TypeError(f"source must be a keras_nd.ActivationSource; got {type(source).__name__}.")
  for hood, student in students.items():
    if not hasattr(hood, "nodes"):
      raise TypeError(f"students' keys must be keras_nd.Neighbourhood objects; got {hood!r}.")
    if served.get(hood.name) is not hood:
      raise ValueError(
          f"The source does not serve neighbourhood '{hood.name}' (it serves "
          f"{sorted(served)}); build it over the neighbourhoods of the students.")
    if not isinstance(student, keras.Model) or not getattr(student, "_is_graph_network", False):
      raise TypeError(
          f"The student for neighbourhood '{hood.name}' must be a functional tf_keras Model "
          f"(reconstruct changes its weights in place); got {type(student).__name__}.")
    graph.check_replacement(hood, student)
    if sparsity.prunes(student):
      raise ValueError(
          f"The student for neighbourhood '{hood.name}' is pruned while it trains (tfmot "
          "wrappers), which reconstruct does not solve: distil it with gradient steps, or solve "
          "it before wrapping it.")
  _checks.number(ridge, "ridge", low=0)


def reconstruct(students, source, ridge=1e-3, batch_size=256, errors=True, channels=None,
                subsample=1, sparsity=None, mask="magnitude", m_by_n=None, verbose=0):
  """Solves the weighted layers of each student in closed form, in place.

  Each solved layer gets the ridge least-squares weights (and bias) that make
  its output, given the student's own input to it, closest to its teacher
  counterpart's output on the teacher's input; see the module docstring for
  which layers are solved and in what order. Statistics are accumulated in
  one pass over `source` per solve order (plus one pass each to measure the
  errors before and after, if `errors`), so any number of examples fits in
  the same memory: `(d + 1) * (d + outputs)` float64 numbers per solved layer,
  d its inputs per output (3 * 3 * 512 = 4608 for ResNet-50's widest layer;
  at most `reconstruct_statistics.MAX_FEATURES - 1`, above which a
  ValueError names the layer).

  Args:
    students: `{Neighbourhood: student model}`, students built by keras_nd
      (`students.bottleneck`, `students.clone`) or any functional model whose
      weighted layers are named after the teacher layers they stand for; or
      a list of such dicts (e.g. Student Search's candidates of several
      widths), all solved from the same passes, statistics they share
      (those of the teacher's channels, with channels="greedy") computed
      once. A list gives a list of reports.
    source: an `ActivationSource` serving (at least) these neighbourhoods:
      cached, online or noise.
    ridge: the regularisation, relative to the mean diagonal of each
      layer's `X^T X`. It keeps rank-deficient systems (constant inputs, e.g.
      dead ReLU channels) solvable; 0 solves exactly, falling back to minimum
      norm least squares with a warning where the system is singular.
    batch_size: examples per batch of the passes.
    errors: also measure each neighbourhood's relative error before and after.
    channels: "greedy" also chooses which teacher channels each narrowed
      layer keeps (a bottleneck's inner convolution, which sees the
      teacher's input), by how well the solved layer after it reconstructs
      its target from them (ThiNet, He et al. 2017): from the teacher's
      activations of all the channels, in the same pass, by greedy exact
      removal. The narrowed layer and the channel-wise layers after it
      (BatchNorm, activation) are then set from the teacher at the kept
      channels. None keeps the channels the students have.
    sparsity: a fraction in [0, 1) of each solved layer's kernel to make
      zero, or `{layer name: fraction}` (teacher or student names): the
      entries of least magnitude (tfmot's criterion, over the whole layer)
      are zeroed, exactly that many, and the surviving weights of each
      output solved exactly on them; the layer stays a plain layer with
      zeros (the students of `split_layers` neighbourhoods, e.g.
      `students.clone`, give a sparse model as `compose` gives today).
    mask: which entries `sparsity` zeroes: "magnitude" (least magnitude
      over the layer) or "obs" (for each output, as many, chosen one at a
      time by Optimal Brain Surgeon from its least-squares solution, as
      OBC does: `w_p^2 / [H^-1]_pp` least first, the rest updated; slower,
      an `outputs x d x d` inverse per layer).
    m_by_n: (m, n), e.g. (2, 4): structured sparsity instead of `sparsity`,
      m zeros in every n consecutive weights along the input channels of
      every solved Conv1D/2D/3D and Dense layer (tfmot's `sparsity_m_by_n`),
      chosen by `mask` within each block; the input channels must be a
      multiple of n.
    subsample: s > 1 accumulates the statistics of every s-th output
      position along each spatial axis only (s^2 times fewer rows for a 2D
      layer, and as much less time in X^T X), from offsets that move with
      the batch, so that over s^2 batches every position is visited.
      Neighbouring positions are strongly correlated: on the main job s = 2
      loses nothing measurable (README).
    verbose: 1 prints a line per pass.

  Returns:
    `{neighbourhood name: {"layers": {layer name: {"order", "features",
    "constant_inputs", "error_before", "error_after"[, "channels"]}},
    "error_before", "error_after", "loss_before", "loss_after"}}`: the
    layers' relative residuals `||Y - XW||^2 / ||Y - mean(Y)||^2` (the
    mean only where the layer has an intercept; before: with the weights it
    had, on the same inputs; None where its input's channels were chosen,
    with "channels" the kept ones) and, with `errors`, the neighbourhood's
    relative error `||S(a) - T(a)||^2 / ||T(a)||^2` and mean squared error
    (the distiller's loss) over the source.

  Raises:
    ValueError, TypeError: a student layer with no teacher counterpart, a
      source that does not serve a neighbourhood, a layer too large to solve.

  Example:
    >>> students = {h: nd.students.bottleneck(h, 0.5, init="teacher") for h in units}
    >>> report = nd.reconstruct(students, source)
  """
  several = isinstance(students, (list, tuple))
  sets = list(students) if several else [students]
  if several and not sets:
    raise TypeError("students must be a dict {Neighbourhood: student model} or a non-empty list "
                    "of such dicts.")
  for one in sets:
    _check(one, source, ridge)
  subsample = _checks.integer(subsample, "subsample")
  m_by_n = _check_settings(sparsity, mask, m_by_n, channels)
  items, owner = [], {}
  for index, one in enumerate(sets):
    for hood, student in one.items():
      owner[id(student)] = index
      items.extend(reconstruct_plan.plan(hood, student, channels))
  if m_by_n is not None:
    for item in items:
      least_squares.check_blocks(item.layer, m_by_n[1])
  reports = [{hood.name: {"layers": {}} for hood in one} for one in sets]
  orders = sorted({item.order for item in items})
  for order in orders:
    group = [item for item in items if item.order == order]
    reconstruct_statistics.check_size(group)
    measure = errors and order == orders[0]
    extract, computed_by = reconstruct_statistics.extractor(sets, group, with_errors=measure,
                                                            subsample=subsample)
    totals = reconstruct_statistics.accumulate(source, batch_size, extract)
    if verbose:
      print(f"reconstruct: pass {order} of {len(orders)}, {len(group)} layers", flush=True)
    if measure:
      _record_errors(reports, totals["errors"], "before")
    for item, stats in zip(group, (totals["layers"][k] for k in computed_by)):
      info = least_squares.solve_layer(item, stats, ridge,
                                       reconstruct_plan.target_sparsity(item, sparsity), mask,
                                       m_by_n)
      info["order"] = order
      reports[owner[id(item.student)]][item.hood.name]["layers"][item.layer.name] = info
  if errors:
    extract = reconstruct_statistics.extractor(sets, [], with_errors=True)[0]
    totals = reconstruct_statistics.accumulate(source, batch_size, extract)
    _record_errors(reports, totals["errors"], "after")
    if not orders:  # nothing was solved
      _record_errors(reports, totals["errors"], "before")
  return reports if several else reports[0]


def _check_settings(sparsity, mask, m_by_n, channels):
  """Refuses settings out of range or that do not go together; returns m_by_n as a tuple."""
  values = list(sparsity.values()) if isinstance(sparsity, dict) else [sparsity or 0.0]
  if any(not _checks.is_number(v) or not 0 <= v < 1 for v in values):
    raise ValueError(f"sparsity must be a fraction in [0, 1) or {{layer name: fraction}}; got "
                     f"{sparsity!r}.")
  if mask not in ("magnitude", "obs"):
    raise ValueError(f"mask must be 'magnitude' or 'obs'; got {mask!r}.")
  if m_by_n is not None:
    m_by_n = least_squares.check_m_by_n(m_by_n)
    if any(values):
      raise ValueError("pass sparsity or m_by_n, not both: m_by_n sets m / n of every solved "
                       "layer.")
  if channels is not None and (any(values) or m_by_n is not None):
    raise ValueError("reconstruct either chooses channels or prunes weights: pass channels or "
                     "sparsity, not both.")
  if channels not in (None, "greedy"):
    raise ValueError(f"channels must be None or 'greedy'; got {channels!r}.")
  return m_by_n


def _record_errors(reports, sums, when):
  """Writes the neighbourhoods' relative errors and losses, summed over a pass, into `reports`."""
  for key, (err, norm, count) in sums.items():
    index, name = key.split(":", 1)
    reports[int(index)][name][f"error_{when}"] = float(err / max(norm, 1e-30))
    reports[int(index)][name][f"loss_{when}"] = float(err / max(count, 1))
