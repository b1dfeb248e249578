"""The hook inside a real TPUEstimator(use_tpu=True) training graph, built on CPU.

A simulated TPU system (fake TPU devices returned by `_query_tpu_system_metadata`)
lets TPUEstimator build its full TPU training graph and construct and `begin()`
the feed hook; a hook subclass then raises a sentinel from `begin()`, before
any session would need a TPU.
"""

from __future__ import annotations

import pytest
import tensorflow as tf
from tensorflow.python.client import session as session_lib
from tensorflow.python.tpu import tpu_system_metadata
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_config, tpu_estimator

from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from tests.core._feed_hook_helpers import SIGNAL, counting_model_fn, padded_stream_fn

pytestmark = pytest.mark.timeout(120)

_MASTER = "grpc://127.0.0.1:8470"
_PER_REPLICA_BATCH = 2


class _Sentinel(Exception):
    """Stops TPUEstimator.train in the hook's begin(), before any session."""


def _fake_tpu_system(num_hosts, cores_per_host):
    def query(master_address, cluster_def=None, query_topology=False):
        devices = []
        for host in range(num_hosts):
            prefix = f"/job:worker/replica:0/task:{host}/device:"
            devices.append(session_lib._DeviceAttributes(prefix + "CPU:0", "CPU", 0, 0))
            for core in range(cores_per_host):
                devices.append(session_lib._DeviceAttributes(f"{prefix}TPU:{core}", "TPU", 0, 0))
            devices.append(
                session_lib._DeviceAttributes(prefix + "TPU_SYSTEM:0", "TPU_SYSTEM", 0, 0)
            )
        return tpu_system_metadata.TPUSystemMetadata(
            num_cores=num_hosts * cores_per_host,
            num_hosts=num_hosts,
            num_of_cores_per_host=cores_per_host,
            topology=None,
            devices=devices,
        )

    return query


def _op_types(graph):
    """Op types of the graph and of its function library (the TPU step lives there)."""
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


@pytest.mark.parametrize("num_hosts, cores_per_host", [(1, 8), (2, 4)], ids=["1x8", "2x4"])
def test_tpuestimator_builds_and_begins_the_hook(tmp_path, monkeypatch, num_hosts, cores_per_host):
    monkeypatch.setattr(
        tpu_system_metadata,
        "_query_tpu_system_metadata",
        _fake_tpu_system(num_hosts, cores_per_host),
    )
    seen = {}

    class ProbeHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
        def __init__(self, *args, **kwargs):
            seen["positional"] = len(args)
            seen["kwargs"] = kwargs
            super().__init__(*args, **kwargs)

        def begin(self):
            super().begin()
            graph = tf.compat.v1.get_default_graph()
            seen["op_types"] = _op_types(graph)
            seen["stopping"] = self._dequeue_ops[SIGNAL]["stopping"]
            seen["same_loop_var"] = graph.get_collection("tpu_estimator_iterations_per_loop") == [
                self._iterations_per_loop_var
            ]
            seen["initializes_tpu"] = self._should_initialize_tpu
            raise _Sentinel()

    num_replicas = num_hosts * cores_per_host
    config = tpu_config.RunConfig(
        master=_MASTER,
        model_dir=str(tmp_path),
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=2,
            tpu_job_name="worker",
            experimental_feed_hook=ProbeHook,
            experimental_host_call_every_n_steps=1,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
        ),
    )
    estimator = tpu_estimator.TPUEstimator(
        model_fn=lambda features, labels, mode, params: counting_model_fn(features, mode, params),
        config=config,
        use_tpu=True,
        train_batch_size=_PER_REPLICA_BATCH * num_replicas,
    )
    with pytest.raises(_Sentinel):
        estimator.train(
            lambda params: padded_stream_fn(4, batch=params["batch_size"])(), max_steps=10
        )

    assert seen["positional"] == 3  # ctx, enqueue_ops, dequeue_ops
    assert set(seen["kwargs"]) == {
        "tpu_compile_op",
        "run_infeed_loop_on_coordinator",
        "rendezvous",
        "master",
        "session_config",
        "tpu_init_ops",
        "outfeed_every_n_steps",
    }
    assert isinstance(seen["kwargs"]["rendezvous"], error_handling.ErrorRendezvous)
    assert seen["kwargs"]["master"] == _MASTER
    assert "CrossReplicaSum" in seen["op_types"]
    assert seen["stopping"].dtype == tf.bool
    assert seen["stopping"].shape.as_list() == [num_replicas * _PER_REPLICA_BATCH]
    assert seen["same_loop_var"] and seen["initializes_tpu"]
