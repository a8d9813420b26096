"""A bundled testbed model seen the way an integration sees a research model.

It declares the loop shape of its sampler (flow: two calls per step, cond then uncond, like
Wan2.1; eps: one batched call on (uncond, cond) halves, like Latte), names its block stack,
the TeaCache proxy (the timestep-modulated input of the first block) and its attention modules
(for PAB).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..runtime.loop import LoopSpec

__all__ = ["TestbedModel", "MODEL_NAMES", "SHIPPED_MODELS", "weights_path", "modulated_input"]

MODEL_NAMES = ("flow", "eps", "flow-lognormal", "scenes", "scenes-eps")
SHIPPED_MODELS = ("flow", "eps", "flow-lognormal")  # trained and committed; the scenes models are training (issue 15)
SCENES_MODELS = {"scenes": "flow", "scenes-eps": "eps"}  # the scenes task (issue 15) in Wan's loop and in Latte's
_WEIGHT_FILES = {"scenes": "scenes-flow"}
_TRAIN = {name: f"python -m taohooks.testbed.train_scenes --kind {kind} --steps 100000 --out "
                f"taohooks/testbed/weights/scenes-{kind}.safetensors (see taohooks/testbed/README.md)"
          for name, kind in SCENES_MODELS.items()}


def weights_path(name: str) -> Path:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown testbed model {name!r}; one of {', '.join(MODEL_NAMES)}")
    return Path(__file__).resolve().parent.parent / "testbed" / "weights" / f"{_WEIGHT_FILES.get(name, name)}.safetensors"


def modulated_input(block, args: tuple, kwargs: dict) -> torch.Tensor:
    """TeaCache's proxy: ``mod1(norm1(x), shift1, scale1)`` of the first block, ``[B, N, D]``."""
    x, c = args[0], args[1]
    shift, scale = block.modulation(c)[:2]
    return block.mod1(block.norm1(x), shift, scale)


@dataclass
class TestbedModel:
    """A loaded testbed checkpoint with its sampler."""

    __test__ = False  # not a pytest test class

    name: str
    model: torch.nn.Module
    steps: int = 50
    blocks: str = "blocks"
    attention: str = r"blocks\.\d+\.attn"
    timestep_arg: int = 1  # the loops call model(x, timestep, prompt_ids)

    @classmethod
    def load(cls, name: str, steps: int = 50, path: Optional[Union[str, Path]] = None,
             device: Union[str, torch.device] = "cpu") -> "TestbedModel":
        """The bundled checkpoint of ``name``, or the checkpoint file ``path`` (it must be one of that
        model's task and prediction: scenes or the small task, eps or flow), on ``device``."""
        from ..testbed.model import VideoDiT

        path = cls.check(name, path)
        model = VideoDiT.from_pretrained(path).to(device)
        if name in SCENES_MODELS:
            from ..testbed.scenes_sensitivity import SceneTestbedModel

            return SceneTestbedModel(name, model, steps)
        return cls(name, model, steps)

    @staticmethod
    def check(name: str, path: Optional[Union[str, Path]] = None, tensors: bool = False) -> Path:
        """The checkpoint file of ``name`` (``path``, or the bundled one), checked from its metadata: it exists,
        is a testbed checkpoint, and of that model's task and prediction; with ``tensors``, its tensors are loaded
        too and must fit its config (``taocache bench``: before the first model's work). Raises
        ``FileNotFoundError`` / ``ValueError`` naming the file; returns its path."""
        from ..testbed.model import VideoDiTConfig, read_metadata
        from ..testbed import scenes

        if name not in MODEL_NAMES:
            raise ValueError(f"unknown testbed model {name!r}; one of {', '.join(MODEL_NAMES)}")
        path = weights_path(name) if path is None else Path(path)
        if path.is_dir():
            raise ValueError(f"{path}: a folder, not a checkpoint file")
        if not path.is_file():
            how = _TRAIN.get(name, f"python -m taohooks.testbed.train --kind {name}")
            bundled = weights_path(name)
            wip = sorted(bundled.parent.glob(f"wip/{bundled.stem}-step*.safetensors"),
                         key=lambda p: int(p.stem.rpartition("-step")[2] or 0))
            other = (f"; or give a checkpoint with --weights {name}=PATH"
                     + (f" (the newest unfinished one: {wip[-1]})" if wip else ""))
            raise FileNotFoundError(f"testbed weights {path} are missing; train them with `{how}`{other}")
        try:
            meta = read_metadata(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a testbed checkpoint ({type(exc).__name__}: {exc})") from None
        if "config" not in meta:  # (said as "KeyError: 'config'": review, 2026-11-29)
            what = "a calibration LUT" if "taohooks_lut" in meta else "a safetensors file without a model config"
            raise ValueError(f"{path}: not a testbed checkpoint ({what}); give the model's weights, e.g. "
                             f"{weights_path(name)}")
        try:
            config = VideoDiTConfig.from_json(meta["config"])
        except Exception as exc:
            raise ValueError(f"{path}: not a testbed checkpoint ({type(exc).__name__}: {exc})") from None
        is_scenes = tuple(config.attribute_sizes) == tuple(scenes.ATTRIBUTE_SIZES)
        prediction = getattr(config, "prediction", "flow")
        want_scenes = name in SCENES_MODELS
        want = SCENES_MODELS.get(name, "eps" if name == "eps" else "flow")
        if is_scenes != want_scenes or prediction != want:
            raise ValueError(f"{path}: a {'scenes' if is_scenes else 'small-task'} {prediction} checkpoint, not one "
                             f"for the testbed model {name!r} ({'scenes' if want_scenes else 'small-task'} {want})")
        if tensors:
            from ..testbed.model import VideoDiT

            VideoDiT.from_pretrained(path)  # (ValueError naming the file)
        return path

    @property
    def prediction(self) -> str:
        return getattr(self.model.config, "prediction", "flow")

    @property
    def sampler(self) -> str:
        return "ddim" if self.prediction == "eps" else "unipc"

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale its sampler runs at."""
        from ..testbed import sampling

        default = sampling.DEFAULT_EPS_GUIDANCE if self.prediction == "eps" else sampling.DEFAULT_FLOW_GUIDANCE
        return float(getattr(self, "guidance", default))

    def loop(self) -> LoopSpec:
        if self.prediction == "eps":
            return LoopSpec(self.steps, ("uncond", "cond"), split_batch=True)
        return LoopSpec(self.steps, ("cond", "uncond"))

    def sample(self, pairs: Sequence[Tuple[object, int]]) -> torch.Tensor:
        """Clips ``[B, 3, 8, 16, 16]`` in [-1, 1] for (prompt, seed) pairs, one generation."""
        from ..testbed import sampling

        prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
        return sampling.sample(self.model, prompts, seeds, steps=self.steps).float().cpu()

    def prompts(self, pairs) -> List[object]:
        return [p for p, _ in pairs]

    # the model's own data: held-out and calibration (prompt, seed) pairs, and its recogniser
    def eval_pairs(self, n: int) -> list:
        from ..testbed import data

        return data.eval_pairs(n)

    def calibration_pairs(self, n: int) -> list:
        from ..testbed import data

        return data.calibration_pairs(n)

    def accuracy(self, clips: torch.Tensor, prompts: Sequence[object]) -> float:
        """The recogniser's overall prompt accuracy of ``clips``."""
        from ..testbed import recognizer

        return float(recognizer.accuracy(clips, prompts)["overall"])
