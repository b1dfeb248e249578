"""Public path of the input side of end-of-stream training (`monolith.core.end_of_stream`).

`append_stopping_signals`, `padding_batch`, `skip_padding_steps` and
`skip_trained_batches` (with its `ResumeMismatchError`) live in
`monolith.core.end_of_stream`; this module is the path README and user code
import them from.
"""

from monolith.core.end_of_stream.stopping_signals import (
    _USER_PROVIDED_SIGNAL_NAME,
    USER_PROVIDED_SIGNAL_NAME,
    append_stopping_signals,
    padding_batch,
    skip_padding_steps,
    skip_trained_batches,
)
from monolith.core.end_of_stream.trained_batches import ResumeMismatchError

__all__ = [
    "ResumeMismatchError",
    "USER_PROVIDED_SIGNAL_NAME",
    "_USER_PROVIDED_SIGNAL_NAME",
    "append_stopping_signals",
    "padding_batch",
    "skip_padding_steps",
    "skip_trained_batches",
]
