"""The argument validators of `monolith.core`: counts and durations.

Every public entry point that takes a count (hosts, cores, batch sizes, steps, cadences) checks
it here, so that the same mistake raises the same exception everywhere: `TypeError` for a value
that is not an integer (bools included, since `True` silently meaning 1 hides bugs) and
`ValueError` for one below the minimum. Both messages name the argument and its value.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Returns `value` as an `int` if it is an integer >= `minimum`.

    Args:
      name: The argument's name, as the caller wrote it (used in the message).
      value: The value to check. Python and numpy integers are accepted; bools are not.
      minimum: The smallest accepted value (1: a positive int).

    Returns:
      `int(value)`.

    Raises:
      TypeError: `value` is not an integer, or is a bool.
      ValueError: `value` < `minimum`.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}.")
    return int(value)


def positive_seconds(name: str, value: Any) -> float:
    """Returns `value` as a `float` if it is a finite positive number of seconds.

    Raises:
      TypeError: `value` is not a real number, or is a bool.
      ValueError: `value` is not finite or not > 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name}={value!r} must be a number of seconds (int or float), "
            f"not {type(value).__name__}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite positive number.")
    return float(value)
