"""What a LUT was calibrated on, and whether this run is the same: the LUT's *identity*.

A LUT's ratios belong to one model and one sampler: a LUT calibrated with Wan2.1 t2v-1.3B at
``--sample_shift 5`` does not fit t2v-14B, i2v-14B or shift 8, and nothing in the outputs says so.
At calibration the integration records what it can see of the run, a flat JSON object::

    {"model": "WanModel", "architecture": "3f9c2a1b0d4e", "dtype": "torch.bfloat16",
     "task": "t2v-1.3B", "scheduler": "unipc", "shift": 5.0}

(``steps``, ``streams`` and the timesteps are the LUT's own fields, checked by
:meth:`CalibrationLUT.check`). At attach the same keys are taken from the run and every key both
have must agree, unless the config lists it under ``calibration.accept``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from ..runtime.patching import unwrap_model

__all__ = ["model_identity", "scheduler_identity", "differences", "unrecorded", "comparable", "describe_differences",
           "IdentityMismatch", "accept_name", "accept_names",
           "weights_fingerprint", "call_settings"]

Identity = Dict[str, Any]


class IdentityMismatch(ValueError):
    """The run is not what the LUT was calibrated on."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _plain(value: Any) -> Any:
    """:func:`_jsonable`, with numpy / torch arrays and scalars as their numbers (a scheduler built in Python may hold
    them where one loaded from its JSON config holds lists and floats; the architecture fingerprint keeps
    :func:`_jsonable`, so that the fingerprints LUTs recorded stay the same)."""
    if hasattr(value, "tolist") and callable(value.tolist) and not isinstance(value, (str, bytes)):
        try:
            value = value.tolist()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _jsonable(value)


def _config_of(model: nn.Module) -> Optional[Mapping[str, Any]]:
    """The model's own configuration (diffusers' ``ModelMixin.config``), if it has one."""
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        return config
    return None


def architecture_fingerprint(model: nn.Module) -> str:
    """12 hex digits that change with the architecture, not with the weights.

    From the model's configuration when it has one (diffusers / Wan ``ModelMixin``: unchanged by
    FSDP, which reshapes parameters), else from the names and shapes of its parameters."""
    return _fingerprint(type(model).__name__, model)


def compiled_fingerprint(model: nn.Module) -> str:
    """The :func:`architecture_fingerprint` that ``torch.compile(model)``'s wrapper has: what a LUT recorded for a
    compiled model before 2026-11-28 holds (its ``model``: ``OptimizedModule``), computed from the model."""
    model = _unwrap_compiled(model)
    return _fingerprint("OptimizedModule", model, prefix="_orig_mod.")


def _fingerprint(class_name: str, model: nn.Module, prefix: str = "") -> str:
    config = _config_of(model)
    if config is not None:
        payload = {k: _jsonable(v) for k, v in sorted(config.items()) if not str(k).startswith("_")}
    else:
        payload = [(prefix + name, list(p.shape)) for name, p in model.named_parameters()]
    text = json.dumps([class_name, payload], sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


#: what :func:`weights_fingerprint` says of sharded weights (FSDP, DTensor): a rank holds a shard whose shape
#: and contents depend on the number of ranks, and its root unit's parameters are not the module's
SHARDED = "sharded (FSDP): not checked"

#: generation arguments that place the model, not what it computes (Wan's generate.py sets offload_model from the
#: number of ranks)
PLACEMENT_ARGUMENTS = ("offload_model",)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) holds ``model``'s parameters: flattened or sharded, hiding their names and shapes."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        FullyShardedDataParallel = ()
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules()) or any(
        "_flat_param" in name or hasattr(p, "to_local") for name, p in model.named_parameters())


def weights_fingerprint(*models: nn.Module, samples: int = 4096, float_positions: bool = False) -> str:
    """16 hex digits that change with the weights (``taocache compare``'s folder check; a LUT's identity leaves
    the weights out, on purpose: a LUT is checked against the architecture), or :data:`SHARDED`.

    Hashes every parameter's name, shape, dtype and the bytes of ``samples`` evenly spaced elements (the first and
    the last among them), read where the parameter lives: a retrained or fine-tuned checkpoint changes them, and
    a 14B model costs one small copy per tensor, not a pass over its 28 GB. ``float_positions``: the positions as
    the first fingerprint placed them (float32 ``linspace``, in the compare folders of commits f341df4 to b87ec07,
    2026-11-27; it failed above 2**24 elements, where it is clamped here)."""
    if any(is_sharded(m) for m in models):
        return SHARDED
    digest = hashlib.sha256()
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                digest.update(f"{i}:{name}:{tuple(p.shape)}:{p.dtype}".encode())
                flat = p.detach().reshape(-1)
                n = flat.numel()
                if n == 0 or flat.device.type == "meta":
                    continue
                k = min(samples, n)  # integer positions: float ones round past the end above 2**24 elements
                index = (torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)).to(flat.device) \
                    if not float_positions else torch.linspace(0, n - 1, k, device=flat.device).long().clamp_max(n - 1)
                digest.update(flat[index].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def call_settings(arguments: Mapping[str, Any], leave_out: Iterable[str] = (),
                  ignore: Iterable[str] = PLACEMENT_ARGUMENTS) -> Dict[str, str]:
    """The scalar arguments of a generation call (numbers, strings, booleans, None and tuples of them: a
    guidance scale, a shift, a negative prompt), each as its ``repr``, without those in ``leave_out`` (the
    prompt and seed a compare replaces) and ``ignore``; a mapping's (``**kwargs``) as ``name.key``. Settings a
    script reads from its own config file show here, not in its command line (Latte's ``--config``)."""
    def scalar(value: Any) -> bool:
        return value is None or isinstance(value, (bool, int, float, str)) or (
            isinstance(value, (list, tuple)) and all(scalar(v) for v in value))

    skip = set(leave_out) | set(ignore)
    flat: Dict[str, Any] = {}
    for name, value in arguments.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}.{k}": v for k, v in value.items() if str(k) not in skip})
        elif name not in skip:
            flat[name] = value
    return {k: repr(v) for k, v in sorted(flat.items()) if scalar(v)}


def model_identity(model: nn.Module) -> Identity:
    """``model`` (class name), ``architecture`` (fingerprint), ``dtype`` (of its first floating parameter) and
    ``dtype.weights``: the dtype most of its floating parameters' elements are in (a model keeping a few modules in
    float32, as diffusers' Wan transformers keep their norms and time embedding, has a float32 parameter first
    whatever the rest). A LUT recorded before ``dtype.weights`` was is checked on ``dtype`` alone. A
    ``torch.compile`` wrapper is the model it compiles (``pipe.transformer = torch.compile(pipe.transformer)``)."""
    model = _unwrap_compiled(model)
    identity: Identity = {"model": type(model).__name__, "architecture": architecture_fingerprint(model)}
    elements: Dict[str, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            identity.setdefault("dtype", str(p.dtype))
            elements[str(p.dtype)] = elements.get(str(p.dtype), 0) + p.numel()
    if elements:
        identity["dtype.weights"] = max(elements, key=elements.get)  # (a tie: the first)
    return identity


#: diffusers scheduler settings that set the noise levels (the betas: Latte's script sets them from its YAML), which
#: a scheduler of another class keeps: recorded as ``noise_schedule.<name>`` where a scheduler's config has them (flat
#: keys: a LUT's identity is a flat JSON object; ``calibration.accept: [noise_schedule]`` accepts them all)
NOISE_SCHEDULE_SETTINGS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
#: the settings of a scheduler's sampling, whose defaults differ between classes (timestep spacing, sigmas, the
#: update): ``scheduler.<name>``, accepted with another class by ``calibration.accept: [scheduler]`` (the run's
#: timesteps are checked against the LUT's all the same)
SOLVER_SETTINGS = (
    "timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "use_flow_sigmas", "use_dynamic_shifting", "shift_terminal", "time_shift_type", "invert_sigmas", "sigma_min",
    "sigma_max", "set_alpha_to_one", "clip_sample", "clip_sample_range", "thresholding", "sample_max_value",
    "variance_type", "algorithm_type", "solver_type", "lower_order_final", "final_sigmas_type", "predict_x0",
    "disable_corrector", "skip_prk_steps")


def scheduler_identity(scheduler: Any) -> Identity:
    """``scheduler`` (class name) and the settings that move the timesteps or the solver: ``shift``,
    ``solver_order``, ``prediction_type``, ``noise_schedule.<name>`` (:data:`NOISE_SCHEDULE_SETTINGS`;
    ``trained_betas`` as a digest) and ``scheduler.<name>`` (:data:`SOLVER_SETTINGS`), those a diffusers scheduler's
    config holds."""
    identity: Identity = {"scheduler": type(scheduler).__name__}
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        for key, name in (("shift", "shift"), ("flow_shift", "shift"), ("solver_order", "solver_order"),
                          ("prediction_type", "prediction_type")):
            value = config.get(key)
            if value is not None and name not in identity:
                identity[name] = _plain(value)
        for group, keys in (("noise_schedule", NOISE_SCHEDULE_SETTINGS), ("scheduler", SOLVER_SETTINGS)):
            for key in keys:
                value = config.get(key)
                if value is None:
                    continue
                value = _plain(value)
                if key == "trained_betas":  # (a thousand numbers: their digest)
                    value = hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]
                identity[f"{group}.{key}"] = value
    return identity


def accept_name(key: str) -> str:
    """The ``calibration.accept`` entry that accepts a difference in identity key ``key`` (``noise_schedule`` for
    every ``noise_schedule.<name>``, ``scheduler`` for every ``scheduler.<name>``)."""
    return key.split(".", 1)[0]


def accept_names(keys: Iterable[str]) -> List[str]:
    """The ``calibration.accept`` entries for these differing keys, each once, in order."""
    return list(dict.fromkeys(accept_name(k) for k in keys))


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values: a tuple the run passes is the list the LUT file holds; true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def wan_output_identity(arguments: Mapping[str, Any]) -> Dict[str, Any]:
    """What a Wan ``generate()`` call makes, from its arguments: ``pixels`` (``size``'s width x height, or
    ``max_area`` for the image-conditioned tasks, which follow the image's aspect) and ``frame_num``. A LUT's
    delta products hold outputs of one size, so a calibration at another cannot merge into it: checked at the
    start of each generation rather than found after it."""
    identity: Dict[str, Any] = {}
    size, area = arguments.get("size"), arguments.get("max_area")
    if isinstance(size, (tuple, list)) and len(size) == 2:
        identity["pixels"] = int(size[0]) * int(size[1])
    elif area is not None:
        identity["pixels"] = int(area)
    if arguments.get("frame_num") is not None:
        identity["frame_num"] = int(arguments["frame_num"])
    return identity


def guide_scale_identity(value: Any, experts: int = 1) -> Any:
    """A guide scale as a LUT records it (Wan's ``--sample_guide_scale``, a pipeline's ``guidance_scale``): a
    number, or for two experts a pair (Wan2.2 A14B's ``(low-noise, high-noise)``; one number sets both, as the
    pipelines do). The scale moves the trajectory whose deltas the
    LUT describes, so a run at another scale is another run."""
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    return [float(value)] * 2 if experts > 1 else float(value)


def pipeline_output_identity(arguments: Mapping[str, Any]) -> Dict[str, Any]:
    """What a Latte / Open-Sora-Plan pipeline call makes, from its arguments: ``height``, ``width`` and ``frames``
    (``video_length``, or ``num_frames``) where the script gives them (``None``: the pipeline's default, not
    recorded), ``temporal_attention`` (off for image generation) and the ``guidance_scale``. As for Wan, a LUT's
    delta products hold outputs of one size: checked at the start of each generation."""
    identity: Dict[str, Any] = {}
    for key in ("height", "width"):
        if arguments.get(key) is not None:
            identity[key] = int(arguments[key])
    frames = arguments.get("video_length", arguments.get("num_frames"))
    if frames is not None:
        identity["frames"] = int(frames)
    if "enable_temporal_attentions" in arguments:
        identity["temporal_attention"] = bool(arguments["enable_temporal_attentions"])
    if isinstance(arguments.get("guidance_scale"), (int, float)):  # the trajectory the LUT's deltas describe
        identity["guide_scale"] = float(arguments["guidance_scale"])
    return identity


def differences(recorded: Mapping[str, Any], run: Mapping[str, Any], accept: Iterable[str] = ()) -> List[str]:
    """Keys that both identities have with different values, in the run's order, less ``accept`` (its entries as
    :func:`accept_name` gives them)."""
    accepted = set(accept)
    keys = [k for k in run if k in recorded and accept_name(k) not in accepted and not _same(recorded[k], run[k])]
    if "dtype" in keys and "dtype.weights" in keys and all(_same(i["dtype"], i["dtype.weights"])
                                                           for i in (recorded, run)):
        keys.remove("dtype.weights")  # (every weight in one dtype on both sides: said once)
    return keys


def recorded_the_wrapper(recorded: Mapping[str, Any]) -> bool:
    """Whether a LUT's ``model`` and ``architecture`` are torch.compile's wrapper's (recorded before 2026-11-28 for
    a compiled model), not the model's."""
    return recorded.get("model") == "OptimizedModule"


def comparable(recorded: Mapping[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """A LUT's identity as it can be compared with a run's. Where it recorded torch.compile's wrapper: with
    ``model`` (the run's), the model's class and fingerprint if the wrapper's fingerprint is that of ``model``'s
    wrapper, else as recorded (another model's wrapper: they differ); without ``model`` (or under FSDP, whose
    shapes are not the model's), without ``model`` and ``architecture`` (they cannot be checked)."""
    if not recorded_the_wrapper(recorded):
        return dict(recorded)
    if model is not None and "architecture" in recorded and not is_sharded(model):
        model = unwrap_model(model, compiled=True)  # (inside DDP too, as the run's identity is taken)
        if recorded["architecture"] != compiled_fingerprint(model):
            return dict(recorded)
        return {**recorded, "model": type(model).__name__, "architecture": architecture_fingerprint(model)}
    return _without_model(recorded)


def _without_model(identity: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in ("model", "architecture")}


def merged_identity(first: Mapping[str, Any], second: Mapping[str, Any]) -> Dict[str, Any]:
    """The identity of two LUTs' statistics together: ``first``'s values over ``second``'s, but ``model`` and
    ``architecture`` only from the one that recorded the model where the other recorded torch.compile's wrapper
    (none if it recorded no ``architecture``: a LUT calibrated under FSDP)."""
    def recorded_the_model(identity: Mapping[str, Any]) -> bool:
        return identity.get("model") is not None and not recorded_the_wrapper(identity)

    if recorded_the_wrapper(first) and recorded_the_model(second):
        first = _without_model(first)
    elif recorded_the_wrapper(second) and recorded_the_model(first):
        second = _without_model(second)
    return {**second, **first}


def unrecorded(recorded: Mapping[str, Any], run: Mapping[str, Any]) -> List[str]:
    """Keys of ``run`` that ``recorded`` (a LUT's identity) lacks, but those the run has no value of (``None``: a
    diffusers pipeline's ``expert_boundary`` with one transformer) and ``dtype.weights`` where it adds nothing to
    ``dtype`` (this run's weights all in one dtype)."""
    return [k for k in run if k not in recorded and run[k] is not None
            and not (k == "dtype.weights" and _same(run[k], run.get("dtype")))]


def describe_differences(recorded: Mapping[str, Any], run: Mapping[str, Any], keys: Iterable[str]) -> str:
    """``task: this run i2v-14B, the LUT t2v-1.3B; shift: this run 8.0, the LUT 5.0``; a group's meaning
    (``noise_schedule.*``) said at its first key."""
    said = set()

    def meaning(k):
        group = accept_name(k)
        if group != k:
            first = group not in said
            said.add(group)
            return GROUP_MEANING.get(group, "") if first else ""
        if k == "architecture" and "frames" in run and "frames" in recorded \
                and not _same(run["frames"], recorded["frames"]):  # (also where frames is accepted)
            return ARCHITECTURE_WITH_FRAMES
        pair = isinstance(run[k], (list, tuple)) or isinstance(recorded[k], (list, tuple))
        return PAIR_MEANING[k] if pair and k in PAIR_MEANING else KEY_MEANING.get(k, "")
    return "; ".join(f"{k}{meaning(k)}: this run {run[k]!r}, the LUT {recorded[k]!r}" for k in keys)


#: ... where its value is a pair (Wan2.2's two experts: the order said, diffusers' names too)
PAIR_MEANING = {"guide_scale": " (the guidance scales of Wan2.2's two experts, [low-noise, high-noise]: Wan's "
                               "--sample_guide_scale, diffusers' [guidance_scale_2, guidance_scale])"}

#: "architecture" where the frame count differs too (Latte walkthrough, 2026-11-28)
ARCHITECTURE_WITH_FRAMES = (" (a fingerprint of the model's configuration: Latte's sample_t2x.py builds its "
                            "transformer with the YAML's video_length, so another frame count changes it too; "
                            "accepting architecture accepts another model as well)")

#: what an identity key is, where its name alone does not say it (said in the mismatch messages)
KEY_MEANING = {"pixels": " (width x height of the video: Wan's --size)", "frame_num": " (Wan's --frame_num)",
               "frames": " (frames generated: Latte's video_length, Open-Sora-Plan's --num_frames, a diffusers "
                         "pipeline's num_frames)",
               "temporal_attention": " (off for images: Latte's t2i, Open-Sora-Plan's --force_images)",
               "guide_scale": " (the guidance scale: Wan's --sample_guide_scale, Open-Sora-Plan's --guidance_scale, a "
                              "pipeline's guidance_scale)",
               "image": " (Wan2.2 TI2V-5B: whether an --image conditions the video)",
               "expert_boundary": " (the timestep where Wan2.2 A14B's low-noise expert takes over; None: one "
                                  "transformer)"}

#: what the keys of a group (``group.<name>``) are, said at the group's first differing key
GROUP_MEANING = {"noise_schedule": " (the scheduler's noise levels: the betas of Latte's YAML, a diffusers "
                                   "scheduler's config)",
                 "scheduler": " (a setting of the scheduler's sampling: timestep spacing, sigmas, its update)",
                 "dtype": " (the dtype most of the model's weights are in)"}
