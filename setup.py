"""Packaging for keras_nd (Neighbourhood Distillation for tf_keras)."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent

setuptools.setup(
  name="keras_nd",
  version="0.1.0",
  description="Neighbourhood Distillation for TensorFlow / tf_keras models.",
  long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
  long_description_content_type="text/markdown",
  packages=setuptools.find_packages(include=["keras_nd", "keras_nd.*"]),
  # Small data files shipped inside the package (the library never downloads).
  package_data={"keras_nd.data": ["*.npz", "*.json"]},
  python_requires=">=3.10",
  # tf-keras must be the same minor version as TensorFlow (tf-keras 2.N goes
  # with tensorflow 2.N). Both ranges stop at the same minor, so pip picks the
  # newest release of each, which is the same minor; pinning one of them to an
  # older minor means pinning the other one to it as well.
  install_requires=[
    "tensorflow>=2.16,<2.22",
    "tf-keras>=2.16,<2.22",
    "tensorflow-model-optimization>=0.8.0",
    # tfmot's __init__ imports distutils, gone from the standard library in Python 3.12;
    # setuptools puts it back.
    "setuptools; python_version >= '3.12'",
    "tensorflow-datasets>=4.9.4",
    "absl-py",
    "numpy",
    # The experiments' figures (keras_nd.experiments.plot).
    "matplotlib>=3.6",
    # The LiteRT interpreter that runs exported models (keras_nd.lite); tf.lite.Interpreter is
    # deprecated. 2.3 is the version measured; it brings no other dependency of weight.
    "ai-edge-litert>=2.3",
    # tf.summary's writers, which the experiments' TensorBoard logs need (tensorflow 2.21 no
    # longer installs the package).
    "tensorboard>=2.16",
  ],
  extras_require={
    # pytest-xdist: pytest.ini runs the suite in a process per core.
    "test": ["pytest", "pytest-xdist"],
    "lint": ["ruff"],
  },
  classifiers=[
    "Programming Language :: Python :: 3",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
  ],
)
