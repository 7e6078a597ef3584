"""Two processes × 4 CPU devices through JAX's distributed runtime reproduce
the single-process 8-device run (loss trajectory, evaluation, checkpoints), and
one process resumes their checkpoint."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from vlm_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _assert_same_metrics(rows, reference):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for got, want in zip(rows, reference):
        for key, value in want.items():
            if key != "train/examples_per_sec":
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], key)


@pytest.mark.slow
def test_two_processes_match_one(trained_softmax, data_dir, tmp_path):
    _, reference = trained_softmax  # one process, 8 devices, the same config
    workdir = str(tmp_path / "multihost")
    port = _free_port()
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/default.py", "--workdir", workdir,
           "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2"] + tiny_overrides(data_dir)
    procs = [subprocess.Popen(cmd + ["--process_id", str(i)], cwd=REPO, env=_env(4),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process run did not finish in 600 s")
        errors.append(err)
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    _assert_same_metrics(metrics.read_metrics(workdir), reference)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "24"

    # Elastic resume: the 2-process run's step-20 checkpoint, resumed by one process.
    import shutil

    from conftest import load_tiny_config
    from vlm_jax import train

    shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
    train.train(load_tiny_config(data_dir), workdir)
    _assert_same_metrics(metrics.read_metrics(workdir), reference)
