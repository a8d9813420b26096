"""taohooks' message channel reaches stderr whatever the host script does to ``warnings``."""
import warnings

import pytest

from taohooks.runtime import messages


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(messages.ENV_VERBOSITY, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    messages.set_verbosity(None)
    messages.forget()
    yield
    messages.set_verbosity(None)
    messages.forget()


def test_messages_survive_silenced_warnings(capsys):
    warnings.filterwarnings("ignore")  # what Wan2.1's generate.py does at import
    try:
        messages.notice("calibrating")
        messages.warning("step 45 runs at timestep 357")
    finally:
        warnings.resetwarnings()
    assert capsys.readouterr().err == "taohooks: calibrating\ntaohooks: warning: step 45 runs at timestep 357\n"


def test_once_keys_and_prefix_not_doubled(capsys):
    assert messages.notice("taohooks: a", once="k")
    assert not messages.notice("a", once="k")
    assert capsys.readouterr().err == "taohooks: a\n"


@pytest.mark.parametrize("level,expected", [("quiet", "taohooks: warning: w\n"),
                                            ("info", "taohooks: n\ntaohooks: warning: w\n"),
                                            ("debug", "taohooks: n\ntaohooks: warning: w\ntaohooks: d\n")])
def test_verbosity_from_the_environment(capsys, monkeypatch, level, expected):
    monkeypatch.setenv(messages.ENV_VERBOSITY, level)
    messages.notice("n")
    messages.warning("w")
    messages.debug("d")
    assert capsys.readouterr().err == expected


def test_only_rank_zero_speaks_unless_every_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    messages.warning("from rank 1")
    messages.notice("progress of rank 1", every_rank=True)
    assert capsys.readouterr().err == "taohooks: progress of rank 1\n"
