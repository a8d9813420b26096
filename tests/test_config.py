"""Config loading: typed values, and errors that name the file, the key and what was expected."""
from pathlib import Path

import pytest

from taohooks import ConfigError, TaoCache, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("bench")))
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.source.endswith(name)


def test_calibration_ranks_sets_how_a_process_groups_ranks_share_generations(tmp_path):
    from taohooks import TaoCache

    for ranks, own, shared in ((None, False, False), ("own", True, False), ("shared", False, True)):
        text = f"calibration:\n  ranks: {ranks}\n" if ranks else ""
        cache = TaoCache(load_config(write(tmp_path, text or "plan: {budget: 0}\n")))
        assert (cache.data_parallel, cache.shared_generations) == (own, shared)


def test_values_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "integration: wan\nlut: l.safetensors\nplan:\n  budget: 0.16\n  lambda: 2\n"))
    assert cfg.plan.budget == 0.16 and cfg.plan.lambda_ == 2.0 and isinstance(cfg.plan.lambda_, float)
    assert cfg.plan.gamma == 1.0 and cfg.plan.ratio == "calibrated" and cfg.calibration.prompts == 20
    assert cfg.lut_path() == tmp_path / "l.safetensors"  # relative to the config's folder
    assert config_from_dict({"plan": {"budget": 8}}).plan.budget == 8
    assert config_from_dict({"plan": {"ratio": 1}}).plan.ratio == 1.0
    assert config_from_dict(None).integration == "none"


@pytest.mark.parametrize("text,match", [
    ("plan:\n  budjet: 8\n", r"c.yaml: plan.budjet: unknown key; did you mean 'plan.budget'\?"),
    ("calibration:\n  ranks: mine\n", r"calibration.ranks: expected one of own, shared, got 'mine'"),
    ("integraton: wan\n", r"integraton: unknown key; did you mean 'integration'\?"),
    ("plan:\n  budget: lots\n", r"plan.budget: expected an integer or a number or null, got 'lots'"),
    ("plan:\n  budget: 1.5\n", r"plan.budget: expected a step count >= 0 or a fraction in \[0, 1\), got 1.5"),
    ("plan:\n  window: [40]\n", r"plan.window: expected \[first, last\]"),
    ("plan:\n  window: [40, 45]\n  budget: 3\n", r"give only one of budget, window and skip_steps"),
    ("plan:\n  tau_cos: 2\n", r"plan.tau_cos: expected a cosine similarity in \[-1, 1\]"),
    ("plan:\n  refresh_every: 0\n", r"plan.refresh_every: expected a number of skips >= 1"),
    ("plan:\n  ratio: mean\n", r"plan.ratio: expected 'calibrated' or a number"),
    ("loop:\n  steps: many\n", r"loop.steps: expected an integer or null, got 'many'"),
    ("loop:\n  split_batch: 1\n", r"loop.split_batch: expected true/false, got 1"),
    ("integration: wann\n", r"unknown integration 'wann'; did you mean 'wan'\?"),
    ("plan: 3\n", r"plan: expected a mapping of keys \(key: value lines .*\), got 3"),
    ("- a\n- b\n", r"expected a mapping of keys at the top level"),
    ("plan: [\n", r"not valid YAML"),
])
def test_errors_name_file_key_and_expectation(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(write(tmp_path, text))
    assert str(info.value).startswith(str(tmp_path / "c.yaml"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file does not exist"):
        TaoCache.from_yaml(tmp_path / "nope.yaml")


def test_round_trip_through_to_dict(tmp_path):
    cfg = load_config(CONFIGS / "example.yaml")
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and "lambda" in cfg.to_dict()["plan"]
