"""One validator for counts: the same mistake raises the same exception everywhere.

`positive_int` itself, then the public entry points that take a count, each given a
non-int (TypeError) and a value below its minimum (ValueError), then a `python -O` smoke
run: `ruff` rule S101 keeps `assert` out of `monolith/` statically, and the subprocess
shows user errors of several modules are still raised when asserts are stripped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from monolith.core import simulated_tpu, testing
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook as Hook,
)
from monolith.core.base_embedding_host_call import BaseEmbeddingHostCall
from monolith.core.common.validation import positive_int
from monolith.core.stopping_signals import append_stopping_signals
from monolith.core.testing import FakeTPUContext
from monolith.core.trained_batches import skip_trained_batches

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- positive_int ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 7, 2**40, np.int64(3), np.int32(1)])
def test_positive_int_returns_a_python_int(value):
    result = positive_int("n", value)

    assert result == int(value)
    assert type(result) is int


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, [1], np.float32(2)])
def test_positive_int_rejects_a_non_int_with_type_error_naming_it(value):
    with pytest.raises(TypeError) as raised:
        positive_int("num_things", value)

    message = str(raised.value)
    assert message.startswith(f"num_things={value!r} must be an int")
    assert type(value).__name__ in message


@pytest.mark.parametrize("value", [0, -1, np.int64(-5)])
def test_positive_int_rejects_below_one_with_value_error_naming_it(value):
    with pytest.raises(ValueError, match=rf"^num_things={value!r} must be >= 1\.$"):
        positive_int("num_things", value)


def test_positive_int_minimum():
    assert positive_int("every_n", 2, minimum=2) == 2
    with pytest.raises(ValueError, match=r"^every_n=1 must be >= 2\.$"):
        positive_int("every_n", 1, minimum=2)


# -- the same mistake, the same exception, in every module ---------------------------


def _feed_hook(outfeed_every_n_steps):
    with tf.Graph().as_default():
        Hook(
            FakeTPUContext(),
            [tf.no_op()],
            [tf.no_op()],
            tpu_compile_op=tf.no_op(),
            outfeed_every_n_steps=outfeed_every_n_steps,
        )


def _stopping_signals(batch_size):
    with tf.Graph().as_default():
        dataset = tf.data.Dataset.range(8).batch(2).map(lambda ids: {"id": ids})
        append_stopping_signals(dataset, batch_size=batch_size)


def _host_call(**kwargs):
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        args = {"top_k_sampling_num_per_core": 4, "host_call_every_n_steps": 1, **kwargs}
        BaseEmbeddingHostCall(
            "/tmp/unused",
            True,
            False,
            True,
            False,
            args["top_k_sampling_num_per_core"],
            {
                "enable_host_call": True,
                "cpu_test": True,
                "host_call_every_n_steps": args["host_call_every_n_steps"],
            },
        )


def _trained_batches(batches_per_step):
    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        skip_trained_batches(tf.data.Dataset.range(8).batch(2), batches_per_step=batches_per_step)


_ENTRY_POINTS = {
    "simulated_tpu_metadata(num_hosts)": lambda v: simulated_tpu.simulated_tpu_metadata(
        num_hosts=v
    ),
    "simulated_tpu_metadata(cores_per_host)": lambda v: simulated_tpu.simulated_tpu_metadata(
        cores_per_host=v
    ),
    "iterations_per_loop_hook(steps)": lambda v: testing.iterations_per_loop_hook(2, steps=v),
    "iterations_per_loop_hook(max_steps)": lambda v: testing.iterations_per_loop_hook(
        2, max_steps=v
    ),
    "feed hook(outfeed_every_n_steps)": _feed_hook,
    "append_stopping_signals(batch_size)": _stopping_signals,
    "skip_trained_batches(batches_per_step)": _trained_batches,
    "host call(host_call_every_n_steps)": lambda v: _host_call(host_call_every_n_steps=v),
    "host call(top_k_sampling_num_per_core)": lambda v: _host_call(top_k_sampling_num_per_core=v),
}
_ARGUMENT = {
    "simulated_tpu_metadata(num_hosts)": "num_hosts",
    "simulated_tpu_metadata(cores_per_host)": "cores_per_host",
    "iterations_per_loop_hook(steps)": "steps",
    "iterations_per_loop_hook(max_steps)": "max_steps",
    "feed hook(outfeed_every_n_steps)": "outfeed_every_n_steps",
    "append_stopping_signals(batch_size)": "batch_size",
    "skip_trained_batches(batches_per_step)": "batches_per_step",
    "host call(host_call_every_n_steps)": "host_call_every_n_steps",
    "host call(top_k_sampling_num_per_core)": "top_k_sampling_num_per_core",
}


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
@pytest.mark.parametrize(
    "bad, error, says",
    [
        (True, TypeError, "must be an int"),
        ("2", TypeError, "must be an int"),
        (0, ValueError, "must be >= 1"),
    ],
)
def test_every_count_argument_raises_the_same_error_for_the_same_mistake(entry, bad, error, says):
    with pytest.raises(error, match=rf"\b{_ARGUMENT[entry]}={bad!r} {says}"):
        _ENTRY_POINTS[entry](bad)


# -- python -O -------------------------------------------------------------------------

# Each case must raise its error with asserts stripped; the script refuses to run unless
# the interpreter really strips them.
_SMOKE = textwrap.dedent(
    """
    import sys
    if sys.flags.optimize < 1:
        sys.exit(99)
    import tensorflow as tf
    from monolith.core import simulated_tpu
    from monolith.core.base_host_call import BaseHostCall
    from monolith.core.stopping_signals import append_stopping_signals
    from monolith.core.tpu_variable import ReplicatedVariable

    def record_matrix():
        with tf.Graph().as_default():
            tf.compat.v1.train.get_or_create_global_step()
            host_call = BaseHostCall("/tmp/unused", enable_host_call=True)
            host_call.record_summary_tensor("matrix", tf.zeros([2, 3]))

    def stopping_signals():
        with tf.Graph().as_default():
            dataset = tf.data.Dataset.range(4).batch(2).map(lambda ids: {"id": ids})
            append_stopping_signals(dataset, batch_size=0)

    cases = [
        ("host call", record_matrix, ValueError, "'matrix' must be a scalar or a vector"),
        ("tpu variable", lambda: ReplicatedVariable("v", []), ValueError, "one variable"),
        ("simulated tpu", lambda: simulated_tpu.simulated_tpu_metadata(num_hosts=True),
         TypeError, "num_hosts=True must be an int"),
        ("stopping signals", stopping_signals, ValueError, "batch_size=0 must be >= 1"),
    ]
    for name, case, error, says in cases:
        try:
            case()
        except error as raised:
            if says not in str(raised):
                sys.exit(f"{name}: {raised!r} does not say {says!r}")
            print("raised", name)
        else:
            sys.exit(f"{name}: no {error.__name__} under python -O")
    """
)


def test_user_errors_are_raised_under_python_O(pytestconfig):
    if pytestconfig.getoption("--tf-behavior") != "v2":
        pytest.skip(
            "the -O smoke run is a new process in TensorFlow's default behaviour, whatever "
            "this pytest run's behaviour: covered by the TF2 pass"
        )
    env = dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-O", "-c", _SMOKE],
        cwd=_REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.split() == (
        "raised host call raised tpu variable raised simulated tpu raised stopping signals".split()
    )
