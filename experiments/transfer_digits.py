"""Few-shot transfer of trained runs to an external labelled dataset:
the UCI optical handwritten digits (1,797 images of 8 × 8 pixels, 10
classes, from 43 writers), as scikit-learn ships them inside its package
(``pip install -e '.[transfer]'``; nothing is downloaded).

    python experiments/transfer_digits.py --data_dir ./data --out docs/transfer WORKDIR [WORKDIR ...]

1. Writes the digits as 64 × 64 RGB PNGs (dark ink on white, bilinear
   upsampling) in class folders "zero" … "nine": the first 1,000 examples
   of scikit-learn's order are ``train``, the other 797 ``test``.
2. Ingests both splits as the dataset ``digits`` under ``--data_dir``
   (``python -m vlm_jax.data.ingest folder ... --label_from_dir``), once.
3. Evaluates each run with ``configs/transfer.py:<run>`` (zero-shot, few-shot
   logistic regression, Tip-Adapter, CLIP-Adapter, CoOp and, for a ViT, VPT)
   and writes ``--out``/transfer_digits.md with one table per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN = 1000


def write_folders(root: str) -> None:
    from sklearn.datasets import load_digits  # the data file ships inside the package

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "train" if i < TRAIN else "test"
        folder = os.path.join(root, split, NAMES[label])
        os.makedirs(folder, exist_ok=True)
        ink = (255 - pixels * (255 / 16)).astype(np.uint8)  # values 0..16
        image = Image.fromarray(ink, "L").resize((64, 64), Image.BILINEAR).convert("RGB")
        image.save(os.path.join(folder, f"{i:04d}.png"))


def ingest(root: str, data_dir: str) -> None:
    for split in ("train", "test"):
        if os.path.exists(os.path.join(data_dir, "digits", "1.0.0", f"digits-{split}.array_record-00000-of-00001")):
            continue
        subprocess.run([sys.executable, "-m", "vlm_jax.data.ingest", "folder", os.path.join(root, split),
                        "--label_from_dir", "--name", "digits", "--split", split, "--data_dir", data_dir,
                        "--quiet"], check=True)


def evaluate(workdir: str) -> dict:
    subprocess.run([sys.executable, "-m", "vlm_jax.evaluate", "--config",
                    f"{os.path.join(REPO, 'configs', 'transfer.py')}:{workdir}", "--workdir", workdir], check=True)
    steps = sorted(int(n[len("eval_step"):-len(".json")]) for n in os.listdir(workdir)
                   if n.startswith("eval_step") and n.endswith(".json"))
    with open(os.path.join(workdir, f"eval_step{steps[-1]}.json")) as f:
        return json.load(f)


def table(name: str, result: dict) -> str:
    m = result["metrics"]
    shots = sorted({int(k.split("/")[-1][:-len("shot_top1")]) for k in m if k.endswith("shot_top1")})
    lines = [f"### {name} (step {result['step']})", "",
             "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---|" * len(shots),
             f"| zero-shot (no training example) | {100 * m['zeroshot/test/top1']:.1f} |" + " |" * (len(shots) - 1)]
    for kind, label in (("fewshot", "logistic regression on features"), ("tip_adapter", "Tip-Adapter (no training)"),
                        ("clip_adapter", "CLIP-Adapter"), ("coop", "CoOp (text prompt tuning)"),
                        ("vpt", "VPT (visual prompt tuning)")):
        if f"{kind}/test/{shots[0]}shot_top1" in m:
            cells = " | ".join(f"{100 * m[f'{kind}/test/{k}shot_top1']:.1f}" for k in shots)
            lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="finished training runs")
    parser.add_argument("--data_dir", default="./data")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "transfer"))
    args = parser.parse_args()
    root = os.path.join(args.data_dir, "digits_folders")
    if not os.path.isdir(root):
        write_folders(root)
    ingest(root, args.data_dir)
    os.makedirs(args.out, exist_ok=True)
    parts = [table(os.path.basename(os.path.normpath(w)), evaluate(w)) for w in args.workdirs]
    with open(os.path.join(args.out, "transfer_digits.md"), "w") as f:
        f.write("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
