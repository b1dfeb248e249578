"""Finding the TPU replicate context a graph is being built in.

Shared by the feed hook (cross-replica stop signal) and `ReplicatedVariable`
(replicated handles), so both agree on what "inside a TPU computation" means.

The CPU emulator (`monolith.core.testing`) builds each replica of its
emulated pod inside `emulated_replica(context)`, a thread-local marker: there,
`enclosing_tpu_context()` returns the emulator's replica context wherever a
TPU replicate context would be found (inside the emulated step, not under
`tf.init_scope()`), so the checks below behave in an emulated replica as they
do on a TPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import tensorflow as tf


def _replicate_context_classes() -> tuple[type, ...]:
    """Every TPUReplicateContext class this TensorFlow has.

    TF 2.12 ships `tpu_replication.TPUReplicateContext` but `tpu.replicate`
    still builds `tpu.TPUReplicateContext`; from 2.13 on only the former
    exists. Matching either keeps the check right on every supported version.
    """
    from tensorflow.python.tpu import tpu

    classes = [tpu.TPUReplicateContext] if hasattr(tpu, "TPUReplicateContext") else []
    try:
        from tensorflow.python.tpu import tpu_replication

        classes.append(tpu_replication.TPUReplicateContext)
    except ImportError:  # TF 2.12 may lack it; tpu.py's class covers that case.
        pass
    return tuple(dict.fromkeys(classes))


_REPLICATE_CONTEXT_CLASSES = _replicate_context_classes()


# The emulated replica this thread is building, if any (see `emulated_replica`).
_EMULATED = threading.local()


@contextlib.contextmanager
def emulated_replica(context: Any) -> Iterator[Any]:
    """Marks this thread as building one replica of `monolith.core.testing`'s emulated pod.

    For the emulator only. While the block runs, `enclosing_tpu_context()`
    returns `context` in every graph or control-flow context enclosed by
    `context.anchor` (the emulated step's while_v2 body FuncGraph in TF2
    behaviour, its v1 `WhileContext` otherwise), as it would return the
    `TPUReplicateContext` on a TPU. `context` must also answer
    `get_replicated_var_handle` as a `TPUReplicateContext` does. Thread-local:
    other threads, and code outside the anchor (e.g. under `tf.init_scope()`),
    are not affected.
    """
    previous = getattr(_EMULATED, "context", None)
    _EMULATED.context = context
    try:
        yield context
    finally:
        _EMULATED.context = previous


def outermost_graph(graph: Optional[tf.Graph] = None) -> tf.Graph:
    """`graph` (default: the default graph) or, inside function bodies, the graph holding them.

    TPUEstimator calls input_fn in the outer graph and builds the train step in
    while-loop and function bodies (FuncGraphs in TF2 behaviour): what the input
    side records for the step (the stop rule, the resume records) is kept in
    the outermost graph, where both sides find it.
    """
    graph = graph if graph is not None else tf.compat.v1.get_default_graph()
    while getattr(graph, "outer_graph", None) is not None:
        graph = graph.outer_graph
    return graph


def enclosing_tpu_context() -> Optional[Any]:
    """The TPU replicate context the default graph is built in, or None.

    Only a `TPUReplicateContext` can hand out replicated variable handles;
    inside other XLA contexts (e.g. TPU inference rewrites) the search goes on
    outwards. Inside an emulated replica (`emulated_replica`), the emulator's
    replica context stands for it.

    TPUEstimator builds the train step inside while-loop and function bodies,
    which are separate FuncGraphs in TF2 behaviour, so the control-flow
    contexts of every enclosing graph are searched, not only the current one.
    """
    emulated = getattr(_EMULATED, "context", None)
    anchor = getattr(emulated, "anchor", None)
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        if anchor is not None and graph is anchor:
            return emulated
        context = graph._get_control_flow_context()  # pylint: disable=protected-access
        while context is not None:
            if isinstance(context, _REPLICATE_CONTEXT_CLASSES):
                return context
            if anchor is not None and context is anchor:
                return emulated
            context = context.outer_context
        graph = getattr(graph, "outer_graph", None)
    return None


def sum_over_replicas(tensor: tf.Tensor, name: Optional[str] = None) -> tf.Tensor:
    """`tensor` summed over the replicas of the enclosing TPU computation.

    The stop rule (a step is padding when any replica's batch is) must be
    decided identically on every replica, so the feed hook's outfed signal and
    `skip_padding_steps` both sum the local flag here. Outside a TPU
    replicate context (CPU, `TPUEstimator(use_tpu=False)`: one replica) the
    sum is the tensor. In an emulated replica (`emulated_replica`) it is the
    emulator's cross-replica sum, over every replica of the emulated pod.
    """
    if enclosing_tpu_context() is None:
        return tensor
    return tf.compat.v1.tpu.cross_replica_sum(tensor, name=name)
