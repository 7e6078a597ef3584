"""Evaluations of a caption decoder (models whose embedder is a ``Captioner``: CoCa).

``captioning``: each image's caption by beam search (``beams``, 1 = greedy;
``length_penalty``), compared with the example's first reference caption:
``exact`` (the same words) and, when every reference of the split reads in
the embedded dataset's grammar (``vlm_jax.data.scenes.caption_attributes``),
one accuracy per attribute — colour, shape, size, count, relation — over the
examples whose reference states it: the caption says exactly the reference's
values of that attribute, in order (the subject's, then the object's).
With ``group_key`` (a class-label feature: the embedded data's scene
``kind``) the metrics are also given per group, "<group>/<metric>".
Generated and reference texts go to the results file for the first examples.

``genzeroshot``: generative zero-shot classification (CapPa's scoring): an
image's score for a class is the mean over templates of log p(prompt |
image) under the decoder, summed over the prompt's tokens; the classes,
templates and metrics are zero-shot's (``vlm_jax.evaluators.zeroshot``).
Cost: one decoder pass per (image, prompt) pair.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from vlm_jax.data import scenes, tokenizers
from vlm_jax.errors import ConfigError, require
from vlm_jax.evaluators.base import Captioner, Evaluator, Metrics
from vlm_jax.evaluators.zeroshot import ZeroShot


def _require_captioner(evaluator: Evaluator) -> Captioner:
    embedder = evaluator.ctx.embedder
    if not isinstance(embedder, Captioner):
        raise ConfigError(f"config.{evaluator.field}: {evaluator.entry.kind!r} needs a model with a caption decoder "
                          f"(loss.kind='coca'), not loss.kind={evaluator.ctx.config.loss.kind!r}; turn the entry off "
                          f"with --config.{evaluator.field}.splits=()")
    return embedder


def attribute_accuracy(generated: list[str], references: list[str]) -> Metrics:
    """Per attribute, the share of examples whose reference states it where the
    generated caption states exactly the same values (``caption_attributes``)."""
    gen = [scenes.caption_attributes(t) for t in generated]
    ref = [scenes.caption_attributes(t) for t in references]
    out: Metrics = {}
    for name in scenes.ATTRIBUTES:
        pairs = [(g[name], r[name]) for g, r in zip(gen, ref) if r[name]]
        if pairs:
            out[name] = float(np.mean([g == r for g, r in pairs]))
    return out


def in_grammar(caption: str) -> bool:
    try:
        scenes.perturbations(caption)
    except ValueError:
        return False
    return True


class Captioning(Evaluator):
    FIELDS: ClassVar[dict[str, Any]] = {
        "beams": 1,  # 1 = greedy
        "length_penalty": 0.0,  # beams are ranked by score / length ** length_penalty
        "group_key": "",  # a ClassLabel feature: the metrics also per value, "<name>/<metric>" ("kind": scene kinds)
        "examples_kept": 16,  # caption pairs written to the results file per split
    }
    namespace = "captioning"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(entry.beams >= 1, f"{field}.beams", f"must be >= 1, got {entry.beams}")
        require(entry.length_penalty >= 0, f"{field}.length_penalty", "must be non-negative")

    def setup(self) -> None:
        captioner = _require_captioner(self)
        e, eos = self.entry, self.ctx.tokenizer.eos_id
        self._captions = self.encoder.compile(
            lambda p, x: captioner.captions(p, x, eos, int(e.beams), float(e.length_penalty)))
        self.groups = None
        if e.group_key:
            self.groups = self.ctx.dataset(self.data_cfg).class_names_of(e.group_key)
            if not self.groups:
                raise ConfigError(f"config.{self.field}.group_key: {e.group_key!r} is not a class-label feature of "
                                  f"dataset {self.data_cfg.dataset!r}")

    @staticmethod
    def scores(generated: list[str], references: list[str]) -> Metrics:
        out: Metrics = {"exact": float(np.mean([g == r for g, r in zip(generated, references)]))}
        if all(in_grammar(r) for r in references):
            out.update(attribute_accuracy(generated, references))
            out["in_grammar"] = float(np.mean([in_grammar(g) for g in generated]))
        return out

    def evaluate_split(self, params, split: str) -> Metrics:
        data = self.data(split)
        rows = self.encoder.run(self._captions, params, data["image"], dtype=np.int32)
        generated = [" ".join(tokenizers.detokenize(self.ctx.tokenizer, r).split()) for r in rows]
        references = [" ".join(str(c).split()) for c in data["caption"]]
        out = self.scores(generated, references)
        if self.groups:
            group = data[self.entry.group_key]
            for g, name in enumerate(self.groups):
                idx = np.flatnonzero(group == g)
                if idx.size:
                    part = self.scores([generated[i] for i in idx], [references[i] for i in idx])
                    out.update({f"{name}/{k}": v for k, v in part.items()})
        k = int(self.entry.examples_kept)
        self.details[split] = {"captions": [{"generated": g, "reference": r}
                                            for g, r in zip(generated[:k], references[:k])]}
        return out


class GenerativeZeroShot(ZeroShot):
    namespace = "genzeroshot"

    def setup(self) -> None:
        super().setup()
        captioner = _require_captioner(self)
        self._logprob = self.encoder.compile(captioner.caption_logprob)

    def class_scores(self, params, split: str, keep: np.ndarray,
                     templates: Sequence[int] | None = None) -> np.ndarray:
        logp = self.encoder.run(self._logprob, params, self.data(split)["image"][keep], self.prompt_tokens)
        per_template = logp.reshape(len(logp), len(self.class_names), len(self.template_list))
        return (per_template if templates is None else per_template[:, :, list(templates)]).mean(axis=2)
