"""The graph pieces of the feed hook: its `begin()`'s, and the stop flag of the TPU step.

`create_or_get_iterations_per_loop` is the body of the hook's overridable
`_create_or_get_iterations_per_loop` (the original's); `summary_writer_ops`
gives the summary writers' initializers (run in `after_create_session`) and
flushes (run in `end()`). `stopping_signals` is the body of the hook's
`get_stopping_signals_and_name`, which TPUEstimator calls inside its TPU
train step.
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Mapping, Optional, Tuple

import tensorflow as tf
from absl import logging
from tensorflow.python.framework import ops
from tensorflow.python.ops import summary_ops_v2

from monolith.core.common.tpu_context import sum_over_replicas
from monolith.core.feed.signal import (
    _REAL_EXAMPLES_KEY,
    _STOPPING_KEY,
    _USER_PROVIDED_SIGNAL_NAME,
    StopRule,
    follow_stop_rule,
)

_TPU_ESTIMATOR = "tpu_estimator"
_ITERATIONS_PER_LOOP_VAR = "iterations_per_loop"


def create_or_get_iterations_per_loop() -> tf.Variable:
    """Creates or gets TPUEstimator's `iterations_per_loop` variable in the default graph.

    TPUEstimator wraps the model_fn in a `tf.while_loop` of this many steps per
    `session.run`; a variable (not a constant) lets the step hook shorten the
    last loop to hit the requested number of steps. It is the variable
    TPUEstimator creates (`tpu_estimator/iterations_per_loop`, collection
    `tpu_estimator_iterations_per_loop`): whichever side creates it first, the
    other reuses it.

    Returns:
      The int32 scalar, non-trainable, local resource variable.

    Raises:
      RuntimeError: The collection holds more than one variable.
    """
    graph = tf.compat.v1.get_default_graph()
    collection_name = f"{_TPU_ESTIMATOR}_{_ITERATIONS_PER_LOOP_VAR}"
    iter_vars = graph.get_collection(collection_name)
    if len(iter_vars) == 1:
        return iter_vars[0]
    if len(iter_vars) > 1:
        raise RuntimeError(
            f"Multiple iterations_per_loop_var in collection {collection_name!r}: "
            f"{[v.name for v in iter_vars]}."
        )
    global_step = tf.compat.v1.train.get_global_step()
    colocation = (
        ops.colocate_with(global_step) if global_step is not None else contextlib.nullcontext()
    )
    with colocation, tf.compat.v1.variable_scope(_TPU_ESTIMATOR, reuse=tf.compat.v1.AUTO_REUSE):
        return tf.compat.v1.get_variable(
            _ITERATIONS_PER_LOOP_VAR,
            initializer=tf.compat.v1.initializers.zeros(),
            shape=[],
            dtype=tf.dtypes.int32,
            trainable=False,
            collections=[collection_name, tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
            use_resource=True,
        )


def summary_writer_ops() -> Tuple[List[tf.Operation], List[tf.Operation]]:
    """The default graph's summary-writer initializers, and a flush of each writer.

    The writers' resources are the initializers' inputs; `legacy_raw_flush`
    flushes one by its resource (TF >= 2.10 dropped the original's `flush`).
    """
    init_ops = list(summary_ops_v2.summary_writer_initializer_op())
    flushes = [summary_ops_v2.legacy_raw_flush(writer=op.inputs[0]) for op in init_ops]
    return init_ops, flushes


def stopping_signals(features: Any) -> Optional[dict]:
    """The per-step stop flag to outfeed, under the graph's stop rule; None without a signal.

    `features` enables the signal when it is a dict holding
    `_USER_PROVIDED_SIGNAL_NAME` (bool or int, True/non-zero on padding
    examples). The rule is the one `append_stopping_signals` recorded in the
    graph (`feed.signal.follow_stop_rule`):

    * `StopRule.ANY_REPLICA_PADDING` (the original's): `"stopping"` is the
      flag summed over replicas, > 0: True where any replica's example is
      padding, so a step in which any replica pads stops training.
    * `StopRule.ALL_REPLICAS_PADDING`: `"stopping"` is True (on every
      element) only when no replica has a real example in the step.

    Inside a TPU replicate context the sums are cross-replica (every replica
    outfeeds the same `"stopping"`); outside one (CPU, one replica) they are
    the local values. `"real_examples"` (int32 `[1]`) is this replica's own
    count of real examples: TPUEstimator concatenates it over replicas, in
    replica order, so the feed hook can name the replicas that still had data
    when training stopped. A scalar flag is reshaped to `[1]`, as the outfeed
    needs a leading dimension.

    Raises:
      ValueError: The graph's pipelines recorded different stop rules, or a
        reader built earlier followed another rule (see `follow_stop_rule`).
    """
    if not isinstance(features, Mapping) or _USER_PROVIDED_SIGNAL_NAME not in features:
        return None
    logging.info("Get stopping signals and name.")
    rule = follow_stop_rule("the TPU step's stop signal (get_stopping_signals_and_name)")
    padding = tf.cast(features[_USER_PROVIDED_SIGNAL_NAME], tf.int32) > 0
    if padding.shape.ndims == 0:
        padding = tf.reshape(padding, [1])
    flag = tf.cast(padding, tf.int32)
    real_examples = tf.reshape(tf.reduce_sum(1 - flag), [1])
    if rule is StopRule.ANY_REPLICA_PADDING:
        stopping = sum_over_replicas(flag) > 0
    else:
        no_real_example = tf.equal(sum_over_replicas(real_examples), 0)
        stopping = tf.logical_or(tf.zeros_like(padding), no_real_example)
    return {_STOPPING_KEY: stopping, _REAL_EXAMPLES_KEY: real_examples}
