"""`skip_padding_steps`: padding steps change no variable, for every optimizer and loop size.

The end-of-stream runs go through the emulated TPU loop (`monolith.core.testing.train`)
with `append_stopping_signals` input: 8 real batches, then padding until the
loop ends. The reference trains exactly the 8 real batches without the wrapper
(`max_steps=8`, one step per loop). Both are compared variable by variable from
their final checkpoints, so the names must match too.

The TPU graph tests build the wrapper, around and inside `CrossShardOptimizer`,
with the real TPUEstimator on the simulated 1x8 and 2x4 systems and check the
decision is a cross-replica sum and the update sits in the conditional.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import control_flow_ops
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import TPUEstimatorSpec

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.stopping_signals import (
    USER_PROVIDED_SIGNAL_NAME,
    append_stopping_signals,
    skip_padding_steps,
)
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu, topology

pytestmark = pytest.mark.timeout(300)

BATCH = 4
REAL_BATCHES = 8
DIM = 3

OPTIMIZERS = {
    "adam": lambda: tf.compat.v1.train.AdamOptimizer(0.05),
    "momentum": lambda: tf.compat.v1.train.MomentumOptimizer(0.05, momentum=0.9),
    "rmsprop": lambda: tf.compat.v1.train.RMSPropOptimizer(0.05, momentum=0.5),
    "adagrad": lambda: tf.compat.v1.train.AdagradOptimizer(0.1),
    "ftrl": lambda: tf.compat.v1.train.FtrlOptimizer(0.1, l1_regularization_strength=0.01),
    "sgd": lambda: tf.compat.v1.train.GradientDescentOptimizer(0.05),
}
LOOP_SIZES = [1, 4, 5, 10]


# ---------------------------------------------------------------- the model


def _input_fn(num_batches=REAL_BATCHES, offset=0.0):
    """A linear-regression stream of `num_batches` real batches, then padding."""

    def input_fn():
        n = num_batches * BATCH
        x = (np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) % 7 - 3.0) / 3.0 + offset
        y = x @ np.array([1.5, -2.0, 0.5], np.float32) + 1.0
        dataset = tf.data.Dataset.from_tensor_slices(({"x": x}, y))
        return append_stopping_signals(dataset.batch(BATCH, drop_remainder=True))

    return input_fn


def _make_model_fn(optimizer_name, mode_of_padding, cross_shard=None):
    """A linear model (weights and bias) trained with the named optimizer.

    mode_of_padding: "wrap" uses `skip_padding_steps`; "mask" masks the loss
    with the flag (README's former advice); "none" does neither (for runs on
    real batches only).
    """

    def model_fn(features, labels, mode, params):
        w = tf.compat.v1.get_variable(
            "w", [DIM], initializer=tf.compat.v1.constant_initializer([0.1, 0.2, -0.3])
        )
        b = tf.compat.v1.get_variable("b", [], initializer=tf.compat.v1.constant_initializer(0.5))
        predictions = tf.reduce_sum(features["x"] * w, axis=1) + b
        # Padding has x = 0 and y = 0, so without the wrapper it has a non-zero
        # gradient on the bias: the unmasked loss makes skipping observable.
        errors = tf.square(predictions - labels)
        if mode_of_padding == "mask":
            real = 1.0 - tf.cast(features[USER_PROVIDED_SIGNAL_NAME], tf.float32)
            loss = tf.reduce_sum(real * errors) / tf.maximum(tf.reduce_sum(real), 1.0)
        else:
            loss = tf.reduce_mean(errors)
        optimizer = OPTIMIZERS[optimizer_name]()
        if cross_shard == "inner":  # CrossShardOptimizer(skip_padding_steps(...))
            optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
                skip_padding_steps(optimizer, features)
            )
        else:
            if cross_shard == "outer":
                optimizer = tf.compat.v1.tpu.CrossShardOptimizer(optimizer)
            if mode_of_padding == "wrap":
                optimizer = skip_padding_steps(optimizer, features)
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
        return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    return model_fn


def _checkpoint_values(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(checkpoint)}


def _max_differences(actual, expected):
    assert sorted(actual) == sorted(expected)
    return {
        name: float(np.max(np.abs(np.asarray(actual[name]) - np.asarray(expected[name]))))
        for name in expected
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(optimizer) -> checkpoint values after exactly the real batches (run once)."""
    cache = {}

    def run(optimizer_name):
        if optimizer_name not in cache:
            result = testing.train(
                _make_model_fn(optimizer_name, "none"),
                _input_fn(),
                model_dir=str(tmp_path_factory.mktemp(f"reference_{optimizer_name}")),
                iterations_per_loop=1,
                max_steps=REAL_BATCHES,
            )
            assert result.global_step == result.steps_run == REAL_BATCHES
            assert not result.stopped_at_end_of_stream
            cache[optimizer_name] = _checkpoint_values(result.final_checkpoint)
        return cache[optimizer_name]

    return run


# ------------------------------------------------- end of stream == real batches


@pytest.mark.parametrize("iterations_per_loop", LOOP_SIZES)
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_end_of_stream_run_equals_training_exactly_the_real_batches(
    tmp_path, reference, optimizer_name, iterations_per_loop
):
    result = testing.train(
        _make_model_fn(optimizer_name, "wrap"),
        _input_fn(),
        model_dir=str(tmp_path),
        iterations_per_loop=iterations_per_loop,
    )
    padding_steps = iterations_per_loop - REAL_BATCHES % iterations_per_loop
    assert result.stopped_at_end_of_stream
    assert result.steps_run == REAL_BATCHES + padding_steps  # padding steps did run...
    assert result.global_step == REAL_BATCHES  # ...but were not counted

    actual = _checkpoint_values(result.final_checkpoint)
    expected = reference(optimizer_name)
    differences = _max_differences(actual, expected)
    assert max(differences.values()) <= 1e-6, differences
    assert actual["global_step"] == REAL_BATCHES
    # Every optimizer variable is compared, not only the weights.
    slots = {name for name in actual if name not in ("w", "b", "global_step")}
    assert slots or optimizer_name == "sgd"


@pytest.mark.parametrize("optimizer_name", ["adam", "momentum", "rmsprop"])
def test_masking_the_loss_leaves_stateful_optimizers_moving_and_counts_padding(
    tmp_path, reference, optimizer_name
):
    # Why the wrapper exists: with the loss masked, padding gradients are 0,
    # yet these optimizers still move the weights, and the global step counts
    # the padding steps.
    result = testing.train(
        _make_model_fn(optimizer_name, "mask"),
        _input_fn(),
        model_dir=str(tmp_path),
        iterations_per_loop=5,
    )
    assert result.global_step == REAL_BATCHES + 2
    differences = _max_differences(
        _checkpoint_values(result.final_checkpoint), reference(optimizer_name)
    )
    assert max(differences["w"], differences["b"]) > 1e-3, differences


# -------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("first, second", [("none", "wrap"), ("wrap", "none")])
def test_checkpoints_restore_with_and_without_the_wrapper(tmp_path, first, second):
    # Adam has slots and non-slot variables (beta powers): all keep their names.
    model_dir = str(tmp_path / "model")
    kwargs = dict(model_dir=model_dir, iterations_per_loop=2)
    one = testing.train(
        _make_model_fn("adam", first),
        _input_fn(3),
        max_steps=3 if first == "none" else None,
        **kwargs,
    )
    before = _checkpoint_values(one.final_checkpoint)
    assert one.global_step == 3
    # The second run restores (by name) every variable the first one saved,
    # then trains 2 more real batches on other data.
    two = testing.train(
        _make_model_fn("adam", second), _input_fn(2, offset=0.25), max_steps=5, **kwargs
    )
    after = _checkpoint_values(two.final_checkpoint)
    assert sorted(after) == sorted(before)
    assert after["global_step"] == 5
    assert {"w/Adam", "w/Adam_1", "b/Adam", "b/Adam_1"} <= set(after)
    # In v1 behaviour the beta powers are named under the emulated loop's name scope.
    (beta1_power,) = [name for name in after if name.endswith("beta1_power")]
    # Restored, not re-initialised: 2 more Adam steps from `before` leave beta1_power at
    # before * 0.9**2 (0.9**3 from a fresh start).
    np.testing.assert_allclose(after[beta1_power], before[beta1_power] * 0.81, rtol=1e-6)


def _adam_on_one_variable(wrap_with_flag=None):
    """(w, global_step, optimizer, train_op) in the default graph; d(loss)/dw = 1."""
    w = tf.compat.v1.get_variable("w", [2], initializer=tf.compat.v1.zeros_initializer())
    global_step = tf.compat.v1.train.get_or_create_global_step()
    optimizer = tf.compat.v1.train.AdamOptimizer(0.1)
    if wrap_with_flag is not None:
        optimizer = skip_padding_steps(optimizer, wrap_with_flag)
    train_op = optimizer.minimize(tf.reduce_sum(w), global_step=global_step)
    return w, global_step, optimizer, train_op


def _variable_names():
    return sorted(v.name for v in tf.compat.v1.global_variables())


def test_the_wrapper_creates_no_variables_and_keeps_the_inner_names():
    with tf.Graph().as_default():
        _adam_on_one_variable()
        plain = _variable_names()
    with tf.Graph().as_default():
        w, _, wrapped, _ = _adam_on_one_variable(tf.compat.v1.placeholder(tf.bool, [4]))
        assert _variable_names() == plain
        assert sorted(v.name for v in wrapped.variables()) == [
            name for name in plain if name not in ("w:0", "global_step:0")
        ]
        assert wrapped.get_slot_names() == ["m", "v"]
        assert wrapped.get_slot(w, "m").name == "w/Adam:0"


@pytest.mark.parametrize(
    "dtype, padding, real",
    [
        (tf.bool, [False, True, False, False], [False] * 4),
        (tf.int32, [0, 0, 0, 1], [0] * 4),
        (tf.int64, [2, 0, 0, 0], [0] * 4),
        (tf.bool, True, False),  # a scalar flag
    ],
    ids=["bool", "int32", "int64", "scalar"],
)
def test_any_flagged_example_makes_the_step_padding(dtype, padding, real):
    with tf.Graph().as_default():
        flag = tf.compat.v1.placeholder(dtype, np.shape(padding))
        w, global_step, _, train_op = _adam_on_one_variable({USER_PROVIDED_SIGNAL_NAME: flag})
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            initial = session.run(tf.compat.v1.global_variables())
            session.run(train_op, {flag: padding})
            for before, after in zip(initial, session.run(tf.compat.v1.global_variables())):
                np.testing.assert_array_equal(after, before)
            session.run(train_op, {flag: real})
            assert session.run(global_step) == 1
            # Adam's first step moves each weight by the learning rate against the gradient.
            np.testing.assert_allclose(session.run(w), [-0.1, -0.1], rtol=1e-5)


# ---------------------------------------------------------------- bad input


def test_rejects_an_optimizer_that_is_not_a_v1_optimizer():
    optimizer = tf.keras.optimizers.SGD(0.1)
    with pytest.raises(TypeError, match=r"optimizer=.*SGD.*tf\.compat\.v1\.train\.Optimizer"):
        skip_padding_steps(optimizer, tf.constant([False]))


def test_rejects_features_without_the_flag():
    with pytest.raises(
        ValueError, match=rf"keys \['x'\].*{USER_PROVIDED_SIGNAL_NAME}.*append_stopping"
    ):
        skip_padding_steps(tf.compat.v1.train.AdamOptimizer(0.1), {"x": tf.constant([1.0])})


@pytest.mark.parametrize(
    "features, match",
    [
        ([True, False], r"features=\[True, False\] \(type list\)"),
        ("padding", r"features='padding' \(type str\)"),
        (
            {USER_PROVIDED_SIGNAL_NAME: np.array([True])},
            rf"features\['{USER_PROVIDED_SIGNAL_NAME}'\]=.*\(type ndarray\)",
        ),
    ],
    ids=["list", "str", "ndarray_in_dict"],
)
def test_rejects_features_that_are_neither_a_dict_nor_a_tensor(features, match):
    with pytest.raises(TypeError, match=match):
        skip_padding_steps(tf.compat.v1.train.AdamOptimizer(0.1), features)


def test_rejects_a_float_flag():
    with pytest.raises(TypeError, match=r"features\['.*'\] has dtype float32.*bool or integer"):
        skip_padding_steps(
            tf.compat.v1.train.AdamOptimizer(0.1),
            {USER_PROVIDED_SIGNAL_NAME: tf.constant([0.0, 1.0])},
        )


def test_no_gradients_is_an_error_as_without_the_wrapper():
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("w", [2])
        wrapped = skip_padding_steps(tf.compat.v1.train.AdamOptimizer(0.1), tf.constant([0, 1]))
        with pytest.raises(ValueError, match="No gradients provided for any variable"):
            wrapped.apply_gradients([(None, w)])


# ------------------------------------------------------------ TPU graph


def _is_adam_update(node):
    return node.op in ("ResourceApplyAdam", "ApplyAdam")


def _is_gradient_sum(node):
    return node.op == "CrossReplicaSum" and node.attr["T"].type == tf.float32.as_datatype_enum


def _functions(graph):
    return {f.signature.name: f for f in graph.as_graph_def().library.function}


def _branch_functions(graph):
    """Names of the functions that are a branch of a conditional (transitively)."""
    functions = _functions(graph)
    nodes = [op.node_def for op in graph.get_operations()]
    nodes += [n for f in functions.values() for n in f.node_def]
    branches = {
        n.attr[attr].func.name
        for n in nodes
        if n.op in ("If", "StatelessIf")
        for attr in ("then_branch", "else_branch")
    }
    # Functions called from a branch are inside it too.
    pending = list(branches)
    while pending:
        for node in functions[pending.pop()].node_def:
            for value in node.attr.values():
                if value.func.name and value.func.name not in branches:
                    branches.add(value.func.name)
                    pending.append(value.func.name)
    return branches


def _count_in_and_out_of_conditionals(graph, predicate):
    """(matching nodes inside a conditional, outside one), over the graph and its functions.

    TF2 behaviour: inside means in a branch function of an If (cond_v2); v1
    behaviour: an op in a CondContext.
    """
    inside, outside = 0, 0
    branches = _branch_functions(graph)
    for name, function in _functions(graph).items():
        count = sum(predicate(n) for n in function.node_def)
        if name in branches:
            inside += count
        else:
            outside += count
    for op in graph.get_operations():
        if predicate(op.node_def):
            context = op._get_control_flow_context()
            while context is not None and not isinstance(context, control_flow_ops.CondContext):
                context = context.outer_context
            if context is None:
                outside += 1
            else:
                inside += 1
    return inside, outside


def _decision_sums(graph):
    nodes = [op.node_def for op in graph.get_operations()]
    nodes += [n for f in _functions(graph).values() for n in f.node_def]
    return [n for n in nodes if n.op == "CrossReplicaSum" and "any_replica_padding" in n.name]


@pytest.mark.parametrize("cross_shard", ["outer", "inner"])
@topology
def test_tpu_graph_builds_with_the_wrapper_and_decides_across_replicas(
    tmp_path, num_hosts, cores_per_host, cross_shard
):
    def batched_input_fn(params):
        batch = params["batch_size"]
        x = np.ones([batch * 2, DIM], np.float32)
        dataset = tf.data.Dataset.from_tensor_slices(({"x": x}, np.zeros([batch * 2], np.float32)))
        return append_stopping_signals(dataset.batch(batch, drop_remainder=True))

    built = build_on_simulated_tpu(
        _make_model_fn("adam", "wrap", cross_shard=cross_shard),
        batched_input_fn,
        num_hosts,
        cores_per_host,
        model_dir=str(tmp_path),
        per_replica_batch=BATCH,
    )
    graph = built.graph
    assert isinstance(built.feed_hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
    sums = _decision_sums(graph)
    assert len(sums) == 1
    assert sums[0].attr["T"].type == tf.int32.as_datatype_enum
    # The updates of w and b run only in the conditional.
    assert _count_in_and_out_of_conditionals(graph, _is_adam_update) == (2, 0)
    # CrossShardOptimizer's gradient sums (w and b) are inside the conditional when it
    # is wrapped, before it when it wraps; either way every replica runs them or none.
    in_cond, out_of_cond = _count_in_and_out_of_conditionals(graph, _is_gradient_sum)
    assert (in_cond, out_of_cond) == ((2, 0) if cross_shard == "outer" else (0, 2))
    # The optimizer's variables live outside the TPU step, in the outer graph.
    names = {v.op.name for v in graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)}
    assert {"beta1_power", "beta2_power", "w/Adam", "w/Adam_1", "b/Adam", "b/Adam_1"} <= names


# ------------------------------------------------- without the feed hook


class _StopAfterRuns(tf.compat.v1.train.SessionRunHook):
    """Requests a stop after `limit` steps, recording the global step of each."""

    def __init__(self, limit):
        self.limit = limit
        self.global_steps = []

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(tf.compat.v1.train.get_global_step())

    def after_run(self, run_context, run_values):
        self.global_steps.append(int(run_values.results))
        if len(self.global_steps) >= self.limit:
            run_context.request_stop()


def test_without_the_feed_hook_max_steps_beyond_the_real_batches_is_never_reached(tmp_path):
    # TPUEstimator(use_tpu=False) runs no feed hook, so only max_steps could
    # stop it, and padding steps do not advance the global step (README).
    estimator = tpu_estimator.TPUEstimator(
        _make_model_fn("adam", "wrap"),
        config=tpu_config.RunConfig(model_dir=str(tmp_path)),
        use_tpu=False,
        train_batch_size=BATCH,
    )
    stopper = _StopAfterRuns(12)
    estimator.train(lambda params: _input_fn(3)(), max_steps=5, hooks=[stopper])
    assert len(stopper.global_steps) == 12
    assert stopper.global_steps == [0, 1, 2] + [3] * 9  # read as each step runs
    assert estimator.get_variable_value("global_step") == 3
