"""SLIP (Mu et al. 2022): CLIP plus image–image InfoNCE between two augmented views.

L = L_CLIP + ssl_weight · L_SSL, where L_SSL is SimCLR's NT-Xent over the
embeddings of two random views of every image, taken from the image tower's
pooled features through an MLP head (``ssl_head``: width → width → ssl_dim)
at a fixed temperature τ = exp(−ssl_log_t) = 0.1. The views are a shift of
up to 1/8 of the side and a horizontal flip, drawn in the input pipeline from
a generator seeded by (seed, example position).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax import losses
from vlm_jax.data import pipeline
from vlm_jax.errors import require
from vlm_jax.models import towers
from vlm_jax.objectives.base import Contrastive


def augment_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random view for image–image contrast: a shift of up to 1/8 of the
    side (edge padding) and a horizontal flip with probability ½."""
    size = image.shape[0]
    pad = max(size // 8, 1)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    view = padded[dy:dy + size, dx:dx + size]
    return view[:, ::-1] if rng.random() < 0.5 else view


def two_views(example: dict, rng: np.random.Generator) -> dict:
    return {**example, "view1": augment_view(example["image"], rng), "view2": augment_view(example["image"], rng)}


class SSLHead(nn.Module):
    """SLIP's image-only MLP head: Dense(hidden) → ReLU → Dense(out), L2-normalised."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, h):
        return towers.l2_normalize(nn.Dense(self.out, name="fc2")(nn.relu(nn.Dense(self.hidden, name="fc1")(h))))


class SLIP(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {
        "ssl_weight": 1.0,  # L = L_CLIP + ssl_weight · L_image-InfoNCE
        "ssl_log_t": math.log(10.0),  # fixed τ = 0.1 of the image–image term
        "ssl_dim": 64,  # output size of the image-only MLP head
    }
    augment = staticmethod(two_views)

    @classmethod
    def check(cls, config) -> None:
        require(config.loss.ssl_dim > 0, "loss.ssl_dim", "must be positive for loss.kind='slip'")

    @property
    def head(self) -> SSLHead:
        return SSLHead(self.model.image.width, self.loss.ssl_dim)

    def init_parts(self, rng):
        features = jnp.zeros((1, self.model.image.width), jnp.float32)
        return {**super().init_parts(rng), "ssl_head": self.head.init(rng, features)["params"]}

    def encode(self, params, batch):
        out = super().encode(params, batch)
        for view in ("view1", "view2"):
            pooled, _ = self.apply(params, pipeline.normalize_images(batch[view]),
                                   method=towers.TwoTower.image_features)
            out[view] = self.head.apply({"params": params["ssl_head"]}, pooled)
        return out

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        clip = losses.softmax_loss(outputs["zimg"], outputs["ztxt"], log_t, **self.loss_kw)
        ssl = losses.image_infonce_loss(outputs["view1"], outputs["view2"], jnp.float32(self.loss.ssl_log_t),
                                        **self.loss_kw)
        return clip + self.loss.ssl_weight * ssl, {"log_temp": log_t, "clip_loss": clip, "ssl_loss": ssl}


