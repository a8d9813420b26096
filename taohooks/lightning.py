"""TaoCache for research repos that sample inside a LightningModule's ``predict_step``.

    from taohooks.lightning import TaoCacheCallback
    trainer = Trainer(callbacks=[TaoCacheCallback("configs/wan.yaml", module="model", steps=50,
                                                  streams=("cond", "uncond"))])
    videos = trainer.predict(lit_module, dataloader)

The callback attaches TaoCache to the named submodule of the LightningModule when prediction
starts, begins a new generation for every predict batch (one batch = one sampling loop), and
detaches when prediction ends. The loop's shape is given here or in the config's ``loop:`` section.
Under DDP (several devices) each rank samples its own batches: while the LUT is calibrated, every rank
adds its prompts to the LUT file (under its lock), and each stops calibrating once the file holds
``calibration.prompts``. Only ``Trainer.predict`` is hooked (not ``validate`` or ``fit``).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

try:
    from lightning.pytorch import Callback as _LightningCallback
except ImportError as exc:  # pragma: no cover - lightning is an extra
    raise ImportError("taohooks.lightning needs Lightning: pip install 'taohooks[lightning]'") from exc

from .config import TaoCacheConfig, check_python_config, load_config
from .runtime import messages
from .taocache.cache import TaoCache

__all__ = ["TaoCacheCallback"]


class TaoCacheCallback(_LightningCallback):
    """A ``lightning.pytorch.Callback`` running TaoCache during ``Trainer.predict``.

    Args:
        config: a :class:`TaoCacheConfig` or a YAML path.
        module: name of the denoiser submodule of the LightningModule (``""``: the module itself).
        steps, streams, split_batch, timestep_arg: the sampling loop's shape (see ``TaoCache.attach``);
            ``None`` falls back to the config's ``loop:`` section.
        batch_dim: what the outputs' first dimension is (``TaoCache.attach``): 0, the prompts of the batch;
            ``None``, none (a list of one tensor per sample, as Wan's models return).
    """

    def __init__(self, config: Union[TaoCacheConfig, str, os.PathLike], module: str = "model", *,
                 steps: Optional[int] = None, streams: Optional[Sequence[str]] = None,
                 split_batch: Optional[bool] = None, timestep_arg: Union[str, int, None] = None,
                 batch_dim: Optional[int] = 0):
        self.config = config if isinstance(config, TaoCacheConfig) else load_config(config)
        if self.config.source is None:  # made in Python: checked now, not at predict time
            check_python_config(self.config)
        self.module = module
        self.steps, self.streams, self.split_batch, self.timestep_arg = steps, streams, split_batch, timestep_arg
        self.batch_dim = batch_dim
        self.cache: Optional[TaoCache] = None

    def on_predict_start(self, trainer, pl_module) -> None:
        try:
            target = pl_module.get_submodule(self.module) if self.module else pl_module
        except AttributeError as exc:
            raise ValueError(f"taohooks: {type(pl_module).__name__} has no submodule {self.module!r} to attach "
                             f"TaoCache to ({exc})") from exc
        self._target = target
        self._data_parallel = getattr(trainer, "world_size", 1) > 1
        if self._data_parallel and self.config.calibration.ranks == "shared":  # (it was ignored: review, 2026-11-27)
            raise ValueError(f"taohooks: {self.config.source or 'the config'}: calibration.ranks: shared, but under "
                             "DDP each rank predicts batches of its own (the callback adds each rank's to the LUT): "
                             "remove the key, or set own")
        self._attach()

    def _attach(self) -> None:
        self.cache = TaoCache(self.config)
        self.cache.data_parallel = self._data_parallel
        self.cache.reattached_per_generation = True  # (on_predict_batch_start attaches again once it is complete)
        self.cache.attach(self._target, self.steps, self.streams, split_batch=self.split_batch,
                          timestep_arg=self.timestep_arg, batch_dim=self.batch_dim)

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        cache = self.cache
        if cache.calibrating:
            # under DDP the file's count, which every rank adds to; in one process the recorder's is the same
            held = cache.held_prompts() if self._data_parallel else cache.recorder.lut().num_prompts
            if held >= self.config.calibration.prompts:
                cache.detach()  # the LUT is complete (and saved): skip from this batch on, as the launcher does
                if not cache.said_calibration_complete:  # (said at the end of the batch before)
                    messages.notice(f"taohooks: calibration complete (the LUT holds "
                                    f"{held} prompt{'s' if held != 1 else ''}; "
                                    f"calibration.prompts {self.config.calibration.prompts}); TaoCache skips from "
                                    "this batch on",
                                    every_rank=self._data_parallel)
                self._attach()
        self.cache.new_sample()

    def _not_here(self, trainer, what: str) -> None:
        state = getattr(getattr(trainer, "state", None), "fn", None)
        if getattr(state, "value", state) != what:  # (fit's validation loops too: not a sampling run)
            return
        messages.notice(f"TaoCacheCallback caches Trainer.predict only; this {what} run samples uncached",
                        once=f"lightning-{what}")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._not_here(trainer, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._not_here(trainer, "test")

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.cache is not None:
            self.cache.detach()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.cache is not None:
            self.cache.detach()
