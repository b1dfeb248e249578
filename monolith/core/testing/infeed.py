"""The emulated infeed: the input_fn's dataset pushed through a FIFO queue.

`enqueue_ops` (run by the feed hook's infeed thread) moves one element of the
dataset into the queue, or with `run_infeed_loop_on_coordinator=False` a whole
loop's worth (a while loop of `iterations_per_loop` enqueues), as
TPUEstimator's device-side input loop does. The train step dequeues one element.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

import tensorflow as tf

from monolith.core.testing import user_params
from monolith.core.testing.options import BuildOptions


def fifo_queue(specs: Sequence[Any], name: str) -> tf.queue.FIFOQueue:
    """An unbounded FIFO queue of `specs` (with shapes if all are static)."""
    dtypes = [spec.dtype for spec in specs]
    shapes = [tf.TensorShape(spec.shape) for spec in specs]
    if all(shape.is_fully_defined() for shape in shapes):
        return tf.queue.FIFOQueue(1 << 30, dtypes, shapes=shapes, name=name)
    return tf.queue.FIFOQueue(1 << 30, dtypes, name=name)


@dataclasses.dataclass(frozen=True)
class Infeed:
    """The infeed's graph pieces.

    Attributes:
      element_spec: The dataset's element structure.
      specs: Its flattened `tf.TensorSpec`s.
      queue: The infeed queue.
      enqueue_ops: What the infeed thread runs.
      iterator_initializer: Initialises the input iterator.
    """

    element_spec: Any
    specs: tuple
    queue: tf.queue.FIFOQueue
    enqueue_ops: list
    iterator_initializer: tf.Operation

    def dequeue(self) -> tuple:
        """One dataset element as `(features, labels)` (labels None without them)."""
        values = tf.nest.flatten(self.queue.dequeue())
        for value, spec in zip(values, self.specs):
            value.set_shape(spec.shape)
        element = tf.nest.pack_sequence_as(self.element_spec, values)
        if isinstance(element, tuple) and len(element) == 2:
            return element
        return element, None

    def static_batch_size(self) -> Union[int, None]:
        """The leading dimension of the first component, if static."""
        dims = self.specs[0].shape.as_list() if self.specs else []
        return dims[0] if dims else None


def _make_dataset(
    input_fn: Union[Callable[..., tf.data.Dataset], tf.data.Dataset], options: BuildOptions
) -> tf.data.Dataset:
    if isinstance(input_fn, tf.data.Dataset):
        return input_fn
    if not callable(input_fn):
        raise TypeError(f"input_fn={input_fn!r} must be a callable returning a tf.data.Dataset.")
    dataset = user_params.call_input_fn(input_fn, options)
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


def build_infeed(
    input_fn: Union[Callable[..., tf.data.Dataset], tf.data.Dataset],
    options: BuildOptions,
    iterations_per_loop_var: tf.Variable,
) -> Infeed:
    """Calls `input_fn` and builds the infeed queue and its enqueue ops."""
    dataset = _make_dataset(input_fn, options)
    specs = _component_specs(dataset)
    iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
    queue = fifo_queue(specs, "emulated_infeed")

    def _enqueue_next() -> tf.Operation:
        return queue.enqueue(tf.nest.flatten(iterator.get_next()))

    if options.run_infeed_loop_on_coordinator:
        enqueue_ops = [_enqueue_next()]
    else:

        def _enqueue_one(i: tf.Tensor) -> tf.Tensor:
            with tf.control_dependencies([_enqueue_next()]):
                return i + 1

        loop_size = tf.identity(iterations_per_loop_var)
        enqueue_ops = [
            tf.compat.v1.while_loop(
                lambda i: i < loop_size, _enqueue_one, [tf.constant(0)], parallel_iterations=1
            )
        ]
    return Infeed(
        element_spec=dataset.element_spec,
        specs=specs,
        queue=queue,
        enqueue_ops=enqueue_ops,
        iterator_initializer=iterator.initializer,
    )
