"""The emulated TPU train loop: a `tf.while_loop` of `iterations_per_loop` steps.

Each step builds every replica's part (`replicas.build_replicated_step`:
dequeue, `model_fn`, stop flag and host-call record, cross-replica sums), and
after replica 0's `train_op` (the update, applied once) and every replica's
dequeue, enqueues all replicas' outfeed records. Variables the model_fn
creates are lifted out of the loop body with `tf.init_scope()` (in TF2
behaviour the body is a while_v2 FuncGraph).

The loop also counts, per host, the real and padding batches its input
pipeline fed into the steps it ran (a batch is padding when its signal
feature is set; see `batch_counts`), and the real batches fed into steps
that trained, i.e. advanced the global step (with `skip_padding_steps`: the
steps the stop rule applies), for `TrainResult`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.testing.infeed import Infeed
from monolith.core.testing.options import BuildOptions
from monolith.core.testing.outfeed import Outfeed
from monolith.core.testing.replicas import ReplicatedStep, build_replicated_step
from monolith.core.testing.topology import Topology


@dataclasses.dataclass(frozen=True)
class TrainLoop:
    """The train loop's graph pieces.

    Attributes:
      train_op: Runs one loop.
      loss: Replica 0's loss of the loop's last step (float32).
      loop_steps: How many steps the loop ran (int32).
      global_step_after_loop: The global step read after the loop.
      real_batches: Per host, the real batches its input fed into this loop's steps (int64).
      padding_batches: Per host, the padding batches likewise (int64).
      trained_batches: Per host, the real batches fed into this loop's steps
        that advanced the global step (int64).
      spec: Replica 0's spec (of the first step built).
      outfeed: The outfeed the steps enqueue into.
    """

    train_op: tf.Operation
    loss: tf.Tensor
    loop_steps: tf.Tensor
    global_step_after_loop: tf.Tensor
    real_batches: tf.Tensor
    padding_batches: tf.Tensor
    trained_batches: tf.Tensor
    spec: Any
    outfeed: Outfeed


def batch_counts(step: ReplicatedStep, topology: Topology) -> tuple:
    """`(real, padding)`: per host, the elements its input pipeline fed into this step.

    Counted in the host's own elements (what `skip_trained_batches` counts):
    one per replica under PER_HOST_V2, one per host under PER_HOST_V1 (padding
    if any of its replicas' slices is), one for host 0 under BROADCAST.
    """
    flags = [batch.is_padding() for batch in step.batches]
    per_host = []
    for host in range(topology.num_hosts):
        if topology.broadcast:
            host_flags = flags[:1] if host == 0 else []
        elif topology.elements_per_step == 1:
            host_flags = [tf.reduce_any(tf.stack([flags[r] for r in topology.replicas_of(host)]))]
        else:
            host_flags = [flags[r] for r in topology.replicas_of(host)]
        padding = tf.add_n([tf.cast(f, tf.int64) for f in host_flags] or [tf.constant(0, tf.int64)])
        per_host.append((tf.constant(len(host_flags), tf.int64) - padding, padding))
    return tf.stack([real for real, _ in per_host]), tf.stack([pad for _, pad in per_host])


def build_train_loop(
    model_fn: Callable[..., Any],
    infeed: Infeed,
    options: BuildOptions,
    global_step: tf.Variable,
    iterations_per_loop_var: tf.Variable,
) -> TrainLoop:
    """Builds the loop; the model_fn is called once per replica, inside the loop body."""
    specs: list = []
    topology = options.topology
    outfeed = Outfeed(options.outfeed_every_n_steps, topology.input_mode)

    def _step(
        i: tf.Tensor,
        unused_loss: tf.Tensor,
        real: tf.Tensor,
        padding: tf.Tensor,
        trained: tf.Tensor,
        previous_step: tf.Tensor,
    ) -> list:
        # The batch (and the update computed from it) waits for the global step
        # the step starts from: read before the loop, it would race the first update.
        step = build_replicated_step(model_fn, infeed, options, after=[previous_step])
        specs.append(step.specs[0])
        step_real, step_padding = batch_counts(step, topology)
        # Every replica's dequeue runs on every step, even one nothing else reads.
        with tf.control_dependencies([step.train_op, *step.dequeue_ops]):
            enqueued = outfeed.enqueue(i, step.records)
            global_step_now = tf.cast(tf.identity(global_step), tf.int64)
            # A step trains its real batches when it advances the global step.
            step_trained = tf.where(
                global_step_now > previous_step, step_real, tf.zeros_like(step_real)
            )
            with tf.control_dependencies(enqueued):
                return [
                    i + 1,
                    tf.identity(step.loss),
                    real + step_real,
                    padding + step_padding,
                    trained + step_trained,
                    global_step_now,
                ]

    loop_size = tf.identity(iterations_per_loop_var)
    zeros = tf.zeros([topology.num_hosts], tf.int64)
    loop_steps, loss, real_batches, padding_batches, trained_batches, _ = tf.compat.v1.while_loop(
        lambda i, *_: i < loop_size,
        _step,
        [
            tf.constant(0),
            tf.constant(_tpu_estimator._INITIAL_LOSS, tf.float32),
            zeros,
            zeros,
            zeros,
            tf.cast(tf.identity(global_step), tf.int64),
        ],
        parallel_iterations=1,
        name="emulated_tpu_loop",
    )
    train_op = tf.group(
        loop_steps,
        loss,
        real_batches,
        padding_batches,
        trained_batches,
        name="emulated_tpu_train_op",
    )
    with tf.control_dependencies([loop_steps, loss]):
        global_step_after_loop = tf.identity(global_step)
    return TrainLoop(
        train_op=train_op,
        loss=loss,
        loop_steps=loop_steps,
        global_step_after_loop=global_step_after_loop,
        real_batches=real_batches,
        padding_batches=padding_batches,
        trained_batches=trained_batches,
        spec=specs[0],
        outfeed=outfeed,
    )
