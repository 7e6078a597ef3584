"""vlm_jax: large-batch contrastive image–text pretraining in JAX/Flax.

The path of one step: ``config`` → ``data`` → ``models`` → ``losses`` →
``parallel`` → ``train`` → ``evaluate``. ``vlm_jax.losses`` and
``vlm_jax.models`` import without the data stack (TFDS, grain).
"""
