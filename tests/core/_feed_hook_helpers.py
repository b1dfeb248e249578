"""Shared pieces of the feed-hook and emulator tests: padded stream, counting model, controller."""

from __future__ import annotations

import queue
import threading

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import TPUEstimatorSpec

from monolith.core.auto_checkpoint_feed_hook import _USER_PROVIDED_SIGNAL_NAME

SIGNAL = _USER_PROVIDED_SIGNAL_NAME
BATCH = 2


def padded_stream_fn(num_batches: int, batch: int = BATCH, first_id: int = 1, fail_at=None):
    """input_fn: `num_batches` real batches of ids, then endless padding batches.

    Real batches hold ids first_id, first_id+1, ... with the signal False;
    padding batches hold id 0 with the signal True. With `fail_at=k` the
    pipeline raises InvalidArgumentError on the k-th real element (0-based).
    """

    def input_fn():
        ids = tf.data.Dataset.range(first_id, first_id + num_batches * batch)
        if fail_at is not None:
            bad = first_id + fail_at

            def _check(x):
                with tf.control_dependencies(
                    [tf.debugging.assert_none_equal(x, tf.constant(bad, tf.int64))]
                ):
                    return tf.identity(x)

            ids = ids.map(_check)
        real = ids.batch(batch, drop_remainder=True).map(
            lambda x: {"id": tf.cast(x, tf.float32), SIGNAL: tf.zeros([batch], tf.bool)}
        )
        pad = tf.data.Dataset.from_tensors(
            {"id": tf.zeros([batch], tf.float32), SIGNAL: tf.ones([batch], tf.bool)}
        ).repeat()
        return real.concatenate(pad)

    return input_fn


def _counter(name: str) -> tf.Variable:
    return tf.compat.v1.get_variable(
        name, [], tf.float32, tf.compat.v1.zeros_initializer(), trainable=False
    )


def counting_model_fn(features, mode, params):
    """Counts real examples, their id sum and padding steps in checkpointed variables.

    `params["fail"]` (optional) is "nan" (CheckNumerics on step 3) or "assert"
    (an ordinary op error on step 3).
    """
    real = 1.0 - tf.cast(features[SIGNAL], tf.float32)
    examples = _counter("real_examples")
    id_sum = _counter("id_sum")
    padding_steps = _counter("padding_steps")
    weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
    global_step = tf.compat.v1.train.get_global_step()
    loss = tf.reduce_sum(features["id"] * real) * weight * 1e-3
    fail = params.get("fail")
    if fail is not None:
        third = tf.equal(global_step, 2)
        if fail == "nan":
            loss = tf.debugging.check_numerics(
                tf.where(third, tf.constant(float("nan")), loss), "loss is not finite"
            )
        else:
            with tf.control_dependencies(
                [tf.debugging.assert_equal(third, False, message="step 3 refused")]
            ):
                loss = tf.identity(loss)
    # The update waits for the forward loss: otherwise the global step read by
    # the failure check could run after this step's increment (gradients do
    # not depend on the check), and the check would never see step 3.
    with tf.control_dependencies([loss]):
        minimize = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(
            loss, global_step=global_step
        )
    train_op = tf.group(
        minimize,
        examples.assign_add(tf.reduce_sum(real)),
        id_sum.assign_add(tf.reduce_sum(features["id"] * real)),
        padding_steps.assign_add(1.0 - tf.reduce_min(real)),
    )
    return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


def read_counts(checkpoint: str) -> dict:
    """The counting model's variables and the global step in `checkpoint`."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {
        "real_examples": int(reader.get_tensor("real_examples")),
        "id_sum": int(reader.get_tensor("id_sum")),
        "padding_steps": int(reader.get_tensor("padding_steps")),
        "global_step": int(reader.get_tensor("global_step")),
    }


class ListController:
    """A FeedController that is not an _OpQueueContext: the protocol's members and no more.

    Runs `target(self, *args)` on its own daemon thread, records each loop size
    it is sent (`sizes`) and the coordinator attached to it (`coord`); its
    thread stops waiting for work once that coordinator stops.
    """

    def __init__(self, name, target, args):
        self.sizes = []
        self.coord = None
        self._queue = queue.Queue()
        self._progress = threading.Condition()
        self._finished = 0
        self._thread = threading.Thread(name=name, target=target, args=(self, *args), daemon=True)
        self._thread.start()

    @property
    def thread(self):
        return self._thread

    def watch_coordinator(self, coord):
        self.coord = coord

    def send_next_batch_signal(self, iterations):
        self.sizes.append(iterations)
        self._queue.put(iterations)

    def read_iteration_counts(self):
        while True:
            try:
                iterations = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.coord is not None and self.coord.should_stop():
                    return
                continue
            if iterations is None:
                return
            yield iterations
            with self._progress:
                self._finished += 1
                self._progress.notify_all()

    def wait_for_finished_loops(self, loops, timeout=None):
        with self._progress:
            return self._progress.wait_for(lambda: self._finished >= loops, timeout)

    def join(self, timeout=None):
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
