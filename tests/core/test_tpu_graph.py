"""The full TPUEstimator(use_tpu=True) training graph, built on CPU for a simulated TPU.

A CTR model recording its metrics with `BaseEmbeddingHostCall` (the tests'
one, `_ctr_model`) and the end-of-stream feed hook are built by TPUEstimator
for 1 host x 8 cores and 2 hosts x 4 cores, with and without caching metrics
in TPU variables; the run stops right after the feed hook's `begin()`
(`simulated_tpu.build_tpu_training_graph`), so no session or TPU is needed.
The tests then read the graph: the hook TPUEstimator constructed, the stopping
signal's way from the TPU step through the outfeed to the hook, the per-core
slices of the cached variables and the replicated handles the step uses, and
the host call built on the host.

The TPU step lives in the graph's function library in TF2 behaviour (while_v2
bodies) and in the graph itself in v1 behaviour: the helpers search both.
"""

from __future__ import annotations

import collections

import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.python.framework import tensor_util
from tensorflow_estimator.python.estimator.tpu import (
    error_handling,
    tpu_context,
)

from monolith.core import simulated_tpu
from monolith.core.auto_checkpoint_feed_hook import (
    _USER_PROVIDED_SIGNAL_NAME,
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.stopping_signals import append_stopping_signals
from tests.core._ctr_model import make_model_fn
from tests.core._host_call_helpers import RecordingSession
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu, topology

pytestmark = pytest.mark.timeout(120)

VOCAB = 50
PER_REPLICA_BATCH = 4
TOP_K = 2  # top_k_sampling_num_per_core
EVERY_N = 2  # host_call_every_n_steps (caching needs > 1)
CACHED_VARIABLES = (
    "labels_tpu_variable",
    "preds_tpu_variable",
    "uid_buckets_tpu_variable",
    "req_times_tpu_variable",
    "sample_rates_tpu_variable",
    "tpu_variables_accumulated_times",
)
caching_modes = pytest.mark.parametrize("caching", [False, True], ids=["plain", "caching"])

# ---------------------------------------------------------------- the model


def _example(i):
    i32 = tf.cast(i, tf.int32)
    features = {
        "x": tf.cast(tf.stack([i32 % VOCAB, (i32 * 7) % VOCAB]), tf.float32) / VOCAB,
        "uid_bucket": i32 % 1000,
        "req_time": 1_700_000_000 + i,
        "sample_rate": tf.constant(0.5),
    }
    return features, tf.cast(i32 % 2, tf.float32)


def _input_fn(params):
    batch = params["batch_size"]
    dataset = tf.data.Dataset.range(batch * 3).map(_example).batch(batch, drop_remainder=True)
    return append_stopping_signals(dataset)


_Built = collections.namedtuple("_Built", "graph_build seen every_n model_dir")


@pytest.fixture(scope="module")
def build_graph(tmp_path_factory):
    """Returns build(num_hosts, cores_per_host, caching) -> _Built, each built once per module."""
    cache = {}

    def build(num_hosts, cores_per_host, caching):
        key = (num_hosts, cores_per_host, caching)
        if key not in cache:
            model_dir = str(tmp_path_factory.mktemp("tpu_graph"))
            every_n = EVERY_N if caching else 1
            seen = {}
            model_fn = make_model_fn(
                on_tpu=True, caching=caching, every_n=every_n, top_k=TOP_K, seen=seen
            )
            built = build_on_simulated_tpu(
                model_fn,
                _input_fn,
                num_hosts,
                cores_per_host,
                model_dir=model_dir,
                per_replica_batch=PER_REPLICA_BATCH,
                experimental_host_call_every_n_steps=every_n,
            )
            cache[key] = _Built(built, seen, every_n, model_dir)
        return cache[key]

    return build


# ------------------------------------------------------- graph inspection


def _all_node_defs(graph):
    """NodeDefs of the graph's ops and of every function in its library."""
    nodes = [op.node_def for op in graph.get_operations()]
    for function in graph.as_graph_def().library.function:
        nodes.extend(function.node_def)
    return nodes


_PASS_THROUGH = ("Identity", "Enter", "Switch", "Merge")
_FUNCTION_CALLS = {
    "While": (("body", "cond"), 0),
    "StatelessWhile": (("body", "cond"), 0),
    "If": (("then_branch", "else_branch"), 1),
    "StatelessIf": (("then_branch", "else_branch"), 1),
    "PartitionedCall": (("f",), 0),
    "StatefulPartitionedCall": (("f",), 0),
}


def _in_tpu_step(op):
    """Whether `op` belongs to the TPU computation (or captures into it)."""
    try:
        op.get_attr("_tpu_replicate")
        return True
    except ValueError:
        return op.type in _FUNCTION_CALLS


def _resource_ops(graph, tensor):
    """Types of the ops that use the resource `tensor`, followed into loop/cond/call functions."""
    functions = {f.signature.name: f for f in graph.as_graph_def().library.function}
    found = set()

    def visit_call(op_type, attrs, input_index):
        attr_names, first_arg = _FUNCTION_CALLS[op_type]
        if input_index < first_arg:
            return
        for attr in attr_names:
            function = functions[attrs[attr].func.name]
            visit_function(function, function.signature.input_arg[input_index - first_arg].name)

    def visit_function(function, name):
        for node in function.node_def:
            for index, ref in enumerate(node.input):
                if ref.split(":")[0] != name.split(":")[0] or ref.startswith("^"):
                    continue
                if node.op in _PASS_THROUGH:
                    visit_function(function, node.name)
                elif node.op in _FUNCTION_CALLS:
                    visit_call(node.op, node.attr, index)
                else:
                    found.add(node.op)

    def visit(t):
        for consumer in t.consumers():
            if consumer.type in _PASS_THROUGH:
                visit(consumer.outputs[0])
            elif consumer.type in _FUNCTION_CALLS:
                for index, inp in enumerate(consumer.inputs):
                    if inp is t:
                        visit_call(consumer.type, consumer.node_def.attr, index)
            else:
                found.add(consumer.type)

    visit(tensor)
    return found


def _summary_tags(graph):
    """Tags of the WriteSummary ops of the graph (host side) with their devices."""
    tags = {}
    for op in graph.get_operations():
        if op.type == "WriteSummary":
            tag = tensor_util.MakeNdarray(op.inputs[3].op.get_attr("value")).item().decode()
            tags[tag] = op.device
    return tags


def _grouped_ops(op):
    """The ops a `tf.group` op runs (through nested groups)."""
    if op.type != "NoOp":
        return [op]
    return [leaf for dep in op.control_inputs for leaf in _grouped_ops(dep)]


def _slice_handles(graph, variable):
    return {
        op.name: op
        for op in graph.get_operations()
        if op.type == "VarHandleOp" and op.name.startswith(f"slice_{variable}_")
    }


# What the original host calls write, besides the recorded `*_avg` scalars.
_METRIC_SUMMARIES = {
    "sampled_labels_variable_avg",
    "sampled_preds_variable_avg",
    "req_times_variable_avg",
    "sample_rates_variable_avg",
}
_DEEPINSIGHT_SUMMARIES = {"di_labels", "di_preds", "di_req_times", "di_example_sample_rates"}
_CACHING_SUMMARIES = {
    "uid_buckets_tpu_variable_avg",
    "accumulated_times_tpu_variable_avg",
    "used_slice_len_avg",
}


# ---------------------------------------------------------------- tests


@topology
@caching_modes
def test_tpuestimator_constructs_and_begins_our_feed_hook(
    build_graph, num_hosts, cores_per_host, caching
):
    built = build_graph(num_hosts, cores_per_host, caching)
    graph_build = built.graph_build

    num_replicas = num_hosts * cores_per_host
    assert isinstance(graph_build.feed_hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
    ctx = graph_build.ctx
    assert isinstance(ctx, tpu_context._InternalTPUContext)
    assert (ctx.num_hosts, ctx.num_replicas) == (num_hosts, num_replicas)
    # TPUEstimator's call: (ctx, enqueue_ops, dequeue_ops) and exactly these keywords.
    assert len(graph_build.hook_args) == 3
    kwargs = graph_build.hook_kwargs
    assert set(kwargs) == {
        "tpu_compile_op",
        "run_infeed_loop_on_coordinator",
        "rendezvous",
        "master",
        "session_config",
        "tpu_init_ops",
        "outfeed_every_n_steps",
    }
    assert isinstance(kwargs["rendezvous"], error_handling.ErrorRendezvous)
    assert kwargs["master"] == simulated_tpu.SIMULATED_MASTER
    assert kwargs["outfeed_every_n_steps"] == built.every_n
    # begin() ran: it created TPUEstimator's iterations_per_loop variable and,
    # since this TPU is initialized at session creation, the op shutting it down.
    loop_vars = graph_build.graph.get_collection("tpu_estimator_iterations_per_loop")
    assert len(loop_vars) == 1
    shutdowns = [
        op for op in graph_build.graph.get_operations() if op.type == "ShutdownDistributedTPU"
    ]
    assert len(shutdowns) == 1
    # One replicated step over every core; no session ever ran.
    metadata_ops = [
        op for op in graph_build.graph.get_operations() if op.type == "TPUReplicateMetadata"
    ]
    assert [op.get_attr("num_replicas") for op in metadata_ops] == [num_replicas]
    assert tf.train.latest_checkpoint(built.model_dir) is None


@topology
@caching_modes
def test_tpu_step_sums_the_stop_signal_over_replicas_and_outfeeds_it(
    build_graph, num_hosts, cores_per_host, caching
):
    graph_build = build_graph(num_hosts, cores_per_host, caching).graph_build
    nodes = _all_node_defs(graph_build.graph)

    # The signal is the only int32 cross-replica sum (gradients are float).
    signal_sums = [
        n for n in nodes if n.op == "CrossReplicaSum" and n.attr["T"].type == types_pb2.DT_INT32
    ]
    assert len(signal_sums) == 1
    enqueues = [n for n in nodes if n.op == "OutfeedEnqueueTuple"]
    assert len(enqueues) == 1
    assert types_pb2.DT_BOOL in enqueues[0].attr["dtypes"].list.type


@topology
@caching_modes
def test_host_dequeues_the_stop_signal_from_every_core_into_the_hooks_dequeue_ops(
    build_graph, num_hosts, cores_per_host, caching
):
    graph_build = build_graph(num_hosts, cores_per_host, caching).graph_build
    num_replicas = num_hosts * cores_per_host

    stopping = graph_build.dequeue_ops[_USER_PROVIDED_SIGNAL_NAME]["stopping"]
    assert stopping.dtype == tf.bool
    assert stopping.shape.as_list() == [num_replicas * PER_REPLICA_BATCH]
    assert stopping.op.type == "ConcatV2"
    sources = [t.op for t in stopping.op.inputs[:-1]]  # last input: the axis
    assert [op.type for op in sources] == ["OutfeedDequeueTuple"] * num_replicas
    assert [op.device for op in sources] == [
        f"/job:worker/task:{r // cores_per_host}/device:CPU:0" for r in range(num_replicas)
    ]
    assert [op.get_attr("device_ordinal") for op in sources] == [
        r % cores_per_host for r in range(num_replicas)
    ]
    # One outfeed dequeue per core, each on its host: the stop signal shares it with the
    # host call's tensors.
    dequeues = [op for op in graph_build.graph.get_operations() if op.type == "OutfeedDequeueTuple"]
    assert sorted(op.name for op in dequeues) == sorted(op.name for op in sources)


@topology
def test_every_cached_variable_has_a_resource_slice_on_every_core_outside_the_step(
    build_graph, num_hosts, cores_per_host
):
    graph = build_graph(num_hosts, cores_per_host, True).graph_build.graph

    for variable in CACHED_VARIABLES:
        handles = _slice_handles(graph, variable)
        assert {name: op.device for name, op in handles.items()} == {
            f"slice_{variable}_{h}_{d}": f"/job:worker/task:{h}/device:TPU:{d}"
            for h in range(num_hosts)
            for d in range(cores_per_host)
        }, variable
        # Created in the outer graph (lifted out of the TPU step), not in a function.
        assert not any(_in_tpu_step(op) for op in handles.values()), variable
    library_nodes = {n.name for f in graph.as_graph_def().library.function for n in f.node_def}
    assert not any(name.startswith("slice_") for name in library_nodes)
    # Resource variables in both behaviours (VarHandleOp above), never ref variables.
    assert not [
        op
        for op in graph.get_operations()
        if op.name.startswith("slice_") and op.type == "VariableV2"
    ]


@topology
def test_step_reads_and_writes_cached_variables_through_replicated_handles(
    build_graph, num_hosts, cores_per_host
):
    built = build_graph(num_hosts, cores_per_host, True)
    graph = built.graph_build.graph
    ctx = built.graph_build.ctx

    for variable in CACHED_VARIABLES:
        handles = _slice_handles(graph, variable)
        replicated = {
            consumer
            for op in handles.values()
            for consumer in op.outputs[0].consumers()
            if consumer.type == "TPUReplicatedInput"
        }
        assert len(replicated) == 1, variable
        (replicated_input,) = replicated
        # One input per replica, replica r's slice on replica r's core.
        assert [t.op.device for t in replicated_input.inputs] == [
            ctx.tpu_device_placement_function(r) for r in range(ctx.num_replicas)
        ], variable
        assert {"ReadVariableOp", "AssignVariableOp"} <= _resource_ops(
            graph, replicated_input.outputs[0]
        ), variable
        # No replica's own variable is used inside the step.
        for op in handles.values():
            inside = [c.name for c in op.outputs[0].consumers() if _in_tpu_step(c)]
            assert not inside, (variable, inside)


@topology
def test_caching_restore_hooks_zero_every_slice_of_every_cached_variable(
    build_graph, num_hosts, cores_per_host
):
    built = build_graph(num_hosts, cores_per_host, True)
    graph = built.graph_build.graph

    hooks = built.seen["host_call"].tpu_var_restore_hooks
    assert len(hooks) == len(CACHED_VARIABLES)
    assert all(isinstance(h, tf.compat.v1.train.SessionRunHook) for h in hooks)
    assigned = set()
    for hook in hooks:
        session = RecordingSession()
        hook.after_create_session(session, None)
        (fetched,) = session.fetched
        assigns = _grouped_ops(fetched)
        assert {op.type for op in assigns} == {"AssignVariableOp"}
        assert not any(_in_tpu_step(op) for op in assigns)  # run by the hook, not the step
        assigned |= {op.inputs[0].op.name for op in assigns}
    assert assigned == {
        name for variable in CACHED_VARIABLES for name in _slice_handles(graph, variable)
    }


@topology
@caching_modes
def test_host_call_writes_its_summaries_on_the_first_host(
    build_graph, num_hosts, cores_per_host, caching
):
    built = build_graph(num_hosts, cores_per_host, caching)
    graph = built.graph_build.graph

    tags = _summary_tags(graph)
    expected = {"loss_avg", "auc", *_METRIC_SUMMARIES, *_DEEPINSIGHT_SUMMARIES}
    if caching:
        expected |= _CACHING_SUMMARIES
    assert set(tags) == expected
    assert set(tags.values()) == {"/job:worker/task:0/device:CPU:0"}
    writers = [op for op in graph.get_operations() if op.type == "CreateSummaryFileWriter"]
    logdirs = {tensor_util.MakeNdarray(w.inputs[1].op.get_attr("value")).item() for w in writers}
    assert logdirs == {(built.model_dir + "/host_call").encode()}
    library = {n.op for f in graph.as_graph_def().library.function for n in f.node_def}
    assert "WriteSummary" not in library  # built on the host, not in the TPU step


@topology
@caching_modes
def test_host_call_receives_each_compressed_tensor_concatenated_over_replicas(
    build_graph, num_hosts, cores_per_host, caching
):
    """[num_replicas, N] per dtype, N the summed lengths of what was recorded with that dtype."""
    graph = build_graph(num_hosts, cores_per_host, caching).graph_build.graph
    num_replicas = num_hosts * cores_per_host
    if caching:  # per-step metrics replaced by the cached windows (and their counter)
        widths = {
            tf.float32: 1 + 2 * TOP_K * EVERY_N + EVERY_N,  # loss_avg, labels, preds, rates
            tf.int32: TOP_K * EVERY_N + 1,  # uid buckets, counter
            tf.int64: 1 + EVERY_N,  # global_step, req_times
        }
    else:
        widths = {
            tf.float32: 2 * TOP_K + 1 + 1,  # labels, preds, sample_rate, loss_avg
            tf.int32: TOP_K,  # uid_bucket
            tf.int64: 1 + 1,  # global_step, req_time
        }

    host_inputs = {}
    for op in graph.get_operations():
        from_outfeed = all(t.op.type == "OutfeedDequeueTuple" for t in op.inputs[:-1])
        if op.type == "ConcatV2" and from_outfeed and op.outputs[0].dtype != tf.bool:
            host_inputs[op.outputs[0].dtype] = op.outputs[0].shape.as_list()
    assert host_inputs == {dtype: [num_replicas, width] for dtype, width in widths.items()}
