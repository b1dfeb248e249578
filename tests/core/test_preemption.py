"""SIGTERM stops training at a loop boundary with a final checkpoint (monolith.core.preemption).

Where the process must receive a real SIGTERM with Python's default handler
in place, training runs in a subprocess and the checkpoint is read back. The
in-process tests install a recording handler first, so a SIGTERM the hook does
not take reaches the recorder instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from monolith.core import preemption, testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from tests._feed_threads import live_feed_threads
from tests._light_imports import CHECK, PREAMBLE
from tests.core._feed_hook_helpers import BATCH, counting_model_fn, padded_stream_fn, read_counts

pytestmark = pytest.mark.timeout(180)

IPL = 5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# In the behaviour under test, trains a stream far longer than the test and prints
# the global step after each loop.
# argv: model_dir, then "self STEP" (send SIGTERM to itself after the loop ending at
# STEP) or "wait" (the test sends it).
_CHILD = f"""
import os, signal, sys
import tensorflow as tf
if os.environ.get("MONOLITH_TF_BEHAVIOR") == "v1":
    tf.compat.v1.disable_v2_behavior()
from monolith.core import preemption, testing
from tests.core._feed_hook_helpers import counting_model_fn, padded_stream_fn

model_dir, mode = sys.argv[1], sys.argv[2]

def on_loop_end(step, loop_steps, loss):
    print("step", step, flush=True)
    if mode == "self" and step == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGTERM)

result = testing.train(counting_model_fn, padded_stream_fn(1_000_000), model_dir=model_dir,
                       iterations_per_loop={IPL}, on_loop_end=on_loop_end)
reason = preemption.last_stop_reason()
print("reason", reason.name if reason else None, result.global_step, flush=True)
sys.exit(preemption.RESTART_EXIT_CODE if reason is preemption.StopReason.SIGTERM else 0)
"""


def _start_child(model_dir, *args, env=None):
    child_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(model_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
        cwd=REPO,
    )


def _assert_checkpoint_holds_exactly(model_dir, step):
    counts = read_counts(str(model_dir / f"model.ckpt-{step}"))
    assert counts["global_step"] == step
    assert counts["real_examples"] == step * BATCH
    assert counts["id_sum"] == sum(range(1, step * BATCH + 1))
    assert counts["padding_steps"] == 0


def _checkpoint_steps(model_dir):
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(model_dir))
    return [int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths]


# -- subprocess: the real signal, the real default handler ---------------------------------


def test_sigterm_stops_at_the_next_loop_boundary_with_a_final_checkpoint(tmp_path):
    child = _start_child(tmp_path, "self", str(3 * IPL))
    out, err = child.communicate(timeout=150)
    assert child.returncode == preemption.RESTART_EXIT_CODE, err[-3000:]
    # The signal arrived after the loop ending at step 15: that was the last loop.
    assert out.split("\n")[-3:] == [f"step {3 * IPL}", f"reason SIGTERM {3 * IPL}", ""]
    _assert_checkpoint_holds_exactly(tmp_path, 3 * IPL)
    assert f"Training stopped by SIGTERM at step {3 * IPL}" in err


def test_off_switch_leaves_sigterm_to_kill_the_process_without_a_checkpoint(tmp_path):
    child = _start_child(tmp_path, "self", str(3 * IPL), env={preemption.STOP_ON_SIGTERM_ENV: "0"})
    out, err = child.communicate(timeout=150)
    assert child.returncode == -signal.SIGTERM, err[-3000:]
    assert "reason" not in out
    assert _checkpoint_steps(tmp_path) == [0]  # only the one written at session creation


# The watcher alone, in a process without TensorFlow (tests/_light_imports.py): SIGTERM
# received, then the hook's end() (restore), then a final save of `argv[1]` seconds, after
# which the program exits with the restart code.
_WATCHER_CHILD = f"""
{PREAMBLE}
import time
from monolith.core.feed.preemption import RESTART_EXIT_CODE, SigtermWatcher
{CHECK}
watcher = SigtermWatcher()
assert watcher.install()
print("ready", flush=True)
while not watcher.received:
    time.sleep(0.005)  # training, until the loop boundary
watcher.restore()  # the feed hook's end()
print("saving", flush=True)
time.sleep(float(sys.argv[1]))  # the final checkpoint, the report
print("saved", flush=True)
sys.exit(RESTART_EXIT_CODE)
"""


def test_a_second_sigterm_during_the_final_save_changes_nothing(tf_behavior):
    if tf_behavior != "v2":
        pytest.skip("no TensorFlow in the child: covered by the TF2 pass")
    child = subprocess.Popen(
        [sys.executable, "-c", _WATCHER_CHILD, "2.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        cwd=REPO,
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    first = time.monotonic()
    assert child.stdout.readline() == "saving\n"  # the handler was restored: save under way
    time.sleep(max(0.0, first + 0.1 - time.monotonic()))  # 0.1 s after the first, or later
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == preemption.RESTART_EXIT_CODE, err[-3000:]
    assert out == "saved\n"
    assert "Received another SIGTERM during the SIGTERM stop: ignored." in err


# -- in-process: chaining, restoring, threads -----------------------------------------------


class _Recorder:
    """A previously installed SIGTERM handler that records its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, signum, frame):
        self.calls += 1


@pytest.fixture
def recorder():
    handler = _Recorder()
    previous = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, previous)


def _sigterm_after_step(step):
    def on_loop_end(global_step, loop_steps, loss):
        if global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_loop_end


def test_hook_chains_to_the_previous_handler_and_keeps_sigterm_after_the_stop(tmp_path, recorder):
    result = testing.train(
        counting_model_fn,
        padded_stream_fn(1000),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        on_loop_end=_sigterm_after_step(4),
    )
    assert recorder.calls == 1
    assert preemption.last_stop_reason() is preemption.StopReason.SIGTERM
    assert result.global_step == 4 and not result.stopped_at_end_of_stream
    _assert_checkpoint_holds_exactly(tmp_path, 4)
    # The stop is not over until the program exits: a second SIGTERM is still ours.
    assert signal.getsignal(signal.SIGTERM) is not recorder
    os.kill(os.getpid(), signal.SIGTERM)
    assert recorder.calls == 2  # still chained; the default action would not be taken either
    assert preemption.SigtermWatcher.restore_after_stop() is True
    assert signal.getsignal(signal.SIGTERM) is recorder
    assert preemption.SigtermWatcher.restore_after_stop() is False


def test_the_next_run_puts_back_the_handler_a_sigterm_stop_kept(tmp_path, recorder):
    testing.train(
        counting_model_fn,
        padded_stream_fn(1000),
        model_dir=str(tmp_path / "stopped"),
        iterations_per_loop=2,
        on_loop_end=_sigterm_after_step(2),
    )
    testing.train(
        counting_model_fn,
        padded_stream_fn(3),
        model_dir=str(tmp_path / "next"),
        iterations_per_loop=2,
    )
    assert preemption.last_stop_reason() is preemption.StopReason.END_OF_STREAM
    assert signal.getsignal(signal.SIGTERM) is recorder


def test_end_of_stream_is_reported_as_such_and_a_step_limit_as_none(tmp_path, recorder):
    testing.train(
        counting_model_fn, padded_stream_fn(3), model_dir=str(tmp_path / "a"), iterations_per_loop=2
    )
    assert preemption.last_stop_reason() is preemption.StopReason.END_OF_STREAM
    testing.train(
        counting_model_fn,
        padded_stream_fn(100),
        model_dir=str(tmp_path / "b"),
        iterations_per_loop=2,
        steps=4,
    )
    assert preemption.last_stop_reason() is None
    assert signal.getsignal(signal.SIGTERM) is recorder


def test_each_run_keeps_its_own_stop_reason_and_last_is_the_run_begun_last(tmp_path, recorder):
    # Run A (the stream ends in its second loop) starts run B inside its first
    # loop; B ends at a step limit before A ends at the end of the stream.
    hooks = []

    class RecordedHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
        def begin(self):
            hooks.append(self)
            super().begin()

    def run_b(global_step, loop_steps, loss):
        if global_step == 2:
            testing.train(
                counting_model_fn,
                padded_stream_fn(100),
                model_dir=str(tmp_path / "b"),
                iterations_per_loop=2,
                steps=2,
                hook_class=RecordedHook,
            )
            assert preemption.last_stop_reason() is None  # B's, while A still trains

    result_a = testing.train(
        counting_model_fn,
        padded_stream_fn(3),
        model_dir=str(tmp_path / "a"),
        iterations_per_loop=2,
        on_loop_end=run_b,
        hook_class=RecordedHook,
    )
    hook_a, hook_b = hooks
    assert result_a.stopped_at_end_of_stream
    assert hook_a.stop_reason is preemption.StopReason.END_OF_STREAM
    assert hook_b.stop_reason is None
    # A stopping later does not overwrite the answer for B, the run that began last.
    assert preemption.last_stop_reason() is None
    assert signal.getsignal(signal.SIGTERM) is recorder


_FAILURES = {
    "feed thread": dict(input_fn=padded_stream_fn(6, fail_at=5), match="Condition x != y"),
    "train step": dict(input_fn=padded_stream_fn(6), params={"fail": "assert"}, match="refused"),
}


def _failing_train(model_dir, failure):
    import tensorflow as tf

    kwargs = dict(_FAILURES[failure])
    with pytest.raises(tf.errors.InvalidArgumentError, match=kwargs.pop("match")):
        testing.train(counting_model_fn, model_dir=model_dir, iterations_per_loop=1, **kwargs)


@pytest.mark.parametrize("failure", sorted(_FAILURES))
def test_after_a_failed_run_sigterm_reaches_the_previous_handler(tmp_path, recorder, failure):
    _failing_train(str(tmp_path), failure)
    assert preemption.last_stop_reason() is None
    # No hook method runs on the main thread after a failed session.run: the
    # watcher, no longer active, puts the previous handler back and forwards.
    os.kill(os.getpid(), signal.SIGTERM)
    assert recorder.calls == 1
    assert signal.getsignal(signal.SIGTERM) is recorder


def test_the_next_run_unwraps_the_handler_a_failed_run_left(tmp_path, recorder):
    _failing_train(str(tmp_path / "failed"), "train step")
    testing.train(
        counting_model_fn,
        padded_stream_fn(3),
        model_dir=str(tmp_path / "ok"),
        iterations_per_loop=2,
    )
    assert signal.getsignal(signal.SIGTERM) is recorder
    os.kill(os.getpid(), signal.SIGTERM)
    assert recorder.calls == 1


def test_off_switch_in_process_trains_to_the_end_of_the_stream(tmp_path, recorder, monkeypatch):
    monkeypatch.setenv(preemption.STOP_ON_SIGTERM_ENV, "0")
    handlers = []

    def on_loop_end(global_step, loop_steps, loss):
        handlers.append(signal.getsignal(signal.SIGTERM))
        _sigterm_after_step(2)(global_step, loop_steps, loss)

    result = testing.train(
        counting_model_fn,
        padded_stream_fn(6),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        on_loop_end=on_loop_end,
    )
    assert recorder.calls == 1 and set(handlers) == {recorder}
    assert result.stopped_at_end_of_stream
    assert preemption.last_stop_reason() is preemption.StopReason.END_OF_STREAM


def test_training_off_the_main_thread_leaves_signals_alone(tmp_path, recorder):
    handlers, results, errors = [], [], []

    def run():
        try:
            results.append(
                testing.train(
                    counting_model_fn,
                    padded_stream_fn(5),
                    model_dir=str(tmp_path),
                    iterations_per_loop=2,
                    on_loop_end=lambda *a: handlers.append(signal.getsignal(signal.SIGTERM)),
                )
            )
        except Exception as e:  # reported below, on the test's thread
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert errors == [] and results[0].stopped_at_end_of_stream
    assert set(handlers) == {recorder}
    assert live_feed_threads() == []


def test_a_previously_ignored_sigterm_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        watcher = preemption.SigtermWatcher()
        assert watcher.install() is False
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_restore_keeps_a_handler_installed_after_the_watcher(recorder):
    watcher = preemption.SigtermWatcher()
    assert watcher.install()
    later = _Recorder()
    signal.signal(signal.SIGTERM, later)
    watcher.restore()
    assert signal.getsignal(signal.SIGTERM) is later


# -- a program's own watcher, installed before training -----------------------------------


@pytest.fixture
def program_watcher(recorder):
    """A `SigtermWatcher` the program installed for its whole life (on top of `recorder`)."""
    watcher = preemption.SigtermWatcher()
    assert watcher.install()
    yield watcher
    signal.signal(signal.SIGTERM, recorder)  # the recorder fixture puts back what it found


def test_a_sigterm_before_training_stops_the_run_at_its_first_loop_boundary(
    tmp_path, program_watcher, recorder
):
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the program builds its graph
    assert program_watcher.received and recorder.calls == 1

    result = testing.train(
        counting_model_fn, padded_stream_fn(1000), model_dir=str(tmp_path), iterations_per_loop=2
    )

    assert preemption.last_stop_reason() is preemption.StopReason.SIGTERM
    assert (result.steps_run, result.global_step) == (0, 0)
    _assert_checkpoint_holds_exactly(tmp_path, 0)


def test_sigterms_during_a_run_reach_the_programs_watcher_logged_once(
    tmp_path, program_watcher, recorder, caplog
):
    result = testing.train(
        counting_model_fn,
        padded_stream_fn(1000),
        model_dir=str(tmp_path),
        iterations_per_loop=2,
        on_loop_end=_sigterm_after_step(4),
    )
    os.kill(os.getpid(), signal.SIGTERM)  # during the program's report
    assert result.global_step == 4
    assert program_watcher.received and recorder.calls == 2
    assert caplog.text.count("Received SIGTERM") == 1  # the run's watcher's; not the program's
    assert caplog.text.count("Received another SIGTERM during the SIGTERM stop") == 1


def test_a_sigterm_outside_any_run_is_recorded_by_the_programs_watcher(program_watcher, caplog):
    os.kill(os.getpid(), signal.SIGTERM)
    assert program_watcher.received
    assert "Received SIGTERM outside a training run: recorded" in caplog.text


@pytest.mark.parametrize("value, enabled", [("", True), ("1", True), ("0", False), ("off", False)])
def test_env_switch_values(monkeypatch, value, enabled):
    monkeypatch.setenv(preemption.STOP_ON_SIGTERM_ENV, value)
    assert preemption.stop_on_sigterm_enabled() is enabled


def test_env_switch_rejects_other_values_naming_the_variable(monkeypatch):
    monkeypatch.setenv(preemption.STOP_ON_SIGTERM_ENV, "maybe")
    with pytest.raises(ValueError, match="MONOLITH_STOP_ON_SIGTERM='maybe'"):
        preemption.stop_on_sigterm_enabled()


def test_restart_exit_code_is_tfs_preemption_default():
    assert preemption.RESTART_EXIT_CODE == 42
