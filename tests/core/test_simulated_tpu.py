"""monolith.core.simulated_tpu: the simulated TPU system and the graph-only TPUEstimator run."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import types

import pytest
import tensorflow as tf
from tensorflow.python.tpu import device_assignment as device_assignment_lib
from tensorflow.python.tpu import tpu_system_metadata
from tensorflow_estimator.python.estimator import run_config as run_config_lib
from tensorflow_estimator.python.estimator.tpu import tpu_context, tpu_estimator

from monolith.core import simulated_tpu
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from tests.core._simulated_tpu_helpers import (
    on_other_thread,
    patched_tensorflow_attributes,
    simulated_run_config,
    topology,
)

pytestmark = pytest.mark.timeout(120)

_PER_REPLICA_BATCH = 2


def _input_fn(params):
    batch = params["batch_size"]
    return (
        tf.data.Dataset.range(batch * 4)
        .map(lambda i: ({"x": tf.cast(tf.reshape(i, [1]), tf.float32)}, tf.ones([], tf.float32)))
        .batch(batch, drop_remainder=True)
    )


def _model_fn(features, labels, mode, params):
    weight = tf.compat.v1.get_variable("w", [1, 1], tf.float32)
    loss = tf.reduce_mean(tf.square(tf.matmul(features["x"], weight)[:, 0] - labels))
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
        tf.compat.v1.train.GradientDescentOptimizer(0.1)
    )
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tpu_estimator.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


class _LastHostInputFnCalled(Exception):
    """Stops `TPUEstimator.train` in the last host's input_fn, before the model is built."""


def _input_fn_contexts(estimator):
    """What the `TPUContext` in `params["context"]` tells each host's input_fn.

    (num_hosts, num_replicas, current_input_fn_deployment(), the last replica's
    device) per input_fn call; `train` is stopped in the last host's call.
    """
    seen = []

    def input_fn(params):
        context = params["context"]
        deployment = context.current_input_fn_deployment()
        last_replica = context.device_for_replica(context.num_replicas - 1)
        seen.append((context.num_hosts, context.num_replicas, deployment, last_replica))
        if deployment[1] == deployment[2] - 1:  # invocation index, invocations
            raise _LastHostInputFnCalled()
        return _input_fn(params)

    with pytest.raises(_LastHostInputFnCalled):
        estimator.train(input_fn, max_steps=1)
    return seen


def _device_names(metadata):
    return {device.name for device in metadata.devices}


@topology
def test_metadata_lists_tpu_cpu_and_system_devices_of_every_host(num_hosts, cores_per_host):
    metadata = simulated_tpu.simulated_tpu_metadata(num_hosts, cores_per_host, job="worker")

    assert (metadata.num_cores, metadata.num_hosts, metadata.num_of_cores_per_host) == (
        num_hosts * cores_per_host,
        num_hosts,
        cores_per_host,
    )
    assert metadata.topology is None
    expected = set()
    for host in range(num_hosts):
        prefix = f"/job:worker/replica:0/task:{host}/device:"
        expected |= {prefix + "CPU:0", prefix + "TPU_SYSTEM:0"}
        expected |= {f"{prefix}TPU:{core}" for core in range(cores_per_host)}
    assert _device_names(metadata) == expected
    assert len(metadata.devices) == len(expected)
    tpu_types = [d.device_type for d in metadata.devices if "/device:TPU:" in d.name]
    assert tpu_types == ["TPU"] * num_hosts * cores_per_host


def test_metadata_names_devices_after_the_job():
    metadata = simulated_tpu.simulated_tpu_metadata(1, 2, job="tpu_worker")

    assert all(name.startswith("/job:tpu_worker/") for name in _device_names(metadata))


@topology
def test_metadata_topology_supports_model_parallel_device_assignment(num_hosts, cores_per_host):
    metadata = simulated_tpu.simulated_tpu_metadata(num_hosts, cores_per_host, with_topology=True)
    num_replicas = num_hosts * cores_per_host // 2

    assignment = device_assignment_lib.device_assignment(
        metadata.topology, computation_shape=[1, 1, 1, 2], num_replicas=num_replicas
    )

    assert (assignment.num_replicas, assignment.num_cores_per_replica) == (num_replicas, 2)
    cores = {
        assignment.tpu_device(replica, logical_core, job="worker")
        for replica in range(num_replicas)
        for logical_core in range(2)
    }
    assert cores == {
        f"/job:worker/task:{h}/device:TPU:{d}"
        for h in range(num_hosts)
        for d in range(cores_per_host)
    }


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"num_hosts": 0}, ValueError, "num_hosts=0"),
        ({"num_hosts": "2"}, TypeError, "num_hosts='2'"),
        ({"cores_per_host": True}, TypeError, "cores_per_host=True"),
        ({"cores_per_host": -8}, ValueError, "cores_per_host=-8"),
        ({"job": ""}, ValueError, "job=''"),
        ({"job": "a/b"}, ValueError, "job='a/b'"),
        ({"job": 3}, TypeError, "job=3"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        simulated_tpu.simulated_tpu_metadata(**kwargs)
    with pytest.raises(error, match=argument), simulated_tpu.simulated_tpu_system(**kwargs):
        pass
    assert patched_tensorflow_attributes() == []


@topology
def test_system_answers_tensorflows_query_without_contacting_the_master(num_hosts, cores_per_host):
    with simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host) as metadata:
        # tpu_context calls it through the module, as tpu_system_metadata_lib._query...
        answer = tpu_context.tpu_system_metadata_lib._query_tpu_system_metadata(
            "grpc://10.0.0.1:8470", cluster_def=None, query_topology=False
        )
        with_topology = tpu_system_metadata._query_tpu_system_metadata(
            simulated_tpu.SIMULATED_MASTER, query_topology=True
        )

    assert answer is metadata
    assert answer.num_cores == num_hosts * cores_per_host
    assert with_topology.topology is not None
    assert with_topology.topology.num_tasks == num_hosts
    assert with_topology.topology.num_tpus_per_task == cores_per_host


def test_system_patches_modules_that_imported_the_query_by_name(monkeypatch):
    original = tpu_system_metadata._query_tpu_system_metadata
    user_module = types.ModuleType("user_tpu_module_for_test")
    user_module._query_tpu_system_metadata = original
    monkeypatch.setitem(sys.modules, user_module.__name__, user_module)

    with simulated_tpu.simulated_tpu_system(2, 4) as metadata:
        assert user_module._query_tpu_system_metadata("grpc://x:1") is metadata

    assert user_module._query_tpu_system_metadata is original


class _LazyModule(types.ModuleType):
    """Like TensorFlow's LazyLoader: any attribute lookup would import something."""

    def __getattr__(self, name):
        raise ImportError(f"lazy module loaded for {name!r}")


def test_system_does_not_load_lazily_loaded_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "lazy_module_for_test", _LazyModule("lazy_module_for_test"))

    with simulated_tpu.simulated_tpu_system(1, 2) as metadata:
        assert tpu_system_metadata._query_tpu_system_metadata("grpc://x:1") is metadata


def test_system_patch_is_undone_on_exit_and_on_error():
    with simulated_tpu.simulated_tpu_system() as metadata:
        assert tpu_system_metadata._query_tpu_system_metadata("grpc://x:1") is metadata
    assert patched_tensorflow_attributes() == []

    with pytest.raises(KeyError, match="boom"), simulated_tpu.simulated_tpu_system():
        raise KeyError("boom")
    assert patched_tensorflow_attributes() == []


def test_nested_systems_answer_innermost_and_restore_in_order():
    with simulated_tpu.simulated_tpu_system(1, 8) as outer:
        with simulated_tpu.simulated_tpu_system(2, 4) as inner:
            assert tpu_system_metadata._query_tpu_system_metadata("grpc://x:1") is inner
        assert tpu_system_metadata._query_tpu_system_metadata("grpc://x:1") is outer

    assert patched_tensorflow_attributes() == []


@topology
def test_tpuestimator_context_sees_the_simulated_hosts_and_cores(
    tmp_path, num_hosts, cores_per_host
):
    estimator = tpu_estimator.TPUEstimator(
        model_fn=_model_fn,
        config=simulated_run_config(tmp_path),
        use_tpu=True,
        train_batch_size=_PER_REPLICA_BATCH * num_hosts * cores_per_host,
    )

    with simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host):
        seen = _input_fn_contexts(estimator)

    num_replicas = num_hosts * cores_per_host
    last_host = f"/job:worker/task:{num_hosts - 1}/device:CPU:0"
    # One input_fn call per host (PER_HOST_V2), placed on that host's CPU.
    assert seen == [
        (
            num_hosts,
            num_replicas,
            (f"/job:worker/task:{host}/device:CPU:0", host, num_hosts, cores_per_host),
            (last_host, cores_per_host - 1),
        )
        for host in range(num_hosts)
    ]


def test_system_answers_only_the_thread_that_entered_it():
    def query():
        return tpu_system_metadata._query_tpu_system_metadata("")

    with simulated_tpu.simulated_tpu_system(2, 4) as metadata:
        here = query()
        elsewhere = on_other_thread(query)

    assert here is metadata
    # TensorFlow's own answer for the local master: this CPU has no TPU core.
    assert elsewhere.num_cores == 0


def test_system_for_all_threads_answers_every_thread():
    def query():
        return tpu_system_metadata._query_tpu_system_metadata("")

    with simulated_tpu.simulated_tpu_system(1, 2, all_threads=True) as metadata:
        assert on_other_thread(query) is metadata
        with simulated_tpu.simulated_tpu_system(2, 4) as own:
            assert query() is own  # a thread's own simulation comes first
            assert on_other_thread(query) is metadata

    assert patched_tensorflow_attributes() == []


def test_two_threads_build_graphs_for_their_own_systems_at_once(tmp_path):
    both_building = threading.Barrier(2, timeout=60)

    def model_fn(features, labels, mode, params):
        both_building.wait()  # each thread is inside its simulation and its build
        return _model_fn(features, labels, mode, params)

    def build(num_hosts, cores_per_host):
        with simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host):
            return simulated_tpu.build_tpu_training_graph(
                model_fn,
                _input_fn,
                config=simulated_run_config(tmp_path / f"{num_hosts}x{cores_per_host}"),
                train_batch_size=_PER_REPLICA_BATCH * num_hosts * cores_per_host,
            )

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        one_host = pool.submit(build, 1, 2)
        two_hosts = pool.submit(build, 2, 2)
        built = {2: one_host.result(timeout=120), 4: two_hosts.result(timeout=120)}

    for num_replicas, graph in built.items():
        assert isinstance(graph.feed_hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
        assert graph.ctx.num_replicas == num_replicas
        (metadata_op,) = [
            op for op in graph.graph.get_operations() if op.type == "TPUReplicateMetadata"
        ]
        assert metadata_op.get_attr("num_replicas") == num_replicas
    assert built[2].ctx.num_hosts == 1 and built[4].ctx.num_hosts == 2
    assert patched_tensorflow_attributes() == []


def test_build_with_model_parallelism_uses_the_simulated_topology(tmp_path):
    config = simulated_run_config(tmp_path, feed_hook=None)
    config = config.replace(tpu_config=config.tpu_config._replace(num_cores_per_replica=2))

    with simulated_tpu.simulated_tpu_system(2, 4):
        built = simulated_tpu.build_tpu_training_graph(
            _model_fn, _input_fn, config=config, train_batch_size=4 * _PER_REPLICA_BATCH
        )

    assert built.ctx.device_assignment.num_replicas == 4
    (metadata_op,) = [
        op for op in built.graph.get_operations() if op.type == "TPUReplicateMetadata"
    ]
    assert metadata_op.get_attr("num_replicas") == 4
    assert metadata_op.get_attr("num_cores_per_replica") == 2


def test_build_without_configured_feed_hook_uses_tpuestimators_stock_hook(tmp_path):
    with simulated_tpu.simulated_tpu_system(1, 2):
        built = simulated_tpu.build_tpu_training_graph(
            _model_fn,
            _input_fn,
            config=simulated_run_config(tmp_path, feed_hook=None),
            train_batch_size=4,
        )

    assert isinstance(built.feed_hook, tpu_estimator.TPUInfeedOutfeedSessionHook)
    assert not isinstance(built.feed_hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
    assert "CrossReplicaSum" in built.op_types()  # the optimizer's, no stopping signal
    assert "host_call" in built.dequeue_ops


def test_build_raises_when_training_is_already_done(tmp_path):
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.create_global_step()
        with tf.compat.v1.Session() as session:
            session.run(global_step.assign(5))
            tf.compat.v1.train.Saver().save(
                session, str(tmp_path / "model.ckpt"), global_step=global_step
            )

    with simulated_tpu.simulated_tpu_system(1, 2), pytest.raises(RuntimeError, match="max_steps=5"):
        simulated_tpu.build_tpu_training_graph(
            _model_fn,
            _input_fn,
            config=simulated_run_config(tmp_path),
            train_batch_size=4,
            max_steps=5,
        )


def test_build_rejects_a_non_tpu_config_and_use_tpu_false(tmp_path):
    with pytest.raises(TypeError, match="config="):
        simulated_tpu.build_tpu_training_graph(
            _model_fn, _input_fn, config=run_config_lib.RunConfig(), train_batch_size=4
        )
    with pytest.raises(ValueError, match="use_tpu=False"):
        simulated_tpu.build_tpu_training_graph(
            _model_fn,
            _input_fn,
            config=simulated_run_config(tmp_path),
            train_batch_size=4,
            use_tpu=False,
        )


def test_graph_op_types_include_ops_inside_library_functions():
    @tf.function
    def inner(x):
        return tf.math.cumsum(x)

    with tf.Graph().as_default() as graph:
        inner(tf.constant([1.0, 2.0]))

    assert "Cumsum" not in {op.type for op in graph.get_operations()}
    assert "Cumsum" in simulated_tpu.graph_op_types(graph)


def test_build_surfaces_a_model_fn_error_unchanged(tmp_path):
    def broken_model_fn(features, labels, mode, params):
        raise ValueError("model_fn refuses to build")

    with simulated_tpu.simulated_tpu_system(1, 2), pytest.raises(ValueError, match="refuses"):
        simulated_tpu.build_tpu_training_graph(
            broken_model_fn, _input_fn, config=simulated_run_config(tmp_path), train_batch_size=4
        )
    assert patched_tensorflow_attributes() == []  # restored on the error path too


def test_build_leaves_sessions_and_the_feed_hook_setting_as_they_were(tmp_path):
    config = simulated_run_config(tmp_path)

    with simulated_tpu.simulated_tpu_system(1, 2):
        built = simulated_tpu.build_tpu_training_graph(
            _model_fn, _input_fn, config=config, train_batch_size=4
        )

    assert patched_tensorflow_attributes() == []
    # The user's config is not rewritten: the recording hook class is handed
    # to TPUEstimator only while it builds.
    assert config.tpu_config.experimental_feed_hook is (
        TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook
    )
    assert type(built.feed_hook) is not TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook
    with tf.compat.v1.Session(graph=tf.Graph()):  # local sessions were never blocked
        pass
    # Nor is a session against the TPU master any more (created lazily: nothing connects).
    tf.compat.v1.Session(simulated_tpu.SIMULATED_MASTER, graph=tf.Graph()).close()
