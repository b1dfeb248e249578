"""The one CTR `model_fn` of the host-call tests: a linear model reporting through the host call.

Features: `"x"` (float32 `[batch, dim]`), optionally `"uid_bucket"` (int32),
`"req_time"` (int64), `"sample_rate"` (float32), each `[batch]`, and the
padding flag `USER_PROVIDED_SIGNAL_NAME` (bool `[batch]`, as
`append_stopping_signals` adds it); labels float32 `[batch]`. With the flag,
the loss is the mean over the real examples.

The model records `loss_avg` and (unless `auc_inputs=False`) the AUC inputs:
labels and predictions, and whichever of uid buckets, request times and sample
rates the features hold, each cut to `top_k` examples (request times and sample
rates to 1). In caching mode it appends them to the cached window instead and
records the window. Without caching the host call is built after the train
op, as in README's model_fn; caching needs it before (the train op waits for
the window updates).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_estimator

from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall
from monolith.core.stopping_signals import USER_PROVIDED_SIGNAL_NAME

LEARNING_RATE = 0.5


def make_model_fn(
    *,
    on_tpu: bool = False,
    caching: bool = False,
    every_n: int = 1,
    top_k: Optional[int] = None,
    auc_inputs: bool = True,
    record_padding_flag: bool = False,
    padding_score: Optional[float] = None,
    skip_padding: bool = False,
    deepinsight: bool = True,
    seen: Optional[dict] = None,
) -> Callable[..., tpu_estimator.TPUEstimatorSpec]:
    """A TPUEstimator `model_fn(features, labels, mode, params, config)`.

    Args:
      on_tpu: Built by TPUEstimator(use_tpu=True): the host call takes
        `params["context"]` (else `cpu_test`) and the optimizer is a
        `CrossShardOptimizer`.
      caching: Cache the AUC inputs in TPU variables.
      every_n: `host_call_every_n_steps`.
      top_k: Examples per core and step recorded for the AUC (None: the batch).
      auc_inputs: Record the AUC inputs (else only `loss_avg`).
      record_padding_flag: Record the padding flag as `stopping_signals`.
      padding_score: The prediction of every padding example (None: the model's).
      skip_padding: A padding step applies its update but does not advance
        the global step (a conditional increment, as `skip_padding_steps`).
      deepinsight: `enable_deepinsight`.
      seen: If given, receives the `host_call` and the `host_call_tensors`
        (what TPUEstimator outfeeds).
    """

    def model_fn(features, labels, mode, params, config):
        padding = features.get(USER_PROVIDED_SIGNAL_NAME)
        x = features["x"]
        weights = tf.compat.v1.get_variable("w", [x.shape[-1]], initializer=tf.zeros_initializer())
        logits = tf.reduce_sum(x * weights, axis=1)
        preds = tf.sigmoid(logits)
        if padding_score is not None:
            preds = tf.where(padding, tf.fill(tf.shape(preds), padding_score), preds)
        losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        if padding is None:
            loss = tf.reduce_mean(losses)
        else:
            real = 1.0 - tf.cast(padding, tf.float32)
            loss = tf.reduce_sum(real * losses) / tf.maximum(tf.reduce_sum(real), 1.0)
        global_step = tf.compat.v1.train.get_global_step()
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(LEARNING_RATE)
        if on_tpu:
            optimizer = tf.compat.v1.tpu.CrossShardOptimizer(optimizer)
        k = top_k or tf.compat.dimension_value(labels.shape[0])

        def new_host_call() -> BaseEmbeddingHostCall:
            return BaseEmbeddingHostCall(
                config.model_dir,
                enable_host_call=True,
                enable_deepinsight=deepinsight,
                enable_host_call_scalar_metrics=True,
                enable_caching_with_tpu_var_mode=caching,
                top_k_sampling_num_per_core=k,
                params=dict(
                    params,
                    enable_host_call=True,
                    cpu_test=not on_tpu,
                    host_call_every_n_steps=every_n,
                ),
            )

        def record_common(host_call: BaseEmbeddingHostCall) -> None:
            if record_padding_flag:
                host_call.record_summary_tensor("stopping_signals", padding[:k])
            host_call.record_summary_tensor("loss_avg", loss)

        if caching:
            host_call = new_host_call()
            record_common(host_call)
            updates = host_call.update_tpu_variables_ops(
                global_step,
                labels[:k],
                preds[:k],
                features["uid_bucket"][:k],
                features["req_time"][:1] if "req_time" in features else tf.zeros([1], tf.int64),
                features["sample_rate"][:1] if "sample_rate" in features else tf.ones([1]),
            )
            with tf.control_dependencies(updates):
                train_op = optimizer.minimize(loss, global_step)
                # The host call reads the windows after this step's update.
                host_call.record_summary_tpu_variables()
        else:
            train_op = _train_op(optimizer, loss, global_step, padding if skip_padding else None)
            host_call = new_host_call()
            record_common(host_call)
            if auc_inputs:
                _record_auc_inputs(host_call, features, labels[:k], preds[:k], k)
        hook = host_call.generate_host_call_hook()
        if seen is not None:
            seen.update(host_call=host_call, host_call_tensors=hook[1])
        return tpu_estimator.TPUEstimatorSpec(
            mode,
            loss=loss,
            train_op=train_op,
            host_call=hook,
            training_hooks=host_call.tpu_var_restore_hooks,
        )

    return model_fn


def _train_op(optimizer, loss, global_step, skip_padding: Optional[tf.Tensor]) -> Any:
    if skip_padding is None:
        return optimizer.minimize(loss, global_step)
    with tf.control_dependencies([optimizer.minimize(loss)]):
        return tf.cond(
            tf.reduce_any(skip_padding),
            lambda: tf.identity(global_step),
            lambda: global_step.assign_add(1, read_value=True),
        )


def _record_auc_inputs(host_call, features, labels, preds, k) -> None:
    host_call.record_summary_tensor("labels_for_auc_calculation", labels)
    host_call.record_summary_tensor("y_pred_for_auc_calculation", preds)
    if "uid_bucket" in features:
        host_call.record_summary_tensor("uid_bucket", features["uid_bucket"][:k])
    if "req_time" in features:
        host_call.record_summary_tensor("req_time", features["req_time"][:1])
    if "sample_rate" in features:
        host_call.record_summary_tensor("sample_rate", features["sample_rate"][:1])
