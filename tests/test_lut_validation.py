"""A LUT is validated when it is loaded: the file and the entry are named (issue 12, class 4)."""
import json

import pytest
import torch
from safetensors.torch import save

from taohooks import CalibrationLUT, LoopSpec, LUTMismatchError
from taohooks.cli import main
from taohooks.taocache.lut import LUTFormatError
from test_calibration import calibrate
from trajectories import GeometricDenoiser


@pytest.fixture(scope="module")
def good():
    return calibrate(GeometricDenoiser({"cond": 0.9, "uncond": 0.7}), 8, ("cond", "uncond"), model_id="geo")


def contents(lut):
    """``(tensors, metadata dict)`` of the LUT's file."""
    from safetensors.torch import load

    data = lut.to_bytes()
    tensors = load(data)
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["taohooks_lut"])
    return tensors, meta


def write(path, tensors, meta):
    raw = meta if isinstance(meta, str) else json.dumps(meta)
    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata={"taohooks_lut": raw}))
    return path


def refused(tmp_path, good, edit) -> str:
    tensors, meta = contents(good)
    edited = edit(tensors, meta)
    meta = edited if isinstance(edited, str) else meta
    path = write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(LUTFormatError) as info:
        CalibrationLUT.load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    return text[len(f"{path}: "):]


def test_a_valid_file_loads_and_an_old_one_without_identity_too(tmp_path, good):
    tensors, meta = contents(good)
    assert meta["format_version"] == 2 and "delta_gram" in tensors
    del meta["identity"]  # as written before identity existed (format version 1, no delta products)
    del meta["delta_numel"], tensors["delta_gram"], tensors["delta_cross"]  # (delta_cross: since 2026-11-29)
    meta["format_version"] = 1
    lut = CalibrationLUT.load(write(tmp_path / "old.safetensors", tensors, meta))
    assert lut.identity == {} and lut.num_prompts == 2 and lut.deltas is None


def test_bit_rotted_ratio_sum(tmp_path, good):
    def edit(t, m):
        t["ratio_sum"][0, 5] = 2.5e29

    sq = good.ratio.total_sq[0, 5].item()
    assert refused(tmp_path, good, edit) == (
        f"ratio_sum at stream 'cond', step 5 is 2.5e+29 with 2 values and ratio_sumsq {sq:g}: impossible "
        "(sum^2 > count * sumsq); the file is corrupt")


def test_cosine_of_seven_and_negative_ratio(tmp_path, good):
    def cos7(t, m):
        t["cos_sum"][1, 4], t["cos_sumsq"][1, 4] = 14.0, 98.0

    assert refused(tmp_path, good, cos7) == ("cos_sum at stream 'uncond', step 4 gives a mean cosine of 7; a "
                                             "cosine similarity is in [-1, 1]")

    def ratio_minus_3(t, m):
        t["ratio_sum"][0, 6], t["ratio_sumsq"][0, 6] = -6.0, 18.0

    assert refused(tmp_path, good, ratio_minus_3) == ("ratio_sum at stream 'cond', step 6 gives a mean norm ratio "
                                                      "of -3; expected one in [0, 1000]")

    def huge_ratio(t, m):
        t["ratio_sum"][0, 6], t["ratio_sumsq"][0, 6] = 2e4, 2e8

    assert "mean norm ratio of 10000" in refused(tmp_path, good, huge_ratio)


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: t.update(timesteps=torch.zeros(7, dtype=torch.float64)),
     "tensor timesteps has shape [7], metadata says [8 steps]"),
    (lambda t, m: t.update(cos_count=t["cos_count"][:, :6]),
     "tensor cos_count has shape [2, 6], metadata says [2 streams, 8 steps]"),
    (lambda t, m: t.update(ratio_count=t["ratio_count"].double()),
     "tensor ratio_count has dtype float64; expected an integer type"),
    (lambda t, m: t.pop("cos_sumsq"), "LUT misses tensors cos_sumsq"),
    (lambda t, m: t["timesteps"].__setitem__(3, float("inf")),
     "timesteps at step 3 is inf; expected a finite value (or NaN where unknown)"),
    (lambda t, m: t["cos_sum"].__setitem__((0, 3), float("nan")),
     "cos_sum at stream 'cond', step 3 is nan; expected a finite value"),
    (lambda t, m: t["ratio_count"].__setitem__((1, 7), 3),
     "ratio_count at stream 'uncond', step 7 is 3; expected 0 to num_prompts (2)"),
    (lambda t, m: t["cos_count"].__setitem__((0, 2), -1),
     "cos_count at stream 'cond', step 2 is -1; expected 0 to num_prompts (2)"),
    (lambda t, m: m.update(num_prompts=1), "cos_count at stream 'cond', step 2 is 2; expected 0 to num_prompts (1)"),
])
def test_tensors(tmp_path, good, edit, message):
    assert refused(tmp_path, good, edit) == message


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: "{not json", "metadata 'taohooks_lut' is not JSON (Expecting property name enclosed in double "
                               "quotes: line 1 column 2 (char 1))"),
    (lambda t, m: "[1, 2]", "metadata 'taohooks_lut' is a JSON list; expected an object"),
    (lambda t, m: m.update(steps=1e14), "metadata steps is 100000000000000.0; expected a positive integer"),
    (lambda t, m: m.update(steps="8"), "metadata steps is '8'; expected a positive integer"),
    (lambda t, m: m.update(streams=["cond", "cond"]),
     "metadata streams is ['cond', 'cond']; expected a list of distinct non-empty names"),
    (lambda t, m: m.update(streams="cond"), "metadata streams is 'cond'; expected a list of distinct non-empty names"),
    (lambda t, m: m.update(calls_per_step=0), "metadata calls_per_step is 0; expected 1 (batched streams) or 2 "
                                              "(one call per stream)"),
    (lambda t, m: m.update(num_prompts=-1), "metadata num_prompts is -1; expected an integer >= 0"),
    (lambda t, m: m.update(model_id=3), "metadata model_id is 3; expected a string or null"),
    (lambda t, m: m.update(format_version="1"), "metadata format_version is '1'; expected a positive integer"),
    (lambda t, m: m.update(format_version=99), "has LUT format version 99; this taohooks reads up to 3: upgrade "
                                               "taohooks"),
    (lambda t, m: m.update(identity=["a"]), "metadata: identity must be a JSON object, got list"),
    (lambda t, m: m.update(identity={"vae": {"a": 1}}),
     "metadata: identity 'vae' is {'a': 1}; expected a string, number, boolean, null or a list of them"),
])
def test_metadata(tmp_path, good, edit, message):
    assert refused(tmp_path, good, edit) == message


def test_show_reports_a_bad_file_without_a_traceback(tmp_path, good, capsys):
    tensors, _ = contents(good)
    path = write(tmp_path / "bad.safetensors", tensors, '"just a string"')
    assert main(["show", str(path)]) == 1
    assert capsys.readouterr().err == (f"taocache show: error: {path}: metadata 'taohooks_lut' is a JSON str; "
                                       "expected an object\n")
    assert main(["show", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"taocache show: error: {tmp_path} is a directory, not a calibration LUT file\n"


def test_identity_round_trip_union_and_conflict(tmp_path, good):
    a = calibrate(GeometricDenoiser({"main": 0.9}), 6, ("main",), identity={"vae": "v1", "shift": 5.0})
    assert a.identity == {"vae": "v1", "shift": 5.0}
    loaded = CalibrationLUT.load(a.save(tmp_path / "a.safetensors"))
    assert loaded.identity == {"vae": "v1", "shift": 5.0}
    b = calibrate(GeometricDenoiser({"main": 0.9}), 6, ("main",), identity={"vae": "v1", "size": [480, 832]})
    assert a.merge(b).identity == {"vae": "v1", "shift": 5.0, "size": [480, 832]}
    c = calibrate(GeometricDenoiser({"main": 0.9}), 6, ("main",), identity={"vae": "v2"})
    with pytest.raises(LUTMismatchError) as info:
        loaded.merge(c)
    assert str(info.value) == (f"cannot merge: identity 'vae' is 'v1' in LUT {tmp_path / 'a.safetensors'} and 'v2' "
                               "in LUT")
    with pytest.raises(LUTMismatchError, match="calibrated with vae 'v1', this run has 'v2': an unfinished LUT is "
                                               "continued at the values it began with .*finish it at vae 'v1', or "
                                               "give this run a lut: of its own"):  # ("this recorder": ospuser)
        from taohooks import CalibrationRecorder, DenoiserHook
        DenoiserHook(LoopSpec(6), [CalibrationRecorder(resume=loaded, identity={"vae": "v2"})]).attach(
            GeometricDenoiser({"main": 0.9}))


def test_a_valid_lut_with_a_zero_delta_step_loads(tmp_path):
    """A model whose output does not change between two steps: its statistics there are undefined and
    dropped (not a corrupt file), and the ratio of the step that stops moving is 0."""
    class Still(torch.nn.Module):
        def forward(self, x, timestep):
            t = float(timestep)
            return torch.full((1, 4), 0.5 ** min(t, 3.0))

    from taohooks import CalibrationRecorder, DenoiserHook
    rec = CalibrationRecorder()
    with DenoiserHook(LoopSpec(6), [rec]).attach(Still()) as hook:
        for t in range(6):
            hook.module(None, timestep=t)
    lut = CalibrationLUT.load(rec.lut().save(tmp_path / "still.safetensors"))
    assert lut.num_prompts == 1 and lut.ratio.count[0].tolist() == [0, 0, 1, 1, 1, 0]
    assert lut.cos.count[0].tolist() == [0, 0, 1, 1, 0, 0] and lut.ratio_mean[0, 2:5].tolist() == [0.5, 0.5, 0.0]


def test_a_generation_that_never_moves_is_counted_apart_and_the_lut_stays_readable(tmp_path, capsys):
    """A model whose outputs never change (an output layer at its zero initialisation) was counted as a prompt
    that adds no statistics: the LUT then held fewer values per step than prompts, a file the loader calls
    corrupt, so the prompts recorded before could not be read any more (compat walkthrough, 2026-11-28). Counted
    in still_prompts, with a warning, in either order (review)."""
    class Frozen(torch.nn.Module):
        def forward(self, x, timestep):
            return torch.zeros(1, 3, 4, 4)

    from taohooks import CalibrationRecorder, DenoiserHook
    from trajectories import GeometricDenoiser

    rec = CalibrationRecorder(identity={})  # (two stand-in models, one LUT)
    with DenoiserHook(LoopSpec(6), [rec]).attach(GeometricDenoiser({"main": 0.9})) as hook:
        hook.new_sample()
        for t in range(6):
            hook.module(torch.zeros(1, 3), timestep=torch.tensor([float(t)]))
    good = rec.lut().save(tmp_path / "lut.safetensors")
    rec = CalibrationRecorder(identity={}, resume=CalibrationLUT.load(good))
    with DenoiserHook(LoopSpec(6), [rec]).attach(Frozen()) as hook:
        hook.new_sample()
        for t in range(6):
            hook.module(None, timestep=torch.tensor([float(t)]))
    assert "generation 1: the outputs of 1 of its 1 prompt(s) never changed from one step to the next" in \
        capsys.readouterr().err
    lut = CalibrationLUT.load(rec.lut().save(tmp_path / "more.safetensors"))
    assert (lut.num_prompts, lut.still_prompts, int(lut.cos.count.max())) == (2, 1, 1)
    assert lut.metadata()["format_version"] == 3 and CalibrationLUT.load(good).metadata()["format_version"] == 2


def test_a_batch_with_one_still_prompt_makes_a_readable_lut(tmp_path):
    """One prompt of a batch never moves, the other does (review): counted per prompt."""
    class Half(torch.nn.Module):
        def forward(self, x, timestep):
            return torch.stack([torch.zeros(4), torch.full((4,), 0.9 ** float(timestep))])

    from taohooks import CalibrationRecorder, DenoiserHook

    rec = CalibrationRecorder(identity={})  # (two stand-in models, one LUT)
    with DenoiserHook(LoopSpec(6), [rec]).attach(Half()) as hook:
        for t in range(6):
            hook.module(None, timestep=torch.tensor([float(t)]))
    lut = CalibrationLUT.load(rec.lut().save(tmp_path / "half.safetensors"))
    assert (lut.num_prompts, lut.still_prompts) == (2, 1)


def test_never_moving_generations_first_then_moving_ones_make_a_readable_lut(tmp_path):
    """The other order (review): a zero-initialised model's generation counted as a prompt, then a moving one; the
    LUT held 2 prompts and 1 value per step, which the loader called corrupt. The still prompts are recorded."""
    class Frozen(torch.nn.Module):
        def forward(self, x, timestep):
            return torch.zeros(1, 3, 4, 4)  # (the shape of GeometricDenoiser's outputs)

    from taohooks import CalibrationRecorder, DenoiserHook
    from trajectories import GeometricDenoiser

    rec = CalibrationRecorder(identity={})  # (two stand-in models, one LUT)
    for model in (Frozen(), GeometricDenoiser({"main": 0.9})):
        with DenoiserHook(LoopSpec(6), [rec]).attach(model) as hook:
            hook.new_sample()
            for t in range(6):
                hook.module(torch.zeros(1, 4), timestep=torch.tensor([float(t)]))
    lut = CalibrationLUT.load(rec.lut().save(tmp_path / "lut.safetensors"))
    assert (lut.num_prompts, lut.still_prompts, int(lut.cos.count.max())) == (2, 1, 1)
    merged = lut.merge(lut)
    assert (merged.num_prompts, merged.still_prompts) == (4, 2)
    CalibrationLUT.load(merged.save(tmp_path / "merged.safetensors"))
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "lut.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in meta if "still_prompts" in meta[k])
    edited = json.loads(meta[key])
    for value, said in ((0, "num_prompts is 2, but no step holds more than 1 values"),
                        (3, r"still_prompts is 3; expected an integer from 0 to num_prompts \(2\)")):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={key: json.dumps({**edited,
                                                                                         "still_prompts": value})})
        with pytest.raises(LUTFormatError, match=said):
            CalibrationLUT.load(tmp_path / "bad.safetensors")


def test_generations_still_in_different_streams_make_a_readable_lut(tmp_path):
    """Generation 1 moves only in its cond stream, generation 2 only in its uncond stream (a prompt still in one
    stream): each counted its 1 prompt as moving, so the LUT held 2 prompts, 0 still, and 1 value at its fullest
    step, a file the loader called corrupt (third review, 2026-11-28: left open). still_prompts is now what the
    LUT's fullest step lacks, recomputed at every merge, so any order and grouping of generations reads back."""
    class OneStreamMoves(torch.nn.Module):
        def __init__(self, moving):
            super().__init__()
            self.moving = moving

        def forward(self, x, timestep, stream):
            t = float(timestep.reshape(-1)[0])
            return torch.full((1, 4), 0.9 ** t if stream == self.moving else 0.5)

    from taohooks import CalibrationRecorder, DenoiserHook

    rec = CalibrationRecorder()
    loop = LoopSpec(6, ("cond", "uncond"))
    for moving in ("cond", "uncond"):
        with DenoiserHook(loop, [rec]).attach(OneStreamMoves(moving)) as hook:
            hook.new_sample()
            for t in range(6):
                for s in loop.streams:
                    hook.module(None, timestep=torch.tensor([float(t)]), stream=s)
    lut = CalibrationLUT.load(rec.lut().save(tmp_path / "lut.safetensors"))
    assert (lut.num_prompts, lut.still_prompts, int(lut.cos.count.max())) == (2, 1, 1)
    merged = CalibrationLUT.load(lut.merge(lut).save(tmp_path / "merged.safetensors"))
    assert (merged.num_prompts, merged.still_prompts, int(merged.cos.count.max())) == (4, 2, 2)
