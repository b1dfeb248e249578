"""`TPUClusterResolver` answered by a simulated TPU system, without GCP.

A `TPUClusterResolver(tpu=<name>, zone=..., project=...)` asks its Cloud TPU
client for the TPU's name and network endpoints (the Cloud TPU API, the GCE
metadata server and credentials). `simulated_cluster_resolver` replaces that
client, for resolvers constructed while it is active, with one that knows a
simulated system of `num_hosts` hosts: one endpoint per host, the first being
`SIMULATED_MASTER`'s address. So, unchanged, `resolver.master()` is the
simulated master, `resolver.cluster_spec()` lists one `worker` task per host
(scripts count hosts with `cluster_spec().num_tasks("worker")`) and
`RunConfig(cluster=resolver)` gives TPUEstimator the matching `cluster_def`.
`num_accelerators()` answers `{"TPU": cores_per_host}` instead of connecting to
the master.

Two attributes of TensorFlow are replaced while a simulation is active (each a
`common.scoped_patch.ScopedPatch`, reference-counted, restored on every exit):
the `Client` factory of the resolver's client module, for the thread that
entered `simulated_cluster_resolver` only (other threads construct TensorFlow's
own resolvers meanwhile), and `TPUClusterResolver.num_accelerators`, for every
thread but only for resolvers holding a simulated client: such a resolver
answers the same on any thread it is handed to, and no other resolver changes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

from absl import logging
from tensorflow.python.distribute.cluster_resolver.tpu import (
    tpu_cluster_resolver as _resolver_lib,
)

from monolith.core.common.scoped_patch import ScopedPatch

#: Host `h` of the simulated system listens on 127.0.0.<h + 1>:8470 (loopback
#: addresses: nothing listens, nothing connects while graphs are only built).
SIMULATED_PORT = 8470


def simulated_host_address(host: int) -> str:
    """`ip:port` of simulated host `host` (host 0 is the master)."""
    return f"127.0.0.{host + 1}:{SIMULATED_PORT}"


class _SimulatedCloudTpuClient:
    """Stands in for `cloud_tpu_client.Client`: the API answers, not GCP."""

    def __init__(self, num_hosts: int, cores_per_host: int, tpu: Any = None, **unused_kwargs: Any):
        self._num_hosts = num_hosts
        self.cores_per_host = cores_per_host
        self._tpu = tpu

    def name(self) -> str:
        return str(self._tpu or "simulated-tpu")

    def network_endpoints(self) -> List[Dict[str, Any]]:
        return [
            {"ipAddress": simulated_host_address(h).split(":")[0], "port": str(SIMULATED_PORT)}
            for h in range(self._num_hosts)
        ]

    def api_available(self) -> bool:
        # False: TPUEstimator then adds no CloudTPUPreemptedHook (which polls the API).
        return False

    def recoverable(self) -> bool:
        return True

    def state(self) -> str:
        return "READY"

    def health(self) -> str:
        return "HEALTHY"

    def get_local_ip(self) -> str:
        return "127.0.0.1"

    def enter(self) -> None:
        pass

    def exit(self, *unused_args: Any) -> None:
        pass


# `client` is the Cloud TPU client module the resolver module imported
# (`cloud_tpu_client.client`, or TensorFlow's copy of it).
_CLIENT = ScopedPatch(_resolver_lib.client, "Client")
_NUM_ACCELERATORS = ScopedPatch(_resolver_lib.TPUClusterResolver, "num_accelerators")


def _num_accelerators(resolver: Any, *args: Any, **kwargs: Any) -> Dict[str, int]:
    """`num_accelerators()` without connecting to the master, for a simulated resolver."""
    client = getattr(resolver, "_cloud_tpu_client", None)
    if isinstance(client, _SimulatedCloudTpuClient):
        return {"TPU": client.cores_per_host}
    return _NUM_ACCELERATORS.original()(resolver, *args, **kwargs)


@contextlib.contextmanager
def simulated_cluster_resolver(
    num_hosts: int, cores_per_host: int, *, all_threads: bool = False
) -> Iterator[None]:
    """Makes `TPUClusterResolver` resolve any TPU name to a simulated system.

    Affects resolvers constructed inside the block on this thread (on every
    thread with `all_threads`); `tpu="local"` keeps its own meaning. Restored
    on exit, also on error, once no other simulation is active.

    Args:
      num_hosts: Hosts of the simulated system (worker tasks), >= 1.
      cores_per_host: TPU cores per host, >= 1 (for `num_accelerators()`).
      all_threads: Act for every thread without a simulation of its own.

    Yields:
      None.
    """

    def client(**kwargs: Any) -> _SimulatedCloudTpuClient:
        return _SimulatedCloudTpuClient(num_hosts, cores_per_host, **kwargs)

    with (
        _CLIENT.scope(client, all_threads=all_threads),
        _NUM_ACCELERATORS.scope(_num_accelerators, all_threads=True),
    ):
        logging.info(
            "TPUClusterResolver resolves to a simulated system of %d host(s) for %s.",
            num_hosts,
            "every thread" if all_threads else "this thread",
        )
        yield
