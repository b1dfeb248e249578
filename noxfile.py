"""Test matrix: TensorFlow 2.12-2.15 x Python 3.9-3.11 x TF2 / v1 graph behaviour.

monolith.core supports every TensorFlow release that still ships TPUEstimator
(2.12-2.15), on every Python those releases support (3.9-3.11), with TF2
behaviour and with `tf.compat.v1.disable_v2_behavior()` (tests/conftest.py
switches on `MONOLITH_TF_BEHAVIOR`). Each cell gets its own virtualenv under
`.nox/` with the matching tensorflow-cpu and tensorflow-estimator (about 1.4 GB
each, so the full local matrix of 24 cells needs ~35 GB; pip's cache downloads
each release once).

Usage:

    nox                        # lint + every test cell on the interpreters found
    nox -s tests               # the whole test matrix
    nox -s tests -p 3.11       # one Python, every TF release and behaviour
    nox -s "tests-3.11(tf='2.13', behavior='v1')"   # one cell
    nox -s tests -p 3.11 -t tf2.14                  # tags: tf2.12 ... tf2.15, v2, v1
    nox -s "tests-3.11(tf='2.15', behavior='v2')" -- tests/core/test_tf_version.py -x
    nox -s lint                # ruff format --check + ruff check
    nox -l                     # list the cells

Several `-t` tags select their union; `-k` takes a pytest-style keyword expression
on cell names (`-k v1`; a bare version such as `-k 2.14` is a number, so it matches
everything). Interpreters that are not installed are skipped locally (nox's default
outside CI; on CI, where `CI` is set, a missing interpreter is an error). Arguments
after `--` go to pytest. Add `-r` to reuse existing virtualenvs instead of
recreating them.
"""

from __future__ import annotations

import pathlib
import re

import nox

ROOT = pathlib.Path(__file__).parent

PYTHONS = ["3.9", "3.10", "3.11"]

# TF minor -> (tensorflow-cpu, tensorflow-estimator): the last patch release of
# each minor, all published for CPython 3.9-3.11 on manylinux x86_64.
TF_RELEASES = {
    "2.12": ("2.12.1", "2.12.0"),
    "2.13": ("2.13.1", "2.13.0"),
    "2.14": ("2.14.1", "2.14.0"),
    "2.15": ("2.15.1", "2.15.0"),
}

BEHAVIORS = ["v2", "v1"]

nox.options.sessions = ["lint", "tests"]

_CHECK_VERSIONS = """
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    print(name, version(name))
    if version(name) != wanted:
        sys.exit(f"{name} {version(name)} is installed, not {wanted}")
"""


def _requirement(package: str) -> str:
    """Returns `package`'s line of requirements.txt (e.g. `numpy<2`), so nox and CI agree."""
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(package)}[=<>!~]\S*", text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"requirements.txt has no requirement on {package!r}")
    return match.group(0)


def _pinned(package: str) -> str:
    """Returns the `package==X` line of requirements.txt, so lint and CI agree."""
    line = _requirement(package)
    if not line.startswith(f"{package}=="):
        raise RuntimeError(f"requirements.txt pins no exact version of {package!r}: {line!r}")
    return line


@nox.session(python=PYTHONS)
@nox.parametrize("behavior", [nox.param(b, tags=[b]) for b in BEHAVIORS])
@nox.parametrize("tf", [nox.param(v, tags=[f"tf{v}"]) for v in TF_RELEASES])
def tests(session: nox.Session, tf: str, behavior: str) -> None:
    """Runs pytest against one TensorFlow release in one graph behaviour."""
    tf_cpu, estimator = TF_RELEASES[tf]
    # One resolver run, so nothing later replaces the pinned TensorFlow.
    session.install(
        f"tensorflow-cpu=={tf_cpu}",
        f"tensorflow-estimator=={estimator}",
        # TF 2.12-2.15 are built against numpy 1.x.
        _requirement("numpy"),
        # TensorBoard 2.12-2.15 (run by a test) imports pkg_resources, which
        # setuptools 82 removed; virtualenv seeds the newest setuptools.
        _requirement("setuptools"),
        _requirement("pytest"),
        _requirement("pytest-timeout"),
        _pinned("ruff"),
        ".",
    )
    # Fail fast if anything (a dependency's requirement, a stale venv) changed the pins.
    session.run(
        "python",
        "-c",
        _CHECK_VERSIONS,
        f"tensorflow-cpu=={tf_cpu}",
        f"tensorflow-estimator=={estimator}",
    )
    session.run("pytest", *session.posargs, env={"MONOLITH_TF_BEHAVIOR": behavior})


@nox.session(python=PYTHONS[-1])
def lint(session: nox.Session) -> None:
    """ruff format --check and ruff check, with the ruff pinned in requirements.txt."""
    session.install(_pinned("ruff"))
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
