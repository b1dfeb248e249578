"""The TensorFlow range monolith.core supports, checked once at import."""

from __future__ import annotations

import re

SUPPORTED_RANGE = "TensorFlow 2.12-2.15 with tensorflow-estimator"
_MIN = (2, 12)
_MAX = (2, 15)


def parse_version(version: str) -> tuple[int, int]:
    """Returns (major, minor) of a TensorFlow version string such as '2.15.1'."""
    match = re.match(r"^(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"version={version!r} is not a TensorFlow version string")
    return int(match.group(1)), int(match.group(2))


def check_tensorflow_version(version: str) -> None:
    """Raises ImportError naming the supported range when `version` is outside it.

    TPUEstimator (tensorflow-estimator) was removed in TensorFlow 2.16, so there is
    no way to run this library there; say so plainly instead of failing deep inside
    an import of `tensorflow_estimator`.
    """
    if not _MIN <= parse_version(version) <= _MAX:
        raise ImportError(
            f"monolith.core supports {SUPPORTED_RANGE} (TPUEstimator was removed in "
            f"TensorFlow 2.16); found TensorFlow {version}."
        )
