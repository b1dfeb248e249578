"""Thread and work-queue helpers behind the infeed/outfeed session hook.

These are the building blocks of
`monolith.core.auto_checkpoint_feed_hook.TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook`
and are re-exported from that module under their original names. They hold no
TensorFlow state: a controller owns one daemon thread and a queue of loop
sizes; the hook (on the training thread) puts one loop size per
`session.run(train_op)` and the controller's thread runs the feed ops.

Two things differ from TPUEstimator's copies, both so that no feed thread can
outlive a failed training run:

* `_OpQueueContext.read_iteration_counts` polls its queue and returns once a
  watched `tf.train.Coordinator` has been asked to stop (MonitoredSession stops
  the coordinator when it closes, also after an exception, when hooks' `end()`
  does not run).
* `_OpQueueContext.join` takes an optional timeout and reports whether the
  thread finished, so the hook's `end()` can never wait forever.

`FeedController` is the contract between the feed session and a controller,
so that a hook subclass's `_create_infeed_controller` may return any
implementation of it.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

from absl import logging

# How often a controller waiting for its next loop size checks its coordinator.
_POLL_SECS = 0.1


@runtime_checkable
class FeedController(Protocol):
    """Everything the feed session (`monolith.core.feed.session`) calls on a controller.

    The controller owns one thread, started at construction, running the
    target it was given with the controller as its first argument; that
    target iterates `read_iteration_counts()` on the controller's thread.
    The feed session, on the training thread, calls `watch_coordinator` once
    right after construction, `send_next_batch_signal` once per loop,
    `wait_for_finished_loops` before deciding whether to stop (outfeed only
    today), and `join` at the end (and when a session is replaced);
    `thread` serves liveness checks and the stack dump of a stuck thread.
    """

    @property
    def thread(self) -> threading.Thread:
        """The controller's thread (for liveness checks and stack dumps)."""
        ...

    def watch_coordinator(self, coord: Any) -> None:
        """Makes the thread stop waiting for work once `coord.should_stop()` is True."""
        ...

    def send_next_batch_signal(self, iterations: int) -> None:
        """Queues one loop of `iterations` steps for the thread."""
        ...

    def read_iteration_counts(self) -> Iterator[int]:
        """Yields the queued loop sizes until stopped (called on the controller's thread)."""
        ...

    def wait_for_finished_loops(self, loops: int, timeout: Optional[float] = None) -> bool:
        """Waits up to `timeout` s for the thread to finish `loops` loops; True once it has."""
        ...

    def join(self, timeout: Optional[float] = None) -> bool:
        """Asks the thread to stop, waits up to `timeout` s; returns whether it finished."""
        ...


class PeriodicLogger:
    """Logs at INFO at most once every `seconds` (rate-limits per-step messages).

    The first call always logs. Not thread-safe on purpose: each feed thread
    owns its own logger.
    """

    def __init__(self, seconds: float):
        self._log_every_n_seconds = seconds
        self._last_log_time: Optional[float] = None

    def log(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Logs `msg % args` if more than `seconds` passed since the last log."""
        now = time.monotonic()
        if self._last_log_time is None or now - self._last_log_time > self._log_every_n_seconds:
            self._last_log_time = now
            logging.info(msg, *args, **kwargs)


class _SIGNAL:
    """Control values sent to a feed thread's queue.

    All reserved signals are negative; a non-negative value is the number of
    iterations of the next training loop.
    """

    NEXT_BATCH = -1
    STOP = -2


class _OpQueueContext:
    """One daemon feed thread and the queue of loop sizes it consumes.

    The thread starts at construction and runs `target(self, *args)`; the
    target iterates `read_iteration_counts()` and runs its ops once per loop
    (or per step) until `stop()`/`join()` sends `_SIGNAL.STOP`.

    Args:
      name: Thread name (the hook uses "InfeedController"/"OutfeedController").
      target: Called on the new thread as `target(self, *args)`.
      args: Extra positional arguments for `target` (the hook passes the session).
      coord: Optional `tf.train.Coordinator`; once it should stop, a thread
        waiting for its next loop size returns instead of waiting forever. It can
        also be attached later with `watch_coordinator`.
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., Any],
        args: Sequence[Any],
        *,
        coord: Any = None,
    ):
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._coord_lock = threading.Lock()
        self._coord = coord
        self._progress = threading.Condition()
        self._finished_loops = 0
        self._thread = threading.Thread(
            name=name, target=target, args=(self, *tuple(args)), daemon=True
        )
        self._thread.start()

    @property
    def name(self) -> str:
        """The thread's name."""
        return self._name

    @property
    def thread(self) -> threading.Thread:
        """The controller's thread (for liveness checks and stack dumps)."""
        return self._thread

    def watch_coordinator(self, coord: Any) -> None:
        """Makes the thread give up waiting for work once `coord.should_stop()`."""
        with self._coord_lock:
            self._coord = coord

    def coordinator_stopped(self) -> bool:
        """True when a watched coordinator has been asked to stop."""
        with self._coord_lock:
            coord = self._coord
        return coord is not None and coord.should_stop()

    def stop(self) -> None:
        """Asks the thread to finish after the work already queued."""
        self._queue.put(_SIGNAL.STOP)

    def send_next_batch_signal(self, iterations: int) -> None:
        """Queues one loop of `iterations` steps for the thread."""
        self._queue.put(iterations)

    def read_iteration_counts(self) -> Iterator[int]:
        """Yields queued loop sizes until `_SIGNAL.STOP` or the coordinator stops.

        Runs on the controller's thread. Waits in short slices so that a thread
        whose training run already failed (no `join()` will ever come) still
        exits once MonitoredSession has stopped the coordinator.
        """
        while True:
            if self.coordinator_stopped():
                logging.info("%s: coordinator requested stop, stopping.", self._name)
                return
            try:
                iterations = self._queue.get(timeout=_POLL_SECS)
            except queue.Empty:
                continue
            logging.debug("%s read iterations %s", self._name, iterations)
            if iterations == _SIGNAL.STOP:
                logging.info("%s received shutdown signal, stopping.", self._name)
                return
            yield iterations
            # The consumer asks for the next loop only after finishing this one.
            with self._progress:
                self._finished_loops += 1
                self._progress.notify_all()

    @property
    def finished_loops(self) -> int:
        """How many loop sizes the thread has fully processed."""
        with self._progress:
            return self._finished_loops

    def wait_for_finished_loops(self, loops: int, timeout: Optional[float] = None) -> bool:
        """Waits until the thread has processed `loops` loops; returns whether it has.

        A loop counts as processed when the thread comes back to
        `read_iteration_counts` for the next one.
        """
        with self._progress:
            return self._progress.wait_for(lambda: self._finished_loops >= loops, timeout)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Sends STOP and waits for the thread.

        Args:
          timeout: Seconds to wait; None waits without bound (as the original).

        Returns:
          True when the thread has finished, False when it is still running
          after `timeout`.
        """
        logging.info("Shutting down %s thread.", self._name)
        self.stop()
        self._thread.join(timeout)
        return not self._thread.is_alive()


class _OpSignalOnceQueueContext(_OpQueueContext):
    """A controller that forwards only the first loop size it is sent.

    Used for prediction, where one enqueue run feeds the whole (endless) loop.
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., Any],
        args: Sequence[Any],
        *,
        coord: Any = None,
    ):
        self._has_signaled = False
        super().__init__(name, target, args, coord=coord)

    def send_next_batch_signal(self, iterations: int) -> None:
        """Queues `iterations` the first time only; later calls are ignored."""
        if not self._has_signaled:
            self._queue.put(iterations)
            self._has_signaled = True


def format_thread_stack(thread: threading.Thread) -> str:
    """Returns the current Python stack of `thread` (for logging a stuck thread)."""
    frame = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    if frame is None:
        return "<no stack: thread is not running>"
    return "".join(traceback.format_stack(frame))
