"""Public path of `skip_padding_steps` (`monolith.core.end_of_stream.padding_steps`)."""

from monolith.core.end_of_stream.padding_steps import skip_padding_steps

__all__ = ["skip_padding_steps"]
