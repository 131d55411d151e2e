"""Tests for keras_nd.reconstruct (closed-form solves of student layers)."""

import warnings
from unittest import mock

import numpy as np
import testing
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import layer_types as nd_layer_types
from keras_nd import least_squares, reconstruct_statistics, sparsity
from keras_nd._keras import keras, tf

L = keras.layers


def graph_kernel(layer):
  return nd_layer_types.kernel(layer).numpy()


def _source(teacher, hoods, x):
  return nd.ActivationSource(teacher, hoods, tf.data.Dataset.from_tensor_slices(x).batch(64),
                             verbose=0)


def _linear_teacher(seed=0):
  """Strided conv, depthwise, bias-free conv into a BatchNorm, Dense: every layer solvable."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((9, 9, 3))
  x = L.Conv2D(5, 3, strides=2, padding="same", name="c1")(inputs)
  x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
  x = L.Conv2D(4, 2, use_bias=False, name="c2")(x)
  x = L.BatchNormalization(name="bn")(x)
  x = L.Flatten(name="flat")(x)
  teacher = keras.Model(inputs, L.Dense(3, name="d")(x))
  rng = np.random.RandomState(seed)
  teacher.get_layer("bn").set_weights([rng.rand(4) + 0.5, rng.rand(4), rng.rand(4),
                                       rng.rand(4) + 0.5])
  return teacher


def _two_layer(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6,))
  hidden = L.Dense(8, activation="relu", name="inner")(inputs)
  return keras.Model(inputs, L.Dense(5, name="outer")(hidden))


def _one_layer(make, shape):
  """A teacher of the one layer `make()` on inputs of `shape`, and its neighbourhood."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input(shape)
  teacher = keras.Model(inputs, make()(inputs))
  return teacher, nd.split_layers(teacher, layer_types=(type(teacher.layers[-1]),))[0]


def _scaled_inputs(layer_index, seed):
  """`_two_layer`, the neighbourhood of its layer `layer_index`, inputs of very different
  scales (small weights on large inputs matter, which magnitude pruning misses and Optimal
  Brain Surgeon sees) and their source."""
  teacher = _two_layer()
  hood = nd.split_layers(teacher)[layer_index]
  rng = np.random.RandomState(seed)
  x = (rng.normal(size=(500, 6)) * np.array([30.0, 10.0, 3.0, 1.0, 0.3, 0.1])).astype("float32")
  return teacher, hood, x, _source(teacher, [hood], x)


def _solved_by_each_mask(hood, source, name, **settings):
  """{mask: (the solved kernel of layer `name`, its report)} for a clone of `hood` per mask."""
  solved = {}
  for mask in ("magnitude", "obs"):
    student = nd.students.clone(hood)
    report = nd.reconstruct({hood: student}, source, mask=mask, **settings)
    solved[mask] = (student.get_layer(name).get_weights()[0], report[hood.name]["layers"][name])
  return solved


class ReconstructTest(tf.test.TestCase, parameterized.TestCase):

  def test_recovers_the_kernels_of_a_linear_toy(self):
    # Every layer sees the teacher's own input once the layers before it are solved, so the
    # solve of a randomly initialised clone finds the teacher's kernels (the BatchNorm of the
    # clone is fresh: the Dense layer after it makes up for it).
    teacher = _linear_teacher()
    hoods = nd.split(teacher, boundaries=[])
    student = nd.students.clone(hoods[0], init="random")
    x = np.random.RandomState(1).normal(size=(300, 9, 9, 3)).astype("float32")
    report = nd.reconstruct({hoods[0]: student}, _source(teacher, hoods, x), ridge=1e-9)
    for name in ("c1", "dw"):
      for want, got in zip(teacher.get_layer(name).get_weights(),
                           student.get_layer(name + "_s").get_weights()):
        self.assertAllClose(want, got, atol=1e-4)
    entry = report[hoods[0].name]
    self.assertEqual([v["order"] for v in entry["layers"].values()], [1, 2, 3, 4])
    self.assertGreater(entry["error_before"], 0.1)
    self.assertLess(entry["error_after"], 1e-8)
    self.assertAllClose(student.predict(x[:20], verbose=0), teacher.predict(x[:20], verbose=0),
                        atol=1e-4)

  @parameterized.named_parameters(
      ("conv1d_causal_dilated", lambda: L.Conv1D(3, 3, padding="causal", dilation_rate=2),
       (12, 2)),
      ("conv1d_strided", lambda: L.Conv1D(3, 2, strides=2), (12, 2)),
      ("conv2d_dilated", lambda: L.Conv2D(3, 3, padding="same", dilation_rate=2), (7, 7, 2)),
      ("conv3d", lambda: L.Conv3D(3, 2, strides=(1, 2, 1), padding="same"), (4, 5, 4, 2)),
      ("depthwise1d", lambda: L.DepthwiseConv1D(3, padding="same"), (10, 3)),
      ("depthwise2d_dilated", lambda: L.DepthwiseConv2D(3, dilation_rate=2, depth_multiplier=2),
       (7, 7, 2)),
      ("dense_on_sequences", lambda: L.Dense(3), (5, 4)))
  def test_recovers_each_kind_of_layer(self, make, shape):
    teacher, hood = _one_layer(make, shape)
    student = nd.students.clone(hood, init="random")
    x = np.random.RandomState(0).normal(size=(80,) + shape).astype("float32")
    nd.reconstruct({hood: student}, _source(teacher, [hood], x), ridge=1e-9, errors=False)
    for want, got in zip(teacher.layers[-1].get_weights(), student.layers[-1].get_weights()):
      self.assertAllClose(want, got, atol=1e-4)

  def test_streaming_equals_the_in_memory_solve(self):
    # A bottleneck's outer layer, solved on the student's own hidden units: the streamed
    # statistics of any batch size give the ridge solution computed on all the data at once.
    teacher = _two_layer()
    hood = nd.split(teacher, boundaries=[])[0]
    x = np.random.RandomState(2).normal(size=(257, 6)).astype("float32")
    ridge = 1e-2
    solved = []
    for batch_size in (256, 7):
      student = nd.students.bottleneck(hood, 0.5, init="teacher")
      nd.reconstruct({hood: student}, _source(teacher, [hood], x), ridge=ridge,
                     batch_size=batch_size, errors=False)
      solved.append(student.get_layer("outer_s").get_weights())
    hidden = keras.Model(student.inputs, student.get_layer("outer_s").input).predict(x, verbose=0)
    target = teacher.predict(x, verbose=0)
    a = np.concatenate([hidden, np.ones((len(x), 1))], 1).astype(np.float64)
    gram = a.T @ a
    lam = ridge * np.mean(np.diag(gram)[:-1])
    gram[np.arange(4), np.arange(4)] += lam
    w = np.linalg.solve(gram, a.T @ target)
    for weights in solved:
      self.assertAllClose(weights[0], w[:-1], atol=1e-4)
      self.assertAllClose(weights[1], w[-1], atol=1e-4)

  def test_sequential_solve_beats_the_sliced_teacher(self):
    # The outer layer of a narrowed student, solved on its own input, is closer to the teacher
    # than the teacher's outer weights sliced to the kept units.
    teacher = _two_layer()
    hood = nd.split(teacher, boundaries=[])[0]
    student = nd.students.bottleneck(hood, 0.5, init="teacher")
    x = np.random.RandomState(3).normal(size=(200, 6)).astype("float32")
    report = nd.reconstruct({hood: student}, _source(teacher, [hood], x))
    entry = report[hood.name]
    self.assertEqual(list(entry["layers"]), ["outer_s"])  # the narrowed layer is kept
    self.assertLess(entry["error_after"], 0.8 * entry["error_before"])
    layer = entry["layers"]["outer_s"]
    self.assertLess(layer["error_after"], 0.8 * layer["error_before"])

  def test_solve_is_idempotent_through_batch_norm(self):
    # A bias-free layer's intercept goes into its BatchNorm's moving mean; solving again moves
    # nothing.
    teacher = testing.tiny_resnet()
    units = nd.split(teacher)[1:-1]
    students = {h: nd.students.bottleneck(h, 0.5, init="teacher") for h in units}
    x, _ = testing.images(64)
    source = _source(teacher, units, x)
    first = nd.reconstruct(students, source)
    weights = [s.get_weights() for s in students.values()]
    second = nd.reconstruct(students, source)
    for before, student in zip(weights, students.values()):
      for a, b in zip(before, student.get_weights()):
        self.assertAllClose(a, b, atol=1e-3)  # float32 statistics
    for name, entry in first.items():
      self.assertLess(entry["error_after"], entry["error_before"])
      self.assertAllClose(second[name]["error_after"], entry["error_after"], rtol=1e-3)

  def test_greedy_channels_keep_the_units_the_output_needs(self):
    # The outer layer reads only four of the eight hidden units, whose kernels are the
    # smallest: L1 keeps the wrong four, the greedy choice the right ones, and then
    # reproduces the teacher exactly.
    teacher = _two_layer()
    needed = [1, 3, 4, 6]
    inner, outer = teacher.get_layer("inner"), teacher.get_layer("outer")
    kernel, bias = inner.get_weights()
    unneeded = [i for i in range(8) if i not in needed]
    kernel[:, unneeded] *= 10.0
    inner.set_weights([kernel, bias])
    kernel, bias = outer.get_weights()
    kernel[unneeded] = 0.0
    outer.set_weights([kernel, bias])
    hood = nd.split(teacher, boundaries=[])[0]
    x = np.random.RandomState(5).normal(size=(300, 6)).astype("float32")
    source = _source(teacher, [hood], x)
    l1 = nd.students.bottleneck(hood, 0.5, init="teacher")
    plain = nd.reconstruct({hood: l1}, source)[hood.name]
    greedy_student = nd.students.bottleneck(hood, 0.5, init="teacher")
    greedy = nd.reconstruct({hood: greedy_student}, source, channels="greedy", ridge=1e-9)
    entry = greedy[hood.name]
    self.assertEqual(entry["layers"]["outer_s"]["channels"], needed)
    self.assertIsNone(entry["layers"]["outer_s"]["error_before"])
    self.assertLess(entry["error_after"], 1e-6)
    self.assertGreater(plain["error_after"], 1e-3)
    self.assertAllClose(greedy_student.get_layer("inner_s").get_weights()[0],
                        inner.get_weights()[0][:, needed])
    self.assertAllClose(greedy_student.predict(x[:10], verbose=0),
                        teacher.predict(x[:10], verbose=0), atol=1e-4)

  def test_greedy_channels_slice_the_batch_norm_between_and_beat_l1(self):
    # In residual units (conv-BN-ReLU-conv-BN) the chosen channels reach the second
    # convolution through a sliced BatchNorm: solving the result again changes nothing, so the
    # student's own input is the teacher's at the kept channels.
    teacher = testing.tiny_resnet()
    units = nd.split(teacher)[1:-1]
    x, _ = testing.images(64)
    source = _source(teacher, units, x)
    l1 = {h: nd.students.bottleneck(h, 0.5, init="teacher") for h in units}
    plain = nd.reconstruct(l1, source)
    greedy_students = {h: nd.students.bottleneck(h, 0.5, init="teacher") for h in units}
    greedy = nd.reconstruct(greedy_students, source, channels="greedy")
    again = nd.reconstruct(greedy_students, source)
    for hood in units:
      name = hood.name
      self.assertLessEqual(greedy[name]["error_after"], plain[name]["error_after"] * 1.001)
      (layer, entry), = greedy[name]["layers"].items()
      self.assertLen(entry["channels"], nd.students.scaled_width(
          teacher.get_layer(layer[:-2]).input_shape[-1], 0.5))
      self.assertAllClose(again[name]["layers"][layer]["error_before"], entry["error_after"],
                          rtol=1e-2, atol=1e-6)
    self.assertLess(sum(g["error_after"] for g in greedy.values()),
                    sum(p["error_after"] for p in plain.values()))

  def test_several_widths_at_once_equal_each_solved_alone(self):
    # Candidates of two widths in one call share the teacher's statistics; each gets what it
    # gets when solved alone.
    teacher = testing.tiny_resnet()
    units = nd.split(teacher)[1:-1]
    x, _ = testing.images(48)
    source = _source(teacher, units, x)
    together = [{h: nd.students.bottleneck(h, k, init="teacher") for h in units}
                for k in (0.25, 0.5)]
    reports = nd.reconstruct(together, source, channels="greedy")
    self.assertLen(reports, 2)
    for k, students, report in zip((0.25, 0.5), together, reports):
      alone = {h: nd.students.bottleneck(h, k, init="teacher") for h in units}
      single = nd.reconstruct(alone, source, channels="greedy")
      for hood in units:
        self.assertAllClose(report[hood.name]["error_after"], single[hood.name]["error_after"],
                            rtol=1e-4)
        for a, b in zip(students[hood].get_weights(), alone[hood].get_weights()):
          self.assertAllClose(a, b, atol=1e-5)

  @parameterized.named_parameters(
      ("conv2d_strided_same",
       lambda: L.Conv2D(3, 3, strides=2, padding="same", activation="relu"), (7, 6, 2)),
      ("conv1d_causal",
       lambda: L.Conv1D(3, 3, padding="causal", dilation_rate=2, activation="relu"), (11, 2)),
      ("depthwise2d", lambda: L.DepthwiseConv2D(3, padding="same", activation="relu"), (5, 5, 2)),
      ("dense_on_sequences", lambda: L.Dense(3, activation="relu"), (5, 4)))
  def test_subsampled_statistics_visit_every_position_once(self, make, shape):
    # Over subsample ** spatial axes batches the sampled positions cover every position
    # exactly once: on one batch served four times, the solve from every other position is the
    # solve from all of them; on the batch served once it is not. (The teacher's ReLU makes the
    # fit inexact, so the solution depends on every row.)
    teacher, hood = _one_layer(make, shape)
    x = np.random.RandomState(0).normal(size=(16,) + shape).astype("float32")

    def solved(inputs, subsample):
      student = nd.students.clone(hood)
      nd.reconstruct({hood: student}, _source(teacher, [hood], inputs), batch_size=len(x),
                     errors=False, subsample=subsample)
      return student.layers[-1].get_weights()

    full = solved(x, 1)
    for want, got in zip(full, solved(np.concatenate([x] * 4), 2)):
      self.assertAllClose(want, got, rtol=1e-4, atol=1e-4)
    self.assertNotAllClose(full[0], solved(x, 2)[0], atol=1e-3)

  def test_subsampled_solve_recovers_a_linear_toy(self):
    teacher = _linear_teacher()
    hoods = nd.split(teacher, boundaries=[])
    student = nd.students.clone(hoods[0], init="random")
    x = np.random.RandomState(1).normal(size=(300, 9, 9, 3)).astype("float32")
    report = nd.reconstruct({hoods[0]: student}, _source(teacher, hoods, x), ridge=1e-9,
                            subsample=2)
    self.assertLess(report[hoods[0].name]["error_after"], 1e-8)

  @parameterized.named_parameters(
      ("channels", {"channels": "thinet"}, "channels must be None or 'greedy'"),
      ("subsample", {"subsample": 0}, "subsample must be a positive integer"))
  def test_bad_settings_are_named(self, kwargs, fragment):
    teacher = _two_layer()
    hood = nd.split(teacher, boundaries=[])[0]
    with self.assertRaisesRegex(ValueError, fragment):
      nd.reconstruct({hood: nd.students.clone(hood)},
                     _source(teacher, [hood], np.zeros((4, 6), "float32")), **kwargs)

  def test_a_pruned_layer_keeps_exactly_its_mask_and_solves_the_rest(self):
    # Half of the kernel, the teacher's entries of least magnitude, is zero; every output's
    # surviving weights are the ridge solution on its own kept inputs, computed in memory.
    teacher = _two_layer()
    hood = nd.split_layers(teacher)[1]  # the outer Dense, on the hidden units
    x = np.random.RandomState(6).normal(size=(400, 6)).astype("float32")
    student = nd.students.clone(hood)
    ridge = 1e-3
    report = nd.reconstruct({hood: student}, _source(teacher, [hood], x), ridge=ridge,
                            sparsity=0.5)
    kernel, bias = student.get_layer("outer_s").get_weights()
    teacher_kernel = teacher.get_layer("outer").get_weights()[0]
    self.assertEqual(int(np.sum(kernel == 0)), kernel.size // 2)
    smallest = np.argsort(np.abs(teacher_kernel).reshape(-1), kind="stable")[:kernel.size // 2]
    self.assertAllEqual(np.flatnonzero(kernel.reshape(-1) == 0), np.sort(smallest))
    hidden = keras.Model(teacher.inputs, teacher.get_layer("outer").input).predict(x, verbose=0)
    target = teacher.predict(x, verbose=0)
    a = np.concatenate([hidden, np.ones((len(x), 1))], 1).astype(np.float64)
    gram = a.T @ a
    gram[np.arange(8), np.arange(8)] += ridge * np.mean(np.diag(gram)[:-1])
    for j in range(kernel.shape[1]):
      rows = np.concatenate([np.flatnonzero(kernel[:, j] != 0), [8]])
      w = np.linalg.solve(gram[np.ix_(rows, rows)], a[:, rows].T @ target[:, j])
      self.assertAllClose(kernel[rows[:-1], j], w[:-1], atol=1e-4)
      self.assertAllClose(bias[j], w[-1], atol=1e-4)
    entry = report[hood.name]["layers"]["outer_s"]
    self.assertEqual(entry["sparsity"], 0.5)
    # Better than the teacher's kernel with the same zeros and nothing re-solved.
    pruned = teacher_kernel * (kernel != 0)
    naive = np.sum((hidden @ pruned + teacher.get_layer("outer").get_weights()[1] - target) ** 2)
    solved = np.sum((student.predict(hidden, verbose=0) - target) ** 2)
    self.assertLess(solved, 0.8 * naive)

  def test_an_obs_mask_beats_magnitude_where_inputs_differ_in_scale(self):
    _, hood, _, source = _scaled_inputs(0, seed=7)  # the inner Dense, on the raw inputs
    solved = _solved_by_each_mask(hood, source, "inner_s", sparsity=0.5)
    for mask, (kernel, _) in solved.items():
      self.assertEqual(int(np.sum(kernel == 0)), kernel.size // 2, mask)
    self.assertLess(solved["obs"][1]["error_after"], solved["magnitude"][1]["error_after"])
    with self.assertRaisesRegex(ValueError, "mask must be 'magnitude' or 'obs'"):
      nd.reconstruct({hood: nd.students.clone(hood)}, source, sparsity=0.5, mask="random")

  def test_pruned_convolutions_and_depthwise_layers_reach_their_exact_sparsity(self):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(5, 3, padding="same", name="c")(inputs)
    teacher = keras.Model(inputs, L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x))
    hoods = nd.split_layers(teacher, layer_types=(L.Conv2D, L.DepthwiseConv2D))
    students = {h: nd.students.clone(h) for h in hoods}
    x = np.random.RandomState(0).normal(size=(64, 6, 6, 3)).astype("float32")
    for mask in ("magnitude", "obs"):
      students = {h: nd.students.clone(h) for h in hoods}
      report = nd.reconstruct(students, _source(teacher, hoods, x),
                              sparsity={"c": 0.3, "dw": 0.7}, mask=mask)
      for hood, student in students.items():
        layer = student.layers[-1]
        kernel = graph_kernel(layer)
        want = {"c_s": 0.3, "dw_s": 0.7}[layer.name]
        self.assertEqual(int(np.sum(kernel == 0)), int(round(want * kernel.size)),
                         (mask, layer.name))
        self.assertLess(report[hood.name]["error_after"], 1.0)
    with self.assertRaisesRegex(ValueError, "channels or sparsity, not both"):
      nd.reconstruct(students, _source(teacher, hoods, x), sparsity=0.5, channels="greedy")
    with self.assertRaisesRegex(ValueError, r"sparsity must be a fraction in \[0, 1\)"):
      nd.reconstruct(students, _source(teacher, hoods, x), sparsity=1.0)

  def test_two_by_four_blocks_along_the_input_channels(self):
    # The outer Dense has 8 inputs: two blocks of 4 per output, each with exactly 2 zeros,
    # chosen by magnitude or by OBS within the block; the survivors solved as before.
    teacher, hood, x, source = _scaled_inputs(1, seed=8)
    solved = _solved_by_each_mask(hood, source, "outer_s", m_by_n=(2, 4))
    for mask, (kernel, entry) in solved.items():
      zeros = np.count_nonzero(kernel.T.reshape(5, 2, 4) == 0, axis=-1)
      self.assertAllEqual(zeros, np.full((5, 2), 2), mask)
      self.assertEqual(entry["sparsity"], 0.5)
    teacher_kernel = np.abs(teacher.get_layer("outer").get_weights()[0])
    kept = solved["magnitude"][0] != 0
    for j in range(5):
      for block in (slice(0, 4), slice(4, 8)):  # magnitude keeps the two largest of each block
        largest = np.sort(np.argsort(teacher_kernel[block, j], kind="stable")[2:])
        self.assertAllEqual(np.flatnonzero(kept[block, j]), largest)
    errors = {mask: entry["error_after"] for mask, (_, entry) in solved.items()}
    self.assertLessEqual(errors["obs"], errors["magnitude"] + 1e-9)
    student = nd.students.clone(hood)
    with self.assertRaisesRegex(ValueError, "sparsity or m_by_n, not both"):
      nd.reconstruct({hood: student}, source, m_by_n=(2, 4), sparsity=0.5)
    with self.assertRaisesRegex(ValueError, r"m_by_n must be \(m, n\)"):
      nd.reconstruct({hood: student}, source, m_by_n=(4, 2))
    inner = nd.split_layers(teacher)[0]  # 6 inputs: blocks of 4 do not fit
    with self.assertRaisesRegex(ValueError, "6 input channels are not a multiple of 4"):
      nd.reconstruct({inner: nd.students.clone(inner)}, _source(teacher, [inner], x),
                     m_by_n=(2, 4))

  @parameterized.named_parameters(
      ("m_not_below_n", (4, 2)), ("zero_m", (0, 4)), ("bools", (True, 2)), ("one_number", (2,)),
      ("floats", (2.0, 4.0)), ("a_string", "2:4"))
  def test_check_m_by_n_names_what_it_got(self, m_by_n):
    with self.assertRaisesRegex(ValueError, r"m_by_n must be \(m, n\) with 0 < m < n"):
      least_squares.check_m_by_n(m_by_n)

  def test_check_m_by_n_gives_a_tuple_of_ints(self):
    self.assertEqual(least_squares.check_m_by_n([2, np.int64(4)]), (2, 4))

  def test_refuses_a_student_pruned_while_it_trains(self):
    teacher = _two_layer()
    hood = nd.split_layers(teacher)[0]
    student = sparsity.sparse_student(hood, 0.5, steps=10)
    with self.assertRaisesRegex(ValueError, "pruned while it trains"):
      nd.reconstruct({hood: student}, _source(teacher, [hood], np.zeros((4, 6), "float32")))

  def test_rejects_a_student_layer_without_teacher_counterpart(self):
    teacher = _two_layer()
    hood = nd.split(teacher, boundaries=[])[0]
    inputs = keras.Input((6,))
    student = keras.Model(inputs, L.Dense(5, name="mystery")(inputs))
    with self.assertRaisesRegex(ValueError, "'mystery'.*no teacher counterpart"):
      nd.reconstruct({hood: student}, _source(teacher, [hood], np.zeros((4, 6), "float32")))

  def test_rejects_a_source_of_other_neighbourhoods(self):
    teacher = testing.tiny_resnet()
    units = nd.split(teacher)[1:-1]
    x, _ = testing.images(16)
    source = _source(teacher, units[:1], x)
    students = {units[1]: nd.students.clone(units[1])}
    with self.assertRaisesRegex(ValueError, f"does not serve neighbourhood '{units[1].name}'"):
      nd.reconstruct(students, source)

  def test_rejects_a_builder_instead_of_a_model(self):
    teacher = _two_layer()
    hood = nd.split(teacher, boundaries=[])[0]
    with self.assertRaisesRegex(TypeError, "must be a functional tf_keras Model"):
      nd.reconstruct({hood: nd.students.clone}, _source(teacher, [hood], np.zeros((4, 6),
                                                                                  "float32")))

  def test_rank_deficient_problem_is_regularised_and_said(self):
    # Two inputs are always zero: their gram rows vanish. With a ridge the solve gives them no
    # weight and reports them; without one it warns and falls back to minimum-norm least squares.
    teacher = _two_layer()
    hood = nd.split_layers(teacher)[0]
    x = np.random.RandomState(4).normal(size=(100, 6)).astype("float32")
    x[:, :2] = 0.0
    student = nd.students.clone(hood, init="random")
    report = nd.reconstruct({hood: student}, _source(teacher, [hood], x), errors=False)
    self.assertEqual(report[hood.name]["layers"]["inner_s"]["constant_inputs"], 2)
    self.assertAllClose(student.get_layer("inner_s").get_weights()[0][:2], np.zeros((2, 8)))
    student = nd.students.clone(hood, init="random")
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      nd.reconstruct({hood: student}, _source(teacher, [hood], x), ridge=0, errors=False)
    self.assertTrue(any("singular" in str(w.message) and "inner_s" in str(w.message)
                        for w in caught))
    self.assertTrue(np.all(np.isfinite(student.get_layer("inner_s").get_weights()[0])))

  def test_refuses_a_layer_too_large_to_solve(self):
    teacher = _two_layer()
    hood = nd.split_layers(teacher)[0]
    student = nd.students.clone(hood)
    with mock.patch.object(reconstruct_statistics, "MAX_FEATURES", 4):
      with self.assertRaisesRegex(ValueError, "'inner_s'.*6 inputs per output.*at most 3"):
        nd.reconstruct({hood: student}, _source(teacher, [hood], np.ones((4, 6), "float32")))


if __name__ == "__main__":
  tf.test.main()
