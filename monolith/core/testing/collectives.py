"""`cross_replica_sum` over the replicas of the emulated pod.

The emulator builds the step's replicas one after another, on the calling
thread (see `replicas`). A replica's `cross_replica_sum(x)` cannot be the sum
yet (the later replicas do not exist), so it returns a stand-in: an Identity
of `x`, built in the step's own context (the while_v2 body FuncGraph in TF2
behaviour, the v1 `WhileContext` otherwise). Once every replica is built,
`Collectives.resolve` builds one `add_n` per collective and group, over the
replicas' inputs in replica order, and rewires each replica's stand-in to it.
Collectives are matched by order: every replica's i-th `cross_replica_sum` is
the same collective, as on a TPU, where all replicas run one program.

* Inside a `tf.cond`/`tf.while_loop` of the model_fn (e.g. `skip_padding_steps`
  around `CrossShardOptimizer`), the stand-in is built in the step's context,
  outside the conditional (each replica's branch is a graph of its own, so a
  sum over replicas can only live outside them), and the value is passed in.
  `x` must therefore be computed outside the conditional (a gradient passed
  in is); otherwise `cross_replica_sum` raises a ValueError.
* Gradient: the stand-in's gradient is `cross_replica_sum` of the incoming
  gradient, as TPU's `CrossReplicaSum` gradient is (another emulated sum when
  taken while the replicas are built).
* `group_assignment` (a static `[groups, size]` partition of the replicas)
  sums each group separately; None is one group of every replica.
* With one replica (or a group of one) the sum is `tf.identity(x)`.

Why a patch: `CrossReplicaSum` has no CPU kernel, and TF creates it in
function bodies (cond/while branches) where an op cannot be removed or
rewired afterwards; op callbacks see it only after creation. The only hook
before creation is the Python op wrapper `gen_tpu_ops.cross_replica_sum`,
which `tf.compat.v1.tpu.cross_replica_sum` and `CrossShardOptimizer` call.
`route_cross_replica_sum` replaces it with a `common.scoped_patch.ScopedPatch`:
only while some thread is inside the block (reference-counted under a lock),
routing the calling thread's calls to its `Collectives` and every other
thread's call to the original op wrapper. `tf.raw_ops.CrossReplicaSum`
is not routed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, List, Optional

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import gen_tpu_ops
from tensorflow.python.tpu.ops import tpu_ops

from monolith.core.common.scoped_patch import ScopedPatch

__all__ = ["Collectives", "StepAnchor", "route_cross_replica_sum"]

_GRADIENT = "MonolithEmulatedCrossReplicaSum"


# -- the scoped patch -----------------------------------------------------------------

# Thread-scoped and reference-counted: only the threads building a step see the routing.
_CROSS_REPLICA_SUM = ScopedPatch(gen_tpu_ops, "cross_replica_sum")
_ROUTE = threading.local()  # .collectives: the Collectives building on this thread


def _current_collectives() -> Optional[Collectives]:
    return getattr(_ROUTE, "collectives", None)


@contextlib.contextmanager
def route_cross_replica_sum(collectives: Collectives) -> Iterator[None]:
    """Routes this thread's `cross_replica_sum` calls to `collectives` inside the block.

    `common.scoped_patch.ScopedPatch` installs the dispatcher in
    `gen_tpu_ops.cross_replica_sum` for the first user and removes it with the
    last; every other thread's call goes to the original op wrapper.
    """

    def routed(input, group_assignment, name=None):  # noqa: A002 (gen_tpu_ops' argument name)
        return collectives.cross_replica_sum(input, group_assignment, name)

    previous = _current_collectives()
    _ROUTE.collectives = collectives
    try:
        with _CROSS_REPLICA_SUM.scope(routed):
            yield
    finally:
        _ROUTE.collectives = previous


@tf.RegisterGradient(_GRADIENT)
def _stand_in_gradient(op: tf.Operation, grad: tf.Tensor) -> tf.Tensor:
    """The gradient of a cross-replica sum: the cross-replica sum of the gradient (as on TPU)."""
    collectives = _current_collectives()
    groups = collectives.groups_of(op) if collectives is not None else None
    return tpu_ops.cross_replica_sum(grad, groups)


# -- where the step is built ----------------------------------------------------------


class StepAnchor:
    """The context the step's replicas are built in, where their sums are built.

    In TF2 behaviour the emulated loop's body is a while_v2 FuncGraph
    (`graph`); in v1 behaviour it is a `WhileContext` (`context`) of the
    graph. `anchor` is whichever of the two `common.tpu_context` looks for.
    """

    def __init__(self) -> None:
        self.graph = tf.compat.v1.get_default_graph()
        self.v2 = bool(getattr(self.graph, "building_function", False))
        self.context = None if self.v2 else self.graph._get_control_flow_context()  # pylint: disable=protected-access

    @property
    def anchor(self) -> Any:
        return self.graph if self.v2 else self.context

    def _outer_graphs(self) -> list:
        graphs, graph = [], self.graph
        while graph is not None:
            graphs.append(graph)
            graph = getattr(graph, "outer_graph", None)
        return graphs

    def at_anchor(self) -> bool:
        """Whether ops are being built right in the step's context (not in a nested one)."""
        graph = tf.compat.v1.get_default_graph()
        if self.v2:
            return graph is self.graph
        return graph is self.graph and graph._get_control_flow_context() is self.context  # pylint: disable=protected-access

    def hoist(self, x: tf.Tensor, what: str) -> tf.Tensor:
        """`x` as a tensor of the step's context (or of a context enclosing it).

        Follows captures (TF2) and cond switches (v1) outwards; raises when `x`
        is computed inside a nested conditional or loop.
        """
        original = x
        if self.v2:
            outer = self._outer_graphs()
            while not any(x.graph is g for g in outer):
                captures = getattr(x.graph, "captures", None) or ()
                external = next(
                    (ext for ext, internal in captures if internal is x or internal.name == x.name),
                    None,
                )
                if external is None:
                    raise self._nested_error(original, what)
                x = external
            return x
        while True:
            context = x.op._get_control_flow_context()  # pylint: disable=protected-access
            if context is None or self._encloses_step(context):
                return x
            if x.op.type in ("Switch", "RefSwitch"):
                x = x.op.inputs[0]
                continue
            raise self._nested_error(original, what)

    def _encloses_step(self, context: Any) -> bool:
        step_context = self.context
        while step_context is not None:
            if step_context is context:
                return True
            step_context = step_context.outer_context
        return False

    @staticmethod
    def _nested_error(x: tf.Tensor, what: str) -> ValueError:
        return ValueError(
            f"{what}({x.name}): inside a tf.cond/tf.while_loop of the model_fn, the emulator can "
            "only sum a value computed outside it (e.g. a gradient passed in); compute the value "
            "before the conditional."
        )

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Builds the enclosed ops in the step's context, with no control dependencies."""
        if self.v2:
            with self.graph.as_default(), tf.control_dependencies(None):
                yield
            return
        # v1: control_dependencies(None) also leaves the control-flow context
        # (and puts it back on exit); enter the step's WhileContext inside it.
        with self.graph.control_dependencies(None):
            self.graph._set_control_flow_context(self.context)  # pylint: disable=protected-access
            yield


# -- the collectives of one step ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """One replica's `cross_replica_sum` call: its input and the stand-in to rewire."""

    value: tf.Tensor
    stand_in: tf.Tensor
    groups: tuple


def _groups(group_assignment: Any, num_replicas: int) -> tuple:
    """`group_assignment` as a tuple of replica tuples, validated as a partition of the replicas."""
    if group_assignment is None:
        return (tuple(range(num_replicas)),)
    value = tf.get_static_value(group_assignment) if tf.is_tensor(group_assignment) else None
    try:
        array = np.asarray(group_assignment if value is None else value)
    except (TypeError, ValueError):
        array = np.asarray([])
    groups = tuple(tuple(int(r) for r in row) for row in array) if array.ndim == 2 else ()
    members = sorted(r for group in groups for r in group)
    if members != list(range(num_replicas)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"group_assignment={group_assignment!r} must be a static [groups, size] partition "
            f"of the {num_replicas} replicas (0..{num_replicas - 1}) into equal groups."
        )
    return groups


class Collectives:
    """The cross-replica sums of one emulated step (see the module docstring).

    Args:
      num_replicas: Replicas in the step.
      anchor: Where the step is built (`StepAnchor`).
    """

    def __init__(self, num_replicas: int, anchor: StepAnchor):
        self._num_replicas = num_replicas
        self._anchor = anchor
        self._calls: List[List[_Call]] = [[] for _ in range(num_replicas)]
        self._groups_by_op: dict = {}
        self._replica = 0

    @contextlib.contextmanager
    def replica(self, replica_id: int) -> Iterator[None]:
        """The block builds replica `replica_id`'s part of the step."""
        previous, self._replica = self._replica, replica_id
        try:
            yield
        finally:
            self._replica = previous

    def groups_of(self, op: tf.Operation) -> Optional[tuple]:
        """The group assignment of the stand-in `op` (for its gradient)."""
        groups = self._groups_by_op.get(op.name)
        return [list(group) for group in groups] if groups is not None else None

    def cross_replica_sum(self, x: Any, group_assignment: Any, name: Optional[str]) -> tf.Tensor:
        """This replica's part of a cross-replica sum: the stand-in (see the module docstring)."""
        x = tf.convert_to_tensor(x)
        groups = _groups(group_assignment, self._num_replicas)
        if len(groups[0]) == 1:
            return tf.identity(x, name=name)
        value = self._anchor.hoist(x, "cross_replica_sum")
        at_anchor = self._anchor.at_anchor()
        scope = contextlib.nullcontext() if at_anchor else self._anchor.building()
        with scope, tf.compat.v1.get_default_graph().gradient_override_map({"Identity": _GRADIENT}):
            stand_in = tf.identity(value, name=name if at_anchor else None)
        self._groups_by_op[stand_in.op.name] = groups
        self._calls[self._replica].append(_Call(value, stand_in, groups))
        return stand_in if at_anchor else tf.identity(stand_in, name=name)

    def resolve(self) -> None:
        """Builds every sum and rewires the stand-ins to it (call once every replica is built).

        Raises:
          ValueError: the replicas called `cross_replica_sum` a different
            number of times, or their i-th calls differ in dtype or groups.
        """
        counts = [len(calls) for calls in self._calls]
        if len(set(counts)) > 1:
            raise ValueError(
                f"The replicas called cross_replica_sum {counts} times (replica 0 first); every "
                "replica must call it equally often, in the same order, as on a TPU, where all "
                "replicas run one program."
            )
        for index, calls in enumerate(zip(*self._calls)):
            first = calls[0]
            for replica, call in enumerate(calls):
                if call.value.dtype != first.value.dtype or call.groups != first.groups:
                    raise ValueError(
                        f"cross_replica_sum #{index}: replica {replica} sums {call.value!r} over "
                        f"groups {call.groups} but replica 0 sums {first.value!r} over "
                        f"{first.groups}; every replica must make the same calls in the same order."
                    )
            with self._anchor.building():
                for group in first.groups:
                    total = tf.math.add_n(
                        [calls[r].value for r in group], name=f"cross_replica_sum_{index}"
                    )
                    for r in group:
                        calls[r].stand_in.op._update_input(0, total)  # pylint: disable=protected-access
