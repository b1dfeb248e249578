"""The emulator's public entry points: `build_emulated_training`, `train` (see the package)."""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_config

from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.common.model_dir import check_model_dir
from monolith.core.common.validation import positive_int
from monolith.core.testing import graph as _graph
from monolith.core.testing import runner as _session
from monolith.core.testing import user_params as _user_params
from monolith.core.testing.fake_context import FakeTPUContext
from monolith.core.testing.options import BuildOptions, RunOptions
from monolith.core.testing.results import EmulatedTPUTraining, TrainResult
from monolith.core.testing.topology import Topology, make_topology

_PER_HOST_V2 = tpu_config.InputPipelineConfig.PER_HOST_V2
_ONE_HOST_ONE_REPLICA = Topology()

__all__ = [
    "EmulatedTPUTraining",
    "FakeTPUContext",
    "TrainResult",
    "build_emulated_training",
    "iterations_per_loop_hook",
    "train",
]


def _lacks_model_dir(ctx: Any) -> bool:
    """Whether `ctx` is a `FakeTPUContext` whose config names no model_dir."""
    return isinstance(ctx, FakeTPUContext) and getattr(ctx.config, "model_dir", None) is None


def _build_options(
    *,
    params: Optional[Mapping[str, Any]],
    hook_class: type,
    ctx: Any,
    rendezvous: Optional[error_handling.ErrorRendezvous],
    run_infeed_loop_on_coordinator: bool,
    outfeed_every_n_steps: int,
    tpu_init_ops: Optional[Sequence[Any]] = None,
    tpu_compile_op: Any = None,
    master: Optional[str] = None,
    session_config: Optional[tf.compat.v1.ConfigProto] = None,
    hook_kwargs: Optional[Mapping[str, Any]] = None,
    train_batch_size: Optional[int] = None,
    config: Any = None,
    topology: Topology = _ONE_HOST_ONE_REPLICA,
) -> BuildOptions:
    """Validates the arguments once, where they enter, and freezes them."""
    params = dict(params or {})
    positive_int("outfeed_every_n_steps", outfeed_every_n_steps)
    if train_batch_size is not None:
        positive_int("train_batch_size", train_batch_size)
    topology.check_global_batch_size(train_batch_size)
    _user_params.check_params(params, train_batch_size)
    model_dir = getattr(config, "model_dir", None)
    if ctx is None:
        ctx = FakeTPUContext(
            num_hosts=topology.num_hosts,
            replicas_per_host=topology.replicas_per_host,
            model_dir=model_dir,
        )
    elif _lacks_model_dir(ctx) and model_dir is not None:
        ctx = ctx.with_model_dir(model_dir)  # The run's, as TPUEstimator's context holds it.
    return BuildOptions(
        params=types.MappingProxyType(params),
        hook_class=hook_class,
        ctx=ctx,
        rendezvous=(
            rendezvous if rendezvous is not None else error_handling.ErrorRendezvous(num_sources=3)
        ),
        run_infeed_loop_on_coordinator=run_infeed_loop_on_coordinator,
        outfeed_every_n_steps=outfeed_every_n_steps,
        tpu_init_ops=tuple(tpu_init_ops or ()),
        tpu_compile_op=tpu_compile_op,
        master=master,
        session_config=session_config,
        hook_kwargs=types.MappingProxyType(dict(hook_kwargs or {})),
        train_batch_size=train_batch_size,
        config=config,
        topology=topology,
    )


def build_emulated_training(
    model_fn: Callable[..., Any],
    input_fn: Union[Callable[..., tf.data.Dataset], tf.data.Dataset],
    *,
    params: Optional[Mapping[str, Any]] = None,
    hook_class: type = TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
    ctx: Any = None,
    rendezvous: Optional[error_handling.ErrorRendezvous] = None,
    run_infeed_loop_on_coordinator: bool = True,
    outfeed_every_n_steps: int = 1,
    tpu_init_ops: Optional[Sequence[Any]] = None,
    tpu_compile_op: Any = None,
    master: Optional[str] = None,
    session_config: Optional[tf.compat.v1.ConfigProto] = None,
    hook_kwargs: Optional[Mapping[str, Any]] = None,
    train_batch_size: Optional[int] = None,
    config: Optional[tpu_config.RunConfig] = None,
    num_hosts: int = 1,
    replicas_per_host: int = 1,
    per_host_input_for_training: Any = _PER_HOST_V2,
) -> EmulatedTPUTraining:
    """Builds the emulated TPU training graph in the default graph.

    Call it where TPUEstimator would call the model_fn: inside the graph the
    session will run. Nothing runs here; hooks and threads start when a
    MonitoredSession is created with `hook` (see `train` for the full pattern).

    The emulated pod (`num_hosts` x `replicas_per_host`), as TPUEstimator runs one:

    * Input: `input_fn` is called once per host (once, for host 0, under
      BROADCAST), with `params["batch_size"]` per replica under PER_HOST_V2,
      per host under PER_HOST_V1 and global under BROADCAST, and
      `params["context"]` answering as TPUEstimator's `TPUContext` does:
      `current_input_fn_deployment()` is `(host device, host, num_hosts,
      replicas_per_host)` (under BROADCAST `(device, 0, 1, num_replicas)`),
      `current_host`, `num_hosts`, `num_replicas`. Replicas are numbered host
      by host (host h's replicas are `h * replicas_per_host + i`). Each step
      takes, under PER_HOST_V2, one element per replica from its host's
      iterator, in replica order; under PER_HOST_V1 one element per host,
      split along axis 0 over its replicas; under BROADCAST one element,
      given whole to every replica. Every host's device is this process's CPU.
    * Step: the `model_fn` runs once per replica, on that replica's batch,
      with `params["batch_size"]` per replica (global under BROADCAST). There
      is one set of variables: replica 0 creates them and the others get
      them back (`tf.compat.v1.get_variable` by name, other variable
      creations by creation order), so the model_fn must create the same
      variables on every replica. `cross_replica_sum` (and so
      `CrossShardOptimizer`, whose MEAN reduction divides by the
      `tpu_shard_context` of `num_replicas` the emulator sets) is the exact
      sum over the replicas, and its gradient is the cross-replica sum of
      the gradient, as on TPU. The loop runs replica 0's `train_op`: the
      update is applied once per step, which is what each replica's
      identical copy applies on a TPU, and a checkpoint holds what every
      copy holds there. The other replicas' forward and backward passes run
      as inputs of the collectives.
    * Outfeed: each host-call tensor reaches the host function concatenated
      over replicas along axis 0, in replica order (`[num_replicas * k, ...]`
      for a per-replica `[k, ...]`; under BROADCAST replica 0's, as
      TPUEstimator assumes identical replicas there), and so does every
      replica's stop flag: one feed hook gets every host's enqueue ops.
    * Replica ids: TPUEstimator does not tell the model_fn which replica it
      runs on, and neither does the emulator. A replica learns it through its
      input: under PER_HOST_V2 host h's dataset feeds its replicas in replica
      order, so its element j goes to replica `h * replicas_per_host + j %
      replicas_per_host`; an input_fn can add that as a feature (e.g. with
      `Dataset.enumerate()`), on a TPU and here alike.

    Not emulated: the other replicas' own state updates never run, so state
    that differs between replicas is replica 0's (a variable assigned from
    local data without `cross_replica_sum`, as a TPU checkpoint would also
    hold replica 0's copy; per-replica TPU variables such as the caching
    `BaseEmbeddingHostCall`'s window are updated for replica 0 only), and
    the other replicas' train ops have no side effects. A `cross_replica_sum`
    inside a `tf.cond`/`tf.while_loop` of the model_fn must sum a value
    computed outside it (a ValueError says so). No PER_SHARD_V1 input, model
    parallelism, TPU embedding, `tf.raw_ops.CrossReplicaSum` or other
    collectives (all-to-all, permute). Replicas run in one CPU graph, one
    copy of the step per replica: the pod's speed is not a TPU's.

    Args:
      model_fn: TPUEstimator-style `model_fn(features, labels, mode, params[, config])`
        (any subset of those argument names) returning a `TPUEstimatorSpec` or
        `EstimatorSpec` with `loss` and `train_op`; `host_call` and
        `training_hooks` of a `TPUEstimatorSpec` are honoured (replica 0's).
        Called once per replica, inside the loop body, with mode TRAIN.
      input_fn: Returns a `tf.data.Dataset` of `features` or `(features, labels)`
        batches of dense tensors (called per host, with those of `params`,
        `config` and `mode` it takes), or, on one host, the dataset itself
        (built in the default graph).
      params: Deep-copied for each `input_fn`/`model_fn` call, with
        `batch_size` (if `train_batch_size` is given), `context` and, for the
        model_fn, `use_tpu=True` added as TPUEstimator adds them. Must not hold
        `context`, nor `batch_size` when `train_batch_size` is given.
      hook_class: The feed hook class (TPUConfig's `experimental_feed_hook`);
        its static `get_stopping_signals_and_name` makes each step's stop flag.
      ctx: Passed to the hook as TPUEstimator's context; default `FakeTPUContext()`.
      rendezvous: Given to the hook; default a new `ErrorRendezvous(num_sources=3)`
        (infeed, outfeed, training loop), as TPUEstimator.train creates.
      run_infeed_loop_on_coordinator: True: `enqueue_ops` enqueues one batch and
        the infeed thread runs it once per step; False: it enqueues a whole
        loop (a while loop of `iterations_per_loop` enqueues) and runs once per loop.
      outfeed_every_n_steps: Outfeed only on steps `i % n == 0` of each loop,
        as TPUConfig's `experimental_host_call_every_n_steps`.
      tpu_init_ops: Extra init ops for the hook.
      tpu_compile_op: What the hook runs when TPU_SPLIT_COMPILE_AND_EXECUTE=1;
        default: a constant successful `CompilationResultProto`.
      master: Passed to the hook.
      session_config: Passed to the hook.
      hook_kwargs: Extra keyword arguments for `hook_class` (e.g. `join_timeout_secs`).
      train_batch_size: TPUEstimator's `train_batch_size`: the global batch
        size; `input_fn` and `model_fn` get their share as
        `params["batch_size"]` (see above). It must be divisible by the
        number of replicas, except under BROADCAST. None: no `batch_size` is
        added (a `batch_size` in `params` is passed through unchanged).
      config: What `input_fn`/`model_fn` receive as `config` (deep-copied);
        None passes None (`train` passes the RunConfig of the run). Its
        `model_dir` becomes the feed hook's (`FakeTPUContext.config.model_dir`,
        also for a given `ctx` without one): the hook refuses a restart whose
        input differs from that model_dir's checkpoint and holds its lock
        from `begin()` to `end()`.
      num_hosts: Hosts of the emulated pod (default 1).
      replicas_per_host: Replicas per host (default 1).
      per_host_input_for_training: How the input reaches the replicas, a
        `tpu_config.InputPipelineConfig`: PER_HOST_V2 (default, the original
        runner's), PER_HOST_V1 or BROADCAST.

    Returns:
      An `EmulatedTPUTraining`.

    Raises:
      TypeError, ValueError: a bad count or input mode (naming it);
        `train_batch_size` not divisible by the replicas; an input_fn that
        returns different structures on different hosts.
    """
    options = _build_options(
        params=params,
        hook_class=hook_class,
        ctx=ctx,
        rendezvous=rendezvous,
        run_infeed_loop_on_coordinator=run_infeed_loop_on_coordinator,
        outfeed_every_n_steps=outfeed_every_n_steps,
        tpu_init_ops=tpu_init_ops,
        tpu_compile_op=tpu_compile_op,
        master=master,
        session_config=session_config,
        hook_kwargs=hook_kwargs,
        train_batch_size=train_batch_size,
        config=config,
        topology=make_topology(num_hosts, replicas_per_host, per_host_input_for_training),
    )
    return _graph.build(model_fn, input_fn, options)


def iterations_per_loop_hook(
    iterations_per_loop: Union[int, str],
    *,
    steps: Optional[int] = None,
    max_steps: Optional[int] = None,
) -> tf.compat.v1.train.SessionRunHook:
    """TPUEstimator's own `_TPUStopAtStepHook`: sets the loop size, stops at a step.

    Before each loop it loads `min(iterations_per_loop, steps left)` into
    `tpu_estimator/iterations_per_loop`, and requests stop once `steps` more
    (or up to `max_steps`) steps ran. With neither, it never stops training:
    only the end of the stream (or an error) does.

    Args:
      iterations_per_loop: Steps per loop (int), or a TPUConfig-style "<n>s" duration.
      steps: Train this many more steps.
      max_steps: Train until the global step reaches this.
    """
    return _session.stop_at_step_hook(iterations_per_loop, steps, max_steps)


def train(
    model_fn: Callable[..., Any],
    input_fn: Callable[..., tf.data.Dataset],
    *,
    model_dir: str,
    iterations_per_loop: Union[int, str] = 2,
    steps: Optional[int] = None,
    max_steps: Optional[int] = None,
    params: Optional[Mapping[str, Any]] = None,
    hooks: Sequence[tf.compat.v1.train.SessionRunHook] = (),
    hook_class: type = TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
    ctx: Any = None,
    run_infeed_loop_on_coordinator: bool = True,
    outfeed_every_n_steps: int = 1,
    save_checkpoints_steps: Optional[int] = None,
    save_checkpoints_secs: Optional[float] = None,
    session_config: Optional[tf.compat.v1.ConfigProto] = None,
    hook_kwargs: Optional[Mapping[str, Any]] = None,
    on_loop_end: Optional[Callable[[int, int, float], None]] = None,
    train_batch_size: Optional[int] = None,
    log_step_count_steps: Optional[int] = 100,
    num_hosts: int = 1,
    replicas_per_host: int = 1,
    per_host_input_for_training: Any = _PER_HOST_V2,
) -> TrainResult:
    """Trains like `TPUEstimator.train` (use_tpu=True), on CPU, through the emulated wiring.

    Builds a fresh graph (`build_emulated_training`), then runs a
    `MonitoredSession` that restores the latest checkpoint of `model_dir`,
    with TPUEstimator's hooks in TPUEstimator's order (after a loop counter of
    its own, for `TrainResult` and `on_loop_end`): a `CheckpointSaverHook`
    (saves at session creation, every `save_checkpoints_steps`/`_secs` if
    given, and at end), `hooks`, the
    stop-at-step hook (`iterations_per_loop_hook`), `NanTensorHook(loss)`, the
    feed hook, `InstallSignalHandlerHook`, `LoggingTensorHook` and
    `ExamplesPerSecondHook` (with `log_step_count_steps`), and the model_fn's
    `training_hooks`. Training stops at the end of the input stream (the feed
    hook raises OutOfRangeError, a normal end: every hook's `end()` runs and
    the final checkpoint is written; the feed hook's SIGTERM stop takes the
    same path), at `steps`/`max_steps`, or on error.

    As TPUEstimator does:
    * `input_fn` (per host) and `model_fn` (per replica) get their share of
      `train_batch_size` as `params["batch_size"]`, `params["context"]` (a
      `TPUContext` of the emulated pod; on one host with one replica
      `current_input_fn_deployment()` is `("/device:CPU:0", 0, 1, 1)`), the
      model_fn `params["use_tpu"] = True`, and both `config`: a
      `tpu_config.RunConfig` with this `model_dir`, `iterations_per_loop`,
      `per_host_input_for_training`, `outfeed_every_n_steps` as
      `experimental_host_call_every_n_steps`, the checkpoint settings and
      `session_config` (`log_step_count_steps` None, as TPUEstimator replaces
      it). See `build_emulated_training` for the pod.
    * A NaN loss (the loss of a loop's last step) raises
      `tf.compat.v1.train.NanLossDuringTrainingError`; no final checkpoint is written.
    * Before every loop SIGINT is set to SIG_DFL, so Ctrl-C ends the process
      at once (no KeyboardInterrupt traceback, no hang on the feed threads).
    * Every `log_step_count_steps` loops (session runs), INFO lines
      `loss = ..., step = ...`, `global_step/sec: ...` and `examples/sec: ...`.
    * Errors: one `ErrorRendezvous(num_sources=3)` collects the infeed,
      outfeed and training-loop errors, and the most informative (root cause,
      not a session cancellation) is raised.
    * The feed hook reads `model_dir` from its context's config (a
      `FakeTPUContext` without one, given as `ctx`, is copied with this
      `model_dir`): it holds the model_dir lock from its `begin()` to its
      `end()` and refuses a restart whose input differs from the
      checkpoint's (see `monolith.core.feed.model_dir_guard`).

    A broken model_dir fails in a few lines, TF's error kept as the cause:
    * before anything is built, a `model_dir` that is a file, cannot be
      created or is not writable raises
      `monolith.core.common.model_dir.ModelDirError` naming it;
    * a checkpoint that cannot be restored raises
      `monolith.core.common.restore_errors.UnreadableCheckpointError` (a
      missing, truncated or corrupt file, named, and how to resume from the
      previous checkpoint) or `IncompatibleCheckpointError` (another model's:
      the variables it lacks).

    Differences from TPUEstimator.train that remain:
    * TPU-only ops cannot run on CPU, except `CrossReplicaSum` (e.g. from
      `CrossShardOptimizer`), which the emulator computes; what the pod does
      not emulate is listed in `build_emulated_training`.
    * `train_batch_size` may be None (TPUEstimator requires it): then no
      `params["batch_size"]` is added, and a `batch_size` in `params` is
      passed through; examples/sec uses the input's static batch size.
    * Neither `steps` nor `max_steps` trains until the end of the stream
      (TPUEstimator on TPU requires one of them).
    * No TensorBoard events of its own: no `loss` summary (TPUEstimator's
      SummarySaverHook) and no `global_step/sec`/`examples/sec` events (they
      are logged only); the host call writes its summaries as on TPU.
    * No `GracefulShutdownHook`/TPU worker reset and no `CloudTPUPreemptedHook`.
    * Without a checkpoint setting, only the initial and final checkpoints are
      written (`config` says so: both None), where RunConfig defaults to 600 s.
    * `InstallSignalHandlerHook` is installed only when called on the main
      thread, and the SIGINT handler is also put back when training raised.

    Args:
      model_fn: See `build_emulated_training`.
      input_fn: See `build_emulated_training` (a callable: the graph is new).
      model_dir: Checkpoint directory (restored from, saved to).
      iterations_per_loop: Steps per `session.run` (TPUConfig's value).
      steps: Train at most this many more steps.
      max_steps: Train until this global step at most.
      params: See `build_emulated_training`.
      hooks: Extra `SessionRunHook`s.
      hook_class, ctx, run_infeed_loop_on_coordinator, outfeed_every_n_steps,
        hook_kwargs: See `build_emulated_training`.
      save_checkpoints_steps: Also save every this many steps.
      save_checkpoints_secs: Also save every this many seconds.
      session_config: Session config for the training session and the hook.
      on_loop_end: Called on the main thread after every loop with
        `(global_step, loop_steps, loss)`.
      train_batch_size: TPUEstimator's `train_batch_size` (see above).
      log_step_count_steps: RunConfig's `log_step_count_steps` (default 100):
        log every this many loops; None: no logging hooks.
      num_hosts, replicas_per_host, per_host_input_for_training: The emulated
        pod, see `build_emulated_training`.

    Returns:
      A `TrainResult` (with the real and padding batches each host fed).
    """
    if not model_dir:
        raise ValueError(f"model_dir={model_dir!r} must name a directory.")
    if isinstance(input_fn, tf.data.Dataset):
        raise TypeError(
            "input_fn must be a callable returning a tf.data.Dataset: train() builds a new "
            "graph, which a dataset built beforehand cannot belong to."
        )
    if log_step_count_steps is not None:
        positive_int("log_step_count_steps", log_step_count_steps)
    positive_int("outfeed_every_n_steps", outfeed_every_n_steps)
    topology = make_topology(num_hosts, replicas_per_host, per_host_input_for_training)
    model_dir = check_model_dir(model_dir)  # Last: it creates the directory.
    rendezvous = error_handling.ErrorRendezvous(num_sources=3)
    config = _user_params.default_run_config(
        model_dir,
        iterations_per_loop,
        topology.input_mode,
        outfeed_every_n_steps=outfeed_every_n_steps,
        save_checkpoints_steps=save_checkpoints_steps,
        save_checkpoints_secs=save_checkpoints_secs,
        session_config=session_config,
    )
    options = RunOptions(
        build=_build_options(
            params=params,
            hook_class=hook_class,
            ctx=ctx,
            rendezvous=rendezvous,
            run_infeed_loop_on_coordinator=run_infeed_loop_on_coordinator,
            outfeed_every_n_steps=outfeed_every_n_steps,
            session_config=session_config,
            hook_kwargs=hook_kwargs,
            train_batch_size=train_batch_size,
            config=config,
            topology=topology,
        ),
        model_dir=model_dir,
        iterations_per_loop=iterations_per_loop,
        steps=steps,
        max_steps=max_steps,
        hooks=tuple(hooks),
        save_checkpoints_steps=save_checkpoints_steps,
        save_checkpoints_secs=save_checkpoints_secs,
        log_step_count_steps=log_step_count_steps,
        on_loop_end=on_loop_end,
    )
    result = None
    try:
        result = _session.restore_sigint_after(lambda: _session.run(model_fn, input_fn, options))
    except Exception:
        rendezvous.record_error("training_loop", sys.exc_info())
    finally:
        rendezvous.record_done("training_loop")
        rendezvous.raise_errors()
    return result
