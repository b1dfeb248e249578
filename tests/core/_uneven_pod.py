"""An uneven pod for the stop-rule tests: hosts read id shards of different lengths.

Host h reads its own shard of `shards[h]` per-replica batches of ids, every
example with its own id (host 0: ids 1 .. 40b, host 1: the next 25b, for
shards (40, 25) and per-replica batch b), resumes with
`skip_trained_batches` and ends with `append_stopping_signals(stop_rule=...)`.
The label of id i is `score(i) > 0.5`.

The model is what a user writes for either rule, unchanged between them: a
linear regression of `cos(id)` on `(id / N, sin(id), 1)` with
`masked_mean_loss` and Adam under `skip_padding_steps(CrossShardOptimizer(
..., reduction=SUM))`, and, in the same train op, checkpointed counters
updated by the real examples of the steps that train (`is_padding_step`),
summed over replicas: `trained_times[id]` and `real_examples`. Its host
call records the labels, a fixed score per id as the prediction (padding
examples, id 0, score 1.0 with label 0: a negative ranked first) and the
padding flag, so its AUC is 1 exactly when padding is left out.
`reference_weights` trains the same steps in numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall
from monolith.core.stopping_signals import (
    USER_PROVIDED_SIGNAL_NAME,
    StopRule,
    append_stopping_signals,
    is_padding_step,
    masked_mean_loss,
    skip_padding_steps,
    skip_trained_batches,
)

SHARDS = (40, 25)  # per-replica batches of host 0 and host 1
LEARNING_RATE = 0.05
ANY, ALL = StopRule.ANY_REPLICA_PADDING, StopRule.ALL_REPLICAS_PADDING


def num_ids(shards: Sequence[int], batch: int) -> int:
    return sum(shards) * batch


def score(ids: np.ndarray) -> np.ndarray:
    """The fixed prediction the host call records for id i: 1 - (37 i mod 101) / 101."""
    return 1.0 - (np.asarray(ids) * 37 % 101) / 101.0


def _tf_score(ids: tf.Tensor) -> tf.Tensor:
    return 1.0 - tf.cast(tf.math.floormod(ids * 37, 101), tf.float32) / 101.0


def shard_ids(shards: Sequence[int], batch: int, host: int) -> np.ndarray:
    """Host `host`'s ids, in order: `[shards[host], batch]`."""
    first = sum(shards[:host]) * batch + 1
    return np.arange(first, first + shards[host] * batch).reshape([shards[host], batch])


def input_fn(params, config):
    """This host's shard, resumed after the trained batches, then padding under params' rule."""
    del config
    context = params["context"]
    shards, batch = params["shards"], params["batch_size"]
    ids = shard_ids(shards, batch, context.current_host).reshape([-1])
    dataset = tf.data.Dataset.from_tensor_slices(ids).batch(batch, drop_remainder=True)
    dataset = dataset.map(lambda i: ({"id": i}, tf.cast(_tf_score(i) > 0.5, tf.float32)))
    dataset = skip_trained_batches(dataset, context=context)
    return append_stopping_signals(dataset, stop_rule=params.get("stop_rule", ANY))


def _counter(name: str, shape: list) -> tf.Variable:
    return tf.compat.v1.get_variable(
        name, shape, tf.int64, tf.compat.v1.zeros_initializer(), trainable=False
    )


def model_fn(features, labels, mode, params, config):
    """The same for both rules; `params["masked"] = False` trains an unmasked mean instead."""
    n = num_ids(params["shards"], params["batch_size"])
    ids, flag = features["id"], features[USER_PROVIDED_SIGNAL_NAME]
    idf = tf.cast(ids, tf.float32)
    x = tf.stack([idf / n, tf.sin(idf), tf.ones_like(idf)], axis=1)
    weights = tf.compat.v1.get_variable("w", [3], initializer=tf.compat.v1.zeros_initializer())
    per_example = tf.square(tf.linalg.matvec(x, weights) - tf.cos(idf))
    if params.get("masked", True):
        loss = masked_mean_loss(per_example, features)
    else:
        loss = tf.reduce_mean(per_example)
    optimizer = skip_padding_steps(
        tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.AdamOptimizer(LEARNING_RATE),
            reduction=tf.compat.v1.losses.Reduction.SUM,
        ),
        features,
    )
    global_step = tf.compat.v1.train.get_global_step()
    minimize = optimizer.minimize(loss, global_step=global_step)

    # Counters of what the step trains: every replica's real examples (a
    # cross-replica sum: each replica holds a copy), only on steps that train.
    real = tf.cast(tf.logical_not(flag), tf.int32)
    counts = tf.compat.v1.tpu.cross_replica_sum(tf.math.unsorted_segment_sum(real, ids, n + 1))
    counts = tf.where(is_padding_step(features), tf.zeros_like(counts), counts)
    trained_times = _counter("trained_times", [n + 1])
    real_examples = _counter("real_examples", [])
    train_op = tf.group(
        minimize,
        trained_times.assign_add(tf.cast(counts, tf.int64)),
        real_examples.assign_add(tf.cast(tf.reduce_sum(counts), tf.int64)),
    )

    host_call = BaseEmbeddingHostCall(
        config.model_dir if config is not None else params["model_dir"],
        enable_host_call=True,
        enable_deepinsight=False,
        enable_host_call_scalar_metrics=True,
        enable_caching_with_tpu_var_mode=False,
        top_k_sampling_num_per_core=params["batch_size"],
        params=dict(params, enable_host_call=True, cpu_test=False, host_call_every_n_steps=1),
    )
    host_call.record_summary_tensor("labels_for_auc_calculation", labels)
    host_call.record_summary_tensor("y_pred_for_auc_calculation", _tf_score(ids))
    host_call.record_summary_tensor("stopping_signals", flag)
    return tpu_estimator.TPUEstimatorSpec(
        mode,
        loss=loss,
        train_op=train_op,
        host_call=host_call.generate_host_call_hook(),
        training_hooks=host_call.tpu_var_restore_hooks,
    )


def trained_steps(shards: Sequence[int], batch: int, replicas_per_host: int, rule: StopRule):
    """The ids of each step the rule trains: one array per step (every replica's real ids)."""
    hosts = [shard_ids(shards, batch, h) for h in range(len(shards))]
    steps = []
    for step in range(max(-(-s // replicas_per_host) for s in shards)):
        rows = slice(step * replicas_per_host, (step + 1) * replicas_per_host)
        parts = [h[rows] for h in hosts]
        some_padding = any(len(part) < replicas_per_host for part in parts)
        if rule is ANY and some_padding:
            break
        steps.append(np.concatenate([part.reshape([-1]) for part in parts]))
    return steps


def reference_weights(steps: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Adam (TF v1's update) on the mean squared error over each step's ids, in float64."""
    weights, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
    beta1, beta2, epsilon = 0.9, 0.999, 1e-8
    for t, ids in enumerate(steps, start=1):
        idf = ids.astype(np.float64)
        x = np.stack([idf / n, np.sin(idf), np.ones_like(idf)], axis=1)
        grad = 2.0 * ((x @ weights - np.cos(idf))[:, None] * x).mean(axis=0)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        rate = LEARNING_RATE * np.sqrt(1 - beta2**t) / (1 - beta1**t)
        weights = weights - rate * m / (np.sqrt(v) + epsilon)
    return weights
