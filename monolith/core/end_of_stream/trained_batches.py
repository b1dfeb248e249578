"""Resuming the input stream where the restored model left it: `skip_trained_batches`.

End-of-stream training reads a finite stream once. A restarted job (after a
`kill -9`, a preemption, or a finished run started again) replays the stream
from its first batch unless the input pipeline knows how far the restored
model got; everything before the checkpoint is then trained twice.

The checkpoint already holds that position. With `skip_padding_steps`, a
padding step changes nothing and does not advance the global step, so the
restored global step is the number of real steps, and each input pipeline
has consumed `global_step * batches_per_step` batches of its stream for them
(under `StopRule.ALL_REPLICAS_PADDING`, where a step with any real example is
real, at most its whole shard). `skip_trained_batches` skips exactly those
batches.

The count is read from the graph's global step variable by an op of the
dataset graph, so it is evaluated when the iterator's initializer runs, i.e.
after the checkpoint restore (TPUEstimator's `MultiHostDatasetInitializerHook`
and the emulator's feed hook both run it in `after_create_session`). A
session that `MonitoredSession` recreates in-process (on AbortedError or
UnavailableError, e.g. after a TPU worker restart) restores the checkpoint and
runs the initializer again, so it resumes at the right batch too; a Python
value read while the graph is built would resume it at the first run's
position.

The count is a position only for the batch size, batches per step, topology,
stop rule and stream the checkpoint was trained with. Each call registers
what it rests on in the graph (`resume_record.register_pipeline`); the feed
hook compares that with model_dir's resume record before anything trains and
refuses a restart that differs (`ResumeMismatchError`).
"""

from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf
from absl import logging
from tensorflow_estimator.python.estimator.tpu import tpu_config

from monolith.core.common.validation import positive_int
from monolith.core.end_of_stream import resume_record
from monolith.core.end_of_stream.resume_record import ResumeMismatchError

__all__ = ["ResumeMismatchError", "skip_trained_batches"]


def skip_trained_batches(
    dataset: tf.data.Dataset,
    batches_per_step: Optional[int] = None,
    *,
    context: Any = None,
    stream_id: Optional[str] = None,
) -> tf.data.Dataset:
    """The batched `dataset` minus the batches the restored model has already trained.

    Skips `global_step * batches_per_step` batches, with the global step read
    in-graph when the input iterator is initialised (after the checkpoint
    restore), not when the graph is built:

        from monolith.core.stopping_signals import (
            append_stopping_signals,
            skip_trained_batches,
        )

        def input_fn(params):
            dataset = tf.data.TFRecordDataset(files)  # same order every run
            dataset = dataset.shuffle(10_000, seed=7)  # seeded: deterministic
            dataset = dataset.batch(params["batch_size"], drop_remainder=True)
            dataset = dataset.map(parse_batch)
            dataset = skip_trained_batches(dataset, context=params.get("context"))
            return append_stopping_signals(dataset)

    What it rests on:

    * The global step counts real steps: the model_fn wraps its optimizer
      with `skip_padding_steps` (or otherwise advances the global step once
      per real step and never on a padding step).
    * The dataset order is deterministic: every run yields the same batches
      in the same order (seeded shuffles, a fixed file order, no
      `deterministic=False` interleaves or maps). Otherwise the skipped
      batches are not the trained ones.
    * It goes on the batched dataset (one element = one batch the model
      trains on), before `append_stopping_signals`, so only real batches are
      skipped and the padding tail stays endless.

    Batches per step: every train step consumes `batches_per_step` batches of
    this input pipeline. Under TPUEstimator's PER_HOST_V2 (the original
    runner's setting) each host's input_fn feeds all replicas of its host,
    with one `get_next()` per replica, so it is the host's replica count,
    `params["context"].current_input_fn_deployment()[3]`. Under PER_HOST_V1
    (one per-host batch split across the host's cores), BROADCAST (one batch
    for all replicas) and PER_SHARD_V1 (one input_fn per core) it is 1.
    Pass `context=params["context"]` to derive it, or give it explicitly.

    The partial last step: under the default stop rule
    (`StopRule.ANY_REPLICA_PADDING`) training stops on the first step in
    which any replica's batch is padding, and `skip_padding_steps` applies
    nothing on that step. When the stream ends inside a step (some replicas
    got real batches, others padding; or, with several hosts, one host's
    shard ends first), the real batches of that step are not trained, like
    `drop_remainder=True` at the global batch. A restart skips the
    `global_step * batches_per_step` trained batches, meets the same partial
    step, and trains nothing more. Under `StopRule.ALL_REPLICAS_PADDING`
    every step with a real example is trained and counted, so a pipeline
    has consumed `min(global_step * batches_per_step, its batches)`: the
    same skip, which leaves a pipeline whose shard has ended with its
    padding tail only.

    The resume guard: the skip is right only for the batch size (the
    dataset's static batch dimension), batches per step, topology (hosts,
    input pipelines, input mode) and stream the checkpoint was trained with,
    and for its stop rule. The call registers these in the graph, and the
    feed hook checks them against model_dir's resume record once the graph
    is built and before anything trains: a restart whose values differ
    raises `ResumeMismatchError`, naming each value (old -> new). A longer or
    shorter stream is allowed. Give `stream_id` to tell streams apart that the
    other values cannot, e.g. `stream_id=f"seed={seed} files={pattern}"`.

    Not for eager iteration: eagerly, the count would be read once, now. In a
    graph it works with `make_initializable_iterator` (what TPUEstimator and
    `monolith.core.testing` use); `make_one_shot_iterator` refuses datasets
    that read a variable.

    Args:
      dataset: A batched `tf.data.Dataset` (before `append_stopping_signals`).
      batches_per_step: Batches of this pipeline one train step consumes (a
        positive int). None: derived from `context`, or 1 without it.
      context: TPUEstimator's `params["context"]` (a `TPUContext`) of this
        input_fn call, or None.
      stream_id: Keyword-only. A string naming the stream (recorded and
        compared on restart), or None.

    Returns:
      `dataset` with its first `global_step * batches_per_step` elements
      skipped, the count evaluated at each iterator initialisation.

    Raises:
      TypeError: `dataset` is not a `tf.data.Dataset`; `batches_per_step` is
        not an int; `context` has no `current_input_fn_deployment`;
        `stream_id` is not a str.
      ValueError: `batches_per_step` is not positive, or disagrees with the
        count `context` gives; the graph already holds a different call for
        the same input pipeline.
      RuntimeError: called eagerly, or the graph has no global step (create
        it first; TPUEstimator and the emulator do before calling input_fn).
      tf.errors.InvalidArgumentError: at iterator initialisation, if the
        global step is negative.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"dataset={dataset!r} (type {type(dataset).__name__}) must be a tf.data.Dataset."
        )
    per_step = _batches_per_step(batches_per_step, context)
    if stream_id is not None and not isinstance(stream_id, str):
        raise TypeError(
            f"stream_id={stream_id!r} (type {type(stream_id).__name__}) must be a str or None."
        )
    if tf.executing_eagerly():
        raise RuntimeError(
            "skip_trained_batches reads the global step when the input iterator is "
            "initialised, which needs a graph (a TPUEstimator input_fn, or "
            "tf.compat.v1.data.make_initializable_iterator); eagerly the count would be "
            "read once, now."
        )
    global_step = tf.compat.v1.train.get_global_step()
    if global_step is None:
        raise RuntimeError(
            "skip_trained_batches found no global step in the graph; create it first "
            "(tf.compat.v1.train.get_or_create_global_step(); TPUEstimator does before it "
            "calls input_fn)."
        )
    resume_record.register_pipeline(_pipeline_record(dataset, per_step, context, stream_id))
    logging.info(
        "Input resumes after global_step * %d batches (read at iterator initialisation).",
        per_step,
    )
    with tf.name_scope("skip_trained_batches"):
        # An op of the dataset graph: runs with the iterator's initializer.
        step = tf.identity(tf.cast(global_step, tf.int64), name="trained_steps")
        check = tf.debugging.assert_non_negative(
            step, message="skip_trained_batches: the global step is negative"
        )
        with tf.control_dependencies([check]):
            count = step * per_step
    return dataset.skip(count)


def _pipeline_record(
    dataset: tf.data.Dataset, per_step: int, context: Any, stream_id: Optional[str]
) -> resume_record.PipelineRecord:
    """What this call's skip count rests on, for the resume guard."""
    if context is None:
        pipeline, num_pipelines, num_hosts, mode = 0, 1, None, None
    else:
        _, pipeline, num_pipelines, _ = context.current_input_fn_deployment()
        num_hosts = getattr(context, "num_hosts", None)
        mode = _INPUT_MODE_NAMES.get(_input_mode(context))
    return resume_record.PipelineRecord(
        pipeline=int(pipeline),
        num_pipelines=int(num_pipelines),
        num_hosts=int(num_hosts) if num_hosts is not None else None,
        input_mode=mode,
        batch_size=_static_batch_size(dataset),
        batches_per_step=per_step,
        stream_id=stream_id,
    )


def _static_batch_size(dataset: tf.data.Dataset) -> Optional[int]:
    """The batch dimension every component of `dataset` agrees on, or None (logged)."""
    sizes = set()
    for spec in tf.nest.flatten(dataset.element_spec):
        shape = getattr(spec, "shape", None)
        if shape is not None and shape.rank:
            size = tf.compat.dimension_value(shape[0])
            if size is not None:
                sizes.add(int(size))
    if len(sizes) == 1:
        return sizes.pop()
    logging.warning(
        "skip_trained_batches: the dataset's batch dimension is %s; the resume guard cannot "
        "check the batch size (batch with drop_remainder=True to give it a static one).",
        f"ambiguous {sorted(sizes)}" if sizes else "not static",
    )
    return None


_INPUT_MODE_NAMES = {
    getattr(tpu_config.InputPipelineConfig, name): name
    for name in ("PER_SHARD_V1", "PER_HOST_V1", "PER_HOST_V2", "BROADCAST", "SLICED")
    if hasattr(tpu_config.InputPipelineConfig, name)
}


def _input_mode(context: Any) -> Any:
    """The context's `InputPipelineConfig` (TPUContext has no public view; its internal one has)."""
    internal = getattr(context, "_internal_ctx", None)
    return internal.config.tpu_config.per_host_input_for_training if internal else None


def _batches_per_step(batches_per_step: Any, context: Any) -> int:
    """The validated batches-per-step count from the argument and/or the TPU context."""
    if batches_per_step is not None:
        batches_per_step = positive_int("batches_per_step", batches_per_step)
    if context is None:
        return int(batches_per_step) if batches_per_step is not None else 1
    from_context = _from_context(context)
    if batches_per_step is not None and batches_per_step != from_context:
        raise ValueError(
            f"batches_per_step={batches_per_step!r} disagrees with context={context!r}, whose "
            f"input deployment consumes {from_context} batch(es) per step; give one of them."
        )
    return from_context


def _from_context(context: Any) -> int:
    """Batches one train step takes from the input_fn `context` belongs to.

    PER_HOST_V2: `current_input_fn_deployment()[3]` (one `get_next()` per
    replica of the host, at least 1). Every other deployment: 1 (PER_HOST_V1
    and BROADCAST dequeue one batch per step and split or copy it; PER_SHARD_V1
    calls input_fn per core, each fed once per step).

    Args:
      context: TPUEstimator's `params["context"]` in an input_fn.

    Raises:
      TypeError: `context` is not a TPUEstimator `TPUContext`.
    """
    if not callable(getattr(context, "current_input_fn_deployment", None)):
        raise TypeError(
            f"context={context!r} (type {type(context).__name__}) must be TPUEstimator's "
            'params["context"] (a TPUContext with current_input_fn_deployment()).'
        )
    replicas = int(context.current_input_fn_deployment()[3])
    mode = _input_mode(context)
    if mode is tpu_config.InputPipelineConfig.PER_HOST_V2:
        return max(1, replicas)
    return 1
