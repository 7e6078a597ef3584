"""Published weights in and out: OpenCLIP/OpenAI state dicts and big_vision SigLIP ``.npz``.

``import_params`` reads a checkpoint file (``formats``), maps it onto the
parameters of a vlm_jax model config through the layout's links
(``open_clip``, ``big_vision``) and checks every shape; ``export_params``
writes vlm_jax parameters back in a layout. Both are exact: export after
import reproduces the file's arrays, import after export the parameters.
A layout is one module with ``links(model_cfg, scalars)``, ``check``,
``normalise`` (the file's keys as the links name them), ``ignored`` and
``extra_tokens``, and one line in ``LAYOUTS``.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np

from vlm_jax.errors import ConfigError
from vlm_jax.weights import big_vision, formats, links, open_clip

LAYOUTS: dict[str, Any] = {
    "open_clip": open_clip,
    "big_vision": big_vision,
}

Flat = dict[str, np.ndarray]
_SCANNED = re.compile(r"^(.*)/encoder/blocks/block/(.*)$")
_UNSCANNED = re.compile(r"^(.*)/encoder/block(\d+)/(.*)$")


def detect(keys, path: str) -> str:
    keys = list(keys)
    if any(k.startswith(("params/img/", "img/")) for k in keys):
        return "big_vision"
    if any(k.startswith("visual.") for k in open_clip.normalise(dict.fromkeys(keys))):  # trainer/DDP prefixes off
        return "open_clip"
    raise ConfigError(f"{path}: neither an OpenCLIP state dict (visual.* keys) nor a big_vision checkpoint "
                      f"(params/img/* keys); first keys: {sorted(keys)[:5]}")


def layout_for_file(path: str) -> str:
    """The layout an exported file gets by default: big_vision for .npz, OpenCLIP otherwise."""
    return "big_vision" if path.lower().endswith(".npz") else "open_clip"


def unscan(flat: dict[str, Any]) -> dict[str, Any]:
    """``.../encoder/blocks/block/x`` (leading depth axis) -> ``.../encoder/block<i>/x``.
    Works on arrays and on shape tuples alike."""
    out = {}
    for k, v in flat.items():
        m = _SCANNED.match(k)
        if not m:
            out[k] = v
            continue
        depth = v[0] if isinstance(v, tuple) else v.shape[0]
        for i in range(depth):
            out[f"{m.group(1)}/encoder/block{i}/{m.group(2)}"] = v[1:] if isinstance(v, tuple) else v[i]
    return out


def rescan(flat: Flat) -> Flat:
    """The inverse of ``unscan``: blocks stacked in their index order."""
    out, stacks = {}, {}
    for k, v in flat.items():
        m = _UNSCANNED.match(k)
        if m:
            stacks.setdefault(f"{m.group(1)}/encoder/blocks/block/{m.group(3)}", {})[int(m.group(2))] = v
        else:
            out[k] = v
    for k, parts in stacks.items():
        out[k] = np.stack([parts[i] for i in range(len(parts))])
    return out


def _fix_posemb(extra: int):
    def fix(path: str, a: np.ndarray, want: tuple) -> np.ndarray | None:
        if path != "image/pos_embed":
            return None
        resized = links.resize_posemb(a, want, extra)
        if resized is not None:
            print(f"resampled image/pos_embed from {tuple(a.shape)} to {want} (another image size)", file=sys.stderr)
        return resized

    return fix


def import_params(path: str, config, abstract: Flat, scalars: tuple[str, ...], layout: str = "") -> tuple[Flat, str]:
    """(vlm_jax parameters keyed by path, layout) from the file at ``path``.

    ``abstract``: the config's parameters (``{path: ShapeDtypeStruct}``, scanned
    or not as config.model.scan says); a position embedding of another square
    grid is resampled (``links.resize_posemb``); every other difference is a
    ConfigError listing each missing, unexpected or mis-shaped key."""
    try:
        theirs = formats.read(path)
    except formats.FormatError as e:
        raise ConfigError(str(e)) from None
    layout = layout or detect(theirs, path)
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: {layout!r} is not one of {sorted(LAYOUTS)}")
    mod = LAYOUTS[layout]
    theirs = mod.normalise(theirs)
    shapes = unscan({k: tuple(v.shape) for k, v in abstract.items()})
    try:
        ours = links.to_ours(mod.links(config.model, scalars), theirs, shapes, mod.ignored,
                             _fix_posemb(mod.extra_tokens(config.model)))
    except links.Mismatch as e:
        listed = "\n".join(f"  {p}" for p in e.problems)
        raise ConfigError(f"{path} ({layout} layout) does not fit the config's model: {len(e.problems)} "
                          f"problem(s); fix the config (configs/published.py has the released shapes) or the "
                          f"file:\n{listed}") from None
    if config.model.scan:
        ours = rescan(ours)
    return {k: np.asarray(v).astype(abstract[k].dtype, copy=False) for k, v in ours.items()}, layout


def export_params(params: Flat, config, scalars: tuple[str, ...], path: str, layout: str = "") -> str:
    """Writes ``params`` (keyed by path) to ``path`` in ``layout`` (default by extension); returns the layout."""
    layout = layout or layout_for_file(path)
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: {layout!r} is not one of {sorted(LAYOUTS)}")
    flat = unscan({k: np.asarray(v) for k, v in params.items()})
    try:
        theirs = links.to_theirs(LAYOUTS[layout].links(config.model, scalars), flat)
    except links.Mismatch as e:
        raise ConfigError(f"the model does not fit the {layout} layout: " + "; ".join(e.problems)) from None
    try:
        formats.write(path, theirs)
    except formats.FormatError as e:
        raise ConfigError(str(e)) from None
    return layout
