"""The resume guard: a restart must read the stream the checkpoint was trained on, the same way.

`skip_trained_batches` resumes each input pipeline after
`global_step * batches_per_step` batches. That count is an input position
only for the batch size, batches per step, topology, stop rule and stream the
checkpoint was trained with: the skip counts batches, so a restart with
batches of 512 instead of 256 skips twice the examples the model has seen, one
with batches of 128 trains half of them again, and one on another stream
skips examples of that stream it never trained.

The values the count rests on are only all known once the whole graph is
built (one `skip_trained_batches` call per input pipeline, the topology from
TPUEstimator's context, the stop rule chosen later in the same input_fn), so:

* `skip_trained_batches` registers a `PipelineRecord` per call in the graph
  (`register_pipeline`, a graph collection of JSON strings, which a meta
  graph export keeps);
* the feed hook, once the graph is complete, reads them
  (`registered_pipelines`) and calls `check_and_record(model_dir,
  global_step, pipelines, stop_rule)`, which compares them with the record
  file `monolith_resume_record.json` in model_dir and either writes the
  current values or raises `ResumeMismatchError` before anything trains.

Why a file and not variables in the checkpoint: a checkpoint written before
the guard existed lacks them, and TF's Saver fails on a missing key. Why not
`tf.py_function` in the input pipeline: on a Cloud TPU the input pipeline may
run in the TPU worker's process, not in the program's. The file is read and
written with `tf.io.gfile` (local paths and gs://), replaced atomically (a
temporary file, then a rename).

The rule (`check_and_record`):

* global step 0 (nothing trained yet), or no record (a first run, or a
  checkpoint written before this guard): the current values are recorded;
* global step > 0 and a recorded value differs: `ResumeMismatchError`, naming
  each value (old -> new), what the skip would have done wrong, and what to do;
  nothing is written;
* a longer or shorter stream is not recorded: it changes no position;
* a value that cannot be known is not compared (None: a batch size with no
  static batch dimension, the topology without a TPU context); a stream id
  of None is a value like any other.

Deleting the record file makes the next run record its values unchecked, as
for a checkpoint from before the guard: only for a change known to be safe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Any, Iterable, Optional, Sequence

import tensorflow as tf
from absl import logging

from monolith.core.common.tpu_context import outermost_graph
from monolith.core.common.validation import positive_int
from monolith.core.feed.signal import StopRule

__all__ = [
    "RECORD_FILE_NAME",
    "RESUME_RECORDS_COLLECTION",
    "Difference",
    "PipelineRecord",
    "ResumeMismatchError",
    "check_and_record",
    "checkpoint_global_step",
    "register_pipeline",
    "registered_pipelines",
]

RECORD_FILE_NAME = "monolith_resume_record.json"
RESUME_RECORDS_COLLECTION = "monolith_resume_records"
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PipelineRecord:
    """What one input pipeline's skip count rests on (one `skip_trained_batches` call).

    Attributes:
      pipeline: Index of this input_fn invocation (TPUContext's
        `current_input_fn_deployment()[1]`: the host under PER_HOST_V1/V2).
      num_pipelines: Input_fn invocations in the graph (`[2]` of the same).
      num_hosts: Hosts of the TPU system (TPUContext's `num_hosts`), or None.
      input_mode: `InputPipelineConfig` name (e.g. "PER_HOST_V2"), or None
        without a TPU context.
      batch_size: The dataset's static batch dimension, or None if unknown.
      batches_per_step: Batches of this pipeline one train step consumes.
      stream_id: The caller's name for the stream (seed, file list), or None.
    """

    pipeline: int
    num_pipelines: int
    num_hosts: Optional[int]
    input_mode: Optional[str]
    batch_size: Optional[int]
    batches_per_step: int
    stream_id: Optional[str]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: Any) -> PipelineRecord:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class Difference:
    """One recorded value that differs: what it is, its recorded and its current value."""

    name: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.name}: {self.show(self.old)} -> {self.show(self.new)}"

    def show(self, value: Any) -> str:
        """`value` as the message writes it: a stream id quoted, None as None."""
        quoted = self.name.startswith("stream id") and value is not None
        return repr(value) if quoted else str(value)


class ResumeMismatchError(ValueError):
    """A restart's input differs from the one its checkpoint was trained with.

    Raised by `check_and_record` (the feed hook, before anything trains);
    nothing in model_dir was changed. A program can catch it and exit with
    its message, e.g. `except ResumeMismatchError as e: sys.exit(f"{e}")`.

    Attributes:
      model_dir: The model_dir whose checkpoint would have been resumed.
      global_step: The checkpoint's global step.
      differences: The differing values (`Difference`: name, old, new).
    """

    def __init__(
        self, message: str, model_dir: str, global_step: int, differences: Sequence[Difference]
    ):
        super().__init__(message)
        self.model_dir = model_dir
        self.global_step = global_step
        self.differences = tuple(differences)


# ------------------------------------------------------------------ registration


def register_pipeline(record: PipelineRecord, graph: Optional[tf.Graph] = None) -> None:
    """Adds `record` to the graph's resume records (called by `skip_trained_batches`).

    Stored as a JSON string in the collection `RESUME_RECORDS_COLLECTION` of
    the outermost graph (the one the session runs), so a meta graph export
    serialises it instead of warning. Registering an identical record again
    (the same input_fn built twice into one graph) is a no-op.

    Raises:
      TypeError: `record` is not a `PipelineRecord`.
      ValueError: the graph already holds a different record for the same
        input pipeline: one `skip_trained_batches` call per pipeline.
    """
    if not isinstance(record, PipelineRecord):
        raise TypeError(f"record={record!r} must be a PipelineRecord.")
    graph = outermost_graph(graph)
    for existing in registered_pipelines(graph):
        if existing.pipeline != record.pipeline:
            continue
        if existing == record:
            return
        raise ValueError(
            f"skip_trained_batches was called twice for input pipeline {record.pipeline} "
            f"with different values ({existing} and {record}); call it once per input "
            "pipeline, on the batched dataset."
        )
    graph.add_to_collection(RESUME_RECORDS_COLLECTION, record.to_json())


def registered_pipelines(graph: Optional[tf.Graph] = None) -> tuple:
    """The `PipelineRecord`s `skip_trained_batches` registered in `graph`, by pipeline index.

    Args:
      graph: The training graph (default: the default graph; its outermost
        graph is read). Reading works on a finalized graph too.
    """
    graph = outermost_graph(graph)
    records = [PipelineRecord.from_json(t) for t in graph.get_collection(RESUME_RECORDS_COLLECTION)]
    return tuple(sorted(records, key=lambda r: r.pipeline))


# ------------------------------------------------------------------ the global step


def checkpoint_global_step(model_dir: str, key: str = "global_step") -> Optional[int]:
    """The global step a session will restore from model_dir, read without a session.

    For a check before any session exists (the hook's `begin()`, before
    MonitoredSession's `CheckpointSaverHook` rewrites the checkpoint at
    session creation). It reads what `ChiefSessionCreator(checkpoint_dir=model_dir)`
    restores: the `model_checkpoint_path` of model_dir's checkpoint state.

    Args:
      model_dir: The model directory.
      key: The global step's name in the checkpoint.

    Returns:
      0 when model_dir holds no checkpoint (a session starts from scratch);
      the step when it can be read; None when it cannot be known here (the
      checkpoint is unreadable or has no `key`): the session's restore will
      say why, and the check must then wait for the restored session.
    """
    try:
        state = tf.train.get_checkpoint_state(model_dir)
    except (tf.errors.OpError, OSError, ValueError) as error:
        logging.info("Resume guard: cannot read the checkpoint state in %s: %s", model_dir, error)
        return None
    if state is None or not state.model_checkpoint_path:
        return 0
    path = state.model_checkpoint_path
    try:
        return int(tf.train.load_checkpoint(path).get_tensor(key))
    except (tf.errors.OpError, OSError, ValueError) as error:
        logging.info("Resume guard: cannot read %r from %s: %s", key, path, error)
        return None


# ------------------------------------------------------------------ the check


def check_and_record(
    model_dir: str,
    global_step: int,
    pipelines: Iterable[PipelineRecord],
    stop_rule: StopRule = StopRule.ANY_REPLICA_PADDING,
    *,
    record: bool = True,
) -> None:
    """Refuses a restart whose input differs from its checkpoint's; records a new one.

    Called by the feed hook (`monolith.core.feed.model_dir_guard`) once the
    input pipelines are built: in its constructor with `record=False` and
    `checkpoint_global_step(model_dir)` (before any hook's `begin()`, so a
    refused restart changes no file of model_dir), in `begin()` (holding the
    model_dir lock, which makes the read-compare-write safe against another
    process; before MonitoredSession writes anything), and again in
    `after_create_session` with the restored global step read from the
    session, before the feed threads start (so a session recreated
    in-process is checked too).

    Args:
      model_dir: The model directory (local or gs://).
      global_step: The global step the run resumes from (0: from scratch).
      pipelines: The graph's `registered_pipelines()`. Empty (no
        `skip_trained_batches` in the graph): nothing is checked or written.
      stop_rule: The `StopRule` the graph was built with.
      record: Keyword-only. False: compare only, never write the record file.

    Raises:
      ResumeMismatchError: `global_step > 0` and a recorded value differs.
      ValueError: the record file is not a record this version can read.
      TypeError: bad argument types.
    """
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"model_dir={model_dir!r} must be a path.")
    model_dir = os.fspath(model_dir)
    global_step = positive_int("global_step", global_step, minimum=0)
    if not isinstance(stop_rule, StopRule):
        raise TypeError(f"stop_rule={stop_rule!r} must be a StopRule.")
    pipelines = tuple(pipelines)
    if not all(isinstance(p, PipelineRecord) for p in pipelines):
        raise TypeError(f"pipelines={pipelines!r} must hold PipelineRecords.")
    if not pipelines:
        logging.debug("Resume guard: no skip_trained_batches in the graph; nothing to check.")
        return
    pipelines = tuple(sorted(pipelines, key=lambda r: r.pipeline))
    path = _record_path(model_dir)
    current = _Record(stop_rule.name, pipelines)
    recorded = _read_record(path)
    if recorded is None:
        if not record:
            return
        if global_step > 0:
            logging.info(
                "Resume guard: the checkpoint in %s (global step %d) has no resume record (a "
                "checkpoint written before the guard); recording the current input.",
                model_dir,
                global_step,
            )
        _write_record(path, current, global_step)
        return
    differences = _differences(recorded, current)
    if not differences:
        if record:
            logging.info("Resume guard: the input matches %s (global step %d).", path, global_step)
        return
    if global_step == 0:
        if not record:
            return
        logging.info(
            "Resume guard: global step 0 in %s (nothing trained): recording the current input "
            "(%s).",
            model_dir,
            "; ".join(str(d) for d in differences),
        )
        _write_record(path, current, global_step)
        return
    raise ResumeMismatchError(
        _message(model_dir, path, global_step, recorded, current, differences),
        model_dir,
        global_step,
        differences,
    )


@dataclasses.dataclass(frozen=True)
class _Record:
    stop_rule: str
    pipelines: tuple

    def topology(self) -> dict:
        """The values all pipelines share (from pipeline 0's record)."""
        first = self.pipelines[0]
        return {
            "hosts": first.num_hosts,
            "input pipelines": first.num_pipelines,
            "input mode": first.input_mode,
        }

    def examples_per_step(self) -> Optional[int]:
        """Examples one step takes from all pipelines together; None if a batch size is unknown."""
        if any(p.batch_size is None for p in self.pipelines):
            return None
        return sum(p.batch_size * p.batches_per_step for p in self.pipelines)


def _record_path(model_dir: str) -> str:
    return os.path.join(model_dir, RECORD_FILE_NAME)


def _read_record(path: str) -> Optional[_Record]:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        data = json.loads(text)
        if data["format"] > _FORMAT:
            raise ValueError(
                f"the resume record {path} has format {data['format']}; this version of "
                f"monolith reads format {_FORMAT}: upgrade monolith."
            )
        pipelines = tuple(PipelineRecord(**p) for p in data["pipelines"])
        return _Record(data["stop_rule"], pipelines)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"the resume record {path} is not readable ({error!r}). It was not written by "
            "monolith, or was edited; delete it to record the current input unchecked."
        ) from error


def _write_record(path: str, record: _Record, global_step: int) -> None:
    """Replaces the record file atomically: a temporary file in model_dir, then a rename."""
    data = {
        "format": _FORMAT,
        "stop_rule": record.stop_rule,
        "pipelines": [dataclasses.asdict(p) for p in record.pipelines],
        "recorded_at_global_step": global_step,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tf.io.gfile.makedirs(os.path.dirname(path))
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with tf.io.gfile.GFile(temporary, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)
    logging.info("Resume guard: recorded the input of %s in %s.", os.path.dirname(path), path)


_PIPELINE_FIELDS = (
    ("batch size", "batch_size"),
    ("batches per step", "batches_per_step"),
    ("stream id", "stream_id"),
)


def _differences(old: _Record, new: _Record) -> list:
    found = []
    if old.stop_rule != new.stop_rule:
        found.append(Difference("stop rule", old.stop_rule, new.stop_rule))
    old_topology, new_topology = old.topology(), new.topology()
    for name, value in old_topology.items():
        if _known_and_different(value, new_topology[name]):
            found.append(Difference(name, value, new_topology[name]))
    old_by_index = {p.pipeline: p for p in old.pipelines}
    new_by_index = {p.pipeline: p for p in new.pipelines}
    common = sorted(set(old_by_index) & set(new_by_index))
    for name, field in _PIPELINE_FIELDS:
        # None is a value the caller chose for the stream id, "unknown" for the others.
        differ = (lambda a, b: a != b) if field == "stream_id" else _known_and_different
        changed = {
            i: (getattr(old_by_index[i], field), getattr(new_by_index[i], field))
            for i in common
            if differ(getattr(old_by_index[i], field), getattr(new_by_index[i], field))
        }
        if not changed:
            continue
        if len(changed) == len(common) and len(set(changed.values())) == 1:
            (old_value, new_value), *_ = changed.values()
            found.append(Difference(name, old_value, new_value))
        else:
            found.extend(
                Difference(f"{name} (input pipeline {i})", o, n) for i, (o, n) in changed.items()
            )
    return found


def _known_and_different(old: Any, new: Any) -> bool:
    """Whether two values differ, both known: None (no TPU context, no static batch) is unknown."""
    return old is not None and new is not None and old != new


def _quoted(stream_id: Optional[str]) -> str:
    return repr(stream_id) if stream_id is not None else "None"


def _consequence(global_step: int, old: _Record, new: _Record, differences: list) -> str:
    """What the skip would have done wrong, in examples where they can be counted."""
    names = {d.name.split(" (")[0] for d in differences}
    trained = old.examples_per_step()
    skipped = new.examples_per_step()
    counts = trained is not None and skipped is not None
    trained_n = global_step * trained if counts else None
    skipped_n = global_step * skipped if counts else None
    if "stream id" in names:
        old_ids = sorted({_quoted(p.stream_id) for p in old.pipelines})
        new_ids = sorted({_quoted(p.stream_id) for p in new.pipelines})
        if counts:
            return (
                f"The model holds {trained_n} examples of stream {', '.join(old_ids)}; the "
                f"skip would pass over the first {skipped_n} examples of stream "
                f"{', '.join(new_ids)} without training them."
            )
        return (
            f"The model was trained on stream {', '.join(old_ids)}; the skip would pass over "
            f"the first batches of stream {', '.join(new_ids)} without training them."
        )
    if names & {"hosts", "input pipelines", "input mode"}:
        return (
            "Each input pipeline resumes at global step x its batches per step in its own "
            "shard: with another topology the shards and the batches per step differ, so the "
            "batches skipped are not the batches trained."
        )
    if names & {"batch size", "batches per step"}:
        if not counts:
            return (
                "The skip counts batches, and the batches differ, so the examples skipped are "
                "not the examples trained (a batch size is not known statically)."
            )
        per_step = f"{global_step} steps of {skipped} examples instead of {trained}"
        if skipped_n > trained_n:
            return (
                f"The skip counts batches: {per_step} would skip {skipped_n} examples, "
                f"{skipped_n - trained_n} of them never trained."
            )
        if skipped_n < trained_n:
            return (
                f"The skip counts batches: {per_step} would skip {skipped_n} examples, so "
                f"{trained_n - skipped_n} trained examples would be trained twice."
            )
        return (
            f"The skip counts batches: it would skip {skipped_n} examples, as many as were "
            "trained but in batches of another size, which is exact only if the stream's "
            "order does not depend on the batch size (this guard cannot check that)."
        )
    return (
        f"The global step ({global_step}) counts the steps the stop rule trained "
        f"({old.stop_rule}); a model_dir keeps the stop rule it was trained with."
    )


def _message(
    model_dir: str,
    path: str,
    global_step: int,
    old: _Record,
    new: _Record,
    differences: list,
) -> str:
    originals = ", ".join(f"{d.name} {d.show(d.old)}" for d in differences)
    lines = [
        f"Cannot resume the checkpoint in {model_dir} (global step {global_step}): its input "
        f"was different (recorded in {path}):",
        *(f"  {d}" for d in differences),
        _consequence(global_step, old, new, differences),
        f"Restart with the original values ({originals}), or train on a new model_dir.",
    ]
    return "\n".join(lines)
