"""taohooks.lightning.TaoCacheCallback with Trainer.predict on a testbed model."""
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("diffusers")

import lightning.pytorch as pl  # noqa: E402

from taohooks import TaoCache  # noqa: E402
from taohooks.config import config_from_dict  # noqa: E402
from taohooks.runtime.hook import get_hook  # noqa: E402
from taohooks.lightning import TaoCacheCallback  # noqa: E402
from taohooks.testbed import sampling  # noqa: E402
from taohooks.testbed.model import VideoDiT, VideoDiTConfig  # noqa: E402
from prewarmed import run_python  # noqa: E402

STEPS = 8
PROMPTS = [("a red circle moving left", 10000), ("a blue square moving up", 10001)]


class Sampler(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = VideoDiT(VideoDiTConfig(dim=32, depth=2, num_heads=2))
        for p in self.model.parameters():  # leave the adaLN-Zero initialisation: a non-trivial output
            p.data.add_(0.02 * torch.randn_like(p))

    def predict_step(self, batch, batch_idx):
        prompt, seed = batch
        return sampling.sample_flow(self.model, [prompt], [seed], steps=STEPS)


def predict(module, callbacks):
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    return trainer.predict(module, dataloaders=torch.utils.data.DataLoader(PROMPTS, batch_size=None))


def test_predict_with_the_callback_matches_a_manual_attach():
    config = config_from_dict({"plan": {"window": [5, 6], "ratio": 1.0}})
    module = Sampler()
    callback = TaoCacheCallback(config, module="model", steps=STEPS, streams=("cond", "uncond"), timestep_arg=1)
    outs = predict(module, [callback])
    assert get_hook(module.model) is None  # detached at the end
    assert callback.cache.hook.counts == {"cond": [12, 4], "uncond": [12, 4]}  # 2 batches x 2 skipped steps
    cache = TaoCache(config)
    with cache.attach(module.model, STEPS, ("cond", "uncond"), timestep_arg=1) as hook:
        for (prompt, seed), out in zip(PROMPTS, outs):
            hook.new_sample()
            assert torch.equal(sampling.sample_flow(module.model, [prompt], [seed], steps=STEPS), out)
    full = [sampling.sample_flow(module.model, [p], [s], steps=STEPS) for p, s in PROMPTS]
    assert all(not torch.equal(a, b) for a, b in zip(outs, full))


def test_budget_zero_is_plain_predict():
    module = Sampler()
    plain = predict(module, [])
    cached = predict(module, [TaoCacheCallback(config_from_dict({"plan": {"budget": 0}}), steps=STEPS,
                                               streams=("cond", "uncond"))])
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))


def test_ranks_shared_under_ddp_is_refused():
    """Under DDP each rank predicts its own batches; calibration.ranks: shared was ignored (review, 2026-11-27)."""
    import types

    callback = TaoCacheCallback(config_from_dict({"calibration": {"ranks": "shared"}}), module="model", steps=STEPS)
    with pytest.raises(ValueError, match="calibration.ranks: shared, but under DDP each rank predicts batches"):
        callback.on_predict_start(types.SimpleNamespace(world_size=2), Sampler())


def test_a_missing_submodule_is_named():
    with pytest.raises(ValueError, match="has no submodule 'denoiser'"):
        predict(Sampler(), [TaoCacheCallback(config_from_dict({}), module="denoiser", steps=STEPS)])


def test_a_calibrating_predict_skips_once_the_lut_is_complete(tmp_path, monkeypatch, capfd):
    """Calibration completed on the first batch, but the run kept computing every step (review, 2026-11-27)."""
    import test_lightning

    monkeypatch.setattr(test_lightning, "PROMPTS", PROMPTS + [("a green circle moving right", 3)])
    config = config_from_dict({"lut": "lut.safetensors", "calibration": {"prompts": 1},
                               "plan": {"budget": 2, "min_step": 2}}, str(tmp_path / "c.yaml"))
    callback = TaoCacheCallback(config, module="model", steps=STEPS, streams=("cond", "uncond"), timestep_arg=1)
    predict(Sampler(), [callback])
    err = capfd.readouterr().err
    assert err.count("calibration complete") == 1, err  # (the next batch said it again)
    assert "calibration complete with generation 1: the LUT " in err
    assert "holds 1 prompt (calibration.prompts 1)" in err
    assert callback.cache.hook.counts == {"cond": [12, 4], "uncond": [12, 4]}  # batches 2 and 3 skip 2 steps each


DDP_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
import lightning.pytorch as pl
from taohooks.lightning import TaoCacheCallback
from taohooks.testbed import sampling
from taohooks.testbed.model import VideoDiT, VideoDiTConfig
from taohooks.taocache.lut import CalibrationLUT

class Sampler(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = VideoDiT(VideoDiTConfig(dim=32, depth=2, num_heads=2))
        for p in self.model.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    def predict_step(self, batch, batch_idx):
        prompt, seed = batch
        return sampling.sample_flow(self.model, list(prompt), [int(s) for s in seed], steps=8)

pairs = [(f"a red circle moving left", 10000 + i) for i in range(10)]
callback = TaoCacheCallback(sys.argv[1], module="model", timestep_arg=1)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[callback])
trainer.predict(Sampler(), torch.utils.data.DataLoader(pairs, batch_size=1))
print(f"rank {trainer.global_rank} counts {callback.cache.hook.counts} plan {callback.cache.plan.skipped_steps}",
      flush=True)
if trainer.global_rank == 0:
    print(f"LUT holds {CalibrationLUT.load(sys.argv[2]).num_prompts}", flush=True)
'''


def test_ddp_ranks_each_add_their_prompts_to_the_lut(tmp_path):
    """Under DDP each rank samples its own batches: only rank 0's calibrated prompts reached the LUT (the others
    were dropped without a word), and each rank calibrated until its own count was reached (walkthrough,
    2026-11-27). Two gloo processes, 5 batches each, 4 prompts wanted: both ranks write, and both skip after.
    With 5 batches a rank skips at least its last one whatever the other's speed (with 4 each, a rank that ran ahead
    under load calibrated all 4 and never skipped: CI, 2026-11-28)."""
    import re

    script, lut = tmp_path / "ddp.py", tmp_path / "lut.safetensors"
    script.write_text(DDP_SCRIPT)
    (tmp_path / "c.yaml").write_text(f"lut: {lut}\nloop: {{steps: 8, streams: [cond, uncond]}}\n"
                                     "calibration: {prompts: 4}\nplan: {budget: 2, min_step: 4}\n")
    # cold: Lightning starts rank 1 as a child of the script, which can print after rank 0 ended; a fresh interpreter's
    # pipe waits for it, the pre-warmed runner ends what its command left running (rank 1's line was lost: CI)
    res = run_python([str(script), str(tmp_path / "c.yaml"), str(lut)], cwd=tmp_path, timeout=300,
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, cold=True)
    assert res.returncode == 0, res.stderr[-3000:]
    held = int(re.search(r"LUT holds (\d+)", res.stdout).group(1))
    # a rank's batch that ends after the other completed the file is left out: the file stays at 4, and both ranks
    # plan from it (they planned from 4 and 5 prompts, and skipped different steps: DDP walkthrough, 2026-11-27)
    assert held == 4
    skipped = [int(m) for m in re.findall(r"counts \{'cond': \[\d+, (\d+)\]", res.stdout)]
    assert len(skipped) == 2 and all(s > 0 for s in skipped)  # both ranks skip once the file is complete
    plans = re.findall(r"plan (\([\d, ]*\))", res.stdout)
    assert len(plans) == 2 and plans[0] == plans[1], res.stdout


def test_a_validate_run_is_told_it_samples_uncached(capfd):
    """The callback hooks predict only: a validation_step that samples ran at full cost without a word
    (walkthrough, 2026-11-27)."""
    class Validating(Sampler):
        def validation_step(self, batch, batch_idx):
            return self.predict_step(batch, batch_idx)

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1,
                         callbacks=[TaoCacheCallback(config_from_dict({"plan": {"budget": 0}}), steps=STEPS,
                                                     streams=("cond", "uncond"))])
    trainer.validate(Validating(), dataloaders=torch.utils.data.DataLoader(PROMPTS, batch_size=None))
    assert "TaoCacheCallback caches Trainer.predict only; this validate run samples uncached" in capfd.readouterr().err


def test_the_validate_notice_is_not_said_in_fits_validation_loops(capfd):
    """on_validation_start also runs inside Trainer.fit, whose validation need not sample (review, 2026-11-27)."""
    import types

    callback = TaoCacheCallback(config_from_dict({"plan": {"budget": 0}}), steps=STEPS, streams=("cond", "uncond"))
    fitting = types.SimpleNamespace(state=types.SimpleNamespace(fn=types.SimpleNamespace(value="fit")))
    callback.on_validation_start(fitting, None)
    assert "samples uncached" not in capfd.readouterr().err


def test_a_list_output_is_declared_with_batch_dim(tmp_path):
    """The calibration's list-output warning said to declare batch_dim=None, which the callback did not take."""
    class ListSampler(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = ListModel()

        def predict_step(self, batch, batch_idx):
            x = [torch.ones(16, 2, 4, 4)]
            for t in range(STEPS):
                x = [x[0] - 0.1 * self.model(x, t=torch.tensor([float(STEPS - t)]))[0]]
            return x[0]

    class ListModel(torch.nn.Module):  # Wan's contract: a list of one [C, F, H, W] tensor per sample
        def forward(self, x, t):
            return [x[0] * 0.5 + float(t) / 10]

    config = config_from_dict({"lut": str(tmp_path / "lut.safetensors"), "calibration": {"prompts": 2}})
    callback = TaoCacheCallback(config, steps=STEPS, timestep_arg="t", batch_dim=None)
    predict(ListSampler(), [callback])
    from taohooks.taocache.lut import CalibrationLUT

    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 2  # (32 with batch_dim=0: channels)
