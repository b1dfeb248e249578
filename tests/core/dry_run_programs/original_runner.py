"""A TPU program configured as the original Monolith TPU runner configures its jobs.

Unchanged TPU code for the dry-run tests (`python -m monolith.core.simulated_tpu
... original_runner.py --model_dir DIR`):

- the TPU from `TPUClusterResolver(tpu=..., zone=..., project=...)`, hosts
  counted with `cluster_spec().num_tasks("worker")` and the global batch size
  computed from them;
- TPU embedding from feature and table config dicts (`TableConfig`,
  `FeatureConfig`), Adagrad, one sparse id feature per table;
- a caching `BaseEmbeddingHostCall` (`enable_caching_with_tpu_var_mode=True`)
  whose host call runs every 100 steps
  (`TPUConfig(experimental_host_call_every_n_steps=100)`);
- PER_HOST_V2 input with `experimental_allow_per_host_v2_parallel_get_next`;
- the end-of-stream feed hook, `append_stopping_signals` and a `max_steps`
  that is never reached.
"""

import argparse
import sys

import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall
from monolith.core.stopping_signals import USER_PROVIDED_SIGNAL_NAME, append_stopping_signals

PER_CORE_BATCH = 4
TABLES = {"user": 1000, "item": 500}
DIM = 8
EVERY_N = 100
TOP_K = 2


def input_fn(params):
    batch = params["batch_size"]

    def example(i):
        ids = {
            f"{name}_id": tf.SparseTensor([[0]], [i % vocab], [1]) for name, vocab in TABLES.items()
        }
        ids["uid_bucket"] = tf.cast(i % 1000, tf.int32)
        ids["req_time"] = 1_700_000_000 + i
        ids["sample_rate"] = tf.constant(0.5)
        return ids, tf.cast(i % 2, tf.float32)

    dataset = tf.data.Dataset.range(batch * 5).map(example).batch(batch, drop_remainder=True)
    return append_stopping_signals(dataset, batch_size=batch)


def model_fn(features, labels, mode, params):
    pooled = tf.concat([features[f"{name}_id"] for name in TABLES], axis=1)
    logits = tf.compat.v1.layers.dense(pooled, 1)[:, 0]
    preds = tf.sigmoid(logits)
    real = 1.0 - tf.cast(features[USER_PROVIDED_SIGNAL_NAME], tf.float32)
    losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    loss = tf.reduce_sum(real * losses) / tf.maximum(tf.reduce_sum(real), 1.0)
    global_step = tf.compat.v1.train.get_global_step()
    host_call = BaseEmbeddingHostCall(
        output_dir=params["model_dir"],
        enable_host_call=True,
        enable_deepinsight=True,
        enable_host_call_scalar_metrics=True,
        enable_caching_with_tpu_var_mode=True,
        top_k_sampling_num_per_core=TOP_K,
        params=dict(params, enable_host_call=True, cpu_test=False, host_call_every_n_steps=EVERY_N),
    )
    sampled = {
        "labels": labels[:TOP_K],
        "preds": preds[:TOP_K],
        "uid_buckets": features["uid_bucket"][:TOP_K],
        "req_times": features["req_time"][:1],
        "sample_rates": features["sample_rate"][:1],
    }
    host_call.record_summary_tensor("labels_for_auc_calculation", sampled["labels"])
    host_call.record_summary_tensor("y_pred_for_auc_calculation", sampled["preds"])
    host_call.record_summary_tensor("uid_bucket", sampled["uid_buckets"])
    host_call.record_summary_tensor("req_time", sampled["req_times"])
    host_call.record_summary_tensor("sample_rate", sampled["sample_rates"])
    host_call.record_summary_tensor("loss_avg", loss)
    update_ops = host_call.update_tpu_variables_ops(global_step, **sampled)
    host_call.record_summary_tpu_variables()
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(tf.compat.v1.train.AdagradOptimizer(0.05))
    with tf.control_dependencies(update_ops):
        train_op = optimizer.minimize(loss, global_step=global_step)
    return tpu_estimator.TPUEstimatorSpec(
        mode,
        loss=loss,
        train_op=train_op,
        host_call=host_call.generate_host_call_hook(),
        training_hooks=host_call.tpu_var_restore_hooks,
    )


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tpu", default="runner-tpu")
    parser.add_argument("--model_dir", required=True)
    args = parser.parse_args(argv)

    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=args.tpu, zone="us-central2-b", project="runner-project"
    )
    num_hosts = resolver.cluster_spec().num_tasks("worker")
    cores_per_host = resolver.num_accelerators()["TPU"]
    global_batch = PER_CORE_BATCH * cores_per_host * num_hosts
    print(f"runner: {num_hosts} worker task(s), global batch {global_batch}", flush=True)

    table_config = {
        name: tpu_embedding.TableConfig(vocabulary_size=vocab, dimension=DIM, combiner="sum")
        for name, vocab in TABLES.items()
    }
    feature_config = {f"{name}_id": tpu_embedding.FeatureConfig(table_id=name) for name in TABLES}
    config = tpu_config.RunConfig(
        cluster=resolver,
        model_dir=args.model_dir,
        save_checkpoints_steps=1000,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=EVERY_N,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_host_call_every_n_steps=EVERY_N,
            experimental_allow_per_host_v2_parallel_get_next=True,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )
    estimator = tpu_estimator.TPUEstimator(
        model_fn=model_fn,
        config=config,
        params={"model_dir": args.model_dir},
        use_tpu=True,
        train_batch_size=global_batch,
        embedding_config_spec=tpu_estimator.EmbeddingConfigSpec(
            table_to_config_dict=table_config,
            feature_to_config_dict=feature_config,
            optimization_parameters=tf.compat.v1.tpu.experimental.AdagradParameters(
                learning_rate=0.05
            ),
        ),
    )
    estimator.train(input_fn, max_steps=sys.maxsize)


if __name__ == "__main__":
    main(sys.argv[1:])
