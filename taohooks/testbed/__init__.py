"""Bundled testbed: a procedural text-to-video task and a tiny video DiT.

Submodules (import them directly; nothing heavy is imported here):

- ``data``        procedural clips ``[3, 8, 16, 16]`` in ``[-1, 1]`` from ``(prompt, seed)``
- ``recognizer``  analytic check that a clip shows its prompt
- ``model``       ``VideoDiT`` (adaLN-Zero DiT over 128 space-time tokens)
- ``schedules``   DDPM betas and flow-matching interpolation used by training
- ``train``       ``python -m taohooks.testbed.train --kind {eps,flow,flow-lognormal}``
- ``sampling``    Latte-style (eps) and Wan-style (flow) sampling loops
- ``grid``        PNG grid of clips

The second task, ``scenes`` (issue 15: early steps decide the content; in training):

- ``scenes``              clips ``[3, 8, 32, 32]``: 1-3 objects over textured backgrounds, the seed decides the layout
- ``scenes_recognizer``   colour, direction, shape, count and background verdicts
- ``scenes_sampling``     its Wan-style (flow) and Latte-style (eps) loops
- ``train_scenes``        ``python -m taohooks.testbed.train_scenes``: 6.49M-parameter DiT, resumable, CPU or GPU
- ``scenes_sensitivity``  early-sensitivity measurements against full step
- ``scenes_exact``        exact-score control: a Gaussian mixture with a closed-form denoiser, DiT-shaped
"""
