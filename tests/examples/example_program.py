"""The example's command line (`train_ctr.run`), with moments a test can rely on.

    python tests/examples/example_program.py MOMENTS [train_ctr flags...]

MOMENTS is a comma-separated list (or "-" for none) of:
  graph   send itself SIGTERM while the graph is built (in input_fn), before
          the feed hook installs its SIGTERM watcher;
  report  send itself SIGTERM when the report starts being built, after training;
  slow    sleep 50 ms after every loop, so that a long run leaves CPU to other
          processes on a loaded machine (a second process can start meanwhile);
  exit    once `run()` returned, a shell loop sends SIGTERM every millisecond
          until the process is gone: through the interpreter's shutdown too.
A signal sent from inside at a named moment is deterministic where a timed
signal from outside would not be.
"""

import functools
import os
import signal
import subprocess
import sys
import time

from monolith.examples import ctr_model, train_ctr


def _sigterm_before(function):
    @functools.wraps(function)  # The same signature: the emulator passes what it accepts.
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


class _SlowProgress(train_ctr._Progress):
    def __call__(self, *args):
        super().__call__(*args)
        time.sleep(0.05)


if __name__ == "__main__":
    moments = set(sys.argv[1].split(","))
    if "graph" in moments:
        ctr_model.input_fn = _sigterm_before(ctr_model.input_fn)
    if "report" in moments:
        train_ctr.build_report = _sigterm_before(train_ctr.build_report)
    if "slow" in moments:
        train_ctr._Progress = _SlowProgress
    code = train_ctr.run(sys.argv[2:], exiting=True)
    if "exit" in moments:
        loop = f"while kill -TERM {os.getpid()} 2>/dev/null; do sleep 0.001; done"
        # Not holding the output pipes: the caller waits for them to close.
        quiet = subprocess.DEVNULL
        subprocess.Popen(["sh", "-c", loop], stdin=quiet, stdout=quiet, stderr=quiet)
    sys.exit(code)
