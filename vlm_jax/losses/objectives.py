"""The other contrastive objectives of the literature: UniCL, SLIP's image
InfoNCE and FILIP, on the same engine and with the same sharding discipline.

Every function takes global arrays (sharded over ``axis`` when a mesh is
given; without one it runs on a one-device mesh), returns a float32 scalar and
is differentiable in its embeddings and log_t. ``impl`` is "all_gather"
(gather, then autodiff), "ring" or "tiled" (custom VJP, memory independent of
the device count N; ``tile`` rows and columns per piece).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from vlm_jax.losses import blockwise, infonce
from vlm_jax.losses.contrastive import Axis, _axis_tuple, auto_tile, axis_devices, dot_sim, global_index

IMPLS = ("all_gather", "ring", "tiled")


def _prepare(name: str, impl: str, mesh: Mesh | None, axis: Axis, batch: int, tile: int | None, rows_per_item: int = 1):
    """Validates and returns (mesh, axes, N, tile for the engine)."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if mesh is None:
        mesh, axis = Mesh(np.asarray(jax.devices()[:1]), ("data",)), "data"
    axes = _axis_tuple(axis)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"{name}: axis {missing} not in mesh axes {tuple(mesh.shape)}")
    n = axis_devices(mesh, axes)
    if batch % n:
        raise ValueError(f"{name}: global batch B={batch} is not divisible by the {n} devices of mesh axis {axis!r}")
    rows = batch // n * rows_per_item
    if impl != "tiled":
        if tile is not None:
            raise ValueError(f"{name}: tile={tile} applies to impl='tiled' only, not {impl!r}")
        tile = rows
    elif tile is None:
        tile = auto_tile(rows)
    return mesh, axes, n, blockwise.check_tile(rows, tile)


def _dispatch(impl, obj, axes, n, tile, log_t, a, la, ia, c, lc, ic):
    if impl == "all_gather":
        return infonce.gathered_loss(log_t, a, la, ia, c, lc, ic, obj, axes)
    return infonce.ring_loss(log_t, a, la, ia, c, lc, ic, obj, axes, n, tile)


# --------------------------------------------------------------------------- UniCL


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
    if zimg.ndim != 2 or zimg.shape != ztxt.shape or labels.shape != zimg.shape[:1]:
        raise ValueError(f"unicl_loss: zimg, ztxt must be (B, d) and labels (B,); got {zimg.shape}, {ztxt.shape}, {labels.shape}")
    mesh, axes, n, tile = _prepare("unicl_loss", impl, mesh, axis, zimg.shape[0], tile)
    obj = infonce.Objective(dot_sim, both=True, exclude=False, denom=2 * zimg.shape[0])

    def local(zi, zt, y, lt):
        return _dispatch(impl, obj, axes, n, tile, lt, zi, y, y, zt, y, y)

    spec = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=P())(
        zimg, ztxt, labels.astype(jnp.int32), log_t)


# --------------------------------------------------------------------------- SLIP image–image


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
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"image_infonce_loss: z1 and z2 must both be (B, d); got {z1.shape} and {z2.shape}")
    mesh, axes, n, tile = _prepare("image_infonce_loss", impl, mesh, axis, z1.shape[0], tile, rows_per_item=2)
    obj = infonce.Objective(dot_sim, both=False, exclude=True, denom=2 * z1.shape[0])

    def local(a1, a2, lt):
        g = global_index(a1.shape[0], axes)
        u = jnp.concatenate([a1, a2])
        label = jnp.concatenate([g, g])  # the other view is the positive
        ident = jnp.concatenate([2 * g, 2 * g + 1])  # an anchor is never its own negative
        return _dispatch(impl, obj, axes, n, tile, lt, u, label, ident, u, label, ident)

    spec = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P())(z1, z2, log_t)


# --------------------------------------------------------------------------- FILIP


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
    if img_tokens.ndim != 3 or txt_tokens.ndim != 3 or txt_mask.shape != txt_tokens.shape[:2]:
        raise ValueError(
            f"filip_loss: expected img_tokens (B, n_I, d), txt_tokens (B, n_T, d), txt_mask (B, n_T); got "
            f"{img_tokens.shape}, {txt_tokens.shape}, {txt_mask.shape}")
    if img_tokens.shape[0] != txt_tokens.shape[0] or img_tokens.shape[2] != txt_tokens.shape[2]:
        raise ValueError(f"filip_loss: batch and width must agree; got {img_tokens.shape} and {txt_tokens.shape}")
    big_b = img_tokens.shape[0]
    mesh, axes, n, tile = _prepare("filip_loss", impl, mesh, axis, big_b, tile)
    obj = infonce.Objective(filip_sim, both=True, exclude=False, denom=2 * big_b)
    mask = jax.lax.stop_gradient(txt_mask.astype(jnp.float32))

    def local(zi, zt, m, lt):
        g = global_index(zi.shape[0], axes)
        return _dispatch(impl, obj, axes, n, tile, lt, zi, g, g, (zt, m), g, g)

    spec = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=P())(
        img_tokens, txt_tokens, mask, log_t)


