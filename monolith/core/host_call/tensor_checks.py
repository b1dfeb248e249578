"""Static shape and dtype checks for tensors handed to the host calls.

Each check raises a `ValueError` (shape) or `TypeError` (dtype) whose message
names the argument and shows the bad value, at graph-construction time, so a
user sees the mistake where it is made rather than as an XLA or shape error
deep inside TPUEstimator. None of these use `assert` (stripped by `python -O`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf


def check_not_none(arg_name: str, value: Any) -> None:
    """Raises ValueError if `value` is None."""
    if value is None:
        raise ValueError(f"{arg_name} must be a tensor, got None")


def check_rank(arg_name: str, tensor: Any, rank: int) -> None:
    """Raises ValueError unless `tensor` has static rank `rank`."""
    shape = tensor.shape
    if shape.rank != rank:
        raise ValueError(f"{arg_name} must have rank {rank}, got shape {shape}")


def check_dtype(arg_name: str, tensor: Any, dtype: tf.DType) -> None:
    """Raises TypeError unless `tensor` has dtype `dtype`."""
    if tensor.dtype.base_dtype != dtype:
        raise TypeError(f"{arg_name} must have dtype {dtype.name}, got {tensor.dtype.name}")


def check_shape(arg_name: str, tensor: Any, shape: Sequence[Optional[int]]) -> None:
    """Raises ValueError unless `tensor`'s static shape is compatible with `shape`.

    A None in `shape` or in the tensor's shape matches any length.
    """
    if not tensor.shape.is_compatible_with(tf.TensorShape(shape)):
        raise ValueError(f"{arg_name} must have shape {list(shape)}, got {tensor.shape}")


def static_length(arg_name: str, tensor: Any) -> int:
    """Number of elements of a scalar or vector whose length is known statically.

    Raises:
      ValueError: If `tensor` has unknown rank, rank > 1, or a length that is
        only known when the graph runs.
    """
    shape = tensor.shape
    if shape.rank is None:
        raise ValueError(f"{arg_name} must be a scalar or a vector, got unknown rank")
    if shape.rank > 1:
        raise ValueError(
            f"{arg_name} must be a scalar or a vector (shape (k,) or ()), got shape {shape}"
        )
    if shape.rank == 0:
        return 1
    length = tf.compat.dimension_value(shape[0])
    if length is None:
        raise ValueError(
            f"{arg_name} must have a static length, got shape {shape}: the host call "
            "splits the outfed tensors by lengths known when the graph is built"
        )
    return length
