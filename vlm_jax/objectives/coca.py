"""CoCa (Yu et al. 2022): contrastive + captioning in one model.

    L = contrastive_weight · L_CLIP + caption_weight · L_cap

L_CLIP is CLIP's softmax InfoNCE on the pooled embeddings (negatives from
every device, any ``loss.impl``); L_cap the teacher-forced next-token loss of
a multimodal decoder (``vlm_jax.models.decoder.CaptionDecoder``, the
objective's own parameters under ``decoder``) that reads the causal text
tower's per-token features and cross-attends to the image tower's tokens
(``vlm_jax.losses.captioning``). CoCa's weights are 1 and 2 (the defaults);
``contrastive_weight=0`` is captioning alone (CapPa's spirit, with the text
tower as the decoder's first layers). ``decoder_depth`` blocks at the text
tower's width, heads and MLP size.

``encode`` returns the embeddings and each example's summed token NLL and
token count; ``combine`` forms both losses over the whole global batch, so
gradient accumulation stays exact.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from vlm_jax import losses
from vlm_jax.data import pipeline
from vlm_jax.errors import require
from vlm_jax.losses import captioning
from vlm_jax.models import decoder as decoder_lib
from vlm_jax.models import towers
from vlm_jax.objectives.base import Contrastive, features_and_tokens


class CoCa(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {"caption_weight": 2.0, "contrastive_weight": 1.0, "decoder_depth": 2}

    @classmethod
    def check(cls, config) -> None:
        require(config.model.text.causal, "model.text.causal",
                "the captioning decoder reads the text tower's per-token features: it must be causal (True), "
                "or position l would see the tokens it predicts")
        require(config.loss.decoder_depth >= 1, "loss.decoder_depth", f"must be >= 1, got {config.loss.decoder_depth}")
        require(config.loss.caption_weight >= 0 and config.loss.contrastive_weight >= 0, "loss.caption_weight",
                "the loss weights must be non-negative")

    @property
    def decoder(self) -> decoder_lib.CaptionDecoder:
        t = self.model.text
        return decoder_lib.CaptionDecoder(t.vocab_size, self.loss.decoder_depth, t.mlp_dim, t.num_heads, t.dtype,
                                          t.act, t.norm_eps)

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        text = jnp.zeros((1, 2, self.model.text.width), self.model.text.dtype)
        image = jnp.zeros((1, 2, self.model.image.width), self.model.image.dtype)
        return {**super().init_parts(rng), "decoder": self.decoder.init(rng, text, image)["params"]}

    def logits(self, params, images, tokens) -> jax.Array:
        """Next-token logits (B, L, V) of the captions ``tokens`` given the (normalised) images."""
        _, _, img_tokens, txt_tokens = self.apply(params, images, tokens, method=features_and_tokens)
        return self.decoder.apply({"params": params["decoder"]}, txt_tokens, img_tokens)

    def greedy_captions(self, params, images, eos_id: int) -> jax.Array:
        """Greedy captions (B, max_len) of the normalised ``images``: each step
        appends the most likely token (never padding, 0) at the next position,
        and rows stop, then pad with 0, after ``eos_id``. Each step recomputes
        the towers on the whole fixed-length buffer (jittable, O(L²) work; the
        causal masks make the tokens not yet written irrelevant); a KV cache
        is future work."""
        b, length = images.shape[0], self.model.text.max_len
        img_tokens = self.apply(params, images, method=lambda m, x: m.image(x)[1])

        def step(pos, carry):
            tokens, done = carry
            txt_tokens = self.apply(params, tokens, method=lambda m, t: m.text(t)[1])
            logits = self.decoder.apply({"params": params["decoder"]}, txt_tokens, img_tokens)[:, pos]
            nxt = jnp.argmax(logits.at[:, 0].set(-jnp.inf), axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, 0, nxt)
            return tokens.at[:, pos].set(nxt), done | (nxt == eos_id)

        init = (jnp.zeros((b, length), jnp.int32), jnp.zeros((b,), bool))
        return jax.lax.fori_loop(0, length, step, init)[0]

    def encode(self, params, batch):
        images = pipeline.normalize_images(batch["image"])
        zimg, ztxt, img_tokens, txt_tokens = self.apply(params, images, batch["text"], method=features_and_tokens)
        logits = self.decoder.apply({"params": params["decoder"]}, txt_tokens, img_tokens)
        nll, count = captioning.token_nll(logits, batch["text"])
        return {"zimg": zimg, "ztxt": ztxt, "cap_nll": nll, "cap_count": count}

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        clip = losses.softmax_loss(outputs["zimg"], outputs["ztxt"], log_t, **self.loss_kw)
        cap = captioning.caption_loss(outputs["cap_nll"], outputs["cap_count"])
        loss = self.loss.contrastive_weight * clip + self.loss.caption_weight * cap
        return loss, {"log_temp": log_t, "clip_loss": clip, "caption_loss": cap}
