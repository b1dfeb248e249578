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
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Iterator, List

from absl import logging
from tensorflow.python.distribute.cluster_resolver.tpu import (
    tpu_cluster_resolver as _resolver_lib,
)

#: Host `h` of the simulated system listens on 127.0.0.<h + 1>:8470 (loopback
#: addresses: nothing listens, nothing connects while graphs are only built).
SIMULATED_PORT = 8470


def simulated_host_address(host: int) -> str:
    """`ip:port` of simulated host `host` (host 0 is the master)."""
    return f"127.0.0.{host + 1}:{SIMULATED_PORT}"


class _SimulatedCloudTpuClient:
    """Stands in for `cloud_tpu_client.Client`: the API answers, not GCP."""

    def __init__(self, num_hosts: int, tpu: Any = None, **unused_kwargs: Any):
        self._num_hosts = num_hosts
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


@contextlib.contextmanager
def simulated_cluster_resolver(num_hosts: int, cores_per_host: int) -> Iterator[None]:
    """Makes `TPUClusterResolver` resolve any TPU name to a simulated system.

    Affects resolvers constructed inside the block (`tpu="local"` keeps its
    own meaning). Restored on exit, also on error.

    Args:
      num_hosts: Hosts of the simulated system (worker tasks), >= 1.
      cores_per_host: TPU cores per host, >= 1 (for `num_accelerators()`).

    Yields:
      None.
    """
    module_client = _resolver_lib.client
    fake_client = types.SimpleNamespace(
        Client=lambda **kwargs: _SimulatedCloudTpuClient(num_hosts, **kwargs)
    )
    resolver_class = _resolver_lib.TPUClusterResolver
    original_num_accelerators = resolver_class.num_accelerators

    def num_accelerators(self: Any, *args: Any, **kwargs: Any) -> Dict[str, int]:
        if isinstance(getattr(self, "_cloud_tpu_client", None), _SimulatedCloudTpuClient):
            return {"TPU": cores_per_host}
        return original_num_accelerators(self, *args, **kwargs)

    _resolver_lib.client = fake_client
    resolver_class.num_accelerators = num_accelerators
    logging.info("TPUClusterResolver resolves to a simulated system of %d host(s).", num_hosts)
    try:
        yield
    finally:
        resolver_class.num_accelerators = original_num_accelerators
        _resolver_lib.client = module_client
