"""The hook inside a real TPUEstimator(use_tpu=True) training graph, built on CPU.

A simulated TPU system (`monolith.core.simulated_tpu`) lets TPUEstimator build
its full TPU training graph and construct and `begin()` the feed hook, which
`build_tpu_training_graph` stops right after, before any session would need a
TPU.
"""

from __future__ import annotations

import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_config

from monolith.core import simulated_tpu
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from tests.core._feed_hook_helpers import SIGNAL, counting_model_fn, padded_stream_fn

pytestmark = pytest.mark.timeout(120)

_PER_REPLICA_BATCH = 2


@pytest.mark.parametrize("num_hosts, cores_per_host", [(1, 8), (2, 4)], ids=["1x8", "2x4"])
def test_tpuestimator_builds_and_begins_the_hook(tmp_path, num_hosts, cores_per_host):
    num_replicas = num_hosts * cores_per_host
    config = tpu_config.RunConfig(
        master=simulated_tpu.SIMULATED_MASTER,
        model_dir=str(tmp_path),
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=2,
            tpu_job_name="worker",
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
            experimental_host_call_every_n_steps=1,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
        ),
    )
    with simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host):
        built = simulated_tpu.build_tpu_training_graph(
            lambda features, labels, mode, params: counting_model_fn(features, mode, params),
            lambda params: padded_stream_fn(4, batch=params["batch_size"])(),
            config=config,
            train_batch_size=_PER_REPLICA_BATCH * num_replicas,
            max_steps=10,
        )

    hook = built.feed_hook
    assert isinstance(hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
    assert len(built.hook_args) == 3  # ctx, enqueue_ops, dequeue_ops
    assert set(built.hook_kwargs) == {
        "tpu_compile_op",
        "run_infeed_loop_on_coordinator",
        "rendezvous",
        "master",
        "session_config",
        "tpu_init_ops",
        "outfeed_every_n_steps",
    }
    assert isinstance(built.hook_kwargs["rendezvous"], error_handling.ErrorRendezvous)
    assert built.hook_kwargs["master"] == simulated_tpu.SIMULATED_MASTER
    assert "CrossReplicaSum" in built.op_types()
    stopping = built.dequeue_ops[SIGNAL]["stopping"]
    assert stopping.dtype == tf.bool
    assert stopping.shape.as_list() == [num_replicas * _PER_REPLICA_BATCH]
    # begin() shares TPUEstimator's iterations_per_loop variable.
    assert built.graph.get_collection("tpu_estimator_iterations_per_loop") == [
        hook._iterations_per_loop_var
    ]
    assert hook._should_initialize_tpu
