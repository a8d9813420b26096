"""Running a research repo's own script with TaoCache: the integration machinery (patching a
pipeline's generation function, :mod:`.integration`), import hooks (:mod:`.imports`) and calibration
over a prompt list (:mod:`.prompt_calibration`). The entry points are ``taohooks.run`` (``taocache-run``)
and ``taohooks.autoload`` (the .pth of spawned workers)."""
