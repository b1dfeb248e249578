"""One training process per model_dir (`monolith.core.feed.model_dir_lock`).

Real processes hold the lock: a second process is refused with the holder
named; a holder killed with SIGKILL, one that exited without releasing, and
one whose heartbeat stopped (SIGSTOP) do not block the next; of three
processes taking over one stale lock at once, exactly one gets it. In-process
tests cover the same process acquiring twice, another thread holding it, a
holder on another host (a heartbeat written by a thread of the test) and the
best-effort path through `tf.io.gfile` (TF's `ram://` filesystem).

None of this depends on the TF behaviour: the whole file runs in the TF2
pass only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from monolith.core.feed import model_dir_lock
from monolith.core.feed.model_dir_lock import LOCK_FILE_NAME, ModelDirLockedError, acquire
from tests._light_imports import CHECK, PREAMBLE

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(heartbeat_secs=0.1, stale_after_secs=1.0)


@pytest.fixture(autouse=True)
def tf2_pass_only(tf_behavior):
    if tf_behavior != "v2":
        pytest.skip("independent of the TF behaviour: covered by the TF2 pass")


@pytest.fixture(autouse=True)
def no_lock_left_held():
    """Releases what a failed test still holds, so no heartbeat thread outlives it."""
    yield
    for lock in list(model_dir_lock._held_in_process.values()):
        lock.release()


# argv: model_dir, mode, heartbeat_secs, stale_after_secs[, barrier file].
# hold: acquire, print "held", wait for stdin to close, then exit with an uncaught
#   error without releasing (as a dry run stopping at the device boundary does);
# watch: acquire, print "held", print "lost" once the lock is no longer held;
# race: print "ready", wait for the barrier file, try once, print "held" or "refused",
#   wait for stdin.
# The child runs without TensorFlow (tests/_light_imports.py): local paths need none.
_CHILD = f"""
{PREAMBLE}
import time
from monolith.core.feed import model_dir_lock
{CHECK}
model_dir, mode, beat, stale = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
if mode == "race":
    print("ready", flush=True)
    while not os.path.exists(sys.argv[5]):
        time.sleep(0.001)
try:
    lock = model_dir_lock.acquire(model_dir, heartbeat_secs=beat, stale_after_secs=stale)
except model_dir_lock.ModelDirLockedError:
    print("refused", flush=True)
    sys.stdin.read()
    sys.exit(0)
print("held", flush=True)
if mode == "watch":
    while lock.held:
        time.sleep(0.02)
    print("lost", flush=True)
    sys.exit(0)
sys.stdin.read()
raise SystemExit("stopped without releasing")
"""


def _child(model_dir, mode, heartbeat_secs=0.1, stale_after_secs=600.0, *extra):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(model_dir),
            mode,
            str(heartbeat_secs),
            str(stale_after_secs),
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        cwd=REPO,
    )
    return child


def _expect_line(child, expected):
    line = child.stdout.readline().strip()
    if line != expected:
        child.kill()
        _, err = child.communicate(timeout=60)
        pytest.fail(f"child printed {line!r}, expected {expected!r}; stderr:\n{err[-3000:]}")


def _lock_file(model_dir):
    return os.path.join(str(model_dir), LOCK_FILE_NAME)


def _holder_in_file(model_dir):
    with open(_lock_file(model_dir)) as f:
        return json.load(f)


# ------------------------------------------------------------------ real processes


def test_a_second_process_is_refused_naming_the_holder_until_the_holder_exits(tmp_path):
    child = _child(tmp_path, "hold")
    _expect_line(child, "held")
    with pytest.raises(ModelDirLockedError) as refused:
        acquire(str(tmp_path))
    message = str(refused.value)
    assert f"model_dir {tmp_path} is in use by another training process" in message
    assert f"host {os.uname().nodename}, pid {child.pid} (" in message
    assert "since " in message and "last heartbeat " in message
    assert refused.value.holder.pid == child.pid and refused.value.model_dir == str(tmp_path)
    # The holder stops without calling release(), with an uncaught error: atexit releases.
    _, err = child.communicate("", timeout=60)
    assert child.returncode == 1 and "stopped without releasing" in err
    assert not os.path.exists(_lock_file(tmp_path))
    acquire(str(tmp_path)).release()


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_holder_killed_with_sigkill_does_not_block_the_restart(tmp_path, reaped):
    child = _child(tmp_path, "hold")
    _expect_line(child, "held")
    child.kill()
    if reaped:
        child.wait(timeout=60)
    # The heartbeat is fresh (stale only after 600 s): only the dead pid frees it. Unreaped,
    # the child is a zombie for as long as this test runs; the kill itself may take a moment.
    deadline = time.monotonic() + 30
    while True:
        try:
            lock = acquire(str(tmp_path), heartbeat_secs=10.0, stale_after_secs=600.0)
            break
        except ModelDirLockedError:
            assert not reaped and time.monotonic() < deadline, "a dead holder blocked the lock"
            time.sleep(0.05)
    assert _holder_in_file(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(_lock_file(tmp_path))
    child.communicate(timeout=60)


def test_a_live_holder_whose_heartbeat_stopped_is_stale_and_learns_it_lost(tmp_path):
    child = _child(tmp_path, "watch", 0.1, 1.0)
    _expect_line(child, "held")
    os.kill(child.pid, signal.SIGSTOP)  # alive, but its heartbeat thread is frozen
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                lock = acquire(str(tmp_path), **FAST)
                break
            except ModelDirLockedError:
                assert time.monotonic() < deadline, "the frozen holder's lock never went stale"
                time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGCONT)
    _expect_line(child, "lost")  # its heartbeat found another token in the file
    out, err = child.communicate(timeout=60)
    assert "Lost the model_dir lock" in err
    assert lock.held and _holder_in_file(tmp_path)["token"] == lock.holder.token
    lock.release()


def test_of_three_processes_taking_over_one_stale_lock_exactly_one_gets_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = model_dir_lock.LockHolder(
        host=model_dir_lock._host_identity(),
        pid=dead.pid,
        started=time.time(),
        heartbeat=time.time(),
        token="stale",
    )
    with open(_lock_file(tmp_path), "w") as f:
        f.write(stale.to_json())
    barrier = tmp_path / "go"
    children = [_child(tmp_path, "race", 0.1, 600.0, str(barrier)) for _ in range(3)]
    for child in children:
        _expect_line(child, "ready")
    barrier.touch()  # all three are spinning on it: they judge and take over at once
    results = sorted(child.stdout.readline().strip() for child in children)
    for child in children:
        child.communicate("", timeout=60)
    assert results == ["held", "refused", "refused"]


# ------------------------------------------------------------------ one process


def test_the_same_thread_acquiring_again_takes_over_its_earlier_lock(tmp_path):
    first = acquire(str(tmp_path), **FAST)  # e.g. a run that failed before end()
    second = acquire(str(tmp_path), **FAST)
    assert not first.held and second.held
    first.release()  # a late release of the earlier run leaves the new lock alone
    assert _holder_in_file(tmp_path)["token"] == second.holder.token
    second.release()
    assert not os.path.exists(_lock_file(tmp_path))


def test_the_same_directory_spelled_differently_is_the_same_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    first = acquire(f"{tmp_path}/", **FAST)
    second = acquire(tmp_path.name, **FAST)
    assert not first.held and second.held
    second.release()
    assert not os.path.exists(_lock_file(tmp_path))


def test_another_live_thread_of_this_process_holding_it_is_refused(tmp_path):
    held, done = threading.Event(), threading.Event()

    def other_run():
        with acquire(str(tmp_path), **FAST):
            held.set()
            done.wait(60)

    thread = threading.Thread(target=other_run, name="other-run")
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(ModelDirLockedError, match="in use by thread 'other-run' of this"):
            acquire(str(tmp_path), **FAST)
    finally:
        done.set()
        thread.join(60)
    acquire(str(tmp_path), **FAST).release()


def test_the_heartbeat_advances_while_held(tmp_path):
    with acquire(str(tmp_path), **FAST) as lock:
        first = _holder_in_file(tmp_path)["heartbeat"]
        deadline = time.monotonic() + 30
        while _holder_in_file(tmp_path)["heartbeat"] == first:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert lock.held
    assert [t for t in threading.enumerate() if t.name == "ModelDirLockHeartbeat"] == []


def _foreign(heartbeat, token="theirs"):
    return model_dir_lock.LockHolder(
        host="other-host",
        pid=4242,
        started=heartbeat,
        heartbeat=heartbeat,
        token=token,
        command="python train.py",
    )


def _write(model_dir, holder):
    """Writes `holder`, with a key this version does not know (as a newer writer might)."""
    with open(_lock_file(model_dir), "w") as f:
        f.write(json.dumps({**json.loads(holder.to_json()), "written_by": "monolith 9"}))


def test_a_beating_holder_on_another_host_is_refused(tmp_path):
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            _write(tmp_path, _foreign(time.time()))

    _write(tmp_path, _foreign(time.time()))
    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(ModelDirLockedError, match=r"host other-host, pid 4242 \(python tr"):
            acquire(str(tmp_path), heartbeat_secs=0.1, stale_after_secs=30.0)
    finally:
        stop.set()
        thread.join(60)


def test_a_silent_holder_on_another_host_is_taken_over_after_the_timeout(tmp_path):
    _write(tmp_path, _foreign(time.time()))
    lock = acquire(str(tmp_path), **FAST)
    assert _holder_in_file(tmp_path)["token"] == lock.holder.token
    lock.release()


def test_an_unreadable_lock_file_that_keeps_changing_counts_as_held(tmp_path):
    stop = threading.Event()

    def scribble():
        count = 0
        while True:
            count += 1
            with open(_lock_file(tmp_path), "w") as f:
                f.write(f"not a lock record {count}")
            if stop.wait(0.02):
                return

    thread = threading.Thread(target=scribble)
    thread.start()
    while not os.path.exists(_lock_file(tmp_path)):
        time.sleep(0.01)
    try:
        with pytest.raises(ModelDirLockedError, match=r"host \(unknown\)"):
            acquire(str(tmp_path), heartbeat_secs=0.1, stale_after_secs=0.5)
    finally:
        stop.set()
        thread.join(60)


def test_an_unreadable_lock_file_is_taken_over_after_the_timeout(tmp_path):
    with open(_lock_file(tmp_path), "w") as f:
        f.write("{trunc")
    acquire(str(tmp_path), **FAST).release()


def test_the_env_switch_turns_the_lock_off(tmp_path, monkeypatch):
    monkeypatch.setenv(model_dir_lock.MODEL_DIR_LOCK_ENV, "0")
    assert acquire(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []


def test_a_bad_env_switch_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(model_dir_lock.MODEL_DIR_LOCK_ENV, "maybe")
    with pytest.raises(ValueError, match="MONOLITH_MODEL_DIR_LOCK='maybe'"):
        acquire(str(tmp_path))


def test_a_missing_model_dir_is_created(tmp_path):
    acquire(str(tmp_path / "new" / "dir"), **FAST).release()
    assert os.path.isdir(tmp_path / "new" / "dir")


def test_a_model_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "model"
    path.write_text("")
    with pytest.raises(NotADirectoryError, match=f"model_dir='{path}' is a file"):
        acquire(str(path))


def test_a_model_dir_that_is_not_writable_is_named(unwritable_dir):
    with pytest.raises(PermissionError, match=f"model_dir='{unwritable_dir}' is not writable"):
        acquire(str(unwritable_dir))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(heartbeat_secs=0), ValueError, "heartbeat_secs=0"),
        (dict(heartbeat_secs="1"), TypeError, "heartbeat_secs='1'"),
        (dict(heartbeat_secs=1.0, stale_after_secs=2.0), ValueError, "must exceed 2 \\*"),
    ],
)
def test_bad_timings_name_themselves(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        acquire(str(tmp_path), **kwargs)


def test_model_dir_must_be_a_path():
    with pytest.raises(TypeError, match="model_dir=None"):
        acquire(None)


# ------------------------------------------------------------------ object stores


def test_through_gfile_a_beating_holder_is_refused_and_a_release_frees_it(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(model_dir_lock, "REMOTE_SETTLE_SECS", 0.05)
    model_dir = f"ram://monolith_lock_test_{os.getpid()}/model"
    path = f"{model_dir}/{LOCK_FILE_NAME}"
    with acquire(model_dir, **FAST) as lock, tf.io.gfile.GFile(path) as f:
        assert json.loads(f.read())["token"] == lock.holder.token
    assert not tf.io.gfile.exists(path)

    stop = threading.Event()

    def write():  # another host's holder (TF's ram:// appends on "w": write, then rename)
        with tf.io.gfile.GFile(f"{path}.new", "w") as f:
            f.write(_foreign(time.time()).to_json())
        tf.io.gfile.rename(f"{path}.new", path, overwrite=True)

    def beat():
        while not stop.wait(0.05):
            write()

    write()
    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(ModelDirLockedError, match="host other-host, pid 4242"):
            acquire(model_dir, heartbeat_secs=0.1, stale_after_secs=30.0)
    finally:
        stop.set()
        thread.join(60)
    tf.io.gfile.remove(path)  # what its release does
    acquire(model_dir, **FAST).release()
