"""A subclass that overrides one of the original's methods changes what the original changes.

`BaseEmbeddingHostCall` calls the original's overridable methods where the
original calls them. Each test overrides one method, as a user of the original
may, and observes the difference through public outputs: the summaries in real
event files, the TPU variables' values, the error a host function raises. The
host-function methods are checked on both paths:

- plain: two replicas record their examples; the host function receives each
  packed tensor concatenated over replicas, at global step 7;
- caching: one replica (`cpu_test`) caches replica 0's examples at steps 1 and
  3 and replica 1's at steps 2 and 4 in windows of 2 steps; the host call runs
  at steps 2 and 4 and sees the same examples as the plain path.

To keep the suite fast, one graph holds a host call of every subclass on both
paths, run in one session (`runs`); each test reads its own subclass's events.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import summary_ops_v2

from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall, TPUVariableRestoreHook
from monolith.core.host_call import names
from tests.core._host_call_helpers import (
    FAST_SESSION,
    RecordingSession,
    build_replicated_host_call,
    make_host_call,
    parse_payload,
    read_events,
    run_host_call,
    writer_flush_ops,
)

pytestmark = pytest.mark.timeout(60)

TOP_K = 4
EVERY_N = 2
PLAIN_STEP = 7
# Per replica (plain) or per step (caching): examples, one request time, one sample rate.
LABELS = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
# At most 0.5: doubled, or added over two windows, still a probability.
PREDS = [[0.4, 0.3, 0.15, 0.05], [0.2, 0.15, 0.45, 0.25]]
BUCKETS = [[3, 500, 9, 10], [0, 1, 999, 20]]  # sampled: < 10
REQ_TIMES = [1000, 2000]
SAMPLE_RATES = [0.5, 0.25]


def _flat(values):
    return [v for row in values for v in row]


SAMPLED = [b < 10 for b in _flat(BUCKETS)]
SAMPLED_LABELS = [v for v, s in zip(_flat(LABELS), SAMPLED) if s]
SAMPLED_PREDS = [v for v, s in zip(_flat(PREDS), SAMPLED) if s]
HOST_STEPS = {"plain": [PLAIN_STEP], "caching": [2, 4]}

paths = pytest.mark.parametrize("path", ["plain", "caching"])


# ------------------------------------------------------------ the subclasses


class _LaterSteps(BaseEmbeddingHostCall):
    def decompress_tensors(self, tensors):
        global_step, decompressed = super().decompress_tensors(tensors)
        return global_step + 100, decompressed


class _CountsHostCalls(BaseEmbeddingHostCall):
    def compress_tensors(self):
        self.record_summary_tensor("host_calls_sum", tf.constant(1))
        super().compress_tensors()


class _ReportsExamples(BaseEmbeddingHostCall):
    """Overrides with the original's signature, adds a summary, keeps the original's."""

    def _write_summary_ops(
        self, gs, labels, y_preds, uid_buckets, req_times, sample_rates, stopping_signals_sum=None
    ):
        tf.summary.scalar("examples_received_sum", tf.size(labels), step=gs)
        return super()._write_summary_ops(
            gs, labels, y_preds, uid_buckets, req_times, sample_rates, stopping_signals_sum
        )


class _KeepsEveryExample(BaseEmbeddingHostCall):
    def _slice_tensor(self, tensor, indices, expect_shape, expect_dtype):
        return tf.reshape(tensor, [-1])


class _RefusesToSlice(BaseEmbeddingHostCall):
    def _verify_shape_and_dtype(self, tensor, shape_list, dtype):
        raise ValueError(f"refused by the subclass: {shape_list}")


class _NamespacedPayloads(BaseEmbeddingHostCall):
    def _serialize_tensor(self, sampled_tensor, gs, message_name):
        super()._serialize_tensor(sampled_tensor, gs, "deepinsight/" + message_name)


class _WindowsStartAtSeven(BaseEmbeddingHostCall):
    """Fills each cached variable with 7 after session creation; lists what it created."""

    def _create_tpu_var(self, var_name, var_shape, var_type):
        variable = super()._create_tpu_var(var_name, var_shape, var_type)
        self.created = getattr(self, "created", []) + [(var_name, var_shape, var_type)]
        with tf.init_scope():
            sevens = tf.fill(var_shape, tf.constant(7, var_type))
            fill = tf.group([s.assign(sevens) for s in variable.variables])
        self.tpu_var_restore_hooks.append(TPUVariableRestoreHook(fill))
        return variable


class _NeverClears(BaseEmbeddingHostCall):
    def _clear_value_at_index_1(self, tpu_var, var_type, index):
        return tf.convert_to_tensor(tpu_var)


class _DoublesFloats(BaseEmbeddingHostCall):
    def _compute_new_value(self, base_tpu_var, delta_value, update_offset):
        if delta_value.dtype.is_floating:
            delta_value = delta_value * 2
        return super()._compute_new_value(base_tpu_var, delta_value, update_offset)


class _AlsoReportsCachedSteps(BaseEmbeddingHostCall):
    def record_summary_tensor(self, name, tensor):
        super().record_summary_tensor(name, tensor)
        if name == names.ACCUMULATED_COUNTER_TPU_VARIABLE:
            super().record_summary_tensor("cached_steps_max", tensor)


BOTH_PATHS = [
    BaseEmbeddingHostCall,
    _LaterSteps,
    _CountsHostCalls,
    _ReportsExamples,
    _KeepsEveryExample,
    _NamespacedPayloads,
]
CACHING_ONLY = [_NeverClears, _DoublesFloats, _AlsoReportsCachedSteps]


# ------------------------------------------------------------ building and running


def _record_plain(host_call, replica):
    host_call.record_summary_tensor(names.LABELS_FOR_AUC_CALCULATION, tf.constant(LABELS[replica]))
    host_call.record_summary_tensor(names.Y_PRED_FOR_AUC_CALCULATION, tf.constant(PREDS[replica]))
    host_call.record_summary_tensor(names.UID_BUCKET, tf.constant(BUCKETS[replica], tf.int32))
    host_call.record_summary_tensor(names.REQ_TIME, tf.constant([REQ_TIMES[replica]], tf.int64))
    host_call.record_summary_tensor(names.SAMPLE_RATE, tf.constant([SAMPLE_RATES[replica]]))


def _build_plain(logdir, cls):
    """The plain path's host op, for two replicas."""
    factory = lambda: make_host_call(logdir, cls=cls, top_k=TOP_K)  # noqa: E731
    _, host_op = build_replicated_host_call(factory, _record_plain, 2)
    return host_op


def _step_inputs():
    """Placeholders for one step's examples (update_tpu_variables_ops' arguments)."""
    return {
        "global_step": tf.compat.v1.placeholder(tf.int64, []),
        "labels": tf.compat.v1.placeholder(tf.float32, [TOP_K]),
        "preds": tf.compat.v1.placeholder(tf.float32, [TOP_K]),
        "uid_buckets": tf.compat.v1.placeholder(tf.int32, [TOP_K]),
        "req_times": tf.compat.v1.placeholder(tf.int64, [1]),
        "sample_rates": tf.compat.v1.placeholder(tf.float32, [1]),
    }


def _build_caching(logdir, cls, inputs):
    """The caching path: (host call, update op, host op)."""
    host_call = make_host_call(logdir, cls=cls, caching=True, every_n=EVERY_N, top_k=TOP_K)
    (update,) = host_call.update_tpu_variables_ops(**inputs)
    with tf.control_dependencies([update]):
        # The host call reads the windows after the step's update.
        host_call.record_summary_tpu_variables()
    host_fn, tensors = host_call.generate_host_call_hook()
    return host_call, update, host_fn(*tensors)


def _step_feed(inputs, step):
    example = (step - 1) % 2
    return {
        inputs["global_step"]: step,
        inputs["labels"]: LABELS[example],
        inputs["preds"]: PREDS[example],
        inputs["uid_buckets"]: BUCKETS[example],
        inputs["req_times"]: [REQ_TIMES[example]],
        inputs["sample_rates"]: [SAMPLE_RATES[example]],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(path, subclass) -> the host_call events of that subclass on that path."""
    root = tmp_path_factory.mktemp("overrides")
    logdirs = {}
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        plain_ops = []
        for cls in BOTH_PATHS:
            logdirs["plain", cls] = str(root / "plain" / cls.__name__)
            plain_ops.append(_build_plain(logdirs["plain", cls], cls))
        inputs = _step_inputs()
        updates, host_ops, restore = [], [], RecordingSession()
        for cls in BOTH_PATHS + CACHING_ONLY:
            logdirs["caching", cls] = str(root / "caching" / cls.__name__)
            host_call, update, host_op = _build_caching(logdirs["caching", cls], cls, inputs)
            updates.append(update)
            host_ops.append(host_op)
            for hook in host_call.tpu_var_restore_hooks:
                hook.after_create_session(restore, None)
        set_step = tf.compat.v1.assign(global_step, inputs["global_step"])
        init = [summary_ops_v2.summary_writer_initializer_op()]
        init.append(tf.compat.v1.local_variables_initializer())
        flush = writer_flush_ops()
        with tf.compat.v1.Session(config=FAST_SESSION) as sess:
            sess.run([init, tf.compat.v1.global_variables_initializer()])
            sess.run(restore.fetched)  # what each tpu_var_restore_hook runs
            sess.run(set_step, {inputs["global_step"]: PLAIN_STEP})
            sess.run(plain_ops)
            for step in (1, 2, 3, 4):
                feed = _step_feed(inputs, step)
                sess.run(set_step, feed)
                # The host call runs at a window's last step; its reads run the update.
                sess.run(host_ops if step % EVERY_N == 0 else updates, feed)
            sess.run(flush)
    return {key: read_events(logdir + "/host_call") for key, logdir in logdirs.items()}


def _payloads(events, tag):
    return [(step, parse_payload(value).tolist()) for step, value in events[tag]]


def _scalars(events, tag):
    return [(step, float(value)) for step, value in events[tag]]


# ------------------------------------------------------------ the tests


@paths
def test_the_unchanged_host_call_writes_the_sampled_examples(runs, path):
    """The reference both paths share, which each override below changes."""
    events = runs[path, BaseEmbeddingHostCall]

    steps = HOST_STEPS[path]
    assert _payloads(events, "di_labels") == [(s, SAMPLED_LABELS) for s in steps]
    assert _payloads(events, "di_preds") == [(s, pytest.approx(SAMPLED_PREDS)) for s in steps]
    assert _payloads(events, "di_example_sample_rates") == [(s, [0.5]) for s in steps]
    assert _scalars(events, "accumulated_times_tpu_variable_avg" if path == "caching" else "auc")


@paths
def test_decompress_tensors_override_changes_what_the_host_function_gets(runs, path):
    events = runs[path, _LaterSteps]

    assert [step for step, _ in events["auc"]] == [s + 100 for s in HOST_STEPS[path]]


@paths
def test_compress_tensors_override_changes_what_is_outfed(runs, path):
    events = runs[path, _CountsHostCalls]

    replicas = 2 if path == "plain" else 1
    assert _scalars(events, "host_calls_sum") == [(s, replicas) for s in HOST_STEPS[path]]


@paths
def test_write_summary_ops_override_adds_to_the_summaries(runs, path):
    events = runs[path, _ReportsExamples]

    steps = HOST_STEPS[path]
    assert _scalars(events, "examples_received_sum") == [(s, 8.0) for s in steps]
    assert _payloads(events, "di_labels") == [(s, SAMPLED_LABELS) for s in steps]


def test_write_summary_ops_override_with_the_originals_signature_keeps_padding_out(tmp_path):
    logdir = str(tmp_path)
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()

        def record(host_call, replica):
            _record_plain(host_call, replica)
            # Replica 1's first example (bucket 0, sampled) is padding.
            flag = [False, False, False, False] if replica == 0 else [True, False, False, False]
            host_call.record_summary_tensor("stopping_signals", tf.constant(flag))

        factory = lambda: make_host_call(logdir, cls=_ReportsExamples, top_k=TOP_K)  # noqa: E731
        _, host_op = build_replicated_host_call(factory, record, 2)
        run_host_call([host_op])

    events = read_events(logdir + "/host_call")
    assert _payloads(events, "di_labels") == [(0, [1.0, 0.0, 1.0])]
    assert _scalars(events, "examples_received_sum") == [(0, 8.0)]


@paths
def test_slice_tensor_override_changes_the_selected_examples(runs, path):
    events = runs[path, _KeepsEveryExample]

    steps = HOST_STEPS[path]
    assert _payloads(events, "di_labels") == [(s, _flat(LABELS)) for s in steps]
    req_times = [t for t in REQ_TIMES for _ in range(TOP_K)]
    assert _payloads(events, "di_req_times") == [(s, req_times) for s in steps]


@paths
def test_verify_shape_and_dtype_override_checks_every_slice(tmp_path, path):
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        logdir = str(tmp_path)
        with pytest.raises(ValueError, match=r"refused by the subclass: \[(2, 4|None, None)\]"):
            if path == "plain":
                _build_plain(logdir, _RefusesToSlice)
            else:
                _build_caching(logdir, _RefusesToSlice, _step_inputs())


@paths
def test_serialize_tensor_override_changes_the_payload_summaries(runs, path):
    events = runs[path, _NamespacedPayloads]

    assert sorted(tag for tag in events if "di_" in tag) == [
        "deepinsight/di_example_sample_rates",
        "deepinsight/di_labels",
        "deepinsight/di_preds",
        "deepinsight/di_req_times",
    ]
    steps = HOST_STEPS[path]
    assert _payloads(events, "deepinsight/di_labels") == [(s, SAMPLED_LABELS) for s in steps]


def test_create_tpu_var_override_creates_the_cached_variables(tmp_path):
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        host_call = make_host_call(
            str(tmp_path), cls=_WindowsStartAtSeven, caching=True, every_n=3, top_k=2
        )
        slices = tf.compat.v1.get_collection("TPU_VAR")
        with tf.compat.v1.Session() as sess:
            for hook in host_call.tpu_var_restore_hooks:
                hook.after_create_session(sess, None)
            values = sess.run(slices)

    assert host_call.created == [
        ("labels_tpu_variable", [6], tf.float32),
        ("preds_tpu_variable", [6], tf.float32),
        ("uid_buckets_tpu_variable", [6], tf.int32),
        ("req_times_tpu_variable", [3], tf.int64),
        ("sample_rates_tpu_variable", [3], tf.float32),
        ("tpu_variables_accumulated_times", [], tf.int32),
    ]
    assert len(values) == 6
    assert all(np.all(v == 7) for v in values)


def test_clear_value_at_index_1_override_changes_when_windows_restart(runs):
    reference = runs["caching", BaseEmbeddingHostCall]
    events = runs["caching", _NeverClears]

    # Steps cached when the host call runs: the window restarts at step 3, or never.
    assert _scalars(reference, "accumulated_times_tpu_variable_avg") == [(2, 2.0), (4, 2.0)]
    assert _scalars(events, "accumulated_times_tpu_variable_avg") == [(2, 2.0), (4, 4.0)]


def test_compute_new_value_override_changes_the_cached_values(runs):
    events = runs["caching", _DoublesFloats]

    doubled = [2 * v for v in SAMPLED_LABELS]
    assert _payloads(events, "di_labels") == [(2, doubled), (4, doubled)]
    assert _payloads(events, "di_example_sample_rates") == [(2, [1.0]), (4, [1.0])]


def test_record_summary_tensor_override_sees_the_cached_windows(runs):
    events = runs["caching", _AlsoReportsCachedSteps]

    assert _scalars(events, "cached_steps_max") == [(2, 2.0), (4, 2.0)]
