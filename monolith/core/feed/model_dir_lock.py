"""One training process per model_dir: a lock file with the holder's identity and a heartbeat.

Two processes training on one model_dir read each other's checkpoints: each
resumes from, and skips the batches of, whatever the other wrote last. The
feed hook therefore takes this lock in `begin()`, before any session exists
(MonitoredSession's `CheckpointSaverHook` writes a checkpoint as soon as a
session is created), and releases it in `end()`. TPUEstimator programs get
it without changes.

The lock file `monolith_training.lock` in model_dir holds the holder's host,
pid, start time, last heartbeat and a random token (JSON). While held, a
daemon thread rewrites the heartbeat every `HEARTBEAT_SECS` (10 s). A thread,
not the training loop, beats because a TPU run can spend many minutes inside
one `session.run` (compilation, a long loop) without returning to a hook;
`release()` stops and joins it.

A lock is stale, and is taken over (with a WARNING naming the old holder):

* on the same host (same host name and pid namespace): when the holder's pid
  is dead (a `kill -9`, an OOM kill), at once; or when its heartbeat is older
  than `STALE_AFTER_SECS` (60 s: the pid was reused, or the holder hangs);
* on another host: when its heartbeat has not changed while this process
  watched it for `STALE_AFTER_SECS` (the host's clock is not used), or at once
  when, by this host's clock, it is older than `STALE_AFTER_SECS` plus
  `CLOCK_SKEW_SECS` (5 min). A live holder on another host is refused as soon
  as its heartbeat is seen to change (within about one heartbeat).

The same process acquiring again (a program calling `train()` twice, or a
run that failed without reaching `end()`): the new run takes the lock over
from the earlier one, unless the earlier one was acquired on another thread
that is still alive (two runs at once in one process are refused, as two
processes are). A lock with this process's pid left by a dead process (pid
reuse in a restarted container) is taken over too.

Released: by `release()` (the hook's `end()`), at interpreter exit (`atexit`:
a dry run that stops at the device boundary, a failed run, `sys.exit`), or,
for a process killed without exiting (SIGKILL, a crash), by staleness.

Storage: on local filesystems the lock is created atomically (a hard link of
a complete temporary file, `O_CREAT | O_EXCL` where hard links are not
supported): of two processes starting at once, exactly one gets it. Taking
over a stale lock renames it away first, so of two processes taking over the
same stale lock, one wins. On object stores (any `scheme://` path, through
`tf.io.gfile`: gs://, s3://, ...) there is no atomic create; it is best
effort. It catches: a second process starting while the lock is held (GCS
reads are strongly consistent), and two processes starting at once whose
existence check and write are each less than `REMOTE_SETTLE_SECS` (2 s)
apart: the later write wins, and each re-reads the lock 2 s after its write
and only the one that finds its own token proceeds; a holder that later finds
another token in the file logs an ERROR and reports `held == False`. It does
not catch: a process whose check and write are more than 2 s apart (a stall
between them), and stores without read-after-write consistency.

Turned off with `MONOLITH_MODEL_DIR_LOCK=0` (then `acquire` returns None).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional

from absl import logging

from monolith.core.common.env_switch import env_switch
from monolith.core.common.model_dir import check_model_dir, is_remote
from monolith.core.common.validation import positive_seconds

__all__ = [
    "CLOCK_SKEW_SECS",
    "HEARTBEAT_SECS",
    "LOCK_FILE_NAME",
    "MODEL_DIR_LOCK_ENV",
    "REMOTE_SETTLE_SECS",
    "STALE_AFTER_SECS",
    "LockHolder",
    "ModelDirLock",
    "ModelDirLockedError",
    "acquire",
    "model_dir_lock_enabled",
]

MODEL_DIR_LOCK_ENV = "MONOLITH_MODEL_DIR_LOCK"
LOCK_FILE_NAME = "monolith_training.lock"
HEARTBEAT_SECS = 10.0
STALE_AFTER_SECS = 60.0
CLOCK_SKEW_SECS = 300.0
REMOTE_SETTLE_SECS = 2.0
_JOIN_SECS = 30.0


def model_dir_lock_enabled() -> bool:
    """Whether `acquire` takes the lock (env `MONOLITH_MODEL_DIR_LOCK`, on when unset).

    Raises:
      ValueError: The variable holds something other than 0/1/true/false/yes/no/on/off.
    """
    return env_switch(MODEL_DIR_LOCK_ENV)


# ------------------------------------------------------------------ the holder


def _host_identity() -> str:
    """The host name, plus the pid namespace on Linux: pids compare only within one."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; a zombie (killed, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: the signal check above decides


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds a model_dir lock, as its lock file says.

    Attributes:
      host: Host name (plus the pid namespace on Linux).
      pid: The holder's process id.
      started: When it took the lock (seconds since the epoch, its clock).
      heartbeat: Its last heartbeat (the same clock).
      token: Random per acquisition: tells two holders apart.
      command: The holder's command line (shortened).
    """

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    command: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Optional[LockHolder]:
        """The holder in `text`, or None when it is not a complete lock record.

        Keys this version does not know (a newer writer's) are ignored.
        """
        try:
            data = json.loads(text)
            known = {field.name for field in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (AttributeError, TypeError, ValueError):
            return None

    @property
    def host_name(self) -> str:
        return self.host.split(" ")[0]

    def describe(self) -> str:
        """E.g. 'host vm-1, pid 4242 (python train.py), since ..., last heartbeat ... (3 s ago)'."""
        age = max(0.0, time.time() - self.heartbeat)
        command = f" ({self.command})" if self.command else ""
        return (
            f"host {self.host_name}, pid {self.pid}{command}, since {_when(self.started)}, "
            f"last heartbeat {_when(self.heartbeat)} ({age:.0f} s ago)"
        )


class ModelDirLockedError(RuntimeError):
    """Another training process (or another thread of this one) holds the model_dir.

    Also raised by the feed hook when another process took this run's lock
    over while it trained (`monolith.core.feed.model_dir_guard`).

    Attributes:
      model_dir: The model_dir.
      holder: The `LockHolder` found in its lock file (None: unreadable or gone).
    """

    def __init__(self, message: str, model_dir: str, holder: Optional[LockHolder]):
        super().__init__(message)
        self.model_dir = model_dir
        self.holder = holder


# ------------------------------------------------------------------ storage


class _LocalStore:
    """Lock-file operations on a local filesystem: atomic create and replace."""

    @staticmethod
    def prepare(model_dir: str) -> None:
        check_model_dir(model_dir)

    @staticmethod
    def read(path: str) -> Optional[str]:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def _temporary(path: str, text: str) -> str:
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return temporary

    @classmethod
    def create(cls, path: str, text: str) -> bool:
        """Creates `path` holding `text` unless it exists; atomic. Returns whether it did."""
        temporary = cls._temporary(path, text)
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return cls._create_exclusive(path, text)  # no hard links on this filesystem
        finally:
            os.remove(temporary)

    @staticmethod
    def _create_exclusive(path: str, text: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True

    @classmethod
    def replace(cls, path: str, text: str) -> None:
        os.replace(cls._temporary(path, text), path)

    @classmethod
    def replace_if_token(cls, path: str, text: str, token: str) -> Optional[str]:
        """Replaces `path` by `text` if it holds `token`; else returns what it holds ("": none).

        The new file is written (and synced) before the check, so that only a
        rename separates the check from the replacement: a holder paused in
        between (SIGSTOP, a suspended VM) would overwrite a newer holder.
        """
        temporary = cls._temporary(path, text)
        try:
            current = cls.read(path) or ""
            if _token_of(current) != token:
                return current
            os.replace(temporary, path)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)

    @classmethod
    def take_over(cls, path: str, expected: str, text: str) -> bool:
        """Replaces the lock file holding `expected` by one holding `text`; False if it changed.

        The stale file is renamed away first (only one process can rename one
        directory entry); if what was renamed is not the stale lock (another
        process took it over since it was read), it is put back.
        """
        aside = f"{path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = cls.read(aside)
            if moved != expected:
                with contextlib.suppress(FileExistsError):  # unless yet another lock exists
                    os.link(aside, path)  # put the newer lock back
                return False
        finally:
            os.remove(aside)
        return cls.create(path, text)

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class _RemoteStore:
    """Lock-file operations through `tf.io.gfile` (gs://, ...): no atomic create."""

    @staticmethod
    def prepare(model_dir: str) -> None:
        check_model_dir(model_dir)

    @staticmethod
    def read(path: str) -> Optional[str]:
        import tensorflow as tf

        try:
            with tf.io.gfile.GFile(path, "r") as f:
                return f.read()
        except tf.errors.NotFoundError:
            return None

    @classmethod
    def create(cls, path: str, text: str) -> bool:
        import tensorflow as tf

        if tf.io.gfile.exists(path):
            return False
        cls.replace(path, text)
        return True

    @staticmethod
    def replace(path: str, text: str) -> None:
        """Writes a temporary object, then renames it over `path` (GCS: a copy, atomic)."""
        import tensorflow as tf

        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with tf.io.gfile.GFile(temporary, "w") as f:
            f.write(text)
        tf.io.gfile.rename(temporary, path, overwrite=True)

    @classmethod
    def replace_if_token(cls, path: str, text: str, token: str) -> Optional[str]:
        current = cls.read(path) or ""
        if _token_of(current) != token:
            return current
        cls.replace(path, text)
        return None

    @classmethod
    def take_over(cls, path: str, expected: str, text: str) -> bool:
        if cls.read(path) != expected:
            return False
        cls.replace(path, text)
        return True

    @staticmethod
    def remove(path: str) -> None:
        import tensorflow as tf

        with contextlib.suppress(tf.errors.NotFoundError):
            tf.io.gfile.remove(path)


def _token_of(text: str) -> Optional[str]:
    holder = LockHolder.from_json(text)
    return holder.token if holder is not None else None


def _store_for(model_dir: str) -> Any:
    return _RemoteStore if is_remote(model_dir) else _LocalStore


# ------------------------------------------------------------------ the lock


_held_in_process: dict = {}  # lock path -> the ModelDirLock this process holds there
_registry_lock = threading.Lock()


class ModelDirLock:
    """A held model_dir lock; `release()` (idempotent) gives it up.

    Created by `acquire`. Its daemon thread ("ModelDirLockHeartbeat") rewrites
    the heartbeat every `heartbeat_secs` and checks that the file still holds
    this lock's token; if another process took the lock over (this one looked
    stale, e.g. the host was suspended), it logs an ERROR, stops beating, and
    `held` becomes False (`lost_to` names the new holder); the feed hook then
    stops training.
    """

    def __init__(self, model_dir: str, path: str, holder: LockHolder, heartbeat_secs: float):
        self.model_dir = model_dir
        self.path = path
        self._holder = holder
        self._store = _store_for(model_dir)
        self._heartbeat_secs = heartbeat_secs
        self._owner = threading.current_thread()
        self._stop = threading.Event()
        self._held = True
        self._released = False
        self._lost_to: Optional[LockHolder] = None
        self._thread = threading.Thread(
            target=self._beat, name="ModelDirLockHeartbeat", daemon=True
        )
        self._thread.start()

    @property
    def holder(self) -> LockHolder:
        """This process's entry in the lock file (as of its last heartbeat)."""
        return self._holder

    @property
    def held(self) -> bool:
        """True until `release()`, or until another process was found to hold the lock."""
        return self._held and not self._released

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still this lock's."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_SECS)
        with _registry_lock:
            if _held_in_process.get(self.path) is self:
                del _held_in_process[self.path]
        if not self._held or os.getpid() != self._holder.pid:
            return  # superseded or lost; or a forked child, which holds nothing
        self._held = False
        current = LockHolder.from_json(self._store.read(self.path) or "")
        if current is not None and current.token == self._holder.token:
            self._store.remove(self.path)
            logging.info("Released the model_dir lock %s.", self.path)

    def _supersede(self) -> None:
        """Gives the lock to a newer acquisition in this process: stop beating, keep the file."""
        self._held = False
        self.release()

    def __enter__(self) -> ModelDirLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def _beat(self) -> None:
        """Heartbeat thread body: every `heartbeat_secs`, check the token and rewrite the time."""
        failures = 0
        while not self._stop.wait(self._heartbeat_secs):
            try:
                beat = dataclasses.replace(self._holder, heartbeat=time.time())
                current = self._store.replace_if_token(self.path, beat.to_json(), beat.token)
                if current is not None:
                    self._lost(current)
                    return
                self._holder = beat
                failures = 0
            except Exception as error:  # keep beating: a transient store error is not fatal
                failures += 1
                logging.warning(
                    "model_dir lock heartbeat failed (%d in a row): %r", failures, error
                )

    @property
    def lost_to(self) -> Optional[LockHolder]:
        """Who held the lock file when this lock found it lost (None: held, or unreadable)."""
        return self._lost_to

    def _lost(self, current: str) -> None:
        holder = self._lost_to = LockHolder.from_json(current)
        self._held = False
        logging.error(
            "Lost the model_dir lock %s: %s. Another process may train on this model_dir; "
            "this one should stop.",
            self.path,
            f"now held by {holder.describe()}" if holder else "the file is gone or unreadable",
        )


def acquire(
    model_dir: str,
    *,
    heartbeat_secs: float = HEARTBEAT_SECS,
    stale_after_secs: float = STALE_AFTER_SECS,
) -> Optional[ModelDirLock]:
    """Takes the model_dir lock for this process, or raises naming its holder.

    Called by the feed hook's `begin()` (the training thread) with the
    model_dir from `ctx.config.model_dir`. May wait up to `stale_after_secs`
    for a holder on another host whose heartbeat has not been seen to change.

    Args:
      model_dir: The model directory (local, or a `scheme://` path through
        `tf.io.gfile`); created if missing.
      heartbeat_secs: How often the holder rewrites its heartbeat.
      stale_after_secs: How old (same host) or how long unchanged (another
        host) a heartbeat must be for the lock to be stale.

    Returns:
      The held `ModelDirLock`, or None when `MONOLITH_MODEL_DIR_LOCK=0`.

    Raises:
      ModelDirLockedError: Another live process, or another live thread of
        this process, holds the lock.
      monolith.core.common.model_dir.ModelDirError: model_dir is a file
        (`ModelDirIsAFileError`, a NotADirectoryError), is not writable
        (`ModelDirNotWritableError`, a PermissionError) or cannot be created;
        the message names it.
      OSError: the lock file cannot be created in model_dir (named).
      TypeError, ValueError: bad arguments, or a bad `MONOLITH_MODEL_DIR_LOCK`.
    """
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"model_dir={model_dir!r} must be a path.")
    model_dir = os.fspath(model_dir)
    heartbeat_secs = positive_seconds("heartbeat_secs", heartbeat_secs)
    stale_after_secs = positive_seconds("stale_after_secs", stale_after_secs)
    if stale_after_secs <= 2 * heartbeat_secs:
        raise ValueError(
            f"stale_after_secs={stale_after_secs!r} must exceed 2 * heartbeat_secs="
            f"{heartbeat_secs!r}, or a live holder could look stale."
        )
    if not model_dir_lock_enabled():
        logging.info("model_dir lock off (%s=0): not locking %s.", MODEL_DIR_LOCK_ENV, model_dir)
        return None
    store = _store_for(model_dir)
    store.prepare(model_dir)
    # One path per directory: the registry of this process's locks is keyed by it.
    if store is _LocalStore:
        path = os.path.join(os.path.realpath(model_dir), LOCK_FILE_NAME)
    else:
        path = f"{model_dir.rstrip('/')}/{LOCK_FILE_NAME}"
    me = _host_identity()
    # A lock that keeps changing hands (or an unreadable file that keeps changing) is
    # judged again; past this deadline it counts as held.
    give_up = time.monotonic() + 3 * stale_after_secs
    holder: Optional[LockHolder] = None
    while holder is None or time.monotonic() < give_up:
        ours = LockHolder(
            host=me,
            pid=os.getpid(),
            started=time.time(),
            heartbeat=time.time(),
            token=uuid.uuid4().hex,
            command=" ".join([os.path.basename(sys.executable), *sys.argv])[:200],
        )
        if _create(store, model_dir, path, ours) and _settled(store, path, ours):
            return _held(model_dir, path, ours, heartbeat_secs, took_over=None)
        text = store.read(path)
        if text is None:
            continue  # released meanwhile: try again
        holder = LockHolder.from_json(text) or _unreadable_holder()
        if holder.host == me and holder.pid == os.getpid():
            _check_other_thread(model_dir, path, holder)
            store.replace(path, ours.to_json())  # ours: an earlier run of this process
            return _held(model_dir, path, ours, heartbeat_secs, took_over=holder)
        verdict = _judge(store, path, text, holder, me, stale_after_secs, heartbeat_secs)
        if verdict is _Verdict.HELD:
            raise _locked_error(model_dir, path, holder)
        if verdict is _Verdict.CHANGED:
            newer = LockHolder.from_json(store.read(path) or "")
            if newer is not None and newer.token == holder.token:
                raise _locked_error(model_dir, path, newer)  # it beats: alive
            continue  # released or taken meanwhile: judge again
        if store.take_over(path, text, ours.to_json()) and _settled(store, path, ours):
            return _held(model_dir, path, ours, heartbeat_secs, took_over=holder)
    raise _locked_error(model_dir, path, holder)


def _create(store: Any, model_dir: str, path: str, ours: LockHolder) -> bool:
    """`store.create`, with an error naming model_dir when it cannot be written."""
    try:
        return store.create(path, ours.to_json())
    except OSError as error:
        raise OSError(
            error.errno,
            f"model_dir={model_dir!r} is not writable: cannot create {path} ({error.strerror}).",
        ) from error


def _settled(store: Any, path: str, ours: LockHolder) -> bool:
    """Remote only: whether the file still holds our token `REMOTE_SETTLE_SECS` after our write."""
    if store is not _RemoteStore:
        return True
    time.sleep(REMOTE_SETTLE_SECS)
    current = LockHolder.from_json(store.read(path) or "")
    return current is not None and current.token == ours.token


def _unreadable_holder() -> LockHolder:
    """A stand-in for a lock file that is not a complete record (being written, or foreign).

    It is judged as a holder on an unknown host whose heartbeat is the time
    it was read: stale once it stays unchanged for `stale_after_secs`.
    """
    now = time.time()
    return LockHolder(host="(unknown)", pid=0, started=now, heartbeat=now, token="")


def _check_other_thread(model_dir: str, path: str, holder: LockHolder) -> None:
    """Refuses when another live thread of this process holds the lock; supersedes otherwise."""
    with _registry_lock:
        earlier = _held_in_process.get(path)
    if earlier is None:
        logging.warning(
            "model_dir lock %s names this process (pid %d) but this process does not hold "
            "it: left by a dead process whose pid was reused; taking it over.",
            path,
            holder.pid,
        )
        return
    owner = earlier._owner
    if owner is not threading.current_thread() and owner.is_alive():
        raise ModelDirLockedError(
            f"model_dir {model_dir} is in use by thread {owner.name!r} of this process, "
            f"since {_when(earlier.holder.started)}: two training runs on one model_dir read "
            "each other's checkpoints. Wait for that run, or use another model_dir.",
            model_dir,
            holder,
        )
    logging.warning(
        "Taking over the model_dir lock %s from an earlier training run of this process "
        "(since %s) that did not release it (it failed, or never reached end()).",
        path,
        _when(earlier.holder.started),
    )
    earlier._supersede()


class _Verdict(enum.Enum):
    HELD = "held"  # a live holder
    STALE = "stale"  # take it over
    CHANGED = "changed"  # the file changed while watched


def _judge(
    store: Any,
    path: str,
    text: str,
    holder: LockHolder,
    me: str,
    stale_after_secs: float,
    heartbeat_secs: float,
) -> _Verdict:
    """Whether the lock in `text` is stale (see the module docstring); may watch it a while."""
    age = time.time() - holder.heartbeat
    if holder.host == me:
        if not _pid_alive(holder.pid):
            logging.warning("model_dir lock %s: its holder (pid %d) is dead.", path, holder.pid)
            return _Verdict.STALE
        return _Verdict.STALE if age > stale_after_secs else _Verdict.HELD
    if age > stale_after_secs + CLOCK_SKEW_SECS:
        return _Verdict.STALE
    logging.info(
        "model_dir lock %s is held by %s; watching its heartbeat for up to %.0f s.",
        path,
        holder.describe(),
        stale_after_secs,
    )
    deadline = time.monotonic() + stale_after_secs
    poll = min(1.0, heartbeat_secs / 2)
    while time.monotonic() < deadline:
        time.sleep(poll)
        if store.read(path) != text:
            return _Verdict.CHANGED
    return _Verdict.STALE


def _held(
    model_dir: str,
    path: str,
    ours: LockHolder,
    heartbeat_secs: float,
    took_over: Optional[LockHolder],
) -> ModelDirLock:
    if took_over is not None and took_over.pid != ours.pid:
        logging.warning("Took over the stale model_dir lock %s of %s.", path, took_over.describe())
    lock = ModelDirLock(model_dir, path, ours, heartbeat_secs)
    with _registry_lock:
        _held_in_process[path] = lock
    logging.info("Holding the model_dir lock %s (pid %d).", path, ours.pid)
    return lock


def _locked_error(model_dir: str, path: str, holder: LockHolder) -> ModelDirLockedError:
    return ModelDirLockedError(
        f"model_dir {model_dir} is in use by another training process: {holder.describe()}.\n"
        "Two processes training on one model_dir read each other's checkpoints. Stop the "
        "other process or use another model_dir. If no process trains on it, delete "
        f"{path}; {MODEL_DIR_LOCK_ENV}=0 turns the lock off.",
        model_dir,
        holder,
    )


@atexit.register
def _release_at_exit() -> None:
    """Releases the locks this process still holds when the interpreter exits."""
    with _registry_lock:
        locks = list(_held_in_process.values())
    for lock in locks:
        if lock.holder.pid == os.getpid():
            lock.release()


def _forget_in_child() -> None:
    """A forked child holds none of its parent's locks (and has none of its threads)."""
    _held_in_process.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
