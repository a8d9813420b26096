"""The Python route (``TaoCache(...).attach(model, ...)`` without ``identity=``) records and checks what the model
is, as the integrations do: a LUT calibrated in bf16 was taken by an fp32 run (and the reverse) without a word,
though the two LUTs differ by a few percent in their ratios (dtype walkthrough, 2026-11-28)."""
import pytest
import torch
from torch import nn

from taohooks import TaoCache
from taohooks.config import config_from_dict
from taohooks.taocache.lut import LUTMismatchError
from prewarmed import run_python

STEPS = 10


class Model(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.t = nn.Linear(1, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x, timestep):
        h = x + self.t(timestep.reshape(-1, 1).to(x.dtype) / 1000)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return h


def generate(cache, model, prompts=1, width=8):
    dtype = next(model.parameters()).dtype
    with cache.attach(model, STEPS) as hook, torch.no_grad():
        for p in range(prompts):
            hook.new_sample()
            x = torch.randn(1, width, generator=torch.Generator().manual_seed(p)).to(dtype)
            for i in range(STEPS):
                x = x - 0.1 * model(x, timestep=torch.tensor([1000.0 * (1 - i / STEPS)]))
    return x


def config(tmp_path, **calibration):
    return config_from_dict({"lut": str(tmp_path / "lut.safetensors"), "plan": {"budget": 2},
                             "calibration": {"prompts": 2, **calibration}})


def test_a_lut_of_another_dtype_or_model_is_refused_on_the_python_route(tmp_path):
    generate(TaoCache(config(tmp_path)), Model(), prompts=2)  # calibrates, fp32
    from taohooks.taocache.lut import CalibrationLUT

    identity = CalibrationLUT.load(tmp_path / "lut.safetensors").identity
    assert identity["model"] == "Model" and identity["dtype"] == "torch.float32" and "architecture" in identity
    generate(TaoCache(config(tmp_path)), Model())  # the same model: skips
    with pytest.raises(LUTMismatchError, match="dtype: this run 'torch.bfloat16', the LUT 'torch.float32'.*"
                                               r"calibration.accept: \[dtype\]"):
        generate(TaoCache(config(tmp_path)), Model().to(torch.bfloat16))
    with pytest.raises(LUTMismatchError, match="architecture: this run "):
        generate(TaoCache(config(tmp_path)), Model(width=4), width=4)
    cache = TaoCache(config(tmp_path, accept=["dtype"]))  # knowingly: accepted
    generate(cache, Model().to(torch.bfloat16))
    assert "2 of 10 steps skipped" in cache.summary()


def test_a_compiled_or_data_parallel_model_is_the_model_it_wraps(tmp_path):
    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    for wrapped in (nn.DataParallel(Model()), torch.compile(Model(), backend="eager")):
        cache = TaoCache(config(tmp_path))
        generate(cache, wrapped)
        assert "2 of 10 steps skipped" in cache.summary()


FSDP_SCRIPT = """
import os, sys, tempfile, pathlib, torch, warnings
warnings.filterwarnings("ignore")
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from test_python_route_identity import Model, config, generate
from taohooks import TaoCache
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
tmp = pathlib.Path(tempfile.mkdtemp())
generate(TaoCache(config(tmp)), Model(), prompts=2)
for name, make in (("FSDP1", lambda: FSDP(Model(), device_id=torch.device("cpu"))),
                   ("FSDP2", lambda: fully_shard(Model()))):
    cache = TaoCache(config(tmp))
    generate(cache, make())
    print(name, cache.summary().splitlines()[0])
dist.destroy_process_group()
"""


TWO_RANKS_SCRIPT = """
import os, sys, tempfile, pathlib, torch, warnings
warnings.filterwarnings("ignore")
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from test_python_route_identity import Model, config, generate
    from taohooks import TaoCache
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    cache = TaoCache(config(pathlib.Path(tmp)))
    generate(cache, FSDP(Model(), device_id=torch.device("cpu"), use_orig_params=True))
    print(f"rank {rank}", cache.summary().splitlines()[0], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from test_python_route_identity import Model, config, generate
    from taohooks import TaoCache
    tmp = tempfile.mkdtemp()
    generate(TaoCache(config(pathlib.Path(tmp))), Model(), prompts=2)  # the unwrapped model's LUT, one process
    mp.spawn(rank_main, args=(sys.argv[1], tmp), nprocs=2)
"""


def test_an_fsdp_model_is_checked_without_its_hidden_shapes(tmp_path):
    """FSDP flattens (FSDP1) or shards (FSDP2, whose class becomes FSDP<Model>) the parameters: the architecture
    fingerprint of the Python route saw other shapes and refused the model's own LUT (review)."""
    import os
    import socket

    def free_port() -> int:  # (a random port could be another worker's: review21)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    res = run_python([str(script), str(free_port())], timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FSDP1 TaoCache: 2 of 10 steps skipped" in res.stdout and "FSDP2 TaoCache: 2 of 10 steps skipped" in \
        res.stdout
    # FSDP1 with use_orig_params on 2 ranks: each rank's inner module holds its own shard (other shapes per rank)
    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS_SCRIPT)
    res = run_python([str(script), str(free_port())], timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("TaoCache: 2 of 10 steps skipped") == 2, res.stdout


def test_an_identity_given_is_the_run_s_and_a_lut_without_one_is_not_checked(tmp_path):
    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    cache = TaoCache(config(tmp_path))
    with cache.attach(Model().to(torch.bfloat16), STEPS, identity={"model": "Model", "dtype": "torch.float32"}):
        pass  # what the caller says it is (an integration's identity) is what is checked
    from taohooks.taocache.lut import CalibrationLUT

    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    lut.identity = {}  # a LUT written before identities were recorded
    cache = TaoCache(config(tmp_path), lut=lut)
    generate(cache, Model().to(torch.bfloat16))
    assert "2 of 10 steps skipped" in cache.summary()


def test_a_lut_that_records_none_of_the_run_s_keys_says_so(tmp_path, capsys):
    """An earlier taohooks' LUT (no pixels, frame_num, guide_scale; or no identity at all) took another --size or
    model without a word: what it does not record is said, once, with the run's values (compat walkthrough)."""
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    lut.identity = {"model": "Model"}  # as an earlier taohooks wrote it
    lut.save(tmp_path / "lut.safetensors")
    capsys.readouterr()
    generate(TaoCache(config(tmp_path)), Model().to(torch.bfloat16))
    err = capsys.readouterr().err
    assert "lut.safetensors records no architecture, dtype of its calibrating run, so this run's (architecture '" in err
    assert "dtype 'torch.bfloat16') cannot be checked against it: calibrate a LUT of this run" in err
    generate(TaoCache(config(tmp_path, accept=["dtype", "architecture"])), Model())  # accepted: nothing to say
    assert "records no" not in capsys.readouterr().err


def test_a_lut_calibrated_under_fsdp_is_not_called_out_of_date(tmp_path, capsys):
    """A LUT calibrated under FSDP records no architecture (the parameters are sharded); a run without FSDP was told
    to 'calibrate a LUT of this run', which under FSDP gives the same LUT again (left open, 2026-11-28)."""
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    lut.identity = {k: v for k, v in lut.identity.items() if k != "architecture"}  # as a run under FSDP writes it
    lut.save(tmp_path / "lut.safetensors")
    capsys.readouterr()
    generate(TaoCache(config(tmp_path)), Model())
    err = capsys.readouterr().err
    assert "lut.safetensors records no architecture of its calibrating run" in err
    assert "calibrate a LUT of this run" not in err and "(a LUT calibrated under FSDP records none" in err


def test_an_explicit_lut_of_fewer_prompts_is_taken_with_its_accept(tmp_path):
    """TaoCache(config, lut=...) on a LUT holding fewer prompts than calibration.prompts calibrates nothing (no lut:
    path), so calibration.accept applies; the unfinished-LUT refusal took it for a continued calibration (review19)."""
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    data = {"plan": {"budget": 2}, "calibration": {"prompts": 20, "accept": ["dtype"]}}
    cache = TaoCache(config_from_dict(data), lut=lut)
    generate(cache, Model().to(torch.bfloat16))
    assert "2 of 10 steps skipped" in cache.summary()


class KeepsFloat32(Model):
    """As diffusers' Wan transformers (``_keep_in_fp32_modules``): the first parameters (here the time embedding)
    stay in float32 whatever dtype the rest is loaded in."""
    def __init__(self, dtype):
        super().__init__(width=64)
        self.blocks.to(dtype)

    def forward(self, x, timestep):
        h = (x + self.t(timestep.reshape(-1, 1) / 1000)).to(self.blocks[0].weight.dtype)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return h.float()


def test_the_dtype_most_weights_are_in_is_checked(tmp_path, capsys):
    """A diffusers Wan transformer loaded in bf16 was recorded as float32 (its first parameter's dtype): a LUT of
    a bf16 run took fp16 and fp32 runs without a word (diffusersuser, 2026-11-28). ``dtype.weights`` records the
    dtype most weights are in; a LUT recorded before it is checked on ``dtype`` alone, without a notice."""
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path)), KeepsFloat32(torch.bfloat16), prompts=2, width=64)
    identity = CalibrationLUT.load(tmp_path / "lut.safetensors").identity
    assert identity["dtype"] == "torch.float32" and identity["dtype.weights"] == "torch.bfloat16"
    generate(TaoCache(config(tmp_path)), KeepsFloat32(torch.bfloat16), width=64)  # the same run: skips
    for dtype in (torch.float16, torch.float32):
        with pytest.raises(LUTMismatchError) as refused:
            generate(TaoCache(config(tmp_path)), KeepsFloat32(dtype), width=64)
        assert str(refused.value).split("another run: ")[1].count("dtype") == 3 and (  # (dtype.weights, its
            # meaning, the accept advice: said once)
            f"dtype.weights (the dtype most of the model's weights are in): this run '{dtype}', the LUT "
            f"'torch.bfloat16'. Give this run its own LUT") in str(refused.value), str(refused.value)
        cache = TaoCache(config(tmp_path, accept=["dtype"]))  # knowingly: accepted
        generate(cache, KeepsFloat32(dtype), width=64)
        assert "2 of 10 steps skipped" in cache.summary()
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    del lut.identity["dtype.weights"]  # as a LUT of an earlier taohooks records it
    lut.save(tmp_path / "lut.safetensors")
    capsys.readouterr()
    cache = TaoCache(config(tmp_path))
    generate(cache, KeepsFloat32(torch.float32), width=64)  # every weight float32: the LUT's dtype is all to check
    assert "2 of 10 steps skipped" in cache.summary() and "records no" not in capsys.readouterr().err
    generate(TaoCache(config(tmp_path)), KeepsFloat32(torch.float16), width=64)  # (as before: not checkable)
    assert ("records no dtype.weights of its calibrating run, so this run's (dtype.weights 'torch.float16') cannot "
            "be checked") in capsys.readouterr().err  # (was "records no dtype.*", without the value: review20)


@pytest.mark.parametrize("plan, said", [
    ({"budget": 9}, "plan.budget: 9 skipped steps cannot fit loop.steps 10: at most 8"),
    ({"budget": 9, "rule": "auto"}, "plan.budget: 9 skipped steps cannot fit loop.steps 10"),
    ({"window": [5, 12]}, "plan.window[1]: step 12 does not exist with loop.steps 10"),
    ({"budget": 4, "rule": "auto", "min_step": 8},
     "plan.budget: 4 skipped steps span 4 steps, but the late regime of loop.steps 10 holds 2"),
])
def test_a_plan_past_the_attached_steps_is_refused_before_calibrating(tmp_path, plan, said):
    """The Python route gives the steps at attach, not in loop.steps: a plan no LUT of them could serve was taken by
    the calibrating attach and refused at the first skipping one, after the whole calibration (compileuser,
    2026-11-28)."""
    from taohooks.taocache.plan import PlanError

    cache = TaoCache(config_from_dict({"lut": str(tmp_path / "lut.safetensors"), "plan": plan,
                                       "calibration": {"prompts": 2}}))
    with pytest.raises(PlanError, match=r"said before calibrating") as refused:
        generate(cache, Model())
    assert said in str(refused.value) and not (tmp_path / "lut.safetensors").exists()


class WithAuxLoss(Model):
    """A prediction and a 0-d auxiliary value (an MoE DiT's balancing loss)."""
    def forward(self, x, timestep):
        y = super().forward(x, timestep)
        return y, y.square().mean()


def test_an_output_tensor_without_the_batch_is_named_while_calibrating(tmp_path):
    """With batch_dim=0 a 0-d leaf beside the prediction crashed the loop with an IndexError inside the statistics
    (compileuser, 2026-11-28); now it is named, with the shape expected and what to do."""
    with pytest.raises(ValueError, match=r"output tensor 1 of 2 of call 0 \(step 0\) has shape \(\), but the loop "
                                         r"declares batch_dim=0.*\(1, as tensor 0 of shape \(1, 8\)\).*batch_dim=None"):
        model = WithAuxLoss()
        with TaoCache(config(tmp_path)).attach(model, STEPS) as hook, torch.no_grad():
            hook.new_sample()
            model(torch.zeros(1, 8), timestep=torch.tensor([1000.0]))


def test_a_batch_that_changes_at_a_skipped_step_is_computed(tmp_path, capsys):
    """A loop whose batch changed at a skipped step got the old batch's prediction back, without a word (a [2, ...]
    output for a [1, ...] input, which a CFG update broadcasts: compileuser, 2026-11-28): that call is computed."""
    generate(TaoCache(config(tmp_path)), Model(), prompts=2)  # calibrates
    cache = TaoCache(config(tmp_path))
    model = Model()
    with cache.attach(model, STEPS) as hook, torch.no_grad():
        hook.new_sample()
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
        for i in range(STEPS):
            if i == cache.plan.skipped_steps[0]:
                x = x[:1]
            out = model(x, timestep=torch.tensor([1000.0 * (1 - i / STEPS)]))
            assert out.shape == x.shape
            x = x - 0.1 * out
    err = capsys.readouterr().err
    assert (f"TaoCache computed step {cache.plan.skipped_steps[0]} instead of skipping it: the call's first tensor "
            "argument has shape [1, 8], at the stream's call before [2, 8]") in err, err


def test_the_explicit_recorder_records_the_model_and_a_continued_lut_is_not_stamped(tmp_path, capsys):
    """README's explicit calibration (a CalibrationRecorder on a DenoiserHook) recorded no identity, so a model of
    another architecture skipped on its LUT; and a run continuing an identity-less LUT stamped its identity on the
    prompts before it (compileuser, 2026-11-28)."""
    import taohooks
    from taohooks.taocache.lut import CalibrationLUT

    def record(recorder, model, prompts):
        with taohooks.DenoiserHook(taohooks.LoopSpec(STEPS, ("main",)), [recorder]).attach(model) as hook, \
                torch.no_grad():
            for p in range(prompts):
                hook.new_sample()
                x = torch.randn(1, 8, generator=torch.Generator().manual_seed(p))
                for i in range(STEPS):
                    x = x - 0.1 * model(x, timestep=torch.tensor([1000.0 * (1 - i / STEPS)]))

    rec = taohooks.CalibrationRecorder(model_id="toy")
    record(rec, Model(), 2)
    rec.save(tmp_path / "lut.safetensors")
    identity = CalibrationLUT.load(tmp_path / "lut.safetensors").identity
    assert identity["model"] == "Model" and "architecture" in identity and identity["dtype"] == "torch.float32"
    with pytest.raises(LUTMismatchError, match="architecture: this run "):
        generate(TaoCache(config(tmp_path)), Model(width=4), width=4)

    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    lut.identity = {"model": "Model"}  # as an earlier taohooks wrote it (no architecture, no dtype)
    lut.save(tmp_path / "old.safetensors")
    rec = taohooks.CalibrationRecorder(model_id="toy", resume=CalibrationLUT.load(tmp_path / "old.safetensors"))
    record(rec, Model(), 1)
    rec.save(tmp_path / "old.safetensors")
    continued = CalibrationLUT.load(tmp_path / "old.safetensors")
    assert continued.num_prompts == 3 and continued.identity == {"model": "Model"}  # not vouched for the first 2


def test_a_compiled_model_is_recorded_as_the_model_it_compiles(tmp_path, capsys):
    """``pipe.transformer = torch.compile(pipe.transformer)`` was recorded as model OptimizedModule with another
    architecture fingerprint, so a LUT made without compile was refused on the compiled pipeline and the reverse
    (diffusersuser, 2026-11-28); a LUT recorded so is checked as the wrapper of the run's model, and where that model
    is not at hand, said as not checked (it was said as recording no model: review21)."""
    from taohooks.launcher.integration import identity_of_model
    from taohooks.runtime.loop import LoopSpec
    from taohooks.taocache.cache import check_run
    from taohooks.taocache.identity import compiled_fingerprint
    from taohooks.taocache.lut import CalibrationLUT

    model = Model()
    assert identity_of_model(torch.compile(model)) == identity_of_model(model)
    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    lut.identity.update(model="OptimizedModule", architecture=compiled_fingerprint(model))  # as such a LUT has them
    lut.save(tmp_path / "lut.safetensors")
    capsys.readouterr()
    cache = TaoCache(config(tmp_path))
    generate(cache, Model())
    assert "2 of 10 steps skipped" in cache.summary()
    assert "cannot be checked" not in capsys.readouterr().err  # (checked: the wrapper of this model)
    check_run(config(tmp_path), CalibrationLUT.load(tmp_path / "lut.safetensors"), LoopSpec(STEPS, ("main",)),
              identity_of_model(model))  # (no model given)
    err = capsys.readouterr().err
    assert ("records torch.compile's wrapper, not the model (a LUT of before 2026-11-28), so this run's (model "
            f"'Model', architecture '{identity_of_model(model)['architecture']}') cannot be checked against it") in err


def test_a_lut_of_another_model_says_so_before_its_streams(tmp_path):
    """A Latte LUT on a Wan pipeline was said as a stream-order difference only, whose fix the next error undid
    (diffusersuser, 2026-11-28): the model comes first."""
    generate(TaoCache(config(tmp_path)), Model(), prompts=2)
    with pytest.raises(LUTMismatchError) as refused:
        TaoCache(config(tmp_path)).attach(Model(width=4), STEPS, streams=("cond", "uncond"))
    said = str(refused.value)
    assert "lut.safetensors is of another model (architecture: this run '" in said
    assert "; it has streams (main), this run has (cond, uncond)" in said, said


def test_a_plan_for_another_step_count_is_taken_while_calibrating_a_lut_that_transfers(tmp_path):
    """With ``calibration.transfer: interpolate`` a LUT calibrated at fewer steps serves runs of more: the check of
    the plan against the calibrating attach's steps refused such a plan (review20, 2026-11-28)."""
    cache = TaoCache(config_from_dict({"lut": str(tmp_path / "lut.safetensors"), "plan": {"skip_steps": [30, 40]},
                                       "calibration": {"prompts": 2, "transfer": "interpolate"}}))
    generate(cache, Model(), prompts=2)  # calibrates at 10 steps
    assert (tmp_path / "lut.safetensors").is_file()


def test_an_unfinished_lut_that_recorded_the_compile_wrapper_is_finished_and_merged(tmp_path):
    """An unfinished LUT recorded (before 2026-11-28) on a compiled transformer holds torch.compile's wrapper as its
    model: the recorder's resume check and ``taocache merge`` compared the wrapper's class and fingerprint, so it
    could be neither finished nor merged (review20); the result records the model."""
    from taohooks.taocache.identity import compiled_fingerprint
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path, prompts=3)), Model(), prompts=1)  # 1 of 3 prompts: unfinished
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    assert lut.num_prompts == 1
    recorded_model = lut.identity["model"], lut.identity["architecture"]
    lut.identity.update(model="OptimizedModule", architecture=compiled_fingerprint(Model()))  # as such a LUT has them
    lut.save(tmp_path / "lut.safetensors")
    lut.save(tmp_path / "wrapper.safetensors")
    generate(TaoCache(config(tmp_path, prompts=3)), Model(), prompts=1)  # continued: 2 of 3
    continued = CalibrationLUT.load(tmp_path / "lut.safetensors")
    assert continued.num_prompts == 2
    assert (continued.identity["model"], continued.identity["architecture"]) == recorded_model
    for merged in (continued.merge(CalibrationLUT.load(tmp_path / "wrapper.safetensors")),
                   CalibrationLUT.load(tmp_path / "wrapper.safetensors").merge(continued)):
        assert merged.num_prompts == 3
        assert (merged.identity["model"], merged.identity["architecture"]) == recorded_model



def test_the_compile_wrapper_s_fingerprint_is_computed_from_its_model():
    """What a LUT recorded for a compiled model before 2026-11-28 holds, from the model alone: checked against the
    real wrapper's, with parameters and with a diffusers-like config."""
    from taohooks.taocache.identity import architecture_fingerprint, compiled_fingerprint

    class Configured(Model):
        config = {"layers": 2, "width": 8, "_private": 1}

    for model in (Model(), Configured()):
        wrapper = torch.compile(model)
        assert architecture_fingerprint(wrapper) == compiled_fingerprint(model) == compiled_fingerprint(wrapper)
        assert compiled_fingerprint(model) != architecture_fingerprint(model)


def test_a_lut_that_recorded_another_model_s_compile_wrapper_is_neither_continued_nor_used(tmp_path):
    """Its model and architecture were not compared at all: continued by a model of another architecture, the LUT
    then recorded that model for prompts of another (review21)."""
    from taohooks.taocache.identity import compiled_fingerprint
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path, prompts=3)), Model(), prompts=1)
    lut = CalibrationLUT.load(tmp_path / "lut.safetensors")
    lut.identity.update(model="OptimizedModule", architecture=compiled_fingerprint(Model()))
    lut.save(tmp_path / "lut.safetensors")
    deeper = Model()
    deeper.blocks.append(nn.Linear(8, 8))  # (the same class and output: another architecture)
    for prompts in (3, 1):  # continued (1 of 3), then used as complete (1 of 1)
        with pytest.raises(LUTMismatchError, match="recorded torch.compile's wrapper of a model of another arch"):
            generate(TaoCache(config(tmp_path, prompts=prompts)), deeper, prompts=1)
    assert CalibrationLUT.load(tmp_path / "lut.safetensors").num_prompts == 1
    generate(TaoCache(config(tmp_path, prompts=1)), Model())  # its own model: used, without a notice


def test_a_wrapper_lut_merged_with_one_without_architecture_records_none(tmp_path):
    """Merged with a LUT calibrated under FSDP (no architecture), the wrapper's fingerprint stayed next to the
    model's class, and the merged LUT refused that very model (review21)."""
    from taohooks.taocache.identity import compiled_fingerprint
    from taohooks.taocache.lut import CalibrationLUT

    generate(TaoCache(config(tmp_path, prompts=3)), Model(), prompts=1)
    wrapper, sharded = (CalibrationLUT.load(tmp_path / "lut.safetensors") for _ in range(2))
    wrapper.identity.update(model="OptimizedModule", architecture=compiled_fingerprint(Model()))
    del sharded.identity["architecture"]
    for merged in (wrapper.merge(sharded), sharded.merge(wrapper)):
        assert merged.identity["model"] == "Model" and "architecture" not in merged.identity


def test_taocache_merge_says_a_wrapper_lut_s_model_cannot_be_checked(tmp_path, capsys):
    """``taocache merge`` has no model to check a wrapper LUT's prompts against: it merged one with a LUT of
    another architecture without a word, the result labelled as the other's (review22)."""
    from taohooks.cli import main
    from taohooks.taocache.identity import compiled_fingerprint
    from taohooks.taocache.lut import CalibrationLUT

    (tmp_path / "w").mkdir()
    other = Model()
    with torch.no_grad():
        other.t.bias += 0.01  # (other prompts' products: the same prompts twice are refused since 2026-11-29)
    generate(TaoCache(config(tmp_path / "w", prompts=3)), other, prompts=1)
    wrapper = CalibrationLUT.load(tmp_path / "w" / "lut.safetensors")
    wrapper.identity.update(model="OptimizedModule", architecture=compiled_fingerprint(Model()))
    wrapper.save(tmp_path / "wrapper.safetensors")
    generate(TaoCache(config(tmp_path, prompts=3)), Model(), prompts=1)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "wrapper.safetensors"), str(tmp_path / "lut.safetensors"), "-o",
                 str(tmp_path / "merged.safetensors")]) == 0
    assert ("wrapper.safetensors recorded torch.compile's wrapper, not the model (a LUT of before 2026-11-28): that "
            "its prompts are of the other inputs' model cannot be checked here") in capsys.readouterr().err


def test_a_lut_of_another_frame_count_is_not_said_as_only_another_model(tmp_path):
    """Latte's script builds its transformer with the YAML's video_length, so another frame count changes the
    architecture fingerprint: the lead-in said "is of another model" alone (review20)."""
    from taohooks.taocache.identity import model_identity

    def identity(model, frames):
        return {**model_identity(model), "frames": frames}

    cache = TaoCache(config(tmp_path))
    model = Model()
    with cache.attach(model, STEPS, identity=identity(model, 16)) as hook, torch.no_grad():
        for p in range(2):
            hook.new_sample()
            x = torch.randn(1, 8, generator=torch.Generator().manual_seed(p))
            for i in range(STEPS):
                x = x - 0.1 * model(x, timestep=torch.tensor([1000.0 * (1 - i / STEPS)]))
    other = Model(width=4)
    with pytest.raises(LUTMismatchError) as refused:
        TaoCache(config(tmp_path)).attach(other, STEPS, streams=("cond", "uncond"), identity=identity(other, 8))
    said = str(refused.value)
    assert "lut.safetensors is of another frame count, or another model (frames (frames generated" in said, said
    assert "this run 8, the LUT 16; architecture (a fingerprint" in said  # (the counts were not said: review21)
