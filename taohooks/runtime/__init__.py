"""The hook runtime: wrapping an instance's forward (:mod:`.hook`, :mod:`.patching`), the callbacks
around each call (:mod:`.callbacks`), the loop's declared shape (:mod:`.loop`), output structures,
state resets, the stderr message channel, atomic and locked file writes, and distributed helpers.
Nothing here knows about TaoCache."""
