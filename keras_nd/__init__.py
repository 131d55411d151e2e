"""keras_nd: Neighbourhood Distillation for tf_keras.

Cut a trained teacher into neighbourhoods, distil a student for each one from
the teacher's own activations, compose them and fine-tune with knowledge
distillation (Shao et al., arXiv:2010.01189).
"""

from keras_nd import losses, students
from keras_nd.activations import ActivationSource
from keras_nd.batch_norm import calibrate_batch_norm
from keras_nd.composition import compose
from keras_nd.distiller import NeighbourhoodDistiller
from keras_nd.graph import substitute
from keras_nd.kd import KnowledgeDistiller
from keras_nd.neighbourhood import Neighbourhood, split, split_layers
from keras_nd.reconstruct import reconstruct

__version__ = "0.1.0"

__all__ = [
    "ActivationSource", "KnowledgeDistiller", "Neighbourhood", "NeighbourhoodDistiller",
    "calibrate_batch_norm", "compose", "losses", "reconstruct", "split", "split_layers",
    "students", "substitute",
]
