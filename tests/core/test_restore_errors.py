"""A broken model_dir fails in a few lines (`common.model_dir`, `common.restore_errors`).

Real checkpoints written by a Saver, broken the way disks and people break
them (a truncated or missing file, another model's checkpoint), restored by
real sessions: `explain_restore_error` names the file or the variables, and
`testing.train` raises its error from TensorFlow's. Checkpoint restore is
graph code, so the file runs in both TF behaviours.
"""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

from monolith.core import testing
from monolith.core.common.model_dir import (
    ModelDirIsAFileError,
    ModelDirNotWritableError,
    check_model_dir,
)
from monolith.core.common.restore_errors import (
    IncompatibleCheckpointError,
    UnreadableCheckpointError,
    explain_restore_error,
    tf_error_summary,
)
from tests.core._feed_hook_helpers import counting_model_fn, padded_stream_fn

pytestmark = pytest.mark.timeout(120)


def _save(model_dir, steps, shapes=None):
    """Checkpoints of a graph with `shapes` ({name: shape}) at each of `steps`; the graph."""
    shapes = shapes if shapes is not None else {"a": [3], "b": [2, 2]}
    graph = tf.Graph()
    with graph.as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        for name, shape in shapes.items():
            tf.compat.v1.get_variable(name, shape, initializer=tf.compat.v1.ones_initializer())
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for step in steps:
                session.run(global_step.assign(step))
                saver.save(session, os.path.join(str(model_dir), "model.ckpt"), global_step=step)
    return graph


def _restore_error(model_dir, graph):
    """What restoring model_dir's latest checkpoint into `graph` raises."""
    path = tf.train.get_checkpoint_state(str(model_dir)).model_checkpoint_path
    with graph.as_default():
        saver = tf.compat.v1.train.Saver()
        with (
            tf.compat.v1.Session() as session,
            pytest.raises((tf.errors.OpError, ValueError)) as raised,
        ):
            saver.restore(session, path)
    return raised.value


def _path(model_dir, name):
    return os.path.join(str(model_dir), name)


def test_a_truncated_data_file_is_named_with_how_to_resume_from_the_previous_checkpoint(tmp_path):
    graph = _save(tmp_path, [4, 8])
    data = _path(tmp_path, "model.ckpt-8.data-00000-of-00001")
    os.truncate(data, 0)
    error = _restore_error(tmp_path, graph)

    explained = explain_restore_error(error, str(tmp_path), graph)

    assert isinstance(explained, UnreadableCheckpointError)
    assert (explained.path, explained.previous) == (data, _path(tmp_path, "model.ckpt-4"))
    message = str(explained)
    assert len(message.splitlines()) == 2, message
    assert f"its file {data} is truncated or corrupt" in message
    assert f"delete {_path(tmp_path, 'model.ckpt-8')}.*" in message
    assert f"update_checkpoint_state('{tmp_path}', 'model.ckpt-4')" in message


def test_following_the_message_resumes_from_the_previous_checkpoint(tmp_path):
    graph = _save(tmp_path, [4, 8])
    os.truncate(_path(tmp_path, "model.ckpt-8.data-00000-of-00001"), 0)
    for name in os.listdir(tmp_path):
        if name.startswith("model.ckpt-8."):
            os.remove(_path(tmp_path, name))
    tf.compat.v1.train.update_checkpoint_state(str(tmp_path), "model.ckpt-4")
    with graph.as_default(), tf.compat.v1.Session() as session:
        tf.compat.v1.train.Saver().restore(session, tf.train.latest_checkpoint(str(tmp_path)))
        assert session.run(tf.compat.v1.train.get_global_step()) == 4


def test_without_an_earlier_checkpoint_the_message_says_to_start_over(tmp_path):
    graph = _save(tmp_path, [8])
    os.truncate(_path(tmp_path, "model.ckpt-8.data-00000-of-00001"), 0)
    explained = explain_restore_error(_restore_error(tmp_path, graph), str(tmp_path), graph)
    assert explained.previous is None
    assert "no earlier checkpoint" in str(explained) and "new model_dir" in str(explained)


@pytest.mark.parametrize("suffix", [".index", ".data-00000-of-00001"])
def test_a_missing_file_of_the_checkpoint_is_named(tmp_path, suffix):
    graph = _save(tmp_path, [4, 8])
    os.remove(_path(tmp_path, f"model.ckpt-8{suffix}"))
    explained = explain_restore_error(_restore_error(tmp_path, graph), str(tmp_path), graph)
    assert isinstance(explained, UnreadableCheckpointError)
    expected = _path(
        tmp_path, "model.ckpt-8.index" if suffix == ".index" else "model.ckpt-8.data-*"
    )
    assert explained.path == expected
    assert f"its file {expected} is missing" in str(explained)


def test_a_truncated_index_file_is_named(tmp_path):
    graph = _save(tmp_path, [8])
    index = _path(tmp_path, "model.ckpt-8.index")
    os.truncate(index, 10)
    explained = explain_restore_error(_restore_error(tmp_path, graph), str(tmp_path), graph)
    assert isinstance(explained, UnreadableCheckpointError)
    assert explained.path == index


def test_another_models_checkpoint_names_the_missing_and_reshaped_variables(tmp_path):
    _save(tmp_path, [8], shapes={"a": [5], "other": [1]})
    graph = _save(tmp_path / "this_model", [1], shapes={"a": [3], "b": [2, 2]})
    error = _restore_error(tmp_path, graph)

    explained = explain_restore_error(error, str(tmp_path), graph)

    assert isinstance(explained, IncompatibleCheckpointError)
    assert explained.missing == ("b",)
    assert explained.mismatched == (("a", [5], [3]),)
    message = str(explained)
    assert len(message.splitlines()) == 4, message
    assert f"Cannot restore the checkpoint {_path(tmp_path, 'model.ckpt-8')}" in message
    assert "Missing from it (1): b" in message
    assert "Stored with another shape (1): a [5] (this model: [3])" in message


def test_without_the_graph_the_missing_variable_comes_from_tfs_message(tmp_path):
    _save(tmp_path, [8], shapes={"a": [3]})
    graph = _save(tmp_path / "this_model", [1], shapes={"a": [3], "b": [2, 2]})
    explained = explain_restore_error(_restore_error(tmp_path, graph), str(tmp_path))
    assert isinstance(explained, IncompatibleCheckpointError)
    assert explained.missing == ("b",)


def test_an_intact_checkpoint_or_another_error_is_left_to_tf(tmp_path):
    graph = _save(tmp_path, [8])
    unrelated = tf.errors.OutOfRangeError(None, None, "an input ran out")
    assert explain_restore_error(unrelated, str(tmp_path), graph) is None
    assert explain_restore_error(RuntimeError("not TF's"), str(tmp_path), graph) is None
    assert explain_restore_error(unrelated, str(tmp_path / "empty"), graph) is None


def test_tf_error_summary_is_the_failing_ops_own_message():
    error = tf.errors.OutOfRangeError(
        None,
        None,
        "Graph execution error:\n\nDetected at node 'save/RestoreV2' defined at:\n  File x\n"
        "Node: 'save/RestoreV2'\nRead less bytes than requested\n\t [[{{node save/RestoreV2}}]]",
    )
    assert tf_error_summary(error) == "Read less bytes than requested"
    assert tf_error_summary(ValueError("one line\nmore")) == "one line"


# ------------------------------------------------------------------ through testing.train


def _train(model_dir):
    return testing.train(
        counting_model_fn, padded_stream_fn(4), model_dir=str(model_dir), iterations_per_loop=2
    )


def test_train_on_a_truncated_checkpoint_raises_a_short_error_from_tfs(tmp_path):
    _train(tmp_path)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    os.truncate(f"{latest}.data-00000-of-00001", 0)
    with pytest.raises(UnreadableCheckpointError) as raised:
        _train(tmp_path)
    assert raised.value.path == f"{latest}.data-00000-of-00001"
    assert isinstance(raised.value.__cause__, (tf.errors.OutOfRangeError, tf.errors.DataLossError))


def test_train_on_another_models_checkpoint_names_the_missing_variables(tmp_path):
    _save(tmp_path, [8], shapes={"w": []})
    with pytest.raises(IncompatibleCheckpointError) as raised:
        _train(tmp_path)
    assert set(raised.value.missing) == {"id_sum", "padding_steps", "real_examples"}
    assert isinstance(raised.value.__cause__, tf.errors.NotFoundError)


def test_train_on_a_model_dir_that_is_a_file_names_it(tmp_path):
    path = tmp_path / "model"
    path.write_text("")
    with pytest.raises(ModelDirIsAFileError, match=f"model_dir='{path}' is a file"):
        _train(path)
    assert path.read_text() == ""


def test_a_model_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelDirIsAFileError, match="a directory on its path is a file"):
        check_model_dir(str(tmp_path / "file" / "model"))


def test_train_on_a_model_dir_that_is_not_writable_names_it(unwritable_dir):
    with pytest.raises(ModelDirNotWritableError, match=f"model_dir='{unwritable_dir}' is not"):
        _train(unwritable_dir)
