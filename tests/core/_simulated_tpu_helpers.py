"""Shared pieces of the tests that build TPUEstimator's TPU graph on a simulated TPU system.

The 1 host x 8 cores and 2 hosts x 4 cores topologies, the `RunConfig` with our feed hook,
and one call that builds the graph (`simulated_tpu.build_tpu_training_graph`, which stops
right after the feed hook's `begin()`). Each test then asserts its own ops.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import pytest
from tensorflow_estimator.python.estimator.tpu import tpu_config

from monolith.core import simulated_tpu
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)

TOPOLOGIES = [(1, 8), (2, 4)]
TOPOLOGY_IDS = ["1x8", "2x4"]

#: Parametrizes a test over `num_hosts, cores_per_host` of both topologies.
topology = pytest.mark.parametrize("num_hosts, cores_per_host", TOPOLOGIES, ids=TOPOLOGY_IDS)


def simulated_run_config(
    model_dir: str,
    feed_hook: Optional[type] = TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
    **tpu_config_kwargs: Any,
) -> tpu_config.RunConfig:
    """A TPU `RunConfig` for the simulated system: PER_HOST_V2 input, 2 iterations per loop."""
    kwargs = dict(
        iterations_per_loop=2,
        tpu_job_name="worker",
        per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
        experimental_feed_hook=feed_hook,
    )
    kwargs.update(tpu_config_kwargs)
    return tpu_config.RunConfig(
        master=simulated_tpu.SIMULATED_MASTER,
        model_dir=str(model_dir),
        tpu_config=tpu_config.TPUConfig(**kwargs),
    )


def build_on_simulated_tpu(
    model_fn: Callable,
    input_fn: Callable,
    num_hosts: int,
    cores_per_host: int,
    *,
    model_dir: str,
    per_replica_batch: int,
    params: Optional[Mapping[str, Any]] = None,
    max_steps: int = 10,
    **tpu_config_kwargs: Any,
) -> simulated_tpu.TPUTrainingGraph:
    """Builds TPUEstimator's training graph for `num_hosts` x `cores_per_host` simulated cores."""
    config = simulated_run_config(model_dir, **tpu_config_kwargs)
    with simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host):
        return simulated_tpu.build_tpu_training_graph(
            model_fn,
            input_fn,
            config=config,
            train_batch_size=per_replica_batch * num_hosts * cores_per_host,
            params=params,
            max_steps=max_steps,
        )
