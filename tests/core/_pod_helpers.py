"""Shared pieces of the emulated-pod tests: an id stream deployed as TPUEstimator deploys it.

The stream's step s is the global batch of ids `s * B + 1 ... (s + 1) * B`.
Each input_fn call reads its share of every global batch, derived from
`params["context"]` and the input mode in `config` exactly as a user's
input_fn would on a TPU, so that replica r of step s holds ids
`s * B + r * b + 1 ...` (b = B / replicas) under PER_HOST_V2 and PER_HOST_V1,
and the whole global batch under BROADCAST.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_estimator.python.estimator.tpu import tpu_config

from tests.core._feed_hook_helpers import SIGNAL

V2 = tpu_config.InputPipelineConfig.PER_HOST_V2
V1 = tpu_config.InputPipelineConfig.PER_HOST_V1
BROADCAST = tpu_config.InputPipelineConfig.BROADCAST


def host_share(params, config) -> tuple:
    """`(host, elements per step, rows per step)` of this input_fn call (TPUEstimator's rules)."""
    _, host, num_calls, replicas_fed = params["context"].current_input_fn_deployment()
    per_step = replicas_fed if config.tpu_config.per_host_input_for_training is V2 else 1
    rows = params["batch_size"] * per_step
    return host, num_calls, per_step, rows


def host_ids(params, config, num_steps: int) -> np.ndarray:
    """The ids this call's pipeline yields for `num_steps` steps, in order (1-based)."""
    host, num_calls, _, rows = host_share(params, config)
    global_rows = rows * num_calls
    return np.concatenate(
        [
            np.arange(s * global_rows + host * rows, s * global_rows + (host + 1) * rows) + 1
            for s in range(num_steps)
        ]
    ).astype(np.float32)


def id_stream_fn(steps_per_host: Sequence[int] | int, *, seen: Optional[list] = None):
    """input_fn: each host's share of `steps_per_host[host]` real global batches, then padding.

    `steps_per_host` may be one count for every host. `seen` collects, per
    call, the deployment, current host and batch size it was given.
    """

    def input_fn(params, config):
        context = params["context"]
        if seen is not None:
            seen.append(
                {
                    "deployment": context.current_input_fn_deployment()[1:],
                    "current_host": context.current_host,
                    "num_replicas": context.num_replicas,
                    "batch_size": params["batch_size"],
                }
            )
        host = context.current_host
        steps = steps_per_host if isinstance(steps_per_host, int) else steps_per_host[host]
        batch = params["batch_size"]
        real = tf.data.Dataset.from_tensor_slices(host_ids(params, config, steps)).batch(
            batch, drop_remainder=True
        )
        real = real.map(lambda ids: {"id": ids, SIGNAL: tf.zeros([batch], tf.bool)})
        pad = tf.data.Dataset.from_tensors(
            {"id": tf.zeros([batch], tf.float32), SIGNAL: tf.ones([batch], tf.bool)}
        ).repeat()
        return real.concatenate(pad)

    return input_fn
