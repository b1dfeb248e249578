"""The frozen options the emulator's builders and its session runner take."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import error_handling

from monolith.core.testing.topology import Topology


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything `build_emulated_training` needs besides `model_fn` and `input_fn`.

    Attributes:
      params: The caller's params (copied again for every `input_fn`/`model_fn` call).
      hook_class: The feed hook class.
      ctx: The context handed to the feed hook (a `FakeTPUContext` by default).
      rendezvous: The `ErrorRendezvous` given to the hook.
      run_infeed_loop_on_coordinator: One enqueue per step (True) or per loop.
      outfeed_every_n_steps: Outfeed on steps `i % n == 0` of each loop.
      tpu_init_ops: Extra init ops for the hook.
      tpu_compile_op: What the hook runs when TPU_SPLIT_COMPILE_AND_EXECUTE=1
        (None: a constant successful `CompilationResultProto`).
      master: Passed to the hook.
      session_config: Passed to the hook.
      hook_kwargs: Extra keyword arguments for `hook_class`.
      train_batch_size: TPUEstimator's `train_batch_size` (None: no
        `params["batch_size"]` is added).
      config: The `RunConfig` `input_fn`/`model_fn` receive as `config` (deep-copied).
      topology: The emulated pod: hosts, replicas per host and input mode.
    """

    params: Mapping[str, Any]
    hook_class: type
    ctx: Any
    rendezvous: error_handling.ErrorRendezvous
    run_infeed_loop_on_coordinator: bool = True
    outfeed_every_n_steps: int = 1
    tpu_init_ops: tuple = ()
    tpu_compile_op: Any = None
    master: Optional[str] = None
    session_config: Optional[tf.compat.v1.ConfigProto] = None
    hook_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_batch_size: Optional[int] = None
    config: Any = None
    topology: Topology = Topology()


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Everything `train` needs besides `model_fn` and `input_fn`.

    Attributes:
      build: The graph's options.
      model_dir: Checkpoint directory (restored from, saved to).
      iterations_per_loop: Steps per loop (int) or a "<n>s" duration.
      steps: Train at most this many more steps.
      max_steps: Train until this global step at most.
      hooks: The caller's hooks.
      save_checkpoints_steps: Also save every this many steps.
      save_checkpoints_secs: Also save every this many seconds.
      log_step_count_steps: Log loss/step and steps per second every this many
        loops (None: no logging hooks), as TPUEstimator does.
      on_loop_end: Called after every loop with `(global_step, loop_steps, loss)`.
    """

    build: BuildOptions
    model_dir: str
    iterations_per_loop: Union[int, str] = 2
    steps: Optional[int] = None
    max_steps: Optional[int] = None
    hooks: Sequence[tf.compat.v1.train.SessionRunHook] = ()
    save_checkpoints_steps: Optional[int] = None
    save_checkpoints_secs: Optional[float] = None
    log_step_count_steps: Optional[int] = None
    on_loop_end: Optional[Callable[[int, int, float], None]] = None
