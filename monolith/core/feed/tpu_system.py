"""TPU-system steps of the feed hook's `after_create_session`, read from the environment as TF does.

The hook (`monolith.core.auto_checkpoint_feed_hook`) runs these on the
training thread, in this order, before it starts the feed threads:
`initialize_tpu_system` (unless the TPU was initialised at startup for model
parallelism), `run_init_ops`, the compile check when `split_compile_enabled()`
(the hook's own `_assertCompilationSucceeded`, as in the original), and after
the threads `start_worker_watchdog`. `watchdog_timeout_from_env` is read
first of all, so that a bad value raises before anything starts.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import tensorflow as tf
from absl import logging
from tensorflow.python.tpu import session_support

INIT_OPS_TIMEOUT_MS = 30 * 60 * 1000
SPLIT_COMPILE_ENV = "TPU_SPLIT_COMPILE_AND_EXECUTE"
WATCHDOG_ENV = "TF_TPU_WATCHDOG_TIMEOUT"


def watchdog_timeout_from_env() -> int:
    """Seconds from TF_TPU_WATCHDOG_TIMEOUT (0, the default, disables the worker watchdog).

    Raises:
      ValueError: The variable is not an integer.
    """
    raw = os.environ.get(WATCHDOG_ENV, "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{WATCHDOG_ENV}={raw!r} is not an integer number of seconds.") from None


def split_compile_enabled() -> bool:
    """Whether TPU_SPLIT_COMPILE_AND_EXECUTE=1 asks to compile (and check) before running."""
    return os.environ.get(SPLIT_COMPILE_ENV, "") == "1"


def initialize_tpu_system(
    job: Optional[str],
    embedding_config: Any,
    master: Optional[str],
    session_config: Optional[tf.compat.v1.ConfigProto],
) -> None:
    """Runs `initialize_system` in a fresh graph and session against `master`."""
    logging.info("Init TPU system")
    start = time.time()
    with tf.Graph().as_default():
        init_op = tf.compat.v1.tpu.initialize_system(job=job, embedding_config=embedding_config)
        with tf.compat.v1.Session(master, config=session_config) as init_session:
            init_session.run(init_op)
    logging.info("Initialized TPU in %d seconds", time.time() - start)


def run_init_ops(session: Any, init_ops: Sequence[Any]) -> None:
    """Runs the hook's init ops (tpu_init_ops and summary-writer initializers), 30 min at most."""
    session.run(list(init_ops), options=tf.compat.v1.RunOptions(timeout_in_ms=INIT_OPS_TIMEOUT_MS))


def start_worker_watchdog(session: Any, timeout_secs: int) -> None:
    """Starts TF's worker watchdog (terminates workers once the coordinator exits); 0: none."""
    if timeout_secs > 0:
        session_support.start_worker_watchdog(session, shutdown_timeout=timeout_secs)
