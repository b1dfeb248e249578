"""Base of the TPUEstimator host calls: records per-core tensors, packs and unpacks them.

A TPUEstimator `host_call` is `(host_fn, tensors)`: each step every TPU core
outfeeds `tensors`, and on the host `host_fn` receives each of them
concatenated over the cores along axis 0 (`[num_replicas, ...]`; with
`use_tpu=False` the tensors themselves, `[1, ...]`). `BaseHostCall` collects
what the `model_fn` wants to see on the host (`record_summary_tensor`, on the
thread building the graph), packs it into one `[1, sum k_i]` tensor per dtype
(`compress_tensors`), and lets the host function split the `[num_replicas,
sum k_i]` tensors it receives back into the recorded tensors
(`decompress_tensors`). Subclasses implement `generate_host_call_hook`: call
`self.compress_tensors()`, return `self._compressed_tensors` as the host
call's tensors, and call `self.decompress_tensors(args)` in the host function
(as `BaseEmbeddingHostCall` does), so that overrides of either take effect.

State, for subclasses: `_tensor_names` (the recorded names, in recording
order, the global step first), `_recorded_tensors` (each recorded tensor
flattened to `[k]`, same order) and, once `compress_tensors` ran,
`_compressed_tensors` (the packed `[1, sum k_i]` tensors, one per dtype).

Differences from the original Monolith module:
- A recorded tensor must have a static length (checked when it is recorded).
- `decompress_tensors` keeps the replica dimension for any replica count: a
  tensor recorded with k == 1 element comes back as `[num_replicas]`, with
  k > 1 as `[num_replicas, k]` (the original squeezed `[1, k]` to `[k]` and a
  single replica's scalar to `[]`, so the one-replica CPU path crashed).
- Tensors come back in recording order and `_tensor_names` keeps that order
  (the original reordered both by dtype).
- User errors raise ValueError/RuntimeError naming the tensor, not `assert`.
- The recorded global step is read before the step's optimizer increments it
  (`compress_tensors` orders the read before every writer of the global
  step, see `host_call.steps`): it is the global step when the step
  started, on every step. The original's read raced the increment.
- The recorded and the packed tensors have their own attributes
  (`_recorded_tensors`, `_compressed_tensors`); the original's `_tensors`
  held the one before `compress_tensors` and the other after it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core.host_call import layout as _host_call_layout
from monolith.core.host_call import steps as _host_call_steps
from monolith.core.host_call import tensor_checks as _tensor_checks

_GLOBAL_STEP_NAME = "global_step"


class BaseHostCall:
    """Records tensors in the TPU step and hands them to a host function.

    Args:
      output_dir: Directory under which subclasses write their summaries.
      enable_host_call: When False, `record_summary_tensor` records nothing.

    Raises:
      RuntimeError: If the host call is enabled and the graph has no global
        step yet (create it first, as TPUEstimator does before `model_fn`).
    """

    def __init__(self, output_dir: str, enable_host_call: bool):
        self._output_dir = output_dir
        self._enable_host_call = enable_host_call
        self._tensor_names: List[str] = []
        # Each recorded tensor flattened to `[k]`, and its k, in recording order.
        self._recorded_tensors: List[tf.Tensor] = []
        self._recorded_sizes: List[int] = []
        # Set by compress_tensors: which recorded tensors each packed tensor
        # holds, and the packed `[1, sum k_i]` tensors (one per dtype).
        self._packing: Optional[Tuple[_host_call_layout.PackedGroup, ...]] = None
        self._compressed_tensors: Optional[List[tf.Tensor]] = None
        # The global-step read and what it reads from, ordered before the
        # step's writers of the global step when the tensors are compressed.
        self._global_step_read: Optional[Tuple[tf.Operation, tf.Tensor]] = None

        global_step = tf.compat.v1.train.get_global_step()
        if global_step is None:
            if enable_host_call:
                raise RuntimeError(
                    "BaseHostCall(enable_host_call=True) needs the global step, which "
                    "records first: create it (tf.compat.v1.train.get_or_create_global_step()) "
                    "before the host call"
                )
            return
        # A fresh read in this step; see host_call.steps for why it is ordered.
        value, read_op, source = _host_call_steps.global_step_read(global_step)
        self._global_step_read = (read_op, source)
        # The host call concatenates every core's tensors along a batch dimension.
        self._append(_GLOBAL_STEP_NAME, tf.reshape(value, [-1]), 1)

    def _append(self, name: str, flat_tensor: tf.Tensor, size: int) -> None:
        self._tensor_names.append(name)
        self._recorded_tensors.append(flat_tensor)
        self._recorded_sizes.append(size)

    def record_summary_tensor(self, name: str, tensor: Any) -> None:
        """Records a scalar or vector to be sent to the host function.

        Called while the `model_fn` builds the TPU step. The tensor's length
        must be known statically: the host splits the packed tensors by it.

        Args:
          name: Unique name; subclasses route tensors on the host by name.
          tensor: A scalar or a vector with a static length (anything
            convertible to a tensor).

        Raises:
          ValueError: If `name` was recorded before, or `tensor` is not a
            scalar or a vector of static length.
          RuntimeError: If the tensors were already compressed.
        """
        if not self._enable_host_call:
            return
        if self._packing is not None:
            raise RuntimeError(
                f"cannot record {name!r}: the host-call tensors were already compressed "
                "(record every tensor before generate_host_call_hook())"
            )
        if name in self._tensor_names:
            raise ValueError(
                f"name {name!r} was already recorded; recorded names: {self._tensor_names}"
            )
        tensor = tf.convert_to_tensor(tensor)
        size = _tensor_checks.static_length(f"tensor {name!r}", tensor)
        self._append(name, tf.reshape(tensor, [-1]), size)

    def compress_tensors(self) -> None:
        """Packs the recorded tensors into one `[1, sum k_i]` tensor per dtype.

        Sets `self._compressed_tensors` to the packed tensors, in order of
        each dtype's first recording (so the global step's dtype comes first);
        the recorded tensors stay in `self._recorded_tensors`.
        Also makes every op built so far that writes the global step (the
        optimizer's increment) wait for the recorded global-step read, so
        the step number is the global step when the step started, never the
        value after its increment: call it (`generate_host_call_hook`) after
        building the train op.

        Raises:
          RuntimeError: If called twice.
        """
        if self._packing is not None:
            raise RuntimeError("compress_tensors() was already called")
        recorded = self._recorded_tensors
        # Invariant: _append appends to all three lists together.
        assert len(self._tensor_names) == len(recorded) == len(self._recorded_sizes)  # noqa: S101
        packing = _host_call_layout.plan_packing([t.dtype for t in recorded], self._recorded_sizes)
        packed = []
        for group in packing:
            members = [recorded[i] for i in group.positions]
            tensor = tf.expand_dims(tf.concat(members, axis=0), axis=0)
            packed.append(tensor)
            logging.info(
                "Host call compressed %d tensors of dtype %s into shape %s",
                len(members),
                group.dtype.name,
                tensor.shape,
            )
        self._packing = packing
        self._compressed_tensors = packed
        if self._global_step_read is not None:
            _host_call_steps.order_before_writers(*self._global_step_read)

    def decompress_tensors(self, tensors: Sequence[Any]) -> Tuple[tf.Tensor, List[tf.Tensor]]:
        """Splits the packed tensors the host function received.

        Runs while TPUEstimator builds the host function (on the host).

        Args:
          tensors: The packed tensors, each `[num_replicas, sum k_i]`, in the
            order `compress_tensors` produced them.

        Returns:
          `(global_step, tensors)`: the first replica's global step (a scalar)
          and the recorded tensors in recording order, each `[num_replicas]`
          if recorded with one element, else `[num_replicas, k]`.

        Raises:
          RuntimeError: If `compress_tensors` was not called.
          ValueError: If the number or shapes of `tensors` do not match.
          TypeError: If a packed tensor's dtype does not match.
        """
        if self._packing is None:
            raise RuntimeError("decompress_tensors() needs compress_tensors() to be called first")
        if len(tensors) != len(self._packing):
            raise ValueError(
                f"expected {len(self._packing)} compressed tensors (one per dtype), "
                f"got {len(tensors)}"
            )
        split_groups = []
        for index, (group, packed) in enumerate(zip(self._packing, tensors)):
            packed = tf.convert_to_tensor(packed)
            arg_name = f"compressed tensor {index}"
            _tensor_checks.check_rank(arg_name, packed, 2)
            _tensor_checks.check_dtype(arg_name, packed, group.dtype)
            _tensor_checks.check_shape(arg_name, packed, [None, group.width])
            logging.info("Decompressing tensor of shape %s, dtype %s", packed.shape, packed.dtype)
            pieces = tf.split(packed, list(group.sizes), axis=1)
            split_groups.append(
                [
                    tf.reshape(piece, [-1]) if size == 1 else piece
                    for piece, size in zip(pieces, group.sizes)
                ]
            )
        decompressed = [
            split_groups[g][m] for g, m in _host_call_layout.recorded_order(self._packing)
        ]
        # Invariant: __init__ records the global step first; no user call can change that.
        assert self._tensor_names[0] == _GLOBAL_STEP_NAME, self._tensor_names  # noqa: S101
        return decompressed[0][0], decompressed

    def generate_host_call_hook(self) -> Optional[Tuple[Any, List[tf.Tensor]]]:
        """Returns TPUEstimator's `host_call` `(host_fn, tensors)`; None here.

        Subclasses implement their host function.
        """
        return None
