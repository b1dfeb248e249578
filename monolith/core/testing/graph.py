"""Wires the infeed, the train loop, the outfeed and the feed hook into one graph."""

from __future__ import annotations

from typing import Any, Callable, Union

import tensorflow as tf
from tensorflow.core.protobuf.tpu import compilation_result_pb2
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as _tpu_estimator

from monolith.core.testing.infeed import build_infeed
from monolith.core.testing.options import BuildOptions
from monolith.core.testing.results import EmulatedTPUTraining
from monolith.core.testing.step import build_train_loop


def _get_or_create_global_step() -> tf.Variable:
    global_step = tf.compat.v1.train.get_global_step()
    if global_step is None:
        global_step = _tpu_estimator._create_global_step(tf.compat.v1.get_default_graph())
    return global_step


def _default_compile_op() -> tf.Tensor:
    return tf.constant(compilation_result_pb2.CompilationResultProto().SerializeToString())


def build(
    model_fn: Callable[..., Any],
    input_fn: Union[Callable[..., tf.data.Dataset], tf.data.Dataset],
    options: BuildOptions,
) -> EmulatedTPUTraining:
    """Builds the emulated training graph in the default graph (see `build_emulated_training`)."""
    global_step = _get_or_create_global_step()
    iterations_per_loop_var = _tpu_estimator._create_or_get_iterations_per_loop()
    infeed = build_infeed(input_fn, options, iterations_per_loop_var)
    loop = build_train_loop(model_fn, infeed, options, global_step, iterations_per_loop_var)
    dequeue_ops = loop.outfeed.dequeue_ops()
    hook = options.hook_class(
        options.ctx,
        infeed.enqueue_ops,
        dequeue_ops,
        tpu_compile_op=(
            options.tpu_compile_op if options.tpu_compile_op is not None else _default_compile_op()
        ),
        run_infeed_loop_on_coordinator=options.run_infeed_loop_on_coordinator,
        rendezvous=options.rendezvous,
        master=options.master,
        session_config=options.session_config,
        tpu_init_ops=[*options.tpu_init_ops, infeed.iterator_initializer],
        outfeed_every_n_steps=options.outfeed_every_n_steps,
        **dict(options.hook_kwargs),
    )
    batch_size = options.train_batch_size
    if batch_size is None:
        batch_size = infeed.static_batch_size()
    topology = options.topology
    return EmulatedTPUTraining(
        hook=hook,
        train_op=loop.train_op,
        loss=loop.loss,
        loop_steps=loop.loop_steps,
        global_step=global_step,
        global_step_after_loop=loop.global_step_after_loop,
        iterations_per_loop_var=iterations_per_loop_var,
        enqueue_ops=infeed.enqueue_ops,
        dequeue_ops=dequeue_ops,
        rendezvous=options.rendezvous,
        training_hooks=tuple(getattr(loop.spec, "training_hooks", None) or ()),
        iterator_initializer=infeed.iterator_initializer,
        batch_size=batch_size,
        real_batches=loop.real_batches,
        padding_batches=loop.padding_batches,
        trained_batches=loop.trained_batches,
        next_is_real=infeed.next_is_real,
        num_hosts=topology.num_hosts,
        replicas_per_host=topology.replicas_per_host,
    )
