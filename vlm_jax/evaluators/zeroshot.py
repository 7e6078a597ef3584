"""Zero-shot classification: class names in prompt templates, scored by the model.

Every class name is put into every template; the objective's embedder scores
each image against each class from those prompts (pooled embeddings: CLIP's
prompt ensembling, the mean of the normalised prompt embeddings, re-normalised,
then cosine similarity). Works on any labelled dataset: class names from its
ClassLabel feature, from ``class_names``, or from ``class_names_file`` (one
per line); templates from ``templates``, a named set shipped as a data file
(``template_set``: "clip_imagenet_80", the CLIP paper's 80 ImageNet
templates, or "clip_imagenet_7", its 7-template subset), or
``templates_file``. Metrics: top-1, top-5 and mean per-class recall over the
examples of each split (those whose ``filter_key`` feature is true, if one is
named); the per-class top-1 accuracy goes to the results file. Ties count
against the true class.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Sequence

import jax
import numpy as np

from vlm_jax.data import tokenizers
from vlm_jax.errors import ConfigError, require
from vlm_jax.evaluators.base import Evaluator, Metrics

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
TEMPLATE_SETS = {  # name -> data file in vlm_jax/evaluators/templates/
    "clip_imagenet_80": "clip_imagenet_80.txt",
    "clip_imagenet_7": "clip_imagenet_7.txt",
}


def rank_of_label(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """How many other classes score at or above the true one (0 = top-1)."""
    true = scores[np.arange(len(labels)), labels]
    return (scores >= true[:, None]).sum(axis=1) - 1


def check_label_range(labels: np.ndarray, num_classes: int, field: str, split: str) -> None:
    """ConfigError naming ``field`` unless every label of ``split`` indexes a class name."""
    top = int(np.max(labels, initial=0))
    if top >= num_classes:
        raise ConfigError(f"config.{field}: split {split!r} has label {top} but only {num_classes} class names")


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest scores (ties count against it)."""
    rank = rank_of_label(scores, labels)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


def per_class_recall(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) fraction of each class's examples that are correct; NaN for a class with none."""
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                           ks: Sequence[int] = (1, 5)) -> tuple[Metrics, dict[str, float]]:
    """(top-k accuracies and mean per-class recall, per-class top-1 by name)."""
    out = topk_accuracy(scores, labels, [k for k in ks if k <= scores.shape[1]])
    recall = per_class_recall(rank_of_label(scores, labels) == 0, labels, len(class_names))
    out["mean_per_class_recall"] = float(np.nanmean(recall))
    return out, {name: float(r) for name, r in zip(class_names, recall) if not np.isnan(r)}


def read_lines(path: str, field: str) -> list[str]:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConfigError(f"config.{field}: cannot read {path!r} ({e.strerror})") from None
    require(bool(lines), field, f"{path!r} is empty")
    return lines


class ZeroShot(Evaluator):
    FIELDS: ClassVar[dict[str, Any]] = {
        "label_key": "",  # ClassLabel feature; "" = config.data.label_key
        "filter_key": "",  # bool feature selecting the examples to classify; "" = all
        "templates": ("a {}",),  # prompt templates, each with one '{}' for the class name
        "template_set": "",  # a key of TEMPLATE_SETS (replaces templates)
        "templates_file": "",  # a file of templates, one per line (replaces templates)
        "class_names": (),  # () = the names of the label feature
        "class_names_file": "",  # a file of class names, one per line, in label order
    }
    namespace = "zeroshot"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(not (entry.template_set and entry.templates_file), f"{field}.templates_file",
                "give template_set or templates_file, not both")
        require(not entry.template_set or entry.template_set in TEMPLATE_SETS, f"{field}.template_set",
                f"must be one of {sorted(TEMPLATE_SETS)}, got {entry.template_set!r}")
        require(not (entry.class_names and entry.class_names_file), f"{field}.class_names_file",
                "give class_names or class_names_file, not both")
        require(len(entry.templates) > 0, f"{field}.templates", "needs at least one template")
        cls._check_templates(entry.templates, f"{field}.templates")

    @staticmethod
    def _check_templates(templates: Sequence[str], field: str) -> None:
        for i, tmpl in enumerate(templates):
            require("{}" in tmpl, f"{field}[{i}]", f"{tmpl!r} has no '{{}}' for the class name")

    def templates(self) -> list[str]:
        e = self.entry
        if e.template_set:
            out = read_lines(os.path.join(TEMPLATE_DIR, TEMPLATE_SETS[e.template_set]), f"{self.field}.template_set")
        elif e.templates_file:
            out = read_lines(e.templates_file, f"{self.field}.templates_file")
        else:
            return list(e.templates)
        self._check_templates(out, f"{self.field}.templates_file")
        return out

    def setup(self) -> None:
        self.label_key = self.entry.label_key or self.ctx.config.data.label_key
        ds = self.ctx.dataset(self.data_cfg)
        if self.entry.class_names_file:
            names = read_lines(self.entry.class_names_file, f"{self.field}.class_names_file")
        else:
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
            check_label_range(self.data(split)[self.label_key], len(names), self.field, split)
        self.class_names = names
        self.template_list = self.templates()
        prompts = [t.format(name) for name in names for t in self.template_list]
        self.prompt_tokens = tokenizers.tokenize(self.ctx.tokenizer, prompts, self.ctx.text_len)

    def class_scores(self, params, split: str, keep: np.ndarray,
                     templates: Sequence[int] | None = None) -> np.ndarray:
        """(kept examples, classes) scores: the embedder's similarity to the
        prompts of every template, or of the ``templates`` (indices into the
        template list) only."""
        img = self.encode_images(params, split)
        prompts = self.ctx.encoded(("prompts", self.name), lambda: self.encoder.texts(params, self.prompt_tokens))
        used = list(range(len(self.template_list))) if templates is None else list(templates)
        if used != list(range(len(self.template_list))):
            rows = np.asarray([c * len(self.template_list) + t for c in range(len(self.class_names)) for t in used])
            prompts = jax.tree_util.tree_map(lambda x: x[rows], prompts)  # still class-major
        kept = jax.tree_util.tree_map(lambda x: x[keep], img)
        return self.ctx.embedder.class_scores(kept, prompts, len(self.class_names), len(used))

    def evaluate_split(self, params, split: str, templates: Sequence[int] | None = None) -> Metrics:
        """Metrics of ``split`` with every template pooled, or the
        ``templates`` (indices into the template list) only: choosing
        templates on a split that is not a test split
        (``experiments/template_selection.py``)."""
        data = self.data(split)
        keep = data[self.entry.filter_key].astype(bool) if self.entry.filter_key else np.ones(len(data["image"]), bool)
        if not keep.any():
            return {}
        scores = self.class_scores(params, split, keep, templates)
        metrics, per_class = classification_metrics(scores, data[self.label_key][keep].astype(np.int32),
                                                    self.class_names)
        self.details[split] = {"per_class_top1": per_class}
        return metrics
