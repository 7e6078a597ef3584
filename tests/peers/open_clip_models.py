"""Runs in the peer environment (torch, open_clip): reduced OpenCLIP models of
each published family, their state dicts and their outputs, for the parity
tests in ``tests/test_weights.py``. Not a test module; vlm_jax never imports it.

    python open_clip_models.py make OUT      # OUT/<family>/{weights.safetensors, weights.pt, io.npz}
    python open_clip_models.py load OUT      # OUT/<family>/exported.{safetensors,pt} -> OUT/<family>/reloaded.npz
    python open_clip_models.py full NAME OUT # an open_clip model by name at its published size: OUT/{weights.safetensors, io.npz}

Families (same structure as ``configs/published.py``, smaller): "clip"
(OpenAI layout, QuickGELU), "openclip" (exact GELU), "siglip" (OpenCLIP's
CustomTextCLIP over timm's SigLIP ViT with a MAP head, bidirectional text
pooled at the last token, a text projection with a bias, a logit bias).
Every parameter is perturbed away from its initialisation (LayerNorm scales
of 1 and zero biases would hide a swapped or dropped tensor).
"""

import json
import math
import os
import sys

import numpy as np
import open_clip
import timm
import torch
from open_clip.model import CLIP, CustomTextCLIP, resize_pos_embed
from safetensors.torch import load_file, save_file

torch.manual_seed(0)
torch.set_num_threads(2)

SIZE, PATCH, WIDTH, DEPTH, HEADS, CTX, VOCAB = 32, 8, 64, 2, 4, 16, 128  # VOCAB: the tiny dataset's tokenizer
CLIP_EMBED = 48
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def build(family: str, image_size: int = SIZE) -> torch.nn.Module:
    if family in ("clip", "openclip"):
        vision = dict(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=image_size)
        text = dict(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=DEPTH)
        return CLIP(CLIP_EMBED, vision, text, quick_gelu=family == "clip")
    vision = dict(image_size=image_size, timm_model_name="vit_base_patch16_siglip_224", timm_pool="map",
                  timm_proj="none")
    text = dict(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=DEPTH, no_causal_mask=True,
                proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6})
    model = CustomTextCLIP(WIDTH, vision, text, init_logit_bias=-10.0)
    # the same timm model, at the reduced size (kwargs override its published arguments)
    model.visual.trunk = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0,
                                           global_pool="map", embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                           img_size=image_size, patch_size=PATCH)
    return model


def perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(12.5))
            elif name == "logit_bias":
                p.fill_(-3.0)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def inputs(family: str, size: int = SIZE, ctx: int = CTX, vocab: int = VOCAB, n: int = 4):
    rng = np.random.default_rng(2)
    x01 = rng.random((n, size, size, 3), dtype=np.float32)
    tokens = np.zeros((n, ctx), np.int64)
    for i in range(n):
        words = int(rng.integers(1, ctx - 2))
        if family == "siglip":  # words, EOS (1), padding: 0 here, the EOS id for open_clip (see pixels_and_ids)
            tokens[i, :words] = rng.integers(2, vocab, words)
            tokens[i, words] = 1
        else:  # start token, words, end token (the largest id), padding
            tokens[i, 0] = vocab - 2
            tokens[i, 1:words + 1] = rng.integers(1, vocab - 2, words)
            tokens[i, words + 1] = vocab - 1
    return x01, tokens


def pixels(family: str, x01: np.ndarray) -> torch.Tensor:
    x = (x01 - MEAN) / STD if family != "siglip" else x01 * 2 - 1
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def ids(family: str, tokens: np.ndarray) -> torch.Tensor:
    """What the model sees: vlm_jax's pipeline pads with 0; SigLIP's tokenizers pad with EOS (1)."""
    return torch.from_numpy(np.where(tokens == 0, 1, tokens) if family == "siglip" else tokens)


def outputs(model, family: str, x01: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        img = model.encode_image(pixels(family, x01), normalize=True)
        txt = model.encode_text(ids(family, tokens), normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        if getattr(model, "logit_bias", None) is not None:
            logits = logits + model.logit_bias
    return {"img": img.numpy(), "txt": txt.numpy(), "logits": logits.numpy()}


def make(out: str) -> None:
    info = {"open_clip": open_clip.__version__, "torch": torch.__version__, "timm": timm.__version__}
    for family in ("clip", "openclip", "siglip"):
        d = os.path.join(out, family)
        os.makedirs(d, exist_ok=True)
        model = build(family)
        perturb(model)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(d, "weights.safetensors"))
        torch.save(model.state_dict(), os.path.join(d, "weights.pt"))
        x01, tokens = inputs(family)
        np.savez(os.path.join(d, "io.npz"), x01=x01, tokens=tokens, **outputs(model, family, x01, tokens))
        info[family] = {"parameters": sum(p.numel() for p in model.parameters()), "keys": len(sd)}
    # a TorchScript archive, the form of OpenAI's own .pt files
    torch.jit.script(torch.nn.Linear(3, 2)).save(os.path.join(out, "torchscript.pt"))
    # OpenCLIP's own resampling of a class-token position embedding to other grids
    sd = load_file(os.path.join(out, "clip", "weights.safetensors"))
    for size in (48, 24, 56):
        target = build("clip", image_size=size)
        resized = dict(sd)
        resize_pos_embed(resized, target)
        np.save(os.path.join(out, "clip", f"posemb_{size}.npy"), resized["visual.positional_embedding"].numpy())
    print(json.dumps(info))


def load(out: str) -> None:
    """Our exported files, loaded strictly into fresh models of the same structure."""
    report = {}
    for family in ("clip", "openclip", "siglip"):
        d = os.path.join(out, family)
        for ext in ("safetensors", "pt"):
            path = os.path.join(d, f"exported.{ext}")
            if not os.path.exists(path):
                continue
            sd = load_file(path) if ext == "safetensors" else torch.load(path, weights_only=True)
            model = build(family)
            missing, unexpected = model.load_state_dict(sd, strict=True)
            x01, tokens = inputs(family)
            np.savez(os.path.join(d, f"reloaded_{ext}.npz"), **outputs(model, family, x01, tokens))
            report[f"{family}.{ext}"] = len(sd)
    print(json.dumps(report))


def full(name: str, out: str) -> None:
    """An open_clip model at its published size, perturbed, with its outputs on two images and texts."""
    os.makedirs(out, exist_ok=True)
    model = open_clip.create_model(name)
    perturb(model)
    family = "siglip" if "SigLIP" in name else "clip"
    size = model.visual.image_size[0] if hasattr(model.visual, "image_size") else 224
    ctx, vocab = model.context_length if hasattr(model, "context_length") else model.text.context_length, \
        model.vocab_size if hasattr(model, "vocab_size") else model.text.vocab_size
    x01, tokens = inputs(family, size, ctx, vocab, n=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "weights.safetensors"))
    np.savez(os.path.join(out, "io.npz"), x01=x01, tokens=tokens, **outputs(model, family, x01, tokens))
    print(json.dumps({"name": name, "open_clip": open_clip.__version__, "torch": torch.__version__,
                      "parameters": sum(p.numel() for p in model.parameters()), "image_size": size}))


if __name__ == "__main__":
    if sys.argv[1] == "full":
        full(sys.argv[2], sys.argv[3])
    else:
        {"make": make, "load": load}[sys.argv[1]](sys.argv[2])
