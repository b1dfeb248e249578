"""A simulated TPU system on CPU: build and dry-run TPUEstimator TPU programs without a TPU.

Modules:

* `system`: answers TPUEstimator's TPU system query with fake devices
  (`simulated_tpu_system`) and builds the full `use_tpu=True` training graph
  (`build_tpu_training_graph`);
* `resolver`: makes `TPUClusterResolver(tpu=<any name>)` resolve to the
  simulated hosts without GCP;
* `device_boundary`: stops a program at its first session against the TPU
  master (or right after the feed hook's `begin()`), recording the feed hooks
  and host calls TPUEstimator built;
* `dry_run`: the command line (`python -m monolith.core.simulated_tpu`,
  see `__main__`), which runs an unchanged program under all three.

The first three act for the thread that uses them (the dry run: for every
thread of its process); see `common.scoped_patch`.

The public names are importable from this package, as they were from the
former `monolith.core.simulated_tpu` module.
"""

from monolith.core.simulated_tpu.system import (
    SIMULATED_MASTER,
    TPUTrainingGraph,
    build_tpu_training_graph,
    graph_op_types,
    simulated_cluster_resolver,
    simulated_tpu_metadata,
    simulated_tpu_system,
)

__all__ = [
    "SIMULATED_MASTER",
    "TPUTrainingGraph",
    "build_tpu_training_graph",
    "graph_op_types",
    "simulated_cluster_resolver",
    "simulated_tpu_metadata",
    "simulated_tpu_system",
]
