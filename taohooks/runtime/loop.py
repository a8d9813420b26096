"""The declared shape of a sampling loop, and what the hook knows about one denoiser call.

Sampling loops differ: Wan2.1 calls the model twice per step (cond, then uncond); Latte and
Open-Sora-Plan call it once per step on a batch that holds (uncond, cond) halves; PNDM makes
extra calls with repeated timesteps. taohooks therefore never infers the step from the
timestep: the step index is the call count divided by the calls per step, and the loop's
shape is declared up front.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

__all__ = ["LoopSpec", "CallInfo"]


@dataclass(frozen=True)
class LoopSpec:
    """Shape of one generation ("sample") as the denoiser sees it.

    Args:
        steps: model evaluations per stream in one generation (for PNDM: the number of calls,
            including the warm-up ones).
        streams: stream names. Without ``split_batch`` there is one call per stream and step, in
            this order (Wan2.1: ``("cond", "uncond")``). With ``split_batch`` there is one call per
            step whose output batch holds one equal chunk per stream, in this order along dim 0
            (Latte: ``("uncond", "cond")``).
        split_batch: whether the streams are batch chunks of one call (batched CFG).
        batch_dim: dimension of the output leaves that indexes prompts (for calibration statistics,
            each batch element counts as one prompt); ``None`` if the whole output is one prompt
            (Wan2.1's list output of a single ``[C, F, H, W]`` tensor).
    """

    steps: int
    streams: Tuple[str, ...] = ("main",)
    split_batch: bool = False
    batch_dim: Optional[int] = 0

    def __post_init__(self):
        streams = tuple(self.streams) if not isinstance(self.streams, str) else (self.streams,)
        object.__setattr__(self, "streams", streams)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"LoopSpec.steps must be a positive int, got {self.steps!r}")
        if not streams or len(set(streams)) != len(streams) or not all(isinstance(s, str) and s for s in streams):
            raise ValueError(f"LoopSpec.streams must be distinct non-empty names, got {self.streams!r}")
        if self.batch_dim not in (None, 0):
            raise ValueError(f"LoopSpec.batch_dim must be 0 or None, got {self.batch_dim!r}")

    @property
    def calls_per_step(self) -> int:
        return 1 if self.split_batch else len(self.streams)

    @property
    def total_calls(self) -> int:
        return self.steps * self.calls_per_step

    def locate(self, call_index: int) -> Tuple[int, Tuple[str, ...]]:
        """Step index and the streams present in the call with this index (0-based, in a sample)."""
        step, position = divmod(call_index, self.calls_per_step)
        return step, self.streams if self.split_batch else (self.streams[position],)

    def describe(self) -> str:
        if self.split_batch:
            return f"{self.steps} steps x 1 call on batch streams {'/'.join(self.streams)}"
        return f"{self.steps} steps x {self.calls_per_step} call(s) ({', '.join(self.streams)})"


@dataclass
class CallInfo:
    """One denoiser call as the hook numbers it.

    ``index`` counts calls within the current sample from 0; ``step`` is ``index //
    calls_per_step``; ``streams`` names the streams present in the output (one, or all for a
    batched call). ``timestep`` is the float value passed to the model, if the hook could find
    it (read lazily: converting a CUDA tensor synchronises). ``substituted_by`` is the callback
    that answered the call instead of the model. ``expert`` says which attached instance was called: 0 for the
    hook's module, then the ``also`` instances in order (Wan2.2's low-noise expert: 1).
    """

    sample: int
    index: int
    step: int
    streams: Tuple[str, ...]
    timestep_source: Any = field(default=None, repr=False)
    substituted_by: Any = field(default=None, repr=False)
    expert: int = 0

    @property
    def timestep(self) -> Optional[float]:
        source = self.timestep_source
        return None if source is None else source.value()

    @property
    def computed(self) -> bool:
        """Whether the model really ran for this call."""
        return self.substituted_by is None
