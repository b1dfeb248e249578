"""How the embedding host call matches recorded names: the original's rules, on purpose.

The original Monolith module matches a name in two places with two rules, and
we keep both (`monolith.core.host_call.names`): the recording filter matches
the AUC inputs exactly, the host function matches every role by substring,
the reduction markers anywhere in the name. First the rules themselves, then
what they do to real event files.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from monolith.core.host_call import names
from monolith.core.host_call.names import Kind, Route
from tests.core._host_call_helpers import (
    build_replicated_host_call,
    exact_auc,
    make_host_call,
    read_events,
    run_host_call,
)

pytestmark = pytest.mark.timeout(60)

LABELS = names.LABELS_FOR_AUC_CALCULATION
Y_PREDS = names.Y_PRED_FOR_AUC_CALCULATION

# name, caching, route in the host function
ROUTES = [
    ("x_avg", False, Route(Kind.REDUCED, "_avg")),
    ("x_avg_extra", False, Route(Kind.REDUCED, "_avg")),  # anywhere in the name
    ("loss_summary", False, Route(Kind.REDUCED, "_sum")),  # "_sum" in "_summary"
    ("norm_max_avg", False, Route(Kind.REDUCED, "_avg")),  # _avg before _max
    ("grad_max", True, Route(Kind.REDUCED, "_max")),
    ("learning_rate", False, Route(Kind.REPLICA_0)),
    ("learning_rate", True, Route(Kind.REPLICA_0)),
    (LABELS, False, Route(Kind.AUC_INPUT, LABELS)),
    ("labels_for_auc_calculation_0", False, Route(Kind.AUC_INPUT, LABELS)),
    ("labels_for_auc_calculation_avg", False, Route(Kind.REDUCED, "_avg")),
    ("labels_for_auc_calculation_0", True, Route(Kind.REPLICA_0)),  # no AUC input when caching
    ("y_pred_for_auc_calculation_top", False, Route(Kind.AUC_INPUT, Y_PREDS)),
    ("req_time_ms", False, Route(Kind.AUC_INPUT, "req_time")),
    ("my_sample_rate", False, Route(Kind.AUC_INPUT, "sample_rate")),
    ("uid_bucket", False, Route(Kind.AUC_INPUT, "uid_bucket")),
    ("uid", False, Route(Kind.REPLICA_0)),  # defined by the original, never matched
    ("stopping_signals", False, Route(Kind.PADDING_FLAG, "stopping_signals")),
    ("my_stopping_signals", True, Route(Kind.PADDING_FLAG, "stopping_signals")),
    ("stopping_signals_sum", True, Route(Kind.REDUCED, "_sum")),
    ("labels_tpu_variable", True, Route(Kind.WINDOW, "labels_tpu_variable")),
    ("my_preds_tpu_variable", True, Route(Kind.WINDOW, "preds_tpu_variable")),
    ("labels_tpu_variable", False, Route(Kind.REPLICA_0)),
    (
        "tpu_variables_accumulated_times",
        True,
        Route(Kind.WINDOW, "tpu_variables_accumulated_times"),
    ),
]


@pytest.mark.parametrize(
    "name, caching, expected",
    ROUTES,
    ids=[f"{n}-{'caching' if c else 'plain'}" for n, c, _ in ROUTES],
)
def test_the_host_function_matches_by_substring_in_the_originals_order(name, caching, expected):
    assert names.route(name, caching=caching) == expected


# name, scalar_metrics, caching, recorded
RECORDED = [
    (LABELS, False, False, True),
    ("labels_for_auc_calculation_0", False, False, False),  # exact: a scalar metric here
    ("loss_avg", False, False, False),
    ("loss_avg", True, False, True),
    ("labels_for_auc_calculation_0", True, False, True),
    (LABELS, True, True, False),  # caching drops exactly the five per-step inputs
    ("uid_bucket", False, True, False),
    ("labels_for_auc_calculation_0", True, True, True),
    # Ours: what the host function needs is kept with scalar metrics off.
    ("labels_tpu_variable", False, True, True),
    ("tpu_variables_accumulated_times", False, True, True),
    ("stopping_signals", False, False, True),
    ("stopping_signals", False, True, True),
    ("stopping_signals_sum", False, False, False),  # a scalar metric
]


@pytest.mark.parametrize("name, scalar_metrics, caching, recorded", RECORDED)
def test_the_recording_filter_matches_the_auc_inputs_exactly(
    name, scalar_metrics, caching, recorded
):
    assert names.is_recorded(name, scalar_metrics=scalar_metrics, caching=caching) is recorded


# ------------------------------------------------------------ in event files


@pytest.fixture
def graph():
    with tf.Graph().as_default() as g:
        tf.compat.v1.train.get_or_create_global_step()
        yield g


def _scalars(logdir):
    return {
        tag: float(values[0][1])
        for tag, values in read_events(logdir + "/host_call").items()
        if values[0][1].dtype != object
    }


def test_reduction_markers_anywhere_in_a_name_reduce_over_replicas(graph, tmp_path):
    logdir = str(tmp_path)

    def record(host_call, r):
        host_call.record_summary_tensor("loss_summary", tf.constant(1.0 + r))
        host_call.record_summary_tensor("x_avg", tf.constant(2.0 * r))
        host_call.record_summary_tensor("x_avg_extra", tf.constant(4.0 * r))
        host_call.record_summary_tensor("learning_rate", tf.constant(0.1 * (r + 1)))

    _, host_op = build_replicated_host_call(lambda: make_host_call(logdir), record, 2)
    run_host_call([host_op])

    assert _scalars(logdir) == {
        "loss_summary": pytest.approx(1.0 + 2.0),  # summed, as the original does
        "x_avg": pytest.approx(1.0),
        "x_avg_extra": pytest.approx(2.0),
        "learning_rate": pytest.approx(0.1),  # no marker: replica 0's value
    }


@pytest.mark.parametrize("scalar_metrics", [True, False], ids=["scalar_metrics", "auc_only"])
def test_a_suffixed_auc_input_name_is_an_auc_input_only_when_scalar_metrics_record_it(
    graph, tmp_path, scalar_metrics
):
    """The filter drops `labels_for_auc_calculation_0` without scalar metrics (exact
    match); once recorded, the host function uses it as the labels (substring)."""
    logdir = str(tmp_path)
    labels, preds = [1.0, 0.0, 1.0, 0.0], [0.9, 0.2, 0.4, 0.6]
    host_call = make_host_call(logdir, scalar_metrics=scalar_metrics)
    host_call.record_summary_tensor("labels_for_auc_calculation_0", tf.constant(labels))
    host_call.record_summary_tensor(Y_PREDS, tf.constant(preds))
    host_fn, tensors = host_call.generate_host_call_hook()
    run_host_call([host_fn(*tensors)])

    scalars = _scalars(logdir)
    assert "labels_for_auc_calculation_0" not in scalars
    assert scalars["sampled_preds_variable_avg"] == pytest.approx(np.mean(preds))
    if scalar_metrics:
        assert scalars["auc"] == pytest.approx(exact_auc(labels, preds))
    else:  # no labels reached the host
        assert "auc" not in scalars


def test_in_caching_mode_a_suffixed_auc_input_name_is_a_scalar_metric(graph, tmp_path):
    logdir = str(tmp_path)
    host_call = make_host_call(logdir, caching=True, every_n=2, top_k=2)
    host_call.record_summary_tensor(LABELS, tf.constant([1.0, 0.0]))  # dropped: caching
    host_call.record_summary_tensor("labels_for_auc_calculation_0", tf.constant(0.25))
    host_call.record_summary_tpu_variables()
    host_fn, tensors = host_call.generate_host_call_hook()
    run_host_call([host_fn(*tensors)], hooks=host_call.tpu_var_restore_hooks)

    scalars = _scalars(logdir)
    assert scalars["labels_for_auc_calculation_0"] == pytest.approx(0.25)
    assert LABELS not in scalars
