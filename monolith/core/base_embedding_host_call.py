"""Host call for embedding (CTR) models: AUC, DeepInsight and scalar summaries.

Use from a TPUEstimator `model_fn` (on the thread building the graph)::

    host_call = BaseEmbeddingHostCall(
        output_dir, enable_host_call=True, enable_deepinsight=True,
        enable_host_call_scalar_metrics=True,
        enable_caching_with_tpu_var_mode=False, top_k_sampling_num_per_core=k,
        params=dict(params, enable_host_call=True, cpu_test=False,
                    host_call_every_n_steps=1))
    host_call.record_summary_tensor("labels_for_auc_calculation", labels[:k])
    host_call.record_summary_tensor("y_pred_for_auc_calculation", preds[:k])
    host_call.record_summary_tensor("uid_bucket", uid_buckets[:k])
    host_call.record_summary_tensor("stopping_signals", padding_flag[:k])
    host_call.record_summary_tensor("loss_avg", loss)
    return TPUEstimatorSpec(..., host_call=host_call.generate_host_call_hook(),
                            training_hooks=host_call.tpu_var_restore_hooks)

TPUEstimator runs the host function on the host (the outfeed thread on TPU,
the training thread with `use_tpu=False`) with each packed tensor
concatenated over replicas. It writes, with `tf.summary` to
`output_dir + "/host_call"`:

- each scalar metric: names containing `_avg`, `_max`, `_sum` are reduced
  over replicas (mean, max, sum); any other name logs replica 0's value;
- `auc`: the streaming AUC (`tf.compat.v1.metrics.auc`) of the examples whose
  uid bucket is below `_UID_SAMPLE_RATE * _RATIO_N` (10 of 1000 buckets).
  It accumulates over the whole run, and the logged value is the one the
  update op returns, so it includes the examples of the call that writes it;
- DeepInsight: the selected labels, predictions (and with DeepInsight enabled
  request times and the first sample rate) as `tf.io.serialize_tensor` text
  summaries (`di_labels`, `di_preds`, `di_req_times`,
  `di_example_sample_rates`); labels and predictions are written whenever uid
  buckets are recorded, as in the original;
- averages of the selected labels, predictions, request times, sample rates.

Every summary of a step is written at the global step when that step
started (a step that did not advance the global step: the next free
number), each number once (see `_host_call_steps`). With the padding flag
recorded (`stopping_signals`, True / non-zero = padding), padding examples
are never selected.

Caching mode (`enable_caching_with_tpu_var_mode=True`) is for host calls that
run every `host_call_every_n_steps` (> 1) steps (TPUConfig's
`experimental_host_call_every_n_steps`): `update_tpu_variables_ops`
appends each step's `top_k_sampling_num_per_core` labels, predictions and uid
buckets (and one request time and sample rate) to per-core TPU variables, and
`record_summary_tpu_variables` sends the whole window to the host call, which
reads only the used part. The window restarts at steps with
`global_step % host_call_every_n_steps == 1`. The cached variables are not
checkpointed (they are zeroed after each session creation by
`tpu_var_restore_hooks`). With `params["cpu_test"]` there is no TPU context:
one slice on the default device stands for the only replica
(`TPUEstimator(use_tpu=False)`); then make the host-call reads follow the
update, e.g. call `record_summary_tpu_variables()` under
`tf.control_dependencies(update_ops)`.

Differences from the original Monolith module: the host call runs only when
both the constructor and `params["enable_host_call"]` enable it (a warning
says when they disagree); user errors raise ValueError/TypeError/RuntimeError
naming the argument; scalar-metric-only recording works (no averages of
missing tensors); the `auc` summary is deterministic; exactly one selected
example stays a vector; one replica works on every path; the TPU variables are
resource variables created outside the TPU step (`tf.init_scope()`), recorded
even with scalar metrics disabled; the host functions return only their own
summary ops (and the AUC update).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core import _host_call_summaries, _tensor_checks
from monolith.core.base_host_call import BaseHostCall
from monolith.core.tpu_variable import ReplicatedVariable

_LABLES_FOR_AUC_CALCULATION = "labels_for_auc_calculation"
_Y_PRED_FOR_AUC_CALCULATION = "y_pred_for_auc_calculation"
_REQ_TIME = "req_time"
_SAMPLE_RATE = "sample_rate"
_UID = "uid"
_UID_BUCKET = "uid_bucket"

_DEEPINSIGHT_SAMPLE_RATES = _host_call_summaries.DEEPINSIGHT_SAMPLE_RATES
_DEEPINSIGHT_LABELS = _host_call_summaries.DEEPINSIGHT_LABELS
_DEEPINSIGHT_PREDS = _host_call_summaries.DEEPINSIGHT_PREDS
_DEEPINSIGHT_REQ_TIMES = _host_call_summaries.DEEPINSIGHT_REQ_TIMES

_RATIO_N = _host_call_summaries.RATIO_N
_UID_SAMPLE_RATE = _host_call_summaries.UID_SAMPLE_RATE

_HOST_CALL_AUC_METRICS = {
    _LABLES_FOR_AUC_CALCULATION,
    _Y_PRED_FOR_AUC_CALCULATION,
    _SAMPLE_RATE,
    _REQ_TIME,
    _UID_BUCKET,
}

# TPU variables names
_LABELS_TPU_VARIABLE = "labels_tpu_variable"
_PREDS_TPU_VARIABLE = "preds_tpu_variable"
_UID_BUCKETS_TPU_VARIABLE = "uid_buckets_tpu_variable"
_REQ_TIMES_TPU_VARIABLE = "req_times_tpu_variable"
_SAMPLE_RATES_TPU_VARIABLE = "sample_rates_tpu_variable"
_ACCUMULATED_COUNTER_TPU_VARIABLE = "tpu_variables_accumulated_times"

_DEPRECATED_METRIC_NAMES = [
    _LABLES_FOR_AUC_CALCULATION,
    _Y_PRED_FOR_AUC_CALCULATION,
    _UID_BUCKET,
    _REQ_TIME,
    _SAMPLE_RATE,
]

_TPU_VAR_COLLECTION = "TPU_VAR"
_TPU_VARIABLE_NAMES = (
    _LABELS_TPU_VARIABLE,
    _PREDS_TPU_VARIABLE,
    _UID_BUCKETS_TPU_VARIABLE,
    _REQ_TIMES_TPU_VARIABLE,
    _SAMPLE_RATES_TPU_VARIABLE,
    _ACCUMULATED_COUNTER_TPU_VARIABLE,
)
_STOPPING_SIGNALS = "stopping_signals"
_REQUIRED_PARAMS = ("enable_host_call", "cpu_test", "host_call_every_n_steps")
# Without caching, a recorded name containing one of these is that AUC input
# (checked in this order, as in the original).
_AUC_INPUT_ROLES = (
    _LABLES_FOR_AUC_CALCULATION,
    _Y_PRED_FOR_AUC_CALCULATION,
    _REQ_TIME,
    _SAMPLE_RATE,
    _UID_BUCKET,
)


def _auc_input_role(name: str) -> Optional[str]:
    return next((role for role in _AUC_INPUT_ROLES if role in name), None)


def _is_padding_flag(name: str) -> bool:
    """Whether a recorded name is the per-example padding flag (routed as `stopping_signals`)."""
    return _STOPPING_SIGNALS in name and not _host_call_summaries.is_reduced_metric(name)


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


class BaseEmbeddingHostCall(BaseHostCall):
    """Host call of embedding models, optionally caching metrics in TPU variables.

    Args:
      output_dir: Summaries go to `output_dir + "/host_call"`.
      enable_host_call: Record and write anything at all (together with
        `params["enable_host_call"]`: both must be True).
      enable_deepinsight: Also serialize request times and sample rates.
      enable_host_call_scalar_metrics: Record metrics other than the AUC inputs.
      enable_caching_with_tpu_var_mode: Cache `host_call_every_n_steps` steps
        of metrics in TPU variables (see the module docstring).
      top_k_sampling_num_per_core: Examples per core and step used for the AUC.
      params: TPUEstimator's params with `enable_host_call`, `cpu_test`,
        `host_call_every_n_steps`, and (unless `cpu_test`) `context`, the
        `TPUContext` TPUEstimator puts in `params["context"]`.

    Raises:
      TypeError: If `params` is not a mapping.
      ValueError: If a params key is missing, or caching is enabled with
        `host_call_every_n_steps <= 1`, a non-positive
        `top_k_sampling_num_per_core`, or no context outside `cpu_test`.
      RuntimeError: If the host call is enabled and there is no global step.
    """

    def __init__(
        self,
        output_dir: str,
        enable_host_call: bool,
        enable_deepinsight: bool,
        enable_host_call_scalar_metrics: bool,
        enable_caching_with_tpu_var_mode: bool,
        top_k_sampling_num_per_core: int,
        params: Mapping[str, Any],
    ):
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, got {type(params).__name__}: {params!r}")
        for key in _REQUIRED_PARAMS:
            if key not in params:
                raise ValueError(
                    f"params is missing the key {key!r} (required keys: "
                    f"{list(_REQUIRED_PARAMS)}, plus 'context' unless cpu_test); "
                    f"got keys {sorted(params)}"
                )
        cpu_test = bool(params["cpu_test"])
        if not cpu_test and "context" not in params:
            raise ValueError(
                "params is missing the key 'context' (TPUEstimator's TPUContext, needed "
                f"when params['cpu_test'] is False); got keys {sorted(params)}"
            )
        enabled = bool(enable_host_call) and bool(params["enable_host_call"])
        if bool(enable_host_call) != bool(params["enable_host_call"]):
            logging.warning(
                "enable_host_call=%s but params['enable_host_call']=%s: the host call is "
                "disabled (it runs only when both are True)",
                enable_host_call,
                params["enable_host_call"],
            )
        super().__init__(output_dir, enabled)
        self._enable_deepinsight = enable_deepinsight
        self._enable_host_call_scalar_metrics = enable_host_call_scalar_metrics
        self._enable_caching_with_tpu_var_mode = enable_caching_with_tpu_var_mode
        self._top_k_sampling_num_per_core = top_k_sampling_num_per_core
        self._cpu_test = cpu_test
        self._context = None if cpu_test else params["context"]
        self._host_call_every_n_steps = params["host_call_every_n_steps"]

        # Per-core cached metrics (caching mode only):
        #   labels, preds, uid_buckets: [top_k * host_call_every_n_steps]
        #   req_times, sample_rates: [host_call_every_n_steps]
        #   accumulated counter: [], steps cached in the current window.
        self._labels_tpu_variable = None
        self._preds_tpu_variable = None
        self._uid_buckets_tpu_variable = None
        self._req_times_tpu_variable = None
        self._sample_rates_tpu_variable = None
        self._accumulated_counter_tpu_variable = None

        # Caching mode: the padding flag recorded before the window updates
        # were built, and whether those updates cache padding examples with
        # an unsampled uid bucket.
        self._padding_flag_for_cache: Optional[tf.Tensor] = None
        self._padding_masked_in_cache = False
        self._window_updates_built = False

        self.tpu_var_restore_hooks: List[TPUVariableRestoreHook] = []
        self._create_all_tpu_variables()

    def _create_all_tpu_variables(self) -> None:
        """Creates the cached-metric variables (caching mode only)."""
        if not self._enable_host_call:
            logging.info("enable_host_call is False, not creating TPU variables.")
            return
        if not self._enable_caching_with_tpu_var_mode:
            logging.info("enable_caching_with_tpu_var_mode is False, not creating TPU variables.")
            return
        every_n = self._host_call_every_n_steps
        if isinstance(every_n, bool) or not isinstance(every_n, int) or every_n <= 1:
            raise ValueError(
                "caching metrics in TPU variables needs params['host_call_every_n_steps'] to "
                f"be an int > 1, got host_call_every_n_steps={every_n!r}"
            )
        top_k = self._top_k_sampling_num_per_core
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(
                "caching metrics in TPU variables needs top_k_sampling_num_per_core to be a "
                f"positive int, got top_k_sampling_num_per_core={top_k!r}"
            )
        if self._context is None and not self._cpu_test:
            raise ValueError(
                "caching metrics in TPU variables needs params['context'] (TPUEstimator's "
                "TPUContext) when params['cpu_test'] is False, got context=None"
            )
        logging.info("Creating TPU variables caching %d steps of metrics.", every_n)
        window = top_k * every_n
        self._labels_tpu_variable = self._create_tpu_var(_LABELS_TPU_VARIABLE, [window], tf.float32)
        self._preds_tpu_variable = self._create_tpu_var(_PREDS_TPU_VARIABLE, [window], tf.float32)
        self._uid_buckets_tpu_variable = self._create_tpu_var(
            _UID_BUCKETS_TPU_VARIABLE, [window], tf.int32
        )
        self._req_times_tpu_variable = self._create_tpu_var(
            _REQ_TIMES_TPU_VARIABLE, [every_n], tf.int64
        )
        self._sample_rates_tpu_variable = self._create_tpu_var(
            _SAMPLE_RATES_TPU_VARIABLE, [every_n], tf.float32
        )
        self._accumulated_counter_tpu_variable = self._create_tpu_var(
            _ACCUMULATED_COUNTER_TPU_VARIABLE, [], tf.int32
        )

    def _slice_placements(self) -> List[Tuple[Any, List[Any]]]:
        """(host device, [device of each replica's slice]) for each host.

        Without a context (cpu_test) one slice on the default device stands
        for the only replica.
        """
        ctx = self._context
        if ctx is None:
            return [(None, [None])]
        master = ctx._internal_ctx.master_job  # pylint: disable=protected-access
        job_device = "" if master is None else f"/job:{master}"
        host_device = ctx.tpu_host_placement_function
        return [
            (
                host_device(h),
                [
                    f"{job_device}/task:{h}/device:TPU:{d}"
                    for d in range(ctx.num_of_replicas_per_host)
                ],
            )
            for h in range(ctx.num_hosts)
        ]

    def _create_tpu_var(
        self, var_name: str, var_shape: Sequence[int], var_type: tf.DType
    ) -> ReplicatedVariable:
        """Creates a zeroed resource variable per host and replica, wrapped as one.

        Runs while the `model_fn` builds the TPU step: `tf.init_scope()` lifts
        the variables (and their zeroing ops) out of the step's function and
        loop bodies into the outer graph. The slices go into the `TPU_VAR`
        collection only (not checkpointed); a `TPUVariableRestoreHook`
        appended to `tpu_var_restore_hooks` zeroes them after session creation.
        """
        slices = []
        zeroing_ops = []
        with tf.init_scope():
            for h, (host, devices) in enumerate(self._slice_placements()):
                with _maybe_device(host):
                    zeros = tf.zeros(shape=var_shape, dtype=var_type)
                for d, device in enumerate(devices):
                    with _maybe_device(device):
                        slice_var = tf.compat.v1.Variable(
                            initial_value=zeros,
                            trainable=False,
                            name=f"slice_{var_name}_{h}_{d}",
                            dtype=var_type,
                            collections=[_TPU_VAR_COLLECTION],
                            use_resource=True,
                        )
                        zeroing_ops.append(slice_var.assign(zeros, read_value=False))
                    slices.append(slice_var)
            self.tpu_var_restore_hooks.append(TPUVariableRestoreHook(tf.group(zeroing_ops)))
        logging.info(
            "Created TPU variable %s: shape %s, dtype %s, %d slices",
            var_name,
            var_shape,
            var_type.name,
            len(slices),
        )
        return ReplicatedVariable(var_name, slices)

    def _compute_new_value(self, base_tpu_var: Any, delta_value: Any, update_offset: Any) -> Any:
        """`base_tpu_var` plus `delta_value` written at `update_offset` (wrapping around).

        `delta_value` is padded to the base's length and rolled by the offset
        rather than padded on both sides: XLA needs the padding amounts at
        compile time, while the offset is a tensor.

        Raises:
          ValueError: If either value is not a vector of static length, or the
            delta is longer than the base.
          TypeError: If their dtypes differ.
        """
        base_tpu_var = tf.convert_to_tensor(base_tpu_var)
        delta_value = tf.convert_to_tensor(delta_value)
        _tensor_checks.check_rank("base_tpu_var", base_tpu_var, 1)
        _tensor_checks.check_rank("delta_value", delta_value, 1)
        if base_tpu_var.dtype != delta_value.dtype:
            raise TypeError(
                f"delta_value's dtype {delta_value.dtype.name} must be base_tpu_var's dtype "
                f"{base_tpu_var.dtype.name}"
            )
        base_len = _tensor_checks.static_length("base_tpu_var", base_tpu_var)
        delta_len = _tensor_checks.static_length("delta_value", delta_value)
        if delta_len > base_len:
            raise ValueError(
                f"delta_value (length {delta_len}) must not be longer than base_tpu_var "
                f"(length {base_len})"
            )
        padded = tf.pad(delta_value, [[0, base_len - delta_len]])
        return base_tpu_var + tf.roll(padded, shift=update_offset, axis=0)

    def _clear_value_at_index_1(self, tpu_var: Any, var_type: tf.DType, index: Any) -> tf.Tensor:
        """The variable's value, or zeros at the first step of a window (index 1)."""
        value = tf.convert_to_tensor(tpu_var)
        return tf.where(tf.math.equal(index, 1), tf.zeros_like(value, dtype=var_type), value)

    def update_tpu_variables_ops(
        self,
        global_step: Any,
        labels: Any,
        preds: Any,
        uid_buckets: Any,
        req_times: Any,
        sample_rates: Any,
    ) -> List[tf.Operation]:
        """Ops appending this step's metrics to the cached window (caching mode).

        Build them in the TPU step and make the train op depend on them. At
        steps with `global_step % host_call_every_n_steps == 1` the window is
        cleared first; the step's values are written at `counter * top_k`
        (`counter` for request times and sample rates), and the counter is
        incremented only after those writes.

        Args:
          global_step: Integer scalar.
          labels: float32 `[top_k_sampling_num_per_core]`.
          preds: float32 `[top_k_sampling_num_per_core]`.
          uid_buckets: int32 `[top_k_sampling_num_per_core]`.
          req_times: int64 vector (normally `[1]`), at most
            `host_call_every_n_steps` long.
          sample_rates: float32 vector (normally `[1]`), at most
            `host_call_every_n_steps` long.

        Returns:
          `[counter update op]` (which runs after all updates), or `[]` if the
          host call or caching is disabled.

        Raises:
          ValueError: On a None, wrongly shaped or unknown-length argument.
          TypeError: On a wrong dtype.
        """
        if not self._enable_host_call:
            logging.info("enable_host_call is False, not updating TPU variables.")
            return []
        if not self._enable_caching_with_tpu_var_mode:
            logging.info("enable_caching_with_tpu_var_mode is False, not updating TPU variables.")
            return []
        top_k = self._top_k_sampling_num_per_core
        every_n = self._host_call_every_n_steps
        checked = {}
        for arg_name, value, dtype, length in (
            ("labels", labels, tf.float32, top_k),
            ("preds", preds, tf.float32, top_k),
            ("uid_buckets", uid_buckets, tf.int32, top_k),
            ("req_times", req_times, tf.int64, None),
            ("sample_rates", sample_rates, tf.float32, None),
        ):
            _tensor_checks.check_not_none(arg_name, value)
            tensor = tf.convert_to_tensor(value)
            _tensor_checks.check_dtype(arg_name, tensor, dtype)
            _tensor_checks.check_rank(arg_name, tensor, 1)
            actual = _tensor_checks.static_length(arg_name, tensor)
            if length is not None and actual != length:
                raise ValueError(
                    f"{arg_name} must have shape [{length}] "
                    f"(top_k_sampling_num_per_core), got {tensor.shape}"
                )
            if length is None and actual > every_n:
                raise ValueError(
                    f"{arg_name} must hold at most host_call_every_n_steps={every_n} "
                    f"elements, got shape {tensor.shape}"
                )
            checked[arg_name] = tensor
        if self._padding_flag_for_cache is not None:
            checked["uid_buckets"] = self._unsampled_if_padding(checked["uid_buckets"])
        global_step = tf.convert_to_tensor(global_step)
        _tensor_checks.check_rank("global_step", global_step, 0)
        if not global_step.dtype.is_integer:
            raise TypeError(f"global_step must be an integer, got dtype {global_step.dtype.name}")
        logging.info("Building the TPU variable updates.")

        index = tf.math.floormod(global_step, every_n)
        counter = self._clear_value_at_index_1(
            self._accumulated_counter_tpu_variable, tf.int32, index
        )
        offset = counter * top_k
        updates = []
        for variable, arg_name, var_type, var_offset in (
            (self._labels_tpu_variable, "labels", tf.float32, offset),
            (self._preds_tpu_variable, "preds", tf.float32, offset),
            (self._uid_buckets_tpu_variable, "uid_buckets", tf.int32, offset),
            (self._req_times_tpu_variable, "req_times", tf.int64, counter),
            (self._sample_rates_tpu_variable, "sample_rates", tf.float32, counter),
        ):
            old = self._clear_value_at_index_1(variable, var_type, index)
            new = self._compute_new_value(old, checked[arg_name], var_offset)
            updates.append(tf.compat.v1.assign(variable, new))
        self._window_updates_built = True
        # The counter moves only once this step's values are in place.
        with tf.control_dependencies(updates):
            counter_update = tf.compat.v1.assign(
                self._accumulated_counter_tpu_variable, counter + 1
            )
        return [counter_update]

    def _unsampled_if_padding(self, uid_buckets: tf.Tensor) -> tf.Tensor:
        """`uid_buckets` with each padding example's bucket set to one never sampled.

        Raises:
          ValueError: If the recorded flag has neither one element nor
            `top_k_sampling_num_per_core`.
        """
        flag = self._padding_flag_for_cache
        top_k = self._top_k_sampling_num_per_core
        length = _tensor_checks.static_length("stopping_signals", flag)
        if length not in (1, top_k):
            raise ValueError(
                f"stopping_signals must hold 1 or top_k_sampling_num_per_core={top_k} "
                f"elements (one per cached example) in caching mode, got shape {flag.shape}"
            )
        padding = tf.not_equal(tf.cast(flag, tf.int32), 0)
        unsampled = tf.fill(
            [top_k], tf.constant(_host_call_summaries.UNSAMPLED_UID_BUCKET, tf.int32)
        )
        self._padding_masked_in_cache = True
        return tf.where(tf.broadcast_to(padding, [top_k]), unsampled, uid_buckets)

    def record_summary_tpu_variables(self) -> None:
        """Records the cached windows (caching mode) for the host call."""
        if not self._enable_host_call:
            logging.info("enable_host_call is False, not recording TPU variables.")
            return
        if not self._enable_caching_with_tpu_var_mode:
            logging.info("enable_caching_with_tpu_var_mode is False, not recording TPU variables.")
            return
        logging.info("Recording TPU variables.")
        for name, variable in (
            (_LABELS_TPU_VARIABLE, self._labels_tpu_variable),
            (_PREDS_TPU_VARIABLE, self._preds_tpu_variable),
            (_UID_BUCKETS_TPU_VARIABLE, self._uid_buckets_tpu_variable),
            (_REQ_TIMES_TPU_VARIABLE, self._req_times_tpu_variable),
            (_SAMPLE_RATES_TPU_VARIABLE, self._sample_rates_tpu_variable),
            (_ACCUMULATED_COUNTER_TPU_VARIABLE, self._accumulated_counter_tpu_variable),
        ):
            BaseHostCall.record_summary_tensor(self, name, variable.read_value())

    def record_summary_tensor(self, name: str, tensor: Any) -> None:
        """Records a metric, unless switched off.

        Dropped silently: metrics other than the AUC inputs and the padding
        flag when `enable_host_call_scalar_metrics` is False, and the
        per-step AUC inputs (`_DEPRECATED_METRIC_NAMES`) in caching mode,
        where the cached windows replace them. The cached windows themselves
        are always kept.

        The padding flag, `record_summary_tensor("stopping_signals", flag)`
        (bool or int, `[batch]` or the `[k]` examples recorded for the AUC,
        True / non-zero = padding, e.g. the feature
        `stopping_signals.USER_PROVIDED_SIGNAL_NAME`), keeps padding examples
        out of the AUC, the DeepInsight payloads and the sampled averages.
        In caching mode record it before `update_tpu_variables_ops`, which
        then caches each padding example with an unsampled uid bucket.
        """
        if (
            not self._enable_host_call_scalar_metrics
            and name not in _HOST_CALL_AUC_METRICS
            and name not in _TPU_VARIABLE_NAMES
            and not _is_padding_flag(name)
        ):
            return
        if self._enable_caching_with_tpu_var_mode and name in _DEPRECATED_METRIC_NAMES:
            return
        super().record_summary_tensor(name, tensor)
        if (
            self._enable_host_call
            and self._enable_caching_with_tpu_var_mode
            and _is_padding_flag(name)
        ):
            if self._window_updates_built:
                logging.warning(
                    "%r was recorded after update_tpu_variables_ops(): the cached windows "
                    "hold its padding examples, and a window whose host-call step is "
                    "padding is dropped whole; record it before the updates to drop only "
                    "the padding examples",
                    name,
                )
            else:
                self._padding_flag_for_cache = tf.reshape(tf.convert_to_tensor(tensor), [-1])

    def _verify_shape_and_dtype(self, tensor: Any, shape_list: Sequence[Any], dtype: tf.DType):
        _tensor_checks.check_not_none("tensor", tensor)
        _tensor_checks.check_shape(f"tensor {getattr(tensor, 'name', '')}", tensor, shape_list)
        _tensor_checks.check_dtype(f"tensor {getattr(tensor, 'name', '')}", tensor, dtype)

    def _slice_tensor(
        self, tensor: Any, indices: Any, expect_shape: Sequence[Any], expect_dtype: tf.DType
    ) -> tf.Tensor:
        """The elements of the flattened `tensor` at `indices`.

        Args:
          tensor: `[num_replicas, k]` (or `[num_replicas]`) values.
          indices: Positions in the flattened tensor.
          expect_shape: The shape `tensor` must have (None: any length).
          expect_dtype: The dtype `tensor` must have.
        """
        self._verify_shape_and_dtype(tensor, expect_shape, expect_dtype)
        return tf.gather(tf.reshape(tensor, [-1]), indices)

    def _serialize_tensor(self, sampled_tensor: tf.Tensor, gs: tf.Tensor, message_name: str):
        tf.summary.text(message_name, data=tf.io.serialize_tensor(sampled_tensor), step=gs)

    def _serialize_messages(self, labels, y_preds, sample_rates, req_times, uid_buckets, gs):
        """Serializes the first sample rate and request time (deprecated, kept for drop-in)."""
        for arg_name, value in (
            ("labels", labels),
            ("y_preds", y_preds),
            ("sample_rates", sample_rates),
            ("req_times", req_times),
            ("uid_buckets", uid_buckets),
        ):
            _tensor_checks.check_not_none(arg_name, value)
        expect_shape = sample_rates.shape.as_list()
        _tensor_checks.check_rank("sample_rates", sample_rates, 1)
        self._serialize_tensor(
            self._slice_tensor(sample_rates, [0], expect_shape, tf.float32),
            gs,
            _DEEPINSIGHT_SAMPLE_RATES,
        )
        self._serialize_tensor(
            self._slice_tensor(req_times, [0], req_times.shape.as_list(), tf.int64),
            gs,
            _DEEPINSIGHT_REQ_TIMES,
        )

    def _write_summary_ops(
        self,
        summaries: _host_call_summaries.HostCallSummaries,
        labels: Optional[tf.Tensor],
        y_preds: Optional[tf.Tensor],
        uid_buckets: Optional[tf.Tensor],
        req_times: Optional[tf.Tensor],
        sample_rates: Optional[tf.Tensor],
        stopping_signals_sum: Optional[tf.Tensor] = None,
        padding_flag: Optional[tf.Tensor] = None,
    ) -> Optional[tf.Tensor]:
        """Writes AUC, DeepInsight and average summaries; returns the AUC update op.

        Examples are selected by uid bucket, without padding examples (those
        `padding_flag` marks), and none at all when `stopping_signals_sum`
        (the original's caching-mode rule) is non-zero; without uid buckets
        or flag all are used.
        """
        if labels is None or y_preds is None:
            self._write_averages(summaries, labels, y_preds, req_times, sample_rates)
            return None
        expect_shape = labels.shape.as_list()
        keep = None
        if uid_buckets is not None:
            _tensor_checks.check_shape("uid buckets", uid_buckets, expect_shape)
            keep = tf.reshape(uid_buckets, [-1]) < int(_UID_SAMPLE_RATE * _RATIO_N)
            if stopping_signals_sum is not None:
                keep = tf.math.logical_and(keep, tf.math.equal(stopping_signals_sum, 0))
        if padding_flag is not None:
            real = _host_call_summaries.real_examples(padding_flag, labels)
            keep = real if keep is None else tf.math.logical_and(keep, real)

        sampled_labels, sampled_preds, sampled_req_times = labels, y_preds, req_times
        if keep is not None:
            # A vector even when exactly one example is kept.
            indices = tf.reshape(tf.where(keep), [-1])
            sampled_labels = self._slice_tensor(labels, indices, expect_shape, tf.float32)
            sampled_preds = self._slice_tensor(y_preds, indices, expect_shape, tf.float32)
        if uid_buckets is not None:
            summaries.serialized(_DEEPINSIGHT_LABELS, sampled_labels)
            summaries.serialized(_DEEPINSIGHT_PREDS, sampled_preds)
            if self._enable_deepinsight and req_times is not None:
                _tensor_checks.check_rank("req_times (one per replica)", req_times, 2)
                # One request time per step and core: repeat it for its examples.
                per_example = tf.repeat(req_times, self._top_k_sampling_num_per_core, axis=1)
                sampled_req_times = self._slice_tensor(per_example, indices, expect_shape, tf.int64)
                summaries.serialized(_DEEPINSIGHT_REQ_TIMES, sampled_req_times)

        _, auc_op = tf.compat.v1.metrics.auc(labels=sampled_labels, predictions=sampled_preds)
        # The value the update returns: this call's examples included, no race.
        summaries.scalar("auc", auc_op)
        if self._enable_deepinsight and sample_rates is not None:
            _tensor_checks.check_rank("sample_rates (one per replica)", sample_rates, 1)
            # One sample rate stands for all examples of this host call.
            first_rate = self._slice_tensor(
                sample_rates, [0], sample_rates.shape.as_list(), tf.float32
            )
            summaries.serialized(_DEEPINSIGHT_SAMPLE_RATES, first_rate)
        self._write_averages(
            summaries, sampled_labels, sampled_preds, sampled_req_times, sample_rates
        )
        return auc_op

    @staticmethod
    def _write_averages(summaries, labels, y_preds, req_times, sample_rates) -> None:
        for summary_name, value in (
            ("sampled_labels_variable_avg", labels),
            ("sampled_preds_variable_avg", y_preds),
            ("req_times_variable_avg", req_times),
            ("sample_rates_variable_avg", sample_rates),
        ):
            if value is not None:
                summaries.scalar(summary_name, tf.reduce_mean(value))

    def _route(
        self, summaries: _host_call_summaries.HostCallSummaries, tensors: Sequence[tf.Tensor]
    ) -> Dict[str, tf.Tensor]:
        """Logs the scalar metrics; returns the other recorded tensors by role.

        One routing rule for both host functions: names with a reduction
        suffix are logged reduced over replicas; the cached windows (caching
        mode), the padding flag and (without caching) the AUC inputs are
        returned under their role; any other name logs replica 0's value.
        """
        routed: Dict[str, tf.Tensor] = {}
        for name, tensor in zip(self._tensor_names[1:], tensors[1:]):
            if _host_call_summaries.is_reduced_metric(name):
                summaries.scalar(name, _host_call_summaries.reduced_scalar(name, tensor))
            elif self._enable_caching_with_tpu_var_mode and name in _TPU_VARIABLE_NAMES:
                routed[name] = tensor
            elif _STOPPING_SIGNALS in name:
                routed[_STOPPING_SIGNALS] = tensor
            elif not self._enable_caching_with_tpu_var_mode and _auc_input_role(name):
                routed[_auc_input_role(name)] = tensor
            else:
                summaries.scalar(name, _host_call_summaries.reduced_scalar(name, tensor))
        return routed

    def _host_call(self, *args: tf.Tensor) -> tf.Operation:
        """Host function without caching: each step's recorded tensors.

        With a recorded padding flag, padding examples are left out of every
        example summary.
        """
        gs, tensors = self.decompress_tensors(args)
        with _host_call_summaries.HostCallSummaries(self._output_dir, gs) as summaries:
            routed = self._route(summaries, tensors)
            req_times = routed.get(_REQ_TIME)
            auc_op = self._write_summary_ops(
                summaries,
                routed.get(_LABLES_FOR_AUC_CALCULATION),
                routed.get(_Y_PRED_FOR_AUC_CALCULATION),
                routed.get(_UID_BUCKET),
                None if req_times is None else tf.expand_dims(req_times, -1),
                routed.get(_SAMPLE_RATE),
                padding_flag=routed.get(_STOPPING_SIGNALS),
            )
        return summaries.group(auc_op)

    def _num_replicas(self, args: Sequence[Any]) -> Optional[int]:
        """Replica count: the context's, else (cpu_test) the tensors' leading dimension."""
        if self._context is not None:
            return self._context.num_replicas
        return tf.compat.dimension_value(tf.convert_to_tensor(args[0]).shape[0])

    def _host_call_with_tpu(self, *args: tf.Tensor) -> tf.Operation:
        """Host function in caching mode: the used part of the cached windows.

        Padding examples were cached with an unsampled uid bucket when the
        flag was recorded before `update_tpu_variables_ops`; otherwise (the
        original's rule) a flag set at the host-call step drops the window.
        """
        gs, tensors = self.decompress_tensors(args)
        num_replicas = self._num_replicas(args)
        top_k = self._top_k_sampling_num_per_core
        every_n = self._host_call_every_n_steps
        with _host_call_summaries.HostCallSummaries(self._output_dir, gs) as summaries:
            routed = self._route(summaries, tensors)
            stopping_signals_sum = None
            if _STOPPING_SIGNALS in routed:
                stopping_signals_sum = tf.reduce_sum(tf.cast(routed[_STOPPING_SIGNALS], tf.int32))

            for name, shape in (
                (_LABELS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
                (_PREDS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
                (_UID_BUCKETS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
                (_REQ_TIMES_TPU_VARIABLE, [num_replicas, every_n]),
                (_SAMPLE_RATES_TPU_VARIABLE, [num_replicas, every_n]),
                (_ACCUMULATED_COUNTER_TPU_VARIABLE, [num_replicas]),
            ):
                _tensor_checks.check_shape(name, routed[name], shape)

            # Steps cached in this window (replica 0's count; all cores step together).
            used_steps = tf.minimum(routed[_ACCUMULATED_COUNTER_TPU_VARIABLE][0], every_n)
            used_slice_len = used_steps * top_k
            labels = _used_slice(routed[_LABELS_TPU_VARIABLE], used_slice_len)
            y_preds = _used_slice(routed[_PREDS_TPU_VARIABLE], used_slice_len)
            uid_buckets = _used_slice(routed[_UID_BUCKETS_TPU_VARIABLE], used_slice_len)
            req_times = _used_slice(routed[_REQ_TIMES_TPU_VARIABLE], used_steps)
            # For speed one sample rate (each core's first) stands for the whole window.
            sample_rates = tf.reshape(
                tf.slice(routed[_SAMPLE_RATES_TPU_VARIABLE], [0, 0], [-1, 1]), [-1]
            )

            summaries.scalar("uid_buckets_tpu_variable_avg", tf.reduce_mean(uid_buckets))
            summaries.scalar(
                "accumulated_times_tpu_variable_avg",
                tf.reduce_mean(routed[_ACCUMULATED_COUNTER_TPU_VARIABLE]),
            )
            summaries.scalar("used_slice_len_avg", tf.reduce_min(used_slice_len))
            if stopping_signals_sum is not None:
                summaries.scalar("stopping_signals_sum", stopping_signals_sum)

            auc_op = self._write_summary_ops(
                summaries,
                labels,
                y_preds,
                uid_buckets,
                req_times,
                sample_rates,
                None if self._padding_masked_in_cache else stopping_signals_sum,
            )
        return summaries.group(auc_op)

    def generate_host_call_hook(self) -> Optional[Tuple[Callable[..., Any], List[tf.Tensor]]]:
        """TPUEstimator's `host_call`: `(host function, packed tensors)`, or None if disabled.

        Call once all tensors are recorded (it packs them).

        Raises:
          RuntimeError: In caching mode, if `record_summary_tpu_variables` was
            not called.
        """
        if not self._enable_host_call:
            logging.info("host_call has been disabled")
            return None
        if self._enable_caching_with_tpu_var_mode:
            missing = [n for n in _TPU_VARIABLE_NAMES if n not in self._tensor_names]
            if missing:
                raise RuntimeError(
                    "caching mode: call record_summary_tpu_variables() before "
                    f"generate_host_call_hook(); not recorded: {missing}"
                )
        if self._packing is None:
            self.compress_tensors()
        if self._enable_caching_with_tpu_var_mode:
            return (self._host_call_with_tpu, self._tensors)
        return (self._host_call, self._tensors)


def _used_slice(tpu_variable: tf.Tensor, used_elements_count: Any) -> tf.Tensor:
    """The first `used_elements_count` columns of a `[num_replicas, n]` window."""
    return tf.slice(tpu_variable, [0, 0], [-1, used_elements_count])


def _maybe_device(device: Optional[str]):
    return contextlib.nullcontext() if device is None else tf.device(device)
