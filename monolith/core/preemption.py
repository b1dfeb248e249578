"""Public path of the SIGTERM stop and the stop reason (`monolith.core.feed.preemption`)."""

from monolith.core.feed.preemption import (
    RESTART_EXIT_CODE,
    STOP_ON_SIGTERM_ENV,
    SigtermWatcher,
    StopReason,
    last_stop_reason,
    stop_on_sigterm_enabled,
)

__all__ = [
    "RESTART_EXIT_CODE",
    "STOP_ON_SIGTERM_ENV",
    "SigtermWatcher",
    "StopReason",
    "last_stop_reason",
    "stop_on_sigterm_enabled",
]
