"""What the emulator returns: the built graph pieces and the outcome of a run."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import error_handling


@dataclasses.dataclass(frozen=True)
class EmulatedTPUTraining:
    """The graph pieces `build_emulated_training` created.

    Attributes:
      hook: The feed hook (an instance of `hook_class`), built with exactly the
        keyword arguments TPUEstimator passes.
      train_op: Runs one loop of `iterations_per_loop` steps.
      loss: Replica 0's loss of the loop's last step (float32), as TPUEstimator reports.
      loop_steps: How many steps the loop ran (int32), fetch with `train_op`.
      global_step: The global step variable.
      global_step_after_loop: The global step read after the loop.
      iterations_per_loop_var: `tpu_estimator/iterations_per_loop`.
      enqueue_ops: What the infeed thread runs: one op per host's input pipeline.
      dequeue_ops: What the outfeed thread runs (dict, see the module docstring).
      rendezvous: The `ErrorRendezvous` given to the hook.
      training_hooks: `TPUEstimatorSpec.training_hooks` of the model_fn.
      iterator_initializer: Initialises every host's input iterator (also run
        by the hook, as one of its `tpu_init_ops`, before the feed threads start).
      batch_size: The global batch size (`train_batch_size`, else the static
        leading dimension of the input's first component over the replicas,
        else None).
      real_batches: Per host (`[num_hosts]` int64), the real batches its input
        pipeline fed into the loop's steps; fetch with `train_op`.
      padding_batches: Per host, the padding batches likewise.
      trained_batches: Per host, the real batches fed into the loop's steps
        that advanced the global step (that trained them).
      next_is_real: Per input pipeline (host order), a scalar bool that takes
        its next element and says whether it is real (for draining a stream
        after the stop).
      num_hosts: Hosts of the emulated pod.
      replicas_per_host: Replicas per host.
    """

    hook: tf.compat.v1.train.SessionRunHook
    train_op: tf.Operation
    loss: tf.Tensor
    loop_steps: tf.Tensor
    global_step: tf.Variable
    global_step_after_loop: tf.Tensor
    iterations_per_loop_var: tf.Variable
    enqueue_ops: list
    dequeue_ops: dict
    rendezvous: error_handling.ErrorRendezvous
    training_hooks: tuple
    iterator_initializer: tf.Operation
    batch_size: Optional[int] = None
    real_batches: Optional[tf.Tensor] = None
    padding_batches: Optional[tf.Tensor] = None
    trained_batches: Optional[tf.Tensor] = None
    next_is_real: tuple = ()
    num_hosts: int = 1
    replicas_per_host: int = 1


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one `train()` call did.

    Attributes:
      global_step: Global step after training (as in the final checkpoint).
      steps_run: Train steps this call ran (loop iterations), padding steps included.
      loops_run: `session.run(train_op)` calls, i.e. loops, this call ran.
      stopped_at_end_of_stream: Whether the hook stopped training because the
        stream ended (False when steps/max_steps, or the feed hook's SIGTERM
        stop, stopped it first).
      final_checkpoint: Path prefix of the latest checkpoint in `model_dir`.
      loss: Loss of the last step run (None when no loop ran).
      initial_global_step: Global step when the session was created (restored
        from `model_dir`, 0 for a new one).
      real_batches: One int per host: the real batches (elements of the
        host's input pipeline without the padding flag, or without the
        signal feature) it fed into the steps this call ran. Under
        PER_HOST_V2 one per replica of the host per step; under PER_HOST_V1
        one per host per step; under BROADCAST host 0 feeds one per step.
      padding_batches: One int per host: the padding batches (signal feature
        set) it fed into those steps.
      trained_real_batches: One int per host: the real batches it fed into
        steps that trained them, i.e. that advanced the global step (with
        `skip_padding_steps`, the steps its stop rule applies).
      untrained_real_batches: One int per host, when training stopped at the
        end of the stream: the real batches of the host's stream that this
        run did not train. Those it fed into steps that did not advance the
        global step (under `StopRule.ANY_REPLICA_PADDING`, the steps in which
        another replica's batch was padding), plus the rest of its stream,
        counted after the stop by draining the host's input pipeline up to
        its first padding batch. `trained_real_batches + untrained_real_batches`
        is then what was left of each host's stream at the start of the run.
        None when the run stopped otherwise (steps, SIGTERM): the rest of the
        stream is for the next run.
    """

    global_step: int
    steps_run: int
    loops_run: int
    stopped_at_end_of_stream: bool
    final_checkpoint: Optional[str]
    loss: Optional[float]
    initial_global_step: int = 0
    real_batches: Tuple[int, ...] = (0,)
    padding_batches: Tuple[int, ...] = (0,)
    trained_real_batches: Tuple[int, ...] = (0,)
    untrained_real_batches: Optional[Tuple[int, ...]] = None

    @property
    def uncounted_steps(self) -> int:
        """Steps this call ran that did not advance the global step.

        With `skip_padding_steps` these are the padding steps (they ran and
        trained nothing); without it, 0, since every step advances the global
        step. Steps undone by a session recreation (MonitoredSession restores
        the last checkpoint after AbortedError/UnavailableError) count too.
        """
        return self.steps_run - (self.global_step - self.initial_global_step)
