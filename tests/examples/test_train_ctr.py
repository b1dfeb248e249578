"""The runnable CTR example: end to end on CPU, and its TPU graph on a simulated TPU."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import preemption, simulated_tpu, testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.simulated_tpu import device_boundary
from monolith.examples import ctr_model, train_ctr
from tests.core._feed_hook_helpers import counting_model_fn, padded_stream_fn

pytestmark = pytest.mark.timeout(180)

SMALL = ["--num_examples", "2560", "--batch_size", "64", "--iterations_per_loop", "4"]


def _variables(checkpoint: str) -> dict:
    """Every variable of `checkpoint`: weights, optimizer slots, beta powers, counters."""
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _assert_same_variables(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-6, err_msg=name)


def _train_exactly(
    model_dir: str, num_examples: int, steps: int, seed: int = 0, batch_size: int = 64
) -> dict:
    """Trains the first `steps` batches of the stream, stopped by a step limit (no padding)."""
    testing.train(
        ctr_model.model_fn,
        ctr_model.input_fn,
        model_dir=model_dir,
        iterations_per_loop=4,
        steps=steps,
        params={"model_dir": model_dir, "num_examples": num_examples, "seed": seed},
        train_batch_size=batch_size,
    )
    return _variables(tf.train.latest_checkpoint(model_dir))


def _summaries(logdir: str, tag: str) -> list:
    """`(step, value)` of every `tag` summary in `logdir`'s event files."""
    return [
        (event.step, float(tf.make_ndarray(value.tensor)))
        for path in sorted(os.listdir(logdir))
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, path))
        for value in event.summary.value
        if value.tag == tag
    ]


def test_example_trains_the_stream_to_its_end_and_reports_it(tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING)
    report = train_ctr.main([*SMALL, "--model_dir", str(tmp_path)])

    assert report.stop_reason is preemption.StopReason.END_OF_STREAM
    assert train_ctr.exit_code(report) == 0
    assert train_ctr.exit_code(dataclasses.replace(report, stop_reason=None)) == 1
    # 40 real batches fill loops 1-10 exactly, so the first padding batch opens
    # loop 11 and that whole loop (4 steps) is padding: the worst case. The
    # global step counts the real steps only.
    assert (report.start_step, report.global_step, report.steps) == (0, 40, 40)
    assert report.padding_steps == 4
    assert report.examples == report.total_examples == 2560
    assert report.final_checkpoint == tf.train.latest_checkpoint(str(tmp_path))
    assert report.final_checkpoint.endswith("model.ckpt-40")
    assert report.tensorboard_logdir == os.path.join(str(tmp_path), "host_call")
    assert 0.5 < report.last_auc <= 1.0
    # One auc summary per step, under that step's number: the 40 real steps
    # are steps 0-39, each logged once.
    summaries = _summaries(report.tensorboard_logdir, "auc")
    assert sorted(step for step, _ in summaries) == list(range(44))
    auc = dict(summaries)
    # The 4 padding steps (logged as 40-43) add no example to the streaming
    # AUC: the stopping_signals flag keeps padding out.
    assert [auc[step] for step in range(40, 44)] == [auc[39]] * 4
    # The host call is built before the train op, so its global-step read is
    # ordered before the optimizer's increment (else it warns of a race).
    assert "No op writes the global step" not in caplog.text
    out = capsys.readouterr().out
    assert "Training stopped at the end of the input stream." in out
    assert "steps trained:     40 (global step 40)" in out
    assert "padding steps:     4 (they trained nothing: skip_padding_steps)" in out
    assert "examples trained:  2560 (2560 in the model)" in out
    assert "resumed" not in out
    assert f"tensorboard --logdir {report.tensorboard_logdir}" in out


def test_padding_steps_change_no_variable(tmp_path):
    """Weights, Adam and Adagrad slots, beta powers, counters: as after the real steps alone."""
    # 42 batches: the stream ends 2 steps into loop 11, then 2 padding steps.
    report = train_ctr.main(
        ["--num_examples", "2688", "--batch_size", "64", "--iterations_per_loop", "4"]
        + ["--model_dir", str(tmp_path / "run"), "--seed", "3"]
    )
    assert (report.steps, report.padding_steps) == (42, 2)
    final = _variables(report.final_checkpoint)
    assert {"hidden/kernel/Adam", "user_embedding/Adagrad"} <= set(final)
    assert any(name.endswith("beta1_power") for name in final)
    assert final["global_step"] == 42

    reference = _train_exactly(str(tmp_path / "reference"), 2688, steps=42, seed=3)
    _assert_same_variables(final, reference)


def test_a_second_run_on_a_finished_model_dir_trains_nothing_more(tmp_path, capsys):
    model_dir = str(tmp_path)
    train_ctr.main([*SMALL, "--model_dir", model_dir])
    finished = _variables(tf.train.latest_checkpoint(model_dir))
    capsys.readouterr()

    report = train_ctr.main([*SMALL, "--model_dir", model_dir])

    assert report.stop_reason is preemption.StopReason.END_OF_STREAM
    assert (report.start_step, report.global_step, report.steps) == (40, 40, 0)
    # skip_trained_batches skipped all 40 batches: one loop of padding ran.
    assert report.padding_steps == 4
    assert (report.examples, report.total_examples) == (0, 2560)
    _assert_same_variables(_variables(report.final_checkpoint), finished)
    assert report.last_auc is None
    out = capsys.readouterr().out
    assert "last AUC:          none (this run trained no example)" in out
    assert "resumed at step:   40 (its batches skipped, not trained again)" in out
    assert "steps trained:     0 (global step 40)" in out
    assert "examples trained:  0 (2560 in the model)" in out


def test_save_checkpoints_steps_writes_checkpoints_during_training(tmp_path):
    model_dir = str(tmp_path)
    report = train_ctr.main([*SMALL, "--model_dir", model_dir, "--save_checkpoints_steps", "8"])
    state = tf.train.get_checkpoint_state(model_dir)
    steps = sorted(int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths)
    # Every 8 steps (at loop boundaries of 4), kept 5 deep by the Saver.
    assert steps == [8, 16, 24, 32, 40]
    assert report.final_checkpoint.endswith("model.ckpt-40")


POD = ["--num_hosts", "2", "--replicas_per_host", "2"]


def test_a_pod_trains_the_one_replica_runs_global_batches_and_resumes_per_host(tmp_path, capsys):
    """2 hosts x 2 replicas, the same global batch: the 1x1 model, also across a restart."""
    model_dir = str(tmp_path / "pod")
    flags = ["--batch_size", "64", "--iterations_per_loop", "4", *POD, "--model_dir", model_dir]
    first = train_ctr.main(["--num_examples", "640", *flags])
    assert first.stop_reason is preemption.StopReason.END_OF_STREAM
    assert (first.global_step, first.padding_steps, first.examples) == (10, 2, 640)
    # 10 real steps of 2 batches per host (one per replica), then 2 padding steps.
    assert first.host_batches == (train_ctr.HostBatches(20, 0, 4),) * 2
    out = capsys.readouterr().out
    assert "emulated pod of 2 hosts x 2 replicas, 16 per replica" in out
    assert "host 0:            20 batches trained, 0 left untrained; 4 padding batches fed" in out
    assert "host 1:            20 batches trained, 0 left untrained; 4 padding batches fed" in out
    assert "NOT TRAINED" not in out

    # The same stream, 6 global batches longer: each host skips its 10 * 2 trained batches.
    resumed = train_ctr.main(["--num_examples", "1024", *flags])
    assert (resumed.start_step, resumed.steps, resumed.examples) == (10, 6, 384)
    assert resumed.host_batches == (train_ctr.HostBatches(12, 0, 4),) * 2
    reference = _train_exactly(str(tmp_path / "one_replica"), 1024, steps=16)
    _assert_same_variables(_variables(resumed.final_checkpoint), reference)


# Host 0 reads 40 batches of 16, host 1 25: host 1's shard ends in step 13.
UNEVEN = [*POD, "--batch_size", "64", "--iterations_per_loop", "4", "--host_shard_sizes", "40,25"]


def test_uneven_shards_under_the_default_rule_stop_with_the_shortest_and_report_the_rest(
    tmp_path, capsys
):
    report = train_ctr.main([*UNEVEN, "--model_dir", str(tmp_path)])
    assert report.stop_reason is preemption.StopReason.END_OF_STREAM
    # The 12 fully real steps: 24 batches of each host; step 13 and the rest of host 0's shard
    # are not trained (the loop of steps 13-16 fed host 1's last batch and 7 padding ones).
    assert (report.global_step, report.examples) == (12, 48 * 16)
    assert report.host_batches == (
        train_ctr.HostBatches(24, 16, 0),
        train_ctr.HostBatches(24, 1, 7),
    )
    out = capsys.readouterr().out
    assert "host shards of 40,25 batches, stop rule any" in out
    assert "host 0:            24 batches trained, 16 left untrained; 0 padding batches fed" in out
    assert "NOT TRAINED:       17 real batches (stop rule any" in out
    assert "--stop_rule all trains them" in out


def test_uneven_shards_under_the_all_rule_train_every_batch(tmp_path, capsys):
    report = train_ctr.main([*UNEVEN, "--stop_rule", "all", "--model_dir", str(tmp_path)])
    assert report.stop_reason is preemption.StopReason.END_OF_STREAM
    # Host 0's 40 batches take 20 steps; host 1's replicas train their last batches in
    # steps 12-13 and pad from then on. Then one loop of padding only (steps 21-24).
    assert (report.global_step, report.examples, report.total_examples) == (20, 1040, 1040)
    assert report.host_batches == (
        train_ctr.HostBatches(40, 0, 8),
        train_ctr.HostBatches(25, 0, 23),
    )
    out = capsys.readouterr().out
    assert "host shards of 40,25 batches, stop rule all" in out
    assert "NOT TRAINED" not in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_hosts", "2", "--host_shard_sizes", "40"], "gives 1 shard(s) for --num_hosts=2"),
        (["--host_shard_sizes", "4", "--num_examples", "64"], "give one of them"),
        (["--host_shard_sizes", "4,x"], "must be positive ints separated by commas"),
        (["--host_shard_sizes", "0"], "must be positive ints"),
        (["--stop_rule", "some"], "invalid choice: 'some'"),
        (["--num_hosts", "2", "--batch_size", "63"], "--batch_size=63 (global) must be divisible"),
        (["--replicas_per_host", "0"], "--replicas_per_host=0 must be positive"),
        (["--num_hosts", "2", "--tpu", "my-tpu", "--model_dir", "gs://b/m"], "emulated pod on CPU"),
    ],
)
def test_example_rejects_a_bad_pod(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_ctr.parse_args(flags)
    assert message in capsys.readouterr().err


# `python -m monolith.examples.train_ctr` after tf.compat.v1.disable_v2_behavior(),
# so a subprocess writes checkpoints the v1-behaviour test process can restore.
_RUN_MODULE_V1 = (
    "import runpy, tensorflow as tf; tf.compat.v1.disable_v2_behavior(); "
    "runpy.run_module('monolith.examples.train_ctr', run_name='__main__', alter_sys=True)"
)


def _example_command(tf_behavior: str) -> list:
    """The command line of the example, in the test session's TF behaviour."""
    if tf_behavior == "v1":
        return [sys.executable, "-u", "-c", _RUN_MODULE_V1]
    return [sys.executable, "-u", "-m", "monolith.examples.train_ctr"]


def test_two_sigterms_stop_with_a_checkpoint_exit_42_and_the_rerun_resumes(tmp_path, tf_behavior):
    """A preempted run exits with the restart code; the rerun trains each batch once.

    The launcher sends SIGTERM twice, 0.1 s apart: the second neither cuts the
    final checkpoint short nor changes the exit code.
    """
    model_dir = str(tmp_path / "preempted")
    # A stream far longer than the test: only SIGTERM ends this run.
    command = _example_command(tf_behavior)
    command += ["--num_examples", "6400000", "--batch_size", "64", "--iterations_per_loop", "4"]
    proc = subprocess.Popen(
        [*command, "--model_dir", model_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # The first progress line: the feed hook is training.
            lines.append(line)
            if line.startswith("step"):
                break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == preemption.RESTART_EXIT_CODE, err[-3000:]
    stopped = re.search(r"Training stopped by SIGTERM at step (\d+); checkpoint written", out)
    assert stopped, out
    trained = int(stopped.group(1))
    assert trained > 0
    counters = _variables(tf.train.latest_checkpoint(model_dir))
    assert counters["global_step"] == trained
    assert counters[ctr_model.EXAMPLES_TRAINED] == 64 * trained

    # Resume on the same (deterministic) stream, cut 12 batches further.
    num_examples = 64 * (trained + 12)
    report = train_ctr.main(
        ["--num_examples", str(num_examples), "--batch_size", "64", "--iterations_per_loop", "4"]
        + ["--model_dir", model_dir]
    )
    assert report.stop_reason is preemption.StopReason.END_OF_STREAM
    assert (report.start_step, report.steps, report.examples) == (trained, 12, 64 * 12)
    assert report.total_examples == num_examples
    # Exactly once, in order: the same model as one uninterrupted run.
    reference = _train_exactly(str(tmp_path / "reference"), num_examples, steps=trained + 12)
    _assert_same_variables(_variables(report.final_checkpoint), reference)


def test_exit_code_is_42_after_any_sigterm_unless_the_stream_was_trained_to_its_end():
    report = train_ctr.Report(
        stop_reason=None,
        start_step=0,
        global_step=0,
        steps=0,
        padding_steps=None,
        examples=0,
        total_examples=0,
        final_checkpoint=None,
        tensorboard_logdir="",
        last_auc=None,
    )
    assert train_ctr.exit_code(report) == 1
    assert train_ctr.exit_code(report, sigterm_received=True) == 42
    finished = dataclasses.replace(report, stop_reason=preemption.StopReason.END_OF_STREAM)
    assert train_ctr.exit_code(finished, sigterm_received=True) == 0  # a SIGTERM in the report


# --------------------------------------------------------- restarts that cannot skip or repeat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAM = os.path.join(REPO, "tests", "examples", "example_program.py")


@pytest.fixture
def subprocess_pass(tf_behavior):
    """Tests whose subject does not depend on the TF behaviour run once, in the TF2 pass."""
    if tf_behavior != "v2":
        pytest.skip("independent of the TF behaviour: covered by the TF2 pass")


def _model_files(model_dir: str) -> dict:
    """{name: bytes} of every file in model_dir."""
    found = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), model_dir)] = f.read()
    return found


def test_restarts_on_another_input_are_refused_and_the_original_flags_finish_once(tmp_path, capsys):
    """The issue's three restarts of a half-trained model_dir: exit 2, nothing changed."""
    model_dir = str(tmp_path)
    _train_exactly(model_dir, 2560, steps=5, batch_size=256)  # as a SIGTERM at step 5 leaves it
    before = _model_files(model_dir)
    flags = ["--num_examples", "2560", "--iterations_per_loop", "4", "--model_dir", model_dir]
    expected = {
        "--batch_size 512": ("batch size: 256 -> 512", "1280 of them never trained"),
        "--batch_size 128": (
            "batch size: 256 -> 128",
            "640 trained examples would be trained twice",
        ),
        "--seed 5": ("stream id: 'seed=0' -> 'seed=5'", "stream 'seed=5' without training"),
        "--stop_rule all": (
            "stop rule: ANY_REPLICA_PADDING -> ALL_REPLICAS_PADDING",
            "counts the steps the stop rule trained",
        ),
    }
    for changed, (difference, consequence) in expected.items():
        argv = ["--batch_size", "256", *flags, *changed.split()]  # the last --batch_size wins
        assert train_ctr.run(argv) == train_ctr.REFUSED_EXIT_CODE, changed
        captured = capsys.readouterr()
        assert "step" not in captured.out.replace("steps per loop", "")  # nothing trained
        assert captured.err.startswith(f"error: Cannot resume the checkpoint in {model_dir}")
        assert f"  {difference}\n" in captured.err and consequence in captured.err
        assert len(captured.err.splitlines()) == 4, captured.err
        assert _model_files(model_dir) == before, changed

    assert train_ctr.run(["--batch_size", "256", *flags]) == 0
    counters = _variables(tf.train.latest_checkpoint(model_dir))
    assert counters["global_step"] == 10
    assert counters[ctr_model.EXAMPLES_TRAINED] == 2560  # 5 steps before, 5 now: each once
    assert "resumed at step:   5" in capsys.readouterr().out


def test_the_stream_id_names_the_seed_and_the_host_shards():
    assert ctr_model.stream_id({"seed": 3}) == "seed=3"
    assert ctr_model.stream_id({"seed": 3, "host_shard_sizes": (40, 25)}) == "seed=3 shards=40,25"


def _run_refused(argv, capsys) -> str:
    assert train_ctr.run(argv) == train_ctr.REFUSED_EXIT_CODE
    return capsys.readouterr().err


def test_a_broken_model_dir_exits_2_saying_what_to_do(tmp_path, capsys, subprocess_pass):
    small = [*SMALL, "--model_dir"]
    model_dir = str(tmp_path / "truncated")
    _train_exactly(model_dir, 2560, steps=8)  # checkpoints 0 and 8
    os.truncate(os.path.join(model_dir, "model.ckpt-8.data-00000-of-00001"), 1000)
    err = _run_refused([*small, model_dir], capsys)
    assert len(err.splitlines()) == 3, err
    assert f"its file {model_dir}/model.ckpt-8.data-00000-of-00001 is truncated" in err
    assert "(cause: OutOfRangeError: Read less bytes than requested)" in err
    # Doing what it says resumes from the previous checkpoint, each example once.
    for name in os.listdir(model_dir):
        if name.startswith("model.ckpt-8."):
            os.remove(os.path.join(model_dir, name))
    command = re.search(r'python -c "(.*?)"', err).group(1)
    subprocess.run([sys.executable, "-c", command], check=True, capture_output=True)
    assert train_ctr.run([*small, model_dir]) == 0
    assert _variables(tf.train.latest_checkpoint(model_dir))[ctr_model.EXAMPLES_TRAINED] == 2560

    other = str(tmp_path / "other")
    testing.train(  # another model: the emulator tests' counting model
        counting_model_fn, padded_stream_fn(4), model_dir=other, iterations_per_loop=2
    )
    err = _run_refused([*small, other], capsys)
    assert f"Cannot restore the checkpoint {other}/model.ckpt-" in err
    missing = re.search(r"Missing from it \((\d+)\): (.*)", err)
    assert int(missing.group(1)) > 10 and "examples_trained" in missing.group(2)
    assert "(cause: NotFoundError: Key " in err
    assert len(err.splitlines()) == 4, err

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = _run_refused([*small, str(a_file)], capsys)
    assert (
        err == f"error: model_dir='{a_file}' is a file, not a directory: give a directory "
        "(it is created if missing).\n"
    )


def test_a_model_dir_that_is_not_writable_exits_2_naming_it(
    unwritable_dir, capsys, subprocess_pass
):
    err = _run_refused([*SMALL, "--model_dir", str(unwritable_dir / "model")], capsys)
    assert err.startswith(f"error: model_dir='{unwritable_dir / 'model'}' cannot be created")
    assert len(err.splitlines()) == 1, err


def _start(argv, moments="-"):
    """The example's command line in a new process (TF2 behaviour), through example_program."""
    return subprocess.Popen(
        [sys.executable, "-u", PROGRAM, moments, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        cwd=REPO,
    )


def _sigterm_caught(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler installed (Linux: /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_a_sigterm_while_tensorflow_loads_exits_42_at_once(tmp_path, subprocess_pass):
    model_dir = str(tmp_path / "model")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monolith.examples.train_ctr", *SMALL, "--model_dir", model_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        cwd=REPO,
    )
    try:
        while not _sigterm_caught(proc.pid):  # the module's first lines ran
            assert proc.poll() is None
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == preemption.RESTART_EXIT_CODE, err[-3000:]
    assert out == "SIGTERM before training started: nothing trained; run the same command.\n"
    assert not os.path.exists(model_dir)


def test_sigterms_while_building_the_graph_during_the_report_and_the_exit_give_42(
    tmp_path, subprocess_pass
):
    """Before the feed hook's watcher exists, after it is gone, and while Python shuts down."""
    model_dir = str(tmp_path)
    proc = _start([*SMALL, "--model_dir", model_dir], moments="graph,report,exit")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == preemption.RESTART_EXIT_CODE, err[-3000:]
    # The run started after the SIGTERM: it stopped at its first loop boundary.
    assert "Training stopped by SIGTERM at step 0; checkpoint written" in out
    assert "view with:" in out  # the whole report, despite the second SIGTERM
    assert _variables(tf.train.latest_checkpoint(model_dir))["global_step"] == 0


def test_a_second_process_is_refused_and_a_killed_holder_does_not_block_the_restart(
    tmp_path, subprocess_pass
):
    """Two processes on one model_dir started 1.5 s apart; then kill -9 and restart."""
    model_dir = str(tmp_path)
    flags = ["--batch_size", "64", "--iterations_per_loop", "4", "--model_dir", model_dir]
    flags += ["--save_checkpoints_steps", "8"]
    lock = os.path.join(model_dir, "monolith_training.lock")
    started = time.monotonic()
    first = _start(["--num_examples", "64000000", *flags], moments="slow")
    second = None
    try:
        while not os.path.exists(lock):  # the first one's feed hook has begun
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(max(0.0, started + 1.5 - time.monotonic()))
        second = _start(["--num_examples", "64000000", *flags])
        out, err = second.communicate(timeout=120)
        assert second.returncode == train_ctr.REFUSED_EXIT_CODE, err[-3000:]
        assert first.poll() is None  # still training
        assert not re.search(r"^step ", out, re.M)  # the second trained nothing
        assert err.startswith(
            f"error: model_dir {model_dir} is in use by another training process: host "
        )
        assert f"pid {first.pid} (" in err and ", since " in err
        assert len(err.splitlines()) == 2, err
        with open(lock) as f:
            assert json.load(f)["pid"] == first.pid  # the holder's lock is left alone

        first.kill()  # kill -9: no release, no final checkpoint
        first.wait()
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.communicate()
    restored = _variables(tf.train.latest_checkpoint(model_dir))["global_step"]
    assert restored > 0  # a periodic checkpoint
    num_examples = 64 * (restored + 12)
    report = train_ctr.main(["--num_examples", str(num_examples), *flags])
    assert report.stop_reason is preemption.StopReason.END_OF_STREAM
    assert (report.start_step, report.steps, report.total_examples) == (
        restored,
        12,
        num_examples,
    )


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
            tf.compat.v1.train.create_global_step()
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
    assert "examples trained:  2560 (2560 in the model)" in proc.stdout
    assert os.path.exists(os.path.join(str(tmp_path), "model.ckpt-40.index"))


@pytest.mark.parametrize(
    "bad",
    [["--num_examples", "0"], ["--num_examples", "10"], ["--save_checkpoints_steps", "0"]],
)
def test_example_rejects_bad_sizes(bad, capsys):
    with pytest.raises(SystemExit):
        train_ctr.parse_args(bad)
    assert f"{bad[0]}={bad[1]}" in capsys.readouterr().err


def test_tpu_needs_a_model_dir(capsys):
    with pytest.raises(SystemExit):
        train_ctr.parse_args(["--tpu", "my-tpu"])
    assert "--model_dir is required with --tpu" in capsys.readouterr().err


@pytest.mark.parametrize("num_hosts, cores_per_host", [(1, 8), (2, 4)])
def test_tpu_path_builds_the_tpu_graph_with_our_hook(tmp_path, num_hosts, cores_per_host):
    """`train_on_tpu` itself, resolver included, up to the feed hook's `begin()`."""
    args = train_ctr.parse_args([*SMALL, "--model_dir", str(tmp_path), "--tpu", "my-tpu"])
    with (
        simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host),
        simulated_tpu.simulated_cluster_resolver(num_hosts, cores_per_host),
    ):
        record = device_boundary.run_until_feed_hook_begins(lambda: train_ctr.train_on_tpu(args))
    assert isinstance(record.hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook)
    assert record.args[0].num_replicas == num_hosts * cores_per_host
    assert record.kwargs["master"] == simulated_tpu.SIMULATED_MASTER
    op_types = simulated_tpu.graph_op_types(record.graph)
    assert {"CrossReplicaSum", "OutfeedEnqueueTuple", "OutfeedDequeueTuple"} <= op_types
    names = [op.name for op in record.graph.get_operations()]
    assert any("host_call" in name or "auc" in name for name in names)


@pytest.mark.parametrize(
    "flags, steps, secs", [([], None, 3600), (["--save_checkpoints_steps", "50"], 50, None)]
)
def test_tpu_run_config_saves_checkpoints_as_the_flags_say(tmp_path, flags, steps, secs):
    args = train_ctr.parse_args([*SMALL, "--model_dir", str(tmp_path), "--tpu", "sim", *flags])
    config = train_ctr.tpu_run_config(args, master=simulated_tpu.SIMULATED_MASTER)
    assert (config.save_checkpoints_steps, config.save_checkpoints_secs) == (steps, secs)
