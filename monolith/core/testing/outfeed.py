"""The emulated outfeed: per-step records enqueued in the loop, dequeued on the host.

Each step enqueues its stop flag and host-call tensors (or, without a host
call, its loss, as TPUEstimator does) after its `train_op`. `dequeue_ops`,
run by the feed hook's outfeed thread, is what TPUEstimator builds:
`{signal_name: {"stopping": ...}, "host_call": host_fn(*tensors),
"__force_dequeue": ...}`. Tensors pass through unchanged: TPUEstimator
concatenates them over replicas along axis 0, which for one replica is the
identity.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.testing.infeed import fifo_queue

HOST_CALL = "host_call"
FORCE_DEQUEUE = "__force_dequeue"


class OutfeedRecord:
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


def step_records(
    spec: Any, features: Any, loss: tf.Tensor, hook_class: type
) -> list[OutfeedRecord]:
    """What one step outfeeds: the stop flag, then the host call (or the loss)."""
    records = []
    signals, signal_name = hook_class.get_stopping_signals_and_name(features)
    if signals is not None:
        records.append(OutfeedRecord(signal_name, lambda **kw: kw, signals))
    host_call = getattr(spec, "host_call", None)
    if host_call is not None:
        _tpu_estimator._OutfeedHostCall.validate({HOST_CALL: host_call})
        if host_call[1]:
            records.append(OutfeedRecord(HOST_CALL, host_call[0], host_call[1]))
    else:
        # Like TPUEstimator: without host call, outfeed the loss to track progress.
        records.append(OutfeedRecord(HOST_CALL, lambda loss_t: loss_t, [tf.reshape(loss, [1])]))
    return records


class Outfeed:
    """The outfeed queue, created by the first step that has something to send."""

    def __init__(self, every_n_steps: int):
        self._every_n_steps = every_n_steps
        self._queue: Optional[tf.queue.FIFOQueue] = None
        self._records: list[OutfeedRecord] = []

    def enqueue(self, step: tf.Tensor, records: Sequence[OutfeedRecord]) -> list:
        """Ops enqueueing `records` on steps `step % every_n_steps == 0` (call in the body)."""
        tensors = [t for record in records for t in record.tensors]
        if not tensors:
            return []
        # The queue must live in the outer graph, not in the loop body.
        with tf.init_scope():
            self._queue = fifo_queue(
                [tf.TensorSpec(t.shape, t.dtype) for t in tensors], "emulated_outfeed"
            )
        self._records = list(records)
        queue = self._queue

        def _enqueue() -> tf.Tensor:
            with tf.control_dependencies([queue.enqueue(tensors)]):
                return tf.constant(True)

        if self._every_n_steps == 1:
            return [_enqueue()]
        return [
            tf.compat.v1.cond(
                tf.equal(tf.math.floormod(step, self._every_n_steps), 0),
                _enqueue,
                lambda: tf.constant(False),
            )
        ]

    def dequeue_ops(self) -> dict:
        """The host side: dequeue one step's records and run their host fns."""
        dequeue_ops: dict = {}
        if self._queue is None:
            return dequeue_ops
        dequeued = tf.nest.flatten(self._queue.dequeue())
        pos = 0
        for record in self._records:
            values = dequeued[pos : pos + len(record.tensors)]
            for value, tensor in zip(values, record.tensors):
                value.set_shape(tensor.shape)
            pos += len(record.tensors)
            result = record.call_host_fn(values)
            if result is not None:
                dequeue_ops[record.name] = result
        dequeue_ops[FORCE_DEQUEUE] = tf.group(*dequeued)
        return dequeue_ops
