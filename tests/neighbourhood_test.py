"""Tests for keras_nd.neighbourhood: `split`, `split_layers` and `Neighbourhood`."""

import re

import numpy as np
from absl.testing import parameterized

import keras_nd as nd
from keras_nd import models
from keras_nd._keras import keras, tf
from tests import testing

L = keras.layers

_TEACHERS = ("resnet20", "resnet50_v1", "keras_resnet50", "keras_mobilenet_v2")
_CIFAR_UNITS = [f"stage{s}_unit{u}" for s in (1, 2, 3) for u in (1, 2, 3)]
# ResNet-50 has 3, 4, 6 and 3 bottleneck units per stage (He et al. 2016, Table 1).
_RESNET50_UNITS = [(s, u) for s, n in enumerate((3, 4, 6, 3), start=1) for u in range(1, n + 1)]
# keras.applications.MobileNetV2's blocks with a residual Add (same shape in and out).
_MOBILENET_V2_RESIDUAL_BLOCKS = (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)
# A residual unit's layers share a name prefix in each of the reference teachers.
_UNIT_PREFIX = re.compile(r"^(stage\d+_unit\d+|conv\d_block\d+|block_\d+)_")


def _tensors(node):
  return tf.nest.flatten(node.outputs)


def _is_input(layer):
  return isinstance(layer, L.InputLayer)


def _layers_of(hoods):
  return [layer for hood in hoods for layer in hood.layers]


def _names(hood):
  return [layer.name for layer in hood.layers]


def _residual_units(model):
  """{unit prefix: layer names} for the units of `model` that hold an Add."""
  units = {}
  for layer in model.layers:
    match = _UNIT_PREFIX.match(layer.name)
    if match:
      units.setdefault(match.group(1), []).append(layer.name)
  return {unit: names for unit, names in units.items()
          if any(isinstance(model.get_layer(n), L.Add) for n in names)}


class SplitReferenceTeachersTest(tf.test.TestCase, parameterized.TestCase):
  """`split` on the project's ResNets and on keras.applications models."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.teachers = testing.reference_teachers()
    cls.hoods = {name: nd.split(model) for name, model in cls.teachers.items()}

  def test_split_resnet20_gives_stem_nine_units_and_head(self):
    names = [h.name for h in self.hoods["resnet20"]]
    self.assertEqual(names, ["stem_relu"] + [f"{u}_out" for u in _CIFAR_UNITS] + ["head_logits"])

  def test_split_resnet50_v1_gives_stem_sixteen_units_and_head(self):
    names = [h.name for h in self.hoods["resnet50_v1"]]
    self.assertEqual(names, ["stem_pool"] + [f"stage{s}_unit{u}_out" for s, u in _RESNET50_UNITS] +
                     ["head_logits"])

  def test_split_keras_resnet50_gives_stem_sixteen_blocks_and_head(self):
    names = [h.name for h in self.hoods["keras_resnet50"]]
    # keras.applications names stage s (1..4) "conv{s + 1}".
    self.assertEqual(names, ["pool1_pool"] +
                     [f"conv{s + 1}_block{u}_out" for s, u in _RESNET50_UNITS] + ["predictions"])

  def test_split_mobilenet_v2_gives_residual_blocks_and_weighted_layers_of_the_chain(self):
    hoods = self.hoods["keras_mobilenet_v2"]
    # 33 = stem conv 1 + expanded_conv (depthwise, project) 2 + 6 non-residual
    # blocks x 3 convs (expand, depthwise, project) + 10 residual blocks
    # + Conv_1 1 + head 1 (keras_applications/mobilenet_v2.py).
    self.assertLen(hoods, 33)
    self.assertEqual(hoods[0].name, "Conv1_relu")
    self.assertEqual(hoods[-1].name, "predictions")
    self.assertEqual([h.layers[-1].name for h in hoods if h.name.endswith("_add")],
                     [f"block_{b}_add" for b in _MOBILENET_V2_RESIDUAL_BLOCKS])

  @parameterized.named_parameters((name, name) for name in _TEACHERS)
  def test_split_covers_every_layer_once_in_chained_order(self, name):
    model, hoods = self.teachers[name], self.hoods[name]
    self.assertEqual([h.index for h in hoods], list(range(len(hoods))))
    covered = [id(layer) for layer in _layers_of(hoods)]
    self.assertCountEqual(covered, [id(layer) for layer in model.layers if not _is_input(layer)])
    self.assertIs(hoods[0].input_tensor, model.inputs[0])
    self.assertIs(hoods[-1].output_tensor, model.outputs[0])
    for before, after in zip(hoods, hoods[1:]):
      self.assertIs(before.output_tensor, after.input_tensor, msg=f"{before} -> {after}")

  @parameterized.named_parameters((name, name) for name in _TEACHERS)
  def test_split_boundaries_are_cuts(self, name):
    # Each neighbourhood is a closed sub-graph: its nodes, in order, read only
    # its input tensor and what its own earlier nodes made, and nothing it makes
    # except its output tensor is read outside it. With the chaining above,
    # every path from the model's input to its output goes through each
    # boundary tensor.
    hoods = self.hoods[name]
    for hood in hoods:
      available = {id(hood.input_tensor)}
      for node in hood.nodes:
        for tensor in node.keras_inputs:
          self.assertIn(id(tensor), available, msg=f"{hood}: layer '{node.layer.name}' reads "
                        f"'{tensor.name}' from outside")
        available.update(id(t) for t in _tensors(node))
      inner = available - {id(hood.input_tensor), id(hood.output_tensor)}
      for other in hoods:
        if other is not hood:
          read = {id(t) for node in other.nodes for t in node.keras_inputs}
          self.assertEmpty(read & inner, msg=f"{other} reads a tensor from inside {hood}")

  @parameterized.named_parameters((name, name) for name in _TEACHERS)
  def test_split_keeps_each_residual_unit_whole_in_its_own_neighbourhood(self, name):
    units = _residual_units(self.teachers[name])
    self.assertNotEmpty(units)
    hood_of = {layer.name: h for h in self.hoods[name] for layer in h.layers}
    for unit, layer_names in units.items():
      hood = hood_of[layer_names[0]]
      self.assertTrue(all(hood_of[n] is hood for n in layer_names), msg=f"{unit} is split")
      self.assertEqual({_UNIT_PREFIX.match(layer.name).group(1) for layer in hood.layers}, {unit})

  @parameterized.named_parameters((name, name) for name in _TEACHERS)
  def test_split_teacher_submodels_reproduce_intermediate_activations(self, name):
    model, hoods = self.teachers[name], self.hoods[name]
    probe = keras.Model(model.inputs, [model.get_layer(h.name).output for h in hoods])
    x = np.random.RandomState(0).normal(size=(2,) + model.input_shape[1:]).astype("float32")
    activations = [x] + [a.numpy() for a in probe(x, training=False)]
    for i, hood in enumerate(hoods):
      got = hood.teacher(activations[i], training=False)
      self.assertAllClose(got, activations[i + 1], atol=1e-5, rtol=1e-5, msg=str(hood))

  def test_split_group_3_merges_three_units_of_resnet50_v1(self):
    # 18 neighbourhoods (stem, 16 units, head) in 6 groups of 3; each is named
    # after its last layer.
    hoods = nd.split(self.teachers["resnet50_v1"], group=3)
    self.assertEqual([h.name for h in hoods], [
        "stage1_unit2_out", "stage2_unit2_out", "stage3_unit1_out", "stage3_unit4_out",
        "stage4_unit1_out", "head_logits"
    ])
    single = self.hoods["resnet50_v1"]
    for i, hood in enumerate(hoods):
      self.assertEqual(hood.layers, _layers_of(single[3 * i:3 * i + 3]))
      self.assertIs(hood.input_tensor, single[3 * i].input_tensor)

  def test_split_group_equal_to_the_count_gives_the_whole_model(self):
    model = self.teachers["resnet20"]
    (hood,) = nd.split(model, group=11)
    self.assertEqual(hood.name, "head_logits")
    self.assertLen(hood.layers, len(model.layers) - 1)
    self.assertIs(hood.input_tensor, model.inputs[0])
    self.assertIs(hood.output_tensor, model.outputs[0])

  def test_split_rejects_group_that_does_not_divide_and_lists_possible_values(self):
    # 11 neighbourhoods of ResNet-20 (prime): only 1 and 11 divide.
    with self.assertRaisesRegex(ValueError, r"group=2.*11.*\[1, 11\]"):
      nd.split(self.teachers["resnet20"], group=2)


class SplitSmallModelsTest(tf.test.TestCase, parameterized.TestCase):
  """`split` on tiny models: merging, grouping, explicit boundaries, attributes."""

  def test_split_never_leaves_parameter_free_layers_alone(self):
    hoods = nd.split(testing.tiny_chain())
    self.assertEqual([_names(h) for h in hoods],
                     [["c1", "bn1", "r1", "p1"], ["c2", "r2"], ["flat", "logits"]])
    self.assertEqual([h.name for h in hoods], ["p1", "r2", "logits"])

  def test_neighbourhood_attributes_describe_its_place_in_the_teacher(self):
    teacher = testing.tiny_chain()
    hoods = nd.split(teacher)
    # tiny_chain: 8x8x3 image, c1 4 channels, 2x2 pooling, c2 6 channels, 3 classes.
    self.assertEqual([(h.input_shape, h.output_shape) for h in hoods],
                     [((None, 8, 8, 3), (None, 4, 4, 4)), ((None, 4, 4, 4), (None, 4, 4, 6)),
                      ((None, 4, 4, 6), (None, 3))])
    for i, hood in enumerate(hoods):
      self.assertEqual(hood.index, i)
      self.assertIs(hood.model, teacher)
      self.assertEqual(hood.teacher.input_shape, hood.input_shape)
      self.assertEqual(hood.teacher.output_shape, hood.output_shape)
      # The sub-model shares the teacher's layers (and so its weights).
      self.assertEqual([id(layer) for layer in hood.teacher.layers if not _is_input(layer)],
                       [id(layer) for layer in hood.layers])
    self.assertIs(hoods[0].teacher, hoods[0].teacher)

  def test_following_gives_the_next_neighbourhoods_of_the_split(self):
    hoods = nd.split(testing.tiny_resnet())
    self.assertLen(hoods, 5)
    self.assertEqual(hoods[0].following(2), hoods[1:3])
    self.assertEqual(hoods[1].following(10), hoods[2:])
    self.assertEqual(hoods[3].following(1), [hoods[4]])
    self.assertEqual(hoods[4].following(1), [])
    self.assertEqual(hoods[2].following(0), [])

  def test_split_sequential_with_input_cuts_after_each_weighted_layer(self):
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, name="d1"), L.ReLU(name="r"), L.Dense(2, name="d2")])
    hoods = nd.split(model)
    self.assertEqual([_names(h) for h in hoods], [["d1", "r"], ["d2"]])

  def test_split_gives_unique_names_when_a_layer_is_called_twice(self):
    inputs = keras.Input((4,))
    shared = L.Dense(4, name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    hoods = nd.split(model)
    self.assertLen(hoods, 2)
    # Neighbourhood.name is documented unique within one split; the
    # distiller and ActivationSource key activations by it.
    self.assertLen({h.name for h in hoods}, 2, msg=str(hoods))

  @parameterized.named_parameters(
      # ResNet-14: stem, 2 units per stage, head = 8 neighbourhoods.
      ("group_2", 2, ["stage1_unit1_out", "stage2_unit1_out", "stage3_unit1_out", "head_logits"]),
      ("group_4", 4, ["stage2_unit1_out", "head_logits"]),
      ("group_8", 8, ["head_logits"]),
  )
  def test_split_group_merges_consecutive_neighbourhoods(self, group, names):
    model = models.resnet_v1(depth=14, input_shape=(8, 8, 3), num_classes=3)
    single = nd.split(model)
    self.assertLen(single, 8)
    hoods = nd.split(model, group=group)
    self.assertEqual([h.name for h in hoods], names)
    self.assertEqual([h.index for h in hoods], list(range(len(names))))
    for i, hood in enumerate(hoods):
      self.assertEqual(hood.layers, _layers_of(single[group * i:group * (i + 1)]))
      self.assertIs(hood.input_tensor, single[group * i].input_tensor)
      self.assertIs(hood.output_tensor, single[group * (i + 1) - 1].output_tensor)
    self.assertEqual(hoods[0].following(1), hoods[1:2])

  def test_split_group_3_on_resnet14_lists_divisors_of_8(self):
    model = models.resnet_v1(depth=14, input_shape=(8, 8, 3), num_classes=3)
    with self.assertRaisesRegex(ValueError, r"group=3.*\[1, 2, 4, 8\]"):
      nd.split(model, group=3)

  @parameterized.named_parameters(("zero", 0), ("negative", -1), ("bool", True), ("float", 1.5),
                                  ("string", "2"))
  def test_split_rejects_group_that_is_not_a_positive_integer(self, group):
    with self.assertRaisesRegex(ValueError, "group"):
      nd.split(testing.tiny_chain(), group=group)

  def test_split_boundaries_cut_at_the_given_layers(self):
    model = testing.tiny_resnet()
    hoods = nd.split(model, boundaries=["stage2_unit1_out", "stem_relu"])
    self.assertEqual([h.name for h in hoods], ["stem_relu", "stage2_unit1_out", "head_logits"])
    self.assertEqual(_names(hoods[0]), ["stem_conv", "stem_bn", "stem_relu"])
    self.assertEqual({_UNIT_PREFIX.match(layer.name).group(1) for layer in hoods[1].layers},
                     {"stage1_unit1", "stage2_unit1"})
    self.assertIs(hoods[1].input_tensor, model.get_layer("stem_relu").output)
    self.assertIs(hoods[1].output_tensor, model.get_layer("stage2_unit1_out").output)
    self.assertIs(hoods[2].output_tensor, model.outputs[0])
    self.assertEqual(hoods[0].following(5), hoods[1:])

  def test_split_boundaries_may_isolate_parameter_free_layers(self):
    # Explicit boundaries are taken as given, without merging.
    hoods = nd.split(testing.tiny_chain(), boundaries=["bn1", "r1"])
    self.assertEqual([_names(h) for h in hoods],
                     [["c1", "bn1"], ["r1"], ["p1", "c2", "r2", "flat", "logits"]])

  def test_split_empty_boundaries_give_one_neighbourhood(self):
    model = testing.tiny_resnet()
    (hood,) = nd.split(model, boundaries=[])
    self.assertLen(hood.layers, len(model.layers) - 1)
    self.assertIs(hood.input_tensor, model.inputs[0])

  def test_split_rejects_unknown_boundary_naming_it(self):
    with self.assertRaisesRegex(ValueError, "stage9_unit1_out"):
      nd.split(testing.tiny_resnet(), boundaries=["stem_relu", "stage9_unit1_out"])

  @parameterized.named_parameters(("conv_inside_unit", "stage1_unit1_conv1"),
                                  ("bn_before_add", "stage2_unit1_bn2"),
                                  ("shortcut", "stage2_unit1_shortcut"))
  def test_split_rejects_boundary_inside_a_residual_unit(self, name):
    with self.assertRaisesRegex(ValueError, f"'{name}' is not a single-tensor cut"):
      nd.split(testing.tiny_resnet(), boundaries=[name])

  def test_split_rejects_boundaries_given_as_one_string(self):
    with self.assertRaisesRegex(TypeError, "stem_relu"):
      nd.split(testing.tiny_resnet(), boundaries="stem_relu")


class _Subclassed(keras.Model):

  def __init__(self):
    super().__init__(name="subclassed_net")
    self.dense = L.Dense(2)

  def call(self, inputs):
    return self.dense(inputs)


class SplitRejectsBadModelsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("split", nd.split), ("split_layers", nd.split_layers))
  def test_rejects_subclassed_model(self, fn):
    model = _Subclassed()
    model(np.zeros((1, 3), "float32"))
    with self.assertRaisesRegex(TypeError, "subclassed"):
      fn(model)

  @parameterized.named_parameters(("split", nd.split), ("split_layers", nd.split_layers))
  def test_rejects_sequential_without_input(self, fn):
    with self.assertRaisesRegex(ValueError, "Sequential.*Input"):
      fn(keras.Sequential([L.Dense(2)]))

  @parameterized.named_parameters(
      ("two_inputs", testing.two_inputs, "2 inputs and 1 outputs"),
      ("two_outputs", testing.two_outputs, "1 inputs and 2 outputs"),
  )
  def test_split_rejects_several_inputs_or_outputs_naming_the_counts(self, build, counts):
    with self.assertRaisesRegex(ValueError, counts):
      nd.split(build())
    with self.assertRaisesRegex(ValueError, counts):
      nd.split_layers(build())

  @parameterized.named_parameters(("none", None), ("string", "resnet20"),
                                  ("layer", L.Dense(2)), ("array", np.zeros(3)))
  def test_rejects_what_is_not_a_model(self, obj):
    with self.assertRaisesRegex(TypeError, "functional Model"):
      nd.split(obj)
    with self.assertRaisesRegex(TypeError, "functional Model"):
      nd.split_layers(obj)

  def test_keras_3_model_is_split_through_its_tf_keras_conversion(self):
    # Keras 3 is imported here only to build a user's model: its models are converted (see
    # tests/keras3_test.py), not mistaken for tf_keras ones.
    import keras as keras3  # pylint: disable=g-import-not-at-top

    model = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(2)])
    for hoods in (nd.split(model), nd.split_layers(model)):
      self.assertIsInstance(hoods[0].model, keras.Model)
      self.assertEqual([h.name for h in hoods], [model.layers[0].name])


class SplitLayersTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = testing.randomize_batch_norm(testing.tiny_resnet())

  def test_split_layers_gives_every_conv_and_dense_in_execution_order(self):
    hoods = nd.split_layers(self.model)
    # ResNet-8: stem conv, 3 units x 2 convs (option-A shortcuts have no
    # conv), logits.
    expected = ["stem_conv"] + [f"stage{s}_unit1_conv{c}" for s in (1, 2, 3) for c in (1, 2)]
    self.assertEqual([h.name for h in hoods], expected + ["head_logits"])
    weighted = [layer for layer in self.model.layers if isinstance(layer, (L.Conv2D, L.Dense))]
    self.assertLen(hoods, len(weighted))
    self.assertEqual([h.index for h in hoods], list(range(8)))
    for hood in hoods:
      (layer,) = hood.layers
      self.assertIs(layer, self.model.get_layer(hood.name))
      self.assertIs(hood.input_tensor, layer.input)
      self.assertIs(hood.output_tensor, layer.output)
      self.assertIs(hood.model, self.model)

  def test_split_layers_teachers_reproduce_each_layer_inside_residual_units(self):
    hoods = nd.split_layers(self.model)
    tensors = [t for h in hoods for t in (h.input_tensor, h.output_tensor)]
    probe = keras.Model(self.model.inputs, tensors)
    x, _ = testing.images(n=2)
    values = probe(x, training=False)
    for i, hood in enumerate(hoods):
      self.assertEqual(hood.input_shape, tuple(hood.input_tensor.shape))
      self.assertEqual(hood.output_shape, tuple(hood.output_tensor.shape))
      self.assertAllClose(hood.teacher(values[2 * i]), values[2 * i + 1], atol=1e-5, msg=str(hood))

  @parameterized.named_parameters(
      # 7 BN layers in ResNet-8: stem, 3 units x 2.
      ("batch_norm", L.BatchNormalization, 7),
      ("dense_class", L.Dense, 1),
      ("list", [L.Dense, L.ReLU], 1 + 1 + 3 * 2),  # stem_relu, relu1 and out per unit
  )
  def test_split_layers_takes_custom_layer_types(self, layer_types, count):
    hoods = nd.split_layers(self.model, layer_types)
    self.assertLen(hoods, count)
    types = layer_types if isinstance(layer_types, type) else tuple(layer_types)
    self.assertTrue(all(isinstance(h.layers[0], types) for h in hoods))

  def test_split_layers_rejects_types_with_no_layer_naming_them(self):
    with self.assertRaisesRegex(ValueError, "LSTM"):
      nd.split_layers(self.model, L.LSTM)

  @parameterized.named_parameters(("string", "Conv2D"), ("empty", ()),
                                  ("instance", L.Dense(2)), ("mixed", [L.Conv2D, 3]))
  def test_split_layers_rejects_layer_types_that_are_not_classes(self, layer_types):
    with self.assertRaisesRegex(TypeError, "layer_types"):
      nd.split_layers(self.model, layer_types)

  def test_split_layers_names_repeated_calls_of_one_layer_apart(self):
    inputs = keras.Input((4,))
    shared = L.Dense(4, name="shared")
    model = keras.Model(inputs, shared(L.ReLU()(shared(inputs))))
    hoods = nd.split_layers(model)
    self.assertEqual([h.name for h in hoods], ["shared", "shared_2"])
    self.assertIsNot(hoods[0].output_tensor, hoods[1].output_tensor)


if __name__ == "__main__":
  tf.test.main()
