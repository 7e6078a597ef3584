"""Evaluators: one module each, one line each in ``EVALUATORS``.

``config.evals`` holds named entries, each ``{kind, every, dataset, splits,
...}`` (``entry(kind, **fields)`` builds one with every default); ``Suite``
builds the evaluators of a run once and runs those that are due. To add a
kind: write ``vlm_jax/evaluators/<name>.py`` with a subclass of
``Evaluator``, add its line below, and test it.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from jax.sharding import Mesh

from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators.base import COMMON_FIELDS, Context, Embedder, Evaluator, Metrics, check_entry_fields
from vlm_jax.evaluators.compositional import Compositional
from vlm_jax.evaluators.dense import Detection, Segmentation
from vlm_jax.evaluators.generative import Captioning, GenerativeZeroShot
from vlm_jax.evaluators.probe import FewShot, LinearProbe
from vlm_jax.evaluators.retrieval import Retrieval
from vlm_jax.evaluators.transfer import VPT, ClipAdapter, CoOp, TipAdapter
from vlm_jax.evaluators.zeroshot import ZeroShot

EVALUATORS: dict[str, type[Evaluator]] = {
    "zeroshot": ZeroShot,
    "retrieval": Retrieval,
    "linear_probe": LinearProbe,
    "fewshot": FewShot,
    "compositional": Compositional,
    "captioning": Captioning,
    "genzeroshot": GenerativeZeroShot,
    "segmentation": Segmentation,
    "detection": Detection,
    "tip_adapter": TipAdapter,
    "clip_adapter": ClipAdapter,
    "coop": CoOp,
    "vpt": VPT,
}


def _kind(kind: str, field: str) -> type[Evaluator]:
    if kind not in EVALUATORS:
        raise ConfigError(f"config.{field}.kind: must be one of {sorted(EVALUATORS)}, got {kind!r}")
    return EVALUATORS[kind]


def entry(kind: str, **fields: Any) -> ml_collections.ConfigDict:
    """A locked config.evals entry of ``kind`` with every field at its default."""
    cls = _kind(kind, "evals.<entry>")
    defaults = {**COMMON_FIELDS, **cls.FIELDS, "kind": kind}
    check_entry_fields(ml_collections.ConfigDict(fields), defaults, "evals.<entry>")
    e = ml_collections.ConfigDict({**defaults, **fields})
    e.lock()
    return e


def check(config) -> None:
    """Config-time checks of every entry: its kind, its fields, their values."""
    for name, e in config.evals.items():
        field = f"evals.{name}"
        if not isinstance(e, ml_collections.ConfigDict) or "kind" not in e:
            raise ConfigError(f"config.{field}: must be an entry made by vlm_jax.config.eval_entry(kind, ...)")
        cls = _kind(e.kind, field)
        check_entry_fields(e, {**COMMON_FIELDS, **cls.FIELDS}, field)
        cls.check(e, field)


class Suite:
    """Every evaluator of a run, built once (datasets opened, splits loaded,
    encoders jitted); ``run(params, step, total)`` runs the due ones."""

    def __init__(self, config, mesh: Mesh, embedder: Embedder, train_data: pipeline.Dataset):
        self.ctx = Context(config, mesh, embedder, train_data)
        self._ran: list[Evaluator] = []
        entries = [(name, e) for name, e in config.evals.items() if e.splits]
        seen: dict[tuple[str, str], int] = {}
        for _, e in entries:
            for split in e.splits:
                seen[(e.kind, split)] = seen.get((e.kind, split), 0) + 1
        self.evaluators: list[Evaluator] = []
        for name, e in entries:
            clash = any(seen[(e.kind, split)] > 1 for split in e.splits)
            self.evaluators.append(EVALUATORS[e.kind](name, e, self.ctx, prefix=f"{name}/" if clash else ""))

    def due(self, step: int, total: int) -> bool:
        return any(ev.due(step, total) for ev in self.evaluators)

    def run(self, params, step: int | None = None, total: int | None = None) -> Metrics:
        """Metrics of the evaluators due at ``step`` (all of them when step is None)."""
        out: Metrics = {}
        self._ran = []
        with self.ctx.one_pass():
            for ev in self.evaluators:
                if step is None or ev.due(step, total):
                    out.update(ev.run(params))
                    self._ran.append(ev)
        return out

    def details(self) -> dict[str, Any]:
        """What the last ``run`` keeps beyond its metrics (per-class accuracy,
        chosen regularisation), keyed ``[<entry>/]<kind>/<split>`` like the metrics."""
        return {f"{ev.prefix}{ev.namespace}/{split}": d for ev in self._ran for split, d in ev.details.items()}


def markdown(step: int, metrics: Metrics) -> str:
    """The metrics as one Markdown table per evaluator kind: a row per
    ``[<entry>/]<kind>/<split>``, a column per metric (accuracies and recalls
    in %)."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        head, split, name = key.rsplit("/", 2)
        tables.setdefault(head, {}).setdefault(split, {})[name] = value
    lines = [f"# Evaluation at step {step}"]
    for head, rows in tables.items():
        columns = list(dict.fromkeys(c for row in rows.values() for c in row))  # the evaluator's own order
        lines += ["", f"## {head}", "", "| split | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for split, row in rows.items():
            cells = [_cell(c, row[c]) if c in row else "" for c in columns]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(name: str, value: float) -> str:
    return f"{value:.0e}" if name == "l2" else f"{100 * value:.1f}"


__all__ = ["EVALUATORS", "Evaluator", "Embedder", "Suite", "check", "entry", "markdown"]
