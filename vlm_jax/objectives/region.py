"""Region–word alignment (GLIP / RegionCLIP style) next to CLIP's global loss.

    L = contrastive_weight · L_CLIP + region_weight · L_region

  * L_CLIP: CLIP's softmax InfoNCE on the pooled embeddings (any ``loss.impl``).
  * L_region: ``vlm_jax.losses.region_word_loss`` between region features and
    phrase embeddings, positives by concept (the class of the objects a
    phrase names), every region against every phrase of the global batch.

Regions: each box of the example (``data.max_boxes`` slots, from the
pipeline's "regions" field, already mapped through the training crop) pools
the image tower's patch tokens, projected into the shared space, weighted by
how much of each patch the box covers (``vlm_jax.models.regions``); one more
region per image pools what no box covers and is paired with the background
phrase (``data.background_phrase``, the last phrase slot), so that dense
zero-shot has a background to score against. Boxes mostly cropped away and
empty slots have weight 0. Phrases: the caption's noun phrases ("a small red
circle", "three red circles") through the text tower, each a sequence of its
own. Regions and phrases are L2-normalised; the loss has its own temperature
and bias (``region_log_t``, ``region_bias``), initialised from
``region_log_t_init`` and ``region_bias_init``.

Memory beyond CLIP: the text tower runs on (max_phrases + 1) more sequences
per example; the region loss's own costs are in its docstring (B·(R+1)
regions × B·(P+1) phrases, memory-linear with "ring"/"tiled").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from vlm_jax import losses
from vlm_jax.data import pipeline
from vlm_jax.errors import require
from vlm_jax.models import regions as regions_lib
from vlm_jax.models import towers
from vlm_jax.objectives.base import Contrastive


class RegionWord(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {"region_weight": 1.0, "region_log_t_init": math.log(10.0),
                                        "region_bias_init": -5.0}
    example_fields: ClassVar[tuple[str, ...]] = ("regions",)
    scalar_names: ClassVar[tuple[str, ...]] = ("log_t", "region_log_t", "region_bias")

    @classmethod
    def check(cls, config) -> None:
        c = config.loss
        for name in ("contrastive_weight", "region_weight"):
            require(c[name] >= 0, f"loss.{name}", f"must be non-negative, got {c[name]}")
        require(c.contrastive_weight + c.region_weight > 0, "loss.region_weight",
                "contrastive_weight and region_weight are both 0: nothing to train")

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        return {**super().init_parts(rng), "region_log_t": jnp.asarray(self.loss.region_log_t_init, jnp.float32),
                "region_bias": jnp.asarray(self.loss.region_bias_init, jnp.float32)}

    def encode(self, params, batch):
        images = pipeline.normalize_images(batch["image"])
        zimg, tokens = self.apply(params, images, method=towers.TwoTower.encode_image_dense)
        ztxt = self.apply(params, batch["text"], method=towers.TwoTower.encode_text)
        out = {"zimg": zimg, "ztxt": ztxt}
        if not self.loss.region_weight:
            return out
        b, n_phrases, length = batch["phrases"].shape
        phrases = self.apply(params, batch["phrases"].reshape(b * n_phrases, length),
                             method=towers.TwoTower.encode_text).reshape(b, n_phrases, -1)
        grid = regions_lib.grid_side(tokens.shape[1], "config.model.image")
        present = batch["box_labels"] >= 0
        cover = regions_lib.box_weights(batch["boxes"], grid)  # (b, R, n)
        weights = jnp.concatenate([cover, regions_lib.background_weights(cover, present)[:, None]], axis=1)
        out["regions"] = towers.l2_normalize(regions_lib.pool(tokens, weights))
        out["region_weights"] = jnp.concatenate(
            [present, jnp.sum(weights[:, -1], axis=-1, keepdims=True) > 0], axis=1).astype(jnp.float32)
        out["phrases"] = phrases
        return out

    def combine(self, outputs, scalars, batch):
        loss, metrics = self.weighted_clip(outputs, scalars["log_t"])
        metrics["log_temp"] = scalars["log_t"]
        if self.loss.region_weight:
            boxes, phrases = batch["box_labels"], batch["phrase_labels"]  # keys: from the batch, not outputs
            region_keys = jnp.concatenate([boxes, jnp.full((len(boxes), 1), pipeline.BACKGROUND, jnp.int32)], axis=1)
            region = losses.region_word_loss(
                outputs["regions"], region_keys, outputs["region_weights"],
                outputs["phrases"], phrases, (phrases != pipeline.ABSENT).astype(jnp.float32),
                scalars["region_log_t"], scalars["region_bias"], **self.loss_kw)
            loss = loss + self.loss.region_weight * region
            metrics.update(region_loss=region, region_log_temp=scalars["region_log_t"],
                           region_bias=scalars["region_bias"])
        return loss, metrics
