"""The dry run of unchanged TPU programs (`python -m monolith.core.simulated_tpu`).

In-process tests (both TF behaviours): the simulated TPUClusterResolver and
the device boundary (each for the thread that entered it; the dry run's for
every thread), the report of a small program, the outcomes and exit codes,
`--help`, and the feed hook passing the TPU embedding configuration to
`initialize_system`. Subprocess tests (TF2 pass only) run the CLI as a user
would on the example, the TPU-embedding example, a program configured like
the original runner, README's snippet and a batch size the replicas cannot
share; they share one module-scoped batch of runs.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorflow.core.protobuf.tpu import tpu_embedding_configuration_pb2
from tensorflow_estimator.python.estimator.tpu import tpu_config

from monolith.core import simulated_tpu
from monolith.core.auto_checkpoint_feed_hook import (
    TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
)
from monolith.core.feed import signal
from monolith.core.simulated_tpu import device_boundary, dry_run
from monolith.core.stopping_signals import USER_PROVIDED_SIGNAL_NAME, StopRule
from monolith.examples import tpu_embedding_ctr
from tests.core._simulated_tpu_helpers import on_other_thread, patched_tensorflow_attributes

pytestmark = pytest.mark.timeout(300)

PROGRAMS = os.path.join(os.path.dirname(__file__), "dry_run_programs")
TINY = os.path.join(PROGRAMS, "tiny_tpu_program.py")
NO_TPU = os.path.join(PROGRAMS, "never_touches_tpu.py")
RUNNER = os.path.join(PROGRAMS, "original_runner.py")
FEED_HOOK = (
    "monolith.core.auto_checkpoint_feed_hook.TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook"
)
NO_STEPS_ERROR = "ValueError: For TPU training, one of `steps` or `max_steps` must be set."


def _report(lines):
    """The report's `name: value` lines as a dict, and its last line."""
    fields = {}
    for line in lines:
        if line.startswith("  ") and ":" in line:
            name, value = line.strip().split(":", 1)
            fields[name] = value.strip()
    return fields


# ------------------------------------------------------------- in process


def test_resolver_resolves_any_tpu_name_to_the_simulated_hosts_without_gcp():
    with simulated_tpu.simulated_cluster_resolver(num_hosts=2, cores_per_host=4):
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="no-such-tpu", zone="nowhere-1a", project="no-project"
        )
        config = tpu_config.RunConfig(cluster=resolver, model_dir="/tmp/unused")
        assert resolver.master() == simulated_tpu.SIMULATED_MASTER
        assert resolver.cluster_spec().num_tasks("worker") == 2
        assert resolver.cluster_spec().job_tasks("worker") == ["127.0.0.1:8470", "127.0.0.2:8470"]
        assert resolver.num_accelerators() == {"TPU": 4}
        assert config.master == simulated_tpu.SIMULATED_MASTER
        assert [job.name for job in config.session_config.cluster_def.job] == ["worker"]
    assert patched_tensorflow_attributes() == []


def test_resolver_is_removed_on_error():
    with pytest.raises(KeyError, match="boom"), simulated_tpu.simulated_cluster_resolver(1, 2):
        raise KeyError("boom")

    assert patched_tensorflow_attributes() == []


def _resolve(tpu):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    return resolver.master(), resolver.cluster_spec().job_tasks("worker")


def test_resolver_resolves_only_on_the_thread_that_entered_it():
    # A grpc:// address is resolved by TensorFlow's own client without the
    # Cloud API (nothing connects), so both answers are observable offline.
    direct = "grpc://10.1.2.3:8470"
    with simulated_tpu.simulated_cluster_resolver(num_hosts=2, cores_per_host=4):
        here = _resolve(direct)
        elsewhere = on_other_thread(lambda: _resolve(direct))
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="my-tpu")
        # A simulated resolver answers the same on any thread it is handed to.
        assert on_other_thread(resolver.num_accelerators) == {"TPU": 4}

    assert here == (simulated_tpu.SIMULATED_MASTER, ["127.0.0.1:8470", "127.0.0.2:8470"])
    assert elsewhere == (direct, ["10.1.2.3:8470"])
    assert patched_tensorflow_attributes() == []


@pytest.mark.parametrize("kwargs", [{"num_hosts": 0}, {"cores_per_host": 1.5}])
def test_resolver_rejects_bad_counts_naming_the_argument(kwargs):
    name = next(iter(kwargs))
    with pytest.raises((TypeError, ValueError), match=name):
        simulated_tpu.simulated_cluster_resolver(**kwargs)


def test_boundary_stops_a_remote_session_and_lets_local_sessions_run():
    graph = tf.Graph()
    with graph.as_default():
        two = tf.constant(2)
    with device_boundary.stop_at_device_boundary():
        with tf.compat.v1.Session(graph=graph) as local:
            assert local.run(two) == 2
        with pytest.raises(device_boundary.DeviceBoundaryReached) as reached:
            tf.compat.v1.Session("grpc://127.0.0.1:8470", graph=graph)
    assert reached.value.graph is graph
    assert "grpc://127.0.0.1:8470" in reached.value.where
    assert not isinstance(reached.value, Exception)  # a program's `except Exception` passes it on


def test_boundary_is_removed_on_exit_also_when_reached():
    graph = tf.Graph()
    with (
        pytest.raises(device_boundary.DeviceBoundaryReached),
        device_boundary.stop_at_device_boundary(),
    ):
        tf.compat.v1.Session("grpc://127.0.0.1:8470", graph=graph)

    assert patched_tensorflow_attributes() == []
    # Created lazily: nothing connects, but the boundary no longer stops it.
    tf.compat.v1.Session("grpc://127.0.0.1:8470", graph=graph).close()


def test_boundary_leaves_sessions_of_other_threads_alone():
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.tpu.initialize_system()

    def open_and_close(target):
        tf.compat.v1.Session(target, graph=graph).close()
        return "opened"

    with device_boundary.stop_at_device_boundary():
        # A remote session (created lazily, nothing connects) and a local one
        # on a graph with TPU ops: both would stop this thread.
        assert on_other_thread(lambda: open_and_close("grpc://127.0.0.1:8470")) == "opened"
        assert on_other_thread(lambda: open_and_close("")) == "opened"
        with pytest.raises(device_boundary.DeviceBoundaryReached):
            open_and_close("grpc://127.0.0.1:8470")


def test_boundary_for_all_threads_stops_sessions_of_every_thread():
    """The dry run's boundary: the program may train on a thread of its own."""
    graph = tf.Graph()
    with (
        device_boundary.stop_at_device_boundary(all_threads=True) as boundary,
        pytest.raises(device_boundary.DeviceBoundaryReached) as reached,
    ):
        on_other_thread(lambda: tf.compat.v1.Session("grpc://127.0.0.1:8470", graph=graph))

    assert reached.value.boundary is boundary
    assert patched_tensorflow_attributes() == []


def test_boundary_stops_a_local_session_on_a_graph_with_tpu_ops():
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.tpu.initialize_system()  # what a directly attached TPU (master "") runs first
    with (
        device_boundary.stop_at_device_boundary(),
        pytest.raises(device_boundary.DeviceBoundaryReached) as reached,
    ):
        tf.compat.v1.Session(graph=graph)
    assert reached.value.graph is graph
    assert "local session" in reached.value.where


def test_dry_run_reports_a_tpu_program_at_the_boundary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    code = dry_run.main(
        ["--num_hosts", "2", "--cores_per_host", "4", TINY, "--model_dir", str(tmp_path)]
    )

    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert lines[-1].startswith(dry_run.BOUNDARY_LINE)
    assert "grpc://127.0.0.1:8470" in lines[-1]
    fields = _report(lines)
    assert fields["TPU system"] == "2 host(s) x 4 core(s), 8 replica(s)"
    assert fields["feed hook"] == FEED_HOOK
    for op in ("InfeedDequeueTuple", "OutfeedEnqueueTuple", "CrossReplicaSum"):
        assert op in fields["train step ops"]
    assert fields["host call"] == "no"
    assert fields["TPU embedding"] == "no"
    assert "MISSING" not in fields
    assert sys.argv == ["pytest"]  # restored
    assert tf.train.latest_checkpoint(str(tmp_path)) is None  # no session ran


def test_a_program_raising_before_the_boundary_shows_its_own_traceback(tmp_path, capsys):
    code = dry_run.main([TINY, "--model_dir", str(tmp_path), "--omit_steps"])

    err = capsys.readouterr().err
    assert code == 1
    assert NO_STEPS_ERROR in err
    first_frame = err.split("Traceback (most recent call last):\n", 1)[1].splitlines()[0]
    assert TINY in first_frame  # starts at the program, not in the dry run or runpy
    assert err.strip().splitlines()[-1].endswith("raised ValueError before the device boundary.")


def test_a_program_that_never_reaches_a_tpu_session_fails_with_a_message(capsys):
    code = dry_run.main([NO_TPU])

    out, err = capsys.readouterr()
    assert code == dry_run.EXIT_NO_TPU_SESSION
    assert "local sum: 45" in out  # local sessions ran
    assert "never reached the TPU device boundary" in err


_THREADED_PROGRAM = """\
import threading
import tensorflow as tf
from tensorflow.python.tpu import tpu_system_metadata

def on_its_own_thread():
    metadata = tpu_system_metadata._query_tpu_system_metadata("grpc://127.0.0.1:8470")
    print("thread sees", metadata.num_cores, "TPU cores")
    try:
        tf.compat.v1.Session("grpc://127.0.0.1:8470", graph=tf.Graph())
    except BaseException as stopped:
        print("thread stopped by", type(stopped).__name__)

thread = threading.Thread(target=on_its_own_thread)
thread.start()
thread.join()
"""


def test_the_dry_run_acts_for_every_thread_of_the_program(tmp_path, capsys):
    script = tmp_path / "threaded.py"
    script.write_text(_THREADED_PROGRAM)

    dry_run.main(["--num_hosts", "2", "--cores_per_host", "4", str(script)])

    out = capsys.readouterr().out
    assert "thread sees 8 TPU cores" in out
    assert "thread stopped by DeviceBoundaryReached" in out
    assert patched_tensorflow_attributes() == []


def test_a_program_exit_code_is_kept(tmp_path, capsys):
    script = tmp_path / "exits.py"
    script.write_text("import sys\nsys.exit(7)\n")

    assert dry_run.main([str(script)]) == 7
    assert "exited with 7 before the device boundary" in capsys.readouterr().err


def test_help_documents_usage_boundary_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exited:
        dry_run.main(["--help"])

    text = capsys.readouterr().out
    assert exited.value.code == 0
    for expected in (
        "--num_hosts",
        "--cores_per_host",
        "(-m MODULE | SCRIPT) [ARGS...]",
        "TPUClusterResolver",
        "device boundary",
        "traceback",
        "3: the program ended without ever creating a session",
    ):
        assert expected in text


_PRINT_ARGV = "import sys\nprint('program argv:', sys.argv[1:])\n"


def test_everything_after_a_script_belongs_to_the_program(tmp_path, capsys):
    script = tmp_path / "print_argv.py"
    script.write_text(_PRINT_ARGV)

    code = dry_run.main(["--num_hosts", "2", "--cores_per_host=4", str(script), "-m", "x"])

    out, err = capsys.readouterr()
    assert code == dry_run.EXIT_NO_TPU_SESSION  # it prints and ends
    assert "program argv: ['-m', 'x']" in out
    assert "(2 host(s) x 4 core(s) simulated)" in err  # the options before it were the dry run's


def test_everything_after_a_module_belongs_to_the_program(tmp_path, capsys, monkeypatch):
    (tmp_path / "print_argv_module.py").write_text(_PRINT_ARGV)
    monkeypatch.syspath_prepend(str(tmp_path))

    code = dry_run.main(["-m", "print_argv_module", "--num_hosts", "9"])

    out, err = capsys.readouterr()
    assert code == dry_run.EXIT_NO_TPU_SESSION
    assert "program argv: ['--num_hosts', '9']" in out
    assert "(1 host(s) x 8 core(s) simulated)" in err  # the defaults: 9 was the program's


@pytest.mark.parametrize("argv", [[], ["--num_hosts", "0", TINY], ["no_such_script.py"]])
def test_bad_dry_run_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        dry_run.main(argv)
    assert exited.value.code == 2


@pytest.fixture(scope="module")
def embedding_graph(tmp_path_factory):
    """The TPU-embedding example's graph on 1 host x 2 cores, up to the feed hook's begin()."""
    config = tpu_config.RunConfig(
        master=simulated_tpu.SIMULATED_MASTER,
        model_dir=str(tmp_path_factory.mktemp("embedding")),
        tpu_config=tpu_config.TPUConfig(
            iterations_per_loop=2,
            tpu_job_name="worker",
            per_host_input_for_training=tpu_config.InputPipelineConfig.PER_HOST_V2,
            experimental_feed_hook=TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook,
        ),
    )
    with simulated_tpu.simulated_tpu_system(1, 2):
        return simulated_tpu.build_tpu_training_graph(
            tpu_embedding_ctr.model_fn,
            tpu_embedding_ctr.input_fn,
            config=config,
            train_batch_size=8,
            params={"num_examples": 64},
            embedding_config_spec=tpu_embedding_ctr.embedding_config_spec(),
        )


class _InitializeSystemCalled(Exception):
    pass


def test_feed_hook_passes_the_tpu_embedding_config_to_initialize_system(
    embedding_graph, monkeypatch
):
    seen = []

    def initialize_system(job=None, embedding_config=None):
        seen.append((job, embedding_config))
        raise _InitializeSystemCalled()  # nothing after the TPU initialisation may run

    monkeypatch.setattr(tf.compat.v1.tpu, "initialize_system", initialize_system)
    built = embedding_graph
    kwargs = dict(built.hook_kwargs, master="")  # a local session for the initialisation
    with built.graph.as_default():
        hook = TPUInfeedOutfeedSessionWithEndOfStreamHandlingHook(*built.hook_args, **kwargs)
        with tf.compat.v1.Session() as session, pytest.raises(_InitializeSystemCalled):
            hook.after_create_session(session, tf.train.Coordinator())

    ((job, embedding_config),) = seen
    expected = built.ctx.embedding_config.tpu_embedding.config_proto
    assert job == "worker"
    assert embedding_config == expected
    assert isinstance(embedding_config, tpu_embedding_configuration_pb2.TPUEmbeddingConfiguration)
    (table,) = embedding_config.table_descriptor
    assert table.vocabulary_size == tpu_embedding_ctr.NUM_ITEMS
    assert table.dimension == tpu_embedding_ctr.EMBEDDING_DIM
    assert table.optimization_parameters.HasField("adagrad")


def test_embedding_example_builds_the_embedding_step(embedding_graph):
    types = embedding_graph.op_types()
    assert {"RecvTPUEmbeddingActivations", "SendTPUEmbeddingGradients"} <= types
    assert any(t.startswith("EnqueueTPUEmbedding") for t in types)


def test_embedding_example_trains_under_the_all_replicas_rule(embedding_graph):
    """Every partly real step is counted: the table and dense updates see each batch once."""
    assert embedding_graph.feed_hook.stop_rule is StopRule.ALL_REPLICAS_PADDING
    readers = signal.stop_rule_readers(embedding_graph.graph)
    assert set(readers.values()) == {StopRule.ALL_REPLICAS_PADDING}
    assert "skip_padding_steps" in readers


def test_embedding_example_padding_batch_is_an_empty_sparse_batch_of_full_size():
    batch = 8
    # A graph of its own: the input_fn records its stop rule in the graph it builds in.
    with tf.Graph().as_default():
        dataset = tpu_embedding_ctr.input_fn({"batch_size": batch, "num_examples": 2 * batch})
        ids_name = tpu_embedding_ctr.ITEM_IDS
        parts = dataset.take(3).map(
            lambda features, labels: (
                features[USER_PROVIDED_SIGNAL_NAME],
                features[ids_name].indices,
                features[ids_name].values,
                features[ids_name].dense_shape,
                labels,
            )
        )
        with tf.compat.v1.Session() as session:
            get_next = tf.compat.v1.data.make_one_shot_iterator(parts).get_next()
            elements = [session.run(get_next) for _ in range(3)]

    real, last_real, padding = elements
    assert not real[0].any() and not last_real[0].any() and len(real[2]) >= batch
    signal, indices, values, dense_shape, labels = padding
    assert signal.shape == (batch,) and signal.all()
    assert indices.shape == (0, 2) and values.shape == (0,)  # no ids for any example
    assert values.dtype == real[2].dtype == "int64"
    assert dense_shape[0] == batch and labels.shape == (batch, 1)


# ------------------------------------------------------------- the CLI in subprocesses

# Issue 11 asks for both examples, unchanged, on both topologies through the CLI:
# the user's own command, not a rewritten call.
_EXAMPLE = ["-m", "monolith.examples.train_ctr", "--tpu", "my-tpu"]
_EMBEDDING = ["-m", "monolith.examples.tpu_embedding_ctr", "--tpu", "my-tpu"]
_CLI_RUNS = {
    "example_1x8": (1, 8, _EXAMPLE),
    "example_2x4": (2, 4, _EXAMPLE),
    "embedding_1x8": (1, 8, _EMBEDDING),
    "embedding_2x4": (2, 4, _EMBEDDING),
    "runner_1_host": (1, 4, [RUNNER]),
    "runner_2_hosts": (2, 4, [RUNNER]),
    "batch_12_on_8": (1, 8, [TINY, "--batch_size", "12"]),
    "readme_snippet": (1, 8, ["README_SNIPPET"]),
}

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
_SNIPPET_SECTION = "## Using it with TPUEstimator"
_SNIPPET_PLACEHOLDER = "    ...  # preds, loss\n"
# What README leaves to the reader: a finite dataset, the model's preds and
# loss, a model_dir and a resolver (any TPU name resolves in the dry run).
_SNIPPET_PRELUDE = """\
import tensorflow as tf

model_dir = sys.argv[sys.argv.index("--model_dir") + 1]
resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="my-tpu")


def make_finite_dataset():
    x = tf.random.stateless_uniform([4096, 8], seed=[1, 2])
    features = {"x": x, "uid_bucket": tf.zeros([4096], tf.int32)}
    labels = tf.cast(x[:, 0] > 0.5, tf.float32)
    return tf.data.Dataset.from_tensor_slices((features, labels))
"""
_SNIPPET_MODEL = """\
    logits = tf.compat.v1.layers.dense(features["x"], 1)[:, 0]
    preds = tf.sigmoid(logits)
    loss = tf.compat.v1.losses.sigmoid_cross_entropy(labels, logits)
"""


def _readme_snippet_program(tmp_dir):
    """README's TPUEstimator snippet as written, with only its placeholders filled in."""
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index(_SNIPPET_SECTION) :]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start : section.index("```\n", start)]
    assert snippet.count(_SNIPPET_PLACEHOLDER) == 1, "README's model_fn placeholder moved"
    snippet = snippet.replace(_SNIPPET_PLACEHOLDER, _SNIPPET_MODEL)
    imports_end = snippet.index("\n\n\ndef ")
    program = snippet[:imports_end] + "\n\n" + _SNIPPET_PRELUDE + snippet[imports_end:]
    path = os.path.join(tmp_dir, "readme_snippet.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(program)
    return path


def _run_cli(name, tmp_dir):
    num_hosts, cores, program = _CLI_RUNS[name]
    if program == ["README_SNIPPET"]:
        program = [_readme_snippet_program(tmp_dir)]
    model_dir = os.path.join(tmp_dir, name)
    argv = [sys.executable, "-m", "monolith.core.simulated_tpu"]
    argv += ["--num_hosts", str(num_hosts), "--cores_per_host", str(cores), *program]
    argv += ["--model_dir", model_dir]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, pytestconfig):
    """name -> CompletedProcess of every CLI run above (run once, two at a time)."""
    if pytestconfig.getoption("--tf-behavior") != "v2":
        pytest.skip(
            "the dry-run CLI runs programs in a new process in TensorFlow's default "
            "behaviour, whatever this pytest run's behaviour: covered by the TF2 pass"
        )
    tmp_dir = str(tmp_path_factory.mktemp("cli"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_cli, name, tmp_dir) for name in _CLI_RUNS}
        return {name: future.result() for name, future in futures.items()}


def _reached(run):
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stderr[-3000:]
    assert lines[-1].startswith(dry_run.BOUNDARY_LINE)
    return _report(lines)


_TOPOLOGIES = pytest.mark.parametrize(
    "topology, hosts, cores", [("1x8", 1, 8), ("2x4", 2, 4)], ids=["1x8", "2x4"]
)


@_TOPOLOGIES
def test_cli_example_tpu_path_reaches_the_boundary(cli, topology, hosts, cores):
    fields = _reached(cli[f"example_{topology}"])
    assert fields["TPU system"] == f"{hosts} host(s) x {cores} core(s), 8 replica(s)"
    assert fields["feed hook"] == FEED_HOOK
    for op in ("InfeedDequeueTuple", "OutfeedEnqueueTuple", "CrossReplicaSum"):
        assert op in fields["train step ops"]
    assert fields["host call"] == "yes"
    assert fields["TPU embedding"] == "no"
    assert fields["stop rule"] == "ANY_REPLICA_PADDING"  # the example's default


@_TOPOLOGIES
def test_cli_tpu_embedding_example_reaches_the_boundary(cli, topology, hosts, cores):
    fields = _reached(cli[f"embedding_{topology}"])
    assert fields["TPU system"] == f"{hosts} host(s) x {cores} core(s), 8 replica(s)"
    assert fields["feed hook"] == FEED_HOOK
    assert fields["TPU embedding"] == "yes (1 table(s), 1 feature(s))"
    assert fields["stop rule"] == "ALL_REPLICAS_PADDING"  # every partly real step counted
    assert "RecvTPUEmbeddingActivations" in fields["train step ops"]
    assert "SendTPUEmbeddingGradients" in fields["train step ops"]


@pytest.mark.parametrize("name, hosts", [("runner_1_host", 1), ("runner_2_hosts", 2)])
def test_cli_original_runner_configuration_reaches_the_boundary(cli, name, hosts):
    run = cli[name]
    fields = _reached(run)
    # The runner counted the hosts from the resolver and sized its batch with them.
    assert f"runner: {hosts} worker task(s), global batch {4 * 4 * hosts}" in run.stdout
    assert fields["TPU system"] == f"{hosts} host(s) x 4 core(s), {4 * hosts} replica(s)"
    assert fields["host call"] == "yes"
    assert fields["TPU embedding"] == "yes (2 table(s), 2 feature(s))"


def test_cli_batch_size_not_divisible_by_replicas_fails_with_tpuestimators_error(cli):
    run = cli["batch_12_on_8"]
    assert run.returncode == 1
    assert "ValueError: train batch size 12 must be divisible by number of replicas 8" in run.stderr


def test_cli_readme_tpuestimator_snippet_reaches_the_boundary(cli):
    """README's "Using it with TPUEstimator" code, unchanged but for its placeholders."""
    fields = _reached(cli["readme_snippet"])
    assert fields["TPU system"] == "1 host(s) x 8 core(s), 8 replica(s)"
    assert fields["feed hook"] == FEED_HOOK
    for op in ("InfeedDequeueTuple", "OutfeedEnqueueTuple", "CrossReplicaSum"):
        assert op in fields["train step ops"]
    assert fields["host call"] == "yes"
