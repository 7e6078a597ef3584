"""Dense annotations of the embedded dataset: masks, boxes and phrases are
exact, and follow the training crop."""

import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.config import base_config
from vlm_jax.data import images, pipeline, scenes, shapes_tfds


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _tight(pixels: np.ndarray) -> tuple:
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    h, w = pixels.shape
    return rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w


@pytest.mark.parametrize("split", scenes.SPLITS)
def test_masks_and_boxes_are_exactly_the_drawn_pixels(split):
    colours = {scenes.composition_index(c, s): rgb for c, rgb in scenes.COLOURS.items() for s in scenes.SHAPES}
    kinds = set()
    for i in range(120):
        s = scenes.make_scene(5, split, i)
        image, mask = _decode(s.image_png), _decode(s.mask_png)
        kinds.add(s.kind)
        assert mask.shape == image.shape[:2] and mask.max() == len(s.objects)
        background = image[mask == 0]
        assert len(background) and (background == background[0]).all()  # one uniform colour, no object pixel
        for k, obj in enumerate(s.objects):
            pixels = mask == k + 1
            assert pixels.any()
            assert (image[pixels] == colours[obj.label]).all()  # every mask pixel has the object's colour
            assert obj.box == pytest.approx(_tight(pixels), abs=0)
        # Every pixel of an object's colour that is not another object's is in its mask.
        for k, obj in enumerate(s.objects):
            same_colour = (image == colours[obj.label]).all(-1)
            owners = {int(v) for v in np.unique(mask[same_colour])}
            assert owners <= {j + 1 for j, o in enumerate(s.objects) if colours[o.label] == colours[obj.label]}
    assert kinds == set(scenes.SCENE_KINDS)


def test_phrases_are_spans_naming_their_objects():
    names = scenes.composition_names()
    for i in range(200):
        s = scenes.make_scene(1, "train", i)
        assert sorted(k for p in s.phrases for k in p.objects) == list(range(len(s.objects)))
        for p in s.phrases:
            text = s.caption[p.start:p.end]
            said = scenes.caption_attributes(text)
            assert len(said["colour"]) == len(said["shape"]) == 1, text
            assert {names[s.objects[k].label] for k in p.objects} == {f"{said['colour'][0]} {said['shape'][0]}"}
            assert said["count"] == (len(p.objects),)  # "a" names one object, "three" three


def _scene_of(split: str, image: np.ndarray, n: int = 256) -> scenes.Scene:
    """The scene of the tiny config's ``split`` drawn as ``image`` (TFDS stores examples in its own order)."""
    for _, s in scenes.iter_scenes(0, split, n, shapes_tfds.IMAGE_SIZE):
        if np.array_equal(_decode(s.image_png), image):
            return s
    raise AssertionError("no scene has this image")


def test_the_dataset_stores_the_scenes_annotations(data_dir):
    src = shapes_tfds.builder(data_dir, "tiny").as_data_source()
    for split in ("test_seen", "test_unseen"):
        for i in (0, 3, 17):
            row = src[split][i]
            s = _scene_of(split, row["image"])
            np.testing.assert_array_equal(row["mask"][..., 0], _decode(s.mask_png))
            np.testing.assert_array_equal(np.asarray(row["objects"]["label"]), [o.label for o in s.objects])
            np.testing.assert_allclose(np.asarray(row["objects"]["bbox"]).reshape(-1, 4),
                                       np.asarray([o.box for o in s.objects]).reshape(-1, 4), atol=0)
            assert list(row["phrases"]["objects"]) == [sum(1 << k for k in p.objects) for p in s.phrases]


@pytest.mark.parametrize("flipped", [False, True])
def test_boxes_follow_the_crop_like_the_pixels(flipped):
    """A window cut without resizing: the box of the cropped mask pixels is
    exactly the mapped box, wherever the object is fully inside; the visible
    fraction is the share of the box's area inside the window."""
    s = scenes.make_scene(2, "train", 4)  # a count scene: several objects
    mask = _decode(s.mask_png)
    boxes = np.asarray([o.box for o in s.objects])
    for window in [(0, 0, 64, 64), (8, 16, 32, 32), (20, 4, 40, 40)]:
        view = images.View(window, flipped, (64, 64))
        cropped = images.view_mask(mask, view, window[2])
        top, left, ch, cw = window
        expected = mask[top:top + ch, left:left + cw]
        np.testing.assert_array_equal(cropped, expected[:, ::-1] if flipped else expected)
        mapped, visible = images.view_boxes(boxes, view)
        for k in range(len(boxes)):
            y0, x0, y1, x1 = boxes[k] * 64
            inside = (np.clip([y1, x1], [top, left], [top + ch, left + cw]) -
                      np.clip([y0, x0], [top, left], [top + ch, left + cw])).clip(0).prod()
            assert visible[k] == pytest.approx(inside / ((y1 - y0) * (x1 - x0)), abs=1e-6)
            if visible[k] == 1.0:
                np.testing.assert_allclose(mapped[k], _tight(cropped == k + 1), atol=1e-6)


def test_regions_field_labels_what_the_crop_keeps(data_dir):
    c = base_config()
    c.data.update(dict(data_dir=data_dir, dataset_config="tiny", image_size=64, crop_area=(0.2, 0.5)))
    ds = pipeline.open_dataset(c.data)
    batch = next(iter(pipeline.train_dataset(ds, c.data, 16, 64, 0, fields=("regions",))))
    assert batch["boxes"].shape == (64, c.data.max_boxes, 4)
    assert batch["phrases"].shape == (64, c.data.max_phrases + 1, 16)
    assert (batch["phrase_labels"][:, -1] == pipeline.BACKGROUND).all()
    present = batch["box_labels"] >= 0
    assert 0 < present.mean() < 1  # small crops drop some boxes
    b = batch["boxes"][present]
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all() and (b >= 0).all() and (b <= 1).all()
    # The phrase and box classes of an example agree: every kept box is named by a phrase.
    for labels, named in zip(batch["box_labels"], batch["phrase_labels"]):
        assert set(labels[labels >= 0]) <= set(named[named >= 0])
    # The same stream position gives the same crop and boxes (a function of seed and position).
    again = next(iter(pipeline.train_dataset(ds, c.data, 16, 64, 0, fields=("regions",))))
    np.testing.assert_array_equal(batch["boxes"], again["boxes"])


def test_load_dense_gives_class_maps_in_the_eval_frame(data_dir):
    c = base_config()
    c.data.update(dict(data_dir=data_dir, dataset_config="tiny", image_size=32))
    ds = pipeline.open_dataset(c.data)
    dense = pipeline.load_dense(ds, c.data, "test_seen", 8)
    src = shapes_tfds.builder(data_dir, "tiny").as_data_source()["test_seen"]
    for i in range(8):
        s = _scene_of("test_seen", src[i]["image"])
        lut = np.asarray([pipeline.BACKGROUND] + [o.label for o in s.objects])
        np.testing.assert_array_equal(dense["classes"][i], lut[_decode(s.mask_png)[1::2, 1::2]])


def test_a_dataset_without_grounding_is_refused_by_name(data_dir):
    c = base_config()
    ds = pipeline.Dataset({}, None, None, {"image": None, "caption": None})
    with pytest.raises(ValueError, match="no grounding features"):
        pipeline.check_grounding(ds, c.data)


def test_a_region_objective_on_data_without_grounding_fails_at_setup(data_dir, monkeypatch):
    from conftest import load_tiny_config
    from vlm_jax import session
    from vlm_jax.errors import ConfigError

    real = pipeline.open_dataset

    def without_grounding(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds.features = {k: v for k, v in ds.features.items() if k not in ("objects", "phrases")}
        return ds

    monkeypatch.setattr(pipeline, "open_dataset", without_grounding)
    with pytest.raises(ConfigError, match="has no grounding features"):
        session.setup(load_tiny_config(data_dir, "configs/default.py:region"))
