"""Fast tests of the bundled testbed (data, recogniser, model, sampling loops)."""

import json
import re

import numpy as np
import pytest
import torch

from taohooks.testbed import data, grid, recognizer, sampling
from taohooks.testbed.model import VideoDiT, VideoDiTConfig, read_metadata


def tiny_model(prediction: str, seed: int = 0) -> VideoDiT:
    torch.manual_seed(seed)
    cfg = VideoDiTConfig(dim=32, depth=2, num_heads=2, out_channels=6 if prediction == "eps" else 3,
                         prediction=prediction, training=prediction)
    model = VideoDiT(cfg).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero output; make the test model non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class CallRecorder:
    """Forward pre-hook recording (batch size, prompt ids, timestep) of every model call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        x, timestep, ids = args
        self.calls.append((x.shape[0], ids.clone(), timestep.clone()))


# ---------------------------------------------------------------- data
def test_prompt_text_roundtrip_and_ids():
    prompts = data.all_prompts()
    assert len(prompts) == 128 and len(set(prompts)) == 128
    for p in prompts:
        assert data.Prompt.from_text(p.text) == p
    assert data.Prompt(0, 0, 0).text == "a red circle moving left"
    ids = data.prompt_ids([data.Prompt(1, 2, 1, 0), None])
    assert ids.tolist() == [[1, 2, 1, 0], [-1, -1, -1, -1]]
    with pytest.raises(ValueError):
        data.Prompt(0, 0, 0, distractor=0)


def test_render_is_deterministic_and_in_range():
    p = data.Prompt(2, 1, 0, 3)
    a, b = data.render(p, 42), data.render(p, 42)
    assert a.shape == (3, 8, 16, 16) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, data.render(p, 43))
    assert a.min() >= -1 and a.max() <= 1


def test_splits_are_disjoint_and_held_out():
    ev, cal = data.eval_pairs(64), data.calibration_pairs(20)
    assert len(ev) == 64 and len(cal) == 20
    assert all(s >= data.EVAL_SEED_START for _, s in ev)
    assert all(1000 <= s < data.TRAIN_SEED_LIMIT for _, s in cal)
    assert not set(ev) & set(cal)
    assert len({(p.colour, p.direction, p.shape) for p, _ in ev}) == 32  # every base prompt
    assert ev == data.eval_pairs(64)
    val = data.validation_pairs(128)  # for choosing checkpoints: held out, and disjoint from the reported pairs
    assert all(s >= data.VALIDATION_SEED_START for _, s in val)
    assert not {s for _, s in val} & {s for _, s in data.eval_pairs(data.VALIDATION_SEED_START - data.EVAL_SEED_START)}
    assert len({(p.colour, p.direction, p.shape) for p, _ in val}) == 32


def test_training_keeps_intermediate_checkpoints(tmp_path):
    from taohooks.testbed import train
    out = tmp_path / "run" / "eps.safetensors"
    train.main(["--kind", "eps", "--steps", "4", "--save-every", "2", "--batch-size", "2", "--dim", "16",
                "--depth", "1", "--heads", "2", "--log-every", "2", "--out", str(out)])
    assert sorted(f.name for f in out.parent.iterdir()) == [
        "eps-step000002.json", "eps-step000002.safetensors", "eps.json", "eps.safetensors", "eps.state.pt"]
    assert read_metadata(out.parent / "eps-step000002.safetensors")["training"].count('"steps_done": 2') == 1
    assert VideoDiT.from_pretrained(out).config.dim == 16



def test_small_task_training_resumes_exactly(tmp_path, monkeypatch, capsys):
    """train.py had only --init (weights, a fresh optimizer): a stopped run could not be continued. A run stopped
    after 3 of 6 steps (as SIGTERM stops it) and resumed gives the uninterrupted run's weights, bit for bit."""
    import signal

    from safetensors.torch import load_file

    from taohooks.testbed import train

    common = ["--kind", "eps", "--steps", "6", "--batch-size", "2", "--dim", "16", "--depth", "1", "--heads", "2",
              "--log-every", "1", "--save-every", "0"]
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    train.main(common + ["--out", str(full)])

    class Stopper:  # StopOnSignal's interface; the signal "arrives" during the third step
        signal = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    stopper, original = Stopper(), train._train_step

    def step(*args):
        logs = original(*args)
        if args[7] == 2:
            stopper.signal = signal.SIGTERM
        return logs

    with monkeypatch.context() as m:
        m.setattr(train, "StopOnSignal", lambda: stopper)
        m.setattr(train, "_train_step", step)
        train.main(common + ["--out", str(half)])
    summary = json.loads(half.with_suffix(".json").read_text())
    assert (summary["steps_done"], summary["final"]) == (3, False)
    assert f"stopped by SIGTERM: --resume {tmp_path / 'half.state.pt'} continues" in capsys.readouterr().out
    train.main(common + ["--out", str(half), "--resume", str(tmp_path / "half.state.pt")])
    assert "note:" not in capsys.readouterr().err
    a, b = load_file(full), load_file(half)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(half.with_suffix(".json").read_text())["final"] is True
    state = str(tmp_path / "half.state.pt")
    train.main(common + ["--out", str(tmp_path / "t.safetensors"), "--resume", state, "--threads", "2"])
    assert "the run used --threads 1, this one 2; it continues" in capsys.readouterr().err  # (exact per thread count)
    for argv, message in ((["--kind", "flow"], "a run of kind 'eps', but --kind 'flow'"),
                          (["--lr", "1e-3"], "--lr 0.001 given, but the run was trained with 0.0005"),
                          (["--batch-size", "32"], "--batch-size 32 given, but the run was trained with 2"),  # default
                          (["--batch", "32"], "--batch-size 32 given, but the run was trained with 2"),  # abbreviated
                          (["--resume", str(full)], "not a state written by taohooks.testbed.train"),
                          (["--resume", str(tmp_path / "none.pt")], "no such state file")):
        kind = argv[1] if argv[0] == "--kind" else "eps"
        rest = [a for a in argv if a not in ("--kind", kind)]
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.main(["--kind", kind, "--out", str(tmp_path / "other.safetensors"), "--resume", state] + rest)


# ---------------------------------------------------------------- recogniser
def test_recognizer_on_ground_truth():
    pairs = [(p, s) for s in (10_000, 10_001, 10_002) for p in data.all_prompts()]
    clips = data.render_batch([p for p, _ in pairs], [s for _, s in pairs])
    acc = recognizer.accuracy(clips, [p for p, _ in pairs])
    assert acc["overall"] >= 0.98, acc


def test_recognizer_rejects_wrong_prompts():
    p = data.Prompt(0, 0, 1)  # red square moving left
    clip = data.render(p, 7)
    assert recognizer.recognize(clip, p).ok
    assert not recognizer.recognize(clip, data.Prompt(1, 0, 1)).colour
    assert not recognizer.recognize(clip, data.Prompt(0, 1, 1)).direction
    assert not recognizer.recognize(clip, data.Prompt(0, 0, 0)).shape
    assert not recognizer.recognize(np.full((3, 8, 16, 16), -0.9, np.float32), p).ok


# ---------------------------------------------------------------- model
@pytest.mark.parametrize("prediction,channels", [("eps", 6), ("flow", 3)])
def test_forward_shapes(prediction, channels):
    model = tiny_model(prediction)
    x = torch.randn(3, 3, 8, 16, 16)
    ids = torch.tensor([[0, 1, 1, 4], [-1, -1, -1, -1], [3, 3, 0, 2]])
    out = model(x, torch.tensor([10.0, 500.0, 999.0]), ids)
    assert out.shape == (3, channels, 8, 16, 16)
    assert model.config.num_tokens == 128
    names = dict(model.named_modules())
    assert "blocks.0.attn" in names and "blocks.0.mod1" in names and "blocks.0.norm1" in names


def test_null_prompt_differs_from_conditional():
    model = tiny_model("flow")
    x = torch.randn(1, 3, 8, 16, 16).repeat(2, 1, 1, 1, 1)
    out = model(x, torch.full((2,), 300.0), torch.tensor([[0, 0, 0, 4], [-1, -1, -1, -1]]))
    assert not torch.allclose(out[0], out[1])


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("eps")
    path = tmp_path / "m.safetensors"
    model.save_pretrained(path, metadata={"training": "{}"})
    loaded = VideoDiT.from_pretrained(path)
    assert loaded.config == model.config
    assert read_metadata(path)["training"] == "{}"
    x, t, ids = torch.randn(2, 3, 8, 16, 16), torch.tensor([1.0, 900.0]), torch.tensor([[1, 2, 0, 4]] * 2)
    torch.testing.assert_close(loaded(x, t, ids), model(x, t, ids))


# ---------------------------------------------------------------- sampling loops
def test_eps_loop_one_batched_call_per_step():
    model = tiny_model("eps")
    pairs = data.eval_pairs(3)
    rec = CallRecorder(model)
    out = sampling.sample_eps(model, [p for p, _ in pairs], [s for _, s in pairs], steps=2, scheduler="ddim")
    assert out.shape == (3, 3, 8, 16, 16) and out.abs().max() <= 1
    assert len(rec.calls) == 2
    for batch, ids, timestep in rec.calls:
        assert batch == 6
        assert (ids[:3] == -1).all() and (ids[3:] >= 0).all()  # cat([uncond, cond])
        assert timestep.shape == (6,) and (timestep == timestep[0]).all()


def test_pndm_loop_runs():
    model = tiny_model("eps")
    rec = CallRecorder(model)
    out = sampling.sample_eps(model, ["a red circle moving up"], [5], steps=4, scheduler="pndm")
    assert out.shape == (1, 3, 8, 16, 16)
    sched = sampling.make_eps_scheduler("pndm")
    sched.set_timesteps(4)
    assert len(rec.calls) == len(sched.timesteps) > 4  # Runge-Kutta warm-up adds calls


def test_flow_loop_two_calls_per_step_cond_first():
    model = tiny_model("flow")
    pairs = data.eval_pairs(2)
    rec = CallRecorder(model)
    out = sampling.sample_flow(model, [p for p, _ in pairs], [s for _, s in pairs], steps=2)
    assert out.shape == (2, 3, 8, 16, 16)
    assert len(rec.calls) == 4
    for i, (batch, ids, _) in enumerate(rec.calls):
        assert batch == 2
        assert (ids >= 0).all() if i % 2 == 0 else (ids == -1).all()
    assert rec.calls[0][2][0] > rec.calls[2][2][0] > 0  # timesteps (sigma*1000) decrease


def test_sampling_is_reproducible_per_pair():
    model = tiny_model("flow")
    p = data.Prompt(3, 2, 1)
    a = sampling.sample_flow(model, [p, data.Prompt(0, 0, 0)], [11, 12], steps=2)
    b = sampling.sample_flow(model, [p], [11], steps=2)
    torch.testing.assert_close(a[:1], b)


def test_save_grid(tmp_path):
    clips = torch.from_numpy(data.render_batch([data.Prompt(0, 0, 0), data.Prompt(1, 1, 1)], [1, 2]))
    path = grid.save_grid(clips, tmp_path / "g.png", labels=["a", "b"])
    assert path.exists() and path.stat().st_size > 0
    assert grid.clips_to_image(clips, scale=1).shape == (2 * 17, 8 * 17, 3)


@pytest.mark.parametrize("name", ["flow", "eps", "flow-lognormal"])
def test_bundled_checkpoint_loads(name):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "taohooks" / "testbed" / "weights" / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path.name} not trained yet")
    model = VideoDiT.from_pretrained(path)
    assert model.config.prediction == ("eps" if name == "eps" else "flow")
    assert model.config.out_channels == (6 if name == "eps" else 3)
    out = model(torch.zeros(1, 3, 8, 16, 16), torch.tensor([500.0]), torch.tensor([[0, 0, 0, 4]]))
    assert torch.isfinite(out).all()


def test_small_task_scripts_name_bad_input(tmp_path, capsys):
    """train.py and evaluate.py gave tracebacks (or overwrote a checkpoint) on bad input (review, 2026-11-27)."""
    from taohooks.testbed import evaluate, train

    for argv in (["--kind", "flow", "--steps", "0", "--out", str(tmp_path / "w.safetensors")],
                 ["--kind", "flow", "--batch-size", "0", "--out", str(tmp_path / "w.safetensors")]):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
    with pytest.raises(SystemExit, match="nothere.safetensors: no such checkpoint file"):
        train.main(["--kind", "flow", "--steps", "1", "--init", str(tmp_path / "nothere.safetensors"),
                    "--out", str(tmp_path / "w.safetensors")])
    scenes = tmp_path / "scenes.safetensors"
    from taohooks.testbed import train_scenes
    train_scenes.main(["--kind", "flow", "--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "2",
                       "--steps", "1", "--keep-every", "0", "--out", str(scenes)])
    with pytest.raises(SystemExit):
        evaluate.main(["--weights", str(scenes), "--n", "1"])
    assert "not a checkpoint of the small task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--weights", str(tmp_path / "nothere.safetensors")])
    assert "no such checkpoint file" in capsys.readouterr().err
