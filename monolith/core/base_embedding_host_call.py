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

- each scalar metric: names containing `_avg`, `_max`, `_sum` (anywhere, as
  in the original: `loss_summary` is summed) are reduced over replicas
  (mean, max, sum); any other name logs replica 0's value. How each name is
  matched, when recorded and in the host function, is in `host_call.names`;
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
number), each number once (see `host_call.steps`). With the padding flag
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

This module is the drop-in facade (names, signatures and defaults of the
original); the names and their matching rules live in `host_call.names`, the
cached window's pieces (TPU variables, roll-and-add updates, used part) in
`host_call.cached_window`, the summaries in `host_call.summaries`, and the
step numbers in `host_call.steps`. The original's overridable methods are
called where the original calls them, so a subclass that overrides one
changes the behaviour as it would with the original:
`_create_all_tpu_variables` -> `_create_tpu_var` (each cached variable);
`update_tpu_variables_ops` -> `_clear_value_at_index_1`, `_compute_new_value`;
`record_summary_tpu_variables` -> `record_summary_tensor`;
`generate_host_call_hook` -> `compress_tensors`, and its host functions ->
`decompress_tensors`, `_write_summary_ops` -> `_slice_tensor` (->
`_verify_shape_and_dtype`), `_serialize_tensor`.

Differences from the original Monolith module: the host call runs only when
both the constructor and `params["enable_host_call"]` enable it (a warning
says when they disagree); user errors raise ValueError/TypeError/RuntimeError
naming the argument (also `host_call_every_n_steps` and
`top_k_sampling_num_per_core` without caching: positive ints, when the host
call is enabled); scalar-metric-only recording works (no averages of
missing tensors); the `auc` summary is deterministic; exactly one selected
example stays a vector; one replica works on every path; the TPU variables are
resource variables created outside the TPU step (`tf.init_scope()`), recorded
even with scalar metrics disabled; the host functions return only the
summary ops written in their writer scope (and the AUC update), not every
summary op of the graph; a recorded per-example padding flag reaches
`_write_summary_ops` (whose signature is the original's) as
`self._received_padding_flag`, set only while a host function builds.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from monolith.core.base_host_call import BaseHostCall
from monolith.core.common.validation import positive_int
from monolith.core.host_call import cached_window as _cached_window
from monolith.core.host_call import names as _names
from monolith.core.host_call import summaries as _host_call_summaries
from monolith.core.host_call import tensor_checks as _tensor_checks
from monolith.core.host_call.cached_window import TPUVariableRestoreHook
from monolith.core.tpu_variable import ReplicatedVariable

__all__ = ["BaseEmbeddingHostCall", "TPUVariableRestoreHook"]

# The original's module constants (defined once, in host_call.names).
_LABLES_FOR_AUC_CALCULATION = _names.LABELS_FOR_AUC_CALCULATION
_Y_PRED_FOR_AUC_CALCULATION = _names.Y_PRED_FOR_AUC_CALCULATION
_REQ_TIME = _names.REQ_TIME
_SAMPLE_RATE = _names.SAMPLE_RATE
_UID = _names.UID
_UID_BUCKET = _names.UID_BUCKET

_DEEPINSIGHT_SAMPLE_RATES = _host_call_summaries.DEEPINSIGHT_SAMPLE_RATES
_DEEPINSIGHT_LABELS = _host_call_summaries.DEEPINSIGHT_LABELS
_DEEPINSIGHT_PREDS = _host_call_summaries.DEEPINSIGHT_PREDS
_DEEPINSIGHT_REQ_TIMES = _host_call_summaries.DEEPINSIGHT_REQ_TIMES

_RATIO_N = _host_call_summaries.RATIO_N
_UID_SAMPLE_RATE = _host_call_summaries.UID_SAMPLE_RATE

_HOST_CALL_AUC_METRICS = set(_names.AUC_INPUTS)

# TPU variables names
_LABELS_TPU_VARIABLE = _names.LABELS_TPU_VARIABLE
_PREDS_TPU_VARIABLE = _names.PREDS_TPU_VARIABLE
_UID_BUCKETS_TPU_VARIABLE = _names.UID_BUCKETS_TPU_VARIABLE
_REQ_TIMES_TPU_VARIABLE = _names.REQ_TIMES_TPU_VARIABLE
_SAMPLE_RATES_TPU_VARIABLE = _names.SAMPLE_RATES_TPU_VARIABLE
_ACCUMULATED_COUNTER_TPU_VARIABLE = _names.ACCUMULATED_COUNTER_TPU_VARIABLE

_DEPRECATED_METRIC_NAMES = [
    _LABLES_FOR_AUC_CALCULATION,
    _Y_PRED_FOR_AUC_CALCULATION,
    _UID_BUCKET,
    _REQ_TIME,
    _SAMPLE_RATE,
]

_TPU_VAR_COLLECTION = _cached_window.TPU_VAR_COLLECTION
_STOPPING_SIGNALS = _names.STOPPING_SIGNALS
_REQUIRED_PARAMS = ("enable_host_call", "cpu_test", "host_call_every_n_steps")


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
      TypeError: If `params` is not a mapping, or (host call enabled)
        `host_call_every_n_steps` or `top_k_sampling_num_per_core` is not an int.
      ValueError: If a params key is missing; if the host call is enabled
        and `top_k_sampling_num_per_core < 1`, or `host_call_every_n_steps`
        is below 1 (2 with caching); or caching has no context outside
        `cpu_test`.
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
        every_n = params["host_call_every_n_steps"]
        if enabled:
            # Caching metrics in TPU variables needs a window of more than one step.
            every_n = positive_int(
                "host_call_every_n_steps",
                every_n,
                minimum=2 if enable_caching_with_tpu_var_mode else 1,
            )
            top_k_sampling_num_per_core = positive_int(
                "top_k_sampling_num_per_core", top_k_sampling_num_per_core
            )
        super().__init__(output_dir, enabled)
        self._enable_deepinsight = enable_deepinsight
        self._enable_host_call_scalar_metrics = enable_host_call_scalar_metrics
        self._enable_caching_with_tpu_var_mode = enable_caching_with_tpu_var_mode
        self._top_k_sampling_num_per_core = top_k_sampling_num_per_core
        self._cpu_test = cpu_test
        self._context = None if cpu_test else params["context"]
        self._host_call_every_n_steps = every_n

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
        # Without caching: the padding flag the host function received, for
        # `_write_summary_ops` (whose signature is the original's); set only
        # while `_host_call` builds.
        self._received_padding_flag: Optional[tf.Tensor] = None

        self.tpu_var_restore_hooks: List[TPUVariableRestoreHook] = []
        self._create_all_tpu_variables()

    # ------------------------------------------------------------ cached window (TPU step)

    def _create_all_tpu_variables(self) -> None:
        """Creates the cached-metric variables through `_create_tpu_var` (caching mode only)."""
        if not self._enable_host_call:
            logging.info("enable_host_call is False, not creating TPU variables.")
            return
        if not self._enable_caching_with_tpu_var_mode:
            logging.info("enable_caching_with_tpu_var_mode is False, not creating TPU variables.")
            return
        if self._context is None and not self._cpu_test:
            raise ValueError(
                "caching metrics in TPU variables needs params['context'] (TPUEstimator's "
                "TPUContext) when params['cpu_test'] is False, got context=None"
            )
        every_n = self._host_call_every_n_steps
        logging.info("Creating TPU variables caching %d steps of metrics.", every_n)
        window = self._top_k_sampling_num_per_core * every_n
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

    def _window_variables(self) -> Dict[str, Any]:
        """Each cached window's name (`names.WINDOWS` order) -> its variable."""
        return {
            _LABELS_TPU_VARIABLE: self._labels_tpu_variable,
            _PREDS_TPU_VARIABLE: self._preds_tpu_variable,
            _UID_BUCKETS_TPU_VARIABLE: self._uid_buckets_tpu_variable,
            _REQ_TIMES_TPU_VARIABLE: self._req_times_tpu_variable,
            _SAMPLE_RATES_TPU_VARIABLE: self._sample_rates_tpu_variable,
            _ACCUMULATED_COUNTER_TPU_VARIABLE: self._accumulated_counter_tpu_variable,
        }

    def _slice_placements(self) -> List[Tuple[Any, List[Any]]]:
        """(host device, [device of each replica's slice]) for each host (see `cached_window`)."""
        return _cached_window.slice_placements(self._context)

    def _create_tpu_var(
        self, var_name: str, var_shape: Sequence[int], var_type: tf.DType
    ) -> ReplicatedVariable:
        """Creates a zeroed resource variable per host and replica, wrapped as one.

        Its zeroing hook is appended to `tpu_var_restore_hooks` (see
        `cached_window.create_replicated_variable`).
        """
        variable, hook = _cached_window.create_replicated_variable(
            var_name, var_shape, var_type, self._slice_placements()
        )
        self.tpu_var_restore_hooks.append(hook)
        return variable

    def _compute_new_value(self, base_tpu_var: Any, delta_value: Any, update_offset: Any) -> Any:
        """`base_tpu_var` plus `delta_value` written at `update_offset` (wrapping around).

        See `cached_window.compute_new_value`.
        """
        return _cached_window.compute_new_value(base_tpu_var, delta_value, update_offset)

    def _clear_value_at_index_1(self, tpu_var: Any, var_type: tf.DType, index: Any) -> tf.Tensor:
        """The variable's value, or zeros at the first step of a window (index 1)."""
        return _cached_window.clear_value_at_index_1(tpu_var, var_type, index)

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
        cleared first (`_clear_value_at_index_1`); the step's values are
        added at `counter * top_k` (`counter` for request times and sample
        rates) by `_compute_new_value`, and the counter is incremented only
        after those writes.

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
        checked = _cached_window.check_step_values(
            self._top_k_sampling_num_per_core,
            self._host_call_every_n_steps,
            labels=labels,
            preds=preds,
            uid_buckets=uid_buckets,
            req_times=req_times,
            sample_rates=sample_rates,
        )
        if self._padding_flag_for_cache is not None:
            checked["uid_buckets"] = self._unsampled_if_padding(checked["uid_buckets"])
        updates = _cached_window.update_ops(
            global_step,
            self._window_variables(),
            checked,
            top_k=self._top_k_sampling_num_per_core,
            every_n=self._host_call_every_n_steps,
            clear_value_at_index_1=self._clear_value_at_index_1,
            compute_new_value=self._compute_new_value,
        )
        self._window_updates_built = True
        return updates

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
        """Records the cached windows (caching mode) through `record_summary_tensor`."""
        if not self._enable_host_call:
            logging.info("enable_host_call is False, not recording TPU variables.")
            return
        if not self._enable_caching_with_tpu_var_mode:
            logging.info("enable_caching_with_tpu_var_mode is False, not recording TPU variables.")
            return
        logging.info("Recording TPU variables.")
        for name, variable in self._window_variables().items():
            self.record_summary_tensor(name, variable.read_value())

    # ------------------------------------------------------------ recording (TPU step)

    def record_summary_tensor(self, name: str, tensor: Any) -> None:
        """Records a metric, unless switched off.

        Dropped silently (`names.is_recorded`): metrics other than the AUC
        inputs and the padding flag when `enable_host_call_scalar_metrics`
        is False, and the per-step AUC inputs (`_DEPRECATED_METRIC_NAMES`)
        in caching mode, where the cached windows replace them. The cached
        windows themselves are always kept.

        The padding flag, `record_summary_tensor("stopping_signals", flag)`
        (bool or int, `[batch]` or the `[k]` examples recorded for the AUC,
        True / non-zero = padding, e.g. the feature
        `stopping_signals.USER_PROVIDED_SIGNAL_NAME`), keeps padding examples
        out of the AUC, the DeepInsight payloads and the sampled averages.
        In caching mode record it before `update_tpu_variables_ops`, which
        then caches each padding example with an unsampled uid bucket.
        """
        caching = self._enable_caching_with_tpu_var_mode
        if not _names.is_recorded(
            name, scalar_metrics=self._enable_host_call_scalar_metrics, caching=caching
        ):
            return
        super().record_summary_tensor(name, tensor)
        if not (self._enable_host_call and caching):
            return
        if _names.route(name, caching=True).kind is not _names.Kind.PADDING_FLAG:
            return
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

    # ------------------------------------------------------------ summaries (host)

    def _verify_shape_and_dtype(self, tensor: Any, shape_list: Sequence[Any], dtype: tf.DType):
        """Raises ValueError/TypeError unless `tensor` has shape `shape_list` and `dtype`."""
        _tensor_checks.check_not_none("tensor", tensor)
        _tensor_checks.check_shape(f"tensor {getattr(tensor, 'name', '')}", tensor, shape_list)
        _tensor_checks.check_dtype(f"tensor {getattr(tensor, 'name', '')}", tensor, dtype)

    def _slice_tensor(
        self, tensor: Any, indices: Any, expect_shape: Sequence[Any], expect_dtype: tf.DType
    ) -> tf.Tensor:
        """The elements of the flattened `tensor` at `indices`, once `_verify_shape_and_dtype`.

        Args:
          tensor: The tensor whose elements are selected.
          indices: The flat indices to select.
          expect_shape: The expected shape of `tensor`.
          expect_dtype: The expected dtype of `tensor`.
        """
        self._verify_shape_and_dtype(tensor, expect_shape, expect_dtype)
        # Flattening is a reshape: no copy of the data.
        return tf.gather(tf.reshape(tensor, [-1]), indices)

    def _serialize_tensor(self, sampled_tensor: tf.Tensor, gs: tf.Tensor, message_name: str):
        """Writes `sampled_tensor` as a `tf.io.serialize_tensor` text summary (a payload)."""
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
        gs: tf.Tensor,
        labels: Optional[tf.Tensor],
        y_preds: Optional[tf.Tensor],
        uid_buckets: Optional[tf.Tensor],
        req_times: Optional[tf.Tensor],
        sample_rates: Optional[tf.Tensor],
        stopping_signals_sum: Optional[tf.Tensor] = None,
    ) -> Optional[tf.Tensor]:
        """Writes AUC, DeepInsight and average summaries at `gs`; returns the AUC update op.

        Called by the host functions inside their summary writer scope.
        Selections go through `_slice_tensor`, payloads through
        `_serialize_tensor`; padding examples are left out when the host
        function received a padding flag (`self._received_padding_flag`).
        See `summaries.write_example_summaries`.
        """
        return _host_call_summaries.write_example_summaries(
            gs,
            _host_call_summaries.ExampleTensors(
                labels, y_preds, uid_buckets, req_times, sample_rates
            ),
            slice_tensor=self._slice_tensor,
            serialize_tensor=self._serialize_tensor,
            enable_deepinsight=self._enable_deepinsight,
            top_k=self._top_k_sampling_num_per_core,
            stopping_signals_sum=stopping_signals_sum,
            padding_flag=self._received_padding_flag,
        )

    def _route(
        self, summaries: _host_call_summaries.HostCallSummaries, tensors: Sequence[tf.Tensor]
    ) -> Dict[str, tf.Tensor]:
        """Logs the scalar metrics; returns the other recorded tensors by role.

        One rule for both host functions (`names.route`): scalar metrics are
        logged (reduced over replicas by suffix, or replica 0's value); the
        cached windows (caching mode), the padding flag and (without
        caching) the AUC inputs are returned under their role.
        """
        caching = self._enable_caching_with_tpu_var_mode
        routed: Dict[str, tf.Tensor] = {}
        for name, tensor in zip(self._tensor_names[1:], tensors[1:]):
            route = _names.route(name, caching=caching)
            if route.kind in (_names.Kind.REDUCED, _names.Kind.REPLICA_0):
                summaries.scalar(name, _host_call_summaries.scalar_metric(name, route.role, tensor))
            else:
                routed[route.role] = tensor
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
            self._received_padding_flag = routed.get(_STOPPING_SIGNALS)
            try:
                auc_op = self._write_summary_ops(
                    summaries.step,
                    routed.get(_LABLES_FOR_AUC_CALCULATION),
                    routed.get(_Y_PRED_FOR_AUC_CALCULATION),
                    routed.get(_UID_BUCKET),
                    None if req_times is None else tf.expand_dims(req_times, -1),
                    routed.get(_SAMPLE_RATE),
                )
            finally:
                self._received_padding_flag = None
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
        with _host_call_summaries.HostCallSummaries(self._output_dir, gs) as summaries:
            routed = self._route(summaries, tensors)
            stopping_signals_sum = None
            if _STOPPING_SIGNALS in routed:
                stopping_signals_sum = tf.reduce_sum(tf.cast(routed[_STOPPING_SIGNALS], tf.int32))
            used = _cached_window.used_part(
                routed,
                top_k=self._top_k_sampling_num_per_core,
                every_n=self._host_call_every_n_steps,
                num_replicas=self._num_replicas(args),
            )
            summaries.scalar("uid_buckets_tpu_variable_avg", tf.reduce_mean(used["uid_buckets"]))
            summaries.scalar("accumulated_times_tpu_variable_avg", tf.reduce_mean(used["counter"]))
            summaries.scalar("used_slice_len_avg", tf.reduce_min(used["used_slice_len"]))
            if stopping_signals_sum is not None:
                summaries.scalar("stopping_signals_sum", stopping_signals_sum)

            auc_op = self._write_summary_ops(
                summaries.step,
                used["labels"],
                used["y_preds"],
                used["uid_buckets"],
                used["req_times"],
                used["sample_rates"],
                None if self._padding_masked_in_cache else stopping_signals_sum,
            )
        return summaries.group(auc_op)

    def generate_host_call_hook(self) -> Optional[Tuple[Callable[..., Any], List[tf.Tensor]]]:
        """TPUEstimator's `host_call`: `(host function, packed tensors)`, or None if disabled.

        Call once all tensors are recorded: it packs them (`compress_tensors`).

        Raises:
          RuntimeError: In caching mode, if `record_summary_tpu_variables` was
            not called.
        """
        if not self._enable_host_call:
            logging.info("host_call has been disabled")
            return None
        if self._enable_caching_with_tpu_var_mode:
            recorded = {_names.route(n, caching=True).role for n in self._tensor_names}
            missing = [n for n in _names.WINDOWS if n not in recorded]
            if missing:
                raise RuntimeError(
                    "caching mode: call record_summary_tpu_variables() before "
                    f"generate_host_call_hook(); not recorded: {missing}"
                )
        if self._compressed_tensors is None:
            self.compress_tensors()
        if self._enable_caching_with_tpu_var_mode:
            return (self._host_call_with_tpu, self._compressed_tensors)
        return (self._host_call, self._compressed_tensors)
