"""Image–text retrieval: Recall@K in both directions over a split.

Every image of the split is a query against every caption (image→text) and
every caption against every image (text→image), scored by the objective's
embedder. Captions that are the same string are indistinguishable to any
model, so every copy of the ground-truth caption (and every image carrying
it) counts as a hit. Metrics: i2t_r1/5/10 and t2i_r1/5/10.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlm_jax.evaluators.base import Evaluator, Metrics


def recall_at_k(sim: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """sim: (Q, N) scores; positives: (Q, N) bool. Recall@K = fraction of
    queries with at least one positive among their K best-scored items."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(positives, order, axis=1)
    first = np.where(hits.any(axis=1), np.argmax(hits, axis=1), sim.shape[1])
    return {k: float(np.mean(first < k)) for k in ks}


def retrieval_metrics(i2t: np.ndarray, t2i: np.ndarray, positives: np.ndarray) -> Metrics:
    """positives[i, j]: caption j belongs to image i."""
    out = {f"i2t_r{k}": v for k, v in recall_at_k(i2t, positives).items()}
    out.update({f"t2i_r{k}": v for k, v in recall_at_k(t2i, positives.T).items()})
    return out


class Retrieval(Evaluator):
    namespace = "retrieval"

    def evaluate_split(self, params, split: str) -> Metrics:
        data = self.data(split)
        img = self.encode_images(params, split)
        txt = self.encoder.texts(params, data["text"])
        captions = np.asarray(data["caption"])
        i2t, t2i = self.ctx.embedder.scores(img, txt)
        return retrieval_metrics(i2t, t2i, captions[:, None] == captions[None, :])
