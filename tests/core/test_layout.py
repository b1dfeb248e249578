"""The package layout: no import cycles, and every public import path works."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "monolith"

# The paths README, the docstrings and the original's users import.
PUBLIC_PATHS = [
    "monolith.core.auto_checkpoint_feed_hook",
    "monolith.core.base_embedding_host_call",
    "monolith.core.base_host_call",
    "monolith.core.tpu_variable",
    "monolith.core.stopping_signals",
    "monolith.core.padding_steps",
    "monolith.core.trained_batches",
    "monolith.core.preemption",
    "monolith.core.testing",
    "monolith.core.simulated_tpu",
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level_imports(path: pathlib.Path, modules: set) -> set:
    """monolith modules `path` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _import_graph() -> dict:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _module_level_imports(path, modules)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        graph[name] = (deps | {p for dep in deps for p in _parents(dep)}) - {name} - parents
    return graph


def _parents(name: str) -> set:
    return {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}


def _find_cycle(graph: dict):
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert "monolith.core.simulated_tpu.dry_run" in graph  # the graph covers subpackages
    assert _find_cycle(graph) is None


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.fixture
def subprocess_pass(tf_behavior):
    """The subprocess checks run once, in the TF2 pass: a new process ignores the behaviour."""
    if tf_behavior != "v2":
        pytest.skip("a new Python process runs in TF2 behaviour: covered by the TF2 pass")


def _python(*args):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def test_every_public_path_imports_in_a_fresh_interpreter(subprocess_pass):
    script = "import importlib, sys\nfor path in sys.argv[1:]:\n    importlib.import_module(path)"
    run = _python("-c", script, *PUBLIC_PATHS)
    assert run.returncode == 0, run.stderr[-2000:]


# Loaded at interpreter start (site imports `sitecustomize` from sys.path): at
# exit, prints the monolith files that were loaded as more than one module.
_SITECUSTOMIZE = """
import atexit, collections, sys

def _report():
    modules = {id(m): m for m in list(sys.modules.values())}.values()  # __mp_main__ is __main__
    files = collections.Counter(getattr(module, "__file__", None) for module in modules)
    print("loaded twice:", sorted(f for f, n in files.items() if f and "monolith" in f and n > 1))

atexit.register(_report)
"""


def test_python_m_simulated_tpu_executes_each_file_once(subprocess_pass, tmp_path):
    """`python -m monolith.core.simulated_tpu` loads no file as two modules (an import cycle
    through `__main__` did: the CLI module ran once as `__main__`, once under its name)."""
    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    run = subprocess.run(
        [sys.executable, "-m", "monolith.core.simulated_tpu", "-h"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage: python -m monolith.core.simulated_tpu" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "loaded twice: []"


def test_imports_go_one_way():
    """README's layout: the input side needs only feed.signal and common; the library never
    imports the emulator or the simulated TPU."""
    graph = _import_graph()
    tools = ("monolith.core.testing", "monolith.core.simulated_tpu")
    for module, deps in graph.items():
        if module.startswith("monolith.core") and not module.startswith(tools):
            assert not {d for d in deps if d.startswith(tools)}, module
        if module.startswith("monolith.core.end_of_stream"):
            allowed = ("monolith.core.end_of_stream", "monolith.core.common", "monolith.core.feed")
            assert {d for d in deps if not d.startswith(allowed)} <= {"monolith.core"}, module
            feed = {d for d in deps if d.startswith("monolith.core.feed")}
            assert feed <= {"monolith.core.feed", "monolith.core.feed.signal"}, module
