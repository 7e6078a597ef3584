"""CLIP's modified ResNet image tower (Radford et al. 2021, section 2.4).

Three changes to the ResNet-D bottleneck network: a stem of three 3×3
convolutions (the first with stride 2) and a 2×2 average pool instead of a
7×7 convolution and max pool; anti-aliased downsampling (a stride-s average
pool after the 3×3 convolution of a block, and before the 1×1 convolution of
its shortcut, instead of strided convolutions); and attention pooling: one
query, the mean of the final feature map, attends over the map plus itself,
with a learned position embedding over the (h·w + 1) positions, and its
output projection gives the pooled features.

Returned tokens, for the token-level objectives and dense evaluations: each
spatial position's value passed through the pool's output projection,
``c_proj(v_proj(x_i + pos_i))`` — the pooled output is an attention-weighted
mean of exactly these, so tokens and the pooled vector live in one space
(the MaskCLIP reading of CLIP's attention pool).

Normalisation: GroupNorm instead of BatchNorm. It has the same learnable
parameters (a scale and a bias per channel, so the published parameter
counts hold) and no mutable batch statistics: the train step stays a pure
function of (params, batch), its result does not depend on how the batch is
split over devices or micro-batches, and resume has no running averages to
restore. Weights trained with BatchNorm (OpenAI's RN50) therefore do not
load into it as they are. Each norm uses gcd(norm_groups, channels) groups.

``model.remat`` and ``model.scan`` act on transformer blocks (the text
tower's); this tower's blocks differ in shape per stage and are not scanned
or rematerialised.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import require
from vlm_jax.models.towers import check_pixel_stats, conv3x3_flops, normalise_pixels

Dtype = Any
EXPANSION = 4  # a bottleneck block's output channels per "planes"


class GroupNorm(nn.Module):
    """Group normalisation of an NHWC map: ``flax.linen.GroupNorm``'s
    parameters (``scale``, ``bias``), statistics (float32,
    Var = E[x²] − E[x]²) and result, computed in the map's own layout.
    The means over (h, w) come first, as (b, c), then over each group's
    channels, as (b, groups); the map is then one multiply-add per element,
    y = x·a + c with a = scale / √(Var + ε) and c = bias − mean·a per
    (example, channel). Flax normalises a (b, h, w, groups, c / groups)
    view, for which XLA on the CPU transposes the whole map, forward and
    backward (docs/benchmarks.md)."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        b, c = x.shape[0], x.shape[-1]
        chex.assert_rank(x, 4)
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
        per_group = c // self.num_groups
        scale = self.param("scale", self.scale_init, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)

        def group_mean(v):  # (b, h, w, c) -> (b, groups): mean over the spatial axes and the group's channels
            return jnp.mean(v, axis=(1, 2)).reshape(b, self.num_groups, per_group).mean(axis=-1)

        mean, mean_sq = group_mean(xf), group_mean(jnp.square(xf))
        inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
        a = jnp.repeat(inv, per_group, axis=1) * scale.astype(jnp.float32)
        shift = bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=1) * a
        return (xf * a[:, None, None, :] + shift[:, None, None, :]).astype(self.dtype)


def _conv_raw(x, kernel, stride: int):
    p = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x, kernel, stride: int = 1):
    """k × k convolution (k odd, zero padding k // 2) of an NHWC map with an
    HWIO kernel. The forward pass and the input's gradient are XLA's
    convolutions; the kernel's gradient is k² matrix products, one per tap
    (i, j): the map's window at offset (i, j), channel-major as
    (c, b·h'·w'), times the output's cotangent (b·h'·w', o). XLA's own
    kernel gradient is a convolution contracting over the batch, which on
    the CPU transposes both operands and ran at 12–32 GFLOP/s where these
    products run at about 60 (docs/benchmarks.md). Memory: the residuals
    are autodiff's (the input and the kernel); the backward pass adds one
    transposed, padded copy of the input and a window of it per product."""
    return _conv_raw(x, kernel, stride)


def _conv2d_fwd(x, kernel, stride):
    return _conv_raw(x, kernel, stride), (x, kernel)


def _conv2d_bwd(stride, res, g):
    x, kernel = res
    k, _, c, o = kernel.shape
    dx = jax.vjp(lambda x: _conv_raw(x, kernel, stride), x)[1](g)[0]
    b, ho, wo = g.shape[:3]
    p = k // 2
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (p, p), (p, p)))  # (c, b, h + 2p, w + 2p)
    window = lambda i, j: jax.lax.slice(xt, (0, 0, i, j), (c, b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1),
                                        (1, 1, stride, stride)).reshape(c, b * ho * wo)
    g = g.reshape(b * ho * wo, o)
    dk = jnp.stack([jnp.dot(window(i, j), g, preferred_element_type=jnp.float32) for i in range(k) for j in range(k)])
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """Bias-free k × k convolution with "SAME" zero padding (k odd): the
    parameters, initialisation and forward computation of
    ``nn.Conv(features, (k, k), strides, padding=k // 2, use_bias=False)``,
    differentiated by ``conv2d``; a 1 × 1 convolution is a matrix product
    over the channel axis."""

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        if k % 2 == 0:
            raise ValueError(f"Conv: kernel_size {k} must be odd (padding k // 2 on each side)")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1 and self.stride == 1:
            return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
        return conv2d(x, kernel, self.stride)


def _norm(channels: int, groups: int, dtype, name: str, zero: bool = False) -> GroupNorm:
    return GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-5, dtype=dtype, name=name,
                     scale_init=nn.initializers.zeros if zero else nn.initializers.ones)


def feature_width(layers, base_width: int) -> int:
    """Channels of the last stage: the attention pool's width."""
    return base_width * EXPANSION * 2 ** (len(layers) - 1)


def blocks(layers, base_width: int) -> list[tuple[str, int, int]]:
    """(name, planes, stride) of every bottleneck block: the first block of
    each stage after the first halves the resolution."""
    return [(f"stage{s}_block{j}", base_width * 2**s, 2 if (s > 0 and j == 0) else 1)
            for s, n in enumerate(layers) for j in range(n)]


def _avg_pool(x, s: int):
    return nn.avg_pool(x, (s, s), strides=(s, s)) if s > 1 else x


class Bottleneck(nn.Module):
    """1×1 → 3×3 → (stride-s average pool) → 1×1 (×4 channels), plus the
    shortcut (average pool, 1×1 convolution and norm when the shape changes);
    the last norm's scale starts at zero, so every block starts as identity."""

    planes: int
    stride: int = 1
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        out_ch = self.planes * EXPANSION
        conv = lambda ch, k, name: Conv(ch, k, dtype=self.dtype, name=name)
        y = nn.relu(_norm(self.planes, self.groups, self.dtype, "norm1")(conv(self.planes, 1, "conv1")(x)))
        y = nn.relu(_norm(self.planes, self.groups, self.dtype, "norm2")(conv(self.planes, 3, "conv2")(y)))
        y = _avg_pool(y, self.stride)
        y = _norm(out_ch, self.groups, self.dtype, "norm3", zero=True)(conv(out_ch, 1, "conv3")(y))
        if self.stride > 1 or x.shape[-1] != out_ch:
            x = _norm(out_ch, self.groups, self.dtype, "down_norm")(conv(out_ch, 1, "down_conv")(_avg_pool(x, self.stride)))
        return nn.relu(x + y)


class AttentionPool(nn.Module):
    """Multi-head attention of the map's mean over [mean; map] + position
    embedding; returns (pooled (B, out), per-position tokens (B, h·w, out))."""

    num_heads: int
    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        init = nn.initializers.normal(stddev=c**-0.5)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        x = x + self.param("pos_embed", init, (1, n + 1, c)).astype(x.dtype)
        dense = lambda dim, name: nn.Dense(dim, kernel_init=init, dtype=self.dtype, name=name)
        h, d = self.num_heads, c // self.num_heads
        q = dense(c, "q_proj")(x[:, :1]).reshape(b, 1, h, d)
        k = dense(c, "k_proj")(x).reshape(b, n + 1, h, d)
        v_flat = dense(c, "v_proj")(x)
        v = v_flat.reshape(b, n + 1, h, d)
        weights = nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * d**-0.5, axis=-1)
        pooled = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).reshape(b, c)
        c_proj = dense(self.out_dim, "c_proj")
        return c_proj(pooled), c_proj(v_flat[:, 1:])


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower; returns (pooled (B, width), tokens (B, h·w, width)).

    ``layers``: bottleneck blocks per stage (RN50: (3, 4, 6, 3)); stage i has
    ``base_width · 2^i`` planes and, after the first, halves the resolution.
    The stem (stride 2, then a 2×2 pool) and the stages reduce the image by
    4 · 2^(len(layers) − 1), times ``space_to_depth``: RN50 maps 224 px to
    7 × 7; a tiny tower of two stages maps 32 px to 4 × 4, the ViT default's
    16 tokens. ``width`` (the pooled size) is ``output_dim``, or the last
    stage's channels (base_width · 4 · 2^(len(layers) − 1)) when it is 0."""

    CONFIG: ClassVar[dict[str, Any]] = dict(layers=(2, 2), base_width=32, num_heads=4, output_dim=0, norm_groups=32,
                                            space_to_depth=1, pixel_mean=(), pixel_std=())

    layers: tuple[int, ...]
    base_width: int
    num_heads: int
    output_dim: int = 0
    norm_groups: int = 32
    # s > 1: each s × s block of pixels becomes one pixel of 3·s² channels
    # before the stem (space-to-depth, as TResNet's stem): an image s times
    # larger in the same convolution FLOPs but the first convolution's.
    space_to_depth: int = 1
    dtype: Dtype = jnp.float32
    pixel_mean: tuple[float, ...] = ()
    pixel_std: tuple[float, ...] = ()

    @property
    def width(self) -> int:
        return self.output_dim or feature_width(self.layers, self.base_width)

    @classmethod
    def from_config(cls, c, model_cfg, vocab_size: int) -> "ModifiedResNet":
        return cls(tuple(c.layers), c.base_width, c.num_heads, c.output_dim, c.norm_groups, int(c.space_to_depth),
                   jnp.dtype(model_cfg.dtype), tuple(c.pixel_mean), tuple(c.pixel_std))

    @staticmethod
    def reduction(layers, space_to_depth: int = 1) -> int:
        return space_to_depth * 4 * 2 ** (len(layers) - 1)

    @classmethod
    def check(cls, config) -> None:
        c = config.model.image
        layers = tuple(c.layers)
        require(len(layers) > 0 and all(isinstance(n, int) and n > 0 for n in layers), "model.image.layers",
                f"must be a non-empty tuple of positive block counts, got {c.layers!r}")
        require(isinstance(c.space_to_depth, int) and c.space_to_depth >= 1, "model.image.space_to_depth",
                f"must be a positive integer (1: none), got {c.space_to_depth!r}")
        r = cls.reduction(layers, c.space_to_depth)
        require(config.data.image_size % r == 0, "model.image.layers",
                f"{len(layers)} stages (and space_to_depth={c.space_to_depth}) reduce the image by {r}; "
                f"data.image_size={config.data.image_size} is not a multiple of it")
        require(c.base_width > 0 and c.base_width % 2 == 0, "model.image.base_width",
                f"must be a positive even number (the stem's first convolutions have base_width / 2), "
                f"got {c.base_width}")
        features = feature_width(layers, c.base_width)
        require(c.num_heads > 0 and features % c.num_heads == 0, "model.image.num_heads",
                f"{c.num_heads} does not divide the attention pool's width {features}")
        require(c.output_dim >= 0, "model.image.output_dim", f"must be >= 0 (0: {features}), got {c.output_dim}")
        require(c.norm_groups > 0, "model.image.norm_groups", f"must be positive, got {c.norm_groups}")
        check_pixel_stats(c)

    @classmethod
    def forward_flops(cls, config) -> tuple[float, int]:
        """(forward convolution and attention-pool FLOPs per image, pooled
        width); 3×3 convolutions count products with real pixels only."""
        c = config.model.image
        side = config.data.image_size // c.space_to_depth // 2
        half = c.base_width // 2
        flops = conv3x3_flops(side, 2, 3 * c.space_to_depth**2, half) + conv3x3_flops(side, 1, half, half)
        flops += conv3x3_flops(side, 1, half, c.base_width)
        side, cin = side // 2, c.base_width
        for _, planes, stride in blocks(c.layers, c.base_width):
            out, cout = side // stride, planes * EXPANSION
            flops += 2.0 * side * side * cin * planes + conv3x3_flops(side, 1, planes, planes)
            flops += 2.0 * out * out * planes * cout
            if stride > 1 or cin != cout:
                flops += 2.0 * out * out * cin * cout
            side, cin = out, cout
        n, width = side * side, c.output_dim or cin
        # k, v over n + 1 positions, q of one; scores and sum; c_proj of the pooled vector and of n tokens
        flops += 2.0 * (n + 1) * 2 * cin * cin + 2.0 * cin * cin + 4.0 * (n + 1) * cin + 2.0 * (n + 1) * cin * width
        return flops, width

    @nn.compact
    def __call__(self, images):
        chex.assert_rank(images, 4)
        x = normalise_pixels(images, self.pixel_mean, self.pixel_std)
        if self.space_to_depth > 1:
            s = self.space_to_depth
            b, h, w, c = x.shape
            x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // s, w // s, s * s * c)
        half, g = self.base_width // 2, self.norm_groups
        for i, (ch, stride) in enumerate(((half, 2), (half, 1), (self.base_width, 1))):
            x = Conv(ch, 3, stride, self.dtype, name=f"stem_conv{i}")(x)
            x = nn.relu(_norm(ch, g, self.dtype, f"stem_norm{i}")(x))
        x = _avg_pool(x, 2)
        for name, planes, stride in blocks(self.layers, self.base_width):
            x = Bottleneck(planes, stride, g, self.dtype, name=name)(x)
        b, h, w, c = x.shape
        return AttentionPool(self.num_heads, self.width, self.dtype, name="attn_pool")(x.reshape(b, h * w, c))
