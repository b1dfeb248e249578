"""A CTR model whose embedding table lives in TPU embedding, trained to the end of its stream.

    python -m monolith.examples.tpu_embedding_ctr --tpu=my-tpu --model_dir=gs://bucket/emb
    # Before the first TPU run, on CPU (simulated 2 hosts x 4 cores, nothing runs):
    python -m monolith.core.simulated_tpu --num_hosts 2 --cores_per_host 4 \\
        -m monolith.examples.tpu_embedding_ctr --tpu=my-tpu --model_dir=/tmp/emb

CTR models on TPU keep their large tables in TPU embedding (the TPU's
embedding engine, configured with `TPUEstimator(embedding_config_spec=...)`),
not in dense variables of the model. Here:

* `input_fn` yields a sparse id feature `item_ids` (each example clicked
  1-3 items of a catalogue) and ends the finite stream with
  `append_stopping_signals(..., stop_rule=StopRule.ALL_REPLICAS_PADDING)`;
  its padding batches hold an empty `tf.SparseTensor` (no ids for any
  example), which the embedding enqueue accepts like any batch whose
  examples have no ids;
* `EmbeddingConfigSpec` declares the table with
  `tf.compat.v1.tpu.experimental.embedding_column` over the categorical id
  column, trained with Adagrad (`AdagradParameters`);
* `model_fn` reads the looked-up (mean-combined) embeddings with
  `input_layer` and trains its dense layer with Adagrad through
  `CrossShardOptimizer(reduction=SUM)` on `masked_mean_loss` (the mean over
  the step's real examples), wrapped with `skip_padding_steps`;
* the end-of-stream feed hook stops training after the last real batch; it
  passes the TPU embedding configuration to `initialize_system`.

Why ALL_REPLICAS_PADDING: TPU embedding applies the table gradients outside
the model's optimizer (`send_tpu_embedding_gradients`, on every step), so
`skip_padding_steps` cannot skip them. Under the default rule, on a step in
which only some replicas pad, the real batches' rows would be updated while
the dense layer and the global step are not, and a restart would replay
that step: those rows trained twice. Under ALL_REPLICAS_PADDING every
partly real step is a counted step, so the table and the dense layer see
each batch exactly once. Padding examples reach the table with a zero loss
weight, and their empty ids touch no row; a step of padding only (after the
stream) sends no id at all.

TPU only: on CPU, dry-run it (second command above).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.stopping_signals import (
    StopRule,
    append_stopping_signals,
    masked_mean_loss,
    skip_padding_steps,
)

ITEM_IDS = "item_ids"
NUM_ITEMS = 10_000
EMBEDDING_DIM = 16
MAX_IDS_PER_EXAMPLE = 3


def synthetic_clicks(num_examples: int, seed: int = 0) -> tf.data.Dataset:
    """Unbatched examples `({"item_ids": SparseTensor[<=3]}, label)`, deterministic.

    An example's label is 1 when its first item is in the upper half of the
    catalogue, so the embedding has something to learn.
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples={num_examples!r} must be positive.")
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, MAX_IDS_PER_EXAMPLE + 1, num_examples)
    ids = rng.randint(0, NUM_ITEMS, (num_examples, MAX_IDS_PER_EXAMPLE)).astype(np.int64)
    labels = (ids[:, 0] >= NUM_ITEMS // 2).astype(np.float32)

    def example(ids_row: tf.Tensor, length: tf.Tensor, label: tf.Tensor) -> Any:
        values = ids_row[:length]
        item_ids = tf.SparseTensor(
            indices=tf.expand_dims(tf.range(tf.cast(length, tf.int64)), 1),
            values=values,
            dense_shape=tf.cast(tf.expand_dims(length, 0), tf.int64),
        )
        return {ITEM_IDS: item_ids}, tf.expand_dims(label, 0)

    return tf.data.Dataset.from_tensor_slices((ids, lengths, labels)).map(example)


def input_fn(params: Mapping[str, Any]) -> tf.data.Dataset:
    """Per-host batches of the finite click stream, then padding batches flagged True.

    ALL_REPLICAS_PADDING: training stops only on a step in which every
    replica's batch is padding (see the module docstring).
    """
    batch_size = params["batch_size"]
    dataset = synthetic_clicks(params["num_examples"], params.get("seed", 0))
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return append_stopping_signals(
        dataset, batch_size=batch_size, stop_rule=StopRule.ALL_REPLICAS_PADDING
    )


def embedding_columns() -> list:
    """The TPU embedding column of the item ids (mean of the example's item vectors)."""
    item_ids = tf.compat.v1.feature_column.categorical_column_with_identity(
        ITEM_IDS, num_buckets=NUM_ITEMS
    )
    return [
        tf.compat.v1.tpu.experimental.embedding_column(
            item_ids, dimension=EMBEDDING_DIM, combiner="mean"
        )
    ]


def embedding_config_spec(learning_rate: float = 0.05) -> tpu_estimator.EmbeddingConfigSpec:
    """`EmbeddingConfigSpec` of the item table, trained with Adagrad on the TPU."""
    return tpu_estimator.EmbeddingConfigSpec(
        feature_columns=embedding_columns(),
        optimization_parameters=tf.compat.v1.tpu.experimental.AdagradParameters(
            learning_rate=learning_rate, initial_accumulator=0.1
        ),
    )


def model_fn(features: Mapping[str, Any], labels: tf.Tensor, mode: str, params: Mapping) -> Any:
    """Logistic regression on the looked-up item embedding; padding examples train nothing.

    The loss is each replica's share of the mean over the step's real
    examples (`masked_mean_loss`): padding examples have a zero weight, for
    the dense layer and for the table gradients TPUEstimator sends alike, and
    `CrossShardOptimizer(reduction=SUM)` sums the shares' gradients into the
    gradient of that mean. `skip_padding_steps` skips the steps of padding
    only (after the stream), which then do not advance the global step.
    """
    del params
    embedded = tf.compat.v1.feature_column.input_layer(features, embedding_columns())
    logits = tf.compat.v1.layers.dense(embedded, 1, name="logits")
    per_example = tf.compat.v1.losses.sigmoid_cross_entropy(
        labels, logits, reduction=tf.compat.v1.losses.Reduction.NONE
    )
    loss = masked_mean_loss(per_example, features)
    optimizer = skip_padding_steps(
        tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.AdagradOptimizer(0.05),
            reduction=tf.compat.v1.losses.Reduction.SUM,
        ),
        features,
    )
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    # What TPUEstimator logs: the step's mean itself (the replicas' shares summed).
    logged = tf.compat.v1.tpu.cross_replica_sum(loss)
    return tpu_estimator.TPUEstimatorSpec(mode, loss=logged, train_op=train_op)


def train_on_tpu(args: argparse.Namespace) -> None:
    """Trains on the Cloud TPU `args.tpu` until the click stream ends."""
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=args.tpu, zone=args.tpu_zone, project=args.gcp_project
    )
    config = tpu_config.RunConfig(
        cluster=resolver,
        model_dir=args.model_dir,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=args.iterations_per_loop,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )
    estimator = tpu_estimator.TPUEstimator(
        model_fn=model_fn,
        config=config,
        params={"num_examples": args.num_examples, "seed": args.seed},
        use_tpu=True,
        train_batch_size=args.batch_size,
        embedding_config_spec=embedding_config_spec(),
    )
    # TPUEstimator.train on a TPU needs steps or max_steps; the feed hook ends
    # training at the end of the stream, so max_steps is never reached.
    estimator.train(input_fn, max_steps=sys.maxsize)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu", required=True, help="Cloud TPU name (or grpc:// address).")
    parser.add_argument("--tpu_zone", default=None)
    parser.add_argument("--gcp_project", default=None)
    parser.add_argument("--model_dir", required=True, help="Checkpoints (a gs:// path on TPU).")
    parser.add_argument("--num_examples", type=int, default=1_048_576)
    parser.add_argument("--batch_size", type=int, default=1024, help="Global batch size.")
    parser.add_argument("--iterations_per_loop", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_examples", "batch_size", "iterations_per_loop"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    train_on_tpu(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
