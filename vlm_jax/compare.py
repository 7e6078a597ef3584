"""Compare runs: a table of final and best metrics, mean ± standard deviation
over seeds, and plots.

    python -m vlm_jax.compare WORKDIR... --out DIR [--metrics REGEX ...]

Runs are grouped by the config fields whose values differ between them
(their ``config.json``), the seed excepted: the runs of one group are the
seeds of one arm. For every metric in ``metrics.jsonl``: the final value (at
the last step that logged it) and the best (lowest for a loss, highest
otherwise), averaged over the group with the sample standard deviation
(n − 1; 0 for a single seed). Writes DIR/summary.md (the metrics matching
``--metrics``), DIR/summary.csv (every metric) and, with matplotlib,
DIR/plots/<metric>.png (the metric against step, one line per run) and
DIR/plots/<metric>_vs_<field>.png (final value against each varied field;
fields that vary together, like zipped sweep axes, are one axis named by
the first of them).
``python -m vlm_jax.sweep`` writes the same summary for its arms.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

from vlm_jax.checkpoint import flatten_config
from vlm_jax.errors import ConfigError, cli_errors
from vlm_jax.metrics import read_metrics

DEFAULT_METRICS = (r"^train/loss$", r"/top1$", r"/i2t_r1$", r"^compositional/.*/mean$")
NOT_METRICS = ("step", "train/examples_per_sec", "train/learning_rate")
SEED = "config.seed"


@dataclasses.dataclass
class Run:
    workdir: str
    config: dict[str, Any]  # flattened: "config.train.steps" -> 500
    rows: list[dict[str, float]]

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[metric]) for r in self.rows if metric in r]
        return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts], np.float64)

    def final(self, metric: str) -> float:
        return float(self.series(metric)[1][-1])

    def best(self, metric: str) -> float:
        values = self.series(metric)[1]
        return float(values.min() if "loss" in metric else values.max())


def load_run(workdir: str) -> Run:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            config = flatten_config(json.load(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{workdir}: no readable config.json ({e}); is it a training workdir?") from None
    rows = read_metrics(workdir)
    if not rows:
        raise ConfigError(f"{workdir}: metrics.jsonl is empty or missing")
    return Run(workdir, config, rows)


def varied_fields(runs: Sequence[Run]) -> list[str]:
    """Config fields whose values differ between the runs, the seed excepted."""
    keys = sorted(set().union(*(r.config for r in runs)))
    out = []
    for k in keys:
        if k == SEED or k.startswith("config.evals."):
            continue
        values = {json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}
        if len(values) > 1:
            out.append(k)
    return out


@dataclasses.dataclass
class Group:
    fields: dict[str, Any]  # varied field -> value
    runs: list[Run]


def group_runs(runs: Sequence[Run]) -> tuple[list[str], list[Group]]:
    fields = varied_fields(runs)
    groups: dict[str, Group] = {}
    for r in runs:
        values = {f: r.config.get(f) for f in fields}
        key = json.dumps(values, sort_keys=True, default=str)
        groups.setdefault(key, Group(values, [])).runs.append(r)
    return fields, list(groups.values())


def covarying_classes(fields: Sequence[str], groups: Sequence[Group], lead: Sequence[str] = ()) -> list[list[str]]:
    """The varied fields in classes of fields that vary together: two fields
    are in one class when, over the groups, each value of one goes with one
    value of the other (zipped sweep axes; a loss and its temperature init).
    Each class is one axis of the plots against a swept value; a field in
    ``lead`` (``config.``-prefixed) comes first in its class and names it."""
    def cells(f):
        return [_cell(g.fields[f]) for g in groups]

    def one_to_one(a, b):
        pairs = set(zip(cells(a), cells(b)))
        return len(pairs) == len(set(cells(a))) == len(set(cells(b)))

    classes: list[list[str]] = []
    for f in fields:
        for c in classes:
            if one_to_one(c[0], f):
                c.append(f)
                break
        else:
            classes.append([f])
    rank = {f: i for i, f in enumerate(lead)}
    return [sorted(c, key=lambda f: rank.get(f, len(rank))) for c in classes]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); 0 for one value."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def metric_names(runs: Sequence[Run]) -> list[str]:
    names = dict.fromkeys(k for r in runs for row in r.rows for k in row if k not in NOT_METRICS)
    return [n for n in names if all(any(n in row for row in r.rows) for r in runs)]


def summarize(workdirs: Sequence[str], out: str, patterns: Sequence[str] = DEFAULT_METRICS,
              plots: bool = True, lead: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Writes summary.md, summary.csv and plots for ``workdirs`` into ``out``
    (``lead``: fields that name their plot axis, see ``covarying_classes``);
    returns the CSV rows."""
    runs = [load_run(w) for w in workdirs]
    fields, groups = group_runs(runs)
    metrics = metric_names(runs)
    rows = []
    for g in groups:
        for m in metrics:
            for stat in ("final", "best"):
                values = [getattr(r, stat)(m) for r in g.runs]
                mean, std = mean_std(values)
                rows.append({**{_short(f): _cell(v) for f, v in g.fields.items()}, "metric": m, "stat": stat,
                             "mean": mean, "std": std, "n": len(values),
                             "values": " ".join(repr(v) for v in values),
                             "workdirs": " ".join(os.path.basename(os.path.normpath(r.workdir)) for r in g.runs)})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["metric"])
        writer.writeheader()
        writer.writerows(rows)
    shown = [m for m in metrics if any(re.search(p, m) for p in patterns)]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(fields, groups, shown))
    if plots:
        plot(fields, groups, shown, os.path.join(out, "plots"), lead)
    return rows


def _short(field: str) -> str:
    return field[len("config."):] if field.startswith("config.") else field


def _cell(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def markdown(fields: Sequence[str], groups: Sequence[Group], metrics: Sequence[str]) -> str:
    head = [_short(f) for f in fields] + ["seeds"] + [f"{m} (final)" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [_cell(g.fields[f]) for f in fields] + [str(len(g.runs))]
        for m in metrics:
            mean, std = mean_std([r.final(m) for r in g.runs])
            cells.append(_format(m, mean, std, len(g.runs)))
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Final values, mean ± sample standard deviation over seeds; accuracies and recalls in %. "
            "Every metric, final and best, is in summary.csv.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _format(metric: str, mean: float, std: float, n: int) -> str:
    scale, digits = (1.0, 4) if "loss" in metric or not (0.0 <= mean <= 1.0) else (100.0, 1)
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if n > 1 else text


def plot(fields: Sequence[str], groups: Sequence[Group], metrics: Sequence[str], out: str,
         lead: Sequence[str] = ()) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare: matplotlib is not installed; no plots (pip install matplotlib)", file=sys.stderr)
        return
    os.makedirs(out, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    classes = covarying_classes(fields, groups, [f if f.startswith("config.") else f"config.{f}" for f in lead])
    for m in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, g in enumerate(groups):
            label = ", ".join(f"{_short(f).split('.')[-1]}={_cell(v)}" for f, v in g.fields.items()) or "run"
            for j, r in enumerate(g.runs):
                steps, values = r.series(m)
                ax.plot(steps, values, color=colours[i % len(colours)], alpha=0.9 if j == 0 else 0.45,
                        label=label if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, _file(m) + ".png"), dpi=110)
        plt.close(fig)
        for axis in classes:
            f = axis[0]  # names the axis (and the file)
            others = [c[0] for c in classes if c is not axis]  # one field names each other axis
            lines: dict[str, list[tuple[str, float, float]]] = {}
            for g in groups:
                key = ", ".join(f"{_short(o).split('.')[-1]}={_cell(g.fields[o])}" for o in others) or m
                x = " / ".join(_cell(g.fields[a]) for a in axis)
                lines.setdefault(key, []).append((x, *mean_std([r.final(m) for r in g.runs])))
            fig, ax = plt.subplots(figsize=(6, 4))
            xs = sorted({p[0] for pts in lines.values() for p in pts}, key=lambda x: _sort_key(x.split(" / ")[0]))
            for i, (key, pts) in enumerate(lines.items()):
                pts = sorted(pts, key=lambda p: xs.index(p[0]))
                ax.errorbar([xs.index(p[0]) for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                            marker="o", capsize=3, color=colours[i % len(colours)], label=key)
            ax.set_xticks(range(len(xs)), xs)
            ax.set_xlabel(" / ".join(_short(a) for a in axis))
            ax.set_ylabel(f"{m} (final)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(out, f"{_file(m)}_vs_{_file(_short(f))}.png"), dpi=110)
            plt.close(fig)


def _sort_key(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, math.inf, text)


def _file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", required=True, help="directory for summary.md, summary.csv and plots/")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="regexes of metrics for summary.md")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--lead", nargs="+", default=[], metavar="FIELD",
                   help="fields that name their axis when several vary together (e.g. train.batch_size)")
    args = p.parse_args(argv)
    with cli_errors():
        summarize(args.workdirs, args.out, args.metrics, plots=not args.no_plots, lead=args.lead)
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
