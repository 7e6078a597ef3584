"""big_vision two-tower checkpoints (SigLIP's released ``.npz`` files) <-> vlm_jax.

big_vision saves ``numpy.savez`` of its flax parameter tree flattened with
"/" (``params/img/...``, ``params/txt/...``, ``params/t``, ``params/b``). Its
module names, as ``big_vision/models/vit.py`` and
``big_vision/models/proj/image_text/{text_transformer,two_towers}.py`` create
them:

- ``img/embedding/{kernel (p, p, 3, w), bias}``, ``img/pos_embedding`` (1, n, w),
  ``img/Transformer/encoderblock_<i>/{LayerNorm_0, MultiHeadDotProductAttention_0/
  {query, key, value, out}, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}``,
  ``img/Transformer/encoder_norm``, ``img/MAPHead_0/{probe,
  MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}``; with ``scan=True``
  one ``encoderblock`` whose arrays have a leading depth axis (read here;
  written unscanned);
- ``txt/Embed_0/embedding``, ``txt/pos_embedding`` (1, L, w),
  ``txt/Encoder_0/encoderblock_<i>/...``, ``txt/Encoder_0/encoder_norm``,
  ``txt/head/{kernel, bias}``;
- ``t`` = log t and ``b`` (shape (1,) each).

Flax to flax, every array keeps its shape (attention kernels are (w, heads,
w/heads) on both sides); only the names change.
"""

from __future__ import annotations

import re

import numpy as np

from vlm_jax.errors import ConfigError
from vlm_jax.weights import links as L

PREFIX = "params/"


def ignored(key: str) -> bool:
    return False


def check(model_cfg) -> None:
    img, txt = model_cfg.image, model_cfg.text
    problems = []
    if img.tower != "vit" or tuple(img.stem) or img.ln_pre or not img.patch_bias:
        problems.append("model.image: big_vision's ViT has no stem and no ln_pre, and a patch embedding bias")
    if img.pool not in ("map", "gap"):
        problems.append(f"model.image.pool: this layout holds 'map' or 'gap' (big_vision's class token has no "
                        f"position embedding of its own), not {img.pool!r}")
    if model_cfg.image_projection:
        problems.append("model.image_projection: SigLIP's image embedding is the pooled output (False)")
    if not model_cfg.text_projection_bias:
        problems.append("model.text_projection_bias: big_vision's text head has a bias (True)")
    if txt.tower != "transformer":
        problems.append("model.text.tower: big_vision's text tower is the transformer")
    if problems:
        raise ConfigError("; ".join(problems))


def _ln(theirs: str, ours: str) -> list[L.Link]:
    return [L.same(f"{theirs}/{p}", f"{ours}/{p}") for p in ("scale", "bias")]


def _attention(theirs: str, ours: str) -> list[L.Link]:
    return [L.same(f"{theirs}/MultiHeadDotProductAttention_0/{x}/{p}", f"{ours}/attn/{x}/{p}")
            for x in ("query", "key", "value", "out") for p in ("kernel", "bias")]


def _mlp(theirs: str, ours: str) -> list[L.Link]:
    return [L.same(f"{theirs}/MlpBlock_0/Dense_{i}/{p}", f"{ours}/mlp/fc{i + 1}/{p}")
            for i in (0, 1) for p in ("kernel", "bias")]


def _block(theirs: str, ours: str) -> list[L.Link]:
    return [*_ln(f"{theirs}/LayerNorm_0", f"{ours}/ln1"), *_attention(theirs, ours),
            *_ln(f"{theirs}/LayerNorm_1", f"{ours}/ln2"), *_mlp(theirs, ours)]


def links(model_cfg, scalars: tuple[str, ...]) -> list[L.Link]:
    check(model_cfg)
    img, txt = f"{PREFIX}img", f"{PREFIX}txt"
    out = [L.same(f"{img}/embedding/kernel", "image/patch_embed/kernel"),
           L.same(f"{img}/embedding/bias", "image/patch_embed/bias")]
    if model_cfg.image.posemb == "learn":
        out.append(L.same(f"{img}/pos_embedding", "image/pos_embed"))
    for i in range(model_cfg.image.depth):
        out += _block(f"{img}/Transformer/encoderblock_{i}", f"image/encoder/block{i}")
    out += _ln(f"{img}/Transformer/encoder_norm", "image/encoder/ln_final")
    if model_cfg.image.pool == "map":
        m = f"{img}/MAPHead_0"
        out += [L.same(f"{m}/probe", "image/map_head/probe"), *_attention(m, "image/map_head"),
                *_ln(f"{m}/LayerNorm_0", "image/map_head/ln"), *_mlp(m, "image/map_head")]
    out += [L.same(f"{txt}/Embed_0/embedding", "text/embed/embedding"),
            L.same(f"{txt}/pos_embedding", "text/pos_embed")]
    for i in range(model_cfg.text.depth):
        out += _block(f"{txt}/Encoder_0/encoderblock_{i}", f"text/encoder/block{i}")
    out += _ln(f"{txt}/Encoder_0/encoder_norm", "text/encoder/ln_final")
    out += [L.same(f"{txt}/head/{p}", f"txt_proj/{p}") for p in ("kernel", "bias")]
    names = {"log_t": "t", "bias": "b"}
    for s in scalars:
        if s not in names:
            raise ConfigError(f"loss.kind: its parameter {s!r} has no place in a big_vision checkpoint")
        out.append(L.reshaped(f"{PREFIX}{names[s]}", s, lambda a: (1,), ()))
    return out


def extra_tokens(model_cfg) -> int:
    return 0


_SCANNED = re.compile(r"^(.*/)encoderblock/(.*)$")


def normalise(flat: L.Flat) -> L.Flat:
    """The file's keys as ``params/...``, scanned blocks split into ``encoderblock_<i>``."""
    out = {}
    for k, v in flat.items():
        k = k if k.startswith(PREFIX) else PREFIX + k
        m = _SCANNED.match(k)
        if m:
            for i in range(v.shape[0]):
                out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = np.asarray(v[i])
        else:
            out[k] = v
    return out
