"""The cached window of the embedding host call's caching mode: TPU variables, roll-and-add.

In caching mode the host call runs every `host_call_every_n_steps` steps. Each
step appends its `top_k` labels, predictions and uid buckets (and one
request time and sample rate) to per-core TPU variables, and the host call
reads the used part of the window. This module builds those variables (one
zeroed resource variable per host and replica, wrapped as a
`ReplicatedVariable`, not checkpointed), the update ops of a step (in the TPU
step), and the used part of the window the host function receives.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core.host_call import tensor_checks as _tensor_checks
from monolith.core.tpu_variable import ReplicatedVariable

LABELS = "labels_tpu_variable"
PREDS = "preds_tpu_variable"
UID_BUCKETS = "uid_buckets_tpu_variable"
REQ_TIMES = "req_times_tpu_variable"
SAMPLE_RATES = "sample_rates_tpu_variable"
COUNTER = "tpu_variables_accumulated_times"
#: Recording (and host-call) order of the window's variables.
VARIABLE_NAMES = (LABELS, PREDS, UID_BUCKETS, REQ_TIMES, SAMPLE_RATES, COUNTER)
TPU_VAR_COLLECTION = "TPU_VAR"

# Per step: (argument of update_tpu_variables_ops, its variable, dtype, per-example?).
_STEP_VALUES = (
    ("labels", LABELS, tf.float32, True),
    ("preds", PREDS, tf.float32, True),
    ("uid_buckets", UID_BUCKETS, tf.int32, True),
    ("req_times", REQ_TIMES, tf.int64, False),
    ("sample_rates", SAMPLE_RATES, tf.float32, False),
)


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
    for arg_name, _, dtype, per_example in _STEP_VALUES:
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


def used_slice(tpu_variable: tf.Tensor, used_elements_count: Any) -> tf.Tensor:
    """The first `used_elements_count` columns of a `[num_replicas, n]` window."""
    return tf.slice(tpu_variable, [0, 0], [-1, used_elements_count])


class CachedWindow:
    """The per-core TPU variables caching `every_n` steps of `top_k` examples.

    Per core: labels, preds, uid_buckets `[top_k * every_n]`; req_times,
    sample_rates `[every_n]`; the counter `[]` (steps cached in the current
    window).

    Args:
      top_k: Examples cached per core and step.
      every_n: Steps per window (`host_call_every_n_steps`).
      placements: `slice_placements(context)`.
    """

    def __init__(self, top_k: int, every_n: int, placements: Sequence[Tuple[Any, List[Any]]]):
        self.top_k = top_k
        self.every_n = every_n
        window = top_k * every_n
        self.variables: Dict[str, ReplicatedVariable] = {}
        self.restore_hooks: List[TPUVariableRestoreHook] = []
        for name, shape, dtype in (
            (LABELS, [window], tf.float32),
            (PREDS, [window], tf.float32),
            (UID_BUCKETS, [window], tf.int32),
            (REQ_TIMES, [every_n], tf.int64),
            (SAMPLE_RATES, [every_n], tf.float32),
            (COUNTER, [], tf.int32),
        ):
            variable, hook = create_replicated_variable(name, shape, dtype, placements)
            self.variables[name] = variable
            self.restore_hooks.append(hook)

    def update_ops(self, global_step: Any, checked: Mapping[str, tf.Tensor]) -> List[tf.Operation]:
        """Ops appending one step's checked values (`check_step_values`) to the window.

        At steps with `global_step % every_n == 1` the window is cleared
        first; the values are written at `counter * top_k` (`counter` for
        request times and sample rates), and the counter is incremented only
        after those writes.

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
        index = tf.math.floormod(global_step, self.every_n)
        counter_variable = self.variables[COUNTER]
        counter = clear_value_at_index_1(counter_variable, tf.int32, index)
        example_offset = counter * self.top_k
        updates = []
        for arg_name, var_name, dtype, per_example in _STEP_VALUES:
            variable = self.variables[var_name]
            old = clear_value_at_index_1(variable, dtype, index)
            offset = example_offset if per_example else counter
            new = compute_new_value(old, checked[arg_name], offset)
            updates.append(tf.compat.v1.assign(variable, new))
        # The counter moves only once this step's values are in place.
        with tf.control_dependencies(updates):
            return [tf.compat.v1.assign(counter_variable, counter + 1)]

    def used_part(
        self, received: Mapping[str, tf.Tensor], num_replicas: Optional[int]
    ) -> Dict[str, tf.Tensor]:
        """The used part of the windows the host function received, by role.

        Args:
          received: Each variable's name -> its `[num_replicas, ...]` value.
          num_replicas: The expected replica count (None: any).

        Returns:
          `labels`, `y_preds`, `uid_buckets` `[num_replicas, used * top_k]`,
          `req_times` `[num_replicas, used]`, `sample_rates` (each core's
          first, standing for the whole window) `[num_replicas]`,
          `used_slice_len` and the `counter` `[num_replicas]`.

        Raises:
          ValueError: If a received value has the wrong shape.
        """
        top_k, every_n = self.top_k, self.every_n
        for name, shape in (
            (LABELS, [num_replicas, every_n * top_k]),
            (PREDS, [num_replicas, every_n * top_k]),
            (UID_BUCKETS, [num_replicas, every_n * top_k]),
            (REQ_TIMES, [num_replicas, every_n]),
            (SAMPLE_RATES, [num_replicas, every_n]),
            (COUNTER, [num_replicas]),
        ):
            _tensor_checks.check_shape(name, received[name], shape)
        # Steps cached in this window (replica 0's count; all cores step together).
        used_steps = tf.minimum(received[COUNTER][0], every_n)
        used_slice_len = used_steps * top_k
        return {
            "labels": used_slice(received[LABELS], used_slice_len),
            "y_preds": used_slice(received[PREDS], used_slice_len),
            "uid_buckets": used_slice(received[UID_BUCKETS], used_slice_len),
            "req_times": used_slice(received[REQ_TIMES], used_steps),
            "sample_rates": tf.reshape(tf.slice(received[SAMPLE_RATES], [0, 0], [-1, 1]), [-1]),
            "used_slice_len": used_slice_len,
            "counter": received[COUNTER],
        }
