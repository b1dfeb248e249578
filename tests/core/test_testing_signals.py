"""Ctrl-C (SIGINT) in `testing.train` behaves as in TPUEstimator.train.

TPUEstimator's `InstallSignalHandlerHook` sets SIGINT to SIG_DFL before every
loop, so Ctrl-C ends the process at once instead of raising a
KeyboardInterrupt that can leave the feed threads hanging. The process-level
behaviour (Ctrl-C mid-stream ends the process at once, with no traceback, and a
restart resumes) is tests/core/test_exactly_once.py's SIGINT case; here, that
`train` puts the handler back.
"""

from __future__ import annotations

import signal

import pytest
import tensorflow as tf

from monolith.core import testing
from tests._feed_threads import live_feed_threads
from tests.core._feed_hook_helpers import counting_model_fn, padded_stream_fn

pytestmark = pytest.mark.timeout(120)


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
