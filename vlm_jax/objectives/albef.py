"""ALBEF (Li et al. 2021): contrastive + image–text matching + masked language modelling.

    L = contrastive_weight · L_ITC + itm_weight · L_ITM + mlm_weight · L_MLM

The two towers of CLIP plus a fusion encoder (``vlm_jax.models.decoder.
FusionEncoder``, ``fusion_depth`` blocks at the text tower's width, heads and
MLP size) that reads the text tower's per-token features and cross-attends
to the image tower's tokens — the two-leg framework.

  * L_ITC: CLIP's softmax InfoNCE on the pooled embeddings (any ``loss.impl``).
  * L_ITM: a two-way head on the fusion encoder's query output classifies the
    B positive pairs and 2B hard negatives — for each image a caption, for
    each caption an image, drawn in proportion to exp(t·s) over the whole
    global batch, never a positive nor a duplicate caption
    (``vlm_jax.losses.matching``).
  * L_MLM: ``mlm_prob`` of each caption's tokens (at least one) are chosen;
    of those 80 % are replaced by a learned [MASK] vector (the objective's
    ``mask_embed``, so no tokenizer needs a mask id), 10 % by a random token,
    10 % kept; the caption goes through the text tower and the fusion
    encoder, and a head predicts the chosen tokens: the mean over the global
    batch's chosen tokens of their negative log-likelihood (the formula of
    ``vlm_jax.losses.captioning`` over the chosen positions).

Every random choice — which tokens, their replacement, the two uniforms that
pick each example's negatives — is drawn by the input pipeline from the
example's generator, seeded by (seed, example position): resume, device count
and accumulation never change it. ``encode`` returns per-example terms (the
embeddings, both towers' tokens, the MLM sums); ``combine`` samples the
negatives and runs the fusion encoder on the 3B pairs over the global batch,
so ``accum_steps = k`` equals the full batch exactly (the fusion encoder and
the ITM head are ``scalar_names``: their gradient from the pairs is taken once).

Memory beyond CLIP: the fusion encoder on B sequences per step in ``encode``
(the masked captions) and 3B in ``combine`` — the pairs are formed
over the global batch, so accumulation does not shrink this part; the masked
captions' second text-tower pass; B × B similarities for the sampler.
Communication: the negatives' token blocks, gathered to the rows that drew them.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import parallel
from vlm_jax.data import pipeline
from vlm_jax.errors import require
from vlm_jax.losses import captioning, matching
from vlm_jax.models import decoder as decoder_lib
from vlm_jax.objectives.base import Contrastive, features_and_tokens


def mask_caption(tokens: np.ndarray, rng: np.random.Generator, prob: float, low: int, high: int):
    """BERT's masking of one caption (L,), 0 = padding: (inputs, where the
    [MASK] vector goes, targets). ``max(1, round(prob · n))`` of the n real
    tokens are chosen without replacement; each chosen one is masked with
    probability 0.8, replaced by a token drawn from [low, high) with 0.1, kept
    with 0.1. ``targets`` holds the chosen tokens' ids and 0 elsewhere."""
    real = np.flatnonzero(tokens != 0)
    inputs, where, targets = tokens.copy(), np.zeros(tokens.shape, bool), np.zeros_like(tokens)
    if real.size == 0:
        return inputs, where, targets
    chosen = rng.choice(real, size=max(1, int(round(prob * real.size))), replace=False)
    fate = rng.random(chosen.size)
    targets[chosen] = tokens[chosen]
    where[chosen[fate < 0.8]] = True
    swapped = chosen[(fate >= 0.8) & (fate < 0.9)]
    inputs[swapped] = rng.integers(low, high, swapped.size)
    return inputs, where, targets


def albef_augment(example: dict, rng: np.random.Generator, *, prob: float, low: int, high: int) -> dict:
    inputs, where, targets = mask_caption(example["text"], rng, prob, low, high)
    return {**example, "mlm_text": inputs, "mlm_where": where, "mlm_targets": targets,
            "itm_u": matching.draw_uniforms(rng)}


class MLMHead(nn.Module):
    vocab_size: int
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(epsilon=self.norm_eps, name="ln")(x)
        return nn.Dense(self.vocab_size, dtype=jnp.float32, name="out")(x).astype(jnp.float32)


class ALBEF(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {"contrastive_weight": 1.0, "itm_weight": 1.0, "mlm_weight": 1.0,
                                        "fusion_depth": 2, "mlm_prob": 0.15}
    scalar_names: ClassVar[tuple[str, ...]] = ("log_t", "fusion", "itm_head")

    @classmethod
    def check(cls, config) -> None:
        c = config.loss
        require(c.fusion_depth >= 1, "loss.fusion_depth", f"must be >= 1, got {c.fusion_depth}")
        require(0.0 < c.mlm_prob <= 1.0, "loss.mlm_prob", f"must be in (0, 1], got {c.mlm_prob}")
        for name in ("contrastive_weight", "itm_weight", "mlm_weight"):
            require(c[name] >= 0, f"loss.{name}", f"must be non-negative, got {c[name]}")
        require(c.contrastive_weight + c.itm_weight + c.mlm_weight > 0, "loss.itm_weight",
                "contrastive_weight, itm_weight and mlm_weight are all 0: nothing to train")

    @property
    def augment(self):
        t = self.model.text  # random replacements: any id the embedding has a row for
        return functools.partial(albef_augment, prob=float(self.loss.mlm_prob), low=1,
                                 high=t.vocab_size + t.token_offset)

    @property
    def fusion(self) -> decoder_lib.FusionEncoder:
        t = self.model.text
        return decoder_lib.FusionEncoder(self.loss.fusion_depth, t.mlp_dim, t.num_heads, t.dtype, t.act, t.norm_eps,
                                         t.remat, t.scan)

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        t, w = self.model.text, self.model.text.width
        k1, k2, k3, k4 = jax.random.split(rng, 4)
        text = jnp.zeros((1, 2, w), t.dtype)
        image = jnp.zeros((1, 2, self.model.image.width), self.model.image.dtype)
        return {
            **super().init_parts(rng),
            "fusion": self.fusion.init(k1, text, jnp.ones((1, 2), bool), image)["params"],
            "itm_head": nn.Dense(2).init(k2, jnp.zeros((1, w)))["params"],
            "mlm_head": MLMHead(t.vocab_size, t.norm_eps).init(k3, jnp.zeros((1, w)))["params"],
            "mask_embed": 0.02 * jax.random.normal(k4, (w,), jnp.float32),
        }

    def fused(self, params, text_features, tokens, img_tokens) -> jax.Array:
        return self.fusion.apply({"params": params["fusion"]}, text_features, tokens != 0, img_tokens)

    def encode(self, params, batch):
        images = pipeline.normalize_images(batch["image"])
        zimg, ztxt, img_tokens, txt_tokens = self.apply(params, images, batch["text"], method=features_and_tokens)
        out = {"zimg": zimg, "ztxt": ztxt, "img_tokens": img_tokens, "txt_tokens": txt_tokens}
        if self.loss.mlm_weight:
            replace = (batch["mlm_where"], params["mask_embed"])
            masked = self.apply(params, batch["mlm_text"], replace, method=lambda m, t, r: m.text(t, r)[1])
            hidden = self.fused(params, masked, batch["mlm_text"], img_tokens)[:, 1:]
            logits = MLMHead(self.model.text.vocab_size, self.model.text.norm_eps).apply(
                {"params": params["mlm_head"]}, hidden)
            out["mlm_nll"], out["mlm_count"] = captioning.token_nll(logits, batch["mlm_targets"])
        return out

    def itm_logits(self, params, img_tokens, txt_tokens, tokens) -> jax.Array:
        """Two-way matching logits (B, 2) of the pairs (image tokens_i, caption_i); 1 = match."""
        query = self.fused(params, txt_tokens, tokens, img_tokens)[:, 0]
        return nn.Dense(2).apply({"params": params["itm_head"]}, query).astype(jnp.float32)

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]  # scalars also hold the fusion encoder and the ITM head
        zimg, ztxt = outputs["zimg"], outputs["ztxt"]
        loss, clip_metrics = self.weighted_clip(outputs, log_t)
        metrics = {"log_temp": log_t, **clip_metrics}
        if self.loss.itm_weight:
            shard = (lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(self.mesh))) \
                if self.mesh is not None else (lambda x: x)

            def pair_logits(img_idx, txt_idx):
                take = lambda x, i: shard(jnp.take(x, i, axis=0))  # noqa: E731
                return self.itm_logits(scalars, take(outputs["img_tokens"], img_idx),
                                       take(outputs["txt_tokens"], txt_idx), take(batch["text"], txt_idx))

            itm, extra = matching.itm_loss(zimg @ ztxt.T, log_t, batch["text"], batch["itm_u"], pair_logits)
            loss = loss + self.loss.itm_weight * itm
            metrics.update(itm_loss=itm, **extra)
        if self.loss.mlm_weight:
            mlm = captioning.caption_loss(outputs["mlm_nll"], outputs["mlm_count"])
            loss, metrics["mlm_loss"] = loss + self.loss.mlm_weight * mlm, mlm
        return loss, metrics
