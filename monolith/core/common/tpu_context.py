"""Finding the TPU replicate context a graph is being built in.

Shared by the feed hook (cross-replica stop signal) and `ReplicatedVariable`
(replicated handles), so both agree on what "inside a TPU computation" means.
"""

from __future__ import annotations

from typing import Any, Optional

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


def enclosing_tpu_context() -> Optional[Any]:
    """The TPU replicate context the default graph is built in, or None.

    Only a `TPUReplicateContext` can hand out replicated variable handles;
    inside other XLA contexts (e.g. TPU inference rewrites) the search goes on
    outwards.

    TPUEstimator builds the train step inside while-loop and function bodies,
    which are separate FuncGraphs in TF2 behaviour, so the control-flow
    contexts of every enclosing graph are searched, not only the current one.
    """
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        context = graph._get_control_flow_context()  # pylint: disable=protected-access
        while context is not None:
            if isinstance(context, _REPLICATE_CONTEXT_CLASSES):
                return context
            context = context.outer_context
        graph = getattr(graph, "outer_graph", None)
    return None


def sum_over_replicas(tensor: tf.Tensor, name: Optional[str] = None) -> tf.Tensor:
    """`tensor` summed over the replicas of the enclosing TPU computation.

    The stop rule (a step is padding when any replica's batch is) must be
    decided identically on every replica, so the feed hook's outfed signal and
    `skip_padding_steps` both sum the local flag here. Outside a TPU
    replicate context (CPU, the emulator: one replica) the sum is the tensor.
    """
    if enclosing_tpu_context() is None:
        return tensor
    return tf.compat.v1.tpu.cross_replica_sum(tensor, name=name)
