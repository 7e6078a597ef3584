"""Published CLIP and SigLIP model shapes: ``configs/published.py:<name>``.

    python -m vlm_jax.train --config configs/published.py:clip_vit_b16 --workdir ...

Names: clip_vit_b32, clip_vit_b16, clip_vit_l14 (Radford et al. 2021: 224 px,
77-token causal text, 49,408-token vocabulary) and siglip_b16, siglip_so400m14
(Zhai et al. 2023, 224 px; Alabdulmohsin et al. 2023, at 384 px: MAP-head image pooling,
bidirectional text pooled at the last token, 32,000-token vocabulary, sigmoid
loss). Widths, depths, heads, MLP sizes, context lengths and vocabularies are
the published ones; data defaults to the embedded dataset resized to the
model's resolution, so point config.data at real data for real training.
"""

import math

from vlm_jax.config import base_config

# name: (patch, image (width, depth, mlp, heads), image pool, text (width, depth, mlp, heads),
#        context, vocab, text causal, text pool, embed_dim, image size, loss)
SHAPES = {
    "clip_vit_b32": (32, (768, 12, 3072, 12), "cls", (512, 12, 2048, 8), 77, 49408, True, "eos", 512, 224, "softmax"),
    "clip_vit_b16": (16, (768, 12, 3072, 12), "cls", (512, 12, 2048, 8), 77, 49408, True, "eos", 512, 224, "softmax"),
    "clip_vit_l14": (14, (1024, 24, 4096, 16), "cls", (768, 12, 3072, 12), 77, 49408, True, "eos", 768, 224, "softmax"),
    "siglip_b16": (16, (768, 12, 3072, 12), "map", (768, 12, 3072, 12), 64, 32000, False, "last", 768, 224, "sigmoid"),
    "siglip_so400m14": (14, (1152, 27, 4304, 16), "map", (1152, 27, 4304, 16), 64, 32000, False, "last", 1152, 384, "sigmoid"),
}


def get_config(name: str = "clip_vit_b16"):
    if name not in SHAPES:
        raise ValueError(f"configs/published.py: unknown model {name!r}; choose from {sorted(SHAPES)}")
    patch, (iw, idp, imlp, ih), ipool, (tw, tdp, tmlp, th), ctx, vocab, causal, tpool, embed, size, loss = SHAPES[name]
    c = base_config()
    c.model.image.update(dict(patch_size=patch, width=iw, depth=idp, mlp_dim=imlp, num_heads=ih, pool=ipool,
                              posemb="learn"))
    c.model.text.update(dict(width=tw, depth=tdp, mlp_dim=tmlp, num_heads=th, max_len=ctx, vocab_size=vocab,
                             causal=causal, pool=tpool))
    c.model.embed_dim = embed
    c.data.image_size = size
    c.loss.kind = loss
    if loss == "sigmoid":
        c.loss.log_t_init, c.loss.bias_init = math.log(10.0), -10.0
        c.model.image_projection = False  # SigLIP: the MAP head's output is the image embedding
        c.model.text_projection_bias = True
    c.train.batch_size = 256
    return c
