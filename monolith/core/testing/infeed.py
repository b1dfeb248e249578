"""The emulated infeed: one input pipeline per host, one FIFO queue per replica.

As TPUEstimator deploys the input (see `topology`), `input_fn` is called once
per host (once, for host 0, under BROADCAST), each call's dataset gets its
own initializable iterator, and `enqueue_ops` holds one op per input pipeline,
which the feed hook's infeed thread runs together:

* PER_HOST_V2: one `get_next()` per replica of the host, in replica order
  (each after the previous one's values, as TPUEstimator orders them), each
  element into its replica's queue;
* PER_HOST_V1: one `get_next()` per host, split along axis 0 over the host's
  replicas;
* BROADCAST: one `get_next()` (host 0), the same element into every
  replica's queue.

With `run_infeed_loop_on_coordinator=False` each op enqueues a whole loop's
worth (a while loop of `iterations_per_loop` steps), as TPUEstimator's
device-side input loop does. Each replica's train step dequeues one element
from its own queue.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence, Union

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config

from monolith.core.feed.signal import _USER_PROVIDED_SIGNAL_NAME
from monolith.core.testing import user_params
from monolith.core.testing.options import BuildOptions
from monolith.core.testing.topology import Topology

_Mode = tpu_config.InputPipelineConfig


def fifo_queue(specs: Sequence[Any], name: str) -> tf.queue.FIFOQueue:
    """An unbounded FIFO queue of `specs` (with shapes if all are static)."""
    dtypes = [spec.dtype for spec in specs]
    shapes = [tf.TensorShape(spec.shape) for spec in specs]
    if all(shape.is_fully_defined() for shape in shapes):
        return tf.queue.FIFOQueue(1 << 30, dtypes, shapes=shapes, name=name)
    return tf.queue.FIFOQueue(1 << 30, dtypes, name=name)


@dataclasses.dataclass(frozen=True)
class DequeuedBatch:
    """One replica's batch of one step.

    Attributes:
      features: The features (the element itself when it is not a pair).
      labels: The labels, or None.
      dequeue_op: The op that took it from the replica's queue.
    """

    features: Any
    labels: Any
    dequeue_op: tf.Operation

    def is_padding(self) -> tf.Tensor:
        """Scalar bool: the batch is padding (any element of its signal feature is set).

        A batch without the signal feature (`_USER_PROVIDED_SIGNAL_NAME`) is real.
        """
        features = self.features
        if not isinstance(features, Mapping) or _USER_PROVIDED_SIGNAL_NAME not in features:
            return tf.constant(False)
        flag = tf.convert_to_tensor(features[_USER_PROVIDED_SIGNAL_NAME])
        return tf.reduce_any(tf.not_equal(flag, tf.zeros([], flag.dtype)))


@dataclasses.dataclass(frozen=True)
class Infeed:
    """The infeed's graph pieces.

    Attributes:
      element_spec: The structure of one replica's element.
      specs: Its flattened `tf.TensorSpec`s.
      queues: One queue per replica, in replica order.
      enqueue_ops: What the infeed thread runs: one op per input pipeline.
      iterator_initializer: Initialises every input pipeline's iterator.
      topology: The emulated pod.
      iterators: Each input pipeline's iterator, in host order (one under BROADCAST).
      next_is_real: Per input pipeline, a scalar bool that takes the
        pipeline's next element and says whether it is real (not padding; see
        `DequeuedBatch.is_padding`). Run only to drain a stream after
        training stopped (`TrainResult.untrained_real_batches`).
    """

    element_spec: Any
    specs: tuple
    queues: tuple
    enqueue_ops: list
    iterator_initializer: tf.Operation
    topology: Topology
    iterators: tuple = ()
    next_is_real: tuple = ()

    def dequeue(self, replica: int = 0, after: Sequence[Any] = ()) -> DequeuedBatch:
        """One element of `replica`'s queue, split into features and labels.

        Args:
          replica: Whose queue.
          after: Tensors or ops the dequeue waits for (and so everything the
            step computes from the batch).
        """
        with tf.control_dependencies(after):
            values = tf.nest.flatten(self.queues[replica].dequeue())
        for value, spec in zip(values, self.specs):
            value.set_shape(spec.shape)
        element = tf.nest.pack_sequence_as(self.element_spec, values)
        return _split(element, values[0].op)

    def static_batch_size(self) -> Union[int, None]:
        """The global batch size: each replica's leading dimension (if static) over the pod."""
        dims = self.specs[0].shape.as_list() if self.specs else []
        if not dims or dims[0] is None:
            return None
        if self.topology.broadcast:
            return dims[0]
        return dims[0] * self.topology.num_replicas


def _make_dataset(
    input_fn: Union[Callable[..., tf.data.Dataset], tf.data.Dataset],
    options: BuildOptions,
    host: int,
) -> tf.data.Dataset:
    if isinstance(input_fn, tf.data.Dataset):
        if len(options.topology.input_hosts) > 1:
            raise TypeError(
                f"input_fn={input_fn!r} is a dataset, but {options.topology.num_hosts} hosts each "
                "call input_fn for their own pipeline: pass a callable returning a tf.data.Dataset."
            )
        return input_fn
    if not callable(input_fn):
        raise TypeError(f"input_fn={input_fn!r} must be a callable returning a tf.data.Dataset.")
    dataset = user_params.call_input_fn(input_fn, options, host)
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"input_fn returned {type(dataset).__name__}; the emulator needs a tf.data.Dataset."
        )
    return dataset


def _component_specs(dataset: tf.data.Dataset) -> tuple:
    specs = tuple(tf.nest.flatten(dataset.element_spec))
    for spec in specs:
        if not isinstance(spec, tf.TensorSpec):
            raise TypeError(
                f"dataset element component {spec!r} is not a dense tensor; the TPU infeed "
                "(and this emulation of it) only carries dense tensors."
            )
    return specs


def _replica_specs(specs: tuple, topology: Topology) -> tuple:
    """What each replica receives: the host's element, or under PER_HOST_V1 a 1/R slice of it."""
    if topology.input_mode is not _Mode.PER_HOST_V1:
        return specs
    parts = topology.replicas_per_host
    sliced = []
    for spec in specs:
        shape = spec.shape
        if shape.rank == 0:
            raise ValueError(
                f"PER_HOST_V1 splits each host's batch over its {parts} replicas along axis 0, "
                f"but input component {spec!r} is a scalar."
            )
        rows = tf.compat.dimension_value(shape[0]) if shape.rank is not None else None
        if rows is not None and rows % parts:
            raise ValueError(
                f"PER_HOST_V1 splits each host's batch over its {parts} replicas along axis 0, "
                f"but input component {spec!r} has {rows} rows."
            )
        if rows is not None:
            shape = tf.TensorShape([rows // parts]).concatenate(shape[1:])
        sliced.append(tf.TensorSpec(shape, spec.dtype, spec.name))
    return tuple(sliced)


def _host_enqueue(
    iterator: Any, host: int, queues: Sequence[tf.queue.FIFOQueue], topology: Topology
) -> tf.Operation:
    """The op moving one step's elements of `host`'s pipeline into its replicas' queues."""
    if topology.broadcast:
        flat = tf.nest.flatten(iterator.get_next())
        return tf.group(*[queue.enqueue(flat) for queue in queues])
    replicas = topology.replicas_of(host)
    if topology.input_mode is _Mode.PER_HOST_V1:
        flat = tf.nest.flatten(iterator.get_next())
        pieces = [tf.split(value, topology.replicas_per_host, axis=0) for value in flat]
        enqueues = [
            queues[replica].enqueue([piece[i] for piece in pieces])
            for i, replica in enumerate(replicas)
        ]
        return enqueues[0] if len(enqueues) == 1 else tf.group(*enqueues)
    enqueues, previous = [], []
    for replica in replicas:
        # Each get_next() after the previous replica's values: replicas get
        # consecutive elements in replica order, as TPUEstimator orders them.
        with tf.control_dependencies(previous):
            flat = tf.nest.flatten(iterator.get_next())
        previous = previous + flat
        enqueues.append(queues[replica].enqueue(flat))
    return enqueues[0] if len(enqueues) == 1 else tf.group(*enqueues)


def _in_loop(enqueue: Callable[[], tf.Operation], iterations_per_loop_var: tf.Variable) -> Any:
    """A while loop running `enqueue` `iterations_per_loop` times (one loop's worth)."""

    def _enqueue_one(i: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([enqueue()]):
            return i + 1

    loop_size = tf.identity(iterations_per_loop_var)
    return tf.compat.v1.while_loop(
        lambda i: i < loop_size, _enqueue_one, [tf.constant(0)], parallel_iterations=1
    )


def build_infeed(
    input_fn: Union[Callable[..., tf.data.Dataset], tf.data.Dataset],
    options: BuildOptions,
    iterations_per_loop_var: tf.Variable,
) -> Infeed:
    """Calls `input_fn` per host and builds the replicas' queues and the hosts' enqueue ops."""
    topology = options.topology
    datasets = {host: _make_dataset(input_fn, options, host) for host in topology.input_hosts}
    element_spec = datasets[0].element_spec
    for host, dataset in datasets.items():
        if dataset.element_spec != element_spec:
            raise ValueError(
                f"input_fn returned elements {dataset.element_spec!r} for host {host} but "
                f"{element_spec!r} for host 0; every host's input must have one structure, "
                "as TPUEstimator requires."
            )
    specs = _replica_specs(_component_specs(datasets[0]), topology)
    names = (
        ["emulated_infeed"]
        if topology.num_replicas == 1
        else [f"emulated_infeed_replica_{r}" for r in range(topology.num_replicas)]
    )
    queues = tuple(fifo_queue(specs, name) for name in names)
    iterators = {
        host: tf.compat.v1.data.make_initializable_iterator(dataset)
        for host, dataset in datasets.items()
    }
    enqueue_ops = []
    for host, iterator in iterators.items():

        def _enqueue(iterator: Any = iterator, host: int = host) -> tf.Operation:
            return _host_enqueue(iterator, host, queues, topology)

        if options.run_infeed_loop_on_coordinator:
            enqueue_ops.append(_enqueue())
        else:
            enqueue_ops.append(_in_loop(_enqueue, iterations_per_loop_var))
    initializers = [iterator.initializer for iterator in iterators.values()]
    next_is_real = tuple(
        tf.logical_not(_split(iterator.get_next()).is_padding(), name=f"host_{host}_next_is_real")
        for host, iterator in iterators.items()
    )
    return Infeed(
        element_spec=_replica_element_spec(element_spec, specs),
        specs=specs,
        queues=queues,
        enqueue_ops=enqueue_ops,
        iterator_initializer=initializers[0] if len(initializers) == 1 else tf.group(*initializers),
        topology=topology,
        iterators=tuple(iterators.values()),
        next_is_real=next_is_real,
    )


def _split(element: Any, dequeue_op: Any = None) -> DequeuedBatch:
    """`element` as features and labels (a 2-tuple is `(features, labels)`)."""
    if isinstance(element, tuple) and len(element) == 2:
        return DequeuedBatch(element[0], element[1], dequeue_op)
    return DequeuedBatch(element, None, dequeue_op)


def _replica_element_spec(element_spec: Any, specs: tuple) -> Any:
    return tf.nest.pack_sequence_as(element_spec, list(specs))
