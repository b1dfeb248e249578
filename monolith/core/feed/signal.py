"""The stop signal's name and shape: what the input side writes and the feed hook reads.

The input side (`monolith.core.end_of_stream`) appends a bool feature named
`_USER_PROVIDED_SIGNAL_NAME` to every batch; TPUEstimator sends
`{"stopping": flag}` for it through the outfeed, and the feed hook's outfeed
thread reads it back with `_stopping_value`. Both sides import the name from
here, so neither depends on the other. So does `StopRule`, the rule that
decides which padding ends training.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

__all__ = [
    "StopRule",
    "_STOPPING_KEY",
    "_USER_PROVIDED_SIGNAL_NAME",
    "_stopping_value",
    "record_stop_rule",
    "stop_rule_of_graph",
]

_USER_PROVIDED_SIGNAL_NAME = "_user_provided_signal_name"
_STOPPING_KEY = "stopping"
# Graph collection holding the `StopRule.value` of every append_stopping_signals call.
_STOP_RULE_COLLECTION = "monolith_stop_rule"


class StopRule(enum.Enum):
    """Which padding ends training, chosen once in `append_stopping_signals`.

    * `ANY_REPLICA_PADDING` (the default, the original's rule): a step in
      which any replica's batch is padding ends training and trains nothing;
      the global step counts the steps in which every replica had real data.
    * `ALL_REPLICAS_PADDING` ("nothing lost"): training ends only on a step in
      which every replica's batch is padding; a partly real step is trained
      and counted.

    The resume record (`monolith.core.end_of_stream.resume_record`) keeps the
    rule a model_dir was trained with, since its global step counts steps
    under that rule.
    """

    ANY_REPLICA_PADDING = "any_replica_padding"
    ALL_REPLICAS_PADDING = "all_replicas_padding"


def _outermost_graph(graph: Optional[tf.Graph]) -> tf.Graph:
    """`graph` (default: the default graph) or, inside function bodies, the graph holding them.

    TPUEstimator calls input_fn in the outer graph and builds the train step in
    while-loop and function bodies (FuncGraphs in TF2 behaviour), so the rule is
    kept in the outermost graph, where both sides find it.
    """
    graph = graph if graph is not None else tf.compat.v1.get_default_graph()
    while getattr(graph, "outer_graph", None) is not None:
        graph = graph.outer_graph
    return graph


def record_stop_rule(rule: StopRule, graph: Optional[tf.Graph] = None) -> None:
    """Records the stop rule an input pipeline was built with (called by the input side).

    Raises:
      TypeError: `rule` is not a `StopRule`.
    """
    if not isinstance(rule, StopRule):
        raise TypeError(
            f"stop_rule={rule!r} (type {type(rule).__name__}) must be a StopRule "
            f"({', '.join('StopRule.' + r.name for r in StopRule)})."
        )
    _outermost_graph(graph).add_to_collection(_STOP_RULE_COLLECTION, rule.value)


def stop_rule_of_graph(graph: Optional[tf.Graph] = None) -> StopRule:
    """The stop rule the graph's input pipelines were built with.

    Every reader of the rule (the TPU step's stop signal, `skip_padding_steps`,
    the feed hook, the resume record) asks here, so all of them follow the one
    choice made in `append_stopping_signals`.

    Returns:
      The recorded rule; `StopRule.ANY_REPLICA_PADDING` (the original's) when
      no pipeline recorded one.

    Raises:
      ValueError: Pipelines of the graph were built with different rules.
    """
    values = set(_outermost_graph(graph).get_collection(_STOP_RULE_COLLECTION))
    if len(values) > 1:
        raise ValueError(
            "the input pipelines of this graph were built with different stop rules "
            f"{sorted(values)}; pass the same stop_rule to every append_stopping_signals call."
        )
    return StopRule(values.pop()) if values else StopRule.ANY_REPLICA_PADDING


def _is_mapping(value: Any) -> bool:
    """isinstance(value, Mapping), with the plain dict that `session.run` returns first.

    The ABC check costs about a microsecond; this runs twice per outfed step.
    """
    return type(value) is dict or isinstance(value, Mapping)


_MISSING = object()


def _stopping_value(ret: Any) -> Optional[bool]:
    """The stop flag in one outfeed result, or None when it carries no signal.

    `ret[_USER_PROVIDED_SIGNAL_NAME]["stopping"]` is a bool array (TPUEstimator
    concatenates the per-replica outfeeds); the stream has ended when any
    element is True. Well-formed inputs pad whole batches, so this equals the
    original's check of element 0. Runs once per outfed step on the outfeed
    thread, so it does one lookup per level and counts with
    `np.count_nonzero` (about 5x cheaper than `ndarray.any()`'s ufunc
    reduction on a small array; it accepts scalars and lists alike).

    Raises:
      RuntimeError: The signal entry is not a dict with key 'stopping'.
    """
    if not _is_mapping(ret):
        return None
    signal = ret.get(_USER_PROVIDED_SIGNAL_NAME, _MISSING)
    if signal is _MISSING:
        return None
    value = signal.get(_STOPPING_KEY, _MISSING) if _is_mapping(signal) else _MISSING
    if value is _MISSING:
        found = sorted(signal) if _is_mapping(signal) else type(signal).__name__
        raise RuntimeError(
            f"ret[{_USER_PROVIDED_SIGNAL_NAME!r}] must contain key {_STOPPING_KEY!r}; "
            f"got {found!r}."
        )
    return np.count_nonzero(value) > 0
