"""The launcher end to end on official-like sample scripts of Wan2.1, Latte and Open-Sora-Plan v1.1.

    python SCRIPT ...                                   (the reference)
    python -m taohooks.run SCRIPT ... --taocache C.yaml (the same, with TaoCache)

The scripts under ``tests/fixtures/official_like/`` re-create the call contracts that the
``wan``, ``latte`` and ``opensora_plan`` integrations rely on (see the README there), with tiny
CPU models. Each run is its own process. Importing torch and diffusers costs ~6 s per process
on a slow machine, so by default command lines run in processes forked from a pre-warmed server
(``prewarmed.py``, ``fixtures/prewarmed_runner.py``; everything but torch and diffusers is imported
fresh in each); ``test_cold_process_*`` runs real ``[sys.executable, ...]`` processes, and
``TAOHOOKS_TEST_COLD=1`` runs every command line that way.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from prewarmed import RUNNER, Result, base_env

pytest.importorskip("diffusers")
pytest.importorskip("yaml")

FIXTURES = Path(__file__).parent / "fixtures" / "official_like"
PAB_PATTERN = r"transformer_blocks\.\d+\.attn1"  # the fixture transformers' spatial self-attention


@pytest.fixture(scope="module")
def runner():
    return RUNNER


# ---------------------------------------------------------------------------- the three scripts
@dataclass(frozen=True)
class Repo:
    integration: str
    script: Path
    calls: int                 # denoiser calls per generation, as the summary line counts them
    prompts: Tuple[str, ...]   # one generation each
    window: Tuple[int, int]    # a late window for the manual-window test (indices: calls per stream)
    window_saved: int          # calls that window saves per generation
    max_rel_l2: float          # realistic error of that window with a constant ratio 1.0
    pythonpath: Tuple[Path, ...] = ()
    calls_pattern: str = r"transformer calls (\d+)"  # real forward calls of the DiT, printed on stdout

    def env(self) -> Dict[str, str]:
        return base_env(**({"PYTHONPATH": os.pathsep.join(map(str, self.pythonpath))} if self.pythonpath else {}))

    def argv(self, out: Path, *extra: str) -> List[str]:
        """The script's own command line, writing its result under ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        if self.integration == "wan":
            return [self.script, "--task", "t2v-1.3B", "--prompt", self.prompts[0], "--sample_steps", "10",
                    "--sample_guide_scale", "5.0", "--base_seed", "0", "--save_file", out / "video.pt", *extra]
        if self.integration == "latte":
            import yaml

            config = dict(num_sampling_steps=10, guidance_scale=7.5, seed=0, save_path=str(out / "videos"),
                          text_prompt=list(self.prompts), video_length=4, image_size=[16, 16])
            (out / "sample.yaml").write_text(yaml.safe_dump(config))
            return [self.script, "--config", out / "sample.yaml", *extra]
        return [self.script, "--num_sampling_steps", "6", "--guidance_scale", "7.5", "--sample_method", "PNDM",
                "--text_prompt", *self.prompts, "--save_img_path", out / "videos", *extra]

    def outputs(self, out: Path) -> List[torch.Tensor]:
        if self.integration == "wan":
            return [torch.load(out / "video.pt")]
        return list(torch.load(out / "videos" / "videos.pt"))

    def model_calls(self, stdout: str) -> int:
        return int(re.search(self.calls_pattern, stdout).group(1))


REPOS = {
    # 10 UniPC steps x 2 calls (cond, uncond); the window skips steps 6 and 7 of both streams
    "wan": Repo("wan", FIXTURES / "wan" / "generate.py", 20, ("Two cats boxing on a spotlighted stage.",),
                (6, 7), 4, 0.05, calls_pattern=r"dit calls: forward (\d+)"),
    # 10 DDIM steps x 1 batched (uncond, cond) call; two prompts: two generations in one process
    "latte": Repo("latte", FIXTURES / "latte" / "sample" / "sample_t2x.py", 10,
                  ("Yellow and black tropical fish dart through the sea.", "A cat wearing sunglasses."),
                  (6, 7), 2, 0.2),
    # 6 PNDM steps: 15 batched calls (PRK warm-up, repeated timesteps). So few, coarse steps make
    # extrapolation rough: skipping call 10 is off by ~10%, but calls 11 or 12 by 20-100% and the
    # 2-call window [10, 11] by ~50% on this tiny model (with 150 steps the late calls are PLMS ones).
    "opensora_plan": Repo("opensora_plan", FIXTURES / "opensora_plan" / "opensora" / "sample" / "sample_t2v.py", 15,
                          ("A dog running on the beach.", "A sailing boat at sunset."), (10, 10), 1, 0.2,
                          pythonpath=(FIXTURES / "opensora_plan",)),
}
ALL = pytest.mark.parametrize("name", list(REPOS))


def config_file(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "taocache.yaml"
    path.write_text(text)
    return path


def run_plain(runner, repo: Repo, out: Path, *extra: str, cold: Optional[bool] = None) -> Result:
    res = runner(repo.argv(out, *extra), out, repo.env(), cold=cold)
    assert res.returncode == 0, res.stderr
    return res


def run_launcher(runner, repo: Repo, out: Path, config: str, *extra: str, cold: Optional[bool] = None) -> Result:
    path = config_file(out, config)
    return runner(["-m", "taohooks.run", *repo.argv(out, *extra), "--taocache", path], out, repo.env(), cold=cold)


def saved_counts(res: Result) -> List[Tuple[int, int]]:
    return [tuple(map(int, re.search(r"(\d+) of (\d+) denoiser calls saved", line).groups())) for line in res.summaries()]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).float().norm() / b.float().norm())


_cache: Dict[tuple, tuple] = {}


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory):
    """``reference(name)``: (outputs, result) of the plain ``python SCRIPT`` run, run once per module."""
    def get(name: str):
        key = ("plain", name)
        if key not in _cache:
            out = tmp_path_factory.mktemp(f"plain_{name}")
            res = run_plain(runner, REPOS[name], out)
            _cache[key] = (REPOS[name].outputs(out), res)
        return _cache[key]
    return get


@pytest.fixture(scope="module")
def windowed(runner, tmp_path_factory):
    """``windowed(name)``: (outputs, result) of the launcher with the repo's manual window, run once."""
    def get(name: str):
        key = ("window", name)
        if key not in _cache:
            repo = REPOS[name]
            out = tmp_path_factory.mktemp(f"window_{name}")
            res = run_launcher(runner, repo, out, window_config(repo))
            assert res.returncode == 0, res.stderr
            _cache[key] = (repo.outputs(out), res)
        return _cache[key]
    return get


def window_config(repo: Repo) -> str:
    return f"integration: {repo.integration}\nplan: {{window: [{repo.window[0]}, {repo.window[1]}], ratio: 1.0}}\n"


# ---------------------------------------------------------------------------- a. budget 0 is the script itself
@ALL
def test_budget_zero_is_bit_identical_to_the_plain_script(runner, reference, tmp_path, name):
    repo = REPOS[name]
    expected, plain = reference(name)
    res = run_launcher(runner, repo, tmp_path, f"integration: {name}\nplan: {{budget: 0}}\n")
    assert res.returncode == 0, res.stderr
    got = repo.outputs(tmp_path)
    assert len(got) == len(expected) == len(repo.prompts)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert saved_counts(res) == [(0, repo.calls)] * len(repo.prompts), res.stderr
    assert repo.model_calls(res.stdout) == repo.model_calls(plain.stdout) == repo.calls * len(repo.prompts)


# ---------------------------------------------------------------------------- b. a manual window
@ALL
def test_manual_window_skips_exactly_its_calls(reference, windowed, name):
    repo = REPOS[name]
    expected, _ = reference(name)
    got, res = windowed(name)
    assert saved_counts(res) == [(repo.window_saved, repo.calls)] * len(repo.prompts), res.stderr
    assert f"window {repo.window[0]}-{repo.window[1]}" in res.summaries()[0]
    # the skipped calls never reached the model
    assert repo.model_calls(res.stdout) == (repo.calls - repo.window_saved) * len(repo.prompts)
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        assert not torch.equal(a, b)
        assert 0.0 < rel_l2(a, b) < repo.max_rel_l2, rel_l2(a, b)


# ---------------------------------------------------------------------------- c. Wan's sequence parallel / FSDP
@pytest.mark.parametrize("flags", [("--ulysses_size", "2"), ("--dit_fsdp",), ("--ulysses_size", "2", "--dit_fsdp")],
                         ids=["usp", "fsdp", "usp+fsdp"])
def test_wan_hooks_the_instance_forward_inside_the_wrappers(runner, windowed, tmp_path, flags):
    repo = REPOS["wan"]
    expected, plain_res = windowed("wan")
    res = run_launcher(runner, repo, tmp_path, window_config(repo), *flags)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == saved_counts(plain_res) == [(4, 20)]
    assert torch.equal(repo.outputs(tmp_path)[0], expected[0])
    usp, fsdp = "--ulysses_size" in flags, "--dit_fsdp" in flags
    calls = re.search(r"forward (\d+), usp (\d+), fsdp wrapper (\d+)", res.stdout).groups()
    # the sequence-parallel instance forward is wrapped, not bypassed: it makes the 16 computed calls;
    # the FSDP wrapper still sees all 20 (TaoCache answers inside it)
    assert tuple(map(int, calls)) == ((0, 16) if usp else (16, 0)) + ((20,) if fsdp else (0,))


# ---------------------------------------------------------------------------- d. calibrate on first use, then skip
CALIBRATE = "integration: {}\nlut: lut.safetensors\ncalibration: {{prompts: 1}}\nplan: {{budget: 2{}}}\n"


def test_latte_calibrates_on_the_first_prompt_then_skips(runner, tmp_path):
    repo = replace(REPOS["latte"], prompts=("a red fish", "a blue fish", "a green fish"))
    config = CALIBRATE.format("latte", ", min_step: 5")
    res = run_launcher(runner, repo, tmp_path / "first", config)
    assert res.returncode == 0, res.stderr
    assert "calibrating" in res.stderr
    assert (tmp_path / "first" / "lut.safetensors").is_file()  # next to the config file
    assert saved_counts(res) == [(0, 10), (2, 10), (2, 10)], res.stderr
    assert "calibrating, all steps computed" in res.summaries()[0]
    # said once, by the generation that completed it (the next generation said it again), after that generation's
    # summary line (it came before it) and before the next generation's
    assert res.stderr.count("calibration complete") == 1, res.stderr
    done = res.stderr.index("calibration complete")
    assert res.stderr.index("taohooks: generation 1:") < done < res.stderr.index("taohooks: generation 2:"), res.stderr
    assert "calibration complete with generation 1: the LUT " in res.stderr and \
        "holds 1 prompt (calibration.prompts 1); the generations after it skip" in res.stderr, res.stderr
    assert repo.model_calls(res.stdout) == 26
    assert all(torch.isfinite(v).all() for v in repo.outputs(tmp_path / "first"))

    # a second process loads the LUT: every generation skips
    res = run_launcher(runner, repo, tmp_path / "first", config)
    assert res.returncode == 0, res.stderr
    assert "calibrating" not in res.stderr
    assert saved_counts(res) == [(2, 10)] * 3, res.stderr
    assert all("[max-cos]" in line for line in res.summaries())


def test_opensora_plan_pndm_calibrates_then_skips(runner, tmp_path):
    from taohooks.taocache.lut import CalibrationLUT

    repo = replace(REPOS["opensora_plan"], prompts=("A dog running on the beach.",))
    config = CALIBRATE.format("opensora_plan", "")
    res = run_launcher(runner, repo, tmp_path, config)
    assert res.returncode == 0, res.stderr
    assert "calibrating" in res.stderr
    assert saved_counts(res) == [(0, 15)], res.stderr
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    # PNDM: 6 steps are 15 calls (steps + 9), with the PRK warm-up's repeated timesteps
    assert lut.steps == 15 and lut.num_prompts == 1 and tuple(lut.streams) == ("uncond", "cond")
    timesteps = lut.timesteps.tolist()
    assert len(set(timesteps)) < len(timesteps) and timesteps[0] > timesteps[-1]

    res = run_launcher(runner, repo, tmp_path, config)
    assert res.returncode == 0, res.stderr
    assert "calibrating" not in res.stderr
    assert saved_counts(res) == [(2, 15)], res.stderr
    assert repo.model_calls(res.stdout) == 13
    assert torch.isfinite(repo.outputs(tmp_path)[0]).all()


# ---------------------------------------------------------------------------- e. the wrong repo fails early
@pytest.mark.parametrize("integration,script,module", [
    ("opensora_plan", "latte", "pipeline_videogen"),
    ("latte", "opensora_plan", "pipeline_latte"),
    ("wan", "latte", "wan"),
])
def test_integration_without_its_repo_module_fails_before_the_script_runs(runner, tmp_path, integration, script,
                                                                            module):
    repo = REPOS[script]
    res = run_launcher(runner, repo, tmp_path, f"integration: {integration}\nplan: {{budget: 0}}\n")
    assert res.returncode == 2
    assert f"the {integration!r} integration cannot find the module {module!r}" in res.stderr
    assert "Processing" not in res.stdout and not (tmp_path / "videos").exists()
    # and which integration the script is for (it sent an Open-Sora-Plan user to a Latte checkout: ospuser)
    assert f"; this script's folder holds the code of integration: {script} (its config is another: " in res.stderr


# ---------------------------------------------------------------------------- f. PAB from the YAML
@pytest.mark.parametrize("plan,saved,broadcasts", [
    ("", 0, 8),  # steps 2, 4, 6, 8 of the window [1, 8] broadcast (range 2), in both blocks
    # steps 6, 7 skipped by TaoCache; step 8 resumes after a skip, so PAB's cache is dropped there
    ("plan: {window: [6, 7], ratio: 1.0}\n", 2, 4),
], ids=["pab", "pab+window"])
def test_pab_section_broadcasts_attention(runner, reference, tmp_path, plan, saved, broadcasts):
    repo = REPOS["latte"]
    expected, _ = reference("latte")
    config = (f"integration: latte\n{plan}pab: {{groups: [{{pattern: '{PAB_PATTERN}', range: 2}}], "
              "steps: [1, 8]}\n")
    res = run_launcher(runner, repo, tmp_path, config)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(saved, 10)] * len(repo.prompts), res.stderr
    counts = [int(re.search(r"PAB broadcast (\d+) attention calls", line).group(1)) for line in res.summaries()]
    assert counts == [broadcasts] * len(repo.prompts), res.stderr
    for a, b in zip(repo.outputs(tmp_path), expected):
        assert torch.isfinite(a).all() and not torch.equal(a, b)
        assert rel_l2(a, b) < repo.max_rel_l2


# ---------------------------------------------------------------------------- real interpreter processes
def test_cold_process_budget_zero_matches(runner, reference, tmp_path):
    """``python -m taohooks.run generate.py ...`` in a fresh interpreter: as the pre-warmed runs."""
    repo = REPOS["wan"]
    expected, _ = reference("wan")
    res = run_launcher(runner, repo, tmp_path, "integration: wan\nplan: {budget: 0}\n", cold=True)
    assert res.returncode == 0, res.stderr
    assert saved_counts(res) == [(0, 20)], res.stderr
    assert torch.equal(repo.outputs(tmp_path)[0], expected[0])


def test_cold_process_missing_module(runner, tmp_path):
    res = run_launcher(runner, REPOS["latte"], tmp_path, "integration: wan\n", cold=True)
    assert res.returncode == 2 and "'wan' integration cannot find the module 'wan'" in res.stderr
    assert "Processing" not in res.stdout
