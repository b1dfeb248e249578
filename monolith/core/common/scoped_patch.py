"""Thread-scoped, reference-counted replacement of one attribute (a monkeypatch made safe).

The simulated TPU has to change what a few TensorFlow functions do (the TPU
system query, session creation, the feed-hook setting) without a hook of
TensorFlow's to do it with. A plain monkeypatch would do that for every thread
of the process, and two overlapping uses (two threads, each building a graph)
would restore each other's patches in the wrong order. `ScopedPatch` makes the
replacement safe:

- **Scoped to threads.** `scope(replacement)` makes the attribute run
  `replacement` for the calling thread only; every other thread gets the
  original. `scope(replacement, all_threads=True)` makes it run for every
  thread that has no scope of its own (the dry run, which owns its process).
  Scopes nest: the innermost scope of the calling thread wins, then the
  innermost process-wide one.
- **Installed once, removed by the last user.** The first active scope puts a
  dispatcher in place of the attribute, the last one to exit puts the original
  back; both happen under a lock, so concurrent scopes neither corrupt each
  other nor leave the dispatcher behind. Exit runs on every path (return,
  exception, generator close).
- **Module aliases.** With `module_aliases=True` the dispatcher also replaces
  every module-level alias of the original (`from m import f` copies it into
  the importer's namespace), and on removal every alias of the dispatcher,
  including ones made by modules imported while it was installed.

A dispatcher that outlives its installation (someone kept a reference) calls
the original, so nothing it is called from changes behaviour after the last
scope exits.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Iterator, List, Optional

from absl import logging


class _Entry:
    """One active scope's replacement (compared by identity, so equal replacements are distinct)."""

    __slots__ = ("replacement",)

    def __init__(self, replacement: Callable[..., Any]):
        self.replacement = replacement


class ScopedPatch:
    """Replaces `owner.<name>` (a function or a property) while any scope of it is active.

    Create one per attribute, at import time, and share it: the reference count
    and the scopes live in the instance.

    Args:
      owner: The module or class holding the attribute (in its own `__dict__`).
      name: The attribute's name.
      module_aliases: Also replace the module-level aliases of the original in
        every module of `sys.modules` (for a module function that other modules
        import by name).
    """

    def __init__(self, owner: Any, name: str, *, module_aliases: bool = False):
        self._owner = owner
        self._name = name
        self._module_aliases = module_aliases
        self._lock = threading.RLock()
        self._local = threading.local()
        self._process_stack: List[_Entry] = []
        self._users = 0
        self._original: Any = None
        self._dispatcher: Any = None
        # (namespace dict, original) of every place the dispatcher was put.
        self._patched: List[Any] = []

    def __repr__(self) -> str:
        owner = getattr(self._owner, "__name__", repr(self._owner))
        return f"ScopedPatch({owner}.{self._name})"

    @property
    def installed(self) -> bool:
        """Whether the dispatcher is in place (some scope is active)."""
        with self._lock:
            return self._users > 0

    def original(self) -> Any:
        """The attribute as it was before the dispatcher replaced it (valid inside a scope)."""
        return self._original

    @contextlib.contextmanager
    def scope(
        self, replacement: Callable[..., Any], *, all_threads: bool = False
    ) -> Iterator[None]:
        """Makes the attribute run `replacement` for this thread (or all threads) inside the block.

        Args:
          replacement: Called as the original would be (for a method: with the
            instance first; for a property: `replacement(instance)` returns
            the value). Call `original()` from it to delegate.
          all_threads: Act for every thread without a scope of its own, not
            only for the calling one.

        Yields:
          None.
        """
        entry = _Entry(replacement)
        with self._lock:
            stack = self._process_stack if all_threads else self._thread_stack()
            if self._users == 0:
                self._install()
            self._users += 1
            stack.append(entry)
        try:
            yield
        finally:
            with self._lock:
                # By identity: scopes of other threads may have exited out of order.
                del stack[next(i for i, e in enumerate(stack) if e is entry)]
                self._users -= 1
                if self._users == 0:
                    self._uninstall()

    # -- the dispatcher -------------------------------------------------------------------

    def _thread_stack(self) -> List[_Entry]:
        return self._local.__dict__.setdefault("stack", [])

    def _active_replacement(self) -> Optional[Callable[..., Any]]:
        """The replacement for the calling thread, or None (use the original)."""
        own = self._local.__dict__.get("stack")
        if own:
            return own[-1].replacement
        with self._lock:
            return self._process_stack[-1].replacement if self._process_stack else None

    def _make_dispatcher(self, original: Any) -> Any:
        active = self._active_replacement
        if isinstance(original, property):

            def get(instance: Any) -> Any:
                replacement = active()
                if replacement is None:
                    return original.__get__(instance, type(instance))
                return replacement(instance)

            return property(get, doc=original.__doc__)
        if not callable(original):
            raise TypeError(f"{self!r}: {original!r} is neither callable nor a property.")

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            replacement = active()
            if replacement is None:
                return original(*args, **kwargs)
            return replacement(*args, **kwargs)

        for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
            if hasattr(original, attribute):
                setattr(dispatch, attribute, getattr(original, attribute))
        return dispatch

    def _install(self) -> None:
        namespace = vars(self._owner)
        if self._name not in namespace:
            raise AttributeError(
                f"{self!r}: {self._owner!r} has no attribute {self._name!r} of its own."
            )
        original = namespace[self._name]
        dispatcher = self._make_dispatcher(original)
        owners = [self._owner]
        if self._module_aliases:
            # Read module dicts, not getattr: getattr would import lazily loaded modules.
            owners += [
                module
                for module in list(sys.modules.values())
                if module is not self._owner
                and isinstance(getattr(module, "__dict__", None), dict)
                and module.__dict__.get(self._name) is original
            ]
        self._original, self._dispatcher = original, dispatcher
        self._patched = []
        try:
            for owner in owners:
                setattr(owner, self._name, dispatcher)
                self._patched.append(owner)
        except BaseException:
            self._uninstall()  # no half-installed patch: the scope is not entered
            raise
        logging.debug("%r installed in %d namespace(s).", self, len(self._patched))

    def _uninstall(self) -> None:
        owners = list(self._patched)
        if self._module_aliases:
            owners += [
                module
                for module in list(sys.modules.values())
                if all(module is not o for o in owners)
                and isinstance(getattr(module, "__dict__", None), dict)
                and module.__dict__.get(self._name) is self._dispatcher
            ]
        for owner in owners:
            if vars(owner).get(self._name) is self._dispatcher:
                setattr(owner, self._name, self._original)
            else:
                # Someone replaced the dispatcher after us; theirs stays (and
                # falls back to the dispatcher, which falls back to the original).
                logging.warning("%r: %r was replaced while patched; left as it is.", self, owner)
        self._patched = []
        logging.debug("%r removed.", self)
