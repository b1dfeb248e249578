"""Finding the hook's feed threads; free of TensorFlow so conftest can use it."""

from __future__ import annotations

import threading
import time

FEED_THREAD_NAMES = ("InfeedController", "OutfeedController")


def feed_threads() -> list:
    """The feed threads alive now (thread objects)."""
    return [t for t in threading.enumerate() if t.name in FEED_THREAD_NAMES]


def live_feed_threads(wait_secs: float = 10.0) -> list:
    """Names of feed threads still alive after waiting up to `wait_secs` for them to end."""
    deadline = time.monotonic() + wait_secs
    while True:
        alive = [t.name for t in feed_threads()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
