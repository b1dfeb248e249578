"""Test-session setup: selects the TensorFlow graph behaviour under test.

`MONOLITH_TF_BEHAVIOR=v1` (or `pytest --tf-behavior=v1`) runs the whole suite
after `tf.compat.v1.disable_v2_behavior()`; the default is TF2 behaviour.
"""

import os
import pathlib
import signal
import tempfile

import pytest

from tests._feed_threads import live_feed_threads

_BEHAVIORS = ("v2", "v1")


def pytest_addoption(parser):
    parser.addoption(
        "--tf-behavior",
        choices=_BEHAVIORS,
        default=os.environ.get("MONOLITH_TF_BEHAVIOR", "v2"),
        help="TensorFlow behaviour: v2 (default) or v1 (disable_v2_behavior).",
    )


def pytest_configure(config):
    behavior = config.getoption("--tf-behavior")
    if behavior not in _BEHAVIORS:
        raise pytest.UsageError(f"MONOLITH_TF_BEHAVIOR={behavior!r} is not one of {_BEHAVIORS}")
    os.environ["MONOLITH_TF_BEHAVIOR"] = behavior
    import tensorflow as tf

    if behavior == "v1":
        tf.compat.v1.disable_v2_behavior()


def pytest_report_header(config):
    import tensorflow as tf

    return f"tensorflow {tf.__version__}, behaviour {config.getoption('--tf-behavior')}"


@pytest.fixture
def tf_behavior(pytestconfig):
    """'v2' or 'v1': the TensorFlow behaviour this session runs under."""
    return pytestconfig.getoption("--tf-behavior")


# A feed thread left by a finished test must end within this many seconds
# (it polls its coordinator every 0.1 s; 2 busy cores can delay that).
_FEED_THREAD_GRACE_SECS = 15.0


@pytest.fixture(autouse=True)
def no_feed_thread_outlives_its_test():
    """Fails a test whose feed threads are still alive after it, so none leaks into the next."""
    yield
    alive = live_feed_threads(wait_secs=_FEED_THREAD_GRACE_SECS)
    if alive:
        pytest.fail(f"feed threads still alive {_FEED_THREAD_GRACE_SECS} s after the test: {alive}")


@pytest.fixture(autouse=True)
def sigterm_handler_is_put_back():
    """Puts back the SIGTERM handler a test's feed hook may leave (a run without end())."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    if signal.getsignal(signal.SIGTERM) is not before:
        signal.signal(signal.SIGTERM, before)


@pytest.fixture
def unwritable_dir(tmp_path):
    """An existing directory this process cannot write.

    A mode-0500 directory for a normal user; as root (who may write anywhere,
    as on CI machines), sysfs's root, which the kernel keeps read-only for
    every user. Skips only where neither exists.
    """
    if os.geteuid() != 0:
        tmp_path.chmod(0o500)
        try:
            yield tmp_path
        finally:
            tmp_path.chmod(0o700)
        return
    sysfs = pathlib.Path("/sys")
    try:
        fd, probe = tempfile.mkstemp(dir=sysfs)
    except OSError:
        yield sysfs
        return
    os.close(fd)
    os.remove(probe)
    pytest.skip("no directory here is unwritable for root")
