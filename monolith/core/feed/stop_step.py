"""The step that stopped training: which replicas still had real data, and what the rule dropped.

The outfeed thread (`FeedSession.run_outfeed`) builds a `StopStep` from the
outfeed result in which it first saw the stop flag: each replica's count of
real examples (`"real_examples"` beside `"stopping"`, concatenated over
replicas in replica order by TPUEstimator and the emulator). The training
thread logs `untrained_warning()` when it stops training.

Under `StopRule.ANY_REPLICA_PADDING` training stops on the first step in
which any replica's batch is padding. On a pod whose hosts read shards of
different lengths, that is when the shortest shard ends: the replicas that
still had real batches in that step, and everything after it in their
shards, are never trained. The warning names them and the rule that trains
them. Pure functions: no TensorFlow, testable without a session.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

from monolith.core.feed.signal import StopRule

__all__ = ["StopStep", "hosts_with_real_data"]


def hosts_with_real_data(
    real_examples: Sequence[int], replicas_per_host: Optional[int]
) -> Dict[Optional[int], List[int]]:
    """`{host: [replica, ...]}` of the replicas with real examples, host by host.

    Replicas are numbered host by host (host h has replicas `h * R ... h * R +
    R - 1`). When `replicas_per_host` is unknown or does not divide the
    replicas (e.g. only replica 0's values reached the host under BROADCAST),
    the replicas are listed under host None.
    """
    replicas = [r for r, count in enumerate(real_examples) if count > 0]
    per_host = replicas_per_host
    if not per_host or len(real_examples) % per_host:
        return {None: replicas} if replicas else {}
    hosts: Dict[Optional[int], List[int]] = {}
    for replica in replicas:
        hosts.setdefault(replica // per_host, []).append(replica)
    return hosts


def _names(hosts: Dict[Optional[int], List[int]]) -> str:
    """'host 0 (replicas 0, 1), host 1 (replica 2)', or 'replicas 0, 2' without hosts."""

    def replicas(ids: List[int]) -> str:
        return f"replica{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"

    return ", ".join(
        replicas(ids) if host is None else f"host {host} ({replicas(ids)})"
        for host, ids in hosts.items()
    )


@dataclasses.dataclass(frozen=True)
class StopStep:
    """The outfed step in which the hook first saw the stop flag.

    Attributes:
      rule: The stop rule the graph was built with.
      real_examples: Each replica's real examples in that step (replica
        order), or None when the outfeed did not carry them.
      replicas_per_host: From the hook's context (None if unknown).
    """

    rule: StopRule
    real_examples: Optional[tuple]
    replicas_per_host: Optional[int] = None

    def hosts_with_real_data(self) -> Dict[Optional[int], List[int]]:
        """`{host: [replica, ...]}` that still had real examples in the stop step."""
        if self.real_examples is None:
            return {}
        return hosts_with_real_data(self.real_examples, self.replicas_per_host)

    def untrained_warning(self) -> Optional[str]:
        """The WARNING to log when this step stops training, or None.

        Only under ANY_REPLICA_PADDING, when some replicas still had real
        batches: they, and the rest of their shards, are not trained. (Under
        ALL_REPLICAS_PADDING the stop step has no real example.)
        """
        if self.rule is not StopRule.ANY_REPLICA_PADDING:
            return None
        hosts = self.hosts_with_real_data()
        if not hosts:
            return None
        return (
            f"Training stopped at the end of the stream on a step in which {_names(hosts)} "
            "still had real batches: under StopRule.ANY_REPLICA_PADDING (the default) a step in "
            "which any replica's batch is padding ends training and trains nothing, so that "
            "step's real batches and the rest of their shards are not trained. "
            "StopRule.ALL_REPLICAS_PADDING trains them: append_stopping_signals(..., "
            "stop_rule=StopRule.ALL_REPLICAS_PADDING), with the loss masked "
            "(stopping_signals.masked_mean_loss); see README 'Several hosts: nothing lost'."
        )
