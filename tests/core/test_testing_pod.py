"""monolith.core.testing as a pod: several hosts, several replicas per host.

What only several replicas exercise: the input deployment per host (compared
with a real TPUEstimator graph on the simulated 2x4 system), gradient
aggregation by `CrossShardOptimizer`, `cross_replica_sum` and its gradient,
the host call's replica concatenation, the stop decision over replicas and
the per-host batch counts of `TrainResult`.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import gen_tpu_ops
from tensorflow_estimator.python.estimator.tpu import tpu_config
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import TPUEstimatorSpec

from monolith.core import testing
from monolith.core.common.tpu_context import enclosing_tpu_context
from monolith.core.stopping_signals import skip_padding_steps
from tests.core._feed_hook_helpers import SIGNAL, counting_model_fn, read_counts
from tests.core._pod_helpers import BROADCAST, V1, V2, id_stream_fn
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu

pytestmark = pytest.mark.timeout(180)

PER_REPLICA = 2
modes = pytest.mark.parametrize("mode", [V2, V1, BROADCAST], ids=["v2", "v1", "broadcast"])


def _train(model_fn, input_fn, tmp_path, num_hosts, replicas_per_host, **kwargs):
    kwargs.setdefault("train_batch_size", PER_REPLICA * num_hosts * replicas_per_host)
    kwargs.setdefault("iterations_per_loop", 2)
    return testing.train(
        model_fn,
        input_fn,
        model_dir=str(tmp_path),
        num_hosts=num_hosts,
        replicas_per_host=replicas_per_host,
        log_step_count_steps=None,
        **kwargs,
    )


def _ids_host_call_model_fn(received):
    """The counting model; its host call collects each step's `[replicas, batch]` ids."""

    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)

        def host_fn(ids):
            return tf.compat.v1.py_func(
                lambda x: received.append(x.copy()) or np.int64(0), [ids], tf.int64
            )

        ids = tf.reshape(features["id"], [1, -1])
        return TPUEstimatorSpec(
            mode, loss=spec.loss, train_op=spec.train_op, host_call=(host_fn, [ids])
        )

    return model_fn


# -- input: the deployment of a real TPUEstimator graph -------------------------------------


def _node_defs(graph):
    """Every NodeDef of `graph`, by scope: the graph itself and each library function."""
    graph_def = graph.as_graph_def()
    scopes = [list(graph_def.node)] + [list(f.node_def) for f in graph_def.library.function]
    return [{node.name: node for node in scope} for scope in scopes]


def _task(device):
    return int(re.search(r"/task:(\d+)/", device).group(1))


def _tpu_feed_plan(graph, replicas_per_host):
    """Replica -> (input host, what it gets) in TPUEstimator's graph.

    What it gets: `("element", p)`, the p-th `get_next()` of the host's step
    (the infeed's IteratorGetNext ordered after p others), or `("slice", i)`,
    the i-th split of the host's single element.
    """
    plan = {}
    for nodes in _node_defs(graph):
        for node in nodes.values():
            if node.op != "InfeedEnqueueTuple":
                continue
            replica = _task(node.device) * replicas_per_host + node.attr["device_ordinal"].i
            source, *rest = node.input[0].split(":")
            producer = nodes[source]
            if producer.op == "IteratorGetNext":
                earlier = [
                    i
                    for i in producer.input
                    if i.startswith("^") and nodes[i[1:]].op == "IteratorGetNext"
                ]
                plan[replica] = (_task(producer.device), ("element", len(earlier)))
            else:
                assert producer.op == "Split", producer
                plan[replica] = (None, ("slice", int(rest[-1]) if rest else 0))
    return plan


def _host_elements(host, num_steps, mode, num_hosts, replicas_per_host):
    """The ids of each element `host`'s pipeline yields (the rule of `id_stream_fn`)."""
    per_step = replicas_per_host if mode is V2 else 1
    num_calls = 1 if mode is BROADCAST else num_hosts
    replicas = num_hosts * replicas_per_host
    batch = {
        V2: PER_REPLICA,
        V1: PER_REPLICA * replicas_per_host,
        BROADCAST: PER_REPLICA * replicas,
    }[mode]
    rows = batch * per_step
    ids = np.concatenate(
        [
            np.arange(s * rows * num_calls + host * rows, s * rows * num_calls + (host + 1) * rows)
            + 1
            for s in range(num_steps)
        ]
    )
    return ids.reshape(-1, batch)


def _recording(model_fn, seen):
    """`model_fn`, recording what its params say about the batch and the pod."""

    def recording_model_fn(features, mode, params):
        context = params["context"]
        seen.add((params["batch_size"], context.num_replicas, context.num_hosts))
        return model_fn(features, mode, params)

    return recording_model_fn


@modes
def test_each_replica_gets_what_a_tpuestimator_graph_feeds_it(tmp_path, mode):
    """2 hosts x 4 replicas: input_fn calls, their deployment and each replica's batches."""
    hosts, per_host, steps = 2, 4, 2
    estimator_calls, emulator_calls, received = [], [], []
    estimator_model, emulator_model = set(), set()
    built = build_on_simulated_tpu(
        _recording(counting_model_fn, estimator_model),
        id_stream_fn(steps, seen=estimator_calls),
        hosts,
        per_host,
        model_dir=str(tmp_path / "estimator"),
        per_replica_batch=PER_REPLICA,
        per_host_input_for_training=mode,
    )
    plan = _tpu_feed_plan(built.graph, per_host)
    _train(
        _recording(_ids_host_call_model_fn(received), emulator_model),
        id_stream_fn(steps, seen=emulator_calls),
        tmp_path / "emulator",
        hosts,
        per_host,
        per_host_input_for_training=mode,
        steps=steps,
    )
    assert emulator_calls == estimator_calls
    assert emulator_model == estimator_model == {(16 if mode is BROADCAST else PER_REPLICA, 8, 2)}
    assert [call["deployment"] for call in emulator_calls] == (
        [(0, 1, 8)] if mode is BROADCAST else [(0, 2, 4), (1, 2, 4)]
    )
    assert sorted(plan) == list(range(8))
    for step, ids in enumerate(received):
        for replica, replica_ids in enumerate(ids):  # BROADCAST: replica 0's only
            pipeline, (kind, index) = plan[replica]
            host = replica // per_host if pipeline is None else pipeline
            elements = _host_elements(host, steps, mode, hosts, per_host)
            if kind == "slice":
                expected = np.split(elements[step], per_host)[index]
            else:
                expected = elements[step * (per_host if mode is V2 else 1) + index]
            np.testing.assert_array_equal(
                replica_ids, expected, err_msg=f"step {step} replica {replica}"
            )
    assert len(received) == steps
    assert [ids.shape for ids in received] == [
        (1, 16) if mode is BROADCAST else (8, PER_REPLICA)
    ] * steps


# -- the step: gradients and collectives ----------------------------------------------------


DIM, LEARNING_RATE = 3, 0.1


def _linear_data(num_examples):
    rng = np.random.RandomState(7)
    return rng.normal(size=(num_examples, DIM)).astype(np.float32), rng.normal(
        size=num_examples
    ).astype(np.float32)


def _rows_input_fn(x, y, global_batch):
    """Each host's rows of every global batch (x, y), as TPUEstimator's deployment feeds them."""

    def input_fn(params, config):
        _, host, num_calls, fed = params["context"].current_input_fn_deployment()
        per_step = fed if config.tpu_config.per_host_input_for_training is V2 else 1
        rows = params["batch_size"] * per_step
        index = np.concatenate(
            [
                np.arange(s * global_batch + host * rows, s * global_batch + (host + 1) * rows)
                for s in range(len(y) // global_batch)
            ]
        )
        dataset = tf.data.Dataset.from_tensor_slices(({"x": x[index]}, y[index]))
        return dataset.batch(params["batch_size"], drop_remainder=True)

    return input_fn


def _linear_model_fn(features, labels, mode, params):
    w = tf.compat.v1.get_variable("w", [DIM], tf.float32, tf.compat.v1.zeros_initializer())
    loss = tf.reduce_mean(tf.square(tf.linalg.matvec(features["x"], w) - labels))
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
        tf.compat.v1.train.GradientDescentOptimizer(LEARNING_RATE)
    )
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


@pytest.mark.parametrize(
    "hosts, per_host, mode", [(2, 4, V2), (1, 8, V1)], ids=["2x4-per_host_v2", "1x8-per_host_v1"]
)
def test_cross_shard_optimizer_applies_the_data_parallel_update(tmp_path, hosts, per_host, mode):
    replicas, steps = hosts * per_host, 3
    global_batch = PER_REPLICA * replicas
    x, y = _linear_data(steps * global_batch)
    result = _train(
        _linear_model_fn,
        _rows_input_fn(x, y, global_batch),
        tmp_path,
        hosts,
        per_host,
        per_host_input_for_training=mode,
        steps=steps,
    )
    # An independent reference: each replica's MEAN-loss gradient on its
    # rows, averaged over replicas (CrossShardOptimizer's MEAN), applied once.
    w = np.zeros(DIM)
    for step in range(steps):
        gradients = []
        for replica in range(replicas):
            rows = slice(
                step * global_batch + replica * PER_REPLICA,
                step * global_batch + (replica + 1) * PER_REPLICA,
            )
            xs, ys = x[rows].astype(np.float64), y[rows].astype(np.float64)
            gradients.append(2 * xs.T @ (xs @ w - ys) / PER_REPLICA)
        w = w - LEARNING_RATE * np.mean(gradients, axis=0)
    trained = tf.train.load_checkpoint(result.final_checkpoint).get_tensor("w")
    np.testing.assert_allclose(trained, w, rtol=0, atol=1e-5)
    assert result.global_step == steps


def _collective_model_fn(features, mode, params):
    """Sums each replica's id total over replicas into a checkpointed counter."""
    spec = counting_model_fn(features, mode, params)
    total = tf.compat.v1.get_variable(
        "id_total", [], tf.float32, tf.compat.v1.zeros_initializer(), trainable=False
    )
    summed = tf.compat.v1.tpu.cross_replica_sum(tf.reduce_sum(features["id"]))
    return TPUEstimatorSpec(
        mode, loss=spec.loss, train_op=tf.group(spec.train_op, total.assign_add(summed))
    )


def test_cross_replica_sum_is_the_exact_sum_over_replicas(tmp_path):
    steps, replicas = 3, 4
    result = _train(_collective_model_fn, id_stream_fn(steps), tmp_path, 2, 2, steps=steps)
    reader = tf.train.load_checkpoint(result.final_checkpoint)
    # Only replica 0's update runs: the sum must hold every replica's ids.
    assert reader.get_tensor("id_total") == sum(range(1, steps * replicas * PER_REPLICA + 1))
    # Replica 0's own counter (no cross-replica sum): its ids only.
    assert read_counts(result.final_checkpoint)["id_sum"] == sum(
        sum(range(s * 8 + 1, s * 8 + PER_REPLICA + 1)) for s in range(steps)
    )


def _crs_gradient_model_fn(features, mode, params):
    w = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
    summed = tf.compat.v1.tpu.cross_replica_sum(w * tf.reduce_sum(features["id"]))
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
        tf.compat.v1.train.GradientDescentOptimizer(1e-3),
        reduction=tf.compat.v1.losses.Reduction.SUM,
    )
    train_op = optimizer.minimize(summed, global_step=tf.compat.v1.train.get_global_step())
    return TPUEstimatorSpec(mode, loss=summed, train_op=train_op)


def test_the_gradient_of_cross_replica_sum_is_the_cross_replica_sum_of_gradients(tmp_path):
    """As on TPU: each replica's gradient flows back summed, so the update is N times the sum."""
    replicas = 4
    result = _train(_crs_gradient_model_fn, id_stream_fn(1), tmp_path, 2, 2, steps=1)
    id_total = sum(range(1, replicas * PER_REPLICA + 1))
    w = tf.train.load_checkpoint(result.final_checkpoint).get_tensor("w")
    assert w == pytest.approx(1.0 - 1e-3 * replicas * id_total)


def _replica_value_host_call_model_fn(received):
    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        first_id = features["id"][:1]  # [1] per replica: [replicas] on the host

        def host_fn(first_id):
            return tf.compat.v1.py_func(
                lambda x: received.append(x.tolist()) or np.int64(0), [first_id], tf.int64
            )

        return TPUEstimatorSpec(
            mode, loss=spec.loss, train_op=spec.train_op, host_call=(host_fn, [first_id])
        )

    return model_fn


def test_host_call_gets_each_replicas_value_at_its_index(tmp_path):
    received, steps = [], 3
    _train(
        _replica_value_host_call_model_fn(received),
        id_stream_fn(steps),
        tmp_path,
        2,
        2,
        steps=steps,
    )
    global_batch = 4 * PER_REPLICA
    assert received == [
        [s * global_batch + r * PER_REPLICA + 1 for r in range(4)] for s in range(steps)
    ]


def test_every_replica_dequeues_on_steps_without_outfeed(tmp_path):
    """With the outfeed every 2 steps, step 2's batches are step 2's on every replica."""
    received, steps = [], 4
    _train(
        _replica_value_host_call_model_fn(received),
        id_stream_fn(steps),
        tmp_path,
        1,
        2,
        steps=steps,
        iterations_per_loop=4,
        outfeed_every_n_steps=2,
    )
    global_batch = 2 * PER_REPLICA
    assert received == [[s * global_batch + r * PER_REPLICA + 1 for r in range(2)] for s in (0, 2)]


def test_the_model_fn_sees_its_replica_in_enclosing_tpu_context_and_not_under_init_scope(tmp_path):
    inside, lifted = [], []

    def model_fn(features, mode, params):
        inside.append(enclosing_tpu_context())
        with tf.init_scope():
            lifted.append(enclosing_tpu_context())
        return counting_model_fn(features, mode, params)

    _train(model_fn, id_stream_fn(1), tmp_path, 2, 2, steps=1)
    assert [context.replica_id for context in inside] == [0, 1, 2, 3]
    assert lifted == [None] * 4
    assert enclosing_tpu_context() is None


# -- end of stream and per-host counts ------------------------------------------------------


def _pod_counting_model_fn(features, mode, params):
    """Counts real examples over replicas; skip_padding_steps around CrossShardOptimizer.

    CrossShardOptimizer's gradient sum then sits inside skip_padding_steps'
    conditional, as the README allows.
    """
    real = 1.0 - tf.cast(features[SIGNAL], tf.float32)
    examples = tf.compat.v1.get_variable(
        "real_examples", [], tf.float32, tf.compat.v1.zeros_initializer(), trainable=False
    )
    weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
    loss = tf.reduce_sum(features["id"] * real) * weight * 1e-3
    optimizer = skip_padding_steps(
        tf.compat.v1.tpu.CrossShardOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1)),
        features,
    )
    minimize = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    counted = examples.assign_add(tf.compat.v1.tpu.cross_replica_sum(tf.reduce_sum(real)))
    return TPUEstimatorSpec(mode, loss=loss, train_op=tf.group(minimize, counted))


def test_the_hook_stops_a_2x4_pod_at_the_end_of_equal_shards(tmp_path):
    steps = 3  # real steps: the stream ends inside loop 2 (steps 3-4)
    result = _train(_pod_counting_model_fn, id_stream_fn(steps), tmp_path, 2, 4)
    assert result.stopped_at_end_of_stream
    assert (result.steps_run, result.global_step) == (4, steps)
    # Each host fed 4 real batches per real step, then the padding step's 4.
    assert result.real_batches == (4 * steps, 4 * steps)
    assert result.padding_batches == (4, 4)
    reader = tf.train.load_checkpoint(result.final_checkpoint)
    assert reader.get_tensor("real_examples") == steps * 8 * PER_REPLICA


def test_a_step_where_one_host_pads_stops_training_and_trains_nothing(tmp_path):
    """Host 1's shard ends a step before host 0's: the stop flag and the skip are pod-wide."""
    result = _train(
        _pod_counting_model_fn, id_stream_fn([3, 2]), tmp_path, 2, 2, iterations_per_loop=1
    )
    # Step 3: host 0 real, host 1 padding. Replica 0 (host 0) holds real data,
    # yet its update is skipped and the hook stops after that step.
    assert result.stopped_at_end_of_stream
    assert (result.steps_run, result.global_step) == (3, 2)
    assert result.real_batches == (6, 4)
    assert result.padding_batches == (0, 2)


def test_per_host_input_v1_and_broadcast_count_one_batch_per_step_of_their_pipeline(tmp_path):
    v1 = _train(
        _pod_counting_model_fn,
        id_stream_fn(2),
        tmp_path / "v1",
        2,
        2,
        per_host_input_for_training=V1,
    )
    assert (v1.real_batches, v1.padding_batches) == ((2, 2), (2, 2))
    broadcast = _train(
        _pod_counting_model_fn,
        id_stream_fn(2),
        tmp_path / "broadcast",
        2,
        2,
        per_host_input_for_training=BROADCAST,
    )
    assert (broadcast.real_batches, broadcast.padding_batches) == ((2, 0), (2, 0))


def test_one_host_with_one_replica_counts_its_batches(tmp_path):
    result = _train(counting_model_fn, id_stream_fn(3), tmp_path, 1, 1)
    assert (result.real_batches, result.padding_batches) == ((3,), (1,))


# -- variables -------------------------------------------------------------------------------


def _adam_model_fn(features, mode, params):
    with tf.compat.v1.variable_scope("dense"):
        weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
    with tf.compat.v1.name_scope("tower"):
        scale = tf.compat.v1.Variable(1.0, name="scale", use_resource=True)
    loss = tf.reduce_mean(tf.square(features["id"] * weight * scale - 1.0))
    optimizer = skip_padding_steps(
        tf.compat.v1.tpu.CrossShardOptimizer(tf.compat.v1.train.AdamOptimizer(0.01)), features
    )
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


def test_a_pods_checkpoint_holds_one_copy_of_each_variable(tmp_path):
    names = []
    for hosts, per_host in [(1, 1), (2, 2)]:
        result = _train(
            _adam_model_fn,
            id_stream_fn(2),
            tmp_path / f"{hosts}x{per_host}",
            hosts,
            per_host,
            steps=2,
        )
        names.append(sorted(name for name, _ in tf.train.list_variables(result.final_checkpoint)))
    assert names[1] == names[0]
    assert {"beta1_power", "dense/w/Adam", "tower/scale/Adam_1"} <= set(names[1])


@pytest.mark.parametrize("how", ["get_variable", "Variable"])
def test_replicas_creating_different_variables_are_rejected(tmp_path, how):
    calls = []

    def model_fn(features, mode, params):
        calls.append(1)
        if len(calls) > 1:  # replica 1 creates one more variable than replica 0
            if how == "get_variable":
                tf.compat.v1.get_variable("extra", [], tf.float32)
            else:
                tf.compat.v1.Variable(0.0, name="extra")
        return counting_model_fn(features, mode, params)

    with pytest.raises(ValueError, match="same variables on every replica"):
        _train(model_fn, id_stream_fn(1), tmp_path, 1, 2, steps=1)


def test_a_sum_of_a_value_made_inside_a_conditional_is_rejected(tmp_path):
    def model_fn(features, mode, params):
        spec = counting_model_fn(features, mode, params)
        summed = tf.cond(
            features[SIGNAL][0],
            lambda: tf.constant(0.0),
            lambda: tf.compat.v1.tpu.cross_replica_sum(tf.reduce_sum(features["id"]) * 2.0),
        )
        return TPUEstimatorSpec(mode, loss=spec.loss + summed, train_op=spec.train_op)

    with pytest.raises(ValueError, match="compute the value before the conditional"):
        _train(model_fn, id_stream_fn(1), tmp_path, 1, 2, steps=1)


# -- arguments and the scoped patch ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_hosts": 0}, ValueError, "num_hosts=0"),
        ({"replicas_per_host": 1.5}, TypeError, "replicas_per_host=1.5"),
        ({"per_host_input_for_training": "v2"}, TypeError, "per_host_input_for_training='v2'"),
        (
            {"per_host_input_for_training": tpu_config.InputPipelineConfig.PER_SHARD_V1},
            ValueError,
            r"\(PER_SHARD_V1\) is not emulated",
        ),
        ({"per_host_input_for_training": False}, ValueError, "False .PER_SHARD_V1. is not"),
        (
            {"replicas_per_host": 3, "train_batch_size": 4},
            ValueError,
            "train_batch_size=4 must be divisible",
        ),
    ],
)
def test_bad_pod_arguments_are_rejected_naming_them(tmp_path, kwargs, error, message):
    kwargs = {"num_hosts": 1, "replicas_per_host": 2, **kwargs}
    with pytest.raises(error, match=message):
        _train(
            counting_model_fn,
            id_stream_fn(1),
            tmp_path,
            kwargs.pop("num_hosts"),
            kwargs.pop("replicas_per_host"),
            **kwargs,
        )


@pytest.mark.parametrize("mode, pipelines", [(V2, 2), (V1, 2), (BROADCAST, 1)])
def test_one_hook_gets_every_hosts_enqueue_ops_and_every_replicas_stop_flag(mode, pipelines):
    with tf.Graph().as_default():
        built = testing.build_emulated_training(
            counting_model_fn,
            id_stream_fn(1),
            train_batch_size=8 if mode is BROADCAST else 4 * PER_REPLICA,
            num_hosts=2,
            replicas_per_host=2,
            per_host_input_for_training=mode,
            config=tpu_config.RunConfig(
                tpu_config=tpu_config.TPUConfig(per_host_input_for_training=mode)
            ),
        )
        assert len(built.enqueue_ops) == pipelines
        # Concatenated over the 4 replicas (BROADCAST: replica 0's, as TPUEstimator).
        stopping = built.dequeue_ops[SIGNAL]["stopping"]
        assert stopping.shape.as_list() == [8 if mode is BROADCAST else 4 * PER_REPLICA]
        assert (built.num_hosts, built.replicas_per_host) == (2, 2)


def test_fake_context_reports_the_pods_shape():
    ctx = testing.FakeTPUContext(num_hosts=2, replicas_per_host=4)
    assert (ctx.num_hosts, ctx.num_of_replicas_per_host, ctx.num_replicas) == (2, 4, 8)


def test_cross_replica_sum_is_tfs_own_op_outside_the_building_thread_and_after_training(tmp_path):
    building, release, seen = threading.Event(), threading.Event(), []
    original = gen_tpu_ops.cross_replica_sum

    def model_fn(features, mode, params):
        building.set()
        release.wait(60)
        return counting_model_fn(features, mode, params)

    def other_thread_sum():
        building.wait(60)
        with tf.Graph().as_default():
            seen.append(tf.compat.v1.tpu.cross_replica_sum(tf.constant([1.0]), [[0]]).op.type)
        release.set()

    thread = threading.Thread(target=other_thread_sum)
    thread.start()
    _train(model_fn, id_stream_fn(1), tmp_path, 1, 2, steps=1)
    thread.join(60)
    assert seen == ["CrossReplicaSum"]
    assert gen_tpu_ops.cross_replica_sum is original
