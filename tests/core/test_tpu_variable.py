"""ReplicatedVariable: the first replica outside a TPU context, replicated handles inside."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

from monolith.core.tpu_variable import ReplicatedVariable

pytestmark = pytest.mark.timeout(60)

NUM_REPLICAS = 2


def _slices(initial=(1.0, 2.0), dtype=tf.float32, devices=None, prefix="slice"):
    devices = devices or [None] * NUM_REPLICAS
    slices = []
    for r, device in enumerate(devices):
        with tf.device(device):
            slices.append(
                tf.compat.v1.Variable(
                    np.asarray(initial) * (r + 1),
                    dtype=dtype,
                    name=f"{prefix}_{r}",
                    collections=["TPU_VAR"],
                    use_resource=True,
                    trainable=False,
                )
            )
    return slices


@pytest.fixture
def replicated():
    with tf.Graph().as_default():
        slices = _slices()
        variable = ReplicatedVariable("cached", slices)
        with tf.compat.v1.Session() as sess:
            sess.run(variable.initializer)
            yield variable, slices, sess


# ------------------------------------------------------------ outside a TPU context


def test_initializer_initializes_every_replica(replicated):
    _, slices, sess = replicated

    np.testing.assert_array_equal(sess.run(slices), [[1.0, 2.0], [2.0, 4.0]])


@pytest.mark.parametrize(
    "read",
    [
        lambda v: v.read_value(),
        lambda v: tf.convert_to_tensor(v),
        lambda v: tf.identity(v),
        lambda v: tf.add(v, 0.0),
    ],
    ids=["read_value", "convert_to_tensor", "identity", "add"],
)
def test_reads_the_first_replica(replicated, read):
    variable, _, sess = replicated

    np.testing.assert_array_equal(sess.run(read(variable)), [1.0, 2.0])


def test_assign_writes_only_the_first_replica_and_returns_an_op(replicated):
    variable, slices, sess = replicated

    update = variable.assign([5.0, 6.0])
    assert isinstance(update, tf.Operation)
    sess.run(update)

    np.testing.assert_array_equal(sess.run(slices), [[5.0, 6.0], [2.0, 4.0]])


def test_compat_v1_assign_goes_through_the_variable(replicated):
    variable, slices, sess = replicated

    sess.run(tf.compat.v1.assign(variable, [7.0, 8.0]))

    np.testing.assert_array_equal(sess.run(slices[0]), [7.0, 8.0])


@pytest.mark.parametrize(
    "method, delta, expected",
    [("assign_add", [1.0, 1.0], [2.0, 3.0]), ("assign_sub", [1.0, 1.0], [0.0, 1.0])],
)
def test_assign_add_and_sub_return_the_new_value(replicated, method, delta, expected):
    variable, slices, sess = replicated

    new_value = getattr(variable, method)(delta)

    np.testing.assert_array_equal(sess.run(new_value), expected)
    np.testing.assert_array_equal(sess.run(slices[1]), [2.0, 4.0])


def test_assign_with_read_value_returns_the_assigned_value(replicated):
    variable, _, sess = replicated

    np.testing.assert_array_equal(sess.run(variable.assign([3.0, 3.0], read_value=True)), [3, 3])


def test_updates_inside_a_while_loop_body(replicated):
    """The body is a FuncGraph in TF2 behaviour: no switch to the handle's graph."""
    variable, slices, sess = replicated

    def body(i, total):
        added = tf.identity(variable.assign_add([1.0, 10.0]))
        with tf.control_dependencies([added]):
            subtracted = variable.assign_sub([0.0, 5.0], read_value=False)
        with tf.control_dependencies([subtracted]):
            return i + 1, total + tf.reduce_sum(added)

    _, total = tf.while_loop(lambda i, _: i < 3, body, [tf.constant(0), tf.constant(0.0)])

    assert sess.run(total) == pytest.approx((2 + 12) + (3 + 17) + (4 + 22))
    np.testing.assert_array_equal(sess.run(slices), [[4.0, 17.0], [2.0, 4.0]])


def test_acts_as_a_resource_variable_with_the_first_replicas_properties(replicated):
    variable, slices, _ = replicated

    assert resource_variable_ops.is_resource_variable(variable)
    assert variable.name == "cached"
    assert variable._shared_name == "cached"
    assert variable._unique_id == slices[0]._unique_id
    assert variable.dtype == tf.float32
    assert variable.shape.as_list() == variable.get_shape().as_list() == [2]
    assert variable.graph is slices[0].graph
    assert variable.get() is slices[0]
    assert variable.op is slices[0].op
    assert variable.variables == slices
    assert variable.handle is slices[0].handle
    assert variable.constraint is None


# ------------------------------------------------------------ inside tpu.replicate


def _op_types_in_graph_and_library(graph):
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types.update(node.op for node in function.node_def)
    return types


def test_replicate_context_reads_and_assigns_through_one_replicated_handle():
    """Graph construction only (no TPU): the step uses a TPUReplicatedInput of both slices.

    The reads and writes sit in a while-loop body inside the replicated
    computation, as in TPUEstimator's step (a FuncGraph in TF2 behaviour).
    """
    with tf.Graph().as_default() as graph:
        slices = _slices(devices=[f"/task:0/device:TPU:{r}" for r in range(NUM_REPLICAS)])
        variable = ReplicatedVariable("cached", slices)

        def step(x):
            def body(i, acc):
                value = variable.read_value() + x
                with tf.control_dependencies([variable.assign(value)]):
                    added = variable.assign_add([1.0, 1.0])
                return i + 1, acc + tf.reduce_sum(added) + tf.reduce_sum(variable)

            return tf.while_loop(lambda i, _: i < 2, body, [tf.constant(0), tf.constant(0.0)])[1]

        tf.compat.v1.tpu.replicate(step, inputs=[[tf.constant(1.0)], [tf.constant(2.0)]])

    replicated_inputs = [
        op
        for op in graph.get_operations()
        if op.type == "TPUReplicatedInput" and op.inputs[0].dtype == tf.resource
    ]
    assert len(replicated_inputs) == 1  # cached per variable
    assert [t.op for t in replicated_inputs[0].inputs] == [s.handle.op for s in slices]
    assert replicated_inputs[0].name.endswith("cached/handle")
    assert {"ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp"} <= (
        _op_types_in_graph_and_library(graph)
    )
    # No replica's own handle is read or written inside the computation.
    for s in slices:
        consumers = {c.type for c in s.handle.consumers()}
        assert "AssignAddVariableOp" not in consumers


# ------------------------------------------------------------ user errors


def test_constructor_rejects_an_empty_variable_list():
    with pytest.raises(ValueError, match="one variable per replica, got \\[\\]"):
        ReplicatedVariable("cached", [])


def test_constructor_rejects_mixed_dtypes():
    with tf.Graph().as_default():
        slices = [_slices(dtype=tf.float32)[0], _slices(dtype=tf.float64, prefix="other")[0]]
        with pytest.raises(ValueError, match="share one dtype"):
            ReplicatedVariable("cached", slices)


def test_constructor_rejects_mixed_shapes():
    with tf.Graph().as_default():
        slices = [_slices()[0], _slices(initial=(1.0, 2.0, 3.0), prefix="other")[0]]
        with pytest.raises(ValueError, match="share one shape"):
            ReplicatedVariable("cached", slices)
