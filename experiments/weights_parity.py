"""Parity of every published architecture at its full size against open_clip.

For each name of ``configs/published.py``: open_clip builds the model of the
same name (random, every parameter perturbed) in the peer environment
(``vlm_jax.bench.peer_env``) and writes its state dict as ``.safetensors``
with its image embeddings, text embeddings and logits on two images and two
texts; vlm_jax imports the file (``vlm_jax.weights``) and computes the same.
Prints one Markdown row per architecture: the largest relative error
(max |ours - theirs| / max |theirs|) of each output, in float32.

    python experiments/weights_parity.py [--names clip_vit_b32 siglip_b16 ...]

SigLIP: open_clip's port computes the exact GELU where big_vision (whose
weights they are, and ``configs/published.py:siglip_*``) uses tanh's
approximation; the row compares with ``act=gelu`` in both towers and states
the error with big_vision's tanh as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vlm_jax import config as config_lib, models, objectives, rules, session, weights  # noqa: E402
from vlm_jax.bench import peer_env  # noqa: E402

PEER = os.path.join(os.path.dirname(__file__), "..", "tests", "peers", "open_clip_models.py")
OPEN_CLIP_NAMES = {
    "clip_vit_b32": "ViT-B-32-quickgelu", "clip_vit_b16": "ViT-B-16-quickgelu", "clip_vit_l14": "ViT-L-14-quickgelu",
    "openclip_vit_b32": "ViT-B-32", "openclip_vit_b16": "ViT-B-16", "openclip_vit_l14": "ViT-L-14",
    "openclip_vit_h14": "ViT-H-14", "siglip_b16": "ViT-B-16-SigLIP", "siglip_so400m14": "ViT-SO400M-14-SigLIP-384",
}


def ours(name: str, overrides: list[str], path: str, io_: dict) -> dict[str, float]:
    c = config_lib.load_config(f"configs/published.py:{name}", overrides)
    model = models.make_model(c.model, c.model.text.vocab_size)
    objective = objectives.make(c, model, None)
    abstract = rules._flat(jax.eval_shape(session.make_init_params(c, model, objective), jax.random.PRNGKey(0)))
    params, _ = weights.import_params(path, c, abstract, objective.scalar_names)
    tree = rules._unflat({k: jnp.asarray(v) for k, v in params.items()})
    zi, zt = jax.jit(model.apply)({"params": tree}, jnp.asarray(io_["x01"] * 2 - 1), jnp.asarray(io_["tokens"], jnp.int32))
    logits = np.exp(float(params["log_t"])) * np.asarray(zi, np.float64) @ np.asarray(zt, np.float64).T
    logits += float(params.get("bias", 0.0))
    got = {"img": np.asarray(zi), "txt": np.asarray(zt), "logits": logits}
    return {k: float(np.abs(np.asarray(got[k], np.float64) - io_[k]).max() / np.abs(io_[k]).max()) for k in got}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--names", nargs="+", default=list(OPEN_CLIP_NAMES))
    args = p.parse_args()
    python = peer_env.ensure_venv()
    print("| config | open_clip model | parameters | image emb. | text emb. | logits | note |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names:
        with tempfile.TemporaryDirectory(prefix="vlm_jax_parity_") as out:
            start = time.perf_counter()
            info = json.loads(peer_env.run_script(python, PEER, "full", OPEN_CLIP_NAMES[name], out).splitlines()[-1])
            io_ = dict(np.load(os.path.join(out, "io.npz")))
            path = os.path.join(out, "weights.safetensors")
            note = ""
            if name.startswith("siglip"):
                err = ours(name, ["model.image.act=gelu", "model.text.act=gelu"], path, io_)
                tanh = ours(name, [], path, io_)
                note = f"act=gelu as open_clip; with big_vision's tanh: {max(tanh.values()):.1e}"
            else:
                err = ours(name, [], path, io_)
            print(f"| {name} | {info['name']} | {info['parameters']:,} | {err['img']:.1e} | {err['txt']:.1e} | "
                  f"{err['logits']:.1e} | {note} ({time.perf_counter() - start:.0f} s) |", flush=True)
    print(f"\nopen_clip {info['open_clip']}, torch {info['torch']}, jax {jax.__version__}; float32 on "
          f"{jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
