"""A small CTR model for TPUEstimator, with end-of-stream input and host call.

One `input_fn` and one `model_fn`, written as for `TPUEstimator(use_tpu=True)`,
which run unchanged on a Cloud TPU and on CPU through `monolith.core.testing`:

* `input_fn` builds a deterministic synthetic click log (no download, made
  in-graph), takes the part of each global batch that its host's replicas
  train (`params["context"]`), or with `host_shard_sizes` the host's own
  shard of the stream, skips the batches a restored checkpoint has already
  trained (`skip_trained_batches`) and ends it with
  `append_stopping_signals(stop_rule=...)`, so the feed hook stops training
  by itself after the last real batch;
* `model_fn` looks up user and item embeddings (Adagrad) and runs a two-layer
  MLP (Adam) on the mean loss over the step's real examples
  (`masked_mean_loss`, with `CrossShardOptimizer(reduction=SUM)`), both
  optimizers wrapped with `skip_padding_steps` so a padding step changes no
  weight, slot or global step; it counts the examples trained in a
  checkpointed variable (on the steps that train: `is_padding_step`), and
  records its metrics, with the per-example padding flag as
  `stopping_signals`, with `BaseEmbeddingHostCall` for AUC and DeepInsight
  summaries. Under `params["use_tpu"]` (a TPU, or the emulated TPU loop of
  `monolith.core.testing`) the gradients, the counter and the host call are
  combined over replicas. The same model trains under either stop rule.

Params (beyond TPUEstimator's `batch_size`, `context` and `use_tpu`):
`model_dir`, `num_examples`, `seed`, and optionally `stop_rule` ("any", the
default, or "all": `STOP_RULES`) and `host_shard_sizes` (per host, its shard
in batches of `batch_size`; PER_HOST_V2 input).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

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

NUM_USERS = 1_000
NUM_ITEMS = 500
NUM_DENSE = 4
EMBEDDING_DIM = 8
HIDDEN_UNITS = 32
# Users hash into 100 of the host call's 1000 uid buckets, so its 1% user
# sample (buckets < 10) holds about 10% of the examples.
NUM_UID_BUCKETS = 100
FIRST_REQ_TIME = 1_700_000_000
# Examples drawn per stateless op call (see `synthetic_click_log`).
EXAMPLES_PER_BLOCK = 1_024
# Checkpointed count of the examples trained, updated by the train op that
# updates the weights (by 0 on a padding step): the report reads it.
EXAMPLES_TRAINED = "examples_trained"
# params["stop_rule"] -> the rule append_stopping_signals is given.
STOP_RULES = {"any": StopRule.ANY_REPLICA_PADDING, "all": StopRule.ALL_REPLICAS_PADDING}


def _hidden_click_model(seed: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The generator's own user biases, item biases and dense weights.

    Keyed by `(seed, -1)`, which no block of examples uses (their keys are
    `(seed, block)` with `block >= 0`), so the truth is independent of the data.
    """
    user_key, item_key, dense_key = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([seed, tf.constant(-1, tf.int64)]), 3)
    )
    return (
        tf.random.stateless_normal([NUM_USERS], user_key),
        tf.random.stateless_normal([NUM_ITEMS], item_key),
        tf.random.stateless_normal([NUM_DENSE], dense_key, stddev=0.5),
    )


def _example_block(seed: tf.Tensor, block: tf.Tensor) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """Examples `block * EXAMPLES_PER_BLOCK ...` of the click log, a function of `(seed, block)`."""
    user_bias, item_bias, dense_weights = _hidden_click_model(seed)
    user_key, item_key, dense_key, click_key = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([seed, block]), 4)
    )
    shape = [EXAMPLES_PER_BLOCK]
    user_id = tf.random.stateless_uniform(shape, user_key, 0, NUM_USERS, dtype=tf.int64)
    item_id = tf.random.stateless_uniform(shape, item_key, 0, NUM_ITEMS, dtype=tf.int64)
    dense = tf.random.stateless_normal(shape + [NUM_DENSE], dense_key)
    logits = (
        tf.gather(user_bias, user_id)
        + tf.gather(item_bias, item_id)
        + tf.linalg.matvec(dense, dense_weights)
        - 1.0
    )
    clicked = tf.random.stateless_uniform(shape, click_key) < tf.sigmoid(logits)
    features = {
        "user_id": user_id,
        "item_id": item_id,
        "dense": dense,
        "uid_bucket": tf.cast(user_id % NUM_UID_BUCKETS, tf.int32),
        "req_time": FIRST_REQ_TIME
        + block * EXAMPLES_PER_BLOCK
        + tf.range(EXAMPLES_PER_BLOCK, dtype=tf.int64),
    }
    return features, tf.cast(clicked, tf.float32)


def synthetic_click_log(num_examples: int, seed: int = 0) -> tf.data.Dataset:
    """A deterministic click log of `num_examples` (features, label) examples, made in-graph.

    A click's log-odds are a hidden user bias plus item bias plus a linear
    function of the dense features, so a model that learns the embeddings and
    weights ranks clicks well (the generator's own logits score an AUC of 0.88
    on the default stream).

    Nothing is stored in the graph but the generator: example `i` is row
    `i % EXAMPLES_PER_BLOCK` of a block drawn by stateless random ops keyed by
    `(seed, i // EXAMPLES_PER_BLOCK)`. So the graph, checkpoints and event
    files are the same size for any `num_examples`; the same seed gives the
    same stream, whatever the batch size, and a shorter stream is a prefix of
    a longer one. Blocks (not one op per example) keep generation fast: one
    stateless op per example would cost more than the training step.

    Raises:
      ValueError: `num_examples` is not a positive int.
      TypeError: `seed` is not an int.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        raise ValueError(f"num_examples={num_examples!r} must be a positive int.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int.")
    num_blocks = -(-num_examples // EXAMPLES_PER_BLOCK)
    blocks = tf.data.Dataset.range(num_blocks).map(
        lambda block: _example_block(tf.constant(seed, tf.int64), block)
    )
    return blocks.unbatch().take(num_examples)


def _host_batches(
    dataset: tf.data.Dataset, params: Mapping[str, Any], config: Optional[Any]
) -> tf.data.Dataset:
    """This input_fn call's share of the stream, in batches of `params["batch_size"]`.

    Every train step trains one global batch of the stream, whatever the
    topology: the stream is cut into global batches (the last partial one
    dropped: TPUs need static shapes) and this host keeps the rows its
    replicas train, in the order TPUEstimator feeds them. Under PER_HOST_V2
    (the example's setting) host h's replicas are `h * R ... h * R + R - 1`
    and the host's pipeline yields one batch per replica, in replica order;
    under PER_HOST_V1 one host batch (split over its replicas); under
    BROADCAST the whole global batch. So replica r trains rows `r * b` to
    `(r + 1) * b - 1` of each global batch, and the pod sees exactly the
    global batches of a one-replica run with the same global batch size.
    """
    batch = params["batch_size"]
    context = params.get("context")
    if context is None:
        return dataset.batch(batch, drop_remainder=True)
    _, host, num_calls, replicas_fed = context.current_input_fn_deployment()
    mode = tpu_config.InputPipelineConfig.PER_HOST_V2
    if config is not None:
        mode = config.tpu_config.per_host_input_for_training
    # Elements one step takes from this pipeline (one get_next() per replica under PER_HOST_V2).
    per_step = max(1, replicas_fed) if mode is tpu_config.InputPipelineConfig.PER_HOST_V2 else 1
    if num_calls == 1 and per_step == 1:
        return dataset.batch(batch, drop_remainder=True)
    host_rows = batch * per_step
    first = host * host_rows

    def host_part(features: Any, labels: Any) -> Any:
        def rows(tensor: tf.Tensor) -> tf.Tensor:
            part = tensor[first : first + host_rows]
            return tf.reshape(part, [per_step, batch] + tensor.shape.as_list()[1:])

        return tf.nest.map_structure(rows, (features, labels))

    global_batches = dataset.batch(host_rows * num_calls, drop_remainder=True)
    return global_batches.map(host_part).unbatch()


def _host_shard(dataset: tf.data.Dataset, params: Mapping[str, Any]) -> tf.data.Dataset:
    """This host's own shard: `host_shard_sizes[host]` batches, after the earlier hosts' shards.

    A pod whose hosts read different files: host h's shard is the part of
    the stream after hosts 0 .. h-1's, in batches of `params["batch_size"]`
    (one per replica and step under PER_HOST_V2), so shards of different
    lengths end at different steps.
    """
    sizes = params["host_shard_sizes"]
    context = params.get("context")
    host = context.current_host if context is not None else 0
    if context is not None and context.num_hosts != len(sizes):
        raise ValueError(
            f"host_shard_sizes={list(sizes)} gives {len(sizes)} shards for "
            f"{context.num_hosts} hosts."
        )
    batch = params["batch_size"]
    shard = dataset.skip(sum(sizes[:host]) * batch).take(sizes[host] * batch)
    return shard.batch(batch, drop_remainder=True)


def stop_rule(params: Mapping[str, Any]) -> StopRule:
    """The stop rule `params["stop_rule"]` names ("any", the default, or "all")."""
    name = params.get("stop_rule", "any")
    if name not in STOP_RULES:
        raise ValueError(f"params['stop_rule']={name!r} must be one of {sorted(STOP_RULES)}.")
    return STOP_RULES[name]


def stream_id(params: Mapping[str, Any]) -> str:
    """Names the stream `input_fn` reads, for the resume guard: the seed, and the shard sizes.

    A restart on another seed or other host shards is another stream, so the
    guard refuses it instead of skipping batches of a stream that was not trained.
    """
    shards = params.get("host_shard_sizes")
    suffix = f" shards={','.join(str(n) for n in shards)}" if shards else ""
    return f"seed={params.get('seed', 0)}{suffix}"


def input_fn(params: Mapping[str, Any], config: Optional[Any] = None) -> tf.data.Dataset:
    """This host's batches of the click log, minus those trained, then padding.

    See `_host_batches` for which rows a host reads (on one host with one
    replica: all of them, in batches of `params["batch_size"]`), or, with
    `params["host_shard_sizes"]`, `_host_shard`. On a restored model_dir,
    `skip_trained_batches` resumes after the batches the checkpoint's global
    step has trained on this host (the stream is deterministic, so they are
    the same batches; each step took `current_input_fn_deployment()[3]` of
    them under PER_HOST_V2; a host whose shard ended earlier has consumed
    all of it); the seed and the shard sizes are its stream id, so the resume
    guard refuses a restart on another stream. Padding batches carry the stop
    signal, which ends training after the real ones under
    `params["stop_rule"]` (the only place the rule is chosen: the feed hook
    and `skip_padding_steps` follow it).
    """
    rule = stop_rule(params)
    dataset = synthetic_click_log(params["num_examples"], params.get("seed", 0))
    if params.get("host_shard_sizes"):
        dataset = _host_shard(dataset, params)
    else:
        dataset = _host_batches(dataset, params, config)
    dataset = skip_trained_batches(
        dataset, context=params.get("context"), stream_id=stream_id(params)
    )
    return append_stopping_signals(dataset, stop_rule=rule).prefetch(2)


def _embedding_table(name: str, vocabulary: int, seed: int) -> tf.Variable:
    return tf.compat.v1.get_variable(
        name,
        [vocabulary, EMBEDDING_DIM],
        initializer=tf.compat.v1.random_normal_initializer(stddev=0.05, seed=seed),
    )


def _dense_layer(name: str, inputs: tf.Tensor, units: int, seed: int) -> tf.Tensor:
    with tf.compat.v1.variable_scope(name):
        kernel = tf.compat.v1.get_variable(
            "kernel",
            [inputs.shape[-1], units],
            initializer=tf.compat.v1.glorot_uniform_initializer(seed=seed),
        )
        bias = tf.compat.v1.get_variable("bias", [units], initializer=tf.zeros_initializer())
    return tf.matmul(inputs, kernel) + bias


def _count_examples_trained(features: Mapping[str, tf.Tensor], use_tpu: bool) -> tf.Operation:
    """Adds the examples this step trains (all replicas') to a checkpointed counter.

    A padding step (`is_padding_step`: under the stop rule, the step on
    which `skip_padding_steps` skips the update) trains no example; under
    the default rule not even the real ones other replicas may hold.
    """
    padding = features[USER_PROVIDED_SIGNAL_NAME]
    real = tf.reduce_sum(tf.cast(tf.logical_not(padding), tf.int32))
    if use_tpu:
        # Each replica holds a copy of the counter: add the same total to all.
        real = tf.compat.v1.tpu.cross_replica_sum(real)
    trained = tf.where(is_padding_step(features), tf.constant(0, tf.int32), real)
    counter = tf.compat.v1.get_variable(
        EXAMPLES_TRAINED,
        [],
        tf.int64,
        initializer=tf.zeros_initializer(),
        trainable=False,
        use_resource=True,
    )
    return counter.assign_add(tf.cast(trained, tf.int64), read_value=False)


def _optimizer(
    optimizer: tf.compat.v1.train.Optimizer, features: Mapping[str, tf.Tensor], use_tpu: bool
) -> tf.compat.v1.train.Optimizer:
    """`optimizer` applying nothing on padding steps, summed over replicas on a TPU.

    SUM: each replica's loss is its share of the step's mean over its real
    examples (`masked_mean_loss`), so the sum of the replicas' gradients is
    the gradient of that mean.
    """
    optimizer = skip_padding_steps(optimizer, features)
    if use_tpu:
        # The gradient sum outside skip_padding_steps' conditional: every
        # replica runs it on every step.
        optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
            optimizer, reduction=tf.compat.v1.losses.Reduction.SUM
        )
    return optimizer


def _minimize(
    loss: tf.Tensor, embeddings: list, features: Mapping[str, tf.Tensor], use_tpu: bool
) -> tf.Operation:
    """Adagrad on the embedding tables, Adam on the dense layers; neither trains on padding.

    Adam's moments and beta powers would move on a padding step even with a
    zero gradient: `skip_padding_steps` applies nothing on such a step, and
    the global step (advanced by the dense update) counts real steps only.

    One backward pass for both optimizers: with two `minimize` calls, the
    embeddings' gradient could read a dense kernel the other update had
    already changed (v1 graphs' reference variables), and training would no
    longer be deterministic.
    """
    sparse = {table.ref() for table in embeddings}
    dense_layers = [v for v in tf.compat.v1.trainable_variables() if v.ref() not in sparse]
    embedding_optimizer = _optimizer(
        tf.compat.v1.train.AdagradOptimizer(learning_rate=0.5), features, use_tpu
    )
    dense_optimizer = _optimizer(
        tf.compat.v1.train.AdamOptimizer(learning_rate=0.003), features, use_tpu
    )
    grads_and_vars = dense_optimizer.compute_gradients(
        loss,
        var_list=embeddings + dense_layers,
        gate_gradients=tf.compat.v1.train.Optimizer.GATE_GRAPH,
    )
    num_tables = len(embeddings)
    return tf.group(
        embedding_optimizer.apply_gradients(grads_and_vars[:num_tables]),
        dense_optimizer.apply_gradients(
            grads_and_vars[num_tables:], global_step=tf.compat.v1.train.get_global_step()
        ),
    )


def _host_call(params: Mapping[str, Any], use_tpu: bool) -> BaseEmbeddingHostCall:
    return BaseEmbeddingHostCall(
        params["model_dir"],
        enable_host_call=True,
        enable_deepinsight=True,
        enable_host_call_scalar_metrics=True,
        enable_caching_with_tpu_var_mode=False,
        top_k_sampling_num_per_core=params["batch_size"],
        params={
            **params,
            "enable_host_call": True,
            "cpu_test": not use_tpu,
            "host_call_every_n_steps": 1,
        },
    )


def model_fn(features, labels, mode, params):
    """Embeddings + MLP click model; records AUC metrics with the host call."""
    del mode  # Training only.
    # TPUEstimator sets it on a TPU, the emulator too; False with use_tpu=False (one replica).
    use_tpu = bool(params.get("use_tpu", False))
    # Seeded initializers: the same params train the same model, run after run.
    seed = int(params.get("seed", 0))
    padding = features[USER_PROVIDED_SIGNAL_NAME]

    embeddings = [
        _embedding_table("user_embedding", NUM_USERS, seed),
        _embedding_table("item_embedding", NUM_ITEMS, seed + 1),
    ]
    inputs = tf.concat(
        [
            tf.gather(embeddings[0], features["user_id"]),
            tf.gather(embeddings[1], features["item_id"]),
            features["dense"],
        ],
        axis=1,
    )
    hidden = tf.nn.relu(_dense_layer("hidden", inputs, HIDDEN_UNITS, seed + 2))
    logits = _dense_layer("logits", hidden, 1, seed + 3)[:, 0]
    preds = tf.sigmoid(logits)

    # The mean loss over the step's real examples (this replica's share of
    # it): padding examples do not train, also in a step that is partly real
    # (trained under the "all" stop rule). This mask does not keep padding
    # steps from training (Adam moves weights on a zero gradient):
    # skip_padding_steps below does.
    weights = tf.cast(tf.logical_not(padding), tf.float32)
    per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    share = masked_mean_loss(per_example, features)
    # What is logged: the step's mean itself (the replicas' shares summed).
    loss = tf.compat.v1.tpu.cross_replica_sum(share) if use_tpu else share

    train_op = tf.group(
        _minimize(share, embeddings, features, use_tpu), _count_examples_trained(features, use_tpu)
    )

    # generate_host_call_hook() below orders the host call's global-step read
    # before the optimizer's increment, so every step's summaries are logged
    # under that step's number (built before or after the train op).
    host_call = _host_call(params, use_tpu)

    host_call.record_summary_tensor("labels_for_auc_calculation", labels)
    host_call.record_summary_tensor("y_pred_for_auc_calculation", preds)
    host_call.record_summary_tensor("uid_bucket", features["uid_bucket"])
    # The per-example padding flag: the host call drops padding examples from
    # the AUC, the DeepInsight payloads and the sampled averages.
    host_call.record_summary_tensor("stopping_signals", padding)
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
