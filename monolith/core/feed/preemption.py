"""Graceful stop on SIGTERM, the signal a preemption sends, and why training stopped.

A Cloud TPU VM preemption, `docker stop` and a Kubernetes eviction all send
SIGTERM and give the process a grace period (about 30 s) before SIGKILL.
Python's default is to die at once, losing everything since the last
checkpoint. The feed hook
(`monolith.core.auto_checkpoint_feed_hook.TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook`)
instead installs a `SigtermWatcher` while it trains: the signal only sets a
flag, and at the next loop boundary the hook stops training exactly as at the
end of the stream (OutOfRangeError from `before_run`), so every hook's `end()`
runs and `CheckpointSaverHook` writes the final checkpoint.

Public API:

* `StopReason`, `last_stop_reason()`: whether the feed hook stopped the latest
  training run of this process at the end of the stream or on SIGTERM (None
  when it did not stop it: a step limit, an error, or no feed hook). Each run
  keeps its own reason (`StopRecord`; the hook's `stop_reason` property);
  `last_stop_reason()` reads the record of the run that began last.
* `RESTART_EXIT_CODE` (42, as TF's `PreemptionCheckpointHandler`): the exit
  code a program should use after a SIGTERM stop, so a job launcher restarts
  it instead of taking it for a finished run.
* Environment `MONOLITH_STOP_ON_SIGTERM=0` turns the SIGTERM stop off (the
  hook then leaves SIGTERM alone). It is on by default because TPUEstimator,
  not the user, constructs the hook.
* `SigtermWatcher`: installed by a program at its start, it covers the
  moments no training run does (start-up, graph building and restore, the
  program's report): see its docstring.

SIGINT is not touched: TPUEstimator's `InstallSignalHandlerHook` resets it to
SIG_DFL before every loop, so Ctrl-C ends the process at once.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
from typing import Any, Callable, Optional, Union

from absl import logging

from monolith.core.common.env_switch import env_switch

__all__ = [
    "RESTART_EXIT_CODE",
    "STOP_ON_SIGTERM_ENV",
    "SigtermWatcher",
    "StopReason",
    "StopRecord",
    "begin_run",
    "install_sigterm_stop",
    "last_stop_reason",
    "stop_on_sigterm_enabled",
]

RESTART_EXIT_CODE = 42
STOP_ON_SIGTERM_ENV = "MONOLITH_STOP_ON_SIGTERM"


_Handler = Union[Callable[[int, Any], Any], int, None]


class StopReason(enum.Enum):
    """Why the feed hook stopped training."""

    END_OF_STREAM = "end_of_stream"
    SIGTERM = "sigterm"


class StopRecord:
    """Why one training run stopped, kept after the run's hook is gone.

    The feed hook creates one per run in `begin()` (through `begin_run`) and
    hands it to each of the run's feed sessions; the session that stops
    training writes the reason once. `reason` is None while the run trains
    and stays None when something else ended it (a step limit, an error).
    """

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: Optional[StopReason] = None


# The record of the run whose feed hook called `begin()` last. Replaced (one
# atomic assignment) by each new run; no run ever writes another run's record.
_latest_run: Optional[StopRecord] = None


def begin_run() -> StopRecord:
    """Creates the record of a new training run and makes it the process's latest.

    Called by the feed hook's `begin()` (the training thread), so that
    `last_stop_reason()` answers for this run from now on.
    """
    global _latest_run
    record = StopRecord()
    _latest_run = record
    return record


def last_stop_reason() -> Optional[StopReason]:
    """Why the feed hook stopped the latest training run in this process.

    "Latest" is the run whose feed hook called `begin()` last, i.e. the
    latest `TPUEstimator.train` (or `monolith.core.testing.train`) call to
    start. Each run keeps its own reason (the hook's `stop_reason`); a run
    that started earlier and stops later never changes this answer, so in a
    sequential program it is the reason of the run that just returned. With
    several runs at once (threads), read each hook's `stop_reason` instead.

    Returns:
      `StopReason.END_OF_STREAM` or `StopReason.SIGTERM`; None while that
      run trains, when it was not stopped by the feed hook (step limit, error,
      other hook), or when no feed hook has begun a run.
    """
    record = _latest_run
    return record.reason if record is not None else None


def stop_on_sigterm_enabled() -> bool:
    """Whether the feed hook should stop gracefully on SIGTERM (env MONOLITH_STOP_ON_SIGTERM).

    Raises:
      ValueError: The variable holds something other than 0/1/true/false/yes/no/on/off.
    """
    return env_switch(STOP_ON_SIGTERM_ENV)


def _deliver(handler: _Handler, signum: int, frame: Any) -> None:
    """Runs the previous disposition `handler` for a signal that arrived."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        # Our handler is no longer installed: the default action (termination) applies.
        os.kill(os.getpid(), signum)


class SigtermWatcher:
    """A SIGTERM handler that records the signal, chained to the handler it replaced.

    `install()` and `restore()` must run on the main thread (Python's signal
    module allows nothing else); off it, `install()` does nothing and returns
    False. While installed, a SIGTERM sets `received` and then calls the
    previous handler if that was a Python callable (SIG_DFL is not called: the
    graceful stop replaces the default termination).

    If training fails inside `session.run`, no hook method runs afterwards on
    the main thread, so the hook cannot call `restore()`. `is_active` (a
    callable given by the hook) then reports False, and the handler, on the
    next SIGTERM, puts the previous handler back and delivers the signal to it,
    as if it had never been installed. A later `install()` also unwraps such a
    stale watcher.

    Once a SIGTERM has been received, the stop has begun and must not be cut
    short: further SIGTERMs are logged and ignored (a Python previous handler
    is still called), also after `restore()`, which then leaves the watcher
    installed: the hook calls `restore()` in its `end()`, and what follows
    (the other hooks' `end()`, the session's close, the program's report and
    its exit with `RESTART_EXIT_CODE`) must not be cut short. The previous handler
    comes back when the next training run installs its watcher (it unwraps
    this one), or when the program calls `SigtermWatcher.restore_after_stop()`
    (for a program that goes on after the stop); otherwise it stays ignored
    until the process exits.

    A program can install one for its whole life, before training
    (`SigtermWatcher().install()`, without `is_active`): a SIGTERM that
    arrives before a training run's watcher is installed (the program's
    start-up, graph building, the checkpoint restore) or after it (the
    program's own report) is then recorded instead of killing the process.
    A training run whose watcher is installed on top of it finds it
    `received` and stops at its first loop boundary (with a final
    checkpoint, `StopReason.SIGTERM`), and SIGTERMs during training reach it
    too (without a second log line). The program reads `received` to choose
    its exit code.

    Args:
      is_active: Returns whether the training run that installed the watcher
        is still going; None means always (a program's watcher).
    """

    def __init__(self, is_active: Optional[Callable[[], bool]] = None):
        self._program_wide = is_active is None
        self._is_active = is_active or (lambda: True)
        self._received = threading.Event()
        self._previous: _Handler = None
        self._installed = False
        self._holding = False  # restore() came during a SIGTERM stop: kept installed

    @property
    def received(self) -> bool:
        """True once SIGTERM arrived while the watcher was installed and active."""
        return self._received.is_set()

    @property
    def installed(self) -> bool:
        """Whether this watcher is currently the process's SIGTERM handler."""
        return self._installed

    def install(self) -> bool:
        """Installs the handler on the main thread; returns whether it was installed."""
        if self._installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            logging.info(
                "SIGTERM stop not installed: training runs outside the main thread "
                "(Python handles signals only there)."
            )
            return False
        previous = signal.getsignal(signal.SIGTERM)
        while isinstance(getattr(previous, "__self__", None), SigtermWatcher):
            stale = previous.__self__
            if stale._is_active() and not stale._holding:
                break
            previous = stale._previous  # A watcher left by a failed run: unwrap it.
        if previous is None or previous == signal.SIG_IGN:
            logging.info(
                "SIGTERM stop not installed: SIGTERM is %s in this process.",
                "ignored" if previous == signal.SIG_IGN else "handled outside Python",
            )
            return False
        self._previous = previous
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        logging.info(
            "SIGTERM stops training at the next loop boundary with a final checkpoint "
            "(%s=0 turns this off).",
            STOP_ON_SIGTERM_ENV,
        )
        program = _program_watcher_of(previous)
        if program is not None and program.received and not self._received.is_set():
            # The program's watcher caught a SIGTERM before this run started.
            self._received.set()
            logging.warning(
                "A SIGTERM arrived before this training run started: it stops at its first "
                "loop boundary, and the final checkpoint is written."
            )
        return True

    def restore(self) -> None:
        """Puts the previous SIGTERM handler back (main thread only; idempotent).

        After a SIGTERM it keeps the watcher installed instead, so that the
        stop (the final checkpoint, the program's exit code) is not cut short
        by a second SIGTERM; see the class docstring.
        """
        if not self._installed:
            return
        if self._received.is_set():
            if not self._holding:
                self._holding = True
                logging.info(
                    "SIGTERM stop under way: further SIGTERMs are ignored until the process "
                    "exits, the next training run starts, or "
                    "SigtermWatcher.restore_after_stop() is called."
                )
            return
        self._put_back()

    @classmethod
    def restore_after_stop(cls) -> bool:
        """Puts back the SIGTERM handler a finished SIGTERM stop kept in place (main thread).

        For a program that goes on after a SIGTERM stop instead of exiting.
        Returns whether a watcher was holding SIGTERM (and now no longer is).
        """
        watcher = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if not isinstance(watcher, cls) or not watcher._holding:
            return False
        watcher._put_back()
        return True

    def _put_back(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Cannot restore the SIGTERM handler outside the main thread.")
            return
        current = signal.getsignal(signal.SIGTERM)
        if getattr(current, "__self__", None) is self:
            signal.signal(signal.SIGTERM, self._previous)
        else:
            # Someone installed a handler after us (and may chain to ours): keep theirs.
            logging.warning("SIGTERM handler was replaced during training; leaving it in place.")
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        """The signal handler (Python runs it on the main thread between bytecodes)."""
        if not self._received.is_set() and not self._is_active():
            # The run that installed us ended without restore() (it failed).
            self.restore()
            _deliver(self._previous, signum, frame)
            return
        if self._received.is_set():
            # The stop has begun: a second signal must not cut the final checkpoint short.
            logging.warning("Received another SIGTERM during the SIGTERM stop: ignored.")
        elif self._program_wide:
            logging.warning(
                "Received SIGTERM outside a training run: recorded; a training run that "
                "starts later stops at its first loop boundary."
            )
        else:
            logging.warning(
                "Received SIGTERM: training stops at the next loop boundary and the "
                "final checkpoint is written."
            )
        self._record(signum, frame)

    def _record(self, signum: int, frame: Any) -> None:
        """Marks the signal received and passes it on down the chain of handlers."""
        self._received.set()
        previous = self._previous
        program = _program_watcher_of(previous)
        if program is not None:
            program._record(signum, frame)  # Recorded without a second log line.
        elif callable(previous):
            previous(signum, frame)


def _program_watcher_of(handler: _Handler) -> Optional[SigtermWatcher]:
    """The program's `SigtermWatcher` (no `is_active`) whose handler `handler` is, else None."""
    watcher = getattr(handler, "__self__", None)
    if isinstance(watcher, SigtermWatcher) and watcher._program_wide:
        return watcher
    return None


def install_sigterm_stop(is_active: Callable[[], bool]) -> Optional[SigtermWatcher]:
    """Installs a training run's SIGTERM stop; returns the watcher, or None when not installed.

    Not installed when `MONOLITH_STOP_ON_SIGTERM` turns it off, off the main
    thread, or when SIGTERM is ignored or handled outside Python (see
    `SigtermWatcher.install`).

    Args:
      is_active: Whether the run still trains (see `SigtermWatcher`).

    Raises:
      ValueError: `MONOLITH_STOP_ON_SIGTERM` holds an unknown value.
    """
    if not stop_on_sigterm_enabled():
        return None
    watcher = SigtermWatcher(is_active=is_active)
    return watcher if watcher.install() else None
