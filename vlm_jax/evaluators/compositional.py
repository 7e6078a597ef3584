"""Compositional probes on the embedded dataset (a Winoground / ARO-style test).

For every example of a split, the true caption is scored against false ones
that differ in one way each (``scenes.perturbations``: relation flipped,
subject and object swapped, colours of the two objects exchanged, colour,
shape or count replaced), with the objective's own similarity. Accuracy per
type: the fraction of examples whose true caption scores higher, a tie
counting one half, so a model that cannot tell the two apart scores 0.5: a
model that ignores word order is at chance on ``swap`` and ``binding`` by
construction. Metrics: ``<type>`` accuracy and ``mean`` over the types.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import numpy as np

from vlm_jax.data import scenes, tokenizers
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators.base import Evaluator, Metrics


def pairwise_accuracy(true_scores: np.ndarray, false_scores: np.ndarray) -> float:
    """Mean of 1 (true scores higher), 1/2 (tie), 0 (false scores higher)."""
    return float(np.mean((true_scores > false_scores) + 0.5 * (true_scores == false_scores)))


class Compositional(Evaluator):
    FIELDS: ClassVar[dict[str, Any]] = {}
    namespace = "compositional"

    def setup(self) -> None:
        self.probes: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for split in self.entry.splits:
            by_type: dict[str, tuple[list[int], list[str]]] = {t: ([], []) for t in scenes.PERTURBATIONS}
            for i, caption in enumerate(self.data(split)["caption"]):
                try:
                    false = scenes.perturbations(str(caption))
                except ValueError as e:
                    raise ConfigError(f"config.{self.field}: split {split!r} of {self.data_cfg.dataset!r}: {e}; "
                                      f"compositional probes need the embedded dataset") from None
                for kind, text in false.items():
                    by_type[kind][0].append(i)
                    by_type[kind][1].append(text)
            self.probes[split] = {
                kind: (np.asarray(rows, np.int32), tokenizers.tokenize(self.ctx.tokenizer, texts, self.ctx.text_len))
                for kind, (rows, texts) in by_type.items() if rows}

    def evaluate_split(self, params, split: str) -> Metrics:
        data = self.data(split)
        img = self.encode_images(params, split)
        embedder = self.ctx.embedder
        txt = self.encoder.texts(params, data["text"])
        take = lambda tree, rows: jax.tree_util.tree_map(lambda x: x[rows], tree)  # noqa: E731
        out = {}
        for kind, (rows, tokens) in self.probes[split].items():
            false_txt = self.encoder.texts(params, tokens)
            true_scores = embedder.pair_scores(take(img, rows), take(txt, rows))
            false_scores = embedder.pair_scores(take(img, rows), false_txt)
            out[kind] = pairwise_accuracy(true_scores, false_scores)
        if out:
            out["mean"] = float(np.mean(list(out.values())))
        return out
