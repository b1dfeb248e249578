"""Ctrl-C (SIGINT) in `testing.train` behaves as in TPUEstimator.train.

TPUEstimator's `InstallSignalHandlerHook` sets SIGINT to SIG_DFL before every
loop, so Ctrl-C ends the process at once instead of raising a
KeyboardInterrupt that can leave the feed threads hanging. The process-level
behaviour is tested in a subprocess.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from monolith.core import testing
from tests._feed_threads import live_feed_threads
from tests.core._feed_hook_helpers import counting_model_fn, padded_stream_fn

pytestmark = pytest.mark.timeout(120)

_ROOT = pathlib.Path(__file__).resolve().parents[2]

# In the TF behaviour under test, trains on an endless stream; prints one line
# per loop so the parent knows training (and the loops' SIGINT handling) started.
_ENDLESS_TRAINING = textwrap.dedent(
    """
    import os, sys
    import tensorflow as tf
    if os.environ.get("MONOLITH_TF_BEHAVIOR") == "v1":
        tf.compat.v1.disable_v2_behavior()
    from monolith.core import testing
    from tests.core._feed_hook_helpers import counting_model_fn, padded_stream_fn

    def on_loop_end(step, loop_steps, loss):
        print("loop", step, flush=True)

    testing.train(
        counting_model_fn,
        padded_stream_fn(10**9),
        model_dir=sys.argv[1],
        iterations_per_loop=2,
        on_loop_end=on_loop_end,
    )
    print("train returned", flush=True)
    """
)


def test_sigint_during_training_ends_the_process_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", _ENDLESS_TRAINING, str(tmp_path / "model")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        first_line = child.stdout.readline()
        assert first_line.startswith("loop"), child.stderr.read()
        child.send_signal(signal.SIGINT)
        try:
            # Generous bound: this only tells a hang from an exit.
            _, stderr = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail("the process did not exit after SIGINT")
    # Killed by the signal itself (SIG_DFL), not a KeyboardInterrupt unwinding.
    assert child.returncode == -signal.SIGINT
    assert "KeyboardInterrupt" not in stderr
    assert "Traceback" not in stderr


def test_train_restores_the_sigint_handler_after_a_normal_end(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    testing.train(counting_model_fn, padded_stream_fn(2), model_dir=str(tmp_path))
    assert signal.getsignal(signal.SIGINT) is before


def test_train_restores_the_sigint_handler_after_an_error(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(tf.errors.InvalidArgumentError):
        testing.train(
            counting_model_fn,
            padded_stream_fn(5),
            model_dir=str(tmp_path),
            params={"fail": "nan"},
        )
    assert signal.getsignal(signal.SIGINT) is before
    assert live_feed_threads() == []
