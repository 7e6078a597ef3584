"""UniCL (Yang et al. 2022): image–text–label contrast; pairs sharing a class are positives.

Reads the class label of every example (``config.data.label_key``); the loss,
its impls and their costs: ``vlm_jax.losses.unicl_loss``.
"""

from __future__ import annotations

from typing import ClassVar

from vlm_jax import losses
from vlm_jax.errors import require
from vlm_jax.objectives.base import Contrastive


class UniCL(Contrastive):
    example_fields: ClassVar[tuple[str, ...]] = ("label",)

    @classmethod
    def check(cls, config) -> None:
        require(bool(config.data.label_key), "data.label_key", "loss.kind='unicl' needs a class-label feature")

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        loss = losses.unicl_loss(outputs["zimg"], outputs["ztxt"], batch["label"], log_t, **self.loss_kw)
        return loss, {"log_temp": log_t}
