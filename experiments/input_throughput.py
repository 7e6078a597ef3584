"""Input-pipeline throughput: images/s at 224 px from JPEG webdataset shards,
this library's pipeline against open_clip's own, on the same shards in the
same run.

    python experiments/input_throughput.py [--shards 4 --per_shard 256 --seconds 20 --workers 1 2]

Both sides decode the JPEG, take a random-resized crop (area 0.9–1, aspect
3/4–4/3, bicubic) to 224 px and tokenize the caption, in worker processes:

* ours: the shards ingested once (``vlm_jax.data.ingest webdataset``, images
  kept byte for byte, a SentencePiece model fitted on the captions), then
  ``pipeline.train_dataset`` with ``data.workers = W`` grain processes of one
  thread each; batches are uint8 (normalisation happens on the device, inside
  the step). A second row uses ingestion's ``--shorter_side 256`` option
  (images re-encoded once, at ingestion).
* peer: open_clip's webdataset training pipeline and its training transform
  with W DataLoader workers, run by ``peer_input_throughput.py`` in a separate
  virtual environment (torch, torchvision, webdataset, open_clip; never a
  dependency of this library).

Prints one JSON line per measurement and a table; paste the table into
docs/benchmarks.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import peer_input_throughput as peer


def measure_ours(shard_dir: str, work: str, *, image_size: int, batch_size: int, workers: int, seconds: float,
                 shorter_side: int = 0, warmup_batches: int = 4) -> dict:
    from vlm_jax import config as config_lib
    from vlm_jax.data import ingest, pipeline

    name = f"bench_s{shorter_side}"
    args = ingest.parse_args(["webdataset", shard_dir, "--name", name, "--data_dir", work, "--min_size", "1",
                              "--shorter_side", str(shorter_side), "--fit_tokenizer", "300", "--quiet"])
    ingest.run(args)
    cfg = config_lib.load_config(f"configs/own_data.py:{name}", [
        f"data.data_dir={work}", f"data.image_size={image_size}",
        f"data.workers={workers}", f"data.num_threads={1 if workers else 2}"])
    ds = pipeline.open_dataset(cfg.data)
    it = iter(pipeline.train_dataset(ds, cfg.data, 77, batch_size, seed=0))
    for _ in range(warmup_batches):
        next(it)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += next(it)["image"].shape[0]
    elapsed = time.perf_counter() - start
    return {"pipeline": "vlm_jax" + (f" (ingested --shorter_side {shorter_side})" if shorter_side else ""),
            "workers": workers, "images_per_second": images / elapsed, "images": images, "seconds": elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per_shard", type=int, default=256)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "vlm_jax_peer_venv"))
    p.add_argument("--skip_peer", action="store_true")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="vlm_jax_input_bench_")
    shard_dir = os.path.join(root, "shards")
    shards = peer.write_jpeg_shards(shard_dir, args.shards, args.per_shard)
    python = None if args.skip_peer else peer.ensure_peer_venv(args.venv)
    rows = []
    for workers in args.workers:
        common = dict(image_size=args.image_size, batch_size=args.batch_size, workers=workers, seconds=args.seconds)
        rows.append(measure_ours(shard_dir, os.path.join(root, "data"), **common))
        rows.append(measure_ours(shard_dir, os.path.join(root, "data"), shorter_side=256, **common))
        if python:
            r = peer.measure_peer(python, shards, **common)
            rows.append({**r, "pipeline": "open_clip (webdataset + torchvision)"})
        for r in rows[-3:]:
            print(json.dumps(r), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
          f"{args.shards} shards × {args.per_shard} JPEGs, {args.image_size} px, batch {args.batch_size}")
    print("| pipeline | workers | images/s | images/s per worker |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['workers']} | {r['images_per_second']:.0f} | "
              f"{r['images_per_second'] / r['workers']:.0f} |")


if __name__ == "__main__":
    main()
