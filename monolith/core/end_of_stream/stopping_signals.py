"""Input side of end-of-stream training: the stopping-signal feature and its padding tail.

`TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook` stops training when a
train step reports the stop flag, which it reads from the feature
`_USER_PROVIDED_SIGNAL_NAME` (bool, shape `[batch]`). The TPU keeps running
whole loops of `iterations_per_loop` steps and its infeed must never run dry
(an empty infeed blocks the TPU forever), so a finite input pipeline has to
become an endless one: every real batch flagged False, then an endless tail
of padding batches flagged True, all with the same structure and static
shapes (the infeed is built once, from the dataset's element spec).

`append_stopping_signals` does exactly that. The padding batch is built from
the dataset's element spec alone (zeros, empty strings, empty sparse and
ragged tensors), so the data source is read once, as in training without the
hook: nothing is re-opened, re-parsed or re-shuffled to make padding, and a
source that can be read only once (a generator, a stream) works.

Where it runs: inside the user's `input_fn`, i.e. when TPUEstimator builds the
input pipeline on each host (graph building, main thread); the dataset's
iterator then runs on the infeed side. The hook itself never sees the dataset.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import tensorflow as tf

from monolith.core.common.validation import positive_int
from monolith.core.end_of_stream.masked_loss import masked_mean_loss
from monolith.core.end_of_stream.padding_steps import is_padding_step, skip_padding_steps
from monolith.core.end_of_stream.trained_batches import skip_trained_batches
from monolith.core.feed.signal import _USER_PROVIDED_SIGNAL_NAME, StopRule, record_stop_rule

__all__ = [
    "StopRule",
    "USER_PROVIDED_SIGNAL_NAME",
    "_USER_PROVIDED_SIGNAL_NAME",
    "append_stopping_signals",
    "is_padding_step",
    "masked_mean_loss",
    "padding_batch",
    "skip_padding_steps",
    "skip_trained_batches",
]

#: Public alias of the feature name the feed hook reads the stop flag from.
USER_PROVIDED_SIGNAL_NAME = _USER_PROVIDED_SIGNAL_NAME

_UNPADDABLE_DTYPES = (tf.variant, tf.resource)


def append_stopping_signals(
    dataset: tf.data.Dataset,
    batch_size: Optional[int] = None,
    *,
    stop_rule: StopRule = StopRule.ANY_REPLICA_PADDING,
) -> tf.data.Dataset:
    """Flags every real batch False and appends an endless tail of padding batches flagged True.

    Use it as the last step of a TPUEstimator `input_fn` when training with
    the end-of-stream hook, after batching with `drop_remainder=True` (the TPU
    needs static shapes):

        from monolith.core.auto_checkpoint_feed_hook import (
            TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        )
        from monolith.core.stopping_signals import append_stopping_signals

        def input_fn(params):
            # TPUEstimator passes the per-host (or per-core) batch size.
            batch_size = params["batch_size"]
            dataset = tf.data.TFRecordDataset(files)  # finite: no .repeat()
            dataset = dataset.batch(batch_size, drop_remainder=True)
            dataset = dataset.map(parse_batch)  # -> (features, labels)
            # batch_size is only needed when a component lost its static batch
            # dim (e.g. tf.io.parse_example's VarLenFeature outputs); harmless otherwise.
            return append_stopping_signals(dataset, batch_size=batch_size)

        config = tpu_config.RunConfig(
            tpu_config=tpu_config.TPUConfig(
                iterations_per_loop=100,
                experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
            ),
            ...,
        )
        estimator = tpu_estimator.TPUEstimator(model_fn, config=config, ...)
        # A TPU needs max_steps; it is never reached: training stops at the end
        # of the data.
        estimator.train(input_fn, max_steps=sys.maxsize)

    In the `model_fn`, padding batches are real steps (at most
    `iterations_per_loop` of them run before training stops): wrap the
    optimizer with `skip_padding_steps(optimizer, features)` so that they
    change no variable and do not advance the global step. Masking the loss is
    not enough: Adam, Momentum and RMSProp move weights on a zero gradient.
    Padding is all zeros (`""` for strings, empty sparse/ragged tensors).

    The stop rule is chosen here, once, and recorded in the graph; the feed
    hook's stop signal and stop decision, `skip_padding_steps` and
    `is_padding_step` all follow it (a step built so that they disagree
    raises a ValueError while the graph is built):

    * `StopRule.ANY_REPLICA_PADDING` (default, the original's): training
      stops on the first step in which any replica's batch is padding, and
      that step trains nothing. On a pod whose hosts' shards differ in
      length, the rest of the longer shards is not trained (the feed hook
      logs a WARNING naming them).
    * `StopRule.ALL_REPLICAS_PADDING` ("nothing lost"): training stops only on
      a step in which every replica's batch is padding. A step in which some
      replicas have real batches is trained and counted, so only its real
      examples may contribute: the loss must be masked, e.g. with
      `masked_mean_loss(per_example_loss, features)` and
      `CrossShardOptimizer(..., reduction=tf.compat.v1.losses.Reduction.SUM)`
      (`skip_padding_steps` raises a ValueError for a loss that does not
      depend on the padding flag).

    With one replica both rules are the same.

    Args:
      dataset: A finite, batched `tf.data.Dataset` whose elements are a
        `features` dict or a `(features, labels)` tuple (labels a tensor or a
        nest of them). Components may be dense tensors of any dtype (except
        variant/resource), `tf.SparseTensor` or `tf.RaggedTensor`; the first
        dimension of every component of rank >= 1 is the batch dimension.
      batch_size: The batch size, needed only when the element spec has no
        static batch dimension (e.g. after `from_generator` or a map that lost
        the shape). Real batches are then checked against it at run time (an
        `InvalidArgumentError` for a short batch) and get the static shape.
      stop_rule: Keyword-only. Which padding ends training (see above).

    Returns:
      A dataset of the same structure whose features hold
      `USER_PROVIDED_SIGNAL_NAME` (bool `[batch_size]`): the real batches
      unchanged and flagged False, then padding batches flagged True, forever.

    Raises:
      TypeError: `dataset` is not a `tf.data.Dataset`; its elements are not a
        features dict or `(features, labels)`; a component cannot be padded
        (variant/resource dtype, or not a tensor, sparse or ragged tensor).
      ValueError: the features already hold `USER_PROVIDED_SIGNAL_NAME`; a
        component has no static batch dimension and no `batch_size` was
        given; batch dimensions disagree with each other or with
        `batch_size`; a dense component has an unknown non-batch dimension or
        rank; `batch_size` is not positive (a non-int is a TypeError); another
        pipeline of the graph was built with a different `stop_rule` (raised
        where the rule is read: by the model_fn's `skip_padding_steps` or the
        feed hook's stop signal).
      TypeError: `stop_rule` is not a `StopRule`.
    """
    if not isinstance(stop_rule, StopRule):
        raise TypeError(
            f"stop_rule={stop_rule!r} (type {type(stop_rule).__name__}) must be a StopRule "
            f"({', '.join('StopRule.' + r.name for r in StopRule)})."
        )
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"dataset={dataset!r} (type {type(dataset).__name__}) must be a tf.data.Dataset."
        )
    features_spec, labels_spec, has_labels = _split_element_spec(dataset.element_spec)
    batch = _resolve_batch_size(
        _component_specs(features_spec, labels_spec, has_labels), batch_size
    )

    def flag_real(*element: Any) -> Any:
        features, labels = (element[0], element[1]) if has_labels else (element[0], None)
        features = _with_signal(_set_batch_dim(features, batch), batch, stop=False)
        if not has_labels:
            return features
        return features, _set_batch_dim(labels, batch)

    padding = padding_batch(dataset.element_spec, batch)
    padding_dataset = tf.data.Dataset.from_tensors(padding).repeat()
    if not tf.executing_eagerly():
        # The readers of the rule (TPU step, skip_padding_steps, feed hook) are
        # built in this graph; an eager pipeline trains under no feed hook.
        record_stop_rule(stop_rule)
    return dataset.map(flag_real).concatenate(padding_dataset)


def padding_batch(element_spec: Any, batch_size: Optional[int] = None) -> Any:
    """Builds one padding element (signal True) for datasets with `element_spec`.

    The tensors are created in the current graph (or eagerly); call it where the
    dataset is built. `append_stopping_signals` uses it for its tail; it is
    public so an input pipeline that assembles its own tail (e.g. interleaving
    several hosts' streams) pads exactly the same way.

    Args:
      element_spec: `dataset.element_spec` of a batched dataset whose elements
        are a features dict or `(features, labels)`, without the signal.
      batch_size: As for `append_stopping_signals`.

    Returns:
      A features dict (or `(features, labels)` tuple) of zero-filled tensors,
      empty sparse/ragged tensors and the signal `tf.ones([batch], tf.bool)`.

    Raises:
      TypeError, ValueError: As for `append_stopping_signals`.
    """
    features_spec, labels_spec, has_labels = _split_element_spec(element_spec)
    batch = _resolve_batch_size(
        _component_specs(features_spec, labels_spec, has_labels), batch_size
    )
    features = _with_signal(_zeros_like_spec(features_spec, batch), batch, stop=True)
    if not has_labels:
        return features
    return features, _zeros_like_spec(labels_spec, batch)


# -- element structure ------------------------------------------------------------------


def _split_element_spec(element_spec: Any) -> Tuple[Mapping, Any, bool]:
    """Returns (features spec, labels spec, whether there are labels), validated."""
    if isinstance(element_spec, tuple) and not hasattr(element_spec, "_fields"):
        if len(element_spec) != 2:
            raise TypeError(
                f"dataset elements are a tuple of {len(element_spec)} components; expected a "
                "features dict or a (features, labels) tuple as a TPUEstimator input_fn returns."
            )
        features_spec, labels_spec = element_spec
        has_labels = True
    else:
        features_spec, labels_spec, has_labels = element_spec, None, False
    if not isinstance(features_spec, Mapping):
        raise TypeError(
            f"dataset features must be a dict so the signal can be added as feature "
            f"{_USER_PROVIDED_SIGNAL_NAME!r}; got {features_spec!r}."
        )
    if _USER_PROVIDED_SIGNAL_NAME in features_spec:
        raise ValueError(
            f"dataset features already hold {_USER_PROVIDED_SIGNAL_NAME!r} "
            f"({features_spec[_USER_PROVIDED_SIGNAL_NAME]!r}); append the stopping signals "
            "only once."
        )
    return features_spec, labels_spec, has_labels


def _leaves_with_paths(structure: Any, path: str) -> list:
    """(path, leaf) pairs of a nest of dicts/tuples/lists, e.g. ("features['ids']", spec)."""
    if isinstance(structure, Mapping):
        pairs = []
        for key in sorted(structure, key=repr):
            pairs.extend(_leaves_with_paths(structure[key], f"{path}[{key!r}]"))
        return pairs
    if isinstance(structure, (tuple, list)):
        pairs = []
        for index, item in enumerate(structure):
            pairs.extend(_leaves_with_paths(item, f"{path}[{index}]"))
        return pairs
    return [(path, structure)]


def _map_leaves(fn: Any, structure: Any) -> Any:
    """`fn` applied to every leaf, keeping dict/tuple/namedtuple/list structure."""
    if isinstance(structure, Mapping):
        return type(structure)((key, _map_leaves(fn, value)) for key, value in structure.items())
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):
        return type(structure)(*(_map_leaves(fn, item) for item in structure))
    if isinstance(structure, (tuple, list)):
        return type(structure)(_map_leaves(fn, item) for item in structure)
    return fn(structure)


def _component_specs(features_spec: Mapping, labels_spec: Any, has_labels: bool) -> list:
    pairs = _leaves_with_paths(features_spec, "features")
    if has_labels:
        pairs.extend(_leaves_with_paths(labels_spec, "labels"))
    return pairs


def _with_signal(features: Mapping, batch: int, stop: bool) -> dict:
    flagged = dict(features)
    fill = tf.ones if stop else tf.zeros
    flagged[_USER_PROVIDED_SIGNAL_NAME] = fill([batch], tf.bool)
    return flagged


# -- shapes (pure) -----------------------------------------------------------------------


def _validate_batch_size(batch_size: Any) -> Optional[int]:
    if batch_size is None:
        return None
    return positive_int("batch_size", batch_size)


def _resolve_batch_size(pairs: list, batch_size: Any) -> int:
    """Checks every component can be padded and returns the one batch size they share.

    Args:
      pairs: (path, spec) of every component, as `_component_specs` gives.
      batch_size: The caller's `batch_size` argument (None or an int).
    """
    batch_size = _validate_batch_size(batch_size)
    seen: Optional[Tuple[str, int]] = None
    for path, spec in pairs:
        shape = _check_paddable(path, spec)
        if shape.rank == 0:
            continue
        dim = tf.compat.dimension_value(shape[0])
        if dim is None:
            if batch_size is None:
                raise ValueError(
                    f"dataset component {path} has shape {shape.as_list()} with no static batch "
                    "dimension; batch with drop_remainder=True (the TPU needs static shapes) "
                    "or pass batch_size."
                )
            continue
        if batch_size is not None and dim != batch_size:
            raise ValueError(
                f"dataset component {path} has batch dimension {dim} (shape {shape.as_list()}), "
                f"but batch_size={batch_size}."
            )
        if seen is not None and seen[1] != dim:
            raise ValueError(
                f"dataset components disagree on the batch dimension: {seen[0]} has "
                f"{seen[1]}, {path} has {dim} (shape {shape.as_list()})."
            )
        seen = seen or (path, dim)
    if batch_size is not None:
        return batch_size
    if seen is None:
        raise ValueError(
            "no dataset component has a batch dimension (all are scalars); pass batch_size."
        )
    return seen[1]


def _check_paddable(path: str, spec: Any) -> tf.TensorShape:
    """Returns the static shape of a component after checking it can be zero-filled."""
    if not isinstance(spec, (tf.TensorSpec, tf.SparseTensorSpec, tf.RaggedTensorSpec)):
        raise TypeError(
            f"dataset component {path} is {spec!r}; only tensors, tf.SparseTensor and "
            "tf.RaggedTensor can be padded."
        )
    if spec.dtype in _UNPADDABLE_DTYPES:
        raise TypeError(
            f"dataset component {path} has dtype {spec.dtype.name}; it cannot be padded."
        )
    shape = tf.TensorShape(spec.shape)
    if shape.rank is None:
        raise ValueError(
            f"dataset component {path} has unknown rank ({spec!r}); padding needs the rank."
        )
    if isinstance(spec, tf.TensorSpec) and not shape[1:].is_fully_defined():
        raise ValueError(
            f"dataset component {path} has shape {shape.as_list()}; padding a dense tensor "
            "needs every non-batch dimension static (so does the TPU infeed)."
        )
    if isinstance(spec, tf.RaggedTensorSpec):
        if shape.rank == 0 or spec.ragged_rank == 0:
            raise ValueError(
                f"dataset component {path} is a ragged tensor spec with no ragged dimension "
                f"({spec!r}); pass it as a dense tensor."
            )
        uniform = [i for i in range(1, spec.ragged_rank + 1) if tf.compat.dimension_value(shape[i])]
        if uniform:
            raise ValueError(
                f"dataset component {path} is ragged with uniform dimensions {uniform} "
                f"(shape {shape.as_list()}); only ragged tensors whose dimensions "
                "1..ragged_rank are all ragged can be padded."
            )
    return shape


# -- graph building ------------------------------------------------------------------------


def _padded_shape(shape: tf.TensorShape, batch: int) -> list:
    """Static dims with the batch dim filled in and unknown inner dims as 0 (no elements)."""
    dims = [d if d is not None else 0 for d in shape.as_list()]
    if dims:
        dims[0] = batch
    return dims


def _zeros_like_spec(structure: Any, batch: int) -> Any:
    def zeros(spec: Any) -> Any:
        shape = tf.TensorShape(spec.shape)
        if isinstance(spec, tf.SparseTensorSpec):
            return tf.SparseTensor(
                indices=tf.zeros([0, shape.rank], tf.int64),
                values=tf.zeros([0], spec.dtype),
                dense_shape=tf.constant(_padded_shape(shape, batch), tf.int64),
            )
        if isinstance(spec, tf.RaggedTensorSpec):
            inner = _padded_shape(shape[spec.ragged_rank :], batch)[1:]
            values = tf.zeros([0, *inner], spec.dtype)
            for _ in range(spec.ragged_rank - 1):
                values = tf.RaggedTensor.from_row_lengths(
                    values, tf.zeros([0], spec.row_splits_dtype), validate=False
                )
            return tf.RaggedTensor.from_row_lengths(
                values, tf.zeros([batch], spec.row_splits_dtype), validate=False
            )
        return tf.zeros(_padded_shape(shape, batch), spec.dtype)

    return _map_leaves(zeros, structure)


def _has_static_batch_dim(value: Any) -> bool:
    shape = value.shape
    return shape.rank == 0 or tf.compat.dimension_value(shape[0]) is not None


def _set_batch_dim(structure: Any, batch: int) -> Any:
    """Gives components without a static batch dim the static `batch`, checked at run time."""

    def fix(value: Any) -> Any:
        if _has_static_batch_dim(value):
            return value
        if isinstance(value, tf.SparseTensor):
            check = tf.debugging.assert_equal(
                value.dense_shape[0],
                tf.constant(batch, tf.int64),
                message=f"a sparse batch is not of batch_size={batch}",
            )
            with tf.control_dependencies([check]):
                indices = tf.identity(value.indices)
            # A stacked dense_shape keeps its constant entries in the static shape.
            dims = [tf.constant(batch, tf.int64)]
            for i, dim in enumerate(value.shape.as_list()[1:], start=1):
                dims.append(tf.constant(dim, tf.int64) if dim is not None else value.dense_shape[i])
            return tf.SparseTensor(indices, value.values, tf.stack(dims))
        if isinstance(value, tf.RaggedTensor):
            row_splits = tf.ensure_shape(value.row_splits, [batch + 1])
            return tf.RaggedTensor.from_row_splits(value.values, row_splits, validate=False)
        return tf.ensure_shape(value, [batch, *value.shape.as_list()[1:]])

    return _map_leaves(fix, structure)
