"""The resume guard: `skip_trained_batches` registers what its count rests on; the checker refuses.

Real graphs (a TPUEstimator graph on a simulated 2 x 4 system for the values a
real TPU context gives), real checkpoints and record files in tmp_path. The
checker alone: the `_GuardHook` here calls it in `begin()`, after
MonitoredSession's CheckpointSaverHook began and before it writes anything.
The feed hook's own calls (constructor, `begin()`, `after_create_session`)
are tested in test_model_dir_guard.py and with the example.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core import stopping_signals, trained_batches
from monolith.core.end_of_stream import resume_record
from monolith.core.end_of_stream.resume_record import (
    PipelineRecord,
    ResumeMismatchError,
    check_and_record,
    checkpoint_global_step,
    registered_pipelines,
)
from monolith.core.feed.signal import StopRule
from monolith.core.stopping_signals import append_stopping_signals, skip_trained_batches
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu

pytestmark = pytest.mark.timeout(120)

ANY, ALL = StopRule.ANY_REPLICA_PADDING, StopRule.ALL_REPLICAS_PADDING


def _record(**overrides):
    values = dict(
        pipeline=0,
        num_pipelines=1,
        num_hosts=1,
        input_mode="PER_HOST_V2",
        batch_size=256,
        batches_per_step=1,
        stream_id="seed=0",
    )
    values.update(overrides)
    return PipelineRecord(**values)


def _registered(build):
    """The records `build()` registers in a fresh graph with a global step."""
    with tf.Graph().as_default() as graph:
        tf.compat.v1.train.get_or_create_global_step()
        build()
        return registered_pipelines(graph)


def _ids(n=64, batch=4, drop_remainder=True):
    return tf.data.Dataset.range(n).batch(batch, drop_remainder=drop_remainder)


def _files(model_dir):
    """{name: sha256} of every file in model_dir (to prove nothing was touched)."""
    found = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, model_dir)] = hashlib.sha256(f.read()).hexdigest()
    return found


# ------------------------------------------------------------------ registration


def test_the_error_type_is_a_public_value_error():
    assert issubclass(ResumeMismatchError, ValueError)
    assert stopping_signals.ResumeMismatchError is ResumeMismatchError
    assert trained_batches.ResumeMismatchError is ResumeMismatchError


def test_skip_registers_batch_size_batches_per_step_and_stream_id():
    [record] = _registered(lambda: skip_trained_batches(_ids(), 3, stream_id="seed=7"))
    assert record == PipelineRecord(
        pipeline=0,
        num_pipelines=1,
        num_hosts=None,
        input_mode=None,
        batch_size=4,
        batches_per_step=3,
        stream_id="seed=7",
    )


def test_the_batch_size_is_the_static_dimension_every_component_shares():
    def build():
        dataset = _ids().map(lambda ids: ({"ids": ids, "x": tf.zeros([4, 3])}, ids % 2))
        skip_trained_batches(dataset)

    [record] = _registered(build)
    assert record.batch_size == 4


def test_a_batch_size_that_is_not_static_is_recorded_as_unknown():
    [record] = _registered(lambda: skip_trained_batches(_ids(drop_remainder=False)))
    assert record.batch_size is None


@pytest.mark.parametrize("bad", [7, b"seed", ["a"]])
def test_a_stream_id_that_is_not_a_str_is_a_type_error(bad):
    with pytest.raises(TypeError, match=re.escape(f"stream_id={bad!r} (type")):
        _registered(lambda: skip_trained_batches(_ids(), stream_id=bad))


def test_a_second_identical_call_for_one_pipeline_registers_nothing_new():
    records = _registered(lambda: [skip_trained_batches(_ids()) for _ in range(2)])
    assert len(records) == 1


def test_a_second_different_call_for_one_pipeline_is_a_value_error():
    def build():
        skip_trained_batches(_ids(), stream_id="a")
        skip_trained_batches(_ids(), stream_id="b")

    with pytest.raises(ValueError, match="called twice for input pipeline 0"):
        _registered(build)


def test_the_records_survive_a_meta_graph_export():
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        skip_trained_batches(_ids(), stream_id="s")
        meta = tf.compat.v1.train.export_meta_graph()
    [text] = meta.collection_def[resume_record.RESUME_RECORDS_COLLECTION].bytes_list.value
    assert PipelineRecord.from_json(text).stream_id == "s"


def test_a_longer_or_shorter_stream_registers_the_same_record():
    short = _registered(lambda: skip_trained_batches(_ids(n=40), stream_id="s"))
    long = _registered(lambda: skip_trained_batches(_ids(n=4000), stream_id="s"))
    assert short == long


@pytest.mark.parametrize(
    "mode, per_step",
    [
        (tpu_config.InputPipelineConfig.PER_HOST_V2, 4),
        (tpu_config.InputPipelineConfig.PER_HOST_V1, 1),
    ],
    ids=["per_host_v2", "per_host_v1"],
)
def test_tpu_estimator_on_2x4_registers_one_record_per_host(tmp_path, mode, per_step):
    def input_fn(params):
        dataset = tf.data.Dataset.range(64).map(lambda i: ({"x": tf.stack([i, i])}, i % 2))
        dataset = dataset.batch(params["batch_size"], drop_remainder=True)
        dataset = skip_trained_batches(dataset, context=params["context"], stream_id="s")
        return append_stopping_signals(dataset)

    def model_fn(features, labels, mode, params):
        weight = tf.compat.v1.get_variable("w", [2], tf.float32)
        loss = tf.reduce_mean(tf.cast(features["x"], tf.float32) * weight)
        optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(0.1)
        )
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
        return tpu_estimator.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    built = build_on_simulated_tpu(
        model_fn,
        input_fn,
        num_hosts=2,
        cores_per_host=4,
        model_dir=str(tmp_path),
        per_replica_batch=2,
        max_steps=1,
        per_host_input_for_training=mode,
    )
    name = "PER_HOST_V2" if per_step == 4 else "PER_HOST_V1"
    per_host_batch = 2 if per_step == 4 else 8  # V1: one host batch for the host's 4 cores
    assert registered_pipelines(built.graph) == tuple(
        PipelineRecord(
            pipeline=host,
            num_pipelines=2,
            num_hosts=2,
            input_mode=name,
            batch_size=per_host_batch,
            batches_per_step=per_step,
            stream_id="s",
        )
        for host in (0, 1)
    )


# ------------------------------------------------------------------ the check


def _record_file(model_dir):
    return os.path.join(model_dir, resume_record.RECORD_FILE_NAME)


def _read(model_dir):
    with open(_record_file(model_dir)) as f:
        return json.load(f)


def test_a_first_run_records_its_input(tmp_path):
    check_and_record(str(tmp_path), 0, [_record()], ANY)
    data = _read(tmp_path)
    assert data["stop_rule"] == "ANY_REPLICA_PADDING"
    assert data["pipelines"] == [json.loads(_record().to_json())]
    assert os.listdir(tmp_path) == [resume_record.RECORD_FILE_NAME]  # no temporary file left


def test_a_checkpoint_from_before_the_guard_is_resumed_and_recorded(tmp_path):
    check_and_record(str(tmp_path), 220, [_record()], ANY)
    assert _read(tmp_path)["recorded_at_global_step"] == 220


def test_the_same_input_resumes_and_leaves_the_record_as_it_was(tmp_path):
    check_and_record(str(tmp_path), 0, [_record()], ANY)
    before = _files(tmp_path)
    check_and_record(str(tmp_path), 220, [_record()], ANY)
    assert _files(tmp_path) == before


def test_at_global_step_zero_a_different_input_replaces_the_record(tmp_path):
    check_and_record(str(tmp_path), 0, [_record()], ANY)
    check_and_record(str(tmp_path), 0, [_record(batch_size=512)], ANY)
    assert _read(tmp_path)["pipelines"][0]["batch_size"] == 512


def _refused(tmp_path, old, new, old_rule=ANY, new_rule=ANY, step=220):
    check_and_record(str(tmp_path), 0, old, old_rule)
    before = _files(tmp_path)
    with pytest.raises(ResumeMismatchError) as raised:
        check_and_record(str(tmp_path), step, new, new_rule)
    assert _files(tmp_path) == before
    return raised.value


def test_a_larger_batch_is_refused_with_the_examples_it_would_skip_untrained(tmp_path):
    error = _refused(tmp_path, [_record()], [_record(batch_size=512)])
    message = str(error)
    assert f"Cannot resume the checkpoint in {tmp_path} (global step 220)" in message
    assert "  batch size: 256 -> 512" in message
    assert "would skip 112640 examples, 56320 of them never trained" in message
    assert "Restart with the original values (batch size 256), or train on a new model_dir" in (
        message
    )
    assert len(message.splitlines()) <= 5
    assert error.model_dir == str(tmp_path) and error.global_step == 220
    assert [(d.name, d.old, d.new) for d in error.differences] == [("batch size", 256, 512)]


def test_a_smaller_batch_is_refused_with_the_examples_it_would_train_twice(tmp_path):
    error = _refused(tmp_path, [_record()], [_record(batch_size=128)])
    assert "  batch size: 256 -> 128" in str(error)
    assert "28160 trained examples would be trained twice" in str(error)


def test_another_stream_is_refused_with_the_examples_it_would_skip(tmp_path):
    error = _refused(tmp_path, [_record()], [_record(stream_id="seed=5")])
    assert "  stream id: 'seed=0' -> 'seed=5'" in str(error)
    assert (
        "The model holds 56320 examples of stream 'seed=0'; the skip would pass over the "
        "first 56320 examples of stream 'seed=5' without training them." in str(error)
    )


def test_adding_a_stream_id_is_a_difference(tmp_path):
    error = _refused(tmp_path, [_record(stream_id=None)], [_record(stream_id="seed=0")])
    assert "  stream id: None -> 'seed=0'" in str(error)


def test_other_batches_per_step_are_refused(tmp_path):
    error = _refused(tmp_path, [_record(batches_per_step=4)], [_record(batches_per_step=8)])
    assert "  batches per step: 4 -> 8" in str(error)
    assert "would skip 450560 examples, 225280 of them never trained" in str(error)


def test_another_stop_rule_is_refused(tmp_path):
    error = _refused(tmp_path, [_record()], [_record()], new_rule=ALL)
    assert "  stop rule: ANY_REPLICA_PADDING -> ALL_REPLICAS_PADDING" in str(error)


def _pod(hosts, per_host_batch, replicas_per_host):
    return [
        _record(
            pipeline=h,
            num_pipelines=hosts,
            num_hosts=hosts,
            batch_size=per_host_batch,
            batches_per_step=replicas_per_host,
        )
        for h in range(hosts)
    ]


def test_another_topology_is_refused_naming_the_hosts(tmp_path):
    error = _refused(tmp_path, _pod(2, 32, 4), _pod(1, 32, 8))
    message = str(error)
    assert "  hosts: 2 -> 1" in message and "  input pipelines: 2 -> 1" in message
    assert "  batches per step: 4 -> 8" in message
    assert "the batches skipped are not the batches trained" in message


def test_one_host_differing_is_named_with_its_pipeline(tmp_path):
    new = _pod(2, 32, 4)
    new[1] = _record(pipeline=1, num_pipelines=2, num_hosts=2, batch_size=64, batches_per_step=4)
    error = _refused(tmp_path, _pod(2, 32, 4), new)
    assert "  batch size (input pipeline 1): 32 -> 64" in str(error)


def test_the_same_examples_per_step_in_other_batches_is_refused_saying_why(tmp_path):
    error = _refused(
        tmp_path,
        [_record(batch_size=256, batches_per_step=2)],
        [_record(batch_size=512, batches_per_step=1)],
    )
    assert "as many as were trained but in batches of another size" in str(error)


def test_an_unknown_value_is_not_compared(tmp_path):
    check_and_record(str(tmp_path), 0, [_record(batch_size=None, num_hosts=None)], ANY)
    check_and_record(str(tmp_path), 220, [_record()], ANY)  # no error


def test_no_skip_in_the_graph_checks_and_writes_nothing(tmp_path):
    check_and_record(str(tmp_path), 220, [], ANY)
    assert os.listdir(tmp_path) == []


def test_an_unreadable_record_is_a_value_error_naming_it(tmp_path):
    with open(_record_file(tmp_path), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=rf"the resume record {_record_file(tmp_path)} is not"):
        check_and_record(str(tmp_path), 220, [_record()], ANY)


def test_a_record_of_a_newer_format_asks_for_an_upgrade(tmp_path):
    with open(_record_file(tmp_path), "w") as f:
        json.dump({"format": 99, "stop_rule": "ANY_REPLICA_PADDING", "pipelines": []}, f)
    with pytest.raises(ValueError, match="has format 99.*upgrade monolith"):
        check_and_record(str(tmp_path), 220, [_record()], ANY)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(global_step=-1), ValueError, "global_step=-1"),
        (dict(global_step=1.0), TypeError, "global_step=1.0"),
        (dict(stop_rule="any"), TypeError, "stop_rule='any'"),
        (dict(pipelines=[{"batch_size": 2}]), TypeError, "pipelines="),
        (dict(model_dir=None), TypeError, "model_dir=None"),
    ],
)
def test_bad_arguments_name_themselves(tmp_path, kwargs, error, match):
    arguments = dict(model_dir=str(tmp_path), global_step=0, pipelines=[_record()], stop_rule=ANY)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        check_and_record(**arguments)


# ------------------------------------------------------------------ the global step on disk


def _save_checkpoint(model_dir, step, with_global_step=True):
    with tf.Graph().as_default():
        if with_global_step:
            global_step = tf.compat.v1.train.get_or_create_global_step()
        else:
            tf.compat.v1.get_variable("other_model", [], tf.float32)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            if with_global_step:
                session.run(global_step.assign(step))
            return saver.save(session, os.path.join(model_dir, "model.ckpt"), global_step=step)


def test_checkpoint_global_step_without_a_checkpoint_is_zero(tmp_path):
    assert checkpoint_global_step(str(tmp_path)) == 0
    assert checkpoint_global_step(str(tmp_path / "missing")) == 0


def test_checkpoint_global_step_reads_the_latest_checkpoint(tmp_path):
    _save_checkpoint(str(tmp_path), 3)
    _save_checkpoint(str(tmp_path), 7)
    assert checkpoint_global_step(str(tmp_path)) == 7


def test_checkpoint_global_step_of_a_truncated_checkpoint_is_unknown(tmp_path):
    prefix = _save_checkpoint(str(tmp_path), 7)
    [data] = [n for n in os.listdir(tmp_path) if n.startswith("model.ckpt-7.data")]
    with open(tmp_path / data, "r+b") as f:
        f.truncate(0)
    os.remove(f"{prefix}.index")
    with open(f"{prefix}.index", "wb") as f:
        f.write(b"garbage")
    assert checkpoint_global_step(str(tmp_path)) is None


def test_checkpoint_global_step_of_another_models_checkpoint_is_unknown(tmp_path):
    _save_checkpoint(str(tmp_path), 7, with_global_step=False)
    assert checkpoint_global_step(str(tmp_path)) is None


# ------------------------------------------------------------------ where the hook checks


class _GuardHook(tf.compat.v1.train.SessionRunHook):
    """Checks in `begin()`, as the feed hook will: before any session writes to model_dir."""

    def __init__(self, model_dir):
        self._model_dir = model_dir

    def begin(self):
        check_and_record(
            self._model_dir,
            checkpoint_global_step(self._model_dir),
            registered_pipelines(),
            ANY,
        )


def _train(model_dir, batch, steps):
    """MonitoredTrainingSession's hook order (the saver first), skip_trained_batches input."""
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        # Only the registration matters here; the skip itself is tested elsewhere.
        skip_trained_batches(_ids(n=64, batch=batch), stream_id="s")
        train_op = global_step.assign_add(1)
        scaffold = tf.compat.v1.train.Scaffold()
        hooks = [
            tf.compat.v1.train.CheckpointSaverHook(model_dir, save_steps=1, scaffold=scaffold),
            _GuardHook(model_dir),
            tf.compat.v1.train.StopAtStepHook(last_step=steps),
        ]
        creator = tf.compat.v1.train.ChiefSessionCreator(
            scaffold=scaffold, checkpoint_dir=model_dir
        )
        with tf.compat.v1.train.MonitoredSession(session_creator=creator, hooks=hooks) as sess:
            while not sess.should_stop():
                sess.run(train_op)


def test_a_refused_restart_changes_no_file_of_the_model_dir(tmp_path):
    _train(str(tmp_path), batch=4, steps=3)
    before = _files(tmp_path)
    with pytest.raises(ResumeMismatchError, match="batch size: 4 -> 8"):
        _train(str(tmp_path), batch=8, steps=6)
    assert _files(tmp_path) == before
    _train(str(tmp_path), batch=4, steps=6)  # the original values resume
    assert checkpoint_global_step(str(tmp_path)) == 6
