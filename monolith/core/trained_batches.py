"""Public path of `skip_trained_batches` (`monolith.core.end_of_stream.trained_batches`)."""

from monolith.core.end_of_stream.trained_batches import ResumeMismatchError, skip_trained_batches

__all__ = ["ResumeMismatchError", "skip_trained_batches"]
