"""What `input_fn` and `model_fn` receive, as TPUEstimator (use_tpu=True) passes it.

TPUEstimator adds to a deep copy of `params`:
* `input_fn` (called once per host, or once under BROADCAST; see
  `topology`): `batch_size` (`batch_size_for_input_fn`) and `context` (a
  `TPUContext` made for that call: `current_input_fn_deployment()`,
  `current_host`);
* `model_fn` (called once per replica here): `batch_size`
  (`batch_size_for_model_fn`, per replica), `use_tpu=True` and `context` (a
  `TPUContext` made for a model_fn).
Both get `config` (a deep copy of the RunConfig) if they take it. It rejects
`params` that already hold `batch_size` or `context`.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Mapping, Optional

from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_context

from monolith.core.testing.topology import Topology

BATCH_SIZE_KEY = "batch_size"
CONTEXT_KEY = "context"
USE_TPU_KEY = "use_tpu"
# Every emulated host is this process's CPU.
_INPUT_DEVICE = "/device:CPU:0"


class EmulatedTPUSystem:
    """The `_InternalTPUContext` view behind the user's `params["context"]`.

    It describes the emulated pod (`topology`) fed as `topology.input_mode`
    says, without model parallelism, whatever the `FakeTPUContext` tells the
    feed hook (which fakes model parallelism only to skip TPU initialisation).
    Every host's device is this process's CPU (`/device:CPU:0`).
    """

    model_parallelism_enabled = False
    device_assignment = None
    master_job = None

    def __init__(self, config: Any, topology: Topology):
        if config is None:
            config = tpu_config.RunConfig(
                tpu_config=tpu_config.TPUConfig(per_host_input_for_training=topology.input_mode)
            )
        self.config = config
        self._topology = topology

    @property
    def num_hosts(self) -> int:
        return self._topology.num_hosts

    @property
    def num_replicas(self) -> int:
        return self._topology.num_replicas

    @property
    def num_of_replicas_per_host(self) -> int:
        return self._topology.replicas_per_host

    def is_input_sharded_per_core(self) -> bool:
        return False

    def is_input_per_host_with_iterators(self) -> bool:
        return self._topology.input_mode is tpu_config.InputPipelineConfig.PER_HOST_V2

    def is_input_broadcast_with_iterators(self) -> bool:
        return self._topology.broadcast

    def is_replica_across_hosts(self) -> bool:
        return False

    def device_for_replica(self, replica_id: int) -> tuple:
        """(host device, ordinal of the replica on its host), as TPUEstimator numbers them."""
        if not 0 <= replica_id < self.num_replicas:
            raise ValueError(
                f"replica_id={replica_id!r}: the emulated pod has replicas "
                f"0..{self.num_replicas - 1}."
            )
        return _INPUT_DEVICE, replica_id % self._topology.replicas_per_host

    def tpu_host_placement_function(
        self, _sentinel: Any = None, replica_id: Optional[int] = None, host_id: Optional[int] = None
    ) -> str:
        if replica_id is not None:
            return self.device_for_replica(replica_id)[0]
        host_id = 0 if host_id is None else host_id
        if not 0 <= host_id < self.num_hosts:
            raise ValueError(
                f"host_id={host_id!r}: the emulated pod has hosts 0..{self.num_hosts - 1}."
            )
        return _INPUT_DEVICE


def default_run_config(
    model_dir: Optional[str],
    iterations_per_loop: Any,
    input_mode: Any = tpu_config.InputPipelineConfig.PER_HOST_V2,
    **kwargs: Any,
) -> Any:
    """The RunConfig a TPUEstimator would hold for this run (`log_step_count_steps` None)."""
    return tpu_config.RunConfig(
        model_dir=model_dir,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=iterations_per_loop,
            per_host_input_for_training=input_mode,
            experimental_host_call_every_n_steps=kwargs.pop("outfeed_every_n_steps", 1),
        ),
        **kwargs,
    ).replace(log_step_count_steps=None)


def check_params(params: Mapping[str, Any], train_batch_size: Optional[int]) -> None:
    """Rejects keys the emulator would overwrite, as TPUEstimator does."""
    reserved = [CONTEXT_KEY] + ([BATCH_SIZE_KEY] if train_batch_size is not None else [])
    clashes = [key for key in reserved if key in params]
    if clashes:
        raise ValueError(
            f"params={dict(params)!r} holds {clashes!r}, which the emulator sets (as "
            "TPUEstimator reserves them); pass the batch size as train_batch_size."
        )


def _with_context(
    params: Mapping[str, Any],
    batch_size: Optional[int],
    system: EmulatedTPUSystem,
    *,
    host: Optional[int],
) -> dict:
    """A deep copy of `params` with what TPUEstimator adds (input_fn when `host` is given)."""
    for_input = host is not None
    params = copy.deepcopy(dict(params))
    if batch_size is not None:
        params[BATCH_SIZE_KEY] = batch_size
    if not for_input:
        params[USE_TPU_KEY] = True
    params[CONTEXT_KEY] = tpu_context.TPUContext(
        internal_ctx=system,
        input_device=_INPUT_DEVICE if for_input else None,
        invocation_index=host,
        call_from_input_fn=for_input,
        host_id=host,
    )
    return params


def call_with_supported_args(fn: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """Calls `fn` with those of `available` it accepts (as Estimator calls model_fn)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


def _system(options: Any) -> EmulatedTPUSystem:
    return EmulatedTPUSystem(options.config, options.topology)


def call_input_fn(input_fn: Callable[..., Any], options: Any, host: int) -> Any:
    """Calls `input_fn` for `host` as TPUEstimator's `_call_input_fn` does (mode TRAIN)."""
    batch_size = options.train_batch_size
    if batch_size is not None:
        batch_size = options.topology.input_fn_batch_size(batch_size)
    return call_with_supported_args(
        input_fn,
        {
            "params": _with_context(options.params, batch_size, _system(options), host=host),
            "config": copy.deepcopy(options.config),
            "mode": "train",
        },
    )


def call_model_fn(model_fn: Callable[..., Any], features: Any, labels: Any, options: Any) -> Any:
    """Calls `model_fn` (for one replica) as TPUEstimator's `_ModelFnWrapper` does (mode TRAIN)."""
    batch_size = options.train_batch_size
    if batch_size is not None:
        batch_size = options.topology.model_fn_batch_size(batch_size)
    return call_with_supported_args(
        model_fn,
        {
            "features": features,
            "labels": labels,
            "mode": "train",
            "params": _with_context(options.params, batch_size, _system(options), host=None),
            "config": copy.deepcopy(options.config),
        },
    )
