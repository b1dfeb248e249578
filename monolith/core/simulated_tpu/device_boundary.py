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
`run_until_feed_hook_begins` stops earlier, right after the feed hook's
`begin()`, and returns what it recorded (`build_tpu_training_graph`).

`DeviceBoundaryReached` derives from `BaseException`, like `SystemExit`, so a
program's `except Exception:` does not swallow it.

TensorFlow has no hook for any of this, so three of its attributes are
replaced: `BaseSession.__init__`, the `_InternalTPUContext.feed_hook` property
and `_OutfeedHostCall.record`. Each is a `common.scoped_patch.ScopedPatch`:
the replacement acts only for the thread that entered the boundary (or, with
`all_threads=True`, for every thread: the dry run, which owns its process);
other threads create sessions and build graphs as usual. Concurrent and nested
boundaries each record their own feed hooks (the innermost one of a thread
acts), and the originals are back once the last boundary exits, on any path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import tensorflow as tf
from absl import logging
from tensorflow.python.client import session as _session_lib
from tensorflow_estimator.python.estimator.tpu import tpu_context as _tpu_context
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.common.scoped_patch import ScopedPatch

__all__ = [
    "Boundary",
    "DeviceBoundaryReached",
    "FeedHookRecord",
    "run_until_feed_hook_begins",
    "stop_at_device_boundary",
]


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
    """Raised after the feed hook's `begin()`; `run_until_feed_hook_begins` catches it."""

    def __init__(self, boundary: Boundary):
        super().__init__("stopped after the feed hook's begin()")
        self.boundary = boundary


def _recording_hook_class(base: type, boundary: Boundary, stop_after_begin: bool) -> type:
    """A subclass of `base` that records its construction (and `begin()`) in `boundary`."""

    class _RecordingHook(base):
        def __init__(self, *args: Any, **kwargs: Any):
            self._dry_run_record = FeedHookRecord(self, base, args, dict(kwargs))
            boundary.feed_hooks.append(self._dry_run_record)
            super().__init__(*args, **kwargs)

        def begin(self) -> None:
            super().begin()
            self._dry_run_record.graph = tf.compat.v1.get_default_graph()
            if stop_after_begin:
                # No end() follows: give up the model_dir lock begin() took (our hook's).
                release = getattr(self, "_release_model_dir", None)
                if release is not None:
                    release()
                raise _StopAfterFeedHookBegin(boundary)

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


# The three TensorFlow attributes a boundary replaces (see the module docstring).
_SESSION_INIT = ScopedPatch(_session_lib.BaseSession, "__init__")
_FEED_HOOK = ScopedPatch(_tpu_context._InternalTPUContext, "feed_hook")
_RECORD_HOST_CALLS = ScopedPatch(_tpu_estimator._OutfeedHostCall, "record")


@contextlib.contextmanager
def _active_boundary(
    boundary: Boundary, *, stop_after_feed_hook_begin: bool, all_threads: bool
) -> Iterator[Boundary]:
    """Makes `boundary` the device boundary of this thread (or of all threads) in the block."""
    recording_classes: Dict[type, type] = {}

    def feed_hook(ctx: Any) -> type:
        # Runs on the thread that builds the graph (in TPUEstimator's model_fn wrapper).
        base = _FEED_HOOK.original().fget(ctx) or _tpu_estimator.TPUInfeedOutfeedSessionHook
        if base not in recording_classes:
            recording_classes[base] = _recording_hook_class(
                base, boundary, stop_after_feed_hook_begin
            )
        return recording_classes[base]

    def guarded_session_init(
        session: Any, target: Any = "", graph: Any = None, config: Any = None
    ) -> None:
        session_graph = tf.compat.v1.get_default_graph() if graph is None else graph
        if target or _has_tpu_ops(session_graph):
            where = (
                f"a session against {target!r}"
                if target
                else "a local session (master '') on a graph with TPU ops"
            )
            logging.info("Dry run stopped at the TPU device boundary: %s.", where)
            # What BaseSession.__del__ reads of a session that never opened.
            session._session = None
            raise DeviceBoundaryReached(where, session_graph, boundary)
        _SESSION_INIT.original()(session, target, graph, config)

    def record(outfeed_host_call: Any, host_calls: Mapping[str, Any]) -> Any:
        boundary.host_calls.update((name, call[0]) for name, call in host_calls.items())
        return _RECORD_HOST_CALLS.original()(outfeed_host_call, host_calls)

    with contextlib.ExitStack() as patches:
        patches.enter_context(_FEED_HOOK.scope(feed_hook, all_threads=all_threads))
        patches.enter_context(_SESSION_INIT.scope(guarded_session_init, all_threads=all_threads))
        patches.enter_context(_RECORD_HOST_CALLS.scope(record, all_threads=all_threads))
        yield boundary


@contextlib.contextmanager
def stop_at_device_boundary(*, all_threads: bool = False) -> Iterator[Boundary]:
    """Stops any session against a remote (TPU) master and records feed hooks.

    Acts for the calling thread only: sessions created and graphs built on other
    threads meanwhile are left alone. Nested boundaries of one thread: the
    innermost acts.

    Args:
      all_threads: Act for every thread of the process that has no boundary of
        its own (the dry run, which owns its process: a program may build and
        train on any of its threads).

    Yields:
      A `Boundary` collecting the feed hooks TPUEstimator constructs.

    Raises (from the block):
      DeviceBoundaryReached: a session with a non-local target, or a local one
        on a graph with TPU ops, was being created.
    """
    with _active_boundary(
        Boundary(), stop_after_feed_hook_begin=False, all_threads=all_threads
    ) as boundary:
        yield boundary


def run_until_feed_hook_begins(train: Callable[[], Any]) -> Optional[FeedHookRecord]:
    """Runs `train()` at the device boundary until the feed hook's `begin()` has returned.

    On the calling thread, as `stop_at_device_boundary`: TPUEstimator is handed
    a recording subclass of its feed hook class, and `train()` is stopped right
    after that hook's real `begin()`, before any session exists. The
    model_dir lock that `begin()` took is released then (no `end()` follows);
    its resume check has run (a mismatched restart raises).

    Args:
      train: Builds and runs the program (e.g. `lambda: estimator.train(...)`).

    Returns:
      The `FeedHookRecord` of the hook whose `begin()` ran (its `graph` is the
      complete training graph), or None if `train()` returned without beginning
      a feed hook (e.g. training was already done).

    Raises:
      DeviceBoundaryReached: `train()` created a session against a TPU master
        before any feed hook began.
      Whatever `train()` raises.
    """
    boundary = Boundary()
    with _active_boundary(boundary, stop_after_feed_hook_begin=True, all_threads=False):
        try:
            train()
        except _StopAfterFeedHookBegin as stop:
            if stop.boundary is not boundary:
                raise
            return boundary.feed_hooks[-1]
    return None
