"""Padding examples stay out of the host call's AUC, DeepInsight payloads and averages.

The model records the per-example padding flag with
`record_summary_tensor("stopping_signals", flag)`. Padding examples are
zero-filled (label 0, uid bucket 0, which is a sampled bucket) and here scored
near 1: if they reached the AUC it would drop far below the real examples'
AUC. Checked end to end from the event files of TPUEstimator(use_tpu=False)
and of the emulated TPU loop (`monolith.core.testing.train`), both host-call
paths (caching and not), and unit by unit for 1 and 2 replicas.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core import testing
from monolith.core.stopping_signals import append_stopping_signals
from tests.core._ctr_model import make_model_fn
from tests.core._host_call_helpers import (
    build_replicated_host_call,
    cached_slices,
    exact_auc,
    make_host_call,
    parse_payload,
    read_events,
    run_host_call,
)

pytestmark = pytest.mark.timeout(120)

BATCH = 32
REAL_BATCHES = 16
PADDING_BATCHES = 3
DIM = 4
NUM_BUCKETS = 20  # buckets < 10 are sampled: about half of the examples
PADDING_SCORE = 0.999
EVERY_N = 3


def _real_data():
    rng = np.random.RandomState(1)
    n = BATCH * REAL_BATCHES
    x = rng.normal(size=[n, DIM]).astype(np.float32)
    labels = (x @ np.array([1.0, -1.5, 0.5, 1.0], np.float32) + rng.logistic(size=n) > 0).astype(
        np.float32
    )
    uid_buckets = rng.randint(0, NUM_BUCKETS, size=n).astype(np.int32)
    return x, labels, uid_buckets


def _real_dataset():
    x, labels, uid_buckets = _real_data()
    features = {"x": x, "uid_bucket": uid_buckets}
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(BATCH, drop_remainder=True)


def _finite_padded_input_fn(params):
    """The real batches, then PADDING_BATCHES padding batches (finite: TPUEstimator on CPU)."""
    return append_stopping_signals(_real_dataset()).take(REAL_BATCHES + PADDING_BATCHES)


def _endless_padded_input_fn(params):
    """The real batches, then padding forever (the feed hook stops the emulated loop)."""
    return append_stopping_signals(_real_dataset())


def _make_model_fn(caching: bool):
    """Scores padding examples PADDING_SCORE and records the padding flag.

    With caching the window restarts at global steps 1, 4, 7, ...: the host
    call (every EVERY_N steps, from the first) sees steps 0; 1-3; 4-6; ...
    """
    return make_model_fn(
        caching=caching,
        every_n=EVERY_N if caching else 1,
        record_padding_flag=True,
        padding_score=PADDING_SCORE,
    )


def _payload(events, tag):
    return np.concatenate([parse_payload(value) for _, value in events[tag]])


def _check_events(model_dir, logged_steps):
    events = read_events(os.path.join(model_dir, "host_call"))
    _, labels, uid_buckets = _real_data()
    sampled = uid_buckets < 10

    payload_labels, payload_preds = _payload(events, "di_labels"), _payload(events, "di_preds")
    # Exactly the real sampled examples, none of the padding ones (label 0, score 0.999).
    np.testing.assert_array_equal(payload_labels, labels[sampled])
    assert not np.any(payload_preds == np.float32(PADDING_SCORE))
    real_auc = exact_auc(payload_labels, payload_preds)
    with_padding = exact_auc(
        np.concatenate([payload_labels, np.zeros(BATCH)]),
        np.concatenate([payload_preds, np.full(BATCH, PADDING_SCORE)]),
    )
    assert real_auc - with_padding > 0.1  # padding would have been noticed
    assert float(events["auc"][-1][1]) == pytest.approx(real_auc, abs=0.01)
    assert [step for step, _ in events["auc"]] == logged_steps
    # Each logged average is the mean of the same step's payload (NaN for a window
    # holding only padding examples, as for any empty selection).
    for tag, payload_tag in (
        ("sampled_labels_variable_avg", "di_labels"),
        ("sampled_preds_variable_avg", "di_preds"),
    ):
        averages = [float(value) for _, value in events[tag]]
        with np.errstate(invalid="ignore"):
            means = [
                float(np.mean(parse_payload(value))) if parse_payload(value).size else np.nan
                for _, value in events[payload_tag]
            ]
        np.testing.assert_allclose(averages, means, rtol=1e-6)
    return events


def test_tpuestimator_auc_leaves_out_padding_examples(tmp_path):
    model_dir = str(tmp_path)
    estimator = tpu_estimator.TPUEstimator(
        model_fn=_make_model_fn(caching=False),
        config=tpu_config.RunConfig(
            model_dir=model_dir, tpu_config=tpu_config.TPUConfig(iterations_per_loop=4)
        ),
        use_tpu=False,
        train_batch_size=BATCH,
    )
    estimator.train(_finite_padded_input_fn)

    steps = list(range(REAL_BATCHES + PADDING_BATCHES))  # padding steps log (no examples)
    events = _check_events(model_dir, logged_steps=steps)
    assert [step for step, _ in events["loss_avg"]] == steps


def test_emulated_loop_auc_leaves_out_padding_examples(tmp_path):
    model_dir = str(tmp_path)
    result = testing.train(
        _make_model_fn(caching=False),
        _endless_padded_input_fn,
        model_dir=model_dir,
        iterations_per_loop=5,
    )

    assert result.steps_run == 20  # 16 real steps and 4 padding steps
    _check_events(model_dir, logged_steps=list(range(result.steps_run)))


def test_emulated_loop_caching_auc_leaves_out_padding_examples(tmp_path):
    model_dir = str(tmp_path)
    result = testing.train(
        _make_model_fn(caching=True),
        _endless_padded_input_fn,
        model_dir=model_dir,
        iterations_per_loop=6,
        outfeed_every_n_steps=EVERY_N,
    )

    # The feed hook sees the stop flag only at outfeed steps: one more loop runs.
    assert result.steps_run == 24  # 16 real steps and 8 padding steps
    # Host calls at steps 0, 3, ..., 21: the window of step 15 holds the last
    # real steps, those of 18 and 21 only padding examples (cached as unsampled).
    _check_events(model_dir, logged_steps=list(range(0, 24, EVERY_N)))


# ------------------------------------------------------------ the host function alone

LABELS = [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
PREDS = [[0.8, 0.3, 0.6, 0.999], [0.4, 0.7, 0.999, 0.2]]
BUCKETS = [[1, 2, 3, 4], [5, 6, 7, 800]]  # the last example of replica 1 is not sampled
# Step 1 flags, per example and per replica (one flag for all of a replica's examples).
PER_EXAMPLE_FLAGS = [[0, 0, 0, 1], [0, 0, 1, 0]]
PER_REPLICA_FLAGS = [[1], [0]]
STEP = 11


@pytest.fixture
def graph():
    with tf.Graph().as_default() as g:
        tf.compat.v1.train.get_or_create_global_step()
        yield g


def _real(values, flags, num_replicas):
    """The sampled values of the first replicas whose (broadcast) flag is clear."""
    return [
        value
        for r in range(num_replicas)
        for value, flag, bucket in zip(values[r], np.broadcast_to(flags[r], 4), BUCKETS[r])
        if not flag and bucket < 10
    ]


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("dtype", [tf.bool, tf.int32], ids=["bool", "int32"])
@pytest.mark.parametrize("first_flags", [PER_EXAMPLE_FLAGS, PER_REPLICA_FLAGS])
def test_padding_examples_stay_out_of_the_auc_payloads_and_averages(
    graph, tmp_path, num_replicas, dtype, first_flags
):
    logdir = str(tmp_path)
    flags = [tf.compat.v1.placeholder(dtype, [len(first_flags[r])]) for r in range(num_replicas)]

    def record(host_call, replica):
        host_call.record_summary_tensor("labels_for_auc_calculation", tf.constant(LABELS[replica]))
        host_call.record_summary_tensor("y_pred_for_auc_calculation", tf.constant(PREDS[replica]))
        host_call.record_summary_tensor("uid_bucket", tf.constant(BUCKETS[replica], tf.int32))
        host_call.record_summary_tensor("stopping_signals", flags[replica])

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir), record, num_replicas)

    def feed(flag_values):
        return {f: np.asarray(v).astype(dtype.as_numpy_dtype) for f, v in zip(flags, flag_values)}

    clear = [np.zeros_like(f) for f in first_flags]
    run_host_call([host_op], [feed(first_flags), feed(clear)], global_steps=[STEP, STEP + 1])

    events = read_events(logdir + "/host_call")
    first = (_real(LABELS, first_flags, num_replicas), _real(PREDS, first_flags, num_replicas))
    second = (_real(LABELS, clear, num_replicas), _real(PREDS, clear, num_replicas))
    assert [(s, parse_payload(v).tolist()) for s, v in events["di_labels"]] == [
        (STEP, first[0]),
        (STEP + 1, second[0]),
    ]
    assert [s for s, _ in events["auc"]] == [STEP, STEP + 1]
    assert float(events["auc"][1][1]) == pytest.approx(
        exact_auc(first[0] + second[0], first[1] + second[1])
    )
    averages = [float(v) for _, v in events["sampled_preds_variable_avg"]]
    assert averages[1] == pytest.approx(np.mean(second[1]))
    if first[0]:  # one replica flagged whole: nothing real at step STEP
        assert float(events["auc"][0][1]) == pytest.approx(exact_auc(*first))
        assert averages[0] == pytest.approx(np.mean(first[1]))


def test_a_flag_that_matches_neither_the_examples_nor_one_per_replica_is_rejected(graph, tmp_path):
    def record(host_call, _):
        host_call.record_summary_tensor("labels_for_auc_calculation", tf.constant(LABELS[0]))
        host_call.record_summary_tensor("y_pred_for_auc_calculation", tf.constant(PREDS[0]))
        host_call.record_summary_tensor("stopping_signals", tf.zeros([3], tf.bool))

    with pytest.raises(ValueError, match="stopping_signals has 3 elements per replica"):
        build_replicated_host_call(lambda: make_host_call(str(tmp_path)), record, 1)


def test_caching_rejects_a_flag_of_another_length_than_top_k(graph, tmp_path):
    host_call = make_host_call(str(tmp_path), caching=True, every_n=2, top_k=4)
    host_call.record_summary_tensor("stopping_signals", tf.zeros([3], tf.bool))

    with pytest.raises(ValueError, match="stopping_signals must hold 1 or top_k"):
        host_call.update_tpu_variables_ops(
            tf.constant(1, tf.int64),
            tf.zeros([4]),
            tf.zeros([4]),
            tf.zeros([4], tf.int32),
            tf.zeros([1], tf.int64),
            tf.zeros([1]),
        )


def test_caching_caches_padding_examples_with_an_unsampled_uid_bucket(graph, tmp_path):
    host_call = make_host_call(str(tmp_path), caching=True, every_n=2, top_k=4)
    host_call.record_summary_tensor("stopping_signals", tf.constant([False, True, False, True]))
    updates = host_call.update_tpu_variables_ops(
        tf.constant(1, tf.int64),
        tf.zeros([4]),
        tf.zeros([4]),
        tf.constant([1, 2, 3, 4], tf.int32),
        tf.zeros([1], tf.int64),
        tf.zeros([1]),
    )
    with tf.compat.v1.Session() as sess:
        for hook in host_call.tpu_var_restore_hooks:
            hook.after_create_session(sess, None)
        sess.run(updates)
        (cached,) = sess.run(cached_slices("uid_buckets_tpu_variable"))

    assert cached.tolist() == [1, 1000, 3, 1000, 0, 0, 0, 0]
