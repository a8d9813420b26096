"""TaoCache: calibration and its LUT (:mod:`.calibration`, :mod:`.lut`, :mod:`.lut_format`,
:mod:`.stats`, :mod:`.identity`), planning (:mod:`.plan`: Algorithm 1's window; :mod:`.delta_gram`,
:mod:`.error_model`, :mod:`.error_plan`: ``plan.rule: auto``; :mod:`.lut_transfer`), the extrapolating
callback (:mod:`.extrapolation`) and the :class:`~.cache.TaoCache` object that puts them on a model."""
