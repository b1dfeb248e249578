"""The feed hook holds its run's model_dir (`monolith.core.feed.model_dir_guard`).

Real training runs through the emulator (`testing.train`, TPUEstimator's hook
order) and real TPUEstimator graphs on a simulated TPU: the hook takes the
model_dir lock in `begin()` and releases it after the final checkpoint,
stops a run whose lock another process took over, and refuses a restart
whose input differs from the checkpoint's before any hook begins. The
real second process and the `kill -9`'d holder are tested with the example
(tests/examples/test_train_ctr.py); the lock itself in test_model_dir_lock.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time

import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.feed import model_dir_lock
from monolith.core.feed.model_dir_guard import ModelDirGuard
from monolith.core.feed.model_dir_lock import LOCK_FILE_NAME, ModelDirLockedError
from monolith.core.stopping_signals import (
    ResumeMismatchError,
    append_stopping_signals,
    skip_trained_batches,
)
from tests.core._feed_hook_helpers import counting_model_fn
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def no_lock_left_held():
    """Releases what a failed run still holds, so no heartbeat thread outlives the test."""
    yield
    for lock in list(model_dir_lock._held_in_process.values()):
        lock.release()


def _stream_fn(num_batches, batch=2):
    """input_fn: ids 1, 2, ... in batches, resumed by `skip_trained_batches`, then padding."""

    def input_fn(params):
        ids = tf.data.Dataset.range(1, 1 + num_batches * batch).batch(batch, drop_remainder=True)
        real = ids.map(lambda x: {"id": tf.cast(x, tf.float32)})
        real = skip_trained_batches(real, context=params["context"], stream_id="ids")
        return append_stopping_signals(real)

    return input_fn


def _train(model_dir, num_batches=6, batch=2, **kwargs):
    return testing.train(
        counting_model_fn,
        _stream_fn(num_batches, batch),
        model_dir=str(model_dir),
        iterations_per_loop=2,
        **kwargs,
    )


def _holder(model_dir):
    """The lock file's content (a dict), or None."""
    try:
        with open(os.path.join(str(model_dir), LOCK_FILE_NAME)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _files(model_dir):
    """{name: sha256} of every file in model_dir."""
    found = {}
    for path in glob.glob(os.path.join(str(model_dir), "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                found[os.path.relpath(path, model_dir)] = hashlib.sha256(f.read()).hexdigest()
    return found


class _Probe(tf.compat.v1.train.SessionRunHook):
    """A caller's hook: the emulator runs it after the CheckpointSaverHook, before the feed hook.

    Records the lock file when its own `begin()`, `after_create_session()` and
    `end()` run, and at `end()` the latest checkpoint (the saver's `end()`,
    earlier in the list, has written the final one by then).
    """

    def __init__(self, model_dir, after_first_loop=None):
        self._model_dir = str(model_dir)
        self._after_first_loop = after_first_loop
        self.seen = {}

    def begin(self):
        self.seen["begin"] = _holder(self._model_dir)

    def after_create_session(self, session, coord):
        self.seen["session"] = _holder(self._model_dir)

    def after_run(self, run_context, run_values):
        if self._after_first_loop is not None:
            self._after_first_loop()
            self._after_first_loop = None

    def end(self, session):
        self.seen["end"] = _holder(self._model_dir)
        self.seen["checkpoint at end"] = tf.train.latest_checkpoint(self._model_dir)


def test_the_lock_is_held_from_the_hooks_begin_until_after_the_final_checkpoint(tmp_path):
    probe = _Probe(tmp_path)
    result = _train(tmp_path, hooks=[probe])

    assert probe.seen["begin"] is None  # before the feed hook's begin()
    assert probe.seen["session"]["pid"] == os.getpid()
    assert probe.seen["end"]["pid"] == os.getpid()
    assert probe.seen["checkpoint at end"] == result.final_checkpoint
    assert _holder(tmp_path) is None  # released by the feed hook's end()


def test_the_off_switch_trains_without_a_lock_file(tmp_path, monkeypatch):
    monkeypatch.setenv(model_dir_lock.MODEL_DIR_LOCK_ENV, "0")
    probe = _Probe(tmp_path)
    _train(tmp_path, hooks=[probe])
    assert probe.seen["session"] is None and probe.seen["end"] is None


def test_a_lost_lock_stops_training_without_a_final_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ModelDirGuard, "heartbeat_secs", 0.05)
    monkeypatch.setattr(ModelDirGuard, "stale_after_secs", 1.0)
    intruder = None

    def another_process_takes_the_lock():
        # What a process that found this one stale writes (pid: a live process).
        nonlocal intruder
        intruder = dict(_holder(tmp_path), pid=os.getppid(), token="another-process")
        with open(os.path.join(str(tmp_path), LOCK_FILE_NAME), "w") as f:
            json.dump(intruder, f)
        time.sleep(0.5)  # ten heartbeats: the heartbeat thread finds the file changed

    probe = _Probe(tmp_path, after_first_loop=another_process_takes_the_lock)
    with pytest.raises(ModelDirLockedError, match="Lost the model_dir lock") as raised:
        _train(tmp_path, num_batches=10_000, hooks=[probe])

    assert f"pid {os.getppid()}" in str(raised.value)
    assert _holder(tmp_path) == intruder  # its lock file is left alone
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-0")  # no final one


def test_a_restart_with_another_batch_is_refused_before_any_hook_begins(tmp_path):
    _train(tmp_path, num_batches=6, batch=2, steps=4)
    before = _files(tmp_path)

    with pytest.raises(ResumeMismatchError, match="batch size: 2 -> 4"):
        _train(tmp_path, num_batches=6, batch=4)

    assert _files(tmp_path) == before  # not even an events file or a lock
    _train(tmp_path, num_batches=6, batch=2)  # the original input resumes


def test_a_checkpoint_from_before_the_guard_resumes_and_is_recorded_then(tmp_path):
    _train(tmp_path, num_batches=6, batch=2, steps=4)
    record = os.path.join(str(tmp_path), "monolith_resume_record.json")
    os.remove(record)  # as a model_dir written before the guard existed

    result = _train(tmp_path, num_batches=6, batch=2)

    assert (result.initial_global_step, result.stopped_at_end_of_stream) == (4, True)
    with open(record) as f:
        assert json.load(f)["pipelines"][0]["batch_size"] == 2
    with pytest.raises(ResumeMismatchError):  # checked from then on
        _train(tmp_path, num_batches=6, batch=4)


# ------------------------------------------------------------------ TPUEstimator


def _tpu_input_fn(params):
    dataset = tf.data.Dataset.range(64).map(lambda i: {"x": tf.cast(i, tf.float32)})
    dataset = dataset.batch(params["batch_size"], drop_remainder=True)
    return append_stopping_signals(skip_trained_batches(dataset, context=params["context"]))


def _tpu_model_fn(features, labels, mode, params):
    weight = tf.compat.v1.get_variable("w", [], tf.float32)
    loss = tf.reduce_mean(features["x"] * weight)
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
        tf.compat.v1.train.GradientDescentOptimizer(0.1)
    )
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tpu_estimator.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


class _OrderProbeHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Our hook, recording at its `begin()` what the hooks before it left in model_dir."""

    seen: dict = {}

    def begin(self):
        model_dir = self._model_dir_guard.model_dir
        _OrderProbeHook.seen = {
            "events files": glob.glob(os.path.join(model_dir, "events.out.tfevents.*")),
        }
        super().begin()
        _OrderProbeHook.seen["holder"] = _holder(model_dir)


def _build_on_tpu(model_dir, per_replica_batch=2, feed_hook=_OrderProbeHook):
    return build_on_simulated_tpu(
        _tpu_model_fn,
        _tpu_input_fn,
        num_hosts=1,
        cores_per_host=8,
        model_dir=str(model_dir),
        per_replica_batch=per_replica_batch,
        max_steps=100,  # beyond the checkpoint's step: Estimator trains
        experimental_feed_hook=feed_hook,
    )


def test_tpu_estimator_runs_its_checkpoint_saver_first_and_the_hook_locks_its_model_dir(tmp_path):
    """TPUEstimator's order, on which `end()` releasing after the final save rests."""
    _build_on_tpu(tmp_path)
    # CheckpointSaverHook.begin() (a chief hook: first in MonitoredTrainingSession's
    # list, which also orders end()) opened its events file before our begin().
    assert len(_OrderProbeHook.seen["events files"]) == 1
    assert _OrderProbeHook.seen["holder"]["pid"] == os.getpid()  # from ctx.config.model_dir
    assert _holder(tmp_path) is None  # released where the dry run stops (no end() follows)


def test_tpu_estimator_refuses_a_restart_with_another_batch_before_its_hooks_begin(tmp_path):
    _build_on_tpu(tmp_path, per_replica_batch=2)  # records batch 2 at step 0
    with tf.Graph().as_default():  # a checkpoint at step 5
        step = tf.compat.v1.train.get_or_create_global_step()
        with tf.compat.v1.Session() as session:
            session.run(step.assign(5))
            tf.compat.v1.train.Saver().save(session, os.path.join(str(tmp_path), "model.ckpt-5"))
    _OrderProbeHook.seen = {}

    with pytest.raises(ResumeMismatchError, match="batch size: 2 -> 4"):
        _build_on_tpu(tmp_path, per_replica_batch=4)
    assert _OrderProbeHook.seen == {}  # refused in the hook's constructor: no begin() ran
