"""taohooks: TaoCache (arXiv 2508.08978) as forward hooks for video diffusion transformers.

TaoCache skips denoiser calls in the late steps of sampling and predicts their output from the
last two: ``eps_t = eps_{t-1} + C_ratio[t] * (eps_{t-1} - eps_{t-2})``, with ``C_ratio`` from a
lookup table calibrated once per model.

    import taohooks
    cache = taohooks.TaoCache.from_yaml("configs/wan.yaml")
    with cache.attach(model, steps=50, streams=("cond", "uncond")):
        video = run_my_sampling_loop(model)
    print(cache.summary())
"""
from .taocache.calibration import CalibrationRecorder, delta_statistics
from .runtime.callbacks import Callback
from .config import (CalibrationConfig, ConfigError, LoopConfig, PlanConfig, TaoCacheConfig, config_from_dict,
                     load_config)
from .taocache.extrapolation import TaoCacheCallback
from .runtime.hook import DenoiserHook, get_hook
from .runtime.loop import CallInfo, LoopSpec
from .taocache.lut import CalibrationLUT, LUTMismatchError, merge_luts
from .taocache.plan import PlanError, SkipPlan, plan_from_steps, plan_from_window, search_window
from .taocache.stats import RunningMoments
from .taocache.cache import TaoCache, make_plan

__version__ = "0.1.0"

__all__ = [
    "TaoCache", "TaoCacheConfig", "LoopConfig", "CalibrationConfig", "PlanConfig", "ConfigError", "load_config",
    "config_from_dict", "DenoiserHook", "get_hook", "Callback", "CallInfo", "LoopSpec", "CalibrationRecorder",
    "CalibrationLUT", "LUTMismatchError", "merge_luts", "delta_statistics", "TaoCacheCallback", "SkipPlan",
    "PlanError", "make_plan", "plan_from_window", "plan_from_steps", "search_window", "RunningMoments",
    "__version__",
]
