"""`ReplicatedVariable`: one logical variable over per-replica TPU variables.

`BaseEmbeddingHostCall` caches per-step metrics in one resource variable per
TPU core. Inside the TPU step (a `tpu.replicate`/`tpu.rewrite` computation,
which TPUEstimator builds inside while-loop and function bodies) the step must
address "this core's copy": the variable's handle is then a
`TPUReplicatedInput` over all replicas' handles, obtained from the enclosing
`TPUReplicateContext`, and reads and writes go through it. Outside a TPU
computation (host code, `TPUEstimator(use_tpu=False)`, tests) the variable
acts as the first replica's variable.

Differences from the original Monolith module (which fails on TF 2.12-2.15):
- The conversion to a tensor is registered with `tensor_conversion_registry`
  (`ops.register_tensor_conversion_function` is gone).
- `TPUReplicateContext.get_replicated_var_handle(name, handle_id, vars_, ...)`
  is called with a handle id (the first replica's unique id).
- The enclosing TPU context is searched through outer graphs too: the step is
  built in FuncGraphs (while_v2 and function bodies).
- `assign*` build their ops in the current graph (the original switched to the
  handle's graph: "must be from the same graph" inside a while body), and a
  value read after an assignment is ordered after it.
- `_shared_name` returns the variable's name (the original returned an
  attribute that does not exist).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import tensorflow as tf
from tensorflow.python.framework import tensor_conversion_registry
from tensorflow.python.ops import gen_resource_variable_ops
from tensorflow.python.types import core

from monolith.core.common.tpu_context import enclosing_tpu_context as _enclosing_tpu_context

__all__ = ["ReplicatedVariable"]


class ReplicatedVariable(core.Tensor):
    """A replicated variable for use on TPUs.

    Inside a TPU replicate context it acts as a single variable whose handle
    is a replicated input of the computation (each core reads and writes its
    own replica). Outside it acts as the first replica's variable; the other
    replicas are only reached through `initializer` and `variables`.

    Args:
      name: The common name, used to name the replicated handle.
      variables: One resource variable per replica, same dtype and shape, in
        replica order.

    Raises:
      ValueError: If `variables` is empty or the variables differ in dtype or
        shape.
    """

    def __init__(self, name: str, variables: Sequence[tf.Variable]):
        variables = list(variables)
        if not variables:
            raise ValueError(f"variables must hold one variable per replica, got {variables}")
        dtypes = {v.dtype.base_dtype for v in variables}
        if len(dtypes) != 1:
            raise ValueError(f"variables must share one dtype, got {[v.dtype for v in variables]}")
        shapes = [v.shape for v in variables]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"variables must share one shape, got {shapes}")
        self._name = name
        self._primary_var = variables[0]
        self._vars = variables
        self._dtype = variables[0].dtype.base_dtype

    @property
    def handle(self) -> tf.Tensor:
        """The replicated handle inside a TPU context, else the first replica's."""
        tpu_context = _enclosing_tpu_context()
        if tpu_context is None:
            return self._primary_var.handle
        return tpu_context.get_replicated_var_handle(
            self._shared_name,
            self._unique_id,
            self._vars,
            is_mirrored=False,
            is_packed=False,
        )

    @property
    def variables(self) -> List[tf.Variable]:
        """The per-replica variables."""
        return list(self._vars)

    @property
    def initializer(self) -> tf.Operation:
        return tf.group([v.initializer for v in self._vars])

    @property
    def graph(self) -> tf.Graph:
        return self._primary_var.graph

    @property
    def _shared_name(self) -> str:
        return self._name.split(":")[0]

    @property
    def _unique_id(self) -> Any:
        return self._primary_var._unique_id  # pylint: disable=protected-access

    @property
    def name(self) -> str:
        return self._name

    @property
    def dtype(self) -> tf.DType:
        return self._dtype

    @property
    def shape(self) -> tf.TensorShape:
        return self._primary_var.shape

    @property
    def device(self) -> str:
        return self._primary_var.device

    def get_shape(self) -> tf.TensorShape:
        return self._primary_var.get_shape()

    def to_proto(self, export_scope: Optional[str] = None) -> Any:
        return self._primary_var.to_proto(export_scope=export_scope)

    @property
    def constraint(self) -> None:
        return None

    @property
    def op(self) -> tf.Operation:
        return self.get().op

    def get(self) -> tf.Variable:
        """The first replica's variable."""
        return self._primary_var

    @property
    def _in_graph_mode(self) -> bool:
        return self._primary_var._in_graph_mode  # pylint: disable=protected-access

    def _should_act_as_resource_variable(self) -> None:
        """Makes `resource_variable_ops.is_resource_variable` accept this object."""

    def _read_variable_op(self) -> tf.Tensor:
        if _enclosing_tpu_context() is None:
            return self._primary_var.read_value()
        return gen_resource_variable_ops.read_variable_op(self.handle, self._dtype)

    def read_value(self) -> tf.Tensor:
        """This replica's value inside a TPU context, else the first replica's."""
        return self._read_variable_op()

    def _update(self, method: str, raw_op: Any, value: Any, name: Optional[str], read_value: bool):
        if _enclosing_tpu_context() is None:
            return getattr(self._primary_var, method)(value, name=name, read_value=read_value)
        value = tf.convert_to_tensor(value, dtype=self._dtype)
        update = raw_op(self.handle, value, name=name)
        if not read_value:
            return update
        with tf.control_dependencies([update]):
            return self._read_variable_op()

    def assign(
        self, value: Any, use_locking: Any = None, name: Optional[str] = None, read_value=False
    ) -> Any:
        """Assigns `value`; returns the op, or the new value with `read_value`."""
        del use_locking
        return self._update(
            "assign", gen_resource_variable_ops.assign_variable_op, value, name, read_value
        )

    def assign_add(
        self, delta: Any, use_locking: Any = None, name: Optional[str] = None, read_value=True
    ) -> Any:
        """Adds `delta`; returns the new value, or the op without `read_value`."""
        del use_locking
        return self._update(
            "assign_add", gen_resource_variable_ops.assign_add_variable_op, delta, name, read_value
        )

    def assign_sub(
        self, delta: Any, use_locking: Any = None, name: Optional[str] = None, read_value=True
    ) -> Any:
        """Subtracts `delta`; returns the new value, or the op without `read_value`."""
        del use_locking
        return self._update(
            "assign_sub", gen_resource_variable_ops.assign_sub_variable_op, delta, name, read_value
        )

    def _dense_var_to_tensor(
        self, dtype: Optional[tf.DType] = None, name: Optional[str] = None, as_ref: bool = False
    ) -> Any:
        """Converts to a tensor: the value, or the handle with `as_ref`."""
        if _enclosing_tpu_context() is None:
            return self._primary_var._dense_var_to_tensor(  # pylint: disable=protected-access
                dtype=dtype, name=name, as_ref=as_ref
            )
        if dtype is not None and not dtype.is_compatible_with(self._dtype):
            return NotImplemented
        if as_ref:
            return self.handle
        return self.read_value()

    def __repr__(self) -> str:
        return f"<ReplicatedVariable {self._name!r} over {len(self._vars)} replicas>"


def _tensor_conversion(
    var: ReplicatedVariable,
    dtype: Optional[tf.DType] = None,
    name: Optional[str] = None,
    as_ref: bool = False,
) -> Any:
    return var._dense_var_to_tensor(dtype=dtype, name=name, as_ref=as_ref)  # pylint: disable=protected-access


# Lets a ReplicatedVariable be used wherever a tensor is expected.
tensor_conversion_registry.register_tensor_conversion_function(
    ReplicatedVariable, _tensor_conversion
)
