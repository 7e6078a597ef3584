"""Images: decoding of any mode to RGB uint8, and the field's crops.

Everything here is NumPy + PIL on the host and returns ``uint8`` arrays; images
stay uint8 until the device (``pipeline.normalize_images`` runs in the step).

* ``decode_rgb`` takes encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF: what PIL
  reads) or an array, in any mode: grayscale, bilevel, palette (with or
  without transparency), RGBA/LA (alpha dropped, as open_clip's
  ``convert("RGB")`` and big_vision's 3-channel decode do), CMYK/YCbCr, and
  16/32-bit integer images (scaled to 8 bits, not clipped). A file that is
  not an image raises ``ImageError("undecodable")``; one that ends early or
  whose data is corrupt raises ``ImageError("truncated")``.
* ``crop_resize`` is the one crop: a window of the image resized to
  ``size × size``. ``random_window`` draws the window the way torchvision's
  RandomResizedCrop and the Inception crop do (area fraction and log aspect
  ratio uniform in configured ranges, ten tries, then the largest centred
  window whose ratio is in range); ``centre_window`` is the evaluation
  convention (the centred square of side = the shorter side, i.e. resize the
  shorter side then centre-crop). With ``area = ratio = (1, 1)`` the random
  window is the centred square too, so training and evaluation preprocess alike.
* Boxes and masks follow a view (``train_view(..., geometry=True)`` or
  ``eval_geometry``): ``view_boxes`` maps and clips boxes and says how much of
  each stays visible, ``view_mask`` samples an id map at the view's pixels.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL's default guard against decompression bombs is a warning at 89 Mpx and
# an error at 179 Mpx; we treat both as "undecodable" rather than let a
# hostile file stall a worker.
_MAX_PIXELS = 178_956_970

RESAMPLE = {
    "area": Image.BOX,  # pixel-area average; an integer reduction is an exact block mean
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
}


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is "undecodable" or "truncated"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} image: {detail}")
        self.reason = reason


def _lazy_open(data: bytes) -> Image.Image:
    """Reads the header only: format, mode and size, no pixels yet."""
    if not data:
        raise ImageError("undecodable", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("undecodable", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("truncated", str(e) or type(e).__name__) from None
    if img.width * img.height > _MAX_PIXELS:
        raise ImageError("undecodable", f"{img.width}x{img.height} exceeds {_MAX_PIXELS} pixels")
    return img


def _load(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's ways of saying "ends early / corrupt"
        raise ImageError("truncated", str(e) or type(e).__name__) from None
    return img


def open_image(data: bytes) -> Image.Image:
    """Opens and fully decodes encoded bytes (so truncation shows here, not later)."""
    return _load(_lazy_open(data))


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> H×W×3 uint8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        bits = 16 if img.mode.startswith("I;16") or a.max(initial=0) <= 0xFFFF else 32
        a = (np.clip(a.astype(np.int64), 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":  # float images: [0, 1] if that is their range, else [0, 255]
        a = np.asarray(img, dtype=np.float32)
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a
        return np.repeat(np.round(np.clip(a, 0, 255)).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's documented route for palette transparency
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def array_to_rgb(a: np.ndarray) -> np.ndarray:
    """H×W, H×W×1, H×W×3 or H×W×4 array (uint8 or uint16) -> H×W×3 uint8."""
    a = np.asarray(a)
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError("undecodable", f"array of dtype {a.dtype}; expected uint8 or uint16")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError("undecodable", f"array of shape {a.shape}; expected H×W[×1|3|4]")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return a[..., :3]


def decode_rgb(value) -> np.ndarray:
    """Encoded bytes or an array -> H×W×3 uint8."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return to_rgb(open_image(bytes(value)))
    return array_to_rgb(value)


def decode_map(value) -> np.ndarray:
    """Encoded bytes (a PNG of one channel) or an array of an integer map
    (class or instance ids) -> H×W, the stored values unchanged."""
    a = np.asarray(open_image(bytes(value))) if isinstance(value, (bytes, bytearray, memoryview)) else np.asarray(value)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ImageError("undecodable", f"a map of shape {a.shape}; expected H×W or H×W×1")
    return a


Window = tuple[int, int, int, int]  # top, left, height, width


def centre_window(h: int, w: int) -> Window:
    """The centred square of side min(h, w)."""
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def random_window(h: int, w: int, rng: np.random.Generator, area: Sequence[float],
                  ratio: Sequence[float], tries: int = 10) -> Window:
    """A window of area fraction in ``area`` and aspect (w/h) in ``ratio``."""
    lo, hi = float(area[0]), float(area[1])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = h * w * rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
    r = w / h
    if r < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif r > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _block_mean(a: np.ndarray, size: int) -> np.ndarray:
    f = a.shape[0] // size
    pooled = a.reshape(size, f, size, f, 3).astype(np.float32).mean(axis=(1, 3))
    return np.round(pooled).astype(np.uint8)


def crop_resize(image: np.ndarray | Image.Image, window: Window, size: int, resample: str = "area",
                scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """``image[window]`` resized to size × size (H×W×3 uint8 or an RGB PIL
    image in, uint8 out). ``scale``: the image is the window's coordinate
    frame reduced by (x, y) factors (a JPEG decoded at a reduced scale).

    "area" averages the pixels each output pixel covers; a square window
    reduced by an integer factor is an exact block mean (computed in float,
    rounded once)."""
    top, left, ch, cw = window
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    if tuple(scale) == (1.0, 1.0) and (top, left, ch, cw) == (0, 0, h, w) and ch == cw:
        if ch == size:
            return np.asarray(image)
        if resample == "area" and ch % size == 0:
            return _block_mean(np.asarray(image), size)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    sx, sy = scale
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    return np.asarray(pil.resize((size, size), RESAMPLE[resample], box=box))


def _rgb_image(img: Image.Image) -> Image.Image:
    """A decoded PIL image in RGB mode, without a copy when it already is."""
    return img if img.mode == "RGB" else Image.fromarray(to_rgb(img))


def train_view(image, size: int, rng: np.random.Generator, area: Sequence[float],
               ratio: Sequence[float], flip: bool, resample: str = "area", geometry: bool = False):
    """The training crop of an array or encoded bytes: a random window resized
    to ``size``, flipped left–right with probability 1/2 when ``flip``.

    For a JPEG the window is drawn from the header's size before decoding,
    and the decoder then reduces by 1/2, 1/4 or 1/8 in the DCT (PIL's
    ``draft``) as far as the window keeps at least ``size`` pixels on each
    side; a 640-pixel photo cropped to 224 decodes a quarter of the pixels.

    ``geometry``: also return ``View(window, flipped, (h, w))``, what boxes
    and masks need to follow the image (``view_boxes``)."""
    encoded = isinstance(image, (bytes, bytearray, memoryview))
    if encoded:
        img = _lazy_open(bytes(image))
        w, h = img.size
    else:
        h, w = np.shape(image)[:2]
    if tuple(area) == (1.0, 1.0) and tuple(ratio) == (1.0, 1.0):
        window = centre_window(h, w)  # the deterministic case draws nothing
    else:
        window = random_window(h, w, rng, area, ratio)
    if encoded:
        if img.format == "JPEG":
            top, left, ch, cw = window
            img.draft(img.mode, (math.ceil(w * size / cw), math.ceil(h * size / ch)))
        rgb = _rgb_image(_load(img))
        out = crop_resize(rgb, window, size, resample, scale=(rgb.width / w, rgb.height / h))
    else:
        out = crop_resize(array_to_rgb(image), window, size, resample)
    flipped = bool(flip and rng.random() < 0.5)
    if flipped:
        out = np.ascontiguousarray(out[:, ::-1])
    return (out, View(window, flipped, (h, w))) if geometry else out


class View(NamedTuple):
    """Where a view came from: its window of the source image, whether it was
    mirrored, and the source's (height, width)."""

    window: Window
    flipped: bool
    source_hw: tuple[int, int]


def eval_geometry(h: int, w: int) -> View:
    """The evaluation crop's ``View`` of an h × w image."""
    return View(centre_window(h, w), False, (h, w))


def view_boxes(boxes: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (n, 4) as (y_min, x_min, y_max, x_max) in [0, 1] of the source
    image -> (the same boxes in [0, 1] of the view, clipped to it; the
    fraction of each box's area inside the window)."""
    top, left, ch, cw = view.window
    h, w = view.source_hw
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * np.asarray([h, w, h, w], np.float64)
    y0, x0, y1, x1 = (b[:, 0] - top) / ch, (b[:, 1] - left) / cw, (b[:, 2] - top) / ch, (b[:, 3] - left) / cw
    area = np.maximum(y1 - y0, 0) * np.maximum(x1 - x0, 0)
    y0, x0, y1, x1 = (np.clip(v, 0.0, 1.0) for v in (y0, x0, y1, x1))
    inside = np.maximum(y1 - y0, 0) * np.maximum(x1 - x0, 0)
    visible = np.where(area > 0, inside / np.where(area > 0, area, 1.0), 0.0)
    if view.flipped:
        x0, x1 = 1.0 - x1, 1.0 - x0
    return np.stack([y0, x0, y1, x1], axis=1).astype(np.float32), visible.astype(np.float32)


def view_mask(mask: np.ndarray, view: View, size: int) -> np.ndarray:
    """An H×W integer map (class or instance ids) through the view: its
    window resized to size × size by nearest neighbour, mirrored if the view is."""
    top, left, ch, cw = view.window
    a = np.asarray(mask)
    a = a[..., 0] if a.ndim == 3 else a
    rows = top + (np.arange(size) * ch + ch // 2) // size  # each output pixel's source pixel (its centre)
    cols = left + (np.arange(size) * cw + cw // 2) // size
    out = a[rows[:, None], cols[None, :]]
    return np.ascontiguousarray(out[:, ::-1]) if view.flipped else out


def eval_view(image: np.ndarray, size: int, resample: str = "area") -> np.ndarray:
    """The evaluation crop: shorter side resized to ``size``, centre crop."""
    return crop_resize(image, centre_window(*image.shape[:2]), size, resample)
