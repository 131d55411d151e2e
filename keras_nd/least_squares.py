"""The solves of `reconstruct`: one layer's weights from the statistics of its system.

From the normal equations `[G s; s^T n] W = [C; t]` (an intercept row where
the layer has a bias or a BatchNorm after it): the ridge least-squares
solution; or, with a target sparsity, a mask (the entries of least magnitude,
or those Optimal Brain Surgeon removes, optionally in m-by-n blocks) and each
output's surviving weights solved exactly; or, for a layer whose input's
channels are chosen, greedy exact removal of the teacher's channels.
"""

import warnings

import numpy as np

from keras_nd import _checks, layer_types
from keras_nd import students as builders
from keras_nd.reconstruct_plan import intercept, kind

__all__ = ["check_blocks", "check_m_by_n", "solve_layer"]


def check_m_by_n(m_by_n):
  """`m_by_n` as a tuple (m, n), if it is a pair of integers with 0 < m < n.

  Args:
    m_by_n: m zeros in every n consecutive weights, e.g. (2, 4).

  Returns:
    `(m, n)` as ints.

  Raises:
    ValueError: naming `m_by_n` and what it got.
  """
  if (not isinstance(m_by_n, (tuple, list)) or len(m_by_n) != 2 or
      not all(_checks.is_integer(v) for v in m_by_n) or not 0 < m_by_n[0] < m_by_n[1]):
    raise ValueError(f"m_by_n must be (m, n) with 0 < m < n, m zeros in every n weights; got "
                     f"{m_by_n!r}.")
  return int(m_by_n[0]), int(m_by_n[1])


def check_blocks(layer, n):
  """m-by-n blocks run along the input channels: a layer they fit, or a ValueError."""
  if kind(layer) == "depthwise":
    raise ValueError(f"m_by_n sparsity applies to Conv1D/2D/3D and Dense layers; layer "
                     f"'{layer.name}' is a {type(layer).__name__}.")
  channels = layer_types.kernel(layer).shape[-2]
  if channels % n:
    raise ValueError(f"m_by_n blocks of {n} do not fit layer '{layer.name}': its {channels} "
                     f"input channels are not a multiple of {n}.")


def solve_layer(item, stats, ridge, sparsity=0.0, mask="magnitude", m_by_n=None):
  """Solves one planned layer from the statistics of its system and sets its weights.

  Args:
    item: the `SolvedLayer`.
    stats: its statistics, float64 `{G, s, C, t, yy, n}`.
    ridge: the regularisation, relative to the mean diagonal of `X^T X`.
    sparsity: the fraction of its kernel to make zero.
    mask: "magnitude" or "obs", which entries `sparsity` zeroes.
    m_by_n: (m, n): m zeros in every n weights instead of `sparsity`.

  Returns:
    The layer's report: {"features", "constant_inputs", "error_before",
    "error_after"[, "sparsity"][, "channels"]}, the errors relative to
    `||Y - mean(Y)||^2` (the mean only with an intercept).
  """
  a, b = _system(stats, intercept(item))
  total = _total(stats, intercept(item))
  target = m_by_n[0] / m_by_n[1] if m_by_n else sparsity
  if target:
    before = _residual(stats, a, b, _current(item)) / total
    w, info = _masked_solve(item, stats, a, b, ridge, target, mask, m_by_n)
    info.update(error_before=before, error_after=_residual(stats, a, b, w) / total)
  elif item.choice is None:
    w, info = _solve(item, stats, a, b, ridge)
    info.update(error_before=_residual(stats, a, b, _current(item)) / total,
                error_after=_residual(stats, a, b, w) / total)
  else:
    w, info = _choose(item, stats, a, b, ridge)
    info["error_after"] /= total
  _assign(item, w)
  return info


def _system(stats, with_intercept):
  """The augmented normal equations [G s; s^T n], [C; t] as float64 (leading channel axis kept)."""
  g, s, c, t, n = (stats[k] for k in ("G", "s", "C", "t", "n"))
  if not with_intercept:
    return g, c
  n = np.broadcast_to(n, s.shape[:-1] + (1, 1))
  a = np.concatenate([np.concatenate([g, s[..., :, None]], -1),
                      np.concatenate([s[..., None, :], n], -1)], -2)
  return a, np.concatenate([c, t[..., None, :]], -2)


def _solve(item, stats, a, b, ridge):
  """Solves one layer's system `a W = b`; returns (W with the intercept last, info)."""
  d = a.shape[-1] - int(intercept(item))
  regularised = _regularised(a, d, ridge)
  constant = _constant_inputs(stats, a, d)
  try:
    w = np.linalg.solve(regularised, b)
  except np.linalg.LinAlgError:
    warnings.warn(
        f"reconstruct: the system of layer '{item.layer.name}' ({item.hood.name}) is singular "
        f"with ridge={ridge:g} ({constant} of its {d} inputs are constant over the data); solved "
        "by least squares of minimum norm instead. Pass ridge > 0 to regularise it.",
        stacklevel=4)
    w = np.linalg.lstsq(regularised, b, rcond=None)[0] if regularised.ndim == 2 else np.stack(
        [np.linalg.lstsq(r, v, rcond=None)[0] for r, v in zip(regularised, b)])
  return w, {"constant_inputs": constant, "features": d}


def _constant_inputs(stats, a, d, rows=None):
  """How many of the inputs (of `rows`, default all d) do not vary over the data, e.g. a channel
  a ReLU always zeroes: they make the system rank-deficient, and the ridge gives them no weight."""
  diag = np.einsum("...ii->...i", a)[..., :d]
  mean = stats["s"] / stats["n"]
  if rows is not None:
    diag, mean = diag[..., rows], mean[..., rows]
  scale = np.maximum(diag.mean(-1, keepdims=True), 1e-12)
  variance = diag / stats["n"] - mean * mean
  return int(np.sum(variance <= 1e-10 * scale / stats["n"]))


def _total(stats, with_intercept):
  """||Y||^2, the scale of a layer's residual; about its mean with an intercept, so that it does
  not depend on where the intercept is kept (a BatchNorm's moving mean shifts the target)."""
  total = stats["yy"] - (stats["t"] ** 2 / stats["n"] if with_intercept else 0.0)
  return max(float(np.sum(total)), 1e-30)


def _regularised(a, d, ridge):
  """a + ridge * mean(diag) on the first d diagonal entries: the intercept is not regularised."""
  scale = np.maximum(np.einsum("...ii->...i", a)[..., :d].mean(-1, keepdims=True), 1e-12)
  regularised = a.copy()
  idx = np.arange(d)
  regularised[..., idx, idx] += ridge * scale
  return regularised


def _residual(stats, a, b, w):
  """sum ||Y - X W||^2 from the statistics: yy - 2 tr(W^T B) + tr(W^T A W)."""
  return max(0.0, float(np.sum(stats["yy"]) - 2 * np.sum(w * b) + np.sum(w * (a @ w))))


def _current(item):
  """The layer's weights now, in the solve's layout (intercept last, if any)."""
  layer = item.layer
  kernel = layer_types.kernel(layer).numpy().astype(np.float64)
  if kind(layer) == "depthwise":
    channels = kernel.shape[-2]
    w = np.transpose(kernel.reshape(-1, channels, kernel.shape[-1]), (1, 0, 2))
  else:
    w = kernel.reshape(-1, kernel.shape[-1])
  if not intercept(item):
    return w
  if layer.get_config().get("use_bias"):
    bias = layer.bias.numpy().astype(np.float64).reshape(w.shape[:-2] + (1, w.shape[-1]))
  else:  # folded into the BatchNorm's moving mean: y + b - mean == y - (mean - b)
    bias = np.zeros(w.shape[:-2] + (1, w.shape[-1]))
  return np.concatenate([w, bias], -2)


def _assign(item, w):
  layer = item.layer
  kernel = layer_types.kernel(layer)
  weights, bias = (w[..., :-1, :], w[..., -1, :]) if intercept(item) else (w, None)
  if kind(layer) == "depthwise":
    weights = np.transpose(weights, (1, 0, 2))
  kernel.assign(weights.reshape(kernel.shape).astype(np.float32))
  if bias is None:
    return
  bias = bias.reshape(-1)
  if layer.get_config().get("use_bias"):
    layer.bias.assign(bias.astype(np.float32))
  else:
    item.batch_norm.moving_mean.assign((item.batch_norm.moving_mean.numpy() - bias)
                                       .astype(np.float32))


def _magnitude_mask(kernel_rows, target, m_by_n=None):
  """The kept entries (True) of `kernel_rows` [d, outputs]: all but the round(target * size) of
  least magnitude, over the whole layer, as tfmot's magnitude pruning chooses them; or, with
  `m_by_n` (m, n), all but the m of least magnitude in every block of n consecutive rows."""
  if m_by_n is not None:
    m, n = m_by_n
    blocks = np.abs(kernel_rows).T.reshape(kernel_rows.shape[1], -1, n)
    keep = np.ones(blocks.shape, bool)
    np.put_along_axis(keep, np.argsort(blocks, -1, kind="stable")[..., :m], False, -1)
    return keep.reshape(kernel_rows.shape[1], -1).T
  flat = np.abs(kernel_rows).reshape(-1)
  pruned = int(round(target * flat.size))
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind="stable")[:pruned]] = False
  return keep.reshape(kernel_rows.shape)


def _obs_mask(h, rhs, d, counts, m_by_n=None):
  """The kept inputs [d, outputs] when output j loses `counts[j]` of them by Optimal Brain
  Surgeon: from its least-squares solution, the input of least `w_p^2 / [H^-1]_pp` goes first,
  and the output's other weights and its H^-1 are updated exactly (OBC's row-wise greedy).
  With `m_by_n` (m, n), a block of n consecutive inputs that has lost m loses no more."""
  outputs = rhs.shape[-1]
  block = np.arange(d) // (m_by_n[1] if m_by_n else d)
  lost = np.zeros((outputs, block[-1] + 1), int)
  hinv = np.repeat(np.linalg.inv(h)[None], outputs, 0)  # [outputs, D, D], one per output
  w = np.einsum("jab,bj->ja", hinv, rhs)
  alive = np.ones((outputs, d), bool)
  counts = np.asarray(counts).reshape(-1)
  every = np.arange(outputs)
  for step in range(int(counts.max(initial=0))):
    active = counts > step  # the counts differ by one at most: all outputs but a few
    diag = np.einsum("jaa->ja", hinv)[:, :d]
    open_ = lost[:, block] < (m_by_n[0] if m_by_n else d)
    cost = np.where(alive & open_, w[:, :d] ** 2 / np.maximum(diag, 1e-30), np.inf)
    p = np.argmin(cost, 1)
    column = hinv[every, :, p]  # H^-1 is symmetric: its row p too
    scale = active / hinv[every, p, p]
    w -= (w[every, p] * scale)[:, None] * column
    hinv -= column[:, :, None] * (column * scale[:, None])[:, None, :]
    alive[every[active], p[active]] = False
    lost[every[active], block[p[active]]] += 1
  return alive.T


def _masked_solve(item, stats, a, b, ridge, target, mask, m_by_n=None):
  """The layer solved with `target` of its kernel zero: (W, info).

  The zeros are the kernel's entries of least magnitude now (the teacher's,
  for a student that starts from it), or, with mask="obs", chosen for each
  output by Optimal Brain Surgeon (`_obs_mask`, the same number per output);
  each output's surviving weights (and its intercept) are then the exact
  ridge least-squares solution, one small solve per output on its rows.
  """
  d = a.shape[-1] - int(intercept(item))
  current = _current(item)
  regularised = _regularised(a, d, ridge)
  if mask == "magnitude":
    keep = _magnitude_mask(current[..., :d, :], target, m_by_n)
  else:  # the zeros spread evenly over the outputs (of every channel, for a depthwise layer)
    outputs = int(np.prod(b.shape[:-2])) * b.shape[-1]
    total = int(round(target * outputs * d))
    counts = (total // outputs + (np.arange(outputs) < total % outputs)).reshape(
        b.shape[:-2] + (b.shape[-1],))
    keep = (_obs_mask(regularised, b, d, counts, m_by_n) if regularised.ndim == 2 else np.stack(
        [_obs_mask(h, rhs, d, c) for h, rhs, c in zip(regularised, b, counts)]))
  w = np.zeros_like(current)
  # Depthwise systems have a leading channel axis; others are one system.
  systems = [(regularised, b, keep, w)] if regularised.ndim == 2 else list(
      zip(regularised, b, keep, w))
  for h, rhs, kept, out in systems:
    for j in range(rhs.shape[-1]):
      rows = np.concatenate([np.flatnonzero(kept[:, j]), np.arange(d, h.shape[-1])])
      if rows.size:
        out[rows, j] = np.linalg.solve(h[np.ix_(rows, rows)], rhs[rows, j])
  return w, {"features": d, "constant_inputs": _constant_inputs(stats, a, d),
             "sparsity": float(1 - keep.sum() / keep.size)}


def _choose(item, stats, a, b, ridge):
  """Chooses the narrowed layer's channels and solves the layer on them; (W, info).

  Greedy backward elimination, exact for least squares: the channel whose
  weights (one group of rows of W, a row per tap) cost least to zero goes
  first, `dE = tr(W_g^T [H^-1]_gg^-1 W_g)`, and W and H^-1 are updated as
  Optimal Brain Surgeon does, a group at a time. The cost is weighted by the
  following BatchNorm's scale, as the neighbourhood's output sees the error.
  The narrowed layer and the channel-wise layers after it are then sliced
  from their teacher counterparts at the kept channels.
  """
  choice = item.choice
  channels = layer_types.kernel(choice.teacher).shape[-1]
  width = layer_types.kernel(choice.narrowed).shape[-1]
  d = a.shape[-1] - int(intercept(item))
  taps = d // channels
  weight = np.ones(b.shape[-1])
  norm = item.batch_norm
  if norm is not None:
    gamma = norm.gamma.numpy() if norm.gamma is not None else 1.0
    weight = gamma ** 2 / (norm.moving_variance.numpy() + norm.epsilon)
  h = _regularised(a, d, ridge)
  hinv = np.linalg.inv(h)
  w = hinv @ b
  groups = {q: np.arange(taps) * channels + q for q in range(channels)}
  while len(groups) > width:
    costs = {q: float(np.sum(weight * np.sum(w[g] * np.linalg.solve(hinv[np.ix_(g, g)], w[g]), 0)))
             for q, g in groups.items()}
    g = groups.pop(min(costs, key=costs.get))
    block = np.linalg.inv(hinv[np.ix_(g, g)])
    w -= hinv[:, g] @ (block @ w[g])
    hinv -= hinv[:, g] @ block @ hinv[g, :]
  keep = np.array(sorted(groups))
  rows = (np.arange(taps)[:, None] * channels + keep[None, :]).reshape(-1)
  rows = np.append(rows, np.arange(d, a.shape[-1]))  # the intercept, if any
  kept = np.linalg.solve(h[np.ix_(rows, rows)], b[rows])
  full = np.zeros_like(b)
  full[rows] = kept
  constant = _constant_inputs(stats, a, d, rows[:taps * width])
  narrowed = choice.teacher.get_weights()
  choice.narrowed.set_weights(builders.slice_outputs(choice.teacher, narrowed, keep))
  for student_layer, teacher_layer in choice.between:
    if teacher_layer.weights:
      student_layer.set_weights(
          builders.slice_outputs(teacher_layer, teacher_layer.get_weights(), keep))
  return kept, {"features": taps * width, "constant_inputs": constant, "error_before": None,
                "error_after": _residual(stats, a, b, full), "channels": keep.tolist()}
