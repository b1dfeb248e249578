"""The host call in a real TPUEstimator(use_tpu=False) run, and its scalars in TensorBoard.

With `use_tpu=False` TPUEstimator passes no `params["context"]` (so the model,
`_ctr_model`'s, sets `cpu_test`), calls the host function on the `[1, N]` tensors directly,
and runs it with every train step (`_OutfeedHostCallHook`), initializing and
flushing the summary writer around the run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config, tpu_estimator

from tests.core._ctr_model import make_model_fn
from tests.core._host_call_helpers import exact_auc, parse_payload, read_events

pytestmark = pytest.mark.timeout(120)

NUM_EXAMPLES = 2048
BATCH = 64
DIM = 4
NUM_BUCKETS = 20  # half of the examples fall in the sampled uid buckets (< 10)


def _data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=[NUM_EXAMPLES, DIM]).astype(np.float32)
    true_w = np.array([1.5, -2.0, 0.5, 1.0], np.float32)
    noise = rng.logistic(size=NUM_EXAMPLES)
    labels = (x @ true_w + noise > 0).astype(np.float32)
    uid_buckets = rng.randint(0, NUM_BUCKETS, size=NUM_EXAMPLES).astype(np.int32)
    return x, labels, uid_buckets


def _input_fn(params):
    x, labels, uid_buckets = _data()
    features = {
        "x": x,
        "uid_bucket": uid_buckets,
        "req_time": np.arange(NUM_EXAMPLES, dtype=np.int64) + 1_700_000_000,
    }
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    return dataset.batch(params["batch_size"], drop_remainder=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Trains once over the finite stream; returns the model directory."""
    directory = str(tmp_path_factory.mktemp("tpuestimator_host_call"))
    estimator = tpu_estimator.TPUEstimator(
        model_fn=make_model_fn(),
        config=tpu_config.RunConfig(
            model_dir=directory,
            tpu_config=tpu_config.TPUConfig(iterations_per_loop=4),
        ),
        use_tpu=False,
        train_batch_size=BATCH,
    )
    estimator.train(_input_fn)
    return directory


def _in_write_order(events, tag):
    return [value for _, value in events[tag]]


def test_host_call_runs_with_every_step_and_writes_the_sampled_examples(model_dir):
    events = read_events(os.path.join(model_dir, "host_call"))
    steps = NUM_EXAMPLES // BATCH

    assert len(events["auc"]) == len(events["loss_avg"]) == steps
    _, labels, uid_buckets = _data()
    sampled = uid_buckets[: steps * BATCH] < 10
    payload_labels = np.concatenate(
        [parse_payload(v) for v in _in_write_order(events, "di_labels")]
    )
    np.testing.assert_array_equal(payload_labels, labels[: steps * BATCH][sampled])
    payload_req_times = np.concatenate(
        [parse_payload(v) for v in _in_write_order(events, "di_req_times")]
    )
    batch_first_times = 1_700_000_000 + np.repeat(np.arange(steps) * BATCH, BATCH)
    np.testing.assert_array_equal(payload_req_times, batch_first_times[sampled])


def test_last_auc_summary_matches_the_exact_auc_of_the_sampled_examples(model_dir):
    events = read_events(os.path.join(model_dir, "host_call"))
    labels = np.concatenate([parse_payload(v) for v in _in_write_order(events, "di_labels")])
    preds = np.concatenate([parse_payload(v) for v in _in_write_order(events, "di_preds")])

    last_auc = float(_in_write_order(events, "auc")[-1])

    assert 0.7 < exact_auc(labels, preds) < 1.0  # the model learned something
    assert last_auc == pytest.approx(exact_auc(labels, preds), abs=0.02)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll_json(url, steps, deadline, process, log_path):
    """The rows at `url` once they hold every step in `steps`, polling until `deadline`.

    TensorBoard loads event files in the background and serves whatever it has read
    so far, so an early answer can lack the last steps: poll until all are there.
    Fails at once, with TensorBoard's output, when the server process has exited.
    """
    last_error, body = None, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text()[-3000:]
            raise AssertionError(f"TensorBoard exited with code {process.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read().decode())
            # Rows are [wall_time, step, value], one per summary.
            if sorted(row[1] for row in body) == steps:
                return body
        except (urllib.error.URLError, ConnectionError, ValueError) as e:
            last_error = e
        time.sleep(0.5)
    served = None if body is None else sorted(row[1] for row in body)
    raise AssertionError(
        f"{url} did not serve steps {steps} before the deadline (last answer's steps: "
        f"{served}, last error: {last_error}); TensorBoard output:\n"
        f"{log_path.read_text()[-3000:]}"
    )


@pytest.mark.timeout(150)
def test_tensorboard_serves_the_host_call_scalars(tf_behavior, model_dir, tmp_path):
    if tf_behavior != "v2":
        # TensorBoard, a new process, reads the files whatever wrote them; the v1
        # pass checks its own event files with the tests above.
        pytest.skip("TensorBoard reads event files the same way: covered by the TF2 pass")
    events = read_events(os.path.join(model_dir, "host_call"))
    tags = ("auc", "loss_avg")
    written_steps = {tag: sorted(step for step, _ in events[tag]) for tag in tags}
    port = _free_port()
    log_path = tmp_path / "tensorboard.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=host_call&tag="
        deadline = time.monotonic() + 90
        served = {
            tag: _poll_json(base + tag, written_steps[tag], deadline, process, log_path)
            for tag in tags
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()

    for tag, rows in served.items():
        assert len(rows) == len(events[tag]), tag
        served_values = sorted(row[2] for row in rows)
        written = sorted(float(v) for v in _in_write_order(events, tag))
        np.testing.assert_allclose(served_values, written, rtol=1e-6)
