"""Few-shot transfer of trained runs to an external labelled dataset:
the UCI optical handwritten digits (1,797 images of 8 × 8 pixels, 10
classes, from 43 writers), as scikit-learn ships them inside its package
(``pip install -e '.[transfer]'``; nothing is downloaded).

    python experiments/transfer_digits.py --data_dir ./data --out docs/transfer WORKDIR [WORKDIR ...]

1. Writes the digits as 64 × 64 RGB PNGs (dark ink on white, bilinear
   upsampling) in class folders "zero" … "nine": examples 0–799 of
   scikit-learn's order are ``train`` (the shots are drawn from them),
   800–999 ``val``, 1000–1796 ``test``.
2. Ingests the three splits as the dataset ``digits`` under ``--data_dir``
   (``python -m vlm_jax.data.ingest folder ... --label_from_dir``), once.
3. Evaluates each run with ``configs/transfer.py:<run>`` (zero-shot, few-shot
   logistic regression, Tip-Adapter, CLIP-Adapter, CoOp and, for a ViT, VPT)
   plus a small grid of each trained method's learning rate and size
   (``GRIDS``), on ``val`` and ``test`` in one pass. Each method's setting
   is the one with the best mean ``val`` top-1 over the shots, and its
   ``test`` numbers are reported; the zero-shot and logistic-regression
   rows have no setting to choose, and Tip-Adapter chooses its own by
   leave-one-out on the shots.
4. Writes ``--out``/transfer_digits.md (one table per run, and the grid's
   ``val`` numbers) and ``--out``/transfer_digits.json (every metric).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = (("train", 0, 800), ("val", 800, 1000), ("test", 1000, 1797))
GRIDS = {  # kind -> {field: values}; every combination is one entry
    "clip_adapter": {"lr": (1e-3, 1e-2), "ratio": (0.2, 0.6), "steps": (1000,)},
    "coop": {"lr": (3e-3, 1e-2, 3e-2), "n_ctx": (4, 8), "steps": (500,)},
    "vpt": {"lr": (1e-3, 1e-2), "num_prompts": (4, 8), "steps": (300,)},
}
LABELS = {"zeroshot": "zero-shot (no training example)", "fewshot": "logistic regression on features",
          "tip_adapter": "Tip-Adapter (no training)", "clip_adapter": "CLIP-Adapter",
          "coop": "CoOp (text prompt tuning)", "vpt": "VPT (visual prompt tuning)"}


def write_folders(root: str) -> None:
    """The PNG folders, written beside ``root`` and renamed into place: an
    interrupted run leaves no partial tree that a later one would take as done."""
    from sklearn.datasets import load_digits  # the data file ships inside the package

    digits = load_digits()
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, start, stop in SPLITS:
        for i in range(start, stop):
            folder = os.path.join(tmp, split, NAMES[digits.target[i]])
            os.makedirs(folder, exist_ok=True)
            ink = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # values 0..16
            image = Image.fromarray(ink, "L").resize((64, 64), Image.BILINEAR).convert("RGB")
            image.save(os.path.join(folder, f"{i:04d}.png"))
    os.replace(tmp, root)


def ingest(root: str, data_dir: str) -> None:
    for split, _, _ in SPLITS:
        if os.path.exists(os.path.join(data_dir, "digits", "1.0.0", f"digits-{split}.array_record-00000-of-00001")):
            continue
        subprocess.run([sys.executable, "-m", "vlm_jax.data.ingest", "folder", os.path.join(root, split),
                        "--label_from_dir", "--name", "digits", "--split", split, "--data_dir", data_dir,
                        "--quiet"], check=True)


def grid_config(workdir: str):
    """configs/transfer.py:<workdir> on val and test, with every grid setting as its own entry."""
    from vlm_jax import config as config_lib

    config = config_lib.from_file(os.path.join(REPO, "configs", "transfer.py"), workdir)
    settings: dict[str, tuple[str, dict]] = {}
    for name in list(config.evals.keys()):
        entry = config.evals[name]
        entry.unlock()
        entry.splits = ("val", "test")
        entry.lock()
        if entry.kind in GRIDS:
            fields = {k: v for k, v in entry.items() if k != "kind"}
            del config.evals[name]
            grid = GRIDS[entry.kind]
            for values in itertools.product(*grid.values()):
                setting = dict(zip(grid, values))
                label = f"{entry.kind}_" + "_".join(f"{k}{v:g}".replace(".", "p") for k, v in setting.items())
                config.evals[label] = config_lib.eval_entry(entry.kind, **{**fields, **setting})
                settings[label] = (entry.kind, setting)
        else:
            settings[name] = (entry.kind, {})
    config_lib.check_config(config)
    return config, settings


def metric(metrics: dict, label: str, kind: str, split: str, name: str) -> float:
    for key in (f"{label}/{kind}/{split}/{name}", f"{kind}/{split}/{name}"):
        if key in metrics:
            return metrics[key]
    raise KeyError(f"{label}: {split}/{name}")


def report(run: str, step: int, metrics: dict, settings: dict, shots: tuple[int, ...]) -> str:
    cols = " | ".join(f"{k}-shot" for k in shots)
    lines = [f"### {run} (step {step}), test split", "", f"| method | setting (best val) | {cols} |",
             "|---|---|" + "---|" * len(shots),
             f"| {LABELS['zeroshot']} | | {100 * metric(metrics, 'zeroshot', 'zeroshot', 'test', 'top1'):.1f} |"
             + " |" * (len(shots) - 1)]
    grid_lines = [f"#### {run}: every grid setting, val split", "", f"| entry | {cols} |",
                  "|---|" + "---|" * len(shots)]
    for kind in ("fewshot", "tip_adapter", "clip_adapter", "coop", "vpt"):
        labels = [label for label, (k, _) in settings.items() if k == kind]
        if not labels:
            continue
        val = {label: [metric(metrics, label, kind, "val", f"{k}shot_top1") for k in shots] for label in labels}
        best = max(labels, key=lambda label: np.mean(val[label]))
        test = [metric(metrics, best, kind, "test", f"{k}shot_top1") for k in shots]
        setting = ", ".join(f"{k} {v:g}" for k, v in settings[best][1].items())
        lines.append(f"| {LABELS[kind]} | {setting} | " + " | ".join(f"{100 * v:.1f}" for v in test) + " |")
        if len(labels) > 1:
            grid_lines += [f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in val[label]) + " |"
                           for label in labels]
    return "\n".join(lines + [""] + grid_lines) + "\n"


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

    from vlm_jax import evaluate
    from vlm_jax.errors import cli_errors

    os.makedirs(args.out, exist_ok=True)
    parts, everything = [], {}
    for workdir in args.workdirs:
        with cli_errors():
            config, settings = grid_config(workdir)
            step, metrics, details = evaluate.evaluate_checkpoint(config, workdir)
        run = os.path.basename(os.path.normpath(workdir))
        everything[run] = {"step": step, "metrics": metrics, "details": details}
        shots = tuple(config.evals.tip_adapter.shots)
        parts.append(report(run, step, metrics, settings, shots))
        print(parts[-1], flush=True)
        with open(os.path.join(args.out, "transfer_digits.md"), "w") as f:  # after each run: a long job keeps what it has
            f.write("\n".join(parts))
        with open(os.path.join(args.out, "transfer_digits.json"), "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
