"""Integrations with the official research repos, installed as ``taohooks.integrations``.

Each subpackage (``wan``, ``latte``, ``opensora_plan``) patches one official sample script so
that ``--taocache configs/X.yaml`` attaches TaoCache without editing the research repo. They
are built on the core in ``taohooks`` (hook, calibration, plan); see the README for status.
"""
