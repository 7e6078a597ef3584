"""Zero-shot dense prediction from patch–text similarity: semantic
segmentation and box classification (detection given the boxes).

Both read a dataset with grounding features (``objects`` with boxes and
labels, an instance ``mask``: the embedded data from vlm_shapes 2.0.0), and a
model whose embedder is a ``DenseEmbedder`` (pooled two-towers: the image
tower's patch tokens projected into the text space; the ResNet's tokens are
its attention pool's value projection, MaskCLIP's reading). Class embeddings
come from prompts as in zero-shot classification (templates, ensembling).

``segmentation``: each patch of the g × g grid is labelled with the class
whose embedding is nearest (cosine), or background when the embedding of
``background_prompt`` is nearer. The ground truth of a patch is the most
frequent class among its pixels in the evaluation crop (background counted
as a class; a tie goes to the lower class index, background last). Metrics
over a split's patches: ``miou`` — the mean over classes with a non-empty
union (ground truth or prediction) of TP / (TP + FP + FN), background
included — ``acc`` (patch accuracy) and ``background_iou``; per-class IoU
goes to the results file.

``detection``: every ground-truth box (at least partly in the crop) pools the
patch tokens it covers (area weights: ``vlm_jax.models.regions``, as the
region–word objective does) and is classified among the classes, without
background. Metrics: ``top1`` over boxes, and ``map``: the mean over classes
with at least one box of the average precision of ranking all boxes by that
class's score (the mean, over the class's boxes, of the precision at each
one's rank; ties ranked in dataset order).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from vlm_jax.data import pipeline, tokenizers
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators.base import DenseEmbedder, Metrics, _as_config_error
from vlm_jax.evaluators.zeroshot import ZeroShot, read_lines
from vlm_jax.models import regions as regions_lib


def patch_labels(classes: np.ndarray, grid: int, num_classes: int) -> np.ndarray:
    """(n, S, S) class maps (BACKGROUND = -1) -> (n, grid²) patch labels in
    0..num_classes, background = num_classes: each patch's most frequent one."""
    n, size = classes.shape[0], classes.shape[1]
    if size % grid:
        raise ValueError(f"image size {size} is not a multiple of the {grid} × {grid} token grid")
    p = size // grid
    labels = np.where(classes == pipeline.BACKGROUND, num_classes, classes)
    cells = labels.reshape(n, grid, p, grid, p).transpose(0, 1, 3, 2, 4).reshape(n * grid * grid, p * p)
    k = num_classes + 1
    ids = np.arange(len(cells))[:, None] * k + cells
    counts = np.bincount(ids.ravel(), minlength=len(cells) * k).reshape(len(cells), k)
    return counts.argmax(axis=1).reshape(n, grid * grid)


def iou_metrics(pred: np.ndarray, truth: np.ndarray, num_labels: int) -> tuple[np.ndarray, Metrics]:
    """(per-label IoU, NaN where the union is empty; {miou, acc})."""
    conf = np.bincount(truth.ravel() * num_labels + pred.ravel(), minlength=num_labels ** 2).reshape(
        num_labels, num_labels).astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return iou, {"miou": float(np.nanmean(iou)), "acc": float(tp.sum() / max(conf.sum(), 1))}


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mean over the positives of the precision at each one's rank (scores descending, stable)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(hits.sum(), 1))


class _DenseZeroShot(ZeroShot):
    """Prompts from the objects' class names; patch tokens from the embedder."""

    FIELDS: ClassVar[dict[str, Any]] = {
        key: ZeroShot.FIELDS[key] for key in ("templates", "template_set", "templates_file", "class_names",
                                              "class_names_file")}

    def setup(self) -> None:
        if not isinstance(self.ctx.embedder, DenseEmbedder):
            raise ConfigError(f"config.{self.field}.kind: {self.entry.kind!r} needs patch tokens in the text "
                              f"space, which this objective's embedder ({type(self.ctx.embedder).__name__}) does "
                              f"not give; turn the entry off with --config.{self.field}.splits=()")
        ds = self.ctx.dataset(self.data_cfg)
        with _as_config_error():
            pipeline.check_grounding(ds, self.data_cfg)
        if self.entry.class_names_file:
            names = read_lines(self.entry.class_names_file, f"{self.field}.class_names_file")
        else:
            names = list(self.entry.class_names) or list(ds.features["objects"]["label"].names)
        self.class_names = names
        self.template_list = self.templates()
        prompts = [t.format(name) for name in names for t in self.template_list]
        self.prompt_tokens = tokenizers.tokenize(self.ctx.tokenizer, prompts, self.ctx.text_len)
        self._patches = self.encoder.compile(self.ctx.embedder.patches)
        self.truth = {}
        for split in self.entry.splits:
            with _as_config_error():
                self.truth[split] = pipeline.load_dense(ds, self.data_cfg, split, self.entry.max_examples,
                                                        field=f"config.{self.field}.splits")
            top = int(self.truth[split]["box_labels"].max(initial=0))
            if top >= len(names):
                raise ConfigError(f"config.{self.field}: split {split!r} has object label {top} but only "
                                  f"{len(names)} class names")

    def patch_tokens(self, params, split: str) -> np.ndarray:
        key = ("patches", self.data_cfg.dataset, self.data_cfg.dataset_config, self.data_cfg.data_dir, split,
               self.entry.max_examples, self.encoder.batch)
        return self.ctx.encoded(key, lambda: self.encoder.run(self._patches, params, self.data(split)["image"]))

    def scores(self, params, features: np.ndarray) -> np.ndarray:
        """(m, classes) cosine scores of m feature vectors against the class prompts."""
        prompts = self.ctx.encoded(("prompts", self.name), lambda: self.encoder.texts(params, self.prompt_tokens))
        return self.ctx.embedder.class_scores(_unit(features), prompts, len(self.class_names), len(self.template_list))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Segmentation(_DenseZeroShot):
    FIELDS: ClassVar[dict[str, Any]] = {**_DenseZeroShot.FIELDS, "background_prompt": "background"}
    namespace = "segmentation"

    def setup(self) -> None:
        super().setup()
        if not self.entry.background_prompt:
            raise ConfigError(f"config.{self.field}.background_prompt: must be a non-empty text")
        self.background_tokens = tokenizers.tokenize(self.ctx.tokenizer, [self.entry.background_prompt],
                                                     self.ctx.text_len)

    def evaluate_split(self, params, split: str) -> Metrics:
        tokens = self.patch_tokens(params, split)
        n, cells, d = tokens.shape
        grid = regions_lib.grid_side(cells, "config.model.image")
        flat = tokens.reshape(n * cells, d)
        background = self.ctx.encoded(("background", self.name),
                                      lambda: self.encoder.texts(params, self.background_tokens))
        c = len(self.class_names)
        scores = np.concatenate([self.scores(params, flat),
                                 self.ctx.embedder.class_scores(_unit(flat), background, 1, 1)], axis=1)
        truth = patch_labels(self.truth[split]["classes"], grid, c).ravel()
        iou, metrics = iou_metrics(scores.argmax(axis=1), truth, c + 1)
        metrics["background_iou"] = float(iou[c])
        names = self.class_names + ["background"]
        self.details[split] = {"per_class_iou": {names[k]: float(v) for k, v in enumerate(iou) if not np.isnan(v)}}
        return metrics


class Detection(_DenseZeroShot):
    namespace = "detection"

    def evaluate_split(self, params, split: str) -> Metrics:
        tokens = self.patch_tokens(params, split)
        truth = self.truth[split]
        grid = regions_lib.grid_side(tokens.shape[1], "config.model.image")
        weights = np.asarray(regions_lib.box_weights(truth["boxes"], grid))
        pooled = np.asarray(regions_lib.pool(tokens, weights))
        present = truth["box_labels"] >= 0
        if not present.any():
            return {}
        labels = truth["box_labels"][present]
        scores = self.scores(params, pooled[present])
        aps = [average_precision(scores[:, k], labels == k) for k in range(len(self.class_names)) if (labels == k).any()]
        return {"top1": float(np.mean(scores.argmax(axis=1) == labels)), "map": float(np.mean(aps))}
