"""Zero-shot classification: class names in prompt templates, scored by the model.

Every class name is put into every template; the objective's embedder scores
each image against each class from those prompts (pooled embeddings: CLIP's
prompt ensembling, the mean of the normalised prompt embeddings, re-normalised,
then cosine similarity). Metrics: top-1 and top-5 accuracy over the examples
of each split (those whose ``filter_key`` feature is true, if one is named).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax
import numpy as np

from vlm_jax.data import tokenizers
from vlm_jax.errors import ConfigError, require
from vlm_jax.evaluators.base import Evaluator, Metrics


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


class ZeroShot(Evaluator):
    FIELDS: ClassVar[dict[str, Any]] = {
        "label_key": "",  # ClassLabel feature; "" = config.data.label_key
        "filter_key": "",  # bool feature selecting the examples to classify; "" = all
        "templates": ("a {}",),  # prompt templates, each with one '{}' for the class name
        "class_names": (),  # () = the names of the label feature
    }
    namespace = "zeroshot"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(len(entry.templates) > 0, f"{field}.templates", "needs at least one template")
        for i, tmpl in enumerate(entry.templates):
            require("{}" in tmpl, f"{field}.templates[{i}]", f"{tmpl!r} has no '{{}}' for the class name")

    def setup(self) -> None:
        self.label_key = self.entry.label_key or self.ctx.config.data.label_key
        ds = self.ctx.dataset(self.data_cfg)
        names = list(self.entry.class_names) or ds.class_names_of(self.label_key)
        if not names:
            raise ConfigError(
                f"config.{self.field}.label_key: dataset {self.data_cfg.dataset!r} has no class-label feature "
                f"{self.label_key!r} (features: {sorted(ds.features)}); name one, give class_names, or turn the "
                f"entry off with --config.{self.field}.splits=()")
        for split in self.entry.splits:
            for key in filter(None, (self.label_key, self.entry.filter_key)):
                if key not in self.data(split):
                    raise ConfigError(f"config.{self.field}: split {split!r} has no feature {key!r}")
        self.class_names = names
        prompts = [t.format(name) for name in names for t in self.entry.templates]
        self.prompt_tokens = tokenizers.tokenize(self.ctx.tokenizer, prompts, self.ctx.text_len)

    def evaluate_split(self, params, split: str) -> Metrics:
        data = self.data(split)
        keep = data[self.entry.filter_key].astype(bool) if self.entry.filter_key else np.ones(len(data["image"]), bool)
        if not keep.any():
            return {}
        img = self.encode_images(params, split)
        prompts = self.ctx.encoded(("prompts", self.name), lambda: self.encoder.texts(params, self.prompt_tokens))
        embedder = self.ctx.embedder
        kept = jax.tree_util.tree_map(lambda x: x[keep], img)
        scores = embedder.class_scores(kept, prompts, len(self.class_names), len(self.entry.templates))
        return topk_accuracy(scores, data[self.label_key][keep].astype(np.int32), ks=(1, 5))
