"""Bundled testbed: a procedural text-to-video task and a tiny video DiT.

Submodules (import them directly; nothing heavy is imported here):

- ``data``        procedural clips ``[3, 8, 16, 16]`` in ``[-1, 1]`` from ``(prompt, seed)``
- ``recognizer``  analytic check that a clip shows its prompt
- ``model``       ``VideoDiT`` (adaLN-Zero DiT over 128 space-time tokens)
- ``schedules``   DDPM betas and flow-matching interpolation used by training
- ``train``       ``python -m taohooks.testbed.train --kind {eps,flow,flow-lognormal}``
- ``sampling``    Latte-style (eps) and Wan-style (flow) sampling loops
- ``grid``        PNG grid of clips
"""
