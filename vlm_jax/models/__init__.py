"""Models: towers by name, and the two-tower model built from ``config.model``.

``config.model.image.tower`` and ``config.model.text.tower`` name an entry
below; each tower class declares its config fields (``CONFIG``), builds
itself (``from_config``) and checks its fields (``check``). To add a tower:
write ``vlm_jax/models/<name>.py``, add its line below, and test it.
"""

from __future__ import annotations

from typing import Any

from vlm_jax.errors import require
from vlm_jax.models import resnet, towers

IMAGE_TOWERS: dict[str, Any] = {
    "vit": towers.ViT,
    "resnet": resnet.ModifiedResNet,
}
TEXT_TOWERS: dict[str, Any] = {
    "transformer": towers.TextTransformer,
}


def check(config) -> None:
    """Config-time checks: the towers are known, and their own checks."""
    for section, mapping in (("image", IMAGE_TOWERS), ("text", TEXT_TOWERS)):
        name = config.model[section].tower
        require(name in mapping, f"model.{section}.tower", f"must be one of {sorted(mapping)}, got {name!r}")
        mapping[name].check(config)


def make_model(model_cfg, vocab_size: int) -> towers.TwoTower:
    """The two-tower model of ``config.model`` (explicit mappings, no registry)."""
    image = IMAGE_TOWERS[model_cfg.image.tower].from_config(model_cfg.image, model_cfg, vocab_size)
    text = TEXT_TOWERS[model_cfg.text.tower].from_config(model_cfg.text, model_cfg, vocab_size)
    return towers.TwoTower(image, text, model_cfg.embed_dim, model_cfg.image_projection, model_cfg.text_projection_bias)
