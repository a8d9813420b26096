"""when_imported: patch a module right after it executes (or at once if already imported)."""
import sys

from taohooks.launcher.imports import when_imported


def test_runs_after_import_and_at_once_when_already_imported(tmp_path, monkeypatch):
    (tmp_path / "pipeline_demo_taohooks.py").write_text("class Pipeline:\n    def __call__(self):\n        return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def patch(module):
        seen.append(module.__name__)
        module.Pipeline.__call__ = lambda self: 2

    when_imported("pipeline_demo_taohooks", patch)
    assert seen == []
    import pipeline_demo_taohooks  # noqa: F401  (a top-level module from the script's folder, like Latte's)
    assert seen == ["pipeline_demo_taohooks"] and pipeline_demo_taohooks.Pipeline()() == 2
    when_imported("pipeline_demo_taohooks", lambda m: seen.append("again"))
    assert seen[-1] == "again"
    del sys.modules["pipeline_demo_taohooks"]



def test_the_finder_is_not_re_entered_for_a_name_it_is_resolving(tmp_path, monkeypatch):
    """A finder that asks our finder again for the module it is being asked about (an import hook of
    some library) gets None, instead of another walk over sys.meta_path that reaches it again."""
    import importlib.abc

    from taohooks.launcher import imports

    (tmp_path / "pipeline_reentrant_taohooks.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    inner = []

    class Nosy(importlib.abc.MetaPathFinder):
        depth = 0

        def find_spec(self, fullname, path, target=None):
            if fullname != "pipeline_reentrant_taohooks" or Nosy.depth >= 3:
                return None
            Nosy.depth += 1
            try:
                inner.append(imports._finder.find_spec(fullname, path, target))
            finally:
                Nosy.depth -= 1
            return None

    seen = []
    when_imported("pipeline_reentrant_taohooks", lambda m: seen.append(m.VALUE))
    at = sys.meta_path.index(imports._finder)
    monkeypatch.setattr(sys, "meta_path", sys.meta_path[:at + 1] + [Nosy()] + sys.meta_path[at + 1:])
    try:
        import pipeline_reentrant_taohooks  # noqa: F401
        assert seen == [1] and inner == [None]
    finally:
        sys.modules.pop("pipeline_reentrant_taohooks", None)
