"""Whether a model_dir can be used at all: a directory this process can write.

Checked where training starts (`monolith.core.testing.train`, the model_dir
lock the feed hook takes), so that a model_dir that is a regular file or is
not writable fails with one message naming it, before TensorFlow fails deep
inside a hook with a long traceback.

Local paths are checked with `os` (the directory is created if missing);
`scheme://` paths (gs://, ...) through `tf.io.gfile`, whose object stores have
no permissions to ask about: only "is a file" is checked there.
"""

from __future__ import annotations

import os
import tempfile

__all__ = [
    "ModelDirError",
    "ModelDirIsAFileError",
    "ModelDirNotWritableError",
    "check_model_dir",
    "is_remote",
]


class ModelDirError(OSError):
    """model_dir cannot be used: it is a file, cannot be created, or is not writable."""


class ModelDirIsAFileError(ModelDirError, NotADirectoryError):
    """model_dir (or a directory on its path) is a regular file."""


class ModelDirNotWritableError(ModelDirError, PermissionError):
    """model_dir cannot be written by this process (permissions, a read-only filesystem)."""


def is_remote(model_dir: str) -> bool:
    """Whether `model_dir` is a `scheme://` path (gs://, s3://, ram://): read via tf.io.gfile."""
    return "://" in model_dir


def check_model_dir(model_dir: str) -> str:
    """Creates `model_dir` if missing and checks that this process can write it.

    Args:
      model_dir: A local directory or a `scheme://` path.

    Returns:
      `model_dir` as a str (a `PathLike` is converted).

    Raises:
      TypeError: `model_dir` is not a path.
      ModelDirIsAFileError: `model_dir`, or a directory on its path, is a file.
      ModelDirNotWritableError: this process cannot write it.
      ModelDirError: it cannot be created for another reason (the OS's reason given).
    """
    if not isinstance(model_dir, (str, os.PathLike)) or not os.fspath(model_dir):
        raise TypeError(f"model_dir={model_dir!r} must be a path (a non-empty str).")
    model_dir = os.fspath(model_dir)
    if is_remote(model_dir):
        _check_remote(model_dir)
    else:
        _check_local(model_dir)
    return model_dir


def _is_a_file(model_dir: str) -> ModelDirIsAFileError:
    return ModelDirIsAFileError(
        f"model_dir={model_dir!r} is a file, not a directory: give a directory (it is created "
        "if missing)."
    )


def _check_local(model_dir: str) -> None:
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise _is_a_file(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except NotADirectoryError as error:
        raise ModelDirIsAFileError(
            f"model_dir={model_dir!r} cannot be created: a directory on its path is a file "
            f"({error.strerror}: {error.filename}). Give a directory."
        ) from error
    except PermissionError as error:
        raise ModelDirNotWritableError(
            f"model_dir={model_dir!r} cannot be created ({error.strerror}): give a writable "
            "directory."
        ) from error
    except OSError as error:
        raise ModelDirError(
            f"model_dir={model_dir!r} cannot be created ({error.strerror}): give a writable "
            "directory."
        ) from error
    # Probe by writing: os.access answers True for root even where the
    # filesystem refuses root's writes (e.g. sysfs, some network mounts).
    try:
        fd, probe = tempfile.mkstemp(prefix=".monolith_write_probe-", dir=model_dir)
    except OSError as error:
        raise ModelDirNotWritableError(
            f"model_dir={model_dir!r} is not writable ({error.strerror}): give a writable "
            "directory."
        ) from error
    os.close(fd)
    os.remove(probe)


def _check_remote(model_dir: str) -> None:
    import tensorflow as tf

    if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
        raise _is_a_file(model_dir)
    tf.io.gfile.makedirs(model_dir)
