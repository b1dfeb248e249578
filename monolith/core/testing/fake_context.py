"""`FakeTPUContext`: the TPUEstimator context the feed hook reads, without a TPU."""

from __future__ import annotations

import copy
import types
from typing import Any, Optional

from tensorflow_estimator.python.estimator.tpu import tpu_config

from monolith.core.common.validation import positive_int

__all__ = ["FakeTPUContext"]


class FakeTPUContext:
    """Stands in for TPUEstimator's `_InternalTPUContext` where the hook reads it.

    Attributes read by the feed hook: `master_job`, `embedding_config`,
    `model_parallelism_enabled`, `config.tpu_config.initial_infeed_sleep_secs`
    and `config.tpu_config.per_host_input_for_training` (`config.tpu_config` is
    a real `TPUConfig`). The emulated pod's shape, as `_InternalTPUContext`
    names it: `num_hosts`, `num_replicas`, `num_of_replicas_per_host` (the
    emulator passes its topology; 1 host with 1 replica by default). How the
    input is deployed is the emulator's `per_host_input_for_training`, not
    this context's, whose input mode only steers the hook's TPU initialisation.
    `config.model_dir` is where the hook takes its model_dir lock and checks
    the resume record, as it reads TPUEstimator's `RunConfig.model_dir`
    (`testing.train` sets it; None: neither).

    Args:
      initialize_tpu: False (default) reports model parallelism with BROADCAST
        input, so the hook skips TPU initialisation and shutdown (impossible on
        CPU). True reports PER_HOST_V2 input without model parallelism, so the
        hook calls `tf.compat.v1.tpu.initialize_system`/`shutdown_system`.
      master_job: The TPU job name the hook logs and passes to the TPU ops.
      initial_infeed_sleep_secs: Seconds the infeed thread sleeps first.
      embedding_config: TPUEstimator's embedding config (None: no TPU embedding).
      iterations_per_loop: Stored in `config.tpu_config` for reference only;
        the loop size is the variable set by `iterations_per_loop_hook`.
      num_hosts: Hosts of the emulated pod.
      replicas_per_host: Replicas per host.
      model_dir: `config.model_dir` (None: the hook takes no lock and checks
        no resume record).
    """

    def __init__(
        self,
        *,
        initialize_tpu: bool = False,
        master_job: Optional[str] = None,
        initial_infeed_sleep_secs: Optional[int] = None,
        embedding_config: Any = None,
        iterations_per_loop: int = 2,
        num_hosts: int = 1,
        replicas_per_host: int = 1,
        model_dir: Optional[str] = None,
    ):
        self.num_hosts = positive_int("num_hosts", num_hosts)
        self.num_of_replicas_per_host = positive_int("replicas_per_host", replicas_per_host)
        self.num_replicas = self.num_hosts * self.num_of_replicas_per_host
        self.master_job = master_job
        self.embedding_config = embedding_config
        self.model_parallelism_enabled = not initialize_tpu
        input_mode = (
            tpu_config.InputPipelineConfig.PER_HOST_V2
            if initialize_tpu
            else tpu_config.InputPipelineConfig.BROADCAST
        )
        self.config = types.SimpleNamespace(
            model_dir=model_dir,
            tpu_config=tpu_config.TPUConfig(
                iterations_per_loop=iterations_per_loop,
                per_host_input_for_training=input_mode,
                initial_infeed_sleep_secs=initial_infeed_sleep_secs,
            ),
        )

    def with_model_dir(self, model_dir: Optional[str]) -> FakeTPUContext:
        """A copy of this context whose `config.model_dir` is `model_dir` (this one unchanged)."""
        context = copy.copy(self)
        context.config = types.SimpleNamespace(**{**vars(self.config), "model_dir": model_dir})
        return context
