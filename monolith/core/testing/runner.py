"""Runs the emulated graph the way TPUEstimator.train (use_tpu=True) runs its graph.

Hooks: the emulator's own loop counter, then TPUEstimator's hooks in
TPUEstimator's order (MonitoredTrainingSession puts the chief's hooks first):
the `CheckpointSaverHook`, the caller's `hooks`, the stop-at-step hook,
`NanTensorHook(loss)`, the feed hook, the emulator's drain of what the
end of the stream left untrained (`drain`), `InstallSignalHandlerHook`,
`LoggingTensorHook({"loss", "step"})` and `ExamplesPerSecondHook` (every
`log_step_count_steps` loops), the model_fn's `training_hooks`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional, Union

import tensorflow as tf
from absl import logging
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator
from tensorflow_estimator.python.estimator.tpu import util as _tpu_util

from monolith.core.common.restore_errors import explain_restore_error
from monolith.core.common.validation import positive_int
from monolith.core.testing import graph
from monolith.core.testing.drain import DrainAfterStop
from monolith.core.testing.options import RunOptions
from monolith.core.testing.results import EmulatedTPUTraining, TrainResult

RUN_FOREVER_STEP = 2**62


def stop_at_step_hook(
    iterations_per_loop: Union[int, str], steps: Optional[int], max_steps: Optional[int]
) -> tf.compat.v1.train.SessionRunHook:
    """TPUEstimator's `_TPUStopAtStepHook` (never stops without steps/max_steps)."""
    if steps is not None and max_steps is not None:
        raise ValueError(f"steps={steps!r} and max_steps={max_steps!r}: give at most one of them.")
    for name, value in (("steps", steps), ("max_steps", max_steps)):
        if value is not None:
            positive_int(name, value)
    counter = _tpu_util.parse_iterations_per_loop(iterations_per_loop)
    if steps is None and max_steps is None:
        max_steps = RUN_FOREVER_STEP
    return _tpu_estimator._TPUStopAtStepHook(counter, num_steps=steps, final_step=max_steps)


class _RunCounter(tf.compat.v1.train.SessionRunHook):
    """Counts the loops and steps run, the batches each host fed, and the first global step.

    First among the hooks, so a loop whose `session.run` succeeded is counted
    even when a later hook's `after_run` raises (e.g. AbortedError, after which
    MonitoredSession recreates the session and restores the last checkpoint).
    Only the first session's global step is kept as the initial one. The
    per-host batch counts are the loop's own outputs, added up here.
    """

    def __init__(self, built: EmulatedTPUTraining):
        self._global_step = built.global_step
        self._fetches = [
            built.loop_steps,
            built.loss,
            built.global_step_after_loop,
            built.real_batches,
            built.padding_batches,
            built.trained_batches,
        ]
        self.initial_global_step: Optional[int] = None
        self.steps_run = self.loops_run = 0
        self.real_batches = [0] * built.num_hosts
        self.padding_batches = [0] * built.num_hosts
        self.trained_batches = [0] * built.num_hosts
        self.last: Optional[tuple] = None  # (global_step, loop_steps, loss) of the last loop

    def after_create_session(self, session: Any, coord: Any) -> None:
        if self.initial_global_step is None:
            self.initial_global_step = int(session.run(self._global_step))

    def before_run(self, run_context: Any) -> tf.compat.v1.train.SessionRunArgs:
        return tf.compat.v1.train.SessionRunArgs(self._fetches)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        loop_steps, loss, global_step, real, padding, trained = run_values.results
        self.steps_run += int(loop_steps)
        self.loops_run += 1
        for host in range(len(self.real_batches)):
            self.real_batches[host] += int(real[host])
            self.padding_batches[host] += int(padding[host])
            self.trained_batches[host] += int(trained[host])
        self.last = (int(global_step), int(loop_steps), float(loss))
        logging.debug(
            "Loop %d ran %d steps, global step %d, loss %s.",
            self.loops_run,
            loop_steps,
            global_step,
            loss,
        )


class _RestoringSessionCreator(tf.compat.v1.train.ChiefSessionCreator):
    """TPUEstimator's `ChiefSessionCreator`, whose restore errors name the broken checkpoint.

    A checkpoint that cannot be restored (truncated, corrupt, another model's)
    raises `restore_errors.UnreadableCheckpointError` or
    `IncompatibleCheckpointError`, a few lines, from TensorFlow's error.
    `create_session` only creates the session and restores (the hooks'
    `after_create_session` runs afterwards), so nothing else is translated.
    """

    def __init__(self, model_dir: str, **kwargs: Any):
        super().__init__(checkpoint_dir=model_dir, **kwargs)
        self._model_dir = model_dir

    def create_session(self) -> Any:
        try:
            return super().create_session()
        except (tf.errors.OpError, ValueError) as error:
            explained = explain_restore_error(
                error, self._model_dir, tf.compat.v1.get_default_graph()
            )
            if explained is None:
                raise
            raise explained from error


def _stopped_at_end_of_stream(feed_hook: Any) -> bool:
    """Whether the feed hook's outfeed thread saw the end of the stream.

    Its `stopping_signal` is set only by the stop flag of the input (the
    stream ended); the SIGTERM stop leaves it unset (it raises OutOfRangeError
    from `before_run` on the SIGTERM flag alone), so a SIGTERM stop reports
    False. A hook class without `stopping_signal` (e.g. TPUEstimator's stock
    hook) never stops at the end of the stream.
    """
    return bool(getattr(feed_hook, "stopping_signal", False))


def _saver_hook(
    options: RunOptions, scaffold: tf.compat.v1.train.Scaffold, steps_per_run: Optional[int]
) -> tf.compat.v1.train.CheckpointSaverHook:
    save_secs, save_steps = options.save_checkpoints_secs, options.save_checkpoints_steps
    if save_steps is None and save_secs is None:
        # Only the initial and the final (end()) checkpoint.
        save_secs = float(RUN_FOREVER_STEP)
    hook = tf.compat.v1.train.CheckpointSaverHook(
        options.model_dir, save_secs=save_secs, save_steps=save_steps, scaffold=scaffold
    )
    if steps_per_run is not None:
        hook._set_steps_per_run(steps_per_run)  # pylint: disable=protected-access
    return hook


def _logging_hooks(
    built: EmulatedTPUTraining, options: RunOptions, steps_per_run: Optional[int]
) -> list:
    every_n = options.log_step_count_steps
    if every_n is None:
        return []
    hooks: list = [
        tf.compat.v1.train.LoggingTensorHook(
            {"loss": tf.identity(built.loss), "step": built.global_step_after_loop},
            every_n_iter=every_n,
        )
    ]
    if built.batch_size is not None:
        examples = _tpu_estimator.ExamplesPerSecondHook(built.batch_size, every_n_steps=every_n)
        if steps_per_run is not None:
            examples._set_steps_per_run(steps_per_run)  # pylint: disable=protected-access
        hooks.append(examples)
    else:
        logging.debug("No static batch size: no examples/sec logging.")
    return hooks


def _signal_hooks() -> list:
    # signal.signal works on the main thread only; TPUEstimator would fail elsewhere.
    if threading.current_thread() is threading.main_thread():
        return [_tpu_estimator.InstallSignalHandlerHook()]
    logging.info("Not on the main thread: Ctrl-C keeps its handler during training.")
    return []


def run(
    model_fn: Callable[..., Any], input_fn: Callable[..., tf.data.Dataset], options: RunOptions
) -> TrainResult:
    """Builds a fresh graph and trains it in a MonitoredSession (see `testing.train`)."""
    with tf.Graph().as_default():
        built = graph.build(model_fn, input_fn, options.build)
        scaffold = tf.compat.v1.train.Scaffold()
        loop_size = _tpu_util.parse_iterations_per_loop(options.iterations_per_loop)
        steps_per_run = loop_size.value if loop_size.unit == "count" else None
        counter = _RunCounter(built)
        drain = DrainAfterStop(built)
        all_hooks = [
            counter,
            _saver_hook(options, scaffold, steps_per_run),
            *options.hooks,
            stop_at_step_hook(options.iterations_per_loop, options.steps, options.max_steps),
            tf.compat.v1.train.NanTensorHook(built.loss),
            built.hook,
            drain,
            *_signal_hooks(),
            *_logging_hooks(built, options, steps_per_run),
            *built.training_hooks,
        ]
        creator = _RestoringSessionCreator(
            options.model_dir, scaffold=scaffold, config=options.build.session_config
        )
        logging.info("Emulated TPU training in %s starts.", options.model_dir)
        with tf.compat.v1.train.MonitoredSession(session_creator=creator, hooks=all_hooks) as sess:
            while not sess.should_stop():
                sess.run(built.train_op)
                if options.on_loop_end is not None:
                    options.on_loop_end(*counter.last)
        final_checkpoint = tf.train.latest_checkpoint(options.model_dir)
        global_step = counter.last[0] if counter.last is not None else None
        if final_checkpoint is not None:
            global_step = tf.train.load_checkpoint(final_checkpoint).get_tensor(
                built.global_step.op.name
            )
        stopped = _stopped_at_end_of_stream(built.hook)
        logging.info(
            "Emulated TPU training stopped at step %s after %d steps in %d loops "
            "(end of stream: %s).",
            global_step,
            counter.steps_run,
            counter.loops_run,
            stopped,
        )
        return TrainResult(
            global_step=int(global_step) if global_step is not None else 0,
            steps_run=counter.steps_run,
            loops_run=counter.loops_run,
            stopped_at_end_of_stream=stopped,
            final_checkpoint=final_checkpoint,
            loss=counter.last[2] if counter.last is not None else None,
            initial_global_step=counter.initial_global_step or 0,
            real_batches=tuple(counter.real_batches),
            padding_batches=tuple(counter.padding_batches),
            trained_real_batches=tuple(counter.trained_batches),
            untrained_real_batches=_untrained(counter, drain, options),
        )


def _untrained(counter: _RunCounter, drain: DrainAfterStop, options: RunOptions) -> Optional[tuple]:
    """Per host: real batches fed into steps that did not train them, plus those drained."""
    if drain.left is None:
        return None
    left = [0] * len(counter.real_batches)
    for host, count in zip(options.build.topology.input_hosts, drain.left):
        left[host] = count
    return tuple(
        real - trained + rest
        for real, trained, rest in zip(counter.real_batches, counter.trained_batches, left)
    )


def restore_sigint_after(fn: Callable[[], Any]) -> Any:
    """Runs `fn`, then puts back the SIGINT handler (also when training raised).

    `InstallSignalHandlerHook.end` restores it only on a normal end; after an
    error TPUEstimator leaves SIGINT at SIG_DFL.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return fn()
    finally:
        if previous is not None:  # None: not installed from Python, cannot be put back.
            signal.signal(signal.SIGINT, previous)
