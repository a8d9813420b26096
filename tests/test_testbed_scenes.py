"""Fast tests of the scenes testbed (issue 15): data, recogniser, model size, sampling, resumable training."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from taohooks.testbed import scenes, scenes_recognizer, scenes_sampling, train_scenes
from taohooks.testbed.model import VideoDiT, num_parameters
from taohooks.testbed.schedules import DDPMSchedule, flow_interpolate
from taohooks.runtime.loop import LoopSpec
from prewarmed import run_python

TINY = ["--kind", "flow", "--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "2", "--warmup", "2",
        "--log-every", "2", "--save-every", "2", "--keep-every", "0"]


# ---------------------------------------------------------------- data
def test_prompt_grammar_roundtrip():
    prompts = scenes.all_prompts()
    assert len(prompts) == 432 and len(set(prompts)) == 432
    for p in prompts:
        assert scenes.ScenePrompt.from_text(p.text) == p
    assert scenes.ScenePrompt(0, 0, 0, 1, 0).text == "a red circle moving left over noise"
    assert scenes.ScenePrompt(4, 3, 1, 3, 1).text == "a blue square moving down, with 2 other objects over stripes"
    assert scenes.ScenePrompt(1, 1, 0, 2, 2).text == "a yellow circle moving right, with 1 other object over gradient"
    with pytest.raises(ValueError, match="cannot parse scene prompt"):
        scenes.ScenePrompt.from_text("a red circle moving left")
    with pytest.raises(ValueError, match="ScenePrompt.count"):
        scenes.ScenePrompt(0, 0, 0, 4, 0)
    ids = scenes.prompt_ids([scenes.ScenePrompt(5, 3, 1, 3, 2), None])
    assert ids.tolist() == [[5, 3, 1, 2, 2], [-1, -1, -1, -1, -1]]


def test_render_deterministic_in_range_and_seed_decides_layout():
    p = scenes.ScenePrompt(2, 1, 1, 3, 1)
    a, b = scenes.render(p, 7), scenes.render(p, 7)
    assert a.shape == (3, 8, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # the seed moves every object: subject start positions over 40 seeds cover most of the frame
    starts = np.array([[o.cx[0], o.cy[0]] for s in range(40) for o in scenes.layout(p, s)[0][-1:]])
    assert np.ptp(starts[:, 0]) > 12 and np.ptp(starts[:, 1]) > 16
    # and different seeds give clearly different clips (not just jitter): mean |diff| > 0.1 for every pair
    clips = [scenes.render(p, s) for s in range(6)]
    diffs = [np.abs(clips[i] - clips[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 0.1


def test_objects_separated_with_distinct_colours():
    for seed in range(30):
        p = scenes.ScenePrompt(seed % 6, seed % 4, seed % 2, 3, seed % 3)
        objects, _ = scenes.layout(p, seed)
        assert len(objects) == 3 and objects[-1].colour == p.colour
        assert len({o.colour for o in objects}) == 3
        assert scenes._separated(objects)
        for o in objects:  # every object inside the frame in every frame
            assert (o.cx - o.radius >= -0.5).all() and (o.cx + o.radius <= 31.5).all()


def test_pairs_are_disjoint_and_spread():
    ev, val, cal = scenes.eval_pairs(64), scenes.validation_pairs(64), scenes.calibration_pairs(20)
    assert {s for _, s in ev}.isdisjoint({s for _, s in val}) and min(s for _, s in ev) >= 10_000
    for attr, n in (("colour", 6), ("direction", 4), ("shape", 2), ("count", 3), ("background", 3)):
        assert len({getattr(p, attr) for p, _ in ev}) == n
    assert all(1000 <= s < 10_000 for _, s in cal)


# ---------------------------------------------------------------- recogniser
def test_recogniser_is_right_on_clean_clips():
    rng = np.random.default_rng(3)
    prompts = [scenes.random_prompt(rng) for _ in range(120)]
    seeds = [int(rng.integers(30_000)) for _ in prompts]
    acc = scenes_recognizer.accuracy(scenes.render_batch(prompts, seeds), prompts)
    assert acc["overall"] == 1.0 and acc["n"] == 120


def test_recogniser_rejects_wrong_prompts():
    p = scenes.ScenePrompt(0, 0, 1, 2, 1)  # red square left, 2 objects, stripes
    clip = scenes.render(p, 11)
    wrong = {
        "colour": scenes.ScenePrompt(3, 0, 1, 2, 1), "direction": scenes.ScenePrompt(0, 1, 1, 2, 1),
        "shape": scenes.ScenePrompt(0, 0, 0, 2, 1), "count": scenes.ScenePrompt(0, 0, 1, 3, 1),
        "background": scenes.ScenePrompt(0, 0, 1, 2, 2),
    }
    assert scenes_recognizer.recognize(clip, p).ok
    for attr, q in wrong.items():
        r = scenes_recognizer.recognize(clip, q)
        assert not getattr(r, attr) and not r.ok, attr
    assert not scenes_recognizer.recognize(np.full(scenes.CLIP_SHAPE, -0.5, np.float32), p).colour
    with pytest.raises(ValueError, match="scenes clip of shape"):
        scenes_recognizer.recognize(np.zeros((3, 8, 16, 16)), p)


# ---------------------------------------------------------------- model
def test_default_model_size_and_tokens():
    model = VideoDiT(train_scenes.scenes_config("flow"))
    assert 4_000_000 <= num_parameters(model) <= 8_000_000
    assert num_parameters(model) == 6_487_744
    assert model.grid == (8, 4, 4)  # 8x8 patches of 32x32 frames: 128 tokens


def test_sampling_loop_shape_and_noise_reproducible():
    torch.manual_seed(0)
    model = VideoDiT(train_scenes.scenes_config("flow", dim=32, depth=1, heads=2)).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[2][:, 0].tolist()))
    pairs = scenes.eval_pairs(2)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    out = scenes_sampling.sample_flow(model, prompts, seeds, steps=3)
    assert out.shape == (2, 3, 8, 32, 32)
    assert len(calls) == 6 and calls[1] == [-1, -1]  # cond, then uncond, per step (Wan2.1)
    n1 = scenes_sampling.initial_noise(prompts, seeds)
    n2 = scenes_sampling.initial_noise(prompts[1:], seeds[1:])
    assert torch.equal(n1[1], n2[0])



class _Velocity(torch.nn.Module):
    """A flow model ``v = (x - target) / sigma`` (or 0): its trajectories are straight lines to ``target``
    (``sigmas``: the scheduler's sigma of each of its integer timesteps)."""

    def __init__(self, target=None, sigmas=None):
        super().__init__()
        self.anchor, self.target, self.sigmas, self.timesteps = torch.nn.Parameter(torch.zeros(1)), target, sigmas, []

    def forward(self, x, timestep, ids):
        self.timesteps.append(float(timestep[0]))
        return torch.zeros_like(x) if self.target is None else (x - self.target) / self.sigmas[float(timestep[0])]


def test_sdedit_noises_the_clips_to_the_first_remaining_step_and_runs_the_rest():
    """With a zero velocity the latents never move: the output is the start, ``(1 - s) init + s noise`` at the
    sigma of step ``round(steps * (1 - strength))``; the calls are the remaining steps' (cond + uncond each)."""
    pairs = scenes.eval_pairs(2)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    init = torch.from_numpy(scenes.render_batch(prompts, seeds))
    model = _Velocity()
    out = scenes_sampling.sample_flow(model, prompts, seeds, steps=10, init=init, strength=0.3)
    sched = scenes_sampling.make_flow_scheduler(scenes_sampling.DEFAULT_FLOW_SHIFT)
    sched.set_timesteps(10)
    sigma = float(sched.sigmas[7])
    expected = ((1 - sigma) * init + sigma * scenes_sampling.initial_noise(prompts, seeds)).clamp(-1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert model.timesteps == [float(t) for t in sched.timesteps[7:] for _ in range(2)]
    # a straight-line field to init: from any start UniPC lands on it
    straight = _Velocity(init, {float(t): float(s) for t, s in zip(sched.timesteps, sched.sigmas)})
    assert torch.allclose(scenes_sampling.sample_flow(straight, prompts, seeds, steps=10, init=init, strength=0.5,
                                                      guidance=1.0), init, atol=1e-4)
    with pytest.raises(ValueError, match="strength 0"):
        scenes_sampling.sample_flow(model, prompts, seeds, steps=10, init=init, strength=0)
    with pytest.raises(ValueError, match="init has shape"):
        scenes_sampling.sample_flow(model, prompts, seeds, steps=10, init=init[:1], strength=0.5)


# ---------------------------------------------------------------- training
def test_resume_is_exact_and_checkpoint_is_half(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_scenes.main([*TINY, "--steps", "4", "--out", str(a)])
    train_scenes.main([*TINY, "--steps", "2", "--out", str(b)])
    train_scenes.main([*TINY, "--steps", "4", "--out", str(b), "--resume", str(tmp_path / "b.state.pt")])
    wa, wb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert wa["final.linear.weight"].dtype == torch.float16
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["steps_done"] == 4 and summary["final"] is True
    model = VideoDiT.from_pretrained(b)  # loads (as float32) through the ordinary entry point
    assert model.config.height == 32 and model.config.attribute_sizes == scenes.ATTRIBUTE_SIZES


def test_clips_rendered_from_their_draws_with_torch_are_the_numpy_clips():
    """scenes_render (the training device's renderer) makes scenes.render's clips to the bit on the CPU, for
    every background, object count and shape, from draws packed on the CPU."""
    from taohooks.testbed import scenes_render

    rng = np.random.default_rng(11)
    prompts, seeds = scenes.random_training_pairs(rng, 96)
    assert {(p.background, p.count, p.shape) for p in prompts} >= {(b, 1, 0) for b in range(3)} | {(0, 3, 1)}
    params = scenes_render.scene_params(prompts, seeds)
    assert params["present"].sum().item() == sum(p.count for p in prompts)
    packed = scenes_render.pack_params(params)  # what a worker process hands over: one tensor
    assert packed.shape == (96, 133) and packed.dtype == torch.float64
    unpacked = scenes_render.unpack_params(packed)
    assert all(unpacked[k].dtype == v.dtype and torch.equal(unpacked[k], v) for k, v in params.items())
    clips = scenes_render.render_params(unpacked)
    assert clips.dtype == torch.float32 and torch.equal(clips, torch.from_numpy(scenes.render_batch(prompts, seeds)))
    with pytest.raises(ValueError, match=r"\[132\] values a clip, expected \[133\]"):
        scenes_render.unpack_params(packed[:, :132])


def test_a_device_renderer_that_differs_falls_back_to_the_cpu_clips(monkeypatch, capsys):
    """The check a GPU run makes before training on device-rendered clips: passed, it keeps --render device;
    failed (here: clips off by 1e-3), the run renders on the CPU instead, and the log says why."""
    trainer = train_scenes.Trainer(train_scenes.parse_args([*TINY, "--steps", "1", "--render", "device",
                                                            "--out", "w.safetensors"]))
    assert train_scenes.check_device_render(trainer, n=4) == 0.0 and trainer.args.render == "device"
    monkeypatch.setattr(train_scenes, "render_params", lambda p: scenes_render_shifted(p))
    assert train_scenes.check_device_render(trainer, n=4) > 1e-5 and trainer.args.render == "cpu"
    assert "falling back to --render cpu" in capsys.readouterr().out


def scenes_render_shifted(params):
    from taohooks.testbed import scenes_render

    return scenes_render.render_params(params) + 1e-3


def test_training_on_device_rendered_clips_is_training_on_the_cpu_clips(tmp_path):
    """--render device (the draws made on the CPU, the pixels on the training device) trains on the same clips:
    on the CPU the same weights to the bit; the summary records where the clips were made."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_scenes.main([*TINY, "--steps", "3", "--out", str(a)])
    train_scenes.main([*TINY, "--steps", "3", "--render", "device", "--out", str(b)])
    wa, wb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "b.json").read_text())["render"] == "device"


def test_resume_without_the_hyperparameters_continues_the_same_run(tmp_path, capsys):
    """``--resume`` alone takes lr/warmup/batch/... from the state (it once fell back to the defaults:
    a run at lr 4e-4 continued at 5e-4); one given differently is said."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run = [*TINY, "--lr", "1e-3", "--warmup", "1", "--ema", "0.9", "--sigma-shift", "3"]
    train_scenes.main([*run, "--steps", "4", "--out", str(a)])
    train_scenes.main([*run, "--steps", "2", "--out", str(b)])
    train_scenes.main([*TINY, "--steps", "4", "--out", str(b), "--resume", str(tmp_path / "b.state.pt")])
    wa, wb = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["lr"] == 1e-3 and summary["sigma_shift"] == 3.0
    capsys.readouterr()
    train_scenes.main([*TINY, "--lr", "2e-3", "--steps", "5", "--out", str(b), "--resume", str(tmp_path / "b.state.pt")])
    assert "resume: changed --lr 0.002 (the run at" in capsys.readouterr().out


def test_sigma_shift_moves_training_sigmas_as_the_sampler_moves_its_steps():
    """shift 3: s = 1/2 -> 3/4 and s = 1/4 -> 1/2 (the sampler's flow_shift formula); 0 and 1 stay; 1 is the
    identity; the scheduler's own sigmas are the shifted uniform grid."""
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(train_scenes.shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert train_scenes.shift_sigmas(s, 1.0) is s
    sched = scenes_sampling.make_flow_scheduler(3.0)
    sched.set_timesteps(50)
    grid = torch.linspace(1.0, 1.0 / 1000, 51, dtype=torch.float64)[:-1]  # diffusers' unshifted flow sigmas
    assert torch.allclose(sched.sigmas[:50].double(), train_scenes.shift_sigmas(grid, 3.0), atol=1e-6)
    with pytest.raises(SystemExit):
        train_scenes.parse_args([*TINY, "--steps", "2", "--sigma-shift", "0", "--out", "w.safetensors"])
    with pytest.raises(SystemExit):
        train_scenes.parse_args(["--kind", "eps", *TINY[2:], "--steps", "2", "--sigma-shift", "3", "--out", "w.safetensors"])


def test_background_weights_change_only_the_backgrounds_draws(tmp_path, capsys):
    """Without weights the prompts are the uniform draws they always were (so earlier runs resume and chain
    bit for bit); with ``0,1,0`` every background is stripes, with ``1,2,1`` about half; the weights are part of
    the run (summary, ``--resume`` alone keeps them) and nonsense is a parser error."""
    rng, old = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(50):  # the draws before --background-weights existed: count, background, then the rest
        count, background = int(old.integers(1, 4)), int(old.integers(3))
        expected = scenes.ScenePrompt(*[int(old.integers(n)) for n in scenes.ATTRIBUTE_SIZES[:3]],
                                      count=count, background=background)
        assert scenes.random_prompt(rng) == expected
    prompts, _ = scenes.random_training_pairs(np.random.default_rng(0), 200, [0.0, 1.0, 0.0])
    assert {p.background for p in prompts} == {scenes.BACKGROUNDS.index("stripes")}
    p = train_scenes.background_probabilities([1, 2, 1])
    assert p == [0.25, 0.5, 0.25]
    prompts, _ = scenes.random_training_pairs(np.random.default_rng(0), 4000, p)
    share = np.mean([q.background == 1 for q in prompts])
    assert 0.47 < share < 0.53
    assert all(0 <= q.count - 1 < 3 for q in prompts)
    a = tmp_path / "a.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--background-weights", "0,1,0", "--out", str(a)])
    assert "background_weights=0,1,0" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["background_weights"] == [0.0, 1.0, 0.0]
    train_scenes.main([*TINY, "--steps", "4", "--out", str(a), "--resume", str(tmp_path / "a.state.pt")])
    assert json.loads((tmp_path / "a.json").read_text())["background_weights"] == [0.0, 1.0, 0.0]
    trainer = train_scenes.Trainer(train_scenes.parse_args([*TINY, "--steps", "2", "--background-weights", "0,1,0",
                                                            "--out", str(tmp_path / "b.safetensors")]))
    _, ids = next(trainer.batches())
    assert set(ids[:, 4].tolist()) <= {1, scenes.NULL_ID}
    for bad in ("1,2", "1,-1,1", "0,0,0", "1,nan,1", "a,b,c"):
        with pytest.raises(SystemExit):
            train_scenes.parse_args([*TINY, "--steps", "2", "--background-weights", bad, "--out", "w.safetensors"])
    assert "one per background (noise, stripes, gradient)" in capsys.readouterr().err


def test_training_draws_are_the_cpu_stream_on_the_cpu_and_one_seed_draw_on_an_accelerator():
    """On the CPU a step draws from the run's generator itself (CPU runs and resumes unchanged: the loss is the one
    of the draws made in the order noise, then sigmas); on an accelerator it costs the run's generator one draw,
    and the same generator state gives the same draws."""
    model = VideoDiT(train_scenes.scenes_config("flow", dim=32, depth=1, heads=2)).eval()
    x0, ids = train_scenes.make_batch(np.random.default_rng(0), 2)
    ddpm = DDPMSchedule()
    loss = train_scenes.loss_fn("flow", model, x0, ids, ddpm, torch.Generator().manual_seed(7), 3.0)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = train_scenes.shift_sigmas(torch.rand(2, generator=gen), 3.0)
    expected = (model(flow_interpolate(x0, noise, sigma), sigma * 1000.0, ids).float() - (noise - x0)).pow(2).mean()
    assert torch.equal(loss, expected)
    assert train_scenes.step_generator(gen, torch.device("cpu")) is gen
    if not torch.cuda.is_available():
        return
    dev = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(1000, generator=train_scenes.step_generator(gen, dev), device=dev)
    b = torch.randn(1000, generator=train_scenes.step_generator(torch.Generator().manual_seed(7), dev), device=dev)
    assert a.device == dev and torch.equal(a, b)
    gen2 = torch.Generator().manual_seed(7)
    torch.randint(0, 2 ** 63 - 1, (1,), generator=gen2)
    assert torch.equal(gen.get_state(), gen2.get_state())


def test_newest_checkpoint_is_the_one_with_most_steps_behind_it(tmp_path):
    """The device script's choice of --init: a chained run counts its previous runs' steps; a missing or
    unreadable file is passed over (a stale carried copy once stood in front of newer committed weights)."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    train_scenes.main([*TINY, "--steps", "3", "--out", str(first)])
    train_scenes.main([*TINY, "--steps", "2", "--out", str(second), "--init", str(first)])
    assert (train_scenes.trained_steps(first), train_scenes.trained_steps(second)) == (3, 5)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert train_scenes.newest_checkpoint([first, tmp_path / "missing.safetensors", junk, second]) == str(second)
    assert train_scenes.newest_checkpoint([second, first]) == str(second)
    assert train_scenes.newest_checkpoint([first, first.with_name("copy.safetensors")]) == str(first)
    assert train_scenes.newest_checkpoint([junk]) is None and train_scenes.trained_steps(junk) is None


def test_bad_resume_and_init_are_errors(tmp_path):
    out = tmp_path / "w.safetensors"
    with pytest.raises(SystemExit, match="--resume .*nothing.state.pt: no such file"):
        train_scenes.main([*TINY, "--steps", "2", "--out", str(out), "--resume", str(tmp_path / "nothing.state.pt")])
    train_scenes.main([*TINY, "--steps", "2", "--out", str(out)])
    eps = [*TINY[:1], "eps", *TINY[2:]]
    with pytest.raises(SystemExit, match="kind 'flow', but --kind 'eps'"):
        train_scenes.main([*eps, "--steps", "3", "--out", str(out), "--resume", str(tmp_path / "w.state.pt")])
    wide = [*TINY[:2], "--dim", "64", *TINY[4:]]
    with pytest.raises(SystemExit, match="dim: file has 32, this run expects 64"):
        train_scenes.main([*wide, "--steps", "3", "--out", str(tmp_path / "x.safetensors"), "--init", str(out)])


# ---------------------------------------------------------------- sensitivity measurement
def test_sensitivity_measurement_runs_on_a_tiny_model():
    from taohooks.testbed import scenes_sensitivity

    torch.manual_seed(0)
    model = VideoDiT(train_scenes.scenes_config("flow", dim=32, depth=1, heads=2)).eval()
    with torch.no_grad():  # adaLN-Zero starts at a zero output; make the model do something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tm = scenes_sensitivity.SceneTestbedModel("tiny", model, steps=5)
    out = scenes_sensitivity.measure(tm, 2, [1, 3], [0.0, 0.05], 0.0, 2, 2, 2, calibration_n=2, log=lambda *a: None)
    assert out["noise"]["0.0"] == 100.0  # unchanged noise: the same clips (PSNR capped at 100 dB)
    assert out["noise"]["0.05"] < 100.0
    assert set(out["skip"]) == {"1", "3"} and all(v < 100.0 for v in out["skip"].values())
    assert len(out["cosine_by_step"]) == 5 and out["cosine_by_step"][0] is None
    assert -1.0 <= out["late_cosine"] <= 1.0



def test_sensitivity_cli_checks_the_device_before_loading(tmp_path, capsys):
    """``--device`` that this machine cannot use is an error before the checkpoint is read; on the CPU the
    CLI measures a checkpoint and records the device."""
    from taohooks.testbed import scenes_sensitivity

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(SystemExit, match="--device nonsense: not usable here"):
        scenes_sensitivity.main(["--weights", str(missing), "--device", "nonsense"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: not usable here"):
            scenes_sensitivity.main(["--weights", str(missing), "--device", "cuda"])
    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    out = tmp_path / "m.json"
    scenes_sensitivity.main(["--weights", str(weights), "--device", "cpu", "--n", "1", "--steps", "4",
                             "--skip-steps", "1", "--noise-change", "", "--budget", "0", "--batch-size", "1",
                             "--calibration-pairs", "1", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["n"] == 1 and set(record["skip"]) == {"1"}

# ---------------------------------------------------------------- exact-score control
def test_exact_control_denoises_to_its_components():
    from taohooks.testbed.scenes_exact import ExactSceneDenoiser

    model = ExactSceneDenoiser(per_prompt=4, tau=0.05)
    p = scenes.eval_pairs(1)[0][0]
    m, _ = model.components(p.ids())
    assert m.shape == (4, 3 * 8 * 32 * 32)
    s = 0.02
    noise = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    x = (1 - s) * m[2].float().view(1, 3, 8, 32, 32) + s * noise
    v = model(x, torch.tensor([s * 1000.0]), torch.from_numpy(scenes.prompt_ids([p])))
    x0 = (x - s * v).double().flatten()  # the posterior mean: all weight on component 2, then
    c = (1 - s) * 0.05 ** 2 / ((1 - s) ** 2 * 0.05 ** 2 + s ** 2)  # the Gaussian's pull towards x
    assert torch.allclose(x0, m[2] + c * s * noise.double().flatten(), atol=1e-4)
    clips = scenes_sampling.sample_flow(model, [p], [10_000], steps=10, guidance=1.0)
    nearest = ((m - clips[0].double().flatten()) ** 2).mean(1).min()
    assert nearest < 0.01 and scenes_recognizer.recognize(clips[0], p).ok


def test_eps_loop_is_one_batched_call_per_step():
    torch.manual_seed(0)
    model = VideoDiT(train_scenes.scenes_config("eps", dim=32, depth=1, heads=2)).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[2][:, 0].tolist()))
    pairs = scenes.eval_pairs(2)
    out = scenes_sampling.sample_eps(model, [p for p, _ in pairs], [s for _, s in pairs], steps=3)
    assert out.shape == (2, 3, 8, 32, 32) and model.config.out_channels == 6
    assert len(calls) == 3 and calls[0][:2] == [-1, -1] and -1 not in calls[0][2:]  # cat([uncond, cond])


def test_training_stops_and_saves_on_sigterm_and_after_max_minutes(tmp_path, capsys):
    """``timeout`` (SIGTERM) and ``--max-minutes`` end a run after its current step with a save that
    ``--resume`` continues from: no step done is lost, and the summary says the run is not final."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "w.safetensors"
    cmd = [sys.executable, "-m", "taohooks.testbed.train_scenes", *TINY, "--steps", "100000", "--save-every",
           "100000", "--save-minutes", "1000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step 4 "):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    summary = json.loads((tmp_path / "w.json").read_text())
    assert summary["final"] is False and summary["steps_done"] >= 4
    assert f"(step {summary['steps_done']}, stopped by SIGTERM)" in rest
    assert "SIGTERM: stopping after this step and saving it; a second one (after a second) aborts the save" in rest
    train_scenes.main([*TINY, "--steps", str(summary["steps_done"] + 2), "--out", str(out),
                       "--resume", str(tmp_path / "w.state.pt")])
    assert json.loads((tmp_path / "w.json").read_text())["steps_done"] == summary["steps_done"] + 2

    # with worker processes, the whole process group signalled (as `timeout` and Ctrl-C do): the workers
    # ignore it, the main process saves
    proc = subprocess.Popen([*cmd[:-2], "--workers", "1", "--out", str(tmp_path / "g.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step 4 "):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    assert "stopped by SIGTERM" in rest and json.loads((tmp_path / "g.json").read_text())["steps_done"] >= 4
    assert (tmp_path / "g.state.pt").is_file()

    # GNU timeout signals twice at once (the process, then its group): the repeat is the same request, not a
    # second one that ends the process before its last save (it did: the handler had restored the default)
    proc = subprocess.Popen([*cmd[:-2], "--out", str(tmp_path / "t.safetensors")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step 4 "):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.001)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, rest
    assert "stopped by SIGTERM" in rest and json.loads((tmp_path / "t.json").read_text())["steps_done"] >= 4

    train_scenes.main([*TINY, "--steps", "100000", "--max-minutes", "0.0001", "--out", str(tmp_path / "m.safetensors")])
    summary = json.loads((tmp_path / "m.json").read_text())
    assert summary["final"] is False and summary["steps_done"] < 100000
    assert "stopped after --max-minutes 0.0001" in capsys.readouterr().out

def test_a_periodic_save_records_the_training_time_up_to_it(tmp_path):
    """A process killed outright (SIGKILL: no last save) loses only the steps after its last periodic
    save, and the state of that save holds the training time up to it (it held 0.0 for a first run)."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "w.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "taohooks.testbed.train_scenes", *TINY, "--steps", "100000",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("saved step 4 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    state = train_scenes.read_state(str(tmp_path / "w.state.pt"))
    assert state["step"] >= 4 and state["wall"] > 0.0

@pytest.mark.parametrize("render", ["cpu", "device"])
def test_training_with_worker_processes_and_bf16(tmp_path, render):
    out = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--workers", "1", "--bf16", "--render", render, "--out", str(out)])
    summary = json.loads((tmp_path / "w.json").read_text())
    assert summary["steps_done"] == 2 and summary["workers"] == 1 and summary["bf16"] is True
    assert summary["render"] == render
    assert torch.isfinite(load_file(str(out))["final.linear.weight"].float()).all()


# ---------------------------------------------------------------- the bench on a scenes checkpoint
def test_bench_runs_a_scenes_checkpoint_with_its_own_prompts_and_recogniser(tmp_path, monkeypatch):
    """``taocache bench --models scenes`` (the checkpoint is still training: a tiny one stands in):
    the scenes prompts, sampler and recogniser, both TaoCache rules."""
    from taohooks.evaluation import testbed_model
    from taohooks.evaluation.bench import BenchConfig, run_bench

    weights = tmp_path / "scenes-flow.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(weights)])
    config = BenchConfig(models=["scenes"], methods=["taocache", "taocache-auto"], budgets=[0.2], steps=10,
                         eval_pairs=2, calibration_pairs=3, search_pairs=2, batch_size=2, lpips=False,
                         timing_repeats=1, output=str(tmp_path / "out"), strip_pairs=1,
                         weights={"scenes": str(weights)})  # a checkpoint of one's own (taocache bench --weights)
    records = run_bench(config, log=lambda *a: None)
    assert [(r["method"], r["model"]) for r in records] == [("full", "scenes"), ("taocache", "scenes"),
                                                             ("taocache-auto", "scenes")]
    full, tao, auto = records
    assert 0.0 <= full["prompt_accuracy"] <= 1.0 and tao["skipped_fraction"] == 0.2 == auto["skipped_fraction"]
    assert tao["predicted_psnr"] is not None and auto["psnr"] > 0
    monkeypatch.setattr(testbed_model, "weights_path", lambda name: weights)
    assert type(testbed_model.TestbedModel.load("scenes", 10)).__name__ == "SceneTestbedModel"


def test_bench_runs_a_scenes_eps_checkpoint_in_lattes_loop(tmp_path):
    """``--models scenes-eps``: the scenes task in Latte's loop (DDIM, one batched uncond + cond call per step;
    the issue's second official loop shape), TaoCache and TeaCache on it; a flow checkpoint is refused."""
    from taohooks.evaluation.bench import BenchConfig, run_bench
    from taohooks.evaluation.testbed_model import TestbedModel

    weights, flow = tmp_path / "scenes-eps.safetensors", tmp_path / "scenes-flow.safetensors"
    train_scenes.main([*TINY, "--kind", "eps", "--steps", "1", "--out", str(weights)])
    train_scenes.main([*TINY, "--steps", "1", "--out", str(flow)])
    tm = TestbedModel.load("scenes-eps", 10, weights)
    assert type(tm).__name__ == "SceneTestbedModel" and tm.sampler == "ddim"
    assert tm.loop() == LoopSpec(10, ("uncond", "cond"), split_batch=True)
    with pytest.raises(ValueError, match="a scenes flow checkpoint, not one for the testbed model 'scenes-eps' "
                                         r"\(scenes eps\)"):
        TestbedModel.load("scenes-eps", 10, flow)
    with pytest.raises(ValueError, match="a scenes eps checkpoint, not one for the testbed model 'scenes' "):
        TestbedModel.load("scenes", 10, weights)
    config = BenchConfig(models=["scenes-eps"], methods=["taocache", "teacache"], budgets=[0.2], steps=10,
                         eval_pairs=2, calibration_pairs=3, search_pairs=2, batch_size=2, lpips=False,
                         timing_repeats=1, output=str(tmp_path / "out"), strip_pairs=1, search_iterations=2,
                         weights={"scenes-eps": str(weights)})
    records = run_bench(config, log=lambda *a: None)
    assert [(r["method"], r["model"]) for r in records] == [("full", "scenes-eps"), ("taocache", "scenes-eps"),
                                                             ("teacache", "scenes-eps")]
    assert records[1]["skipped_fraction"] == 0.2 and records[1]["psnr"] > 0


def test_bench_weights_of_the_wrong_kind_or_missing_are_errors(tmp_path, capsys):
    from taohooks import cli
    from taohooks.evaluation.testbed_model import TestbedModel

    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    with pytest.raises(ValueError, match="a scenes flow checkpoint, not one for the testbed model 'flow'"):
        TestbedModel.load("flow", 10, weights)
    config = tmp_path / "bench.yaml"
    config.write_text(f"models: [scenes]\nmethods: [taocache]\noutput: {tmp_path / 'out'}\n")
    assert cli.main(["bench", str(config), "--weights", f"scenes={tmp_path / 'none.safetensors'}"]) == 1
    assert f"weights: scenes: no checkpoint file {tmp_path / 'none.safetensors'}" in capsys.readouterr().err
    assert cli.main(["bench", str(config), "--weights", "scenes"]) == 1
    assert "--weights: expected MODEL=PATH, got 'scenes'" in capsys.readouterr().err
    assert cli.main(["bench", str(config), "--weights", f"scenes={weights}", "--device", "nonsense"]) == 1
    assert "device: 'nonsense' is not usable here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cosine_time_schedule_anneals_over_the_wall_time(tmp_path):
    """``cosine-time`` warms up by steps like the others, then follows a cosine from the peak to 5% of it
    as the part of ``--max-minutes`` spent goes from 0 to 1 (clamped); without ``--max-minutes`` it is an error."""
    lr = train_scenes.lr_at
    assert lr(0, 1.0, 10, 100, "cosine-time", 0.9) == pytest.approx(0.1)      # warmup: by step
    assert lr(50, 1.0, 10, 100, "cosine-time", 0.0) == pytest.approx(1.0)
    assert lr(50, 1.0, 10, 100, "cosine-time", 0.5) == pytest.approx(0.525)   # 0.05 + 0.95 * 0.5
    assert lr(50, 1.0, 10, 100, "cosine-time", 1.0) == pytest.approx(0.05)
    assert lr(50, 1.0, 10, 100, "cosine-time", 7.0) == pytest.approx(0.05)
    assert lr(10, 1.0, 10, 100, "cosine", 0.9) == pytest.approx(1.0)          # step-based ignores the time
    with pytest.raises(SystemExit, match="cosine-time anneals over --max-minutes"):
        train_scenes.main([*TINY, "--steps", "1", "--schedule", "cosine-time", "--out", str(tmp_path / "w.safetensors")])


def test_cosine_time_run_anneals_after_its_warmup_and_ends_near_five_percent(tmp_path, monkeypatch, capsys):
    """A run under a fake clock (0.25 s per reading): the warmup by steps, then the logged learning rate
    starts at the peak when the warmup ends and falls to near 5% of it at --max-minutes; the log says how
    long each step waited for its batch."""
    import re

    class Clock:
        now = 1000.0

        def time(self):
            Clock.now += 0.25
            return Clock.now

    monkeypatch.setattr(train_scenes, "time", Clock())
    train_scenes.main([*TINY[:-6], "--log-every", "1", "--save-every", "1000", "--keep-every", "0", "--warmup", "2",
                       "--lr", "1e-3", "--steps", "100000", "--schedule", "cosine-time", "--max-minutes", "1",
                       "--out", str(tmp_path / "w.safetensors")])
    log = capsys.readouterr().out
    lrs = [float(x) for x in re.findall(r"lr ([0-9.e+-]+) s/step", log)]
    assert "(data " in log and len(lrs) > 10
    assert lrs[:3] == [pytest.approx(5e-4), pytest.approx(1e-3), pytest.approx(1e-3)]  # warmup; annealing starts
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:])) and 5e-5 <= lrs[-1] <= 1.2e-4


def test_cosine_time_cannot_be_resumed_and_max_minutes_must_be_positive(tmp_path):
    out = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--schedule", "cosine-time", "--max-minutes", "5", "--out", str(out)])
    with pytest.raises(SystemExit, match="cosine-time anneals over one process's --max-minutes and cannot be resumed"):
        train_scenes.main([*TINY, "--steps", "4", "--max-minutes", "5", "--out", str(out),
                           "--resume", str(tmp_path / "w.state.pt")])
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            train_scenes.parse_args([*TINY, "--steps", "2", "--max-minutes", bad, "--out", str(out)])


def test_a_run_from_init_draws_other_batches_than_the_run_behind_it(tmp_path):
    """Chained --init runs (a GPU session's calls) start their data and noise streams after the steps behind
    the weights, not at the same place as the run that wrote them."""
    out = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "3", "--out", str(out)])
    first = train_scenes.Trainer(train_scenes.parse_args([*TINY, "--steps", "3", "--out", str(out)]))
    chained = train_scenes.Trainer(train_scenes.parse_args([*TINY, "--steps", "3", "--out", str(tmp_path / "c.safetensors"),
                                                            "--init", str(out)]))
    assert (first.offset, chained.offset) == (0, 3)
    assert not torch.equal(train_scenes.make_batch(first.rng, 2)[0], train_scenes.make_batch(chained.rng, 2)[0])
    assert not torch.equal(torch.randn(4, generator=first.gen), torch.randn(4, generator=chained.gen))
    assert not torch.equal(next(iter(first.worker_stream()))[0], next(iter(chained.worker_stream()))[0])


def test_diagnose_passes_every_rendered_clip_and_reads_a_checkpoint(tmp_path, capsys):
    """On rendered clips every stripes, square and several-objects prompt passes its check (the evidence
    agrees with the recogniser); on a blank clip none does; the CLI runs a checkpoint and writes its JSON."""
    from taohooks.testbed import scenes_diagnose

    pairs = scenes.eval_pairs(24)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    rendered = torch.from_numpy(scenes.render_batch(prompts, seeds))
    out = scenes_diagnose.diagnose(rendered, rendered, prompts)
    assert out["accuracy"]["overall"] == 1.0
    for name in ("samples", "rendered"):
        for what, s in out[name].items():
            assert s["n"] > 0 and s["passing"] == s["n"], (name, what)
    blank = torch.zeros_like(rendered)
    dull = scenes_diagnose.diagnose(blank, rendered, prompts)["samples"]
    assert dull["stripe_share"]["passing"] == 0 and dull["square_corners"]["passing"] == 0
    assert dull["objects_when_2_or_3"]["max"] == 0.0
    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    scenes_diagnose.main(["--weights", str(weights), "--n", "2", "--steps", "3", "--out", str(tmp_path / "d.json")])
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["n"] == 2 and record["accuracy"]["n"] == 2 and "accuracy overall" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot load a testbed checkpoint"):
        scenes_diagnose.main(["--weights", str(tmp_path / "missing.safetensors")])
    scenes_diagnose.main(["--weights", str(weights), "--n", "2", "--steps", "4", "--strength", "0.5",
                          "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["strength"] == 0.5
    with pytest.raises(SystemExit):
        scenes_diagnose.main(["--weights", str(weights), "--strength", "0"])


def test_echoing_batches_reuse_the_last_batch_only_while_rendering_lags():
    """A source slower than the consumer: each fresh batch is handed out, then again up to max_echo times, then
    the consumer waits for the next; a source that keeps up: no batch twice. (The source is gated by the test, not
    timed: sleeps of 50-300 ms were the only guarantee, which a loaded machine need not keep.)"""
    import threading
    import time

    gates = [threading.Event() for _ in range(3)]

    def slow():
        for i, gate in enumerate(gates):
            gate.wait(30)
            yield i

    echo = train_scenes.EchoingBatches(slow(), max_echo=2)
    gates[0].set()
    assert [next(echo) for _ in range(3)] == [0, 0, 0]  # (batch 1 is not ready: 0 again, twice)
    gates[1].set()
    assert [next(echo) for _ in range(3)] == [1, 1, 1]  # (waited for it, then again twice)
    assert (echo.fresh, echo.echoed) == (2, 4)
    gates[2].set()
    fast = train_scenes.EchoingBatches(iter(range(100)), max_echo=2)
    deadline = time.monotonic() + 30
    while not fast._queue.full() and time.monotonic() < deadline:  # the filling thread ahead: 8 batches ready
        time.sleep(0.01)
    seen = [next(fast) for _ in range(5)]
    assert seen == [0, 1, 2, 3, 4] and fast.echoed == 0
    for it in (echo, fast):
        it.close()
        assert not it._thread.is_alive()


def test_echoing_batches_raise_their_sources_error():
    """A dead worker (the DataLoader raises in the filling thread) reaches the consumer, which used to wait
    for ever; so does the end of the source, and every later call raises again."""
    import threading

    def dying():
        yield 0
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")

    echo = train_scenes.EchoingBatches(dying(), max_echo=0)
    got, errors = [], []

    def consume():
        try:
            for _ in range(3):
                got.append(next(echo))
        except RuntimeError as e:
            errors.append(str(e))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(10)
    assert not consumer.is_alive() and got == [0] and errors == ["DataLoader worker (pid 123) is killed by signal: Killed."]
    with pytest.raises(RuntimeError, match="is killed"):
        next(echo)
    ended = train_scenes.EchoingBatches(iter([1, 2]), max_echo=0)
    assert list(ended) == [1, 2]
    echo.close()
    ended.close()


def test_training_with_workers_and_echo_exits(tmp_path):
    """In its own process, which must end: the filling thread and the rendering workers are stopped when the
    training ends (left running, they kept the interpreter's exit waiting)."""

    out = tmp_path / "w.safetensors"
    res = run_python(["-m", "taohooks.testbed.train_scenes", *TINY, "--steps", "4", "--workers",
                      "1", "--echo", "2", "--out", str(out)], timeout=90,
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert re.search(r"\(data [0-9.]+, echoed \d+ of 2\)", res.stdout) and "steps trained on a batch again" in res.stdout
    summary = json.loads((tmp_path / "w.json").read_text())
    assert summary["steps_done"] == 4 and summary["echo"] == 2 and 0 <= summary["echoed_steps"] <= 4
    with pytest.raises(SystemExit):
        train_scenes.parse_args([*TINY, "--steps", "2", "--echo", "2", "--out", str(out)])  # no --workers


@pytest.mark.parametrize("echo", ["0", "2"])
def test_an_error_in_training_with_workers_ends_the_process(tmp_path, echo):
    """An error in the training loop (here a simulated out-of-memory at step 3) ends the process with it: the
    rendering workers ignore SIGTERM, and left running they held the interpreter's exit for ever."""
    import subprocess
    import sys

    script = ("import sys; from taohooks.testbed import train_scenes as t\n"
              "orig = t.Trainer.train_step\n"
              "def failing(self, *a):\n"
              "    if self.step == 3: raise RuntimeError('CUDA out of memory (simulated)')\n"
              "    return orig(self, *a)\n"
              "t.Trainer.train_step = failing\n"
              "t.main(sys.argv[1:])")
    extra = ["--echo", echo] if echo != "0" else []
    res = subprocess.run([sys.executable, "-c", script, *TINY, "--steps", "10", "--save-every", "100", "--workers",
                          "1", *extra, "--out", str(tmp_path / "w.safetensors")], capture_output=True, text=True,
                         timeout=60, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "CUDA out of memory (simulated)" in res.stderr


def test_scenes_loss_per_sigma_and_as_trained(tmp_path, capsys):
    """A zero velocity costs |noise - x0|^2 at every sigma (exactly, on the module's own batches and noise); the
    CLI reads checkpoints, reports each shift's training loss and refuses bad lists."""
    from taohooks.testbed import scenes_loss

    data = scenes_loss.batches(3, 1, 2)
    x0 = data[0][0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    expected = float((noise - x0).pow(2).mean())
    got = scenes_loss.loss_per_sigma(_Velocity(), data, [0.1, 0.9], seed=3)
    assert got == pytest.approx([expected, expected], rel=1e-6)
    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    result = scenes_loss.main(["--weights", str(weights), "--sigmas", "0.2,0.8", "--batches", "1", "--batch-size", "2",
                               "--out", str(tmp_path / "l.json")])
    record = result["checkpoints"][str(weights)]
    assert len(record["per_sigma"]) == 2 and set(record["training_loss"]) == {"1", "3"} and record["steps"] == 1
    assert json.loads((tmp_path / "l.json").read_text())["clips"] == 2
    stripes = scenes_loss.batches(3, 2, 8, [0, 1, 0])
    assert all(set(ids[:, 4].tolist()) == {1} for _, ids in stripes)
    result = scenes_loss.main(["--weights", str(weights), "--batches", "1", "--batch-size", "2",
                               "--background-weights", "0,1,0"])
    assert result["background_weights"] == [0.0, 1.0, 0.0]
    for bad in (["--sigmas", "0,0.5"], ["--sigmas", "a"], ["--sigma-shift", "0"], ["--background-weights", "1,1"]):
        with pytest.raises(SystemExit):
            scenes_loss.main(["--weights", str(weights), *bad])


@pytest.mark.parametrize("kind", ["flow", "eps"])
def test_a_training_step_on_an_accelerator_mixes_in_no_cpu_tensor(monkeypatch, kind):
    """The GPU path without a GPU: the "meta" device stands in for it (an op mixing a CPU tensor, but a 0-dim one,
    into meta tensors raises, as a CPU/CUDA mix does). The draws, the rendering from packed draws, the DDPM
    tables, the loss, the optimizer and the EMA all stay on the device. (A generator cannot live on meta: the
    step's draws are made without one there, and it has no autocast.)"""
    assert_mixing_raises = pytest.raises(RuntimeError)
    with assert_mixing_raises:
        torch.ones(3, device="meta") + torch.ones(3)
    seeds_drawn = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: __import__("contextlib").nullcontext())  # none for meta
    monkeypatch.setattr(train_scenes, "step_generator",
                        lambda gen, device: seeds_drawn.append(torch.randint(0, 2 ** 63 - 1, (1,), generator=gen)))
    trainer = train_scenes.Trainer(train_scenes.parse_args(
        ["--kind", kind, *TINY[2:], "--steps", "2", "--render", "device", "--device", "meta", "--out", "w.safetensors"]))
    for _ in range(2):
        loss = trainer.train_step(train_scenes.make_batch(trainer.rng, 2, pixels=False))
    assert loss.device.type == "meta" and len(seeds_drawn) == 2
    assert {p.device.type for p in [*trainer.model.parameters(), *trainer.ema.model.parameters()]} == {"meta"}


# ---------------------------------------------------------------- review of the training script (2026-11-27)
def _state_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["step"]


def test_a_new_run_does_not_replace_an_earlier_run_at_the_same_out(tmp_path):
    """Repeating a command without --resume replaced the earlier run's weights and state at its first save."""
    out = tmp_path / "run.safetensors"
    train_scenes.main([*TINY, "--steps", "4", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"run.state.pt exists: another run's state; continue that run with --resume"):
        train_scenes.main([*TINY, "--steps", "2", "--out", str(out)])
    assert _state_step(tmp_path / "run.state.pt") == 4
    train_scenes.main([*TINY, "--steps", "6", "--out", str(out), "--resume", str(tmp_path / "run.state.pt")])
    assert _state_step(tmp_path / "run.state.pt") == 6  # continuing it is fine
    train_scenes.main([*TINY, "--steps", "2", "--out", str(out), "--overwrite"])
    assert _state_step(tmp_path / "run.state.pt") == 2  # and replacing it on purpose


@pytest.mark.parametrize("state, message", [("w.safetensors", "not a .safetensors or .json file"),
                                            ("w.json", "not a .safetensors or .json file"),
                                            ("folder", "is a directory")])
def test_state_and_out_are_checked_before_training(tmp_path, state, message):
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit, match=message):
        train_scenes.main([*TINY, "--steps", "2", "--out", str(tmp_path / "w.safetensors"),
                           "--state", str(tmp_path / state)])
    assert not (tmp_path / "w.safetensors").exists()


def test_resuming_a_state_does_not_replace_another_runs_weights_at_out(tmp_path):
    """``--resume S --state S`` skipped every check of ``--out``: another run's weights and summary there (here an
    eps run's) were replaced without --overwrite."""
    mine, theirs = tmp_path / "mine.safetensors", tmp_path / "theirs.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(mine)])
    train_scenes.main(["--kind", "eps", *TINY[2:], "--steps", "2", "--out", str(theirs)])
    before = theirs.read_bytes(), theirs.with_suffix(".json").read_text()
    state = str(tmp_path / "mine.state.pt")
    with pytest.raises(SystemExit, match=r"--out .*theirs.safetensors exists and is not the weights of the run "
                                         r"resumed from .*mine.state.pt \(another run wrote it"):
        train_scenes.main([*TINY, "--steps", "4", "--out", str(theirs), "--state", state, "--resume", state])
    assert (theirs.read_bytes(), theirs.with_suffix(".json").read_text()) == before
    assert _state_step(state) == 2
    train_scenes.main([*TINY, "--steps", "4", "--out", str(mine), "--resume", state])  # its own: continues
    assert _state_step(state) == 4 and json.loads(mine.with_suffix(".json").read_text())["steps_done"] == 4


def test_a_summary_is_this_runs_by_run_id_or_else_by_kind_seed_origin_and_step():
    state = {"kind": "flow", "hparams": {"seed": 0}, "previous": None, "step": 10, "run_id": "a"}
    assert train_scenes._same_run({"run_id": "a"}, state) is None
    assert "run_id differs" in train_scenes._same_run({"run_id": "b"}, state)
    legacy = {k: v for k, v in state.items() if k != "run_id"}  # written before run ids
    ok = {"kind": "flow", "seed": 0, "previous": None, "steps_done": 8}
    assert train_scenes._same_run(ok, legacy) is None
    assert "kind: 'eps'" in train_scenes._same_run({**ok, "kind": "eps"}, legacy)
    assert "seed: 1" in train_scenes._same_run({**ok, "seed": 1}, legacy)
    assert "began from" in train_scenes._same_run({**ok, "previous": {"total_steps": 5}}, legacy)
    assert "past the resumed state's step 10" in train_scenes._same_run({**ok, "steps_done": 12}, legacy)
    assert "no training summary" in train_scenes._same_run(None, legacy)
    before_hparams = {k: v for k, v in legacy.items() if k != "hparams"}  # states of 2026-11-26: the default seed
    assert train_scenes._same_run(ok, before_hparams) is None


def test_a_json_that_is_no_training_summary_is_called_so(tmp_path):
    weights = tmp_path / "a.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(weights)])
    (tmp_path / "new.json").write_text('{"my": "notes"}')
    state = str(tmp_path / "a.state.pt")
    with pytest.raises(SystemExit, match=r"new.json exists and is not the training summary of the run resumed from "
                                         r".*a.state.pt \(it holds no training summary of this script\)"):
        train_scenes.main([*TINY, "--steps", "4", "--out", str(tmp_path / "new.safetensors"), "--state", state,
                           "--resume", state])


def test_a_new_run_does_not_replace_a_json_file_at_its_summary_name(tmp_path):
    notes = tmp_path / "w.json"
    notes.write_text('{"my": "notes"}')
    with pytest.raises(SystemExit, match=r"w.json exists: another run's training summary; choose another --out, or "
                                         r"pass --overwrite"):
        train_scenes.main([*TINY, "--steps", "2", "--out", str(tmp_path / "w.safetensors")])
    assert notes.read_text() == '{"my": "notes"}' and not (tmp_path / "w.safetensors").exists()


def test_an_existing_state_is_named_as_the_state_option(tmp_path):
    train_scenes.main([*TINY, "--steps", "2", "--out", str(tmp_path / "a.safetensors")])
    with pytest.raises(SystemExit, match=r"a.state.pt exists: another run's state; continue that run with --resume "
                                         r".*a.state.pt, choose another --state, or pass --overwrite"):
        train_scenes.main([*TINY, "--steps", "2", "--out", str(tmp_path / "b.safetensors"),
                           "--state", str(tmp_path / "a.state.pt")])


def test_weights_given_to_resume_and_folders_given_as_checkpoints_are_named_so(tmp_path):
    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(weights)])
    with pytest.raises(SystemExit, match=r"--resume .*w.safetensors: a weights file, not a training state; --resume "
                                         r"takes the OUT.state.pt .* --init takes weights"):
        train_scenes.main([*TINY, "--steps", "4", "--out", str(tmp_path / "x.safetensors"), "--resume", str(weights)])
    for flag in ("--resume", "--init"):
        with pytest.raises(SystemExit, match=rf"{flag} {re.escape(str(tmp_path))}: a folder, not a"):
            train_scenes.main([*TINY, "--steps", "4", "--out", str(tmp_path / "y.safetensors"), flag, str(tmp_path)])


def test_warm_start_copies_the_other_kinds_trunk_and_zeroes_the_rest(tmp_path, capsys):
    """--warm-start: an eps run from the flow model's tensors that fit (all but the output layer, twice as wide);
    the summary records where they came from, and another architecture is refused naming the keys."""
    flow = tmp_path / "flow.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(flow)])
    model = VideoDiT(train_scenes.scenes_config("eps", 32, 1, 2))
    record = train_scenes.warm_start(model, str(flow))
    source = VideoDiT.from_pretrained(flow)
    own, theirs = model.state_dict(), source.state_dict()
    assert record["left"] == ["final.linear.bias", "final.linear.weight"] and record["total_steps"] == 2
    assert all(torch.equal(own[k], theirs[k]) for k in own if k not in record["left"])
    assert own["final.linear.weight"].shape[0] == 2 * theirs["final.linear.weight"].shape[0]
    n = len(own)
    assert f"{n - 2} of {n} tensors copied; left at their initialisation: final.linear.bias, final.linear.weight" \
        in capsys.readouterr().out
    out = tmp_path / "eps.safetensors"
    train_scenes.main(["--kind", "eps", *TINY[2:], "--steps", "2", "--warm-start", str(flow), "--out", str(out)])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["warm_start"]["path"] == str(flow) and summary["warm_start"]["training"] == "scenes-flow"
    assert summary["total_steps"] == 2  # its own steps: the flow run's are not this model's
    with pytest.raises(SystemExit, match=r"--warm-start .*flow.safetensors: another architecture \(dim: file has 32, "
                                         r"this run expects 64\)"):
        train_scenes.main(["--kind", "eps", "--dim", "64", *TINY[4:], "--steps", "2", "--warm-start", str(flow),
                           "--out", str(tmp_path / "e2.safetensors")])
    with pytest.raises(SystemExit):
        train_scenes.parse_args([*TINY, "--steps", "2", "--out", str(out), "--warm-start", str(flow), "--init",
                                 str(flow)])


def test_a_diverged_run_keeps_the_last_good_files(tmp_path):
    out = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(out)])
    good = out.read_bytes()
    with pytest.raises(SystemExit, match="step 4: the loss is nan .*nothing was saved"):
        train_scenes.main([*TINY, "--steps", "30", "--lr", "1e12", "--out", str(out),
                           "--resume", str(tmp_path / "w.state.pt")])
    assert out.read_bytes() == good and _state_step(tmp_path / "w.state.pt") == 2


def test_bad_checkpoints_and_outputs_of_the_scenes_scripts(tmp_path, capsys):
    """Issue 15's bad input (bad-input walkthrough, 2026-11-27): each of these passed, or said something misleading."""
    from taohooks.testbed import scenes_sensitivity

    flow = tmp_path / "flow.safetensors"
    train_scenes.main([*TINY, "--steps", "2", "--out", str(flow)])
    good = flow.read_bytes()
    # an evaluation's --out naming the checkpoint it measures replaced it with JSON
    with pytest.raises(SystemExit):
        scenes_sensitivity.main(["--weights", str(flow), "--n", "1", "--out", str(flow)])
    assert flow.read_bytes() == good
    from taohooks.testbed.scenes_sensitivity import check_out

    check_out(None, str(tmp_path / "R.JSON"))  # (the case of the suffix is the user's)
    # NaN weights: training blamed the learning rate, evaluations printed NaN
    model = VideoDiT.from_pretrained(flow)
    with torch.no_grad():
        next(model.parameters()).view(-1)[:5] = float("nan")
    model.save_pretrained(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan.safetensors: 1 tensor\(s\) hold NaN or inf values"):
        VideoDiT.from_pretrained(tmp_path / "nan.safetensors")
    with pytest.raises(SystemExit, match=r"--init .*nan.safetensors: .*hold NaN or inf values"):
        train_scenes.main([*TINY, "--steps", "4", "--init", str(tmp_path / "nan.safetensors"),
                           "--out", str(tmp_path / "n2.safetensors")])
    # a training state given as weights: the hint the other way round
    with pytest.raises(ValueError, match="it is a training state \\(--resume takes it\\)"):
        VideoDiT.from_pretrained(tmp_path / "flow.state.pt")
    # --warm-start from the run's own kind replayed its batches and kept no chain: --init is the way
    with pytest.raises(SystemExit, match=r"a checkpoint of this run's own kind \(scenes-flow\); continue from it "
                                         r"with --init"):
        train_scenes.main([*TINY, "--steps", "2", "--warm-start", str(flow), "--out", str(tmp_path / "w.safetensors")])
    # --init from the other kind pointed to flags that cannot make it fit
    with pytest.raises(SystemExit, match=r"it is a scenes-flow checkpoint: start this scenes-eps run from its trunk "
                                         r"with --warm-start"):
        train_scenes.main(["--kind", "eps", *TINY[2:], "--steps", "2", "--init", str(flow),
                           "--out", str(tmp_path / "e.safetensors")])
    # --resume to a step already reached did nothing and rewrote the files
    with pytest.raises(SystemExit, match=r"--steps 2: the run in .* is already at step 2; --steps counts all its steps "
                                         r"\(e.g. --steps 4 for 2 more\)"):
        train_scenes.main([*TINY, "--steps", "2", "--out", str(flow), "--resume", str(tmp_path / "flow.state.pt")])
    assert flow.read_bytes() == good
    # --resume takes the architecture from the state (it had to be repeated: docs walkthrough, 2026-11-27)
    train_scenes.main(["--kind", "flow", "--steps", "3", "--batch-size", "2", "--out", str(flow),
                       "--resume", str(tmp_path / "flow.state.pt")])
    assert json.loads((tmp_path / "flow.json").read_text())["steps_done"] == 3
    with pytest.raises(SystemExit, match=r"does not match this run's model \(dim: file has 32, this run expects 64"):
        train_scenes.main(["--kind", "flow", "--dim", "64", "--steps", "4", "--out", str(flow),
                           "--resume", str(tmp_path / "flow.state.pt")])
    # a run that diverges before its first save has no last good step to point to
    # a damaged training summary ended in a traceback (AttributeError)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(flow), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={**meta, "training": "[1, 2]"})
    with pytest.raises(SystemExit, match=r"--init .*meta.safetensors: its training summary \(metadata 'training'\) "
                                         r"does not read"):
        train_scenes.main([*TINY, "--steps", "2", "--init", str(tmp_path / "meta.safetensors"),
                           "--out", str(tmp_path / "m2.safetensors")])
    # one model's checkpoint named twice for the bench: the last was used without a word
    from taohooks.cli import main as taocache

    bench = str(Path(__file__).parents[1] / "configs" / "bench_small.yaml")
    assert taocache(["bench", bench, "--models", "scenes", "--weights", f"scenes={flow}",
                     f"scenes={tmp_path / 'nan.safetensors'}", "-o", str(tmp_path / "b")]) == 1
    assert "--weights: scenes is given twice" in capsys.readouterr().err
    assert train_scenes._kept(tmp_path / "d.safetensors") == ("nothing was saved (no step of this run was saved "
                                                              "before): start again with a lower --lr")
    assert "keep the last good step" in train_scenes._kept(flow)


def test_a_resumed_chained_run_keeps_its_data_offset(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train_scenes.main([*TINY, "--steps", "3", "--out", str(first)])
    train_scenes.main([*TINY, "--steps", "2", "--out", str(second), "--init", str(first)])
    args = train_scenes.parse_args([*TINY, "--steps", "4", "--out", str(second), "--resume",
                                    str(tmp_path / "b.state.pt")])
    train_scenes.resolve_hparams(args, None)
    trainer = train_scenes.Trainer(args)
    trainer.load(args.resume)
    assert trainer.offset == 3 and trainer.worker_stream().start_step == 5  # 3 steps behind a, 2 of its own


@pytest.mark.parametrize("flag, value", [("--clip", "0"), ("--keep-every", "-1"), ("--save-minutes", "0"),
                                         ("--depth", "0"), ("--ema", "-0.1"), ("--patch", "3"), ("--threads", "0"),
                                         ("--device", "nonsense")])
def test_nonsense_training_numbers_are_refused(tmp_path, flag, value):
    with pytest.raises(SystemExit):
        train_scenes.parse_args([*TINY, "--steps", "2", "--out", str(tmp_path / "w.safetensors"), flag, value])


def test_kept_copies_follow_keep_every_not_save_every(tmp_path):
    out = tmp_path / "w.safetensors"
    train_scenes.main([*TINY[:-2], "--keep-every", "2", "--save-every", "3", "--steps", "6", "--out", str(out)])
    assert sorted(p.name for p in tmp_path.glob("w-step*.safetensors")) == [
        "w-step000002.safetensors", "w-step000004.safetensors", "w-step000006.safetensors"]


def test_scenes_scripts_check_their_arguments_before_the_work(tmp_path, capsys):
    from taohooks.testbed import scenes_diagnose, scenes_loss, scenes_sensitivity

    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    (tmp_path / "folder").mkdir()
    for argv in (["--weights", str(weights), "--noise-change", "1.5"], ["--weights", str(weights), "--n", "0"],
                 ["--weights", str(weights), "--skip-steps", "2,x"], ["--weights", str(weights), "--budget", "1.5"],
                 ["--exact", "0"], ["--weights", str(weights), "--out", str(tmp_path / "folder")]):
        with pytest.raises(SystemExit):
            scenes_sensitivity.main(argv)
    with pytest.raises(SystemExit):
        scenes_diagnose.main(["--weights", str(weights), "--n", "1", "--steps", "2", "--out", str(tmp_path / "folder")])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="nothere"):  # the bad file is found before the good one is measured
        scenes_loss.main(["--weights", str(weights), str(tmp_path / "nothere.safetensors"), "--batches", "1",
                          "--batch-size", "1"])
    assert "sigma " not in capsys.readouterr().out


def test_scenes_scripts_refuse_what_used_to_fail_after_the_work(tmp_path, monkeypatch, capsys):
    """A bad --grid ended in a traceback after the full-step sampling (and no --out); --steps 1 and too few
    TeaCache pairs in one after the calibration; --guidance below 1 or NaN silently meant 1. Each is now a parser
    error before the checkpoint is read (a missing file would say so otherwise)."""
    from taohooks.testbed import evaluate, scenes_diagnose, scenes_sensitivity

    missing = str(tmp_path / "missing.safetensors")
    (tmp_path / "folder.png").mkdir()
    cases = [(["--grid", str(tmp_path / "g.txt")], "--grid .*g.txt: expected an image file name such as grid.png"),
             (["--grid", str(tmp_path / "folder.png")], "--grid .*folder.png.*directory"),
             (["--steps", "1", "--skip-steps", ""], "--steps 1: expected at least 3"),
             (["--guidance", "-1"], "--guidance -1: expected a finite scale >= 1"),
             (["--guidance", "nan"], "--guidance nan: expected a finite scale >= 1"),
             (["--steps", "4", "--calibration-pairs", "1", "--guidance", "1", "--skip-steps", "2"],
              "--budget 0.04: TeaCache's degree-4 polynomial needs more than 4 .* gives 3")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            scenes_sensitivity.main(["--weights", missing, *argv])
        assert exc.value.code == 2 and re.search(message, capsys.readouterr().err), argv
    for main in (scenes_diagnose.main, evaluate.main):
        with pytest.raises(SystemExit) as exc:
            main(["--weights", missing, "--guidance", "0.5"])
        assert exc.value.code == 2 and "--guidance 0.5: expected a finite scale >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--weights", missing, "--grid", str(tmp_path / "g.txt")])
    assert exc.value.code == 2 and "expected an image file name" in capsys.readouterr().err
    # with --budget 0 TeaCache is not fitted at all: 3 steps of one calibration pair measure the cosines
    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    out, grid = tmp_path / "m.json", tmp_path / "sub" / "g.png"
    scenes_sensitivity.main(["--weights", str(weights), "--n", "1", "--steps", "3", "--skip-steps", "",
                             "--noise-change", "", "--budget", "0", "--batch-size", "1", "--calibration-pairs", "1",
                             "--guidance", "1", "--grid", str(grid), "--out", str(out)])
    assert "teacache" not in json.loads(out.read_text()) and grid.read_bytes()[:4] == b"\x89PNG"


def test_a_grid_is_written_atomically(tmp_path, monkeypatch):
    """PIL wrote the PNG in place: a failure mid-write left a truncated file under the user's name."""
    from PIL import Image
    from taohooks.testbed.grid import save_grid

    path = tmp_path / "g.png"
    path.write_bytes(b"the earlier grid")

    def failing_save(self, fp, format=None, **kw):
        (open(fp, "wb") if isinstance(fp, (str, Path)) else fp).write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_grid(torch.zeros(1, 3, 2, 4, 4), path, labels=["a"])
    assert path.read_bytes() == b"the earlier grid" and [p.name for p in tmp_path.iterdir()] == ["g.png"]


def test_a_grid_is_written_in_its_names_format(tmp_path):
    """The atomic write made every grid a PNG, a .jpg one too (examples/sample_testbed.py --out x.jpg)."""
    from taohooks.testbed.grid import save_grid

    save_grid(torch.zeros(1, 3, 2, 4, 4), tmp_path / "g.jpg")
    save_grid(torch.zeros(1, 3, 2, 4, 4), tmp_path / "g.png")
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff" and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_loads_every_checkpoint_before_the_first_models_work(tmp_path, capsys):
    """A checkpoint whose tensors do not fit its config passed the metadata check and failed when its model's turn
    came, after the earlier models' whole bench."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from taohooks.cli import main as taocache

    weights, crafted = tmp_path / "w.safetensors", tmp_path / "crafted.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    with safe_open(str(weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    save_file(tensors, str(crafted), metadata={**meta, "config": json.dumps({**config, "depth": 2})})
    yaml = tmp_path / "b.yaml"
    yaml.write_text("models: [scenes]\nmethods: [taocache]\nbudgets: [0.25]\nsteps: 4\neval_pairs: 1\n"
                    "calibration_pairs: 2\nsearch_pairs: 1\nlpips: false\n")
    assert taocache(["bench", str(yaml), "--weights", f"scenes={crafted}", "-o", str(tmp_path / "out")]) == 1
    assert "crafted.safetensors: its tensors do not fit its config" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
    # a model named by --models whose bundled checkpoint is missing: the command line's --models, and --weights
    assert taocache(["bench", str(yaml), "--models", "scenes-eps", "-o", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "command line: --models: testbed weights" in err and "--weights scenes-eps=PATH" in err


def test_diagnose_takes_the_sampler_shift(tmp_path, capsys):
    from taohooks.testbed import scenes_diagnose

    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    out = tmp_path / "d.json"
    scenes_diagnose.main(["--weights", str(weights), "--n", "1", "--steps", "3", "--shift", "5", "--out", str(out)])
    assert json.loads(out.read_text())["shift"] == 5.0
    with pytest.raises(SystemExit):
        scenes_diagnose.main(["--weights", str(weights), "--n", "1", "--steps", "3", "--shift", "0"])
    eps = tmp_path / "e.safetensors"  # a shift given for an eps checkpoint read as if 5 were not > 0 (walkthrough)
    train_scenes.main(["--kind", "eps", *TINY[2:], "--steps", "1", "--out", str(eps)])
    with pytest.raises(SystemExit):
        scenes_diagnose.main(["--weights", str(eps), "--n", "1", "--steps", "3", "--shift", "5"])
    assert "--shift 5.0: the sampler's shift is for flow checkpoints; " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        scenes_diagnose.main(["--weights", str(weights), "--n", "1", "--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_compile_trains_the_same_weights_and_falls_back_when_the_compiler_fails(tmp_path, capsys):
    """--compile BACKEND trains through torch.compile (the GPU runs' inductor; here dynamo's eager backend, which
    runs the captured graph as it is): the same weights as the uncompiled run, the model's own state dict, and
    the summary names the backend. A compiler that fails at the first step costs the run nothing but a message."""
    import torch._dynamo

    def failing(graph, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    torch._dynamo.register_backend(name="taohooks_test_failing", compiler_fn=failing)
    steps = [*TINY, "--steps", "3"]
    train_scenes.main([*steps, "--out", str(tmp_path / "plain.safetensors")])
    train_scenes.main([*steps, "--compile", "eager", "--out", str(tmp_path / "eager.safetensors")])
    train_scenes.main([*steps, "--compile", "taohooks_test_failing", "--out", str(tmp_path / "failed.safetensors")])
    assert "--compile taohooks_test_failing: the first compiled step failed" in capsys.readouterr().err
    plain, eager, failed = (VideoDiT.from_pretrained(str(tmp_path / f"{n}.safetensors")).state_dict()
                            for n in ("plain", "eager", "failed"))
    assert plain.keys() == eager.keys() and all(torch.equal(plain[k], eager[k]) for k in plain)
    assert any(not torch.equal(plain[k], failed[k]) for k in plain)  # (its first step drew fresh noise)
    summaries = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "eager", "failed")]
    assert [s["compile"] for s in summaries] == [None, "eager", None]
    torch._dynamo.reset()


def test_profile_prints_where_the_steps_time_goes(tmp_path, capsys, monkeypatch):
    """--profile N: after PROFILE_AFTER (+2 warm-up) steps, N steps are profiled and their operators printed."""
    monkeypatch.setattr(train_scenes, "PROFILE_AFTER", 1)
    train_scenes.main([*TINY, "--steps", "6", "--profile", "2", "--out", str(tmp_path / "w.safetensors")])
    out = capsys.readouterr().out
    assert "profile of 2 steps (after 3), sorted by self_cpu_time_total:" in out and "aten::" in out
    with pytest.raises(SystemExit):
        train_scenes.parse_args([*TINY, "--steps", "6", "--profile", "-1", "--out", str(tmp_path / "x.safetensors")])
    assert "--profile must be >= 0, got -1" in capsys.readouterr().err


def test_diagnose_measures_the_clean_clip_prediction_per_noise_level(tmp_path, capsys):
    """--x0-sigmas: the one-call clean-clip prediction's stripes from held-out stripe clips noised to each sigma
    (a perfect prediction, the rendered clip itself, would pass them all)."""
    from taohooks.testbed import scenes_diagnose

    class Perfect(torch.nn.Module):  # the velocity that maps x_s back onto the clip it was made from
        def __init__(self, clips, noise):
            super().__init__()
            self.clips, self.noise, self.p = clips, noise, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, ids):
            n = x.shape[0]
            return self.noise[:n] - self.clips[:n]

    pairs = [(p, s) for p, s in scenes.eval_pairs(64)
             if p.background == scenes.BACKGROUNDS.index("stripes")][:3]
    clips = torch.from_numpy(scenes.render_batch([p for p, _ in pairs], [s for _, s in pairs])).float()
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    rows = scenes_diagnose.x0_stripes(Perfect(clips, noise), 3, [0.5, 0.9], guidances=(1.0,), batch_size=8)
    assert [r["sigma"] for r in rows] == [0.5, 0.9] and all(r["passing"] == 1.0 for r in rows)
    assert all(r["cosine"] == pytest.approx(1.0, abs=1e-5) for r in rows)
    weights = tmp_path / "w.safetensors"
    train_scenes.main([*TINY, "--steps", "1", "--out", str(weights)])
    scenes_diagnose.main(["--weights", str(weights), "--n", "2", "--x0-sigmas", "0.5",
                          "--out", str(tmp_path / "x.json")])
    assert [r["guidance"] for r in json.loads((tmp_path / "x.json").read_text())["x0"]] == [1.0, 5.0]
    assert "sigma 0.50 guidance 5: stripe share median" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scenes_diagnose.main(["--weights", str(weights), "--x0-sigmas", "1.5"])
