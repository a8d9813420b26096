"""when_imported: patch a module right after it executes (or at once if already imported)."""
import sys

from taohooks.imports import when_imported


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
