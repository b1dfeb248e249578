"""The end-of-stream feed hook driven by hand, as TPUEstimator's own hook tests do.

Each test builds a real graph and session and calls begin / after_create_session /
before_run / end itself; TPU-only ops are replaced by CPU ops that record they ran.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
import queue
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf.tpu import compilation_result_pb2
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.tpu import session_support
from tensorflow_estimator.python.estimator.tpu import error_handling, tpu_estimator

from monolith.core import auto_checkpoint_feed_hook as feed_hook
from monolith.core.feed.signal import _stopping_value
from monolith.core.testing import FakeTPUContext
from tests._feed_threads import feed_threads, live_feed_threads
from tests.core._feed_hook_helpers import SIGNAL, ListController

Hook = feed_hook.TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook
IPL_NAME = "tpu_estimator/iterations_per_loop"


@pytest.fixture
def absl_info(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    return caplog


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("TPU_SPLIT_COMPILE_AND_EXECUTE", raising=False)
    monkeypatch.delenv("TF_TPU_WATCHDOG_TIMEOUT", raising=False)


class _Counter:
    """A resource-variable counter and the op that adds one to it."""

    def __init__(self, name):
        self.var = tf.compat.v1.get_variable(
            name,
            [],
            tf.int64,
            tf.compat.v1.zeros_initializer(),
            trainable=False,
            use_resource=True,
            collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
        )
        self.increment = self.var.assign_add(1)


def _recording_tpu_ops(monkeypatch, ran):
    """Replaces initialize_system/shutdown_system with CPU ops that record their runs."""

    def initialize_system(job=None, embedding_config=None):
        graph = tf.compat.v1.get_default_graph()
        return tf.compat.v1.py_func(
            lambda: ran.append(("init", job, graph)) or np.bytes_(b""), [], tf.string
        )

    def shutdown_system(job=None):
        return tf.compat.v1.py_func(lambda: ran.append(("shutdown", job)) or 0, [], tf.int64)

    monkeypatch.setattr(tf.compat.v1.tpu, "initialize_system", initialize_system)
    monkeypatch.setattr(tf.compat.v1.tpu, "shutdown_system", shutdown_system)


class _Driver:
    """Runs a hook's lifecycle by hand in a real session, as MonitoredSession would."""

    def __init__(self, hook, iterations_per_loop):
        self.hook = hook
        self.iterations_per_loop = iterations_per_loop
        self.coord = tf.train.Coordinator()

    def __enter__(self):
        tf.compat.v1.train.get_or_create_global_step()
        self.hook.begin()
        self.session = tf.compat.v1.Session()
        self.session.run(
            [
                tf.compat.v1.global_variables_initializer(),
                tf.compat.v1.local_variables_initializer(),
            ]
        )
        # TPUEstimator's loop-size variable (a subclass may use its own instead).
        for loop_size in tf.compat.v1.get_collection("tpu_estimator_iterations_per_loop"):
            loop_size.load(self.iterations_per_loop, self.session)
        self.hook.after_create_session(self.session, self.coord)
        return self

    def loop(self):
        self.hook.before_run(tf.compat.v1.train.SessionRunContext((), self.session))

    def __exit__(self, *exc):
        self.coord.request_stop()
        self.session.close()


def _hook(enqueue_ops=(), dequeue_ops=None, ctx=None, **kwargs):
    return Hook(
        ctx or FakeTPUContext(),
        list(enqueue_ops) or [tf.no_op()],
        dequeue_ops if dequeue_ops is not None else [tf.no_op()],
        tpu_compile_op=tf.no_op(),
        **kwargs,
    )


# -- construction ---------------------------------------------------------------


def test_hook_is_a_compat_v1_session_run_hook():
    assert issubclass(Hook, tf.compat.v1.train.SessionRunHook)


def test_constructor_signature_is_tpuestimator_stock_hooks_plus_keyword_only_extras():
    ours = inspect.signature(Hook.__init__).parameters
    stock = inspect.signature(tpu_estimator.TPUInfeedOutfeedSessionHook.__init__).parameters
    positional = [p for p in ours.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in stock.values()
    ]
    assert all(
        p.default is not inspect.Parameter.empty
        for p in ours.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    )


def test_hook_accepts_exactly_the_keyword_arguments_tpuestimator_passes():
    with tf.Graph().as_default():
        rendezvous = error_handling.ErrorRendezvous(num_sources=3)
        hook = Hook(
            FakeTPUContext(),
            [tf.no_op()],
            {"host_call": tf.no_op()},
            tpu_compile_op=tf.no_op(),
            run_infeed_loop_on_coordinator=False,
            rendezvous=rendezvous,
            master="",
            session_config=tf.compat.v1.ConfigProto(),
            tpu_init_ops=[],
            outfeed_every_n_steps=3,
        )
        assert hook.rendezvous is rendezvous
        assert hook.stopping_signal is False


def test_default_rendezvous_is_a_real_error_rendezvous_owned_by_the_hook():
    with tf.Graph().as_default():
        hook = _hook()
        assert isinstance(hook.rendezvous, error_handling.ErrorRendezvous)


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1, ValueError), (True, TypeError), ("2", TypeError)]
)
def test_outfeed_every_n_steps_must_be_positive(bad, error):
    with tf.Graph().as_default(), pytest.raises(error, match=rf"outfeed_every_n_steps={bad!r}"):
        _hook(outfeed_every_n_steps=bad)


@pytest.mark.parametrize("bad", [0, -1.5, float("inf"), float("nan")])
def test_join_timeout_must_be_a_finite_positive_number(bad):
    with tf.Graph().as_default(), pytest.raises(ValueError, match="join_timeout_secs"):
        _hook(join_timeout_secs=bad)


@pytest.mark.parametrize("bad", [True, False, "30", None])
def test_join_timeout_rejects_bools_strings_and_none_naming_the_type(bad):
    with tf.Graph().as_default(), pytest.raises(TypeError, match="join_timeout_secs=.*number"):
        _hook(join_timeout_secs=bad)


@pytest.mark.parametrize("good", [1, 0.25, np.float32(2.0)])
def test_join_timeout_accepts_ints_and_floats(good):
    # How end() uses the value: test_end_does_not_wait_forever_for_a_stuck_outfeed_thread.
    with tf.Graph().as_default():
        _hook(join_timeout_secs=good)


def test_stopping_signal_is_a_readable_and_settable_attribute():
    with tf.Graph().as_default():
        hook = _hook()
        hook.stopping_signal = True
        assert hook.stopping_signal is True
        hook.stopping_signal = False
        assert hook.stopping_signal is False


# -- iterations_per_loop variable ---------------------------------------------------


def test_iterations_per_loop_variable_matches_tpuestimator():
    with tf.Graph().as_default() as graph:
        tf.compat.v1.train.get_or_create_global_step()
        var = _hook()._create_or_get_iterations_per_loop()
        assert var.name == IPL_NAME + ":0"
        assert var.dtype.base_dtype == tf.int32
        assert var.shape.as_list() == []
        assert isinstance(var, resource_variable_ops.ResourceVariable)
        assert var in graph.get_collection(tf.compat.v1.GraphKeys.LOCAL_VARIABLES)
        assert var not in graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES)
        assert graph.get_collection("tpu_estimator_iterations_per_loop") == [var]


def test_iterations_per_loop_variable_is_created_without_a_global_step():
    with tf.Graph().as_default():
        assert _hook()._create_or_get_iterations_per_loop().name == IPL_NAME + ":0"


def test_iterations_per_loop_variable_is_shared_with_tpuestimator_either_way():
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        theirs = tpu_estimator._create_or_get_iterations_per_loop()
        assert _hook()._create_or_get_iterations_per_loop() is theirs
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        ours = _hook()._create_or_get_iterations_per_loop()
        assert tpu_estimator._create_or_get_iterations_per_loop() is ours


def test_several_iterations_per_loop_variables_raise_runtime_error():
    with tf.Graph().as_default() as graph:
        graph.add_to_collection("tpu_estimator_iterations_per_loop", tf.Variable(1))
        graph.add_to_collection("tpu_estimator_iterations_per_loop", tf.Variable(2))
        with pytest.raises(RuntimeError, match="Multiple iterations_per_loop_var"):
            _hook()._create_or_get_iterations_per_loop()


@pytest.mark.timeout(60)
def test_before_run_sends_the_loop_size_of_an_overridden_loop_variable(clean_env):
    class OwnLoopVariableHook(Hook):
        def _create_or_get_iterations_per_loop(self):
            return tf.compat.v1.get_variable("own_loop_size", initializer=3, trainable=False)

    with tf.Graph().as_default():
        enqueued = _Counter("enqueued")
        hook = OwnLoopVariableHook(
            FakeTPUContext(), [enqueued.increment], [tf.no_op()], tpu_compile_op=tf.no_op()
        )
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            hook.end(driver.session)
            assert driver.session.run(enqueued.var) == 3


# -- feed threads ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "on_coordinator, expected_enqueues", [(True, 2 * 3), (False, 2)], ids=["per_step", "per_loop"]
)
def test_infeed_runs_enqueue_ops_per_step_or_per_loop(clean_env, on_coordinator, expected_enqueues):
    with tf.Graph().as_default():
        enqueued = _Counter("enqueued")
        hook = _hook([enqueued.increment], run_infeed_loop_on_coordinator=on_coordinator)
        with _Driver(hook, iterations_per_loop=3) as driver:
            driver.loop()
            driver.loop()
            hook.end(driver.session)
            assert driver.session.run(enqueued.var) == expected_enqueues


@pytest.mark.timeout(60)
@pytest.mark.parametrize("every_n, per_loop", [(1, 5), (2, 3), (5, 1), (7, 1)])
def test_outfeed_runs_dequeue_ops_every_n_steps_of_each_loop(clean_env, every_n, per_loop):
    with tf.Graph().as_default():
        dequeued = _Counter("dequeued")
        hook = _hook(dequeue_ops=[dequeued.increment], outfeed_every_n_steps=every_n)
        with _Driver(hook, iterations_per_loop=5) as driver:
            driver.loop()
            driver.loop()
            hook.end(driver.session)
            assert driver.session.run(dequeued.var) == 2 * per_loop


@pytest.mark.parametrize("body", ["_run_infeed", "_run_outfeed"])
def test_a_thread_body_called_outside_a_feed_thread_raises_a_clear_error(body):
    with tf.Graph().as_default():
        hook = _hook()
        with pytest.raises(RuntimeError, match="No feed session on thread 'MainThread'"):
            getattr(hook, body)(None, None)


def _signal_dequeue_ops(stopping):
    return {
        SIGNAL: {"stopping": tf.constant(stopping)},
        "host_call": tf.constant([1.0]),
        "__force_dequeue": tf.no_op(),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stopping", [[True, True], [False, True]], ids=["all", "any"])
def test_outfeed_stopping_signal_makes_the_next_before_run_raise_out_of_range(clean_env, stopping):
    with tf.Graph().as_default():
        hook = _hook(dequeue_ops=_signal_dequeue_ops(stopping))
        with _Driver(hook, iterations_per_loop=2) as driver:
            driver.loop()
            with pytest.raises(tf.errors.OutOfRangeError):
                driver.loop()
            assert hook.stopping_signal is True
            hook.end(driver.session)


@pytest.mark.timeout(60)
def test_outfeed_without_stop_keeps_training(clean_env):
    with tf.Graph().as_default():
        hook = _hook(dequeue_ops=_signal_dequeue_ops([False, False]))
        with _Driver(hook, iterations_per_loop=2) as driver:
            for _ in range(3):
                driver.loop()
            assert hook.stopping_signal is False
            hook.end(driver.session)


class _SignalMapping(dict):
    """A Mapping that is not exactly a dict (takes the general path)."""


@pytest.mark.parametrize(
    "ret, expected",
    [
        ({SIGNAL: {"stopping": np.array([False, False])}}, False),
        ({SIGNAL: {"stopping": np.array([False, True])}}, True),
        ({SIGNAL: {"stopping": np.True_}}, True),
        ({SIGNAL: {"stopping": [False, True]}}, True),
        ({SIGNAL: {"stopping": [False]}}, False),
        (_SignalMapping({SIGNAL: _SignalMapping(stopping=np.array([True]))}), True),
        ({"host_call": np.zeros([1])}, None),
        ([np.zeros([1])], None),
        (None, None),
    ],
    ids=[
        "ndarray_false",
        "ndarray_any",
        "numpy_scalar",
        "list_any",
        "list_false",
        "mapping",
        "no_signal",
        "list_result",
        "none_result",
    ],
)
def test_stopping_value_reads_any_true_element_of_each_result_kind(ret, expected):
    assert _stopping_value(ret) is expected


@pytest.mark.parametrize(
    "signal", [{"stop": np.array([True])}, np.array([True]), None], ids=["dict", "array", "none"]
)
def test_stopping_value_rejects_a_signal_without_the_stopping_key(signal):
    with pytest.raises(RuntimeError, match=r"must contain key 'stopping'"):
        _stopping_value({SIGNAL: signal})


@pytest.mark.timeout(60)
def test_feed_threads_log_each_step_at_debug_verbosity(clean_env, caplog):
    caplog.set_level(logging.DEBUG, logger="absl")
    with tf.Graph().as_default():
        hook = _hook(dequeue_ops=_signal_dequeue_ops([False]))
        with _Driver(hook, iterations_per_loop=2) as driver:
            driver.loop()
            hook.end(driver.session)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    for feed in ("Infeed enqueue", "Outfeed dequeue"):
        assert [m for m in messages if m.startswith(feed)] == [
            f"{feed} for iteration (0, 0)",
            f"{feed} for iteration (0, 1)",
        ]


@pytest.mark.timeout(60)
def test_malformed_signal_dict_raises_runtime_error_naming_stopping(clean_env):
    with tf.Graph().as_default():
        hook = _hook(dequeue_ops={SIGNAL: {"stop": tf.constant([True])}})
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            with pytest.raises(RuntimeError, match="'stopping'"):
                driver.loop()
    assert live_feed_threads() == []


@pytest.mark.timeout(60)
def test_malformed_signal_error_is_recorded_in_a_given_rendezvous(clean_env):
    with tf.Graph().as_default():
        rendezvous = error_handling.ErrorRendezvous(num_sources=3)
        hook = _hook(dequeue_ops={SIGNAL: {"stop": tf.constant([True])}}, rendezvous=rendezvous)
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            with pytest.raises(RuntimeError):
                driver.loop()
        with pytest.raises(RuntimeError, match=r"_user_provided_signal_name.*'stopping'"):
            rendezvous.raise_errors()


@pytest.mark.timeout(60)
def test_end_joins_threads_and_records_them_done(clean_env):
    with tf.Graph().as_default():
        rendezvous = error_handling.ErrorRendezvous(num_sources=2)
        hook = _hook(rendezvous=rendezvous)
        with _Driver(hook, iterations_per_loop=2) as driver:
            driver.loop()
            hook.end(driver.session)
            assert live_feed_threads(wait_secs=0) == []
        rendezvous.raise_errors()  # both sources done, no error


@pytest.mark.timeout(60)
def test_end_does_not_wait_forever_for_a_stuck_outfeed_thread(clean_env, absl_info, monkeypatch):
    ran = []
    _recording_tpu_ops(monkeypatch, ran)
    with tf.Graph().as_default():
        never_filled = tf.queue.FIFOQueue(1, [tf.float32], shapes=[[]])
        hook = _hook(
            dequeue_ops=[never_filled.dequeue()],
            ctx=FakeTPUContext(initialize_tpu=True),
            join_timeout_secs=0.5,
        )
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            hook.end(driver.session)
            assert ran[-1] == ("shutdown", None)  # the rest of end() still ran
    errors = [r.getMessage() for r in absl_info.records if r.levelno >= logging.ERROR]
    stuck = [m for m in errors if "OutfeedController" in m]
    assert stuck and "within 0.5 s" in stuck[0] and "_run_outfeed" in stuck[0]
    assert live_feed_threads() == []


# -- session setup: TPU system, init ops, compile, watchdog ---------------------------------


@pytest.mark.timeout(60)
def test_tpu_is_initialised_in_a_fresh_graph_and_shut_down_at_end(clean_env, monkeypatch):
    ran = []
    _recording_tpu_ops(monkeypatch, ran)
    with tf.Graph().as_default() as graph:
        hook = _hook(ctx=FakeTPUContext(initialize_tpu=True, master_job="worker"))
        with _Driver(hook, iterations_per_loop=1) as driver:
            assert [r[:2] for r in ran] == [("init", "worker")]
            assert ran[0][2] is not graph
            driver.loop()
            hook.end(driver.session)
    assert [r[:2] for r in ran] == [("init", "worker"), ("shutdown", "worker")]


@pytest.mark.timeout(60)
def test_tpu_init_is_skipped_for_model_parallelism_with_broadcast_input(clean_env, monkeypatch):
    ran = []
    _recording_tpu_ops(monkeypatch, ran)
    with tf.Graph().as_default():
        hook = _hook(ctx=FakeTPUContext(initialize_tpu=False))
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            hook.end(driver.session)
    assert ran == []


@pytest.mark.timeout(60)
def test_tpu_init_ops_run_after_session_creation_before_the_threads(clean_env):
    with tf.Graph().as_default():
        initialised = _Counter("initialised")
        hook = _hook(tpu_init_ops=[initialised.increment])
        with _Driver(hook, iterations_per_loop=1) as driver:
            assert driver.session.run(initialised.var) == 1
            hook.end(driver.session)


@pytest.mark.timeout(60)
def test_summary_writers_are_initialised_and_flushed_at_end(clean_env, tmp_path):
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            summary = tf.summary.scalar("loop_value", 4.5, step=step)
        hook = _hook()
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.session.run(summary)
            hook.end(driver.session)
            values = [
                tf.make_ndarray(v.tensor)
                for path in glob.glob(os.path.join(str(tmp_path), "events.*"))
                for event in tf.compat.v1.train.summary_iterator(path)
                for v in event.summary.value
                if v.tag == "loop_value"
            ]
            assert values == [pytest.approx(4.5)]


def _compile_result(error=""):
    proto = compilation_result_pb2.CompilationResultProto(status_error_message=error)
    return tf.constant(proto.SerializeToString())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error, stopped", [("", False), ("bad shape", True)])
def test_split_compile_checks_the_compilation_result(clean_env, monkeypatch, error, stopped):
    monkeypatch.setenv("TPU_SPLIT_COMPILE_AND_EXECUTE", "1")
    with tf.Graph().as_default():
        hook = Hook(FakeTPUContext(), [tf.no_op()], [tf.no_op()], _compile_result(error))
        with _Driver(hook, iterations_per_loop=1) as driver:
            assert driver.coord.should_stop() is stopped
            hook.end(driver.session)


@pytest.mark.timeout(60)
def test_watchdog_starts_with_the_env_timeout(clean_env, monkeypatch):
    calls = []
    monkeypatch.setenv("TF_TPU_WATCHDOG_TIMEOUT", "7")
    monkeypatch.setattr(
        session_support,
        "start_worker_watchdog",
        lambda session, shutdown_timeout: calls.append((session, shutdown_timeout)),
    )
    with tf.Graph().as_default():
        hook = _hook()
        with _Driver(hook, iterations_per_loop=1) as driver:
            assert calls == [(driver.session, 7)]
            hook.end(driver.session)


@pytest.mark.timeout(60)
def test_failing_watchdog_leaves_no_feed_thread_running(clean_env, monkeypatch):
    def broken_watchdog(session, shutdown_timeout):
        raise RuntimeError("no watchdog here")

    monkeypatch.setenv("TF_TPU_WATCHDOG_TIMEOUT", "5")
    monkeypatch.setattr(session_support, "start_worker_watchdog", broken_watchdog)
    with tf.Graph().as_default():
        hook = _hook()
        with pytest.raises(RuntimeError, match="no watchdog here"), _Driver(hook, 1):
            pass
    assert live_feed_threads(wait_secs=0) == []


@pytest.mark.timeout(60)
def test_invalid_watchdog_timeout_raises_before_any_thread_starts(clean_env, monkeypatch):
    monkeypatch.setenv("TF_TPU_WATCHDOG_TIMEOUT", "soon")
    with tf.Graph().as_default():
        hook = _hook()
        with pytest.raises(ValueError, match="TF_TPU_WATCHDOG_TIMEOUT='soon'"), _Driver(hook, 1):
            pass
    assert live_feed_threads(wait_secs=0) == []


# -- get_stopping_signals_and_name ------------------------------------------------------


def test_stopping_signals_are_none_without_the_signal_feature():
    with tf.Graph().as_default():
        assert Hook.get_stopping_signals_and_name({"x": tf.zeros([2])}) == (
            None,
            "_user_provided_signal_name",
        )
        assert Hook.get_stopping_signals_and_name(tf.zeros([2]))[0] is None


@pytest.mark.parametrize(
    "signal, expected",
    [([False, False], [False, False]), ([False, True], [False, True]), (True, [True])],
)
def test_stopping_signals_outside_replicate_context_are_the_local_flag(signal, expected):
    with tf.Graph().as_default() as graph:
        signals, name = Hook.get_stopping_signals_and_name({SIGNAL: tf.constant(signal)})
        assert name == SIGNAL
        assert "CrossReplicaSum" not in {op.type for op in graph.get_operations()}
        with tf.compat.v1.Session() as session:
            assert session.run(signals["stopping"]).tolist() == expected


def _graph_op_types(graph):
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


@pytest.mark.parametrize("in_while_loop", [False, True], ids=["step", "step_in_while_loop"])
def test_stopping_signals_inside_tpu_replicate_are_summed_across_replicas(in_while_loop):
    def flag_count(flags):
        signals, _ = Hook.get_stopping_signals_and_name({SIGNAL: flags})
        return tf.reduce_sum(tf.cast(signals["stopping"], tf.int32))

    def computation(flags):
        if not in_while_loop:
            return flag_count(flags)
        return tf.compat.v1.while_loop(
            lambda i, total: i < 3, lambda i, total: (i + 1, total + flag_count(flags)), [0, 0]
        )[1]

    with tf.Graph().as_default() as graph:
        tf.compat.v1.tpu.replicate(computation, inputs=[[tf.zeros([2], tf.bool)]])
        assert "CrossReplicaSum" in _graph_op_types(graph)


@pytest.mark.timeout(60)
def test_hook_owned_rendezvous_raises_a_feed_error_from_end_after_shutdown(clean_env, monkeypatch):
    ran = []
    _recording_tpu_ops(monkeypatch, ran)
    with tf.Graph().as_default():
        failing_enqueue = tf.debugging.Assert(False, ["input broke"])
        hook = _hook([failing_enqueue], ctx=FakeTPUContext(initialize_tpu=True))
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            with pytest.raises(tf.errors.InvalidArgumentError, match="input broke"):
                hook.end(driver.session)
            assert ran[-1] == ("shutdown", None)  # the TPU was shut down first
    assert live_feed_threads() == []


@pytest.mark.timeout(60)
def test_recreated_session_stops_the_previous_sessions_threads(clean_env):
    with tf.Graph().as_default():
        hook = _hook()
        with _Driver(hook, iterations_per_loop=1) as driver:
            first = feed_threads()
            assert len(first) == 2
            hook.after_create_session(driver.session, driver.coord)
            assert not any(thread.is_alive() for thread in first)
            hook.end(driver.session)


def _scripted_signal_dequeue_ops(script, waiting):
    """Outfeed ops whose stop flag is the next item of `script` (a queue.Queue).

    Each dequeue sets `waiting` (a threading.Event) and blocks until an item is
    put: a bool, or an exception to raise.
    """

    def next_flag():
        waiting.set()
        item = script.get(timeout=30)
        if isinstance(item, Exception):
            raise item
        return np.array([item])

    return {SIGNAL: {"stopping": tf.numpy_function(next_flag, [], tf.bool, stateful=True)}}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("late", ["stop", "error"])
def test_a_late_thread_of_a_replaced_session_cannot_reach_the_new_one(clean_env, absl_info, late):
    script, waiting = queue.Queue(), threading.Event()
    with tf.Graph().as_default():
        rendezvous = error_handling.ErrorRendezvous(num_sources=2)
        hook = _hook(
            dequeue_ops=_scripted_signal_dequeue_ops(script, waiting),
            rendezvous=rendezvous,
            join_timeout_secs=0.2,
        )
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            assert waiting.wait(30)  # the first session's outfeed thread is inside its dequeue
            (old_outfeed,) = [t for t in feed_threads() if t.name == "OutfeedController"]
            hook.after_create_session(driver.session, tf.train.Coordinator())
            assert old_outfeed.is_alive()  # not joined in time: a late thread
            script.put(True if late == "stop" else ValueError("late failure"))
            old_outfeed.join(30)
            assert not old_outfeed.is_alive()
            assert hook.stopping_signal is False
            for _ in range(2):  # neither stops nor raises: the new session trains on
                script.put(False)
                driver.loop()
            assert hook.stopping_signal is False
            hook.end(driver.session)
        rendezvous.raise_errors()  # nothing recorded
    messages = [r.getMessage() for r in absl_info.records]
    if late == "stop":  # the late thread saw the stop and set its own session's flag
        assert "Set shared stop signal after loop 0." in messages
    else:
        assert any("during shutdown (not recorded)" in m for m in messages)


class _ListControllerHook(Hook):
    """Creates its infeed controllers as `ListController`s and keeps them in `created`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.created = []

    def _create_infeed_controller(self, name, target, args):
        self.created.append(ListController(name, target, args))
        return self.created[-1]


def test_controllers_implement_the_feed_controller_protocol():
    for controller_class in (feed_hook._OpQueueContext, ListController):
        controller = controller_class("P", lambda ctx: None, ())
        assert isinstance(controller, feed_hook.FeedController)
        assert controller.join(timeout=30)
    assert not isinstance(object(), feed_hook.FeedController)


def test_the_protocol_declares_what_the_session_calls_on_a_controller():
    """ListController has only the protocol's public members (besides its records).

    The full hand-driven run below with it as the infeed controller shows the
    session needs nothing else; the protocol lists exactly those members.
    """
    protocol = {
        "thread",
        "watch_coordinator",
        "send_next_batch_signal",
        "read_iteration_counts",
        "wait_for_finished_loops",
        "join",
    }
    assert {m for m in dir(feed_hook.FeedController) if not m.startswith("_")} == protocol
    assert {m for m in dir(ListController) if not m.startswith("_")} == protocol


@pytest.mark.timeout(60)
def test_a_subclass_factory_may_return_any_feed_controller(clean_env):
    with tf.Graph().as_default():
        counter = _Counter("enqueued")
        hook = _ListControllerHook(
            FakeTPUContext(), [counter.increment], [tf.no_op()], tpu_compile_op=tf.no_op()
        )
        with _Driver(hook, iterations_per_loop=3) as driver:
            driver.loop()
            driver.loop()
            hook.end(driver.session)
            (infeed,) = hook.created
            assert infeed.coord is driver.coord  # attached by the session, not by the factory
            assert not infeed.thread.is_alive()
            assert infeed.sizes == [3, 3]
            assert driver.session.run(counter.var) == 6


@pytest.mark.timeout(60)
def test_per_loop_lines_log_at_debug_and_lifecycle_at_info(clean_env, caplog):
    caplog.set_level(logging.DEBUG, logger="absl")
    with tf.Graph().as_default():
        hook = _hook()
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            driver.loop()
            hook.end(driver.session)
    levels = {}
    for record in caplog.records:
        levels.setdefault(record.getMessage().split(" (")[0], set()).add(record.levelno)
    assert levels["Enqueue next"] == levels["Dequeue next"] == {logging.DEBUG}
    assert levels["Shutdown TPU system."] == {logging.INFO}


@pytest.mark.timeout(60)
def test_waiting_logger_rate_limit_holds_across_before_run_calls(clean_env, absl_info):
    with tf.Graph().as_default():
        gate = tf.queue.FIFOQueue(10, [tf.bool], shapes=[[1]])
        open_gate = gate.enqueue([[False]])
        hook = _hook(dequeue_ops={SIGNAL: {"stopping": gate.dequeue()}}, join_timeout_secs=5)
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            for _ in range(2):
                # The outfeed thread is stuck on the gate until the timer opens it, at
                # least 0.3 s (three poll slices) into this before_run's wait.
                timer = threading.Timer(0.3, driver.session.run, args=(open_gate,))
                timer.start()
                driver.loop()
                timer.join()
            driver.session.run(open_gate)
            hook.end(driver.session)
    waits = [r for r in absl_info.records if r.getMessage().startswith("Waiting for the outfeed")]
    assert len(waits) == 1


def _stuck_signal_dequeue_ops():
    never_filled = tf.queue.FIFOQueue(1, [tf.bool], shapes=[[1]])
    return {SIGNAL: {"stopping": never_filled.dequeue()}}


@pytest.mark.timeout(60)
def test_before_run_stops_waiting_for_the_outfeed_when_a_feed_thread_failed(clean_env):
    with tf.Graph().as_default():
        failing_enqueue = tf.debugging.Assert(False, ["input broke"])
        hook = _hook(
            [failing_enqueue], dequeue_ops=_stuck_signal_dequeue_ops(), join_timeout_secs=0.5
        )
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            with pytest.raises(tf.errors.InvalidArgumentError, match="input broke"):
                driver.loop()
    assert live_feed_threads() == []


@pytest.mark.timeout(60)
def test_before_run_stops_waiting_for_the_outfeed_when_the_coordinator_stops(clean_env):
    with tf.Graph().as_default():
        hook = _hook(dequeue_ops=_stuck_signal_dequeue_ops(), join_timeout_secs=0.5)
        with _Driver(hook, iterations_per_loop=1) as driver:
            driver.loop()
            driver.coord.request_stop()
            driver.loop()  # returns instead of waiting for the stuck outfeed
            hook.end(driver.session)
    assert live_feed_threads() == []
