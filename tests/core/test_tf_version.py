"""The TensorFlow version gate of `monolith.core`."""

import subprocess
import sys

import pytest
import tensorflow as tf

from monolith.core.common import tf_version as _tf_version


@pytest.mark.parametrize("version", ["2.12.0", "2.13.1", "2.14.0", "2.15.1", "2.15.0rc1"])
def test_supported_versions_pass(version):
    _tf_version.check_tensorflow_version(version)


@pytest.mark.parametrize("version", ["2.16.1", "2.17.0", "2.11.0", "3.0.0"])
def test_unsupported_versions_name_range_and_version(version):
    with pytest.raises(ImportError) as err:
        _tf_version.check_tensorflow_version(version)
    assert "2.12-2.15" in str(err.value)
    assert version in str(err.value)


def test_unparseable_version_names_value():
    with pytest.raises(ValueError, match="'nightly'"):
        _tf_version.parse_version("nightly")


def test_import_fails_with_one_clear_message_on_tf_2_16(tmp_path):
    """A fake `tensorflow` 2.16 package on the path: the import error is ours."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.16.1'\n")
    code = "import monolith.core.auto_checkpoint_feed_hook\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{tmp_path}:{_repo_root()}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: monolith.core supports TensorFlow 2.12-2.15")
    assert "found TensorFlow 2.16.1" in last_line


def test_installed_tensorflow_is_supported():
    _tf_version.check_tensorflow_version(tf.__version__)


def _repo_root():
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[2])
