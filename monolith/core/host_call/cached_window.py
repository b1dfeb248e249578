"""The cached window of the embedding host call's caching mode: TPU variables, roll-and-add.

In caching mode the host call runs every `host_call_every_n_steps` steps. Each
step appends its `top_k` labels, predictions and uid buckets (and one
request time and sample rate) to per-core TPU variables, and the host call
reads the used part of the window. This module holds the pieces of that
cycle: the per-core slices of one variable (one zeroed resource variable per
host and replica, wrapped as a `ReplicatedVariable`, not checkpointed), the
pure arithmetic of a step's update, and the used part of the window the host
function receives.

`BaseEmbeddingHostCall` keeps the original's overridable methods in the
loop: it creates each variable through its `_create_tpu_var`, and
`update_ops` clears and adds through the `clear_value_at_index_1` and
`compute_new_value` callables it is given (the host call's
`_clear_value_at_index_1` and `_compute_new_value`), so a subclass that
overrides one of them changes the update as in the original.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core.host_call import names as _names
from monolith.core.host_call import tensor_checks as _tensor_checks
from monolith.core.tpu_variable import ReplicatedVariable

TPU_VAR_COLLECTION = "TPU_VAR"

# Per step: (argument of update_tpu_variables_ops, its variable, dtype, per-example?),
# in the original's update order.
STEP_VALUES = (
    ("labels", _names.LABELS_TPU_VARIABLE, tf.float32, True),
    ("preds", _names.PREDS_TPU_VARIABLE, tf.float32, True),
    ("uid_buckets", _names.UID_BUCKETS_TPU_VARIABLE, tf.int32, True),
    ("req_times", _names.REQ_TIMES_TPU_VARIABLE, tf.int64, False),
    ("sample_rates", _names.SAMPLE_RATES_TPU_VARIABLE, tf.float32, False),
)

#: `(variable, dtype, index) -> its value, or zeros at index 1` (`_clear_value_at_index_1`).
ClearFn = Callable[[Any, tf.DType, Any], Any]
#: `(old value, delta, offset) -> new value` (`_compute_new_value`).
ComputeFn = Callable[[Any, Any, Any], Any]


class TPUVariableRestoreHook(tf.compat.v1.train.SessionRunHook):
    """Runs `op` (zeroing the cached TPU variables) after each session creation.

    The cached variables are in no checkpoint and in no initializer
    collection; `after_create_session` (on the training thread, before the
    first step) gives them their initial value.
    """

    def __init__(self, op: tf.Operation):
        self._op = op

    def after_create_session(self, session: tf.compat.v1.Session, coord: Any) -> None:
        logging.info("Initializing variables on TPU devices.")
        session.run(self._op)


def maybe_device(device: Optional[str]):
    return contextlib.nullcontext() if device is None else tf.device(device)


def slice_placements(context: Any) -> List[Tuple[Any, List[Any]]]:
    """(host device, [device of each replica's slice]) for each host.

    Without a context (cpu_test) one slice on the default device stands for
    the only replica.
    """
    if context is None:
        return [(None, [None])]
    master = context._internal_ctx.master_job  # pylint: disable=protected-access
    job_device = "" if master is None else f"/job:{master}"
    host_device = context.tpu_host_placement_function
    return [
        (
            host_device(h),
            [
                f"{job_device}/task:{h}/device:TPU:{d}"
                for d in range(context.num_of_replicas_per_host)
            ],
        )
        for h in range(context.num_hosts)
    ]


def create_replicated_variable(
    var_name: str,
    var_shape: Sequence[int],
    var_type: tf.DType,
    placements: Sequence[Tuple[Any, List[Any]]],
) -> Tuple[ReplicatedVariable, TPUVariableRestoreHook]:
    """A zeroed resource variable per host and replica, wrapped as one, and its zeroing hook.

    Runs while the `model_fn` builds the TPU step: `tf.init_scope()` lifts
    the variables (and their zeroing ops) out of the step's function and
    loop bodies into the outer graph. The slices go into the `TPU_VAR`
    collection only (not checkpointed); the returned hook zeroes them after
    session creation.
    """
    slices = []
    zeroing_ops = []
    with tf.init_scope():
        for h, (host, devices) in enumerate(placements):
            with maybe_device(host):
                zeros = tf.zeros(shape=var_shape, dtype=var_type)
            for d, device in enumerate(devices):
                with maybe_device(device):
                    slice_var = tf.compat.v1.Variable(
                        initial_value=zeros,
                        trainable=False,
                        name=f"slice_{var_name}_{h}_{d}",
                        dtype=var_type,
                        collections=[TPU_VAR_COLLECTION],
                        use_resource=True,
                    )
                    zeroing_ops.append(slice_var.assign(zeros, read_value=False))
                slices.append(slice_var)
        hook = TPUVariableRestoreHook(tf.group(zeroing_ops))
    logging.info(
        "Created TPU variable %s: shape %s, dtype %s, %d slices",
        var_name,
        var_shape,
        var_type.name,
        len(slices),
    )
    return ReplicatedVariable(var_name, slices), hook


def compute_new_value(base_tpu_var: Any, delta_value: Any, update_offset: Any) -> tf.Tensor:
    """`base_tpu_var` plus `delta_value` written at `update_offset` (wrapping around).

    `delta_value` is padded to the base's length and rolled by the offset
    rather than padded on both sides: XLA needs the padding amounts at
    compile time, while the offset is a tensor.

    Raises:
      ValueError: If either value is not a vector of static length, or the
        delta is longer than the base.
      TypeError: If their dtypes differ.
    """
    base = tf.convert_to_tensor(base_tpu_var)
    delta = tf.convert_to_tensor(delta_value)
    _tensor_checks.check_rank("base_tpu_var", base, 1)
    _tensor_checks.check_rank("delta_value", delta, 1)
    if base.dtype != delta.dtype:
        raise TypeError(
            f"delta_value's dtype {delta.dtype.name} must be base_tpu_var's dtype "
            f"{base.dtype.name}"
        )
    base_len = _tensor_checks.static_length("base_tpu_var", base)
    delta_len = _tensor_checks.static_length("delta_value", delta)
    if delta_len > base_len:
        raise ValueError(
            f"delta_value (length {delta_len}) must not be longer than base_tpu_var "
            f"(length {base_len})"
        )
    padded = tf.pad(delta, [[0, base_len - delta_len]])
    return base + tf.roll(padded, shift=update_offset, axis=0)


def clear_value_at_index_1(tpu_var: Any, var_type: tf.DType, index: Any) -> tf.Tensor:
    """The variable's value, or zeros at the first step of a window (index 1)."""
    value = tf.convert_to_tensor(tpu_var)
    return tf.where(tf.math.equal(index, 1), tf.zeros_like(value, dtype=var_type), value)


def check_step_values(top_k: int, every_n: int, **values: Any) -> Dict[str, tf.Tensor]:
    """Converts and checks one step's values (`update_tpu_variables_ops`' arguments).

    Per-example values must be `[top_k]`; request times and sample rates
    vectors of at most `every_n` elements.

    Raises:
      ValueError: On a None, wrongly shaped or unknown-length value.
      TypeError: On a wrong dtype.
    """
    checked = {}
    for arg_name, _, dtype, per_example in STEP_VALUES:
        value = values[arg_name]
        _tensor_checks.check_not_none(arg_name, value)
        tensor = tf.convert_to_tensor(value)
        _tensor_checks.check_dtype(arg_name, tensor, dtype)
        _tensor_checks.check_rank(arg_name, tensor, 1)
        actual = _tensor_checks.static_length(arg_name, tensor)
        if per_example and actual != top_k:
            raise ValueError(
                f"{arg_name} must have shape [{top_k}] (top_k_sampling_num_per_core), "
                f"got {tensor.shape}"
            )
        if not per_example and actual > every_n:
            raise ValueError(
                f"{arg_name} must hold at most host_call_every_n_steps={every_n} "
                f"elements, got shape {tensor.shape}"
            )
        checked[arg_name] = tensor
    return checked


def update_ops(
    global_step: Any,
    variables: Mapping[str, Any],
    checked: Mapping[str, tf.Tensor],
    *,
    top_k: int,
    every_n: int,
    clear_value_at_index_1: ClearFn,
    compute_new_value: ComputeFn,
) -> List[tf.Operation]:
    """Ops appending one step's checked values (`check_step_values`) to the window.

    As the original's `update_tpu_variables_ops`: at steps with
    `global_step % every_n == 1` each variable's value is cleared first
    (`clear_value_at_index_1(variable, dtype, index)`, the counter first);
    the values are added at `counter * top_k` (`counter` for request times
    and sample rates) by `compute_new_value(old, delta, offset)`, and the
    counter is incremented only after those writes.

    Args:
      global_step: Integer scalar.
      variables: Each window's name (`names.WINDOWS`) -> its variable.
      checked: `check_step_values`' result.
      top_k: Examples cached per core and step.
      every_n: Steps per window.
      clear_value_at_index_1: The host call's `_clear_value_at_index_1`.
      compute_new_value: The host call's `_compute_new_value`.

    Returns:
      `[counter update op]`, which runs after all updates.

    Raises:
      ValueError: If `global_step` is not a scalar.
      TypeError: If it is not an integer.
    """
    global_step = tf.convert_to_tensor(global_step)
    _tensor_checks.check_rank("global_step", global_step, 0)
    if not global_step.dtype.is_integer:
        raise TypeError(f"global_step must be an integer, got dtype {global_step.dtype.name}")
    logging.info("Building the TPU variable updates.")
    index = tf.math.floormod(global_step, every_n)
    counter_variable = variables[_names.ACCUMULATED_COUNTER_TPU_VARIABLE]
    counter = clear_value_at_index_1(counter_variable, tf.int32, index)
    old = {
        arg_name: clear_value_at_index_1(variables[var_name], dtype, index)
        for arg_name, var_name, dtype, _ in STEP_VALUES
    }
    example_offset = counter * top_k
    updates = []
    for arg_name, var_name, _, per_example in STEP_VALUES:
        offset = example_offset if per_example else counter
        new = compute_new_value(old[arg_name], checked[arg_name], offset)
        updates.append(tf.compat.v1.assign(variables[var_name], new))
    # The counter moves only once this step's values are in place.
    with tf.control_dependencies(updates):
        return [tf.compat.v1.assign(counter_variable, tf.math.add(counter, 1))]


def used_slice(tpu_variable: tf.Tensor, used_elements_count: Any) -> tf.Tensor:
    """The first `used_elements_count` columns of a `[num_replicas, n]` window."""
    return tf.slice(tpu_variable, [0, 0], [-1, used_elements_count])


def used_part(
    received: Mapping[str, tf.Tensor], *, top_k: int, every_n: int, num_replicas: Optional[int]
) -> Dict[str, tf.Tensor]:
    """The used part of the windows the host function received, by role.

    Args:
      received: Each window's name -> its value as the host function received
        it, concatenated over replicas (`[num_replicas, ...]`).
      top_k: Examples cached per core and step.
      every_n: Steps per window.
      num_replicas: The expected replica count (None: any).

    Returns:
      `labels`, `y_preds`, `uid_buckets` `[num_replicas, used * top_k]`;
      `req_times` `[num_replicas, used]`; `sample_rates` (each core's first,
      standing for the whole window) `[num_replicas]`; the `counter`
      `[num_replicas]` (each core's count of cached steps); and
      `used_slice_len`, a scalar: `used * top_k`, where `used` is replica 0's
      count (all cores step together), at most `every_n`.

    Raises:
      ValueError: If a received value has the wrong shape.
    """
    for name, shape in (
        (_names.LABELS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
        (_names.PREDS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
        (_names.UID_BUCKETS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
        (_names.REQ_TIMES_TPU_VARIABLE, [num_replicas, every_n]),
        (_names.SAMPLE_RATES_TPU_VARIABLE, [num_replicas, every_n]),
        (_names.ACCUMULATED_COUNTER_TPU_VARIABLE, [num_replicas]),
    ):
        _tensor_checks.check_shape(name, received[name], shape)
    counter = received[_names.ACCUMULATED_COUNTER_TPU_VARIABLE]
    used_steps = tf.minimum(counter[0], every_n)
    used_slice_len = used_steps * top_k
    sample_rates = received[_names.SAMPLE_RATES_TPU_VARIABLE]
    return {
        "labels": used_slice(received[_names.LABELS_TPU_VARIABLE], used_slice_len),
        "y_preds": used_slice(received[_names.PREDS_TPU_VARIABLE], used_slice_len),
        "uid_buckets": used_slice(received[_names.UID_BUCKETS_TPU_VARIABLE], used_slice_len),
        "req_times": used_slice(received[_names.REQ_TIMES_TPU_VARIABLE], used_steps),
        "sample_rates": tf.reshape(tf.slice(sample_rates, [0, 0], [-1, 1]), [-1]),
        "used_slice_len": used_slice_len,
        "counter": counter,
    }
