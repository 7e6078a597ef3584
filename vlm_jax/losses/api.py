"""Contrastive losses with negatives from every device: the one front end.

CLIP softmax and SigLIP sigmoid, and the other contrastive objectives of the
literature (UniCL, SLIP's image–image InfoNCE, FILIP) on the same engine and
with the same sharding discipline. Every loss is a short specification (which
per-device body for each impl, which InfoNCE similarity) on one dispatch path
that validates the inputs and wraps the body in ``jax.shard_map``.

Notation: z^I_i, z^T_j are L2-normalised image and text embeddings (rows of
``zimg``, ``ztxt``; shape (B, d) globally, b = B/N rows on each of the N
devices of ``axis``); t = exp(log_t) is the inverse temperature (1/τ); b is
the sigmoid bias. Every function returns the loss of the *global* batch as a
float32 scalar and is differentiable in its embeddings, log_t (and bias) with
gradients equal to those of the single-device formula.

With a mesh, the chosen ``impl`` runs inside ``jax.shard_map`` over ``axis``:
"all_gather" (gather, then autodiff), "ring" or "tiled" (custom VJP, memory
independent of the device count N; ``tile`` rows and columns per piece).
With ``mesh=None``, "ring" and "tiled" run on a one-device mesh (so that a
single accelerator gets the same O(b·d) memory); "all_gather" evaluates the
formula on the arrays as given for softmax and sigmoid (under jit on globally
sharded arrays XLA then materialises the B×B logits where it likes: the
``global_logits`` baseline) and runs on a one-device mesh for the others.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from vlm_jax.losses import infonce, sigmoid
from vlm_jax.losses.ring import Axis, auto_tile, axis_devices, axis_tuple, check_tile, dot_t, global_index, varying

IMPLS = ("all_gather", "ring", "tiled")


class Layout(NamedTuple):
    """Where a per-device body runs."""

    axes: tuple[str, ...]  # the mesh axes the batch is split over
    n: int  # N, the number of devices along them
    tile: int  # rows per piece of the ring engines: all of a device's rows unless impl="tiled"


Body = Callable[..., jax.Array]  # body(*per-device inputs, layout) -> the global loss


@dataclasses.dataclass(frozen=True)
class _Loss:
    """A loss as the dispatch sees it."""

    name: str  # the public function, named in every error message
    expected: str  # the shapes of its batch inputs, for the shape error
    n_sharded: int  # the leading inputs, split over the axis along B; the rest are replicated
    gathered: Body  # the per-device body of impl="all_gather"
    ring: Body  # the per-device body of "ring" and "tiled"
    dense: Callable[..., jax.Array] | None = None  # mesh=None with "all_gather": the formula as given
    rows_per_item: int = 1  # engine rows per batch item (SLIP: two views), what ``tile`` divides

    def __call__(self, inputs: tuple, shapes_ok: bool, *, impl: str, mesh: Mesh | None, axis: Axis,
                 tile: int | None) -> jax.Array:
        """The one dispatch path: validates impl, shapes, tile, mesh and axis,
        then runs the impl's body per device inside ``jax.shard_map``."""
        if impl not in IMPLS:
            raise ValueError(f"{self.name}: impl must be one of {IMPLS}, got {impl!r}")
        if not shapes_ok:
            got = ", ".join(str(x.shape) for x in inputs[: self.n_sharded])
            raise ValueError(f"{self.name}: expected {self.expected}; got {got}")
        if tile is not None and impl != "tiled":
            raise ValueError(f"{self.name}: tile={tile} applies to impl='tiled' only, not {impl!r}")
        if mesh is None:
            if self.dense is not None and impl == "all_gather":
                return self.dense(*inputs)
            mesh, axis = Mesh(np.asarray(jax.devices()[:1]), ("data",)), "data"
        axes = axis_tuple(axis)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"{self.name}: axis {missing} not in mesh axes {tuple(mesh.shape)}")
        n = axis_devices(mesh, axes)
        batch = inputs[0].shape[0]
        if batch % n:
            raise ValueError(
                f"{self.name}: global batch B={batch} is not divisible by the {n} devices of mesh axis {axis!r}")
        rows = batch // n * self.rows_per_item
        try:
            tile = check_tile(rows, auto_tile(rows) if impl == "tiled" and tile is None else tile)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        body = self.gathered if impl == "all_gather" else self.ring
        spec = P(axes)
        return jax.shard_map(
            functools.partial(body, layout=Layout(axes, n, tile)),
            mesh=mesh,
            in_specs=(spec,) * self.n_sharded + (P(),) * (len(inputs) - self.n_sharded),
            out_specs=P(),
        )(*inputs)


def _infonce(sim: infonce.SimFn, *, both: bool, exclude: bool, engine_inputs: Callable) -> tuple[Body, Body]:
    """The (all_gather, ring/tiled) bodies of an InfoNCE objective on the engine.

    ``engine_inputs(*per-device inputs, axes)`` gives the engine's
    (log_t, a, la, ia, c, lc, ic, wa, wc); the summed terms are divided by 2·B,
    or by the sum of the terms' weights when wa, wc are not None."""

    def spec(inputs, layout, args):
        return infonce.InfoNCESpec(sim, both=both, exclude=exclude, denom=2 * inputs[0].shape[0] * layout.n,
                                   weighted=args[7] is not None)

    def gathered(*inputs, layout):
        args = engine_inputs(*inputs, layout.axes)
        return infonce.gathered_loss(*args, spec(inputs, layout, args), layout.axes)

    def ring(*inputs, layout):
        args = engine_inputs(*inputs, layout.axes)
        return infonce.ring_loss(*args, spec(inputs, layout, args), layout.axes, layout.n, layout.tile)

    return gathered, ring


def _pair_2d(a: jax.Array, c: jax.Array) -> bool:
    return a.ndim == 2 and a.shape == c.shape


# --------------------------------------------------------------------------- similarities


def dot_sim(log_t, a, c):
    """t·a·cᵀ for both directions (the CLIP similarity)."""
    x = jnp.exp(log_t.astype(jnp.float32)) * dot_t(a, c)
    return x, x


def filip_sim(log_t, img_tokens, txt):
    """FILIP's token-wise late interaction for a block of images × texts.

    x_row[a, c] = t·(1/n_I) Σ_k max_{r valid} s_ackr  (each image token's best text token),
    x_col[a, c] = t·(1/|valid_c|) Σ_{r valid} max_k s_ackr  (each text token's best image token),
    s_ackr = z^I_{a,k}·z^T_{c,r}.
    """
    txt_tokens, txt_mask = txt
    t = jnp.exp(log_t.astype(jnp.float32))
    s = jnp.einsum("akd,crd->ackr", img_tokens, txt_tokens, preferred_element_type=jnp.float32)
    valid = txt_mask[None, :, None, :] > 0
    i2t = jnp.max(jnp.where(valid, s, -jnp.inf), axis=3).mean(axis=2)
    per_text_token = jnp.max(s, axis=2)  # (a, c, r)
    counts = jnp.maximum(jnp.sum(txt_mask, axis=1), 1.0)[None, :]
    t2i = jnp.sum(per_text_token * txt_mask[None, :, :], axis=2) / counts
    return t * i2t, t * t2i


# --------------------------------------------------------------------------- softmax (CLIP)


def _clip_inputs(zi, zt, log_t, axes):
    g = global_index(zi.shape[0], axes)  # image i and text i are the positive pair
    return log_t, zi, g, g, zt, g, g, None, None


def _weighted_clip_inputs(zi, zt, w, log_t, axes):
    g = global_index(zi.shape[0], axes)
    return log_t, zi, g, g, zt, g, g, w, w  # pair i weighs its image's and its text's terms alike


_WEIGHTED_SOFTMAX = _Loss("softmax_loss", "zimg and ztxt both of shape (B, d), weights (B,)", 3,
                          *_infonce(dot_sim, both=True, exclude=False, engine_inputs=_weighted_clip_inputs))


_SOFTMAX = _Loss(
    "softmax_loss", "zimg and ztxt both of shape (B, d)", 2,
    gathered=lambda zi, zt, log_t, layout: infonce.clip_gathered_loss(zi, zt, log_t, axis=layout.axes),
    ring=_infonce(dot_sim, both=True, exclude=False, engine_inputs=_clip_inputs)[1],
    dense=infonce.clip_dense_loss,
)


def softmax_loss(zimg, ztxt, log_t, *, impl: str = "all_gather", mesh: Mesh | None = None,
                 axis: Axis = "data", tile: int | None = None, weights: jax.Array | None = None) -> jax.Array:
    r"""CLIP softmax InfoNCE over the global batch.

    L = ½ (L_{I→T} + L_{T→I}),
    L_{I→T} = −(1/B) Σ_i log [ exp(t·z^I_i·z^T_i) / Σ_j exp(t·z^I_i·z^T_j) ],
    L_{T→I} = −(1/B) Σ_i log [ exp(t·z^T_i·z^I_i) / Σ_j exp(t·z^T_i·z^I_j) ].

    impl="all_gather": each device gathers both modalities (B×d each) and
    computes its b rows of each direction against all B columns.
      memory per device: 2·B·d gathered embeddings + 2·b·B float32 logits
      (kept for the backward pass);
      communication per device: all_gather of both modalities, 2·(N−1)·b·d
      elements forward and the same again as reduce-scatter backward;
      FLOPs: 2 directions × 2·b·B·d forward, about twice that backward
      (≈ 12·B²·d summed over devices).
    impl="ring": the texts travel the ring of N devices (ppermute); one pass
    over each b×b block gives the partial log-sum-exp of its rows (I→T) and of
    its columns (T→I); the column partials travel with their chunk and arrive
    home after the last step. A custom VJP keeps only the two LSE vectors and
    recomputes each block once in the backward, where the chunk's gradient
    accumulator travels the ring with it.
      memory per device: O(b·d) (chunk, accumulators) + one b×b block in flight,
      independent of N;
      communication per device: (N−1)·b·d forward, 2·(N−1)·b·d + N·b·d
      backward (chunk, its LSE and its gradient), overlappable with compute;
      FLOPs: ≈ 8·B²·d in all (2 forward, 6 backward).
    impl="tiled": as "ring", with each block processed in tile×tile pieces,
      so memory per device is O(b·d + tile²); ``tile`` must divide b
      (default: the largest divisor of b up to 512).
    With ``mesh=None``: the dense formula, one B×B logit matrix ("ring" and
    "tiled" then run on a one-device mesh).

    ``weights`` (B,), w ≥ 0 per pair (curation: down-weighting noisy pairs):
      L_{I→T} = Σ_i w_i [log Σ_j w_j exp(t·z^I_i·z^T_j) − t·z^I_i·z^T_i] / Σ_i w_i,
    L_{T→I} likewise, L = ½ (L_{I→T} + L_{T→I}). A weight of 0 removes the
    pair exactly (neither anchor nor negative); unit weights give the loss
    above. It runs on the InfoNCE engine (the same impls, memory and
    communication as UniCL's, plus the weights: (N−1)·b floats more per pass).
    """
    if weights is not None:
        ok = _pair_2d(zimg, ztxt) and weights.shape == zimg.shape[:1]
        w = jax.lax.stop_gradient(weights.astype(jnp.float32))
        return _WEIGHTED_SOFTMAX((zimg, ztxt, w, log_t), ok, impl=impl, mesh=mesh, axis=axis, tile=tile)
    return _SOFTMAX((zimg, ztxt, log_t), _pair_2d(zimg, ztxt), impl=impl, mesh=mesh, axis=axis, tile=tile)


# --------------------------------------------------------------------------- sigmoid (SigLIP)


_SIGMOID = _Loss(
    "sigmoid_loss", "zimg and ztxt both of shape (B, d)", 2,
    gathered=lambda zi, zt, log_t, bias, layout: sigmoid.gathered_loss(zi, zt, log_t, bias, axis=layout.axes),
    ring=lambda zi, zt, log_t, bias, layout: sigmoid.ring_loss(zi, zt, log_t, bias, layout.axes, layout.n, layout.tile),
    dense=sigmoid.dense_loss,
)


def sigmoid_loss(zimg, ztxt, log_t, bias, *, impl: str = "all_gather", mesh: Mesh | None = None,
                 axis: Axis = "data", tile: int | None = None, weights: jax.Array | None = None) -> jax.Array:
    r"""SigLIP pairwise sigmoid loss over the global batch.

    L = −(1/B) Σ_{i=1..B} Σ_{j=1..B} log σ(ℓ_ij (t·z^I_i·z^T_j + b)),
    ℓ_ii = +1, ℓ_ij = −1 for i ≠ j.

    impl="all_gather": each device gathers the texts (B×d) and scores its b
    images against all of them.
      memory per device: B·d gathered texts + b·B float32 logits kept for the
      backward pass;
      communication per device: all_gather of one modality, (N−1)·b·d elements
      forward, the same as reduce-scatter backward;
      FLOPs: 2·b·B·d forward, ≈ 4·b·B·d backward (≈ 6·B²·d over all devices).
    impl="ring": the texts travel the ring of N devices (ppermute). Every
    pair's term is independent of the others, so under differentiation a
    custom VJP computes the loss and the gradients in the same pass, the
    chunk's gradient accumulator travelling the ring with it; it keeps no
    logits, only the (b × d) gradients, which the backward pass scales.
      memory per device: O(b·d) + one b×b block in flight, independent of N;
      communication per device: 2·(N−1)·b·d + b·d (texts and their
      gradients), or (N−1)·b·d for the loss alone;
      FLOPs: ≈ 6·B²·d in all with the gradients, 2·B²·d for the loss alone.
    impl="tiled": as "ring" with tile×tile pieces: O(b·d + tile²) memory.
    With ``mesh=None``: the dense formula, one B×B logit matrix ("ring" and
    "tiled" then run on a one-device mesh).

    ``weights`` (B,), w ≥ 0 per pair:
      L = −(1/Σ_i w_i) Σ_i Σ_j w_i w_j log σ(ℓ_ij (t·z^I_i·z^T_j + b)),
    so a weight of 0 removes the pair exactly (as positive and as negative)
    and unit weights give the loss above. It runs on the keyed form of the
    engine (``region_word_loss`` with one slot per example keyed by its
    global row): the same impls and memory, plus 2 ints and floats per row.
    """
    if weights is not None:
        ok = _pair_2d(zimg, ztxt) and weights.shape == zimg.shape[:1]
        keys = jnp.arange(zimg.shape[0], dtype=jnp.int32)[:, None]
        w = jax.lax.stop_gradient(weights.astype(jnp.float32))[:, None]
        inputs = (zimg[:, None], keys, w, ztxt[:, None], keys, w, log_t, bias) if ok else (zimg, ztxt)
        return _WEIGHTED_SIGMOID(inputs, ok, impl=impl, mesh=mesh, axis=axis, tile=tile)
    return _SIGMOID((zimg, ztxt, log_t, bias), _pair_2d(zimg, ztxt), impl=impl, mesh=mesh, axis=axis, tile=tile)


# --------------------------------------------------------------------------- UniCL


def _unicl_inputs(zi, zt, y, log_t, axes):
    return log_t, zi, y, y, zt, y, y, None, None  # every pair sharing a label is a positive


_UNICL = _Loss("unicl_loss", "zimg and ztxt both of shape (B, d), labels (B,)", 3,
               *_infonce(dot_sim, both=True, exclude=False, engine_inputs=_unicl_inputs))


def unicl_loss(zimg, ztxt, labels, log_t, *, impl: str = "all_gather", mesh: Mesh | None = None,
               axis: Axis = "data", tile: int | None = None) -> jax.Array:
    r"""Image–text–label contrastive loss (UniCL, Yang et al. 2022).

    Every pair sharing a label is a positive: P(i) = {k : y_k = y_i}.
      L_{I→T} = −(1/B) Σ_i (1/|P(i)|) Σ_{k∈P(i)} log [exp(t·z^I_i·z^T_k) / Σ_j exp(t·z^I_i·z^T_j)],
      L_{T→I} likewise with z^I and z^T swapped,
      L = ½ (L_{I→T} + L_{T→I})   (the CLIP convention; the paper sums the two).
    With labels 0..B−1 it is exactly the CLIP loss; image–text pairs without a
    class should get a label of their own.

    Memory per device: all_gather 2·B·d gathered + 2·b·B float32 logits;
    ring O(b·d) + one b×b block; tiled O(b·d + tile²).
    Communication per device: as ``softmax_loss``, plus the labels (int32).
    FLOPs: all_gather ≈ 12·B²·d, ring/tiled ≈ 8·B²·d.
    """
    ok = _pair_2d(zimg, ztxt) and labels.shape == zimg.shape[:1]
    return _UNICL((zimg, ztxt, labels.astype(jnp.int32), log_t), ok, impl=impl, mesh=mesh, axis=axis, tile=tile)


# --------------------------------------------------------------------------- hard-negative captions (NegCLIP)


def _one_direction_spec(rows: int, layout) -> infonce.InfoNCESpec:
    # Weighted, with unit anchor weights: each pass's sum is divided by its B anchors.
    return infonce.InfoNCESpec(dot_sim, both=False, exclude=False, denom=rows * layout.n, weighted=True)


def _negclip_calls(zi, zt, zn, valid, log_t, layout):
    """The engine inputs of the two one-directional passes: images against
    texts and hard negatives (a negative's label, −1 − its row's index, is
    nobody's; an invalid one weighs 0, so it is no negative), then texts
    against images."""
    g = global_index(zi.shape[0], layout.axes)
    ones = varying(jnp.ones(zi.shape[:1], jnp.float32), layout.axes)
    neg = -1 - g
    i2t = (log_t, zi, g, g, jnp.concatenate([zt, zn]), jnp.concatenate([g, neg]), jnp.concatenate([g, neg]),
           ones, jnp.concatenate([ones, valid]))
    t2i = (log_t, zt, g, g, zi, g, g, ones, ones)
    return i2t, t2i


def _negclip_gathered(zi, zt, zn, valid, log_t, layout):
    spec = _one_direction_spec(zi.shape[0], layout)
    i2t, t2i = _negclip_calls(zi, zt, zn, valid, log_t, layout)
    return 0.5 * (infonce.gathered_loss(*i2t, spec, layout.axes) + infonce.gathered_loss(*t2i, spec, layout.axes))


def _negclip_ring(zi, zt, zn, valid, log_t, layout):
    spec = _one_direction_spec(zi.shape[0], layout)
    i2t, t2i = _negclip_calls(zi, zt, zn, valid, log_t, layout)
    run = lambda args: infonce.ring_loss(*args, spec, layout.axes, layout.n, layout.tile)  # noqa: E731
    return 0.5 * (run(i2t) + run(t2i))


_NEGCLIP = _Loss("negclip_loss", "zimg, ztxt and znegative all of shape (B, d), negative_valid (B,)", 4,
                 gathered=_negclip_gathered, ring=_negclip_ring)


def negclip_loss(zimg, ztxt, znegative, negative_valid, log_t, *, impl: str = "all_gather",
                 mesh: Mesh | None = None, axis: Axis = "data", tile: int | None = None) -> jax.Array:
    r"""CLIP's softmax InfoNCE with one hard-negative caption per pair (NegCLIP,
    Yuksekgonul et al. 2023): the negatives z^N join the texts every image
    is scored against, and nothing else changes.

    L = ½ (L_{I→T} + L_{T→I}),
    L_{I→T} = −(1/B) Σ_i log [ exp(t·z^I_i·z^T_i) /
              (Σ_j exp(t·z^I_i·z^T_j) + Σ_{j: v_j} exp(t·z^I_i·z^N_j)) ],
    L_{T→I} = CLIP's (a negative caption has no image, so it is no anchor).
    ``negative_valid`` (B,) v_j: whether pair j has a negative (a caption with
    no word to swap has none); with no valid negative the loss is CLIP's.

    Both terms run on the InfoNCE engine as two one-directional passes (one
    pass cannot serve both: a negative is a column of the first direction
    and nobody's row in the second).
    impl="all_gather": the first pass gathers texts and negatives (2·B·d),
      the second the images (B·d);
      memory per device: 3·B·d gathered + 3·b·B float32 logits;
      communication per device: 3·(N−1)·b·d elements forward (and the
      negatives' labels and validity), the same again backward;
      FLOPs ≈ 18·B²·d (autodiff: 6·B·C·d for B rows against C columns).
    impl="ring" / "tiled": texts and negatives travel the ring together in
      the first pass, images in the second; memory per device O(b·d) + one
      b×2b block in flight (tile × tile pieces when tiled);
      communication per device: 3·(N−1)·b·d forward, about three times
      that backward (each chunk, its statistics and its gradient);
      FLOPs ≈ 24·B²·d (8·B·C·d per pass: the block recomputed once in the
      backward), three times CLIP's.
    """
    ok = _pair_2d(zimg, ztxt) and _pair_2d(zimg, znegative) and negative_valid.shape == zimg.shape[:1]
    valid = jax.lax.stop_gradient(negative_valid.astype(jnp.float32))
    return _NEGCLIP((zimg, ztxt, znegative, valid, log_t), ok, impl=impl, mesh=mesh, axis=axis, tile=tile)


# --------------------------------------------------------------------------- SLIP image–image


def _image_infonce_inputs(a1, a2, log_t, axes):
    g = global_index(a1.shape[0], axes)
    u = jnp.concatenate([a1, a2])
    label = jnp.concatenate([g, g])  # the other view is the positive
    ident = jnp.concatenate([2 * g, 2 * g + 1])  # an anchor is never its own negative
    return log_t, u, label, ident, u, label, ident, None, None


_IMAGE_INFONCE = _Loss("image_infonce_loss", "z1 and z2 both of shape (B, d)", 2,
                       *_infonce(dot_sim, both=False, exclude=True, engine_inputs=_image_infonce_inputs),
                       rows_per_item=2)


def image_infonce_loss(z1, z2, log_t, *, impl: str = "all_gather", mesh: Mesh | None = None,
                       axis: Axis = "data", tile: int | None = None) -> jax.Array:
    r"""Image–image InfoNCE between two augmented views (SimCLR's NT-Xent, as in SLIP).

    With the 2B embeddings u = (z^1_1..z^1_B, z^2_1..z^2_B) and p(a) the other
    view of the same image:
      L = −(1/2B) Σ_a log [ exp(t·u_a·u_{p(a)}) / Σ_{k≠a} exp(t·u_a·u_k) ].
    SLIP uses a fixed τ = 0.1 (log_t = log 10); pass it, or a learnable one.

    Each device holds its b rows of both views, 2b anchors.
    Memory per device: all_gather 2·B·d gathered + 2b·2B float32 logits;
    ring O(b·d) + one 2b×2b block; tiled O(b·d + tile²) (tile divides 2b).
    Communication per device: both views, 2·(N−1)·b·d forward (gather or
    ring), reduce-scatter / ring of the gradients backward.
    FLOPs: all_gather ≈ 6·(2B)²·d, ring/tiled ≈ 8·(2B)²·d.
    """
    return _IMAGE_INFONCE((z1, z2, log_t), _pair_2d(z1, z2), impl=impl, mesh=mesh, axis=axis, tile=tile)


# --------------------------------------------------------------------------- FILIP


def _filip_inputs(zi, zt, m, log_t, axes):
    g = global_index(zi.shape[0], axes)
    return log_t, zi, g, g, (zt, m), g, g, None, None


_FILIP = _Loss("filip_loss", "img_tokens (B, n_I, d), txt_tokens (B, n_T, d), txt_mask (B, n_T) with the same B and d", 3,
               *_infonce(filip_sim, both=True, exclude=False, engine_inputs=_filip_inputs))


def filip_loss(img_tokens, txt_tokens, txt_mask, log_t, *, impl: str = "all_gather", mesh: Mesh | None = None,
               axis: Axis = "data", tile: int | None = None) -> jax.Array:
    r"""FILIP (Yao et al. 2022): InfoNCE on token-wise late-interaction similarities.

    For image i with tokens z^I_{i,k} (k = 1..n_I) and text j with valid tokens
    z^T_{j,r} (mask m_{j,r}):
      s^I_ij = (1/n_I) Σ_k max_r z^I_{i,k}·z^T_{j,r},
      s^T_ji = (1/Σ_r m_jr) Σ_r m_jr max_k z^I_{i,k}·z^T_{j,r},
      L = ½ ( −(1/B) Σ_i log softmax_j(t·s^I_ij)[i] − (1/B) Σ_j log softmax_i(t·s^T_ji)[j] ).

    Memory, honestly: scoring one block of a images × c texts needs the
    a·c·n_I·n_T token similarities (float32), kept for the backward by autodiff.
    all_gather: B·(n_I + n_T)·d gathered tokens + 2·b·B·n_I·n_T floats per device
    (both directions are scored from the gathered side); ring: b²·n_I·n_T per
    block in flight, none kept; tiled: tile²·n_I·n_T, the only way to reach
    large batches with long sequences.
    Communication per device: (N−1)·b·n·d tokens per gathered/travelling
    modality — n times a pooled embedding's.
    FLOPs: ≈ 2·B²·n_I·n_T·d per scoring pass (4 passes ring/tiled, ≈ 6 all_gather).
    """
    ok = (img_tokens.ndim == 3 and txt_tokens.ndim == 3 and txt_mask.shape == txt_tokens.shape[:2]
          and img_tokens.shape[0] == txt_tokens.shape[0] and img_tokens.shape[2] == txt_tokens.shape[2])
    mask = jax.lax.stop_gradient(txt_mask.astype(jnp.float32))
    return _FILIP((img_tokens, txt_tokens, mask, log_t), ok, impl=impl, mesh=mesh, axis=axis, tile=tile)


# --------------------------------------------------------------------------- region–word (sigmoid)


def _flat_keyed(zr, kr, wr, zp, kp, wp):
    """Per-device (b, R, ·) / (b, P, ·) inputs as rows and columns of the keyed engine."""
    f = lambda z, k, w: (z.reshape(-1, z.shape[-1]), k.reshape(-1), w.reshape(-1).astype(jnp.float32))  # noqa: E731
    return (*f(zr, kr, wr), *f(zp, kp, wp))


def _column_tile(layout: Layout, rows: int, cols: int) -> int:
    """One piece of all columns with the ring impl; with "tiled", the largest
    divisor of the columns up to the row tile (square-ish pieces)."""
    if layout.tile == rows:
        return cols
    return max(t for t in range(1, min(cols, layout.tile) + 1) if cols % t == 0)


def _region_ring(zr, kr, wr, zp, kp, wp, log_t, bias, layout):
    rows_cols = _flat_keyed(zr, kr, wr, zp, kp, wp)
    tc = _column_tile(layout, rows_cols[0].shape[0], rows_cols[3].shape[0])
    return sigmoid.keyed_ring_loss(*rows_cols, log_t, bias, layout.axes, layout.n, (layout.tile, tc))


def _region_dense(zr, kr, wr, zp, kp, wp, log_t, bias):
    rows_cols = _flat_keyed(zr, kr, wr, zp, kp, wp)
    return sigmoid.keyed_dense_sum(*rows_cols, log_t, bias) / jnp.maximum(jnp.sum(rows_cols[2]), 1.0)


_REGION_WORD = _Loss(
    "region_word_loss",
    "regions (B, R, d) with keys and weights (B, R), phrases (B, P, d) with keys and weights (B, P)", 6,
    gathered=lambda zr, kr, wr, zp, kp, wp, log_t, bias, layout: sigmoid.keyed_gathered_loss(
        *_flat_keyed(zr, kr, wr, zp, kp, wp), log_t, bias, axis=layout.axes),
    ring=_region_ring,
    dense=_region_dense,
)
_WEIGHTED_SIGMOID = dataclasses.replace(_REGION_WORD, name="sigmoid_loss",
                                        expected="zimg and ztxt both of shape (B, d), weights (B,)")


def region_word_loss(regions, region_keys, region_weights, phrases, phrase_keys, phrase_weights, log_t, bias, *,
                     impl: str = "all_gather", mesh: Mesh | None = None, axis: Axis = "data",
                     tile: int | None = None) -> jax.Array:
    r"""Region–word alignment, sigmoid form (GLIP / RegionCLIP style), with
    every phrase of the global batch a candidate for every region.

    Each of the B examples has R region slots (r_{i}, key κ_i, weight w_i) and
    P phrase slots (p_j, key κ'_j, weight w'_j), all embeddings L2-normalised;
    a region and a phrase match when their keys are equal (the concept they
    ground: for the embedded data the colour–shape class, and one background
    key). With the B·R regions and B·P phrases of all devices,
      L = −(1/Σ_i w_i) Σ_i Σ_j w_i w'_j log σ(ℓ_ij (t·r_i·p_j + b)),
      ℓ_ij = +1 if κ_i = κ'_j, else −1.
    Weights are 0 for empty slots; keys and weights get no gradient.

    impl="all_gather": each device gathers the B·P phrases (with keys and
    weights) and scores its b·R regions against them.
      memory per device: B·P·d gathered + b·R·B·P float32 logits kept;
      communication per device: (N−1)·b·P·(d + 2) forward, reduce-scatter of
      the phrase gradients backward;
      FLOPs: 2·b·R·B·P·d forward, ≈ twice that backward.
    impl="ring": the phrase chunks travel the ring with their keys and
    weights; under differentiation a custom VJP computes the loss and the
    gradients in one pass (the phrase chunk's gradient accumulator travels
    with it) and keeps no logits, only the gradients.
      memory per device: O(b·(R + P)·d) + one (b·R × b·P) block in flight;
      communication per device: (N−1)·b·P·(d + 2) + (N−1)·b·P·d + b·P·d
      (the chunks and their gradients; without them (N−1)·b·P·(d + 2));
      FLOPs: ≈ 6·(B·R)·(B·P)·d in all with the gradients.
    impl="tiled": as "ring" in (tile × tile') pieces: ``tile`` divides the b·R
    rows, tile' is the largest divisor of the b·P columns up to ``tile``.
    With ``mesh=None``: the formula on the arrays as given.
    """
    ok = (regions.ndim == 3 and phrases.ndim == 3 and regions.shape[0] == phrases.shape[0]
          and regions.shape[2] == phrases.shape[2] and region_keys.shape == region_weights.shape == regions.shape[:2]
          and phrase_keys.shape == phrase_weights.shape == phrases.shape[:2])
    loss = dataclasses.replace(_REGION_WORD, rows_per_item=regions.shape[1] if regions.ndim == 3 else 1)
    sg = jax.lax.stop_gradient
    inputs = (regions, region_keys.astype(jnp.int32), sg(region_weights.astype(jnp.float32)),
              phrases, phrase_keys.astype(jnp.int32), sg(phrase_weights.astype(jnp.float32)), log_t, bias)
    return loss(inputs, ok, impl=impl, mesh=mesh, axis=axis, tile=tile)
