"""PeriodicLogger, _SIGNAL and the feed-thread controllers (no TensorFlow graph needed)."""

from __future__ import annotations

import logging
import queue
import threading

import pytest
import tensorflow as tf

from monolith.core import auto_checkpoint_feed_hook as feed_hook
from monolith.core.feed.controllers import format_thread_stack


@pytest.fixture
def absl_info(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    return caplog


def _collecting_target(received: queue.Queue):
    def target(queue_ctx, tag):
        for iterations in queue_ctx.read_iteration_counts():
            received.put((tag, iterations))
        received.put((tag, "done"))

    return target


def _drain(received: queue.Queue) -> list:
    items = []
    while not received.empty():
        items.append(received.get_nowait())
    return items


def test_signal_values_are_reserved_negatives():
    assert feed_hook._SIGNAL.NEXT_BATCH == -1
    assert feed_hook._SIGNAL.STOP == -2


def test_constants_match_the_original():
    assert feed_hook._USER_PROVIDED_SIGNAL_NAME == "_user_provided_signal_name"
    assert feed_hook._TPU_ESTIMATOR == "tpu_estimator"
    assert feed_hook._ITERATIONS_PER_LOOP_VAR == "iterations_per_loop"


def test_periodic_logger_logs_first_call_then_rate_limits(absl_info):
    logger = feed_hook.PeriodicLogger(seconds=3600)
    logger.log("status %d", 1)
    logger.log("status %d", 2)
    messages = [r.getMessage() for r in absl_info.records]
    assert messages.count("status 1") == 1
    assert "status 2" not in messages


def test_periodic_logger_with_no_interval_logs_every_call(absl_info):
    logger = feed_hook.PeriodicLogger(seconds=-1)
    logger.log("tick %s", "a")
    logger.log("tick %s", "b")
    assert {"tick a", "tick b"} <= {r.getMessage() for r in absl_info.records}


def test_queue_context_runs_target_with_itself_and_args_on_a_named_daemon_thread():
    received: queue.Queue = queue.Queue()
    ctx = feed_hook._OpQueueContext("TestController", _collecting_target(received), ("tag",))
    assert ctx.thread.name == "TestController"
    assert ctx.thread.daemon
    ctx.send_next_batch_signal(3)
    ctx.send_next_batch_signal(5)
    assert ctx.join(timeout=30)
    assert _drain(received) == [("tag", 3), ("tag", 5), ("tag", "done")]


def test_queue_context_stop_ends_iteration_after_queued_work():
    received: queue.Queue = queue.Queue()
    ctx = feed_hook._OpQueueContext("TestController", _collecting_target(received), ("t",))
    ctx.send_next_batch_signal(1)
    ctx.stop()
    ctx.thread.join(30)
    assert not ctx.thread.is_alive()
    assert _drain(received) == [("t", 1), ("t", "done")]


def test_signal_once_context_forwards_only_the_first_signal():
    received: queue.Queue = queue.Queue()
    ctx = feed_hook._OpSignalOnceQueueContext("Once", _collecting_target(received), ("t",))
    for iterations in (4, 7, 9):
        ctx.send_next_batch_signal(iterations)
    assert ctx.join(timeout=30)
    assert _drain(received) == [("t", 4), ("t", "done")]


@pytest.mark.timeout(60)
def test_queue_context_returns_when_the_coordinator_stops():
    received: queue.Queue = queue.Queue()
    coord = tf.train.Coordinator()
    ctx = feed_hook._OpQueueContext("Watched", _collecting_target(received), ("t",), coord=coord)
    ctx.send_next_batch_signal(2)
    coord.request_stop()
    ctx.thread.join(30)
    assert not ctx.thread.is_alive()
    assert _drain(received)[-1] == ("t", "done")


@pytest.mark.timeout(60)
def test_watch_coordinator_attaches_a_coordinator_after_start():
    received: queue.Queue = queue.Queue()
    ctx = feed_hook._OpQueueContext("Late", _collecting_target(received), ("t",))
    coord = tf.train.Coordinator()
    ctx.watch_coordinator(coord)
    coord.request_stop()
    ctx.thread.join(30)
    assert not ctx.thread.is_alive()


@pytest.mark.timeout(60)
def test_join_with_timeout_reports_a_stuck_thread():
    release = threading.Event()

    def stuck(queue_ctx):
        release.wait()

    ctx = feed_hook._OpQueueContext("Stuck", stuck, ())
    assert ctx.join(timeout=0.2) is False
    assert ctx.thread.is_alive()
    release.set()
    ctx.thread.join(30)
    assert not ctx.thread.is_alive()


@pytest.mark.timeout(60)
def test_finished_loops_counts_loops_the_consumer_came_back_from():
    step = threading.Semaphore(0)

    def consumer(queue_ctx):
        for _ in queue_ctx.read_iteration_counts():
            step.acquire()

    ctx = feed_hook._OpQueueContext("Progress", consumer, ())
    ctx.send_next_batch_signal(1)
    ctx.send_next_batch_signal(1)
    assert not ctx.wait_for_finished_loops(1, timeout=0.2)
    step.release()
    assert ctx.wait_for_finished_loops(1, timeout=30)
    step.release()
    assert ctx.wait_for_finished_loops(2, timeout=30)
    assert ctx.finished_loops == 2
    assert ctx.join(timeout=30)


def test_format_thread_stack_shows_where_the_thread_waits():
    inside, release = threading.Event(), threading.Event()

    def waiting_here():
        inside.set()
        release.wait()  # leaves this frame only after the test sampled it

    thread = threading.Thread(target=waiting_here, name="StackProbe", daemon=True)
    thread.start()
    try:
        assert inside.wait(30), "the probe thread never started"
        assert "waiting_here" in format_thread_stack(thread)
    finally:
        release.set()
        thread.join(30)
