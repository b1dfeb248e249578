"""monolith.core: TPUEstimator infeed/outfeed hook and embedding host calls.

Importing any module below checks the installed TensorFlow first, so an
unsupported version fails with one clear message rather than a deep ImportError.
"""

import tensorflow as _tf

from monolith.core.common.tf_version import check_tensorflow_version as _check

_check(_tf.__version__)
