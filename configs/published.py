"""Published CLIP and SigLIP models: ``configs/published.py:<name>``.

    python -m vlm_jax.train --config configs/published.py:clip_vit_b16 --workdir ...
    python -m vlm_jax.convert --config configs/published.py:clip_vit_b16 --source FILE --workdir ...

Three families, each computing what its released weights were trained with
(``docs/weights.md``):

- ``clip_rn50``, ``clip_rn101`` (Radford et al. 2021): CLIP's modified
  ResNet (``vlm_jax/models/resnet.py``; GroupNorm where OpenAI used
  BatchNorm, same parameters) whose attention pool gives the embedding, and
  CLIP's text tower.
- ``clip_vit_*`` (Radford et al. 2021; OpenAI's weights, and OpenCLIP's
  ``-quickgelu`` models): a class token with its own position embedding, a
  LayerNorm before the first block (``ln_pre``), a patch embedding without
  bias, QuickGELU, LayerNorm epsilon 1e-5, OpenAI's pixel mean and deviation;
  77-token causal text pooled at the EOT token (the largest id of CLIP's BPE:
  ``pool="argmax"``), 49,408-token vocabulary.
- ``openclip_vit_*`` (OpenCLIP's own trainings, e.g. LAION-2B): the same with
  the exact (erf) GELU.
- ``siglip_*`` (Zhai et al. 2023; So400m: Alabdulmohsin et al. 2023, at 384 px;
  big_vision's weights): MAP-head image pooling whose output is the embedding,
  tanh GELU, epsilon 1e-6, pixels in [-1, 1]; bidirectional 64-token text
  attending to its padding (its EOS id 1, as big_vision pads: ``pad_id=1``),
  pooled at the last position, a text head with a bias, 32,000-token
  vocabulary, sigmoid loss.

Widths, depths, heads, MLP sizes, context lengths and vocabularies are the
published ones (``tests/test_published.py`` checks the parameter counts); data
defaults to the embedded dataset resized to the model's resolution, so point
config.data at real data (and the model's own tokenizer) for real use.
"""

import math

from vlm_jax.config import base_config

# OpenAI's image statistics (RGB, in [0, 1] units), used by every CLIP/OpenCLIP release.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Tower shapes: (width, depth, mlp_dim, heads).
_VIT = {"B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16),
        "So400m": (1152, 27, 4304, 16)}
_CLIP_TEXT = {512: (512, 12, 2048, 8), 768: (768, 12, 3072, 12), 1024: (1024, 24, 4096, 16)}

# CLIP's modified ResNets: (blocks per stage, base width); attention-pool heads
# are the last stage's channels / 64, as released.
_RESNET = {"RN50": ((3, 4, 6, 3), 64), "RN101": ((3, 4, 23, 3), 64)}

# name: (family, image tower, patch (None: a ResNet), text width, embed_dim, image size)
SHAPES = {
    "clip_rn50": ("clip", "RN50", None, 512, 1024, 224),
    "clip_rn101": ("clip", "RN101", None, 512, 512, 224),
    "clip_vit_b32": ("clip", "B", 32, 512, 512, 224),
    "clip_vit_b16": ("clip", "B", 16, 512, 512, 224),
    "clip_vit_l14": ("clip", "L", 14, 768, 768, 224),
    "openclip_vit_b32": ("openclip", "B", 32, 512, 512, 224),
    "openclip_vit_b16": ("openclip", "B", 16, 512, 512, 224),
    "openclip_vit_l14": ("openclip", "L", 14, 768, 768, 224),
    "openclip_vit_h14": ("openclip", "H", 14, 1024, 1024, 224),
    "siglip_b16": ("siglip", "B", 16, 768, 768, 224),
    "siglip_so400m14": ("siglip", "So400m", 14, 1152, 1152, 384),
}


def get_config(name: str = "clip_vit_b16"):
    if name not in SHAPES:
        raise ValueError(f"configs/published.py: unknown model {name!r}; choose from {sorted(SHAPES)}")
    family, tower, patch, text_width, embed, size = SHAPES[name]
    c = base_config()
    if patch is None:  # the attention pool's projection is the image embedding
        layers, base = _RESNET[tower]
        c.model.image.update(dict(tower="resnet", layers=layers, base_width=base, num_heads=base * 32 // 64,
                                  output_dim=embed, pixel_mean=OPENAI_MEAN, pixel_std=OPENAI_STD))
        c.model.image_projection = False
    else:
        iw, idp, imlp, ih = _VIT[tower]
        c.model.image.update(dict(patch_size=patch, width=iw, depth=idp, mlp_dim=imlp, num_heads=ih, posemb="learn"))
    c.model.embed_dim = embed
    c.data.image_size = size
    if family in ("clip", "openclip"):
        act = "quick_gelu" if family == "clip" else "gelu"
        tw, tdp, tmlp, th = _CLIP_TEXT[text_width]
        if patch is not None:
            c.model.image.update(dict(pool="cls", ln_pre=True, patch_bias=False, act=act, norm_eps=1e-5,
                                      pixel_mean=OPENAI_MEAN, pixel_std=OPENAI_STD))
        c.model.text.update(dict(width=tw, depth=tdp, mlp_dim=tmlp, num_heads=th, max_len=77, vocab_size=49408,
                                 causal=True, pool="argmax", mask_padding=False, act=act, norm_eps=1e-5))
        c.loss.kind = "softmax"
    else:
        c.model.image.update(dict(pool="map", act="gelu_tanh", norm_eps=1e-6))
        c.model.text.update(dict(width=iw, depth=idp, mlp_dim=imlp, num_heads=ih, max_len=64, vocab_size=32000,
                                 causal=False, pool="last", mask_padding=False, act="gelu_tanh", norm_eps=1e-6,
                                 pad_id=1))
        c.loss.kind = "sigmoid"
        c.loss.log_t_init, c.loss.bias_init = math.log(10.0), -10.0
        c.model.image_projection = False  # SigLIP: the MAP head's output is the image embedding
        c.model.text_projection_bias = True
    c.train.batch_size = 256
    return c
