"""The loss of a partly real step: the mean over the step's real examples, `masked_mean_loss`.

Under `StopRule.ALL_REPLICAS_PADDING` a step in which some replicas' batches
are padding is trained. Its padding examples (zeros) must contribute
nothing, and its real examples should weigh what they weigh in any other
step: the loss is their mean over the whole step, whose count of real
examples is summed across replicas. A per-replica mean would not do: a
replica with 3 real examples would weigh as much as one with 64.

Where it runs: in the `model_fn`, inside the TPU train step (graph
building); the cross-replica sum of the count runs on the device.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from monolith.core.common.tpu_context import sum_over_replicas
from monolith.core.end_of_stream.padding_steps import _padding_flag_and_name

__all__ = ["masked_mean_loss"]


def masked_mean_loss(per_example_loss: Any, features: Any) -> tf.Tensor:
    """This replica's share of the mean loss over the real examples of the whole step.

    Returns `sum(per_example_loss over this replica's real examples) / N`,
    where N is the step's number of real examples summed across replicas
    (`cross_replica_sum` inside a TPU computation), and 0 where N is 0 (a
    padding step; no NaN, and a zero gradient). Summed over the replicas,
    these shares are the mean of the per-example loss over the step's real
    examples. Padding examples contribute nothing to the value and a zero
    gradient (their per-example losses must be finite, as for any masked
    loss: a zero times an infinite gradient is NaN).

    With `CrossShardOptimizer(opt, reduction=tf.compat.v1.losses.Reduction.SUM)`,
    which sums the replicas' gradients, the update is exactly the gradient of
    that mean: each replica contributes its real examples' loss sum divided
    by the step's global count of real examples. (With the default MEAN
    reduction it would be divided by the number of replicas once more.) On a
    single replica with no TPU context (CPU, `TPUEstimator(use_tpu=False)`),
    it is the plain masked mean:

        per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        loss = masked_mean_loss(per_example, features)
        optimizer = skip_padding_steps(
            tf.compat.v1.tpu.CrossShardOptimizer(
                tf.compat.v1.train.AdamOptimizer(1e-3),
                reduction=tf.compat.v1.losses.Reduction.SUM,
            ),
            features,
        )
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())

    This is the loss `StopRule.ALL_REPLICAS_PADDING` needs (a partly real
    step is trained). It is also right under the default rule, where a
    step's batches are all real or it is not applied.

    The value is a replica's share: TPUEstimator logs replica 0's. To log
    the mean itself, record this value in the host call under a name with
    `_sum` (summed over replicas there).

    Args:
      per_example_loss: Float tensor `[batch]` (or `[batch, 1]`): each
        example's loss, unreduced (e.g. a `tf.compat.v1.losses` loss with
        `reduction=NONE`).
      features: The step's features dict holding `USER_PROVIDED_SIGNAL_NAME`
        (as `append_stopping_signals` builds it), or that flag tensor
        (`[batch]`, bool or integer, True/non-zero on padding).

    Returns:
      A float scalar of `per_example_loss`'s dtype.

    Raises:
      TypeError: The loss is not a float tensor; the flag is not a bool or
        integer tensor (or `features` holds none: ValueError).
      ValueError: `features` is a mapping without the flag; the loss is not
        `[batch]` or `[batch, 1]` with the flag's batch size.
    """
    flag, where = _padding_flag_and_name(features)
    loss = tf.convert_to_tensor(per_example_loss)
    if not loss.dtype.is_floating:
        raise TypeError(
            f"per_example_loss has dtype {loss.dtype.name}; it must be a float tensor "
            "(each example's loss)."
        )
    batch = tf.compat.dimension_value(flag.shape[0]) if flag.shape.rank else None
    shape = loss.shape
    rank_ok = shape.rank == 1 or (shape.rank == 2 and tf.compat.dimension_value(shape[1]) == 1)
    if flag.shape.rank != 1 or not rank_ok or tf.compat.dimension_value(shape[0]) != batch:
        raise ValueError(
            f"per_example_loss has shape {shape.as_list() if shape.rank is not None else shape} "
            f"and the padding flag {where} {flag.shape.as_list() if flag.shape.rank else 'a'} "
            "shape; the loss must be [batch] or [batch, 1] (one value per example, unreduced) "
            "and the flag [batch], with the same static batch size."
        )
    with tf.name_scope("masked_mean_loss"):
        loss = tf.reshape(loss, [-1])
        real = tf.logical_not(tf.cast(flag, tf.int32) > 0)
        local_sum = tf.reduce_sum(tf.where(real, loss, tf.zeros_like(loss)))
        local_count = tf.reduce_sum(tf.cast(real, loss.dtype))
        count = tf.stop_gradient(sum_over_replicas(local_count, name="real_examples_of_the_step"))
        return tf.math.divide_no_nan(local_sum, count)
