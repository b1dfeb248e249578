"""Why a model_dir's checkpoint cannot be restored, in a few lines instead of TF's traceback.

When a session restores a broken checkpoint, TensorFlow raises from the
`save/RestoreV2` op with a long traceback that names neither the broken file
nor what to do: `OutOfRangeError: Read less bytes than requested` (a
truncated data file), `DataLossError` (a corrupt file), `NotFoundError: Key
examples_trained not found in checkpoint` (another model's checkpoint, or a
missing data file), `ValueError: The passed save_path is not a valid
checkpoint` (a missing index file).

`explain_restore_error(error, model_dir, graph)` looks at the checkpoint the
session restores (the `model_checkpoint_path` of model_dir's `checkpoint`
file) and, if it finds what is wrong, returns one of:

* `IncompatibleCheckpointError`: the checkpoint is another model's: it names
  the checkpoint and the model's variables it lacks, or holds with another
  shape;
* `UnreadableCheckpointError`: a file of the checkpoint is missing,
  truncated or corrupt: it names the file and says how to resume from the
  previous checkpoint, if there is one.

The caller raises it `from error`, so TensorFlow's error stays the cause.
`monolith.core.testing.train` does so for every restore; a TPUEstimator
program can do the same around `estimator.train`.

Order of the checks: the index file first (it lists the variables), then the
model's variables against it (cheap), then, only for the errors a broken data
file gives (OutOfRangeError, DataLossError, NotFoundError), every tensor is
read back until one fails. That reads the whole checkpoint once more, only
after a restore has failed.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Sequence

import tensorflow as tf

__all__ = [
    "CheckpointRestoreError",
    "IncompatibleCheckpointError",
    "UnreadableCheckpointError",
    "explain_restore_error",
    "tf_error_summary",
]

# At most this many variable names are listed in a message.
_MAX_NAMES = 8
# TensorFlow's errors that a missing, truncated or corrupt data file gives.
_DATA_ERRORS = (tf.errors.OutOfRangeError, tf.errors.DataLossError, tf.errors.NotFoundError)


class CheckpointRestoreError(RuntimeError):
    """model_dir's checkpoint cannot be restored into this model (raised from TF's error).

    Attributes:
      model_dir: The model directory.
      checkpoint: The checkpoint's path prefix (e.g. `.../model.ckpt-40`).
    """

    def __init__(self, message: str, model_dir: str, checkpoint: str):
        super().__init__(message)
        self.model_dir = model_dir
        self.checkpoint = checkpoint


class UnreadableCheckpointError(CheckpointRestoreError):
    """A file of the checkpoint is missing, truncated or corrupt.

    Attributes:
      path: The file (`.index`, or the data file(s) as a glob when TF does
        not say which shard failed).
      previous: The previous checkpoint in model_dir that still exists, or None.
    """

    def __init__(
        self,
        message: str,
        model_dir: str,
        checkpoint: str,
        path: str,
        previous: Optional[str],
    ):
        super().__init__(message, model_dir, checkpoint)
        self.path = path
        self.previous = previous


class IncompatibleCheckpointError(CheckpointRestoreError):
    """The checkpoint was written by another model.

    Attributes:
      missing: Names of this model's variables the checkpoint lacks.
      mismatched: `(name, shape in the checkpoint, shape in the model)` of
        variables stored with another shape.
    """

    def __init__(
        self,
        message: str,
        model_dir: str,
        checkpoint: str,
        missing: Sequence[str],
        mismatched: Sequence[tuple],
    ):
        super().__init__(message, model_dir, checkpoint)
        self.missing = tuple(missing)
        self.mismatched = tuple(mismatched)


def explain_restore_error(
    error: BaseException, model_dir: str, graph: Optional[tf.Graph] = None
) -> Optional[CheckpointRestoreError]:
    """What is wrong with the checkpoint whose restore raised `error`; None if nothing is found.

    Args:
      error: What the restore raised (a `tf.errors.OpError`, or the ValueError
        of a missing index file). Other errors are not looked into.
      model_dir: The directory the session restores from.
      graph: The training graph (its global variables and saveable objects
        are what the Saver restores). None: the missing variable names are
        taken from TF's message (it names the first only).

    Returns:
      An `UnreadableCheckpointError` or `IncompatibleCheckpointError` to
      raise `from error`, or None when the checkpoint looks fine (the error
      has another cause) or model_dir has no checkpoint.
    """
    # TF's restore raises OpErrors, and a plain ValueError for a missing index
    # file; a ValueError subclass (e.g. a ResumeMismatchError) is not about the files.
    if not isinstance(error, tf.errors.OpError) and type(error) is not ValueError:
        return None
    try:
        state = tf.train.get_checkpoint_state(model_dir)
    except (tf.errors.OpError, ValueError):
        return None
    if state is None or not state.model_checkpoint_path:
        return None
    checkpoint = state.model_checkpoint_path
    previous = _previous_checkpoint(checkpoint, state.all_model_checkpoint_paths)

    def unreadable(path: str, what: str, cause: str) -> UnreadableCheckpointError:
        message = _unreadable_message(model_dir, checkpoint, path, what, cause, previous)
        return UnreadableCheckpointError(message, model_dir, checkpoint, path, previous)

    index = f"{checkpoint}.index"
    if not tf.io.gfile.exists(index):
        return unreadable(index, "is missing", "")
    try:
        reader = tf.train.load_checkpoint(checkpoint)
    except (tf.errors.OpError, ValueError) as read_error:
        return unreadable(index, "is truncated or corrupt", tf_error_summary(read_error))
    stored = reader.get_variable_to_shape_map()
    missing, mismatched = _compare(stored, _expected_variables(error, graph))
    if missing or mismatched:
        message = _incompatible_message(model_dir, checkpoint, missing, mismatched, len(stored))
        return IncompatibleCheckpointError(message, model_dir, checkpoint, missing, mismatched)
    if not isinstance(error, _DATA_ERRORS):
        return None
    data = f"{checkpoint}.data-*"
    if not tf.io.gfile.glob(data):
        return unreadable(data, "is missing", "")
    for name in sorted(stored):
        try:
            reader.get_tensor(name)
        except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as read_error:
            files = tf.io.gfile.glob(data)
            path = files[0] if len(files) == 1 else data
            cause = f"reading {name!r}: {tf_error_summary(read_error)}"
            return unreadable(path, "is truncated or corrupt", cause)
    return None


def tf_error_summary(error: BaseException) -> str:
    """The line of a TensorFlow error's message that says what failed, without its traceback.

    A graph execution error's message holds a stack trace and ends the
    failing op's message with `[[{{node ...}}]]`: the line before that is
    the op's own message (e.g. "Read less bytes than requested"). Otherwise
    the first line.
    """
    message = str(getattr(error, "message", None) or error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("[[") and i > 0:
            return lines[i - 1]
    return lines[0] if lines else type(error).__name__


def _previous_checkpoint(checkpoint: str, all_paths: Iterable[str]) -> Optional[str]:
    """The newest checkpoint before `checkpoint` whose index file exists."""
    paths = list(all_paths)
    earlier = paths[: paths.index(checkpoint)] if checkpoint in paths else paths
    for path in reversed(earlier):
        if path != checkpoint and tf.io.gfile.exists(f"{path}.index"):
            return path
    return None


def _expected_variables(error: BaseException, graph: Optional[tf.Graph]) -> dict:
    """Checkpoint key -> shape (None if unknown) of what the restore needs."""
    if graph is None:
        return {name: None for name in re.findall(r"Key (\S+) not found in checkpoint", str(error))}
    expected = {}
    for variable in graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES):
        info = getattr(variable, "_save_slice_info", None)
        if info is not None:
            expected[info.full_name] = list(info.full_shape)
        else:
            shape = variable.shape
            expected[variable.op.name] = shape.as_list() if shape.is_fully_defined() else None
    return expected


def _compare(stored: dict, expected: dict) -> tuple:
    missing = sorted(name for name in expected if name not in stored)
    mismatched = sorted(
        (name, list(stored[name]), shape)
        for name, shape in expected.items()
        if name in stored and shape is not None and list(stored[name]) != list(shape)
    )
    return missing, mismatched


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    more = len(names) - _MAX_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _incompatible_message(
    model_dir: str, checkpoint: str, missing: list, mismatched: list, stored: int
) -> str:
    lines = [
        f"Cannot restore the checkpoint {checkpoint} in model_dir {model_dir}: it was written by "
        f"another model (it holds {stored} variables)."
    ]
    if missing:
        lines.append(f"  Missing from it ({len(missing)}): {_names(missing)}")
    if mismatched:
        shown = [f"{name} {old} (this model: {new})" for name, old, new in mismatched]
        lines.append(f"  Stored with another shape ({len(mismatched)}): {_names(shown)}")
    lines.append(
        "Train this model on a new model_dir, or give the model_dir this model was trained in."
    )
    return "\n".join(lines)


def _unreadable_message(
    model_dir: str,
    checkpoint: str,
    path: str,
    what: str,
    cause: str,
    previous: Optional[str],
) -> str:
    lines = [
        f"Cannot restore the checkpoint {checkpoint}: its file {path} {what}"
        + (f" ({cause})." if cause else ".")
    ]
    if previous is not None:
        name = os.path.basename(previous)
        lines.append(
            f"To resume from the previous checkpoint, {previous}: delete {checkpoint}.* and make "
            f'it the latest (python -c "import tensorflow as tf; '
            f"tf.compat.v1.train.update_checkpoint_state('{model_dir}', '{name}')\"). "
            "Or train on a new model_dir."
        )
    else:
        lines.append(
            f"There is no earlier checkpoint in {model_dir} to resume from: train on a new "
            "model_dir."
        )
    return "\n".join(lines)
