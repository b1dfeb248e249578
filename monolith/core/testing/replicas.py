"""One emulated train step over every replica of the pod.

TPUEstimator traces the train step once and the TPU runs it on every
replica, each with its own copy of the variables, kept identical because the
updates are computed from cross-replica sums. The emulator builds the step
once per replica instead, in one graph, one replica after another on the
calling thread (`build_replicated_step`):

* Replica r's `model_fn` gets replica r's batch (its own infeed queue) and
  `params["batch_size"]` per replica. Replicas after the first are built in
  a name scope `replica_<r>`.
* One set of variables: replica 0 creates them; every later replica gets
  replica 0's back (`_SharedVariables`): `tf.compat.v1.get_variable` by name
  (optimizer slots included), other variable creations (`tf.Variable`, e.g.
  Adam's beta powers, Keras layers) by creation order. A checkpoint therefore
  holds what each replica's copy holds on a TPU.
* `cross_replica_sum` is the real sum over the replicas (`collectives`).
* The loop runs replica 0's `train_op`, so the update is applied once per
  step: the other replicas' forward and backward passes run as inputs of the
  collectives, their own updates never run (the TPU's identical copies,
  applied once). Every replica's dequeue and outfeed record run on every
  step (the step depends on them).
* While replica r is built, `monolith.core.common.tpu_context` sees an
  emulated replica (`EmulatedReplicaContext`): `sum_over_replicas` (the feed
  hook's stop signal, `skip_padding_steps`) takes the real cross-replica
  sum, and `ReplicatedVariable` reads replica r's own slice.
* `tpu_function`'s shard context says `num_replicas` (what
  `CrossShardOptimizer` divides a MEAN loss's gradient by).

With one replica this is today's single step: no name scope, no sharing, and
`cross_replica_sum` is the identity.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator, List, Sequence

import tensorflow as tf
from tensorflow.python.ops import variable_scope as _variable_scope
from tensorflow.python.tpu import tpu_function

from monolith.core.common import tpu_context
from monolith.core.testing import user_params
from monolith.core.testing.collectives import Collectives, StepAnchor, route_cross_replica_sum
from monolith.core.testing.infeed import DequeuedBatch, Infeed
from monolith.core.testing.options import BuildOptions
from monolith.core.testing.outfeed import OutfeedRecord, step_records

__all__ = ["EmulatedReplicaContext", "ReplicatedStep", "build_replicated_step"]


class EmulatedReplicaContext:
    """What `enclosing_tpu_context()` returns while an emulated replica is built.

    Attributes:
      replica_id: The replica being built (host by host, as TPUEstimator numbers them).
      num_replicas: Replicas in the emulated pod.
      anchor: The step's while_v2 body FuncGraph (TF2) or `WhileContext` (v1):
        inside it, `common.tpu_context.enclosing_tpu_context()` returns this object.
    """

    def __init__(self, replica_id: int, num_replicas: int, anchor: Any):
        self.replica_id = replica_id
        self.num_replicas = num_replicas
        self.anchor = anchor

    def get_replicated_var_handle(
        self,
        name: str,
        handle_id: Any,
        vars_: Any,
        is_mirrored: bool = False,
        is_packed: bool = False,
    ) -> tf.Tensor:
        """This replica's handle of a per-replica variable (`TPUReplicateContext`'s signature).

        Raises:
          ValueError: `vars_` does not hold one variable per replica.
        """
        del handle_id, is_mirrored, is_packed
        if len(vars_) != self.num_replicas:
            raise ValueError(
                f"Replicated variable {name!r} has {len(vars_)} per-replica variables, but the "
                f"emulated pod has {self.num_replicas} replicas."
            )
        return vars_[self.replica_id].handle

    def __repr__(self) -> str:
        return f"<EmulatedReplicaContext replica {self.replica_id} of {self.num_replicas}>"


def _lift_variable_creation(loop_scope: str) -> Callable[..., Any]:
    """A variable creator that creates variables outside the loop body.

    while_v2 bodies are FuncGraphs, so variables must be lifted out of them.
    The loop's own name scope (`loop_scope`, v1 while loops) is dropped from
    the name, as TPUEstimator's loop does: a `tf.Variable` such as Adam's
    `beta1_power` gets the name a TPUEstimator checkpoint has, and a scope the
    model_fn opened itself is kept.
    """

    def creator(next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        scope = tf.compat.v1.get_default_graph().get_name_scope()
        if loop_scope and (scope == loop_scope or scope.startswith(loop_scope + "/")):
            scope = scope[len(loop_scope) + 1 :]
        with (
            tf.init_scope(),
            tf.compat.v1.get_default_graph().name_scope(scope + "/" if scope else None),
        ):
            return next_creator(**kwargs)

    return creator


@contextlib.contextmanager
def _variable_creator_everywhere(creator: Callable[..., Any]) -> Iterator[None]:
    """`variable_creator_scope(creator)` on the default graph and every graph enclosing it.

    Each graph keeps its own (thread-local) creator stack, and a variable
    created under `tf.init_scope()` (e.g. the optimizer slots and beta powers
    `skip_padding_steps` creates before its conditional) is created in the
    outermost graph, not in the while_v2 body: the creator must be there too.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(tf.compat.v1.variable_creator_scope(creator))
        graph = getattr(tf.compat.v1.get_default_graph(), "outer_graph", None)
        while graph is not None:
            with graph.as_default():
                # The scope stays on `graph`'s stack after as_default() exits.
                stack.enter_context(tf.compat.v1.variable_creator_scope(creator))
            graph = getattr(graph, "outer_graph", None)
        yield


class _SharedVariables:
    """Replica 0 creates the variables; later replicas get replica 0's back.

    `tf.compat.v1.get_variable` (custom getter): replica 0's calls run as
    usual; a later replica's call returns the variable of that name
    (`reuse=True`), so optimizer slots and scoped layers are found by name.
    The variable scope counters that uniquify default scope names (e.g. a
    slot's `w/Adam`) start each replica where replica 0 started, and end where
    replica 0 ended, so names match and the graph continues as after one
    model_fn call.

    Other creations (`tf.Variable`, `VariableV1`: Adam's beta powers, Keras
    layers, whose names are uniquified per call) go through the variable
    creator: a later replica's i-th such creation returns replica 0's i-th.
    """

    def __init__(self) -> None:
        self._store = _variable_scope.get_variable_scope_store()
        self._counts_before = copy.copy(self._store.variable_scopes_count)
        self._counts_after_first: dict = {}
        self._created: List[Any] = []
        self._replica = 0
        self._next = 0
        self._in_get_variable = 0

    @contextlib.contextmanager
    def replica(self, replica_id: int) -> Iterator[None]:
        """The block builds replica `replica_id` (0 first) with shared variables."""
        self._replica, self._next = replica_id, 0
        self._store.variable_scopes_count = copy.copy(self._counts_before)
        scope = tf.compat.v1.get_variable_scope()
        with (
            tf.compat.v1.variable_scope(
                scope, custom_getter=self._getter, auxiliary_name_scope=False
            ),
            _variable_creator_everywhere(self._creator),
        ):
            yield
            if replica_id == 0:
                self._counts_after_first = copy.copy(self._store.variable_scopes_count)
        if replica_id and self._next != len(self._created):
            raise ValueError(
                f"Replica {replica_id}'s model_fn created {self._next} variables outside "
                f"tf.compat.v1.get_variable, replica 0's {len(self._created)}: the model_fn must "
                "create the same variables on every replica (the emulator shares replica 0's)."
            )

    def finish(self) -> None:
        """Leaves the variable scope counters as replica 0 left them."""
        self._store.variable_scopes_count = copy.copy(self._counts_after_first)

    def _getter(self, getter: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
        if self._replica == 0:
            self._in_get_variable += 1
            try:
                return getter(name, *args, **kwargs)
            finally:
                self._in_get_variable -= 1
        kwargs["reuse"] = True
        try:
            return getter(name, *args, **kwargs)
        except ValueError as error:
            raise ValueError(
                f"Replica {self._replica}'s model_fn asked for variable {name!r}, which is not "
                f"one replica 0's created ({error}): the model_fn must create the same variables "
                "on every replica (the emulator shares replica 0's)."
            ) from error

    def _creator(self, next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        if self._in_get_variable:
            return next_creator(**kwargs)
        if self._replica == 0:
            variable = next_creator(**kwargs)
            self._created.append(variable)
            return variable
        if self._next >= len(self._created):
            raise ValueError(
                f"Replica {self._replica}'s model_fn creates variable {kwargs.get('name')!r} "
                f"beyond replica 0's {len(self._created)}: the model_fn must create the same "
                "variables on every replica (the emulator shares replica 0's)."
            )
        variable = self._created[self._next]
        self._next += 1
        return variable


@dataclasses.dataclass(frozen=True)
class ReplicatedStep:
    """One step's replicas, built.

    Attributes:
      batches: Each replica's dequeued batch, in replica order.
      specs: Each replica's model_fn result.
      records: Each replica's outfeed records (stop flag, host call or loss).
      train_op: Replica 0's train op (the step's update, applied once).
      loss: Replica 0's loss, as float32 (TPUEstimator reports replica 0's).
    """

    batches: tuple
    specs: tuple
    records: tuple
    train_op: Any
    loss: tf.Tensor

    @property
    def dequeue_ops(self) -> List[tf.Operation]:
        return [batch.dequeue_op for batch in self.batches]


@contextlib.contextmanager
def _shard_context(num_replicas: int) -> Iterator[None]:
    """`tpu_function.tpu_shard_context(num_replicas)` unless the same one is already set."""
    current = tpu_function.get_tpu_context().number_of_shards
    if current == num_replicas:
        yield
        return
    with tpu_function.tpu_shard_context(num_replicas):
        yield


def _build_replica(
    model_fn: Callable[..., Any], batch: DequeuedBatch, options: BuildOptions
) -> tuple:
    spec = user_params.call_model_fn(model_fn, batch.features, batch.labels, options)
    if getattr(spec, "train_op", None) is None or getattr(spec, "loss", None) is None:
        raise ValueError(f"model_fn returned {spec!r} without loss or train_op.")
    loss = tf.cast(spec.loss, tf.float32)
    records: List[OutfeedRecord] = step_records(
        spec, batch.features, loss, options.hook_class, options.topology.input_mode
    )
    return spec, loss, records


def build_replicated_step(
    model_fn: Callable[..., Any],
    infeed: Infeed,
    options: BuildOptions,
    after: Sequence[Any] = (),
) -> ReplicatedStep:
    """Builds every replica's part of one step (call inside the loop body; see the module).

    `after`: tensors every replica's dequeue waits for, so the step's
    computation from its batch (its update included) runs after them.
    """
    num_replicas = options.topology.num_replicas
    anchor = StepAnchor()
    loop_scope = tf.compat.v1.get_default_graph().get_name_scope()
    collectives = Collectives(num_replicas, anchor)
    shared = _SharedVariables() if num_replicas > 1 else None
    batches, specs, records, losses = [], [], [], []
    with _shard_context(num_replicas), route_cross_replica_sum(collectives):
        for replica in range(num_replicas):
            context = EmulatedReplicaContext(replica, num_replicas, anchor.anchor)
            with contextlib.ExitStack() as stack:
                if replica:
                    stack.enter_context(tf.name_scope(f"replica_{replica}"))
                stack.enter_context(collectives.replica(replica))
                stack.enter_context(tpu_context.emulated_replica(context))
                batch = infeed.dequeue(replica, after)
                stack.enter_context(
                    _variable_creator_everywhere(_lift_variable_creation(loop_scope))
                )
                if shared is not None:
                    stack.enter_context(shared.replica(replica))
                spec, loss, replica_records = _build_replica(model_fn, batch, options)
            batches.append(batch)
            specs.append(spec)
            records.append(replica_records)
            losses.append(loss)
        if shared is not None:
            shared.finish()
        collectives.resolve()
    return ReplicatedStep(
        batches=tuple(batches),
        specs=tuple(specs),
        records=tuple(records),
        train_op=specs[0].train_op,
        loss=losses[0],
    )
