"""What ``integration: wan22`` reads from Wan2.2's S2V and Animate pipelines, checked on the checkout's source
(opt-in: TAOHOOKS_WAN22_REPO).

Their modules import decord, librosa, cv2, peft and the audio encoder, which the other official tests avoid, so
this file reads the source with ``ast`` instead of running it: the class and the ``generate`` keywords the
integration takes (``sampling_steps``, ``guide_scale``, ``shift``, ``sample_solver``, ``input_prompt``), the DiT
in ``self.noise_model``, and inside ``generate`` a loop over clips holding a loop over timesteps whose first call is
``self.noise_model(..., t=timestep, ...)`` and whose second call (the uncond stream) runs only under
``if guide_scale > 1`` (what ``streams_for`` assumes); and the task defaults of ``wan/configs``.
"""
import ast
import re

import pytest

from official_support import checkout

WAN22 = checkout("TAOHOOKS_WAN22_REPO", "wan/speech2video.py")

from taohooks.integrations.wan22 import TASK_DEFAULTS, streams_for  # noqa: E402

CASES = [("wan/speech2video.py", "WanS2V", "s2v-14B", "wan/configs/wan_s2v_14B.py", "s2v_14B"),
         ("wan/animate.py", "WanAnimate", "animate-14B", "wan/configs/wan_animate_14B.py", "animate_14B")]


def _class(path: str, name: str) -> ast.ClassDef:
    tree = ast.parse((WAN22 / path).read_text())
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"{path}: no class {name}"
    return found[0]


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    found = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"{cls.name}: no method {name}"
    return found[0]


def _is_noise_model_call(node) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Attribute) and func.attr == "noise_model" and isinstance(func.value, ast.Name)
            and func.value.id == "self")


def _loops(node):
    return [n for n in ast.walk(node) if isinstance(n, (ast.For, ast.While))]


@pytest.mark.parametrize("path,name,task,config_path,config_name", CASES)
def test_generate_keywords_and_the_noise_model(path, name, task, config_path, config_name):
    cls = _class(path, name)
    generate = _method(cls, "generate")
    arguments = {a.arg for a in generate.args.args + generate.args.kwonlyargs}
    assert {"sampling_steps", "guide_scale", "shift", "sample_solver", "input_prompt", "seed"} <= arguments
    init = _method(cls, "__init__")
    assigned = {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert "noise_model" in assigned and not {"model", "high_noise_model", "low_noise_model"} & assigned


@pytest.mark.parametrize("path,name,task,config_path,config_name", CASES)
def test_one_loop_per_clip_and_the_uncond_call_under_guide_scale_above_one(path, name, task, config_path,
                                                                           config_name):
    generate = _method(_class(path, name), "generate")
    calls = [n for n in ast.walk(generate) if _is_noise_model_call(n)]
    assert len(calls) == 2, f"{name}.generate: expected the cond and uncond calls of self.noise_model"
    for call in calls:
        assert any(k.arg == "t" and isinstance(k.value, ast.Name) and k.value.id == "timestep"
                   for k in call.keywords), ast.unparse(call)
    # the step loop (a For over timesteps) holds both calls and sits inside an outer clip loop
    step_loops = [n for n in _loops(generate) if isinstance(n, ast.For) and "timesteps" in ast.unparse(n.iter)]
    assert len(step_loops) == 1
    inside = list(ast.walk(step_loops[0]))
    assert all(any(c is n for n in inside) for c in calls)
    clip_loops = [n for n in _loops(generate) if n is not step_loops[0]
                  and any(s is step_loops[0] for s in ast.walk(n))]
    assert clip_loops, f"{name}.generate: no loop over clips around the step loop"
    guarded = [n for n in ast.walk(step_loops[0]) if isinstance(n, ast.If)
               and re.fullmatch(r"guide_scale\s*>\s*1", ast.unparse(n.test))]
    assert len(guarded) == 1 and any(c is n for n in ast.walk(guarded[0]) for c in calls[1:])
    assert not any(c is n for n in ast.walk(guarded[0]) for c in calls[:1])  # the cond call is unconditional


@pytest.mark.parametrize("path,name,task,config_path,config_name", CASES)
def test_task_defaults_match_the_checkouts_configs(path, name, task, config_path, config_name):
    text = (WAN22 / config_path).read_text()

    def value(key):
        m = re.search(rf"^{config_name}\.{key}\s*=\s*([0-9.]+)", text, re.M)
        assert m, f"{config_path}: no {config_name}.{key}"
        return float(m.group(1))

    defaults = TASK_DEFAULTS[task]
    assert value("sample_steps") == defaults["steps"] and value("sample_shift") == defaults["shift"]
    assert value("sample_guide_scale") == defaults["guide"]
    assert streams_for(defaults["guide"], True) == {"s2v-14B": ("cond", "uncond"), "animate-14B": ("cond",)}[task]
