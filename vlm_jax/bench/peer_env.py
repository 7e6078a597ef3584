"""An isolated virtual environment holding the peers (torch, open_clip, webdataset).

Peers are never dependencies of vlm_jax: the benchmarks and parity tests that
compare against them run the peer's code in this environment's python and
exchange arrays through files. ``ensure_venv`` creates it with ``python -m
venv`` and ``pip install`` on first use (minutes, several GB: PyPI's default
torch build), and afterwards only adds packages it lacks; a marker file lists
what it holds. ``VLM_JAX_PEER_PYTHON`` names an existing interpreter with the
peers installed instead (nothing is then installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

DEFAULT_VENV = os.path.join(tempfile.gettempdir(), "vlm_jax_peer_venv")
MARKER = ".vlm_jax_peer_ready.json"

# What the parity tests need: open_clip brings timm (OpenCLIP's SigLIP image
# tower) and torchvision; safetensors writes the state dicts OpenCLIP ships.
PARITY_PACKAGES: tuple[str, ...] = ("torch", "open_clip_torch", "safetensors")
VERSIONED = ("torch", "torchvision", "open_clip_torch", "timm", "safetensors", "webdataset")


def ensure_venv(packages: Sequence[str] = PARITY_PACKAGES, path: str = DEFAULT_VENV) -> str:
    """The python of an environment at ``path`` that holds ``packages``."""
    override = os.environ.get("VLM_JAX_PEER_PYTHON")
    if override:
        return override
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, MARKER)
    record = {"packages": []}
    if os.path.exists(marker) and os.path.exists(python):
        with open(marker) as f:
            record = json.load(f)
        missing = [p for p in packages if p not in record["packages"]]
        if not missing:
            return python
    else:
        missing = list(packages)
    start = time.perf_counter()
    print(f"peer venv: installing {' '.join(missing)} into {path} (minutes the first time) ...",
          file=sys.stderr, flush=True)
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *missing], check=True)
    versions = subprocess.run(
        [python, "-c", "import json, importlib.metadata as m\n"
                       f"out = {{}}\nfor p in {list(VERSIONED)!r}:\n"
                       "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\n"
                       "print(json.dumps(out))"],
        check=True, capture_output=True, text=True).stdout.strip()
    record = {"packages": sorted(set(record["packages"]) | set(missing)), "versions": json.loads(versions),
              "install_seconds": round(time.perf_counter() - start, 1)}
    with open(marker, "w") as f:
        json.dump(record, f)
    print(f"peer venv: ready, {record}", file=sys.stderr, flush=True)
    return python


def run_script(python: str, script: str, *args: str, timeout: float = 1800) -> str:
    """Runs the file ``script`` with the peer python; its stdout, or a RuntimeError with its stderr's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([python, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise RuntimeError(f"the peer script {script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
