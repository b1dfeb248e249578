"""The host functions' summaries, read back from real event files, for 1 and 2 replicas.

Each replica's tensors are recorded by its own host call and the host
function receives each packed tensor concatenated over replicas, as
TPUEstimator hands them over (`[num_replicas, N]`; `[1, N]` with use_tpu=False).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import base_embedding_host_call as behc
from tests.core._host_call_helpers import (
    FakeUserContext,
    build_replicated_host_call,
    exact_auc,
    make_host_call,
    parse_payload,
    read_events,
    run_host_call,
)

pytestmark = pytest.mark.timeout(60)

GLOBAL_STEP = 7
TOP_K = 4
replica_counts = pytest.mark.parametrize("num_replicas", [1, 2])


@pytest.fixture
def graph():
    with tf.Graph().as_default() as g:
        tf.compat.v1.get_variable(
            "global_step",
            [],
            tf.int64,
            initializer=tf.compat.v1.constant_initializer(GLOBAL_STEP),
            trainable=False,
            collections=[
                tf.compat.v1.GraphKeys.GLOBAL_VARIABLES,
                tf.compat.v1.GraphKeys.GLOBAL_STEP,
            ],
        )
        yield g


@pytest.fixture
def logdir(tmp_path):
    return str(tmp_path)


def _events(logdir):
    return read_events(logdir + "/host_call")


def _scalars(events, tag):
    return [(step, float(value)) for step, value in events[tag]]


def _payloads(events, tag):
    return [(step, parse_payload(value).tolist()) for step, value in events[tag]]


# Per replica: labels, preds, uid buckets (selected: < 10), request time, sample rate.
REPLICAS = [
    {
        "labels": [1.0, 0.0, 0.0, 1.0],
        "preds": [0.82, 0.64, 0.31, 0.12],
        "uid_buckets": [3, 500, 9, 10],
        "req_time": 1000,
        "sample_rate": 0.5,
    },
    {
        "labels": [0.0, 1.0, 1.0, 0.0],
        "preds": [0.45, 0.27, 0.93, 0.56],
        "uid_buckets": [0, 1, 999, 20],
        "req_time": 2000,
        "sample_rate": 0.25,
    },
]


def _selected(num_replicas, field):
    return [
        value
        for replica in REPLICAS[:num_replicas]
        for value, bucket in zip(replica[field], replica["uid_buckets"])
        if bucket < 10
    ]


def _record_auc_inputs(host_call, replica):
    data = REPLICAS[replica]
    host_call.record_summary_tensor("labels_for_auc_calculation", tf.constant(data["labels"]))
    host_call.record_summary_tensor("y_pred_for_auc_calculation", tf.constant(data["preds"]))
    host_call.record_summary_tensor("uid_bucket", tf.constant(data["uid_buckets"], tf.int32))
    host_call.record_summary_tensor("req_time", tf.constant([data["req_time"]], tf.int64))
    host_call.record_summary_tensor("sample_rate", tf.constant([data["sample_rate"]]))


# ------------------------------------------------------------ host call without caching


@replica_counts
def test_scalar_metrics_are_reduced_over_replicas_by_suffix(graph, logdir, num_replicas):
    def record(host_call, r):
        host_call.record_summary_tensor("loss_avg", tf.constant(1.0 + r))
        host_call.record_summary_tensor("grad_norm_max", tf.constant(10.0 * (r + 1)))
        host_call.record_summary_tensor("examples_sum", tf.constant(3, tf.int32))
        host_call.record_summary_tensor("learning_rate", tf.constant(0.1 * (r + 1)))
        host_call.record_summary_tensor("logits_avg", tf.constant([r, r + 1.0]))

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir), record, num_replicas)
    run_host_call([host_op])

    events = _events(logdir)
    assert set(events) == {
        "loss_avg",
        "grad_norm_max",
        "examples_sum",
        "learning_rate",
        "logits_avg",
    }
    replicas = np.arange(num_replicas)
    assert _scalars(events, "loss_avg") == [(GLOBAL_STEP, pytest.approx(np.mean(1.0 + replicas)))]
    assert _scalars(events, "grad_norm_max") == [(GLOBAL_STEP, 10.0 * num_replicas)]
    assert _scalars(events, "examples_sum") == [(GLOBAL_STEP, 3.0 * num_replicas)]
    # No suffix: replica 0's value.
    assert _scalars(events, "learning_rate") == [(GLOBAL_STEP, pytest.approx(0.1))]
    assert _scalars(events, "logits_avg") == [(GLOBAL_STEP, pytest.approx(num_replicas / 2))]


@replica_counts
def test_auc_and_deepinsight_payloads_hold_exactly_the_sampled_examples(
    graph, logdir, num_replicas
):
    _, host_op = build_replicated_host_call(
        lambda: make_host_call(logdir, top_k=TOP_K), _record_auc_inputs, num_replicas
    )
    run_host_call([host_op])

    events = _events(logdir)
    labels, preds = _selected(num_replicas, "labels"), _selected(num_replicas, "preds")
    req_times = [
        replica["req_time"]
        for replica in REPLICAS[:num_replicas]
        for bucket in replica["uid_buckets"]
        if bucket < 10
    ]
    assert _payloads(events, "di_labels") == [(GLOBAL_STEP, labels)]
    assert _payloads(events, "di_preds") == [(GLOBAL_STEP, pytest.approx(preds))]
    assert _payloads(events, "di_req_times") == [(GLOBAL_STEP, req_times)]
    assert _payloads(events, "di_example_sample_rates") == [(GLOBAL_STEP, [0.5])]
    assert _scalars(events, "auc") == [(GLOBAL_STEP, pytest.approx(exact_auc(labels, preds)))]
    assert _scalars(events, "sampled_labels_variable_avg") == [
        (GLOBAL_STEP, pytest.approx(np.mean(labels)))
    ]
    assert _scalars(events, "sampled_preds_variable_avg") == [
        (GLOBAL_STEP, pytest.approx(np.mean(preds)))
    ]
    assert _scalars(events, "req_times_variable_avg") == [
        (GLOBAL_STEP, pytest.approx(np.mean(req_times)))
    ]
    rates = [r["sample_rate"] for r in REPLICAS[:num_replicas]]
    assert _scalars(events, "sample_rates_variable_avg") == [
        (GLOBAL_STEP, pytest.approx(np.mean(rates)))
    ]


def test_exactly_one_sampled_example_stays_a_vector(graph, logdir):
    def record(host_call, _):
        host_call.record_summary_tensor("labels_for_auc_calculation", tf.constant([1.0, 0.0]))
        host_call.record_summary_tensor("y_pred_for_auc_calculation", tf.constant([0.3, 0.6]))
        host_call.record_summary_tensor("uid_bucket", tf.constant([500, 4], tf.int32))

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir, top_k=2), record, 1)
    run_host_call([host_op])

    events = _events(logdir)
    assert _payloads(events, "di_labels") == [(GLOBAL_STEP, [0.0])]
    assert _payloads(events, "di_preds") == [(GLOBAL_STEP, [pytest.approx(0.6)])]


@replica_counts
def test_only_scalar_metrics_can_be_recorded(graph, logdir, num_replicas):
    def record(host_call, r):
        host_call.record_summary_tensor("loss_avg", tf.constant(2.0))

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir), record, num_replicas)
    run_host_call([host_op])

    assert _scalars(_events(logdir), "loss_avg") == [(GLOBAL_STEP, 2.0)]
    assert set(_events(logdir)) == {"loss_avg"}


def test_without_uid_buckets_every_example_counts_for_the_auc(graph, logdir):
    labels, preds = [1.0, 0.0, 1.0, 0.0], [0.9, 0.2, 0.4, 0.6]

    def record(host_call, _):
        host_call.record_summary_tensor("labels_for_auc_calculation", tf.constant(labels))
        host_call.record_summary_tensor("y_pred_for_auc_calculation", tf.constant(preds))

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir), record, 1)
    run_host_call([host_op])

    events = _events(logdir)
    assert "di_labels" not in events
    assert _scalars(events, "auc") == [(GLOBAL_STEP, pytest.approx(exact_auc(labels, preds)))]
    assert _scalars(events, "sampled_labels_variable_avg") == [(GLOBAL_STEP, 0.5)]


def test_logged_auc_includes_the_writing_call_and_accumulates_over_calls(graph, logdir):
    labels = tf.compat.v1.placeholder(tf.float32, [TOP_K])
    preds = tf.compat.v1.placeholder(tf.float32, [TOP_K])

    def record(host_call, _):
        host_call.record_summary_tensor("labels_for_auc_calculation", labels)
        host_call.record_summary_tensor("y_pred_for_auc_calculation", preds)

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir), record, 1)
    first = ([1.0, 0.0, 1.0, 0.0], [0.9, 0.1, 0.8, 0.2])  # perfectly ranked
    second = ([1.0, 0.0, 1.0, 0.0], [0.15, 0.95, 0.85, 0.35])
    run_host_call([host_op], [{labels: ls, preds: ps} for ls, ps in (first, second)])

    aucs = [value for _, value in _scalars(_events(logdir), "auc")]
    both = (first[0] + second[0], first[1] + second[1])
    assert aucs == [pytest.approx(1.0), pytest.approx(exact_auc(*both))]


def test_the_host_function_runs_only_the_summaries_written_in_it(graph, logdir):
    with tf.summary.create_file_writer(logdir + "/other").as_default():
        tf.summary.scalar("outside", 1.0, step=0)
    host_call = make_host_call(logdir)
    host_call.record_summary_tensor("loss_avg", tf.constant(2.0))
    host_fn, tensors = host_call.generate_host_call_hook()
    run_host_call([host_fn(*tensors)])

    assert _scalars(_events(logdir), "loss_avg") == [(GLOBAL_STEP, 2.0)]
    assert read_events(logdir + "/other") == {}


def test_serialize_messages_writes_the_first_sample_rate_and_request_time(graph, logdir):
    host_call = make_host_call(logdir)
    writer = tf.summary.create_file_writer(logdir + "/host_call")
    with writer.as_default():
        host_call._serialize_messages(
            tf.zeros([2]),
            tf.zeros([2]),
            tf.constant([0.25, 0.5]),
            tf.constant([11, 12], tf.int64),
            tf.zeros([2], tf.int32),
            tf.constant(3, tf.int64),
        )
    run_host_call([tf.compat.v1.summary.all_v2_summary_ops()])

    events = _events(logdir)
    assert _payloads(events, "di_example_sample_rates") == [(3, [0.25])]
    assert _payloads(events, "di_req_times") == [(3, [11])]


def test_serialize_messages_rejects_a_missing_tensor(graph, logdir):
    host_call = make_host_call(logdir)

    with pytest.raises(ValueError, match="req_times must be a tensor, got None"):
        host_call._serialize_messages(
            tf.zeros([2]), tf.zeros([2]), tf.zeros([1]), None, tf.zeros([2], tf.int32), 0
        )


# ------------------------------------------------------------ host call with TPU variables

EVERY_N = 3
CACHE_TOP_K = 2
USED_STEPS = 2


def _cached_windows(replica, stopping=False):
    """A replica's cached windows after 2 of 3 steps; the unused tail holds stale values."""
    return {
        behc._LABELS_TPU_VARIABLE: [1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        behc._PREDS_TPU_VARIABLE: [0.7 + 0.01 * replica, 0.2, 0.4, 0.9, 0.5, 0.6],
        behc._UID_BUCKETS_TPU_VARIABLE: [0, 1, 2, 3 + 50 * replica, 4, 5],
        behc._REQ_TIMES_TPU_VARIABLE: [100 + replica, 200 + replica, 999],
        behc._SAMPLE_RATES_TPU_VARIABLE: [0.5 + replica, 0.7, 0.9],
        behc._ACCUMULATED_COUNTER_TPU_VARIABLE: USED_STEPS,
        "stopping_signals": [False, stopping and replica == 1],
    }


_DTYPES = {
    behc._UID_BUCKETS_TPU_VARIABLE: tf.int32,
    behc._REQ_TIMES_TPU_VARIABLE: tf.int64,
    behc._ACCUMULATED_COUNTER_TPU_VARIABLE: tf.int32,
    "stopping_signals": tf.bool,
}


def _record_windows(stopping=False):
    def record(host_call, replica):
        host_call.record_summary_tensor("loss_avg", tf.constant(1.0))
        for name, value in _cached_windows(replica, stopping).items():
            host_call.record_summary_tensor(name, tf.constant(value, _DTYPES.get(name, tf.float32)))

    return record


def _caching_host_call(logdir, how):
    if how == "context":
        kwargs = {"cpu_test": False, "context": FakeUserContext(num_hosts=1, replicas_per_host=2)}
    else:
        kwargs = {"cpu_test": True}
    return make_host_call(logdir, caching=True, every_n=EVERY_N, top_k=CACHE_TOP_K, **kwargs)


caching_setups = pytest.mark.parametrize(
    "how, num_replicas",
    [("cpu_test", 1), ("cpu_test", 2), ("context", 2)],
    ids=["cpu_test-1", "cpu_test-2", "context-2"],
)


@caching_setups
def test_caching_host_call_reads_only_the_used_part_of_the_windows(
    graph, logdir, how, num_replicas
):
    _, host_op = build_replicated_host_call(
        lambda: _caching_host_call(logdir, how), _record_windows(), num_replicas
    )
    run_host_call([host_op])

    events = _events(logdir)
    used = USED_STEPS * CACHE_TOP_K
    windows = [_cached_windows(r) for r in range(num_replicas)]
    labels = [v for w in windows for v in w[behc._LABELS_TPU_VARIABLE][:used]]
    preds = [v for w in windows for v in w[behc._PREDS_TPU_VARIABLE][:used]]
    buckets = [v for w in windows for v in w[behc._UID_BUCKETS_TPU_VARIABLE][:used]]
    keep = [b < 10 for b in buckets]
    req_times = [
        t for w in windows for t in w[behc._REQ_TIMES_TPU_VARIABLE][:USED_STEPS] for _ in range(2)
    ]
    sel = lambda values: [v for v, k in zip(values, keep) if k]  # noqa: E731

    assert _payloads(events, "di_labels") == [(GLOBAL_STEP, sel(labels))]
    assert _payloads(events, "di_preds") == [(GLOBAL_STEP, pytest.approx(sel(preds)))]
    assert _payloads(events, "di_req_times") == [(GLOBAL_STEP, sel(req_times))]
    assert _payloads(events, "di_example_sample_rates") == [(GLOBAL_STEP, [0.5])]
    assert _scalars(events, "auc") == [
        (GLOBAL_STEP, pytest.approx(exact_auc(sel(labels), sel(preds))))
    ]
    assert _scalars(events, "used_slice_len_avg") == [(GLOBAL_STEP, float(used))]
    assert _scalars(events, "accumulated_times_tpu_variable_avg") == [
        (GLOBAL_STEP, float(USED_STEPS))
    ]
    assert _scalars(events, "uid_buckets_tpu_variable_avg") == [
        (GLOBAL_STEP, float(int(np.mean(buckets))))  # integer mean, as in the original
    ]
    assert _scalars(events, "stopping_signals_sum") == [(GLOBAL_STEP, 0.0)]
    assert _scalars(events, "loss_avg") == [(GLOBAL_STEP, 1.0)]


@pytest.mark.parametrize("how, num_replicas", [("cpu_test", 2), ("context", 2)])
def test_caching_host_call_drops_windows_with_a_stopping_signal(graph, logdir, how, num_replicas):
    _, host_op = build_replicated_host_call(
        lambda: _caching_host_call(logdir, how), _record_windows(stopping=True), num_replicas
    )
    run_host_call([host_op])

    events = _events(logdir)
    assert _scalars(events, "stopping_signals_sum") == [(GLOBAL_STEP, 1.0)]
    assert _payloads(events, "di_labels") == [(GLOBAL_STEP, [])]
    assert _payloads(events, "di_preds") == [(GLOBAL_STEP, [])]


# ------------------------------------------------------------ user errors


def test_host_call_rejects_a_vector_metric_without_reduction_suffix(graph, logdir):
    host_call = make_host_call(logdir)
    host_call.record_summary_tensor("embedding_norms", tf.zeros([3]))
    host_fn, tensors = host_call.generate_host_call_hook()

    with pytest.raises(ValueError, match="'embedding_norms'.*_avg, _max or _sum"):
        host_fn(*tensors)


def test_deepinsight_rejects_a_request_time_vector_per_replica(graph, logdir):
    host_call = make_host_call(logdir, top_k=2)
    host_call.record_summary_tensor("labels_for_auc_calculation", tf.zeros([2]))
    host_call.record_summary_tensor("y_pred_for_auc_calculation", tf.zeros([2]))
    host_call.record_summary_tensor("uid_bucket", tf.zeros([2], tf.int32))
    host_call.record_summary_tensor("req_time", tf.zeros([2], tf.int64))
    host_fn, tensors = host_call.generate_host_call_hook()

    with pytest.raises(ValueError, match=r"req_times \(one per replica\) must have rank 2"):
        host_fn(*tensors)


def test_caching_host_call_rejects_fewer_replicas_than_the_context(graph, logdir):
    with pytest.raises(ValueError, match=r"labels_tpu_variable must have shape \[2, 6\]"):
        build_replicated_host_call(
            lambda: _caching_host_call(logdir, "context"), _record_windows(), 1
        )
