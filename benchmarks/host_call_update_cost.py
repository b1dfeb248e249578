"""Host call caching: per-step cost of `update_tpu_variables_ops` against the window size.

In caching mode `BaseEmbeddingHostCall.update_tpu_variables_ops` appends each
step's `top_k_sampling_num_per_core` labels, predictions and uid buckets (and
one request time and sample rate) to per-core variables holding a window of
`top_k * host_call_every_n_steps` elements. It does so by roll-and-add: the
step's values are zero-padded to the window, rolled to the write offset and
added (after a `tf.where` that clears the window at its first step), so every
step reads and writes the whole window of the three window variables.

For windows from 10^2 to 10^5 elements this times one `session.run` of the
update op (fed the global step, so windows advance and clear as in training)
against baselines built on variables of the same sizes, all in one session
and interleaved run by run:

- empty run: a `no_op` with the same feed (the fixed cost of a session.run);
- full write: `assign(v, v + 1)` on the same five variables (one elementwise
  pass over each window: the least any whole-window update costs);
- slice write: `scatter_update` of only the step's `top_k` (and 1) elements at
  the same offset (what an in-place update would cost; on TPU this would be a
  dynamic-update-slice).

Times are medians over `--runs` runs after `--warmup` runs; "net" columns
subtract the empty run. The host call is built with `params["cpu_test"]=True`
(one replica on the default device, as with `TPUEstimator(use_tpu=False)`).

Run: `python benchmarks/host_call_update_cost.py` (well under a minute);
`--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from _common import add_common_args, median, print_header, print_table, setup_tensorflow

from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall

# (top_k_sampling_num_per_core, host_call_every_n_steps): windows 10^2 .. 10^5.
FULL_SIZES = [(10, 10), (30, 10), (100, 10), (100, 30), (100, 100), (300, 100), (1000, 100)]
QUICK_SIZES = [(10, 10), (100, 100)]
UPDATE = "update"
EMPTY = "empty"
FULL_WRITE = "full_write"
SLICE_WRITE = "slice_write"


def _window_variables(host_call: BaseEmbeddingHostCall) -> List[Tuple[tf.Variable, int]]:
    """(variable, elements written per step) of the five cached windows."""
    top_k = host_call._top_k_sampling_num_per_core
    return [
        (host_call._labels_tpu_variable, top_k),
        (host_call._preds_tpu_variable, top_k),
        (host_call._uid_buckets_tpu_variable, top_k),
        (host_call._req_times_tpu_variable, 1),
        (host_call._sample_rates_tpu_variable, 1),
    ]


def _baseline_ops(
    host_call: BaseEmbeddingHostCall, step: tf.Tensor, every_n: int
) -> Dict[str, tf.Operation]:
    """Baselines on separate variables shaped and typed like the cached windows."""
    full_writes = []
    slice_writes = []
    counter = tf.cast(tf.math.floormod(step - 1, every_n), tf.int32)
    for n, (cached, per_step) in enumerate(_window_variables(host_call)):
        shape = cached.shape.as_list()
        dtype = cached.dtype.base_dtype
        full = tf.compat.v1.get_variable(
            f"full_write_{n}", shape, dtype, tf.compat.v1.zeros_initializer(), use_resource=True
        )
        full_writes.append(full.assign(full + tf.ones(shape, dtype), read_value=False))
        part = tf.compat.v1.get_variable(
            f"slice_write_{n}", shape, dtype, tf.compat.v1.zeros_initializer(), use_resource=True
        )
        indices = counter * per_step + tf.range(per_step)
        slice_writes.append(
            tf.compat.v1.scatter_update(part, indices, tf.ones([per_step], dtype)).op
        )
    return {
        EMPTY: tf.no_op(),
        FULL_WRITE: tf.group(full_writes),
        SLICE_WRITE: tf.group(slice_writes),
    }


def measure(top_k: int, every_n: int, runs: int, warmup: int) -> Dict[str, List[float]]:
    """Seconds per session.run of the update op and the baselines, interleaved."""
    with tf.Graph().as_default(), tempfile.TemporaryDirectory() as output_dir:
        tf.compat.v1.train.get_or_create_global_step()
        host_call = BaseEmbeddingHostCall(
            output_dir,
            enable_host_call=True,
            enable_deepinsight=False,
            enable_host_call_scalar_metrics=False,
            enable_caching_with_tpu_var_mode=True,
            top_k_sampling_num_per_core=top_k,
            params={"enable_host_call": True, "cpu_test": True, "host_call_every_n_steps": every_n},
        )
        step = tf.compat.v1.placeholder(tf.int64, [], name="global_step_value")
        rng = np.random.default_rng(0)
        (update,) = host_call.update_tpu_variables_ops(
            step,
            labels=tf.constant(rng.random(top_k, np.float32)),
            preds=tf.constant(rng.random(top_k, np.float32)),
            uid_buckets=tf.constant(rng.integers(0, 1000, top_k, np.int32)),
            req_times=tf.constant([1700000000], tf.int64),
            sample_rates=tf.constant([0.5], tf.float32),
        )
        ops = {UPDATE: update, **_baseline_ops(host_call, step, every_n)}
        times: Dict[str, List[float]] = {name: [] for name in ops}
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for hook in host_call.tpu_var_restore_hooks:
                hook.after_create_session(sess, None)
            names = list(ops)
            for i in range(warmup + runs):
                feed = {step: i + 1}
                # Rotate the order so no op always runs right after the same other op.
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    start = time.perf_counter()
                    sess.run(ops[name], feed)
                    if i >= warmup:
                        times[name].append(time.perf_counter() - start)
            # Sanity check: the update really ran, window by window.
            steps_cached = sess.run(host_call._accumulated_counter_tpu_variable.read_value())
            expected = (warmup + runs - 1) % every_n + 1
            if steps_cached != expected:
                raise RuntimeError(f"window holds {steps_cached} steps, expected {expected}")
    return times


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per op (default 2000)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 200)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 30 if args.quick else 2000
    if args.warmup is None:
        args.warmup = 5 if args.quick else 200
    if args.runs < 1 or args.warmup < 0:
        parser.error(f"--runs={args.runs} must be >= 1 and --warmup={args.warmup} >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    setup_tensorflow(args.tf_behavior)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    print_header(
        "Host call caching: cost of update_tpu_variables_ops per step (one replica, CPU)",
        args.tf_behavior,
        [
            f"(top_k, host_call_every_n_steps): {sizes}",
            f"median of {args.runs} session.run calls per op after {args.warmup} warm-up "
            "runs, ops interleaved run by run",
        ],
    )
    rows = []
    for top_k, every_n in sizes:
        times = {
            name: median(values)
            for name, values in measure(top_k, every_n, args.runs, args.warmup).items()
        }
        empty = times[EMPTY]
        net_update = times[UPDATE] - empty
        net_full = times[FULL_WRITE] - empty
        net_slice = times[SLICE_WRITE] - empty
        rows.append(
            [
                f"{top_k * every_n:,}",
                top_k,
                every_n,
                f"{times[UPDATE] * 1e6:.0f}",
                f"{times[FULL_WRITE] * 1e6:.0f}",
                f"{times[SLICE_WRITE] * 1e6:.0f}",
                f"{empty * 1e6:.0f}",
                f"{times[UPDATE] / times[FULL_WRITE]:.2f}",
                f"{net_update * 1e6:.0f}",
                f"{net_full * 1e6:.0f}",
                f"{net_slice * 1e6:.0f}",
                f"{net_update / net_full:.2f}" if net_full > 0 else "n/a",
            ]
        )
    print_table(
        [
            "window",
            "top_k",
            "every_n",
            "update us",
            "full write us",
            "slice write us",
            "empty run us",
            "update/full",
            "net update us",
            "net full us",
            "net slice us",
            "net update/full",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
