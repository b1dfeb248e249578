"""The runnable CTR example: end to end on CPU, and its TPU graph on a simulated TPU."""

from __future__ import annotations

import os
import subprocess
import sys

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
