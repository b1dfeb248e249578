"""`testing.train` against the real `TPUEstimator.train` (use_tpu=True, simulated 1x1 TPU).

What the input_fn and model_fn receive, and the hooks and their order, are
captured from a real TPUEstimator that builds its TPU graph on a simulated
one-host, one-core TPU system (`monolith.core.simulated_tpu`), and compared
with what the emulator gives.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_context
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import TPUEstimatorSpec

from monolith.core import simulated_tpu, testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from tests._feed_threads import live_feed_threads
from tests.core._feed_hook_helpers import SIGNAL, counting_model_fn, read_counts

pytestmark = pytest.mark.timeout(120)

BATCH_SIZE = 4


def _stream_input_fn(num_batches, seen=None):
    """input_fn: `num_batches` real batches of `params["batch_size"]` ids, then padding."""

    def input_fn(params, config):
        if seen is not None:
            seen["input_fn"] = _describe(params, config, from_input_fn=True)
        batch = params["batch_size"]
        ids = tf.data.Dataset.range(1, 1 + num_batches * batch).batch(batch, drop_remainder=True)
        real = ids.map(lambda x: {"id": tf.cast(x, tf.float32), SIGNAL: tf.zeros([batch], tf.bool)})
        pad = tf.data.Dataset.from_tensors(
            {"id": tf.zeros([batch], tf.float32), SIGNAL: tf.ones([batch], tf.bool)}
        ).repeat()
        return real.concatenate(pad)

    return input_fn


def _describe(params, config, *, from_input_fn):
    """What a user's function can see in params/config, comparable across runs."""
    context = params["context"]
    facts = {
        "keys": sorted(params),
        "batch_size": params["batch_size"],
        "use_tpu": params.get("use_tpu", "absent"),
        "tag": params["tag"],
        "context_type": type(context),
        "num_replicas": context.num_replicas,
        "num_hosts": context.num_hosts,
        "config_type": type(config),
        "iterations_per_loop": config.tpu_config.iterations_per_loop,
        "log_step_count_steps": config.log_step_count_steps,
    }
    if from_input_fn:
        # The device string names the host's job; invocation, count, replicas compare.
        facts["deployment"] = context.current_input_fn_deployment()[1:]
        facts["current_host"] = context.current_host
    else:
        with pytest.raises(RuntimeError, match="model_fn"):
            context.current_input_fn_deployment()
    return facts


def _recording_model_fn(seen):
    def model_fn(features, labels, mode, params, config):
        seen["model_fn"] = _describe(params, config, from_input_fn=False)
        params["tag"] = "mutated"  # a deep copy: the next call must not see it
        return counting_model_fn(features, mode, params)

    return model_fn


def _simulated_tpuestimator_run_config(model_dir):
    return tpu_config.RunConfig(
        master=simulated_tpu.SIMULATED_MASTER,
        model_dir=str(model_dir),
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=2,
            tpu_job_name="worker",
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )


def test_params_and_config_are_those_tpuestimator_gives(tmp_path):
    estimator_seen, emulator_seen = {}, {}
    params = {"tag": "x"}
    with simulated_tpu.simulated_tpu_system(num_hosts=1, cores_per_host=1):
        simulated_tpu.build_tpu_training_graph(
            _recording_model_fn(estimator_seen),
            _stream_input_fn(2, estimator_seen),
            config=_simulated_tpuestimator_run_config(tmp_path / "estimator"),
            train_batch_size=BATCH_SIZE,
            params=params,
        )
    testing.train(
        _recording_model_fn(emulator_seen),
        _stream_input_fn(2, emulator_seen),
        model_dir=str(tmp_path / "emulator"),
        iterations_per_loop=2,
        params=params,
        train_batch_size=BATCH_SIZE,
    )
    assert params == {"tag": "x"}
    assert emulator_seen == estimator_seen
    # Spell out the facts compared, so a change on both sides is noticed too.
    assert emulator_seen["input_fn"]["batch_size"] == BATCH_SIZE
    assert emulator_seen["input_fn"]["use_tpu"] == "absent"
    assert emulator_seen["input_fn"]["deployment"] == (0, 1, 1)
    assert emulator_seen["model_fn"]["use_tpu"] is True
    assert emulator_seen["model_fn"]["context_type"] is tpu_context.TPUContext
    assert emulator_seen["model_fn"]["config_type"] is tpu_config.RunConfig
    assert emulator_seen["model_fn"]["log_step_count_steps"] is None


def test_input_fn_deployment_is_the_emulated_cpu_host(tmp_path):
    deployments = []

    def input_fn(params):
        deployments.append(params["context"].current_input_fn_deployment())
        return _stream_input_fn(1)({**params, "context": None}, None)

    testing.train(counting_model_fn, input_fn, model_dir=str(tmp_path), train_batch_size=2)
    assert deployments == [("/device:CPU:0", 0, 1, 1)]


def test_config_describes_the_run(tmp_path):
    configs = []

    def model_fn(features, mode, params, config):
        configs.append(config)
        return counting_model_fn(features, mode, params)

    testing.train(
        model_fn,
        _stream_input_fn(1),
        model_dir=str(tmp_path),
        iterations_per_loop=3,
        outfeed_every_n_steps=3,
        save_checkpoints_steps=6,
        train_batch_size=2,
    )
    (config,) = configs
    assert config.model_dir == str(tmp_path)
    assert config.tpu_config.iterations_per_loop == 3
    assert config.tpu_config.experimental_host_call_every_n_steps == 3
    assert (
        config.tpu_config.per_host_input_for_training is tpu_config.InputPipelineConfig.PER_HOST_V2
    )
    assert config.save_checkpoints_steps == 6


@pytest.mark.parametrize("key", ["batch_size", "context"])
def test_params_holding_a_reserved_key_are_rejected(tmp_path, key):
    with pytest.raises(ValueError, match=key):
        testing.train(
            counting_model_fn,
            _stream_input_fn(1),
            model_dir=str(tmp_path),
            params={key: 2},
            train_batch_size=2,
        )


def test_without_train_batch_size_a_params_batch_size_passes_through(tmp_path):
    result = testing.train(
        counting_model_fn, _stream_input_fn(2), model_dir=str(tmp_path), params={"batch_size": 3}
    )
    assert read_counts(result.final_checkpoint)["real_examples"] == 2 * 3


@pytest.mark.parametrize(
    "bad, error",
    [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError), ("4", TypeError)],
)
def test_bad_train_batch_size_is_rejected_naming_it(tmp_path, bad, error):
    with pytest.raises(error, match=rf"train_batch_size={bad!r}"):
        testing.train(
            counting_model_fn, _stream_input_fn(1), model_dir=str(tmp_path), train_batch_size=bad
        )


# -- hooks ---------------------------------------------------------------------------


class _UserHook(tf.compat.v1.train.SessionRunHook):
    pass


class _ModelHook(tf.compat.v1.train.SessionRunHook):
    pass


def _model_fn_with_training_hook(features, mode, params):
    spec = counting_model_fn(features, mode, params)
    return TPUEstimatorSpec(
        mode, loss=spec.loss, train_op=spec.train_op, training_hooks=[_ModelHook()]
    )


# Hooks only a real TPU run has (TPU worker reset) or that write TensorBoard
# events (listed as differences in `testing.train`), and TPUEstimator's
# per-host dataset initializer hook (the emulator initialises its iterator
# among the feed hook's init ops, as before).
_TPU_ONLY_HOOKS = {"SummarySaverHook", "GracefulShutdownHook", "MultiHostDatasetInitializerHook"}


def _hook_names(monkeypatch):
    """Records the hook class names of every MonitoredSession created."""
    created = []
    original = tf.compat.v1.train.MonitoredSession.__init__

    def recording_init(self, session_creator=None, hooks=None, **kwargs):
        names = [type(hook).__name__ for hook in hooks or ()]
        created.append(
            [
                "FeedHook" if "EndOfStreamHandlingHook" in name else name
                for name in names
                if name not in _TPU_ONLY_HOOKS
            ]
        )
        original(self, session_creator=session_creator, hooks=hooks, **kwargs)

    monkeypatch.setattr(tf.compat.v1.train.MonitoredSession, "__init__", recording_init)
    return created


def test_hooks_run_in_tpuestimators_order(tmp_path, monkeypatch):
    created = _hook_names(monkeypatch)
    with simulated_tpu.simulated_tpu_system(num_hosts=1, cores_per_host=1):
        simulated_tpu.build_tpu_training_graph(
            _model_fn_with_training_hook,
            _stream_input_fn(2),
            config=_simulated_tpuestimator_run_config(tmp_path / "estimator").replace(
                save_checkpoints_steps=2
            ),
            train_batch_size=BATCH_SIZE,
            hooks=[_UserHook()],
        )
    testing.train(
        _model_fn_with_training_hook,
        _stream_input_fn(2),
        model_dir=str(tmp_path / "emulator"),
        train_batch_size=BATCH_SIZE,
        hooks=[_UserHook()],
    )
    estimator_hooks, emulator_hooks = created
    emulator_own = ("_RunCounter", "DrainAfterStop")
    assert [name for name in emulator_hooks if name not in emulator_own] == estimator_hooks
    assert emulator_hooks == [
        "_RunCounter",  # the emulator's own, for TrainResult and on_loop_end
        "CheckpointSaverHook",
        "_UserHook",
        "_TPUStopAtStepHook",
        "NanTensorHook",
        "FeedHook",
        # The emulator's own: after the feed hook, whose end() joins the
        # infeed thread, it drains the streams for TrainResult.untrained_real_batches.
        "DrainAfterStop",
        "InstallSignalHandlerHook",
        "LoggingTensorHook",
        "ExamplesPerSecondHook",
        "_ModelHook",
    ]


# -- NaN, logging --------------------------------------------------------------------


def _nan_at_step(nan_step):
    """The counting model whose loss is NaN on (1-based) step `nan_step` (batch size 2)."""

    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        # Step k holds ids 2k-1 and 2k: decided by the data, not by a racy step read.
        is_nan_step = tf.reduce_any(tf.equal(features["id"], 2.0 * nan_step))
        loss = tf.where(is_nan_step, tf.constant(np.nan, tf.float32), spec.loss)
        return TPUEstimatorSpec(mode, loss=loss, train_op=spec.train_op)

    return model_fn


def test_a_nan_loss_raises_nan_loss_during_training_error(tmp_path):
    loops = []
    with pytest.raises(tf.compat.v1.train.NanLossDuringTrainingError):
        testing.train(
            _nan_at_step(4),  # the last step of loop 2
            _stream_input_fn(10),
            model_dir=str(tmp_path),
            iterations_per_loop=2,
            train_batch_size=2,
            on_loop_end=lambda *args: loops.append(args),
        )
    assert [(step, steps) for step, steps, _ in loops] == [(2, 2)]
    assert live_feed_threads() == []


def test_a_nan_loss_inside_a_loop_is_not_seen_like_tpuestimator(tmp_path):
    # TPUEstimator's NanTensorHook sees the loss of each loop's last step only.
    result = testing.train(
        _nan_at_step(3),  # the first step of loop 2
        _stream_input_fn(4),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        train_batch_size=2,
    )
    assert result.stopped_at_end_of_stream is True
    assert read_counts(result.final_checkpoint)["real_examples"] == 4 * 2


def test_loss_step_and_speed_are_logged_every_log_step_count_steps_loops(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tensorflow"):
        testing.train(
            counting_model_fn,
            _stream_input_fn(4),
            model_dir=str(tmp_path),
            iterations_per_loop=2,
            train_batch_size=2,
            log_step_count_steps=1,
        )
    messages = [record.getMessage() for record in caplog.records]
    steps = [m for m in messages if m.startswith("loss = ") and ", step = " in m]
    # One line per loop: steps 2, 4 (real batches), 6 (padding stops the stream).
    assert [m.rsplit("step = ", 1)[1].split()[0].rstrip(",(") for m in steps] == ["2", "4", "6"]
    assert any(m.startswith("global_step/sec: ") for m in messages)
    assert any(m.startswith("examples/sec: ") for m in messages)


def test_no_logging_hooks_with_log_step_count_steps_none(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tensorflow"):
        testing.train(
            counting_model_fn,
            _stream_input_fn(4),
            model_dir=str(tmp_path),
            train_batch_size=2,
            log_step_count_steps=None,
        )
    messages = [record.getMessage() for record in caplog.records]
    assert not any(m.startswith(("loss = ", "examples/sec")) for m in messages)


# -- CrossShardOptimizer -------------------------------------------------------------


def _linear_model_fn(cross_shard):
    def model_fn(features, mode, params):
        weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
        loss = tf.reduce_mean(tf.square(features["id"] * weight - 1.0))
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.001)
        if cross_shard and params["use_tpu"]:
            optimizer = tf.compat.v1.tpu.CrossShardOptimizer(optimizer)
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
        return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    return model_fn


def test_cross_shard_optimizer_trains_as_one_replica(tmp_path):
    weights = []
    for cross_shard in (True, False):
        result = testing.train(
            _linear_model_fn(cross_shard),
            _stream_input_fn(3),
            model_dir=str(tmp_path / str(cross_shard)),
            train_batch_size=2,
            steps=3,
        )
        weights.append(tf.train.load_checkpoint(result.final_checkpoint).get_tensor("w"))
    assert weights[0] != 1.0
    assert weights[0] == pytest.approx(weights[1])


# -- TrainResult ---------------------------------------------------------------------


def _real_steps_only_model_fn(features, mode, params):
    """The counting model, but the global step advances on real batches only."""
    spec = counting_model_fn(features, mode, params)
    global_step = tf.compat.v1.train.get_global_step()
    real = tf.logical_not(tf.reduce_any(features[SIGNAL]))
    with tf.control_dependencies([spec.train_op]):  # after the step's own increment
        undo = tf.cast(tf.logical_not(real), tf.int64)
    train_op = tf.group(spec.train_op, global_step.assign_sub(undo))
    return TPUEstimatorSpec(mode, loss=spec.loss, train_op=train_op)


def test_train_result_counts_steps_that_did_not_advance_the_global_step(tmp_path):
    first = testing.train(
        _real_steps_only_model_fn,
        _stream_input_fn(3),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        train_batch_size=2,
    )
    counts = read_counts(first.final_checkpoint)
    assert (first.initial_global_step, first.global_step) == (0, 3)
    assert (first.steps_run, first.loops_run) == (4, 2)
    assert first.uncounted_steps == counts["padding_steps"] == 1
    second = testing.train(
        _real_steps_only_model_fn,
        _stream_input_fn(1),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        train_batch_size=2,
    )
    assert (second.initial_global_step, second.global_step) == (3, 4)
    assert (second.steps_run, second.uncounted_steps) == (2, 1)


class _AbortOnce(tf.compat.v1.train.SessionRunHook):
    """Raises AbortedError after the first loop, so MonitoredSession recreates the session."""

    def __init__(self):
        self.aborted = False

    def after_run(self, run_context, run_values):
        if not self.aborted:
            self.aborted = True
            raise tf.errors.AbortedError(None, None, "injected: session must be recreated")


def test_train_result_keeps_the_first_sessions_global_step_after_a_recreation(tmp_path):
    abort = _AbortOnce()
    result = testing.train(
        counting_model_fn,
        _stream_input_fn(2),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        train_batch_size=2,
        save_checkpoints_steps=2,
        hooks=[abort],
    )
    assert abort.aborted
    # Loop 1 (steps 1-2) ran and was saved at step 2, then a hook aborted the
    # session; the new one restores step 2 and replays the stream from its
    # start: 2 real steps, then 2 padding steps (the counting model advances
    # the global step on padding too).
    assert result.initial_global_step == 0
    assert (result.loops_run, result.steps_run, result.global_step) == (3, 6, 6)
    assert result.uncounted_steps == 0


def _adam_model_fn(features, mode, params):
    weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
    with tf.compat.v1.name_scope("tower"):
        scale = tf.compat.v1.Variable(1.0, name="scale", use_resource=True)
    loss = tf.reduce_mean(tf.square(features["id"] * weight * scale - 1.0))
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(tf.compat.v1.train.AdamOptimizer(0.01))
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


def test_variable_names_are_those_of_a_tpuestimator_checkpoint(tmp_path):
    """Adam's beta powers and a model_fn's own name scope, in both TF behaviours."""
    with simulated_tpu.simulated_tpu_system(num_hosts=1, cores_per_host=1):
        built = simulated_tpu.build_tpu_training_graph(
            _adam_model_fn,
            _stream_input_fn(2),
            config=_simulated_tpuestimator_run_config(tmp_path / "estimator"),
            train_batch_size=BATCH_SIZE,
        )
    estimator_names = sorted(
        v.op.name for v in built.graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    )
    result = testing.train(
        _adam_model_fn,
        _stream_input_fn(2),
        model_dir=str(tmp_path / "emulator"),
        iterations_per_loop=2,
        train_batch_size=BATCH_SIZE,
    )
    emulator_names = sorted(name for name, _ in tf.train.list_variables(result.final_checkpoint))
    assert emulator_names == estimator_names
    assert {"beta1_power", "beta2_power", "tower/scale", "tower/scale/Adam"} <= set(emulator_names)
