"""The ``Objective`` base class: what a training objective declares and gives.

An objective is one frozen object built from the config, the model and the
mesh. It declares
  * ``CONFIG``: the fields it adds to ``config.loss``, with their defaults;
  * ``example_fields``: dataset features it needs besides the image and the
    caption ("label" = ``config.data.label_key``; "regions" = boxes and phrases,
    ``pipeline.regions``);
  * ``augment``: an optional per-example function ``(example, rng) -> example``
    adding derived fields (augmented views, masks); the pipeline seeds ``rng``
    from (seed, example position), so resume and device count never change it;
  * ``init_parts``: the parameters it adds next to the towers (heads, scalars
    such as a bias), as a dict of top-level subtrees;
  * ``scalar_names``: the parameters ``combine`` uses directly (temperature,
    bias): their gradient is taken once, from the full-batch loss;
  * ``unused_model_parts``: top-level subtrees of the two-tower model it
    never uses, not created (a one-tower objective drops the text tower);
  * ``pair_weights``: whether ``combine`` weights each pair's loss by the
    batch's "weight" field (a curated index's weights, given with
    ``config.data.index_weights``);
and gives
  * ``encode(params, batch) -> outputs``: per-example outputs (embeddings,
    tokens, views), with a leading batch axis;
  * ``combine(outputs, scalars, batch) -> (loss, metrics)``: the loss over
    the whole global batch. The split is what exact gradient accumulation
    needs (``vlm_jax.step.make_grad_fn``);
  * ``embedder()``: how the trained model is scored by the evaluators (pooled
    embeddings by default; FILIP overrides it with its token-wise similarity).

Nothing outside an objective's own module tests ``config.loss.kind``: the
pipeline, model construction, config checks and the train step ask the object.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax import losses, parallel
from vlm_jax.data import pipeline
from vlm_jax.evaluators.base import DenseEmbedder, Embedder, TransferEmbedder
from vlm_jax.models import towers

Batch = dict[str, jax.Array]
Outputs = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Objective(abc.ABC):
    """Base class; see the module docstring for the contract."""

    loss: ml_collections.FrozenConfigDict  # config.loss
    model: towers.TwoTower
    mesh: Mesh | None

    CONFIG: ClassVar[dict[str, Any]] = {}
    example_fields: ClassVar[tuple[str, ...]] = ()
    augment: ClassVar[Callable[[dict, np.random.Generator], dict] | None] = None
    scalar_names: ClassVar[tuple[str, ...]] = ()
    unused_model_parts: ClassVar[tuple[str, ...]] = ()
    pair_weights: ClassVar[bool] = False

    @classmethod
    def check(cls, config) -> None:
        """Config-time checks of the objective's own fields (raise ConfigError)."""

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        return {}

    def scalars(self, params) -> dict[str, jax.Array]:
        return {name: params[name] for name in self.scalar_names}

    @abc.abstractmethod
    def encode(self, params, batch: Batch) -> Outputs:
        """Per-example outputs of the batch (leading batch axis)."""

    @abc.abstractmethod
    def combine(self, outputs: Outputs, scalars: dict[str, jax.Array], batch: Batch) -> tuple[jax.Array, dict]:
        """(loss over the whole global batch, metrics) from ``encode``'s outputs."""

    def embedder(self) -> Embedder:
        return PooledEmbedder(self.model)

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def loss_kw(self) -> dict:
        """impl, mesh, axis and tile for the functions of ``vlm_jax.losses``."""
        return dict(impl=self.loss.impl, mesh=self.mesh, axis=parallel.DATA_AXES, tile=self.loss.tile or None)

    def apply(self, params, *args, method: Callable):
        return self.model.apply({"params": params}, *args, method=method)


class Contrastive(Objective):
    """Image–text objectives on pooled, L2-normalised embeddings with a
    learnable temperature ``log_t`` (initialised from ``config.loss.log_t_init``)."""

    scalar_names: ClassVar[tuple[str, ...]] = ("log_t",)

    def init_parts(self, rng: jax.Array) -> dict[str, Any]:
        return {"log_t": jnp.asarray(self.loss.log_t_init, jnp.float32)}

    def encode(self, params, batch: Batch) -> Outputs:
        images = pipeline.normalize_images(batch["image"])
        return {"zimg": self.apply(params, images, method=towers.TwoTower.encode_image),
                "ztxt": self.apply(params, batch["text"], method=towers.TwoTower.encode_text)}

    def weighted_clip(self, outputs: Outputs, log_t: jax.Array) -> tuple[jax.Array, dict]:
        """(``loss.contrastive_weight`` · L_CLIP, {"clip_loss": L_CLIP}) for
        objectives that add terms to CLIP's; (0, {}) at weight 0, not computed."""
        if not self.loss.contrastive_weight:
            return jnp.float32(0.0), {}
        clip = losses.softmax_loss(outputs["zimg"], outputs["ztxt"], log_t, **self.loss_kw)
        return self.loss.contrastive_weight * clip, {"clip_loss": clip}


def features_and_tokens(module: towers.TwoTower, images, tokens):
    """(z^I, z^T, image tokens, text tokens): both towers' embeddings and
    per-token features in one pass (``method=`` of ``TwoTower.apply``)."""
    pooled_img, img_tokens = module.image(images)
    pooled_txt, txt_tokens = module.text(tokens)
    zimg = towers.l2_normalize(module.img_proj(pooled_img))
    ztxt = towers.l2_normalize(module.txt_proj(pooled_txt))
    return zimg, ztxt, img_tokens, txt_tokens


class PooledEmbedder(Embedder, DenseEmbedder, TransferEmbedder):
    """One L2-normalised embedding per image and per text; cosine similarity.
    Dense evaluations score the image tower's projected patch tokens.

    Zero-shot: a class's prompt embeddings are averaged over the templates and
    re-normalised (CLIP's prompt ensembling), then compared by cosine.
    Transfer: the text tower takes learned context vectors in place of token
    embeddings; a ViT image tower takes visual prompt tokens."""

    def __init__(self, model: towers.TwoTower):
        self.model = model

    @property
    def text_prompt_width(self) -> int | None:
        return self.model.text.width

    @property
    def image_prompt_width(self) -> int | None:
        return self.model.image.width if isinstance(self.model.image, towers.ViT) else None

    def images(self, params, images):
        return self.model.apply({"params": params}, pipeline.normalize_images(images), method=towers.TwoTower.encode_image)

    def texts(self, params, tokens):
        return self.model.apply({"params": params}, tokens, method=towers.TwoTower.encode_text)

    def scores(self, img: np.ndarray, txt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sim = img @ txt.T
        return sim, sim.T

    def pair_scores(self, img: np.ndarray, txt: np.ndarray, block: int = 256) -> np.ndarray:
        return np.einsum("nd,nd->n", img, txt)

    def features(self, params, images):  # probes: the image tower's pooled output, before the projection
        return self.model.apply({"params": params}, pipeline.normalize_images(images),
                                method=towers.TwoTower.image_features)[0]

    def patches(self, params, images):
        return self.model.apply({"params": params}, pipeline.normalize_images(images),
                                method=towers.TwoTower.encode_image_dense)[1]

    def class_embeddings(self, prompts: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
        z = prompts.reshape(num_classes, num_templates, -1).mean(axis=1)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def class_scores(self, img: np.ndarray, prompts: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
        return img @ self.class_embeddings(prompts, num_classes, num_templates).T

    def token_vectors(self, params, tokens):
        text = self.model.text
        return params["text"]["embed"]["embedding"][towers.vocab_ids(tokens, text.pad_id, text.token_offset)]

    def prompted_texts(self, params, tokens, where, vectors):
        return self.model.apply({"params": params}, tokens, where, vectors,
                                method=towers.TwoTower.encode_text_prompted)

    def prompted_images(self, params, images, prompts):
        return self.model.apply({"params": params}, pipeline.normalize_images(images), prompts,
                                method=towers.TwoTower.encode_image_prompted)

