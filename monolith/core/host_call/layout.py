"""Pure bookkeeping for packing host-call tensors into one tensor per dtype.

A host call outfeeds every recorded tensor from every TPU core. Sending one
tensor per dtype instead of one per metric keeps the outfeed small, so
`BaseHostCall.compress_tensors` concatenates the recorded tensors of each dtype
and `decompress_tensors` splits them again on the host. This module holds the
arithmetic of that round trip -- which recorded tensor goes into which packed
tensor, at which columns -- as plain Python, so it is tested without a graph.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, List, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class PackedGroup:
    """The recorded tensors that share one dtype, packed side by side.

    Attributes:
      dtype: The dtype shared by the group (any hashable key).
      positions: Index of each member in recording order.
      sizes: Elements per replica of each member, in the same order.
    """

    dtype: Hashable
    positions: Tuple[int, ...]
    sizes: Tuple[int, ...]

    @property
    def width(self) -> int:
        """Columns of the packed tensor: the summed sizes of the members."""
        return sum(self.sizes)


def plan_packing(dtypes: Sequence[Hashable], sizes: Sequence[int]) -> Tuple[PackedGroup, ...]:
    """Groups recorded tensors by dtype, in order of each dtype's first appearance.

    Args:
      dtypes: The dtype of each recorded tensor, in recording order.
      sizes: The number of elements of each recorded tensor (per replica).

    Returns:
      One `PackedGroup` per distinct dtype. The first group holds the first
      recorded tensor (the global step), so it comes first after packing too.

    Raises:
      ValueError: If `dtypes` and `sizes` differ in length or a size is negative.
    """
    if len(dtypes) != len(sizes):
        raise ValueError(
            f"dtypes and sizes must have the same length, got {len(dtypes)} and {len(sizes)}"
        )
    positions: dict = {}
    for index, (dtype, size) in enumerate(zip(dtypes, sizes)):
        if size < 0:
            raise ValueError(f"sizes[{index}] must be >= 0, got {size}")
        positions.setdefault(dtype, []).append(index)
    return tuple(
        PackedGroup(dtype, tuple(members), tuple(sizes[i] for i in members))
        for dtype, members in positions.items()
    )


def recorded_order(groups: Sequence[PackedGroup]) -> List[Tuple[int, int]]:
    """Where each recorded tensor lives after packing.

    Args:
      groups: The result of `plan_packing`.

    Returns:
      For each recorded tensor, in recording order, `(group index, member
      index within the group)`.
    """
    located = {}
    for group_index, group in enumerate(groups):
        for member_index, position in enumerate(group.positions):
            located[position] = (group_index, member_index)
    # Invariant of plan_packing's own output, not user input.
    assert sorted(located) == list(range(len(located))), "positions must cover 0..n-1"  # noqa: S101
    return [located[position] for position in range(len(located))]
