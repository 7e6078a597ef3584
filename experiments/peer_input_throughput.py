"""The peer's side of experiments/input_throughput.py: open_clip's own
webdataset training pipeline, run in a separate virtual environment.

``ensure_peer_venv(path)`` creates the environment once (torch, torchvision,
open_clip with its training extra, which pins webdataset; never a dependency of
vlm_jax); ``measure_peer(python, shards, ...)`` runs, in that environment,
``open_clip_train.data.get_wds_dataset`` (shard shuffle, per-worker split,
sample shuffle buffer, PIL decode, ``open_clip.image_transform(size,
is_train=True)``: RandomResizedCrop scale (0.9, 1) bicubic, ToTensor,
Normalize; the ViT-B-32 BPE tokenizer; batching) behind its DataLoader
with ``workers`` processes, and returns images/s after a warm-up.
``write_jpeg_shards`` makes the shards both sides read (stdlib + PIL + NumPy).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
from PIL import Image

PEER_PACKAGES = ("torch", "torchvision", "open_clip_torch[training]", "braceexpand")  # [training] pins its webdataset

_CHILD = r'''
import argparse, json, sys, time
import torch, open_clip
from open_clip_train.data import get_wds_dataset

cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
args = argparse.Namespace(train_data=cfg["pattern"], val_data=None, dataset_resampled=False,
                          train_num_samples=10 ** 7, train_data_upsampling_factors=None, seed=0,
                          batch_size=cfg["batch_size"], world_size=1, workers=cfg["workers"])
preprocess = open_clip.image_transform(cfg["image_size"], is_train=True)
data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
it = iter(data.dataloader)
for _ in range(cfg["warmup_batches"]):
    next(it)
start, images = time.perf_counter(), 0
while time.perf_counter() - start < cfg["seconds"]:
    batch, _ = next(it)
    images += batch.shape[0]
elapsed = time.perf_counter() - start
print(json.dumps({"images_per_second": images / elapsed, "images": images, "seconds": elapsed,
                  "workers": cfg["workers"], "torch": torch.__version__, "open_clip": open_clip.__version__,
                  "transform": repr(preprocess).replace("\n", " ")}))
'''


def write_jpeg_shards(out_dir: str, num_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """img2dataset-like shards: key.jpg (256–640 px a side, quality 90), key.txt, key.json."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                w, h = (int(v) for v in rng.integers(256, 641, size=2))
                y, x = np.mgrid[0:h, 0:w]
                phase = rng.uniform(0, 6.3, size=3)
                a = np.stack([127 + 100 * np.sin(x / (20 + 10 * k) + y / (30 + 7 * k) + phase[k]) for k in range(3)], -1)
                a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, "JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                caption = f"a synthetic picture number {i} of shard {s}"
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"caption": caption, "key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def ensure_peer_venv(path: str) -> str:
    """The peer environment's python, creating and filling it on first use."""
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".vlm_jax_peer_ready")
    if not os.path.exists(marker):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        open(marker, "w").close()
    return python


def measure_peer(python: str, shards: list[str], *, image_size: int = 224, batch_size: int = 64, workers: int = 1,
                 seconds: float = 20.0, warmup_batches: int = 4) -> dict:
    """Images/s of open_clip's webdataset pipeline on ``shards`` (named NNNNN.tar in one directory)."""
    folder = os.path.dirname(shards[0])
    pattern = os.path.join(folder, f"{{00000..{len(shards) - 1:05d}}}.tar")
    cfg = {"pattern": pattern, "image_size": image_size, "batch_size": batch_size, "workers": workers,
           "seconds": seconds, "warmup_batches": warmup_batches}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_CHILD)
    try:
        proc = subprocess.run([python, f.name, json.dumps(cfg)], capture_output=True, text=True, timeout=1200)
    finally:
        os.remove(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"the peer pipeline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
