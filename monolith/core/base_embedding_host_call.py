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
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core import _tensor_checks
from monolith.core.base_host_call import BaseHostCall
from monolith.core.tpu_variable import ReplicatedVariable

_LABLES_FOR_AUC_CALCULATION = "labels_for_auc_calculation"
_Y_PRED_FOR_AUC_CALCULATION = "y_pred_for_auc_calculation"
_REQ_TIME = "req_time"
_SAMPLE_RATE = "sample_rate"
_UID = "uid"
_UID_BUCKET = "uid_bucket"

_DEEPINSIGHT_SAMPLE_RATES = "di_example_sample_rates"
_DEEPINSIGHT_LABELS = "di_labels"
_DEEPINSIGHT_PREDS = "di_preds"
_DEEPINSIGHT_REQ_TIMES = "di_req_times"

_RATIO_N = 1000
_UID_SAMPLE_RATE = 0.01

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


def _reduced_scalar(name: str, tensor: tf.Tensor) -> tf.Tensor:
    """The scalar logged for a metric: reduced by suffix, else replica 0's value."""
    if "_avg" in name:
        return tf.reduce_mean(tensor)
    if "_max" in name:
        return tf.reduce_max(tensor)
    if "_sum" in name:
        return tf.reduce_sum(tensor)
    if tensor.shape.rank != 1:
        raise ValueError(
            f"tensor {name!r} has shape {tensor.shape} on the host: only scalars can be "
            "logged without an _avg, _max or _sum suffix"
        )
    return tensor[0]


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
        # The counter moves only once this step's values are in place.
        with tf.control_dependencies(updates):
            counter_update = tf.compat.v1.assign(
                self._accumulated_counter_tpu_variable, counter + 1
            )
        return [counter_update]

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

        Dropped silently: metrics other than the AUC inputs when
        `enable_host_call_scalar_metrics` is False, and the per-step AUC
        inputs (`_DEPRECATED_METRIC_NAMES`) in caching mode, where the cached
        windows replace them. The cached windows themselves are always kept.
        """
        if (
            not self._enable_host_call_scalar_metrics
            and name not in _HOST_CALL_AUC_METRICS
            and name not in _TPU_VARIABLE_NAMES
        ):
            return
        if self._enable_caching_with_tpu_var_mode and name in _DEPRECATED_METRIC_NAMES:
            return
        super().record_summary_tensor(name, tensor)

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
        gs,
        labels,
        y_preds,
        uid_buckets,
        req_times,
        sample_rates,
        stopping_signals_sum=None,
    ) -> Optional[tf.Tensor]:
        """Writes AUC, DeepInsight and average summaries; returns the AUC update op.

        Runs while the host function is built, under its summary writer.
        Examples are selected by uid bucket (and dropped entirely when a
        stopping signal is set); without uid buckets all are used.
        """
        auc_op = None
        if labels is not None and y_preds is not None:
            if uid_buckets is not None:
                flat_buckets = tf.reshape(uid_buckets, [-1])
                selected = flat_buckets < int(_UID_SAMPLE_RATE * _RATIO_N)
                if stopping_signals_sum is not None:
                    selected = tf.math.logical_and(selected, tf.math.equal(stopping_signals_sum, 0))
                # A vector even when exactly one example is selected.
                indices = tf.reshape(tf.where(selected), [-1])
                expect_shape = labels.shape.as_list()
                _tensor_checks.check_shape("uid buckets", uid_buckets, expect_shape)
                labels = self._slice_tensor(labels, indices, expect_shape, tf.float32)
                y_preds = self._slice_tensor(y_preds, indices, expect_shape, tf.float32)
                self._serialize_tensor(labels, gs, _DEEPINSIGHT_LABELS)
                self._serialize_tensor(y_preds, gs, _DEEPINSIGHT_PREDS)

                if self._enable_deepinsight and req_times is not None:
                    _tensor_checks.check_rank("req_times (one per replica)", req_times, 2)
                    # One request time per step and core: repeat it for its examples.
                    req_times = tf.repeat(req_times, self._top_k_sampling_num_per_core, axis=1)
                    req_times = self._slice_tensor(req_times, indices, expect_shape, tf.int64)
                    self._serialize_tensor(req_times, gs, _DEEPINSIGHT_REQ_TIMES)

            _, auc_op = tf.compat.v1.metrics.auc(labels=labels, predictions=y_preds)
            # The value the update returns: this call's examples included, no race.
            tf.summary.scalar("auc", data=auc_op, step=gs)

            if self._enable_deepinsight and sample_rates is not None:
                _tensor_checks.check_rank("sample_rates (one per replica)", sample_rates, 1)
                # One sample rate stands for all examples of this host call.
                first_rate = self._slice_tensor(
                    sample_rates, [0], sample_rates.shape.as_list(), tf.float32
                )
                self._serialize_tensor(first_rate, gs, _DEEPINSIGHT_SAMPLE_RATES)

        for summary_name, value in (
            ("sampled_labels_variable_avg", labels),
            ("sampled_preds_variable_avg", y_preds),
            ("req_times_variable_avg", req_times),
            ("sample_rates_variable_avg", sample_rates),
        ):
            if value is not None:
                tf.summary.scalar(summary_name, data=tf.reduce_mean(value), step=gs)
        return auc_op

    def _host_call(self, *args: tf.Tensor) -> tf.Operation:
        """Host function without caching: each step's recorded tensors."""
        gs, tensors = self.decompress_tensors(args)
        with _HostCallSummaries(self._output_dir) as summaries:
            labels = y_preds = req_times = sample_rates = uid_buckets = None
            for name, t in zip(self._tensor_names[1:], tensors[1:]):
                if "_avg" in name or "_max" in name or "_sum" in name:
                    tf.summary.scalar(name, data=_reduced_scalar(name, t), step=gs)
                elif _LABLES_FOR_AUC_CALCULATION in name:
                    labels = t
                elif _Y_PRED_FOR_AUC_CALCULATION in name:
                    y_preds = t
                elif _REQ_TIME in name:
                    req_times = tf.expand_dims(t, -1)
                elif _SAMPLE_RATE in name:
                    sample_rates = t
                elif _UID_BUCKET in name:
                    uid_buckets = t
                else:
                    tf.summary.scalar(name, data=_reduced_scalar(name, t), step=gs)
            summaries.auc_op = self._write_summary_ops(
                gs, labels, y_preds, uid_buckets, req_times, sample_rates
            )
        return summaries.group()

    def _num_replicas(self, args: Sequence[Any]) -> Optional[int]:
        """Replica count: the context's, else (cpu_test) the tensors' leading dimension."""
        if self._context is not None:
            return self._context.num_replicas
        return tf.compat.dimension_value(tf.convert_to_tensor(args[0]).shape[0])

    def _host_call_with_tpu(self, *args: tf.Tensor) -> tf.Operation:
        """Host function in caching mode: the used part of the cached windows."""
        gs, tensors = self.decompress_tensors(args)
        num_replicas = self._num_replicas(args)
        top_k = self._top_k_sampling_num_per_core
        every_n = self._host_call_every_n_steps
        cached = {}
        stopping_signals_sum = None
        with _HostCallSummaries(self._output_dir) as summaries:
            for name, t in zip(self._tensor_names[1:], tensors[1:]):
                if "_avg" in name or "_max" in name or "_sum" in name:
                    tf.summary.scalar(name, data=_reduced_scalar(name, t), step=gs)
                elif name in _TPU_VARIABLE_NAMES:
                    cached[name] = t
                elif _STOPPING_SIGNALS in name:
                    stopping_signals_sum = tf.reduce_sum(tf.cast(t, tf.int32))
                elif name not in _DEPRECATED_METRIC_NAMES:
                    tf.summary.scalar(name, data=_reduced_scalar(name, t), step=gs)

            for name, shape in (
                (_LABELS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
                (_PREDS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
                (_UID_BUCKETS_TPU_VARIABLE, [num_replicas, every_n * top_k]),
                (_REQ_TIMES_TPU_VARIABLE, [num_replicas, every_n]),
                (_SAMPLE_RATES_TPU_VARIABLE, [num_replicas, every_n]),
                (_ACCUMULATED_COUNTER_TPU_VARIABLE, [num_replicas]),
            ):
                _tensor_checks.check_shape(name, cached[name], shape)

            # Steps cached in this window (replica 0's count; all cores step together).
            used_steps = tf.minimum(cached[_ACCUMULATED_COUNTER_TPU_VARIABLE][0], every_n)
            used_slice_len = used_steps * top_k
            labels = _used_slice(cached[_LABELS_TPU_VARIABLE], used_slice_len)
            y_preds = _used_slice(cached[_PREDS_TPU_VARIABLE], used_slice_len)
            uid_buckets = _used_slice(cached[_UID_BUCKETS_TPU_VARIABLE], used_slice_len)
            req_times = _used_slice(cached[_REQ_TIMES_TPU_VARIABLE], used_steps)
            # For speed one sample rate (each core's first) stands for the whole window.
            sample_rates = tf.reshape(
                tf.slice(cached[_SAMPLE_RATES_TPU_VARIABLE], [0, 0], [-1, 1]), [-1]
            )

            tf.summary.scalar(
                "uid_buckets_tpu_variable_avg", data=tf.reduce_mean(uid_buckets), step=gs
            )
            tf.summary.scalar(
                "accumulated_times_tpu_variable_avg",
                data=tf.reduce_mean(cached[_ACCUMULATED_COUNTER_TPU_VARIABLE]),
                step=gs,
            )
            tf.summary.scalar("used_slice_len_avg", data=tf.reduce_min(used_slice_len), step=gs)
            if stopping_signals_sum is not None:
                tf.summary.scalar("stopping_signals_sum", data=stopping_signals_sum, step=gs)

            summaries.auc_op = self._write_summary_ops(
                gs, labels, y_preds, uid_buckets, req_times, sample_rates, stopping_signals_sum
            )
        return summaries.group()

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


class _HostCallSummaries:
    """Summary writer scope of one host-function call; groups the ops it adds.

    Creates the writer TPUEstimator's hooks initialize and flush, makes it
    the default while the summaries are built, and `group()`s the summary
    ops created inside (not the rest of the graph's) with the AUC update.
    """

    def __init__(self, output_dir: str):
        self._writer = tf.summary.create_file_writer(
            output_dir + "/host_call", flush_millis=10000, max_queue=5000
        )
        self._scope = None
        self._before: List[Any] = []
        self._created: List[Any] = []
        self.auc_op: Optional[tf.Tensor] = None

    def __enter__(self) -> _HostCallSummaries:
        self._before = list(tf.compat.v1.summary.all_v2_summary_ops() or [])
        self._scope = self._writer.as_default()
        self._scope.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._scope.__exit__(*exc_info)
        before = set(self._before)
        after = tf.compat.v1.summary.all_v2_summary_ops() or []
        self._created = [op for op in after if op not in before]

    def group(self) -> tf.Operation:
        ops = list(self._created)
        if self.auc_op is not None:
            ops.append(self.auc_op)
        return tf.group(ops)
