"""monolith.core.testing: the CPU emulation of TPUEstimator's infeed -> loop -> outfeed wiring."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import TPUEstimatorSpec

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from tests.core._feed_hook_helpers import (
    BATCH,
    SIGNAL,
    counting_model_fn,
    padded_stream_fn,
    read_counts,
)
from tests.core._host_call_helpers import read_events

pytestmark = pytest.mark.timeout(120)


def _scalar_events(logdir, tag):
    """Sorted (step, value) of every `tag` scalar in `logdir`'s event files."""
    return sorted((step, float(value)) for step, value in read_events(logdir).get(tag, []))


def _host_call_model_fn(shapes_seen):
    """The counting model plus a host call writing each outfed batch's id total."""

    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        batch_ids = tf.reshape(features["id"], [1, -1])  # one replica's [1, N]
        first_id = tf.reshape(tf.cast(features["id"][0], tf.int64), [1])

        def host_fn(first_id, batch_ids):
            shapes_seen.append(batch_ids.shape.as_list())
            writer = tf.summary.create_file_writer(params["logdir"])
            with writer.as_default():
                return [tf.summary.scalar("id_total", tf.reduce_sum(batch_ids), step=first_id[0])]

        return TPUEstimatorSpec(
            mode,
            loss=spec.loss,
            train_op=spec.train_op,
            host_call=(host_fn, [first_id, batch_ids]),
        )

    return model_fn


# -- FakeTPUContext -------------------------------------------------------------------


def _record_tpu_system_ops(monkeypatch):
    """Replaces TPU init/shutdown (no CPU kernel) with no-ops that record their job."""
    calls = []

    def initialize_system(job=None, embedding_config=None):
        calls.append(("initialize", job))
        return tf.no_op()

    def shutdown_system(job=None):
        calls.append(("shutdown", job))
        return tf.no_op()

    monkeypatch.setattr(tf.compat.v1.tpu, "initialize_system", initialize_system)
    monkeypatch.setattr(tf.compat.v1.tpu, "shutdown_system", shutdown_system)
    return calls


def test_the_default_fake_context_keeps_the_hook_away_from_the_tpu_system(tmp_path, monkeypatch):
    calls = _record_tpu_system_ops(monkeypatch)
    result = testing.train(counting_model_fn, padded_stream_fn(2), model_dir=str(tmp_path))
    assert result.stopped_at_end_of_stream
    assert calls == []


def test_a_fake_context_that_initialises_the_tpu_has_the_hook_init_and_shut_it_down(
    tmp_path, monkeypatch
):
    calls = _record_tpu_system_ops(monkeypatch)
    testing.train(
        counting_model_fn,
        padded_stream_fn(2),
        model_dir=str(tmp_path),
        ctx=testing.FakeTPUContext(initialize_tpu=True, master_job="worker"),
    )
    assert sorted(calls) == [("initialize", "worker"), ("shutdown", "worker")]


def test_fake_context_reports_per_host_v2_input_when_it_initialises_the_tpu():
    ctx = testing.FakeTPUContext(initialize_tpu=True)
    assert (
        ctx.config.tpu_config.per_host_input_for_training
        is tpu_config.InputPipelineConfig.PER_HOST_V2
    )
    assert (ctx.num_hosts, ctx.num_replicas) == (1, 1)


# -- build_emulated_training ----------------------------------------------------------


def test_build_wires_the_hook_like_tpuestimator():
    with tf.Graph().as_default():
        built = testing.build_emulated_training(counting_model_fn, padded_stream_fn(2))
        assert isinstance(built.hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
        assert built.iterations_per_loop_var.name == "tpu_estimator/iterations_per_loop:0"
        assert set(built.dequeue_ops[SIGNAL]) == {"stopping", "real_examples"}
        assert built.dequeue_ops[SIGNAL]["stopping"].dtype == tf.bool
        assert built.hook.rendezvous is built.rendezvous


def test_build_outfeeds_the_loss_when_there_is_no_host_call():
    with tf.Graph().as_default():
        built = testing.build_emulated_training(counting_model_fn, padded_stream_fn(2))
        assert built.dequeue_ops["host_call"].shape.as_list() == [1]


def test_build_without_signal_feature_outfeeds_no_stop_flag():
    def plain_input_fn():
        return padded_stream_fn(2)().map(lambda f: {k: v for k, v in f.items() if k != SIGNAL})

    def model_fn(features, mode, params):
        return counting_model_fn({**features, SIGNAL: tf.zeros([BATCH], tf.bool)}, mode, params)

    with tf.Graph().as_default():
        built = testing.build_emulated_training(model_fn, plain_input_fn)
        assert SIGNAL not in built.dequeue_ops


def test_build_rejects_sparse_input():
    def sparse_input_fn():
        return tf.data.Dataset.from_tensors(
            {"ids": tf.sparse.from_dense(tf.constant([[1, 0]], tf.int64))}
        )

    with tf.Graph().as_default(), pytest.raises(TypeError, match="dense"):
        testing.build_emulated_training(counting_model_fn, sparse_input_fn)


def test_build_rejects_a_scalar_host_call_tensor():
    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        return TPUEstimatorSpec(
            mode, loss=spec.loss, train_op=spec.train_op, host_call=(lambda x: x, [spec.loss])
        )

    with tf.Graph().as_default(), pytest.raises(RuntimeError, match="scalar"):
        testing.build_emulated_training(model_fn, padded_stream_fn(2))


def test_build_rejects_a_model_fn_without_train_op():
    def model_fn(features, mode):
        return tf.estimator.EstimatorSpec(mode, loss=tf.constant(0.0), train_op=None)

    with tf.Graph().as_default(), pytest.raises(ValueError, match="train_op"):
        testing.build_emulated_training(model_fn, padded_stream_fn(2))


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_build_validates_outfeed_every_n_steps(bad, error):
    with tf.Graph().as_default(), pytest.raises(error, match=rf"outfeed_every_n_steps={bad!r}"):
        testing.build_emulated_training(
            counting_model_fn, padded_stream_fn(2), outfeed_every_n_steps=bad
        )


# -- iterations_per_loop_hook -----------------------------------------------------------


def test_iterations_per_loop_hook_rejects_steps_and_max_steps_together():
    with pytest.raises(ValueError, match="steps=3 and max_steps=5"):
        testing.iterations_per_loop_hook(2, steps=3, max_steps=5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"steps": 0}, ValueError, "steps=0 must be >= 1"),
        ({"max_steps": -1}, ValueError, "max_steps=-1 must be >= 1"),
        ({"steps": True}, TypeError, "steps=True must be an int"),
        ({"max_steps": 2.0}, TypeError, "max_steps=2.0 must be an int"),
    ],
)
def test_iterations_per_loop_hook_rejects_non_positive_steps(kwargs, error, message):
    with pytest.raises(error, match=message):
        testing.iterations_per_loop_hook(2, **kwargs)


# -- train ---------------------------------------------------------------------------


def test_train_stops_at_steps_with_a_shortened_last_loop(tmp_path):
    result = testing.train(
        counting_model_fn,
        padded_stream_fn(10),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        steps=3,
    )
    assert result.stopped_at_end_of_stream is False
    assert (result.steps_run, result.loops_run, result.global_step) == (3, 2, 3)
    assert read_counts(result.final_checkpoint)["real_examples"] == 3 * BATCH


def test_train_reports_every_loop_to_on_loop_end(tmp_path):
    calls = []
    result = testing.train(
        counting_model_fn,
        padded_stream_fn(3),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        on_loop_end=lambda *args: calls.append(args),
    )
    assert [(step, loop_steps) for step, loop_steps, _ in calls] == [(2, 2), (4, 2)]
    assert all(isinstance(loss, float) for _, _, loss in calls)
    assert calls[-1][2] == pytest.approx(result.loss)


def test_train_rejects_a_prebuilt_dataset(tmp_path):
    with tf.Graph().as_default():
        dataset = padded_stream_fn(1)()
    with pytest.raises(TypeError, match="input_fn"):
        testing.train(counting_model_fn, dataset, model_dir=str(tmp_path))


def test_train_passes_params_to_input_fn_and_model_fn(tmp_path):
    seen = {}

    def input_fn(params):
        seen["input_fn"] = params["tag"]
        return padded_stream_fn(1)()

    def model_fn(features, labels, mode, params, config):
        seen["model_fn"] = (params["tag"], labels, mode, config)
        return counting_model_fn(features, mode, params)

    testing.train(model_fn, input_fn, model_dir=str(tmp_path), params={"tag": "x"})
    tag, labels, mode, config = seen["model_fn"]
    assert (seen["input_fn"], tag, labels, mode) == ("x", "x", None, "train")
    assert isinstance(config, tpu_config.RunConfig) and config.model_dir == str(tmp_path)


def test_train_splits_features_and_labels(tmp_path):
    def input_fn():
        return padded_stream_fn(2)().map(lambda f: (f, f["id"] * 2.0))

    def model_fn(features, labels, mode, params):
        spec = counting_model_fn(features, mode, params)
        label_sum = tf.compat.v1.get_variable(
            "label_sum", [], tf.float32, tf.compat.v1.zeros_initializer(), trainable=False
        )
        real = 1.0 - tf.cast(features[SIGNAL], tf.float32)
        train_op = tf.group(spec.train_op, label_sum.assign_add(tf.reduce_sum(labels * real)))
        return TPUEstimatorSpec(mode, loss=spec.loss, train_op=train_op)

    result = testing.train(model_fn, input_fn, model_dir=str(tmp_path), iterations_per_loop=2)
    reader = tf.train.load_checkpoint(result.final_checkpoint)
    assert reader.get_tensor("label_sum") == 2 * (1 + 2 + 3 + 4)


def test_train_runs_the_model_fns_training_hooks(tmp_path):
    class CountRuns(tf.compat.v1.train.SessionRunHook):
        runs = 0

        def after_run(self, run_context, run_values):
            CountRuns.runs += 1

    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        return TPUEstimatorSpec(
            mode, loss=spec.loss, train_op=spec.train_op, training_hooks=[CountRuns()]
        )

    result = testing.train(model_fn, padded_stream_fn(3), model_dir=str(tmp_path))
    assert CountRuns.runs == result.loops_run == 2


def test_variables_created_in_the_model_fn_get_optimizer_slots(tmp_path):
    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        weights = tf.compat.v1.get_variable("dense", [BATCH], tf.float32)
        loss = tf.reduce_sum(tf.square(weights * features["id"] * 1e-2))
        step = tf.compat.v1.train.AdagradOptimizer(0.1).minimize(loss)
        return TPUEstimatorSpec(mode, loss=loss, train_op=tf.group(spec.train_op, step))

    result = testing.train(model_fn, padded_stream_fn(2), model_dir=str(tmp_path))
    names = {name for name, _ in tf.train.list_variables(result.final_checkpoint)}
    assert {"dense", "dense/Adagrad", "real_examples"} <= names


@pytest.mark.parametrize(
    "every_n, expected",
    [
        # 4 real batches (first ids 1, 3, 5, 7), then a loop of padding (first id 0).
        (1, [(0, 0.0), (0, 0.0), (1, 3.0), (3, 7.0), (5, 11.0), (7, 15.0)]),
        (2, [(0, 0.0), (1, 3.0), (5, 11.0)]),
    ],
)
def test_host_call_runs_on_the_outfeed_thread_every_n_steps(tmp_path, every_n, expected):
    shapes_seen = []
    logdir = str(tmp_path / "host_call")
    testing.train(
        _host_call_model_fn(shapes_seen),
        padded_stream_fn(4),
        model_dir=str(tmp_path / "model"),
        iterations_per_loop=2,
        outfeed_every_n_steps=every_n,
        params={"logdir": logdir},
    )
    assert shapes_seen == [[1, BATCH]]
    assert _scalar_events(logdir, "id_total") == expected


def test_host_call_with_dict_tensors_gets_keyword_arguments(tmp_path):
    received = []

    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)

        def host_fn(ids, flags):
            return tf.compat.v1.py_func(
                lambda i, f: received.append((i.tolist(), f.tolist())) or np.int64(0),
                [ids, flags],
                tf.int64,
            )

        return TPUEstimatorSpec(
            mode,
            loss=spec.loss,
            train_op=spec.train_op,
            host_call=(host_fn, {"flags": features[SIGNAL], "ids": features["id"]}),
        )

    testing.train(model_fn, padded_stream_fn(1), model_dir=str(tmp_path), iterations_per_loop=1)
    assert received[0] == ([1.0, 2.0], [False, False])
    assert received[1] == ([0.0, 0.0], [True, True])


def test_split_compile_works_with_the_default_compile_op(tmp_path, monkeypatch):
    monkeypatch.setenv("TPU_SPLIT_COMPILE_AND_EXECUTE", "1")
    result = testing.train(counting_model_fn, padded_stream_fn(2), model_dir=str(tmp_path))
    assert result.stopped_at_end_of_stream
