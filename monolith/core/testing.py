"""CPU emulation of TPUEstimator's infeed -> train loop -> outfeed wiring.

TPUEstimator (with `use_tpu=True`) trains like this: an infeed thread feeds
batches, one `session.run(train_op)` runs a `tf.while_loop` of
`iterations_per_loop` train steps on the TPU, each step sends the step's
outfeed (stop flag, host-call tensors) back, and an outfeed thread dequeues it
and runs the host call. None of that runs without a TPU. This module rebuilds
the same wiring from CPU ops, so a TPUEstimator `model_fn`, its `host_call`,
its input pipeline and the feed hook
(`TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook` by default) run
unchanged on CPU:

* infeed: a `tf.queue.FIFOQueue`; `enqueue_ops` moves one element of the
  `input_fn`'s dataset into it (or, with `run_infeed_loop_on_coordinator=False`,
  a whole loop's worth in one run, as TPUEstimator's device-side loop does);
* train loop: a `tf.while_loop` of `tpu_estimator/iterations_per_loop` steps
  (the real variable, read at each run) that dequeues a batch, calls the
  `model_fn`, and after its `train_op` enqueues the step's outfeed;
* outfeed: a second FIFOQueue; `dequeue_ops` is
  `{_USER_PROVIDED_SIGNAL_NAME: {"stopping": ...}, "host_call": host_fn(*tensors),
  "__force_dequeue": ...}` as TPUEstimator builds it, so the outfeed thread
  runs the host call. Tensors pass through unchanged: TPUEstimator
  concatenates them over replicas along axis 0, which for one replica is the
  identity, so a host call sees `[1, N]` for a per-replica `[1, N]` tensor.
  As on TPU, a model without host call outfeeds its loss, and
  `outfeed_every_n_steps` skips the outfeed on the other steps.

The TPU system cannot be initialised on CPU. `FakeTPUContext()` therefore
reports model parallelism with BROADCAST input by default, the one case in
which the hook skips `tf.compat.v1.tpu.initialize_system`/`shutdown_system`;
`FakeTPUContext(initialize_tpu=True)` makes the hook run them (patch them in
tests).

What a `model_fn` may do inside the emulated loop: everything it may do in a
TPUEstimator TRAIN step. Variables created in it (`tf.compat.v1.get_variable`,
layers, optimizer slots) are lifted out of the loop body with
`tf.init_scope()`, so they work in both TF behaviours (in TF2 behaviour the
body is a while_v2 FuncGraph). Initial values must not depend on tensors of
the step (use initializers or Python values), as on TPU. It must increment
the global step (e.g. `optimizer.minimize(..., global_step=...)`), as for
TPUEstimator. Summary ops belong in the host call, not in the step.

Public API: `FakeTPUContext`, `EmulatedTPUTraining`, `build_emulated_training`,
`iterations_per_loop_hook`, `TrainResult`, `train`.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf.tpu import compilation_result_pb2
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_config
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator
from tensorflow_estimator.python.estimator.tpu import util as _tpu_util

from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)

__all__ = [
    "EmulatedTPUTraining",
    "FakeTPUContext",
    "TrainResult",
    "build_emulated_training",
    "iterations_per_loop_hook",
    "train",
]

_HOST_CALL = "host_call"
_FORCE_DEQUEUE = "__force_dequeue"
_RUN_FOREVER_STEP = 2**62
_MODEL_FN_ARGS = ("features", "labels", "mode", "params", "config")


class FakeTPUContext:
    """Stands in for TPUEstimator's `_InternalTPUContext` where the hook reads it.

    Attributes read by the feed hook: `master_job`, `embedding_config`,
    `model_parallelism_enabled`, `config.tpu_config.initial_infeed_sleep_secs`
    and `config.tpu_config.per_host_input_for_training` (`config.tpu_config` is
    a real `TPUConfig`). `num_replicas` is 1.

    Args:
      initialize_tpu: False (default) reports model parallelism with BROADCAST
        input, so the hook skips TPU initialisation and shutdown (impossible on
        CPU). True reports PER_HOST_V2 input without model parallelism, so the
        hook calls `tf.compat.v1.tpu.initialize_system`/`shutdown_system`.
      master_job: The TPU job name the hook logs and passes to the TPU ops.
      initial_infeed_sleep_secs: Seconds the infeed thread sleeps first.
      embedding_config: TPUEstimator's embedding config (None: no TPU embedding).
      iterations_per_loop: Stored in `config.tpu_config` for reference only;
        the loop size is the variable set by `iterations_per_loop_hook`.
    """

    num_replicas = 1

    def __init__(
        self,
        *,
        initialize_tpu: bool = False,
        master_job: Optional[str] = None,
        initial_infeed_sleep_secs: Optional[int] = None,
        embedding_config: Any = None,
        iterations_per_loop: int = 2,
    ):
        self.master_job = master_job
        self.embedding_config = embedding_config
        self.model_parallelism_enabled = not initialize_tpu
        input_mode = (
            tpu_config.InputPipelineConfig.PER_HOST_V2
            if initialize_tpu
            else tpu_config.InputPipelineConfig.BROADCAST
        )
        self.config = types.SimpleNamespace(
            tpu_config=tpu_config.TPUConfig(
                iterations_per_loop=iterations_per_loop,
                per_host_input_for_training=input_mode,
                initial_infeed_sleep_secs=initial_infeed_sleep_secs,
            )
        )


@dataclasses.dataclass(frozen=True)
class EmulatedTPUTraining:
    """The graph pieces `build_emulated_training` created.

    Attributes:
      hook: The feed hook (an instance of `hook_class`), built with exactly the
        keyword arguments TPUEstimator passes.
      train_op: Runs one loop of `iterations_per_loop` steps.
      loss: The loss of the loop's last step (float32).
      loop_steps: How many steps the loop ran (int32), fetch with `train_op`.
      global_step: The global step variable.
      global_step_after_loop: The global step read after the loop.
      iterations_per_loop_var: `tpu_estimator/iterations_per_loop`.
      enqueue_ops: What the infeed thread runs.
      dequeue_ops: What the outfeed thread runs (dict, see the module docstring).
      rendezvous: The `ErrorRendezvous` given to the hook.
      training_hooks: `TPUEstimatorSpec.training_hooks` of the model_fn.
      iterator_initializer: Initialises the input iterator (also run by the
        hook, as one of its `tpu_init_ops`, before the feed threads start).
    """

    hook: tf.compat.v1.train.SessionRunHook
    train_op: tf.Operation
    loss: tf.Tensor
    loop_steps: tf.Tensor
    global_step: tf.Variable
    global_step_after_loop: tf.Tensor
    iterations_per_loop_var: tf.Variable
    enqueue_ops: list
    dequeue_ops: dict
    rendezvous: error_handling.ErrorRendezvous
    training_hooks: tuple
    iterator_initializer: tf.Operation


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one `train()` call did.

    Attributes:
      global_step: Global step after training (as in the final checkpoint).
      steps_run: Train steps this call ran, padding steps included.
      loops_run: `session.run(train_op)` calls, i.e. loops, this call ran.
      stopped_at_end_of_stream: Whether the hook stopped training because the
        stream ended (False when steps/max_steps stopped it first).
      final_checkpoint: Path prefix of the latest checkpoint in `model_dir`.
      loss: Loss of the last step run (None when no loop ran).
    """

    global_step: int
    steps_run: int
    loops_run: int
    stopped_at_end_of_stream: bool
    final_checkpoint: Optional[str]
    loss: Optional[float]


def _call_with_supported_args(fn: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """Calls `fn` with those of `available` it accepts (as Estimator calls model_fn)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


def _get_or_create_global_step() -> tf.Variable:
    global_step = tf.compat.v1.train.get_global_step()
    if global_step is None:
        global_step = _tpu_estimator._create_global_step(tf.compat.v1.get_default_graph())
    return global_step


def _make_dataset(input_fn: Any, params: Mapping[str, Any]) -> tf.data.Dataset:
    if isinstance(input_fn, tf.data.Dataset):
        return input_fn
    if not callable(input_fn):
        raise TypeError(f"input_fn={input_fn!r} must be a callable returning a tf.data.Dataset.")
    dataset = _call_with_supported_args(input_fn, {"params": dict(params)})
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"input_fn returned {type(dataset).__name__}; the emulator needs a tf.data.Dataset."
        )
    return dataset


def _infeed_component_specs(dataset: tf.data.Dataset) -> list:
    specs = tf.nest.flatten(dataset.element_spec)
    for spec in specs:
        if not isinstance(spec, tf.TensorSpec):
            raise TypeError(
                f"dataset element component {spec!r} is not a dense tensor; the TPU infeed "
                "(and this emulation of it) only carries dense tensors."
            )
    return specs


def _fifo_queue(specs: Sequence[Any], name: str) -> tf.queue.FIFOQueue:
    dtypes = [spec.dtype for spec in specs]
    shapes = [tf.TensorShape(spec.shape) for spec in specs]
    if all(shape.is_fully_defined() for shape in shapes):
        return tf.queue.FIFOQueue(1 << 30, dtypes, shapes=shapes, name=name)
    return tf.queue.FIFOQueue(1 << 30, dtypes, name=name)


def _dequeue(queue: tf.queue.FIFOQueue, specs: Sequence[Any]) -> list:
    values = tf.nest.flatten(queue.dequeue())
    for value, spec in zip(values, specs):
        value.set_shape(spec.shape)
    return values


def _lift_variable_creation(next_creator: Callable[..., Any], **kwargs: Any) -> Any:
    """Creates variables outside the loop body (while_v2 bodies are FuncGraphs)."""
    with tf.init_scope():
        return next_creator(**kwargs)


class _OutfeedRecord:
    """One named entry of the emulated outfeed: a host fn and its tensors."""

    def __init__(self, name: str, host_fn: Callable[..., Any], tensors: Any):
        self.name = name
        self.host_fn = host_fn
        if isinstance(tensors, Mapping):
            self.keys: Optional[list] = list(tensors)
            self.tensors = [tensors[key] for key in self.keys]
        else:
            self.keys = None
            self.tensors = list(tensors)
        for tensor in self.tensors:
            if tensor.shape.ndims == 0:
                raise RuntimeError(
                    f"All tensors outfed from TPU should preserve batch size dimension, but "
                    f"{name!r} outfeeds scalar {tensor!r} (give it a leading dimension)."
                )

    def call_host_fn(self, dequeued: Sequence[tf.Tensor]) -> Any:
        if self.keys is not None:
            return self.host_fn(**dict(zip(self.keys, dequeued)))
        return self.host_fn(*dequeued)


def _spec_host_call(spec: Any) -> Any:
    host_call = getattr(spec, "host_call", None)
    if host_call is not None:
        _tpu_estimator._OutfeedHostCall.validate({_HOST_CALL: host_call})
    return host_call


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
) -> EmulatedTPUTraining:
    """Builds the emulated TPU training graph in the default graph.

    Call it where TPUEstimator would call the model_fn: inside the graph the
    session will run. Nothing runs here; hooks and threads start when a
    MonitoredSession is created with `hook` (see `train` for the full pattern).

    Args:
      model_fn: TPUEstimator-style `model_fn(features, labels, mode, params[, config])`
        (any subset of those argument names) returning a `TPUEstimatorSpec` or
        `EstimatorSpec` with `loss` and `train_op`; `host_call` and
        `training_hooks` of a `TPUEstimatorSpec` are honoured. Called once,
        inside the loop body, with mode TRAIN and `config=None`.
      input_fn: Returns a `tf.data.Dataset` of `features` or `(features, labels)`
        batches of dense tensors (called with `params` if it takes them), or
        the dataset itself (built in the default graph).
      params: Passed (copied) to `input_fn` and `model_fn`.
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

    Returns:
      An `EmulatedTPUTraining`.
    """
    params = dict(params or {})
    ctx = ctx if ctx is not None else FakeTPUContext()
    if rendezvous is None:
        rendezvous = error_handling.ErrorRendezvous(num_sources=3)
    if isinstance(outfeed_every_n_steps, bool) or not isinstance(outfeed_every_n_steps, int):
        raise TypeError(f"outfeed_every_n_steps={outfeed_every_n_steps!r} must be an int.")
    if outfeed_every_n_steps < 1:
        raise ValueError(f"outfeed_every_n_steps={outfeed_every_n_steps!r} must be >= 1.")

    global_step = _get_or_create_global_step()
    iterations_per_loop_var = _tpu_estimator._create_or_get_iterations_per_loop()

    # -- infeed ---------------------------------------------------------------
    dataset = _make_dataset(input_fn, params)
    specs = _infeed_component_specs(dataset)
    iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
    infeed = _fifo_queue(specs, "emulated_infeed")
    if run_infeed_loop_on_coordinator:
        enqueue_ops = [infeed.enqueue(tf.nest.flatten(iterator.get_next()))]
    else:

        def _enqueue_one(i: tf.Tensor) -> tf.Tensor:
            with tf.control_dependencies([infeed.enqueue(tf.nest.flatten(iterator.get_next()))]):
                return i + 1

        loop_size = tf.identity(iterations_per_loop_var)
        enqueue_ops = [
            tf.compat.v1.while_loop(
                lambda i: i < loop_size, _enqueue_one, [tf.constant(0)], parallel_iterations=1
            )
        ]

    # -- train loop -----------------------------------------------------------
    records: list = []
    outfeed_holder: list = []

    def _step(i: tf.Tensor, unused_loss: tf.Tensor) -> list:
        element = tf.nest.pack_sequence_as(dataset.element_spec, _dequeue(infeed, specs))
        if isinstance(element, tuple) and len(element) == 2:
            features, labels = element
        else:
            features, labels = element, None
        with tf.compat.v1.variable_creator_scope(_lift_variable_creation):
            spec = _call_with_supported_args(
                model_fn,
                {
                    "features": features,
                    "labels": labels,
                    "mode": tf.estimator.ModeKeys.TRAIN,
                    "params": dict(params),
                    "config": None,
                },
            )
        if spec.train_op is None or spec.loss is None:
            raise ValueError(f"model_fn returned {spec!r} without loss or train_op.")
        records.append(spec)
        loss = tf.cast(spec.loss, tf.float32)
        signals, signal_name = hook_class.get_stopping_signals_and_name(features)
        outfed = []
        if signals is not None:
            outfed.append(_OutfeedRecord(signal_name, lambda **kw: kw, signals))
        host_call = _spec_host_call(spec)
        if host_call is not None and host_call[1]:
            outfed.append(_OutfeedRecord(_HOST_CALL, host_call[0], host_call[1]))
        elif host_call is None:
            # Like TPUEstimator: without host call, outfeed the loss to track progress.
            outfed.append(
                _OutfeedRecord(_HOST_CALL, lambda loss_t: loss_t, [tf.reshape(loss, [1])])
            )
        tensors = [t for record in outfed for t in record.tensors]
        with tf.control_dependencies([spec.train_op]):
            enqueued = []
            if tensors:
                # The queue must live in the outer graph, not in the loop body.
                with tf.init_scope():
                    outfeed = _fifo_queue(
                        [tf.TensorSpec(t.shape, t.dtype) for t in tensors], "emulated_outfeed"
                    )
                outfeed_holder.append((outfeed, outfed))

                def _enqueue() -> tf.Tensor:
                    with tf.control_dependencies([outfeed.enqueue(tensors)]):
                        return tf.constant(True)

                if outfeed_every_n_steps == 1:
                    enqueued = [_enqueue()]
                else:
                    enqueued = [
                        tf.compat.v1.cond(
                            tf.equal(tf.math.floormod(i, outfeed_every_n_steps), 0),
                            _enqueue,
                            lambda: tf.constant(False),
                        )
                    ]
            with tf.control_dependencies(enqueued):
                return [i + 1, tf.identity(loss)]

    loop_size = tf.identity(iterations_per_loop_var)
    loop_steps, loss = tf.compat.v1.while_loop(
        lambda i, _: i < loop_size,
        _step,
        [tf.constant(0), tf.constant(_tpu_estimator._INITIAL_LOSS, tf.float32)],
        parallel_iterations=1,
        name="emulated_tpu_loop",
    )
    train_op = tf.group(loop_steps, loss, name="emulated_tpu_train_op")
    with tf.control_dependencies([loop_steps, loss]):
        global_step_after_loop = tf.identity(global_step)

    # -- outfeed (host side) --------------------------------------------------
    dequeue_ops: dict = {}
    if outfeed_holder:
        outfeed, outfed = outfeed_holder[0]
        dequeued = tf.nest.flatten(outfeed.dequeue())
        pos = 0
        for record in outfed:
            values = dequeued[pos : pos + len(record.tensors)]
            for value, tensor in zip(values, record.tensors):
                value.set_shape(tensor.shape)
            pos += len(record.tensors)
            result = record.call_host_fn(values)
            if result is not None:
                dequeue_ops[record.name] = result
        dequeue_ops[_FORCE_DEQUEUE] = tf.group(*dequeued)

    spec = records[0]
    init_ops = list(tpu_init_ops or []) + [iterator.initializer]
    if tpu_compile_op is None:
        tpu_compile_op = tf.constant(
            compilation_result_pb2.CompilationResultProto().SerializeToString()
        )
    hook = hook_class(
        ctx,
        enqueue_ops,
        dequeue_ops,
        tpu_compile_op=tpu_compile_op,
        run_infeed_loop_on_coordinator=run_infeed_loop_on_coordinator,
        rendezvous=rendezvous,
        master=master,
        session_config=session_config,
        tpu_init_ops=init_ops,
        outfeed_every_n_steps=outfeed_every_n_steps,
        **dict(hook_kwargs or {}),
    )
    return EmulatedTPUTraining(
        hook=hook,
        train_op=train_op,
        loss=loss,
        loop_steps=loop_steps,
        global_step=global_step,
        global_step_after_loop=global_step_after_loop,
        iterations_per_loop_var=iterations_per_loop_var,
        enqueue_ops=enqueue_ops,
        dequeue_ops=dequeue_ops,
        rendezvous=rendezvous,
        training_hooks=tuple(getattr(spec, "training_hooks", None) or ()),
        iterator_initializer=iterator.initializer,
    )


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
    if steps is not None and max_steps is not None:
        raise ValueError(f"steps={steps!r} and max_steps={max_steps!r}: give at most one of them.")
    for name, value in (("steps", steps), ("max_steps", max_steps)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}={value!r} must be a positive int.")
    counter = _tpu_util.parse_iterations_per_loop(iterations_per_loop)
    if steps is None and max_steps is None:
        max_steps = _RUN_FOREVER_STEP
    return _tpu_estimator._TPUStopAtStepHook(counter, num_steps=steps, final_step=max_steps)


def _run_training(
    model_fn: Callable[..., Any],
    input_fn: Any,
    model_dir: str,
    iterations_per_loop: Union[int, str],
    steps: Optional[int],
    max_steps: Optional[int],
    hooks: Sequence[tf.compat.v1.train.SessionRunHook],
    save_checkpoints_steps: Optional[int],
    save_checkpoints_secs: Optional[float],
    session_config: Optional[tf.compat.v1.ConfigProto],
    build_kwargs: Mapping[str, Any],
    on_loop_end: Optional[Callable[[int, int, float], None]] = None,
) -> TrainResult:
    with tf.Graph().as_default():
        built = build_emulated_training(
            model_fn, input_fn, session_config=session_config, **build_kwargs
        )
        scaffold = tf.compat.v1.train.Scaffold()
        if save_checkpoints_steps is None and save_checkpoints_secs is None:
            # Only the initial and the final (end()) checkpoint.
            save_checkpoints_secs = float(_RUN_FOREVER_STEP)
        saver_hook = tf.compat.v1.train.CheckpointSaverHook(
            model_dir,
            save_secs=save_checkpoints_secs,
            save_steps=save_checkpoints_steps,
            scaffold=scaffold,
        )
        counter = _tpu_util.parse_iterations_per_loop(iterations_per_loop)
        if counter.unit == "count":
            saver_hook._set_steps_per_run(counter.value)
        all_hooks = [
            iterations_per_loop_hook(iterations_per_loop, steps=steps, max_steps=max_steps),
            built.hook,
            *built.training_hooks,
            *hooks,
            # Last, so it saves after the feed hook's end() finished the loops.
            saver_hook,
        ]
        creator = tf.compat.v1.train.ChiefSessionCreator(
            scaffold=scaffold, checkpoint_dir=model_dir, config=session_config
        )
        steps_run = loops_run = 0
        loss = global_step = None
        logging.info("Emulated TPU training in %s starts.", model_dir)
        with tf.compat.v1.train.MonitoredSession(session_creator=creator, hooks=all_hooks) as sess:
            while not sess.should_stop():
                _, loop_steps, loss, global_step = sess.run(
                    [built.train_op, built.loop_steps, built.loss, built.global_step_after_loop]
                )
                steps_run += int(loop_steps)
                loops_run += 1
                if on_loop_end is not None:
                    on_loop_end(int(global_step), int(loop_steps), float(loss))
        final_checkpoint = tf.train.latest_checkpoint(model_dir)
        if final_checkpoint is not None:
            global_step = tf.train.load_checkpoint(final_checkpoint).get_tensor(
                built.global_step.op.name
            )
        stopped = bool(getattr(built.hook, "stopping_signal", False))
        logging.info(
            "Emulated TPU training stopped at step %s after %d steps in %d loops "
            "(end of stream: %s).",
            global_step,
            steps_run,
            loops_run,
            stopped,
        )
        return TrainResult(
            global_step=int(global_step) if global_step is not None else 0,
            steps_run=steps_run,
            loops_run=loops_run,
            stopped_at_end_of_stream=stopped,
            final_checkpoint=final_checkpoint,
            loss=float(loss) if loss is not None else None,
        )


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
) -> TrainResult:
    """Trains like `TPUEstimator.train`, on CPU, through the emulated TPU wiring.

    Builds a fresh graph (`build_emulated_training`), then runs a
    `MonitoredSession` that restores the latest checkpoint of `model_dir`, with
    hooks in this order: `iterations_per_loop_hook`, the feed hook, the
    model_fn's `training_hooks`, `hooks`, and a `CheckpointSaverHook` (saves at
    session creation, every `save_checkpoints_steps`/`_secs` if given, and at
    end). Training stops at the end of the input stream (the feed hook raises
    OutOfRangeError, a normal end: every hook's `end()` runs and the final
    checkpoint is written), at `steps`/`max_steps`, or on error.

    Errors follow TPUEstimator.train: one `ErrorRendezvous(num_sources=3)`
    collects the infeed, outfeed and training-loop errors, and the most
    informative (root cause, not a session cancellation) is raised.

    Args:
      model_fn: See `build_emulated_training`.
      input_fn: See `build_emulated_training` (a callable: the graph is new).
      model_dir: Checkpoint directory (restored from, saved to).
      iterations_per_loop: Steps per `session.run` (TPUConfig's value).
      steps: Train at most this many more steps.
      max_steps: Train until this global step at most.
      params: Passed to `input_fn` and `model_fn`.
      hooks: Extra `SessionRunHook`s.
      hook_class, ctx, run_infeed_loop_on_coordinator, outfeed_every_n_steps,
        hook_kwargs: See `build_emulated_training`.
      save_checkpoints_steps: Also save every this many steps.
      save_checkpoints_secs: Also save every this many seconds.
      session_config: Session config for the training session and the hook.
      on_loop_end: Called on the main thread after every loop with
        `(global_step, loop_steps, loss)`, e.g. to print progress as
        TPUEstimator's step and loss logging does.

    Returns:
      A `TrainResult`.
    """
    if not model_dir:
        raise ValueError(f"model_dir={model_dir!r} must name a directory.")
    if isinstance(input_fn, tf.data.Dataset):
        raise TypeError(
            "input_fn must be a callable returning a tf.data.Dataset: train() builds a new "
            "graph, which a dataset built beforehand cannot belong to."
        )
    rendezvous = error_handling.ErrorRendezvous(num_sources=3)
    build_kwargs = dict(
        params=params,
        hook_class=hook_class,
        ctx=ctx,
        rendezvous=rendezvous,
        run_infeed_loop_on_coordinator=run_infeed_loop_on_coordinator,
        outfeed_every_n_steps=outfeed_every_n_steps,
        hook_kwargs=hook_kwargs,
    )
    result = None
    try:
        result = _run_training(
            model_fn,
            input_fn,
            model_dir,
            iterations_per_loop,
            steps,
            max_steps,
            hooks,
            save_checkpoints_steps,
            save_checkpoints_secs,
            session_config,
            build_kwargs,
            on_loop_end,
        )
    except Exception:
        rendezvous.record_error("training_loop", sys.exc_info())
    finally:
        rendezvous.record_done("training_loop")
        rendezvous.raise_errors()
    return result
