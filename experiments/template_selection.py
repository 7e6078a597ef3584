"""Choose zero-shot prompt templates on a split that is not a test split.

    python experiments/template_selection.py --split validation \\
        --templates "a {}" "a small {}" "a large {}" --workdirs WORKDIR [WORKDIR ...]

Scores every non-empty subset of the candidate templates (their embeddings
pooled as the zero-shot evaluator pools them) with each run's latest
checkpoint, through the run's own zero-shot entry (its classes, filter and
number of examples) on ``--split``, and prints a Markdown table: top-1 per
run, mean ± sample standard deviation over the runs, best subset first.
Image and prompt embeddings are computed once per run. Choosing on
``validation`` (the embedded dataset's scenes drawn like train's, none a
train scene) leaves the test splits unread; docs/evaluation.md has the
choice of the default templates made so.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Sequence

import numpy as np

from vlm_jax import config as config_lib, evaluators, session
from vlm_jax.errors import cli_errors


def subset_scores(workdir: str, split: str, templates: Sequence[str], entry_name: str = "zeroshot",
                  max_size: int = 0) -> dict[tuple[int, ...], dict[str, float]]:
    """{template indices: zero-shot metrics on ``split``} for every non-empty
    subset of ``templates`` (up to ``max_size`` of them; 0 = any size), with
    the latest checkpoint of ``workdir`` and its recorded config."""
    config = config_lib.from_workdir(workdir)
    if entry_name not in config.evals or config.evals[entry_name].kind != "zeroshot":
        raise config_lib.ConfigError(f"{workdir}: its config has no zero-shot entry config.evals.{entry_name}")
    for name in [n for n in config.evals if n != entry_name]:  # nothing else is loaded or encoded
        del config.evals[name]
    entry = config.evals[entry_name]
    with entry.unlocked():
        entry.templates, entry.template_set, entry.templates_file = tuple(templates), "", ""
        entry.splits = (split,)
    config_lib.check_config(config)
    run = session.setup(config)
    _, params = session.restore_params(config, run, workdir)
    suite = evaluators.Suite(config, run.mesh, run.objective.embedder(), run.ds)
    ev = next(e for e in suite.evaluators if e.name == entry_name)
    sizes = range(1, (max_size or len(templates)) + 1)
    subsets = [s for k in sizes for s in itertools.combinations(range(len(templates)), k)]
    with suite.ctx.one_pass():  # the split's images and the prompts are encoded once
        return {s: ev.evaluate_split(params, split, templates=s) for s in subsets}


def table(results: dict[str, dict[tuple[int, ...], dict[str, float]]], templates: Sequence[str],
          metric: str = "top1") -> str:
    """Markdown: one row per subset, best mean first."""
    runs = list(results)
    subsets = list(next(iter(results.values())))
    rows = []
    for s in subsets:
        values = np.asarray([results[w][s][metric] for w in runs]) * 100
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append((float(values.mean()), sd, s, values))
    rows.sort(key=lambda r: -r[0])
    lines = ["| templates | " + " | ".join(runs) + " | mean ± sd |", "|---" * (len(runs) + 2) + "|"]
    for mean, sd, s, values in rows:
        names = " + ".join(f'"{templates[i]}"' for i in s)
        lines.append(f"| {names} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {mean:.1f} ± {sd:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdirs", nargs="+", required=True, help="training runs (each one's latest checkpoint)")
    p.add_argument("--split", default="validation", help="the split to choose on (not a test split)")
    p.add_argument("--templates", nargs="+", required=True, help="candidate templates, each with one '{}'")
    p.add_argument("--entry", default="zeroshot", help="the runs' zero-shot entry in config.evals")
    p.add_argument("--max_size", type=int, default=0, help="largest subset scored (0: every size)")
    p.add_argument("--metric", default="top1", help="top1, top5 or mean_per_class_recall")
    args = p.parse_args(argv)
    with cli_errors():
        results = {w: subset_scores(w, args.split, args.templates, args.entry, args.max_size) for w in args.workdirs}
    print(f"command: python experiments/template_selection.py {' '.join(argv)}")
    print(f"zero-shot {args.metric} (%) on {args.split!r}")
    print(table(results, args.templates, args.metric))


if __name__ == "__main__":
    main(sys.argv[1:])
