"""Links between a foreign checkpoint's tensors and vlm_jax parameters.

A ``Link`` ties some of the file's keys to some vlm_jax parameter paths with
a pair of exact inverse functions (transposes, reshapes, splits of fused
projections, never arithmetic), so import followed by export returns the
file's bytes and export followed by import returns the parameters'. A
layout (``open_clip``, ``big_vision``) is a function from the model config
to its list of links; ``apply`` runs them in either direction and reports
every missing, unexpected or mis-shaped key at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

Flat = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Link:
    theirs: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[..., tuple[np.ndarray, ...]]
    to_theirs: Callable[..., tuple[np.ndarray, ...]]


def same(theirs: str, ours: str) -> Link:
    return Link((theirs,), (ours,), lambda a: (a,), lambda a: (a,))


def reshaped(theirs: str, ours: str, their_shape: Callable[[np.ndarray], tuple], our_shape: tuple) -> Link:
    """A reshape only (a class token (w,) as (1, 1, w), a scalar as (1,))."""
    return Link((theirs,), (ours,), lambda a: (a.reshape(our_shape),), lambda a: (a.reshape(their_shape(a)),))


def transposed(theirs: str, ours: str, axes: tuple[int, ...]) -> Link:
    """torch's Linear (out, in) as flax's Dense kernel (in, out): axes (1, 0);
    Conv2d (out, in, kh, kw) as flax's (kh, kw, in, out): axes (2, 3, 1, 0)."""
    inverse = tuple(int(i) for i in np.argsort(axes))
    return Link((theirs,), (ours,), lambda a: (a.transpose(axes),), lambda a: (a.transpose(inverse),))


def linear(theirs: str, ours: str, bias: bool = True) -> list[Link]:
    """torch Linear ``<theirs>.weight``/``.bias`` -> flax Dense ``<ours>/kernel``/``bias``."""
    out = [transposed(f"{theirs}.weight", f"{ours}/kernel", (1, 0))]
    return out + [same(f"{theirs}.bias", f"{ours}/bias")] if bias else out


def layernorm(theirs: str, ours: str) -> list[Link]:
    return [same(f"{theirs}.weight", f"{ours}/scale"), same(f"{theirs}.bias", f"{ours}/bias")]


def heads_in(theirs_w: str, theirs_b: str, ours: Sequence[str], heads: int) -> list[Link]:
    """A fused input projection of k = len(ours) attention inputs (torch: weight
    (k·w, w), bias (k·w,); q, k, v of nn.MultiheadAttention, k, v of timm's
    pooling) -> flax's per-input DenseGeneral kernels (w, heads, w/heads) and
    biases (heads, w/heads)."""
    k = len(ours)

    def w_to_ours(w):
        width = w.shape[1]
        return tuple(p.T.reshape(width, heads, -1) for p in np.split(w, k, axis=0))

    def w_to_theirs(*kernels):
        return (np.concatenate([q.reshape(q.shape[0], -1).T for q in kernels], axis=0),)

    def b_to_ours(b):
        return tuple(p.reshape(heads, -1) for p in np.split(b, k))

    def b_to_theirs(*biases):
        return (np.concatenate([q.reshape(-1) for q in biases]),)

    return [Link((theirs_w,), tuple(f"{o}/kernel" for o in ours), w_to_ours, w_to_theirs),
            Link((theirs_b,), tuple(f"{o}/bias" for o in ours), b_to_ours, b_to_theirs)]


def heads_out(theirs: str, ours: str, heads: int) -> list[Link]:
    """torch's attention output Linear (w, w) -> flax's (heads, w/heads, w) kernel."""
    return [Link((f"{theirs}.weight",), (f"{ours}/kernel",),
                 lambda w: (w.T.reshape(heads, -1, w.shape[0]),),
                 lambda k: (k.reshape(-1, k.shape[-1]).T,)),
            same(f"{theirs}.bias", f"{ours}/bias")]


class Mismatch(ValueError):
    """The file does not fit the model config; ``problems`` lists every key at fault."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def to_ours(links: Sequence[Link], theirs: Flat, shapes: dict[str, tuple], ignored: Callable[[str], bool],
            fix: Callable[[str, np.ndarray, tuple], np.ndarray | None] = lambda path, a, want: None) -> Flat:
    """The vlm_jax parameters from the file's tensors. ``shapes`` are the
    parameters the model config expects; ``fix`` may adapt an array of
    another shape (position embeddings of another grid) or return None;
    keys for which ``ignored`` holds (buffers, metadata) may stay unused."""
    out: Flat = {}
    problems = []
    used = set()
    for link in links:
        absent = [k for k in link.theirs if k not in theirs]
        if absent:
            problems += [f"missing: {k} (for {', '.join(link.ours)})" for k in absent]
            continue
        used.update(link.theirs)
        arrays = link.to_ours(*(theirs[k] for k in link.theirs))
        for path, a in zip(link.ours, arrays):
            want = shapes.get(path)
            if want is None:
                problems.append(f"not in this model: {path} (from {', '.join(link.theirs)})")
            elif tuple(a.shape) != tuple(want):
                fixed = fix(path, a, tuple(want))
                if fixed is None:
                    problems.append(f"mis-shaped: {', '.join(link.theirs)} {tuple(theirs[link.theirs[0]].shape)} "
                                    f"-> {path} {tuple(a.shape)}, but the config's model has {tuple(want)}")
                else:
                    out[path] = fixed
            else:
                out[path] = a
    problems += [f"unexpected: {k} {tuple(v.shape)} (no parameter of this model takes it)"
                 for k, v in sorted(theirs.items()) if k not in used and not ignored(k)]
    problems += [f"not set: {p} {shape} (the file has nothing for it)" for p, shape in sorted(shapes.items())
                 if p not in out and not any(p in link.ours for link in links)]
    if problems:
        raise Mismatch(problems)
    return out


def to_theirs(links: Sequence[Link], ours: Flat) -> Flat:
    out: Flat = {}
    missing = [p for link in links for p in link.ours if p not in ours]
    if missing:
        raise Mismatch([f"missing: {p} (the model has no such parameter)" for p in missing])
    for link in links:
        out.update(zip(link.theirs, (np.asarray(a) for a in link.to_theirs(*(ours[p] for p in link.ours)))))
    unused = sorted(set(ours) - {p for link in links for p in link.ours})
    if unused:
        raise Mismatch([f"not exported: {p} (the layout has no place for it)" for p in unused])
    return out


# --------------------------------------------------------------------------- position embeddings of another grid


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of antialiased bicubic resampling (Keys a = -0.5,
    half-pixel centres, the kernel widened by the scale when shrinking, each
    row renormalised over the samples inside the grid): what torch's
    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` and
    PIL compute, and so what OpenCLIP's ``resize_pos_embed`` does."""
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j - centre + 0.5) * inv)
        m[i, lo:hi] = w / w.sum()
    return m


def resize_grid(pe: np.ndarray, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """(old_h·old_w, c) position embeddings resampled to (new_h·new_w, c), in float64."""
    grid = pe.reshape(*old_hw, -1).astype(np.float64)
    grid = np.einsum("ih,hwc->iwc", resize_matrix(old_hw[0], new_hw[0]), grid)
    grid = np.einsum("jw,iwc->ijc", resize_matrix(old_hw[1], new_hw[1]), grid)
    return grid.reshape(new_hw[0] * new_hw[1], -1).astype(pe.dtype)


def resize_posemb(pe: np.ndarray, want: tuple[int, ...], extra: int) -> np.ndarray | None:
    """(1, extra + h·w, c) -> (1, extra + H·W, c) for square grids, the ``extra``
    (class) tokens kept; None if the shapes are not two square grids of one width."""
    if pe.ndim != 3 or len(want) != 3 or pe.shape[2] != want[2] or pe.shape[0] != 1:
        return None
    old, new = pe.shape[1] - extra, want[1] - extra
    g_old, g_new = math.isqrt(old), math.isqrt(new)
    if g_old * g_old != old or g_new * g_new != new:
        return None
    grid = resize_grid(pe[0, extra:], (g_old, g_old), (g_new, g_new))
    return np.concatenate([pe[0, :extra], grid], axis=0)[None]
