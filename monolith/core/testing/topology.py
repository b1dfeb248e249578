"""The emulated pod: its hosts and replicas, and how TPUEstimator feeds them.

TPUEstimator's rules (tensorflow-estimator 2.15 `tpu_context.py` and
`tpu_estimator.py`), for `train_batch_size` B (global), H hosts and R
replicas per host (N = H * R replicas):

* PER_HOST_V2 (the default): `input_fn` is called once per host with
  `params["batch_size"]` B / N; each step takes R elements from each host's
  pipeline, one `get_next()` per replica of the host, in replica order.
* PER_HOST_V1: once per host with B / H; each step takes one element per
  host and splits it along axis 0 over the host's R replicas.
* BROADCAST: once (host 0) with B; each step takes one element and gives it
  whole to every replica of every host.

`params["batch_size"]` in the model_fn is B / N, and B under BROADCAST.
Replicas are numbered host by host: replica `h * R + i` is host h's i-th.
`current_input_fn_deployment()` gives `(host device, invocation index,
invocation count, replicas fed)`: `(device, h, H, R)` per host, and
`(device, 0, 1, N)` under BROADCAST.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from tensorflow_estimator.python.estimator.tpu import tpu_config

from monolith.core.common.validation import positive_int

__all__ = ["SUPPORTED_INPUT_MODES", "Topology", "make_topology"]

_Mode = tpu_config.InputPipelineConfig
SUPPORTED_INPUT_MODES = (_Mode.PER_HOST_V2, _Mode.PER_HOST_V1, _Mode.BROADCAST)
# InputPipelineConfig's values are plain ints; their names, for messages.
_MODE_NAMES = {
    _Mode.PER_SHARD_V1: "PER_SHARD_V1",
    _Mode.PER_HOST_V1: "PER_HOST_V1",
    _Mode.PER_HOST_V2: "PER_HOST_V2",
    _Mode.BROADCAST: "BROADCAST",
    _Mode.SLICED: "SLICED",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """`num_hosts` hosts of `replicas_per_host` replicas each, fed as `input_mode` says.

    Attributes:
      num_hosts: Hosts (TPUEstimator's `num_hosts`).
      replicas_per_host: Replicas per host (`num_of_replicas_per_host`).
      input_mode: `per_host_input_for_training`, one of `SUPPORTED_INPUT_MODES`.
    """

    num_hosts: int = 1
    replicas_per_host: int = 1
    input_mode: Any = _Mode.PER_HOST_V2

    @property
    def num_replicas(self) -> int:
        return self.num_hosts * self.replicas_per_host

    @property
    def input_mode_name(self) -> str:
        return _MODE_NAMES[self.input_mode]

    @property
    def broadcast(self) -> bool:
        return self.input_mode is _Mode.BROADCAST

    def host_of(self, replica: int) -> int:
        """The host whose input feeds `replica`."""
        return replica // self.replicas_per_host

    def replicas_of(self, host: int) -> range:
        """The replicas of `host`, in replica order."""
        return range(host * self.replicas_per_host, (host + 1) * self.replicas_per_host)

    @property
    def input_hosts(self) -> tuple:
        """The hosts whose input_fn TPUEstimator calls: every host, or host 0 under BROADCAST."""
        return (0,) if self.broadcast else tuple(range(self.num_hosts))

    @property
    def elements_per_step(self) -> int:
        """Elements one train step takes from each input pipeline (`skip_trained_batches`' rule)."""
        return self.replicas_per_host if self.input_mode is _Mode.PER_HOST_V2 else 1

    def input_fn_batch_size(self, global_batch_size: int) -> int:
        """`params["batch_size"]` in input_fn (`batch_size_for_input_fn`)."""
        if self.broadcast:
            return global_batch_size
        if self.input_mode is _Mode.PER_HOST_V2:
            return global_batch_size // self.num_replicas
        return global_batch_size // self.num_hosts

    def model_fn_batch_size(self, global_batch_size: int) -> int:
        """`params["batch_size"]` in model_fn (`batch_size_for_model_fn`): per replica."""
        if self.broadcast:
            return global_batch_size
        return global_batch_size // self.num_replicas

    def check_global_batch_size(self, train_batch_size: Optional[int]) -> None:
        """Raises as TPUEstimator does when the global batch does not split over the replicas."""
        if train_batch_size is None or self.broadcast:
            return
        if train_batch_size % self.num_replicas:
            raise ValueError(
                f"train_batch_size={train_batch_size!r} must be divisible by the number of "
                f"replicas, {self.num_replicas} ({self.num_hosts} hosts x "
                f"{self.replicas_per_host} replicas per host), as TPUEstimator requires "
                f"under {self.input_mode_name}."
            )


def make_topology(
    num_hosts: Any, replicas_per_host: Any, per_host_input_for_training: Any
) -> Topology:
    """Validates the emulated pod's arguments where they enter.

    `per_host_input_for_training` takes what `TPUConfig` takes: an
    `InputPipelineConfig` value, or the legacy True (PER_HOST_V1) and False
    (PER_SHARD_V1).

    Raises:
      TypeError: a count is not an int; `per_host_input_for_training` is not
        an `InputPipelineConfig` value or a bool.
      ValueError: a count is not positive; the input mode is PER_SHARD_V1
        (one input_fn per core) or SLICED, which the emulator does not emulate.
    """
    num_hosts = positive_int("num_hosts", num_hosts)
    replicas_per_host = positive_int("replicas_per_host", replicas_per_host)
    mode = per_host_input_for_training
    if isinstance(mode, bool):
        mode = _Mode.PER_HOST_V1 if mode else _Mode.PER_SHARD_V1
    elif type(mode) is not int or mode not in _MODE_NAMES:
        raise TypeError(
            f"per_host_input_for_training={per_host_input_for_training!r} must be a "
            "tpu_config.InputPipelineConfig value (PER_HOST_V2, PER_HOST_V1 or BROADCAST)."
        )
    if mode not in SUPPORTED_INPUT_MODES:
        raise ValueError(
            f"per_host_input_for_training={per_host_input_for_training!r} ({_MODE_NAMES[mode]}) "
            "is not emulated; use PER_HOST_V2, PER_HOST_V1 or BROADCAST."
        )
    # The module's own constant (InputPipelineConfig values are compared with `is`).
    mode = next(m for m in SUPPORTED_INPUT_MODES if m == mode)
    return Topology(num_hosts, replicas_per_host, mode)
