"""The other caches, for comparison and composition: TeaCache, MagCache, Pyramid Attention Broadcast,
and the block-residual reuse they share (:mod:`.residual`)."""
