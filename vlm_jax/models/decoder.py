"""Multimodal modules over image tokens: CoCa's captioning decoder and
ALBEF's fusion encoder.

``CaptionDecoder`` takes the causal text tower's per-token features (B, L, w)
and the image tower's tokens (B, n, w_img) and returns logits (B, L, vocab)
where position l predicts token l: its input is shifted right by one, a
learned start vector first, so position l reads the text features of tokens
< l only and every token of a caption, the first included, is predicted (the
embedded tokenizer has no BOS token to start from). Each block is pre-LN:
causal self-attention, cross-attention to the image tokens (projected to the
decoder width after a LayerNorm), MLP. With a causal text tower under it, the
logits at position l depend on the tokens before l only (tested).

``FusionEncoder`` (ALBEF / BLIP's multimodal encoder) takes the text tower's
per-token features, their padding mask and the image tokens, and returns
(B, 1 + L, w): a learned query first (image–text matching reads it), then one
vector per text token (masked language modelling reads those). Its blocks are
the decoder's with bidirectional self-attention over the query and the real
tokens (padding is never attended to, so a caption's outputs do not depend on
what fills its padding; tested).

Their parameters are plain pytrees; the objective that uses one owns them.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models.towers import Dtype, MlpBlock, remat_block


class CrossBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    decode: bool = False  # self-attention keys and values cached, one position per call

    @nn.compact
    def __call__(self, x, context, mask):
        ln = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        y = ln("ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, decode=self.decode,
                                                name="self_attn")(y, y, mask=mask)
        y = ln("ln2")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, name="cross_attn")(
            y, context)
        return x + MlpBlock(self.mlp_dim, self.dtype, self.act, name="mlp")(ln("ln3")(x))


class _ScannedCrossBlock(nn.Module):
    """One cross-attention block in nn.scan's (carry, x) -> (carry, y) form."""

    mlp_dim: int
    num_heads: int
    dtype: Dtype
    act: str
    norm_eps: float
    decode: bool
    remat: str

    @nn.compact
    def __call__(self, x, context, mask):
        block = remat_block(CrossBlock, self.remat, True)(self.mlp_dim, self.num_heads, self.dtype, self.act,
                                                          self.norm_eps, self.decode, name="block")
        return block(x, context, mask), None


def cross_blocks(x, context, mask, *, depth: int, mlp_dim: int, num_heads: int, dtype: Dtype, act: str,
                 norm_eps: float, remat: str, scan: bool, decode: bool):
    """``depth`` CrossBlocks of the calling module: "block{i}", or under
    ``scan`` one "blocks" stack with a leading depth axis (the towers' layout);
    ``remat`` a policy of ``towers.REMAT_POLICIES`` or "none"."""
    if scan:
        stack = nn.scan(_ScannedCrossBlock, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=depth)
        return stack(mlp_dim, num_heads, dtype, act, norm_eps, decode, remat, name="blocks")(x, context, mask)[0]
    block = remat_block(CrossBlock, remat, False)
    for i in range(depth):
        x = block(mlp_dim, num_heads, dtype, act, norm_eps, decode, name=f"block{i}")(x, context, mask)
    return x


def image_context(image_tokens, width: int, dtype: Dtype, eps: float):
    """The image tokens as cross-attention context: LayerNorm, then projected
    to the text width (submodules "ln_image", "image_proj" of the caller)."""
    context = nn.LayerNorm(epsilon=eps, dtype=dtype, name="ln_image")(image_tokens)
    return nn.Dense(width, dtype=dtype, name="image_proj")(context)


class CaptionDecoder(nn.Module):
    vocab_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    # Incremental decoding (``clone(decode=True)``): each call predicts the next
    # position from the text features of the token before it, (B, 1, w), or
    # from the start vector when ``text_features`` is None (position 0).
    decode: bool = False
    width: int = 0  # the text width: needed when text_features is None
    remat: str = "none"  # as config.model.remat
    scan: bool = False  # as config.model.scan

    @nn.compact
    def __call__(self, text_features, image_tokens):
        width = self.width if text_features is None else text_features.shape[-1]
        context = image_context(image_tokens, width, self.dtype, self.norm_eps)
        start = self.param("start", nn.initializers.normal(0.02), (1, 1, width))
        b = image_tokens.shape[0]
        if self.decode:
            x, mask = (jnp.tile(start, (b, 1, 1)) if text_features is None else text_features), None
        else:
            length = text_features.shape[1]
            mask = nn.make_causal_mask(jnp.ones((b, length), jnp.int32))
            x = jnp.concatenate([jnp.tile(start, (b, 1, 1)), text_features[:, :-1]], axis=1)
        x = cross_blocks(x.astype(self.dtype), context, mask, depth=self.depth, mlp_dim=self.mlp_dim,
                         num_heads=self.num_heads, dtype=self.dtype, act=self.act, norm_eps=self.norm_eps,
                         remat=self.remat, scan=self.scan, decode=self.decode)
        x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln_final")(x)
        return nn.Dense(self.vocab_size, dtype=jnp.float32, name="head")(x).astype(jnp.float32)


class FusionEncoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    remat: str = "none"  # as config.model.remat
    scan: bool = False  # as config.model.scan

    @nn.compact
    def __call__(self, text_features, valid, image_tokens):
        """(B, 1 + L, w) from text features (B, L, w), ``valid`` (B, L) bool
        (False = padding) and image tokens (B, n, w_img)."""
        chex.assert_rank((text_features, valid, image_tokens), (3, 2, 3))
        chex.assert_equal_shape_prefix((text_features, valid), 2)
        b, width = text_features.shape[0], text_features.shape[-1]
        context = image_context(image_tokens, width, self.dtype, self.norm_eps)
        query = self.param("query", nn.initializers.normal(0.02), (1, 1, width))
        x = jnp.concatenate([jnp.tile(query, (b, 1, 1)), text_features], axis=1).astype(self.dtype)
        keys = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        mask = nn.make_attention_mask(jnp.ones_like(keys), keys)
        x = cross_blocks(x, context, mask, depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                         dtype=self.dtype, act=self.act, norm_eps=self.norm_eps, remat=self.remat, scan=self.scan,
                         decode=False)
        return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="ln_final")(x)
