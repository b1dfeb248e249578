"""Shared bits of the benchmark scripts: TF set-up, header and table printing."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from importlib import metadata
from typing import Any, Sequence

_BEHAVIORS = ("v2", "v1")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--quick` and `--tf-behavior` (default: $MONOLITH_TF_BEHAVIOR or v2)."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)"
    )
    parser.add_argument(
        "--tf-behavior",
        choices=_BEHAVIORS,
        default=os.environ.get("MONOLITH_TF_BEHAVIOR", "v2"),
        help="v2 (TF2 default) or v1 (tf.compat.v1.disable_v2_behavior())",
    )


def setup_tensorflow(behavior: str) -> Any:
    """Imports TensorFlow in the requested behaviour, with library logs at WARNING."""
    if behavior not in _BEHAVIORS:
        raise ValueError(f"behavior={behavior!r} must be one of {_BEHAVIORS}")
    import tensorflow as tf
    from absl import logging

    if behavior == "v1":
        tf.compat.v1.disable_v2_behavior()
    # Per-loop INFO lines of the hooks would dominate the timings; deprecation
    # notices of the TF1 APIs the emulation uses are noise here.
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")
    return tf


def print_header(title: str, behavior: str, settings: Sequence[str]) -> None:
    """Prints the title, TF version and behaviour, the machine and the settings."""
    import tensorflow as tf

    print(title)
    print(
        f"TensorFlow {tf.__version__} ({behavior} behaviour), tensorflow-estimator "
        f"{metadata.version('tensorflow-estimator')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), "
        f"load average {_load_average()}"
    )
    for line in settings:
        print(f"  {line}")
    print(flush=True)


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a right-aligned plain-text table (also valid as a Markdown table)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    print(flush=True)


def median(values: Sequence[float]) -> float:
    """The median (raises on an empty sequence, which would be a bug here)."""
    return statistics.median(values)
