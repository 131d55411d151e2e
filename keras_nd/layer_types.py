"""The layer types keras_nd treats alike, and how it looks inside a model's layers.

One registry: neighbourhood splitting, pruning, reconstruction, perturbation and
cost counting all take their layer types from here.
"""

from keras_nd._keras import keras

__all__ = ["CONVOLUTIONS", "DEPTHWISE", "PRUNABLE", "TRANSPOSED", "WEIGHTED", "kernel",
           "leaf_layers"]


def _present(*names):
  return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


# Plain convolutions (a depthwise convolution is not one of them).
CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
DEPTHWISE = _present("DepthwiseConv1D", "DepthwiseConv2D")
# Kernels whose input and output roles are swapped or split: not solved as plain convolutions.
TRANSPOSED = _present("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                      "SeparableConv1D", "SeparableConv2D")
# The layers that carry a neighbourhood's weights: `split_layers` makes one neighbourhood of
# each, and in a plain chain each starts a neighbourhood of its own.
WEIGHTED = CONVOLUTIONS + (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                           keras.layers.Dense)
# The layers whose kernels are pruned (and perturbed): tfmot's registry, with depthwise kernels.
PRUNABLE = CONVOLUTIONS + (keras.layers.DepthwiseConv2D, keras.layers.Dense)


def leaf_layers(model):
  """`model`'s layers in order, each nested model's layers in its place."""
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from leaf_layers(layer)
    else:
      yield layer


def kernel(layer):
  """A layer's kernel variable (a depthwise convolution's depthwise kernel), or None."""
  depthwise = getattr(layer, "depthwise_kernel", None)
  return depthwise if depthwise is not None else getattr(layer, "kernel", None)
