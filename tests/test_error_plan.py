"""Error-aware planning (plan.rule: auto): delta products, the error model, the planner.

Exact expected values: on a denoiser whose outputs do not depend on its input, the open-loop error
model is exact, so the predicted error of any schedule must equal the error the TaoCache hook
really makes in a sampler that sums the outputs; on an alternating trajectory one rule
(``projection``) is exact and the planner must pick it; a brute-force search over every schedule of
a 12-step loop must agree with the dynamic programme.
"""
import math

import pytest
import torch
from torch import nn

from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec
from taohooks.config import PlanConfig, config_from_dict, ConfigError
from taohooks.taocache.error_model import ErrorModel, chains_of, sampler_weights
from taohooks.taocache.error_plan import (PlannerOptions, brute_force, coefficient_table, error_model_of, plan_min_error,
                                 predict_plan, weight_scheme)
from taohooks.taocache.extrapolation import TaoCacheCallback
from taohooks.taocache.lut import CalibrationLUT, LUTMismatchError
from taohooks.taocache.plan import COMPUTE, REFRESH, SKIP, PlanError, SkipPlan
from taohooks.taocache.cache import make_plan
from trajectories import GeometricDenoiser, run_loop


class TableDenoiser(nn.Module):
    """Output at step ``t`` (the timestep passed) is a fixed random-walk table, one per prompt and
    stream, whatever the input: the open loop is the real loop."""

    def __init__(self, steps: int, prompts: int, streams=("main",), shape=(2, 3, 3), seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.streams = tuple(streams)
        smooth = torch.linspace(0, 1, steps).view(steps, 1, *[1] * len(shape))
        tables = []
        for _ in streams:
            drift = torch.randn(1, prompts, *shape, generator=g)
            noise = 0.05 * torch.randn(steps, prompts, *shape, generator=g).cumsum(0)
            tables.append(torch.sin(3 * smooth) * drift + noise)  # [steps, prompts, ...]
        self.register_buffer("table", torch.stack(tables))  # [streams, steps, prompts, ...]
        self.batch = slice(0, prompts)

    def forward(self, x, timestep, stream: str = "main"):
        t = int(float(timestep.reshape(-1)[0]))
        return self.table[self.streams.index(stream), t, self.batch].clone()


def same(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def sample(model, steps, streams, weights, prompts):
    """Sum of ``w_t * eps_t`` per stream (a first-order sampler whose latent starts at 0)."""
    x = {s: torch.zeros(prompts, *model.table.shape[3:], dtype=torch.float64) for s in streams}
    for t in range(steps):
        for s in streams:
            out = model(torch.zeros(prompts, 1), timestep=torch.tensor([float(t)]), stream=s)
            x[s] += float(weights[t]) * out.to(torch.float64)
    return x


def calibrate(model, steps, streams, prompts, horizon=16):
    rec = CalibrationRecorder(error_horizon=horizon)
    with DenoiserHook(LoopSpec(steps, tuple(streams)), [rec]).attach(model) as hook:
        hook.new_sample()
        sample(model, steps, streams, torch.ones(steps), prompts)
    return rec.lut()


def measured_mse(model, plan, lut, steps, streams, weights, prompts):
    ref = sample(model, steps, streams, weights, prompts)
    with DenoiserHook(LoopSpec(steps, tuple(streams)), [TaoCacheCallback(plan, lut.timesteps,
                                                                         max_norm_ratio=None)]).attach(model) as hook:
        hook.new_sample()
        got = sample(model, steps, streams, weights, prompts)
    per_element = [((got[s] - ref[s]) ** 2).flatten(1).mean(1) for s in streams]  # [prompts] per stream
    return float(torch.stack(per_element).mean(0).mean())


# ---------------------------------------------------------------- delta products
def test_products_are_the_inner_products_of_the_deltas():
    steps, prompts = 8, 3
    model = TableDenoiser(steps, prompts)
    lut = calibrate(model, steps, ("main",), prompts, horizon=3)
    g = lut.deltas.gram
    assert g.shape == (3, 1, 8, 4) and lut.deltas.numel == (18,)
    d = model.table[0].flatten(2).to(torch.float64).diff(dim=0)  # D_1..D_7 [7, prompts, n]
    for t in range(1, steps):
        for j in range(4):
            if t - j >= 1:
                want = (d[t - 1] * d[t - 1 - j]).sum(-1)
                assert torch.allclose(g[:, 0, t, j], want, rtol=1e-5, atol=1e-7), (t, j)
            else:
                assert torch.isnan(g[:, 0, t, j]).all()
    assert torch.isnan(g[:, 0, 0]).all()


def test_products_survive_the_file_and_merge_by_prompts(tmp_path):
    model = TableDenoiser(8, 2)
    a = calibrate(model, 8, ("main",), 2, horizon=4)
    b = calibrate(TableDenoiser(8, 2, seed=1), 8, ("main",), 2, horizon=2)
    a.save(tmp_path / "a.safetensors")
    back = CalibrationLUT.load(tmp_path / "a.safetensors")
    assert same(back.deltas.gram, a.deltas.gram) and back.deltas.numel == a.deltas.numel
    with pytest.raises(LUTMismatchError, match=r"shorten to 2 steps the error statistics .* up to 4 steps apart"):
        a.merge(b)  # a's products would lose their horizon: refused, unless asked for
    merged = a.merge(b, drop_error_statistics=True)
    assert merged.deltas.prompts == 4 and merged.deltas.horizon == 2  # the common horizon
    assert same(merged.deltas.gram[:2], a.deltas.gram[..., :3])
    assert b.merge(a).deltas.horizon == 2  # b loses nothing: allowed
    no_products = calibrate(model, 8, ("main",), 2, horizon=0)
    with pytest.raises(LUTMismatchError, match="drop the error statistics .*error_horizon: 4"):
        a.merge(no_products)
    assert no_products.deltas is None and a.merge(no_products, True).deltas is None  # part of the prompts: none
    assert no_products.merge(a).deltas is None  # no_products had none to lose


def test_version_1_file_loads_without_products_and_auto_says_so(tmp_path):
    lut = calibrate(TableDenoiser(10, 2), 10, ("main",), 2, horizon=0)
    lut.save(tmp_path / "v1.safetensors")
    loaded = CalibrationLUT.load(tmp_path / "v1.safetensors")
    assert loaded.deltas is None
    with pytest.raises(PlanError, match="v1.safetensors has no error statistics .* use plan.rule: paper"):
        make_plan(PlanConfig(budget=2, rule="auto"), 10, ("main",), loaded)
    assert make_plan(PlanConfig(budget=2), 10, ("main",), loaded).skipped_steps  # the paper's rule still plans


def test_corrupt_products_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from taohooks.taocache.lut import LUTFormatError

    lut = calibrate(TableDenoiser(8, 2), 8, ("main",), 2, horizon=2)
    path = tmp_path / "l.safetensors"
    lut.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["delta_gram"][0, 0, 5, 1] = 1e9  # beyond Cauchy-Schwarz
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LUTFormatError, match="delta_gram at prompt 0, stream 'main', step 5, lag 1"):
        CalibrationLUT.load(path)


# ---------------------------------------------------------------- the error model is exact in open loop
@pytest.mark.parametrize("actions", [
    "ccccccsccccc",          # one isolated skip
    "cccccssscccc",  # a run of three
    "ccccsrssrscc",          # refreshes carry the drift
    "ccsccsccsccs",          # strided, the last step too
])
@pytest.mark.parametrize("rule", ["ratio", "projection", "linear", "reuse"])
def test_predicted_error_equals_the_hooks_error_on_an_open_loop(actions, rule):
    steps, prompts, streams = 12, 3, ("cond", "uncond")
    model = TableDenoiser(steps, prompts, streams)
    lut = calibrate(model, steps, streams, prompts)
    names = {"c": COMPUTE, "s": SKIP, "r": REFRESH}
    acts = tuple(names[a] for a in actions)
    table = coefficient_table(rule, lut.cos_mean, lut.ratio_mean)
    ratios = {s: tuple(float(table[i, t]) if a == SKIP else None for t, a in enumerate(acts))
              for i, s in enumerate(streams)}
    plan = SkipPlan(steps, streams, acts, ratios)
    weights = torch.linspace(0.3, 1.0, steps, dtype=torch.float64)
    predicted = predict_plan(plan, ErrorModel(lut.deltas, weights))
    measured = measured_mse(model, plan, lut, steps, streams, weights, prompts)
    assert measured > 0
    assert math.isclose(predicted.mse, measured, rel_tol=1e-4), (predicted.mse, measured)
    chains = chains_of(acts)
    if len(chains) > 1:  # the planner's objective: chains as uncorrelated, each chain's own error
        alone = 0.0
        for first, last in chains:
            one = tuple(a if first <= t <= last else COMPUTE for t, a in enumerate(acts))
            plan = SkipPlan(steps, streams, one, {s: tuple(r if first <= t <= last else None
                                                           for t, r in enumerate(ratios[s])) for s in streams})
            alone += measured_mse(model, plan, lut, steps, streams, weights, prompts)
        assert math.isclose(sum(c.mse for c in predicted.chains), alone, rel_tol=1e-4)


def test_chains_are_split_by_two_computed_steps():
    acts = [COMPUTE] * 3 + [SKIP, COMPUTE, SKIP, COMPUTE, COMPUTE, SKIP, SKIP]
    assert chains_of(acts) == [(3, 5), (8, 9)]


# ---------------------------------------------------------------- the planner
def test_alternating_trajectory_planner_picks_the_exact_rule():
    """``D_t = -0.8 D_{t-1}``: cos -1, ratio 0.8; only ``projection`` (a = -0.8) is exact."""
    steps = 14
    model = GeometricDenoiser({"main": -0.8})
    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(steps, ("main",)), [rec]).attach(model) as hook:
        for _ in range(2):
            hook.new_sample()
            run_loop(model, steps, ("main",), batch=2)
    lut = rec.lut()
    model_err = ErrorModel(lut.deltas, torch.ones(steps, dtype=torch.float64))
    chosen = plan_min_error(lut, model_err, 4, ("main",))
    assert {rule for _, _, rule in chosen.chains} == {"projection"}
    assert chosen.predicted.mse < 1e-12
    paper = make_plan(PlanConfig(budget=4), steps, ("main",), lut)
    assert predict_plan(paper, model_err).mse > 1e-3
    assert all(abs(r + 0.8) < 1e-5 for r in chosen.plan.ratios["main"] if r is not None)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("options", [PlannerOptions(min_step=2), PlannerOptions(min_step=2, min_gap=3),
                                     PlannerOptions(min_step=4, pattern="strided", protect_last=1),
                                     PlannerOptions(min_step=2, pattern="contiguous")])
def test_planner_agrees_with_brute_force_on_a_small_loop(seed, options):
    steps, prompts, streams = 12, 3, ("cond", "uncond")
    lut = calibrate(TableDenoiser(steps, prompts, streams, seed=seed), steps, streams, prompts)
    model = ErrorModel(lut.deltas, sampler_weights(torch.linspace(999, 100, steps), "flow"))
    chosen = plan_min_error(lut, model, 3, streams, options)
    best, skips = brute_force(lut, model, 3, streams, options)
    assert math.isclose(chosen.objective, best, rel_tol=1e-9), (chosen.describe(), best, skips)
    assert chosen.plan.skipped_steps == skips


def test_planner_respects_min_step_and_protect_last():
    steps, prompts = 20, 2
    lut = calibrate(TableDenoiser(steps, prompts), steps, ("main",), prompts)
    model = ErrorModel(lut.deltas, torch.ones(steps, dtype=torch.float64))
    chosen = plan_min_error(lut, model, 4, ("main",), PlannerOptions(min_step=12, protect_last=3))
    assert min(chosen.plan.skipped_steps) >= 12 and max(chosen.plan.skipped_steps) <= 16
    with pytest.raises(PlanError, match="no schedule of 9 skips fits steps 12 to 16"):
        plan_min_error(lut, model, 9, ("main",), PlannerOptions(min_step=12, protect_last=3))


def test_sampler_weights_flow_and_ddpm():
    w = sampler_weights(torch.tensor([1000.0, 500.0, 100.0]), "flow")
    assert torch.allclose(w, torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64))
    w = sampler_weights(torch.tensor([999.0, 0.0]), "ddpm")
    assert w[0] > 100 and 0 < w[1] < 0.02  # sqrt((1 - ab) / ab) falls from ~157 to ~0.01
    with pytest.raises(ValueError, match="need every step's timestep"):
        sampler_weights(torch.tensor([1.0, float("nan")]), "flow")


def test_weight_scheme_from_what_the_lut_recorded():
    lut = calibrate(TableDenoiser(6, 1), 6, ("main",), 1)
    import dataclasses

    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from taohooks.taocache.identity import scheduler_identity

    # a noise-predicting multistep solver records flow_shift 1.0 as shift: not flow matching (review19)
    for scheduler in (DPMSolverMultistepScheduler(), UniPCMultistepScheduler()):
        assert weight_scheme("auto", dataclasses.replace(lut, identity=scheduler_identity(scheduler)))[0] == "ddpm"
    flow = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert weight_scheme("auto", dataclasses.replace(lut, identity=scheduler_identity(flow)))[0] == "flow"
    assert weight_scheme("auto", dataclasses.replace(lut, identity={"scheduler": "unipc", "shift": 5.0}))[0] == "flow"
    assert weight_scheme("auto", dataclasses.replace(lut, sampler="ddim"))[0] == "ddpm"
    assert weight_scheme("auto", lut)[0] == "uniform"
    assert weight_scheme("flow", lut)[0] == "flow"


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddpm_weights_follow_the_recorded_beta_schedule(schedule):
    """rule: auto weighted every DDIM/DDPM/PNDM LUT's steps by the linear 1e-4..0.02 schedule, whatever betas the
    run had (Latte walkthrough, 2026-11-28): the LUT's noise_schedule is used, as diffusers computes alpha_bar."""
    import dataclasses

    from diffusers import DDIMScheduler

    from taohooks.taocache.error_model import ddpm_alphas_cumprod
    from taohooks.taocache.error_plan import recorded_betas
    from taohooks.taocache.identity import scheduler_identity

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    lut = dataclasses.replace(calibrate(TableDenoiser(6, 1), 6, ("main",), 1), sampler="ddim",
                              identity=scheduler_identity(scheduler))
    betas = recorded_betas(lut)
    assert betas == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": schedule}
    # (diffusers computes in float32: its last alpha_bar, 2.4e-9 on the cosine schedule, differs by 4e-5 relative)
    assert torch.allclose(ddpm_alphas_cumprod(**betas), scheduler.alphas_cumprod.double(), rtol=1e-4, atol=0)
    t = torch.tensor([999.0, 500.0, 0.0])
    assert not torch.allclose(sampler_weights(t, "ddpm", betas), sampler_weights(t, "ddpm"))
    scheme, why = weight_scheme("auto", lut)
    assert scheme == "ddpm" and why.startswith(f"DDPM {schedule} betas 0.00085-0.012 over 1000 steps"), why
    default = dataclasses.replace(lut, identity=scheduler_identity(DDIMScheduler()))  # (the testbed's, Latte's)
    assert weight_scheme("auto", default)[1].startswith("DDPM linear betas")
    assert torch.equal(sampler_weights(t, "ddpm", recorded_betas(default)), sampler_weights(t, "ddpm"))


@pytest.mark.parametrize("identity, said", [
    ({"noise_schedule.beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
    ({"noise_schedule.trained_betas": "0123456789abcdef"}, "trained betas"),
    ({"noise_schedule.beta_end": "0.02"}, "recorded betas (not numbers)"),
    ({"noise_schedule.num_train_timesteps": 1000.0}, "recorded betas (not numbers)")])
def test_ddpm_weights_of_a_schedule_they_cannot_model_assume_linear_betas(identity, said):
    """rule: auto stopped runs it had planned (a sigmoid schedule: "set plan.error_weights: uniform"; a string beta:
    an uncaught TypeError), and trained betas were weighted as linear ones while said to be linear (review19)."""
    import dataclasses

    from taohooks.taocache.error_plan import recorded_betas

    lut = dataclasses.replace(calibrate(TableDenoiser(6, 1), 6, ("main",), 1), sampler="ddim",
                              identity={"scheduler": "DDIMScheduler", **identity})
    assert recorded_betas(lut) == {}
    scheme, why = weight_scheme("auto", lut)
    assert scheme == "ddpm" and why.startswith(f"DDPM linear betas (assumed: the LUT's {said} cannot be weighted"), why
    model, _ = error_model_of(lut, "auto")  # (plans, with the linear schedule's weights)
    assert model.steps == 6


# ---------------------------------------------------------------- configuration
def test_rule_auto_plans_through_make_plan_and_paper_is_unchanged():
    steps, prompts, streams = 16, 2, ("cond", "uncond")
    lut = calibrate(TableDenoiser(steps, prompts, streams), steps, streams, prompts)
    paper = make_plan(PlanConfig(budget=3), steps, streams, lut)
    assert paper.source == "max-cos" and paper.window is not None
    auto = make_plan(PlanConfig(budget=3, rule="auto", error_weights="uniform"), steps, streams, lut)
    assert auto.source == "error-aware" and len(auto.skipped_steps) == 3
    model, _ = error_model_of(lut, "uniform")
    assert predict_plan(auto, model).mse <= predict_plan(paper, model).mse
    projected = make_plan(PlanConfig(budget=3, coefficient="projection"), steps, streams, lut)
    assert projected.skipped_steps == paper.skipped_steps
    t = projected.skipped_steps[0]
    assert math.isclose(projected.ratio("cond", t), float(lut.cos_mean[0, t] * lut.ratio_mean[0, t]), rel_tol=1e-9)


@pytest.mark.parametrize("plan, key", [
    ({"rule": "best"}, "plan.rule"),
    ({"rule": "auto", "window": [30, 35]}, "plan.window"),
    ({"pattern": "strided"}, "plan.pattern"),
    ({"rule": "auto", "min_gap": 1}, "plan.min_gap"),
    ({"rule": "auto", "coefficient": "ratios"}, "plan.coefficient"),
    ({"rule": "auto", "refresh_every": 2}, "plan.refresh_every"),
])
def test_plan_keys_are_checked(plan, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"plan": plan})


def test_cli_plan_shows_both_rules_with_their_predicted_errors(tmp_path, capsys):
    from taohooks.cli import main

    steps, prompts, streams = 16, 2, ("cond", "uncond")
    lut = calibrate(TableDenoiser(steps, prompts, streams), steps, streams, prompts)
    lut.save(tmp_path / "l.safetensors")
    assert main(["plan", str(tmp_path / "l.safetensors"), "--budget", "3", "--rule", "auto",
                 "--error-weights", "uniform"]) == 0
    out = capsys.readouterr().out
    assert "[error-aware]" in out and "# predicted error (open loop, sampler weights: uniform " \
                                      "(plan.error_weights: uniform)): predicted PSNR" in out  # (which weights: audit)
    assert "# rule: paper would choose: 3 of 16 steps skipped" in out and out.count("predicted PSNR") == 2
    assert main(["plan", str(tmp_path / "l.safetensors"), "--budget", "3"]) == 0
    out = capsys.readouterr().out
    assert "[max-cos]" in out and "# rule: auto would choose:" in out


# ---------------------------------------------------------------- rule auto end to end
@pytest.mark.parametrize("split_batch", [False, True])
def test_rule_auto_is_exact_on_alternating_deltas_with_two_call_and_batched_cfg(split_batch):
    """Streams that alternate (cos -1): rule auto picks ``projection`` and the TaoCache hook's outputs
    equal the full run's, in Wan's two-call loop and in Latte's batched one."""
    from taohooks import TaoCache, config_from_dict
    from test_calibration import calibrate as calibrate_loop

    steps, streams = 16, ("uncond", "cond")
    model = GeometricDenoiser({"uncond": -0.7, "cond": -0.9}, shape=(2, 4, 4))
    lut = calibrate_loop(model, steps, streams, batch=2, split_batch=split_batch)
    cache = TaoCache(config_from_dict({"plan": {"budget": 5, "rule": "auto", "error_weights": "uniform"}}), lut=lut)
    ref = run_loop(model, steps, streams, batch=2, split_batch=split_batch)
    with cache.attach(model, steps=steps, streams=streams, split_batch=split_batch):
        out = run_loop(model, steps, streams, batch=2, split_batch=split_batch)
    plan = cache.plan
    assert plan.source == "error-aware" and len(plan.skipped_steps) == 5
    t = plan.skipped_steps[0]
    assert plan.ratio("uncond", t) == pytest.approx(-0.7, abs=1e-5)
    assert plan.ratio("cond", t) == pytest.approx(-0.9, abs=1e-5)
    assert max((a - b).abs().max().item() for s in ref for a, b in zip(ref[s], out[s])) < 1e-4
    paper = TaoCache(config_from_dict({"plan": {"budget": 5}}), lut=lut)
    with paper.attach(model, steps=steps, streams=streams, split_batch=split_batch):
        out = run_loop(model, steps, streams, batch=2, split_batch=split_batch)
    assert max((a - b).abs().max().item() for s in ref for a, b in zip(ref[s], out[s])) > 1e-2  # could fail


def test_rule_auto_with_pab_resets_and_the_hybrid_guard():
    """The error-aware plan's resume steps reset PAB; TeaCache stops before its first skip minus the guard."""
    from taohooks import config_from_dict
    from taohooks.taocache.cache import section_callbacks

    steps, prompts, streams = 24, 2, ("cond", "uncond")
    lut = calibrate(TableDenoiser(steps, prompts, streams), steps, streams, prompts)
    config = config_from_dict({"plan": {"budget": 4, "rule": "auto", "error_weights": "uniform", "min_step": 8},
                               "pab": {"groups": [{"pattern": "attn", "range": 2}], "steps": [2, 20]},
                               "teacache": {"threshold": 0.1, "coefficients": [1.0, 0.0], "guard_band": 2}})
    plan = make_plan(config.plan, steps, streams, lut)
    pab, tea = sorted(section_callbacks(config, plan), key=lambda c: type(c).__name__)
    assert set(pab.reset_steps) == set(plan.resume_steps) and plan.resume_steps
    assert tea.max_step == plan.skipped_steps[0] - 2


def test_predicted_vs_measured_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from taohooks.evaluation.plotting import plot_predicted_vs_measured

    rows = [{"method": m, "budget": b, "psnr": 40.0 + 10 * b + k, "predicted_psnr": 41.0 + 10 * b + k}
            for k, m in enumerate(("taocache", "taocache-auto")) for b in (0.04, 0.16)]
    rows.append({"method": "teacache", "budget": 0.16, "psnr": 50.0, "predicted_psnr": None})
    path = plot_predicted_vs_measured(rows, "t", tmp_path / "p.png")
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------- refresh semantics (plan.refresh)
def test_restart_refreshes_compute_two_steps_and_their_error_is_predicted_exactly():
    """``plan.refresh: restart``: each refresh is two real calls, so the window splits into independent
    chains (the drift of the first does not reach the second); on the open-loop model the hook's error
    equals the prediction, and the chained refresh (Algorithm 1) differs from it."""
    from taohooks.taocache.plan import window_actions

    assert list(window_actions(10, 16, 2, 2).values()) == [SKIP, SKIP, REFRESH, REFRESH, SKIP, SKIP, REFRESH]
    assert list(window_actions(10, 15, 2, 1).values()) == [SKIP, SKIP, REFRESH, SKIP, SKIP, REFRESH]
    steps, prompts, streams = 16, 3, ("cond", "uncond")
    model = TableDenoiser(steps, prompts, streams)
    lut = calibrate(model, steps, streams, prompts)
    weights = torch.ones(steps, dtype=torch.float64)
    restart = make_plan(PlanConfig(window=[6, 11], refresh_every=2, refresh="restart"), steps, streams, lut)
    chain = make_plan(PlanConfig(window=[6, 11], refresh_every=2), steps, streams, lut)
    assert restart.skipped_steps == (6, 7, 10, 11) and restart.refresh_steps == (8, 9)
    assert chain.skipped_steps == (6, 7, 9, 10) and chain.refresh_steps == (8, 11)
    em = ErrorModel(lut.deltas, weights)
    for plan in (restart, chain):
        predicted = predict_plan(plan, em)
        assert math.isclose(predicted.mse, measured_mse(model, plan, lut, steps, streams, weights, prompts),
                            rel_tol=1e-4)
    assert len(predict_plan(restart, em).chains) == 2 and len(predict_plan(chain, em).chains) == 1
    with pytest.raises(ConfigError, match="plan.refresh"):
        config_from_dict({"plan": {"budget": 4, "rule": "auto", "refresh": "restart"}})


def test_an_exact_extrapolation_is_predicted_near_zero_never_below():
    """On a geometric trajectory (the ratio rule is exact) the predicted errors are rounding: they were computed
    from float32 products and came out negative (PSNR nan), and the planner chose the most negative (review)."""
    from test_calibration import calibrate as calibrate_loop

    lut = calibrate_loop(GeometricDenoiser({"cond": 0.97, "uncond": 0.95}), 100, ("cond", "uncond"), samples=3)
    model, _ = error_model_of(lut)
    for window in ((96, 99), (80, 95), (53, 56)):
        plan = make_plan(PlanConfig(window=list(window)), 100, ("cond", "uncond"), lut)
        error = predict_plan(plan, model)
        assert 0.0 <= error.mse < 1e-9 and float(error.per_prompt.min()) >= 0.0, (window, error.mse)


def test_distant_chains_add_as_uncorrelated_and_no_prompt_is_predicted_error_free():
    """Products beyond the horizon were taken as 0 inside one quadratic form with the known ones: not a Gram matrix,
    so per-prompt squared norms came out negative, were clamped to 0, and two skips 17 steps apart on the shipped eps
    LUT were predicted as 'inf dB' where each alone costs 57-65 dB (planner audit, 2026-11-27)."""
    from pathlib import Path

    lut = CalibrationLUT.load(Path(__file__).resolve().parent.parent / "docs/results/full/eps/lut_eps.safetensors")
    model, _ = error_model_of(lut, "ddpm")
    coefficients = [[float(r) for r in lut.ratio_mean[s]] for s in range(len(lut.streams))]

    def actions(*skips):
        return [SKIP if t in skips else COMPUTE for t in range(lut.steps)]

    both, first, second = (model.schedule(actions(*s), coefficients) for s in ((27, 44), (27,), (44,)))
    assert torch.allclose(both.per_prompt, first.per_prompt + second.per_prompt, rtol=1e-12)
    assert 56.0 < both.psnr < min(first.psnr, second.psnr)
    # every pair of chains within the horizon keeps its correlation, whatever the other chains (grouping chains from
    # the first of a group dropped the known one between 15 and 28 once 12 was skipped too: review, 2026-11-27)
    def mse(*skips):
        return model.schedule(actions(*skips), coefficients).per_prompt

    assert torch.allclose(mse(12, 15, 28), mse(12, 15) + mse(15, 28) - mse(15), rtol=1e-9)
    for a in range(2, lut.steps - 1):  # every pair of single skips: no prompt predicted error-free
        for b in range(a + 2, lut.steps):
            assert model.schedule(actions(a, b), coefficients).per_prompt.min() > 0, (a, b)


def test_plan_says_a_carried_luts_prediction_and_no_phrase_twice(tmp_path, capsys):
    """A transferred LUT's prediction was labelled only in the LUT's header line; an unknown one read 'predicted
    error (...): predicted error: unknown' (planner audit, 2026-11-27)."""
    from pathlib import Path

    from taohooks.cli import main

    lut = Path(__file__).resolve().parent.parent / "docs/results/full/flow/lut_flow.safetensors"
    (tmp_path / "c.yaml").write_text(f"lut: {lut}\ncalibration: {{transfer: interpolate}}\n")
    assert main(["plan", str(tmp_path / "c.yaml"), "--steps", "30", "--budget", "5", "--rule", "auto"]) == 0
    assert "(from the carried LUT's interpolated products): predicted PSNR" in capsys.readouterr().out
    assert main(["plan", str(lut), "--window", "25", "44"]) == 0
    out = capsys.readouterr().out
    assert "# predicted error (open loop, sampler weights: flow matching (the LUT's calibration.sampler unipc)): " \
           "unknown (a chain spans more steps" in out and out.count("predicted error") == 1


def test_settings_that_leave_nothing_or_change_nothing_are_said(capsys):
    """--protect-last 50 on 50 steps read 'fits steps 25 to -1'; --lambda with rule: auto was taken (planner audit)."""
    from pathlib import Path

    from taohooks.cli import main

    lut = str(Path(__file__).resolve().parent.parent / "docs/results/full/flow/lut_flow.safetensors")
    assert main(["plan", lut, "--budget", "8", "--rule", "auto", "--protect-last", "50"]) == 1
    assert "the late half (min_step) and plan.protect_last 50 leave no step to skip in a loop of 50 steps" in \
        capsys.readouterr().err
    assert main(["plan", lut, "--budget", "8", "--rule", "auto", "--min-step", "60"]) == 1
    assert "plan.min_step 60 and plan.protect_last 0 leave no step" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="plan.gamma: applies to rule: paper"):
        config_from_dict({"plan": {"rule": "auto", "budget": 8, "gamma": 2.0}})


def test_known_correlations_that_cancel_more_than_there_is_fall_back_to_uncorrelated_chains():
    """Three chains, the outer pair beyond the horizon: the two known (negative) correlations alone made each
    prompt's error negative, clamped to 0 ('inf dB'; measured 0.84): then the chains add as uncorrelated (review)."""
    steps, prompts, streams = 12, 3, ("main",)
    model = TableDenoiser(steps, prompts, streams)
    u = torch.randn(prompts, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in range(steps):  # eps_t = u, 0, u, 0, ...: D_t = -u, +u, ...
            model.table[0, t] = u if t % 2 == 0 else 0 * u
    lut = calibrate(model, steps, streams, prompts, horizon=4)
    acts = tuple(SKIP if t in (3, 6, 9) else COMPUTE for t in range(steps))
    plan = SkipPlan(steps, streams, acts, {"main": tuple(0.0 if a == SKIP else None for a in acts)})
    predicted = predict_plan(plan, ErrorModel(lut.deltas, torch.ones(steps, dtype=torch.float64)))
    assert predicted.per_prompt.min() > 0
    assert torch.allclose(predicted.per_prompt, sum(c.per_prompt for c in predicted.chains))


def test_still_prompts_are_left_out_of_the_error_model(tmp_path):
    """A prompt whose outputs never moved has all its delta products 0: averaged in, it made the predicted error
    smaller (a best prompt of inf dB) though it says nothing of the errors (review, 2026-11-28)."""
    from taohooks import CalibrationRecorder, DenoiserHook, LoopSpec
    from taohooks.taocache.error_plan import error_model_of
    from trajectories import GeometricDenoiser

    class Frozen(torch.nn.Module):
        def forward(self, x, timestep):
            return torch.zeros(1, 3, 4, 4)

    def record(models):
        rec = CalibrationRecorder(identity={})  # (two stand-in models, one LUT)
        for model in models:
            with DenoiserHook(LoopSpec(8), [rec]).attach(model) as hook:
                hook.new_sample()
                for t in range(8):
                    hook.module(torch.zeros(1, 3), timestep=torch.tensor([float(t)]))
        return rec.lut()

    moving = record([GeometricDenoiser({"main": 0.9})])
    with_still = record([Frozen(), GeometricDenoiser({"main": 0.9})])
    assert with_still.still_prompts == 1 and with_still.deltas.prompts == 2
    (a, _), (b, _) = error_model_of(moving), error_model_of(with_still)
    assert torch.equal(a.dense.nan_to_num(-1.0), b.dense.nan_to_num(-1.0))  # (NaN: products beyond the horizon)


def test_an_error_aware_plan_says_its_predicted_error():
    """``cache.summary()`` after a ``rule: auto`` attach showed the steps but not the prediction the plan was chosen
    by (compileuser, 2026-11-28): its describe() says it."""
    steps = 14
    model = GeometricDenoiser({"main": 0.8})
    rec = CalibrationRecorder(identity={})
    with DenoiserHook(LoopSpec(steps, ("main",)), [rec]).attach(model) as hook:
        for _ in range(2):
            hook.new_sample()
            run_loop(model, steps, ("main",), batch=2)
    lut = rec.lut()
    chosen = plan_min_error(lut, ErrorModel(lut.deltas, torch.ones(steps, dtype=torch.float64)), 4, ("main",),
                            PlannerOptions(coefficient="linear"))  # (a = 1: not exact on D_t = 0.8 D_{t-1})
    assert 0 < chosen.predicted.mse and math.isfinite(chosen.predicted.psnr)
    assert chosen.plan.describe().endswith(f", predicted {chosen.predicted.psnr:.1f} dB (open loop) [error-aware]")
    assert "predicted" not in make_plan(PlanConfig(budget=4), steps, ("main",), lut).describe()
