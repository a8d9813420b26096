"""Distributed: data-parallel calibration (gloo, 2 processes) equals one process; under a
sequence-parallel forward that all-gathers its output, both ranks skip the same calls."""
import socket
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from taohooks import TaoCache
from taohooks.config import config_from_dict
from taohooks.taocache.lut import CalibrationLUT
from prewarmed import run_python

pytest.importorskip("diffusers")

SCRIPT = textwrap.dedent("""
    import sys, torch
    from taohooks.testbed import sampling
    from taohooks.testbed.model import VideoDiT, VideoDiTConfig
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VideoDiT(VideoDiTConfig(dim=32, depth=2, num_heads=2))
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    sampling.sample(model, [sys.argv[1]], [10000], steps=6)
""")
PROMPTS = ["a red circle moving left", "a green circle moving up", "a blue square moving up",
           "a yellow square moving down", "a red square moving right"]


def calibrate(folder, *extra, launcher=("-m", "taohooks.cli"), before=None, check=True):
    """``taocache calibrate`` of SCRIPT on PROMPTS in a new ``folder``: ``(its LUT, the process)``; with
    ``check=False`` ``(None, the process)``, whatever its exit code."""
    folder.mkdir()
    (folder / "sample.py").write_text(SCRIPT)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (folder / "c.yaml").write_text("integration: testbed\nmodel_id: tiny\nlut: lut.safetensors\n"
                                   "calibration: {prompts: 5}\n")
    if before is not None:
        before()
    res = run_python([*launcher, "calibrate", "c.yaml", "--prompts", "prompts.txt",
                      *extra, "--", "sample.py", PROMPTS[0]], cwd=folder, timeout=300)
    if not check:
        return None, res
    assert res.returncode == 0, res.stderr
    return CalibrationLUT.load(folder / "lut.safetensors"), res


def start_ranks(worker, port: int, folder) -> None:
    """``worker(rank, 2, port, folder)`` in two processes forked from a server that has imported torch and taohooks
    (multiprocessing's forkserver; a spawned process paid ~6 s of CPU importing them). The server is started once
    per test process: its children have the environment, working directory and stdout/stderr of the first test
    that started it (not this test's capfd or monkeypatch.setenv): workers report through files in ``folder``."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "taohooks"])  # (for the server's start)
    mp.start_processes(worker, args=(2, port, str(folder)), nprocs=2, start_method="forkserver")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The LUT of one process on PROMPTS (made once: each calibration costs the suite two Python processes)."""
    lut, _ = calibrate(tmp_path_factory.mktemp("distributed") / "single")
    return lut


def test_two_process_calibration_equals_one_process(tmp_path, single):
    sharded, res = calibrate(tmp_path / "two", "--devices", "2")
    assert "rank 1/2: calibration prompt 2/5" in res.stderr and "(5 prompts, 2 ranks)" in res.stderr
    assert sharded.num_prompts == single.num_prompts == 5
    assert torch.equal(sharded.cos.count, single.cos.count) and torch.equal(sharded.ratio.count, single.ratio.count)
    for a, b in ((sharded.cos_mean, single.cos_mean), (sharded.cos_std, single.cos_std),
                 (sharded.ratio_mean, single.ratio_mean), (sharded.ratio_std, single.ratio_std)):
        assert float((a - b).abs().nan_to_num(0.0).max()) < 1e-6
    assert torch.equal(sharded.timesteps.nan_to_num(-1.0), single.timesteps.nan_to_num(-1.0))
    assert not list((tmp_path / "two").glob("*.part*"))  # the per-rank part files are gone
    # the error statistics too (they were dropped): rank 0 had prompts 1, 3, 5 and rank 1 prompts 2, 4
    assert sharded.deltas is not None and sharded.deltas.numel == single.deltas.numel
    assert torch.allclose(sharded.deltas.gram, single.deltas.gram[[0, 2, 4, 1, 3]], equal_nan=True)
    assert single.deltas.cross is not None  # (cond x uncond products: gathered with the rest)
    assert torch.allclose(sharded.deltas.cross, single.deltas.cross[[0, 2, 4, 1, 3]], equal_nan=True)


def test_data_parallel_calibration_under_torchrun(tmp_path, single):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m",
                "taohooks.cli")
    sharded, res = calibrate(tmp_path / "torchrun", "--data-parallel", launcher=launcher)
    assert "(5 prompts, 2 ranks)" in res.stderr
    assert torch.equal(sharded.cos.count, single.cos.count)
    assert float((sharded.ratio_mean - single.ratio_mean).abs().nan_to_num(0.0).max()) < 1e-6


# ---------------------------------------------------------------- sequence-parallel sampling
STEPS, TOKENS, DIM = 10, 8, 6


class Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.t = torch.nn.Linear(1, DIM)
        self.mix = torch.nn.Linear(DIM, DIM)

    def forward(self, x, t):
        return torch.tanh(self.mix(x) + self.t(t.reshape(1, 1) / 1000))


def sequence_parallel_forward(self, x, t):
    """Like Wan's usp_dit_forward: this rank's share of the tokens, then an all-gather."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local = Denoiser.forward(self, x.chunk(world, dim=0)[rank], t)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=0)


def sample(model):
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(1))
    for i in range(STEPS):
        t = torch.tensor([1000.0 * (1 - i / STEPS)])
        cond, uncond = model(x, t=t), model(x + 0.1, t=t)
        x = x - 0.1 * (uncond + 2.0 * (cond - uncond))
    return x


CONFIG = {"plan": {"window": [6, 8], "ratio": 1.0}}


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = Denoiser()
        model.forward = types.MethodType(sequence_parallel_forward, model)  # replaced after construction
        cache = TaoCache(config_from_dict(CONFIG))
        with cache.attach(model, STEPS, ("cond", "uncond")):
            out = sample(model)
        torch.save({"out": out, "counts": cache.hook.counts}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_ranks_take_the_same_decisions(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_worker, port, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["counts"] == r1["counts"] == {"cond": [7, 3], "uncond": [7, 3]}
    assert torch.equal(r0["out"], r1["out"])
    model = Denoiser()  # one process, no sequence parallelism: the same result
    cache = TaoCache(config_from_dict(CONFIG))
    with cache.attach(model, STEPS, ("cond", "uncond")):
        single = sample(model)
    assert torch.allclose(r0["out"], single, atol=1e-6)


def _calibrating_worker(rank, world, port, out_dir):
    """Three generations, a TaoCache attached for each (as the launcher re-attaches): the first calibrates the
    1-prompt LUT, the others skip with it. Rank 0's LUT write is slowed, as a large LUT's is."""
    import datetime
    import time

    from taohooks.taocache.calibration import CalibrationRecorder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:
            flush = CalibrationRecorder.flush

            def slow_flush(self, *args, **kwargs):
                time.sleep(1.0)
                return flush(self, *args, **kwargs)
            CalibrationRecorder.flush = slow_flush
        model = Denoiser()
        model.forward = types.MethodType(sequence_parallel_forward, model)
        config = config_from_dict({"lut": f"{out_dir}/lut.safetensors", "calibration": {"prompts": 1},
                                   "plan": {"window": [6, 8], "ratio": 1.0}})
        counts, outs = [], []
        for _ in range(3):
            cache = TaoCache(config)
            cache.shared_generations = True  # (what the wan integrations set)
            with cache.attach(model, STEPS, ("cond", "uncond")):
                outs.append(sample(model))
            counts.append(cache.hook.counts)
        torch.save({"outs": outs, "counts": counts}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_ranks_calibrate_then_skip_together(tmp_path):
    """Rank 1 read the LUT before rank 0 had written it, went on calibrating while rank 0 skipped, and their
    all-gathers paired the wrong calls: wrong outputs, then a hang (multi-GPU walkthrough, 2026-11-27)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_calibrating_worker, port, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["counts"] == r1["counts"] == [{"cond": [10, 0], "uncond": [10, 0]}] + 2 * [{"cond": [7, 3],
                                                                                         "uncond": [7, 3]}]
    assert all(torch.equal(a, b) for a, b in zip(r0["outs"], r1["outs"]))
    from taohooks.integrations.wan import shared_cache  # (wan22 makes its caches with it too)

    assert shared_cache(config_from_dict({})).shared_generations


def _unsaid_ranks_worker(rank, world, port, out_dir):
    from taohooks.runtime import messages

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    said = []
    messages.warning = lambda message, **kw: said.append(message)  # (this spawned process only)
    try:
        for setting in ("neither", "data_parallel", "shared_generations", "own", "shared"):
            calibration = {"prompts": 4, **({"ranks": setting} if setting in ("own", "shared") else {})}
            cache = TaoCache(config_from_dict({"lut": f"{out_dir}/{setting}.safetensors",
                                               "calibration": calibration}, f"{out_dir}/c.yaml"))
            if setting in ("data_parallel", "shared_generations"):
                setattr(cache, setting, True)
            with cache.attach(Denoiser(), STEPS, ("cond", "uncond")):
                pass
            said.append(f"-- {setting}")
        torch.save(said, f"{out_dir}/said{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_calibrating_in_a_group_that_says_neither_how_ranks_share_is_warned(tmp_path):
    """A torchrun job of the README's Python route whose script starts a process group: rank 1 calibrated its own
    prompts at full cost and none reached the LUT, without a word (DDP walkthrough, 2026-11-27)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_unsaid_ranks_worker, port, tmp_path)
    said = torch.load(tmp_path / "said0.pt")
    assert said[0].startswith(f"calibrating {tmp_path}/neither.safetensors in a process group of 2 ranks: only rank "
                              "0's generations are added") and f"set calibration.ranks: own in {tmp_path}/c.yaml" \
        in said[0]
    assert said[1:] == ["-- neither", "-- data_parallel", "-- shared_generations", "-- own", "-- shared"]


def test_data_parallel_calibration_of_a_sequence_parallel_run_is_refused(tmp_path):
    """--devices sharded prompts over the ranks of a --ulysses_size run, whose ranks share one prompt (review,
    2026-11-27): refused, naming both."""
    from pathlib import Path

    script = Path(__file__).parent / "fixtures" / "official_like" / "wan" / "generate.py"
    (tmp_path / "c.yaml").write_text("integration: wan\nlut: lut.safetensors\ncalibration: {prompts: 2}\n"
                                     "plan: {budget: 2, min_step: 5}\n")
    (tmp_path / "p.txt").write_text("A red fox in snow.\nA blue whale under the sea.\n")
    res = run_python(["-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "p.txt",
                      "--devices", "2", "--", str(script), "--task", "t2v-1.3B", "--prompt", "x", "--sample_steps",
                      "10", "--ulysses_size", "2"], cwd=tmp_path, timeout=300)
    assert res.returncode != 0 and "this run is sequence-parallel (sp_size 2" in res.stderr
    assert not (tmp_path / "lut.safetensors").exists()


GROUP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from taohooks.testbed import sampling
    from taohooks.testbed.model import VideoDiT, VideoDiTConfig
    dist.init_process_group("gloo")  # the script's own group, from torchrun's variables
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VideoDiT(VideoDiTConfig(dim=32, depth=2, num_heads=2))
    sampling.sample(model, [sys.argv[1]], [10000], steps=6)
    dist.destroy_process_group()
""")


def test_ranks_own_under_a_scripts_group_without_data_parallel_is_refused(tmp_path):
    """calibration.ranks: own with a script that starts its group, under torchrun without --data-parallel: every
    rank ran every line and added it, then a misleading "2 clips" error (review, 2026-11-27). Refused, naming
    --data-parallel."""
    import os

    (tmp_path / "sample.py").write_text(GROUP_SCRIPT)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "c.yaml").write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 2, "
                                     "ranks: own}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "prompts.txt",
                          "--", "sample.py", PROMPTS[0]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert "calibration.ranks: own, but taocache calibrate without --data-parallel runs every prompt line" in res.stderr
    assert not (tmp_path / "lut.safetensors").exists()


def test_calibration_under_torchrun_without_data_parallel_is_refused(tmp_path):
    """Under torchrun without --data-parallel, a script that starts no process group had every process calibrate
    the same prompt lines into the one LUT (duplicated prompts; multi-GPU walkthrough, 2026-11-27)."""
    import os

    folder = tmp_path / "tr"
    folder.mkdir()
    (folder / "sample.py").write_text(SCRIPT)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (folder / "c.yaml").write_text("integration: testbed\nlut: lut.safetensors\ncalibration: {prompts: 2}\n")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # what torchrun gives rank 0
    res = run_python(["-m", "taohooks.cli", "calibrate", "c.yaml", "--prompts", "prompts.txt",
                      "--", "sample.py", PROMPTS[0]], cwd=folder, timeout=300,
                     env=env)
    assert res.returncode != 0
    assert "this process is one of 2 (WORLD_SIZE=2: torchrun) and the script started no process group" in res.stderr
    assert "add --data-parallel" in res.stderr and not (folder / "lut.safetensors").exists()


def test_part_files_of_other_prompt_lines_are_not_resumed_and_go_once_the_lut_is_complete(tmp_path, single):
    """An interrupted --devices run's part files were resumed into a LUT begun again on another prompts file (its
    first lines never ran, two old prompts taken instead; multi-GPU walkthrough, 2026-11-27)."""
    from pathlib import Path

    from taohooks.launcher.prompt_calibration import _part_name

    lut = single
    folder = tmp_path / "new"
    old_lines = ["a cyan circle moving left"] * 5
    stale = _part_name(Path(folder / "lut.safetensors"), 0, 2, 0, old_lines)
    again, res = calibrate(folder, "--devices", "2", before=lambda: stale.write_bytes(lut.to_bytes()))
    assert f"{stale.name}: of a run on other prompt lines)" in res.stderr and "resuming" not in res.stderr
    assert "rank 0/2: calibration prompt 1/5" in res.stderr  # from the first line
    assert again.num_prompts == 5 and not stale.exists() and f"removed {stale.name}" in res.stderr


def test_only_rank_0_removes_stale_part_files_when_every_rank_runs_the_loop(tmp_path, monkeypatch, single):
    """Under Wan's own group (no --devices) every rank runs the calibration loop; each removed the stale part files,
    racing, and all but one without the notice (review, 2026-11-27). The rank comes from torchrun's RANK here."""
    from pathlib import Path

    from taohooks.launcher.prompt_calibration import _part_name

    lut = single
    for rank in (1, 0):
        folder = tmp_path / f"rank{rank}"
        stale = _part_name(Path(folder / "lut.safetensors"), 0, 2, 0, ["a cyan circle moving left"] * 5)
        monkeypatch.setenv("RANK", str(rank))
        again, res = calibrate(folder, before=lambda: stale.write_bytes(lut.to_bytes()))
        assert again.num_prompts == 5
        assert stale.exists() == (rank == 1) and (f"removed {stale.name}" in res.stderr) == (rank == 0)


def _reducing_worker(rank, world, port, out_dir):
    from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec
    from taohooks.runtime.distributed import all_reduce_lut
    from taohooks.taocache.lut import LUTMismatchError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        recorder = CalibrationRecorder(identity={"shift": 3.0 if rank == 0 else 5.0})
        with DenoiserHook(LoopSpec(STEPS, ("cond", "uncond")), [recorder]).attach(Denoiser()) as hook:
            hook.new_sample()
            sample(hook.module)
        try:
            all_reduce_lut(recorder.lut())
            said = None
        except LUTMismatchError as exc:
            said = str(exc)
        torch.save(said, f"{out_dir}/said{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_lut_refuses_ranks_that_calibrated_different_runs(tmp_path):
    """Ranks of another shift were summed into one LUT labelled with rank 0's (and other step counts ended the job
    inside gloo), where merge refuses the same pair (multi-GPU walkthrough, 2026-11-27): every rank says it now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_reducing_worker, port, tmp_path)
    said = [torch.load(tmp_path / f"said{r}.pt") for r in (0, 1)]
    assert said[0] == said[1] == ("all_reduce_lut: cannot merge: identity 'shift' is 3.0 in rank 0's LUT and 5.0 in "
                                  "rank 1's LUT: the ranks calibrated different runs")


def test_a_part_file_of_another_model_is_refused_with_the_way_forward(tmp_path, single):
    """It was refused naming the difference only (multi-GPU walkthrough, 2026-11-27)."""
    import dataclasses
    from pathlib import Path

    from taohooks.launcher.prompt_calibration import _part_name

    lut = single
    folder = tmp_path / "new"
    part = _part_name(Path(folder / "lut.safetensors"), 1, 2, 0, PROMPTS)
    other = dataclasses.replace(lut, identity={**lut.identity, "architecture": "0123456789ab"})
    _, res = calibrate(folder, "--devices", "2", before=lambda: part.write_bytes(other.to_bytes()), check=False)
    assert res.returncode != 0 and f"{part.name} was calibrated with architecture '0123456789ab'" in res.stderr
    assert "remove the part files (lut.part*-of-2-*.safetensors) to start over" in res.stderr


def test_why_a_part_file_is_not_resumed_is_said_for_every_naming_of_the_history():
    from pathlib import Path

    from taohooks.launcher.prompt_calibration import _why_not_resumed

    lut = Path("/x/lut.safetensors")
    said = {name: _why_not_resumed(lut.with_name(name), lut, 2, 0, "00000000") for name in (
        "lut.part0-of-4-from3.safetensors", "lut.part0-of-2-from3.safetensors", "lut.part0-of-2-from0.safetensors",
        "lut.part0-of-2.safetensors", "lut.part0-of-2-from0-abcd1234.safetensors")}
    assert said == {"lut.part0-of-4-from3.safetensors": "of a run on 4 processes (this one: 2)",  # (not "the name")
                    "lut.part0-of-2-from3.safetensors": "of a run that began at 3 prompts (the LUT holds 0 now)",
                    "lut.part0-of-2-from0.safetensors": "named by an earlier taohooks, before the prompt lines were "
                                                        "part of the name",
                    "lut.part0-of-2.safetensors": "named by an earlier taohooks, before the prompt count and lines "
                                                  "were part of the name",
                    "lut.part0-of-2-from0-abcd1234.safetensors": "of a run on other prompt lines"}


class _OneStreamMoves(torch.nn.Module):
    """Outputs that move in one stream only (``moving``); the other stream's never change."""

    def __init__(self, moving):
        super().__init__()
        self.moving = moving

    def forward(self, x, timestep, stream):
        return torch.full((1, 4), 0.9 ** float(timestep.reshape(-1)[0]) if stream == self.moving else 0.5)


def _still_stream_worker(rank, world, port, out_dir):
    from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec
    from taohooks.runtime.distributed import all_reduce_lut

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        recorder, loop = CalibrationRecorder(), LoopSpec(6, ("cond", "uncond"))
        with DenoiserHook(loop, [recorder]).attach(_OneStreamMoves(loop.streams[rank])) as hook:
            hook.new_sample()
            for t in range(6):
                for s in loop.streams:
                    hook.module(None, timestep=torch.tensor([float(t)]), stream=s)
        all_reduce_lut(recorder.lut()).save(f"{out_dir}/lut{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_ranks_still_in_different_streams_reduce_to_a_readable_lut(tmp_path):
    """Rank 0's prompt moved only in its cond stream, rank 1's only in its uncond stream: the reduced LUT held 2
    prompts, 0 still, and 1 value at its fullest step, which the loader called corrupt (third review, 2026-11-28:
    left open). still_prompts is recomputed from the summed counts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_still_stream_worker, port, tmp_path)
    for r in (0, 1):
        lut = CalibrationLUT.load(tmp_path / f"lut{r}.safetensors")
        assert (lut.num_prompts, lut.still_prompts, int(lut.cos.count.max())) == (2, 1, 1)
