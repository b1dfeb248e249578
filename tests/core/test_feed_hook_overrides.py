"""The original hook's overridable methods are called where the original calls them.

A user of the original may subclass the hook and override any method the
original calls internally: `_create_infeed_controller`,
`_assertCompilationSucceeded` (from `after_create_session`), `_run_infeed`
and `_run_outfeed` (the feed threads' bodies), and write `stopping_signal`
from the outfeed thread. Each test trains through `monolith.core.testing.train`
with such a subclass and checks that the override took effect.
(`_create_or_get_iterations_per_loop`, called by `begin()`, is
`test_before_run_sends_the_loop_size_of_an_overridden_loop_variable` in
test_auto_checkpoint_feed_hook.py, by hand: cheaper, and the same calls.)
"""

from __future__ import annotations

import threading

import pytest
import tensorflow as tf
from tensorflow.core.protobuf.tpu import compilation_result_pb2

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook as Hook,
)
from monolith.core.preemption import StopReason
from tests._feed_threads import live_feed_threads
from tests.core._feed_hook_helpers import (
    ListController,
    counting_model_fn,
    padded_stream_fn,
    read_counts,
)

pytestmark = pytest.mark.timeout(120)

IPL = 2


def _train(tmp_path, hook_class, num_batches=3, **kwargs):
    return testing.train(
        counting_model_fn,
        padded_stream_fn(num_batches),
        model_dir=str(tmp_path),
        iterations_per_loop=IPL,
        hook_class=hook_class,
        **kwargs,
    )


def test_the_feed_threads_run_the_hooks_thread_bodies_once_per_session(tmp_path):
    calls = []

    class WrappingHook(Hook):
        def _run_infeed(self, queue_ctx, session):
            calls.append(("_run_infeed", threading.current_thread().name, type(session)))
            super()._run_infeed(queue_ctx, session)

        def _run_outfeed(self, queue_ctx, session):
            calls.append(("_run_outfeed", threading.current_thread().name, type(session)))
            super()._run_outfeed(queue_ctx, session)

    result = _train(tmp_path, WrappingHook)
    assert sorted(calls) == [
        ("_run_infeed", "InfeedController", tf.compat.v1.Session),
        ("_run_outfeed", "OutfeedController", tf.compat.v1.Session),
    ]
    assert result.stopped_at_end_of_stream and result.global_step == 3 + 1
    assert read_counts(result.final_checkpoint)["real_examples"] == 3 * 2


def test_an_outfeed_body_that_sets_stopping_signal_stops_training(tmp_path):
    hooks = []

    class OwnStopRuleHook(Hook):
        """An original-style `_run_outfeed`: its own loop, stopping after the second loop."""

        def begin(self):
            hooks.append(self)
            super().begin()

        def _run_outfeed(self, queue_ctx, session):
            for count, steps in enumerate(queue_ctx.read_iteration_counts()):
                for _ in range(steps):
                    session.run(self._dequeue_ops)
                if count == 1:
                    self.stopping_signal = True

    result = _train(tmp_path, OwnStopRuleHook, num_batches=100)
    assert result.global_step == 2 * IPL  # the stream was far from its end
    assert hooks[0].stop_reason is StopReason.END_OF_STREAM
    assert live_feed_threads() == []


def test_a_custom_infeed_controller_from_the_factory_feeds_training(tmp_path):
    created = []

    class ListInfeedHook(Hook):
        def _create_infeed_controller(self, name, target, args):
            created.append(ListController(name, target, args))
            return created[-1]

    result = _train(tmp_path, ListInfeedHook, num_batches=3)
    (controller,) = created
    assert controller.sizes == [IPL, IPL]  # the second loop holds the first padding batch
    assert controller.coord is not None and not controller.thread.is_alive()
    assert result.stopped_at_end_of_stream
    assert read_counts(result.final_checkpoint)["real_examples"] == 3 * 2


def test_an_overridden_compilation_check_can_stop_before_the_first_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("TPU_SPLIT_COMPILE_AND_EXECUTE", "1")
    results = []

    class RejectingHook(Hook):
        def _assertCompilationSucceeded(self, result, coord):
            results.append(compilation_result_pb2.CompilationResultProto.FromString(result))
            coord.request_stop()

    result = _train(tmp_path, RejectingHook)
    assert [r.status_error_message for r in results] == [""]  # the compile op's real result
    assert result.steps_run == 0 and result.global_step == 0
    assert live_feed_threads() == []
