"""Feed hook: overhead against TPUEstimator's stock hook, and stop latency.

Both parts run `monolith.core.testing`'s CPU emulation of TPUEstimator's TPU
training: an infeed FIFOQueue filled by the hook's infeed thread, one
`session.run(train_op)` per loop of `iterations_per_loop` steps (a
`tf.while_loop`), an outfeed FIFOQueue drained by the hook's outfeed thread,
all under `tf.compat.v1.train.MonitoredSession` with TPUEstimator's own
`_TPUStopAtStepHook`.

1. Overhead. One graph (a linear model on an endless input, so the stream
   never ends while timed; the stop flag is still outfed every step) is
   trained by fresh sessions with our
   `TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook` and with
   tensorflow-estimator's stock `TPUInfeedOutfeedSessionHook`, each built with
   the same ops, a real `ErrorRendezvous` and `testing.FakeTPUContext` (both
   then skip TPU initialisation). A round runs ours, ours without
   `before_run`'s wait for the outfeed thread ("no-wait": what the
   stop-latency floor costs), stock and stock again
   (order rotating), each timing `loops` loops after `warmup` loops, from the
   first timed loop until the hook's `end()` has joined its feed threads (the
   stock outfeed thread may lag behind the loop; the emulated outfeed queue
   is unbounded). The ratios ours/stock of wall and process CPU time per loop
   are taken per round and summarised by median, min and max; stock
   again/stock is the same measurement between identical runs, i.e. the noise
   floor. "ours" runs as a subclass that only records how long `before_run`
   waits for the outfeed thread (two `perf_counter` calls per loop).

1b. Per-step Python of the feed threads: each hook's `_run_infeed` and
   `_run_outfeed` bodies run on the main thread with a session whose `run`
   returns at once, isolating what the hook itself adds per step.

2. Stop latency. A stream of real batches followed by endless padding batches
   is trained for every end position within a loop, with our hook and with
   the ORIGINAL design: a subclass whose `before_run` reads the stop flag
   without first waiting for the outfeed thread to finish the previous loop.
   As on a TPU, the host side of the outfeed finishes a step a little after
   the device did: each step takes `--step-ms` and the host call
   `--outfeed-ms`, so the outfeed thread keeps pace but completes a loop's
   last step after `session.run` has returned. Reported: padding steps
   trained after the end of the stream.

3. Profile (full runs, or `--only profile`): cProfile of the training thread
   with our hook and its no-wait variant: how long `before_run` and its wait
   for the outfeed thread take per loop.

Run: `python benchmarks/feed_hook_overhead.py` (5-6 minutes on 2 cores);
`--quick` for a smoke run; `--help` for the sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
from monolith.core.feed.session import FeedSession

SIGNAL = _USER_PROVIDED_SIGNAL_NAME
BATCH = 32
FEATURES = 16
OURS = "ours"
OURS_NO_WAIT = "ours, no wait"  # ours without before_run's wait: what the stop-latency floor costs
STOCK = "stock"
STOCK_AGAIN = "stock again"  # a second stock run per round: the A/A noise floor
KINDS = (OURS, OURS_NO_WAIT, STOCK, STOCK_AGAIN)


class _NoWaitFeedSession(FeedSession):
    """A feed session that decides without waiting for the outfeed thread.

    `before_run` calls `FeedSession.check_before_loop`, which calls
    `wait_for_outfeed()` to block until the outfeed thread has processed
    every loop sent so far, and only then reads the stop flag; the original
    read the flag straight away. Skipping the wait is the only change.
    """

    def wait_for_outfeed(self) -> None:
        pass


class OriginalDesignHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Our hook with the original's stop decision: no wait for the outfeed thread."""

    _feed_session_class = _NoWaitFeedSession


class _TimedFeedSession(FeedSession):
    """A feed session appending how long each wait for the outfeed thread took to `waits`."""

    def __init__(self, *args: Any, waits: List[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._waits = waits

    def wait_for_outfeed(self) -> None:
        start = time.perf_counter()
        super().wait_for_outfeed()
        self._waits.append(time.perf_counter() - start)


class _WaitTimingHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Our hook, recording how long each `before_run` waits for the outfeed thread."""

    def __init__(self, *args: Any, waits: List[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._feed_session_class = functools.partial(_TimedFeedSession, waits=waits)


class _NoWaitTimingHook(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
    """Our hook without the wait for the outfeed thread (the ORIGINAL stop decision)."""

    _feed_session_class = _NoWaitFeedSession


class _EndClockHook(tf.compat.v1.train.SessionRunHook):
    """Records when `end()` runs; placed after the feed hook, whose `end()` joins its threads."""

    def __init__(self) -> None:
        self.ended_at: Optional[float] = None
        self.cpu_at_end: Optional[float] = None

    def end(self, session: Any) -> None:
        del session
        self.ended_at = time.perf_counter()
        self.cpu_at_end = time.process_time()


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
            (outfeed_queue,) = [
                op
                for op in self._graph.get_operations()
                if op.type == "FIFOQueueV2" and "emulated_outfeed" in op.name
            ]
            self._outfeed_size = tf.raw_ops.QueueSizeV2(handle=outfeed_queue.outputs[0])
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
        if kind == OURS_NO_WAIT:
            return _NoWaitTimingHook(*args, **kwargs)
        return TPUInfeedOutfeedSessionHook(*args, **kwargs)

    def _wait_until_outfed(self, sess: Any, hook: Any) -> None:
        """Blocks until the outfeed thread has drained everything sent so far.

        The stock hook lets its outfeed thread fall behind the training loop;
        the timed part must not inherit a backlog from the warm-up loops.
        """
        deadline = time.monotonic() + 60
        if isinstance(hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
            controller = hook._feed.outfeed
        else:
            controller = hook._outfeed_controller
        while controller._queue.qsize() or sess.run_step_fn(
            lambda step_context: step_context.session.run(self._outfeed_size)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the outfeed thread did not catch up within 60 s")
            time.sleep(0.001)

    def run(self, kind: str, warmup: int, loops: int) -> Tuple[float, float, float]:
        """Seconds per timed loop: (wall, trained and outfed), (wall, trained only), CPU.

        The clock starts before the first of `loops` loops run after `warmup`
        loops (once the outfeed has caught up). "Trained only" stops after the
        last `session.run(train_op)`; "trained and outfed" once the feed hook's
        `end()` has joined its feed threads, so it includes outfeed work the
        stock hook's thread still had to do. CPU is the process's CPU time
        (all threads) over the "trained and outfed" interval.
        """
        hook = self._make_hook(kind)
        steps = (warmup + loops) * self.iterations_per_loop
        runs = 0
        waits_before = len(self.waits)
        end_clock = _EndClockHook()
        with self._graph.as_default():
            stop_hook = testing.iterations_per_loop_hook(self.iterations_per_loop, steps=steps)
            creator = tf.compat.v1.train.ChiefSessionCreator(scaffold=self._scaffold)
            try:
                with tf.compat.v1.train.MonitoredSession(
                    session_creator=creator, hooks=[stop_hook, hook, end_clock]
                ) as sess:
                    while not sess.should_stop():
                        if runs == warmup:
                            self._wait_until_outfed(sess, hook)
                            start = time.perf_counter()
                            cpu_start = time.process_time()
                        sess.run(self._built.train_op)
                        runs += 1
                    trained = time.perf_counter()
            except Exception:
                hook._rendezvous.record_error("training_loop", sys.exc_info())
            finally:
                hook._rendezvous.record_done("training_loop")
                hook._rendezvous.raise_errors()
        if runs != warmup + loops:
            raise RuntimeError(f"{kind}: ran {runs} loops, expected {warmup + loops}")
        # Only the timed loops' waits count (the first loop has none).
        del self.waits[waits_before : waits_before + warmup - 1]
        return (
            (end_clock.ended_at - start) / loops,
            (trained - start) / loops,
            (end_clock.cpu_at_end - cpu_start) / loops,
        )


def measure_overhead(
    iterations_per_loop: int, rounds: int, warmup: int, loops: int
) -> Dict[str, Any]:
    """Per-round seconds per loop of each kind of run (see `run`), and our hook's waits.

    Each round runs ours, ours without the wait, stock and stock again,
    rotating the order by one each round, so no kind always runs first or
    after the same other kind.
    """
    bench = _OverheadBench(iterations_per_loop)
    for kind in (OURS, OURS_NO_WAIT, STOCK):  # untimed: first-session effects
        bench.run(kind, warmup=1, loops=1)
    bench.waits.clear()
    outfed: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    trained: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    cpu: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        shift = r % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:
            total, train_only, cpu_time = bench.run(kind, warmup, loops)
            outfed[kind].append(total)
            trained[kind].append(train_only)
            cpu[kind].append(cpu_time)
    return {"outfed": outfed, "trained": trained, "cpu": cpu, "waits": list(bench.waits)}


def _ratios(values: Dict[str, List[float]], kind: str) -> List[float]:
    return [a / b for a, b in zip(values[kind], values[STOCK])]


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
    parser.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 12)")
    parser.add_argument(
        "--loops",
        type=int,
        default=None,
        help="timed loops per round (default 3000/iterations_per_loop, at least 60)",
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
    parser.add_argument("--only", choices=["overhead", "latency", "profile"], default=None)
    args = parser.parse_args(argv)
    quick = {"iterations": [10], "rounds": 2, "loops": 10, "warmup": 2, "latency_iterations": [2]}
    full = {"iterations": [10, 100], "rounds": 12, "warmup": 5, "latency_iterations": [4, 10]}
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
    return args.loops if args.loops is not None else max(60, 3000 // iterations_per_loop)


def _overhead_part(args: argparse.Namespace) -> None:
    print(
        "1. Overhead: time per loop until the loop is trained AND outfed (the hook's end() "
        "joined its feed threads), ours / stock TPUInfeedOutfeedSessionHook, as a ratio per "
        "round; wall clock and process CPU time (all threads). 'stock again' is a second "
        "identical stock run in the same round: its ratio is this machine's noise floor. "
        "'ours no-wait' is our hook with before_run's wait for the outfeed thread removed "
        "(the ORIGINAL stop decision): the difference to 'ours' is the price of the "
        "stop-latency floor. "
        "'train-only' stops the wall clock at the last session.run, crediting the stock hook "
        "with outfeed work its thread still had queued (on a TPU the bounded outfeed would "
        "stall the device instead)."
    )
    rows = []
    for ipl in args.iterations:
        loops = _loops_for(args, ipl)
        found = measure_overhead(ipl, args.rounds, args.warmup, loops)
        outfed = found["outfed"]
        cpu = found["cpu"]
        wait_mean = sum(found["waits"]) / len(found["waits"])

        def summary(values: Dict[str, List[float]], kind: str) -> str:
            ratios = _ratios(values, kind)
            return f"{median(ratios):.3f} ({min(ratios):.2f} - {max(ratios):.2f})"

        rows.append(
            [
                ipl,
                f"{args.rounds} x {loops}",
                f"{median(outfed[OURS]) * 1e3:.2f}",
                f"{median(outfed[STOCK]) * 1e3:.2f}",
                summary(cpu, OURS),
                summary(cpu, OURS_NO_WAIT),
                f"{median(_ratios(cpu, STOCK_AGAIN)):.3f}",
                f"{median(_ratios(outfed, OURS)):.3f}",
                f"{median(_ratios(outfed, OURS_NO_WAIT)):.3f}",
                f"{median(_ratios(outfed, STOCK_AGAIN)):.3f}",
                f"{median(_ratios(found['trained'], OURS)):.3f}",
                f"{wait_mean * 1e3:.3f} ({wait_mean / median(outfed[OURS]):.1%})",
                summary(outfed, OURS),
            ]
        )
    print_table(
        [
            "iterations_per_loop",
            "rounds x loops",
            "ours ms/loop",
            "stock ms/loop",
            "CPU ours/stock median (min - max)",
            "CPU ours no-wait/stock",
            "CPU stock again/stock (A/A)",
            "wall ours/stock",
            "wall ours no-wait/stock",
            "wall stock again/stock (A/A)",
            "train-only wall ours/stock",
            "ours: before_run wait ms/loop",
            "wall ours/stock median (min - max)",
        ],
        rows,
    )


class _FakeSession:
    """Returns a ready outfeed result: isolates the feed threads' own Python work."""

    def __init__(self, result: Any):
        self._result = result

    def run(self, fetches: Any) -> Any:
        del fetches
        return self._result


class _OneLoop:
    """A controller stand-in that hands the thread body a single loop of `steps`."""

    def __init__(self, steps: int):
        self._steps = steps

    def read_iteration_counts(self) -> Any:
        yield self._steps


def python_cost_per_step(hook_class: type, body: str, steps: int, repeats: int = 5) -> float:
    """Seconds per step of a feed-thread body (`_run_infeed`/`_run_outfeed`) without TF.

    The body runs on this thread with a session whose `run` returns at once
    (an outfeed result with a False stop flag): what remains is the hook's
    per-step Python (loop, checks, logging calls), best of `repeats`.
    """
    result = {
        SIGNAL: {"stopping": np.zeros([1], np.bool_)},
        "host_call": np.zeros([1], np.float32),
        "__force_dequeue": None,
    }
    hook = hook_class(
        testing.FakeTPUContext(),
        [],
        {SIGNAL: None},
        tpu_compile_op=None,
        rendezvous=error_handling.ErrorRendezvous(num_sources=2),
    )
    if isinstance(hook, TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook):
        # What a feed thread runs in: bound to its session's runtime.
        feed = FeedSession(
            tf.train.Coordinator(),
            hook.rendezvous,
            join_timeout_secs=1.0,
            waits_for_outfeed=True,
        )
        thread_context: Any = feed.bound_to_this_thread()
    else:
        thread_context = contextlib.nullcontext()
    best = float("inf")
    with thread_context:
        for _ in range(repeats):
            start = time.perf_counter()
            getattr(hook, body)(_OneLoop(steps), _FakeSession(result))
            best = min(best, time.perf_counter() - start)
    return best / steps


def _python_cost_part(args: argparse.Namespace) -> None:
    steps = 2000 if args.quick else 100_000
    print(
        "1b. The hooks' own Python per step in each feed thread (thread body run with a "
        f"session that returns at once; best of 5 x {steps:,} steps). Ours adds a "
        "coordinator check per step and reads the stop flag (_stopping_value) per outfeed "
        "step until it is seen; whether to log steps is decided once per loop."
    )
    rows = []
    for body in ("_run_infeed", "_run_outfeed"):
        ours = python_cost_per_step(TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook, body, steps)
        stock = python_cost_per_step(TPUInfeedOutfeedSessionHook, body, steps)
        rows.append(
            [body, f"{ours * 1e6:.2f}", f"{stock * 1e6:.2f}", f"{(ours - stock) * 1e6:+.2f}"]
        )
    print_table(["thread body", "ours us/step", "stock us/step", "ours - stock us/step"], rows)


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


# Training-thread functions the profile part reports (directory/file:function).
_PROFILED = (
    "training/monitored_session.py:run",
    "client/session.py:run",
    "core/auto_checkpoint_feed_hook.py:before_run",
    "feed/session.py:check_before_loop",
    "feed/session.py:wait_for_outfeed",
    "feed/controllers.py:wait_for_finished_loops",
    "feed/session.py:raise_feed_error",
    "feed/session.py:send_loop",
    "feed/controllers.py:send_next_batch_signal",
)


def _profiled_name(filename: str, func: str) -> str:
    """`directory/file:function`, the form of `_PROFILED` (TF and we both have a session.py)."""
    directory, base = os.path.split(filename)
    return f"{os.path.basename(directory)}/{base}:{func}"


def _profile_part(args: argparse.Namespace) -> None:
    """cProfile of the training thread with our hook, with and without the wait."""
    import cProfile
    import pstats

    for ipl in args.iterations:
        loops = _loops_for(args, ipl)
        bench = _OverheadBench(ipl)
        for kind in (OURS, OURS_NO_WAIT):
            bench.run(kind, warmup=1, loops=1)
            profiler = cProfile.Profile()
            profiler.enable()
            bench.run(kind, warmup=args.warmup, loops=loops)
            profiler.disable()
            print(
                f"3. Profile of the training thread, {kind}, iterations_per_loop {ipl}, "
                f"{loops} loops (cumulative seconds; the feed threads are part 1b):"
            )
            stats = pstats.Stats(profiler)
            stats.sort_stats("cumulative")
            shown = set()
            for (filename, _, func), row in sorted(
                stats.stats.items(), key=lambda item: -item[1][3]
            ):
                where = _profiled_name(filename, func)
                if where in _PROFILED and where not in shown:
                    shown.add(where)
                    print(f"  {where:52s} calls {row[1]:6d}  cumulative {row[3]:.3f} s")
            print(flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    setup_tensorflow(args.tf_behavior)
    loops = ", ".join(f"{ipl}: {_loops_for(args, ipl)}" for ipl in args.iterations)
    print_header(
        "Feed hook benchmark: monolith.core emulated TPU loop on CPU",
        args.tf_behavior,
        [
            f"overhead: iterations_per_loop {args.iterations}, {args.rounds} rounds of "
            "(ours, ours no-wait, stock, stock again) in rotating order, "
            f"timed loops per round {{{loops}}} after {args.warmup} warm-up loops; linear "
            f"model, batch {BATCH}x{FEATURES}, endless input, outfeed every step",
            f"stop latency: iterations_per_loop {args.latency_iterations}, step "
            f"{args.step_ms:g} ms, host call {args.outfeed_ms:g} ms",
        ],
    )
    if args.only in (None, "overhead"):
        _overhead_part(args)
        _python_cost_part(args)
    if args.only in (None, "latency"):
        _latency_part(args)
    if args.only == "profile" or (args.only is None and not args.quick):
        _profile_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
