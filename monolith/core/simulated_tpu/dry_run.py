"""Dry-run an unchanged TPUEstimator program on CPU, up to the TPU device boundary.

    python -m monolith.core.simulated_tpu [--num_hosts H] [--cores_per_host C] \\
        (-m MODULE | SCRIPT) [ARGS...]

A program that passes on CPU should work the first time it reaches a TPU, but
the TPU path (`TPUEstimator(use_tpu=True)`, `TPUClusterResolver`, the `train`
call) only runs there. The dry run runs the program itself, in this process
(`runpy`, as `python -m cProfile` does), on a simulated TPU system of
`H` hosts x `C` cores:

- TPUEstimator's TPU system query is answered by the simulated system
  (`simulated_tpu.simulated_tpu_system`);
- `TPUClusterResolver(tpu=<any name>, zone=..., project=...)` resolves to it
  without contacting GCP: `master()` is the simulated master, `cluster_spec()`
  has one `worker` task per host (`simulated_tpu.simulated_cluster_resolver`);
- TPUEstimator builds its whole graph as on a TPU (per-host input pipelines,
  infeed, the replicated step, outfeed, host call) and runs every hook's
  `begin()`;
- the program is stopped at the device boundary: the first session against
  a non-local (TPU) master, or a local one on a graph with TPU ops (a
  directly attached TPU), which is where MonitoredSession, or the feed hook's
  TPU initialisation, would first need the device.

All of this holds for every thread of the program (the dry run owns the process).

Outcomes (exit codes):

- 0: the boundary was reached. A report says what was built; its last line
  starts with "TPU dry run: reached the device boundary".
- 1: the program raised before the boundary (e.g. `TPUEstimator.train`
  without steps or max_steps, a batch size the replicas cannot share): its
  traceback is printed as Python would print it. A program that calls
  `sys.exit(code)` before the boundary exits with its own code.
- 3: the program ended without ever creating a session against a TPU master
  (it never reached the TPU).
- 2: bad dry-run arguments.

Model directories are read as usual (Estimator looks for a checkpoint before
building the graph), so give the program a local `--model_dir`-like path
rather than a `gs://` one that needs credentials. The feed hook does there
what it does on a TPU up to the boundary: it refuses a restart whose input
differs from the checkpoint's, and its `begin()` takes the model_dir lock
(refused while another process trains in that model_dir; released when the
dry run exits). The dry run covers
TPUEstimator (graph and session) programs; TF2's eager TPU APIs
(`TPUStrategy`, `initialize_tpu_system`) do not create sessions and are not
simulated.
"""

from __future__ import annotations

import argparse
import collections
import os
import runpy
import sys
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from monolith.core.feed import signal as _signal
from monolith.core.simulated_tpu import device_boundary as _device_boundary
from monolith.core.simulated_tpu import system as simulated_tpu

__all__ = ["EXIT_NO_TPU_SESSION", "DryRunReport", "main", "report_lines"]

#: Exit code when the program ended without creating a session against a TPU master.
EXIT_NO_TPU_SESSION = 3

BOUNDARY_LINE = "TPU dry run: reached the device boundary"

_USAGE = (
    "python -m monolith.core.simulated_tpu [--num_hosts H] [--cores_per_host C] "
    "(-m MODULE | SCRIPT) [ARGS...]"
)

# Op types of the TPU train step worth naming in the report, in report order.
_STEP_OPS = (
    "InfeedDequeueTuple",
    "InfeedDequeue",
    "OutfeedEnqueueTuple",
    "OutfeedEnqueue",
    "CrossReplicaSum",
    "TPUReplicateMetadata",
    "RecvTPUEmbeddingActivations",
    "SendTPUEmbeddingGradients",
    "EnqueueTPUEmbeddingSparseTensorBatch",
    "EnqueueTPUEmbeddingRaggedTensorBatch",
    "EnqueueTPUEmbeddingArbitraryTensorBatch",
    "EnqueueTPUEmbeddingIntegerBatch",
)
# Without these, the program's train step does not feed and report like a TPU step.
_REQUIRED_STEP_OPS = (
    ("InfeedDequeueTuple", "InfeedDequeue"),
    ("OutfeedEnqueueTuple", "OutfeedEnqueue"),
    ("CrossReplicaSum",),
)


class DryRunReport:
    """What the program built by the time it reached the device boundary.

    Attributes:
      num_hosts, cores_per_host: The simulated system.
      where: What reached the boundary.
      feed_hook: The feed hook record (None if TPUEstimator constructed none).
      model_host_call: Whether the model's TPUEstimatorSpec has a host call.
      stop_rule: The `StopRule` the program's input pipelines chose (None without a graph).
      op_counts: Op type -> count, in the graph and its function library.
      graph_ops, library_ops, library_functions: Op and function counts.
    """

    def __init__(
        self,
        num_hosts: int,
        cores_per_host: int,
        boundary: _device_boundary.DeviceBoundaryReached,
    ):
        self.num_hosts = num_hosts
        self.cores_per_host = cores_per_host
        self.where = boundary.where
        self.model_host_call = boundary.boundary.has_model_host_call()
        graph = boundary.graph
        records = [r for r in boundary.feed_hooks if r.graph is graph] or boundary.feed_hooks
        self.feed_hook: Optional[_device_boundary.FeedHookRecord] = records[-1] if records else None
        # The rule the program's append_stopping_signals chose (the feed hook follows it).
        self.stop_rule = None if graph is None else _signal.stop_rule_of_graph(graph)
        self.op_counts: Dict[str, int] = collections.Counter()
        self.graph_ops = self.library_ops = self.library_functions = 0
        if graph is not None:
            operations = graph.get_operations()
            self.graph_ops = len(operations)
            self.op_counts.update(op.type for op in operations)
            library = graph.as_graph_def().library.function
            self.library_functions = len(library)
            for function in library:
                self.library_ops += len(function.node_def)
                self.op_counts.update(node.op for node in function.node_def)

    @property
    def num_replicas(self) -> int:
        if self.feed_hook is not None:
            return self.feed_hook.args[0].num_replicas
        return self.num_hosts * self.cores_per_host

    def tpu_embedding(self) -> Optional[Tuple[int, int]]:
        """(tables, features) of the TPU embedding, or None without one."""
        if self.feed_hook is None or self.feed_hook.args[0].embedding_config is None:
            return None
        embedding = self.feed_hook.args[0].embedding_config.tpu_embedding
        return len(embedding.table_to_config_dict), len(embedding.feature_to_config_dict)

    def missing_step_ops(self) -> List[str]:
        return [
            " or ".join(alternatives)
            for alternatives in _REQUIRED_STEP_OPS
            if not any(self.op_counts.get(op) for op in alternatives)
        ]


def _yes_no(value: Optional[bool], unknown: str) -> str:
    return unknown if value is None else ("yes" if value else "no")


def report_lines(report: DryRunReport) -> List[str]:
    """The report printed when the boundary is reached; the last line is `BOUNDARY_LINE`..."""
    hook = report.feed_hook
    hook_name = (
        "none constructed (TPUEstimator did not build a TPU training loop)"
        if hook is None
        else f"{hook.hook_class.__module__}.{hook.hook_class.__qualname__}"
    )
    found = [f"{op} x{report.op_counts[op]}" for op in _STEP_OPS if report.op_counts.get(op)]
    missing = report.missing_step_ops()
    embedding = report.tpu_embedding()
    if embedding is None:
        embedding_text = _yes_no(None if hook is None else False, "unknown (no feed hook)")
    else:
        embedding_text = f"yes ({embedding[0]} table(s), {embedding[1]} feature(s))"
    lines = [
        "TPU dry run on a simulated TPU system:",
        f"  TPU system:      {report.num_hosts} host(s) x {report.cores_per_host} core(s), "
        f"{report.num_replicas} replica(s)",
        f"  feed hook:       {hook_name}",
        f"  train step ops:  {', '.join(found) if found else 'no TPU ops found'}",
    ]
    if missing:
        lines.append(
            f"  MISSING:         {', '.join(missing)} (not a TPUEstimator TPU train step?)"
        )
    lines += [
        f"  host call:       {'yes' if report.model_host_call else 'no'}",
        f"  TPU embedding:   {embedding_text}",
        f"  stop rule:       {'unknown' if report.stop_rule is None else report.stop_rule.name}",
        f"  ops:             {report.graph_ops} in the graph, {report.library_ops} in "
        f"{report.library_functions} library function(s)",
        f"{BOUNDARY_LINE} ({report.where}); nothing ran on a device.",
    ]
    return lines


def _split_argv(argv: Sequence[str]) -> Tuple[List[str], Optional[str], Optional[str], List[str]]:
    """(own options, module, script, program args), cProfile style.

    Everything after `-m MODULE` or the first non-option token belongs to the program.
    """
    own: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "-m":
            if i + 1 == len(argv):
                return own + ["-m"], None, None, []
            return own, argv[i + 1], None, list(argv[i + 2 :])
        if token.startswith("-") and token != "-":
            own.append(token)
            if token in ("--num_hosts", "--cores_per_host") and i + 1 < len(argv):
                own.append(argv[i + 1])
                i += 1
            i += 1
            continue
        return own, None, token, list(argv[i + 1 :])
    return own, None, None, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m monolith.core.simulated_tpu",
        usage=_USAGE,
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--num_hosts", type=int, default=1, metavar="H", help="Simulated TPU hosts (default 1)."
    )
    parser.add_argument(
        "--cores_per_host", type=int, default=8, metavar="C", help="TPU cores per host (default 8)."
    )
    parser.add_argument(
        "-m", dest="module", metavar="MODULE", help="Run library module MODULE as a script."
    )
    parser.add_argument("script", nargs="?", metavar="SCRIPT", help="Run the program in SCRIPT.")
    parser.add_argument("args", nargs="*", metavar="ARGS", help="The program's arguments.")
    return parser


def _program_traceback(exc: BaseException) -> Any:
    """`exc`'s traceback without the dry run's own leading frames (runpy, this module)."""
    own_modules = {"runpy", __name__}
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in own_modules:
        tb = tb.tb_next
    return tb or exc.__traceback__


def _run_program(module: Optional[str], script: Optional[str], args: List[str]) -> None:
    if module is not None:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the dry run; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, module, script, program_args = _split_argv(argv)
    parser = _parser()
    options = parser.parse_args(own)  # --help exits here
    if module is None and script is None:
        parser.error("give the program to dry-run: -m MODULE or SCRIPT")
    for name in ("num_hosts", "cores_per_host"):
        if getattr(options, name) < 1:
            parser.error(f"--{name}={getattr(options, name)} must be >= 1")
    program = f"-m {module}" if module is not None else script
    if script is not None and not os.path.isfile(script):
        parser.error(f"SCRIPT={script!r} is not a file")

    num_hosts, cores_per_host = options.num_hosts, options.cores_per_host
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        # For every thread: the dry run owns its process, and the program may
        # build and train on any of its threads.
        with (
            simulated_tpu.simulated_tpu_system(num_hosts, cores_per_host, all_threads=True),
            simulated_tpu.simulated_cluster_resolver(num_hosts, cores_per_host, all_threads=True),
            _device_boundary.stop_at_device_boundary(all_threads=True),
        ):
            _run_program(module, script, program_args)
    except _device_boundary.DeviceBoundaryReached as reached:
        report = DryRunReport(num_hosts, cores_per_host, reached)
        print("\n".join(report_lines(report)), flush=True)
        return 0
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            print(
                f"TPU dry run: {program} exited with {exit_.code!r} before the device boundary.",
                file=sys.stderr,
            )
            return exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the program's error, shown as Python would
        traceback.print_exception(type(exc), exc, _program_traceback(exc))
        print(
            f"TPU dry run: {program} raised {type(exc).__name__} before the device boundary.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
    print(
        f"TPU dry run: {program} ended without creating a session against a TPU master, "
        f"so it never reached the TPU device boundary ({num_hosts} host(s) x "
        f"{cores_per_host} core(s) simulated). Does it run TPUEstimator(use_tpu=True).train "
        "with a TPU master (RunConfig(cluster=TPUClusterResolver(...)) or master=...)?",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_NO_TPU_SESSION


if __name__ == "__main__":
    sys.exit(main())
