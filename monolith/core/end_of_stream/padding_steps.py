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

The decision follows the stop rule chosen in `append_stopping_signals` and
recorded in the graph, the rule by which the feed hook stops training:

* `StopRule.ANY_REPLICA_PADDING` (default): a step is padding when any
  replica's batch is padding;
* `StopRule.ALL_REPLICAS_PADDING`: a step is padding only when no replica has
  a real example; a partly real step is applied, so its loss must leave the
  padding examples out: under this rule the wrapper raises a ValueError
  when the loss (or the gradients) it is given does not depend on the
  padding flag (`masked_mean_loss` builds such a loss).

Inside a TPU replicate context the decision is taken from a cross-replica
sum, so every replica takes the same branch; the collectives of the update
(e.g. `CrossShardOptimizer`'s gradient sum) then run on all replicas or on
none, never on some of them (which would hang the TPU).

Where it runs: in the `model_fn`, inside the TPU train step (graph building,
main thread); the branch is chosen on the device at every step.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core.common.tpu_context import sum_over_replicas
from monolith.core.feed.signal import _USER_PROVIDED_SIGNAL_NAME, StopRule, follow_stop_rule

__all__ = ["is_padding_step", "skip_padding_steps"]

_Optimizer = tf.compat.v1.train.Optimizer


def skip_padding_steps(optimizer: _Optimizer, features: Any) -> _Optimizer:
    """Returns `optimizer` wrapped so that padding steps change no variable.

    Use it in a TPUEstimator `model_fn` fed by `append_stopping_signals`:

        optimizer = tf.compat.v1.tpu.CrossShardOptimizer(
            tf.compat.v1.train.AdamOptimizer(1e-3)
        )
        optimizer = skip_padding_steps(optimizer, features)
        train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())

    On a padding step, the returned optimizer's `minimize`/`apply_gradients`
    change no weight, no slot and no non-slot variable (Adam's beta powers),
    and the global step does not advance: after training the global step is
    the number of real steps. On every other step they do exactly what
    `optimizer`'s do. Which steps are padding is the graph's stop rule
    (`append_stopping_signals(..., stop_rule=...)`, see `is_padding_step`):
    under the default `ANY_REPLICA_PADDING` a step in which any replica's
    batch is padding; under `ALL_REPLICAS_PADDING` only a step in which every
    replica's batch is padding, so a partly real step is applied and counted.

    Under `ALL_REPLICAS_PADDING` the padding examples of a partly real step
    must not train: the loss given to `minimize`/`compute_gradients`, or the
    gradients given to `apply_gradients`, must depend on the padding flag
    (e.g. `masked_mean_loss(per_example_loss, features)`), else a ValueError
    is raised while the graph is built.

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
      ValueError: `features` is a mapping without `USER_PROVIDED_SIGNAL_NAME`;
        the graph's stop rule cannot be followed (see `is_padding_step`);
        under `ALL_REPLICAS_PADDING`, later, from `minimize`,
        `compute_gradients` or `apply_gradients`: a loss or gradients that do
        not depend on the padding flag.
    """
    if not isinstance(optimizer, _Optimizer):
        raise TypeError(
            f"optimizer={optimizer!r} (type {type(optimizer).__name__}) must be a "
            "tf.compat.v1.train.Optimizer (e.g. tf.compat.v1.train.AdamOptimizer); Keras "
            "optimizers are not supported."
        )
    flag, where = _padding_flag_and_name(features)
    return _SkipPaddingStepsOptimizer(
        optimizer, flag, where, follow_stop_rule("skip_padding_steps")
    )


def is_padding_step(features: Any) -> tf.Tensor:
    """Scalar bool, the same on every replica: whether this step is padding under the stop rule.

    A padding step is one `skip_padding_steps` applies nothing on:

    * `StopRule.ANY_REPLICA_PADDING` (default): some replica's batch has a
      padding example;
    * `StopRule.ALL_REPLICAS_PADDING`: no replica's batch has a real example.

    The rule is the one `append_stopping_signals(..., stop_rule=...)`
    recorded in the graph. Use it in a `model_fn` to update state that the
    optimizer does not (e.g. a counter of trained examples) only on the
    steps that train. Inside a TPU replicate context it is computed from a
    cross-replica sum (call it outside a `tf.cond` of the model_fn, on every
    replica); outside one (CPU, one replica) from the local flag.

    Args:
      features: The step's features dict holding `USER_PROVIDED_SIGNAL_NAME`,
        or that flag tensor (bool or integer, True/non-zero on padding).

    Raises:
      TypeError, ValueError: As for `skip_padding_steps`'s `features`; a
        ValueError when the graph's pipelines recorded different stop rules
        or a reader built earlier followed another one.
    """
    flag, _ = _padding_flag_and_name(features)
    return _step_is_padding(flag, follow_stop_rule("is_padding_step"))


def _padding_flag_and_name(features: Any) -> Tuple[tf.Tensor, str]:
    """(the stop flag tensor, how to name it in errors) from `features`, validated."""
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
    return flag, where


def _step_is_padding(flag: tf.Tensor, rule: StopRule) -> tf.Tensor:
    """Scalar bool: whether this step is padding under `rule` (see `is_padding_step`).

    Inside a TPU replicate context a local count is summed over replicas, so
    every replica gets the same value; outside one (CPU, one replica) the
    local flag decides.
    """
    padding = tf.reshape(tf.cast(flag, tf.int32) > 0, [-1])
    if rule is StopRule.ANY_REPLICA_PADDING:
        local = tf.cast(tf.reduce_any(padding), tf.int32)
        return sum_over_replicas(local, name="any_replica_padding") > 0
    local_real = tf.reduce_sum(tf.cast(tf.logical_not(padding), tf.int32))
    return tf.equal(sum_over_replicas(local_real, name="real_examples_of_the_step"), 0)


def _depends_on(tensors: Sequence[Any], target: tf.Tensor) -> bool:
    """Whether any of `tensors` is computed from `target` (its data inputs, transitively).

    Walks tensor inputs (not control dependencies) back from `tensors`
    through the ops that compute them, into the ops of control flow and
    function calls whose inputs capture outer tensors. Graph building only.
    """
    target_ref = target.ref()
    stack = []
    for value in tensors:
        if isinstance(value, tf.IndexedSlices):
            stack.extend([value.values, value.indices])
        elif tf.is_tensor(value) and hasattr(value, "op"):
            stack.append(value)
    seen = set()
    while stack:
        tensor = stack.pop()
        ref = tensor.ref()
        if ref == target_ref:
            return True
        if ref in seen:
            continue
        seen.add(ref)
        stack.extend(tensor.op.inputs)
    return False


_UNMASKED = (
    "Under StopRule.ALL_REPLICAS_PADDING a step in which some replicas' batches are padding is "
    "applied, so padding examples would train as if they were real examples of zeros. Mask the "
    "loss with the flag, e.g. loss = masked_mean_loss(per_example_loss, features) (from "
    "monolith.core.stopping_signals) with CrossShardOptimizer(..., "
    "reduction=tf.compat.v1.losses.Reduction.SUM)."
)


def _optimizer_chain(optimizer: _Optimizer) -> list:
    """`optimizer` and the optimizers it wraps (`CrossShardOptimizer._opt`, ...), outer first."""
    chain = [optimizer]
    while isinstance(getattr(chain[-1], "_opt", None), _Optimizer):
        chain.append(chain[-1]._opt)  # pylint: disable=protected-access
    return chain


class _SkipPaddingStepsOptimizer(_Optimizer):
    """The optimizer `skip_padding_steps` returns (see there)."""

    def __init__(self, optimizer: _Optimizer, flag: tf.Tensor, flag_name: str, rule: StopRule):
        super().__init__(use_locking=False, name=f"SkipPaddingSteps_{optimizer.get_name()}")
        self._opt = optimizer
        self._flag = flag
        self._flag_name = flag_name
        self._rule = rule

    def compute_gradients(self, loss: Any, *args: Any, **kwargs: Any) -> list:
        """The inner optimizer's `compute_gradients` (runs on every step, padding too).

        Raises:
          ValueError: Under ALL_REPLICAS_PADDING, `loss` does not depend on the padding flag.
        """
        unmasked = (
            self._rule is StopRule.ALL_REPLICAS_PADDING
            and tf.is_tensor(loss)
            and not _depends_on([loss], self._flag)
        )
        if unmasked:
            raise ValueError(
                f"skip_padding_steps: the loss {loss.name!r} does not depend on the padding "
                f"flag {self._flag_name} ({self._flag.name!r}). {_UNMASKED}"
            )
        return self._opt.compute_gradients(loss, *args, **kwargs)

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

        Raises:
          ValueError: No gradient; under ALL_REPLICAS_PADDING, none of the
            gradients depends on the padding flag.
        """
        grads_and_vars = tuple(grads_and_vars)
        var_list = [v for g, v in grads_and_vars if g is not None]
        if not var_list:
            raise ValueError(
                "No gradients provided for any variable: " f"{[str(v) for _, v in grads_and_vars]}."
            )
        if self._rule is StopRule.ALL_REPLICAS_PADDING:
            grads = [g for g, _ in grads_and_vars if g is not None]
            if not _depends_on(grads, self._flag):
                raise ValueError(
                    "skip_padding_steps: none of the gradients given to apply_gradients (of "
                    f"{[v.name for v in var_list]}) depends on the padding flag "
                    f"{self._flag_name} ({self._flag.name!r}). {_UNMASKED}"
                )
        # Slots and non-slot variables before (outside) the conditional, under
        # the names the inner optimizer's own apply_gradients would give them.
        with tf.init_scope():
            for optimizer in _optimizer_chain(self._opt):
                optimizer._create_slots(var_list)  # pylint: disable=protected-access
        with tf.name_scope("skip_padding_steps"):
            is_padding = _step_is_padding(self._flag, self._rule)

        def apply() -> tf.Tensor:
            update = self._opt.apply_gradients(grads_and_vars, global_step=global_step, name=name)
            with tf.control_dependencies([update]):
                return tf.identity(tf.constant(True))

        def skip() -> tf.Tensor:
            return tf.constant(False)

        logging.info(
            "skip_padding_steps: %s updates %d variables only on steps that are not padding "
            "(stop rule %s).",
            self._opt.get_name(),
            len(var_list),
            self._rule.name,
        )
        applied = tf.cond(is_padding, skip, apply, name="skip_padding_steps")
        return tf.group(applied, name="apply_unless_padding")

    def get_slot(self, var: Any, name: str) -> Any:
        return self._opt.get_slot(var, name)

    def get_slot_names(self) -> list:
        return self._opt.get_slot_names()

    def variables(self) -> list:
        return self._opt.variables()
