"""One training session's feed runtime: two feed threads, their shared state, the stop decision.

The feed hook
(`monolith.core.auto_checkpoint_feed_hook.TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook`)
keeps the drop-in lifecycle and builds the graph; what runs while one
`tf.Session` trains lives in a `FeedSession`:

* `after_create_session` creates one and calls `start()`, which creates the
  two controllers (the infeed one through the hook's overridable
  `_create_infeed_controller`) and attaches the session's coordinator to
  both. Each thread ("InfeedController", "OutfeedController") runs
  `_thread_main`: it binds the session to the thread (`current_feed_session()`),
  records an error in the rendezvous, and calls the hook's `_run_infeed` /
  `_run_outfeed` (the original's overridable bodies), which run this
  session's `run_infeed` / `run_outfeed`.
* `before_run` (training thread, once per loop) calls `check_before_loop()`:
  wait until the outfeed thread finished the previous loop, raise a recorded
  feed error, stop when `decide_stop()` says so (OutOfRangeError, the reason
  recorded), and then `send_loop()` hands the next loop size to both threads.
* `end()` calls `close()`: put the SIGTERM handler back, join each thread for
  at most `join_timeout_secs`, record both sources done in the rendezvous.
* When MonitoredSession recreates the session (it recovers from AbortedError
  or UnavailableError without calling `end()`), the next
  `after_create_session` calls `retire()` first: the old threads stop at
  their next check and are joined; a late one can only reach its own,
  retired session (its stop flag, its failures), never the new one's, and it
  records no error. `abort()` undoes `start()` when `after_create_session` fails.

Extending it: a resource held for the session's life is acquired in
`start()` and released in `_shut_down()`, which every end (`close`, `retire`,
`abort`) passes through. A stop rule reads the outfeed results in
`run_outfeed` (outfeed thread) and is decided in `decide_stop()` (training
thread).
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import tensorflow as tf
from absl import logging
from tensorflow_estimator.python.estimator.tpu import error_handling

from monolith.core.common.validation import positive_seconds
from monolith.core.feed.controllers import (
    FeedController,
    PeriodicLogger,
    _OpQueueContext,
    format_thread_stack,
)
from monolith.core.feed.preemption import SigtermWatcher, StopReason, StopRecord
from monolith.core.feed.signal import StopRule, _real_examples_value, _stopping_value
from monolith.core.feed.stop_step import StopStep

__all__ = ["FeedSession", "check_join_timeout", "current_feed_session", "feed_session_of_thread"]

# How often the training thread re-checks feed-thread liveness while waiting.
_WAIT_POLL_SECS = 0.1

# The FeedSession each feed thread belongs to (set by `FeedSession._thread_main`).
_THREAD_BINDING = threading.local()


def feed_session_of_thread() -> Optional[FeedSession]:
    """The FeedSession whose feed thread is calling, or None off the feed threads."""
    return getattr(_THREAD_BINDING, "session", None)


def current_feed_session() -> FeedSession:
    """The FeedSession whose feed thread is calling (used by the hook's thread bodies).

    Raises:
      RuntimeError: Called outside a feed thread; the hook's `_run_infeed` and
        `_run_outfeed` run only as the targets of the controllers a
        `FeedSession` starts (or inside `FeedSession.bound_to_this_thread()`).
    """
    session = feed_session_of_thread()
    if session is None:
        raise RuntimeError(
            f"No feed session on thread {threading.current_thread().name!r}: the feed hook's "
            "thread bodies run only as the target given to their controller."
        )
    return session


def check_join_timeout(value: Any) -> float:
    """Validates `join_timeout_secs`: a finite positive number of seconds (not a bool)."""
    return positive_seconds("join_timeout_secs", value)


def _debug_enabled() -> bool:
    """Whether absl's `logging.debug` would emit (checked once per loop, not per step)."""
    return logging.get_absl_logger().isEnabledFor(std_logging.DEBUG)


class FeedSession:
    """The feed runtime of one training session (see the module docstring).

    Args:
      coord: The session's `tf.train.Coordinator` (MonitoredSession stops it
        when the session closes, also after an error, when `end()` does not run).
      rendezvous: The `ErrorRendezvous` feed-thread errors are recorded in.
      join_timeout_secs: How long `close()`/`retire()` wait for each thread.
      waits_for_outfeed: Whether `check_before_loop` waits for the outfeed
        thread (only worth it when the outfeed carries the stopping signal).
      stop_record: The run's record, written when this session stops training.
      sigterm: The run's installed SIGTERM watcher, if any (read by
        `decide_stop`, put back by `close`/`abort`/`raise_feed_error`).

    Attributes:
      coord: As given.
      stop_event: Set by the outfeed thread once it has seen the stopping signal.
      loops_sent: Loop sizes handed to the threads so far.
      infeed, outfeed: The controllers `start()` created (None before).
      stop_reason: Why this session stopped training (None until it did).
      stop_step: The outfed step in which the outfeed thread first saw the
        stop flag (which replicas still had real data), None until then.
    """

    def __init__(
        self,
        coord: Any,
        rendezvous: error_handling.ErrorRendezvous,
        *,
        join_timeout_secs: float,
        waits_for_outfeed: bool,
        stop_record: Optional[StopRecord] = None,
        sigterm: Optional[SigtermWatcher] = None,
    ):
        self.coord = coord
        self.stop_event = threading.Event()
        self.loops_sent = 0
        self.infeed: Optional[FeedController] = None
        self.outfeed: Optional[FeedController] = None
        self.stop_reason: Optional[StopReason] = None
        self.stop_step: Optional[StopStep] = None
        self._rendezvous = rendezvous
        self._join_timeout_secs = check_join_timeout(join_timeout_secs)
        self._waits_for_outfeed = waits_for_outfeed
        self._stop_record = stop_record if stop_record is not None else StopRecord()
        self._sigterm = sigterm
        # One per session, so its rate limit holds across before_run calls.
        self._waiting_logger = PeriodicLogger(seconds=60)
        self._retired = threading.Event()
        self._lock = threading.Lock()
        self._failed_sources: set = set()

    # -- state read by every thread -----------------------------------------------

    def coordinator_stopped(self) -> bool:
        """True once the coordinator stopped or the session was retired (threads then exit)."""
        coord = self.coord
        return self._retired.is_set() or (coord is not None and coord.should_stop())

    @property
    def training(self) -> bool:
        """Whether the session still trains (read by the SIGTERM handler)."""
        return not self.coordinator_stopped()

    def failed_sources(self) -> list:
        """The feed threads ("infeed", "outfeed") whose error was recorded."""
        with self._lock:
            return sorted(self._failed_sources)

    # -- start (training thread, after_create_session) -----------------------------

    def start(
        self,
        session: Any,
        create_infeed_controller: Callable[..., FeedController],
        run_infeed: Callable[[FeedController, Any], None],
        run_outfeed: Callable[[FeedController, Any], None],
    ) -> None:
        """Starts the two feed threads, each running its body with `(controller, session)`.

        Args:
          session: The `tf.Session` the threads run the feed ops in.
          create_infeed_controller: The hook's `_create_infeed_controller(name,
            target, args)`; the outfeed controller is always an `_OpQueueContext`,
            as in the original.
          run_infeed, run_outfeed: The hook's thread bodies.
        """
        self.infeed = create_infeed_controller(
            name="InfeedController",
            target=functools.partial(self._thread_main, "infeed", run_infeed),
            args=(session,),
        )
        self.infeed.watch_coordinator(self.coord)
        self.outfeed = _OpQueueContext(
            name="OutfeedController",
            target=functools.partial(self._thread_main, "outfeed", run_outfeed),
            args=(session,),
        )
        self.outfeed.watch_coordinator(self.coord)

    # -- the feed threads ---------------------------------------------------------

    @contextlib.contextmanager
    def bound_to_this_thread(self) -> Iterator[FeedSession]:
        """Makes this session the calling thread's `current_feed_session()` inside the block."""
        previous = feed_session_of_thread()
        _THREAD_BINDING.session = self
        try:
            yield self
        finally:
            _THREAD_BINDING.session = previous

    def _thread_main(
        self, source: str, body: Callable[[Any, Any], None], queue_ctx: Any, session: Any
    ) -> None:
        """A feed thread's entry: binds this session, runs the hook's `body`, records its error."""
        with self.bound_to_this_thread(), self._catch_errors(source, session):
            body(queue_ctx, session)

    @contextlib.contextmanager
    def _catch_errors(self, source: str, session: Any) -> Iterator[None]:
        """Records a feed thread's error in the rendezvous (runs on that thread).

        An error raised after the coordinator was asked to stop (or after the
        session was retired) is a consequence of the shutdown (closed or
        cancelled session), not a root cause: it is logged and not recorded,
        so it cannot hide the error that stopped training.
        """
        try:
            yield
        except Exception:
            exc_info = sys.exc_info()
            if self.coordinator_stopped():
                logging.warning(
                    "%s thread stopped by an error during shutdown (not recorded): %s",
                    source,
                    exc_info[1],
                )
                return
            logging.error("%s thread failed: %r", source, exc_info[1])
            with self._lock:
                self._failed_sources.add(source)
            self._rendezvous.record_error(source, exc_info, session)

    def run_infeed(
        self,
        queue_ctx: FeedController,
        session: Any,
        enqueue_ops: Any,
        *,
        per_step: bool,
        initial_sleep_secs: Optional[float],
    ) -> None:
        """Infeed thread: runs `enqueue_ops` each step (`per_step`) or once per loop.

        The per-step body is kept to the `session.run` and a check of the
        session's stop (debug logging is decided once per loop): it runs
        `iterations_per_loop` times per loop and competes for the GIL.
        """
        logging.info("Starting infeed thread controller.")
        if initial_sleep_secs:
            logging.info("Infeed thread sleeping for %d seconds.", initial_sleep_secs)
            time.sleep(initial_sleep_secs)
            logging.info("Infeed thread starting after sleep")
        run, stopped = session.run, self.coordinator_stopped
        if per_step:
            for count, steps in enumerate(queue_ctx.read_iteration_counts()):
                debug = _debug_enabled()
                for i in range(steps):
                    if stopped():
                        logging.info("Infeed thread: coordinator stopped, shutting down.")
                        return
                    if debug:
                        logging.debug("Infeed enqueue for iteration (%d, %d)", count, i)
                    run(enqueue_ops)
        else:
            for _ in queue_ctx.read_iteration_counts():
                run(enqueue_ops)
        logging.info("Infeed thread finished, shutting down.")

    def run_outfeed(
        self,
        queue_ctx: FeedController,
        session: Any,
        dequeue_ops: Any,
        *,
        every_n_steps: int,
        stop_rule: StopRule = StopRule.ANY_REPLICA_PADDING,
        replicas_per_host: Optional[int] = None,
    ) -> None:
        """Outfeed thread: runs `dequeue_ops` every `every_n_steps` steps, watches for the stop.

        The stop flag of each result was computed in the TPU step under the
        graph's stop rule (`feed.graph.stopping_signals`), so the stream has
        ended when any of its elements is True. The first such result is kept
        as `stop_step` (with `stop_rule` and `replicas_per_host`, for the
        warning `_stop_training` logs). `stop_event` is set after the whole
        loop was dequeued and before the thread asks for the next loop size,
        which is what `wait_for_outfeed` waits for. Once the signal was seen,
        later results are not inspected.
        """
        logging.info("Starting outfeed thread controller.")
        status_logger = PeriodicLogger(seconds=60)
        run, stopped = session.run, self.coordinator_stopped
        seen_stop = False
        for count, steps in enumerate(queue_ctx.read_iteration_counts()):
            debug = _debug_enabled()
            for i in range(0, steps, every_n_steps):
                if stopped():
                    logging.info("Outfeed thread: coordinator stopped, shutting down.")
                    return
                if debug:
                    logging.debug("Outfeed dequeue for iteration (%d, %d)", count, i)
                ret = run(dequeue_ops)
                if not seen_stop and _stopping_value(ret):
                    seen_stop = True
                    self.stop_step = _stop_step(ret, stop_rule, replicas_per_host)
                    logging.info("Encountered stop signal at iteration (%d, %d).", count, i)
            status_logger.log("Outfeed finished loop %d (%d steps)", count, steps)
            if seen_stop and not self.stop_event.is_set():
                logging.info("Set shared stop signal after loop %d.", count)
                self.stop_event.set()
        logging.info("Outfeed thread finished, shutting down.")

    # -- each loop (training thread, before_run) ----------------------------------

    def check_before_loop(self, session: Any, global_step: Optional[tf.Tensor]) -> None:
        """Waits for the outfeed thread, raises a feed error, stops when `decide_stop` says so.

        Raises:
          tf.errors.OutOfRangeError: Training stops here (MonitoredSession's
            normal end: every hook's `end()` runs, the final checkpoint is written).
          Exception: A feed thread's recorded error (see `raise_feed_error`).
        """
        if self._waits_for_outfeed and self.loops_sent:
            self.wait_for_outfeed()
        self.raise_feed_error()
        reason = self.decide_stop()
        if reason is not None:
            self._stop_training(session, global_step, reason)

    def wait_for_outfeed(self) -> None:
        """Blocks until the outfeed thread finished every loop sent so far.

        This wait bounds the stop latency: training stops after the loop that
        held the first padding batch, at most `iterations_per_loop` padding
        steps (with `outfeed_every_n_steps=n` the signal is only seen on
        outfed steps: up to `n - 1` more). Returns early, without waiting
        forever, when the outfeed thread has exited, a feed thread recorded
        an error or the coordinator stopped.
        """
        loops, controller = self.loops_sent, self.outfeed
        while not controller.wait_for_finished_loops(loops, timeout=_WAIT_POLL_SECS):
            if (
                not controller.thread.is_alive()
                or self.failed_sources()
                or self.coordinator_stopped()
            ):
                return
            self._waiting_logger.log("Waiting for the outfeed thread to finish loop %d.", loops)

    def raise_feed_error(self) -> None:
        """Raises the recorded feed-thread error, if any (training then fails, `end()` never runs).

        Raises the rendezvous' root cause; a RuntimeError naming the failed
        threads if the rendezvous holds none (it raised them already).
        """
        failed = self.failed_sources()
        if not failed:
            return
        logging.error("Feed thread(s) %s failed; raising the recorded error.", failed)
        # end() will not run: put the SIGTERM handler back now.
        self._restore_sigterm()
        self._rendezvous.raise_errors()
        raise RuntimeError(f"Feed thread(s) {failed} failed; see the errors logged above.")

    def decide_stop(self) -> Optional[StopReason]:
        """The run's stop decision before a loop: end of stream first, then SIGTERM, else None."""
        if self.stop_event.is_set():
            return StopReason.END_OF_STREAM
        if self._sigterm is not None and self._sigterm.received:
            return StopReason.SIGTERM
        return None

    def _stop_training(
        self, session: Any, global_step: Optional[tf.Tensor], reason: StopReason
    ) -> None:
        """Records why and raises OutOfRangeError: MonitoredSession's normal end."""
        self.stop_reason = self._stop_record.reason = reason
        if reason is StopReason.END_OF_STREAM:
            untrained = self.stop_step.untrained_warning() if self.stop_step else None
            if untrained is not None:
                logging.warning("%s", untrained)
            logging.info(
                "Throw OutOfRangeError error due to encountering stopping signal in before_run."
            )
            raise tf.errors.OutOfRangeError(None, None, "Stopped by stopping signal.")
        step = session.run(global_step) if global_step is not None else "?"
        logging.warning(
            "Training stopped by SIGTERM at step %s (a loop boundary). Every hook's end() runs "
            "next, so the run's CheckpointSaverHook (TPUEstimator has one unless checkpoints "
            "are off) writes the final checkpoint at this step; run the same command to resume "
            "(exit code monolith.core.preemption.RESTART_EXIT_CODE tells a launcher to).",
            step,
        )
        raise tf.errors.OutOfRangeError(None, None, "Stopped by SIGTERM.")

    def send_loop(self, iterations: int) -> None:
        """Hands the next loop's size to both threads."""
        logging.debug("Enqueue next (%d) batch(es) of data to infeed.", iterations)
        self.infeed.send_next_batch_signal(iterations)
        logging.debug("Dequeue next (%d) batch(es) of data from outfeed.", iterations)
        self.outfeed.send_next_batch_signal(iterations)
        self.loops_sent += 1

    # -- the end (training thread) ------------------------------------------------

    def close(self) -> None:
        """The run ended (`end()`): put SIGTERM back, join the threads, record them done.

        The threads first finish the loops already sent (the last loop's
        outfeed, host-call summaries included). Each gets up to
        `join_timeout_secs`; a thread still running after it is logged with
        its stack and left behind (a daemon, it ends when the session closes),
        so the rest of shutdown and later hooks' `end()` still run.
        """
        self._restore_sigterm()
        self._shut_down(record_done=True)

    def retire(self) -> None:
        """MonitoredSession replaced the session: its threads stop at their next check, joined."""
        self._retired.set()
        self._shut_down(record_done=False)

    def abort(self) -> None:
        """`after_create_session` failed: no thread of this session is left, SIGTERM is put back."""
        self.retire()
        self._restore_sigterm()

    def _shut_down(self, *, record_done: bool) -> None:
        """Every end of the session passes here: joins each thread, bounded, then marks it ended.

        Whatever `start()` acquires for the session's life is released here.
        """
        for source, controller in (("infeed", self.infeed), ("outfeed", self.outfeed)):
            if record_done:
                logging.info("Stop %s thread controller", source)
            if controller is not None:
                self._join(controller)
            if record_done:
                self._rendezvous.record_done(source)
        self._retired.set()

    def _join(self, controller: FeedController) -> bool:
        """Stops and joins one controller for at most `join_timeout_secs`; logs a stuck one."""
        finished = controller.join(timeout=self._join_timeout_secs)
        if not finished:
            thread = controller.thread
            logging.error(
                "Feed thread %s did not finish within %.1f s; shutting down without it. "
                "Its stack:\n%s",
                thread.name,
                self._join_timeout_secs,
                format_thread_stack(thread),
            )
        return finished

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None:
            self._sigterm.restore()


def _stop_step(ret: Any, stop_rule: StopRule, replicas_per_host: Optional[int]) -> StopStep:
    """The `StopStep` of the outfeed result `ret` that holds the stop flag."""
    real = _real_examples_value(ret)
    return StopStep(
        rule=stop_rule,
        real_examples=None if real is None else tuple(int(n) for n in real),
        replicas_per_host=replicas_per_host,
    )
