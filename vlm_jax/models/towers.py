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


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, name="attn")(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
        return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)


# Rematerialisation policies by name (config.model.remat): what the backward
# pass may keep from the forward pass of each block instead of recomputing it.
REMAT_POLICIES = {
    "full": None,  # keep nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "dots_with_batch": jax.checkpoint_policies.dots_saveable,
}


def _block_cls(remat: str, scan: bool):
    if remat == "none":
        return EncoderBlock
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat must be 'none' or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    # Under scan the loop already separates the iterations, so CSE prevention is unnecessary.
    return nn.remat(EncoderBlock, policy=REMAT_POLICIES[remat], prevent_cse=not scan)


class _ScannedBlock(nn.Module):
    """One block in nn.scan's (carry, x) -> (carry, y) form."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype
    remat: str

    @nn.compact
    def __call__(self, x, mask):
        return _block_cls(self.remat, True)(self.mlp_dim, self.num_heads, self.dtype, name="block")(x, mask), None


class Encoder(nn.Module):
    """``depth`` pre-LN blocks and a final LayerNorm.

    remat: "none" or a policy of REMAT_POLICIES (activation memory for compute);
    scan: one ``nn.scan`` over stacked block parameters (compile time independent
    of depth; parameters then live under "blocks" with a leading depth axis)."""

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        if self.scan:
            stack = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.depth)
            x, _ = stack(self.mlp_dim, self.num_heads, self.dtype, self.remat, name="blocks")(x, mask)
        else:
            block = _block_cls(self.remat, False)
            for i in range(self.depth):
                x = block(self.mlp_dim, self.num_heads, self.dtype, name=f"block{i}")(x, mask)
        return nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)


class MAPHead(nn.Module):
    """Multi-head attention pooling: one learned query attends over the tokens."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, name="attn")(probe, x)
        y = y + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(nn.LayerNorm(dtype=self.dtype, name="ln")(y))
        return y[:, 0]


class ViT(nn.Module):
    """Vision Transformer image tower; returns (pooled (B, width), tokens (B, n, width)).

    Tower contract (every image tower): ``__call__(uint8-normalised images)``
    -> (pooled, tokens); a ``width`` attribute (the pooled size); ``CONFIG``
    (its config.model.image fields and defaults); ``from_config``; ``check``."""

    CONFIG: ClassVar[dict[str, Any]] = dict(patch_size=4, width=96, depth=3, mlp_dim=384, num_heads=4,
                                            posemb="learn", pool="gap", stem=())

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

    @classmethod
    def from_config(cls, c, model_cfg, vocab_size: int) -> "ViT":
        return cls(c.patch_size, c.width, c.depth, c.mlp_dim, c.num_heads, c.posemb, c.pool,
                   jnp.dtype(model_cfg.dtype), model_cfg.remat, model_cfg.scan, tuple(c.stem))

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

    @nn.compact
    def __call__(self, images):
        chex.assert_rank(images, 4)
        x = images
        for i, channels in enumerate(self.stem):
            x = nn.Conv(channels, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype, name=f"stem_conv{i}")(x)
            x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name=f"stem_ln{i}")(x))
        p = self.patch_size >> len(self.stem)
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        if self.posemb == "learn":
            pe = self.param("pos_embed", nn.initializers.normal(stddev=c**-0.5), (1, h * w, c))
        elif self.posemb == "sincos2d":
            pe = jnp.asarray(sincos_2d(h, w, c))
        else:
            raise ValueError(f"config.model.image.posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        x = x + pe.astype(x.dtype)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat, self.scan, name="encoder")(x)
        if self.pool == "cls":
            return x[:, 0], x[:, 1:]
        if self.pool == "gap":
            return x.mean(axis=1), x
        if self.pool == "map":
            return MAPHead(self.mlp_dim, self.num_heads, self.dtype, name="map_head")(x), x
        raise ValueError(f"config.model.image.pool must be 'cls', 'gap' or 'map', got {self.pool!r}")


class TextTransformer(nn.Module):
    """Transformer text tower over int token ids (0 = padding); returns
    (pooled (B, width), tokens (B, L, width)); padding tokens are 0 in ``tokens``.

    ``pool``: "eos" takes the last non-padding token (the tokenizers put EOS
    there), "last" the final position, "mean" the mean over non-padding tokens.
    Tower contract (every text tower): ``__call__(tokens)`` -> (pooled, tokens);
    ``width`` and ``max_len`` attributes; ``CONFIG``, ``from_config``, ``check``.
    """

    CONFIG: ClassVar[dict[str, Any]] = dict(max_len=16, width=96, depth=2, mlp_dim=384, num_heads=4, causal=True,
                                            pool="eos", vocab_size=0)  # vocab_size 0: the tokenizer's

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

    @classmethod
    def from_config(cls, c, model_cfg, vocab_size: int) -> "TextTransformer":
        if c.vocab_size and c.vocab_size < vocab_size:
            raise ValueError(f"config.model.text.vocab_size={c.vocab_size} is smaller than the tokenizer's {vocab_size}")
        return cls(c.vocab_size or vocab_size, c.max_len, c.width, c.depth, c.mlp_dim, c.num_heads, c.causal, c.pool,
                   jnp.dtype(model_cfg.dtype), model_cfg.remat, model_cfg.scan)

    @classmethod
    def check(cls, config) -> None:
        c = config.model.text
        require(c.width % c.num_heads == 0, "model.text.num_heads", f"{c.num_heads} does not divide width {c.width}")

    @nn.compact
    def __call__(self, tokens):
        chex.assert_rank(tokens, 2)
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds config.model.text.max_len={self.max_len}")
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name="embed")(tokens)
        pe = self.param("pos_embed", nn.initializers.normal(stddev=0.01), (1, self.max_len, self.width))
        x = (x + pe[:, :length]).astype(self.dtype)
        valid = tokens != 0
        mask = nn.make_attention_mask(valid, valid)
        if self.causal:
            mask = nn.combine_masks(mask, nn.make_causal_mask(tokens))
        # A row of padding attends to nothing; let padded queries see themselves
        # so softmax stays finite (their outputs are never pooled).
        mask = jnp.logical_or(mask, jnp.eye(length, dtype=bool)[None, None])
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, self.remat, self.scan, name="encoder")(x, mask)
        if self.pool == "eos":
            last = jnp.maximum(valid.sum(axis=1) - 1, 0)
            return x[jnp.arange(b), last], x
        if self.pool == "last":
            return x[:, -1], x
        if self.pool == "mean":
            w = valid.astype(x.dtype)[..., None]
            return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0), x
        raise ValueError(f"config.model.text.pool must be 'eos', 'last' or 'mean', got {self.pool!r}")


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

    def encode_image_tokens(self, images):
        """Per-token image embeddings (B, n, embed_dim), each L2-normalised (FILIP)."""
        return l2_normalize(self.img_proj(self.image(images)[1]))

    def encode_text_tokens(self, tokens):
        """Per-token text embeddings (B, L, embed_dim), L2-normalised, and the
        float mask of real (non-padding) tokens (FILIP)."""
        return l2_normalize(self.txt_proj(self.text(tokens)[1])), (tokens != 0).astype(jnp.float32)

    def __call__(self, images, tokens):
        """(z^I, z^T); creates every parameter of the towers and projections."""
        return self.encode_image(images), self.encode_text(tokens)
