"""Feed hook: overhead against TPUEstimator's stock hook, and stop latency.

Both parts run `monolith.core.testing`'s CPU emulation of TPUEstimator's TPU
training: an infeed FIFOQueue filled by the hook's infeed thread, one
`session.run(train_op)` per loop of `iterations_per_loop` steps (a
`tf.while_loop`), an outfeed FIFOQueue drained by the hook's outfeed thread,
all under `tf.compat.v1.train.MonitoredSession` with TPUEstimator's own
`_TPUStopAtStepHook`.

1. Overhead. One graph (a linear model on an endless input, so the stream
   never ends while timed; the stop flag is still outfed every step) is
   trained by fresh sessions in alternating order with our
   `TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook` and with
   tensorflow-estimator's stock `TPUInfeedOutfeedSessionHook`, each built with
   the same ops, a real `ErrorRendezvous` and `testing.FakeTPUContext` (both
   then skip TPU initialisation). A round times `loops` loops after `warmup`
   loops; the ratio ours/stock of the wall time per loop is taken per round
   (one run of each hook, back to back) and summarised by median, min and max.
   "ours" runs as a subclass that only records how long `before_run` waits for
   the outfeed thread (two `perf_counter` calls per loop).

2. Stop latency. A stream of real batches followed by endless padding batches
   is trained for every end position within a loop, with our hook and with
   the ORIGINAL design: a subclass whose `before_run` reads the stop flag
   without first waiting for the outfeed thread to finish the previous loop.
   As on a TPU, the host side of the outfeed finishes a step a little after
   the device did: each step takes `--step-ms` and the host call
   `--outfeed-ms`, so the outfeed thread keeps pace but completes a loop's
   last step after `session.run` has returned. Reported: padding steps
   trained after the end of the stream.

Run: `python benchmarks/feed_hook_overhead.py` (2-3 minutes on 2 cores);
`--quick` for a smoke run; `--help` for the sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from _common import add_common_args, median, print_header, print_table, setup_tensorflow
from tensorflow.core.protobuf.tpu import compilation_result_pb2
from tensorflow_estimator.python.estimator.tpu import error_handling
from tensorflow_estimator.python.estimator.tpu.tpu_estimator import (
    TPUEstimatorSpec,
    TPUInfeedOutfeedSessionHook,
)

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    _USER_PROVIDED_SIGNAL_NAME,
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)

SIGNAL = _USER_PROVIDED_SIGNAL_NAME
BATCH = 32
FEATURES = 16
OURS = "ours"
STOCK = "stock"


class OriginalDesignHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Our hook with the original's stop decision: no wait for the outfeed thread.

    `before_run` calls `_wait_for_outfeed(loops)` to block until the outfeed
    thread has processed every loop sent so far, and only then reads the stop
    flag; the original read the flag straight away. Skipping the wait is the
    only change.
    """

    def _wait_for_outfeed(self, loops: int) -> None:
        del loops


class _WaitTimingHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Our hook, recording how long each `before_run` waits for the outfeed thread."""

    def __init__(self, *args: Any, waits: List[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._waits = waits

    def _wait_for_outfeed(self, loops: int) -> None:
        start = time.perf_counter()
        super()._wait_for_outfeed(loops)
        self._waits.append(time.perf_counter() - start)


# -- models and inputs ----------------------------------------------------------------


def _linear_model_fn(features: Any, mode: str, params: dict) -> TPUEstimatorSpec:
    """A small linear regression step, identical for both hooks."""
    weights = tf.compat.v1.get_variable(
        "w", [FEATURES, 1], tf.float32, tf.compat.v1.zeros_initializer()
    )
    loss = tf.reduce_mean(tf.square(tf.matmul(features["x"], weights) - features["y"]))
    train_op = tf.compat.v1.train.GradientDescentOptimizer(0.01).minimize(
        loss, global_step=tf.compat.v1.train.get_global_step()
    )
    return TPUEstimatorSpec(mode, loss=loss, train_op=train_op)


def _endless_input_fn() -> tf.data.Dataset:
    """Real batches forever: the stop flag is outfed every step, never True."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    features = {"x": x, "y": x.sum(axis=1, keepdims=True), SIGNAL: np.zeros([BATCH], np.bool_)}
    return tf.data.Dataset.from_tensors(features).repeat()


def _padded_input_fn(num_batches: int) -> Callable[[], tf.data.Dataset]:
    """`num_batches` real batches (flag False), then endless padding (flag True)."""

    def input_fn() -> tf.data.Dataset:
        real = tf.data.Dataset.from_tensors(
            {"x": tf.ones([BATCH, 1]), SIGNAL: tf.zeros([BATCH], tf.bool)}
        ).repeat(num_batches)
        pad = tf.data.Dataset.from_tensors(
            {"x": tf.zeros([BATCH, 1]), SIGNAL: tf.ones([BATCH], tf.bool)}
        ).repeat()
        return real.concatenate(pad)

    return input_fn


def _sleep(seconds: float, after: tf.Tensor) -> tf.Tensor:
    """A float32 scalar computed `seconds` after `after` is."""

    def _sleep_then_zero(unused: np.ndarray) -> np.float32:
        time.sleep(seconds)
        return np.float32(0)

    return tf.numpy_function(_sleep_then_zero, [after], tf.float32, stateful=True)


def _slow_model_fn(step_secs: float, outfeed_secs: float) -> Callable[..., TPUEstimatorSpec]:
    """A step taking `step_secs`, with a host call taking `outfeed_secs` per step."""

    def model_fn(features: Any, mode: str, params: dict) -> TPUEstimatorSpec:
        weight = tf.compat.v1.get_variable("w", [], tf.float32, tf.compat.v1.ones_initializer())
        loss = tf.reduce_mean(features["x"]) * weight
        minimize = tf.compat.v1.train.GradientDescentOptimizer(0.01).minimize(
            loss, global_step=tf.compat.v1.train.get_global_step()
        )
        return TPUEstimatorSpec(
            mode,
            loss=loss,
            train_op=tf.group(minimize, _sleep(step_secs, loss)),
            host_call=(lambda x: _sleep(outfeed_secs, x), [features["x"]]),
        )

    return model_fn


# -- 1. overhead ----------------------------------------------------------------------


class _OverheadBench:
    """One emulated training graph, trained by fresh sessions with either hook."""

    def __init__(self, iterations_per_loop: int):
        self.iterations_per_loop = iterations_per_loop
        self.waits: List[float] = []
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._built = testing.build_emulated_training(_linear_model_fn, _endless_input_fn)
            self._compile_op = tf.constant(
                compilation_result_pb2.CompilationResultProto().SerializeToString()
            )
            self._scaffold = tf.compat.v1.train.Scaffold()
        self._ctx = testing.FakeTPUContext()

    def _make_hook(self, kind: str) -> tf.compat.v1.train.SessionRunHook:
        """A new hook with exactly the arguments TPUEstimator passes."""
        kwargs = dict(
            tpu_compile_op=self._compile_op,
            run_infeed_loop_on_coordinator=True,
            rendezvous=error_handling.ErrorRendezvous(num_sources=3),
            master=None,
            session_config=None,
            tpu_init_ops=[self._built.iterator_initializer],
            outfeed_every_n_steps=1,
        )
        args = (self._ctx, self._built.enqueue_ops, self._built.dequeue_ops)
        if kind == OURS:
            return _WaitTimingHook(*args, waits=self.waits, **kwargs)
        return TPUInfeedOutfeedSessionHook(*args, **kwargs)

    def run(self, kind: str, warmup: int, loops: int) -> float:
        """Wall seconds per loop over `loops` loops run after `warmup` loops."""
        hook = self._make_hook(kind)
        steps = (warmup + loops) * self.iterations_per_loop
        elapsed = 0.0
        runs = 0
        waits_before = len(self.waits)
        with self._graph.as_default():
            stop_hook = testing.iterations_per_loop_hook(self.iterations_per_loop, steps=steps)
            creator = tf.compat.v1.train.ChiefSessionCreator(scaffold=self._scaffold)
            try:
                with tf.compat.v1.train.MonitoredSession(
                    session_creator=creator, hooks=[stop_hook, hook]
                ) as sess:
                    while not sess.should_stop():
                        start = time.perf_counter()
                        sess.run(self._built.train_op)
                        if runs >= warmup:
                            elapsed += time.perf_counter() - start
                        runs += 1
            except Exception:
                hook._rendezvous.record_error("training_loop", sys.exc_info())
            finally:
                hook._rendezvous.record_done("training_loop")
                hook._rendezvous.raise_errors()
        if runs != warmup + loops:
            raise RuntimeError(f"{kind}: ran {runs} loops, expected {warmup + loops}")
        # Only the timed loops' waits count (the first loop has none).
        del self.waits[waits_before : waits_before + warmup - 1]
        return elapsed / loops


def measure_overhead(
    iterations_per_loop: int, rounds: int, warmup: int, loops: int
) -> Dict[str, Any]:
    """Per-round wall seconds per loop of each hook, and our hook's waits."""
    bench = _OverheadBench(iterations_per_loop)
    for kind in (OURS, STOCK):  # untimed: first-session effects
        bench.run(kind, warmup=1, loops=1)
    bench.waits.clear()
    per_loop: Dict[str, List[float]] = {OURS: [], STOCK: []}
    for r in range(rounds):
        for kind in (OURS, STOCK) if r % 2 == 0 else (STOCK, OURS):
            per_loop[kind].append(bench.run(kind, warmup, loops))
    return {"per_loop": per_loop, "waits": list(bench.waits)}


# -- 2. stop latency ------------------------------------------------------------------


def padding_steps_trained(
    hook_class: type,
    num_batches: int,
    iterations_per_loop: int,
    step_secs: float,
    outfeed_secs: float,
) -> int:
    """Padding steps trained after `num_batches` real batches until the hook stopped."""
    with tempfile.TemporaryDirectory() as model_dir:
        result = testing.train(
            _slow_model_fn(step_secs, outfeed_secs),
            _padded_input_fn(num_batches),
            model_dir=model_dir,
            iterations_per_loop=iterations_per_loop,
            hook_class=hook_class,
        )
    if not result.stopped_at_end_of_stream:
        raise RuntimeError(f"{hook_class.__name__} did not stop at the end of the stream")
    return result.steps_run - num_batches


# -- main -----------------------------------------------------------------------------


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--iterations",
        type=int,
        nargs="+",
        default=None,
        help="iterations_per_loop values of the overhead part (default 10 100)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 8)")
    parser.add_argument(
        "--loops",
        type=int,
        default=None,
        help="timed loops per round (default 3000/iterations_per_loop, at least 100)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed loops per round (5)")
    parser.add_argument(
        "--latency-iterations",
        type=int,
        nargs="+",
        default=None,
        help="iterations_per_loop values of the stop-latency part (default 4 10)",
    )
    parser.add_argument("--step-ms", type=float, default=10.0, help="emulated step time")
    parser.add_argument("--outfeed-ms", type=float, default=5.0, help="host call time per step")
    parser.add_argument("--only", choices=["overhead", "latency"], default=None)
    args = parser.parse_args(argv)
    quick = {"iterations": [10], "rounds": 2, "loops": 10, "warmup": 2, "latency_iterations": [2]}
    full = {"iterations": [10, 100], "rounds": 8, "warmup": 5, "latency_iterations": [4, 10]}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("rounds", "loops", "warmup", "step_ms", "outfeed_ms"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}={value} must be positive")
    for name in ("iterations", "latency_iterations"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} values must be >= 1")
    return args


def _loops_for(args: argparse.Namespace, iterations_per_loop: int) -> int:
    return args.loops if args.loops is not None else max(100, 3000 // iterations_per_loop)


def _overhead_part(args: argparse.Namespace) -> None:
    print(
        "1. Overhead: wall time per loop, ours / stock TPUInfeedOutfeedSessionHook "
        "(ratio per round, one run of each back to back; the order alternates)."
    )
    rows = []
    for ipl in args.iterations:
        loops = _loops_for(args, ipl)
        found = measure_overhead(ipl, args.rounds, args.warmup, loops)
        ours, stock = found["per_loop"][OURS], found["per_loop"][STOCK]
        ratios = [o / s for o, s in zip(ours, stock)]
        waits = found["waits"]
        wait_mean = sum(waits) / len(waits)
        rows.append(
            [
                ipl,
                f"{args.rounds} x {loops}",
                f"{median(ours) * 1e3:.2f}",
                f"{median(stock) * 1e3:.2f}",
                f"{median(ratios):.3f}",
                f"{min(ratios):.3f}",
                f"{max(ratios):.3f}",
                f"{wait_mean * 1e3:.3f} ({wait_mean / median(ours):.1%})",
            ]
        )
    print_table(
        [
            "iterations_per_loop",
            "rounds x loops",
            "ours ms/loop",
            "stock ms/loop",
            "ours/stock median",
            "min",
            "max",
            "ours: before_run wait ms/loop",
        ],
        rows,
    )


def _latency_part(args: argparse.Namespace) -> None:
    print(
        "2. Stop latency: padding steps trained after the end of the stream, for every end "
        f"position in a loop (step {args.step_ms:g} ms, host call {args.outfeed_ms:g} ms per "
        "step). ORIGINAL = before_run decides from the flag without waiting for the outfeed "
        "thread."
    )
    rows = []
    for ipl in args.latency_iterations:
        ours: List[int] = []
        original: List[int] = []
        # The first loop is all real batches; the stream ends at step `position` of the second.
        for position in range(ipl):
            for hook_class, found in (
                (TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook, ours),
                (OriginalDesignHook, original),
            ):
                found.append(
                    padding_steps_trained(
                        hook_class,
                        ipl + position,
                        ipl,
                        args.step_ms / 1e3,
                        args.outfeed_ms / 1e3,
                    )
                )
        rows.append(
            [
                ipl,
                max(ours),
                max(original),
                " ".join(map(str, ours)),
                " ".join(map(str, original)),
            ]
        )
    print_table(
        [
            "iterations_per_loop",
            "ours worst",
            "ORIGINAL worst",
            "ours, end at step 0,1,.. of a loop",
            "ORIGINAL, end at step 0,1,..",
        ],
        rows,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    setup_tensorflow(args.tf_behavior)
    loops = ", ".join(f"{ipl}: {_loops_for(args, ipl)}" for ipl in args.iterations)
    print_header(
        "Feed hook benchmark: monolith.core emulated TPU loop on CPU",
        args.tf_behavior,
        [
            f"overhead: iterations_per_loop {args.iterations}, {args.rounds} rounds per hook, "
            f"timed loops per round {{{loops}}} after {args.warmup} warm-up loops; linear "
            f"model, batch {BATCH}x{FEATURES}, endless input, outfeed every step",
            f"stop latency: iterations_per_loop {args.latency_iterations}, step "
            f"{args.step_ms:g} ms, host call {args.outfeed_ms:g} ms",
        ],
    )
    if args.only in (None, "overhead"):
        _overhead_part(args)
    if args.only in (None, "latency"):
        _latency_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
