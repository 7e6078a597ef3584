"""Training objectives: one module each, one line each in ``OBJECTIVES``.

``config.loss.kind`` names the entry; ``make(config, model, mesh)`` builds
the frozen objective object that the pipeline, the model's initialisation,
the config checks, the train step and the evaluators ask (see ``base``).
To add one: write ``vlm_jax/objectives/<name>.py`` with a subclass of
``Objective`` (or ``Contrastive``), add its line below, and test it.
"""

from __future__ import annotations

import ml_collections

from vlm_jax.objectives.albef import ALBEF
from vlm_jax.objectives.base import Contrastive, Objective, PooledEmbedder
from vlm_jax.objectives.clip import CLIP
from vlm_jax.objectives.clippo import CLIPPO, SigCLIPPO
from vlm_jax.objectives.coca import CoCa
from vlm_jax.objectives.distill import Distill
from vlm_jax.objectives.filip import FILIP
from vlm_jax.objectives.mae import MAE
from vlm_jax.objectives.negclip import NegCLIP
from vlm_jax.objectives.region import RegionWord
from vlm_jax.objectives.siglip import SigLIP
from vlm_jax.objectives.slip import SLIP
from vlm_jax.objectives.unicl import UniCL

OBJECTIVES: dict[str, type[Objective]] = {
    "softmax": CLIP,
    "sigmoid": SigLIP,
    "unicl": UniCL,
    "negclip": NegCLIP,
    "slip": SLIP,
    "filip": FILIP,
    "coca": CoCa,
    "albef": ALBEF,
    "mae": MAE,
    "region": RegionWord,
    "clippo": CLIPPO,
    "clippo_sigmoid": SigCLIPPO,
    "distill": Distill,
}


def make(config, model, mesh) -> Objective:
    """The objective named by ``config.loss.kind`` (checked by ``config.check_config``)."""
    return OBJECTIVES[config.loss.kind](ml_collections.FrozenConfigDict(config.loss), model, mesh)


__all__ = ["OBJECTIVES", "Objective", "Contrastive", "PooledEmbedder", "make"]
