"""The CTR example on the emulated pod: 1 host x 1 replica against 2 hosts x 4 replicas.

Runs the example's model and input (`monolith.examples.ctr_model`) through
`monolith.core.testing.train` on one replica and on an emulated pod of 2
hosts x 4 replicas (PER_HOST_V2), with the same global batch, so both train
the same global batches of the same stream to its end. Each run is timed
from the end of its first loop (graph building and session start excluded)
to the end of its last, over the real steps it trained; rounds alternate the
topologies. The table gives the median examples/s of each (wall clock), the
median examples per CPU second (process CPU time, all threads: steadier than
wall time on a shared machine), their ratios to one replica, and the median
time to the end of the first loop (building the pod's graph builds the step
once per replica).

What the ratio measures: the emulator's cost of a pod on CPU (8 copies of
the step in one graph, 8 infeed queues, a 2-host input pipeline that reads
the stream twice), not a TPU's speed.

Run: `python benchmarks/pod_throughput.py` (about a minute on 2 cores);
`--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

from _common import add_common_args, median, print_header, print_table, setup_tensorflow

TOPOLOGIES = [(1, 1), (2, 4)]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--num_examples", type=int, default=None, help="default 262144 (quick 2048)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="global; default 256 (quick 64)"
    )
    parser.add_argument(
        "--iterations_per_loop", type=int, default=None, help="default 10 (quick 4)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (quick 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.num_examples = args.num_examples or (2048 if quick else 262_144)
    args.batch_size = args.batch_size or (64 if quick else 256)
    args.iterations_per_loop = args.iterations_per_loop or (4 if quick else 10)
    args.rounds = args.rounds or (1 if quick else 3)
    return args


def _run(
    args: argparse.Namespace, num_hosts: int, replicas_per_host: int
) -> Tuple[float, float, int]:
    """One training run to the end of the stream: (examples/s, seconds to the first loop, steps)."""
    from monolith.core import testing
    from monolith.examples import ctr_model

    loops: List[Tuple[float, float, int]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pod_throughput_") as model_dir:
        testing.train(
            ctr_model.model_fn,
            ctr_model.input_fn,
            model_dir=model_dir,
            iterations_per_loop=args.iterations_per_loop,
            params={"model_dir": model_dir, "num_examples": args.num_examples, "seed": 0},
            train_batch_size=args.batch_size,
            num_hosts=num_hosts,
            replicas_per_host=replicas_per_host,
            log_step_count_steps=None,
            on_loop_end=lambda step, _steps, _loss: loops.append(
                (time.perf_counter(), time.process_time(), step)
            ),
        )
    (first_wall, first_cpu, first_step), (last_wall, last_cpu, last_step) = loops[0], loops[-1]
    examples = (last_step - first_step) * args.batch_size
    return (
        examples / max(last_wall - first_wall, 1e-9),
        examples / max(last_cpu - first_cpu, 1e-9),
        first_wall - started,
        last_step,
    )


def main(argv: Sequence[str]) -> None:
    args = _parse(argv)
    setup_tensorflow(args.tf_behavior)
    print_header(
        "Emulated pod: the CTR example at 1x1 and 2x4 replicas, the same global batch",
        args.tf_behavior,
        [
            f"num_examples {args.num_examples}, global batch {args.batch_size}, "
            f"iterations_per_loop {args.iterations_per_loop}, rounds {args.rounds}",
        ],
    )
    rates: Dict[Tuple[int, int], List[float]] = {t: [] for t in TOPOLOGIES}
    cpu_rates: Dict[Tuple[int, int], List[float]] = {t: [] for t in TOPOLOGIES}
    starts: Dict[Tuple[int, int], List[float]] = {t: [] for t in TOPOLOGIES}
    steps: Dict[Tuple[int, int], int] = {}
    for _ in range(args.rounds):
        for topology in TOPOLOGIES:
            rate, cpu_rate, start, trained = _run(args, *topology)
            rates[topology].append(rate)
            cpu_rates[topology].append(cpu_rate)
            starts[topology].append(start)
            steps[topology] = trained
    one, one_cpu = median(rates[TOPOLOGIES[0]]), median(cpu_rates[TOPOLOGIES[0]])
    rows = []
    for topology in TOPOLOGIES:
        hosts, per_host = topology
        replicas = hosts * per_host
        rate, cpu_rate = median(rates[topology]), median(cpu_rates[topology])
        rows.append(
            [
                f"{hosts}x{per_host}",
                replicas,
                args.batch_size // replicas,
                args.batch_size,
                steps[topology],
                f"{rate:,.0f}",
                f"{rate / one:.2f}",
                f"{cpu_rate:,.0f}",
                f"{cpu_rate / one_cpu:.2f}",
                f"{median(starts[topology]):.1f}",
            ]
        )
    print_table(
        [
            "hosts x replicas",
            "replicas",
            "per-replica batch",
            "global batch",
            "steps",
            "examples/s",
            "vs 1x1",
            "examples/CPU s",
            "CPU vs 1x1",
            "first loop (s)",
        ],
        rows,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
