"""On/off switches read from the environment (e.g. `MONOLITH_MODEL_DIR_LOCK=0`).

TPUEstimator, not the user, constructs the feed hook, so a behaviour the hook
turns on by default is turned off from the environment. One parser, so every
switch accepts the same words.
"""

from __future__ import annotations

import os

__all__ = ["env_switch"]

_OFF_VALUES = ("0", "false", "no", "off")
_ON_VALUES = ("1", "true", "yes", "on")


def env_switch(name: str, default: bool = True) -> bool:
    """Whether the switch `name` is on: unset or empty gives `default`.

    Raises:
      ValueError: The variable holds something other than 0/1/true/false/yes/no/on/off
        (any case), naming the variable and its value.
    """
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _OFF_VALUES:
        return False
    if value in _ON_VALUES:
        return True
    raise ValueError(
        f"{name}={raw!r} is not one of {_OFF_VALUES + _ON_VALUES} "
        f"(unset means {'on' if default else 'off'})."
    )
