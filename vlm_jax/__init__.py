"""vlm_jax: large-batch vision–language pretraining in JAX/Flax.

The path of one step: ``config`` → ``session`` (mesh, ``data``, ``models``,
``objectives``, optimiser, sharded state) → ``step`` (the objective's
encode/combine through ``losses``, exact for any accumulation) → ``train``
(the loop: log, ``evaluators``, ``checkpoint``). ``evaluate`` runs the
evaluators on any checkpoint. Extension points and the files each touches:
docs/architecture.md. ``vlm_jax.losses`` and ``vlm_jax.models`` import
without the data stack (TFDS, grain).
"""
