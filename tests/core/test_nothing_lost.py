"""The stop rule across replicas and hosts: what each rule trains on an uneven pod, and says.

An emulated pod of 2 hosts x 2 replicas whose hosts read shards of 40 and 25
per-replica batches (tests/core/_uneven_pod.py: every example has its own
id; checkpointed counters are updated in the train op by the real examples
of the steps that train, summed over replicas):

* `StopRule.ANY_REPLICA_PADDING` (default): training stops on step 13, the
  first with a padding batch (host 1's 25th batch is its last); the 12 fully
  real steps (48 batches) are trained, host 0's 16 remaining batches and
  host 1's last are not, and the feed hook's WARNING names them;
* `StopRule.ALL_REPLICAS_PADDING`: all 65 batches are trained exactly once,
  in 20 steps, and the weights are those of a numpy reference that trains
  the same steps with the padding examples masked.

The rule is chosen once, in `append_stopping_signals`; the step's stop
signal, `skip_padding_steps`, `is_padding_step` and the feed hook follow it,
on a real TPUEstimator graph (simulated 2x4) as in the emulator, and a step
built so that they would disagree raises while the graph is built.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import stopping_signals, testing
from monolith.core.feed import signal
from monolith.core.feed.stop_step import StopStep, hosts_with_real_data
from monolith.core.stopping_signals import (
    USER_PROVIDED_SIGNAL_NAME,
    StopRule,
    append_stopping_signals,
    masked_mean_loss,
    skip_padding_steps,
)
from tests.core import _uneven_pod as pod
from tests.core._host_call_helpers import exact_auc, read_events
from tests.core._simulated_tpu_helpers import build_on_simulated_tpu

pytestmark = pytest.mark.timeout(300)

ANY, ALL = StopRule.ANY_REPLICA_PADDING, StopRule.ALL_REPLICAS_PADDING
BATCH = 2  # per replica
HOSTS, REPLICAS_PER_HOST = 2, 2
NUM_IDS = pod.num_ids(pod.SHARDS, BATCH)  # 130


class _Records(logging.Handler):
    """Collects the log records of a block (the absl logger propagates to the root)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    @property
    def text(self):
        return "\n".join(record.getMessage() for record in self.records)


def _train_uneven_pod(model_dir, rule, **kwargs):
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        result = testing.train(
            pod.model_fn,
            pod.input_fn,
            model_dir=str(model_dir),
            iterations_per_loop=4,
            params={"shards": pod.SHARDS, "stop_rule": rule, **kwargs.pop("params", {})},
            train_batch_size=BATCH * HOSTS * REPLICAS_PER_HOST,
            num_hosts=HOSTS,
            replicas_per_host=REPLICAS_PER_HOST,
            log_step_count_steps=None,
            **kwargs,
        )
    finally:
        root.removeHandler(records)
    reader = tf.train.load_checkpoint(result.final_checkpoint)
    return result, reader, records.text


@pytest.fixture(scope="module")
def any_run(tmp_path_factory):
    return _train_uneven_pod(tmp_path_factory.mktemp("any"), ANY)


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    return _train_uneven_pod(tmp_path_factory.mktemp("all"), ALL)


def _ids_of_batches(host, batches):
    return pod.shard_ids(pod.SHARDS, BATCH, host)[:batches].reshape([-1])


# -- ANY_REPLICA_PADDING: what the default rule trains, and what it says ---------------------------


def test_any_rule_trains_exactly_the_48_batches_of_the_12_fully_real_steps(any_run):
    result, reader, _ = any_run
    expected = np.zeros(NUM_IDS + 1, np.int64)
    expected[np.concatenate([_ids_of_batches(0, 24), _ids_of_batches(1, 24)])] = 1
    np.testing.assert_array_equal(reader.get_tensor("trained_times"), expected)
    assert reader.get_tensor("real_examples") == 48 * BATCH
    assert result.global_step == 12 and result.stopped_at_end_of_stream
    assert result.trained_real_batches == (24, 24)
    # Host 0: 2 in step 13, 6 more in the rest of its loop, 8 drained; host 1: its last.
    assert result.untrained_real_batches == (16, 1)
    weights = reader.get_tensor("w")
    reference = pod.reference_weights(pod.trained_steps(pod.SHARDS, BATCH, 2, ANY), NUM_IDS)
    np.testing.assert_allclose(weights, reference, rtol=0, atol=1e-5)


def test_any_rule_warns_naming_the_hosts_and_replicas_that_still_had_real_data(any_run):
    _, _, logged = any_run
    # Step 13: host 0's replicas both had real batches, host 1's replica 2 its last one.
    assert "host 0 (replicas 0, 1), host 1 (replica 2) still had real batches" in logged
    assert "the rest of their shards are not trained" in logged
    assert "StopRule.ALL_REPLICAS_PADDING trains them" in logged


# -- ALL_REPLICAS_PADDING: nothing lost ------------------------------------------------------------


def test_all_rule_trains_all_65_batches_exactly_once_in_20_steps(all_run):
    result, reader, logged = all_run
    np.testing.assert_array_equal(reader.get_tensor("trained_times"), [0] + [1] * NUM_IDS)
    assert reader.get_tensor("real_examples") == 65 * BATCH
    assert result.global_step == 20 and result.stopped_at_end_of_stream
    assert result.trained_real_batches == (40, 25)
    assert result.untrained_real_batches == (0, 0)
    assert "still had real batches" not in logged


def test_all_rule_weights_equal_a_reference_that_masks_the_padding_examples(all_run):
    _, reader, _ = all_run
    steps = pod.trained_steps(pod.SHARDS, BATCH, 2, ALL)
    assert len(steps) == 20 and sum(len(ids) for ids in steps[12:]) == 8 * 2 * BATCH + BATCH
    reference = pod.reference_weights(steps, NUM_IDS)
    np.testing.assert_allclose(reader.get_tensor("w"), reference, rtol=0, atol=1e-5)
    # Adam applied 20 updates (beta1_power starts at 0.9 and is multiplied by it per update).
    assert reader.get_tensor("beta1_power") == pytest.approx(0.9**21, rel=1e-5)


def test_all_rule_host_call_auc_leaves_padding_out(all_run):
    result, _, _ = all_run
    events = read_events(os.path.join(os.path.dirname(result.final_checkpoint), "host_call"))
    ids = np.arange(1, NUM_IDS + 1)
    labels, scores = (pod.score(ids) > 0.5).astype(np.float32), pod.score(ids)
    real_auc = exact_auc(labels, scores)
    # The padding examples the host call saw (id 0: a negative scored 1.0),
    # 15 batches in steps 13-20 and 16 in the last loop's padding steps.
    padding = 31 * BATCH
    with_padding = exact_auc(
        np.concatenate([labels, np.zeros(padding)]), np.concatenate([scores, np.ones(padding)])
    )
    assert real_auc == 1.0 and with_padding < 0.7
    assert float(events["auc"][-1][1]) == pytest.approx(real_auc, abs=0.01)


def test_all_rule_with_an_unmasked_loss_is_a_value_error_at_graph_construction(tmp_path):
    params = {"shards": pod.SHARDS, "stop_rule": ALL, "masked": False, "model_dir": str(tmp_path)}
    with tf.Graph().as_default(), pytest.raises(ValueError) as raised:
        testing.build_emulated_training(
            pod.model_fn,
            pod.input_fn,
            params=params,
            train_batch_size=BATCH * HOSTS * REPLICAS_PER_HOST,
            num_hosts=HOSTS,
            replicas_per_host=REPLICAS_PER_HOST,
        )
    message = str(raised.value)
    assert "does not depend on the padding flag" in message
    assert "masked_mean_loss" in message


def test_all_rule_gradients_that_ignore_the_padding_flag_are_a_value_error():
    with tf.Graph().as_default():
        features = _flagged_features(ALL)
        weight = tf.compat.v1.get_variable("w", [], initializer=tf.compat.v1.ones_initializer())
        optimizer = skip_padding_steps(tf.compat.v1.train.AdamOptimizer(0.1), features)
        loss = tf.reduce_mean(tf.square(weight * features["x"]))  # padding included
        grads_and_vars = list(zip(tf.gradients(loss, [weight]), [weight]))
        with pytest.raises(ValueError, match="none of the gradients .* depends on the padding"):
            optimizer.apply_gradients(grads_and_vars)
        masked = masked_mean_loss(tf.square(weight * features["x"]), features)
        optimizer.apply_gradients(list(zip(tf.gradients(masked, [weight]), [weight])))


def test_the_default_rule_accepts_an_unmasked_loss():
    with tf.Graph().as_default():
        features = _flagged_features(ANY)
        weight = tf.compat.v1.get_variable("w", [], initializer=tf.compat.v1.ones_initializer())
        optimizer = skip_padding_steps(tf.compat.v1.train.AdamOptimizer(0.1), features)
        optimizer.minimize(tf.reduce_mean(weight * features["x"]))


# -- one replica: both rules are today's ---------------------------------------------------------


def _one_replica(model_dir, rule, **kwargs):
    return testing.train(
        pod.model_fn,
        pod.input_fn,
        model_dir=str(model_dir),
        iterations_per_loop=4,
        params={"shards": (5,), "stop_rule": rule},
        train_batch_size=BATCH,
        log_step_count_steps=None,
        **kwargs,
    )


def test_a_single_replica_trains_the_same_under_both_rules(tmp_path):
    results = {rule: _one_replica(tmp_path / rule.name, rule) for rule in (ANY, ALL)}
    variables = {}
    for rule, result in results.items():
        assert (result.global_step, result.steps_run) == (5, 8)  # 5 real, then 3 padding steps
        assert result.trained_real_batches == (5,) and result.untrained_real_batches == (0,)
        reader = tf.train.load_checkpoint(result.final_checkpoint)
        variables[rule] = {
            name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
        }
        np.testing.assert_array_equal(variables[rule]["trained_times"], [0] + [1] * 5 * BATCH)
    assert sorted(variables[ANY]) == sorted(variables[ALL])
    for name, value in variables[ANY].items():
        np.testing.assert_array_equal(variables[ALL][name], value, err_msg=name)


def test_untrained_batches_are_not_counted_when_the_run_stops_before_the_end(tmp_path):
    result = _one_replica(tmp_path, ALL, steps=2)
    assert result.global_step == 2 and not result.stopped_at_end_of_stream
    assert result.trained_real_batches == (2,)
    assert result.untrained_real_batches is None


# -- the rule is chosen once and followed by every reader ------------------------------------------


def test_stop_rule_is_exported_with_the_input_side():
    assert stopping_signals.StopRule is signal.StopRule
    assert {"StopRule", "masked_mean_loss", "is_padding_step"} <= set(stopping_signals.__all__)


def test_a_stop_rule_that_is_not_a_stop_rule_is_a_type_error():
    with tf.Graph().as_default(), pytest.raises(TypeError, match="stop_rule='all'"):
        append_stopping_signals(tf.data.Dataset.from_tensors({"x": tf.zeros([2])}), stop_rule="all")


def test_every_reader_of_an_emulated_pod_follows_the_pipelines_rule(tmp_path):
    with tf.Graph().as_default() as graph:
        built = testing.build_emulated_training(
            pod.model_fn,
            pod.input_fn,
            params={"shards": pod.SHARDS, "stop_rule": ALL, "model_dir": str(tmp_path)},
            train_batch_size=BATCH * HOSTS * REPLICAS_PER_HOST,
            num_hosts=HOSTS,
            replicas_per_host=REPLICAS_PER_HOST,
        )
    assert built.hook.stop_rule is ALL
    readers = signal.stop_rule_readers(graph)
    assert set(readers.values()) == {ALL}
    assert len(readers) == 4  # the step's signal, skip_padding_steps, is_padding_step, the hook


@pytest.fixture(scope="module")
def tpu_graph_all(tmp_path_factory):
    """TPUEstimator's training graph of the uneven-pod model on a simulated 2 x 4 TPU, under ALL."""
    return build_on_simulated_tpu(
        pod.model_fn,
        pod.input_fn,
        2,
        4,
        model_dir=str(tmp_path_factory.mktemp("tpu_all")),
        per_replica_batch=BATCH,
        params={"shards": pod.SHARDS, "stop_rule": ALL},
    )


def test_tpuestimator_builds_the_step_signal_update_and_hook_under_the_pipelines_rule(
    tpu_graph_all,
):
    built = tpu_graph_all
    assert built.feed_hook.stop_rule is ALL
    readers = signal.stop_rule_readers(built.graph)
    assert set(readers.values()) == {ALL}
    assert any(reader.startswith("the TPU step's stop signal") for reader in readers)
    assert {"skip_padding_steps", "is_padding_step", "the feed hook's stop decision"} <= set(
        readers
    )
    # TPUEstimator outfeeds both keys of the signal dict, concatenated over the 8 replicas.
    outfed = built.dequeue_ops[USER_PROVIDED_SIGNAL_NAME]
    assert set(outfed) == {"stopping", "real_examples"}
    assert outfed["stopping"].shape.as_list() == [8 * BATCH]
    assert outfed["real_examples"].shape.as_list() == [8]


def test_tpuestimator_hosts_built_with_different_rules_raise_while_building(tmp_path):
    def input_fn(params, config):
        rule = ANY if params["context"].current_host == 0 else ALL
        return pod.input_fn(dict(params, stop_rule=rule), config)

    with pytest.raises(ValueError, match="different stop rules"):
        build_on_simulated_tpu(
            pod.model_fn,
            input_fn,
            2,
            4,
            model_dir=str(tmp_path),
            per_replica_batch=BATCH,
            params={"shards": pod.SHARDS},
        )


def _flagged_features(rule):
    dataset = tf.data.Dataset.from_tensor_slices({"x": tf.range(8, dtype=tf.float32)})
    dataset = dataset.batch(4, drop_remainder=True)
    dataset = append_stopping_signals(dataset, stop_rule=rule)
    return tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()


def test_a_reader_built_before_the_pipeline_recorded_another_rule_raises():
    from monolith.core.auto_checkpoint_feed_hook import (
        TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook as Hook,
    )

    with tf.Graph().as_default():
        flag = tf.zeros([4], tf.bool)
        skip_padding_steps(tf.compat.v1.train.GradientDescentOptimizer(0.1), flag)  # ANY
        features = _flagged_features(ALL)  # recorded after skip_padding_steps followed ANY
        with pytest.raises(ValueError, match="skip_padding_steps followed ANY_REPLICA_PADDING"):
            Hook.get_stopping_signals_and_name(features)


# -- masked_mean_loss ------------------------------------------------------------------------------


def _run(fetches):
    with tf.compat.v1.Session() as session:
        return session.run(fetches)


def test_masked_mean_loss_on_one_replica_is_the_mean_over_the_real_examples():
    with tf.Graph().as_default():
        losses = tf.constant([1.0, 2.0, 6.0, 100.0])
        padding = tf.constant([False, False, False, True])
        weight = tf.constant(1.0)
        loss = masked_mean_loss(losses * weight, {USER_PROVIDED_SIGNAL_NAME: padding})
        grad = tf.gradients(loss, [weight])[0]
        value, gradient = _run([loss, grad])
    assert value == pytest.approx(3.0)  # (1 + 2 + 6) / 3: the padding example left out
    assert gradient == pytest.approx(3.0)


def test_masked_mean_loss_of_a_padding_step_is_zero_with_a_zero_gradient():
    with tf.Graph().as_default():
        weight = tf.constant(2.0)
        loss = masked_mean_loss(tf.fill([3], 5.0) * weight, tf.ones([3], tf.bool))
        value, gradient = _run([loss, tf.gradients(loss, [weight])[0]])
    assert value == 0.0 and gradient == 0.0


@pytest.mark.parametrize(
    "shape, dtype, flag_dtype, error, match",
    [
        ([4, 2], tf.float32, tf.bool, ValueError, r"\[batch\] or \[batch, 1\]"),
        ([3], tf.float32, tf.bool, ValueError, "same static batch size"),
        ([4], tf.int32, tf.bool, TypeError, "must be a float tensor"),
        ([4], tf.float32, tf.float32, TypeError, "must be bool or integer"),
    ],
    ids=["two_columns", "other_batch", "int_loss", "float_flag"],
)
def test_masked_mean_loss_rejects_what_is_not_one_loss_per_example(
    shape, dtype, flag_dtype, error, match
):
    with tf.Graph().as_default(), pytest.raises(error, match=match):
        masked_mean_loss(tf.zeros(shape, dtype), tf.zeros([4], flag_dtype))


# -- the warning, from what the outfeed carried -------------------------------------------------


def test_hosts_with_real_data_groups_replicas_host_by_host():
    assert hosts_with_real_data([2, 2, 1, 0], 2) == {0: [0, 1], 1: [2]}
    assert hosts_with_real_data([0, 0, 0, 3], 2) == {1: [3]}
    assert hosts_with_real_data([2, 0, 2], None) == {None: [0, 2]}
    assert hosts_with_real_data([0, 0], 1) == {}


def test_the_warning_is_given_only_under_any_when_some_replica_had_real_data():
    assert "host 1 (replicas 2, 3) still had" in StopStep(ANY, (0, 0, 4, 4), 2).untrained_warning()
    assert StopStep(ANY, (0, 0, 0, 0), 2).untrained_warning() is None
    assert StopStep(ALL, (0, 0, 0, 0), 2).untrained_warning() is None
    assert StopStep(ANY, None, 2).untrained_warning() is None  # no per-replica counts outfed
