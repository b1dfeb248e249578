"""BaseHostCall: recording, packing one tensor per dtype, unpacking on the host."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from monolith.core.base_host_call import BaseHostCall
from monolith.core.host_call import layout as _host_call_layout

pytestmark = pytest.mark.timeout(60)

# name -> (dtype, per-replica value for replica 0); replica r adds 100 * r.
RECORDED = {
    "loss_avg": (tf.float32, 0.5),
    "ids": (tf.int32, [1, 2, 3]),
    "labels": (tf.float32, [1.0, 0.0]),
    "req_time": (tf.int64, [7]),
    "count_sum": (tf.int32, 4),
    "weights": (tf.float64, [0.25, 0.75]),
}


@pytest.fixture
def graph():
    with tf.Graph().as_default() as g:
        tf.compat.v1.train.get_or_create_global_step()
        yield g


class _Probe(BaseHostCall):
    """A subclass as `BaseHostCall`'s docstring describes; its host function returns what it got.

    The host function returns `(global_step, {recorded name: tensor})` from
    `decompress_tensors`, in the order the tensors come back.
    """

    def generate_host_call_hook(self):
        self.compress_tensors()

        def host_fn(*args):
            global_step, tensors = self.decompress_tensors(args)
            return global_step, dict(zip(self._tensor_names, tensors))

        return host_fn, self._compressed_tensors


def _record_all(host_call, replica_id):
    for name, (dtype, value) in RECORDED.items():
        host_call.record_summary_tensor(
            name, tf.constant(value, dtype) + tf.cast(100 * replica_id, dtype)
        )


def _replicated_inputs(tensors, replica_id, num_replicas):
    """What TPUEstimator hands the host: each packed tensor concatenated over replicas."""
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        rows = [sess.run(tensors, {replica_id: r}) for r in range(num_replicas)]
    return [tf.constant(np.concatenate(column, axis=0)) for column in zip(*rows)]


# ------------------------------------------------------------ pure layout


def test_plan_packing_groups_by_dtype_in_order_of_first_appearance():
    groups = _host_call_layout.plan_packing(["i64", "f32", "i32", "f32", "i64"], [1, 3, 2, 1, 4])

    assert [g.dtype for g in groups] == ["i64", "f32", "i32"]
    assert [g.positions for g in groups] == [(0, 4), (1, 3), (2,)]
    assert [g.sizes for g in groups] == [(1, 4), (3, 1), (2,)]
    assert [g.width for g in groups] == [5, 4, 2]


def test_recorded_order_locates_every_recorded_tensor():
    groups = _host_call_layout.plan_packing(["a", "b", "a", "c"], [1, 1, 1, 1])

    assert _host_call_layout.recorded_order(groups) == [(0, 0), (1, 0), (0, 1), (2, 0)]


@pytest.mark.parametrize(
    "dtypes, sizes, message",
    [(["a"], [1, 2], "same length"), (["a", "b"], [1, -1], r"sizes\[1\]")],
)
def test_plan_packing_rejects_bad_bookkeeping(dtypes, sizes, message):
    with pytest.raises(ValueError, match=message):
        _host_call_layout.plan_packing(dtypes, sizes)


# ------------------------------------------------------------ recording


def test_records_the_global_step_first(graph):
    host_fn, tensors = _Probe("/tmp/unused", enable_host_call=True).generate_host_call_hook()
    global_step, received = host_fn(*tensors)
    set_step = tf.compat.v1.assign(tf.compat.v1.train.get_global_step(), 5)

    assert [(t.dtype, t.shape.as_list()) for t in tensors] == [(tf.int64, [1, 1])]
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        sess.run(set_step)
        step, values = sess.run([global_step, received])
    assert step == 5
    assert list(values) == ["global_step"]
    np.testing.assert_array_equal(values["global_step"], [5])


def test_compress_packs_one_row_per_dtype(graph):
    host_call = _Probe("/tmp/unused", enable_host_call=True)
    _record_all(host_call, 0)

    _, tensors = host_call.generate_host_call_hook()

    assert [(t.dtype, t.shape.as_list()) for t in tensors] == [
        (tf.int64, [1, 1 + 1]),  # global_step, req_time: the global step's dtype first
        (tf.float32, [1, 1 + 2]),  # loss_avg, labels
        (tf.int32, [1, 3 + 1]),  # ids, count_sum
        (tf.float64, [1, 2]),  # weights
    ]


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_decompress_returns_recorded_tensors_in_order_per_replica(graph, num_replicas):
    replica_id = tf.compat.v1.placeholder(tf.int32, [])
    host_call = _Probe("/tmp/unused", enable_host_call=True)
    _record_all(host_call, replica_id)
    host_fn, tensors = host_call.generate_host_call_hook()
    inputs = _replicated_inputs(tensors, replica_id, num_replicas)

    global_step, received = host_fn(*inputs)

    assert list(received) == ["global_step", *RECORDED]
    with tf.compat.v1.Session() as sess:
        step, values = sess.run([global_step, received])
    assert step == 0
    np.testing.assert_array_equal(values["global_step"], np.zeros([num_replicas]))
    for name, (dtype, value) in RECORDED.items():
        expected = np.stack(
            [np.asarray(value, dtype.as_numpy_dtype) + 100 * r for r in range(num_replicas)]
        )
        if expected.ndim == 2 and expected.shape[1] == 1:
            expected = expected[:, 0]  # k == 1: [num_replicas]
        np.testing.assert_array_equal(values[name], expected)
        assert values[name].dtype == dtype.as_numpy_dtype


@pytest.mark.parametrize("num_replicas", [1, 4])
def test_decompress_keeps_the_replica_dimension(graph, num_replicas):
    host_call = _Probe("/tmp/unused", enable_host_call=True)
    host_call.record_summary_tensor("scalar", tf.constant(1.0))
    host_call.record_summary_tensor("one", tf.constant([1.0]))
    host_call.record_summary_tensor("vector", tf.constant([1.0, 2.0]))
    host_fn, tensors = host_call.generate_host_call_hook()
    inputs = [tf.zeros([num_replicas, t.shape[1]], t.dtype) for t in tensors]

    global_step, received = host_fn(*inputs)

    assert global_step.shape.as_list() == []
    assert {name: t.shape.as_list() for name, t in received.items()} == {
        "global_step": [num_replicas],
        "scalar": [num_replicas],
        "one": [num_replicas],
        "vector": [num_replicas, 2],
    }


def test_disabled_host_call_records_nothing_and_has_no_hook(graph):
    host_call = _Probe("/tmp/unused", enable_host_call=False)
    host_call.record_summary_tensor("loss_avg", tf.constant(1.0))
    host_call.record_summary_tensor("loss_avg", tf.constant([[1.0]]))  # not even checked

    host_fn, tensors = host_call.generate_host_call_hook()
    assert list(host_fn(*tensors)[1]) == ["global_step"]
    assert BaseHostCall("/tmp/unused", enable_host_call=False).generate_host_call_hook() is None


def test_enabled_host_call_records_a_vector_of_static_length(graph):
    host_call = _Probe("/tmp/unused", enable_host_call=True)
    host_call.record_summary_tensor("v", tf.zeros([5]))

    host_fn, tensors = host_call.generate_host_call_hook()
    assert host_fn(*tensors)[1]["v"].shape.as_list() == [1, 5]


# ------------------------------------------------------------ user errors


def test_enabled_host_call_rejects_a_graph_without_global_step():
    with tf.Graph().as_default(), pytest.raises(RuntimeError, match="global step"):
        BaseHostCall("/tmp/unused", enable_host_call=True)


def test_record_rejects_a_duplicate_name(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
    host_call.record_summary_tensor("loss_avg", tf.constant(1.0))

    with pytest.raises(ValueError, match="'loss_avg' was already recorded"):
        host_call.record_summary_tensor("loss_avg", tf.constant(2.0))


def test_record_rejects_the_reserved_global_step_name(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)

    with pytest.raises(ValueError, match="'global_step' was already recorded"):
        host_call.record_summary_tensor("global_step", tf.constant(1))


def test_record_rejects_a_rank_2_tensor(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)

    with pytest.raises(ValueError, match=r"'matrix' must be a scalar or a vector.*\(2, 3\)"):
        host_call.record_summary_tensor("matrix", tf.zeros([2, 3]))


def test_record_rejects_a_vector_without_static_length(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
    dynamic = tf.compat.v1.placeholder(tf.float32, [None])

    with pytest.raises(ValueError, match="'dynamic' must have a static length"):
        host_call.record_summary_tensor("dynamic", dynamic)


def test_record_rejects_a_tensor_of_unknown_rank(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
    unknown = tf.compat.v1.placeholder(tf.float32, None)

    with pytest.raises(ValueError, match="'unknown' must be a scalar or a vector"):
        host_call.record_summary_tensor("unknown", unknown)


def test_record_rejects_tensors_after_compression(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
    host_call.compress_tensors()

    with pytest.raises(RuntimeError, match="'late'.*already compressed"):
        host_call.record_summary_tensor("late", tf.constant(1.0))


def test_compress_rejects_a_second_call(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
    host_call.compress_tensors()

    with pytest.raises(RuntimeError, match="already called"):
        host_call.compress_tensors()


def test_decompress_rejects_a_call_before_compression(graph):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)

    with pytest.raises(RuntimeError, match="compress_tensors"):
        host_call.decompress_tensors([tf.zeros([1, 1], tf.int64)])


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        (lambda: [], ValueError, "expected 2 compressed tensors.*got 0"),
        (
            lambda: [tf.zeros([1], tf.int64), tf.zeros([1, 2])],
            ValueError,
            "compressed tensor 0 must have rank 2",
        ),
        (
            lambda: [tf.zeros([1, 1], tf.int64), tf.zeros([1, 3])],
            ValueError,
            r"compressed tensor 1 must have shape \[None, 2\]",
        ),
        (
            lambda: [tf.zeros([1, 1], tf.int32), tf.zeros([1, 2])],
            TypeError,
            "compressed tensor 0 must have dtype int64, got int32",
        ),
    ],
    ids=["count", "rank", "width", "dtype"],
)
def test_decompress_rejects_mismatched_tensors(graph, inputs, error, message):
    host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
    host_call.record_summary_tensor("pair", tf.zeros([2]))
    host_call.compress_tensors()

    with pytest.raises(error, match=message):
        host_call.decompress_tensors(inputs())
