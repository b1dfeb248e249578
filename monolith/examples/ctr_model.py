"""A small CTR model for TPUEstimator, with end-of-stream input and host call.

One `input_fn` and one `model_fn`, written as for `TPUEstimator(use_tpu=True)`,
which run unchanged on a Cloud TPU and on CPU through `monolith.core.testing`:

* `input_fn` builds a deterministic synthetic click log (no download) and ends
  it with `append_stopping_signals`, so the feed hook stops training by itself
  after the last real batch;
* `model_fn` looks up user and item embeddings, runs a two-layer MLP, masks the
  loss of padding examples (a padding step then changes no weight), counts the
  real examples it trains in a checkpointed variable, and records its metrics
  with `BaseEmbeddingHostCall` for AUC and DeepInsight summaries.

Params (beyond TPUEstimator's `batch_size` and `context`): `model_dir`,
`num_examples`, `seed`, `on_tpu`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

from monolith.core.auto_checkpoint_feed_hook import _USER_PROVIDED_SIGNAL_NAME
from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall
from monolith.core.stopping_signals import append_stopping_signals

NUM_USERS = 1_000
NUM_ITEMS = 500
NUM_DENSE = 4
EMBEDDING_DIM = 8
HIDDEN_UNITS = 32
# Users hash into 100 of the host call's 1000 uid buckets, so its 1% user
# sample (buckets < 10) holds about 10% of the examples.
NUM_UID_BUCKETS = 100
# Outside every sampled bucket: padding examples never reach the AUC.
UNSAMPLED_UID_BUCKET = 1_000
FIRST_REQ_TIME = 1_700_000_000
EXAMPLES_TRAINED = "examples_trained"


def synthetic_click_log(
    num_examples: int, seed: int = 0
) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Deterministic (features, labels) of a click log with learnable structure.

    A click's log-odds are a hidden user bias plus item bias plus a linear
    function of the dense features, so a model that learns the embeddings and
    weights ranks clicks well (AUC near the generator's own, about 0.8).
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples!r} must be positive.")
    rng = np.random.RandomState(seed)
    user_bias = rng.normal(0.0, 1.0, NUM_USERS)
    item_bias = rng.normal(0.0, 1.0, NUM_ITEMS)
    dense_weights = rng.normal(0.0, 0.5, NUM_DENSE)
    user_id = rng.randint(0, NUM_USERS, num_examples)
    item_id = rng.randint(0, NUM_ITEMS, num_examples)
    dense = rng.normal(0.0, 1.0, (num_examples, NUM_DENSE)).astype(np.float32)
    logits = user_bias[user_id] + item_bias[item_id] + dense @ dense_weights - 1.0
    labels = (rng.uniform(size=num_examples) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    features = {
        "user_id": user_id.astype(np.int64),
        "item_id": item_id.astype(np.int64),
        "dense": dense,
        "uid_bucket": (user_id % NUM_UID_BUCKETS).astype(np.int32),
        "req_time": FIRST_REQ_TIME + np.arange(num_examples, dtype=np.int64),
    }
    return features, labels


def input_fn(params: Mapping[str, Any]) -> tf.data.Dataset:
    """The click log in batches of `params["batch_size"]`, then endless padding.

    The last partial batch is dropped (TPUs need static shapes); padding
    batches carry the stop signal, which ends training after the real ones.
    """
    features, labels = synthetic_click_log(params["num_examples"], params.get("seed", 0))
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    dataset = dataset.batch(params["batch_size"], drop_remainder=True)
    return append_stopping_signals(dataset).prefetch(2)


def _embedding(name: str, ids: tf.Tensor, vocabulary: int, seed: int) -> tf.Tensor:
    table = tf.compat.v1.get_variable(
        name,
        [vocabulary, EMBEDDING_DIM],
        initializer=tf.compat.v1.random_normal_initializer(stddev=0.05, seed=seed),
    )
    return tf.gather(table, ids)


def _dense_layer(name: str, inputs: tf.Tensor, units: int, seed: int) -> tf.Tensor:
    with tf.compat.v1.variable_scope(name):
        kernel = tf.compat.v1.get_variable(
            "kernel",
            [inputs.shape[-1], units],
            initializer=tf.compat.v1.glorot_uniform_initializer(seed=seed),
        )
        bias = tf.compat.v1.get_variable("bias", [units], initializer=tf.zeros_initializer())
    return tf.matmul(inputs, kernel) + bias


def _count_real_examples(real: tf.Tensor, on_tpu: bool) -> tf.Operation:
    """Adds this step's real examples (all replicas') to a checkpointed counter."""
    counter = tf.compat.v1.get_variable(
        EXAMPLES_TRAINED,
        [],
        tf.int64,
        initializer=tf.zeros_initializer(),
        trainable=False,
        use_resource=True,
    )
    count = tf.reduce_sum(tf.cast(real, tf.int32))
    if on_tpu:
        # Each replica holds a copy of the counter: add the same total to all.
        count = tf.compat.v1.tpu.cross_replica_sum(count)
    return counter.assign_add(tf.cast(count, tf.int64), read_value=False)


def model_fn(features, labels, mode, params):
    """Embeddings + MLP click model; records AUC metrics with the host call."""
    del mode  # Training only.
    on_tpu = bool(params.get("on_tpu", False))
    # Seeded initializers: the same params train the same model, run after run.
    seed = int(params.get("seed", 0))
    padding = features[_USER_PROVIDED_SIGNAL_NAME]
    real = tf.logical_not(padding)

    inputs = tf.concat(
        [
            _embedding("user_embedding", features["user_id"], NUM_USERS, seed),
            _embedding("item_embedding", features["item_id"], NUM_ITEMS, seed + 1),
            features["dense"],
        ],
        axis=1,
    )
    hidden = tf.nn.relu(_dense_layer("hidden", inputs, HIDDEN_UNITS, seed + 2))
    logits = _dense_layer("logits", hidden, 1, seed + 3)[:, 0]
    preds = tf.sigmoid(logits)

    # Padding examples get weight 0: a padding step trains nothing.
    weights = tf.cast(real, tf.float32)
    per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    loss = tf.reduce_sum(per_example * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)

    optimizer = tf.compat.v1.train.AdagradOptimizer(learning_rate=0.5)
    if on_tpu:
        optimizer = tf.compat.v1.tpu.CrossShardOptimizer(optimizer)
    minimize = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    train_op = tf.group(minimize, _count_real_examples(real, on_tpu))

    host_call = BaseEmbeddingHostCall(
        params["model_dir"],
        enable_host_call=True,
        enable_deepinsight=True,
        enable_host_call_scalar_metrics=True,
        enable_caching_with_tpu_var_mode=False,
        top_k_sampling_num_per_core=params["batch_size"],
        params={
            **params,
            "enable_host_call": True,
            "cpu_test": not on_tpu,
            "host_call_every_n_steps": 1,
        },
    )
    uid_bucket = tf.where(
        padding, tf.fill(tf.shape(padding), UNSAMPLED_UID_BUCKET), features["uid_bucket"]
    )
    host_call.record_summary_tensor("labels_for_auc_calculation", labels)
    host_call.record_summary_tensor("y_pred_for_auc_calculation", preds)
    host_call.record_summary_tensor("uid_bucket", uid_bucket)
    host_call.record_summary_tensor("req_time", features["req_time"][:1])
    host_call.record_summary_tensor("sample_rate", tf.constant([1.0]))
    host_call.record_summary_tensor("loss_avg", loss)
    host_call.record_summary_tensor("real_examples_sum", tf.reduce_sum(weights))
    return tpu_estimator.TPUEstimatorSpec(
        mode=tf.estimator.ModeKeys.TRAIN,
        loss=loss,
        train_op=train_op,
        host_call=host_call.generate_host_call_hook(),
        training_hooks=host_call.tpu_var_restore_hooks,
    )
