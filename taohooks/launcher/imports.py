"""Run a function when a module is imported (now, if it already is).

Integrations patch classes of research repos that the user's script imports later, sometimes
as top-level modules from the script's own folder (Latte's ``pipeline_latte``). A meta-path
finder wraps the loader of the named module so the patch runs right after the module executes.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, List

__all__ = ["when_imported", "cancel_when_imported"]

_lock = threading.RLock()
_pending: Dict[str, List[Callable[[ModuleType], None]]] = {}


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        with _lock:
            callbacks = _pending.pop(module.__name__, [])
        for fn in callbacks:
            fn(module)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds a pending module with the other finders and wraps its loader. Re-entrant calls for a
    name it is already resolving (another finder importing the same module while it looks) are
    left to the other finders, so the lookup cannot recurse."""

    def __init__(self):
        self._resolving = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        busy = self._resolving.__dict__.setdefault("names", set())
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PostImportLoader(spec.loader)
                    return spec
                if spec is not None:
                    return spec
            return None
        finally:
            busy.discard(fullname)


_finder = _PostImportFinder()


def when_imported(name: str, fn: Callable[[ModuleType], None]) -> None:
    """Call ``fn(module)`` once module ``name`` is imported; at once if it already is."""
    module = sys.modules.get(name)
    if module is not None:
        fn(module)
        return
    with _lock:
        _pending.setdefault(name, []).append(fn)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def cancel_when_imported(name: str, fn: Callable[[ModuleType], None]) -> None:
    """Forget a ``when_imported(name, fn)`` whose module has not been imported yet."""
    with _lock:
        callbacks = _pending.get(name)
        if callbacks and fn in callbacks:
            callbacks.remove(fn)
            if not callbacks:
                del _pending[name]
