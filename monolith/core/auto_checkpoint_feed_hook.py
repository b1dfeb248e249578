"""TPU infeed/outfeed session hook that ends training at the end of a finite stream.

Set `TPUConfig(experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)`
and append a bool feature named `_USER_PROVIDED_SIGNAL_NAME` to the input
(False on real batches, then endless padding batches with True). TPUEstimator
calls `get_stopping_signals_and_name(features)` in its TPU train step, sends
the result through the outfeed, and constructs this hook with the arguments
of its stock `TPUInfeedOutfeedSessionHook`.

The hook keeps the original's lifecycle (each method's docstring says what it
does) and its overridable methods. What runs while one session trains, the
feed threads, their state, the wait for the outfeed and the stop decision, is
a `monolith.core.feed.session.FeedSession`, created per session in
`after_create_session` and closed in `end()`; its docstring describes the
threads. Stopping (end of stream, or SIGTERM: `monolith.core.preemption`) is
`tf.errors.OutOfRangeError` from `before_run`, MonitoredSession's normal end:
every hook's `end()` runs and `CheckpointSaverHook` writes the final checkpoint.

The run's model_dir (`ctx.config.model_dir`) is held by a
`monolith.core.feed.model_dir_guard.ModelDirGuard`: the model_dir lock from
`begin()` to `end()` (one training process per model_dir), and the resume
check in the constructor, `begin()` and `after_create_session` (a restart
must read the input its checkpoint was trained with).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional, Sequence

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf.tpu import compilation_result_pb2 as tpu_compilation_result
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_config

from monolith.core.common.validation import positive_int
from monolith.core.feed import graph, preemption, tpu_system
from monolith.core.feed.controllers import (
    _SIGNAL,
    FeedController,
    PeriodicLogger,
    _OpQueueContext,
    _OpSignalOnceQueueContext,
)
from monolith.core.feed.graph import _ITERATIONS_PER_LOOP_VAR, _TPU_ESTIMATOR
from monolith.core.feed.model_dir_guard import ModelDirGuard
from monolith.core.feed.session import (
    FeedSession,
    check_join_timeout,
    current_feed_session,
    feed_session_of_thread,
)
from monolith.core.feed.signal import _USER_PROVIDED_SIGNAL_NAME, StopRule, follow_stop_rule

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


class TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook(tf.compat.v1.train.SessionRunHook):
    """Initialises/shuts down the TPU, runs infeed and outfeed threads, stops at end of stream.

    Args:
      ctx: TPUEstimator's `_InternalTPUContext` (reads `master_job`,
        `embedding_config`, `model_parallelism_enabled`, `config.model_dir`
        (if it has one; None: no model_dir lock or resume check),
        `config.tpu_config.initial_infeed_sleep_secs`,
        `config.tpu_config.per_host_input_for_training` and, to name the
        hosts of the replicas in the end-of-stream warning,
        `num_of_replicas_per_host` if it has one).
      enqueue_ops: Ops the infeed thread runs (once per step, or once per loop
        when `run_infeed_loop_on_coordinator` is False).
      dequeue_ops: Ops the outfeed thread runs every `outfeed_every_n_steps`
        steps; a dict that may hold `{_USER_PROVIDED_SIGNAL_NAME: {"stopping": ...}}`.
      tpu_compile_op: Run and checked when TPU_SPLIT_COMPILE_AND_EXECUTE=1.
      run_infeed_loop_on_coordinator: Whether the host loops over the steps.
      rendezvous: An `ErrorRendezvous` collecting feed-thread errors
        (TPUEstimator passes its own). None creates one owned by the hook:
        `before_run()` and `end()` then re-raise a recorded error themselves,
        and after a run that raised `hook.rendezvous.raise_errors()` gives
        the root cause.
      master: Target for the TPU-initialisation session.
      session_config: Config for the TPU-initialisation session.
      tpu_init_ops: Extra ops run after session creation (before the threads).
      outfeed_every_n_steps: Outfeed cadence within a loop (positive int).
      join_timeout_secs: Keyword-only. How long `end()` waits for each feed
        thread before logging its stack and shutting down without it.

    Raises:
      ResumeMismatchError: `ctx.config.model_dir` holds a checkpoint trained
        on another input than the graph's input pipelines read (checked
        here, where TPUEstimator constructs the hook once its input
        pipelines are built; see `monolith.core.feed.model_dir_guard`).
    """

    _feed_session_class = FeedSession  # What each session's runtime is (a benchmark swaps it).

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
        join_timeout_secs: float = 300.0,
    ):
        self._outfeed_every_n_steps = positive_int("outfeed_every_n_steps", outfeed_every_n_steps)
        self._join_timeout_secs = check_join_timeout(join_timeout_secs)
        self._master_job = ctx.master_job
        self._enqueue_ops = enqueue_ops
        self._dequeue_ops = dequeue_ops
        self._owns_rendezvous = rendezvous is None
        self._rendezvous = (
            rendezvous if rendezvous is not None else error_handling.ErrorRendezvous(2)
        )
        self._master = master
        self._session_config = session_config
        self._tpu_init_ops = list(tpu_init_ops or [])
        self._init_ops, self._finalize_ops = list(self._tpu_init_ops), []
        embedding = ctx.embedding_config
        self._embedding_layer_config = (
            None if embedding is None else embedding.tpu_embedding.config_proto
        )
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
        self._global_step: Optional[tf.Tensor] = None
        self._model_dir_guard = ModelDirGuard(getattr(ctx.config, "model_dir", None))
        # The input pipelines are built: refuse a mismatched restart before any hook begins.
        self._model_dir_guard.check_input(tf.compat.v1.train.get_global_step())
        self._stop_record = preemption.StopRecord()  # The run's; begin() starts a new one.
        self._sigterm: Optional[preemption.SigtermWatcher] = None  # The run's, if installed.
        self._feed: Optional[FeedSession] = None  # The current session's runtime.
        self._stop_before_session = threading.Event()  # Backs stopping_signal until then.
        # TPUEstimator constructs the hook after building the train step, in
        # its graph: the step's stop signal and skip_padding_steps have
        # followed the graph's stop rule by now; a disagreement raises here.
        self._stop_rule = follow_stop_rule("the feed hook's stop decision")
        self._replicas_per_host = _replicas_per_host(ctx)

    # -- public state ---------------------------------------------------------

    @property
    def stopping_signal(self) -> bool:
        """True once the outfeed thread has seen the end of the stream.

        The current session's flag (a recreated session starts with it False);
        set from a feed thread, as the original's `_run_outfeed` does, it is
        that thread's own session's flag.
        """
        return self._stop_event().is_set()

    @stopping_signal.setter
    def stopping_signal(self, value: bool) -> None:
        event = self._stop_event()
        event.set() if value else event.clear()

    def _stop_event(self) -> threading.Event:
        feed = feed_session_of_thread() or self._feed
        return feed.stop_event if feed is not None else self._stop_before_session

    @property
    def stop_reason(self) -> Optional[preemption.StopReason]:
        """Why this hook stopped its run (since `begin()`); None while training or if it did not."""
        return self._stop_record.reason

    @property
    def stop_rule(self) -> StopRule:
        """The stop rule this hook follows: the graph's (`append_stopping_signals(stop_rule=)`).

        The stop flag it reads was computed in the TPU step under this rule
        (`get_stopping_signals_and_name`). Under the default
        `ANY_REPLICA_PADDING`, when the step that stops training still had
        replicas with real batches, the hook logs a WARNING naming their
        hosts and replicas (their rest is not trained).
        """
        return self._stop_rule

    @property
    def rendezvous(self) -> error_handling.ErrorRendezvous:
        """The `ErrorRendezvous` feed-thread errors are recorded in."""
        return self._rendezvous

    # -- graph building (default graph, training thread) ------------------------

    def _create_or_get_iterations_per_loop(self) -> tf.Variable:
        """TPUEstimator's `iterations_per_loop` variable (see `feed.graph`); called by `begin`."""
        return graph.create_or_get_iterations_per_loop()

    def begin(self) -> None:
        """Creates the loop-size variable, TPU shutdown and summary flush ops; starts a run.

        Last, before any session exists, it takes the model_dir lock and
        checks the input against the checkpoint's (`ModelDirGuard.begin`):
        `ModelDirLockedError` or `ResumeMismatchError` refuse the run here.
        """
        logging.info("TPU job name %s", self._master_job)
        self._stop_record, self._sigterm = preemption.begin_run(), None
        self._global_step = tf.compat.v1.train.get_global_step()
        self._iterations_per_loop_var = self._create_or_get_iterations_per_loop()
        self._finalize_ops = []
        if self._should_initialize_tpu:
            self._finalize_ops.append(tf.compat.v1.tpu.shutdown_system(job=self._master_job))
        writer_inits, writer_flushes = graph.summary_writer_ops()
        self._init_ops = self._tpu_init_ops + writer_inits
        self._finalize_ops.extend(writer_flushes)
        self._model_dir_guard.begin(self._global_step)

    # -- feed threads (the original's overridable bodies and factory) -----------

    def _run_infeed(self, queue_ctx: FeedController, session: Any) -> None:
        """Infeed thread body (runs on the controller's thread): `FeedSession.run_infeed`."""
        current_feed_session().run_infeed(
            queue_ctx,
            session,
            self._enqueue_ops,
            per_step=self._run_infeed_loop_on_coordinator,
            initial_sleep_secs=self._initial_infeed_sleep_secs,
        )

    def _run_outfeed(self, queue_ctx: FeedController, session: Any) -> None:
        """Outfeed thread body (runs on the controller's thread): `FeedSession.run_outfeed`."""
        current_feed_session().run_outfeed(
            queue_ctx,
            session,
            self._dequeue_ops,
            every_n_steps=self._outfeed_every_n_steps,
            stop_rule=self._stop_rule,
            replicas_per_host=self._replicas_per_host,
        )

    def _create_infeed_controller(
        self, name: str, target: Any, args: Sequence[Any]
    ) -> FeedController:
        """The infeed controller; a subclass may return any `FeedController`.

        Called once per session by `after_create_session`: `target(controller,
        *args)` runs `self._run_infeed` on the controller's thread, `args` is
        `(session,)`. The session's coordinator is attached afterwards
        (`watch_coordinator`).
        """
        return _OpQueueContext(name=name, target=target, args=args)

    # -- session lifecycle (training thread) ------------------------------------

    def _assertCompilationSucceeded(self, result: bytes, coord: Any) -> None:
        """Stops the coordinator when the serialized CompilationResultProto has an error."""
        proto = tpu_compilation_result.CompilationResultProto()
        proto.ParseFromString(result)
        if proto.status_error_message:
            logging.error("Compilation failed: %s", proto.status_error_message)
            coord.request_stop()
        else:
            logging.info("Compilation succeeded")

    def after_create_session(self, session: Any, coord: Any) -> None:
        """Retires the previous session's runtime, initialises the TPU, starts the feed threads.

        First it checks the input against the checkpoint again, with the
        global step the session restored (`ModelDirGuard.after_create_session`).
        MonitoredSession calls it again (without `end()`) when it recreates the
        session after AbortedError/UnavailableError.
        """
        if self._feed is not None:
            self._feed.retire()  # The old threads are joined before new ones start.
        self._model_dir_guard.after_create_session(session, self._global_step)
        watchdog_timeout = tpu_system.watchdog_timeout_from_env()  # Raises before any thread.
        if self._sigterm is None:
            self._sigterm = preemption.install_sigterm_stop(is_active=self._training)
        signal_outfed = isinstance(self._dequeue_ops, Mapping) and (
            _USER_PROVIDED_SIGNAL_NAME in self._dequeue_ops
        )
        feed = self._feed = self._feed_session_class(
            coord,
            self._rendezvous,
            join_timeout_secs=self._join_timeout_secs,
            waits_for_outfeed=signal_outfed,
            stop_record=self._stop_record,
            sigterm=self._sigterm,
        )
        try:
            if self._should_initialize_tpu:
                tpu_system.initialize_tpu_system(
                    self._master_job,
                    self._embedding_layer_config,
                    self._master,
                    self._session_config,
                )
            tpu_system.run_init_ops(session, self._init_ops)
            if tpu_system.split_compile_enabled():
                logging.info("Compiling user program: this may take a while...")
                self._assertCompilationSucceeded(session.run(self._tpu_compile_op), coord)
            feed.start(session, self._create_infeed_controller, self._run_infeed, self._run_outfeed)
            tpu_system.start_worker_watchdog(session, watchdog_timeout)
        except BaseException:
            feed.abort()
            raise

    def _training(self) -> bool:
        """The SIGTERM watcher's `is_active`: the run is starting or its current session trains."""
        return self._feed is None or self._feed.training

    def before_run(self, run_context: Any) -> None:
        """Stops at end of stream or after SIGTERM, else sends the next loop size to the threads.

        The loop size is read first, so that the read (a `session.run`)
        overlaps the wait for the outfeed thread; only this thread changes it.
        A run whose model_dir lock another process took over stops first,
        with `ModelDirLockedError` (no final checkpoint).
        """
        self._model_dir_guard.check_held()
        feed, session = self._feed, run_context.session
        try:
            iterations = session.run(self._iterations_per_loop_var)
        except Exception:
            feed.raise_feed_error()  # A feed error closes the session: raise the root cause.
            raise
        feed.check_before_loop(session, self._global_step)
        feed.send_loop(iterations)

    def end(self, session: Any) -> None:
        """Joins the feed threads (bounded: `FeedSession.close`), flushes, shuts the TPU down.

        With a hook-owned rendezvous a recorded feed error is raised last.
        The model_dir lock is released at the very end, also when this
        raises; `CheckpointSaverHook.end()` (the final checkpoint) runs
        before this hook's `end()` (see `monolith.core.feed.model_dir_guard`).
        """
        try:
            if self._feed is not None:
                self._feed.close()
            logging.info("Shutdown TPU system.")
            session.run(self._finalize_ops)
            if self._owns_rendezvous:
                self._rendezvous.raise_errors()
        finally:
            self._model_dir_guard.release()

    def _release_model_dir(self) -> None:
        """Releases the model_dir lock of a run that will not reach `end()`.

        For the dry run's `run_until_feed_hook_begins`, which stops right
        after `begin()`; a failed run keeps its lock until the process exits
        or its next run (see `monolith.core.feed.model_dir_guard`).
        """
        self._model_dir_guard.release()

    # -- TPU step side --------------------------------------------------------

    @staticmethod
    def get_stopping_signals_and_name(features: Any) -> tuple:
        """`(signals, _USER_PROVIDED_SIGNAL_NAME)`: the stop flag the TPU step outfeeds.

        Called by TPUEstimator inside the TPU train step (and by
        `monolith.core.testing`). `signals` is None when `features` carry no
        signal, else `{"stopping": bool tensor, "real_examples": int32 [1]}`:
        the stop flag under the graph's stop rule, summed over replicas inside
        a TPU replicate context, and this replica's count of real examples
        (see `feed.graph.stopping_signals`). TPUEstimator outfeeds every key
        of the dict, each concatenated over replicas.
        """
        return graph.stopping_signals(features), _USER_PROVIDED_SIGNAL_NAME


def _replicas_per_host(ctx: Any) -> Optional[int]:
    """`ctx.num_of_replicas_per_host` when the context has a positive int there, else None."""
    value = getattr(ctx, "num_of_replicas_per_host", None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value
