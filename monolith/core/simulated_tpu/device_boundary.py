"""Stop a TPUEstimator program at the device boundary, with what it built.

On CPU with a simulated TPU system, TPUEstimator builds its whole training
graph; the first thing that needs a TPU device is a session against the TPU
master: the training session MonitoredSession creates after every hook's
`begin()`, or the feed hook's own session that runs `initialize_system`
(whichever comes first). `stop_at_device_boundary` makes creating any session
with a non-local target, or a local one on a graph with TPU ops (a directly
attached TPU, master ""), raise `DeviceBoundaryReached`, and records the
infeed/outfeed feed hook TPUEstimator constructs (by handing TPUEstimator a
recording subclass of the configured hook class), so the graph and the hook
can be inspected afterwards. Other local sessions run as usual.

`DeviceBoundaryReached` derives from `BaseException`, like `SystemExit`, so a
program's `except Exception:` does not swallow it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional

import tensorflow as tf
from absl import logging
from tensorflow.python.client import session as _session_lib
from tensorflow_estimator.python.estimator.tpu import tpu_context as _tpu_context
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator


@dataclasses.dataclass
class FeedHookRecord:
    """A feed hook TPUEstimator constructed, with its constructor arguments.

    Attributes:
      hook: The hook (an instance of a recording subclass of `hook_class`).
      hook_class: The class TPUEstimator was configured with
        (`TPUConfig.experimental_feed_hook`, or its stock
        `TPUInfeedOutfeedSessionHook` when none is configured).
      args: Positional constructor arguments `(ctx, enqueue_ops, dequeue_ops)`.
      kwargs: Keyword constructor arguments.
      graph: The default graph when `begin()` returned (None before that).
    """

    hook: tf.compat.v1.train.SessionRunHook
    hook_class: type
    args: tuple
    kwargs: Mapping[str, Any]
    graph: Optional[tf.Graph] = None


_TPU_ESTIMATOR_FILE = os.path.abspath(_tpu_estimator.__file__)


class DeviceBoundaryReached(BaseException):
    """Raised where the program would first use a TPU device.

    Attributes:
      where: What reached the boundary (e.g. "a session against 'grpc://...'").
      graph: The graph of that session (complete: every hook has begun).
      boundary: The `Boundary` record of what was built so far.
      feed_hooks: `boundary.feed_hooks`.
    """

    def __init__(self, where: str, graph: Optional[tf.Graph], boundary: Boundary):
        super().__init__(f"TPU device boundary reached: {where}")
        self.where = where
        self.graph = graph
        self.boundary = boundary

    @property
    def feed_hooks(self) -> List[FeedHookRecord]:
        return self.boundary.feed_hooks


# Ops only a TPU system runs: the replicated step, its host-side feeds, and
# the TPU initialisation. A local session on a graph with one of them is a
# session against a directly attached TPU (`TPUClusterResolver(tpu="local")`).
_TPU_OP_TYPES = frozenset(
    {
        "TPUReplicateMetadata",
        "TPUCompile",
        "ConfigureDistributedTPU",
        "InfeedEnqueueTuple",
        "InfeedEnqueue",
        "OutfeedDequeueTuple",
        "OutfeedDequeue",
    }
)


def _has_tpu_ops(graph: tf.Graph) -> bool:
    """Whether `graph` (or a function of its library) holds an op that needs a TPU."""
    if any(op.type in _TPU_OP_TYPES for op in graph.get_operations()):
        return True
    return any(
        node.op in _TPU_OP_TYPES
        for function in graph.as_graph_def().library.function
        for node in function.node_def
    )


class _StopAfterFeedHookBegin(BaseException):
    """Raised after the feed hook's `begin()` when asked to stop there."""


def _recording_hook_class(
    base: type, records: List[FeedHookRecord], stop_after_begin: bool
) -> type:
    """A subclass of `base` that records its construction (and `begin()`)."""

    class _RecordingHook(base):
        def __init__(self, *args: Any, **kwargs: Any):
            self._dry_run_record = FeedHookRecord(self, base, args, dict(kwargs))
            records.append(self._dry_run_record)
            super().__init__(*args, **kwargs)

        def begin(self) -> None:
            super().begin()
            self._dry_run_record.graph = tf.compat.v1.get_default_graph()
            if stop_after_begin:
                raise _StopAfterFeedHookBegin()

    if not hasattr(base, "get_stopping_signals_and_name"):
        # TPUEstimator calls this on any configured feed hook; (None, None) is
        # what it does without one.
        _RecordingHook.get_stopping_signals_and_name = staticmethod(lambda features: (None, None))
    _RecordingHook.__name__ = base.__name__
    _RecordingHook.__qualname__ = base.__qualname__
    _RecordingHook.__module__ = base.__module__
    return _RecordingHook


@dataclasses.dataclass
class Boundary:
    """What `stop_at_device_boundary` has seen so far.

    Attributes:
      feed_hooks: Every feed hook TPUEstimator constructed, oldest first.
      host_calls: Name -> host function of every host call TPUEstimator
        recorded for the outfeed (the model's `host_call`, the feed hook's
        stopping signal, or TPUEstimator's own loss host call when the model
        has none).
    """

    feed_hooks: List[FeedHookRecord] = dataclasses.field(default_factory=list)
    host_calls: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def has_model_host_call(self) -> bool:
        """Whether the model's TPUEstimatorSpec has a host call of its own.

        Without one TPUEstimator records `host_call` itself, a function defined
        in tpu_estimator.py that outfeeds the loss.
        """
        fn = self.host_calls.get("host_call")
        code = getattr(fn, "__code__", None)
        return fn is not None and (
            code is None or os.path.abspath(code.co_filename) != _TPU_ESTIMATOR_FILE
        )


@contextlib.contextmanager
def stop_at_device_boundary(*, stop_after_feed_hook_begin: bool = False) -> Iterator[Boundary]:
    """Stops any session against a remote (TPU) master and records feed hooks.

    Args:
      stop_after_feed_hook_begin: Stop earlier, right after the feed hook's
        `begin()` (raises the private `_StopAfterFeedHookBegin`; for
        `build_tpu_training_graph`, which catches it).

    Yields:
      A `Boundary` collecting the feed hooks TPUEstimator constructs.

    Raises (from the block):
      DeviceBoundaryReached: a session with a non-local target was being created.
    """
    boundary = Boundary()
    feed_hook_property = _tpu_context._InternalTPUContext.feed_hook
    session_init = _session_lib.BaseSession.__init__
    record_host_calls = _tpu_estimator._OutfeedHostCall.record
    recording_classes: dict = {}

    def feed_hook(ctx: Any) -> type:
        base = feed_hook_property.fget(ctx) or _tpu_estimator.TPUInfeedOutfeedSessionHook
        if base not in recording_classes:
            recording_classes[base] = _recording_hook_class(
                base, boundary.feed_hooks, stop_after_feed_hook_begin
            )
        return recording_classes[base]

    def guarded_session_init(
        self: Any, target: Any = "", graph: Any = None, config: Any = None
    ) -> None:
        session_graph = tf.compat.v1.get_default_graph() if graph is None else graph
        if target or _has_tpu_ops(session_graph):
            where = (
                f"a session against {target!r}"
                if target
                else "a local session (master '') on a graph with TPU ops"
            )
            graph = session_graph
            logging.info("Dry run stopped at the TPU device boundary: %s.", where)
            # What BaseSession.__del__ reads of a session that never opened.
            self._session = None
            raise DeviceBoundaryReached(where, graph, boundary)
        session_init(self, target, graph, config)

    def record(self: Any, host_calls: Mapping[str, Any]) -> Any:
        boundary.host_calls.update((name, call[0]) for name, call in host_calls.items())
        return record_host_calls(self, host_calls)

    _tpu_context._InternalTPUContext.feed_hook = property(feed_hook)
    _session_lib.BaseSession.__init__ = guarded_session_init
    _tpu_estimator._OutfeedHostCall.record = record
    try:
        yield boundary
    finally:
        _tpu_estimator._OutfeedHostCall.record = record_host_calls
        _session_lib.BaseSession.__init__ = session_init
        _tpu_context._InternalTPUContext.feed_hook = feed_hook_property
