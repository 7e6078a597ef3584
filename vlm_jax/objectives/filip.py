"""FILIP (Yao et al. 2022): InfoNCE on token-wise late-interaction similarities.

Encodes every image patch and every text token (L2-normalised, projected into
the shared space) and scores a pair by the mean over one side's tokens of the
best match on the other side; the loss, its impls and their costs:
``vlm_jax.losses.filip_loss``. Evaluation uses the same token-wise similarity
(``TokenEmbedder``), not pooled embeddings: image→text ranks by s^I, text→image
by s^T, and a zero-shot class scores the mean of s^I over its prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import losses
from vlm_jax.data import pipeline
from vlm_jax.evaluators.base import Embedder
from vlm_jax.models import towers
from vlm_jax.objectives.base import Contrastive


class FILIP(Contrastive):
    def encode(self, params, batch):
        txt_tokens, txt_mask = self.apply(params, batch["text"], method=towers.TwoTower.encode_text_tokens)
        img_tokens = self.apply(params, pipeline.normalize_images(batch["image"]),
                                method=towers.TwoTower.encode_image_tokens)
        return {"img_tokens": img_tokens, "txt_tokens": txt_tokens, "txt_mask": txt_mask}

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        loss = losses.filip_loss(outputs["img_tokens"], outputs["txt_tokens"], outputs["txt_mask"], log_t,
                                 **self.loss_kw)
        return loss, {"log_temp": log_t}

    def embedder(self) -> Embedder:
        return TokenEmbedder(self.model)


class TokenEmbedder(Embedder):
    """Per-token representations and FILIP's similarity, scored in blocks of
    ``rows`` images × ``cols`` texts (one compiled shape; the a·c·n_I·n_T
    token similarities of a block are the only large temporary)."""

    def __init__(self, model: towers.TwoTower, rows: int = 32, cols: int = 256):
        self.model, self.rows, self.cols = model, rows, cols
        self._sim = jax.jit(lambda a, c, m: losses.filip_sim(jnp.zeros((), jnp.float32), a, (c, m)))

    def images(self, params, images):
        return self.model.apply({"params": params}, pipeline.normalize_images(images),
                                method=towers.TwoTower.encode_image_tokens)

    def texts(self, params, tokens):
        return self.model.apply({"params": params}, tokens, method=towers.TwoTower.encode_text_tokens)

    def features(self, params, images):  # probes: the image tower's pooled output, before the projection
        return self.model.apply({"params": params}, pipeline.normalize_images(images),
                                method=towers.TwoTower.image_features)[0]

    def _both(self, img: np.ndarray, txt: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        tokens, mask = txt
        n_img, n_txt = len(img), len(tokens)
        pad = lambda x, k: np.concatenate([x, np.zeros((-len(x) % k, *x.shape[1:]), x.dtype)])  # noqa: E731
        img_p, tok_p, mask_p = pad(img, self.rows), pad(tokens, self.cols), pad(mask, self.cols)
        row = np.zeros((len(img_p), len(tok_p)), np.float32)
        col = np.zeros_like(row)
        for i in range(0, len(img_p), self.rows):
            for j in range(0, len(tok_p), self.cols):
                r, c = self._sim(img_p[i:i + self.rows], tok_p[j:j + self.cols], mask_p[j:j + self.cols])
                row[i:i + self.rows, j:j + self.cols] = np.asarray(r)
                col[i:i + self.rows, j:j + self.cols] = np.asarray(c)
        return row[:n_img, :n_txt], col[:n_img, :n_txt]

    def scores(self, img, txt):
        row, col = self._both(img, txt)
        return row, col.T

    def class_scores(self, img, prompts, num_classes, num_templates):
        row, _ = self._both(img, prompts)
        return row.reshape(len(img), num_classes, num_templates).mean(axis=2)
