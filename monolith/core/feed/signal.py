"""The stop signal's name and shape: what the input side writes and the feed hook reads.

The input side (`monolith.core.end_of_stream`) appends a bool feature named
`_USER_PROVIDED_SIGNAL_NAME` to every batch; TPUEstimator sends
`{"stopping": flag}` for it through the outfeed, and the feed hook's outfeed
thread reads it back with `_stopping_value`. Both sides import the name from
here, so neither depends on the other. So does `StopRule`, the rule that
decides which padding ends training.

The rule is chosen once, in `append_stopping_signals(..., stop_rule=...)`,
which records it in the graph (`record_stop_rule`). Each reader of the rule
(the TPU step's stop signal, `skip_padding_steps`, `is_padding_step`, the
feed hook's stop decision) takes it with `follow_stop_rule`, which also
records what that reader followed: a reader built before a pipeline recorded
another rule, or pipelines recorded with different rules, raise a
ValueError while the graph is built, so no step can be built whose pieces
follow different rules.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

from monolith.core.common.tpu_context import outermost_graph

__all__ = [
    "StopRule",
    "_REAL_EXAMPLES_KEY",
    "_STOPPING_KEY",
    "_USER_PROVIDED_SIGNAL_NAME",
    "_real_examples_value",
    "_stopping_value",
    "follow_stop_rule",
    "record_stop_rule",
    "stop_rule_of_graph",
    "stop_rule_readers",
]

_USER_PROVIDED_SIGNAL_NAME = "_user_provided_signal_name"
_STOPPING_KEY = "stopping"
# Beside "stopping" in the outfed signal dict: each replica's count of real
# examples in its batch (int32 `[1]` per replica; `[num_replicas]` on the host,
# in replica order), so the hook can name the replicas that still had data.
_REAL_EXAMPLES_KEY = "real_examples"
# Graph collection holding the `StopRule.value` of every append_stopping_signals call.
_STOP_RULE_COLLECTION = "monolith_stop_rule"
# Graph collection of "<reader>\t<StopRule.value>": which reader followed which rule.
_STOP_RULE_READERS_COLLECTION = "monolith_stop_rule_readers"


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
    outermost_graph(graph).add_to_collection(_STOP_RULE_COLLECTION, rule.value)


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
    values = set(outermost_graph(graph).get_collection(_STOP_RULE_COLLECTION))
    if len(values) > 1:
        raise ValueError(
            "the input pipelines of this graph were built with different stop rules "
            f"{sorted(values)}; pass the same stop_rule to every append_stopping_signals call."
        )
    return StopRule(values.pop()) if values else StopRule.ANY_REPLICA_PADDING


def stop_rule_readers(graph: Optional[tf.Graph] = None) -> dict:
    """`{reader: StopRule}`: what each reader of the graph followed (`follow_stop_rule`)."""
    readers = {}
    for entry in outermost_graph(graph).get_collection(_STOP_RULE_READERS_COLLECTION):
        reader, value = entry.rsplit("\t", 1)
        readers[reader] = StopRule(value)
    return readers


def follow_stop_rule(reader: str, graph: Optional[tf.Graph] = None) -> StopRule:
    """The graph's stop rule, for `reader` to follow; records that `reader` follows it.

    Called while the graph is built by every piece that acts on the rule, so
    all of them follow the one rule `append_stopping_signals` recorded.
    Executing eagerly (no graph is being built) it only returns the rule.

    Args:
      reader: What follows the rule, as the error message should name it
        (e.g. "skip_padding_steps").
      graph: The graph (default: the default graph; its outermost graph is used).

    Returns:
      `stop_rule_of_graph(graph)`.

    Raises:
      ValueError: The graph's pipelines recorded different rules, or a reader
        built earlier followed a rule other than the one the graph records
        now (a pipeline recorded its rule after that reader was built): the
        step would stop, skip and count steps under different rules.
    """
    rule = stop_rule_of_graph(graph)
    if tf.executing_eagerly() and graph is None:
        return rule
    outer = outermost_graph(graph)
    disagree = {name: other for name, other in stop_rule_readers(outer).items() if other != rule}
    if disagree:
        followed = ", ".join(f"{name} followed {other.name}" for name, other in disagree.items())
        raise ValueError(
            f"{reader} would follow stop rule {rule.name}, the rule the graph's input pipelines "
            f"record, but {followed}: an append_stopping_signals call recorded its stop_rule "
            "after those were built. Build every input pipeline (append_stopping_signals) before "
            "the model_fn, as TPUEstimator does, with one stop_rule."
        )
    outer.add_to_collection(_STOP_RULE_READERS_COLLECTION, f"{reader}\t{rule.value}")
    return rule


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


def _real_examples_value(ret: Any) -> Optional[np.ndarray]:
    """Each replica's real examples in one outfeed result (int array, replica order), or None.

    Read once, on the step that stopped training (not per step). None when
    the result carries no `_REAL_EXAMPLES_KEY` (e.g. a hook subclass's own
    `get_stopping_signals_and_name`).
    """
    if not _is_mapping(ret):
        return None
    signal = ret.get(_USER_PROVIDED_SIGNAL_NAME)
    if not _is_mapping(signal) or _REAL_EXAMPLES_KEY not in signal:
        return None
    return np.asarray(signal[_REAL_EXAMPLES_KEY]).reshape([-1])
