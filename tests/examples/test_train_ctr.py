"""The runnable CTR example: end to end on CPU, and its TPU graph on a simulated TPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import simulated_tpu, testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.examples import ctr_model, train_ctr

pytestmark = pytest.mark.timeout(180)

SMALL = ["--num_examples", "2560", "--batch_size", "64", "--iterations_per_loop", "4"]


def test_example_trains_the_stream_to_its_end_and_reports_it(tmp_path, capsys):
    report = train_ctr.main([*SMALL, "--model_dir", str(tmp_path)])

    # 40 real batches fill loops 1-10 exactly, so the first padding batch opens
    # loop 11 and that whole loop (4 steps) is padding: the worst case.
    assert (report.steps, report.real_steps, report.padding_steps) == (44, 40, 4)
    assert report.examples == 2560
    assert report.final_checkpoint == tf.train.latest_checkpoint(str(tmp_path))
    assert report.final_checkpoint.endswith("model.ckpt-44")
    assert report.tensorboard_logdir == os.path.join(str(tmp_path), "host_call")
    assert 0.5 < report.last_auc <= 1.0
    out = capsys.readouterr().out
    assert "Training stopped at the end of the input stream." in out
    assert "steps trained:     44 (40 on real batches, 4 on padding)" in out
    assert f"tensorboard --logdir {report.tensorboard_logdir}" in out


def test_padding_steps_train_no_weights(tmp_path):
    """The masked loss leaves every weight as the last real step left it."""
    model_dir = str(tmp_path)
    # 42 batches: the stream ends 2 steps into loop 11, then 2 padding steps.
    report = train_ctr.main(
        ["--num_examples", "2688", "--batch_size", "64", "--iterations_per_loop", "4"]
        + ["--model_dir", model_dir, "--seed", "3"]
    )
    assert (report.real_steps, report.padding_steps) == (42, 2)
    final = tf.train.load_checkpoint(report.final_checkpoint)

    reference_dir = str(tmp_path / "reference")
    # Same stream, stopped by steps exactly after the last real batch.
    testing.train(
        ctr_model.model_fn,
        ctr_model.input_fn,
        model_dir=reference_dir,
        iterations_per_loop=4,
        steps=42,
        params={
            "model_dir": reference_dir,
            "num_examples": 2688,
            "seed": 3,
            "on_tpu": False,
            "batch_size": 64,
        },
    )
    reference = tf.train.load_checkpoint(tf.train.latest_checkpoint(reference_dir))
    for name in ("user_embedding", "item_embedding", "hidden/kernel", "logits/bias"):
        assert (final.get_tensor(name) == reference.get_tensor(name)).all(), name


def _stream(num_examples: int, seed: int, batch_size: int) -> dict:
    """All batches of `synthetic_click_log`, evaluated in a graph (both TF behaviours)."""
    with tf.Graph().as_default():
        dataset = ctr_model.synthetic_click_log(num_examples, seed).batch(batch_size)
        batch = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        batches = []
        with tf.compat.v1.Session() as sess:
            try:
                while True:
                    batches.append(sess.run(batch))
            except tf.errors.OutOfRangeError:
                pass
    features = {k: np.concatenate([b[0][k] for b in batches]) for k in batches[0][0]}
    return {**features, "label": np.concatenate([b[1] for b in batches])}


def test_stream_is_a_function_of_the_seed_and_the_example_index():
    stream = _stream(2500, seed=7, batch_size=64)
    assert len(stream["label"]) == 2500
    # Same seed: the same examples, whatever the batching, and a shorter
    # stream is a prefix of a longer one (3 blocks of 1024, then 452).
    again = _stream(2500, seed=7, batch_size=1000)
    prefix = _stream(1100, seed=7, batch_size=100)
    for name, values in stream.items():
        np.testing.assert_array_equal(values, again[name], err_msg=name)
        np.testing.assert_array_equal(values[:1100], prefix[name], err_msg=name)
    other = _stream(2500, seed=8, batch_size=64)
    assert (other["user_id"] != stream["user_id"]).mean() > 0.9
    np.testing.assert_array_equal(stream["req_time"], ctr_model.FIRST_REQ_TIME + np.arange(2500))
    assert stream["user_id"].min() >= 0 and stream["user_id"].max() < ctr_model.NUM_USERS
    assert stream["item_id"].min() >= 0 and stream["item_id"].max() < ctr_model.NUM_ITEMS
    np.testing.assert_array_equal(
        stream["uid_bucket"], stream["user_id"] % ctr_model.NUM_UID_BUCKETS
    )


def test_stream_carries_a_learnable_signal():
    """Clicks depend on the user: per-user click rates spread far beyond chance."""
    stream = _stream(100_000, seed=0, batch_size=25_000)
    assert 0.2 < stream["label"].mean() < 0.6
    users = np.bincount(stream["user_id"], minlength=ctr_model.NUM_USERS)

    def spread(labels: np.ndarray) -> float:
        return float((np.bincount(stream["user_id"], labels, ctr_model.NUM_USERS) / users).std())

    # Shuffled labels keep only the binomial noise (about 0.05 at 100 per user).
    chance = spread(np.random.RandomState(0).permutation(stream["label"]))
    assert spread(stream["label"]) > 2 * chance


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_stream_rejects_a_bad_size(bad):
    with pytest.raises(ValueError, match=f"num_examples={bad!r}"):
        ctr_model.synthetic_click_log(bad)


def test_input_graph_does_not_grow_with_the_stream():
    """The data is generated in-graph: no example is embedded as a constant."""

    def graph_bytes(num_examples: int) -> int:
        with tf.Graph().as_default() as graph:
            ctr_model.input_fn({"num_examples": num_examples, "batch_size": 64, "seed": 0})
            return graph.as_graph_def().ByteSize()

    small = graph_bytes(1024)
    assert abs(graph_bytes(10**9) - small) < 32
    assert small < 64 * 1024


def test_default_run_writes_a_small_model_dir(tmp_path):
    """The quick start's run (262144 examples) leaves under 8 MB in its model_dir."""
    report = train_ctr.main(["--model_dir", str(tmp_path)])
    assert report.examples == 262_144
    total = sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file())
    assert total < 8 * 2**20, total
    assert report.last_auc > 0.75


def test_example_runs_as_a_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "monolith.examples.train_ctr", *SMALL, "--model_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "examples trained:  2560" in proc.stdout
    assert os.path.exists(os.path.join(str(tmp_path), "model.ckpt-44.index"))


@pytest.mark.parametrize("bad", [["--num_examples", "0"], ["--num_examples", "10"]])
def test_example_rejects_bad_sizes(bad, capsys):
    with pytest.raises(SystemExit):
        train_ctr.parse_args(bad)
    assert "--num_examples" in capsys.readouterr().err


def test_tpu_needs_a_model_dir(capsys):
    with pytest.raises(SystemExit):
        train_ctr.parse_args(["--tpu", "my-tpu"])
    assert "--model_dir is required with --tpu" in capsys.readouterr().err


@pytest.mark.parametrize("num_hosts, cores_per_host", [(1, 8), (2, 4)])
def test_tpu_path_builds_the_tpu_graph_with_our_hook(tmp_path, num_hosts, cores_per_host):
    args = train_ctr.parse_args([*SMALL, "--model_dir", str(tmp_path), "--tpu", "sim"])
    config = train_ctr.tpu_run_config(args, master=simulated_tpu.SIMULATED_MASTER)
    config = config.replace(tpu_config=config.tpu_config._replace(tpu_job_name="worker"))
    with simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host):
        built = simulated_tpu.build_tpu_training_graph(
            ctr_model.model_fn,
            ctr_model.input_fn,
            config=config,
            train_batch_size=args.batch_size,
            params=train_ctr._params(args, on_tpu=True),
        )
    assert isinstance(built.feed_hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
    op_types = built.op_types()
    assert {"CrossReplicaSum", "OutfeedEnqueueTuple", "OutfeedDequeueTuple"} <= op_types
    names = [op.name for op in built.graph.get_operations()]
    assert any("host_call" in name or "auc" in name for name in names)
