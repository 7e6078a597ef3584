"""CLIP with masked image modelling as an image-side auxiliary (MAE, He et al. 2021).

    L = contrastive_weight · L_CLIP + mae_weight · L_MAE

L_CLIP is CLIP's softmax InfoNCE on the full images' pooled embeddings (any
``loss.impl``). For L_MAE each image is encoded a second time with only
1 − ``mask_ratio`` of its patches (a uniformly random subset, at least one);
a light decoder (``vlm_jax.models.mae.MAEDecoder``: ``mae_decoder_depth``
blocks at ``mae_decoder_width``, 0 = the image tower's width) predicts the
pixels of every dropped patch, and the loss is the mean squared error on
the dropped patches' per-patch-normalised pixels
(``vlm_jax.losses.reconstruction``). The kept positions are drawn by the
input pipeline from each example's generator, seeded by (seed, example
position), so resume and device count never change them. Needs a ViT image
tower without a convolutional stem (patch tokens to drop, each seeing only
its own pixels).

Memory beyond CLIP: the masked pass costs about (1 − mask_ratio) of the
image tower's activations; the decoder's run on all N patches at its own
width, and the pixel predictions and targets (the size of the images).
Communication: none beyond data parallelism. ``encode`` returns each
example's (mse, count); ``combine`` divides their global sums once, so
accumulation is exact.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import models
from vlm_jax.data import pipeline
from vlm_jax.errors import require
from vlm_jax.losses import reconstruction
from vlm_jax.models import mae as mae_lib
from vlm_jax.models import towers
from vlm_jax.objectives.base import Contrastive


def drop_patches(example: dict, rng: np.random.Generator, *, patch: int, ratio: float) -> dict:
    """Adds "mae_keep" (k,) int32, the kept patch positions in increasing
    order, and "mae_dropped" (N,) bool, for the example's image (S, S, 3)
    cut into N = (S // patch)² patches; k = max(1, round((1 − ratio) · N))."""
    grid = example["image"].shape[0] // patch
    n = grid * grid
    keep = np.sort(rng.permutation(n)[:max(1, int(round((1.0 - ratio) * n)))]).astype(np.int32)
    dropped = np.ones(n, bool)
    dropped[keep] = False
    return {**example, "mae_keep": keep, "mae_dropped": dropped}


class MAE(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {"mae_weight": 1.0, "mask_ratio": 0.75, "mae_decoder_width": 0,
                                        "mae_decoder_depth": 1, "contrastive_weight": 1.0}

    @classmethod
    def check(cls, config) -> None:
        c = config.loss
        tower = models.IMAGE_TOWERS.get(config.model.image.tower)
        require(tower is not None and issubclass(tower, towers.ViT), "model.image.tower",
                f"masked image modelling drops patch tokens: it needs a ViT image tower ('vit'; configs/vit.py:mae), "
                f"got {config.model.image.tower!r}")
        require(not tuple(config.model.image.stem), "model.image.stem",
                "masked image modelling needs patches that see only their own pixels; a convolutional stem's "
                "receptive fields cross patch borders, so kept patches would see dropped pixels: set stem=()")
        require(0.0 <= c.mask_ratio < 1.0, "loss.mask_ratio", f"must be in [0, 1), got {c.mask_ratio}")
        require(c.mae_decoder_depth >= 1, "loss.mae_decoder_depth", f"must be >= 1, got {c.mae_decoder_depth}")
        width = c.mae_decoder_width or config.model.image.width
        require(width % 4 == 0 and width % config.model.image.num_heads == 0, "loss.mae_decoder_width",
                f"{width} must be a multiple of 4 (sine-cosine positions) and of model.image.num_heads="
                f"{config.model.image.num_heads}")
        for name in ("contrastive_weight", "mae_weight"):
            require(c[name] >= 0, f"loss.{name}", f"must be non-negative, got {c[name]}")
        require(c.contrastive_weight + c.mae_weight > 0, "loss.mae_weight",
                "contrastive_weight and mae_weight are both 0: nothing to train")

    @property
    def augment(self):
        return functools.partial(drop_patches, patch=self.model.image.patch_size, ratio=float(self.loss.mask_ratio))

    def decoder(self, grid: int) -> mae_lib.MAEDecoder:
        """The decoder for a grid × grid patch image (its parameters do not depend on the grid)."""
        im = self.model.image
        width = self.loss.mae_decoder_width or im.width
        return mae_lib.MAEDecoder(grid, im.patch_size, width, self.loss.mae_decoder_depth, 4 * width, im.num_heads,
                                  im.dtype)

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        tokens = jnp.zeros((1, 1, self.model.image.width), self.model.image.dtype)
        params = self.decoder(1).init(rng, tokens, jnp.zeros((1, 1), jnp.int32))["params"]
        return {**super().init_parts(rng), "mae_decoder": params}

    def reconstruct(self, params, images, keep) -> jax.Array:
        """Pixel predictions (B, N, p²·3) of every patch of the normalised
        ``images`` from the patches at ``keep`` (B, k)."""
        _, kept = self.apply(params, images, keep, method=lambda m, x, k: m.image(x, k))
        grid = images.shape[1] // self.model.image.patch_size
        return self.decoder(grid).apply({"params": params["mae_decoder"]}, kept, keep)

    def encode(self, params, batch):
        out = super().encode(params, batch)
        if self.loss.mae_weight:
            images = pipeline.normalize_images(batch["image"])
            pred = self.reconstruct(params, images, batch["mae_keep"])
            target = reconstruction.pixel_targets(images, self.model.image.patch_size)
            out["mae_mse"], out["mae_count"] = reconstruction.masked_mse(pred, target, batch["mae_dropped"])
        return out

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        loss, clip_metrics = self.weighted_clip(outputs, log_t)
        metrics = {"log_temp": log_t, **clip_metrics}
        if self.loss.mae_weight:
            mae = reconstruction.mae_loss(outputs["mae_mse"], outputs["mae_count"])
            loss, metrics["mae_loss"] = loss + self.loss.mae_weight * mae, mae
        return loss, metrics
