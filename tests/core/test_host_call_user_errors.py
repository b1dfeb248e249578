"""User errors of the host-call modules are raised without `assert`.

`python -O` strips assert statements. Every bad-input test of the host-call
modules (named `*rejects*`) runs again here in a `python -O` pytest process:
each still gets its ValueError/TypeError/RuntimeError, so none of the checks
depends on `assert`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FILES = [
    "tests/core/test_base_host_call.py",
    "tests/core/test_tpu_variable.py",
    "tests/core/test_base_embedding_host_call.py",
    "tests/core/test_host_call_summaries.py",
]
# Refuses to run unless the interpreter really strips asserts.
_RUN_OPTIMIZED = (
    "import sys, pytest\n"
    "if sys.flags.optimize < 1:\n"
    "    sys.exit(99)\n"
    "sys.exit(pytest.main(sys.argv[1:]))\n"
)


def test_user_error_checks_survive_python_O(tf_behavior):
    result = subprocess.run(
        [
            sys.executable,
            "-O",
            "-c",
            _RUN_OPTIMIZED,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--tf-behavior={tf_behavior}",
            "-k",
            "rejects",
            *_FILES,
        ],
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 50, output[-2000:]
    assert "failed" not in output.splitlines()[-1], output[-2000:]
