"""monolith.core: end-of-stream TPUEstimator training pieces for today's TensorFlow."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="monolith-core",
    version="0.1.0",
    description=(
        "Drop-in TPUEstimator infeed/outfeed hook with end-of-stream handling and "
        "embedding-model host calls, for TensorFlow 2.12-2.15."
    ),
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["monolith", "monolith.*"]),
    python_requires=">=3.9,<3.12",
    # TensorFlow is deliberately not a hard requirement: a Cloud TPU VM ships its
    # own TensorFlow build, which pip must not replace. Use the `cpu` extra elsewhere.
    install_requires=["numpy", "absl-py"],
    extras_require={
        # TensorBoard 2.12-2.15 imports pkg_resources, which setuptools 82 removed.
        "cpu": [
            "tensorflow-cpu>=2.12,<2.16",
            "tensorflow-estimator>=2.12,<2.16",
            "setuptools<82",
        ],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "ruff==0.8.6"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
    ],
)
