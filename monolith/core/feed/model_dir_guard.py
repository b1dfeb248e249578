"""A training run's hold on its model_dir: one process at a time, resuming the same input.

The feed hook
(`monolith.core.auto_checkpoint_feed_hook.TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook`)
knows the model_dir from its context (`ctx.config.model_dir`: TPUEstimator's
RunConfig, or the emulator's `FakeTPUContext`), so TPUEstimator programs get
both without changes. One `ModelDirGuard` per run, driven by the hook on the
training thread:

* `check_input()` (the hook's constructor, which TPUEstimator and the
  emulator call once the input pipelines are built): compares the input
  with model_dir's resume record, reading only, before any hook's
  `begin()`. A restart whose input differs is refused there with
  `ResumeMismatchError` and changes no file of model_dir (not even the
  events file `CheckpointSaverHook.begin()` would open).
* `begin()` (the hook's `begin()`): takes the model_dir lock
  (`feed.model_dir_lock`; refused with `ModelDirLockedError` while another
  process trains there), then checks the input the graph's
  `skip_trained_batches` calls registered against model_dir's resume record
  (`end_of_stream.resume_record`), with the global step of the checkpoint the
  session will restore, read from the file. A restart whose input differs
  raises `ResumeMismatchError` and releases the lock.
* `after_create_session(session)`: checks again with the global step the
  session restored (the step `skip_trained_batches` will skip by), before
  the feed threads start; also for a session MonitoredSession recreates.
* `check_held()` (each `before_run`): if another process took the lock over
  (this one looked stale, e.g. it was suspended for minutes), training stops
  with `ModelDirLockedError`, without a final checkpoint: the other process
  owns the model_dir now.
* `release()` (the hook's `end()`, last): gives the lock up.

Why there, in both TPUEstimator and the emulator: MonitoredTrainingSession
puts the chief's hooks (TPUEstimator's `CheckpointSaverHook`) before the
others, and calls `begin()`, `after_create_session()` and `end()` in list
order. So `begin()` runs before any session exists (but after
`CheckpointSaverHook.begin()` opened its events file: a run refused by the
lock leaves that empty events file), which is before the saver writes
anything (`graph.pbtxt` and a checkpoint at session creation);
and the feed hook's `end()` runs after the saver's `end()` wrote the final
checkpoint, so the lock is held until that checkpoint is complete. A
`CheckpointSaverHook` the model_fn adds itself in `training_hooks` comes
after the feed hook: its final save happens after the release.

A run that fails (no `end()`) keeps the lock until the process exits, or
until the next run of this process (on the same thread, or after the failed
run's thread ended) takes it over.
"""

from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf
from absl import logging

from monolith.core.end_of_stream import resume_record
from monolith.core.feed import model_dir_lock
from monolith.core.feed.model_dir_lock import ModelDirLock, ModelDirLockedError
from monolith.core.feed.signal import stop_rule_of_graph

__all__ = ["ModelDirGuard"]


class ModelDirGuard:
    """The model_dir lock and the resume check of one training run (see the module docstring).

    Args:
      model_dir: The run's model_dir; None does nothing (no lock, no check).

    Attributes:
      heartbeat_secs, stale_after_secs: Passed to `model_dir_lock.acquire`.
    """

    heartbeat_secs = model_dir_lock.HEARTBEAT_SECS
    stale_after_secs = model_dir_lock.STALE_AFTER_SECS

    def __init__(self, model_dir: Optional[str]):
        self.model_dir = model_dir
        self._lock: Optional[ModelDirLock] = None
        self._pipelines: tuple = ()
        self._stop_rule = None

    @property
    def lock(self) -> Optional[ModelDirLock]:
        """The lock this run holds (None before `begin()`, when off, or without a model_dir)."""
        return self._lock

    def check_input(self, global_step: Optional[tf.Variable]) -> None:
        """Refuses, reading only, an input that differs from the checkpoint's (no lock held).

        Raises:
          ResumeMismatchError: The input differs from the one the checkpoint
            was trained with.
        """
        if self.model_dir is None:
            return
        pipelines = resume_record.registered_pipelines()
        if not pipelines:
            return
        step = resume_record.checkpoint_global_step(self.model_dir, key=_key(global_step))
        if step:
            resume_record.check_and_record(
                self.model_dir, step, pipelines, stop_rule_of_graph(), record=False
            )

    def begin(self, global_step: Optional[tf.Variable]) -> None:
        """Takes the lock, then checks the input against the checkpoint's (default graph complete).

        Raises:
          ModelDirLockedError: Another live process (or thread) holds the lock.
          ResumeMismatchError: The input differs from the one the checkpoint
            was trained with (the lock is released).
          monolith.core.common.model_dir.ModelDirError: model_dir is a file or
            not writable.
        """
        if self.model_dir is None:
            return
        self.release()  # A hook begun again (by hand) gives up its earlier run's lock first.
        self._lock = model_dir_lock.acquire(
            self.model_dir,
            heartbeat_secs=self.heartbeat_secs,
            stale_after_secs=self.stale_after_secs,
        )
        try:
            self._pipelines = resume_record.registered_pipelines()
            self._stop_rule = stop_rule_of_graph()
            if not self._pipelines:
                return
            step = resume_record.checkpoint_global_step(self.model_dir, key=_key(global_step))
            if step is None:
                logging.info(
                    "Resume guard: the checkpoint's global step in %s cannot be read before the "
                    "session restores it; checking after the restore.",
                    self.model_dir,
                )
                return
            resume_record.check_and_record(self.model_dir, step, self._pipelines, self._stop_rule)
        except BaseException:
            self.release()
            raise

    def after_create_session(self, session: Any, global_step: Optional[tf.Variable]) -> None:
        """Checks the input against the checkpoint with the restored global step.

        Raises:
          ResumeMismatchError: As in `begin()` (the lock is released).
        """
        if self.model_dir is None or not self._pipelines or global_step is None:
            return
        try:
            step = int(session.run(global_step))
            resume_record.check_and_record(self.model_dir, step, self._pipelines, self._stop_rule)
        except BaseException:
            self.release()
            raise

    def check_held(self) -> None:
        """Raises when another process took the lock over while this run trained.

        Raises:
          ModelDirLockedError: The lock was lost; the message names the new holder.
        """
        lock = self._lock
        if lock is None or lock.held:
            return
        holder = lock.lost_to
        who = holder.describe() if holder is not None else "the lock file is gone or unreadable"
        raise ModelDirLockedError(
            f"Lost the model_dir lock {lock.path} while training: {who}.\n"
            "Another process trains on this model_dir now (this one looked stale: no heartbeat "
            f"for {self.stale_after_secs:.0f} s). Training stops here, without a final "
            "checkpoint, so as not to overwrite that process's.",
            self.model_dir,
            holder,
        )

    def release(self) -> None:
        """Gives the lock up (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


def _key(global_step: Optional[tf.Variable]) -> str:
    """The global step's name in a checkpoint."""
    return global_step.op.name if global_step is not None else "global_step"
