"""Procedural scenes of coloured shapes with captions (the embedded dataset).

Every example is a pure function of ``(seed, split, index)``, so the dataset is
reproducible bit for bit and can be generated in any order. Captions state
attributes (colour, shape, size), spatial relations and counts. Some
colour–shape compositions are withheld from training: the ``test_unseen`` split
is built around them, so zero-shot accuracy there measures composition, not
memorisation. A ``validation`` split, drawn like ``train`` but disjoint from it,
is for choosing hyperparameters and prompts without reading the test splits.

Dense annotations come with every scene, exact by construction: each object
is drawn a second time, with the same primitive and coordinates, into an
instance mask (pixel value = object index + 1, 0 = background; a later object
covers an earlier one in both), its box is the tight box of its mask pixels,
and the caption's noun phrases are character spans linked to the objects they
name ("three red circles" to all three).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SCENE_KINDS = ("single", "count", "relation")

# The caption grammar's interchangeable attribute words, by kind
# (hard-negative captions swap one within its group:
# config.data.negative_words). Relations are left out: swapping "left" and
# "right" as well cost the NegCLIP run zero-shot accuracy (docs/losses.md).
WORD_GROUPS: tuple[tuple[str, ...], ...] = (
    tuple(COLOURS), SHAPES, tuple(s + ("es" if s.endswith("s") else "s") for s in SHAPES), SIZES,
    tuple(COUNT_WORDS.values()),
)

# Colour–shape pairs never drawn in the train split. Every colour and every
# shape still occurs in training with other partners.
WITHHELD: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "diamond"),
    ("yellow", "square"),
    ("purple", "cross"),
    ("white", "circle"),
)

# "validation" is drawn exactly as "train" is (the seen compositions) from a
# random stream of its own, so no scene of it is a training scene: choices
# made on it (hyperparameters, prompt templates) leave the test splits unread.
# Appended last, so the other splits' streams, and their scenes, are unchanged.
SPLITS = ("train", "test_seen", "test_unseen", "validation")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


def composition_names() -> list[str]:
    """Class names of the zero-shot task: one per colour–shape composition."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def composition_index(colour: str, shape: str) -> int:
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


SEEN = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in WITHHELD]


MAX_OBJECTS = 4  # a count scene's largest number
MAX_PHRASES = 2  # a relation caption's two noun phrases


@dataclasses.dataclass(frozen=True)
class SceneObject:
    label: int  # composition index
    box: tuple[float, float, float, float]  # (y_min, x_min, y_max, x_max) of its mask pixels, in [0, 1]


@dataclasses.dataclass(frozen=True)
class Phrase:
    start: int  # character span [start, end) of the caption
    end: int
    objects: tuple[int, ...]  # indices into Scene.objects of what it names


@dataclasses.dataclass(frozen=True)
class Scene:
    image_png: bytes
    caption: str
    label: int  # composition index of the caption's subject
    single_class: bool  # True when every object has the subject's composition
    kind: str
    mask_png: bytes = b""  # H×W uint8 instance mask (object index + 1; 0 = background), PNG
    objects: tuple[SceneObject, ...] = ()
    phrases: tuple[Phrase, ...] = ()


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour, cx: float, cy: float, r: float):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _pick_composition(rng: np.random.Generator, pool: list[tuple[str, str]]) -> tuple[str, str]:
    return pool[rng.integers(len(pool))]


def make_scene(seed: int, split: str, index: int, image_size: int = 64) -> Scene:
    """Returns the ``index``-th scene of ``split``; a pure function of its arguments."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    S = image_size
    background = tuple(int(v) for v in rng.integers(0, 60, size=3))
    img = Image.new("RGB", (S, S), background)
    mask = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(img)
    mask_draw = ImageDraw.Draw(mask)
    drawn: list[tuple[str, str]] = []

    def put(shape_: str, colour_: str, cx: float, cy: float, r: float) -> None:
        """Draws one object into the image and, identically, into the mask."""
        drawn.append((colour_, shape_))
        _draw(draw, shape_, COLOURS[colour_], cx, cy, r)
        _draw(mask_draw, shape_, len(drawn), cx, cy, r)

    subject_pool = [(c, s) for c, s in WITHHELD] if split == "test_unseen" else SEEN
    other_pool = SEEN
    kind = SCENE_KINDS[rng.integers(len(SCENE_KINDS))]
    colour, shape = _pick_composition(rng, subject_pool)
    large_r, small_r = 0.22 * S, 0.12 * S

    if kind == "single":
        size = SIZES[rng.integers(2)]
        r = large_r if size == "large" else small_r
        cx, cy = rng.uniform(r + 1, S - r - 1, size=2)
        put(shape, colour, cx, cy, r)
        caption = f"a {size} {colour} {shape}"
        spans = [(0, len(caption), (0,))]
        single = True
    elif kind == "count":
        n = int(rng.integers(2, 5))
        r = small_r
        centres: list[np.ndarray] = []
        while len(centres) < n:  # rejection sampling of non-overlapping centres
            c = rng.uniform(r + 1, S - r - 1, size=2)
            if all(np.hypot(*(c - o)) > 2.1 * r for o in centres):
                centres.append(c)
        for cx, cy in centres:
            put(shape, colour, cx, cy, r)
        caption = f"{COUNT_WORDS[n]} {colour} {_plural(shape)}"
        spans = [(0, len(caption), tuple(range(n)))]
        single = True
    else:
        while True:
            colour2, shape2 = _pick_composition(rng, other_pool)
            if (colour2, shape2) != (colour, shape):
                break
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        r = small_r
        # Subject and object are separated along the relation's axis by at
        # least 2.4 r and jittered less than r along the other axis.
        along_a = rng.uniform(r + 1, S / 2 - 0.2 * r)
        along_b = rng.uniform(S / 2 + 0.2 * r, S - r - 1)
        if along_b - along_a < 2.4 * r:
            along_b = min(S - r - 1, along_a + 2.4 * r)
        across = rng.uniform(r + 1, S - r - 1)
        jitter = rng.uniform(-0.8 * r, 0.8 * r)
        across2 = float(np.clip(across + jitter, r + 1, S - r - 1))
        first, second = (along_a, along_b) if relation in ("left of", "above") else (along_b, along_a)
        if relation in ("left of", "right of"):
            p1, p2 = (first, across), (second, across2)
        else:
            p1, p2 = (across, first), (across2, second)
        put(shape, colour, *p1, r)
        put(shape2, colour2, *p2, r)
        first_np = f"a {colour} {shape}"
        caption = f"{first_np} {relation} a {colour2} {shape2}"
        second_at = len(first_np) + len(relation) + 2
        spans = [(0, len(first_np), (0,)), (second_at, len(caption), (1,))]
        single = False

    instances = np.asarray(mask)
    objects = tuple(SceneObject(composition_index(c, s), _tight_box(instances == k + 1))
                    for k, (c, s) in enumerate(drawn))
    phrases = tuple(Phrase(a, b, objs) for a, b, objs in spans)
    return Scene(_png(img), caption, composition_index(colour, shape), single, kind, _png(mask), objects, phrases)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tight_box(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """(y_min, x_min, y_max, x_max) in [0, 1] of the pixels set in an H×W
    boolean array: pixel edges, so a box covers whole pixels (max exclusive)."""
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    if not len(rows):
        return (0.0, 0.0, 0.0, 0.0)  # drawn but entirely covered by a later object
    h, w = pixels.shape
    return (float(rows[0] / h), float(cols[0] / w), float((rows[-1] + 1) / h), float((cols[-1] + 1) / w))


def noisy_caption(seed: int, split: str, index: int, fraction: float, num: int) -> str | None:
    """The caption that replaces scene ``index``'s in a noisy copy of
    ``split`` (``num`` scenes), or None if it keeps its own: with probability
    ``fraction`` the caption of another scene, drawn uniformly; a pure
    function of (seed, split, index). A drawn caption equal to the scene's
    own (the same words) keeps it: None."""
    rng = np.random.default_rng([seed, 7, _SPLIT_IDS[split], index])
    if fraction <= 0 or rng.random() >= fraction or num < 2:
        return None
    other = int(rng.integers(num - 1))
    other += other >= index  # any scene but this one
    caption = make_scene(seed, split, other, image_size=16).caption  # captions do not depend on the size
    return None if caption == make_scene(seed, split, index, image_size=16).caption else caption


def iter_scenes(seed: int, split: str, num: int, image_size: int = 64) -> Iterator[tuple[int, Scene]]:
    for i in range(num):
        yield i, make_scene(seed, split, i, image_size)


def train_captions(seed: int, num: int) -> Iterator[str]:
    """Captions of the train split, for fitting a tokenizer: the scenes are
    drawn at 16 px, a fraction of the cost, since no random choice that
    shapes a caption depends on the image size."""
    for _, scene in iter_scenes(seed, "train", num, image_size=16):
        yield scene.caption


# --------------------------------------------------------------------------- compositional probes

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PERTURBATIONS = ("relation", "swap", "binding", "colour", "shape", "count")
_PLURALS = {_plural(s): s for s in SHAPES}
_NUMBERS = {w: n for n, w in COUNT_WORDS.items()}


def _other(options: list[str], current: str, avoid: tuple[str, ...] = ()) -> str:
    """The next option after ``current`` (cyclically) that is not in ``avoid``."""
    i = options.index(current)
    for step in range(1, len(options)):
        candidate = options[(i + step) % len(options)]
        if candidate != current and candidate not in avoid:
            return candidate
    raise ValueError(f"no alternative to {current!r}")


def perturbations(caption: str) -> dict[str, str]:
    """False captions that differ from a true ``caption`` of this grammar in
    one way each (a Winoground / ARO-style probe), by type:

    * relation: the relation replaced by its opposite ("left of" -> "right of");
    * swap: subject and object exchanged (same words, other order);
    * binding: the two objects' colours exchanged (same words, other binding);
    * colour / shape: the subject's colour / shape replaced by another one;
    * count: the number replaced by another one.

    Types that do not apply to a caption's kind are absent; a caption outside
    the grammar raises ValueError."""
    colours, shapes = list(COLOURS), list(SHAPES)
    words = caption.split()
    for rel in RELATIONS:  # "a c1 s1 REL a c2 s2"
        marker = f" {rel} a "
        if marker in caption:
            left, right = caption.split(marker)
            (a1, c1, s1), (c2, s2) = left.split(), right.split()
            if a1 != "a" or {c1, c2} - set(colours) or {s1, s2} - set(shapes):
                break
            c1_new = _other(colours, c1, (c2,))
            return {
                "relation": f"a {c1} {s1} {OPPOSITE[rel]} a {c2} {s2}",
                "swap": f"a {c2} {s2} {rel} a {c1} {s1}",
                **({"binding": f"a {c2} {s1} {rel} a {c1} {s2}"} if c1 != c2 else {}),
                "colour": f"a {c1_new} {s1} {rel} a {c2} {s2}",
                "shape": f"a {c1} {_other(shapes, s1, (s2,))} {rel} a {c2} {s2}",
            }
    if len(words) == 4 and words[0] == "a" and words[1] in SIZES and words[2] in colours and words[3] in shapes:
        return {"colour": f"a {words[1]} {_other(colours, words[2])} {words[3]}",
                "shape": f"a {words[1]} {words[2]} {_other(shapes, words[3])}"}
    if len(words) == 3 and words[0] in _NUMBERS and words[1] in colours and words[2] in _PLURALS:
        counts = [COUNT_WORDS[n] for n in sorted(COUNT_WORDS)]
        return {"count": f"{_other(counts, words[0])} {words[1]} {words[2]}",
                "colour": f"{words[0]} {_other(colours, words[1])} {words[2]}",
                "shape": f"{words[0]} {words[1]} {_plural(_other(shapes, _PLURALS[words[2]]))}"}
    raise ValueError(f"caption {caption!r} is not in the embedded dataset's grammar")


ATTRIBUTES = ("colour", "shape", "size", "count", "relation")


def caption_attributes(caption: str) -> dict[str, tuple]:
    """What a caption says, by kind of word, in the order said: colours,
    shapes (plurals as the singular), sizes, counts (1 for "a", else the
    number word's value) and relations. Words outside the grammar's lists are
    ignored, so any text (a model's caption) can be read; a caption of the
    grammar states every attribute its scene kind has."""
    out: dict[str, list] = {name: [] for name in ATTRIBUTES}
    words = caption.split()
    i = 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        word = words[i]
        if pair in RELATIONS:
            out["relation"].append(pair)
            i += 2
            continue
        if word in RELATIONS:
            out["relation"].append(word)
        elif word in COLOURS:
            out["colour"].append(word)
        elif word in SHAPES or word in _PLURALS:
            out["shape"].append(_PLURALS.get(word, word))
        elif word in SIZES:
            out["size"].append(word)
        elif word in _NUMBERS or word == "a":
            out["count"].append(_NUMBERS.get(word, 1))
        i += 1
    return {name: tuple(values) for name, values in out.items()}

