"""Knowledge distillation of a trained two-tower into a student (smaller widths or depths).

    L = contrastive_weight · L_CLIP(student)
        + embed_weight · L_embed + similarity_weight · L_sim

  * L_embed = (1/B) Σ_i [(1 − z^I_i·ẑ^I_i) + (1 − z^T_i·ẑ^T_i)]: the student's
    embeddings z against the teacher's ẑ (cosine; both L2-normalised, so the
    student's ``model.embed_dim`` must be the teacher's);
  * L_sim = ½ [(1/B) Σ_i KL(p̂_i ‖ p_i) + (1/B) Σ_j KL(q̂_j ‖ q_j)]: the
    teacher's image→text distributions over the whole global batch,
    p̂_i = softmax_j(t̂·ẑ^I_i·ẑ^T_j) at its own temperature, against the
    student's p_i = softmax_j(t·z^I_i·z^T_j), and likewise text→image (q).

The teacher is a finished run (``loss.teacher_workdir``): its model config
comes from the workdir's ``config.json``, its parameters sit beside the
student's under ``teacher/``, loaded by ``model_init`` and frozen by
``train.freeze`` (no gradient, no optimizer state) — ``configs/distill.py``
sets all of it. The evaluators score the student.

Memory beyond CLIP: the teacher's forward pass (no activations kept for a
backward) and, for L_sim, the B × B logits of both models on the global
batch (the gathered form, as ``all_gather``: negatives from every device,
O(b·B) per device; no memory-linear form is built). Communication: an
all-gather of both models' embeddings.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import models
from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError, require
from vlm_jax.models import towers
from vlm_jax.objectives.base import Contrastive

PREFIX = "teacher"


def teacher_config(workdir: str) -> dict:
    """The teacher run's config.json as a dict; ConfigError naming the field if absent."""
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.loss.teacher_workdir: cannot read the teacher's {path} ({e})") from None


def _tuples(d):
    return {k: _tuples(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def kl_rows(teacher_logits: jax.Array, student_logits: jax.Array, axis: int) -> jax.Array:
    """Mean over rows (axis=1) or columns (axis=0) of KL(softmax teacher ‖ softmax student)."""
    log_p = jax.nn.log_softmax(teacher_logits, axis=axis)
    log_q = jax.nn.log_softmax(student_logits, axis=axis)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis))


class Distill(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {"teacher_workdir": "", "embed_weight": 1.0, "similarity_weight": 1.0}

    @classmethod
    def check(cls, config) -> None:
        c = config.loss
        require(bool(c.teacher_workdir), "loss.teacher_workdir", "names the teacher's workdir (configs/distill.py)")
        for name in ("contrastive_weight", "embed_weight", "similarity_weight"):
            require(c[name] >= 0, f"loss.{name}", f"must be non-negative, got {c[name]}")
        require(c.contrastive_weight + c.embed_weight + c.similarity_weight > 0, "loss.similarity_weight",
                "contrastive_weight, embed_weight and similarity_weight are all 0: nothing to train")
        require(os.path.abspath(config.model_init.workdir) == os.path.abspath(c.teacher_workdir),
                "model_init.workdir", "must be loss.teacher_workdir: it loads the teacher's parameters "
                "(configs/distill.py sets it)")
        require(any(rule.startswith(f"^{PREFIX}/") for rule in config.train.freeze), "train.freeze",
                f"must freeze the teacher ('^{PREFIX}/'), or it would train (configs/distill.py sets it)")
        source = teacher_config(c.teacher_workdir)
        require(source["model"]["embed_dim"] == config.model.embed_dim, "model.embed_dim",
                f"must be the teacher's ({source['model']['embed_dim']}): the embeddings are compared")
        require(source["data"]["image_size"] == config.data.image_size, "data.image_size",
                f"must be the teacher's ({source['data']['image_size']}): both see the same images")

    @functools.cached_property
    def teacher_source(self) -> dict:
        """The teacher run's recorded config, read once per objective."""
        return teacher_config(self.loss.teacher_workdir)

    @functools.cached_property
    def teacher(self) -> towers.TwoTower:
        return models.make_model(ml_collections.ConfigDict(_tuples(self.teacher_source["model"])),
                                 self.model.text.vocab_size)

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        source = self.teacher_source
        s, length = source["data"]["image_size"], source["model"]["text"]["max_len"]
        params = self.teacher.init(rng, jnp.zeros((1, s, s, 3)), jnp.zeros((1, length), jnp.int32))["params"]
        return {**super().init_parts(rng), PREFIX: {**params, "log_t": jnp.asarray(math.log(10.0), jnp.float32)}}

    def encode(self, params, batch):
        out = super().encode(params, batch)
        teacher, p = self.teacher, jax.lax.stop_gradient(params[PREFIX])
        images = pipeline.normalize_images(batch["image"])
        out["teacher_zimg"] = teacher.apply({"params": p}, images, method=towers.TwoTower.encode_image)
        out["teacher_ztxt"] = teacher.apply({"params": p}, batch["text"], method=towers.TwoTower.encode_text)
        out["teacher_log_t"] = jnp.broadcast_to(p["log_t"], (len(images),))  # per example: accumulation concatenates
        return out

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        loss, metrics = self.weighted_clip(outputs, log_t)
        metrics["log_temp"] = log_t
        zi, zt, ti, tt = outputs["zimg"], outputs["ztxt"], outputs["teacher_zimg"], outputs["teacher_ztxt"]
        if self.loss.embed_weight:
            embed = jnp.mean(2.0 - jnp.sum(zi * ti, axis=1) - jnp.sum(zt * tt, axis=1))
            loss, metrics["embed_loss"] = loss + self.loss.embed_weight * embed, embed
        if self.loss.similarity_weight:
            teacher_logits = jnp.exp(outputs["teacher_log_t"][0]) * (ti @ tt.T)
            student_logits = jnp.exp(log_t) * (zi @ zt.T)
            sim = 0.5 * (kl_rows(teacher_logits, student_logits, 1) + kl_rows(teacher_logits, student_logits, 0))
            loss, metrics["similarity_loss"] = loss + self.loss.similarity_weight * sim, sim
        return loss, metrics
