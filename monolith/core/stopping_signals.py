"""Public path of the input side of end-of-stream training (`monolith.core.end_of_stream`).

`append_stopping_signals` (with its `StopRule`), `padding_batch`,
`skip_padding_steps`, `is_padding_step`, `masked_mean_loss` and
`skip_trained_batches` (with its `ResumeMismatchError`) live in
`monolith.core.end_of_stream`; this module is the path README and user code
import them from.
"""

from monolith.core.end_of_stream.stopping_signals import (
    _USER_PROVIDED_SIGNAL_NAME,
    USER_PROVIDED_SIGNAL_NAME,
    StopRule,
    append_stopping_signals,
    is_padding_step,
    masked_mean_loss,
    padding_batch,
    skip_padding_steps,
    skip_trained_batches,
)
from monolith.core.end_of_stream.trained_batches import ResumeMismatchError

__all__ = [
    "ResumeMismatchError",
    "StopRule",
    "USER_PROVIDED_SIGNAL_NAME",
    "_USER_PROVIDED_SIGNAL_NAME",
    "append_stopping_signals",
    "is_padding_step",
    "masked_mean_loss",
    "padding_batch",
    "skip_padding_steps",
    "skip_trained_batches",
]
