"""OpenCLIP state dicts (OpenAI's CLIP weights as OpenCLIP loads them, OpenCLIP's
own trainings, and OpenCLIP's SigLIP models over timm's ViT) <-> vlm_jax.

Keys (``model.state_dict()`` of ``open_clip.create_model(...)``):

- image tower, OpenAI layout (``pool="cls"``): ``visual.conv1.weight`` (w, 3,
  p, p; no bias), ``visual.class_embedding`` (w,), ``visual.positional_embedding``
  (1 + n, w), ``visual.ln_pre``, ``visual.transformer.resblocks.<i>.{ln_1,
  attn.in_proj_weight (3w, w), attn.in_proj_bias, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``visual.ln_post``, ``visual.proj`` (w, e).
- image tower, timm layout (``pool="map"``, SigLIP): ``visual.trunk.patch_embed.proj``,
  ``visual.trunk.pos_embed`` (1, n, w), ``visual.trunk.blocks.<i>.{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``visual.trunk.norm``,
  ``visual.trunk.attn_pool.{latent, q, kv (2w, w), proj, norm, mlp.fc1, mlp.fc2}``.
- text tower: ``token_embedding.weight``, ``positional_embedding`` (L, w),
  ``transformer.resblocks.<i>...``, ``ln_final``, ``text_projection`` (w, e) — or,
  with a bias (SigLIP), a Linear ``text_projection.{weight, bias}``; in
  OpenCLIP's CustomTextCLIP (SigLIP) all of it under ``text.``.
- ``logit_scale`` (log t) and, for SigLIP, ``logit_bias``.

OpenAI's own TorchScript files hold the same keys plus ``input_resolution``,
``context_length`` and ``vocab_size``, which are not parameters.
"""

from __future__ import annotations

from vlm_jax.errors import ConfigError
from vlm_jax.weights import links as L

NOT_PARAMETERS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
WRAPPERS = ("state_dict.", "model.", "module.")  # OpenCLIP's trainer checkpoint, DDP


def normalise(flat: L.Flat) -> L.Flat:
    """The keys without the trainer's "state_dict." and DDP's "module." prefixes."""
    for w in WRAPPERS:
        if flat and all(k.startswith(w) for k in flat):
            flat = {k[len(w):]: v for k, v in flat.items()}
    return flat


def ignored(key: str) -> bool:
    return key.split(".")[-1] in NOT_PARAMETERS


def check(model_cfg) -> None:
    """The options this layout can hold; anything else is a ConfigError naming the field."""
    img, txt = model_cfg.image, model_cfg.text
    problems = []
    if img.tower != "vit":
        problems.append(f"model.image.tower={img.tower!r}: this layout holds ViTs only (OpenCLIP's ResNets use "
                        f"BatchNorm, which the GroupNorm ResNet tower does not have)")
    elif tuple(img.stem):
        problems.append("model.image: OpenCLIP's ViTs have no conv stem (stem=())")
    if img.pool == "cls":
        if not img.ln_pre or img.patch_bias or not model_cfg.image_projection:
            problems.append("model.image: OpenCLIP's class-token ViT has ln_pre=True, patch_bias=False and an "
                            "image projection (configs/published.py:clip_vit_* / openclip_vit_* set them)")
    elif img.pool == "map":
        if img.ln_pre or not img.patch_bias or model_cfg.image_projection:
            problems.append("model.image: OpenCLIP's SigLIP (timm) ViT has ln_pre=False, patch_bias=True and no "
                            "image projection (configs/published.py:siglip_* set them)")
    else:
        problems.append(f"model.image.pool: OpenCLIP's layouts hold 'cls' or 'map', not {img.pool!r}")
    if img.posemb != "learn":
        problems.append("model.image.posemb: OpenCLIP's checkpoints hold learned position embeddings ('learn')")
    if txt.tower != "transformer":
        problems.append("model.text.tower: OpenCLIP's text tower is the transformer")
    if problems:
        raise ConfigError("; ".join(problems))


def _block(theirs: str, ours: str, heads: int, timm: bool) -> list[L.Link]:
    if timm:
        names = dict(ln1="norm1", qkv="attn.qkv", out="attn.proj", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")
        qkv_w, qkv_b = f"{theirs}.attn.qkv.weight", f"{theirs}.attn.qkv.bias"
    else:
        names = dict(ln1="ln_1", out="attn.out_proj", ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")
        qkv_w, qkv_b = f"{theirs}.attn.in_proj_weight", f"{theirs}.attn.in_proj_bias"
    return [*L.layernorm(f"{theirs}.{names['ln1']}", f"{ours}/ln1"),
            *L.heads_in(qkv_w, qkv_b, [f"{ours}/attn/{x}" for x in ("query", "key", "value")], heads),
            *L.heads_out(f"{theirs}.{names['out']}", f"{ours}/attn/out", heads),
            *L.layernorm(f"{theirs}.{names['ln2']}", f"{ours}/ln2"),
            *L.linear(f"{theirs}.{names['fc1']}", f"{ours}/mlp/fc1"),
            *L.linear(f"{theirs}.{names['fc2']}", f"{ours}/mlp/fc2")]


def _image(model_cfg) -> list[L.Link]:
    c = model_cfg.image
    h = c.num_heads
    if c.pool == "cls":
        v = "visual"
        out = [L.transposed(f"{v}.conv1.weight", "image/patch_embed/kernel", (2, 3, 1, 0)),
               L.reshaped(f"{v}.class_embedding", "image/cls", lambda a: (a.shape[-1],), (1, 1, -1)),
               L.reshaped(f"{v}.positional_embedding", "image/pos_embed", lambda a: a.shape[1:], (1, -1, c.width)),
               *L.layernorm(f"{v}.ln_pre", "image/ln_pre")]
        for i in range(c.depth):
            out += _block(f"{v}.transformer.resblocks.{i}", f"image/encoder/block{i}", h, timm=False)
        out += L.layernorm(f"{v}.ln_post", "image/encoder/ln_final")
        out.append(L.same(f"{v}.proj", "img_proj/kernel"))
        return out
    t = "visual.trunk"
    out = [L.transposed(f"{t}.patch_embed.proj.weight", "image/patch_embed/kernel", (2, 3, 1, 0)),
           L.same(f"{t}.patch_embed.proj.bias", "image/patch_embed/bias"),
           L.same(f"{t}.pos_embed", "image/pos_embed")]
    for i in range(c.depth):
        out += _block(f"{t}.blocks.{i}", f"image/encoder/block{i}", h, timm=True)
    out += L.layernorm(f"{t}.norm", "image/encoder/ln_final")
    p, m = f"{t}.attn_pool", "image/map_head"
    out += [L.same(f"{p}.latent", f"{m}/probe"),
            *L.heads_in(f"{p}.q.weight", f"{p}.q.bias", [f"{m}/attn/query"], h),
            *L.heads_in(f"{p}.kv.weight", f"{p}.kv.bias", [f"{m}/attn/key", f"{m}/attn/value"], h),
            *L.heads_out(f"{p}.proj", f"{m}/attn/out", h),
            *L.layernorm(f"{p}.norm", f"{m}/ln"),
            *L.linear(f"{p}.mlp.fc1", f"{m}/mlp/fc1"),
            *L.linear(f"{p}.mlp.fc2", f"{m}/mlp/fc2")]
    return out


def _text(model_cfg, prefix: str) -> list[L.Link]:
    c = model_cfg.text
    out = [L.same(f"{prefix}token_embedding.weight", "text/embed/embedding"),
           L.reshaped(f"{prefix}positional_embedding", "text/pos_embed", lambda a: a.shape[1:], (1, -1, c.width))]
    for i in range(c.depth):
        out += _block(f"{prefix}transformer.resblocks.{i}", f"text/encoder/block{i}", c.num_heads, timm=False)
    out += L.layernorm(f"{prefix}ln_final", "text/encoder/ln_final")
    if model_cfg.text_projection_bias:
        out += L.linear(f"{prefix}text_projection", "txt_proj")
    else:
        out.append(L.same(f"{prefix}text_projection", "txt_proj/kernel"))
    return out


def links(model_cfg, scalars: tuple[str, ...]) -> list[L.Link]:
    """Every link of the model ``model_cfg`` with the objective's scalars (log_t[, bias])."""
    check(model_cfg)
    text_prefix = "text." if model_cfg.image.pool == "map" else ""  # CustomTextCLIP nests the text tower
    out = _image(model_cfg) + _text(model_cfg, text_prefix)
    names = {"log_t": "logit_scale", "bias": "logit_bias"}
    for s in scalars:
        if s not in names:
            raise ConfigError(f"loss.kind: its parameter {s!r} has no place in an OpenCLIP checkpoint")
        out.append(L.reshaped(names[s], s, lambda a: (), ()))
    return out


def extra_tokens(model_cfg) -> int:
    """Position embeddings before the patch grid (the class token's)."""
    return int(model_cfg.image.pool == "cls")
