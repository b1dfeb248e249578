"""The step number a host call logs under: one deterministic global-step read per step.

The host call records the global step in the TPU step, beside the optimizer
that increments it. Two unordered ops in one `session.run` (one loop
iteration on TPU) run in either order, so a plain read returned the value
before the increment on most steps and after it on some: the summaries of
one step landed on the next step's number (a duplicate and a gap).

`global_step_read` makes a fresh read of the global step in the graph (the
loop body) the model is built in, and `order_before_writers` makes every op
that takes the global step's handle (or ref) as an input wait for it,
whether it was built before or after the read: the optimizer's increment,
an `assign`, a `tf.cond` (v2) capturing the variable, the v1 `Switch`
feeding a cond branch. The read then always
sees the global step as it was when the step started: the number of steps
the global step counted before this one (0 for the first step of a run
from scratch). Ordering the read before the writers, not after, needs no
knowledge of the train op, and a writer inside a conditional still orders
after it.

`StepNumbers` makes the numbers unique on the host: it keeps the last
number logged in a local variable (initialized with the other local
variables when the session is created) and logs each call at
`max(global step read, last + 1)`. The read is larger on every step that
advanced the global step, so such a step logs under its own number; a step
that did not advance it (`skip_padding_steps` on a padding step: the global
step stays at the number of real steps N) logs under the next free number,
N, N + 1, ..., instead of repeating one.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import tensorflow as tf
from absl import logging
from tensorflow.python.ops import control_flow_util

_NOT_LOGGED = -1


def global_step_read(global_step: tf.Variable) -> Tuple[tf.Tensor, tf.Operation, tf.Tensor]:
    """A fresh read of `global_step` in the current graph and control-flow context.

    Returns:
      `(value, read_op, source)`: the int64 value, the op that reads the
      variable, and the tensor it reads from (the handle or ref as seen in
      this context: the loop's `Enter`, the function's captured placeholder).
    """
    value = global_step.read_value()
    read_op = value.op
    # ResourceVariable.read_value() is Identity(ReadVariableOp(handle)).
    if read_op.type == "Identity" and read_op.inputs[0].op.type == "ReadVariableOp":
        read_op = read_op.inputs[0].op
    return value, read_op, read_op.inputs[0]


def _while_context(op: tf.Operation):
    return control_flow_util.GetContainingWhileContext(op._get_control_flow_context())  # pylint: disable=protected-access


def _same_tensor(a: tf.Tensor, b: tf.Tensor) -> bool:
    return a.op is b.op and a.value_index == b.value_index


def _ancestors(op: tf.Operation) -> set:
    """`op` and every op it depends on, through data and control inputs."""
    seen = {op}
    stack = [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


# Ops that take a variable's handle or ref only to inspect it.
_INSPECTING_OP_TYPES = frozenset(
    {"IsVariableInitialized", "ReadVariableOp", "VarIsInitializedOp", "VariableShape"}
)


def _variable_initializers(graph: tf.Graph) -> set:
    variables = graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    variables += graph.get_collection(tf.compat.v1.GraphKeys.LOCAL_VARIABLES)
    return {v.initializer for v in variables if getattr(v, "initializer", None) is not None}


def order_before_writers(read_op: tf.Operation, source: tf.Tensor) -> List[tf.Operation]:
    """Makes every op that takes `source` as input wait for `read_op`.

    The train op may be built before the host call reads the global step
    (the usual order in a model_fn) or after it: every op of the same graph
    and the same while loop that takes `source` is ordered (a control edge
    into another loop frame is invalid), except the ops `read_op` itself
    depends on (the edge would close a cycle), variable initializers and ops
    that only inspect the variable.

    Returns:
      The ops that now wait for the read (empty if none takes `source`, e.g.
      when called before the train op is built).
    """
    graph = read_op.graph
    frame = _while_context(read_op)
    # Variable initializers and initialization checks must run before any read.
    skip = _ancestors(read_op) | _variable_initializers(graph)
    ordered = []
    for op in graph.get_operations():
        if op in skip or op.type in _INSPECTING_OP_TYPES:
            continue
        if not any(_same_tensor(t, source) for t in op.inputs):
            continue
        if _while_context(op) is not frame:
            continue
        if read_op not in op.control_inputs:
            op._add_control_input(read_op)  # pylint: disable=protected-access
        ordered.append(op)
    if ordered:
        logging.debug(
            "Host-call global-step read %s runs before %s", read_op.name, [o.name for o in ordered]
        )
    else:
        logging.warning(
            "No op writes the global step the host call read (%s): build the train op "
            "before generate_host_call_hook(), or the logged step numbers can race with "
            "the optimizer's increment",
            read_op.name,
        )
    return ordered


class StepNumbers:
    """Host-side numbering: each call's number is `max(step, last number + 1)`.

    Build in the host function (once per host function). Its variable is a
    local variable, so it is initialized with the AUC's when the session is
    created (a new session starts over).
    """

    def __init__(self, step: tf.Tensor):
        with tf.init_scope():
            self._last = tf.compat.v1.Variable(
                tf.constant(_NOT_LOGGED, tf.int64),
                trainable=False,
                name="host_call_last_logged_step",
                collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
                use_resource=True,
            )
        #: The number this call logs under.
        self.number = tf.maximum(tf.cast(step, tf.int64), self._last.read_value() + 1)

    def mark(self, after: List[Any]) -> tf.Operation:
        """Stores this call's number as the last one, once the ops `after` ran."""
        with tf.control_dependencies(list(after) + [self.number]):
            return self._last.assign(self.number, read_value=False)
