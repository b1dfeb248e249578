"""Padding steps that train nothing: an optimizer wrapper that skips the update on padding.

After the end of the stream the TPU still runs the rest of its loop on the
padding batches `append_stopping_signals` appends (at most
`iterations_per_loop` steps). Masking the loss with the stop flag is not
enough to make those steps harmless:

* Adam, Momentum and RMSProp (and any optimizer with momentum or moment
  slots) move the weights on a zero gradient: their slots still hold the
  last real steps' momentum, and Adam's `beta1_power`/`beta2_power` keep
  decaying, which changes every later step.
* The global step advances on every padding step, so after training it
  counts padding too: learning-rate schedules, step-based checkpoints and a
  resume that counts trained batches are all off by the padding steps.

`skip_padding_steps` wraps the optimizer so `apply_gradients` (and hence
`minimize`) applies no update at all on a padding step: the inner
optimizer's update, including the global step increment, runs inside a
`tf.cond` that takes the no-op branch when the step is padding.

The decision follows the rule that stops training (the feed hook's
`get_stopping_signals_and_name`): a step is padding when any replica's batch
is padding. Inside a TPU replicate context it is taken from a cross-replica
sum of the flag, so every replica takes the same branch; the collectives of
the update (e.g. `CrossShardOptimizer`'s gradient sum) then run on all
replicas or on none, never on some of them (which would hang the TPU).

Where it runs: in the `model_fn`, inside the TPU train step (graph building,
main thread); the branch is chosen on the device at every step.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core.common.tpu_context import sum_over_replicas
from monolith.core.feed.signal import _USER_PROVIDED_SIGNAL_NAME

__all__ = ["skip_padding_steps"]

_Optimizer = tf.compat.v1.train.Optimizer


def skip_padding_steps(optimizer: _Optimizer, features: Any) -> _Optimizer:
    """Returns `optimizer` wrapped so that padding steps change no variable.

    Use it in a TPUEstimator `model_fn` fed by `append_stopping_signals`:

        optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.AdamOptimizer(1e-3)
        )
        optimizer = skip_padding_steps(optimizer, features)
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())

    On a step where any replica's batch is padding, the returned optimizer's
    `minimize`/`apply_gradients` change no weight, no slot and no non-slot
    variable (Adam's beta powers), and the global step does not advance: after
    training the global step is the number of real steps. On every other step
    they do exactly what `optimizer`'s do.

    Masking the loss with the flag is not a substitute: a zero gradient still
    moves the weights under Adam, Momentum or RMSProp (their slots carry the
    earlier steps' momentum, Adam's beta powers decay), and the global step
    still counts the padding steps.

    The wrapper creates no variables of its own. The inner optimizer's slots
    and non-slot variables are created (through its `_create_slots`, as its
    own `apply_gradients` does) before the conditional, outside it, as a TPU
    program needs, and under the same names as without the wrapper, so a
    checkpoint written with or without the wrapper restores with the other.
    Wrapping works around `CrossShardOptimizer` (its gradient sum then runs
    inside the conditional, on every replica or none) and inside it
    (`CrossShardOptimizer(skip_padding_steps(opt, features))`), in TF2 and v1
    graph behaviour. An optimizer that creates variables elsewhere than in
    `_create_slots` (e.g. `SyncReplicasOptimizer`) is not supported.

    Because the global step stays put on padding, a run that nothing stops at
    the end of the stream (`TPUEstimator(use_tpu=False)` runs no feed hook)
    and whose `steps`/`max_steps` exceed the real batches trains padding
    (doing nothing) forever: give it at most the number of real batches.

    Args:
      optimizer: A `tf.compat.v1.train.Optimizer` (Keras optimizers are not:
        TPUEstimator's `minimize(..., global_step=...)` needs a v1 optimizer).
      features: The step's features dict holding `USER_PROVIDED_SIGNAL_NAME`
        (as `append_stopping_signals` builds it), or that flag tensor itself:
        bool or integer, True/non-zero on padding, any shape (usually
        `[batch]`).

    Returns:
      A `tf.compat.v1.train.Optimizer` wrapping `optimizer`.

    Raises:
      TypeError: `optimizer` is not a `tf.compat.v1.train.Optimizer`;
        `features` is neither a mapping nor a tensor; the flag is not a
        tensor or not of bool/integer dtype.
      ValueError: `features` is a mapping without `USER_PROVIDED_SIGNAL_NAME`.
    """
    if not isinstance(optimizer, _Optimizer):
        raise TypeError(
            f"optimizer={optimizer!r} (type {type(optimizer).__name__}) must be a "
            "tf.compat.v1.train.Optimizer (e.g. tf.compat.v1.train.AdamOptimizer); Keras "
            "optimizers are not supported."
        )
    return _SkipPaddingStepsOptimizer(optimizer, _padding_flag(features))


def _padding_flag(features: Any) -> tf.Tensor:
    """The stop flag tensor from `features` (a features dict or the flag), validated."""
    if isinstance(features, Mapping):
        if _USER_PROVIDED_SIGNAL_NAME not in features:
            raise ValueError(
                f"features (keys {sorted(features, key=repr)!r}) hold no "
                f"{_USER_PROVIDED_SIGNAL_NAME!r}; build the input with "
                "append_stopping_signals, or pass the flag tensor itself."
            )
        flag = features[_USER_PROVIDED_SIGNAL_NAME]
        where = f"features[{_USER_PROVIDED_SIGNAL_NAME!r}]"
    else:
        flag, where = features, "features"
    if not tf.is_tensor(flag) or isinstance(flag, (tf.SparseTensor, tf.RaggedTensor)):
        raise TypeError(
            f"{where}={flag!r} (type {type(flag).__name__}) must be the padding flag as a dense "
            "tensor, or the features dict holding it."
        )
    if not (flag.dtype == tf.bool or flag.dtype.is_integer):
        raise TypeError(
            f"{where} has dtype {flag.dtype.name}; the padding flag must be bool or integer "
            "(True/non-zero on padding)."
        )
    return flag


def _any_replica_padding(flag: tf.Tensor) -> tf.Tensor:
    """Scalar bool: whether this step is padding on any replica (the stop rule).

    Built where `apply_gradients` is called: inside a TPU replicate context the
    local flag is summed over replicas, so every replica gets the same value;
    outside one (CPU, the emulator) the local flag decides.
    """
    local = tf.cast(tf.reduce_any(tf.cast(flag, tf.int32) > 0), tf.int32)
    return sum_over_replicas(local, name="any_replica_padding") > 0


def _optimizer_chain(optimizer: _Optimizer) -> list:
    """`optimizer` and the optimizers it wraps (`CrossShardOptimizer._opt`, ...), outer first."""
    chain = [optimizer]
    while isinstance(getattr(chain[-1], "_opt", None), _Optimizer):
        chain.append(chain[-1]._opt)  # pylint: disable=protected-access
    return chain


class _SkipPaddingStepsOptimizer(_Optimizer):
    """The optimizer `skip_padding_steps` returns (see there)."""

    def __init__(self, optimizer: _Optimizer, flag: tf.Tensor):
        super().__init__(use_locking=False, name=f"SkipPaddingSteps_{optimizer.get_name()}")
        self._opt = optimizer
        self._flag = flag

    def compute_gradients(self, *args: Any, **kwargs: Any) -> list:
        """The inner optimizer's `compute_gradients` (runs on every step, padding too)."""
        return self._opt.compute_gradients(*args, **kwargs)

    def apply_gradients(
        self,
        grads_and_vars: Sequence[Tuple[Any, Any]],
        global_step: Optional[tf.Variable] = None,
        name: Optional[str] = None,
    ) -> tf.Operation:
        """The inner optimizer's `apply_gradients`, run only on a step that is not padding.

        Args:
          grads_and_vars: As for `tf.compat.v1.train.Optimizer.apply_gradients`.
          global_step: Incremented by the inner optimizer on real steps only.
          name: Passed to the inner optimizer.

        Returns:
          An op that applies the update on a real step and does nothing on a
          padding step.
        """
        grads_and_vars = tuple(grads_and_vars)
        var_list = [v for g, v in grads_and_vars if g is not None]
        if not var_list:
            raise ValueError(
                "No gradients provided for any variable: " f"{[str(v) for _, v in grads_and_vars]}."
            )
        # Slots and non-slot variables before (outside) the conditional, under
        # the names the inner optimizer's own apply_gradients would give them.
        with tf.init_scope():
            for optimizer in _optimizer_chain(self._opt):
                optimizer._create_slots(var_list)  # pylint: disable=protected-access
        with tf.name_scope("skip_padding_steps"):
            is_padding = _any_replica_padding(self._flag)

        def apply() -> tf.Tensor:
            update = self._opt.apply_gradients(grads_and_vars, global_step=global_step, name=name)
            with tf.control_dependencies([update]):
                return tf.identity(tf.constant(True))

        def skip() -> tf.Tensor:
            return tf.constant(False)

        logging.info(
            "skip_padding_steps: %s updates %d variables only on steps that are not padding.",
            self._opt.get_name(),
            len(var_list),
        )
        applied = tf.cond(is_padding, skip, apply, name="skip_padding_steps")
        return tf.group(applied, name="apply_unless_padding")

    def get_slot(self, var: Any, name: str) -> Any:
        return self._opt.get_slot(var, name)

    def get_slot_names(self) -> list:
        return self._opt.get_slot_names()

    def variables(self) -> list:
        return self._opt.variables()
