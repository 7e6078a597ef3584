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
from vlm_jax.models import generate
from vlm_jax.evaluators.base import Captioner
from vlm_jax.objectives.base import Contrastive, PooledEmbedder, features_and_tokens


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
                                          t.act, t.norm_eps, width=t.width, remat=t.remat, scan=t.scan)

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        text = jnp.zeros((1, 2, self.model.text.width), self.model.text.dtype)
        image = jnp.zeros((1, 2, self.model.image.width), self.model.image.dtype)
        return {**super().init_parts(rng), "decoder": self.decoder.init(rng, text, image)["params"]}

    def logits(self, params, images, tokens) -> jax.Array:
        """Next-token logits (B, L, V) of the captions ``tokens`` given the (normalised) images."""
        _, _, img_tokens, txt_tokens = self.apply(params, images, tokens, method=features_and_tokens)
        return self.decoder.apply({"params": params["decoder"]}, txt_tokens, img_tokens)

    def decoding(self, params, images, beams: int = 1):
        """(first, step, reorder, cache) of ``vlm_jax.models.generate`` for the
        normalised ``images`` (B rows, then B·beams after the first step): the
        causal text tower and the decoder run one position per call with their
        keys and values cached; the image tokens are computed once."""
        b, length = images.shape[0], self.model.text.max_len
        img_tokens = self.apply(params, images, method=lambda m, x: m.image(x)[1])
        img_rows = jnp.repeat(img_tokens, beams, axis=0)
        text = self.model.text.clone(decode=True, remat="none", parent=None)
        dec = self.decoder.clone(decode=True, remat="none")
        cache = {"text": generate.init_cache(text, {"params": params["text"]}, jnp.zeros((b, length), jnp.int32)),
                 "decoder": generate.init_cache(dec, {"params": params["decoder"]},
                                                jnp.zeros((b, length, self.model.text.width), text.dtype), img_tokens)}

        def run_decoder(cache, features, context):
            logits, new = dec.apply({"params": params["decoder"], "cache": cache}, features, context,
                                    mutable=["cache"])
            return jax.nn.log_softmax(logits[:, 0], axis=-1), new["cache"]

        def first(cache):
            logp, cache["decoder"] = run_decoder(cache["decoder"], None, img_tokens)
            return logp, cache

        def step(cache, tokens, pos):
            (_, features), new = text.apply({"params": params["text"], "cache": cache["text"]}, tokens[:, None],
                                            mutable=["cache"])
            logp, dcache = run_decoder(cache["decoder"], features, img_rows)
            return logp, {"text": new["cache"], "decoder": dcache}

        def reorder(cache, rows):
            # under scan the caches are stacked over blocks: their batch axis is 1
            return {"text": generate.take_rows(cache["text"], rows, axis=int(text.scan)),
                    "decoder": generate.take_rows(cache["decoder"], rows, axis=int(dec.scan))}

        return first, step, reorder, cache

    def captions(self, params, images, eos_id: int, beams: int = 1, length_penalty: float = 0.0) -> jax.Array:
        """Captions (B, max_len) of the normalised ``images`` by beam search
        (``beams=1``: greedy, each step's most likely token), never padding
        (0) before the end; a caption stops, then pads with 0, after
        ``eos_id``. KV-cached: one position per step (``decoding``)."""
        first, step, reorder, cache = self.decoding(params, images, beams)
        return generate.beam_search(first, step, reorder, cache, images.shape[0], beams, self.model.text.max_len,
                                    eos_id, length_penalty)[0]

    def caption_logprob(self, params, images, tokens) -> jax.Array:
        """(n_img, n_txt): log p(caption j | image i) of the normalised
        ``images`` and captions ``tokens``, summed over each caption's real
        tokens; one decoder pass per pair, image by image."""
        img_tokens = self.apply(params, images, method=lambda m, x: m.image(x)[1])
        txt_tokens = self.apply(params, tokens, method=lambda m, t: m.text(t)[1])

        def one_image(img):
            context = jnp.broadcast_to(img, (tokens.shape[0], *img.shape))
            logits = self.decoder.apply({"params": params["decoder"]}, txt_tokens, context)
            return -captioning.token_nll(logits, tokens)[0]

        return jax.lax.map(one_image, img_tokens)

    def embedder(self) -> "CaptionEmbedder":
        return CaptionEmbedder(self)

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


class CaptionEmbedder(PooledEmbedder, Captioner):
    """CLIP's pooled embeddings, plus the decoder's captions and caption
    likelihoods for the generative evaluators."""

    def __init__(self, objective: CoCa):
        super().__init__(objective.model)
        self.objective = objective

    def captions(self, params, images, eos_id, beams, length_penalty):
        return self.objective.captions(params, pipeline.normalize_images(images), eos_id, beams, length_penalty)

    def caption_logprob(self, params, images, tokens):
        return self.objective.caption_logprob(params, pipeline.normalize_images(images), tokens)

