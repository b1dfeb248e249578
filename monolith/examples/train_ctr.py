"""Train a small CTR model on a finite stream until it ends by itself.

    python -m monolith.examples.train_ctr                  # CPU, emulated TPU loop
    python -m monolith.examples.train_ctr --tpu=my-tpu --model_dir=gs://bucket/ctr

On CPU (the default) the TPUEstimator model_fn and input_fn of
`monolith.examples.ctr_model` run through `monolith.core.testing`, the CPU
emulation of TPUEstimator's infeed -> loop -> outfeed wiring, with the real
end-of-stream hook and `BaseEmbeddingHostCall`. With `--tpu` the same model
runs with `TPUEstimator(use_tpu=True)` on a Cloud TPU, the hook installed with
`TPUConfig(experimental_feed_hook=...)`. Either way training stops at the end
of the synthetic stream, the final checkpoint is written, and a report says
what was trained and where the checkpoint and TensorBoard logs are.
"""

from __future__ import annotations

import os

# Before TensorFlow loads: keep its C++ start-up notices out of the example's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import dataclasses
import glob
import sys
import tempfile
import time
from typing import Optional, Sequence

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from monolith.core import testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.examples import ctr_model


@dataclasses.dataclass(frozen=True)
class Report:
    """What a run trained, read back from its final checkpoint and event files."""

    steps: int
    real_steps: int
    padding_steps: int
    examples: int
    final_checkpoint: Optional[str]
    tensorboard_logdir: str
    last_auc: Optional[float]

    def lines(self) -> list:
        auc = "none written" if self.last_auc is None else f"{self.last_auc:.4f}"
        return [
            "Training stopped at the end of the input stream.",
            f"  steps trained:     {self.steps} ({self.real_steps} on real batches, "
            f"{self.padding_steps} on padding)",
            f"  examples trained:  {self.examples}",
            f"  final checkpoint:  {self.final_checkpoint}",
            f"  TensorBoard logs:  {self.tensorboard_logdir}",
            f"  last AUC:          {auc}",
            f"  view with:         tensorboard --logdir {self.tensorboard_logdir}",
        ]


class _Progress:
    """Prints step, examples/s and loss at most every `interval_secs`."""

    def __init__(self, batch_size: int, interval_secs: float = 1.0):
        self._batch_size = batch_size
        self._interval = interval_secs
        self._start = self._last = time.monotonic()
        self._steps = 0

    def __call__(self, global_step: int, loop_steps: int, loss: float) -> None:
        self._steps += loop_steps
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        rate = self._steps * self._batch_size / max(now - self._start, 1e-9)
        print(f"step {global_step:6d}  {rate:9.0f} examples/s  loss {loss:.4f}", flush=True)


def last_auc(logdir: str) -> Optional[float]:
    """The `auc` summary with the highest step in `logdir`'s event files, if any."""
    found = None
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "auc" and (found is None or event.step >= found[0]):
                    found = (event.step, float(tf.make_ndarray(value.tensor)))
    return None if found is None else found[1]


def build_report(model_dir: str, batch_size: int, start_step: int) -> Report:
    """Reads what this run trained from `model_dir`'s final checkpoint."""
    checkpoint = tf.train.latest_checkpoint(model_dir)
    reader = tf.train.load_checkpoint(checkpoint)
    steps = int(reader.get_tensor("global_step")) - start_step
    examples = int(reader.get_tensor(ctr_model.EXAMPLES_TRAINED))
    real_steps = examples // batch_size
    logdir = os.path.join(model_dir, "host_call")
    return Report(
        steps=steps,
        real_steps=real_steps,
        padding_steps=steps - real_steps,
        examples=examples,
        final_checkpoint=checkpoint,
        tensorboard_logdir=logdir,
        last_auc=last_auc(logdir),
    )


def _params(args: argparse.Namespace, on_tpu: bool) -> dict:
    return {
        "model_dir": args.model_dir,
        "num_examples": args.num_examples,
        "seed": args.seed,
        "on_tpu": on_tpu,
    }


def _start_step(model_dir: str) -> int:
    checkpoint = tf.train.latest_checkpoint(model_dir)
    if checkpoint is None:
        return 0
    return int(tf.train.load_checkpoint(checkpoint).get_tensor("global_step"))


def train_on_cpu(args: argparse.Namespace) -> None:
    """Trains through the emulated TPU loop (monolith.core.testing) on CPU."""
    testing.train(
        ctr_model.model_fn,
        ctr_model.input_fn,
        model_dir=args.model_dir,
        iterations_per_loop=args.iterations_per_loop,
        params={**_params(args, on_tpu=False), "batch_size": args.batch_size},
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
        save_checkpoints_steps=None,
        save_checkpoints_secs=3600,
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
        params=_params(args, on_tpu=True),
        use_tpu=True,
        train_batch_size=args.batch_size,
    )
    # The feed hook ends training at the end of the stream, but on a TPU
    # TPUEstimator.train needs steps or max_steps ("For TPU training, one of
    # steps or max_steps must be set"): it sizes each loop with them. So pass
    # a max_steps that is never reached; the stream's end stops training.
    estimator.train(ctr_model.input_fn, max_steps=sys.maxsize)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu", default=None, help="Cloud TPU name; CPU emulation if unset.")
    parser.add_argument("--tpu_zone", default=None)
    parser.add_argument("--gcp_project", default=None)
    parser.add_argument(
        "--model_dir", default=None, help="Checkpoints and logs (default: a new temp dir)."
    )
    parser.add_argument("--num_examples", type=int, default=262_144)
    parser.add_argument("--batch_size", type=int, default=256, help="Global batch size.")
    parser.add_argument("--iterations_per_loop", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="Keep TensorFlow's INFO logs.")
    args = parser.parse_args(argv)
    for name in ("num_examples", "batch_size", "iterations_per_loop"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
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
    args = parse_args(argv)
    if not args.verbose:
        # TensorFlow's deprecation notices would bury the progress lines.
        tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    where = f"Cloud TPU {args.tpu}" if args.tpu else "CPU (emulated TPU loop)"
    print(
        f"Training a CTR model on {args.num_examples} synthetic examples "
        f"(batch {args.batch_size}, {args.iterations_per_loop} steps per loop) on {where}; "
        f"model_dir {args.model_dir}",
        flush=True,
    )
    start_step = _start_step(args.model_dir)
    start = time.monotonic()
    (train_on_tpu if args.tpu else train_on_cpu)(args)
    report = build_report(args.model_dir, args.batch_size, start_step)
    print(f"Done in {time.monotonic() - start:.1f} s.")
    print("\n".join(report.lines()), flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
