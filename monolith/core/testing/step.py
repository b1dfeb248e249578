"""The emulated TPU train loop: a `tf.while_loop` of `iterations_per_loop` steps.

Each step dequeues a batch from the infeed, calls the `model_fn` (mode TRAIN),
and after its `train_op` enqueues the step's outfeed. Variables the model_fn
creates are lifted out of the loop body with `tf.init_scope()` (in TF2
behaviour the body is a while_v2 FuncGraph).

With one replica a cross-replica sum is the identity, but `CrossReplicaSum`
(e.g. from `tf.compat.v1.tpu.CrossShardOptimizer`, which a model_fn typically
uses when `params["use_tpu"]`) has no CPU kernel; the step therefore routes
every consumer of such an op to the op's input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator

import tensorflow as tf
from tensorflow.python.ops import gen_tpu_ops
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.testing import user_params
from monolith.core.testing.infeed import Infeed
from monolith.core.testing.options import BuildOptions
from monolith.core.testing.outfeed import Outfeed, step_records


@dataclasses.dataclass(frozen=True)
class TrainLoop:
    """The train loop's graph pieces.

    Attributes:
      train_op: Runs one loop.
      loss: The loss of the loop's last step (float32).
      loop_steps: How many steps the loop ran (int32).
      global_step_after_loop: The global step read after the loop.
      spec: The (first) spec the model_fn returned.
      outfeed: The outfeed the steps enqueue into.
    """

    train_op: tf.Operation
    loss: tf.Tensor
    loop_steps: tf.Tensor
    global_step_after_loop: tf.Tensor
    spec: Any
    outfeed: Outfeed


def _lift_variable_creation(loop_scope: str) -> Callable[..., Any]:
    """A variable creator that creates variables outside the loop body.

    while_v2 bodies are FuncGraphs, so variables must be lifted out of them.
    The loop's own name scope (`loop_scope`, v1 while loops) is dropped from
    the name, as TPUEstimator's loop does: a `tf.Variable` such as Adam's
    `beta1_power` gets the name a TPUEstimator checkpoint has, and a scope the
    model_fn opened itself is kept.
    """

    def creator(next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        scope = tf.compat.v1.get_default_graph().get_name_scope()
        if loop_scope and (scope == loop_scope or scope.startswith(loop_scope + "/")):
            scope = scope[len(loop_scope) + 1 :]
        with (
            tf.init_scope(),
            tf.compat.v1.get_default_graph().name_scope(scope + "/" if scope else None),
        ):
            return next_creator(**kwargs)

    return creator


@contextlib.contextmanager
def _one_replica_cross_replica_sum() -> Iterator[None]:
    """Makes `cross_replica_sum` the identity while this thread builds the step.

    It patches `gen_tpu_ops.cross_replica_sum`, which every path to the op
    (`tf.compat.v1.tpu.cross_replica_sum`, `CrossShardOptimizer`) calls; other
    threads still get the real op.
    """
    original = gen_tpu_ops.cross_replica_sum
    owner = threading.get_ident()

    def cross_replica_sum(input, group_assignment, name=None):  # noqa: A002 (TF's name)
        if threading.get_ident() != owner:
            return original(input, group_assignment, name=name)
        return tf.identity(input, name=name)

    gen_tpu_ops.cross_replica_sum = cross_replica_sum
    try:
        yield
    finally:
        gen_tpu_ops.cross_replica_sum = original


def _call_model_fn(model_fn: Callable[..., Any], infeed: Infeed, options: BuildOptions) -> tuple:
    loop_scope = tf.compat.v1.get_default_graph().get_name_scope()
    features, labels = infeed.dequeue()
    with (
        tf.compat.v1.variable_creator_scope(_lift_variable_creation(loop_scope)),
        _one_replica_cross_replica_sum(),
    ):
        spec = user_params.call_model_fn(model_fn, features, labels, options)
    if getattr(spec, "train_op", None) is None or getattr(spec, "loss", None) is None:
        raise ValueError(f"model_fn returned {spec!r} without loss or train_op.")
    return features, spec


def build_train_loop(
    model_fn: Callable[..., Any],
    infeed: Infeed,
    options: BuildOptions,
    global_step: tf.Variable,
    iterations_per_loop_var: tf.Variable,
) -> TrainLoop:
    """Builds the loop; the model_fn is called once, inside the loop body."""
    specs: list = []
    outfeed = Outfeed(options.outfeed_every_n_steps)

    def _step(i: tf.Tensor, unused_loss: tf.Tensor) -> list:
        features, spec = _call_model_fn(model_fn, infeed, options)
        specs.append(spec)
        loss = tf.cast(spec.loss, tf.float32)
        records = step_records(spec, features, loss, options.hook_class)
        with tf.control_dependencies([spec.train_op]):
            enqueued = outfeed.enqueue(i, records)
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
    return TrainLoop(
        train_op=train_op,
        loss=loss,
        loop_steps=loop_steps,
        global_step_after_loop=global_step_after_loop,
        spec=specs[0],
        outfeed=outfeed,
    )
