"""Shared pieces of the tests that build TPUEstimator's TPU graph on a simulated TPU system.

The 1 host x 8 cores and 2 hosts x 4 cores topologies, the `RunConfig` with our feed hook,
and one call that builds the graph (`simulated_tpu.build_tpu_training_graph`, which stops
right after the feed hook's `begin()`). Each test then asserts its own ops.
`patched_tensorflow_attributes()` names what the simulation left replaced in TensorFlow,
and `on_other_thread(fn)` runs `fn` where no simulation of the test's thread acts.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Mapping, Optional

import pytest
from tensorflow.python.client import session as session_lib
from tensorflow.python.distribute.cluster_resolver.tpu import tpu_cluster_resolver
from tensorflow.python.tpu import tpu_system_metadata
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_context, tpu_estimator

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


# What the simulated TPU replaces in TensorFlow while it is active, as it was
# when the tests were collected (no simulation was active then).
_TENSORFLOW_ATTRIBUTES = {
    "BaseSession.__init__": (session_lib.BaseSession, "__init__"),
    "_InternalTPUContext.feed_hook": (tpu_context._InternalTPUContext, "feed_hook"),
    "_OutfeedHostCall.record": (tpu_estimator._OutfeedHostCall, "record"),
    "tpu_system_metadata._query_tpu_system_metadata": (
        tpu_system_metadata,
        "_query_tpu_system_metadata",
    ),
    "TPUClusterResolver.num_accelerators": (
        tpu_cluster_resolver.TPUClusterResolver,
        "num_accelerators",
    ),
    "cloud TPU client.Client": (tpu_cluster_resolver.client, "Client"),
}
_ORIGINALS = {name: vars(owner)[attr] for name, (owner, attr) in _TENSORFLOW_ATTRIBUTES.items()}


def patched_tensorflow_attributes() -> List[str]:
    """The TensorFlow attributes that are not what they were before any simulation (sorted)."""
    return sorted(
        name
        for name, (owner, attr) in _TENSORFLOW_ATTRIBUTES.items()
        if vars(owner).get(attr) is not _ORIGINALS[name]
    )


def on_other_thread(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """`fn()` run on a new thread: its result, or its exception re-raised here."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed back to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="other-thread")
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn!r} still running after {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
