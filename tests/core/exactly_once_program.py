"""A small end-of-stream training program that the exactly-once tests kill, stop and restart.

Run as `python -m tests.core.exactly_once_program --model_dir DIR [options]` with
PYTHONPATH at the repository root; `MONOLITH_TF_BEHAVIOR=v1` runs it after
`tf.compat.v1.disable_v2_behavior()`, as the test session does.

It trains through the CPU emulation of the TPU loop (`monolith.core.testing.train`)
the way a user's TPUEstimator program would: the input_fn resumes with
`skip_trained_batches` and ends with `append_stopping_signals` (with
`--stop_rule`); the model_fn trains `masked_mean_loss` with
`skip_padding_steps(CrossShardOptimizer(..., reduction=SUM))`. Ids 1..N are
shuffled with a seed (a deterministic order, which resuming rests on) and
batched. In the same train op as its weight update, the model adds to
checkpointed counters, summed over replicas and only on steps that train
(`is_padding_step`): `trained_times[id]` (how often each id was trained),
`real_examples` and `id_sum`. A run that trains every real example exactly
once ends with `trained_times[1:] == 1`, `real_examples == N` and `id_sum ==
N(N+1)/2`.

On an emulated pod (`--num_hosts`, `--replicas_per_host`, PER_HOST_V2),
`--host_shards 12,7` gives host h its own shard of that many batches (of
`--batch` examples, one per replica and step): host 0 the first 12 * batch
ids, host 1 the next 7 * batch, each shuffled with the seed; N is their
total. Without it, one host reads all N ids.

Hooks into the step for the tests (a py_func that sees the global step, i.e.
the number of real steps trained before this step; it stays at the number of
real batches on padding steps, which do not advance it):
  --kill_at_step K: SIGKILL itself in that step (a crash at an arbitrary point).
  --pause_at_step K --pause_file F: write F + ".reached" and wait (up to 60 s)
    until F exists, so the test can signal the process while it is provably
    mid-stream.
  --abort_at_step K: a hook raises AbortedError after the first loop that
    reaches K, once: MonitoredSession recreates the session in-process.

The last line on stdout is a JSON summary of the run (global step, steps and
loops run, sessions created, the feed hook's stop reason). After a SIGTERM
stop the program exits with `preemption.RESTART_EXIT_CODE`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf

if os.environ.get("MONOLITH_TF_BEHAVIOR") == "v1":
    tf.compat.v1.disable_v2_behavior()

from tensorflow_estimator.python.estimator.tpu.tpu_estimator import (  # noqa: E402
    TPUEstimatorSpec,
)

from monolith.core import preemption, testing  # noqa: E402
from monolith.core.stopping_signals import (  # noqa: E402
    USER_PROVIDED_SIGNAL_NAME,
    StopRule,
    append_stopping_signals,
    is_padding_step,
    masked_mean_loss,
    skip_padding_steps,
    skip_trained_batches,
)

_PAUSE_LIMIT_SECS = 60.0


_RULES = {"any": StopRule.ANY_REPLICA_PADDING, "all": StopRule.ALL_REPLICAS_PADDING}


def _shard(args, host: int) -> tuple:
    """(first id, number of ids) of `host`'s shard."""
    if not args.host_shards:
        return 1, args.num_examples
    before = sum(args.host_shards[:host]) * args.batch
    return before + 1, args.host_shards[host] * args.batch


def _make_input_fn(args):
    def input_fn(params):
        context = params.get("context")
        first, count = _shard(args, context.current_host if context is not None else 0)
        ids = tf.data.Dataset.range(first, first + count).shuffle(count, seed=7)
        dataset = ids.batch(args.batch, drop_remainder=True).map(lambda x: {"id": x})
        dataset = skip_trained_batches(dataset, context=context)
        return append_stopping_signals(dataset, stop_rule=_RULES[args.stop_rule])

    return input_fn


def _step_probe(args):
    """The per-step test hook (runs in the training session's thread)."""

    def probe(step):
        step = int(step)
        if step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.pause_at_step and not os.path.exists(args.pause_file + ".reached"):
            with open(args.pause_file + ".reached", "w") as f:
                f.write(str(step))
            deadline = time.monotonic() + _PAUSE_LIMIT_SECS
            while not os.path.exists(args.pause_file) and time.monotonic() < deadline:
                time.sleep(0.01)
        return np.int64(step)

    return probe


def _make_model_fn(args):
    def model_fn(features, mode, params):
        real = 1 - tf.cast(features[USER_PROVIDED_SIGNAL_NAME], tf.int64)
        ids = features["id"] * real  # padding ids are 0 anyway
        global_step = tf.compat.v1.train.get_global_step()
        probed = tf.compat.v1.py_func(_step_probe(args), [global_step], tf.int64, stateful=True)
        weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.zeros_initializer())
        target = tf.cast(ids, tf.float32) / args.num_examples
        loss = masked_mean_loss(tf.square(weight - target), features)
        trained_times = tf.compat.v1.get_variable(
            "trained_times",
            [args.num_examples + 1],
            tf.int64,
            tf.compat.v1.zeros_initializer(),
            trainable=False,
        )
        real_examples = tf.compat.v1.get_variable(
            "real_examples", [], tf.int64, tf.compat.v1.zeros_initializer(), trainable=False
        )
        id_sum = tf.compat.v1.get_variable(
            "id_sum", [], tf.int64, tf.compat.v1.zeros_initializer(), trainable=False
        )
        optimizer = skip_padding_steps(
            tf.compat.v1.tpu.CrossShardOptimizer(
                tf.compat.v1.train.GradientDescentOptimizer(0.1),
                reduction=tf.compat.v1.losses.Reduction.SUM,
            ),
            features,
        )
        with tf.control_dependencies([probed]):
            minimize = optimizer.minimize(loss, global_step=global_step)
        # Every replica's real examples (each replica holds a copy of the
        # counters), added only on the steps that train.
        counts = tf.math.unsorted_segment_sum(
            tf.cast(real, tf.int32), features["id"], args.num_examples + 1
        )
        counts = tf.compat.v1.tpu.cross_replica_sum(counts)
        counts = tf.where(is_padding_step(features), tf.zeros_like(counts), counts)
        counts = tf.cast(counts, tf.int64)
        train_op = tf.group(
            minimize,
            trained_times.assign_add(counts),
            real_examples.assign_add(tf.reduce_sum(counts)),
            id_sum.assign_add(
                tf.reduce_sum(counts * tf.range(args.num_examples + 1, dtype=tf.int64))
            ),
        )
        return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)

    return model_fn


class _CountSessions(tf.compat.v1.train.SessionRunHook):
    def __init__(self):
        self.sessions = 0

    def after_create_session(self, session, coord):
        self.sessions += 1


class _AbortOnce(tf.compat.v1.train.SessionRunHook):
    """Raises AbortedError after the first loop that ends at or past `at_step`, once."""

    def __init__(self, at_step: int):
        self._at_step = at_step
        self.aborted = False

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(tf.compat.v1.train.get_global_step())

    def after_run(self, run_context, run_values):
        # run_values holds the step read before the loop; the loop ran more.
        if not self.aborted and run_values.results >= self._at_step:
            self.aborted = True
            raise tf.errors.AbortedError(None, None, "injected: the TPU worker restarted")


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--num_examples", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations_per_loop", type=int, default=2)
    parser.add_argument("--save_checkpoints_steps", type=int, default=None)
    parser.add_argument("--kill_at_step", type=int, default=-1)
    parser.add_argument("--pause_at_step", type=int, default=-1)
    parser.add_argument("--pause_file", default="")
    parser.add_argument("--abort_at_step", type=int, default=-1)
    parser.add_argument("--num_hosts", type=int, default=1)
    parser.add_argument("--replicas_per_host", type=int, default=1)
    parser.add_argument("--host_shards", default="", help="Batches per host, e.g. 12,7.")
    parser.add_argument("--stop_rule", choices=sorted(_RULES), default="any")
    args = parser.parse_args(argv)
    args.host_shards = [int(n) for n in args.host_shards.split(",")] if args.host_shards else []
    if args.host_shards:
        args.num_examples = sum(args.host_shards) * args.batch
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    sessions = _CountSessions()
    hooks = [sessions]
    if args.abort_at_step >= 0:
        hooks.append(_AbortOnce(args.abort_at_step))
    replicas = args.num_hosts * args.replicas_per_host
    result = testing.train(
        _make_model_fn(args),
        _make_input_fn(args),
        model_dir=args.model_dir,
        iterations_per_loop=args.iterations_per_loop,
        save_checkpoints_steps=args.save_checkpoints_steps,
        hooks=hooks,
        num_hosts=args.num_hosts,
        replicas_per_host=args.replicas_per_host,
        train_batch_size=args.batch * replicas if replicas > 1 else None,
    )
    reason = preemption.last_stop_reason()
    summary = {
        "global_step": result.global_step,
        "steps_run": result.steps_run,
        "loops_run": result.loops_run,
        "sessions": sessions.sessions,
        "stop_reason": reason.value if reason is not None else None,
    }
    print(json.dumps(summary), flush=True)
    return preemption.RESTART_EXIT_CODE if reason is preemption.StopReason.SIGTERM else 0


if __name__ == "__main__":
    sys.exit(main())
