"""Caching mode: per-step metrics accumulate in TPU variables over host-call windows.

Two replicas on CPU: a fake TPUContext places the slices on /device:TPU:d,
which soft placement maps to the CPU. Outside a TPU computation the cached
variable acts as replica 0's slice, so replica 1's stays untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tests.core._host_call_helpers import (
    FAST_SESSION,
    FakeUserContext,
    cached_slices,
    make_host_call,
    parse_payload,
    read_events,
    writer_flush_ops,
    writer_init_ops,
)

pytestmark = pytest.mark.timeout(60)

EVERY_N = 3
TOP_K = 2


def _step_data(step):
    """What replica 0 records at global step `step`."""
    return {
        "labels": [float(step), step + 0.5],
        "preds": [step / 10, step / 10 + 0.05],
        "uid_buckets": [step, 10 + step],
        "req_times": [1000 + step],
        "sample_rates": [step / 100],
    }


# Replica 0's cached window after each global step: clear at step % 3 == 1.
EXPECTED_WINDOWS = {
    1: ([1, 1.5, 0, 0, 0, 0], [1001, 0, 0], 1),
    2: ([1, 1.5, 2, 2.5, 0, 0], [1001, 1002, 0], 2),
    3: ([1, 1.5, 2, 2.5, 3, 3.5], [1001, 1002, 1003], 3),
    4: ([4, 4.5, 0, 0, 0, 0], [1004, 0, 0], 1),
    5: ([4, 4.5, 5, 5.5, 0, 0], [1004, 1005, 0], 2),
    6: ([4, 4.5, 5, 5.5, 6, 6.5], [1004, 1005, 1006], 3),
    7: ([7, 7.5, 0, 0, 0, 0], [1007, 0, 0], 1),
}


WINDOW_VARIABLES = (
    "labels_tpu_variable",
    "preds_tpu_variable",
    "uid_buckets_tpu_variable",
    "req_times_tpu_variable",
    "sample_rates_tpu_variable",
)


def _ancestors(op):
    """Every op `op` waits for, through data and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _placeholders():
    return {
        "labels": tf.compat.v1.placeholder(tf.float32, [TOP_K]),
        "preds": tf.compat.v1.placeholder(tf.float32, [TOP_K]),
        "uid_buckets": tf.compat.v1.placeholder(tf.int32, [TOP_K]),
        "req_times": tf.compat.v1.placeholder(tf.int64, [1]),
        "sample_rates": tf.compat.v1.placeholder(tf.float32, [1]),
    }


def test_windows_accumulate_then_restart_at_index_1_with_two_replicas():
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        host_call = make_host_call(
            "/tmp/unused",
            caching=True,
            every_n=EVERY_N,
            top_k=TOP_K,
            cpu_test=False,
            context=FakeUserContext(num_hosts=1, replicas_per_host=2),
        )
        step = tf.compat.v1.placeholder(tf.int64, [])
        inputs = _placeholders()
        (counter_update,) = host_call.update_tpu_variables_ops(step, **inputs)
        cached = {
            role: cached_slices(name)
            for role, name in zip(
                ["labels", "preds", "uid_buckets", "req_times", "sample_rates", "counter"],
                [*WINDOW_VARIABLES, "tpu_variables_accumulated_times"],
            )
        }
        reads = {role: replica_0 for role, (replica_0, _) in cached.items()}
        replica_1 = [replica_1 for _, replica_1 in cached.values()]
        creator = tf.compat.v1.train.ChiefSessionCreator(config=FAST_SESSION)

        # The counter moves only after the five window writes.
        writes = {
            op
            for op in _ancestors(counter_update)
            if op.type == "AssignVariableOp" and op.inputs[0].op.name.startswith("slice_")
        }
        assert sorted(op.inputs[0].op.name for op in writes) == sorted(
            f"slice_{name}_0_0" for name in WINDOW_VARIABLES
        )

        with tf.compat.v1.train.MonitoredSession(
            creator, hooks=host_call.tpu_var_restore_hooks
        ) as sess:
            for global_step, (labels, req_times, counter) in EXPECTED_WINDOWS.items():
                data = _step_data(global_step)
                sess.run(
                    counter_update, {step: global_step, **{inputs[k]: v for k, v in data.items()}}
                )
                state = sess.run(reads)

                np.testing.assert_allclose(state["labels"], labels)
                np.testing.assert_allclose(state["preds"][: 2 * counter][-2:], data["preds"])
                np.testing.assert_array_equal(
                    state["uid_buckets"][: 2 * counter][-2:], data["uid_buckets"]
                )
                np.testing.assert_array_equal(state["req_times"], req_times)
                np.testing.assert_allclose(
                    state["sample_rates"][counter - 1], data["sample_rates"][0]
                )
                assert state["counter"] == counter, global_step
                assert not any(np.any(v) for v in sess.run(replica_1))


def test_host_call_reports_each_completed_window_on_one_replica(tmp_path):
    """cpu_test (TPUEstimator use_tpu=False): one slice, [1, N] host-call inputs."""
    every_n = 2
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        host_call = make_host_call(str(tmp_path), caching=True, every_n=every_n, top_k=TOP_K)
        step = tf.compat.v1.placeholder(tf.int64, [])
        inputs = _placeholders()
        update_ops = host_call.update_tpu_variables_ops(step, **inputs)
        set_global_step = global_step.assign(step)
        with tf.control_dependencies(update_ops):
            # As with TPUEstimator(use_tpu=False) the host call runs with the train op:
            # read the windows after this step's update.
            train_op = tf.no_op()
            host_call.record_summary_tpu_variables()
        host_fn, tensors = host_call.generate_host_call_hook()
        assert [t.shape[0] for t in tensors] == [1, 1, 1]
        host_op = host_fn(*tensors)
        init, flush = writer_init_ops(), writer_flush_ops()
        creator = tf.compat.v1.train.ChiefSessionCreator(config=FAST_SESSION)

        with tf.compat.v1.train.MonitoredSession(
            creator, hooks=host_call.tpu_var_restore_hooks
        ) as sess:
            sess.run(init)
            for s in range(1, 5):
                data = _step_data(s)
                data["labels"] = [float(s % 2), float(1 - s % 2)]
                feed = {step: s, **{inputs[k]: v for k, v in data.items()}}
                sess.run(set_global_step, {step: s})
                if s % every_n == 0:  # the host call reports after a window's last step
                    sess.run([train_op, host_op], feed)
                else:
                    sess.run(train_op, feed)
            sess.run(flush)

    events = read_events(str(tmp_path / "host_call"))
    payloads = {step: parse_payload(v).tolist() for step, v in events["di_labels"]}
    # Steps 1-2 and 3-4; only the first example of each step has a uid bucket < 10.
    assert payloads == {2: [1.0, 0.0], 4: [1.0, 0.0]}
    req_times = {step: parse_payload(v).tolist() for step, v in events["di_req_times"]}
    assert req_times == {2: [1001, 1002], 4: [1003, 1004]}
    assert [(s, float(v)) for s, v in events["used_slice_len_avg"]] == [(2, 4.0), (4, 4.0)]
    assert [(s, float(v)) for s, v in events["accumulated_times_tpu_variable_avg"]] == [
        (2, 2.0),
        (4, 2.0),
    ]
    rates = {step: parse_payload(v).tolist() for step, v in events["di_example_sample_rates"]}
    assert rates == {2: [pytest.approx(0.01)], 4: [pytest.approx(0.03)]}
