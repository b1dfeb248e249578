"""monolith.core.stopping_signals: the signal feature and the endless padding tail."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import stopping_signals
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook as Hook,
)
from monolith.core.feed import signal
from monolith.core.stopping_signals import (
    USER_PROVIDED_SIGNAL_NAME,
    append_stopping_signals,
    padding_batch,
)

pytestmark = pytest.mark.timeout(60)

SIGNAL = USER_PROVIDED_SIGNAL_NAME
BATCH = 4
ITERATORS = ["one_shot", "initializable"]


def _evaluate(make_dataset, num_elements, iterator="one_shot"):
    """The first `num_elements` elements of `make_dataset()`, read in a fresh graph.

    Graph mode with a v1 iterator, as TPUEstimator reads an input_fn's dataset;
    works under both TF behaviours.
    """
    with tf.Graph().as_default():
        dataset = make_dataset()
        if iterator == "one_shot":
            it = tf.compat.v1.data.make_one_shot_iterator(dataset)
        else:
            it = tf.compat.v1.data.make_initializable_iterator(dataset)
        next_element = it.get_next()
        with tf.compat.v1.Session() as sess:
            if iterator == "initializable":
                sess.run(it.initializer)
            return [sess.run(next_element) for _ in range(num_elements)]


def _static_spec(make_dataset):
    with tf.Graph().as_default():
        return make_dataset().element_spec


def _ids(num_batches, batch=BATCH):
    """Batches of int64 ids 0, 1, 2, ... (static batch dim)."""
    return tf.data.Dataset.range(num_batches * batch).batch(batch, drop_remainder=True)


def _dense_features(num_batches):
    def to_features(ids):
        return {
            "id": ids,
            "score": tf.cast(ids, tf.float32) + 0.5,
            "grid": tf.reshape(tf.cast(tf.tile(ids, [6]), tf.int32), [BATCH, 2, 3]),
            "word": tf.strings.as_string(ids),
            "odd": tf.equal(ids % 2, 1),
            "step": tf.constant(7.0, tf.float64),  # a scalar: no batch dim
        }

    return _ids(num_batches).map(to_features)


def _sparse_features(num_batches):
    """Sparse [BATCH, 5] ids: row r holds id r at column r % 5 when the id is odd."""

    def to_features(ids):
        dense = tf.one_hot(tf.range(BATCH) % 5, 5, dtype=tf.int64) * tf.reshape(
            ids % 2 * ids, [-1, 1]
        )
        return {"id": ids, "tags": tf.sparse.from_dense(dense)}

    return _ids(num_batches).map(to_features)


# -- the signal ------------------------------------------------------------------------------------


def test_signal_is_the_feature_the_feed_hook_reads():
    assert USER_PROVIDED_SIGNAL_NAME == "_user_provided_signal_name"  # the original's name
    with tf.Graph().as_default():
        dataset = append_stopping_signals(_dense_features(1))
        features = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        signals, name = Hook.get_stopping_signals_and_name(features)
        with tf.compat.v1.Session() as sess:
            real, padding = sess.run(signals["stopping"]), sess.run(signals["stopping"])
    assert name == USER_PROVIDED_SIGNAL_NAME
    np.testing.assert_array_equal(real, [False] * BATCH)
    np.testing.assert_array_equal(padding, [True] * BATCH)


@pytest.mark.parametrize("iterator", ITERATORS)
def test_real_batches_pass_unchanged_and_are_flagged_false(iterator):
    elements = _evaluate(lambda: append_stopping_signals(_dense_features(3)), 3, iterator)
    plain = _evaluate(lambda: _dense_features(3), 3, iterator)
    for flagged, original in zip(elements, plain):
        assert set(flagged) == set(original) | {SIGNAL}
        for key, value in original.items():
            np.testing.assert_array_equal(flagged[key], value)
        np.testing.assert_array_equal(flagged[SIGNAL], [False] * BATCH)


@pytest.mark.parametrize("iterator", ITERATORS)
def test_padding_batches_are_zero_filled_and_flagged_true(iterator):
    elements = _evaluate(lambda: append_stopping_signals(_dense_features(2)), 5, iterator)
    for padding in elements[2:]:
        np.testing.assert_array_equal(padding[SIGNAL], [True] * BATCH)
        np.testing.assert_array_equal(padding["id"], np.zeros([BATCH], np.int64))
        np.testing.assert_array_equal(padding["score"], np.zeros([BATCH], np.float32))
        np.testing.assert_array_equal(padding["grid"], np.zeros([BATCH, 2, 3], np.int32))
        assert padding["word"].tolist() == [b""] * BATCH
        assert padding["odd"].tolist() == [False] * BATCH
        assert padding["step"] == 0.0 and padding["step"].dtype == np.float64
        assert padding["score"].dtype == np.float32 and padding["grid"].dtype == np.int32


def test_element_spec_is_the_sources_plus_the_signal_with_static_shapes():
    source = _static_spec(lambda: _dense_features(1))
    flagged = _static_spec(lambda: append_stopping_signals(_dense_features(1)))
    assert flagged == {**source, SIGNAL: tf.TensorSpec([BATCH], tf.bool)}


def test_tail_is_endless():
    def count_padding():
        dataset = append_stopping_signals(_dense_features(3)).take(5000)
        return dataset.reduce(np.int64(0), lambda total, e: total + tf.cast(e[SIGNAL][0], tf.int64))

    with tf.Graph().as_default():
        padding_count = count_padding()
        with tf.compat.v1.Session() as sess:
            assert sess.run(padding_count) == 5000 - 3


# -- sparse and ragged -----------------------------------------------------------------------------


@pytest.mark.parametrize("iterator", ITERATORS)
def test_sparse_features_pass_unchanged_then_pad_empty(iterator):
    elements = _evaluate(lambda: append_stopping_signals(_sparse_features(2)), 4, iterator)
    plain = _evaluate(lambda: _sparse_features(2), 2, iterator)
    for flagged, original in zip(elements, plain):
        np.testing.assert_array_equal(flagged["tags"].indices, original["tags"].indices)
        np.testing.assert_array_equal(flagged["tags"].values, original["tags"].values)
        np.testing.assert_array_equal(flagged["tags"].dense_shape, [BATCH, 5])
    assert len(plain[1]["tags"].values) > 0  # the source really has entries
    for padding in elements[2:]:
        assert padding["tags"].indices.shape == (0, 2)
        assert padding["tags"].values.shape == (0,)
        np.testing.assert_array_equal(padding["tags"].dense_shape, [BATCH, 5])
        np.testing.assert_array_equal(padding[SIGNAL], [True] * BATCH)


def test_sparse_feature_with_unknown_width_pads_with_width_zero():
    def make():
        serialized = [
            tf.train.Example(
                features=tf.train.Features(
                    feature={"tags": tf.train.Feature(int64_list=tf.train.Int64List(value=[i] * i))}
                )
            ).SerializeToString()
            for i in range(2 * BATCH)
        ]
        dataset = tf.data.Dataset.from_tensor_slices(serialized).batch(BATCH, drop_remainder=True)
        dataset = dataset.map(
            lambda s: tf.io.parse_example(s, {"tags": tf.io.VarLenFeature(tf.int64)})
        )
        # parse_example's sparse outputs have no static batch dim: batch_size supplies it.
        return append_stopping_signals(dataset, batch_size=BATCH)

    assert _static_spec(make)["tags"] == tf.SparseTensorSpec([BATCH, None], tf.int64)
    elements = _evaluate(make, 3)
    np.testing.assert_array_equal(elements[1]["tags"].dense_shape, [BATCH, 2 * BATCH - 1])
    assert elements[2]["tags"].values.size == 0
    np.testing.assert_array_equal(elements[2]["tags"].dense_shape, [BATCH, 0])


def test_ragged_features_pass_unchanged_then_pad_empty_rows():
    def make():
        dataset = _ids(2).map(
            lambda ids: {
                "id": ids,
                "hist": tf.RaggedTensor.from_row_lengths(
                    tf.boolean_mask(ids, tf.equal(ids % 2, 1)), ids % 2
                ),
            }
        )
        return append_stopping_signals(dataset)

    spec = _static_spec(make)["hist"]
    assert spec == tf.RaggedTensorSpec([BATCH, None], tf.int64, 1, tf.int64)
    elements = _evaluate(make, 3)
    assert elements[1]["hist"].to_list() == [[], [5], [], [7]]
    assert elements[2]["hist"].to_list() == [[]] * BATCH


# -- labels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels_kind", ["tensor", "dict"])
def test_labels_pass_unchanged_then_pad_with_zeros(labels_kind):
    def make():
        def split(ids):
            label = tf.cast(ids, tf.float32) * 10.0
            labels = label if labels_kind == "tensor" else {"ctr": label, "cvr": ids}
            return {"id": ids}, labels

        return append_stopping_signals(_ids(2).map(split))

    elements = _evaluate(make, 3)
    assert all(isinstance(e, tuple) and len(e) == 2 for e in elements)
    (_, real_labels), _, (padding_features, padding_labels) = elements
    if labels_kind == "tensor":
        np.testing.assert_array_equal(real_labels, [0.0, 10.0, 20.0, 30.0])
        np.testing.assert_array_equal(padding_labels, np.zeros([BATCH], np.float32))
    else:
        np.testing.assert_array_equal(real_labels["cvr"], [0, 1, 2, 3])
        assert set(padding_labels) == {"ctr", "cvr"}
        assert not padding_labels["ctr"].any() and not padding_labels["cvr"].any()
    assert SIGNAL not in (padding_labels if labels_kind == "dict" else {})
    np.testing.assert_array_equal(padding_features[SIGNAL], [True] * BATCH)


# -- the source is read once -----------------------------------------------------------------------


class _CountingSource:
    """A generator source counting how many batches it yielded (in the session's process)."""

    def __init__(self, num_batches):
        self.num_batches = num_batches
        self.yields = 0

    def __call__(self):
        for i in range(self.num_batches):
            self.yields += 1
            yield np.arange(i * BATCH, (i + 1) * BATCH, dtype=np.int64)

    def dataset(self, batch_dim=BATCH):
        spec = tf.TensorSpec([batch_dim], tf.int64)
        return tf.data.Dataset.from_generator(self, output_signature=spec).map(
            lambda ids: {"id": ids}
        )


@pytest.mark.parametrize("iterator", ITERATORS)
def test_source_is_read_exactly_once_however_much_padding_is_read(iterator):
    source = _CountingSource(3)
    elements = _evaluate(lambda: append_stopping_signals(source.dataset()), 50, iterator)
    assert source.yields == 3
    assert [bool(e[SIGNAL][0]) for e in elements] == [False] * 3 + [True] * 47
    np.testing.assert_array_equal(elements[2]["id"], [8, 9, 10, 11])


def test_padding_batch_builds_the_tail_element_from_the_spec_alone():
    with tf.Graph().as_default():
        spec = _sparse_features(1).element_spec
        padding = padding_batch(spec)
        with tf.compat.v1.Session() as sess:
            value = sess.run(padding)
    assert set(value) == {"id", "tags", SIGNAL}
    assert value["tags"].values.size == 0 and not value["id"].any() and value[SIGNAL].all()


# -- batch_size for specs without a static batch dim -----------------------------------------------


def test_batch_size_gives_an_unknown_batch_dim_its_static_value():
    source = _CountingSource(2)

    def make():
        dataset = source.dataset(batch_dim=None).map(
            lambda f: {
                **f,
                "tags": tf.sparse.from_dense(tf.reshape(f["id"], [-1, 1])),
                "hist": tf.RaggedTensor.from_row_lengths(f["id"], tf.ones_like(f["id"])),
            }
        )
        return append_stopping_signals(dataset, batch_size=BATCH)

    spec = _static_spec(make)
    assert spec["id"].shape == [BATCH]
    assert spec["tags"].shape == [BATCH, 1]
    assert spec["hist"].shape.as_list() == [BATCH, None]
    assert spec[SIGNAL].shape == [BATCH]
    elements = _evaluate(make, 3)
    np.testing.assert_array_equal(elements[1]["id"], [4, 5, 6, 7])
    np.testing.assert_array_equal(elements[1]["tags"].values, [4, 5, 6, 7])
    assert elements[1]["hist"].to_list() == [[4], [5], [6], [7]]
    assert elements[2][SIGNAL].all() and elements[2]["hist"].to_list() == [[]] * BATCH


@pytest.mark.parametrize("component", ["dense", "sparse"])
def test_batch_size_rejects_a_short_real_batch_at_run_time(component):
    def make():
        ids = tf.data.Dataset.range(6).batch(BATCH)  # last batch: 2 ids
        if component == "dense":
            features = ids.map(lambda x: {"id": x})
        else:
            features = ids.map(lambda x: {"tags": tf.sparse.from_dense(tf.reshape(x, [-1, 1]))})
        return append_stopping_signals(features, batch_size=BATCH)

    with pytest.raises(tf.errors.InvalidArgumentError):
        _evaluate(make, 2)


# -- bad inputs ------------------------------------------------------------------------------------


def test_non_dataset_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"dataset=\[1, 2\] \(type list\)"):
        append_stopping_signals([1, 2])


def test_features_that_are_not_a_dict_are_a_type_error():
    with tf.Graph().as_default(), pytest.raises(TypeError, match="features must be a dict"):
        append_stopping_signals(_ids(1))


def test_tuple_of_three_is_a_type_error():
    with tf.Graph().as_default(), pytest.raises(TypeError, match="tuple of 3 components"):
        append_stopping_signals(_ids(1).map(lambda x: ({"id": x}, x, x)))


def test_signal_already_present_is_a_value_error():
    with tf.Graph().as_default(), pytest.raises(ValueError, match="already hold"):
        append_stopping_signals(append_stopping_signals(_dense_features(1)))


def test_unknown_batch_dim_without_batch_size_names_the_component_and_shape():
    with tf.Graph().as_default():
        dataset = tf.data.Dataset.range(8).batch(BATCH).map(lambda x: ({"id": x}, {"ctr": x}))
        with pytest.raises(ValueError, match=r"features\['id'\] has shape \[None\]"):
            append_stopping_signals(dataset)
        with pytest.raises(ValueError, match=r"labels\['ctr'\] has shape \[None\]"):
            append_stopping_signals(
                dataset.map(lambda f, labels: ({"id": tf.zeros([BATCH])}, labels))
            )


def test_batch_dims_that_disagree_are_a_value_error():
    with tf.Graph().as_default():
        dataset = _ids(1).map(lambda x: {"id": x, "pair": tf.zeros([2, 3])})
        with pytest.raises(ValueError, match=r"features\['id'\] has 4, features\['pair'\] has 2"):
            append_stopping_signals(dataset)


def test_batch_size_that_contradicts_the_static_batch_dim_is_a_value_error():
    with tf.Graph().as_default(), pytest.raises(ValueError, match="batch_size=8"):
        append_stopping_signals(_dense_features(1), batch_size=8)


@pytest.mark.parametrize(
    "batch_size, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_invalid_batch_size_names_the_value(batch_size, error):
    with tf.Graph().as_default(), pytest.raises(error, match=f"batch_size={batch_size!r}"):
        append_stopping_signals(_dense_features(1), batch_size=batch_size)


def test_dense_component_with_unknown_inner_dim_is_a_value_error():
    with tf.Graph().as_default():
        dataset = tf.data.Dataset.from_generator(
            lambda: iter([]), output_signature={"seq": tf.TensorSpec([BATCH, None], tf.int32)}
        )
        with pytest.raises(ValueError, match=r"features\['seq'\] has shape \[4, None\]"):
            append_stopping_signals(dataset)


def test_component_of_unknown_rank_is_a_value_error():
    with tf.Graph().as_default():
        dataset = tf.data.Dataset.from_generator(
            lambda: iter([]), output_signature={"x": tf.TensorSpec(None, tf.int32)}
        )
        with pytest.raises(ValueError, match=r"features\['x'\] has unknown rank"):
            stopping_signals.append_stopping_signals(dataset, batch_size=BATCH)


def test_component_that_is_not_a_tensor_is_a_type_error_naming_it():
    with tf.Graph().as_default():
        dataset = _ids(1).map(lambda x: {"id": x, "maybe": tf.experimental.Optional.from_value(x)})
        with pytest.raises(TypeError, match=r"features\['maybe'\] is OptionalSpec"):
            append_stopping_signals(dataset)


def test_a_graph_without_recorded_rule_has_the_original_stop_rule():
    with tf.Graph().as_default():
        assert signal.stop_rule_of_graph() is signal.StopRule.ANY_REPLICA_PADDING


def test_the_recorded_stop_rule_is_found_from_a_function_body():
    with tf.Graph().as_default() as graph:
        signal.record_stop_rule(signal.StopRule.ALL_REPLICAS_PADDING)

        @tf.function
        def step():
            assert signal.stop_rule_of_graph() is signal.StopRule.ALL_REPLICAS_PADDING
            return tf.constant(0)

        step()
        assert signal.stop_rule_of_graph(graph) is signal.StopRule.ALL_REPLICAS_PADDING


def test_two_different_recorded_stop_rules_are_a_value_error():
    with tf.Graph().as_default():
        signal.record_stop_rule(signal.StopRule.ALL_REPLICAS_PADDING)
        signal.record_stop_rule(signal.StopRule.ANY_REPLICA_PADDING)
        with pytest.raises(ValueError, match="different stop rules"):
            signal.stop_rule_of_graph()


def test_recording_a_non_rule_is_a_type_error():
    with tf.Graph().as_default(), pytest.raises(TypeError, match="stop_rule='all'"):
        signal.record_stop_rule("all")
