"""Image and text towers and the two-tower model (Flax linen).

Parameters are plain pytrees and ``apply`` is pure. ``TwoTower`` returns
L2-normalised embeddings z^I, z^T of shape (B, embed_dim) (and per-token
embeddings for token-level objectives); the parameters an objective adds
(temperature, bias, heads) belong to the objective (``vlm_jax.objectives``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import require

# Published tower shapes: (width, depth, mlp_dim, heads).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
}

Dtype = Any


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, shape (1, h*w, width)."""
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU, x·Φ(x), in the erf form torch.nn.GELU computes (OpenCLIP, timm): x·(1 + erf(x/√2))/2.

    Its forward values are torch's formula's rounding for rounding on the same erf: halving is
    exact, so 0.5 + 0.5·erf equals (1 + erf)/2 in float. ``jax.nn.gelu(approximate=False)``
    computes 0.5·x·erfc(−x/√2) instead: more accurate for x < 0, where 1 + erf cancels (float32
    errors there up to 8e-8, against this form's 7e-7, which torch's formula shares), but erfc
    evaluates two branches: on a CPU its forward pass takes about four times this form's, forward
    and backward together about twice (docs/benchmarks.md)."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.float32(np.sqrt(0.5)).astype(x.dtype)))


# The MLP's nonlinearity by name (config.model.image.act, config.model.text.act):
# the published weights were trained with one of these, and the others are
# measurably different functions (tanh's approximation is up to 4.7e-4 from
# the erf form, at |x| = 2.7; QuickGELU up to 0.02), so a converted checkpoint
# keeps its own.
ACTIVATIONS: dict[str, Any] = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # flax's default; big_vision (SigLIP)
    "gelu": gelu_erf,  # the erf form: torch.nn.GELU (OpenCLIP, timm)
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI's CLIP weights
}


def check_act(field: str, act: str) -> None:
    require(act in ACTIVATIONS, field, f"must be one of {sorted(ACTIVATIONS)}, got {act!r}")


def transformer_flops(width: int, depth: int, mlp: int, tokens: int) -> float:
    """Forward matmul FLOPs of ``depth`` blocks over ``tokens`` tokens: per
    token and block 2·(4·w² + 2·w·m) for the projections and MLP, plus
    2·2·n·w for the attention scores and their weighted sum."""
    return float(depth * (2 * (4 * width * width + 2 * width * mlp) + 4 * tokens * width) * tokens)


def conv3x3_flops(side_out: int, stride: int, c_in: int, c_out: int) -> float:
    """FLOPs of a 3×3 convolution padded by one pixel (SAME) to a
    side_out × side_out map, counting only products with real pixels, as
    XLA's cost analysis does: 3s − 2 kernel rows per axis fall inside the
    image at stride 1, 3s − 1 at stride 2 (from 2s pixels)."""
    taps = 3 * side_out - (2 if stride == 1 else 1)
    return 2.0 * taps * taps * c_in * c_out


def check_pixel_stats(c) -> None:
    """config.model.image.pixel_mean / pixel_std: both () or both three numbers (every image tower)."""
    for name in ("pixel_mean", "pixel_std"):
        v = tuple(c[name])
        require(len(v) in (0, 3) and all(isinstance(x, (int, float)) for x in v), f"model.image.{name}",
                f"must be () or three numbers (R, G, B in [0, 1] units), got {c[name]!r}")
    require(bool(c.pixel_mean) == bool(c.pixel_std), "model.image.pixel_std",
            "pixel_mean and pixel_std are set together (both three numbers, or both ())")
    require(all(x > 0 for x in c.pixel_std), "model.image.pixel_std", f"must be positive, got {c.pixel_std!r}")


def normalise_pixels(x, mean: tuple[float, ...], std: tuple[float, ...]):
    """[-1, 1] pixels (the pipeline's) -> (x01 - mean) / std, the weights' own
    statistics; unchanged when ``mean`` is ()."""
    if not mean:
        return x
    m, s = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (((x.astype(jnp.float32) + 1.0) * 0.5 - m) / s).astype(x.dtype)


def matmul_2d(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
              **kwargs) -> jax.Array:
    """``lax.dot_general`` for a projection, as one (tokens × features) matmul.

    A projection contracts the trailing axes of an activation (B, n, ...) with the leading axes of a
    kernel. Flattened to 2-D first (the reshapes are free), it computes the same products, and in the
    backward pass the kernel's gradient is one matmul with a transposed operand, where for the 3-D
    form XLA's CPU backend first copies an operand into a transposed layout (docs/benchmarks.md).
    That gradient then sums over the B·n rows in another order: the results differ from the 3-D
    form's in the last bits. Any other contraction is ``lax.dot_general`` unchanged."""
    (lhs_c, rhs_c), batch = dimension_numbers
    n = len(lhs_c)
    if (any(batch) or n == 0 or tuple(lhs_c) != tuple(range(lhs.ndim - n, lhs.ndim))
            or tuple(rhs_c) != tuple(range(n)) or kwargs):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    k = int(np.prod(rhs.shape[:n]))
    out = jax.lax.dot_general(lhs.reshape(-1, k), rhs.reshape(k, -1), (((1,), (0,)), ((), ())), precision,
                              preferred_element_type=preferred_element_type)
    return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


def attention(num_heads: int, dtype: Dtype, name: str, decode: bool = False,
              projections_2d: bool = False) -> nn.MultiHeadDotProductAttention:
    """flax's multi-head attention; ``projections_2d``: its q, k, v and output projections as 2-D
    matmuls (``matmul_2d``), the same parameters and function (config.model.projections_2d)."""
    dots = dict(qkv_dot_general=matmul_2d, out_dot_general=matmul_2d) if projections_2d else {}
    return nn.MultiHeadDotProductAttention(num_heads=num_heads, dtype=dtype, decode=decode, name=name, **dots)


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[self.act](x)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6  # flax's and big_vision's; torch's LayerNorm (OpenCLIP) uses 1e-5
    decode: bool = False  # one position per call, keys and values cached (the "cache" collection)
    projections_2d: bool = False  # as config.model.projections_2d

    @nn.compact
    def __call__(self, x, mask=None):
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln1")(x)
        y = attention(self.num_heads, self.dtype, "attn", self.decode, self.projections_2d)(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln2")(x)
        return x + MlpBlock(self.mlp_dim, self.dtype, self.act, name="mlp")(y)


# Rematerialisation policies by name (config.model.remat): what the backward
# pass may keep from the forward pass of each block instead of recomputing it.
REMAT_POLICIES = {
    "full": None,  # keep nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "dots_with_batch": jax.checkpoint_policies.dots_saveable,
}


def remat_block(block: type[nn.Module], remat: str, scan: bool) -> type[nn.Module]:
    """``block`` (a block class) rematerialised by the policy ``remat`` names."""
    if remat == "none":
        return block
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat must be 'none' or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    # Under scan the loop already separates the iterations, so CSE prevention is unnecessary.
    return nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=not scan)


class _ScannedBlock(nn.Module):
    """One block in nn.scan's (carry, x) -> (carry, y) form."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype
    remat: str
    act: str
    norm_eps: float
    decode: bool = False
    projections_2d: bool = False

    @nn.compact
    def __call__(self, x, mask):
        block = remat_block(EncoderBlock, self.remat, True)(self.mlp_dim, self.num_heads, self.dtype, self.act, self.norm_eps,
                                             self.decode, self.projections_2d, name="block")
        return block(x, mask), None


class Encoder(nn.Module):
    """``depth`` pre-LN blocks and a final LayerNorm.

    remat: "none" or a policy of REMAT_POLICIES (activation memory for compute);
    scan: one ``nn.scan`` over stacked block parameters (compile time independent
    of depth; parameters then live under "blocks" with a leading depth axis).
    decode: incremental decoding, the blocks' keys and values in the "cache"
    collection (stacked like the parameters under scan).
    projections_2d: the attention's projections as 2-D matmuls (config.model.projections_2d)."""

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    decode: bool = False
    projections_2d: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        if self.scan:
            stack = nn.scan(_ScannedBlock, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.depth)
            x, _ = stack(self.mlp_dim, self.num_heads, self.dtype, self.remat, self.act, self.norm_eps, self.decode,
                         self.projections_2d, name="blocks")(x, mask)
        else:
            block = remat_block(EncoderBlock, self.remat, False)
            for i in range(self.depth):
                x = block(self.mlp_dim, self.num_heads, self.dtype, self.act, self.norm_eps, self.decode,
                          self.projections_2d, name=f"block{i}")(x, mask)
        return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln_final")(x)


class MAPHead(nn.Module):
    """Multi-head attention pooling: one learned query attends over the tokens."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    projections_2d: bool = False

    @nn.compact
    def __call__(self, x):
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
        y = attention(self.num_heads, self.dtype, "attn", projections_2d=self.projections_2d)(probe, x)
        ln = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln")
        y = y + MlpBlock(self.mlp_dim, self.dtype, self.act, name="mlp")(ln(y))
        return y[:, 0]


class ViT(nn.Module):
    """Vision Transformer image tower; returns (pooled (B, width), tokens (B, n, width)).

    Tower contract (every image tower): ``__call__(uint8-normalised images)``
    -> (pooled, tokens); a ``width`` attribute (the pooled size); ``CONFIG``
    (its config.model.image fields and defaults); ``from_config``; ``check``.

    The options that published checkpoints differ by (``configs/published.py``
    sets them; ``vlm_jax.weights`` converts): ``pool`` "cls" (a class token,
    whose position embedding is the first of n + 1, as OpenAI/OpenCLIP), "gap"
    or "map" (SigLIP's attention pooling); ``ln_pre`` (a LayerNorm before the
    first block, OpenAI/OpenCLIP); ``patch_bias`` (OpenCLIP's patch embedding
    has none); ``act`` and ``norm_eps``; ``pixel_mean``/``pixel_std``: the
    input normalisation the weights expect, per RGB channel in [0, 1] units
    (OpenAI's statistics for CLIP); () keeps the pipeline's [-1, 1] (SigLIP's)."""

    CONFIG: ClassVar[dict[str, Any]] = dict(patch_size=4, width=96, depth=3, mlp_dim=384, num_heads=4,
                                            posemb="learn", pool="gap", stem=(), act="gelu_tanh", norm_eps=1e-6,
                                            ln_pre=False, patch_bias=True, pixel_mean=(), pixel_std=())

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    posemb: str = "learn"  # "learn" | "sincos2d"
    pool: str = "gap"  # "cls" | "gap" | "map"
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    # Convolutional stem (Xiao et al. 2021, "Early convolutions help
    # transformers see better"): channel counts of 3×3 stride-2 convolutions,
    # each followed by LayerNorm and GELU, applied before the patch embedding,
    # which then covers patch_size / 2**len(stem) pixels of the stem's output.
    # The tokens stay (image_size // patch_size)²; () is the plain ViT.
    stem: tuple[int, ...] = ()
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    ln_pre: bool = False
    patch_bias: bool = True
    pixel_mean: tuple[float, ...] = ()
    pixel_std: tuple[float, ...] = ()
    projections_2d: bool = False  # as config.model.projections_2d

    @classmethod
    def from_config(cls, c, model_cfg, vocab_size: int) -> "ViT":
        return cls(c.patch_size, c.width, c.depth, c.mlp_dim, c.num_heads, c.posemb, c.pool,
                   jnp.dtype(model_cfg.dtype), model_cfg.remat, model_cfg.scan, tuple(c.stem), c.act,
                   float(c.norm_eps), bool(c.ln_pre), bool(c.patch_bias), tuple(c.pixel_mean), tuple(c.pixel_std),
                   bool(model_cfg.projections_2d))

    @classmethod
    def check(cls, config) -> None:
        c = config.model.image
        # The patch embedding is a VALID convolution: a remainder of pixels is
        # dropped, as the published So400m/14 at 384 px does (27 × 27 patches).
        require(0 < c.patch_size <= config.data.image_size, "model.image.patch_size",
                f"{c.patch_size} must be positive and at most data.image_size={config.data.image_size}")
        require(c.width % c.num_heads == 0, "model.image.num_heads", f"{c.num_heads} does not divide width {c.width}")
        stem = tuple(c.stem)
        require(all(isinstance(ch, int) and ch > 0 for ch in stem), "model.image.stem",
                f"must be a tuple of positive channel counts, got {c.stem!r}")
        require(c.patch_size % (1 << len(stem)) == 0, "model.image.stem",
                f"{len(stem)} stride-2 convolutions need patch_size divisible by {1 << len(stem)}, "
                f"got patch_size={c.patch_size}")
        check_act("model.image.act", c.act)
        require(c.pool in ("cls", "gap", "map"), "model.image.pool", f"must be 'cls', 'gap' or 'map', got {c.pool!r}")
        check_pixel_stats(c)

    @classmethod
    def forward_flops(cls, config) -> tuple[float, int]:
        """(forward matmul FLOPs per image, pooled width): the conv stem (3×3
        stride-2, SAME), the patch embedding and the encoder."""
        c = config.model.image
        side, channels, flops = config.data.image_size, 3, 0.0
        for ch in c.stem:
            side = -(-side // 2)
            flops += conv3x3_flops(side, 2, channels, ch)
            channels = ch
        patches = (config.data.image_size // c.patch_size) ** 2
        p = c.patch_size >> len(c.stem)
        flops += 2 * patches * (p * p * channels) * c.width
        return flops + transformer_flops(c.width, c.depth, c.mlp_dim, patches + (c.pool == "cls")), c.width

    @nn.compact
    def __call__(self, images, keep: jax.Array | None = None, prompts: jax.Array | None = None):
        """(pooled, tokens) of ``images``. ``keep`` (B, k) int32: only these
        patch positions (row-major over the patch grid) enter the encoder,
        after their position embeddings are added (MAE's masking); the class
        token, if any, always does. ``tokens`` are then the k kept patches'.
        ``prompts`` (P, width): visual prompt tokens (VPT-shallow, Jia et al.
        2022) appended to every image's tokens after the position embeddings;
        they take part in attention and are dropped before pooling, so
        ``tokens`` and the pooled output cover the image's tokens only."""
        chex.assert_rank(images, 4)
        x = normalise_pixels(images, self.pixel_mean, self.pixel_std)
        for i, channels in enumerate(self.stem):
            x = nn.Conv(channels, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype, name=f"stem_conv{i}")(x)
            x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name=f"stem_ln{i}")(x))
        p = self.patch_size >> len(self.stem)
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias, dtype=self.dtype,
                    name="patch_embed")(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls_token = self.pool == "cls"
        if cls_token:  # the class token comes first and has a position embedding of its own
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
        n = h * w + cls_token
        if self.posemb == "learn":
            pe = self.param("pos_embed", nn.initializers.normal(stddev=c**-0.5), (1, n, c))
        elif self.posemb == "sincos2d":
            pe = jnp.asarray(sincos_2d(h, w, c))
            if cls_token:
                pe = jnp.concatenate([jnp.zeros((1, 1, c), pe.dtype), pe], axis=1)
        else:
            raise ValueError(f"config.model.image.posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        x = x + pe.astype(x.dtype)
        if keep is not None:
            chex.assert_rank(keep, 2)
            patches = jnp.take_along_axis(x[:, cls_token:], keep[..., None], axis=1)
            x = jnp.concatenate([x[:, :1], patches], axis=1) if cls_token else patches
        n = x.shape[1]
        if prompts is not None:
            chex.assert_shape(prompts, (None, c))
            x = jnp.concatenate([x, jnp.broadcast_to(prompts.astype(x.dtype), (b, *prompts.shape))], axis=1)
        if self.ln_pre:
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln_pre")(x)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat, self.scan, self.act,
                    self.norm_eps, projections_2d=self.projections_2d, name="encoder")(x)[:, :n]
        if self.pool == "cls":
            return x[:, 0], x[:, 1:]
        if self.pool == "gap":
            return x.mean(axis=1), x
        if self.pool == "map":
            return MAPHead(self.mlp_dim, self.num_heads, self.dtype, self.act, self.norm_eps, self.projections_2d,
                           name="map_head")(x), x
        raise ValueError(f"config.model.image.pool must be 'cls', 'gap' or 'map', got {self.pool!r}")


TEXT_POOLS = ("eos", "argmax", "first", "last", "mean")


def row_token(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[i, index[i]] for every row i: (B, L, w), (B,) -> (B, w). A gather along
    the token axis alone, so a batch-sharded ``x`` is pooled where it lies;
    indexing with (arange(B), index) instead makes the partitioner gather the
    indices from every device and all-reduce a (B, w) result."""
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def vocab_ids(tokens: jax.Array, pad_id: int, token_offset: int) -> jax.Array:
    """Rows of the text tower's embedding table for ``tokens`` (0 = padding):
    a published vocabulary's own padding id and offset (``model.text``)."""
    return jnp.where(tokens == 0, pad_id, tokens - token_offset) if pad_id or token_offset else tokens


class TextTransformer(nn.Module):
    """Transformer text tower over int token ids (0 = padding); returns
    (pooled (B, width), tokens (B, L, width)).

    ``pool``: "eos" takes the last non-padding token (the tokenizers put EOS
    there), "argmax" the position of the largest token id (CLIP's BPE: its EOT
    token has the largest id), "first" and "last" a fixed position, "mean" the
    mean over non-padding tokens. ``mask_padding``: padding keys are masked
    out of attention; False attends to them as OpenCLIP and big_vision do
    (with ``causal`` this changes nothing before the EOT token; for SigLIP's
    bidirectional tower it is part of the published computation).
    ``pad_id``: the token id the embedding sees at padding positions (the
    pipeline pads with 0): big_vision's SigLIP was trained on captions padded
    with its EOS token, 1 (``pad_id=1``), and attends to that padding.
    ``token_offset``: the pipeline shifts a tokenizer's ids up by one when the
    tokenizer's id 0 is a real token (CLIP's BPE: "!"), to keep 0 for padding;
    ``token_offset=1`` undoes that before the embedding, so a published
    embedding table sees its tokenizer's own ids (``docs/weights.md``).
    Tower contract (every text tower): ``__call__(tokens)`` -> (pooled, tokens);
    ``width`` and ``max_len`` attributes; ``CONFIG``, ``from_config``, ``check``.
    """

    CONFIG: ClassVar[dict[str, Any]] = dict(max_len=16, width=96, depth=2, mlp_dim=384, num_heads=4, causal=True,
                                            pool="eos", vocab_size=0,  # vocab_size 0: the tokenizer's
                                            mask_padding=True, act="gelu_tanh", norm_eps=1e-6, pad_id=0,
                                            token_offset=0)

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    causal: bool = True
    pool: str = "eos"
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    mask_padding: bool = True
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    pad_id: int = 0
    token_offset: int = 0
    # Incremental decoding (``clone(decode=True)``; needs ``causal``): each call
    # takes the next position's tokens (B, 1) and keeps the keys, values and the
    # position in the "cache" collection (``vlm_jax.models.generate.init_cache``).
    decode: bool = False
    projections_2d: bool = False  # as config.model.projections_2d

    @classmethod
    def from_config(cls, c, model_cfg, vocab_size: int) -> "TextTransformer":
        needed = vocab_size - c.token_offset  # rows the embedding needs for the tokenizer's ids
        if c.vocab_size and c.vocab_size < needed:
            hint = ("" if c.token_offset else "; if the tokenizer's id 0 is a real token (CLIP's BPE), the pipeline "
                    "shifts its ids by one and config.model.text.token_offset=1 undoes that")
            raise ValueError(f"config.model.text.vocab_size={c.vocab_size} is smaller than the tokenizer's "
                             f"{needed}{hint}")
        return cls(c.vocab_size or needed, c.max_len, c.width, c.depth, c.mlp_dim, c.num_heads, c.causal, c.pool,
                   jnp.dtype(model_cfg.dtype), model_cfg.remat, model_cfg.scan, bool(c.mask_padding), c.act,
                   float(c.norm_eps), int(c.pad_id), int(c.token_offset),
                   projections_2d=bool(model_cfg.projections_2d))

    @classmethod
    def check(cls, config) -> None:
        c = config.model.text
        require(c.width % c.num_heads == 0, "model.text.num_heads", f"{c.num_heads} does not divide width {c.width}")
        require(c.pool in TEXT_POOLS, "model.text.pool", f"must be one of {TEXT_POOLS}, got {c.pool!r}")
        check_act("model.text.act", c.act)
        require(c.pad_id >= 0 and (not c.vocab_size or c.pad_id < c.vocab_size), "model.text.pad_id",
                f"{c.pad_id} is not a token id of the vocabulary (model.text.vocab_size={c.vocab_size})")
        require(c.token_offset in (0, 1), "model.text.token_offset", f"must be 0 or 1, got {c.token_offset!r}")

    @classmethod
    def forward_flops(cls, config) -> tuple[float, int]:
        """(forward matmul FLOPs per caption, pooled width)."""
        c = config.model.text
        return transformer_flops(c.width, c.depth, c.mlp_dim, c.max_len), c.width

    @nn.compact
    def __call__(self, tokens, replace: tuple[jax.Array, jax.Array] | None = None):
        """(pooled (B, width), per-token features (B, L, width)) of ``tokens``
        (B, L), 0 = padding. ``replace = (where (B, L) bool, vector)`` puts
        ``vector`` in place of the token embedding at ``where``: one (width,)
        vector (a masked language model's [MASK], owned by its objective) or
        one per position, (B, L, width) (prompt tuning's learned context); the
        ids there still count as real tokens."""
        chex.assert_rank(tokens, 2)
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds config.model.text.max_len={self.max_len}")
        ids = vocab_ids(tokens, self.pad_id, self.token_offset)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="embed")(ids)
        if replace is not None:
            where, vector = replace
            chex.assert_shape(where, (b, length))
            if vector.ndim != 1:
                chex.assert_shape(vector, (b, length, self.width))
            else:
                chex.assert_shape(vector, (self.width,))
            x = jnp.where(where[..., None], vector.astype(x.dtype), x)
        pe = self.param("pos_embed", nn.initializers.normal(stddev=0.01), (1, self.max_len, self.width))
        if self.decode:  # the position comes from the cache; causality from the cached keys
            ready = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if ready:
                pe = jax.lax.dynamic_slice_in_dim(pe, position.value, length, axis=1)
                position.value = position.value + length
        x = (x + pe[:, :length]).astype(self.dtype)
        valid = tokens != 0
        mask = None
        if self.mask_padding and not self.decode:  # generation writes no padding before the position
            mask = nn.make_attention_mask(valid, valid)
            # A row of padding attends to nothing; let padded queries see themselves
            # so softmax stays finite (their outputs are never pooled).
            mask = jnp.logical_or(mask, jnp.eye(length, dtype=bool)[None, None])
        if self.causal and not self.decode:
            mask = nn.combine_masks(mask, nn.make_causal_mask(tokens))
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat, self.scan, self.act,
                    self.norm_eps, self.decode, self.projections_2d, name="encoder")(x, mask)
        if self.pool == "eos":
            return row_token(x, jnp.maximum(valid.sum(axis=1) - 1, 0)), x
        if self.pool == "argmax":
            return row_token(x, jnp.argmax(tokens, axis=1)), x
        if self.pool == "first":
            return x[:, 0], x
        if self.pool == "last":
            return x[:, -1], x
        if self.pool == "mean":
            w = valid.astype(x.dtype)[..., None]
            return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0), x
        raise ValueError(f"config.model.text.pool must be one of {TEXT_POOLS}, got {self.pool!r}")


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class TwoTower(nn.Module):
    """Image and text towers with linear projections to a shared embedding space.

    Only the towers and their projections live here; what an objective adds
    (temperature, bias, heads) is created by the objective (``init_parts``)
    and sits beside these parameters at the top of the same tree."""

    image: ViT
    text: TextTransformer
    embed_dim: int
    image_projection: bool = True  # False (SigLIP): the pooled image features are the embedding
    text_projection_bias: bool = False  # True (SigLIP): the text head has a bias

    def setup(self):
        if self.image_projection:
            self.img_proj = nn.Dense(self.embed_dim, use_bias=False, name="img_proj")
        elif self.image.width != self.embed_dim:
            raise ValueError(f"config.model.image_projection=False needs embed_dim == image width "
                             f"({self.embed_dim} != {self.image.width})")
        else:
            self.img_proj = lambda x: x
        self.txt_proj = nn.Dense(self.embed_dim, use_bias=self.text_projection_bias, name="txt_proj")

    def image_features(self, images):
        """The image tower's (pooled (B, width), tokens (B, n, width)), before projection."""
        return self.image(images)

    def encode_image(self, images):
        return l2_normalize(self.img_proj(self.image(images)[0]))

    def encode_text(self, tokens):
        return l2_normalize(self.txt_proj(self.text(tokens)[0]))

    def encode_image_prompted(self, images, prompts):
        """z^I (B, embed_dim) with visual prompt tokens (P, image width) in
        the image tower (ViT only; ``ViT.__call__``)."""
        return l2_normalize(self.img_proj(self.image(images, prompts=prompts)[0]))

    def encode_text_prompted(self, tokens, where, vectors):
        """z^T (B, embed_dim) with ``vectors`` (B, L, text width) in place of
        the token embeddings at ``where`` (B, L) (text prompt tuning)."""
        return l2_normalize(self.txt_proj(self.text(tokens, replace=(where, vectors))[0]))

    def encode_image_tokens(self, images):
        """Per-token image embeddings (B, n, embed_dim), each L2-normalised (FILIP)."""
        return l2_normalize(self.img_proj(self.image(images)[1]))

    def encode_image_dense(self, images):
        """(z^I (B, embed_dim) L2-normalised, patch tokens (B, n, embed_dim)
        projected into the shared space, not normalised): dense objectives and
        evaluations pool or score the tokens."""
        pooled, tokens = self.image(images)
        return l2_normalize(self.img_proj(pooled)), self.img_proj(tokens)

    def encode_text_tokens(self, tokens):
        """Per-token text embeddings (B, L, embed_dim), L2-normalised, and the
        float mask of real (non-padding) tokens (FILIP)."""
        return l2_normalize(self.txt_proj(self.text(tokens)[1])), (tokens != 0).astype(jnp.float32)

    def __call__(self, images, tokens):
        """(z^I, z^T); creates every parameter of the towers and projections."""
        return self.encode_image(images), self.encode_text(tokens)
