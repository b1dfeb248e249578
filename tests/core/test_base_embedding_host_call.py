"""BaseEmbeddingHostCall: params, roll-and-add updates, TPU variables, recording filters."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import base_embedding_host_call as behc
from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall, TPUVariableRestoreHook
from monolith.core.host_call import names
from monolith.core.tpu_variable import ReplicatedVariable
from tests.core._host_call_helpers import (
    SOFT_PLACEMENT,
    FakeUserContext,
    cached_slices,
    make_host_call,
    params,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def graph():
    with tf.Graph().as_default() as g:
        tf.compat.v1.train.get_or_create_global_step()
        yield g


def _disabled_host_call():
    """As the original test builds it: host call off, context None."""
    return BaseEmbeddingHostCall(
        "",
        False,
        False,
        False,
        False,
        10,
        {
            "enable_host_call": False,
            "context": None,
            "cpu_test": False,
            "host_call_every_n_steps": 100,
        },
    )


def test_module_constants_are_those_of_the_original():
    assert behc._LABLES_FOR_AUC_CALCULATION == "labels_for_auc_calculation"
    assert behc._Y_PRED_FOR_AUC_CALCULATION == "y_pred_for_auc_calculation"
    assert (behc._REQ_TIME, behc._SAMPLE_RATE, behc._UID, behc._UID_BUCKET) == (
        "req_time",
        "sample_rate",
        "uid",
        "uid_bucket",
    )
    assert (behc._RATIO_N, behc._UID_SAMPLE_RATE) == (1000, 0.01)
    assert behc._DEEPINSIGHT_LABELS == "di_labels"
    assert behc._DEEPINSIGHT_PREDS == "di_preds"
    assert behc._DEEPINSIGHT_REQ_TIMES == "di_req_times"
    assert behc._DEEPINSIGHT_SAMPLE_RATES == "di_example_sample_rates"
    assert set(behc._DEPRECATED_METRIC_NAMES) == behc._HOST_CALL_AUC_METRICS
    assert behc._ACCUMULATED_COUNTER_TPU_VARIABLE == "tpu_variables_accumulated_times"
    assert behc._LABELS_TPU_VARIABLE == "labels_tpu_variable"


# ------------------------------------------------------------ _compute_new_value


def test_compute_new_value_matches_the_original_reference_values(graph):
    host_call = _disabled_host_call()
    delta = tf.ones([2], dtype=tf.int32)
    value = tf.zeros([10], dtype=tf.int32)
    results = []
    for offset in (tf.constant(1, dtype=tf.int32), tf.constant(5), tf.constant(6)):
        value = host_call._compute_new_value(value, delta, offset)
        results.append(value)

    with tf.compat.v1.Session() as sess:
        got = sess.run(results)
    np.testing.assert_array_equal(got[0], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got[1], [0, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(got[2], [0, 1, 1, 0, 0, 1, 2, 1, 0, 0])


def test_compute_new_value_wraps_around_the_end(graph):
    host_call = _disabled_host_call()
    new = host_call._compute_new_value(
        tf.zeros([5]), tf.constant([1.0, 2.0, 3.0]), tf.constant(4, tf.int64)
    )

    with tf.compat.v1.Session() as sess:
        np.testing.assert_array_equal(sess.run(new), [2.0, 3.0, 0.0, 0.0, 1.0])


def test_compute_new_value_accepts_a_replicated_variable(graph):
    host_call = _disabled_host_call()
    slices = [
        tf.compat.v1.Variable(tf.fill([4], float(r + 1)), use_resource=True, name=f"s{r}")
        for r in range(2)
    ]
    new = host_call._compute_new_value(
        ReplicatedVariable("v", slices), tf.constant([5.0]), tf.constant(2)
    )

    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        np.testing.assert_array_equal(sess.run(new), [1.0, 1.0, 6.0, 1.0])


@pytest.mark.parametrize(
    "base, delta, error, message",
    [
        (
            lambda: tf.zeros([2, 5]),
            lambda: tf.zeros([2]),
            ValueError,
            "base_tpu_var must have rank 1",
        ),
        (lambda: tf.zeros([5]), lambda: tf.zeros([]), ValueError, "delta_value must have rank 1"),
        (
            lambda: tf.zeros([5], tf.int32),
            lambda: tf.zeros([2]),
            TypeError,
            "delta_value's dtype float32 must be base_tpu_var's dtype int32",
        ),
        (lambda: tf.zeros([2]), lambda: tf.zeros([3]), ValueError, r"delta_value \(length 3\)"),
        (
            lambda: tf.compat.v1.placeholder(tf.float32, [None]),
            lambda: tf.zeros([2]),
            ValueError,
            "base_tpu_var must have a static length",
        ),
    ],
    ids=["base-rank", "delta-rank", "dtype", "too-long", "dynamic-length"],
)
def test_compute_new_value_rejects_bad_inputs(graph, base, delta, error, message):
    host_call = _disabled_host_call()

    with pytest.raises(error, match=message):
        host_call._compute_new_value(base(), delta(), tf.constant(0))


# ------------------------------------------------------------ params


@pytest.mark.parametrize(
    "constructor, in_params, enabled, warns",
    [(True, True, True, False), (True, False, False, True), (False, True, False, True),
     (False, False, False, False)],
)  # fmt: skip
def test_host_call_is_enabled_only_when_constructor_and_params_agree(
    graph, caplog, constructor, in_params, enabled, warns
):
    caplog.set_level(logging.WARNING)
    host_call = BaseEmbeddingHostCall(
        "/tmp/unused", constructor, False, True, False, 4, params(enable=in_params)
    )
    host_call.record_summary_tensor("loss_avg", tf.constant(1.0))

    hook = host_call.generate_host_call_hook()
    assert (hook is not None) is enabled
    if enabled:  # the global step and loss_avg are outfed
        assert [(t.dtype, t.shape.as_list()) for t in hook[1]] == [
            (tf.int64, [1, 1]),
            (tf.float32, [1, 1]),
        ]
    warnings = [r for r in caplog.records if "enable_host_call" in r.getMessage()]
    assert bool(warnings) is warns


def test_cpu_test_caches_in_one_slice_on_the_default_device(graph):
    make_host_call("/tmp/unused", caching=True, every_n=2, cpu_test=True)

    slices = tf.compat.v1.get_collection("TPU_VAR")
    assert [(v.op.name, v.device) for v in slices] == [
        (f"slice_{name}_0_0", "") for name in names.WINDOWS
    ]


def test_the_context_from_params_places_the_slices_and_sets_the_replica_count(graph):
    context = FakeUserContext(num_hosts=1, replicas_per_host=3)
    host_call = make_host_call(
        "/tmp/unused", caching=True, every_n=2, top_k=2, cpu_test=False, context=context
    )
    host_call.record_summary_tpu_variables()
    host_fn, tensors = host_call.generate_host_call_hook()

    assert [v.device for v in cached_slices("labels_tpu_variable")] == [
        f"/task:0/device:TPU:{d}" for d in range(3)
    ]
    # The host function expects the context's 3 replicas, not the 1 it got.
    with pytest.raises(ValueError, match=r"labels_tpu_variable must have shape \[3, 4\]"):
        host_fn(*tensors)


def test_constructor_rejects_params_that_are_not_a_mapping(graph):
    with pytest.raises(TypeError, match="params must be a mapping, got list"):
        BaseEmbeddingHostCall("", True, False, True, False, 4, [("cpu_test", True)])


@pytest.mark.parametrize("key", ["enable_host_call", "cpu_test", "host_call_every_n_steps"])
def test_constructor_rejects_params_missing_a_key(graph, key):
    incomplete = params()
    del incomplete[key]

    with pytest.raises(ValueError, match=f"params is missing the key '{key}'"):
        BaseEmbeddingHostCall("", True, False, True, False, 4, incomplete)


def test_constructor_rejects_params_without_context_unless_cpu_test(graph):
    incomplete = params(cpu_test=False)
    del incomplete["context"]

    with pytest.raises(ValueError, match="params is missing the key 'context'"):
        BaseEmbeddingHostCall("", True, False, True, False, 4, incomplete)


@pytest.mark.parametrize(
    "every_n, error",
    [(1, ValueError), (0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)],
)
def test_caching_rejects_host_call_every_n_steps_not_above_1(graph, every_n, error):
    with pytest.raises(error, match=rf"host_call_every_n_steps={every_n!r}"):
        make_host_call("/tmp/unused", caching=True, every_n=every_n)


@pytest.mark.parametrize("top_k, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_caching_rejects_a_non_positive_top_k(graph, top_k, error):
    with pytest.raises(error, match=rf"top_k_sampling_num_per_core={top_k!r}"):
        make_host_call("/tmp/unused", caching=True, every_n=2, top_k=top_k)


@pytest.mark.parametrize(
    "every_n, error", [(-1, ValueError), (0, ValueError), ("2", TypeError), (1.0, TypeError)]
)
def test_without_caching_host_call_every_n_steps_must_be_a_positive_int(graph, every_n, error):
    with pytest.raises(error, match=rf"host_call_every_n_steps={every_n!r}"):
        make_host_call("/tmp/unused", every_n=every_n)


@pytest.mark.parametrize("top_k, error", [(0, ValueError), (-3, ValueError), ("4", TypeError)])
def test_without_caching_top_k_must_be_a_positive_int(graph, top_k, error):
    with pytest.raises(error, match=rf"top_k_sampling_num_per_core={top_k!r}"):
        make_host_call("/tmp/unused", top_k=top_k)


def test_a_disabled_host_call_does_not_check_the_counts_it_never_uses(graph):
    for caching in (False, True):
        BaseEmbeddingHostCall("", False, False, True, caching, -3, params(every_n="2"))


def test_caching_rejects_a_none_context_outside_cpu_test(graph):
    with pytest.raises(ValueError, match="needs params\\['context'\\].*got context=None"):
        make_host_call("/tmp/unused", caching=True, every_n=2, cpu_test=False, context=None)


def test_without_caching_creates_no_tpu_variables(graph):
    host_call = make_host_call("/tmp/unused", every_n=1)

    assert host_call.tpu_var_restore_hooks == []
    assert tf.compat.v1.get_collection("TPU_VAR") == []
    assert host_call.update_tpu_variables_ops(None, None, None, None, None, None) == []


# ------------------------------------------------------------ TPU variables


def test_caching_creates_a_resource_slice_per_host_and_replica(graph):
    context = FakeUserContext(num_hosts=2, replicas_per_host=2, master_job="worker")
    host_call = make_host_call(
        "/tmp/unused", caching=True, every_n=3, top_k=2, cpu_test=False, context=context
    )

    slices = tf.compat.v1.get_collection("TPU_VAR")
    assert len(slices) == 6 * 4
    assert not set(slices) & set(tf.compat.v1.global_variables())  # not checkpointed
    assert [(v.op.name, v.device) for v in cached_slices("labels_tpu_variable")] == [
        (f"slice_labels_tpu_variable_{h}_{d}", f"/job:worker/task:{h}/device:TPU:{d}")
        for h in range(2)
        for d in range(2)
    ]
    assert all(v.op.type == "VarHandleOp" for v in slices)
    shapes = {
        name: {(tuple(v.shape.as_list()), v.dtype) for v in cached_slices(name)}
        for name in names.WINDOWS
    }
    assert shapes == {
        "labels_tpu_variable": {((6,), tf.float32)},
        "preds_tpu_variable": {((6,), tf.float32)},
        "uid_buckets_tpu_variable": {((6,), tf.int32)},
        "req_times_tpu_variable": {((3,), tf.int64)},
        "sample_rates_tpu_variable": {((3,), tf.float32)},
        "tpu_variables_accumulated_times": {((), tf.int32)},
    }
    assert len(host_call.tpu_var_restore_hooks) == 6
    assert all(isinstance(h, TPUVariableRestoreHook) for h in host_call.tpu_var_restore_hooks)
    assert all(
        isinstance(h, tf.compat.v1.train.SessionRunHook) for h in host_call.tpu_var_restore_hooks
    )


def test_restore_hooks_zero_every_slice_after_session_creation(graph):
    host_call = make_host_call(
        "/tmp/unused", caching=True, every_n=2, top_k=2, cpu_test=False, context=FakeUserContext()
    )
    slices = tf.compat.v1.get_collection("TPU_VAR")
    creator = tf.compat.v1.train.ChiefSessionCreator(config=SOFT_PLACEMENT)

    with tf.compat.v1.train.MonitoredSession(creator, hooks=host_call.tpu_var_restore_hooks) as s:
        values = s.run(slices)

    assert len(values) == 12
    assert all(not np.any(v) for v in values)


def test_tpu_variables_created_in_a_loop_body_live_in_the_outer_graph(graph):
    """TPUEstimator builds the step in loop/function bodies: the slices are lifted out."""
    created = {}

    def body(i):
        created["host_call"] = make_host_call(
            "/tmp/unused",
            caching=True,
            every_n=2,
            top_k=2,
            cpu_test=False,
            context=FakeUserContext(),
        )
        return i + 1

    loop = tf.while_loop(lambda i: i < 1, body, [tf.constant(0)])
    host_call = created["host_call"]

    slices = tf.compat.v1.get_collection("TPU_VAR")
    assert len(slices) == 6 * 2
    assert all(v.graph is graph for v in slices)
    # Zeroed and read outside the loop: impossible for a variable of the loop body.
    (counter, _) = cached_slices("tpu_variables_accumulated_times")
    with tf.compat.v1.Session(config=SOFT_PLACEMENT) as sess:
        for hook in host_call.tpu_var_restore_hooks:
            hook.after_create_session(sess, None)
        sess.run(loop)
        assert sess.run(counter) == 0


# ------------------------------------------------------------ update_tpu_variables_ops errors


def _update_args(top_k=2, **overrides):
    args = {
        "global_step": tf.constant(1, tf.int64),
        "labels": tf.zeros([top_k]),
        "preds": tf.zeros([top_k]),
        "uid_buckets": tf.zeros([top_k], tf.int32),
        "req_times": tf.zeros([1], tf.int64),
        "sample_rates": tf.zeros([1]),
    }
    args.update({k: v() for k, v in overrides.items()})
    return args


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"labels": lambda: None}, ValueError, "labels must be a tensor, got None"),
        ({"preds": lambda: tf.zeros([3])}, ValueError, r"preds must have shape \[2\].*\(3,\)"),
        ({"labels": lambda: tf.zeros([2, 1])}, ValueError, "labels must have rank 1"),
        (
            {"uid_buckets": lambda: tf.zeros([2], tf.int64)},
            TypeError,
            "uid_buckets must have dtype int32, got int64",
        ),
        ({"req_times": lambda: tf.zeros([], tf.int64)}, ValueError, "req_times must have rank 1"),
        (
            {"sample_rates": lambda: tf.zeros([4])},
            ValueError,
            "sample_rates must hold at most host_call_every_n_steps=3",
        ),
        (
            {"labels": lambda: tf.compat.v1.placeholder(tf.float32, [None])},
            ValueError,
            "labels must have a static length",
        ),
        ({"global_step": lambda: tf.constant(1.0)}, TypeError, "global_step must be an integer"),
        ({"global_step": lambda: tf.constant([1])}, ValueError, "global_step must have rank 0"),
    ],
    ids=[
        "none",
        "shape",
        "rank",
        "dtype",
        "req-scalar",
        "too-long",
        "dynamic",
        "gs-float",
        "gs-rank",
    ],
)
def test_update_tpu_variables_ops_rejects_bad_inputs(graph, override, error, message):
    host_call = make_host_call("/tmp/unused", caching=True, every_n=3, top_k=2)

    with pytest.raises(error, match=message):
        host_call.update_tpu_variables_ops(**_update_args(**override))


def test_generate_host_call_hook_rejects_caching_without_recorded_tpu_variables(graph):
    host_call = make_host_call("/tmp/unused", caching=True, every_n=2, top_k=2)

    with pytest.raises(RuntimeError, match="record_summary_tpu_variables"):
        host_call.generate_host_call_hook()


# ------------------------------------------------------------ recording filters


def _outfed(host_call):
    """dtype -> width of the packed tensor the host call outfeeds per core."""
    return {t.dtype: t.shape.as_list()[1] for t in host_call.generate_host_call_hook()[1]}


def test_scalar_metrics_switch_keeps_only_the_auc_inputs(graph):
    host_call = make_host_call("/tmp/unused", scalar_metrics=False)
    host_call.record_summary_tensor("loss_avg", tf.constant(1.0))
    host_call.record_summary_tensor("labels_for_auc_calculation", tf.zeros([4]))
    host_call.record_summary_tensor("uid_bucket", tf.zeros([4], tf.int32))

    # The labels and uid buckets, without loss_avg.
    assert _outfed(host_call) == {tf.int64: 1, tf.float32: 4, tf.int32: 4}


def test_caching_drops_the_per_step_auc_inputs_but_keeps_the_cached_windows(graph):
    host_call = make_host_call(
        "/tmp/unused", caching=True, every_n=2, top_k=2, scalar_metrics=False
    )
    for name in behc._DEPRECATED_METRIC_NAMES:
        host_call.record_summary_tensor(name, tf.zeros([2]))
    host_call.record_summary_tpu_variables()

    # Only the windows: labels, preds [4], sample rates [2]; uid buckets [4],
    # counter; global step, request times [2].
    assert _outfed(host_call) == {tf.int64: 1 + 2, tf.float32: 4 + 4 + 2, tf.int32: 4 + 1}


def test_record_summary_tensor_rejects_a_duplicate_name(graph):
    host_call = make_host_call("/tmp/unused")
    host_call.record_summary_tensor("uid_bucket", tf.zeros([4], tf.int32))

    with pytest.raises(ValueError, match="'uid_bucket' was already recorded"):
        host_call.record_summary_tensor("uid_bucket", tf.zeros([4], tf.int32))


def test_record_summary_tensor_rejects_a_rank_2_tensor(graph):
    host_call = make_host_call("/tmp/unused")

    with pytest.raises(ValueError, match=r"'labels_for_auc_calculation' must be a scalar or"):
        host_call.record_summary_tensor("labels_for_auc_calculation", tf.zeros([2, 2]))
