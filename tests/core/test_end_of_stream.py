"""End of stream under MonitoredSession, through the emulated TPU loop and the real ErrorRendezvous.

Every test trains the counting model (tests/core/_feed_hook_helpers.py) with
`monolith.core.testing.train`, which mirrors TPUEstimator.train: the feed hook,
TPUEstimator's `_TPUStopAtStepHook`, a CheckpointSaverHook and the
rendezvous pattern. Counts are read back from the final checkpoint.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import TPUEstimatorSpec

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.stopping_signals import append_stopping_signals
from tests._feed_threads import feed_threads, live_feed_threads
from tests.core._feed_hook_helpers import (
    BATCH,
    counting_model_fn,
    padded_stream_fn,
    read_counts,
)

pytestmark = pytest.mark.timeout(120)


def _expected_padding_steps(num_batches, iterations_per_loop):
    """The rest of the loop that holds the first padding batch (step `num_batches`)."""
    return iterations_per_loop - num_batches % iterations_per_loop


def _assert_trained_stream_exactly(result, num_batches, iterations_per_loop, first_id=1):
    padding = _expected_padding_steps(num_batches, iterations_per_loop)
    counts = read_counts(result.final_checkpoint)
    assert result.stopped_at_end_of_stream
    assert counts["real_examples"] == num_batches * BATCH
    assert counts["id_sum"] == sum(range(first_id, first_id + num_batches * BATCH))
    assert counts["padding_steps"] == padding <= iterations_per_loop
    assert counts["global_step"] == result.global_step == num_batches + padding
    assert result.final_checkpoint.endswith(f"-{result.global_step}")
    assert live_feed_threads() == []


def _slow_outfeed_model_fn(features, mode, params):
    """The counting model with a host call that keeps the outfeed thread behind the loop."""
    spec = counting_model_fn(features, mode, params)

    def slow_host_fn(ids):
        return tf.compat.v1.py_func(lambda i: time.sleep(0.03) or np.int64(0), [ids], tf.int64)

    return TPUEstimatorSpec(
        mode,
        loss=spec.loss,
        train_op=spec.train_op,
        host_call=(slow_host_fn, [features["id"]]),
    )


def _appended_stream_fn(num_batches):
    """input_fn: ids 1, 2, ... batched, padded by `append_stopping_signals` (the library)."""

    def input_fn(params):
        ids = tf.data.Dataset.range(1, 1 + num_batches * params["batch_size"])
        dataset = ids.batch(params["batch_size"], drop_remainder=True)
        return append_stopping_signals(dataset.map(lambda x: {"id": tf.cast(x, tf.float32)}))

    return input_fn


_PER_STEP, _PER_LOOP = True, False  # run_infeed_loop_on_coordinator


def _case_id(value):
    if isinstance(value, bool):
        return "per_step" if value else "per_loop"
    return str(value)


@pytest.mark.parametrize(
    "num_batches, iterations_per_loop, infeed, stream",
    [
        (1, 1, _PER_STEP, "hand_padded"),
        (1, 3, _PER_STEP, "hand_padded"),
        (2, 2, _PER_STEP, "hand_padded"),
        (3, 2, _PER_STEP, "hand_padded"),
        (6, 3, _PER_STEP, "hand_padded"),
        (3, 5, _PER_STEP, "hand_padded"),
        (5, 3, _PER_STEP, "hand_padded"),
        (5, 3, _PER_LOOP, "hand_padded"),
        (5, 2, _PER_STEP, "append_stopping_signals"),
    ],
    ids=_case_id,
)
def test_training_stops_at_end_of_stream_with_every_example_trained_once(
    tmp_path, num_batches, iterations_per_loop, infeed, stream
):
    """The end-to-end scenario: a finite stream, every real example trained exactly once.

    Both infeed modes (one enqueue per step or per loop), a stream padded by hand
    (`padded_stream_fn`) and one padded by `append_stopping_signals`.
    """
    if stream == "hand_padded":
        input_fn, params = padded_stream_fn(num_batches), None
    else:
        input_fn, params = _appended_stream_fn(num_batches), {"batch_size": BATCH}
    result = testing.train(
        counting_model_fn,
        input_fn,
        model_dir=str(tmp_path),
        iterations_per_loop=iterations_per_loop,
        run_infeed_loop_on_coordinator=infeed,
        params=params,
    )
    _assert_trained_stream_exactly(result, num_batches, iterations_per_loop)
    # A fresh model_dir: the run's own counts are the checkpoint's.
    assert result.steps_run == result.global_step
    assert result.loops_run == -(-result.global_step // iterations_per_loop)
    assert result.final_checkpoint == tf.train.latest_checkpoint(str(tmp_path))


@pytest.mark.parametrize("num_batches", [8, 9, 10, 11])
def test_stop_latency_is_the_rest_of_the_loop_for_every_end_position(tmp_path, num_batches):
    # 8..11: the end at each of the 4 positions in a loop. The slow host call
    # keeps the outfeed thread a loop behind the training thread; before_run
    # must still wait for it and stop after one padding loop.
    result = testing.train(
        _slow_outfeed_model_fn,
        padded_stream_fn(num_batches),
        model_dir=str(tmp_path),
        iterations_per_loop=4,
    )
    _assert_trained_stream_exactly(result, num_batches, 4)


def test_stop_latency_with_the_whole_loop_enqueued_at_once(tmp_path):
    result = testing.train(
        _slow_outfeed_model_fn,
        padded_stream_fn(5),
        model_dir=str(tmp_path),
        iterations_per_loop=3,
        run_infeed_loop_on_coordinator=False,
    )
    _assert_trained_stream_exactly(result, 5, 3)


def test_restart_resumes_from_the_final_checkpoint_and_loses_nothing(tmp_path):
    first = testing.train(
        counting_model_fn, padded_stream_fn(3), model_dir=str(tmp_path), iterations_per_loop=2
    )
    second = testing.train(
        counting_model_fn,
        padded_stream_fn(4, first_id=100),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
    )
    counts = read_counts(second.final_checkpoint)
    assert first.global_step == 3 + 1
    assert second.steps_run == 4 + 2
    assert counts["global_step"] == second.global_step == first.global_step + second.steps_run
    assert counts["real_examples"] == (3 + 4) * BATCH
    assert counts["id_sum"] == sum(range(1, 7)) + sum(range(100, 108))
    assert counts["padding_steps"] == 1 + 2
    assert live_feed_threads() == []


# -- failures: the root cause reaches the caller, no feed thread is left --------------------


def test_input_pipeline_failure_mid_stream_surfaces_its_root_cause(tmp_path):
    with pytest.raises(tf.errors.InvalidArgumentError, match="assert_none_equal|Condition"):
        testing.train(
            counting_model_fn,
            padded_stream_fn(6, fail_at=5),
            model_dir=str(tmp_path),
            iterations_per_loop=2,
        )
    assert live_feed_threads() == []


class _MalformedSignalHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Outfeeds the stop flag under the wrong key."""

    @staticmethod
    def get_stopping_signals_and_name(features):
        signals, name = (
            TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook.get_stopping_signals_and_name(
                features
            )
        )
        return {"stop": signals["stopping"]}, name


def test_malformed_stopping_signal_surfaces_as_runtime_error_naming_stopping(tmp_path):
    with pytest.raises(RuntimeError, match=r"_user_provided_signal_name.*'stopping'"):
        testing.train(
            counting_model_fn,
            padded_stream_fn(6),
            model_dir=str(tmp_path),
            iterations_per_loop=2,
            hook_class=_MalformedSignalHook,
        )
    assert live_feed_threads() == []


@pytest.mark.parametrize(
    "fail, message", [("nan", "loss is not finite"), ("assert", "step 3 refused")]
)
def test_train_step_failure_surfaces_its_root_cause(tmp_path, fail, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        testing.train(
            counting_model_fn,
            padded_stream_fn(6),
            model_dir=str(tmp_path),
            iterations_per_loop=2,
            params={"fail": fail},
        )
    assert live_feed_threads() == []


def test_tpu_init_failure_surfaces_its_root_cause(tmp_path, monkeypatch):
    def failing_initialize_system(job=None, embedding_config=None):
        return tf.debugging.Assert(False, ["TPU init failed"])

    monkeypatch.setattr(tf.compat.v1.tpu, "initialize_system", failing_initialize_system)
    monkeypatch.setattr(tf.compat.v1.tpu, "shutdown_system", lambda job=None: tf.no_op())
    with pytest.raises(tf.errors.InvalidArgumentError, match="TPU init failed"):
        testing.train(
            counting_model_fn,
            padded_stream_fn(2),
            model_dir=str(tmp_path),
            ctx=testing.FakeTPUContext(initialize_tpu=True),
        )
    assert live_feed_threads() == []


def test_stuck_outfeed_thread_does_not_stop_the_final_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="absl")

    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        never_filled = tf.queue.FIFOQueue(1, [tf.float32], shapes=[[]])
        return TPUEstimatorSpec(
            mode,
            loss=spec.loss,
            train_op=spec.train_op,
            host_call=(lambda ids: never_filled.dequeue(), [features["id"]]),
        )

    result = testing.train(
        model_fn,
        padded_stream_fn(10),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        steps=2,
        hook_kwargs={"join_timeout_secs": 0.5},
    )
    assert read_counts(result.final_checkpoint)["global_step"] == 2
    stuck = [r.getMessage() for r in caplog.records if "OutfeedController" in r.getMessage()]
    assert stuck and "_run_outfeed" in stuck[0]
    assert live_feed_threads() == []


# -- a session recreated in-process (MonitoredSession recovers from AbortedError) ------------


def _recording_hook_class(created):
    """The feed hook, recording per session what its public side shows.

    Each `after_create_session` appends a dict: the hook, the session's feed
    threads, the previous sessions' threads still alive, the stopping signal
    at the start, and `loops`, the `before_run` calls that let a loop run.
    """

    class RecordingHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
        def after_create_session(self, session, coord):
            previous = [t for record in created for t in record["threads"]]
            super().after_create_session(session, coord)
            created.append(
                {
                    "hook": self,
                    "threads": [t for t in feed_threads() if t not in previous],
                    "previous_alive": [t for t in previous if t.is_alive()],
                    "stopping_signal_at_start": self.stopping_signal,
                    "loops": 0,
                }
            )

        def before_run(self, run_context):
            super().before_run(run_context)
            created[-1]["loops"] += 1

    return RecordingHook


class _AbortOnceHook(tf.compat.v1.train.SessionRunHook):
    """Raises AbortedError once, after loop `at_loop`, as a TPU worker restart would.

    With `after_stop_seen`, first waits until the feed hook's stopping signal
    is set (the first session's outfeed thread saw the end of the stream), so
    the old session ends with its flag set. Records the signal it aborted with.
    """

    def __init__(self, created, at_loop, after_stop_seen=False):
        self._created = created
        self._at_loop = at_loop
        self._after_stop_seen = after_stop_seen
        self._loops = 0
        self.stopping_signal_at_abort = None

    def after_run(self, run_context, run_values):
        self._loops += 1
        if self._loops != self._at_loop:
            return
        feed_hook = self._created[0]["hook"]
        deadline = time.monotonic() + 30
        while self._after_stop_seen and not feed_hook.stopping_signal:
            assert time.monotonic() < deadline, "the outfeed thread never saw the stop"
            time.sleep(0.01)
        self.stopping_signal_at_abort = feed_hook.stopping_signal
        raise tf.errors.AbortedError(None, None, "injected: TPU worker restarted")


@pytest.mark.parametrize("at_loop, after_stop_seen", [(2, False), (3, True)])
def test_recreated_session_trains_the_stream_exactly_and_inherits_nothing(
    tmp_path, at_loop, after_stop_seen
):
    # 5 batches, 2 per loop: the third loop holds the first padding batch. No
    # periodic checkpoint, so the new session restores step 0 and, its input
    # iterator being new, trains the whole stream again.
    created = []
    abort = _AbortOnceHook(created, at_loop, after_stop_seen)
    result = testing.train(
        counting_model_fn,
        padded_stream_fn(5),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        hook_class=_recording_hook_class(created),
        hooks=[abort],
    )
    _assert_trained_stream_exactly(result, 5, 2)
    assert len(created) == 2
    old, new = created
    assert new["previous_alive"] == []  # the old threads were joined before the new ones started
    assert not any(t.is_alive() for t in old["threads"])
    assert abort.stopping_signal_at_abort is after_stop_seen
    # The new session starts with its own flag and loop count: three loops, then the stop.
    assert new["stopping_signal_at_start"] is False
    assert new["loops"] == 3
