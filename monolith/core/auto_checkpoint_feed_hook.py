"""TPU infeed/outfeed session hook that ends training at the end of a finite stream.

Set `TPUConfig(experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)`
and append a bool feature named `_USER_PROVIDED_SIGNAL_NAME` to the input
(False on real batches, then an endless tail of padding batches with True).
TPUEstimator then:

1. calls `get_stopping_signals_and_name(features)` inside its TPU train step
   and sends the returned `{"stopping": ...}` through the outfeed;
2. constructs this hook with the arguments of its stock
   `TPUInfeedOutfeedSessionHook` (this class is a drop-in for it).

Which method runs what, on which thread:

* `begin()` (graph building): gets/creates the `iterations_per_loop` variable,
  the TPU shutdown op and the summary-writer initializers and flushes.
* `after_create_session()` (training thread, once per session): retires the
  previous session's state and joins its threads, initialises the TPU system
  in a fresh graph, runs the init ops, optionally compiles, then starts two
  daemon threads holding the new session's state: "InfeedController" runs
  `enqueue_ops`, "OutfeedController" runs `dequeue_ops` and watches for the
  stopping signal. The first call also installs the SIGTERM stop
  (`monolith.core.preemption`; main thread only).
* `before_run()` (training thread, once per `session.run(train_op)`, i.e. per
  loop of `iterations_per_loop` steps): waits until the outfeed thread has
  finished the previous loop, raises a feed thread's recorded error, raises
  `tf.errors.OutOfRangeError` once the stopping signal was seen (MonitoredSession
  treats that as a normal end, so every hook's `end()` runs and
  `CheckpointSaverHook` writes the final checkpoint), raises the same after a
  SIGTERM, else hands the next loop size to both threads.
* `end()` (training thread): restores the SIGTERM handler, joins each thread
  for at most `join_timeout_secs`, marks them done in the rendezvous, flushes
  summary writers and shuts the TPU down.

Stop latency: because `before_run` waits for the outfeed thread, training stops
after the loop that held the first padding batch: at most `iterations_per_loop`
padding steps, exactly the rest of that loop. (With
`outfeed_every_n_steps=n > 1` the signal is only seen on outfed steps, so up to
`n - 1` further padding steps can be needed before one is outfed.)

Errors: feed threads report through an `ErrorRendezvous` (TPUEstimator passes
its own and calls `raise_errors()` after training). With `rendezvous=None` the
hook owns one: `before_run()` and `end()` then re-raise a recorded feed-thread
error themselves, and after a training run that raised, `hook.rendezvous.raise_errors()`
gives the root cause.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import math
import numbers
import os
import sys
import threading
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf.tpu import compilation_result_pb2 as tpu_compilation_result
from tensorflow.python.framework import ops
from tensorflow.python.ops import summary_ops_v2
from tensorflow.python.tpu import session_support
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_config

from monolith.core.common.tpu_context import sum_over_replicas
from monolith.core.common.validation import positive_int
from monolith.core.feed import preemption
from monolith.core.feed.controllers import (
    _SIGNAL,
    FeedController,
    PeriodicLogger,
    _OpQueueContext,
    _OpSignalOnceQueueContext,
    format_thread_stack,
)
from monolith.core.feed.signal import (
    _STOPPING_KEY,
    _USER_PROVIDED_SIGNAL_NAME,
    _stopping_value,
)

__all__ = [
    "FeedController",
    "PeriodicLogger",
    "TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook",
    "_ITERATIONS_PER_LOOP_VAR",
    "_OpQueueContext",
    "_OpSignalOnceQueueContext",
    "_SIGNAL",
    "_TPU_ESTIMATOR",
    "_USER_PROVIDED_SIGNAL_NAME",
]

_TPU_ESTIMATOR = "tpu_estimator"
_ITERATIONS_PER_LOOP_VAR = "iterations_per_loop"

_INIT_OPS_TIMEOUT_MS = 30 * 60 * 1000
_DEFAULT_JOIN_TIMEOUT_SECS = 300.0
# How often the training thread re-checks feed-thread liveness while waiting.
_WAIT_POLL_SECS = 0.1
_SPLIT_COMPILE_ENV = "TPU_SPLIT_COMPILE_AND_EXECUTE"
_WATCHDOG_ENV = "TF_TPU_WATCHDOG_TIMEOUT"


def _debug_enabled() -> bool:
    """Whether absl's `logging.debug` would emit (checked once per loop, not per step)."""
    return logging.get_absl_logger().isEnabledFor(std_logging.DEBUG)


def _watchdog_timeout_from_env() -> int:
    """Seconds from TF_TPU_WATCHDOG_TIMEOUT (0 disables the worker watchdog)."""
    raw = os.environ.get(_WATCHDOG_ENV, "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{_WATCHDOG_ENV}={raw!r} is not an integer number of seconds.") from None


class _SessionState:
    """What one training session's feed threads and hook calls share.

    `after_create_session` creates one per session and passes it to that
    session's threads; the hook keeps only a reference to the current one. When
    MonitoredSession recreates the session (it recovers from AbortedError or
    UnavailableError without calling `end()`), the previous state is retired
    and its threads joined: a late thread of the old session can then only
    touch its own, retired state (its stop flag, its failures), never the new
    session's, and it records no error in the rendezvous.
    """

    def __init__(self, coord: Any):
        self.coord = coord
        self.stop_event = threading.Event()
        self.loops_sent = 0
        self.infeed: Optional[FeedController] = None
        self.outfeed: Optional[_OpQueueContext] = None
        # One per session, so its rate limit holds across before_run calls.
        self.waiting_logger = PeriodicLogger(seconds=60)
        self._retired = threading.Event()
        self._lock = threading.Lock()
        self._failed_sources: set = set()

    def retire(self) -> None:
        """Marks the session replaced: its threads stop at their next check."""
        self._retired.set()

    def coordinator_stopped(self) -> bool:
        """True once the session's coordinator stopped or the session was retired."""
        coord = self.coord
        return self._retired.is_set() or (coord is not None and coord.should_stop())

    def record_failure(self, source: str) -> None:
        with self._lock:
            self._failed_sources.add(source)

    def failed_sources(self) -> list:
        with self._lock:
            return sorted(self._failed_sources)

    def controllers(self) -> tuple:
        """The (infeed, outfeed) controllers that were started (None where not)."""
        return self.infeed, self.outfeed


def _check_join_timeout(value: Any) -> float:
    """Validates `join_timeout_secs`: a finite positive number of seconds (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"join_timeout_secs={value!r} must be a number of seconds (int or float), "
            f"not {type(value).__name__}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"join_timeout_secs={value!r} must be a finite positive number.")
    return float(value)


class TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook(tf.compat.v1.train.SessionRunHook):
    """Initialises/shuts down the TPU, runs infeed and outfeed threads, stops at end of stream.

    Args:
      ctx: TPUEstimator's `_InternalTPUContext` (reads `master_job`,
        `embedding_config`, `model_parallelism_enabled`,
        `config.tpu_config.initial_infeed_sleep_secs` and
        `config.tpu_config.per_host_input_for_training`).
      enqueue_ops: Ops the infeed thread runs (once per step, or once per loop
        when `run_infeed_loop_on_coordinator` is False).
      dequeue_ops: Ops the outfeed thread runs every `outfeed_every_n_steps`
        steps; a dict that may hold `{_USER_PROVIDED_SIGNAL_NAME: {"stopping": ...}}`
        besides host-call results.
      tpu_compile_op: Run and checked when TPU_SPLIT_COMPILE_AND_EXECUTE=1.
      run_infeed_loop_on_coordinator: Whether the host loops over the steps.
      rendezvous: An `ErrorRendezvous` collecting feed-thread errors; None
        creates one owned by the hook (see the module docstring).
      master: Target for the TPU-initialisation session.
      session_config: Config for the TPU-initialisation session.
      tpu_init_ops: Extra ops run after session creation (before the threads).
      outfeed_every_n_steps: Outfeed cadence within a loop (positive int).
      join_timeout_secs: Keyword-only. How long `end()` waits for each feed
        thread before logging its stack and shutting down without it.
    """

    def __init__(
        self,
        ctx: Any,
        enqueue_ops: Any,
        dequeue_ops: Any,
        tpu_compile_op: Any,
        run_infeed_loop_on_coordinator: bool = True,
        rendezvous: Optional[error_handling.ErrorRendezvous] = None,
        master: Optional[str] = None,
        session_config: Optional[tf.compat.v1.ConfigProto] = None,
        tpu_init_ops: Optional[Sequence[Any]] = None,
        outfeed_every_n_steps: int = 1,
        *,
        join_timeout_secs: float = _DEFAULT_JOIN_TIMEOUT_SECS,
    ):
        outfeed_every_n_steps = positive_int("outfeed_every_n_steps", outfeed_every_n_steps)
        join_timeout_secs = _check_join_timeout(join_timeout_secs)

        self._master_job = ctx.master_job
        self._enqueue_ops = enqueue_ops
        self._dequeue_ops = dequeue_ops
        self._owns_rendezvous = rendezvous is None
        if rendezvous is None:
            rendezvous = error_handling.ErrorRendezvous(num_sources=2)
        self._rendezvous = rendezvous
        self._master = master
        self._session_config = session_config
        self._tpu_init_ops = list(tpu_init_ops or [])
        if ctx.embedding_config is None:
            self._embedding_layer_config = None
        else:
            self._embedding_layer_config = ctx.embedding_config.tpu_embedding.config_proto
        self._run_infeed_loop_on_coordinator = run_infeed_loop_on_coordinator
        self._initial_infeed_sleep_secs = ctx.config.tpu_config.initial_infeed_sleep_secs
        self._tpu_compile_op = tpu_compile_op
        # With model parallelism the TPU was initialised at startup to fetch the
        # mesh; re-initialising would corrupt variables placed on it.
        self._should_initialize_tpu = not (
            ctx.model_parallelism_enabled
            and ctx.config.tpu_config.per_host_input_for_training
            is tpu_config.InputPipelineConfig.BROADCAST
        )
        self._outfeed_every_n_steps = outfeed_every_n_steps
        self._join_timeout_secs = join_timeout_secs

        # Only when the outfeed carries the signal does before_run wait for it.
        self._expects_stopping_signal = (
            isinstance(dequeue_ops, Mapping) and _USER_PROVIDED_SIGNAL_NAME in dequeue_ops
        )
        # Replaced by after_create_session; this one only backs `stopping_signal`
        # before the first session.
        self._session = _SessionState(coord=None)
        self._sigterm: Optional[preemption.SigtermWatcher] = None
        self._global_step: Optional[tf.Tensor] = None
        self._init_ops: list = []
        self._finalize_ops: list = []

    # -- public state ---------------------------------------------------------

    @property
    def stopping_signal(self) -> bool:
        """True once the outfeed thread has seen the end of the stream.

        Written by the current session's outfeed thread, read by `before_run`
        on the training thread; backed by that session's `threading.Event`, so
        a recreated session starts with it False.
        """
        return self._session.stop_event.is_set()

    @stopping_signal.setter
    def stopping_signal(self, value: bool) -> None:
        if value:
            self._session.stop_event.set()
        else:
            self._session.stop_event.clear()

    @property
    def rendezvous(self) -> error_handling.ErrorRendezvous:
        """The `ErrorRendezvous` feed-thread errors are recorded in."""
        return self._rendezvous

    # -- graph building -------------------------------------------------------

    def _create_or_get_iterations_per_loop(self) -> tf.Variable:
        """Creates or gets TPUEstimator's `iterations_per_loop` variable.

        TPUEstimator wraps the model_fn in a `tf.while_loop` of this many steps
        per `session.run`; the variable (not a constant) lets the step hook
        shorten the last loop to hit the requested number of steps. It is the
        same variable TPUEstimator creates (name `tpu_estimator/iterations_per_loop`,
        collection `tpu_estimator_iterations_per_loop`), so whichever side
        creates it first, the other reuses it.

        Returns:
          The int32 scalar, non-trainable, local resource variable.

        Raises:
          RuntimeError: The collection holds more than one variable.
        """
        graph = tf.compat.v1.get_default_graph()
        collection_name = f"{_TPU_ESTIMATOR}_{_ITERATIONS_PER_LOOP_VAR}"
        iter_vars = graph.get_collection(collection_name)
        if len(iter_vars) == 1:
            return iter_vars[0]
        if len(iter_vars) > 1:
            raise RuntimeError(
                f"Multiple iterations_per_loop_var in collection {collection_name!r}: "
                f"{[v.name for v in iter_vars]}."
            )
        global_step = tf.compat.v1.train.get_global_step()
        colocation = (
            ops.colocate_with(global_step) if global_step is not None else contextlib.nullcontext()
        )
        with colocation, tf.compat.v1.variable_scope(_TPU_ESTIMATOR, reuse=tf.compat.v1.AUTO_REUSE):
            return tf.compat.v1.get_variable(
                _ITERATIONS_PER_LOOP_VAR,
                initializer=tf.compat.v1.initializers.zeros(),
                shape=[],
                dtype=tf.dtypes.int32,
                trainable=False,
                collections=[collection_name, tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
                use_resource=True,
            )

    def begin(self) -> None:
        """Creates the loop-size variable, TPU shutdown and summary flush ops."""
        logging.info("TPU job name %s", self._master_job)
        preemption._set_last_stop_reason(None)
        self._global_step = tf.compat.v1.train.get_global_step()
        self._iterations_per_loop_var = self._create_or_get_iterations_per_loop()
        if self._should_initialize_tpu:
            self._finalize_ops = [tf.compat.v1.tpu.shutdown_system(job=self._master_job)]
        else:
            self._finalize_ops = []
        writer_init_ops = summary_ops_v2.summary_writer_initializer_op()
        self._init_ops = self._tpu_init_ops + list(writer_init_ops)
        # The writers' resources are the initializers' inputs: flush each at end.
        for op in writer_init_ops:
            self._finalize_ops.append(summary_ops_v2.legacy_raw_flush(writer=op.inputs[0]))

    # -- feed threads ---------------------------------------------------------

    @contextlib.contextmanager
    def _catch_feed_errors(self, source: str, session: Any, state: _SessionState) -> Iterator[None]:
        """Records a feed thread's error in the rendezvous (runs on that thread).

        An error raised after the coordinator was asked to stop (or after the
        session was replaced) is a consequence of the shutdown (closed or
        cancelled session), not a root cause: it is logged and not recorded,
        so it cannot hide the error that stopped training.
        """
        try:
            yield
        except Exception:
            exc_info = sys.exc_info()
            if state.coordinator_stopped():
                logging.warning(
                    "%s thread stopped by an error during shutdown (not recorded): %s",
                    source,
                    exc_info[1],
                )
                return
            logging.error("%s thread failed: %r", source, exc_info[1])
            state.record_failure(source)
            self._rendezvous.record_error(source, exc_info, session)

    def _run_infeed(self, queue_ctx: FeedController, session: Any, state: _SessionState) -> None:
        """Infeed thread body: runs `enqueue_ops` for each loop it is sent.

        The per-step body is kept to the `session.run` and a check of the
        session's stop (debug logging is decided once per loop): it runs
        `iterations_per_loop` times per training loop and competes with the
        other threads for the GIL.
        """
        logging.info("Starting infeed thread controller.")
        if self._initial_infeed_sleep_secs:
            logging.info("Infeed thread sleeping for %d seconds.", self._initial_infeed_sleep_secs)
            time.sleep(self._initial_infeed_sleep_secs)
            logging.info("Infeed thread starting after sleep")
        run, enqueue_ops = session.run, self._enqueue_ops
        stopped = state.coordinator_stopped
        with self._catch_feed_errors("infeed", session, state):
            if self._run_infeed_loop_on_coordinator:
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

    def _run_outfeed(self, queue_ctx: FeedController, session: Any, state: _SessionState) -> None:
        """Outfeed thread body: runs `dequeue_ops`, watches for the stopping signal.

        The session's stop flag is set after the whole loop was dequeued and
        before the thread asks for the next loop size, which is what
        `before_run` waits for. Like the infeed body, the per-step work is kept
        minimal; once the signal was seen, later results are not inspected.
        """
        logging.info("Starting outfeed thread controller.")
        status_logger = PeriodicLogger(seconds=60)
        run, dequeue_ops = session.run, self._dequeue_ops
        stopped = state.coordinator_stopped
        every_n = self._outfeed_every_n_steps
        with self._catch_feed_errors("outfeed", session, state):
            seen_stop = False
            for count, steps in enumerate(queue_ctx.read_iteration_counts()):
                debug = _debug_enabled()
                for i in range(0, steps, every_n):
                    if stopped():
                        logging.info("Outfeed thread: coordinator stopped, shutting down.")
                        return
                    if debug:
                        logging.debug("Outfeed dequeue for iteration (%d, %d)", count, i)
                    ret = run(dequeue_ops)
                    if not seen_stop and _stopping_value(ret):
                        seen_stop = True
                        logging.info("Encountered stop signal at iteration (%d, %d).", count, i)
                status_logger.log("Outfeed finished loop %d (%d steps)", count, steps)
                if seen_stop and not state.stop_event.is_set():
                    logging.info("Set shared stop signal after loop %d.", count)
                    state.stop_event.set()
            logging.info("Outfeed thread finished, shutting down.")

    def _create_infeed_controller(
        self, name: str, target: Any, args: Sequence[Any]
    ) -> FeedController:
        """Factory for the infeed controller; a subclass may return another `FeedController`.

        `args` ends with the session's state; the default controller also stops
        waiting for work once that session's coordinator stops.
        """
        return _OpQueueContext(name=name, target=target, args=args, coord=self._session.coord)

    def _start_controllers(self, session: Any, state: _SessionState) -> None:
        state.infeed = self._create_infeed_controller(
            name="InfeedController", target=self._run_infeed, args=(session, state)
        )
        state.outfeed = _OpQueueContext(
            name="OutfeedController",
            target=self._run_outfeed,
            args=(session, state),
            coord=state.coord,
        )

    def _join_controller(self, controller: FeedController) -> bool:
        """Stops and joins one controller for at most `join_timeout_secs`.

        Returns whether the thread finished; a stuck thread's stack is logged.
        """
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

    def _stop_controllers(self, state: _SessionState) -> None:
        for controller in state.controllers():
            if controller is not None:
                self._join_controller(controller)

    # -- SIGTERM --------------------------------------------------------------

    def _training_active(self) -> bool:
        """Whether the current session still trains (its coordinator has not stopped)."""
        return not self._session.coordinator_stopped()

    def _install_sigterm_watcher(self) -> None:
        """Installs the SIGTERM stop once per run (main thread only; see preemption)."""
        if self._sigterm is not None or not preemption.stop_on_sigterm_enabled():
            return
        watcher = preemption.SigtermWatcher(is_active=self._training_active)
        if watcher.install():
            self._sigterm = watcher

    def _restore_sigterm_handler(self) -> None:
        if self._sigterm is not None:
            self._sigterm.restore()

    def _sigterm_received(self) -> bool:
        return self._sigterm is not None and self._sigterm.received

    # -- session lifecycle ----------------------------------------------------

    def _assertCompilationSucceeded(self, result: bytes, coord: Any) -> None:
        """Stops the coordinator when the serialized CompilationResultProto has an error."""
        proto = tpu_compilation_result.CompilationResultProto()
        proto.ParseFromString(result)
        if proto.status_error_message:
            logging.error("Compilation failed: %s", proto.status_error_message)
            coord.request_stop()
        else:
            logging.info("Compilation succeeded")

    def _initialize_tpu_system(self) -> None:
        """Runs `initialize_system` in a fresh graph and session (training thread)."""
        logging.info("Init TPU system")
        start = time.time()
        with tf.Graph().as_default():
            init_op = tf.compat.v1.tpu.initialize_system(
                job=self._master_job, embedding_config=self._embedding_layer_config
            )
            with tf.compat.v1.Session(self._master, config=self._session_config) as init_session:
                init_session.run(init_op)
        logging.info("Initialized TPU in %d seconds", time.time() - start)

    def after_create_session(self, session: Any, coord: Any) -> None:
        """Retires the previous session's state, initialises the TPU, starts the feed threads.

        Runs once per session; MonitoredSession calls it again (without `end()`)
        when it recreates the session after AbortedError/UnavailableError. Also
        installs the SIGTERM stop (`monolith.core.preemption`) on the first call.
        """
        previous = self._session
        previous.retire()
        # A recreated session: the previous session's threads must not linger.
        self._stop_controllers(previous)
        # Parse before starting anything, so a bad value leaves no thread behind.
        watchdog_timeout = _watchdog_timeout_from_env()
        self._install_sigterm_watcher()
        state = _SessionState(coord)
        self._session = state
        try:
            if self._should_initialize_tpu:
                self._initialize_tpu_system()

            session.run(
                self._init_ops,
                options=tf.compat.v1.RunOptions(timeout_in_ms=_INIT_OPS_TIMEOUT_MS),
            )

            if os.environ.get(_SPLIT_COMPILE_ENV, "") == "1":
                logging.info("Compiling user program: this may take a while...")
                self._assertCompilationSucceeded(session.run(self._tpu_compile_op), coord)

            self._start_controllers(session, state)
            # Terminates workers when the coordinator exits.
            if watchdog_timeout > 0:
                session_support.start_worker_watchdog(session, shutdown_timeout=watchdog_timeout)
        except BaseException:
            state.retire()
            self._stop_controllers(state)
            self._restore_sigterm_handler()
            raise

    def _wait_for_outfeed(self, loops: int) -> None:
        """Blocks until the outfeed thread finished `loops` loops (training thread).

        Returns early, without waiting forever, when the outfeed thread has
        exited, a feed thread recorded an error or the coordinator stopped.
        """
        state = self._session
        controller = state.outfeed
        while not controller.wait_for_finished_loops(loops, timeout=_WAIT_POLL_SECS):
            if (
                not controller.thread.is_alive()
                or state.failed_sources()
                or state.coordinator_stopped()
            ):
                return
            state.waiting_logger.log("Waiting for the outfeed thread to finish loop %d.", loops)

    def _raise_feed_error(self) -> None:
        failed = self._session.failed_sources()
        if not failed:
            return
        logging.error("Feed thread(s) %s failed; raising the recorded error.", failed)
        # Training fails here: end() will not run, so put the SIGTERM handler back now.
        self._restore_sigterm_handler()
        self._rendezvous.raise_errors()
        raise RuntimeError(f"Feed thread(s) {failed} failed; see the errors logged above.")

    def _stop_training(self, session: Any, reason: preemption.StopReason) -> None:
        """Records why and raises OutOfRangeError: MonitoredSession's normal end."""
        preemption._set_last_stop_reason(reason)
        if reason is preemption.StopReason.END_OF_STREAM:
            logging.info(
                "Throw OutOfRangeError error due to encountering stopping signal in before_run."
            )
            raise tf.errors.OutOfRangeError(None, None, "Stopped by stopping signal.")
        step = session.run(self._global_step) if self._global_step is not None else "?"
        logging.warning(
            "Training stopped by SIGTERM at step %s (a loop boundary). Every hook's end() runs "
            "next, so the run's CheckpointSaverHook (TPUEstimator has one unless checkpoints "
            "are off) writes the final checkpoint at this step; run the same command to resume "
            "(exit code monolith.core.preemption.RESTART_EXIT_CODE tells a launcher to).",
            step,
        )
        raise tf.errors.OutOfRangeError(None, None, "Stopped by SIGTERM.")

    def before_run(self, run_context: Any) -> None:
        """Stops at end of stream or after SIGTERM, else sends the next loop size to the threads.

        The loop size is read first, while the outfeed thread may still be
        finishing the previous loop: the read (a `session.run`) then overlaps
        the wait instead of following it. Only the training thread changes the
        variable, so the value is the same either way.
        """
        state = self._session
        session = run_context.session
        try:
            iterations = session.run(self._iterations_per_loop_var)
        except Exception:
            self._raise_feed_error()  # A feed error closes the session: raise the root cause.
            raise
        if self._expects_stopping_signal and state.loops_sent:
            self._wait_for_outfeed(state.loops_sent)
        self._raise_feed_error()
        if state.stop_event.is_set():
            self._stop_training(session, preemption.StopReason.END_OF_STREAM)
        if self._sigterm_received():
            self._stop_training(session, preemption.StopReason.SIGTERM)

        logging.debug("Enqueue next (%d) batch(es) of data to infeed.", iterations)
        state.infeed.send_next_batch_signal(iterations)
        logging.debug("Dequeue next (%d) batch(es) of data from outfeed.", iterations)
        state.outfeed.send_next_batch_signal(iterations)
        state.loops_sent += 1

    def end(self, session: Any) -> None:
        """Joins the feed threads (bounded), records them done, flushes, shuts down.

        Each feed thread gets up to `join_timeout_secs`, so `end()` waits at
        most twice that. A thread still running after it is logged with its
        stack and left behind (it is a daemon and ends when the session
        closes), so the rest of shutdown and the later hooks' `end()` (final
        checkpoint) still run. Restores the SIGTERM handler. With a hook-owned
        rendezvous a recorded feed error is raised last.
        """
        self._restore_sigterm_handler()
        for source, controller in zip(("infeed", "outfeed"), self._session.controllers()):
            logging.info("Stop %s thread controller", source)
            if controller is not None:
                self._join_controller(controller)
            self._rendezvous.record_done(source)

        logging.info("Shutdown TPU system.")
        session.run(self._finalize_ops)
        if self._owns_rendezvous:
            self._rendezvous.raise_errors()

    # -- TPU step side --------------------------------------------------------

    @staticmethod
    def get_stopping_signals_and_name(features: Any) -> tuple:
        """Builds the per-step stop flag TPUEstimator sends through the outfeed.

        Called by TPUEstimator inside the TPU train step (and by
        `monolith.core.testing` inside its emulated loop).

        Args:
          features: The step's features; a dict holding `_USER_PROVIDED_SIGNAL_NAME`
            (bool or int, True/1 on padding batches) enables the signal.

        Returns:
          `(signals, _USER_PROVIDED_SIGNAL_NAME)` where `signals` is None when
          the features carry no signal, else `{"stopping": bool tensor}`: inside
          a TPU replicate context the flag summed over replicas (True where any
          replica is padding), outside one (CPU, one replica) the local flag. A
          scalar flag is reshaped to `[1]`, as the outfeed needs a leading dim.
        """
        if not isinstance(features, Mapping) or _USER_PROVIDED_SIGNAL_NAME not in features:
            return None, _USER_PROVIDED_SIGNAL_NAME
        logging.info("Get stopping signals and name.")
        flag = tf.cast(features[_USER_PROVIDED_SIGNAL_NAME], tf.int32)
        if flag.shape.ndims == 0:
            flag = tf.reshape(flag, [1])
        return {_STOPPING_KEY: sum_over_replicas(flag) > 0}, _USER_PROVIDED_SIGNAL_NAME
