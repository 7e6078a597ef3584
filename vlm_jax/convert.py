"""Published checkpoints into vlm_jax workdirs, and vlm_jax checkpoints out again.

    python -m vlm_jax.convert --config configs/published.py:openclip_vit_b32 \\
        --source open_clip_model.safetensors --workdir workdirs/b32
    python -m vlm_jax.convert --config configs/published.py:openclip_vit_b32 \\
        --workdir workdirs/b32 --export b32.safetensors [--step N]

Import reads an OpenCLIP/OpenAI state dict (``.safetensors``, ``.pt``, ``.bin``)
or a big_vision ``.npz`` (the layout is recognised from the keys; ``--layout``
forces one), maps it onto the config's model (``vlm_jax.weights``: every
missing, unexpected or mis-shaped key is listed at once; a position
embedding of another grid is resampled as OpenCLIP does), and writes a
workdir whose checkpoint 0 holds those parameters with a fresh optimizer
state: ``vlm_jax.evaluate`` and ``vlm_jax.train`` (fine-tuning from step 0)
take it with the same ``--config``, and ``config.model_init.workdir`` (LiT:
``configs/lit.py:<workdir>``) loads from it. ``converted.json`` records the
source file, its size and SHA-256, and the layout.

Export writes the parameters of a workdir's checkpoint (default: the latest)
in the layout of the file's extension (``.npz``: big_vision; otherwise
OpenCLIP) or ``--layout``; ``open_clip`` loads the result with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Sequence

import jax

from vlm_jax import checkpoint, rules, session, weights
from vlm_jax import workdir as workdir_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError

PROVENANCE = "converted.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _writable_new_workdir(workdir: str) -> None:
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise ConfigError(f"--workdir {workdir} already holds checkpoints; convert into a new directory "
                          f"(nothing was changed)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: not writable; give a directory you can write to")


def import_checkpoint(config, source: str, workdir: str, layout: str = "") -> dict:
    """Writes ``workdir`` with checkpoint 0 holding ``source``'s parameters; returns the provenance record."""
    run = session.setup(config)
    abstract = rules._flat(run.abstract["params"])
    flat, layout = weights.import_params(source, config, abstract, run.objective.scalar_names, layout)
    _writable_new_workdir(workdir)
    with workdir_lib.run_lock(workdir):
        state = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(config.seed))
        state["params"] = jax.tree_util.tree_map(jax.device_put, rules._unflat(flat), run.state_sh["params"])
        train_ds = pipeline.train_dataset(
            run.ds, config.data, config.model.text.max_len, config.train.batch_size, config.seed,
            jax.process_index(), jax.process_count(), fields=run.fields,
            augment=run.objective.augment)
        mgr = checkpoint.manager(workdir, config.train.keep_checkpoints)
        checkpoint.save(mgr, 0, state, iter(train_ds).get_state(), checkpoint.compat_record(config, run.abstract["params"]))
        checkpoint.finish(mgr)
        mgr.close()
        record = {"source": os.path.abspath(source), "bytes": os.path.getsize(source), "sha256": _sha256(source),
                  "layout": layout, "parameters": int(sum(v.size for v in flat.values()))}
        if jax.process_index() == 0:
            workdir_lib.record_config(workdir, config.to_dict(), 0, {})
            with open(os.path.join(workdir, PROVENANCE), "w") as f:
                json.dump(record, f, indent=1)
    return record


def export_checkpoint(config, workdir: str, path: str, layout: str = "", step: int = -1) -> str:
    """Writes checkpoint ``step`` (-1: the latest) of ``workdir`` to ``path``; returns the layout."""
    run = session.setup(config)
    try:
        params, step = rules.load_params(workdir, step)
    except ValueError as e:
        raise ConfigError(str(e).replace("config.model_init.workdir", "--workdir")
                          .replace("config.model_init.step", "--step")) from None
    abstract = rules._flat(run.abstract["params"])
    wrong = sorted(k for k in abstract if k not in params or tuple(params[k].shape) != tuple(abstract[k].shape))
    if wrong or set(params) != set(abstract):
        raise ConfigError(f"--workdir {workdir} step {step} was not written with this --config's model "
                          f"(e.g. {(wrong or sorted(set(params) ^ set(abstract)))[:3]}); give the config it was "
                          f"trained or converted with")
    return weights.export_params(params, config, run.objective.scalar_names, path, layout)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="", help="checkpoint file to import (.safetensors, .pt, .bin, .npz)")
    parser.add_argument("--export", default="", help="file to write the workdir's parameters to")
    parser.add_argument("--layout", default="", choices=["", *weights.LAYOUTS],
                        help="open_clip or big_vision (default: from the keys on import, the extension on export)")
    parser.add_argument("--step", type=int, default=-1, help="export: the checkpoint step (default: the latest)")


def main(argv: Sequence[str] | None = None) -> str:
    args = session.parse_args(argv, prog="python -m vlm_jax.convert", description=__doc__.split("\n\n")[0],
                              extra=_flags)
    if bool(args.source) == bool(args.export):
        raise SystemExit("error: give either --source FILE (import into --workdir) or --export FILE "
                         "(write --workdir's checkpoint)")
    config = session.load_config_or_exit(args)
    try:
        if args.source:
            record = import_checkpoint(config, args.source, args.workdir, args.layout)
            message = (f"imported {record['parameters']:,} parameters ({record['layout']} layout) from "
                       f"{args.source} into {args.workdir} as checkpoint 0")
        else:
            layout = export_checkpoint(config, args.workdir, args.export, args.layout, args.step)
            message = f"exported {args.workdir} to {args.export} ({layout} layout)"
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except checkpoint.WriteFailed as e:  # import: no config or provenance record was written after it
        raise SystemExit(f"error: writing checkpoint 0 to --workdir {args.workdir} failed ({e}); free space or "
                         f"fix permissions, then remove {args.workdir} and convert again") from None
    print(message, file=sys.stderr)
    return message


if __name__ == "__main__":
    main(sys.argv[1:])
