"""Build a TPUEstimator TPU training graph on CPU, with a simulated TPU system.

`TPUEstimator(use_tpu=True)` asks the TPU master which TPU devices exist
(`tpu_system_metadata._query_tpu_system_metadata`, which opens a session to
the master) and then builds the whole TPU training graph from the answer:
per-host input pipelines and infeed, the replicated train step (model_fn,
optimizer, cross-replica sums, outfeed), the host side of the outfeed
(host_call), and the infeed/outfeed session hook. Nothing of that needs a TPU
until a session runs. So on CPU, answering the query with fake devices is
enough to check that a model_fn, its host call and the feed hook build a
correct TPU graph, for any number of hosts and cores:

    from monolith.core import simulated_tpu

    config = tpu_config.RunConfig(
        master=simulated_tpu.SIMULATED_MASTER,  # any non-local master
        model_dir=model_dir,
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=2,
            tpu_job_name="worker",  # the simulated job
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )
    with simulated_tpu.simulated_tpu_system(num_hosts=2, cores_per_host=4):
        built = simulated_tpu.build_tpu_training_graph(
            model_fn, input_fn, config=config, train_batch_size=64
        )
    assert "CrossReplicaSum" in built.op_types()

`build_tpu_training_graph` runs `TPUEstimator.train` until the feed hook's
`begin()` has finished and stops it there, before any session (which would
need the TPU) exists: graph, hook and the hook's constructor arguments are
returned for inspection. Nothing runs on a device.

Both pieces work in TF2 default behaviour and after
`tf.compat.v1.disable_v2_behavior()` (TPUEstimator always builds a graph).
Both act only for the thread that uses them: TPUEstimator queries the system,
builds the graph and begins its hooks on the thread that calls `train`, so
other threads (another graph build with another simulated system, a real TPU
job) see TensorFlow unchanged meanwhile. The query is a module function that
TensorFlow offers no hook for, so it is replaced (a
`common.scoped_patch.ScopedPatch`, thread-scoped and reference-counted) while
a simulation is active. On a real TPU VM, `build_tpu_training_graph` without
the simulation builds the graph for the real TPU system (the query then does
contact it).

To check an unchanged TPUEstimator program instead (its own `RunConfig`,
`TPUClusterResolver` and `train` call), dry-run it up to the device boundary:

    python -m monolith.core.simulated_tpu --num_hosts 2 --cores_per_host 4 -m your.module ARGS

(`monolith.core.simulated_tpu.dry_run`; `--help` says more). `simulated_cluster_resolver`
is the piece that makes `TPUClusterResolver(tpu=<any name>)` resolve to the
simulated system without GCP.

Note: the train step of TPUEstimator lives in functions of the graph's
function library (`graph.as_graph_def().library`), not only in
`graph.get_operations()`; `graph_op_types` and `TPUTrainingGraph.op_types`
search both.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.client import session as _session_lib
from tensorflow.python.tpu import topology as _topology_lib
from tensorflow.python.tpu import tpu_system_metadata as _tpu_system_metadata
from tensorflow_estimator.python.estimator.tpu import tpu_config
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.common.scoped_patch import ScopedPatch
from monolith.core.common.validation import positive_int
from monolith.core.simulated_tpu import device_boundary as _device_boundary
from monolith.core.simulated_tpu import resolver as _simulated_resolver

__all__ = [
    "SIMULATED_MASTER",
    "TPUTrainingGraph",
    "build_tpu_training_graph",
    "graph_op_types",
    "simulated_cluster_resolver",
    "simulated_tpu_metadata",
    "simulated_tpu_system",
]

#: A non-local master address to put in `RunConfig(master=...)` for a simulated
#: system. Nothing connects to it while graphs are only built.
SIMULATED_MASTER = "grpc://" + _simulated_resolver.simulated_host_address(0)

# TPUEstimator's context calls `tpu_system_metadata_lib._query_tpu_system_metadata`;
# other modules may hold their own alias of it (`from ... import`).
_QUERY = ScopedPatch(_tpu_system_metadata, "_query_tpu_system_metadata", module_aliases=True)


def _simulated_topology(num_hosts: int, cores_per_host: int) -> _topology_lib.Topology:
    """A mesh of `num_hosts` rows of chips with 2 cores each (1 if the count is odd).

    Enough for `tf.tpu.experimental.DeviceAssignment` (model parallelism).
    """
    cores_per_chip = 2 if cores_per_host % 2 == 0 else 1
    chips_per_host = cores_per_host // cores_per_chip
    coordinates = [
        [[core // cores_per_chip, host, 0, core % cores_per_chip] for core in range(cores_per_host)]
        for host in range(num_hosts)
    ]
    return _topology_lib.Topology(
        mesh_shape=[chips_per_host, num_hosts, 1, cores_per_chip],
        device_coordinates=np.array(coordinates, dtype=np.int32),
    )


def simulated_tpu_metadata(
    num_hosts: int = 1,
    cores_per_host: int = 8,
    job: str = "worker",
    with_topology: bool = False,
) -> _tpu_system_metadata.TPUSystemMetadata:
    """The `TPUSystemMetadata` a TPU master of this shape would report.

    Devices are what `session.list_devices()` lists for each host (task) `h`:
    `/job:<job>/replica:0/task:<h>/device:CPU:0`, `TPU:0` ... `TPU:<cores_per_host - 1>`
    and `TPU_SYSTEM:0`, sorted as TensorFlow sorts them.

    Args:
      num_hosts: TPU hosts (tasks of `job`), >= 1.
      cores_per_host: TPU cores per host, >= 1.
      job: The TPU job name. TPUEstimator places ops on the job it derives from
        the master (`tpu_worker` for a non-local master without cluster_def),
        so set `TPUConfig(tpu_job_name=job)` to match.
      with_topology: Also build a `Topology` (TPUEstimator asks for one only
        with model parallelism, `num_cores_per_replica`).

    Returns:
      A `tf.tpu.experimental.TPUSystemMetadata`.

    Raises:
      TypeError: `num_hosts` or `cores_per_host` is not an int, `job` not a str.
      ValueError: `num_hosts` or `cores_per_host` < 1, or `job` is empty or has a "/".
    """
    positive_int("num_hosts", num_hosts)
    positive_int("cores_per_host", cores_per_host)
    if not isinstance(job, str):
        raise TypeError(f"job={job!r} must be a str, got {type(job).__name__}.")
    if not job or "/" in job or ":" in job:
        raise ValueError(f"job={job!r} must be a non-empty job name without '/' or ':'.")
    devices = []
    for host in range(num_hosts):
        prefix = f"/job:{job}/replica:0/task:{host}/device:"
        devices.append(_session_lib._DeviceAttributes(prefix + "CPU:0", "CPU", 0, 0))
        devices.extend(
            _session_lib._DeviceAttributes(f"{prefix}TPU:{core}", "TPU", 0, 0)
            for core in range(cores_per_host)
        )
        devices.append(_session_lib._DeviceAttributes(prefix + "TPU_SYSTEM:0", "TPU_SYSTEM", 0, 0))
    return _tpu_system_metadata.TPUSystemMetadata(
        num_cores=num_hosts * cores_per_host,
        num_hosts=num_hosts,
        num_of_cores_per_host=cores_per_host,
        topology=_simulated_topology(num_hosts, cores_per_host) if with_topology else None,
        devices=tuple(devices),
    )


@contextlib.contextmanager
def simulated_tpu_system(
    num_hosts: int = 1, cores_per_host: int = 8, job: str = "worker", *, all_threads: bool = False
) -> Iterator[_tpu_system_metadata.TPUSystemMetadata]:
    """Makes TensorFlow see a TPU system of `num_hosts` x `cores_per_host` cores.

    Inside the block, `tensorflow.python.tpu.tpu_system_metadata._query_tpu_system_metadata`
    (what TPUEstimator's context calls to discover the TPU system), and every
    module-level alias of it, returns `simulated_tpu_metadata(...)` for any
    master, without contacting it, when called from the thread that entered
    the block; other threads get TensorFlow's answer. Everything is restored
    on exit, also on error, once no other simulation is active; nested uses
    answer with the innermost system. Works as a pytest fixture body:

        @pytest.fixture
        def tpu_2x4():
            with simulated_tpu_system(num_hosts=2, cores_per_host=4) as metadata:
                yield metadata

    Only graph construction is simulated: running a TPU op in a session still
    fails (there is no TPU). TPUEstimator caches the metadata per estimator, so
    build the estimator's graph while the simulation is active, on this thread.

    Args:
      num_hosts: TPU hosts (tasks), >= 1.
      cores_per_host: TPU cores per host, >= 1.
      job: The TPU job name of the simulated devices (see `simulated_tpu_metadata`).
      all_threads: Answer for every thread without a simulation of its own (the
        dry run, which owns its process).

    Yields:
      The simulated `TPUSystemMetadata`.

    Raises:
      TypeError, ValueError: as `simulated_tpu_metadata`, before anything is patched.
    """
    metadata = simulated_tpu_metadata(num_hosts, cores_per_host, job)
    topology_metadata = None

    def query(
        master_address: str, cluster_def: Any = None, query_topology: bool = False
    ) -> _tpu_system_metadata.TPUSystemMetadata:
        nonlocal topology_metadata
        logging.info(
            "Simulated TPU system for master %r: %d host(s) x %d core(s), job %r.",
            master_address,
            num_hosts,
            cores_per_host,
            job,
        )
        if not query_topology:
            return metadata
        if topology_metadata is None:
            topology_metadata = simulated_tpu_metadata(
                num_hosts, cores_per_host, job, with_topology=True
            )
        return topology_metadata

    with _QUERY.scope(query, all_threads=all_threads):
        logging.info(
            "Simulating a TPU system of %d host(s) x %d core(s) (job %r) for %s.",
            num_hosts,
            cores_per_host,
            job,
            "every thread" if all_threads else "this thread",
        )
        try:
            yield metadata
        finally:
            logging.info("Simulated TPU system removed.")


def graph_op_types(graph: tf.Graph) -> set:
    """Op types in `graph` and in the functions of its function library.

    TPUEstimator builds the train step inside functions (the TPU computation,
    and in TF2 behaviour the while-loop body), whose ops are not in
    `graph.get_operations()`.
    """
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types.update(node.op for node in function.node_def)
    return types


@dataclasses.dataclass(frozen=True)
class TPUTrainingGraph:
    """What `build_tpu_training_graph` captured when the feed hook's `begin()` returned.

    Attributes:
      graph: The training graph, complete (TPUEstimator finalizes it only when
        the session is created, which never happens here).
      feed_hook: The infeed/outfeed hook TPUEstimator constructed (an instance
        of a subclass of the configured `experimental_feed_hook`, or of
        TPUEstimator's `TPUInfeedOutfeedSessionHook` when none is configured).
        Its `begin()` has run.
      hook_args: Positional constructor arguments: `(ctx, enqueue_ops, dequeue_ops)`.
      hook_kwargs: Keyword constructor arguments (`tpu_compile_op`,
        `run_infeed_loop_on_coordinator`, `rendezvous`, `master`,
        `session_config`, `tpu_init_ops`, `outfeed_every_n_steps`).
    """

    graph: tf.Graph
    feed_hook: tf.compat.v1.train.SessionRunHook
    hook_args: tuple
    hook_kwargs: Mapping[str, Any]

    @property
    def ctx(self) -> Any:
        """TPUEstimator's `_InternalTPUContext` (the hook's first argument)."""
        return self.hook_args[0]

    @property
    def enqueue_ops(self) -> Any:
        """The infeed ops the hook's infeed thread would run."""
        return self.hook_args[1]

    @property
    def dequeue_ops(self) -> Any:
        """The outfeed ops the hook's outfeed thread would run (host call included)."""
        return self.hook_args[2]

    def op_types(self) -> set:
        """`graph_op_types(self.graph)`."""
        return graph_op_types(self.graph)


def build_tpu_training_graph(
    model_fn: Callable[..., Any],
    input_fn: Callable[..., Any],
    *,
    config: tpu_config.RunConfig,
    train_batch_size: int,
    params: Optional[Mapping[str, Any]] = None,
    max_steps: int = 1,
    hooks: Optional[Sequence[tf.compat.v1.train.SessionRunHook]] = None,
    **estimator_kwargs: Any,
) -> TPUTrainingGraph:
    """Builds the `TPUEstimator(use_tpu=True)` training graph and stops before any session.

    Runs `TPUEstimator(model_fn, config=..., use_tpu=True, ...).train(input_fn, ...)`
    on this thread under the dry run's device-boundary mechanism
    (`device_boundary.run_until_feed_hook_begins`): TPUEstimator is handed a
    recording subclass of the configured feed hook class, which here, after
    the real `begin()`, records the graph and stops training. So TPUEstimator
    builds the complete graph (input pipelines, infeed, train step, outfeed,
    host call, hooks) and runs every hook's `begin()` up to the feed hook's;
    no session is created and nothing runs (a session against a remote master
    would stop the build too, with `DeviceBoundaryReached`). Call it inside
    `simulated_tpu_system`, on the same thread, on CPU. Other threads may build
    meanwhile. The dry run of a whole program goes one step further, to the
    first session (every hook has begun).

    Args:
      model_fn: The TPUEstimator model_fn.
      input_fn: The TPUEstimator input_fn (called per host with `params`).
      config: A `tpu_config.RunConfig` with a non-local master (e.g.
        `SIMULATED_MASTER`) and `tpu_job_name` set to the simulated job.
      train_batch_size: Global batch size, divisible by the number of replicas.
      params: Passed to TPUEstimator (without `batch_size`, which it adds).
      max_steps: Passed to `train` (any value > global step in `model_dir`).
      hooks: Extra training hooks passed to `train`.
      **estimator_kwargs: Further `TPUEstimator` arguments (e.g. `eval_batch_size`).

    Returns:
      A `TPUTrainingGraph`.

    Raises:
      TypeError: `config` is not a `tpu_config.RunConfig`.
      ValueError: `use_tpu` is given and false.
      RuntimeError: training ended without constructing the feed hook (e.g.
        `max_steps` already reached in `model_dir`).
      Any error TPUEstimator raises while building the graph.
    """
    if not isinstance(config, tpu_config.RunConfig):
        raise TypeError(
            f"config={config!r} (type {type(config).__name__}) must be a "
            "tensorflow_estimator tpu_config.RunConfig."
        )
    if not estimator_kwargs.pop("use_tpu", True):
        raise ValueError("use_tpu=False: build_tpu_training_graph builds the TPU graph only.")
    estimator = _tpu_estimator.TPUEstimator(
        model_fn=model_fn,
        config=config,
        params=dict(params) if params is not None else None,
        use_tpu=True,
        train_batch_size=train_batch_size,
        **estimator_kwargs,
    )
    record = _device_boundary.run_until_feed_hook_begins(
        lambda: estimator.train(input_fn, hooks=hooks, max_steps=max_steps)
    )
    if record is None:
        raise RuntimeError(
            f"TPUEstimator.train(max_steps={max_steps}) returned without beginning the feed "
            f"hook (model_dir={config.model_dir!r} may already hold a checkpoint at max_steps)."
        )
    logging.info(
        "TPU training graph built (%d ops); stopped after %s.begin().",
        len(record.graph.get_operations()),
        record.hook_class.__name__,
    )
    return TPUTrainingGraph(
        graph=record.graph,
        feed_hook=record.hook,
        hook_args=record.args,
        hook_kwargs=record.kwargs,
    )


def simulated_cluster_resolver(
    num_hosts: int = 1, cores_per_host: int = 8, *, all_threads: bool = False
) -> Any:
    """Makes `TPUClusterResolver(tpu=<any name>)` resolve to a simulated system, without GCP.

    A context manager. Inside it, a resolver constructed on this thread with
    any TPU name (and any zone and project) contacts neither the Cloud TPU API
    nor the GCE metadata server: `master()` is `SIMULATED_MASTER`,
    `cluster_spec()` has one `worker` task per host (`127.0.0.<h + 1>:8470`),
    `num_accelerators()` is `{"TPU": cores_per_host}`. Resolvers constructed on
    other threads meanwhile are TensorFlow's own. Use it with
    `simulated_tpu_system` of the same shape, so TPUEstimator's system query
    (which the resolver's `cluster_def` is passed to) gets the matching
    devices. The dry run (`python -m monolith.core.simulated_tpu`) activates
    both, for all threads.

    Args:
      num_hosts: TPU hosts (worker tasks), >= 1.
      cores_per_host: TPU cores per host, >= 1.
      all_threads: Act for every thread without a simulation of its own.

    Returns:
      A context manager yielding None.

    Raises:
      TypeError, ValueError: a count is not an int >= 1.
    """
    positive_int("num_hosts", num_hosts)
    positive_int("cores_per_host", cores_per_host)
    return _simulated_resolver.simulated_cluster_resolver(
        num_hosts, cores_per_host, all_threads=all_threads
    )
