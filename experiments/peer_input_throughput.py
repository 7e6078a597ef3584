"""Images/s of open_clip's own training input pipeline on webdataset shards.

The peer side of ``experiments/input_throughput.py``. What is measured is
open_clip's real ``--dataset-type webdataset`` training input path, called, not
copied:

* ``open_clip_train.data.get_wds_dataset(args, preprocess, is_train=True,
  tokenizer=...)``: shard list (or ``ResampledShards2`` with
  ``--dataset-resampled``), shard shuffle, split by node and worker, tar
  reading, sample shuffle buffer (5000, initial 1000), ``wds.decode("pilrgb")``,
  the image transform and the tokenizer per sample, ``wds.batched``, behind a
  ``wds.WebLoader`` (a torch DataLoader) with ``workers`` processes, persistent
  workers, default prefetch;
* the image transform is ``open_clip.image_transform(image_size,
  is_train=True)``, which is what ``create_model_and_transforms`` returns for
  training with the default ``AugmentationCfg``: RandomResizedCrop(scale=(0.9,
  1.0), bicubic), RGB, ToTensor, Normalize(OpenAI mean/std);
* the tokenizer is ``open_clip.get_tokenizer("ViT-B-32")`` (the BPE
  ``SimpleTokenizer`` the package ships, context length 77).

Threads: the DataLoader's workers run with one torch thread each (PyTorch's
DataLoader sets that in every worker; open_clip does not change it). The
child's main process is set to one torch thread too (``main_threads=1``): with
``workers >= 1`` it only receives batches, and with ``workers=0``, where it runs
the whole pipeline, torch's default of one thread per core collapses under a
busy machine (16 images/s instead of 170 here with the other core loaded).
``main_threads=None`` keeps torch's default, as open_clip's own trainer does.

It all runs in a separate virtual environment (torch, torchvision, webdataset,
open_clip_torch[training]), made by :func:`ensure_peer_venv` (the shared
``vlm_jax.bench.peer_env``); none of it is a
dependency of vlm_jax, and this module itself imports neither torch nor
open_clip: :func:`measure_peer` runs the embedded ``_CHILD_SCRIPT`` with the
environment's python and reads back one JSON line.

On a machine whose pip can only see PyPI, a CPU-only torch is not available
with a matching torchvision (PyPI's Linux torchvision wheels link the CUDA
build of torch), so the environment gets PyPI's default (CUDA) build of torch,
which runs on the CPU here; the data pipeline uses only CPU kernels either way.

    python experiments/peer_input_throughput.py [--shards 4 --per_shard 256 --seconds 20 --workers 1 2]

synthesizes img2dataset-like JPEG shards (:func:`write_jpeg_shards`, stdlib +
PIL + NumPy only), makes the environment and prints one JSON line per worker
count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlm_jax.bench import peer_env

DEFAULT_VENV = peer_env.DEFAULT_VENV

# open_clip's "training" extra brings (and pins) webdataset, pandas, fsspec and
# the rest that ``open_clip_train.data`` imports; braceexpand comes with
# webdataset but is named since ``open_clip_train.data`` imports it directly.
PEER_PACKAGES: tuple[str, ...] = (
    "torch", "torchvision", "open_clip_torch[training]", "webdataset", "braceexpand", "pandas")

_CHILD_SCRIPT = r'''
import argparse
import gc
import json
import os
import platform
import random
import resource
import sys
import time

cfg = json.loads(sys.argv[1])
t_import = time.perf_counter()

import numpy as np
import torch
import torchvision
import webdataset
import open_clip

try:
    from open_clip_train import data as oc_data
except ImportError:  # open_clip releases before the training code became a package
    from training import data as oc_data

if cfg["main_threads"]:
    torch.set_num_threads(cfg["main_threads"])
random.seed(cfg["seed"])
np.random.seed(cfg["seed"])
torch.manual_seed(cfg["seed"])

# The fields of open_clip_train.params' namespace that get_wds_dataset reads.
args = argparse.Namespace(
    train_data=cfg["train_data"], val_data=None, val_num_samples=None,
    dataset_type="webdataset", dataset_resampled=cfg["resampled"],
    train_num_samples=cfg["train_num_samples"], train_data_upsampling_factors=None,
    batch_size=cfg["batch_size"], workers=cfg["workers"], seed=cfg["seed"],
    world_size=1, rank=0, local_rank=0, distributed=False, horovod=False)
preprocess = open_clip.image_transform(cfg["image_size"], is_train=True)
tokenizer = open_clip.get_tokenizer("ViT-B-32")
data = oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)


def batches():
    """open_clip's train loop: set_epoch, then iterate the dataloader, epoch after epoch."""
    epoch = 0
    while True:
        data.set_epoch(epoch)
        n = 0
        for batch in data.dataloader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("an epoch of the peer pipeline yielded no batch")
        epoch += 1


t_build = time.perf_counter()
stream = batches()
first = next(stream)
t_first = time.perf_counter()
for _ in range(cfg["warmup_batches"] - 1):
    next(stream)
load_before = os.getloadavg()[0]
main_cpu = time.process_time()
start, images, n_batches = time.perf_counter(), 0, 0
while time.perf_counter() - start < cfg["seconds"]:
    image_batch, text_batch = next(stream)
    images += int(image_batch.shape[0])
    n_batches += 1
elapsed = time.perf_counter() - start
main_cpu = time.process_time() - main_cpu
num_batches_per_epoch = int(data.dataloader.num_batches)
# With persistent workers the DataLoader keeps its iterator: dropping the loader shuts the
# workers down and waits for them, so that their CPU time shows in RUSAGE_CHILDREN.
stream.close()
del stream, data
gc.collect()
worker_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)

print(json.dumps({
    "images_per_second": images / elapsed,
    "images": images,
    "batches": n_batches,
    "seconds": elapsed,
    "workers": cfg["workers"],
    "batch_size": cfg["batch_size"],
    "image_size": cfg["image_size"],
    "warmup_batches": cfg["warmup_batches"],
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "webdataset": getattr(webdataset, "__version__", "?"),
    "open_clip": open_clip.__version__,
    "python": platform.python_version(),
    "pipeline": f"{oc_data.__name__}.get_wds_dataset",
    "resampled": cfg["resampled"],
    "train_num_samples": cfg["train_num_samples"],
    "num_batches_per_epoch": num_batches_per_epoch,
    "num_shards": cfg["num_shards"],
    "shard_samples": cfg["shard_samples"],
    "transform": " ".join(repr(preprocess).split()),
    "tokenizer": f"{type(tokenizer).__name__}(context_length={tokenizer.context_length})",
    "batch_image": [list(first[0].shape), str(first[0].dtype)],
    "batch_text": [list(first[1].shape), str(first[1].dtype)],
    "main_torch_threads": torch.get_num_threads(),
    "worker_torch_threads": 1 if cfg["workers"] else None,
    "cpu_count": os.cpu_count(),
    "import_seconds": t_build - t_import,
    "first_batch_seconds": t_first - t_build,
    # Contention: the 1-minute load average when timing began, the main process's CPU seconds
    # while timing, and the workers' CPU seconds over their whole life (start-up, warm-up and
    # prefetch included).
    "load_average_before": load_before,
    "main_cpu_seconds": main_cpu,
    "worker_cpu_seconds_total": worker_cpu.ru_utime + worker_cpu.ru_stime if cfg["workers"] else None,
}), flush=True)
'''


def _noise_field(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour field: a random low-resolution grid upsampled bicubically, plus a linear ramp."""
    gw, gh = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    grid = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.normal(size=2)
    ramp = (xx / w * direction[0] + yy / h * direction[1]) * 40.0
    noise = rng.normal(0.0, 6.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(smooth + ramp[..., None] + noise, 0, 255).astype(np.uint8)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def write_jpeg_shards(out_dir: str, num_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Writes ``num_shards`` img2dataset-like webdataset shards ``{out_dir}/{NNNNN}.tar``.

    Each sample ``KEY`` (the shard number in five digits, then the index in
    the shard in at least four, as img2dataset names them) is ``KEY.jpg`` (a smooth colour field with a ramp and mild
    noise, width and height drawn in [256, 640], JPEG quality 90),
    ``KEY.txt`` (its caption) and ``KEY.json`` (caption, key, size, status).
    Uses only the standard library, PIL and NumPy. Returns the shard paths.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    colours = ("red", "green", "blue", "orange", "purple", "grey", "teal", "yellow")
    things = ("sky", "field", "wall", "sunset", "lake", "fabric", "painting", "haze")
    digits = max(4, len(str(per_shard - 1)))
    paths = []
    for s in range(num_shards):
        path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                w, h = (int(v) for v in rng.integers(256, 641, size=2))
                buf = io.BytesIO()
                Image.fromarray(_noise_field(rng, w, h)).save(buf, "JPEG", quality=90)
                key = f"{s:05d}{i:0{digits}d}"
                caption = (f"a {colours[int(rng.integers(len(colours)))]} and "
                           f"{colours[int(rng.integers(len(colours)))]} {things[int(rng.integers(len(things)))]}, "
                           f"photo {s * per_shard + i}")
                meta = {"caption": caption, "key": key, "status": "success", "width": w, "height": h,
                        "original_width": w, "original_height": h}
                _add_member(tar, f"{key}.jpg", buf.getvalue())
                _add_member(tar, f"{key}.txt", caption.encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths


def ensure_peer_venv(path: str = DEFAULT_VENV, packages: Sequence[str] = PEER_PACKAGES) -> str:
    """The python of the shared peer environment (``vlm_jax.bench.peer_env``) with open_clip's training stack."""
    return peer_env.ensure_venv(packages, path)


def _count_samples(shard: str) -> int:
    with tarfile.open(shard) as tar:
        return sum(1 for name in tar.getnames() if name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))


def measure_peer(venv_python: str, shards: list[str], *, image_size: int = 224, batch_size: int = 64,
                 workers: int = 1, seconds: float = 20.0, warmup_batches: int = 2, resampled: bool = True,
                 main_threads: int | None = 1, seed: int = 0, timeout: float = 900.0) -> dict[str, Any]:
    """Images/s of open_clip's webdataset training pipeline over ``shards``, run by ``venv_python``.

    ``resampled=True`` is open_clip's ``--dataset-resampled`` (shards drawn
    with replacement; ``train_num_samples`` set so that one epoch outlasts the
    measurement, a steady state). ``resampled=False`` walks the shard list
    epoch after epoch with ``train_num_samples`` = the samples in ``shards``,
    as open_clip's train loop does (``set_epoch`` then the dataloader), so on
    few shards the epoch turnovers are part of what is measured; it needs at
    least ``workers`` shards. ``main_threads`` is the torch thread count of the
    child's main process (None: torch's default). After ``warmup_batches``
    batches, counts images for ``seconds``; returns the child's JSON record
    (configuration, versions and the machine's load included).
    """
    if not shards:
        raise ValueError("no shards")
    if any("::" in s or "{" in s for s in shards):
        raise ValueError("shard paths must not contain '::' or '{' (open_clip's shard-list syntax)")
    shard_samples = [_count_samples(s) for s in shards]
    cfg = {
        "train_data": "::".join(os.path.abspath(s) for s in shards),  # as --train-data takes a list
        "num_shards": len(shards), "shard_samples": shard_samples,
        "train_num_samples": 10 ** 9 if resampled else sum(shard_samples),
        "resampled": resampled, "image_size": image_size, "batch_size": batch_size, "workers": workers,
        "seconds": seconds, "warmup_batches": max(1, warmup_batches), "main_threads": main_threads, "seed": seed,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="vlm_jax_peer_") as tmp:
        script = os.path.join(tmp, "peer_child.py")
        with open(script, "w") as f:
            f.write(_CHILD_SCRIPT)
        proc = subprocess.run([venv_python, script, json.dumps(cfg)], capture_output=True, text=True,
                              timeout=seconds + timeout, env=env, cwd=tmp)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the peer pipeline failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per_shard", type=int, default=256)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup_batches", type=int, default=2)
    p.add_argument("--no_resample", action="store_true", help="walk the shard list by epochs instead")
    p.add_argument("--venv", default=DEFAULT_VENV)
    args = p.parse_args()

    python = ensure_peer_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="vlm_jax_peer_shards_") as shard_dir:
        start = time.perf_counter()
        shards = write_jpeg_shards(shard_dir, args.shards, args.per_shard)
        mb = sum(os.path.getsize(s) for s in shards) / 2 ** 20
        print(f"{args.shards} shards x {args.per_shard} JPEGs ({mb:.1f} MiB) written in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        results = []
        for workers in args.workers:
            results.append(measure_peer(python, shards, image_size=args.image_size, batch_size=args.batch_size,
                                        workers=workers, seconds=args.seconds, warmup_batches=args.warmup_batches,
                                        resampled=not args.no_resample))
            print(json.dumps(results[-1]), flush=True)
    first = results[0]
    print(f"\nopen_clip {first['open_clip']} ({first['pipeline']}), torch {first['torch']}; {args.shards} shards x "
          f"{args.per_shard} JPEGs, {args.image_size} px, batch {args.batch_size}, {os.cpu_count()} cores")
    for r in results:
        print(f"  workers={r['workers']}: {r['images_per_second']:.1f} images/s "
              f"({r['images']} images in {r['seconds']:.1f} s, load average {r['load_average_before']:.1f})")


if __name__ == "__main__":
    main()
