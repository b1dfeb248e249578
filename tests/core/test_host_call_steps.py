"""Each step's host-call summaries are logged once, under that step's number.

The host call's global-step read is ordered before the optimizer's increment,
so the number is the global step when the step started (0, 1, ..., N-1 for N
steps from scratch). Unordered, the read raced the increment and some steps
were logged under the next step's number (a duplicate and a gap).

The structural test fails deterministically on the racy version; the runs
check the event files of many steps in TPUEstimator(use_tpu=False) and the
emulated TPU loop, and the padding-step rules (a step whose global-step
update is skipped, as under `skip_padding_steps`).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core import testing
from monolith.core.stopping_signals import append_stopping_signals
from tests.core._ctr_model import make_model_fn
from tests.core._host_call_helpers import (
    global_step_read_op,
    make_host_call,
    read_events,
    run_host_call,
)
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu, topology

pytestmark = pytest.mark.timeout(120)

BATCH = 2
DIM = 4


def _dataset(num_batches):
    x = np.arange(num_batches * BATCH * DIM, dtype=np.float32).reshape([-1, DIM]) / 1000.0
    labels = (np.arange(num_batches * BATCH) % 2).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(({"x": x}, labels)).batch(BATCH, drop_remainder=True)


def _host_call(model_dir):
    return make_host_call(model_dir, top_k=BATCH, deepinsight=False)


def _make_model_fn(skip_padding=False, record_flag=False):
    """Records loss_avg; `skip_padding`: the global step advances on real steps only."""
    return make_model_fn(
        auc_inputs=False,
        deepinsight=False,
        skip_padding=skip_padding,
        record_padding_flag=record_flag,
    )


def _logged_steps(model_dir, tag="loss_avg"):
    return [step for step, _ in read_events(os.path.join(model_dir, "host_call"))[tag]]


def _describe(steps):
    counts = collections.Counter(steps)
    duplicates = sorted(s for s, c in counts.items() if c > 1)
    gaps = sorted(set(range(max(steps) + 1)) - set(steps))
    return f"duplicates {duplicates}, gaps {gaps}"


@pytest.mark.parametrize(
    "host_call_first", [True, False], ids=["host_call_first", "train_op_first"]
)
def test_the_global_step_read_runs_before_the_optimizer_increments_it(host_call_first):
    # README builds the train op first, then the host call: both orders work.
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        weights = tf.compat.v1.get_variable("w", [DIM], initializer=tf.zeros_initializer())
        loss = tf.reduce_sum(tf.square(weights - 1.0))
        if host_call_first:
            host_call = _host_call("/tmp/unused")
        tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss, global_step)
        if not host_call_first:
            host_call = _host_call("/tmp/unused")
        host_call.record_summary_tensor("loss_avg", loss)
        _, tensors = host_call.generate_host_call_hook()

        read_op = global_step_read_op(tensors)
        increments = [
            op
            for op in tf.compat.v1.get_default_graph().get_operations()
            if op.type in ("AssignAddVariableOp", "AssignAdd")
        ]
        assert increments
        for op in increments:
            assert read_op in op.control_inputs


STEPS = 300


def test_tpuestimator_logs_each_step_once_under_its_number(tmp_path):
    model_dir = str(tmp_path)
    estimator = tpu_estimator.TPUEstimator(
        model_fn=_make_model_fn(),
        config=tpu_config.RunConfig(
            model_dir=model_dir, tpu_config=tpu_config.TPUConfig(iterations_per_loop=50)
        ),
        use_tpu=False,
        train_batch_size=BATCH,
    )
    estimator.train(lambda params: _dataset(STEPS))

    steps = _logged_steps(model_dir)
    assert steps == list(range(STEPS)), _describe(steps)


def test_emulated_loop_logs_each_step_once_under_its_number(tmp_path):
    model_dir = str(tmp_path)
    result = testing.train(
        _make_model_fn(),
        lambda params: append_stopping_signals(_dataset(STEPS)),
        model_dir=model_dir,
        iterations_per_loop=50,
    )

    steps = _logged_steps(model_dir)
    # Padding steps (no flag recorded) advance the global step and log too.
    assert result.steps_run == STEPS + 50  # a whole loop of padding steps
    assert steps == list(range(result.steps_run)), _describe(steps)


REAL_STEPS = 40


@pytest.mark.parametrize("record_flag", [False, True], ids=["without-flag", "with-flag"])
def test_steps_that_do_not_advance_the_global_step_get_the_next_free_numbers(tmp_path, record_flag):
    model_dir = str(tmp_path)
    result = testing.train(
        _make_model_fn(skip_padding=True, record_flag=record_flag),
        lambda params: append_stopping_signals(_dataset(REAL_STEPS)),
        model_dir=model_dir,
        iterations_per_loop=6,
    )

    assert result.steps_run == REAL_STEPS + 2  # 2 padding steps
    assert result.global_step == REAL_STEPS
    # Both padding steps read the global step REAL_STEPS: they log under
    # REAL_STEPS and REAL_STEPS + 1, not twice under one number.
    steps = _logged_steps(model_dir)
    assert steps == list(range(REAL_STEPS + 2)), _describe(steps)


def _tpu_input_fn(params):
    batch = params["batch_size"]
    x = tf.reshape(tf.range(batch * 3 * DIM, dtype=tf.float32), [-1, DIM]) / 100.0
    labels = tf.cast(tf.range(batch * 3) % 2, tf.float32)
    dataset = tf.data.Dataset.from_tensor_slices(({"x": x}, labels))
    return append_stopping_signals(dataset.batch(batch, drop_remainder=True))


@topology
def test_in_the_tpu_step_the_read_runs_before_the_increment(tmp_path, num_hosts, cores_per_host):
    """On the simulated TPU system: the increment inside the TPU loop waits for the read."""
    seen = {}
    model_fn = make_model_fn(on_tpu=True, auc_inputs=False, deepinsight=False, seen=seen)

    model_dir = str(tmp_path)
    built = build_on_simulated_tpu(
        model_fn,
        _tpu_input_fn,
        num_hosts,
        cores_per_host,
        model_dir=model_dir,
        per_replica_batch=BATCH,
    )
    read = global_step_read_op(seen["host_call_tensors"]).name

    graph = built.graph
    nodes = [op.node_def for op in graph.get_operations()]
    for function in graph.as_graph_def().library.function:
        nodes.extend(function.node_def)
    increments = [n for n in nodes if n.op in ("AssignAddVariableOp", "AssignAdd")]
    assert increments
    assert all(f"^{read}" in list(n.input) for n in increments), [list(n.input) for n in increments]


def test_host_numbers_are_the_read_step_or_the_next_free_number(tmp_path):
    """Read steps 5, 5, 5, 9, 9, 12 are logged as 5, 6, 7, 9, 10, 12."""
    logdir = str(tmp_path)
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        host_call = _host_call(logdir)
        host_call.record_summary_tensor("loss_avg", tf.constant(1.0))
        host_fn, tensors = host_call.generate_host_call_hook()
        host_op = host_fn(*tensors)
        run_host_call([host_op], global_steps=[5, 5, 5, 9, 9, 12])

    assert _logged_steps(logdir) == [5, 6, 7, 9, 10, 12]
