"""Image–text retrieval: Recall@K in both directions over a split, with every
caption of every image.

Image→text: each image is a query against all captions of the split, and a
hit at K is any of its own captions among the K best. Text→image: each
caption is a query against all images, and a hit is its image. Captions that
are the same string are indistinguishable to any model, so a caption equal
to one of an image's captions counts as that image's too. Ties are broken
against the query: a positive scored exactly like a negative ranks below it,
so a model that scores everything alike gets no credit. With one caption per
image (the embedded data) this is the usual one-to-one retrieval; with five
(COCO, Flickr30k) it is their standard protocol. Metrics: i2t_r1/5/10 and
t2i_r1/5/10.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlm_jax.evaluators.base import Evaluator, Metrics


def recall_at_k(sim: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """sim: (Q, N) scores; positives: (Q, N) bool. Recall@K: the fraction of
    queries whose best-scored positive has fewer than K negatives scored at
    or above it."""
    best = np.where(positives, sim, -np.inf).max(axis=1)
    above = (np.where(positives, -np.inf, sim) >= best[:, None]).sum(axis=1)
    found = positives.any(axis=1)
    return {k: float(np.mean(found & (above < k))) for k in ks}


def caption_positives(caption_image: np.ndarray, captions: np.ndarray, num_images: int) -> np.ndarray:
    """(num_images, num_captions) bool: caption j is image i's, or the same
    string as one of image i's captions."""
    _, ids = np.unique(captions, return_inverse=True)
    owns = np.zeros((num_images, ids.max(initial=-1) + 1), bool)
    owns[caption_image, ids] = True
    return owns[:, ids]


def retrieval_metrics(i2t: np.ndarray, t2i: np.ndarray, positives: np.ndarray) -> Metrics:
    """i2t: (images, captions) scores, t2i: (captions, images); positives[i, j]: caption j belongs to image i."""
    out = {f"i2t_r{k}": v for k, v in recall_at_k(i2t, positives).items()}
    out.update({f"t2i_r{k}": v for k, v in recall_at_k(t2i, positives.T).items()})
    return out


class Retrieval(Evaluator):
    namespace = "retrieval"

    def evaluate_split(self, params, split: str) -> Metrics:
        data = self.data(split)
        img = self.encode_images(params, split)
        txt = self.encoder.texts(params, data["text_all"])
        i2t, t2i = self.ctx.embedder.scores(img, txt)
        return retrieval_metrics(i2t, t2i, caption_positives(data["caption_image"], data["captions_all"], len(i2t)))
