"""`skip_trained_batches`: the skip count is read in-graph at iterator initialisation.

Real graphs, sessions and checkpoints: the count follows the global step the
session holds when the iterator's initializer runs (after a restore, and
again in a session MonitoredSession recreates in-process), and on a
TPUEstimator graph built for a simulated 2 x 4 TPU system each host's input
pipeline skips `global_step * 4` batches under PER_HOST_V2 and `global_step`
under PER_HOST_V1.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core import stopping_signals, trained_batches
from monolith.core.stopping_signals import append_stopping_signals, skip_trained_batches
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu

pytestmark = pytest.mark.timeout(120)


def _ids(n=40, batch=2):
    """Batches [0, 1], [2, 3], ...: a batch's first id tells its index."""
    return tf.data.Dataset.range(n).batch(batch, drop_remainder=True)


def test_reexported_from_stopping_signals():
    assert stopping_signals.skip_trained_batches is trained_batches.skip_trained_batches
    assert "skip_trained_batches" in stopping_signals.__all__


@pytest.mark.parametrize("batches_per_step", [None, 1, 3])
def test_count_is_read_when_the_iterator_is_initialised(batches_per_step):
    per_step = batches_per_step or 1
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        dataset = skip_trained_batches(_ids(), batches_per_step)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(iterator.initializer)
            np.testing.assert_array_equal(session.run(batch), [0, 1])
            # Set after the graph was built: only the next initialisation sees it.
            session.run(global_step.assign(4))
            np.testing.assert_array_equal(session.run(batch), [2, 3])
            session.run(iterator.initializer)
            first = 2 * 4 * per_step
            np.testing.assert_array_equal(session.run(batch), [first, first + 1])


def test_skipping_past_the_end_leaves_only_the_padding_tail():
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        dataset = append_stopping_signals(
            _ids(8).map(lambda ids: {"ids": ids}).apply(skip_trained_batches)
        )
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(global_step.assign(3))
            session.run(iterator.initializer)
            first = session.run(batch)
            np.testing.assert_array_equal(first["ids"], [6, 7])
            assert not first[stopping_signals.USER_PROVIDED_SIGNAL_NAME].any()
            session.run(global_step.assign(4))  # a finished run: every real batch trained
            session.run(iterator.initializer)
            assert session.run(batch)[stopping_signals.USER_PROVIDED_SIGNAL_NAME].all()


def _counting_graph(per_step):
    """A 'model' that trains on ids: each run takes `per_step` batches and adds their ids."""
    global_step = tf.compat.v1.train.get_or_create_global_step()
    dataset = skip_trained_batches(tf.data.Dataset.range(30).batch(1), per_step)
    iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
    trained = tf.compat.v1.get_variable(
        "trained", [30], tf.int64, initializer=tf.compat.v1.zeros_initializer()
    )
    batches = [iterator.get_next() for _ in range(per_step)]
    ids = tf.concat(batches, axis=0)
    train_op = tf.group(
        tf.compat.v1.scatter_add(trained, ids, tf.ones_like(ids)),
        global_step.assign_add(1),
    )
    return iterator, trained, train_op


class _InitIterator(tf.compat.v1.train.SessionRunHook):
    """Initialises the iterator after each session creation (restore), as TPUEstimator does."""

    def __init__(self, iterator):
        self._iterator = iterator

    def after_create_session(self, session, coord):
        session.run(self._iterator.initializer)


class _AbortOnce(tf.compat.v1.train.SessionRunHook):
    """Raises AbortedError after the run that reaches `at_step`, once: MonitoredSession recovers."""

    def __init__(self, at_step):
        self._at_step = at_step
        self.sessions = 0
        self.aborted = False

    def after_create_session(self, session, coord):
        self.sessions += 1

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(tf.compat.v1.train.get_global_step())

    def after_run(self, run_context, run_values):
        if not self.aborted and run_values.results + 1 >= self._at_step:
            self.aborted = True
            raise tf.errors.AbortedError(None, None, "injected: TPU worker restarted")


def _train(model_dir, per_step, steps, hooks=(), save_steps=None):
    with tf.Graph().as_default():
        iterator, trained, train_op = _counting_graph(per_step)
        scaffold = tf.compat.v1.train.Scaffold()
        saver = tf.compat.v1.train.CheckpointSaverHook(
            model_dir, save_steps=save_steps or 10**9, scaffold=scaffold
        )
        creator = tf.compat.v1.train.ChiefSessionCreator(
            scaffold=scaffold, checkpoint_dir=model_dir
        )
        all_hooks = [
            _InitIterator(iterator),
            *hooks,
            tf.compat.v1.train.StopAtStepHook(last_step=steps),
            saver,
        ]
        with tf.compat.v1.train.MonitoredSession(session_creator=creator, hooks=all_hooks) as sess:
            while not sess.should_stop():
                sess.run(train_op)
        reader = tf.train.load_checkpoint(model_dir)
        return reader.get_tensor("trained"), reader.get_tensor("global_step")


@pytest.mark.parametrize("per_step", [1, 2])
def test_restart_resumes_after_the_restored_step(tmp_path, per_step):
    trained, step = _train(str(tmp_path), per_step, steps=4)
    assert step == 4
    trained, step = _train(str(tmp_path), per_step, steps=9)
    assert step == 9
    np.testing.assert_array_equal(trained, [1] * (9 * per_step) + [0] * (30 - 9 * per_step))


@pytest.mark.parametrize("per_step", [1, 2])
def test_session_recreated_in_process_resumes_at_the_restored_step(tmp_path, per_step):
    abort = _AbortOnce(at_step=6)
    # Checkpoints at steps 0, 4 and 8: the abort at step 6 rolls back to step 4.
    trained, step = _train(str(tmp_path), per_step, steps=10, hooks=[abort], save_steps=4)
    assert abort.aborted and abort.sessions == 2
    assert step == 10
    np.testing.assert_array_equal(trained, [1] * (10 * per_step) + [0] * (30 - 10 * per_step))


def _train_until_padding(model_dir):
    """Two batches per step (two replicas of a host); stops on a step with any padding.

    The weights record what was trained: each trained id `i` moves `w[i]` by -1.
    Returns (w, global step) from the checkpoint written at the stop.
    """
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        dataset = _ids(10).map(lambda ids: {"ids": ids})  # 5 real batches
        dataset = append_stopping_signals(skip_trained_batches(dataset, batches_per_step=2))
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        replicas = [iterator.get_next() for _ in range(2)]
        ids = tf.concat([r["ids"] for r in replicas], axis=0)
        signal_name = stopping_signals.USER_PROVIDED_SIGNAL_NAME
        flag = tf.concat([r[signal_name] for r in replicas], axis=0)
        weights = tf.compat.v1.get_variable(
            "w", [10], tf.float32, initializer=tf.compat.v1.zeros_initializer()
        )
        real = 1.0 - tf.cast(flag, tf.float32)
        loss = tf.reduce_sum(tf.gather(weights, ids) * real)
        optimizer = stopping_signals.skip_padding_steps(
            tf.compat.v1.train.GradientDescentOptimizer(1.0), {signal_name: flag}
        )
        train_op = optimizer.minimize(loss, global_step=global_step)
        stop = tf.reduce_any(flag)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            latest = tf.train.latest_checkpoint(model_dir)
            if latest:
                saver.restore(session, latest)
            else:
                session.run(tf.compat.v1.global_variables_initializer())
            session.run(iterator.initializer)
            while not session.run([train_op, stop])[1]:
                pass
            saver.save(session, f"{model_dir}/model", global_step=global_step)
    reader = tf.train.load_checkpoint(model_dir)
    return -reader.get_tensor("w"), reader.get_tensor("global_step")


def test_a_partly_real_last_step_is_dropped_and_a_restart_trains_nothing_more(tmp_path):
    # Steps take batches (0, 1), (2, 3), then (4, padding): that step is padding.
    trained_once = [1.0] * 8 + [0.0] * 2  # ids 8, 9 (batch 4) are dropped
    trained, step = _train_until_padding(str(tmp_path))
    np.testing.assert_array_equal(trained, trained_once)
    assert step == 2
    # The restart skips 2 * 2 batches and meets the same partial step.
    trained, step = _train_until_padding(str(tmp_path))
    np.testing.assert_array_equal(trained, trained_once)
    assert step == 2


def test_tpu_estimator_resumes_through_its_own_iterator_initialisation(tmp_path):
    """TPUEstimator(use_tpu=False) trains 3 steps, then a second train() finishes the stream.

    Estimator initialises the input iterator in a hook's after_create_session,
    after the restore: the second call starts at batch 3. Each step adds its ids
    to a checkpointed counter; every id ends up trained exactly once.
    """

    def input_fn(params):
        dataset = tf.data.Dataset.range(20).batch(2, drop_remainder=True)  # 10 batches
        return skip_trained_batches(dataset, context=params.get("context"))

    def model_fn(features, labels, mode, params):
        trained = tf.compat.v1.get_variable(
            "trained", [20], tf.int64, initializer=tf.compat.v1.zeros_initializer()
        )
        weight = tf.compat.v1.get_variable("w", [], tf.float32)
        loss = tf.square(weight - tf.reduce_mean(tf.cast(features, tf.float32)))
        optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)
        train_op = tf.group(
            optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step()),
            tf.compat.v1.scatter_add(trained, features, tf.ones_like(features)),
        )
        return tpu_estimator.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    estimator = tpu_estimator.TPUEstimator(
        model_fn=model_fn,
        config=tpu_config.RunConfig(model_dir=str(tmp_path)),
        use_tpu=False,
        train_batch_size=2,
    )
    estimator.train(input_fn, steps=3)
    np.testing.assert_array_equal(estimator.get_variable_value("trained"), [1] * 6 + [0] * 14)
    estimator.train(input_fn)  # until the stream ends
    np.testing.assert_array_equal(estimator.get_variable_value("trained"), [1] * 20)
    assert estimator.get_variable_value("global_step") == 10


# ------------------------------------------------------------ multi-host


def _count_in_graph(graph, skip_op, global_step_value):
    """Evaluates a SkipDataset op's count, with the global step read fed as `global_step_value`."""
    count = skip_op.inputs[1]
    step = _global_step_read(count)
    subgraph = tf.compat.v1.graph_util.extract_sub_graph(
        graph.as_graph_def(), [count.op.name, step.op.name]
    )
    for node in [*subgraph.node, *(n for f in subgraph.library.function for n in f.node_def)]:
        node.device = ""  # the simulated hosts do not exist
    with tf.Graph().as_default() as isolated:
        tf.compat.v1.import_graph_def(subgraph, name="")
        with tf.compat.v1.Session(graph=isolated) as session:
            return session.run(count.name, {step.name: global_step_value})


def _ancestors(tensor):
    pending, seen = [tensor.op], {}
    while pending:
        op = pending.pop()
        if op.name not in seen:
            seen[op.name] = op
            pending.extend(t.op for t in op.inputs)
            pending.extend(op.control_inputs)
    return list(seen.values())


def _global_step_read(count):
    """The int64 global step read that `count` is computed from."""
    [read] = [op for op in _ancestors(count) if op.name.endswith("/trained_steps")]
    variables = [
        op for op in _ancestors(read.outputs[0]) if op.type in ("VarHandleOp", "VariableV2")
    ]
    assert [op.name for op in variables] == ["global_step"]
    return read.outputs[0]


def _host_of(op):
    return tf.DeviceSpec.from_string(op.device).task


@pytest.mark.parametrize(
    "mode, per_step",
    [
        (tpu_config.InputPipelineConfig.PER_HOST_V2, 4),
        (tpu_config.InputPipelineConfig.PER_HOST_V1, 1),
    ],
    ids=["per_host_v2", "per_host_v1"],
)
def test_each_host_skips_global_step_times_its_batches_per_step(tmp_path, mode, per_step):
    def input_fn(params):
        dataset = tf.data.Dataset.range(64).map(lambda i: ({"ids": tf.stack([i, i])}, i % 2))
        dataset = dataset.batch(params["batch_size"], drop_remainder=True)
        dataset = skip_trained_batches(dataset, context=params["context"])
        return append_stopping_signals(dataset)

    def model_fn(features, labels, mode, params):
        weight = tf.compat.v1.get_variable("w", [2], tf.float32)
        logits = tf.reduce_sum(tf.cast(features["ids"], tf.float32) * weight, axis=1)
        loss = tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.float32), logits=logits
            )
        )
        optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(0.1)
        )
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
        return tpu_estimator.TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    built = build_on_simulated_tpu(
        model_fn,
        input_fn,
        num_hosts=2,
        cores_per_host=4,
        model_dir=str(tmp_path),
        per_replica_batch=2,
        max_steps=1,
        per_host_input_for_training=mode,
    )
    graph = built.graph
    skips = [op for op in graph.get_operations() if op.type == "SkipDataset"]
    assert sorted(_host_of(op) for op in skips) == [0, 1]
    for skip in skips:
        assert _count_in_graph(graph, skip, 7) == 7 * per_step
        assert _count_in_graph(graph, skip, 0) == 0


# ---------------------------------------------------------------- errors


class _FakeContext:
    """A TPUContext stand-in: PER_HOST_V2 input of `replicas` replicas per host."""

    def __init__(self, replicas, mode=tpu_config.InputPipelineConfig.PER_HOST_V2):
        self._replicas = replicas
        self._internal_ctx = type(
            "Internal",
            (),
            {
                "config": tpu_config.RunConfig(
                    tpu_config=tpu_config.TPUConfig(per_host_input_for_training=mode)
                )
            },
        )()

    def current_input_fn_deployment(self):
        return ("/job:worker/task:0/device:CPU:0", 0, 2, self._replicas)


def _in_graph(fn):
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        return fn()


@pytest.mark.parametrize("bad", [True, 1.0, "2", np.float32(2)])
def test_non_int_batches_per_step_is_a_type_error(bad):
    with pytest.raises(TypeError, match=rf"batches_per_step={bad!r}"):
        _in_graph(lambda: skip_trained_batches(_ids(), bad))


@pytest.mark.parametrize("bad", [0, -2])
def test_non_positive_batches_per_step_is_a_value_error(bad):
    with pytest.raises(ValueError, match=rf"batches_per_step={bad}"):
        _in_graph(lambda: skip_trained_batches(_ids(), bad))


def test_not_a_dataset_is_a_type_error():
    with pytest.raises(TypeError, match=r"dataset=\[1, 2\] \(type list\)"):
        _in_graph(lambda: skip_trained_batches([1, 2]))


def test_context_without_deployment_is_a_type_error():
    with pytest.raises(TypeError, match=r"context=\{'batch_size': 8\}"):
        _in_graph(lambda: skip_trained_batches(_ids(), context={"batch_size": 8}))


def test_batches_per_step_disagreeing_with_context_is_a_value_error():
    with pytest.raises(ValueError, match=r"batches_per_step=2 disagrees .* consumes 4 batch"):
        _in_graph(lambda: skip_trained_batches(_ids(), 2, context=_FakeContext(4)))


def _first_batch_at_global_step(global_step_value, **kwargs):
    """The first batch `skip_trained_batches(_ids(), **kwargs)` yields at this global step."""
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        iterator = tf.compat.v1.data.make_initializable_iterator(
            skip_trained_batches(_ids(), **kwargs)
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(global_step.assign(global_step_value))
            session.run(iterator.initializer)
            return session.run(iterator.get_next()).tolist()


def test_numpy_int_batches_per_step_is_accepted():
    # 3 steps x 2 batches of 2 ids: the first batch left is the 7th, [12, 13].
    assert _first_batch_at_global_step(3, batches_per_step=np.int64(2)) == [12, 13]


def test_batches_per_step_agreeing_with_context_is_accepted():
    # 3 steps x 4 batches of 2 ids: the first batch left is the 13th, [24, 25].
    assert _first_batch_at_global_step(3, batches_per_step=4, context=_FakeContext(4)) == [24, 25]


def test_per_host_v1_context_takes_one_batch_per_step():
    v1 = _FakeContext(4, tpu_config.InputPipelineConfig.PER_HOST_V1)
    assert _first_batch_at_global_step(3, context=v1) == [6, 7]


def test_no_global_step_is_a_runtime_error():
    with tf.Graph().as_default(), pytest.raises(RuntimeError, match="no global step"):
        skip_trained_batches(_ids())


def test_eager_call_is_a_runtime_error(tf_behavior):
    if tf_behavior == "v1":
        pytest.skip("no eager execution after disable_v2_behavior()")
    with pytest.raises(RuntimeError, match="needs a graph"):
        skip_trained_batches(tf.data.Dataset.range(4).batch(2))


def test_negative_global_step_fails_at_iterator_initialisation():
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        iterator = tf.compat.v1.data.make_initializable_iterator(skip_trained_batches(_ids()))
        with tf.compat.v1.Session() as session:
            session.run(global_step.assign(-1))
            with pytest.raises(tf.errors.InvalidArgumentError, match="global step is negative"):
                session.run(iterator.initializer)
