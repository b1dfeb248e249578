"""The smallest end-of-stream TPUEstimator program, with the mistakes the dry run must catch.

    tiny_tpu_program.py --model_dir DIR [--omit_steps] [--batch_size N]

`--omit_steps` calls `estimator.train(input_fn)` without steps or max_steps
(TPUEstimator's ValueError on a TPU); a `--batch_size` the replicas cannot
share fails with TPUEstimator's own error. The master is the TPU named
`--tpu`, found with TPUClusterResolver.
"""

import argparse
import sys

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.stopping_signals import USER_PROVIDED_SIGNAL_NAME, append_stopping_signals


def input_fn(params):
    batch = params["batch_size"]
    dataset = tf.data.Dataset.range(batch * 3).map(
        lambda i: ({"x": tf.reshape(tf.cast(i, tf.float32), [1])}, tf.cast(i % 2, tf.float32))
    )
    return append_stopping_signals(dataset.batch(batch, drop_remainder=True))


def model_fn(features, labels, mode, params):
    logits = tf.compat.v1.layers.dense(features["x"], 1)[:, 0]
    real = 1.0 - tf.cast(features[USER_PROVIDED_SIGNAL_NAME], tf.float32)
    loss = tf.compat.v1.losses.sigmoid_cross_entropy(labels, logits, weights=real)
    optimizer = tf.compat.v1.tpu.CrossShardOptimizer(tf.compat.v1.train.AdagradOptimizer(0.1))
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tpu_estimator.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tpu", default="tiny-tpu")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--omit_steps", action="store_true")
    args = parser.parse_args(argv)
    config = tpu_config.RunConfig(
        cluster=tf.distribute.cluster_resolver.TPUClusterResolver(tpu=args.tpu),
        model_dir=args.model_dir,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=10,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )
    estimator = tpu_estimator.TPUEstimator(
        model_fn=model_fn, config=config, use_tpu=True, train_batch_size=args.batch_size
    )
    if args.omit_steps:
        estimator.train(input_fn)
    else:
        estimator.train(input_fn, max_steps=sys.maxsize)


if __name__ == "__main__":
    main(sys.argv[1:])
