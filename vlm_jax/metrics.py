"""Metrics: WORKDIR/metrics.jsonl, TensorBoard events (no TensorFlow), console progress."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything after it is lost anyway
    return rows


def read_metrics(workdir: str) -> list[dict]:
    return _read_jsonl(os.path.join(workdir, "metrics.jsonl"))


class MetricsWriter:
    """Appends one JSON object per logged step; on resume from step s it first
    drops rows after s, so the file always describes one consistent run."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        kept = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for k, v in metrics.items():
            if math.isfinite(float(v)):
                self._tb.add_scalar(k, float(v), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A one-line progress bar with ETA (redrawn in place on a terminal,
    printed at log steps otherwise)."""

    def __init__(self, start: int, total: int, enabled: bool = True, stream=sys.stderr):
        self.start, self.total, self.enabled, self.stream = start, total, enabled, stream
        self.t0 = time.time()
        self.tty = stream.isatty()

    def update(self, step: int, text: str = "", force: bool = False) -> None:
        if not self.enabled or not (self.tty or force):
            return
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done else float("nan")
        frac = step / self.total
        bar = "#" * int(25 * frac) + "." * (25 - int(25 * frac))
        eta_s = _fmt_seconds(eta) if math.isfinite(eta) else "?"
        line = f"step {step}/{self.total} [{bar}] {100 * frac:3.0f}% {text} elapsed {_fmt_seconds(elapsed)} ETA {eta_s}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
