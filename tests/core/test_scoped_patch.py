"""`common.scoped_patch.ScopedPatch`: a monkeypatch scoped to threads, reference-counted.

Plain Python targets (a module function, a method, a property) on throwaway
modules and classes: no TensorFlow needed. The TensorFlow patches built on it
are tested with the simulated TPU (`test_simulated_tpu.py`, `test_dry_run.py`).
"""

from __future__ import annotations

import sys
import threading
import types

import pytest

from monolith.core.common.scoped_patch import ScopedPatch

pytestmark = pytest.mark.timeout(30)


def _module(name="scoped_patch_target"):
    module = types.ModuleType(name)
    module.answer = lambda: "original"
    return module


def _on_thread(fn):
    """fn() run on a new thread; its result (or its exception, re-raised here)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_replacement_acts_for_the_entering_thread_only():
    module = _module()
    patch = ScopedPatch(module, "answer")

    with patch.scope(lambda: "replaced"):
        assert module.answer() == "replaced"
        assert _on_thread(module.answer) == "original"


def test_all_threads_scope_acts_for_threads_without_a_scope_of_their_own():
    module = _module()
    patch = ScopedPatch(module, "answer")

    with patch.scope(lambda: "everyone", all_threads=True):
        assert _on_thread(module.answer) == "everyone"
        with patch.scope(lambda: "mine"):
            assert module.answer() == "mine"
            assert _on_thread(module.answer) == "everyone"
        assert module.answer() == "everyone"


def test_nested_scopes_answer_innermost_and_restore_on_exit():
    module = _module()
    original = module.answer
    patch = ScopedPatch(module, "answer")

    with patch.scope(lambda: "outer"):
        with patch.scope(lambda: "inner"):
            assert module.answer() == "inner"
        assert module.answer() == "outer"

    assert module.answer is original
    assert not patch.installed


def test_an_exception_in_the_block_restores_the_original():
    module = _module()
    original = module.answer
    patch = ScopedPatch(module, "answer")

    with pytest.raises(KeyError, match="boom"), patch.scope(lambda: "replaced"):
        raise KeyError("boom")

    assert module.answer is original


def test_replacement_delegates_to_the_original():
    module = _module()
    patch = ScopedPatch(module, "answer")

    with patch.scope(lambda: patch.original()() + " and more"):
        assert module.answer() == "original and more"


def test_methods_and_properties_are_replaced_per_instance_call():
    class Thing:
        def __init__(self, size):
            self.size = size

        def grow(self, by):
            return self.size + by

        @property
        def label(self):
            return f"thing {self.size}"

    grow = ScopedPatch(Thing, "grow")
    label = ScopedPatch(Thing, "label")
    thing = Thing(2)

    with (
        grow.scope(lambda self, by: grow.original()(self, by) * 10),
        label.scope(lambda self: "simulated " + label.original().fget(self)),
    ):
        assert thing.grow(1) == 30
        assert thing.label == "simulated thing 2"
        assert _on_thread(lambda: (thing.grow(1), thing.label)) == (3, "thing 2")

    assert (thing.grow(1), thing.label) == (3, "thing 2")
    assert isinstance(vars(Thing)["label"], property)


def test_concurrent_scopes_of_two_threads_each_see_their_own_and_leave_nothing_behind():
    module = _module()
    original = module.answer
    patch = ScopedPatch(module, "answer")
    both_inside = threading.Barrier(2, timeout=10)
    first_left = threading.Event()
    seen = {}

    def use(name, leave_first):
        with patch.scope(lambda: name):
            both_inside.wait()
            if not leave_first:
                first_left.wait(10)  # exits out of order: the other scope left first
            seen[name] = module.answer()
        if leave_first:
            first_left.set()
            seen[name + " after"] = module.answer()

    threads = [
        threading.Thread(target=use, args=("a", True)),
        threading.Thread(target=use, args=("b", False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert seen == {"a": "a", "b": "b", "a after": "original"}
    assert module.answer is original
    assert not patch.installed


def test_many_threads_entering_and_leaving_at_once_leave_nothing_behind():
    module = _module()
    original = module.answer
    patch = ScopedPatch(module, "answer")
    start = threading.Barrier(8, timeout=10)
    wrong = []

    def churn(index):
        start.wait()
        for _ in range(200):
            with patch.scope(lambda: index):
                if module.answer() != index:
                    wrong.append(index)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert wrong == []
    assert module.answer is original


def test_module_aliases_are_replaced_and_restored(monkeypatch):
    home = _module("scoped_patch_home")
    original = home.answer
    importer = types.ModuleType("scoped_patch_importer")
    importer.answer = original  # `from scoped_patch_home import answer`
    monkeypatch.setitem(sys.modules, home.__name__, home)
    monkeypatch.setitem(sys.modules, importer.__name__, importer)
    patch = ScopedPatch(home, "answer", module_aliases=True)

    with patch.scope(lambda: "replaced"):
        assert importer.answer() == "replaced"
        # A module imported meanwhile copies the dispatcher: restored too.
        late = types.ModuleType("scoped_patch_late_importer")
        late.answer = home.answer
        monkeypatch.setitem(sys.modules, late.__name__, late)
        assert late.answer() == "replaced"

    assert home.answer is importer.answer is late.answer is original


def test_a_patch_laid_over_the_dispatcher_is_left_in_place():
    module = _module()
    patch = ScopedPatch(module, "answer")

    def theirs():
        return "theirs"

    with patch.scope(lambda: "replaced"):
        module.answer = theirs

    assert module.answer is theirs


def test_a_missing_attribute_is_an_attribute_error_naming_it():
    patch = ScopedPatch(_module(), "no_such_function")

    with pytest.raises(AttributeError, match="'no_such_function'"), patch.scope(lambda: None):
        pass
    assert not patch.installed
