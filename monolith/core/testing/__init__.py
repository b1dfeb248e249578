"""CPU emulation of TPUEstimator's infeed -> train loop -> outfeed wiring.

TPUEstimator (with `use_tpu=True`) trains like this: an infeed thread feeds
batches, one `session.run(train_op)` runs a `tf.while_loop` of
`iterations_per_loop` train steps on the TPU, each step sends the step's
outfeed (stop flag, host-call tensors) back, and an outfeed thread dequeues it
and runs the host call. None of that runs without a TPU. This module rebuilds
the same wiring from CPU ops, so a TPUEstimator `model_fn`, its `host_call`,
its input pipeline and the feed hook
(`TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook` by default) run
unchanged on CPU:

* infeed: a `tf.queue.FIFOQueue` per replica; `enqueue_ops` (one op per
  host's input pipeline) moves one step's elements of the `input_fn`'s
  dataset into them (or, with `run_infeed_loop_on_coordinator=False`, a
  whole loop's worth in one run, as TPUEstimator's device-side loop does);
* train loop: a `tf.while_loop` of `tpu_estimator/iterations_per_loop` steps
  (the real variable, read at each run) that dequeues each replica's batch,
  calls the `model_fn` once per replica, and after replica 0's `train_op`
  enqueues the step's outfeed;
* outfeed: a second FIFOQueue; `dequeue_ops` is
  `{_USER_PROVIDED_SIGNAL_NAME: {"stopping": ...}, "host_call": host_fn(*tensors),
  "__force_dequeue": ...}` as TPUEstimator builds it, so the outfeed thread
  runs the host call, with each tensor concatenated over replicas along axis
  0 in replica order, as TPUEstimator does (a host call sees `[1, N]` for a
  per-replica `[1, N]` tensor on one replica, `[num_replicas, N]` on a pod).
  As on TPU, a model without host call outfeeds its loss, and
  `outfeed_every_n_steps` skips the outfeed on the other steps.

A pod: `num_hosts` x `replicas_per_host` (1 x 1 by default), fed as
`per_host_input_for_training` says (PER_HOST_V2 by default, PER_HOST_V1,
BROADCAST): `input_fn` is called once per host (once under BROADCAST) with
TPUEstimator's `params["batch_size"]` and `params["context"]`, each host's
pipeline feeds its replicas' infeed queues, and one feed hook runs the
enqueue ops of every host. The `model_fn` is built once per replica, on that
replica's batch, over one set of variables (replica 0's), and
`cross_replica_sum` (so `CrossShardOptimizer` and the stop rule's
`sum_over_replicas`) is the true sum over all replicas. The loop applies
replica 0's update once per step, which is what every replica's identical
copy applies on a TPU. See `build_emulated_training` for the details and
what is not emulated.

The TPU system cannot be initialised on CPU. `FakeTPUContext()` therefore
reports model parallelism with BROADCAST input by default, the one case in
which the hook skips `tf.compat.v1.tpu.initialize_system`/`shutdown_system`;
`FakeTPUContext(initialize_tpu=True)` makes the hook run them (patch them in
tests).

What a `model_fn` may do inside the emulated loop: everything it may do in a
TPUEstimator TRAIN step. Variables created in it (`tf.compat.v1.get_variable`,
layers, optimizer slots) are lifted out of the loop body with
`tf.init_scope()`, so they work in both TF behaviours (in TF2 behaviour the
body is a while_v2 FuncGraph). Initial values must not depend on tensors of
the step (use initializers or Python values), as on TPU. It must increment
the global step (e.g. `optimizer.minimize(..., global_step=...)`), as for
TPUEstimator. Summary ops belong in the host call, not in the step.
`cross_replica_sum` (e.g. of `CrossShardOptimizer`) sums over the emulated
replicas (the identity for one); other TPU-only ops have no CPU kernel.

As TPUEstimator.train (use_tpu=True) does, `train` gives `input_fn` and
`model_fn` `params["batch_size"]` (with `train_batch_size`, the global
batch), `params["context"]` (a `TPUContext` of the emulated pod), `params["use_tpu"] = True`
(model_fn only) and `config` (a `tpu_config.RunConfig`); raises
`NanLossDuringTrainingError` on a NaN loss (`NanTensorHook`); sets SIGINT to
SIG_DFL before every loop (`InstallSignalHandlerHook`), so Ctrl-C ends the
process at once; logs loss/step and steps and examples per second every
`log_step_count_steps` loops; and runs the hooks in TPUEstimator's order. See
`train` for the differences that remain.

The pieces are one module per concern, each built from one frozen options
object: `options`, `topology` (the pod and TPUEstimator's input rules),
`user_params` (what `input_fn`/`model_fn` receive), `infeed`, `step` and
`outfeed` (the three graph pieces), `replicas` (one step over every replica)
and `collectives` (`cross_replica_sum`), `graph` (wires them and the feed
hook), `runner` (the TPUEstimator.train-like MonitoredSession run),
`drain` (what the end of the stream left untrained), `results`,
`fake_context`; `training` holds the public entry points.
Import the public names from `monolith.core.testing`.

Public API: `FakeTPUContext`, `EmulatedTPUTraining`, `build_emulated_training`,
`iterations_per_loop_hook`, `TrainResult`, `train`.
"""

from monolith.core.testing.fake_context import FakeTPUContext
from monolith.core.testing.results import EmulatedTPUTraining, TrainResult
from monolith.core.testing.training import (
    build_emulated_training,
    iterations_per_loop_hook,
    train,
)

__all__ = [
    "EmulatedTPUTraining",
    "FakeTPUContext",
    "TrainResult",
    "build_emulated_training",
    "iterations_per_loop_hook",
    "train",
]
