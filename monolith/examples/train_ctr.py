"""Train a small CTR model on a finite stream until it ends by itself.

    python -m monolith.examples.train_ctr                  # CPU, emulated TPU loop
    python -m monolith.examples.train_ctr --num_hosts 2 --replicas_per_host 4  # emulated pod
    python -m monolith.examples.train_ctr --num_hosts 2 --replicas_per_host 2 \
        --host_shard_sizes 40,25 --stop_rule all     # hosts with uneven shards, nothing lost
    python -m monolith.examples.train_ctr --tpu=my-tpu --model_dir=gs://bucket/ctr

On CPU (the default) the TPUEstimator model_fn and input_fn of
`monolith.examples.ctr_model` run through `monolith.core.testing`, the CPU
emulation of TPUEstimator's infeed -> loop -> outfeed wiring, with the real
end-of-stream hook and `BaseEmbeddingHostCall`. With `--tpu` the same model
runs with `TPUEstimator(use_tpu=True)` on a Cloud TPU, the hook installed with
`TPUConfig(experimental_feed_hook=...)`. Either way training stops at the end
of the synthetic stream, the final checkpoint is written, and a report says
what was trained and where the checkpoint and TensorBoard logs are.

On CPU, `--num_hosts` and `--replicas_per_host` emulate a pod (PER_HOST_V2
input, as on the TPU path): each host's input_fn reads its replicas' part of
every global batch, so the pod trains the same global batches (of
`--batch_size`) as one replica would, and the report gives each host's
batches. `--host_shard_sizes 40,25` gives each host its own shard of the
stream instead, of that many per-replica batches (hosts reading files of
different sizes), and `--stop_rule any|all` chooses the stop rule
(`StopRule.ANY_REPLICA_PADDING`, the default: training stops when the
shortest shard ends; `ALL_REPLICAS_PADDING`: when the longest does, every
batch trained). The report then says, per host, how many of its batches
were trained and how many were left untrained.

Restarts: run the same command on the same `--model_dir` and training resumes
after the batches the checkpoint has trained (`skip_trained_batches`); on a
finished model_dir it trains nothing more. The seed is the stream's id: a
restart with another `--seed`, `--batch_size` or pod is refused before
anything trains (the resume guard), and so is a second process on a
model_dir another one trains in (the model_dir lock).

SIGTERM (a preemption, `docker stop`, a Kubernetes eviction) does not kill
the example, from its first lines on: while TensorFlow loads it exits 42 at
once (nothing was done yet); from then on it is recorded, training stops at
the next loop boundary (the first one, if the signal came while the graph
was built or the checkpoint restored) and the checkpoint is written; further
SIGTERMs, or one during the report, change nothing. It exits 42 unless the
stream was trained to its end.

Exit codes:
  0   the stream was trained to its end;
  42  SIGTERM before the stream was trained to its end
      (`preemption.RESTART_EXIT_CODE`): run the same command to resume;
  2   refused, nothing trained: bad flags, a restart whose input differs from
      the checkpoint's, a model_dir another process trains in, a model_dir
      that is a file or not writable, a checkpoint that is unreadable or
      another model's (a few lines on stderr say what to do);
  1   anything else (a traceback).
"""

from __future__ import annotations

import os
import signal

# Before TensorFlow loads: keep its C++ start-up notices out of the example's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_EARLY_EXIT_CODE = 42  # preemption.RESTART_EXIT_CODE, which needs TensorFlow.


def _exit_on_early_sigterm(signum: int, frame: object) -> None:
    """SIGTERM while TensorFlow loads (seconds): nothing was done yet, so exit 42 at once."""
    os.write(1, b"SIGTERM before training started: nothing trained; run the same command.\n")
    os._exit(_EARLY_EXIT_CODE)


if __name__ == "__main__":  # Until run() installs its watcher (Python's default exits 143).
    signal.signal(signal.SIGTERM, _exit_on_early_sigterm)

import argparse
import dataclasses
import glob
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core import preemption, testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.common.model_dir import ModelDirError, check_model_dir
from monolith.core.common.restore_errors import (
    CheckpointRestoreError,
    explain_restore_error,
    tf_error_summary,
)
from monolith.core.feed.model_dir_lock import ModelDirLockedError
from monolith.core.stopping_signals import ResumeMismatchError
from monolith.examples import ctr_model

# What `run()` reports in a few lines and exits 2 for: nothing was trained.
REFUSALS = (ResumeMismatchError, ModelDirLockedError, ModelDirError, CheckpointRestoreError)
REFUSED_EXIT_CODE = 2


@dataclasses.dataclass(frozen=True)
class Report:
    """What a run trained, read back from its checkpoints and event files.

    Attributes:
      stop_reason: Why the feed hook stopped training (`StopReason`), or None
        when it did not (an error, a step limit).
      start_step: Global step restored at the start (0 on a new model_dir);
        `skip_trained_batches` skipped that many steps' batches.
      global_step: Global step in the final checkpoint. `skip_padding_steps`
        keeps padding steps from advancing it, so it counts real steps.
      steps: Real steps this run trained (`global_step - start_step`).
      padding_steps: Padding steps this run ran after the stream ended (they
        changed no weight, optimizer slot or global step), or None where not
        counted (the TPU path: `TPUEstimator.train` does not say how many
        steps it ran, and the global step skips padding steps).
      examples: Examples this run trained.
      total_examples: Examples the model has trained, over all runs.
      final_checkpoint: Path prefix of the final checkpoint.
      tensorboard_logdir: The host call's summaries.
      last_auc: The `auc` summary with the highest step, if this run trained
        any example and wrote one.
      host_batches: On an emulated pod (more than one replica), per host,
        a `HostBatches`; None otherwise.
      stop_rule: The stop rule ("any" or "all").
    """

    stop_reason: Optional[preemption.StopReason]
    start_step: int
    global_step: int
    steps: int
    padding_steps: Optional[int]
    examples: int
    total_examples: int
    final_checkpoint: Optional[str]
    tensorboard_logdir: str
    last_auc: Optional[float]
    host_batches: Optional[tuple] = None
    stop_rule: str = "any"

    def lines(self) -> list:
        auc = "none written" if self.last_auc is None else f"{self.last_auc:.4f}"
        if not self.examples:
            auc = "none (this run trained no example)"
        lines = [_STOP_LINES.get(self.stop_reason, _STOP_LINES[None]).format(self=self)]
        if self.start_step:
            lines.append(
                f"  resumed at step:   {self.start_step} (its batches skipped, not trained again)"
            )
        padding = str(self.padding_steps)
        if self.padding_steps is None:
            padding = "not counted on this path"
        elif self.padding_steps:
            padding += " (they trained nothing: skip_padding_steps)"
        lines += [
            f"  steps trained:     {self.steps} (global step {self.global_step})",
            f"  padding steps:     {padding}",
            f"  examples trained:  {self.examples} ({self.total_examples} in the model)",
        ]
        for host, batches in enumerate(self.host_batches or ()):
            lines.append(f"  {f'host {host}:':<19}{batches.text()}")
        untrained = sum(b.untrained or 0 for b in self.host_batches or ())
        if untrained:
            lines.append(
                f"  NOT TRAINED:       {untrained} real batches (stop rule {self.stop_rule}: "
                "training stopped when the shortest shard ended; --stop_rule all trains them)"
            )
        return lines + [
            f"  final checkpoint:  {self.final_checkpoint}",
            f"  TensorBoard logs:  {self.tensorboard_logdir}",
            f"  last AUC:          {auc}",
            f"  view with:         tensorboard --logdir {self.tensorboard_logdir}",
        ]


@dataclasses.dataclass(frozen=True)
class HostBatches:
    """One host's batches in a run on the emulated pod (`TrainResult`'s per-host counts).

    Attributes:
      trained: Real batches it fed into steps that trained them.
      untrained: Real batches of its stream this run did not train (after a
        stop at the end of the stream; None otherwise).
      padding: Padding batches it fed.
    """

    trained: int
    untrained: Optional[int]
    padding: int

    def text(self) -> str:
        untrained = "" if self.untrained is None else f", {self.untrained} left untrained"
        return f"{self.trained} batches trained{untrained}; {self.padding} padding batches fed"


_STOP_LINES = {
    preemption.StopReason.END_OF_STREAM: "Training stopped at the end of the input stream.",
    preemption.StopReason.SIGTERM: (
        "Training stopped by SIGTERM at step {self.global_step}; checkpoint written; "
        f"run the same command to resume (exit code {preemption.RESTART_EXIT_CODE})."
    ),
    None: "Training stopped before the end of the input stream.",
}


def exit_code(report: Report, sigterm_received: bool = False) -> int:
    """The process exit code for `report`.

    0 when the stream was trained to its end (also if a SIGTERM came during
    the report: a restart would train nothing); `RESTART_EXIT_CODE` (42)
    after a SIGTERM stop, or when a SIGTERM was received at any other moment
    (`sigterm_received`) and the stream was not trained to its end, so a job
    launcher restarts a preempted run instead of taking it for a finished one
    (the convention of TF's `PreemptionCheckpointHandler`); 1 when the feed
    hook did not stop training (it ended some other way before the end of
    the stream).
    """
    if report.stop_reason is preemption.StopReason.END_OF_STREAM:
        return 0
    if report.stop_reason is preemption.StopReason.SIGTERM or sigterm_received:
        return preemption.RESTART_EXIT_CODE
    return 1


class _Progress:
    """Prints step, examples/s and loss after the first loop, then at most every `interval_secs`.

    The rate counts from the end of the first loop, so graph building and
    session start-up (seconds) do not dilute it.
    """

    def __init__(self, batch_size: int, interval_secs: float = 1.0):
        self._batch_size = batch_size
        self._interval = interval_secs
        self._start: Optional[float] = None
        self._last = 0.0
        self._steps = 0

    def __call__(self, global_step: int, loop_steps: int, loss: float) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = self._last = now
            print(f"step {global_step:6d}  {'':20}  loss {loss:.4f}", flush=True)
            return
        self._steps += loop_steps
        if now - self._last < self._interval:
            return
        self._last = now
        rate = self._steps * self._batch_size / max(now - self._start, 1e-9)
        print(f"step {global_step:6d}  {rate:9.0f} examples/s  loss {loss:.4f}", flush=True)


def last_auc(logdir: str) -> Optional[float]:
    """The `auc` summary with the highest step in `logdir`'s event files, if any.

    Of summaries at the same step (a rerun writes its own event file), the
    latest written wins.
    """
    found = None
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                key = (event.step, event.wall_time)
                if value.tag == "auc" and (found is None or key >= found[0]):
                    found = (key, float(tf.make_ndarray(value.tensor)))
    return None if found is None else found[1]


@dataclasses.dataclass(frozen=True)
class _Counters:
    """The model's checkpointed progress counters.

    `unreadable` holds the error when the checkpoint could not be read; the
    restore then fails with a clearer error (naming the file, or every
    variable the checkpoint lacks), so that is the one the run raises.
    """

    checkpoint: Optional[str] = None
    global_step: int = 0
    examples: int = 0
    unreadable: Optional[BaseException] = None


def _read_counters(model_dir: str) -> _Counters:
    """The counters of `model_dir`'s latest checkpoint (zeros without one)."""
    checkpoint = tf.train.latest_checkpoint(model_dir)
    if checkpoint is None:
        return _Counters()
    try:
        reader = tf.train.load_checkpoint(checkpoint)
        return _Counters(
            checkpoint=checkpoint,
            global_step=int(reader.get_tensor("global_step")),
            examples=int(reader.get_tensor(ctr_model.EXAMPLES_TRAINED)),
        )
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as error:
        return _Counters(checkpoint=checkpoint, unreadable=error)


def build_report(
    model_dir: str,
    start: _Counters,
    steps_run: Optional[int] = None,
    host_batches: Optional[tuple] = None,
    stop_rule: str = "any",
) -> Report:
    """What this run trained: `model_dir`'s final counters minus those it started from.

    Args:
      model_dir: The run's model_dir, after training.
      start: The counters it started from (`_read_counters` before training).
      steps_run: Steps the run ran, padding included, if known.
      stop_rule: The run's stop rule ("any" or "all").
      host_batches: Per host, a `HostBatches`, if reported.
    """
    if start.unreadable is not None:  # Training restored it anyway: its counters are unknown.
        raise start.unreadable
    end = _read_counters(model_dir)
    if end.unreadable is not None:
        raise end.unreadable
    steps = end.global_step - start.global_step
    logdir = os.path.join(model_dir, "host_call")
    return Report(
        stop_reason=preemption.last_stop_reason(),
        start_step=start.global_step,
        global_step=end.global_step,
        steps=steps,
        padding_steps=None if steps_run is None else steps_run - steps,
        examples=end.examples - start.examples,
        total_examples=end.examples,
        final_checkpoint=end.checkpoint,
        tensorboard_logdir=logdir,
        # A run that trained no example (a rerun of a finished model_dir) has
        # no AUC of its own: its streaming AUC saw nothing.
        last_auc=last_auc(logdir) if end.examples > start.examples else None,
        host_batches=host_batches,
        stop_rule=stop_rule,
    )


def model_params(args: argparse.Namespace) -> dict:
    """The model's params (TPUEstimator adds `batch_size`, `context` and `use_tpu`)."""
    params = {
        "model_dir": args.model_dir,
        "num_examples": args.num_examples,
        "seed": args.seed,
        "stop_rule": args.stop_rule,
    }
    if args.host_shard_sizes:
        params["host_shard_sizes"] = tuple(args.host_shard_sizes)
    return params


def train_on_cpu(args: argparse.Namespace) -> testing.TrainResult:
    """Trains through the emulated TPU loop (monolith.core.testing) on CPU.

    `--num_hosts` x `--replicas_per_host` replicas, PER_HOST_V2 input as on
    the TPU path, `--batch_size` global.
    """
    return testing.train(
        ctr_model.model_fn,
        ctr_model.input_fn,
        model_dir=args.model_dir,
        iterations_per_loop=args.iterations_per_loop,
        params=model_params(args),
        train_batch_size=args.batch_size,
        num_hosts=args.num_hosts,
        replicas_per_host=args.replicas_per_host,
        save_checkpoints_steps=args.save_checkpoints_steps,
        on_loop_end=_Progress(args.batch_size),
    )


def tpu_run_config(
    args: argparse.Namespace, cluster=None, master: Optional[str] = None
) -> tpu_config.RunConfig:
    """RunConfig with the end-of-stream hook as TPUEstimator's feed hook."""
    return tpu_config.RunConfig(
        cluster=cluster,
        master=master,
        model_dir=args.model_dir,
        save_checkpoints_steps=args.save_checkpoints_steps,
        # RunConfig takes one of the two; the SIGTERM stop writes a checkpoint
        # at the end either way.
        save_checkpoints_secs=None if args.save_checkpoints_steps else 3600,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=args.iterations_per_loop,
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )


def train_on_tpu(args: argparse.Namespace) -> None:
    """Trains with TPUEstimator(use_tpu=True) on the Cloud TPU `args.tpu`."""
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=args.tpu, zone=args.tpu_zone, project=args.gcp_project
    )
    estimator = tpu_estimator.TPUEstimator(
        model_fn=ctr_model.model_fn,
        config=tpu_run_config(args, cluster=resolver),
        params=model_params(args),
        use_tpu=True,
        train_batch_size=args.batch_size,
    )
    # The feed hook ends training at the end of the stream, but on a TPU
    # TPUEstimator.train needs steps or max_steps ("For TPU training, one of
    # steps or max_steps must be set"): it sizes each loop with them. So pass
    # a max_steps that is never reached; the stream's end stops training.
    try:
        estimator.train(ctr_model.input_fn, max_steps=sys.maxsize)
    except (tf.errors.OpError, ValueError) as error:
        explained = explain_restore_error(error, args.model_dir)  # A broken checkpoint?
        if explained is None:
            raise
        raise explained from error


_DEFAULT_NUM_EXAMPLES = 262_144


def _sizes(text: str) -> list:
    """`--host_shard_sizes`: comma-separated positive ints ("40,25")."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be positive ints separated by commas, one per host (e.g. 40,25)"
        )
    return sizes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu", default=None, help="Cloud TPU name; CPU emulation if unset.")
    parser.add_argument("--tpu_zone", default=None)
    parser.add_argument("--gcp_project", default=None)
    parser.add_argument(
        "--model_dir", default=None, help="Checkpoints and logs (default: a new temp dir)."
    )
    parser.add_argument(
        "--num_examples",
        type=int,
        default=None,
        help=f"Examples in the stream (default {_DEFAULT_NUM_EXAMPLES}; with --host_shard_sizes, "
        "the shards' total).",
    )
    parser.add_argument("--batch_size", type=int, default=256, help="Global batch size.")
    parser.add_argument("--iterations_per_loop", type=int, default=10)
    parser.add_argument(
        "--save_checkpoints_steps",
        type=int,
        default=None,
        help="Also save a checkpoint every N steps (default: at the start and the end only; "
        "a SIGTERM stop writes one too).",
    )
    parser.add_argument(
        "--num_hosts",
        type=int,
        default=1,
        help="CPU only: hosts of the emulated pod (each with its own input pipeline).",
    )
    parser.add_argument(
        "--replicas_per_host", type=int, default=1, help="CPU only: replicas per emulated host."
    )
    parser.add_argument(
        "--host_shard_sizes",
        type=_sizes,
        default=None,
        help="CPU only: each emulated host reads its own shard of the stream, of this many "
        "per-replica batches (e.g. 40,25: one size per host) instead of its part of every "
        "global batch.",
    )
    parser.add_argument(
        "--stop_rule",
        choices=sorted(ctr_model.STOP_RULES),
        default="any",
        help="any (default, StopRule.ANY_REPLICA_PADDING): stop on the first step in which "
        "any replica's batch is padding; all (ALL_REPLICAS_PADDING): only on a step in "
        "which every replica's is, training every batch of uneven shards.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="Keep TensorFlow's INFO logs.")
    args = parser.parse_args(argv)
    replicas = args.num_hosts * args.replicas_per_host
    if args.host_shard_sizes:
        if args.num_examples is not None:
            parser.error("--num_examples and --host_shard_sizes: give one of them")
        if args.tpu:
            parser.error("--host_shard_sizes describes the emulated pod's hosts on CPU")
        if len(args.host_shard_sizes) != args.num_hosts:
            parser.error(
                f"--host_shard_sizes gives {len(args.host_shard_sizes)} shard(s) for "
                f"--num_hosts={args.num_hosts}"
            )
        if args.batch_size % replicas == 0:
            args.num_examples = sum(args.host_shard_sizes) * (args.batch_size // replicas)
    if args.num_examples is None:
        args.num_examples = _DEFAULT_NUM_EXAMPLES
    for name in ("num_examples", "batch_size", "iterations_per_loop", "num_hosts"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
    if args.replicas_per_host <= 0:
        parser.error(f"--replicas_per_host={args.replicas_per_host} must be positive")
    if args.tpu and replicas > 1:
        parser.error(
            "--num_hosts and --replicas_per_host describe the emulated pod on CPU; with --tpu "
            "the TPU's own topology is used"
        )
    if args.batch_size % replicas:
        parser.error(
            f"--batch_size={args.batch_size} (global) must be divisible by the {replicas} "
            f"replicas (--num_hosts={args.num_hosts} x "
            f"--replicas_per_host={args.replicas_per_host})"
        )
    if args.save_checkpoints_steps is not None and args.save_checkpoints_steps <= 0:
        parser.error(f"--save_checkpoints_steps={args.save_checkpoints_steps} must be positive")
    if args.num_examples < args.batch_size:
        parser.error(
            f"--num_examples={args.num_examples} is less than one batch "
            f"(--batch_size={args.batch_size})"
        )
    if args.model_dir is None:
        if args.tpu:
            parser.error("--model_dir is required with --tpu (a gs:// path the TPU can write)")
        args.model_dir = tempfile.mkdtemp(prefix="monolith_ctr_")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Report:
    """Trains as `argv` says, prints the report and returns it (see `exit_code`).

    Raises:
      One of `REFUSALS` (`run()` prints it and exits 2): the checkpoint was
      trained on another input (`ResumeMismatchError`), another process
      trains in model_dir (`ModelDirLockedError`), model_dir is a file or not
      writable (`ModelDirError`), its checkpoint is unreadable or another
      model's (`CheckpointRestoreError`).
    """
    args = parse_args(argv)
    if not args.verbose:
        # TensorFlow's deprecation notices would bury the progress lines.
        tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    where = f"Cloud TPU {args.tpu}" if args.tpu else "CPU (emulated TPU loop)"
    if args.num_hosts * args.replicas_per_host > 1:
        where = (
            f"CPU (emulated pod of {args.num_hosts} hosts x {args.replicas_per_host} replicas, "
            f"{args.batch_size // (args.num_hosts * args.replicas_per_host)} per replica)"
        )
    if args.host_shard_sizes:
        shards = ",".join(map(str, args.host_shard_sizes))
        where += f", host shards of {shards} batches"
    if args.host_shard_sizes or args.stop_rule != "any":
        where += f", stop rule {args.stop_rule}"
    print(
        f"Training a CTR model on {args.num_examples} synthetic examples "
        f"(batch {args.batch_size}, {args.iterations_per_loop} steps per loop) on {where}; "
        f"model_dir {args.model_dir}",
        flush=True,
    )
    check_model_dir(args.model_dir)
    start = _read_counters(args.model_dir)
    started = time.monotonic()
    steps_run = host_batches = None
    if args.tpu:
        train_on_tpu(args)
    else:
        result = train_on_cpu(args)
        steps_run = result.steps_run
        if args.num_hosts * args.replicas_per_host > 1:
            untrained = result.untrained_real_batches or (None,) * args.num_hosts
            host_batches = tuple(
                HostBatches(trained, left, padding)
                for trained, left, padding in zip(
                    result.trained_real_batches, untrained, result.padding_batches
                )
            )
    report = build_report(args.model_dir, start, steps_run, host_batches, args.stop_rule)
    print(f"Done in {time.monotonic() - started:.1f} s.")
    print("\n".join(report.lines()), flush=True)
    return report


def _hold_sigterm() -> Optional[preemption.SigtermWatcher]:
    """Installs the program's SIGTERM watcher (None when MONOLITH_STOP_ON_SIGTERM=0).

    From here to the exit a SIGTERM is recorded, not fatal: the feed hook's
    watcher, installed on top of it while training, stops at the next loop
    boundary (at the first one when the SIGTERM came before training
    started: graph building, the restore), and `run()` exits 42 unless the
    stream was trained to its end. With the SIGTERM stop turned off,
    SIGTERM gets its default action back.
    """
    early = signal.getsignal(signal.SIGTERM) is _exit_on_early_sigterm
    if not preemption.stop_on_sigterm_enabled():
        if early:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return None
    if early:  # Not chained to: the program's watcher takes over from here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watcher = preemption.SigtermWatcher()
    return watcher if watcher.install() else None


def _print_refusal(error: BaseException) -> None:
    """The error's message on stderr, and TensorFlow's cause in one line."""
    print(f"error: {error}", file=sys.stderr)
    cause = error.__cause__
    if isinstance(cause, (tf.errors.OpError, ValueError)):
        print(f"  (cause: {type(cause).__name__}: {tf_error_summary(cause)})", file=sys.stderr)


def run(argv: Optional[Sequence[str]] = None, *, exiting: bool = False) -> int:
    """The command line: `main(argv)` with SIGTERM held; returns the exit code.

    A refusal (`REFUSALS`) prints a few lines on stderr and returns 2 (see
    the module docstring).

    Args:
      argv: The flags.
      exiting: Keyword-only. The process exits with the returned code next
        (`__main__`): SIGTERM is then ignored from the moment the code is
        decided. Python puts the default handler back while it shuts the
        interpreter down (after the atexit handlers), so a second SIGTERM
        during the exit would otherwise kill the process with 143 (measured:
        one sent 0.1 s after the first). False: a caller in this process gets
        its SIGTERM handler back.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    watcher = _hold_sigterm()
    try:
        try:
            report = main(argv)
        except REFUSALS as error:
            _print_refusal(error)
            return REFUSED_EXIT_CODE
        return exit_code(report, sigterm_received=watcher is not None and watcher.received)
    finally:
        if exiting and watcher is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif previous is not None and not exiting:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], exiting=True))
