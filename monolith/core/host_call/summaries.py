"""The summary side of the embedding host call: writer scope, step gating, example selection.

Runs while TPUEstimator builds the host function (on the host). Every
summary is written with `tf.summary` under one writer at
`output_dir + "/host_call"`, at the step number the TPU step recorded, made
unique on the host (see `host_call.steps`). The host function returns
exactly the summary ops written in its writer scope (by this module, by the
host call's methods, or by a subclass's overrides of them), not every summary
op of the graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence

import tensorflow as tf

from monolith.core.host_call import steps as _host_call_steps
from monolith.core.host_call import tensor_checks as _tensor_checks

UID_SAMPLE_RATE = 0.01
RATIO_N = 1000
#: The uid bucket cached for a padding example: never below the sampled range.
UNSAMPLED_UID_BUCKET = RATIO_N

DEEPINSIGHT_SAMPLE_RATES = "di_example_sample_rates"
DEEPINSIGHT_LABELS = "di_labels"
DEEPINSIGHT_PREDS = "di_preds"
DEEPINSIGHT_REQ_TIMES = "di_req_times"

_REDUCERS = {"_avg": tf.reduce_mean, "_max": tf.reduce_max, "_sum": tf.reduce_sum}

#: `(tensor, indices, expect_shape, expect_dtype) -> selected elements` (`_slice_tensor`).
SliceFn = Callable[[Any, Any, Sequence[Any], tf.DType], tf.Tensor]
#: `(tensor, step, message_name) -> None`, writes a payload (`_serialize_tensor`).
SerializeFn = Callable[[tf.Tensor, tf.Tensor, str], Any]


def scalar_metric(name: str, suffix: Optional[str], tensor: tf.Tensor) -> tf.Tensor:
    """The scalar logged for a metric: reduced by its suffix (see `names`), else replica 0's.

    Raises:
      ValueError: If `suffix` is None and the metric is not one scalar per replica.
    """
    if suffix is not None:
        return _REDUCERS[suffix](tensor)
    if tensor.shape.rank != 1:
        raise ValueError(
            f"tensor {name!r} has shape {tensor.shape} on the host: only scalars can be "
            "logged without an _avg, _max or _sum suffix"
        )
    return tensor[0]


class HostCallSummaries:
    """Summary writer scope of one host-function call; collects the ops written in it.

    Creates the writer TPUEstimator's hooks initialize and flush and makes it
    the default while the summaries are built. Write every summary at `step`,
    the call's unique step number (`StepNumbers`). `group()` returns the
    summary ops written while the scope was open, whoever wrote them.

    Args:
      output_dir: Summaries go to `output_dir + "/host_call"`.
      step: The step number (scalar) the TPU step recorded.
    """

    def __init__(self, output_dir: str, step: tf.Tensor):
        self._writer = tf.summary.create_file_writer(
            output_dir + "/host_call", flush_millis=10000, max_queue=5000
        )
        self._numbers = _host_call_steps.StepNumbers(step)
        #: The number every summary of this call is written at.
        self.step = self._numbers.number
        self._scope: Any = None
        self._first: Optional[int] = None
        self._ops: Optional[List[Any]] = None

    def __enter__(self) -> HostCallSummaries:
        # tf.summary adds each op it builds in a graph to this collection
        # (None when executing eagerly: nothing to group then).
        self._first = len(tf.compat.v1.summary.all_v2_summary_ops() or [])
        self._scope = self._writer.as_default()
        self._scope.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._scope.__exit__(*exc_info)
        self._ops = (tf.compat.v1.summary.all_v2_summary_ops() or [])[self._first :]

    def scalar(self, name: str, data: Any) -> None:
        tf.summary.scalar(name, data=data, step=self.step)

    def group(self, *extra_ops: Any) -> tf.Operation:
        """The summaries written in the scope, `extra_ops` (not None) and the number's update."""
        if self._ops is None:
            raise RuntimeError("group() needs the summary scope to be closed first")
        extra = [op for op in extra_ops if op is not None]
        mark = self._numbers.mark(self._ops + extra)
        return tf.group(self._ops + extra + [mark])


def width(tensor: tf.Tensor) -> int:
    """Elements per replica of a host-side tensor (`[num_replicas]` or `[num_replicas, k]`)."""
    return 1 if tensor.shape.rank == 1 else tf.compat.dimension_value(tensor.shape[1])


def real_examples(padding_flag: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Flat bool mask of the examples of `labels` that are not padding.

    Args:
      padding_flag: The recorded `stopping_signals`, `[num_replicas]` (one
        flag per replica and step: it applies to all of the replica's
        examples) or `[num_replicas, k]` with the labels' k (one per example).
        Bool or integer; True / non-zero marks padding.
      labels: `[num_replicas]` or `[num_replicas, k]`.

    Raises:
      ValueError: If the flag has neither one element nor one per example.
    """
    flag_width, label_width = width(padding_flag), width(labels)
    if flag_width not in (1, label_width):
        raise ValueError(
            f"stopping_signals has {flag_width} elements per replica (shape "
            f"{padding_flag.shape}); record one per example of labels_for_auc_calculation "
            f"({label_width}, shape {labels.shape}) or a single one per replica"
        )
    padding = tf.not_equal(tf.reshape(tf.cast(padding_flag, tf.int32), [-1, flag_width]), 0)
    padding = tf.broadcast_to(padding, tf.shape(tf.reshape(labels, [-1, label_width])))
    return tf.logical_not(tf.reshape(padding, [-1]))


@dataclasses.dataclass(frozen=True)
class ExampleTensors:
    """What the host received for the example summaries (each None if not recorded).

    `labels`, `y_preds`, `uid_buckets`: `[num_replicas]` or `[num_replicas, k]`;
    `req_times`: `[num_replicas, steps]` (one per step and core);
    `sample_rates`: `[num_replicas]`.
    """

    labels: Optional[tf.Tensor]
    y_preds: Optional[tf.Tensor]
    uid_buckets: Optional[tf.Tensor]
    req_times: Optional[tf.Tensor]
    sample_rates: Optional[tf.Tensor]


def _sampled_mask(
    raw: ExampleTensors,
    stopping_signals_sum: Optional[tf.Tensor],
    padding_flag: Optional[tf.Tensor],
) -> Optional[tf.Tensor]:
    """Flat bool mask of the examples to keep, or None to keep all."""
    keep = None
    if raw.uid_buckets is not None:
        _tensor_checks.check_shape("uid buckets", raw.uid_buckets, raw.labels.shape.as_list())
        keep = tf.reshape(raw.uid_buckets, [-1]) < int(UID_SAMPLE_RATE * RATIO_N)
        if stopping_signals_sum is not None:
            keep = tf.math.logical_and(keep, tf.math.equal(stopping_signals_sum, 0))
    if padding_flag is not None:
        real = real_examples(padding_flag, raw.labels)
        keep = real if keep is None else tf.math.logical_and(keep, real)
    return keep


def write_example_summaries(
    step: tf.Tensor,
    raw: ExampleTensors,
    *,
    slice_tensor: SliceFn,
    serialize_tensor: SerializeFn,
    enable_deepinsight: bool,
    top_k: int,
    stopping_signals_sum: Optional[tf.Tensor] = None,
    padding_flag: Optional[tf.Tensor] = None,
) -> Optional[tf.Tensor]:
    """Writes AUC, DeepInsight and average summaries at `step`; returns the AUC update op.

    The body of the original's `_write_summary_ops`. Examples are selected by
    uid bucket (below `UID_SAMPLE_RATE * RATIO_N`), without padding examples
    (those `padding_flag` marks, see `real_examples`), and none at all when
    `stopping_signals_sum` (the original's caching-mode rule) is non-zero;
    without uid buckets or flag all are used. Each selection and the first
    sample rate go through `slice_tensor`, each payload through
    `serialize_tensor`, where the original calls them. The DeepInsight
    labels and predictions are written whenever uid buckets are, as in the
    original; request times and the first sample rate with
    `enable_deepinsight`.

    Args:
      step: The number to write at (the open `HostCallSummaries` scope's).
      raw: The received tensors, before selection.
      slice_tensor: The host call's `_slice_tensor`.
      serialize_tensor: The host call's `_serialize_tensor`.
      enable_deepinsight: Also serialize request times and sample rates.
      top_k: Examples per core and step (each request time's repeat count).
      stopping_signals_sum: Optional int scalar (see above).
      padding_flag: Optional recorded `stopping_signals` (see `real_examples`).

    Returns:
      The AUC update op, or None without labels and predictions.
    """
    if raw.labels is None or raw.y_preds is None:
        _write_averages(step, raw)
        return None
    expect_shape = raw.labels.shape.as_list()
    keep = _sampled_mask(raw, stopping_signals_sum, padding_flag)
    sampled = raw
    indices = None
    if keep is not None:
        # A vector even when exactly one example is kept.
        indices = tf.reshape(tf.where(keep), [-1])
        sampled = dataclasses.replace(
            raw,
            labels=slice_tensor(raw.labels, indices, expect_shape, tf.float32),
            y_preds=slice_tensor(raw.y_preds, indices, expect_shape, tf.float32),
        )
    if raw.uid_buckets is not None:
        serialize_tensor(sampled.labels, step, DEEPINSIGHT_LABELS)
        serialize_tensor(sampled.y_preds, step, DEEPINSIGHT_PREDS)
        if enable_deepinsight and raw.req_times is not None:
            _tensor_checks.check_rank("req_times (one per replica)", raw.req_times, 2)
            # One request time per step and core: repeat it for its examples.
            per_example = tf.repeat(raw.req_times, top_k, axis=1)
            sampled = dataclasses.replace(
                sampled, req_times=slice_tensor(per_example, indices, expect_shape, tf.int64)
            )
            serialize_tensor(sampled.req_times, step, DEEPINSIGHT_REQ_TIMES)

    _, auc_op = tf.compat.v1.metrics.auc(labels=sampled.labels, predictions=sampled.y_preds)
    # The value the update returns: this call's examples included, no race.
    tf.summary.scalar("auc", data=auc_op, step=step)
    if enable_deepinsight and raw.sample_rates is not None:
        _tensor_checks.check_rank("sample_rates (one per replica)", raw.sample_rates, 1)
        # One sample rate stands for all examples of this host call.
        first_rate = slice_tensor(
            raw.sample_rates, [0], raw.sample_rates.shape.as_list(), tf.float32
        )
        serialize_tensor(first_rate, step, DEEPINSIGHT_SAMPLE_RATES)
    _write_averages(step, sampled)
    return auc_op


def _write_averages(step: tf.Tensor, tensors: ExampleTensors) -> None:
    for summary_name, value in (
        ("sampled_labels_variable_avg", tensors.labels),
        ("sampled_preds_variable_avg", tensors.y_preds),
        ("req_times_variable_avg", tensors.req_times),
        ("sample_rates_variable_avg", tensors.sample_rates),
    ):
        if value is not None:
            tf.summary.scalar(summary_name, data=tf.reduce_mean(value), step=step)
