"""Shared pieces of the host-call tests.

A fake TPUContext, host calls and their replicated inputs, a session that runs
a host function (at chosen global steps), the cached slices of caching mode,
the global-step read found from the outfed tensors, and the event files.
"""

from __future__ import annotations

import collections
import glob
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorflow.python.ops import summary_ops_v2

from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall

# Lets the slices placed on /device:TPU:d run on the CPU.
SOFT_PLACEMENT = tf.compat.v1.ConfigProto(allow_soft_placement=True)
# For sessions that run a host function a few times: Grappler's graph rewrites
# cost more than they save there, and change no result.
FAST_SESSION = tf.compat.v1.ConfigProto(
    allow_soft_placement=True,
    graph_options=tf.compat.v1.GraphOptions(
        rewrite_options=rewriter_config_pb2.RewriterConfig(disable_meta_optimizer=True)
    ),
)


class FakeUserContext:
    """Stands in for TPUEstimator's user-facing `TPUContext` (`params["context"]`).

    Only what `BaseEmbeddingHostCall` reads: `num_hosts`,
    `num_of_replicas_per_host`, `num_replicas`, `tpu_host_placement_function`
    and `_internal_ctx.master_job`.
    """

    class _Internal:
        def __init__(self, master_job):
            self.master_job = master_job

    def __init__(self, num_hosts: int = 1, replicas_per_host: int = 2, master_job=None):
        self.num_hosts = num_hosts
        self.num_of_replicas_per_host = replicas_per_host
        self.num_replicas = num_hosts * replicas_per_host
        self._internal_ctx = self._Internal(master_job)
        self._job = "" if master_job is None else f"/job:{master_job}"

    @property
    def tpu_host_placement_function(self) -> Callable[[int], str]:
        return lambda host_id: f"{self._job}/task:{host_id}/device:CPU:0"


class RecordingSession:
    """Stands in for the session a hook's `after_create_session` gets: records what it runs."""

    def __init__(self):
        self.fetched: List = []

    def run(self, fetches, *args, **kwargs):
        self.fetched.append(fetches)


def params(cpu_test=True, every_n=1, enable=True, context=None, **extra) -> dict:
    result = {"enable_host_call": enable, "cpu_test": cpu_test, "host_call_every_n_steps": every_n}
    if not cpu_test:
        result["context"] = context
    result.update(extra)
    return result


def make_host_call(
    output_dir: str,
    *,
    top_k=4,
    deepinsight=True,
    scalar_metrics=True,
    caching=False,
    cls=BaseEmbeddingHostCall,
    **kwargs,
) -> BaseEmbeddingHostCall:
    """An enabled host call of class `cls`; `kwargs` go to `params()`."""
    return cls(
        output_dir,
        enable_host_call=True,
        enable_deepinsight=deepinsight,
        enable_host_call_scalar_metrics=scalar_metrics,
        enable_caching_with_tpu_var_mode=caching,
        top_k_sampling_num_per_core=top_k,
        params=params(**kwargs),
    )


def build_replicated_host_call(
    factory: Callable[[], BaseEmbeddingHostCall],
    record: Callable[[BaseEmbeddingHostCall, int], None],
    num_replicas: int,
) -> Tuple[BaseEmbeddingHostCall, tf.Operation]:
    """Builds the host function on what TPUEstimator would hand it for `num_replicas` cores.

    Each replica's tensors are recorded by its own host call (`record(host_call,
    replica)`); the host function of replica 0's host call then receives each
    packed tensor concatenated over replicas along axis 0, as on TPU.
    """
    hooks = []
    for replica in range(num_replicas):
        host_call = factory()
        record(host_call, replica)
        hooks.append((host_call, host_call.generate_host_call_hook()))
    (first, (host_fn, _)) = hooks[0]
    packed = [
        tf.concat([tensors[i] for _, (_, tensors) in hooks], axis=0)
        for i in range(len(hooks[0][1][1]))
    ]
    return first, host_fn(*packed)


def writer_init_ops() -> List[tf.Operation]:
    """Initializers of every summary writer of the default graph."""
    return list(summary_ops_v2.summary_writer_initializer_op())


def writer_flush_ops() -> List[tf.Operation]:
    """Flushes of every summary writer of the default graph (as TPUEstimator's hooks do)."""
    return [
        summary_ops_v2.legacy_raw_flush(writer=op.inputs[0])
        for op in summary_ops_v2.summary_writer_initializer_op()
    ]


def run_host_call(
    ops: Sequence[tf.Operation],
    feeds: Optional[Sequence[dict]] = None,
    *,
    global_steps: Optional[Sequence[int]] = None,
    hooks: Sequence[tf.compat.v1.train.SessionRunHook] = (),
) -> None:
    """Runs `ops` once per feed dict in a fresh session, with writers initialized and flushed.

    Args:
      ops: What to run, e.g. a host function's op.
      feeds: One feed dict per run (default: one run, or one per global step).
      global_steps: If given, the global step is set to `global_steps[i]`
        before run i (so the host call records it as that step's number).
      hooks: Their `after_create_session` runs once the variables are
        initialized (e.g. a host call's `tpu_var_restore_hooks`).
    """
    if feeds is None:
        feeds = [{}] * (1 if global_steps is None else len(global_steps))
    set_step = step = None
    if global_steps is not None:
        step = tf.compat.v1.placeholder(tf.int64, [])
        set_step = tf.compat.v1.assign(tf.compat.v1.train.get_global_step(), step)
    init = summary_ops_v2.summary_writer_initializer_op()
    flush = writer_flush_ops()
    with tf.compat.v1.Session(config=FAST_SESSION) as sess:
        sess.run(init)
        sess.run(tf.compat.v1.local_variables_initializer())
        sess.run(tf.compat.v1.global_variables_initializer())
        for hook in hooks:
            hook.after_create_session(sess, None)
        for i, feed in enumerate(feeds):
            if set_step is not None:
                sess.run(set_step, {step: global_steps[i]})
            sess.run(ops, feed)
        sess.run(flush)


def cached_slices(name: str) -> List[tf.Variable]:
    """The per-core slices of the cached window `name`, from the default graph's `TPU_VAR`.

    In (host, core) order: `slice_<name>_<host>_<core>`, as the original names
    them (under the name scope the host call was built in).
    """
    return [
        v
        for v in tf.compat.v1.get_collection("TPU_VAR")
        if v.op.name.rpartition("/")[2].startswith(f"slice_{name}_")
    ]


def global_step_read_op(host_call_tensors: Sequence[tf.Tensor]) -> tf.Operation:
    """The op reading the global step that the host call outfeeds, found from its tensors.

    The first packed tensor starts with the global step; the read is the one
    op among its inputs that reads a variable (a `ReadVariableOp`, or with a
    ref variable the `Identity` of the ref).
    """
    seen, stack, reads = set(), [host_call_tensors[0].op], []
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        if op.type == "ReadVariableOp" or (
            op.type == "Identity" and op.inputs[0].dtype.name.endswith("_ref")
        ):
            reads.append(op)
            continue
        stack.extend(t.op for t in op.inputs)
    if len(reads) != 1:
        raise AssertionError(f"expected one global-step read, found {reads}")
    return reads[0]


def read_events(logdir: str) -> Dict[str, List[Tuple[int, np.ndarray]]]:
    """tag -> [(step, value)] of the summaries in `logdir`'s event files, in write order."""
    found = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found[value.tag].append((event.step, tf.make_ndarray(value.tensor)))
    return dict(found)


def parse_payload(value: np.ndarray) -> np.ndarray:
    """The tensor a DeepInsight text summary carries (`tf.io.serialize_tensor` bytes)."""
    return tf.make_ndarray(tensor_pb2.TensorProto.FromString(value.item()))


def exact_auc(labels: Sequence[float], preds: Sequence[float]) -> float:
    """ROC AUC by pairwise comparison (ties count one half)."""
    labels = np.asarray(labels) > 0.5
    preds = np.asarray(preds, dtype=np.float64)
    pos, neg = preds[labels], preds[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
