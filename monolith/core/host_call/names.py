"""The names the embedding host call gives a meaning to, and the one place they are matched.

`BaseEmbeddingHostCall` looks at a recorded tensor's name twice: when it is
recorded (`record_summary_tensor` may drop it: `is_recorded`) and in the host
function (what to do with it: `route`). Both use the rules of the original
Monolith module, which are not the same rule, on purpose kept as they were:

- The recording filter matches the AUC inputs EXACTLY. With scalar metrics
  off only the five names themselves are recorded (`labels_for_auc_calculation_0`
  is a scalar metric there, and dropped); in caching mode exactly these five
  are dropped (the cached windows replace them).
- The host function matches by SUBSTRING, first match wins, in this order:
  1. a name containing `_avg`, `_max` or `_sum` (tested in that order) is a
     scalar metric reduced over replicas: mean, max, sum. Anywhere in the
     name: `loss_summary` is summed, `x_avg_extra` averaged;
  2. caching mode: a name containing a cached window's name is that window;
  3. a name containing `stopping_signals` is the padding flag (the original
     used it in caching mode only);
  4. without caching: a name containing an AUC input's name is that input
     (`labels_for_auc_calculation_0` is the labels);
  5. any other name is a scalar metric that logs replica 0's value.

Our additions to the filter, so that what the host function needs is never
dropped: with scalar metrics off, the cached windows and the padding flag (as
the host function recognises them) are recorded too. The original dropped
them; without the windows its caching host function failed.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Sequence

LABELS_FOR_AUC_CALCULATION = "labels_for_auc_calculation"
Y_PRED_FOR_AUC_CALCULATION = "y_pred_for_auc_calculation"
REQ_TIME = "req_time"
SAMPLE_RATE = "sample_rate"
#: Defined by the original and kept for drop-in; no rule matches it.
UID = "uid"
UID_BUCKET = "uid_bucket"
#: The per-step AUC inputs, in the order the original's host function tests them.
AUC_INPUTS = (
    LABELS_FOR_AUC_CALCULATION,
    Y_PRED_FOR_AUC_CALCULATION,
    REQ_TIME,
    SAMPLE_RATE,
    UID_BUCKET,
)

LABELS_TPU_VARIABLE = "labels_tpu_variable"
PREDS_TPU_VARIABLE = "preds_tpu_variable"
UID_BUCKETS_TPU_VARIABLE = "uid_buckets_tpu_variable"
REQ_TIMES_TPU_VARIABLE = "req_times_tpu_variable"
SAMPLE_RATES_TPU_VARIABLE = "sample_rates_tpu_variable"
ACCUMULATED_COUNTER_TPU_VARIABLE = "tpu_variables_accumulated_times"
#: The cached windows of caching mode, in the original's creation, recording and test order.
WINDOWS = (
    LABELS_TPU_VARIABLE,
    PREDS_TPU_VARIABLE,
    UID_BUCKETS_TPU_VARIABLE,
    REQ_TIMES_TPU_VARIABLE,
    SAMPLE_RATES_TPU_VARIABLE,
    ACCUMULATED_COUNTER_TPU_VARIABLE,
)

STOPPING_SIGNALS = "stopping_signals"
#: Reduction markers, in the order the original tests them.
REDUCED_SUFFIXES = ("_avg", "_max", "_sum")


class Kind(enum.Enum):
    """What the host function does with a recorded tensor."""

    #: A scalar metric reduced over replicas (`Route.role`: the matched suffix).
    REDUCED = "reduced"
    #: A cached window, caching mode (`Route.role`: the window's name).
    WINDOW = "window"
    #: The padding flag (`Route.role`: `STOPPING_SIGNALS`).
    PADDING_FLAG = "padding_flag"
    #: An AUC input, without caching (`Route.role`: the input's name).
    AUC_INPUT = "auc_input"
    #: A scalar metric logged with replica 0's value.
    REPLICA_0 = "replica_0"


@dataclasses.dataclass(frozen=True)
class Route:
    """Where the host function sends a recorded name; see the module docstring."""

    kind: Kind
    role: Optional[str] = None


def _first_contained(name: str, candidates: Sequence[str]) -> Optional[str]:
    return next((candidate for candidate in candidates if candidate in name), None)


def route(name: str, *, caching: bool) -> Route:
    """The host function's rule for `name` (substring matches, first wins; see above)."""
    suffix = _first_contained(name, REDUCED_SUFFIXES)
    if suffix is not None:
        return Route(Kind.REDUCED, suffix)
    if caching:
        window = _first_contained(name, WINDOWS)
        if window is not None:
            return Route(Kind.WINDOW, window)
    if STOPPING_SIGNALS in name:
        return Route(Kind.PADDING_FLAG, STOPPING_SIGNALS)
    if not caching:
        auc_input = _first_contained(name, AUC_INPUTS)
        if auc_input is not None:
            return Route(Kind.AUC_INPUT, auc_input)
    return Route(Kind.REPLICA_0)


def is_recorded(name: str, *, scalar_metrics: bool, caching: bool) -> bool:
    """The recording filter's rule for `name` (exact matches of the AUC inputs; see above)."""
    if caching and name in AUC_INPUTS:
        return False
    if scalar_metrics or name in AUC_INPUTS:
        return True
    return route(name, caching=caching).kind in (Kind.WINDOW, Kind.PADDING_FLAG)
