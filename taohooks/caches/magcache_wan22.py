"""MagCache for Wan2.2 as its authors run it (Zehong-Ma/MagCache, ``MagCache4Wan2.2/magcache_generate.py``).

The rule is :class:`~taohooks.caches.magcache.MagCacheCallback`'s (per cond/uncond slot: the product of
the magnitude ratios since the last computed call, its accumulated distance from 1, at most ``K`` skips
in a row; the block stack's residual reused), with the authors' published ratios and their retention
rule, which knows the two experts of the A14B tasks. ``S`` is the number of high-noise steps and ``N``
the number of steps; the authors count calls (two per step, cond then uncond: call ``2 s + slot``):

- ``t2v-A14B``: calls before ``int(2 S r)`` and calls ``2 S .. (2 N - 2 S) r + 2 S`` are always computed:
  the first ``r`` of each expert;
- ``i2v-A14B``: calls before ``int(2 S + (2 N - 2 S) r)``: the whole high-noise expert and the first
  ``r`` of the low-noise one (MagCache acts in the low-noise expert only);
- ``ti2v-5B`` (one model): calls before ``int(2 N r)``.

``S`` comes from their own timestep formula (:func:`authors_high_noise_steps`: sigmas
``linspace(1, 0.01, N + 1)[:-1]``, shifted, times 1000, truncated to integers, counted where at least
``boundary * 1000``), which gives Wan2.2's switch for the shipped settings (26 of 40 steps for T2V, 15 of
40 for I2V); where the experts switch elsewhere, a notice says so. One table covers both experts (the
expert switch shows as one low ratio, 0.655 for T2V, 0.911 for I2V, between the last high-noise and the
first low-noise residual); the accumulators are per stream across both experts, as theirs.

One deliberate difference: residuals are kept per expert (:class:`~taohooks.caches.residual.BlockStackCache`),
so a low-noise call never reuses a residual the high-noise expert computed; theirs are shared. With their
README's settings and the script's defaults this changes nothing (their retention computes the first
low-noise calls, and the switch ratio ends any run of skips); where it does not (a small ``R``, e.g. I2V
with ``R`` 0.05, or a step count whose resampling drops the switch ratio) they reuse the other expert's
residual on the first low-noise call(s) and taohooks computes them, restarting the accumulators there.

The published ratios (facts, used as data): Zehong-Ma/MagCache at
df81cb181776c2c61477c08e1d21f87fda1cd938, ``MagCache4Wan2.2/magcache_generate.py`` lines 695 (T2V-A14B),
771 (I2V-A14B), 736 (TI2V-5B without an image), 738 (TI2V-5B with one); 40, 40, 50 and 50 steps. Their
README's settings (threshold E, K, retention R): T2V-A14B E0.06 K2 R0.4, I2V-A14B E0.06 K2 R0.1, TI2V-5B
E0.06 K2 R0.2; the script's defaults E0.04 K2 R0.2. (As published, their TI2V path stops with a
``TypeError`` before generating: ``init_magcache`` multiplies a missing split by 2; the rule above is the
one its code states for a single model.)
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .magcache import MagCacheCallback, ratio_table
from ..runtime import messages

__all__ = ["PUBLISHED", "SOURCE", "SETTINGS", "MODES", "authors_high_noise_steps", "Wan22MagCache",
           "wan22_magcache", "table_for"]

SOURCE = ("Zehong-Ma/MagCache df81cb181776c2c61477c08e1d21f87fda1cd938, MagCache4Wan2.2/magcache_generate.py "
          "L695/736/738/771")

# table -> the published list (cond, uncond interleaved, from the second step on: 2 * steps - 2 values)
PUBLISHED: Dict[str, List[float]] = {
    "t2v-A14B": [  # L695
        1.00124, 1.00155, 0.99822, 0.99851, 0.99696, 0.99687, 0.99703, 0.99732, 0.9966, 0.99679, 0.99602, 0.99658,
        0.99578, 0.99664, 0.99484, 0.9949, 0.99633, 0.996, 0.99659, 0.99683, 0.99534, 0.99549, 0.99584, 0.99577,
        0.99681, 0.99694, 0.99563, 0.99554, 0.9944, 0.99473, 0.99594, 0.9964, 0.99466, 0.99461, 0.99453, 0.99481,
        0.99389, 0.99365, 0.99391, 0.99406, 0.99354, 0.99361, 0.99283, 0.99278, 0.99268, 0.99263, 0.99057, 0.99091,
        0.99125, 0.99126, 0.65523, 0.65252, 0.98808, 0.98852, 0.98765, 0.98736, 0.9851, 0.98535, 0.98311, 0.98339,
        0.9805, 0.9806, 0.97776, 0.97771, 0.97278, 0.97286, 0.96731, 0.96728, 0.95857, 0.95855, 0.94385, 0.94385,
        0.92118, 0.921, 0.88108, 0.88076, 0.80263, 0.80181],
    "i2v-A14B": [  # L771
        0.99191, 0.99144, 0.99356, 0.99337, 0.99326, 0.99285, 0.99251, 0.99264, 0.99393, 0.99366, 0.9943, 0.9943,
        0.99276, 0.99288, 0.99389, 0.99393, 0.99274, 0.99289, 0.99316, 0.9931, 0.99379, 0.99377, 0.99268, 0.99271,
        0.99222, 0.99227, 0.99175, 0.9916, 0.91076, 0.91046, 0.98931, 0.98933, 0.99087, 0.99088, 0.98852, 0.98855,
        0.98895, 0.98896, 0.98806, 0.98808, 0.9871, 0.98711, 0.98613, 0.98618, 0.98434, 0.98435, 0.983, 0.98307,
        0.98185, 0.98187, 0.98131, 0.98131, 0.9783, 0.97835, 0.97619, 0.9762, 0.97264, 0.9727, 0.97088, 0.97098,
        0.96568, 0.9658, 0.96045, 0.96055, 0.95322, 0.95335, 0.94579, 0.94594, 0.93297, 0.93311, 0.91699, 0.9172,
        0.89174, 0.89202, 0.8541, 0.85446, 0.79823, 0.79902],
    "ti2v-5B": [  # L736
        0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548, 0.99468, 0.9946,
        0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441, 0.99409, 0.99398, 0.99403, 0.99397,
        0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378, 0.9933, 0.99328, 0.99303, 0.99301, 0.99217, 0.99216,
        0.992, 0.99201, 0.99201, 0.99202, 0.99133, 0.99132, 0.99112, 0.9911, 0.99155, 0.99155, 0.98958, 0.98957,
        0.98959, 0.98958, 0.98838, 0.98835, 0.98826, 0.98825, 0.9883, 0.98828, 0.98711, 0.98709, 0.98562, 0.98561,
        0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282, 0.98104, 0.98101, 0.97981, 0.97979, 0.97849, 0.97849,
        0.97557, 0.97554, 0.97398, 0.97395, 0.97171, 0.97166, 0.96917, 0.96913, 0.96511, 0.96507, 0.96263, 0.96257,
        0.95839, 0.95835, 0.95483, 0.95475, 0.94942, 0.94936, 0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872,
        0.96949, 0.97015],
    "ti2v-5B-image": [  # L738
        0.99512, 0.99559, 0.99559, 0.99561, 0.99595, 0.99577, 0.99512, 0.99512, 0.99546, 0.99534, 0.99543, 0.99531,
        0.99496, 0.99491, 0.99504, 0.99499, 0.99444, 0.99449, 0.99481, 0.99481, 0.99435, 0.99435, 0.9943, 0.99431,
        0.99411, 0.99406, 0.99373, 0.99376, 0.99413, 0.99405, 0.99363, 0.99359, 0.99335, 0.99331, 0.99244, 0.99243,
        0.99229, 0.99229, 0.99239, 0.99236, 0.99163, 0.9916, 0.99149, 0.99151, 0.99191, 0.99192, 0.9898, 0.98981,
        0.9899, 0.98987, 0.98849, 0.98849, 0.98846, 0.98846, 0.98861, 0.98861, 0.9874, 0.98738, 0.98588, 0.98589,
        0.98539, 0.98534, 0.98444, 0.98439, 0.9831, 0.98309, 0.98119, 0.98118, 0.98001, 0.98, 0.97862, 0.97859,
        0.97555, 0.97558, 0.97392, 0.97388, 0.97152, 0.97145, 0.96871, 0.9687, 0.96435, 0.96434, 0.96129, 0.96127,
        0.95639, 0.95638, 0.95176, 0.95175, 0.94446, 0.94452, 0.93972, 0.93974, 0.93575, 0.9359, 0.93537, 0.93552,
        0.96655, 0.96616],
}

# the README's settings per task: (threshold E, K, retention R)
SETTINGS = {"t2v-A14B": (0.06, 2, 0.4), "i2v-A14B": (0.06, 2, 0.1), "ti2v-5B": (0.06, 2, 0.2),
            "ti2v-5B-image": (0.06, 2, 0.2)}
MODES = {"t2v-A14B": "t2v", "i2v-A14B": "i2v", "ti2v-5B": "ti2v", "ti2v-5B-image": "ti2v"}


def table_for(task: str, image: bool = False) -> str:
    """The published table of a Wan2.2 task (``t2v-A14B``, ``i2v-A14B``, ``ti2v-5B``; TI2V has one for
    generations from an image)."""
    if task == "ti2v-5B" and image:
        return "ti2v-5B-image"
    if task not in PUBLISHED:
        raise ValueError(f"MagCache publishes no Wan2.2 ratios for task {task!r} (tables: {', '.join(PUBLISHED)})")
    return task


def authors_high_noise_steps(steps: int, shift: float, boundary: float) -> int:
    """High-noise steps as the authors count them: timesteps ``int(1000 * shifted sigma)`` (float32) of
    ``linspace(1, 0.01, steps + 1)[:-1]``, at least ``boundary * 1000`` (``boundary``: a fraction)."""
    sigmas = np.linspace(1.0, 0.01, steps + 1)[:-1]
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    timesteps = (sigmas * np.float32(1000)).astype(np.int64)
    return int((timesteps >= 1000 * boundary).sum())


class Wan22MagCache(MagCacheCallback):
    """MagCache with the authors' Wan2.2 retention (module docstring). ``mode``: ``t2v``, ``i2v`` or
    ``ti2v``; ``high_noise_steps``: ``S`` (``None`` for ``ti2v``)."""

    def __init__(self, mag_ratios, threshold: float, max_skip_steps: int, retention_ratio: float, mode: str,
                 high_noise_steps: Optional[int], **kw):
        super().__init__(mag_ratios, threshold, max_skip_steps, retention_ratio, **kw)
        if mode not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"taohooks: Wan22MagCache mode must be t2v, i2v or ti2v, got {mode!r}")
        if (mode == "ti2v") != (high_noise_steps is None):
            raise ValueError("taohooks: Wan22MagCache needs high_noise_steps for t2v and i2v (two experts), "
                             "and none for ti2v")
        self.mode, self.high_noise_steps = mode, high_noise_steps
        self._switch_checked = False

    def on_sample_start(self, hook, sample: int) -> None:
        super().on_sample_start(hook, sample)
        self._switch_checked = False

    def retained(self, call) -> bool:
        n = 2 * self.hook.loop.steps
        cnt = 2 * call.step + call.index % self.hook.loop.calls_per_step
        r = self.retention_ratio
        if self.mode == "ti2v":
            return cnt < int(n * r)
        split = 2 * self.high_noise_steps
        if self.expert == 1 and not self._switch_checked:
            self._switch_checked = True
            if call.step != self.high_noise_steps:
                messages.notice(f"MagCache (Wan2.2): the low-noise expert took over at step {call.step}; the authors' "
                                f"retention counts {self.high_noise_steps} high-noise steps (their timestep formula), "
                                "and so does this run", once=f"magcache-wan22-switch-{call.step}-{self.high_noise_steps}")
        if self.mode == "i2v":
            return cnt < int(split + (n - split) * r)
        return cnt < int(split * r) or split <= cnt <= (n - split) * r + split


def wan22_magcache(table: str, steps: int, high_noise_steps: Optional[int], threshold: float = None, k: int = None,
                   retention_ratio: float = None, blocks: str = "blocks") -> Wan22MagCache:
    """The authors' MagCache for a Wan2.2 table (``t2v-A14B``, ``i2v-A14B``, ``ti2v-5B``, ``ti2v-5B-image``);
    unset settings from their README (:data:`SETTINGS`)."""
    e, kk, r = SETTINGS[table]
    mode = MODES[table]
    return Wan22MagCache(ratio_table(PUBLISHED[table], steps), e if threshold is None else threshold,
                         kk if k is None else k, r if retention_ratio is None else retention_ratio, mode,
                         None if mode == "ti2v" else high_noise_steps, blocks=blocks)
