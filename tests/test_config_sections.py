"""The pab: and teacache: config sections: validation, and what TaoCache builds from them."""
import pytest
import torch

from taohooks import TaoCache
from taohooks.config import ConfigError, config_from_dict
from taohooks.caches.pab import PyramidAttentionBroadcast
from taohooks.taocache.plan import plan_from_window
from taohooks.taocache.cache import section_callbacks
from taohooks.caches.teacache import TeaCacheCallback
from tinydit import TinyDiT, run

PAB = {"groups": [{"pattern": r"blocks\.\d+\.attn", "range": 2}], "steps": [1, 8]}


@pytest.mark.parametrize("section,message", [
    ({"pab": {"groups": []}}, "pab.groups: expected at least one"),
    ({"pab": {"groups": [{"pattern": "(", "range": 2}], "steps": [1, 2]}}, "pab.groups[0].pattern: not a valid regex"),
    ({"pab": {"groups": [{"pattern": "a", "range": 0}], "steps": [1, 2]}}, "pab.groups[0].range: expected a broadcast"),
    ({"pab": {"groups": [{"pattern": "a", "rnage": 2}], "steps": [1, 2]}}, "did you mean 'pab.groups[0].range'"),
    ({"pab": {"groups": [{"pattern": "a"}]}}, "give exactly one window"),
    ({"pab": {"groups": [{"pattern": "a"}], "steps": [5, 1]}}, "pab.steps: expected [low, high]"),
    ({"teacache": {"threshold": -1}}, "teacache.threshold: expected a threshold >= 0"),
    ({"teacache": {"threshold": 0.1, "coefficients": []}}, "teacache.coefficients"),
    ({"teacache": {"threshold": 0.1, "guard_band": -1}}, "teacache.guard_band"),
])
def test_section_errors_name_the_key(section, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(section, "c.yaml")
    assert str(exc.value).startswith("c.yaml: ") and message in str(exc.value)


def test_sections_round_trip_through_to_dict():
    config = config_from_dict({"pab": PAB, "teacache": {"threshold": 0.1}}, "c.yaml")
    again = config_from_dict(config.to_dict(), "c.yaml")
    assert again.pab == config.pab and again.teacache == config.teacache
    assert config.to_dict()["pab"]["groups"] == [{"pattern": r"blocks\.\d+\.attn", "range": 2}]


def test_hybrid_tea_range_ends_a_guard_band_before_the_window():
    config = config_from_dict({"teacache": {"threshold": 0.1, "guard_band": 3}, "pab": PAB})
    plan = plan_from_window(20, ("main",), 14, 17, 1.0, refresh_every=2)
    tea, pab = section_callbacks(config, plan)
    assert isinstance(tea, TeaCacheCallback) and tea.max_step == 11 and tea.coefficients == [1.0, 0.0]
    assert isinstance(pab, PyramidAttentionBroadcast) and pab.steps == (1, 8)
    assert plan.refresh_steps == (16,) and pab.reset_steps == frozenset({16, 18})  # resume steps


def test_pab_and_hybrid_from_a_config_on_a_model():
    model = TinyDiT()
    full = run(model, 12)
    config = config_from_dict({"plan": {"window": [8, 9], "ratio": 1.0}, "pab": PAB,
                               "teacache": {"threshold": 0.5, "guard_band": 2}})
    cache = TaoCache(config)
    with cache.attach(model, 12):
        outs = run(model, 12)
    tea, pab = cache.hook.callbacks[1:]
    assert cache.hook.counts["main"] == [10, 2]
    assert pab.broadcasts > 0 and tea.reused > 0
    assert all(torch.isfinite(o[0]).all() for o in outs)
    assert not torch.equal(outs[-1][0], full[-1][0])
    assert "forward" not in vars(model.blocks[0]) and "forward" not in vars(model.blocks[0].attn)  # restored


def test_wan_refuses_the_hybrid_under_sequence_parallelism():
    import types

    from taohooks.launcher.integration import IntegrationError
    from taohooks.integrations.wan import _refuse_rank_local_decisions

    config = config_from_dict({"integration": "wan", "teacache": {"threshold": 0.1}}, "wan_hybrid.yaml")
    check = _refuse_rank_local_decisions(config)
    one, two = ({"self": types.SimpleNamespace(sp_size=n)} for n in (1, 2))
    assert check(one, None) == []  # one process, or data-parallel ranks with the whole model each: fine
    with pytest.raises(IntegrationError, match="wan_hybrid.yaml: teacache: .* ranks could take different"):
        check(two, None)
    assert _refuse_rank_local_decisions(config_from_dict({"integration": "wan"}))(two, None) == []
