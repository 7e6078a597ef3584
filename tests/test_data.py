"""The embedded dataset, tokenizers and the grain pipeline."""

import numpy as np
import pytest

from vlm_jax.config import base_config
from vlm_jax.data import pipeline, scenes, tokenizers


def test_scenes_are_a_pure_function_of_seed_split_index():
    a = scenes.make_scene(0, "train", 7)
    assert a == scenes.make_scene(0, "train", 7)
    assert a != scenes.make_scene(1, "train", 7)
    assert scenes.make_scene(0, "train", 7) != scenes.make_scene(0, "test_seen", 7)


def test_withheld_compositions_never_appear_in_train_and_form_the_unseen_split():
    withheld = [f"{c} {s}" for c, s in scenes.WITHHELD]
    kinds = set()
    for _, s in scenes.iter_scenes(0, "train", 1500, image_size=16):
        assert not any(w in s.caption for w in withheld), s.caption
        kinds.add(s.kind)
    assert kinds == set(scenes.SCENE_KINDS)
    names = scenes.composition_names()
    for _, s in scenes.iter_scenes(0, "test_unseen", 200, image_size=16):
        assert names[s.label] in withheld
        mentioned = sorted((s.caption.find(n), n) for n in names if n in s.caption)
        assert mentioned[0][1] == names[s.label]  # the label is the composition named first


def test_the_validation_split_is_drawn_like_train_from_scenes_train_never_shows(data_dir):
    from vlm_jax.data import shapes_tfds

    withheld = [f"{c} {s}" for c, s in scenes.WITHHELD]
    train = {s.image_png for _, s in scenes.iter_scenes(0, "train", 1500, image_size=16)}
    kinds = set()
    for _, s in scenes.iter_scenes(0, "validation", 500, image_size=16):
        assert not any(w in s.caption for w in withheld), s.caption
        assert s.image_png not in train
        kinds.add(s.kind)
    assert kinds == set(scenes.SCENE_KINDS)
    sizes = {k: v.num_examples for k, v in shapes_tfds.builder(data_dir, "tiny").info.splits.items()}
    assert sizes == {"train": 1024, "test_seen": 256, "test_unseen": 256, "validation": 256}


def test_captions_state_counts_and_relations():
    seen = {"count": False, "relation": False}
    for _, s in scenes.iter_scenes(3, "train", 300, image_size=16):
        if s.kind == "count":
            assert s.caption.split()[0] in scenes.COUNT_WORDS.values()
            seen["count"] = True
        if s.kind == "relation":
            assert any(r in s.caption for r in scenes.RELATIONS)
            assert not s.single_class
            seen["relation"] = True
    assert all(seen.values())


def test_tokenize_appends_eos_pads_and_truncates_keeping_eos():
    tok = tokenizers.ByteTokenizer()
    out = tokenizers.tokenize(tok, ["ab", "abcdefgh"], 5)
    assert out.dtype == np.int32 and out.shape == (2, 5)
    np.testing.assert_array_equal(out[0], [ord("a") + 2, ord("b") + 2, tok.eos_id, 0, 0])
    assert out[1, -1] == tok.eos_id and (out[1] != 0).all()


def test_sentencepiece_tokenizer_fitted_on_train_captions(data_dir):
    from vlm_jax.data import shapes_tfds

    tok = tokenizers.make_tokenizer("sentencepiece", shapes_tfds.tokenizer_path(data_dir, "tiny"))
    ids = tokenizers.tokenize(tok, ["a small red circle left of a blue square"], 16)[0]
    assert ids[ids != 0][-1] == tok.eos_id
    assert ids.max() < tok.vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        tokenizers.make_tokenizer("sentencepiece", data_dir + "/nope.model")


def test_tokenizer_captions_drawn_small_are_the_stored_scenes_captions():
    # prepare() fits the tokenizer on scenes drawn at 16 px; the dataset stores them at 64 px.
    assert list(scenes.train_captions(0, 200)) == [scenes.make_scene(0, "train", i).caption for i in range(200)]


def test_another_vocab_size_fits_its_own_tokenizer_instead_of_reusing_one(data_dir):
    from vlm_jax.data import shapes_tfds

    shapes_tfds.prepare(data_dir, "tiny", 48)
    small = tokenizers.make_tokenizer("sentencepiece", shapes_tfds.tokenizer_path(data_dir, "tiny", 48))
    default = tokenizers.make_tokenizer("sentencepiece", shapes_tfds.tokenizer_path(data_dir, "tiny"))
    assert small.vocab_size == 48 < default.vocab_size


def _data_cfg(data_dir):
    c = base_config().data
    c.data_dir, c.dataset_config = data_dir, "tiny"
    return c


def test_train_stream_resumes_exactly_from_its_state(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    it = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(40)]  # crosses an epoch boundary (1024 / 32 = 32 batches)
    it2 = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5))
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])
    assert expected[0]["image"].shape == (32, 32, 32, 3) and expected[0]["image"].dtype == np.uint8


def test_processes_split_the_same_global_batches(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    single = iter(pipeline.train_dataset(ds, cfg, 16, 64, 0))
    shares = [iter(pipeline.train_dataset(ds, cfg, 16, 64, 0, p, 2)) for p in range(2)]
    for _ in range(3):
        whole = next(single)
        parts = [next(it) for it in shares]
        assert parts[0]["text"].shape == (32, 16)
        for key in ("image", "text"):  # process p holds the p-th half of the same global batch
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), whole[key])


def test_eval_split_loads_every_scalar_feature(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    split = pipeline.load_split(ds, cfg, "test_seen", 16, 100)
    assert split["image"].shape == (100, 32, 32, 3)
    assert split["label"].shape == (100,) and split["single_class"].dtype == bool and split["kind"].shape == (100,)
    assert ds.class_names == scenes.composition_names() == ds.class_names_of("label")
    assert ds.class_names_of("single_class") is None
    single = [c for c, m in zip(split["caption"], split["single_class"]) if m]
    assert all(" of " not in c and "above" not in c and "below" not in c for c in single)


# --------------------------------------------------------------------------- images


def _encoded(img, fmt):
    import io

    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def test_every_image_mode_decodes_to_rgb_uint8():
    from PIL import Image

    from vlm_jax.data import images

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    for mode in ("RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "YCbCr"):
        for fmt in ("PNG", "TIFF", "JPEG", "WEBP"):
            try:
                data = _encoded(rgb.convert(mode), fmt)
            except OSError:  # the format cannot store the mode
                continue
            got = images.decode_rgb(data)
            want = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))  # what open_clip feeds
            assert got.dtype == np.uint8 and got.shape == (12, 20, 3), (mode, fmt)
            np.testing.assert_array_equal(got, want, err_msg=f"{mode} {fmt}")
    # 16-bit grayscale is scaled to 8 bits (PIL's own convert would saturate it at 255).
    deep = rng.integers(0, 1 << 16, (12, 20)).astype(np.uint16)
    got = images.decode_rgb(_encoded(Image.fromarray(deep), "PNG"))
    np.testing.assert_array_equal(got, np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    # Arrays: H×W, H×W×1, H×W×4, uint16.
    a = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    np.testing.assert_array_equal(images.decode_rgb(a), a[..., :3])
    np.testing.assert_array_equal(images.decode_rgb(a[..., 0]), np.repeat(a[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(images.decode_rgb(a.astype(np.uint16) << 8), a[..., :3])


def test_broken_images_raise_with_their_reason():
    from PIL import Image

    from vlm_jax.data import images

    jpeg = _encoded(Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")
    for data, reason in [(jpeg[: len(jpeg) // 2], "truncated"), (b"", "undecodable"), (b"<html>", "undecodable")]:
        with pytest.raises(images.ImageError) as e:
            images.decode_rgb(data)
        assert e.value.reason == reason


def test_random_windows_stay_inside_with_area_and_ratio_in_range():
    from vlm_jax.data import images

    rng = np.random.default_rng(1)
    for h, w in [(100, 100), (60, 200), (300, 40)]:
        for area, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.5), (1.0, 1.0))]:
            for _ in range(200):
                top, left, ch, cw = images.random_window(h, w, rng, area, ratio)
                assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
                if (ch, cw) != (h, w) and (top, left) != ((h - ch) // 2, (w - cw) // 2):  # not the fallback
                    assert area[0] - 0.05 <= ch * cw / (h * w) <= area[1] + 0.05
                    assert ratio[0] * 0.9 <= cw / ch <= ratio[1] * 1.1


def test_the_deterministic_crop_is_the_eval_crop_and_area_resampling_is_a_block_mean():
    from vlm_jax.data import images

    rng = np.random.default_rng(2)
    square = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    want = np.round(square.astype(np.float64).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))).astype(np.uint8)
    np.testing.assert_array_equal(images.eval_view(square, 16), want)
    wide = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    for resample in images.RESAMPLE:
        ev = images.eval_view(wide, 16, resample)
        np.testing.assert_array_equal(images.train_view(wide, 16, rng, (1, 1), (1, 1), False, resample), ev)
        np.testing.assert_array_equal(ev, images.crop_resize(wide, (0, 10, 30, 30), 16, resample))  # centred square
    flipped = images.train_view(square, 16, np.random.default_rng(0), (1, 1), (1, 1), True)
    assert np.array_equal(flipped, want) or np.array_equal(flipped, want[:, ::-1])


def test_training_crops_and_flips_are_a_function_of_seed_and_position(data_dir):
    cfg = _data_cfg(data_dir)
    cfg.crop_area, cfg.crop_ratio, cfg.flip = (0.3, 1.0), (3 / 4, 4 / 3), True
    ds = pipeline.open_dataset(cfg)
    a, b = (iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5)) for _ in range(2))
    first = [next(a) for _ in range(2)]
    for want in first:
        np.testing.assert_array_equal(next(b)["image"], want["image"])
    other = next(iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=6)))
    plain = next(iter(pipeline.train_dataset(ds, _data_cfg(data_dir), 16, 32, seed=5)))
    assert not np.array_equal(other["image"], first[0]["image"])
    np.testing.assert_array_equal(plain["text"], first[0]["text"])  # same examples, other views
    assert not np.array_equal(plain["image"], first[0]["image"])


def test_decoding_workers_give_the_same_batches_and_resume_exactly(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    threads = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=3))
    want = [next(threads) for _ in range(6)]
    cfg.workers = 2
    procs = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=3))
    for w in want[:3]:
        np.testing.assert_array_equal(next(procs)["image"], w["image"])
    state = procs.get_state()
    resumed = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=3))
    resumed.set_state(state)
    for w in want[3:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], w["image"])
        np.testing.assert_array_equal(got["text"], w["text"])


class _CountingSource:
    def __init__(self, source):
        self.source, self.reads = source, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.reads += 1
        return self.source[i]


def test_the_example_cache_reads_each_example_once_within_its_budget(data_dir):
    src = _CountingSource(pipeline.open_dataset(_data_cfg(data_dir)).sources["train"])
    one = pipeline._nbytes(src.source[0])
    cached = pipeline.CachedSource(src, max_bytes=3 * one + one // 2)  # room for about three examples
    first = [cached[i] for i in range(8)] + [cached[i] for i in range(8)]
    assert len(cached) == len(src.source)
    assert 0 < cached.cached_bytes <= 3 * one + one // 2
    kept = len(cached._cache)
    assert 2 <= kept <= 4 and src.reads == 16 - kept  # the kept ones were read once, the rest twice
    for i in range(8):
        want = src.source[i]
        assert first[i].keys() == want.keys() and first[i]["caption"] == want["caption"]
        assert first[i]["image"] == want["image"] and first[8 + i] is not first[i]  # a new dict each read


def test_the_example_cache_leaves_every_batch_unchanged_and_is_free_to_change(data_dir):
    from vlm_jax import config as config_lib, workdir

    cfg = _data_cfg(data_dir)
    cfg.crop_area, cfg.cache_mib = (0.5, 1.0), 0
    ds = pipeline.open_dataset(cfg)
    plain = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5))
    want = [next(plain) for _ in range(40)]  # 1,280 examples: past the tiny split's 1,024, so the cache is hit
    cfg.cache_mib = 64
    for got, w in zip(iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5)), want):
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
    assert "config.data.cache_mib" in workdir.FREE_TO_CHANGE
    with pytest.raises(config_lib.ConfigError, match="data.cache_mib"):
        config_lib.load_config("configs/default.py", ["data.cache_mib=-1"])


# --------------------------------------------------------------------------- tokenizer.json files


def _json_tokenizer(tmp_path, style):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    corpus = [f"a {c} {s} left of a {c2} {s}" for c in ("red", "green", "blue") for c2 in ("pink", "grey")
              for s in ("circle", "square", "triangle")] * 3
    if style == "clip":  # byte-pair merges with an end-of-word suffix; specials last; id 0 is a real token
        tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, end_of_word_suffix="</w>",
                                                            special_tokens=[]))
        tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
        bos, eos = "<|startoftext|>", "<|endoftext|>"
    else:  # WordPiece with [PAD] = 0, [CLS] ... [SEP]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
            vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
        bos, eos = "[CLS]", "[SEP]"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    path = str(tmp_path / f"{style}.json")
    tok.save(path)
    return path, tok


@pytest.mark.parametrize("style", ["clip", "bert"])
def test_tokenizer_json_equals_the_tokenizers_package_with_its_special_tokens(style, tmp_path):
    path, peer = _json_tokenizer(tmp_path, style)
    ours = tokenizers.make_tokenizer("tokenizer_json", path)
    offset = 1 if style == "clip" else 0  # CLIP's id 0 is a word, so padding gets a new id 0
    assert ours.vocab_size == peer.get_vocab_size() + offset
    texts = ["A Red circle LEFT of a grey square", "a green triangle " * 12, ""]
    max_len = 12
    peer.enable_truncation(max_len)
    peer.enable_padding(length=max_len)
    got = tokenizers.tokenize(ours, texts, max_len)
    for row, text in zip(got, texts):
        enc = peer.encode(text)
        want = np.where(np.asarray(enc.attention_mask) == 1, np.asarray(enc.ids) + offset, 0)
        np.testing.assert_array_equal(row, want, err_msg=text)
    bos, eos = ("<|startoftext|>", "<|endoftext|>") if style == "clip" else ("[CLS]", "[SEP]")
    assert ours.prefix == (peer.token_to_id(bos) + offset,) and ours.suffix == (peer.token_to_id(eos) + offset,)
    assert ours.eos_id == peer.token_to_id(eos) + offset
    assert got[1][-1] == ours.eos_id  # cut before EOS, which survives
    # The cleaning CLIP applies first: HTML entities (even double-escaped) and whitespace runs.
    np.testing.assert_array_equal(tokenizers.tokenize(ours, ["red &amp;amp;  \n blue"], max_len),
                                  tokenizers.tokenize(ours, ["red & blue"], max_len))


def test_a_file_that_is_not_a_tokenizer_is_an_error_naming_the_field(tmp_path):
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match="config.data.tokenizer_path"):
        tokenizers.make_tokenizer("tokenizer_json", str(tmp_path / "t.json"))


def test_a_jpeg_decoded_at_reduced_scale_gives_nearly_the_full_decodes_crop():
    from PIL import Image

    from vlm_jax.data import images

    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], -1).astype(np.uint8)
    jpeg = _encoded(Image.fromarray(photo), "JPEG")
    full = images.decode_rgb(jpeg)
    for seed in range(5):
        args = (56, (0.5, 1.0), (3 / 4, 4 / 3), True, "bicubic")
        fast = images.train_view(jpeg, args[0], np.random.default_rng(seed), *args[1:])
        slow = images.train_view(full, args[0], np.random.default_rng(seed), *args[1:])
        assert fast.shape == slow.shape == (56, 56, 3) and fast.dtype == np.uint8
        assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0  # same window and flip, DCT-scaled decode


def test_a_hard_negative_swaps_one_word_within_its_group_and_nothing_else():
    groups = (("red", "green", "blue"), ("circle", "square"), ("left", "right"))
    rng = np.random.default_rng(0)
    caption = "a red circle left of a blue square"
    changed = set()
    for _ in range(200):
        negative = pipeline.swap_word(caption, groups, rng)
        diff = [(w, v) for w, v in zip(caption.split(), negative.split()) if w != v]
        assert len(negative.split()) == len(caption.split()) and len(diff) == 1, negative
        (old, new), = diff
        assert any(old in g and new in g for g in groups)
        changed.add((old, new))
    # every word of a group can be the one swapped, to every other word of its group
    assert {("red", "green"), ("red", "blue"), ("circle", "square"), ("left", "right"), ("blue", "red"),
            ("square", "circle")} <= changed
    assert pipeline.swap_word("two purple crosses", groups, rng) is None


def test_word_groups_are_checked_with_the_field_named():
    pipeline.check_word_groups(scenes.WORD_GROUPS)
    for bad, match in [((), "give groups"), ((("red",),), "at least two distinct"), ((("red", "red"),), "two distinct"),
                       ((("left of", "right of"),), "without spaces"), ((("a", "b"), ("b", "c")), "in groups 0 and 1")]:
        with pytest.raises(ValueError, match="config.data.negative_words: .*" + match):
            pipeline.check_word_groups(bad)


def test_negative_captions_come_with_the_same_views_and_are_a_function_of_seed_and_position(data_dir):
    cfg = _data_cfg(data_dir)
    cfg.negative_words = scenes.WORD_GROUPS
    ds = pipeline.open_dataset(cfg)
    stream = lambda seed, fields: iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=seed, fields=fields))  # noqa: E731
    a, b = stream(5, ("negative_text",)), stream(5, ("negative_text",))
    plain = next(stream(5, ()))
    first = next(a)
    np.testing.assert_array_equal(next(b)["negative_text"], first["negative_text"])
    for key in ("image", "text"):  # the negatives draw after every other choice
        np.testing.assert_array_equal(first[key], plain[key])
    for text, negative in zip(first["text"], first["negative_text"]):
        words = tokenizers.detokenize(ds.tokenizer, text).split()
        swapped = tokenizers.detokenize(ds.tokenizer, negative).split()
        assert len(words) == len(swapped) and sum(w != v for w, v in zip(words, swapped)) == 1, (words, swapped)
    other = next(stream(6, ("negative_text",)))
    assert not np.array_equal(other["negative_text"], first["negative_text"])
