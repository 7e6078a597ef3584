"""Your own data: webdataset shards, a CSV and an image folder, with images
in every mode and every kind of bad example, ingested, counted, trained on,
killed and resumed."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from vlm_jax import config as config_lib, metrics, train
from vlm_jax.data import images, ingest, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")
# (PIL mode, format) of the good images: every mode the pipeline must turn into RGB.
MODES = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("P+transparency", "PNG"),
         ("RGBA", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("RGB", "WEBP"), ("RGB", "PNG"),
         ("RGB", "BMP"), ("P", "GIF"), ("RGB", "TIFF")]


def picture(colour: str, shape: str, size: tuple[int, int], mode: str, fmt: str) -> bytes:
    """A coloured square or stripe on grey, encoded in ``mode`` and ``fmt``."""
    w, h = size
    a = np.full((h, w, 3), 128, np.uint8)
    if shape == "square":
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = COLOURS[colour]
    else:
        a[:, w // 3: 2 * w // 3] = COLOURS[colour]
    img = Image.fromarray(a)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    elif mode == "P+transparency":
        img = img.convert("P")
        img.info["transparency"] = 0
    elif mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **({"transparency": 0} if mode == "P+transparency" else {}))
    return out.getvalue()


def good_examples(n: int, seed: int):
    """(key, image bytes, caption) with a different mode, size and content each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        mode, fmt = MODES[i % len(MODES)]
        size = (int(rng.integers(40, 72)), int(rng.integers(40, 72)))
        out.append((f"s{seed}_{i:03d}", picture(colour, shape, size, mode, fmt), f"a {colour} {shape}", fmt.lower()))
    return out


JPEG = picture("red", "square", (48, 40), "RGB", "JPEG")
BAD = {  # reason -> (image bytes, caption bytes)
    "truncated_image": (JPEG[: len(JPEG) // 2], b"a red square"),
    "undecodable_image": (b"", b"a red square"),  # zero bytes
    "image_too_small": (picture("red", "square", (6, 6), "RGB", "PNG"), b"a red square"),
    "empty_caption": (picture("blue", "stripe", (40, 40), "RGB", "PNG"), b"   "),
    "non_utf8_caption": (picture("blue", "square", (40, 40), "RGB", "PNG"), b"a blue \xff\xfe square"),
    "overlong_caption": (picture("green", "square", (40, 40), "RGB", "PNG"), b"x" * 300),
}
NOT_AN_IMAGE = b"this is a text file, not an image"


def write_shards(root: str) -> list[str]:
    """Three img2dataset-style shards (key.jpg|png|..., key.txt, key.json) and one cut-off shard."""
    os.makedirs(root, exist_ok=True)
    goods = good_examples(36, seed=0)
    bad = list(BAD.items()) + [("undecodable_image", (NOT_AN_IMAGE, b"a red square"))]
    paths = []
    for s in range(3):
        members = []
        for key, data, caption, ext in goods[s * 12:(s + 1) * 12]:
            members += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps({"caption": caption, "key": key}).encode())]
        for j, (reason, (data, caption)) in enumerate(bad[s::3]):
            members += [(f"bad{s}_{j}.jpg", data), (f"bad{s}_{j}.txt", caption)]
        if s == 0:
            members += [("nocap.png", goods[0][1])]  # no caption
            members += [("dup.png", goods[1][1]), ("dup.txt", b"the same bytes as s0_001")]
        path = os.path.join(root, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    with open(paths[0], "rb") as f:
        whole = f.read()
    with open(os.path.join(root, "00003.tar"), "wb") as f:  # a shard cut off mid-way
        f.write(whole[: len(whole) * 2 // 3])
    return paths


def ingest_cli(*argv, check=True):
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.data.ingest", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shards_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    write_shards(str(root / "shards"))
    data_dir = str(root / "data")
    proc = ingest_cli("webdataset", str(root / "shards"), "--name", "wds", "--data_dir", data_dir,
                      "--min_size", "16", "--max_caption_chars", "200", "--dedup", "--workers", "2",
                      "--fit_tokenizer", "60")
    with open(os.path.join(data_dir, "wds", ingest.VERSION, "ingest_report.train.json")) as f:
        return data_dir, json.load(f), proc.stdout


def test_the_report_counts_every_bad_example_under_its_reason(shards_dataset):
    data_dir, report, printed = shards_dataset
    # Shard 00003 is shard 00000 cut at two thirds: the 11 examples before the
    # cut are duplicates of shard 0's, the one being read at the cut is lost.
    expected = {reason: 1 for reason in BAD}
    expected.update(undecodable_image=2, missing_caption=1, duplicate_image=1 + 11, damaged_input=1)
    assert report["skipped"] == expected
    assert report["kept"] == {"train": 36}
    assert report["read"] == 36 + sum(expected.values())
    assert [d["input"][-9:] for d in report["damaged_inputs"]] == ["00003.tar"]
    for reason in expected:
        assert reason in printed and reason in ingest.REASONS


def test_ingested_images_decode_to_rgb_and_captions_are_kept(shards_dataset):
    data_dir, _, _ = shards_dataset
    cfg = config_lib.load_config("configs/own_data.py:wds", [f"data.data_dir={data_dir}", "data.image_size=32"])
    ds = pipeline.open_dataset(cfg.data)
    source = ds.sources["train"]
    originals = {k: (data, cap) for k, data, cap, _ in good_examples(36, seed=0)}
    seen = set()
    for i in range(len(source)):
        ex = source[i]
        key = ex["key"].decode()
        seen.add(key)
        data, caption = originals[key]
        assert [c.decode() for c in ex["caption"]] == [caption]
        stored = images.decode_rgb(ex["image"])
        want = images.decode_rgb(data)
        assert stored.shape == want.shape and stored.dtype == np.uint8
        assert np.abs(stored.astype(int) - want.astype(int)).mean() < 3  # re-encoding is near-lossless
    assert seen == set(originals)
    assert ds.tokenizer.vocab_size <= 61  # the fitted SentencePiece model beside the data


def _own_overrides(data_dir, **extra):
    values = {"data.data_dir": data_dir, "data.dataset_config": "", "data.image_size": 16, "data.workers": 0,
              "model.image.patch_size": 8, "model.text.max_len": 16, "train.batch_size": 8, "train.steps": 20,
              "train.eval_every": 10, "train.checkpoint_every": 4, "optim.warmup_steps": 2,
              "evals.retrieval.splits": "('train',)", "evals.retrieval.max_examples": 32,
              "evals.retrieval.batch_size": 8}
    values.update(extra)
    labelled = tuple(f"--config.evals.{e}" for e in ("zeroshot", "linear_probe", "fewshot", "compositional"))
    out = [o for o in tiny_overrides(data_dir, **values) if not o.startswith(labelled)]
    return out


@pytest.mark.slow
def test_twenty_steps_on_ingested_shards_and_a_kill_reproduces_them(shards_dataset, tmp_path):
    data_dir, _, _ = shards_dataset
    overrides = _own_overrides(data_dir)
    cfg = config_lib.load_config("configs/own_data.py:wds", [o[len("--config."):] for o in overrides])
    reference_dir = str(tmp_path / "reference")
    train.train(cfg, reference_dir)
    reference = metrics.read_metrics(reference_dir)
    assert reference[-1]["step"] == 20 and np.isfinite(reference[-1]["train/loss"])
    assert "retrieval/train/i2t_r1" in reference[-1]

    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/own_data.py:wds", "--workdir", workdir]
    cmd += overrides
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "8")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    timing = ("train/examples_per_sec",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics.read_metrics(workdir)) == strip(reference)


def _run(argv):
    return ingest.run(ingest.parse_args(argv + ["--workers", "1", "--quiet"]))


def test_a_csv_with_several_captions_per_image_labels_and_missing_files(tmp_path):
    root = tmp_path / "csv"
    (root / "img").mkdir(parents=True)
    rows = [b"filepath,title,label"]
    for key, data, caption, ext in good_examples(8, seed=1):
        (root / "img" / f"{key}.{ext}").write_bytes(data)
        colour = caption.split()[1]
        rows += [f"img/{key}.{ext},{caption},{colour}".encode(), f"img/{key}.{ext},one more: {caption},{colour}".encode()]
    rows += [b"img/absent.jpg,a red square,red", b"img/s1_000.jpeg,a \xff caption,red"]
    (root / "data.csv").write_bytes(b"\n".join(rows) + b"\n")
    report = _run(["table", str(root / "data.csv"), "--name", "csvdata", "--data_dir", str(tmp_path / "data"),
                   "--label_key", "label", "--min_size", "16"])
    assert report["skipped"] == {"missing_image": 1}
    assert report["captions_dropped_from_kept_examples"] == {"non_utf8_caption": 1}
    cfg = config_lib.load_config("configs/own_data.py:csvdata", [f"data.data_dir={tmp_path / 'data'}",
                                                                 "data.tokenizer=bytes", "data.label_key=label"])
    ds = pipeline.open_dataset(cfg.data)
    assert ds.class_names == sorted(COLOURS)
    source = ds.sources["train"]
    assert len(source) == 8 and all(len(source[i]["caption"]) == 2 for i in range(8))
    colours = [ds.class_names[source[i]["label"]] for i in range(8)]
    assert colours == [source[i]["caption"][0].decode().split()[1] for i in range(8)]
    # Training samples one caption per example and step, as a function of (seed, position).
    def sampled(seed):
        it = iter(pipeline.train_dataset(ds, cfg.data, 48, 8, seed))
        return [bytes((t[t > 1] - 2).astype(np.uint8)).decode() for _ in range(6) for t in next(it)["text"]]

    first = sampled(0)
    assert first == sampled(0) and first != sampled(1)
    assert {c.startswith("one more: ") for c in first} == {True, False}


def test_a_folder_with_sidecar_captions_and_class_directories(tmp_path):
    root = tmp_path / "folder"
    goods = good_examples(8, seed=2)
    for key, data, caption, ext in goods:
        colour = caption.split()[1]
        (root / colour).mkdir(parents=True, exist_ok=True)
        (root / colour / f"{key}.{ext}").write_bytes(data)
        if key != goods[0][0]:  # the first is captioned by its class name
            (root / colour / f"{key}.txt").write_text(f"{caption}\n\n{caption}, again\n")
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "red" / "empty.txt").write_text("a red square")
    report = _run(["folder", str(root), "--name", "folderdata", "--data_dir", str(tmp_path / "data"),
                   "--label_from_dir", "--min_size", "16", "--holdout_fraction", "0.3"])
    assert report["skipped"] == {"undecodable_image": 1}
    assert sum(report["kept"].values()) == 8 and report["kept"]["holdout"] > 0
    import tensorflow_datasets as tfds

    builder = tfds.builder("folderdata", data_dir=str(tmp_path / "data"))
    source = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
    examples = [source[s][i] for s in ("train", "holdout") for i in range(len(source[s]))]
    by_key = {os.path.basename(e["key"].decode()).split(".")[0]: e for e in examples}
    assert [c.decode() for c in by_key[goods[0][0]]["caption"]] == [goods[0][2].split()[1]]
    assert [c.decode() for c in by_key[goods[1][0]]["caption"]] == [goods[1][2], goods[1][2] + ", again"]
    for e in examples:
        assert builder.info.features["label"].names[e["label"]] in e["key"].decode()


def test_a_killed_ingestion_redoes_only_unfinished_units_and_hosts_split_the_units(tmp_path, monkeypatch):
    write_shards(str(tmp_path / "shards"))
    os.remove(tmp_path / "shards" / "00003.tar")
    base = ["webdataset", str(tmp_path / "shards"), "--name", "parts", "--data_dir", str(tmp_path / "data"),
            "--min_size", "16", "--process_count", "2", "--wait_seconds", "0"]
    with pytest.raises(ingest.ConfigError, match="were not finished by the other processes"):
        _run(base + ["--process_index", "0"])  # units 0 and 2 done, then it gives up waiting for unit 1
    assert _run(base + ["--process_index", "1"]) == {}  # unit 1
    done = []
    monkeypatch.setattr(ingest, "process_unit", lambda job: done.append(job[0]))
    report = _run(base + ["--process_index", "0"])
    assert done == [] and report["kept"] == {"train": 38}  # no --dedup, default caption length
    with pytest.raises(ingest.ConfigError, match="other inputs or options"):
        os.makedirs(tmp_path / "data" / "parts" / "_ingest" / "train")
        with open(tmp_path / "data" / "parts" / "_ingest" / "train" / "plan.json", "w") as f:
            json.dump({"fingerprint": "another command"}, f)
        _run(base[:-4] + ["--min_size", "20"])
    assert _run(base + ["--process_index", "0"])["kept"] == {"train": 38}  # already ingested: nothing redone


def test_bad_ingest_arguments_are_one_error_line(tmp_path):
    for argv, needle in [(["webdataset", str(tmp_path / "nothing"), "--name", "x"], "no such file"),
                         (["webdataset", str(tmp_path), "--name", "Bad-Name"], "--name"),
                         (["table", str(tmp_path / "t.csv"), "--name", "x"], "column 'filepath'")]:
        (tmp_path / "t.csv").write_text("path,caption\na.jpg,hello\n")
        proc = ingest_cli(*argv, "--data_dir", str(tmp_path / "data"), check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error:") and needle in proc.stderr, proc.stderr
