"""The emulated outfeed: per-step records enqueued in the loop, dequeued on the host.

Each replica's step records its stop flag and host-call tensors (or, without
a host call, its loss, as TPUEstimator does); the step enqueues every
replica's records, in replica order, after its `train_op`. `dequeue_ops`,
run by the feed hook's outfeed thread, is what TPUEstimator builds:
`{signal_name: {"stopping": ...}, "host_call": host_fn(*tensors),
"__force_dequeue": ...}`, where each tensor is concatenated over replicas
along axis 0 in replica order (`[num_replicas * k, ...]` for a `[k, ...]`
tensor; for one replica, the tensor itself), and the host functions are
replica 0's (TPUEstimator traces the step once). Under BROADCAST input,
TPUEstimator assumes identical replicas and hands over replica 0's tensors
(every replica's record is still dequeued).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.testing.infeed import fifo_queue

_BROADCAST = tpu_config.InputPipelineConfig.BROADCAST

HOST_CALL = "host_call"
FORCE_DEQUEUE = "__force_dequeue"


class OutfeedRecord:
    """One named entry of the emulated outfeed: a host fn and its tensors."""

    def __init__(
        self, name: str, host_fn: Callable[..., Any], tensors: Any, allow_scalars: bool = False
    ):
        self.name = name
        self.host_fn = host_fn
        if isinstance(tensors, Mapping):
            self.keys: Optional[list] = list(tensors)
            self.tensors = [tensors[key] for key in self.keys]
        else:
            self.keys = None
            self.tensors = list(tensors)
        for tensor in self.tensors:
            if not allow_scalars and tensor.shape.ndims == 0:
                raise RuntimeError(
                    f"All tensors outfed from TPU should preserve batch size dimension, but "
                    f"{name!r} outfeeds scalar {tensor!r} (give it a leading dimension)."
                )

    def call_host_fn(self, dequeued: Sequence[tf.Tensor]) -> Any:
        if self.keys is not None:
            return self.host_fn(**dict(zip(self.keys, dequeued)))
        return self.host_fn(*dequeued)


def step_records(
    spec: Any,
    features: Any,
    loss: tf.Tensor,
    hook_class: type,
    input_mode: Any = tpu_config.InputPipelineConfig.PER_HOST_V2,
) -> list[OutfeedRecord]:
    """What one replica's step outfeeds: the stop flag, then the host call (or the loss).

    Call it while the replica is built: the stop flag is summed over replicas
    there. Scalars are rejected, as TPUEstimator rejects them, except under
    BROADCAST input (only replica 0's tensors reach the host, unconcatenated).
    """
    allow_scalars = input_mode is _BROADCAST
    records = []
    signals, signal_name = hook_class.get_stopping_signals_and_name(features)
    if signals is not None:
        records.append(OutfeedRecord(signal_name, lambda **kw: kw, signals, allow_scalars))
    host_call = getattr(spec, "host_call", None)
    if host_call is not None:
        _tpu_estimator._OutfeedHostCall.validate({HOST_CALL: host_call})
        if host_call[1]:
            records.append(OutfeedRecord(HOST_CALL, host_call[0], host_call[1], allow_scalars))
    else:
        # Like TPUEstimator: without host call, outfeed the loss to track progress.
        records.append(OutfeedRecord(HOST_CALL, lambda loss_t: loss_t, [tf.reshape(loss, [1])]))
    return records


def _check_same_records(records_per_replica: Sequence[Sequence[OutfeedRecord]]) -> None:
    """Every replica must outfeed the same records (names, dtypes, trailing shapes)."""

    def layout(records: Sequence[OutfeedRecord]) -> list:
        return [
            (
                r.name,
                [(t.dtype, t.shape.as_list()[1:] if t.shape.rank else None) for t in r.tensors],
            )
            for r in records
        ]

    first = layout(records_per_replica[0])
    for replica, records in enumerate(records_per_replica[1:], start=1):
        if layout(records) != first:
            raise ValueError(
                f"Replica {replica} outfeeds {layout(records)} but replica 0 outfeeds {first}; "
                "every replica must record the same tensors (TPUEstimator traces one step)."
            )


class Outfeed:
    """The outfeed queue, created by the first step that has something to send.

    Args:
      every_n_steps: Outfeed on steps `step % every_n_steps == 0` of each loop.
      input_mode: The input deployment (BROADCAST hands replica 0's tensors over).
    """

    def __init__(
        self, every_n_steps: int, input_mode: Any = tpu_config.InputPipelineConfig.PER_HOST_V2
    ):
        self._every_n_steps = every_n_steps
        self._broadcast = input_mode is _BROADCAST
        self._queue: Optional[tf.queue.FIFOQueue] = None
        self._records: list[OutfeedRecord] = []
        self._tensors: list = []
        self._num_replicas = 1

    def enqueue(
        self, step: tf.Tensor, records_per_replica: Sequence[Sequence[OutfeedRecord]]
    ) -> list:
        """Ops enqueueing every replica's records on steps `step % every_n_steps == 0`.

        Call in the loop body, with the records of each replica in replica order.
        """
        _check_same_records(records_per_replica)
        tensors = [t for records in records_per_replica for r in records for t in r.tensors]
        if not tensors:
            return []
        # The queue must live in the outer graph, not in the loop body.
        with tf.init_scope():
            self._queue = fifo_queue(
                [tf.TensorSpec(t.shape, t.dtype) for t in tensors], "emulated_outfeed"
            )
        self._records = list(records_per_replica[0])
        self._tensors = tensors
        self._num_replicas = len(records_per_replica)
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
        """The host side: dequeue one step's records, combine the replicas', run the host fns."""
        dequeue_ops: dict = {}
        if self._queue is None:
            return dequeue_ops
        dequeued = tf.nest.flatten(self._queue.dequeue())
        for value, tensor in zip(dequeued, self._tensors):
            value.set_shape(tensor.shape)
        per_replica = len(dequeued) // self._num_replicas
        pos = 0
        for record in self._records:
            values = [
                self._combine(
                    [dequeued[r * per_replica + pos + j] for r in range(self._num_replicas)]
                )
                for j in range(len(record.tensors))
            ]
            pos += len(record.tensors)
            result = record.call_host_fn(values)
            if result is not None:
                dequeue_ops[record.name] = result
        dequeue_ops[FORCE_DEQUEUE] = tf.group(*dequeued)
        return dequeue_ops

    def _combine(self, replicas: list) -> tf.Tensor:
        """TPUEstimator's host side: replica 0's under BROADCAST, else concatenated on axis 0."""
        if self._broadcast:
            with tf.control_dependencies(replicas):
                return tf.identity(replicas[0])
        return tf.concat(replicas, axis=0)
