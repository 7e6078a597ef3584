"""NegCLIP (Yuksekgonul et al. 2023): CLIP with a hard-negative caption per pair.

Each training caption comes with a negative that differs from it in one
word, swapped within a group of interchangeable words
(``config.data.negative_words``: colours, shapes, sizes, counts; the
attribute swaps of Doveh et al. 2023), drawn in the input pipeline from a
generator seeded by (seed, example position) (``pipeline.swap_word``). The
negatives are extra columns of the image→text softmax; the loss, its impls
and their costs: ``vlm_jax.losses.negclip_loss``. A caption without a word
of any group has no negative, and its pair is plain CLIP's.

On the embedded data the negatives teach attribute binding (which colour
goes with which shape), the compositional weakness the bag-of-words
behaviour of CLIP shows; docs/losses.md has the measurements.
"""

from __future__ import annotations

from typing import ClassVar

from vlm_jax import losses
from vlm_jax.data import pipeline, tokenizers
from vlm_jax.errors import ConfigError
from vlm_jax.models import towers
from vlm_jax.objectives.clip import CLIP


class NegCLIP(CLIP):
    example_fields: ClassVar[tuple[str, ...]] = ("negative_text",)
    pair_weights = False

    @classmethod
    def check(cls, config) -> None:
        try:
            pipeline.check_word_groups(config.data.negative_words)
        except ValueError as e:
            raise ConfigError(f"{e} (loss.kind='negclip' draws its negatives from them)") from None

    def encode(self, params, batch):
        out = super().encode(params, batch)
        out["zneg"] = self.apply(params, batch["negative_text"], method=towers.TwoTower.encode_text)
        return out

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        valid = (batch["negative_text"] != tokenizers.PAD_ID).any(axis=1)
        loss = losses.negclip_loss(outputs["zimg"], outputs["ztxt"], outputs["zneg"], valid, log_t, **self.loss_kw)
        return loss, {"log_temp": log_t, "negatives": valid.mean()}
