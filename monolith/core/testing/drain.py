"""What the end of the stream left untrained: each host's stream drained after the stop.

Under `StopRule.ANY_REPLICA_PADDING` training stops on the first step in
which any replica's batch is padding. When the hosts' shards differ in
length, the longer ones still hold real batches then. `DrainAfterStop`, a
hook placed after the feed hook (whose `end()` joins the infeed thread, the
only other user of the iterators), counts them in its `end()`: when the
feed hook stopped training at the end of the stream, it takes each host's
next elements until the first padding one (or the end of a finite stream).
The iterators are not checkpointed, so draining them changes nothing a
restart sees.
"""

from __future__ import annotations

from typing import Any, List, Optional

import tensorflow as tf
from absl import logging

from monolith.core.testing.results import EmulatedTPUTraining

__all__ = ["DrainAfterStop"]


class DrainAfterStop(tf.compat.v1.train.SessionRunHook):
    """After a stop at the end of the stream, counts each host's real batches left in its stream.

    Attributes:
      left: Per host (input pipeline order), the real batches its pipeline
        still held after the stop; None until `end()` drained them, and when
        the feed hook did not stop training at the end of the stream.
    """

    def __init__(self, built: EmulatedTPUTraining):
        self._built = built
        self.left: Optional[List[int]] = None

    def end(self, session: Any) -> None:
        """Drains every host's stream (training thread, after the feed hook's `end()`)."""
        if not getattr(self._built.hook, "stopping_signal", False):
            return
        self.left = [
            _count_real(session, next_is_real) for next_is_real in self._built.next_is_real
        ]
        logging.info("Real batches left in each host's stream after the stop: %s", self.left)


def _count_real(session: Any, next_is_real: tf.Tensor) -> int:
    """Real elements taken until the first padding element or the end of the stream."""
    count = 0
    try:
        while session.run(next_is_real):
            count += 1
    except tf.errors.OutOfRangeError:
        pass  # A stream without padding tail ended: every element was counted.
    return count
