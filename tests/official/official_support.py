"""Shared helpers of the opt-in tests against the official research repos (see README.md).

Nothing of the official repos is copied here: the tests import their code from a checkout named
by an environment variable, and are skipped when it is not set.
"""
from __future__ import annotations

import os
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pytest

from taohooks.config import config_from_dict

# The summary line GenerationPatch prints on stderr after every generation.
SUMMARY = re.compile(r"taohooks: generation \d+: (\d+) of (\d+) denoiser calls saved")
PAB_SUMMARY = re.compile(r"PAB broadcast (\d+) attention calls")


def checkout(env_var: str, marker: str) -> Path:
    """The checkout named by ``env_var``; skips the calling module when it is unset.

    ``marker`` is a file every checkout of that repo has (relative to its root); a path that lacks
    it is an error, not a skip, so a typo in the variable does not pass silently."""
    value = os.environ.get(env_var)
    if not value:
        pytest.skip(f"{env_var} is not set (path of a checkout; see tests/official/README.md)",
                    allow_module_level=True)
    root = Path(value).expanduser().resolve()
    if not (root / marker).is_file():
        raise pytest.UsageError(f"{env_var}={value}: {marker} not found there; is it a checkout of the right repo?")
    return root


def config(integration: str, plan: dict, pab: Optional[dict] = None):
    data = {"integration": integration, "plan": plan}
    if pab is not None:
        data["pab"] = pab
    return config_from_dict(data, f"official-{integration}.yaml")


def calibrating_config(integration: str, folder: Path, budget: int):
    """A config whose LUT does not exist yet: the first generation calibrates (one prompt), the
    next ones skip ``budget`` steps in the window searched on that LUT."""
    return config_from_dict({"integration": integration, "model_id": f"tiny-{integration}",
                             "lut": str(folder / f"{integration}.safetensors"), "calibration": {"prompts": 1},
                             "plan": {"budget": budget}}, str(folder / f"{integration}.yaml"))


def summaries(err: str):
    """``[(saved, total, pab_broadcasts or None), ...]`` of the summary lines in ``err``."""
    out = []
    for line in err.splitlines():
        m = SUMMARY.search(line)
        if m:
            p = PAB_SUMMARY.search(line)
            out.append((int(m.group(1)), int(m.group(2)), int(p.group(1)) if p else None))
    return out


def stub_module(name: str, **attrs) -> None:
    """Put an empty module ``name`` in ``sys.modules`` unless the real one can be imported."""
    import importlib.util

    if name in sys.modules:
        return
    try:
        if importlib.util.find_spec(name) is not None:
            return
    except (ImportError, ValueError):
        pass
    import importlib.machinery

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    module.__taohooks_stub__ = True
    sys.modules[name] = module


def package_without_init(name: str, path: Path) -> None:
    """Register package ``name`` with ``__path__ = [path]`` without running its ``__init__.py``
    (whose imports pull in every pipeline, the T5 tokenizer, dashscope ...)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__file__ = None
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)


@contextmanager
def isolated_imports(paths: Iterable[Path], names: Iterable[str]) -> Iterator[None]:
    """Put ``paths`` first on ``sys.path``; afterwards drop them and every module named in
    ``names`` (or below), so that each test imports the repo afresh (after installing the
    integration, which exercises its post-import hook) and repos with clashing top-level names
    (Latte's ``models``/``utils``/``diffusion``) do not leak into one another."""
    paths = [str(p) for p in paths]
    names = tuple(names)
    saved_path = list(sys.path)

    def drop():
        for key in list(sys.modules):
            if any(key == n or key.startswith(n + ".") for n in names):
                del sys.modules[key]

    drop()
    sys.path[:0] = paths
    try:
        yield
    finally:
        sys.path[:] = saved_path
        drop()


def script_definitions(path: Path, names: Iterable[str], namespace: dict) -> dict:
    """Compile only the top-level definitions ``names`` (functions, classes, assignments) of the
    script ``path`` into ``namespace``, and return it.

    The official scripts' own argument handling (Wan's ``_parse_args``/``_validate_args``, its
    ``str2bool``) runs as written, without the module's imports, which load every pipeline.
    ``namespace`` supplies the names those definitions use. A name the script no longer defines is
    an error: the test would otherwise check a stand-in."""
    import ast

    wanted, found = set(names), set()
    body = []
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in wanted:
            body.append(node)
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            targets = {t.id for t in node.targets if isinstance(t, ast.Name)} & wanted
            if targets:
                body.append(node)
                found |= targets
    if wanted - found:
        raise pytest.UsageError(f"{path} no longer defines {', '.join(sorted(wanted - found))}")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def in_process_launcher(monkeypatch):
    """``taohooks.run.main`` (what ``taocache-run SCRIPT ... --taocache CONFIG`` runs), callable in
    this process: what it changes for the script (``sys.argv``, ``sys.path[0]``, ``TAOHOOKS_CONFIG``)
    is put back after the test, and taohooks' once-only messages are said once per test."""
    import logging

    from taohooks.runtime import messages
    from taohooks.run import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delenv("TAOHOOKS_CONFIG", raising=False)
    monkeypatch.setattr(messages, "_seen", set())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # a script's logging.basicConfig
    return main


def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0., softmax_scale=None, q_scale=None,
                         causal=False, window_size=(-1, -1), deterministic=False, dtype=None,
                         version=None):
    """CPU stand-in with Wan's ``flash_attention`` signature (Wan2.1 and Wan2.2): [B, L, N, C] in and out."""
    import torch
    import torch.nn.functional as F

    out_dtype = q.dtype
    if q_scale is not None:
        q = q * q_scale
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.size(2))[None, :] < k_lens.to("cpu")[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).to(out_dtype)


def check_authors_teacache(model_name: str, pipe, run, calls: int, threshold: float = 0.15,
                           coefficients=None) -> None:
    """TeaCache as its authors run Latte / Open-Sora-Plan, on the checkout's ``LatteT2V`` (``run(pipe)``
    is one generation of ``calls`` batched-CFG calls): the proxy is exactly what block 0 feeds its
    self-attention; on a reused call ``norm_out`` gets ``stack input + (stack output - stack input)``
    of the last computed call; the first and the last call are computed and some others reused.
    ``coefficients`` replaces the published polynomial (a tiny random model's proxy changes can lie
    where it is negative: then, as in the authors' script, every call but the first and last reuses)."""
    import torch
    import torch.nn.functional as F

    from taohooks import DenoiserHook, LoopSpec
    from taohooks.caches.teacache_latte import adaln_single_probe, latte_teacache

    model = pipe.transformer
    seen = {"attn1": [], "proxy": [], "stack_in": [], "norm_in": [], "norm_out": []}
    block0 = model.transformer_blocks[0]
    handles = [
        block0.attn1.register_forward_pre_hook(lambda m, a, kw: seen["attn1"].append(a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True),
        block0.register_forward_pre_hook(lambda m, a, kw: seen["stack_in"].append(a[0]), with_kwargs=True),
        model.norm_out.register_forward_hook(lambda m, a, out: seen["norm_in"].append(a[0])
                                             or seen["norm_out"].append(out)),  # returns None: output kept
    ]
    (tea,) = latte_teacache(model_name, threshold)
    if coefficients is not None:
        tea.coefficients = list(coefficients)
    probe = tea.probe
    tea.probe = lambda block, args, kwargs: seen["proxy"].append(probe(block, args, kwargs)) or seen["proxy"][-1]
    assert probe is adaln_single_probe
    reused = []
    original = tea.on_after_call

    def after(hook, call, output):
        original(hook, call, output)
        reused.append(tea.last_reused)
    tea.on_after_call = after
    try:
        with DenoiserHook(LoopSpec(calls, ("uncond", "cond"), split_batch=True), [tea]).attach(model):
            run(pipe)
    finally:
        for handle in handles:
            handle.remove()
    assert len(reused) == calls and reused[0] == reused[-1] == 0.0 and 0 < sum(reused) < calls - 2, reused
    computed = [i for i, r in enumerate(reused) if r == 0.0]
    assert len(seen["attn1"]) == len(computed)  # block 0 ran on computed calls only
    for i, attn_input in zip(computed, seen["attn1"]):
        assert torch.equal(seen["proxy"][i], attn_input)
    last = None
    for i, r in enumerate(reused):
        if r == 0.0:
            last = i
            continue
        residual = seen["norm_in"][last] - seen["stack_in"][last]
        expected = F.layer_norm(seen["stack_in"][i] + residual, residual.shape[-1:], eps=model.norm_out.eps)
        assert torch.allclose(seen["norm_out"][i], expected, atol=1e-5), i


class ByteTokenizer:
    """UTF-8 bytes as token ids (what the pipelines' ``encode_prompt`` calls), for :func:`with_byte_text_encoder`."""

    def __call__(self, text, padding="longest", max_length=None, truncation=False, return_tensors="pt", **kw):
        from types import SimpleNamespace

        import torch

        texts = [text] if isinstance(text, str) else list(text)
        ids = [list(t.encode())[:max_length if truncation and max_length else None] for t in texts]
        width = max_length if padding == "max_length" else max(map(len, ids))
        input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        return SimpleNamespace(input_ids=input_ids, attention_mask=(input_ids != 0).long())

    def batch_decode(self, ids):
        return [bytes(i for i in row.tolist() if i).decode(errors="replace") for row in ids]


def with_byte_text_encoder(pipe, width: int = 16):
    """``pipe`` with a :class:`ByteTokenizer` and a tiny random T5 encoder (``d_model = width``, the
    transformer's ``caption_channels``), so that prompts can be strings (as the official scripts pass them)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=256, d_model=width, d_kv=4, d_ff=32, num_layers=1,
                                      num_heads=2)).eval()
    object.__setattr__(pipe, "tokenizer", ByteTokenizer())  # not through DiffusionPipeline's registration
    object.__setattr__(pipe, "text_encoder", encoder)
    return pipe


def compare_experiment(integration: str, methods: str, budget: float, extra: str = "") -> str:
    """A small experiment YAML for :func:`compare_through_driver` (2 prompts, 2 calibration prompts)."""
    return (f"integration: {integration}\n"
            "prompts:\n  - {{prompt: \"a tiny test prompt\", seed: 0}}\n  - {{prompt: \"another tiny prompt\", seed: 3}}\n"
            "calibration_prompts: [\"a calibration prompt\", \"one more calibration prompt\"]\n"
            f"search_prompts: 1\nsearch_iterations: 6\nmethods: [{methods}]\nbudgets: [{budget}]\n{extra}"
            "output: {output}\nlpips: false\n")


def compare_through_driver(tmp_path, driver: str, experiment: str, pythonpath) -> dict:
    """``driver`` (a script that builds a tiny pipeline from the checkout and calls it once, saving the
    result to ``argv[1]`` when given) run plainly into ``tmp_path/plain.pt``, then ``taocache compare``
    with ``experiment`` (``{output}`` filled in) through it; returns ``results.json``'s content."""
    import json
    import subprocess

    (tmp_path / "driver.py").write_text(driver.format(official=str(Path(__file__).parent)))
    (tmp_path / "exp.yaml").write_text(experiment.format(output=str(tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}  # where the launcher looks
    plain = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "plain.pt")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    res = subprocess.run([sys.executable, "-m", "taohooks.cli", "compare", str(tmp_path / "exp.yaml"), "--",
                          str(tmp_path / "driver.py")], env=env, capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return json.loads((tmp_path / "out" / "results.json").read_text())
