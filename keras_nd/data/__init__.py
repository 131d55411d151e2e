"""Datasets for keras_nd's experiments: the embedded task, npz files, tensorflow-datasets."""

from keras_nd.data.dataset import PREPROCESSING, Dataset
from keras_nd.data.embedded import embedded
from keras_nd.data.load import get, load_npz, load_tfds
from keras_nd.data.preprocessing import channel_stats, random_flip, random_translate, standardize
from keras_nd.data.synthetic import synthetic_images

__all__ = [
    "PREPROCESSING", "Dataset", "channel_stats", "embedded", "get", "load_npz", "load_tfds",
    "random_flip", "random_translate", "standardize", "synthetic_images",
]
