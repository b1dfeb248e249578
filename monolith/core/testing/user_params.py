"""What `input_fn` and `model_fn` receive, as TPUEstimator (use_tpu=True) passes it.

TPUEstimator adds to a deep copy of `params`:
* `input_fn`: `batch_size` (`batch_size_for_input_fn`: for one host with one
  replica, the global `train_batch_size`) and `context` (a `TPUContext` made
  for an input_fn: `current_input_fn_deployment()`, `current_host`);
* `model_fn`: `batch_size` (`batch_size_for_model_fn`: per replica, here also
  the global size), `use_tpu=True` and `context` (a `TPUContext` made for a
  model_fn).
Both get `config` (a deep copy of the RunConfig) if they take it. It rejects
`params` that already hold `batch_size` or `context`.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Mapping, Optional

from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_context

BATCH_SIZE_KEY = "batch_size"
CONTEXT_KEY = "context"
USE_TPU_KEY = "use_tpu"
_INPUT_DEVICE = "/device:CPU:0"


class EmulatedTPUSystem:
    """The `_InternalTPUContext` view behind the user's `params["context"]`.

    The emulator is one host with one replica fed PER_HOST_V2, whatever the
    `FakeTPUContext` tells the feed hook (which fakes model parallelism only to
    skip TPU initialisation).
    """

    num_hosts = 1
    num_replicas = 1
    num_of_replicas_per_host = 1
    model_parallelism_enabled = False
    device_assignment = None

    def __init__(self, config: Any):
        self.config = config

    def is_input_sharded_per_core(self) -> bool:
        return False

    def is_input_broadcast_with_iterators(self) -> bool:
        return False

    def is_replica_across_hosts(self) -> bool:
        return False

    def device_for_replica(self, replica_id: int) -> tuple:
        if replica_id != 0:
            raise ValueError(f"replica_id={replica_id!r}: the emulator has one replica (0).")
        return _INPUT_DEVICE, 0

    def tpu_host_placement_function(self, host_id: int = 0, **unused: Any) -> str:
        if host_id != 0:
            raise ValueError(f"host_id={host_id!r}: the emulator has one host (0).")
        return _INPUT_DEVICE


def default_run_config(model_dir: Optional[str], iterations_per_loop: Any, **kwargs: Any) -> Any:
    """The RunConfig a TPUEstimator would hold for this run (`log_step_count_steps` None)."""
    return tpu_config.RunConfig(
        model_dir=model_dir,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=iterations_per_loop,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
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
    params: Mapping[str, Any], train_batch_size: Optional[int], config: Any, *, for_input: bool
) -> dict:
    params = copy.deepcopy(dict(params))
    if train_batch_size is not None:
        params[BATCH_SIZE_KEY] = train_batch_size
    if not for_input:
        params[USE_TPU_KEY] = True
    params[CONTEXT_KEY] = tpu_context.TPUContext(
        internal_ctx=EmulatedTPUSystem(config),
        input_device=_INPUT_DEVICE if for_input else None,
        invocation_index=0 if for_input else None,
        call_from_input_fn=for_input,
        host_id=0 if for_input else None,
    )
    return params


def call_with_supported_args(fn: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """Calls `fn` with those of `available` it accepts (as Estimator calls model_fn)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


def call_input_fn(input_fn: Callable[..., Any], options: Any) -> Any:
    """Calls `input_fn` as TPUEstimator's `_call_input_fn` does (mode TRAIN)."""
    return call_with_supported_args(
        input_fn,
        {
            "params": _with_context(
                options.params, options.train_batch_size, options.config, for_input=True
            ),
            "config": copy.deepcopy(options.config),
            "mode": "train",
        },
    )


def call_model_fn(model_fn: Callable[..., Any], features: Any, labels: Any, options: Any) -> Any:
    """Calls `model_fn` as TPUEstimator's `_ModelFnWrapper` does (mode TRAIN)."""
    return call_with_supported_args(
        model_fn,
        {
            "features": features,
            "labels": labels,
            "mode": "train",
            "params": _with_context(
                options.params, options.train_batch_size, options.config, for_input=False
            ),
            "config": copy.deepcopy(options.config),
        },
    )
