"""End-to-end training: learning, metrics, evaluation CLI, kill-and-resume, NaN stop."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax import evaluate, metrics, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("train/examples_per_sec",)


def _deterministic(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_softmax_run_learns_and_logs_everything(trained_softmax):
    workdir, rows = trained_softmax
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    last = rows[-1]
    assert last["step"] == 24
    for key in ("train/loss", "train/log_temp", "train/learning_rate", "train/examples_per_sec",
                "zeroshot/test_seen/top1", "zeroshot/test_unseen/top5", "retrieval/test_seen/i2t_r1",
                "retrieval/test_unseen/t2i_r10"):
        assert key in last, key
    assert "train/bias" not in last  # softmax has no bias
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))


@pytest.mark.slow
def test_sigmoid_run_learns_and_logs_bias(data_dir, tmp_path):
    cfg = load_tiny_config(data_dir, "configs/default.py:sigmoid", **{"train.steps": 12})
    train.train(cfg, str(tmp_path))
    rows = metrics.read_metrics(str(tmp_path))
    assert rows[0]["train/bias"] == pytest.approx(-10.0, abs=0.1)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


KINDS = {"softmax": "configs/default.py", "sigmoid": "configs/default.py:sigmoid", "unicl": "configs/default.py:unicl",
         "slip": "configs/default.py:slip", "filip": "configs/default.py:filip", "coca": "configs/default.py:coca",
         "albef": "configs/default.py:albef", "mae": "configs/vit.py:mae", "region": "configs/default.py:region",
         "clippo": "configs/default.py:clippo", "clippo_sigmoid": "configs/default.py:clippo_sigmoid",
         "negclip": "configs/default.py:negclip"}
# MAE drops patch tokens: a ViT without a stem only (a ResNet or a stem is refused, tests/test_mae.py).
# CLIPPO renders byte tokens onto the tiny towers' 32 px pages: 5 × 4 cells of 8 × 6 px.
# The tiny ResNet learns to read the pages more slowly: it gets 16 steps.
_PAGES = {"data.tokenizer": "bytes", "model.text.max_len": 20, "loss.render_cell": "(8, 6)", "loss.render_font_size": 8}
_PAGES_RESNET = {**_PAGES, "train.steps": 16}
# NegCLIP's negatives act on the text side and the loss only: the ViT cells suffice.
ONLY = {"mae": {"vit": {"model.image.stem": "()", "model.image.patch_size": 4}}, "negclip": {"vit": {}},
        "clippo": {"vit": _PAGES, "resnet": _PAGES_RESNET}, "clippo_sigmoid": {"vit": _PAGES, "resnet": _PAGES_RESNET}}


# Tiny image towers of each kind (the ViT's are conftest's defaults); a
# ResNet of two stages maps 32 px to 4 x 4 tokens. From t = 30 (the default
# recipe's) the tiny ResNet's loss first rises for a few steps: it gets 12.
TOWERS = {"vit": {}, "resnet": {"model.image.tower": "resnet", "model.image.layers": "(1, 1)",
                                "model.image.base_width": 16, "model.image.num_heads": 2, "train.steps": 12}}


def _cells():
    """(tower, kind, impl, tile): every objective on every tower it supports
    with the gathered impl, and on the ViT with the tiled one. "ring" is
    "tiled" with one tile per block (its values and gradients are checked
    against the float64 references in test_losses.py); the impl acts on the
    loss alone, so one tower suffices for it. The session fixture trains
    (vit, softmax, all_gather), test_softmax_run_learns_and_logs_everything
    checks it."""
    for kind in KINDS:
        for tower in TOWERS:
            if kind in ONLY and tower not in ONLY[kind]:
                continue
            if (tower, kind) != ("vit", "softmax"):
                yield tower, kind, "all_gather", 0
            if tower == "vit":
                yield tower, kind, "tiled", 2


@pytest.mark.slow
@pytest.mark.parametrize("tower,kind,impl,tile", list(_cells()))
def test_every_tower_objective_and_impl_trains(data_dir, tmp_path, tower, kind, impl, tile):
    # Two data devices: the impls' collectives run; 1, 2, 4 and 8 devices are test_losses.py's (and 8
    # devices cost a cell a third more time on 2 cores).
    cfg = load_tiny_config(data_dir, KINDS[kind], **{"train.steps": 6, "loss.impl": impl, "loss.tile": tile,
                                                     "train.eval_every": 0, "train.checkpoint_every": 100,
                                                     "mesh.data": 2, **TOWERS[tower], **ONLY.get(kind, {}).get(tower, {})})
    train.train(cfg, str(tmp_path))
    rows = [r for r in metrics.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.05, rows
    if kind == "slip":
        assert "train/ssl_loss" in rows[-1] and "train/clip_loss" in rows[-1]
    if kind == "coca":
        assert rows[-1]["train/caption_loss"] < rows[0]["train/caption_loss"] and "train/clip_loss" in rows[-1]
    if kind == "albef":
        assert rows[-1]["train/mlm_loss"] < rows[0]["train/mlm_loss"] and "train/itm_loss" in rows[-1]
    if kind == "mae":
        assert rows[-1]["train/mae_loss"] < rows[0]["train/mae_loss"]
    if kind == "region":
        assert rows[-1]["train/region_loss"] < rows[0]["train/region_loss"]
    if kind == "negclip":  # every caption of the embedded data has words to swap
        assert rows[-1]["train/negatives"] == 1.0


def test_evaluate_cli_reproduces_the_final_metrics(trained_softmax, data_dir, capsys):
    workdir, rows = trained_softmax
    out = evaluate.main(["--config", "configs/default.py", "--workdir", workdir] + tiny_overrides(data_dir))
    assert out
    for k, v in out.items():
        assert rows[-1][k] == pytest.approx(v, abs=1e-6), k
    assert "zeroshot/test_seen/top1" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_and_restart_reproduce_the_uninterrupted_run(trained_softmax, data_dir, tmp_path):
    _, reference = trained_softmax
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/default.py", "--workdir", workdir]
    cmd += tiny_overrides(data_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_ckpt = os.path.join(workdir, "checkpoints", "4")
    deadline = time.time() + 300
    while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_rows = metrics.read_metrics(workdir)
    assert killed_rows and killed_rows[-1]["step"] < 24, "the run finished before it could be killed"

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stderr
    resumed = metrics.read_metrics(workdir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    assert _deterministic(resumed) == _deterministic(reference)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    cfg = load_tiny_config(data_dir, **{"optim.lr": 1e30, "optim.warmup_steps": 1, "optim.grad_clip": 1e30,
                                         "train.checkpoint_every": 1, "train.steps": 10})
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step (\d+)") as info:
        train.train(cfg, str(tmp_path))
    bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and saved[-1] == bad_step - 1
    assert f"step {bad_step - 1}" in str(info.value)
    rows = metrics.read_metrics(str(tmp_path))
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
