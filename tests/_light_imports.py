"""A child-process preamble that imports `monolith.core` modules without TensorFlow.

`monolith/core/__init__.py` imports TensorFlow to check its version (about
2.5 s per process). Modules that do not use TensorFlow (the model_dir lock on
local paths, the SIGTERM watcher) can be tested in child processes without
it: the preamble registers the packages by path, so their `__init__` files do
not run, and checks that TensorFlow stayed out.
"""

# Run from the repository root (the child's working directory).
PREAMBLE = """
import os, sys, types
for _name in ("monolith", "monolith.core", "monolith.core.common", "monolith.core.feed"):
    _package = types.ModuleType(_name)
    _package.__path__ = [os.path.join(os.getcwd(), *_name.split("."))]
    sys.modules[_name] = _package
"""

CHECK = """
if "tensorflow" in sys.modules:
    raise SystemExit("tensorflow was imported")
"""
