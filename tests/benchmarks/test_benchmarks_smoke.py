"""Smoke test of the benchmark scripts: each runs with `--quick` and prints its tables.

The scripts run as subprocesses in the TF behaviour under test (`--tf-behavior`),
exactly as a user runs them. Only the output's structure and the counts that
do not depend on timing are checked; never timings.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, tf_behavior: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--tf-behavior", tf_behavior],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def _cells(line: str) -> list:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table_rows(output: str, first_header: str) -> list:
    """The cells of each data row of the table whose header starts with `first_header`."""
    lines = output.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("|") and " | ".join(_cells(line)).startswith(first_header)
    )
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def _assert_header(output: str, tf_behavior: str) -> None:
    assert re.search(rf"TensorFlow 2\.\d+\.\d+ \({tf_behavior} behaviour\)", output)
    assert re.search(r"\d+ CPU cores", output)


def test_feed_hook_overhead_prints_ratio_and_stop_latency_tables(tf_behavior):
    output = _run("feed_hook_overhead.py", tf_behavior)
    _assert_header(output, tf_behavior)

    (overhead,) = _table_rows(output, "iterations_per_loop | rounds x loops")
    assert overhead[0] == "10"
    assert all(float(overhead[i]) > 0 for i in (2, 3, 6, 7, 8))

    python_cost = _table_rows(output, "thread body")
    assert [row[0] for row in python_cost] == ["_run_infeed", "_run_outfeed"]
    assert all(float(cell) > 0 for row in python_cost for cell in row[1:3])

    (latency,) = _table_rows(output, "iterations_per_loop | ours worst")
    # Quick run: iterations_per_loop 2, the stream ending at step 0 and 1 of a loop.
    assert latency[0] == "2"
    assert latency[3] == "2 1"  # ours: exactly the rest of the loop
    assert int(latency[1]) == 2
    assert len(latency[4].split()) == 2


def test_host_call_update_cost_prints_a_row_per_window_with_ratios(tf_behavior):
    output = _run("host_call_update_cost.py", tf_behavior)
    _assert_header(output, tf_behavior)

    rows = _table_rows(output, "window")
    assert [row[0] for row in rows] == ["100", "10,000"]
    for row in rows:
        assert int(row[0].replace(",", "")) == int(row[1]) * int(row[2])
        assert all(float(cell) > 0 for cell in row[3:8])
