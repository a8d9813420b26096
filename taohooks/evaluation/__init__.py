"""The paper's evaluation on the bundled testbed models: methods, budgets, metrics, reports.

- ``testbed_model``: a bundled model with its loop shape and sampler (the same hooks an
  integration uses; nothing testbed-specific in the library).
- ``methods``: TaoCache, TeaCache, MagCache, TaoSkip+TeaResidual, the Tea+Tao hybrid and
  PAB+TaoCache, built as callbacks on one hook, with budgets matched the way the paper does.
- ``bench``: ``taocache bench CONFIG.yaml`` and ``taocache demo``.
"""
