"""CLIPPO (Tschannen et al. 2023): one tower for images and for text rendered as images.

The image tower and its projection encode both sides: a caption is rendered
onto a white page of the image's size (``vlm_jax.models.render``: its byte
tokens as glyphs of the font Pillow ships, on the device) and goes through
the same tower as the photo. The text tower and text projection of the
two-tower model are not created (``unused_model_parts``), so the parameters
are the image tower's, its projection and the loss's scalars: a one-tower model.

``OneTower`` is the framework, combined with a contrastive loss by
inheritance: ``CLIPPO`` trains with CLIP's softmax InfoNCE (the paper's
loss), ``SigCLIPPO`` with SigLIP's sigmoid loss; each takes any ``loss.impl``.

Needs ``data.tokenizer = "bytes"`` (the renderer draws bytes) and
``model.text.max_len`` within the page (``loss.render_cell`` = (h, w) pixels
per character, ``loss.render_font_size``), and ``loss.render_size`` equal to
``data.image_size`` (the tower's input size; ``configs/default.py:clippo``
makes it a reference to that field). Zero-shot prompts and retrieval
captions are rendered the same way (``RenderedEmbedder``).

Memory and FLOPs: the image tower runs on 2B images per step instead of B
images and B captions; the pages are made on the device from the tokens (a
gather from a VOCAB × h × w atlas), so the input pipeline moves tokens, not pages.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vlm_jax.data import pipeline
from vlm_jax.errors import require
from vlm_jax.models import render, towers
from vlm_jax.objectives.base import Contrastive, PooledEmbedder
from vlm_jax.objectives.clip import CLIP
from vlm_jax.objectives.siglip import SigLIP


class OneTower(Contrastive):
    """The one-tower framework; a subclass adds the loss (``combine``)."""

    CONFIG: ClassVar[dict[str, Any]] = {"render_cell": (10, 8), "render_font_size": 9, "render_size": 0}
    unused_model_parts: ClassVar[tuple[str, ...]] = ("text", "txt_proj")

    @classmethod
    def check(cls, config) -> None:
        c = config.loss
        require(config.data.tokenizer == "bytes", "data.tokenizer",
                f"CLIPPO renders byte tokens: set it to 'bytes', not {config.data.tokenizer!r}")
        require(len(c.render_cell) == 2 and min(c.render_cell) > 0, "loss.render_cell",
                f"must be (height, width) in pixels, got {tuple(c.render_cell)}")
        require(c.render_font_size > 0, "loss.render_font_size", "must be positive")
        require(c.render_size == config.data.image_size, "loss.render_size",
                f"the pages go through the image tower: must equal data.image_size={config.data.image_size}, "
                f"got {c.render_size}")
        fits = render.capacity(config.data.image_size, tuple(c.render_cell))
        require(config.model.text.max_len <= fits, "model.text.max_len",
                f"{config.model.text.max_len} characters do not fit a {config.data.image_size} px page of "
                f"{tuple(c.render_cell)} cells ({fits}); lower it or loss.render_cell")

    def encode(self, params, batch):
        return {"zimg": self.apply(params, pipeline.normalize_images(batch["image"]),
                                   method=towers.TwoTower.encode_image),
                "ztxt": self.embedder().texts(params, batch["text"])}

    def embedder(self) -> PooledEmbedder:
        return RenderedEmbedder(self.model, int(self.loss.render_size), tuple(self.loss.render_cell),
                                int(self.loss.render_font_size))


class CLIPPO(OneTower, CLIP):
    """One tower, CLIP's softmax InfoNCE."""


class SigCLIPPO(OneTower, SigLIP):
    """One tower, SigLIP's sigmoid loss (its bias and ``bias_init``)."""

    CONFIG: ClassVar[dict[str, Any]] = {**OneTower.CONFIG, **SigLIP.CONFIG}


class RenderedEmbedder(PooledEmbedder):
    """Pooled embeddings; texts are rendered and encoded by the image tower."""

    def __init__(self, model: towers.TwoTower, size: int, cell: tuple[int, int], font_size: int):
        super().__init__(model)
        self.size, self.cell, self.font_size = size, cell, font_size

    text_prompt_width = None  # a rendered text has no token embeddings to replace

    def texts(self, params, tokens):
        pages = render.render(tokens, self.size, self.cell, self.font_size)
        return self.images(params, pages)
