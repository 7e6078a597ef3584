"""Sweeps and run comparison: a grid of arms survives a kill, every arm
equals its run alone, the summary equals a direct computation."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax import compare, config as config_lib, metrics, sweep, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("train/examples_per_sec",)
SMALL = {"train.steps": 6, "train.log_every": 2, "train.checkpoint_every": 2, "train.eval_every": 0,
         "optim.warmup_steps": 2}
AXES = ["--sweep", "loss.kind", "softmax", "sigmoid", "--sweep", "train.batch_size", "16", "32", "--seeds", "0", "1"]


def _det(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _sweep_cmd(data_dir, out):
    return ([sys.executable, "-m", "vlm_jax.sweep", "--config", "configs/default.py", "--out", out, "--parallel", "2"]
            + AXES + tiny_overrides(data_dir, **SMALL))


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_every_arm_equals_its_run_alone(data_dir, tmp_path):
    out = str(tmp_path / "sweep")
    cmd = _sweep_cmd(data_dir, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    arms_dir = os.path.join(out, "arms")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # kill once two arms are done and others started
        done = [a for a in os.listdir(arms_dir) if os.path.exists(os.path.join(arms_dir, a, sweep.DONE))] \
            if os.path.isdir(arms_dir) else []
        if len(done) >= 2 and len(os.listdir(arms_dir)) > len(done):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    finished_before = sorted(a for a in os.listdir(arms_dir) if os.path.exists(os.path.join(arms_dir, a, sweep.DONE)))
    assert 2 <= len(finished_before) < 8
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(finished_before)} already done" in again.stderr
    names = sorted(os.listdir(arms_dir))
    assert len(names) == 8 and all(os.path.exists(os.path.join(arms_dir, a, sweep.DONE)) for a in names)
    for name in names:
        kind = "sigmoid" if "loss.kind=sigmoid" in name else "softmax"
        batch = 32 if "batch_size=32" in name else 16
        seed = int(name.rsplit("seed=", 1)[1])
        cfg = load_tiny_config(data_dir, **SMALL, **{"loss.kind": kind, "train.batch_size": batch, "seed": seed})
        alone = str(tmp_path / "alone" / name)
        train.train(cfg, alone)
        assert _det(metrics.read_metrics(os.path.join(arms_dir, name))) == _det(metrics.read_metrics(alone)), name

    # The summary: mean and sample standard deviation over the two seeds, from metrics.jsonl directly.
    with open(os.path.join(out, "summary.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "train/loss"]
    assert len(rows) == 8  # 4 arms × (final, best)
    for r in rows:
        finals = []
        for name in names:
            if f"loss.kind={r['loss.kind']}_" in name and f"batch_size={r['train.batch_size']}_" in name:
                losses = [m["train/loss"] for m in metrics.read_metrics(os.path.join(arms_dir, name))]
                finals.append(losses[-1] if r["stat"] == "final" else min(losses))
        assert len(finals) == 2
        assert float(r["mean"]) == pytest.approx(np.mean(finals), rel=1e-12)
        assert float(r["std"]) == pytest.approx(np.std(finals, ddof=1), rel=1e-12)
    table = open(os.path.join(out, "summary.md")).read()
    assert "| loss.kind | train.batch_size | seeds | train/loss (final) |" in table
    assert os.path.exists(os.path.join(out, "plots", "train_loss.png"))
    assert os.path.exists(os.path.join(out, "plots", "train_loss_vs_train.batch_size.png"))


def test_a_sweep_with_another_command_or_a_bad_arm_is_refused_before_running(data_dir, tmp_path):
    out = str(tmp_path / "s")
    args = sweep.parse_args(["--config", "configs/default.py", "--out", out, "--sweep", "train.steps", "1"]
                            + tiny_overrides(data_dir))
    sweep.check_or_record(out, sweep.spec(args, sweep.arms(args)))
    other = sweep.parse_args(["--config", "configs/default.py", "--out", out, "--sweep", "train.steps", "2"]
                             + tiny_overrides(data_dir))
    with pytest.raises(config_lib.ConfigError, match="another command .*differs in: arms, sweep"):
        sweep.run(other)
    bad = sweep.parse_args(["--config", "configs/default.py", "--out", str(tmp_path / "t"),
                            "--sweep", "loss.knd", "softmax"] + tiny_overrides(data_dir))
    with pytest.raises(config_lib.ConfigError, match=r"arm 000_loss.knd=softmax_seed=0: .*did you mean 'kind'"):
        sweep.run(bad)
    assert not os.path.exists(os.path.join(str(tmp_path / "t"), "arms"))
    zipped = sweep.parse_args(["--config", "c", "--out", "o", "--zip", "train.batch_size", "64", "256",
                               "--zip", "train.steps", "800", "200", "--sweep", "loss.kind", "softmax", "sigmoid",
                               "--seeds", "0", "1", "2"])
    names = [a["name"] for a in sweep.arms(zipped)]
    assert len(names) == 2 * 2 * 3 and names[0] == "000_loss.kind=softmax_train.batch_size=64_train.steps=800_seed=0"


def test_compare_groups_by_what_differs_and_not_by_seed(trained_softmax):
    workdir, _ = trained_softmax
    runs = [compare.load_run(workdir)]
    assert compare.varied_fields(runs) == []
    fields, groups = compare.group_runs(runs)
    assert fields == [] and len(groups) == 1 and len(groups[0].runs) == 1
    assert compare.mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))


def test_fields_that_vary_together_are_one_plot_axis():
    def group(**fields):
        return compare.Group({f"config.{k.replace('__', '.')}": v for k, v in fields.items()}, [])

    groups = [group(loss__kind=kind, loss__log_t_init=t, train__batch_size=b, train__steps=16384 // b)
              for kind, t in (("softmax", 2.66), ("sigmoid", 2.30)) for b in (16, 64, 256)]
    fields = sorted(groups[0].fields)
    assert compare.covarying_classes(fields, groups) == [["config.loss.kind", "config.loss.log_t_init"],
                                                         ["config.train.batch_size", "config.train.steps"]]
    assert compare.covarying_classes(fields, groups, lead=["config.train.steps"])[1] == [
        "config.train.steps", "config.train.batch_size"]
    grid = [group(a=a, b=b) for a in (1, 2) for b in (1, 2)]  # a grid: independent axes
    assert compare.covarying_classes(["config.a", "config.b"], grid) == [["config.a"], ["config.b"]]
