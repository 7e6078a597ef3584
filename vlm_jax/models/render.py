"""Text rendered as images, on the device: the input of one-tower models (CLIPPO).

A caption's byte tokens (``data.tokenizer = "bytes"``: UTF-8 bytes + 2,
0 = padding, 1 = end) are laid out in a grid of fixed cells, left to right
and top to bottom, wrapping at the image's width; each cell is the glyph of
its byte, dark text on a white page. The glyphs come from the FreeType font
Pillow ships (``ImageFont.load_default(size)``, nothing downloaded), drawn
once on the host into an atlas of one cell per byte; rendering is then a
gather from that atlas, so it runs under jit, batched, on any device, and is
a pure function of the tokens. Bytes outside printable ASCII, padding and the
end token are blank cells. Tokens past the page's capacity would be cut:
configs are checked so that ``model.text.max_len`` fits (``capacity``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

TOKEN_OFFSET = 2  # the bytes tokenizer's shift
VOCAB = 256 + TOKEN_OFFSET


@functools.lru_cache(maxsize=8)
def glyph_atlas(cell: tuple[int, int], font_size: int) -> np.ndarray:
    """(VOCAB, cell_h, cell_w) uint8 ink coverage of each token's glyph."""
    h, w = cell
    font = ImageFont.load_default(size=font_size)
    atlas = np.zeros((VOCAB, h, w), np.uint8)
    for byte in range(32, 127):
        img = Image.new("L", (w, h), 0)
        ImageDraw.Draw(img).text((0, 0), chr(byte), fill=255, font=font)
        atlas[byte + TOKEN_OFFSET] = np.asarray(img)
    return atlas


def capacity(size: int, cell: tuple[int, int]) -> int:
    """Characters on a size × size page of (h, w) cells."""
    return (size // cell[0]) * (size // cell[1])


def render(tokens: jax.Array, size: int, cell: tuple[int, int], font_size: int) -> jax.Array:
    """(B, L) int32 byte tokens -> (B, size, size, 3) uint8 pages (L <= capacity)."""
    h, w = cell
    rows, cols = size // h, size // w
    b, length = tokens.shape
    if length > rows * cols:
        raise ValueError(f"{length} tokens do not fit a {size} px page of {h} x {w} cells ({rows * cols})")
    atlas = jnp.asarray(glyph_atlas(tuple(cell), font_size))
    glyphs = atlas[jnp.clip(tokens, 0, VOCAB - 1)]  # (B, L, h, w)
    glyphs = jnp.pad(glyphs, ((0, 0), (0, rows * cols - length), (0, 0), (0, 0)))
    page = glyphs.reshape(b, rows, cols, h, w).transpose(0, 1, 3, 2, 4).reshape(b, rows * h, cols * w)
    page = jnp.pad(page, ((0, 0), (0, size - rows * h), (0, size - cols * w)))
    return jnp.repeat((255 - page)[..., None], 3, axis=-1).astype(jnp.uint8)
