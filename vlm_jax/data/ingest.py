"""Your own image–text data as a TFDS dataset (ArrayRecord shards).

    python -m vlm_jax.data.ingest webdataset /data/img2dataset_out --name mydata --data_dir ./data
    python -m vlm_jax.data.ingest table captions.csv --name mydata --data_dir ./data
    python -m vlm_jax.data.ingest folder /data/images --name mydata --data_dir ./data

writes ``DATA_DIR/NAME/1.0.0/``: ``NAME-SPLIT.array_record-0000i-of-0000n``
shards, ``dataset_info.json`` and ``features.json`` — a prepared TFDS dataset
that ``config.data.dataset=NAME`` with ``config.data.data_dir=DATA_DIR`` opens
like any other (random access, per-process sharding, exact resume).

Features: ``image`` (encoded JPEG or PNG, RGB), ``caption`` (a list of one or
more captions; training samples one per step), ``key`` (where the example came
from) and, for labelled sources, ``label`` (a ClassLabel).

Every example is checked before it is written: the image fully decoded
(undecodable, truncated, too small), every caption decoded as UTF-8 and
checked for length, and optionally the image bytes compared with every
earlier example's. An example that fails is not written and is counted under
its reason; the report (printed, and ``ingest_report.SPLIT.json`` beside the
shards) lists the counts and the first keys of each.

Images already JPEG or PNG in RGB are stored as they are; any other format or
mode is re-encoded to RGB (PNG if the source was lossless, else JPEG), and
``--shorter_side N`` re-encodes larger images with their shorter side N.

The work is split into units (one per tar shard, or ``--examples_per_shard``
rows or files), run by ``--workers`` processes, on ``--process_count`` hosts
(each runs the same command with its ``--process_index``; process 0 waits for
the others and finishes). Each finished unit is kept under
``DATA_DIR/NAME/_ingest/SPLIT/``: a killed ingestion restarted with the same
command redoes only unfinished units.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Any

from PIL import Image

from vlm_jax.data import images, sources
from vlm_jax.errors import ConfigError

VERSION = "1.0.0"
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

# Every reason an example is not written, and what it means.
REASONS = {
    "missing_image": "no image: the file or member is missing or unreadable",
    "undecodable_image": "not an image, or zero bytes",
    "truncated_image": "the image ends early or its data is corrupt",
    "image_too_small": "the image's shorter side is below --min_size",
    "missing_caption": "no caption",
    "non_utf8_caption": "a caption is not UTF-8",
    "empty_caption": "a caption is empty or only whitespace",
    "overlong_caption": "a caption is longer than --max_caption_chars",
    "missing_label": "the source is labelled but this example has no label",
    "duplicate_image": "the same image bytes as an earlier example (--dedup)",
    "damaged_input": "lost with a damaged input file (the rest of that file is counted under damaged_inputs)",
}
# Images stored as they are; others are re-encoded (PNG when the source was lossless).
_KEPT_FORMATS = ("JPEG", "PNG")
_LOSSLESS = ("PNG", "GIF", "BMP", "TIFF", "PPM", "WEBP_LOSSLESS")
_EXAMPLES_PER_REASON = 5


def features(label_names: list[str] | None):
    import tensorflow_datasets as tfds

    feats = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
        "caption": tfds.features.Sequence(tfds.features.Text()),
        "key": tfds.features.Text(),
    }
    if label_names is not None:
        feats["label"] = tfds.features.ClassLabel(names=label_names)
    return tfds.features.FeaturesDict(feats)


# --------------------------------------------------------------------------- checking one example


@dataclasses.dataclass
class Checked:
    example: dict[str, Any] | None  # None: skipped
    reason: str | None = None
    digest: str | None = None  # of the source image bytes, for --dedup
    captions_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def check_captions(raw: list[bytes], max_chars: int) -> tuple[list[str], collections.Counter, str | None]:
    """The usable captions (stripped), the reasons of the others, and the
    example's skip reason if none is usable."""
    kept, dropped = [], collections.Counter()
    for c in raw:
        try:
            text = c.decode("utf-8")
        except UnicodeDecodeError:
            dropped["non_utf8_caption"] += 1
            continue
        text = text.strip()
        if not text:
            dropped["empty_caption"] += 1
        elif len(text) > max_chars:
            dropped["overlong_caption"] += 1
        else:
            kept.append(text)
    if kept:
        return kept, dropped, None
    if not raw:
        return [], dropped, "missing_caption"
    first_bad = next(r for r in ("non_utf8_caption", "empty_caption", "overlong_caption") if dropped[r])
    return [], dropped, first_bad


def stored_image(img: Image.Image, data: bytes, shorter_side: int, quality: int) -> bytes:
    """The bytes to store: the source's if usable as they are, else re-encoded RGB."""
    fmt = img.format or ""
    lossless = fmt in _LOSSLESS or (fmt == "WEBP" and getattr(img, "info", {}).get("lossless"))
    small_enough = not shorter_side or min(img.size) <= shorter_side
    if fmt in _KEPT_FORMATS and img.mode == "RGB" and small_enough:
        return data
    pil = Image.fromarray(images.to_rgb(img))
    if not small_enough:
        scale = shorter_side / min(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    if lossless and small_enough:
        pil.save(out, "PNG", optimize=False)
    else:
        pil.save(out, "JPEG", quality=quality)
    return out.getvalue()


def check_example(raw: sources.Raw, args: argparse.Namespace, labelled: bool) -> Checked:
    if raw.image is None:
        return Checked(None, "missing_image")
    try:
        img = images.open_image(raw.image)
    except images.ImageError as e:
        return Checked(None, f"{e.reason}_image")
    if min(img.size) < args.min_size:
        return Checked(None, "image_too_small")
    captions, dropped, reason = check_captions(raw.captions, args.max_caption_chars)
    if reason:
        return Checked(None, reason)
    if labelled and raw.label is None:
        return Checked(None, "missing_label")
    example = {"image": stored_image(img, raw.image, args.shorter_side, args.jpeg_quality),
               "caption": captions, "key": raw.key}
    if labelled:
        example["label"] = raw.label
    digest = hashlib.sha256(raw.image).hexdigest()[:32] if args.dedup else None
    return Checked(example, None, digest, dropped)


def holdout(key: str, fraction: float) -> bool:
    """Whether ``key`` goes to the holdout split: a fixed function of the key."""
    return fraction > 0 and int(hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:15], 16) < fraction * 16**15


# --------------------------------------------------------------------------- one unit


def _unit_paths(work: str, index: int) -> tuple[str, str]:
    stem = os.path.join(work, f"unit-{index:05d}")
    return stem + ".json", stem


def process_unit(job: tuple[int, dict[str, Any], dict[str, Any], str, list[str] | None]) -> dict[str, Any]:
    """Reads, checks and writes one unit; returns (and saves) its record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    index, unit, arg_dict, work, label_names = job
    args = argparse.Namespace(**arg_dict)
    source = sources.SOURCES[args.source]
    feats = features(label_names)
    record_path, stem = _unit_paths(work, index)
    targets = [args.split] + (["holdout"] if args.holdout_fraction > 0 else [])
    writers = {t: ArrayRecordWriter(f"{stem}.{t}.array_record.tmp", "group_size:1") for t in targets}
    counts = {t: 0 for t in targets}
    digests: dict[str, list[list[str]]] = {t: [] for t in targets}  # [digest, key] of each kept example
    skipped: collections.Counter = collections.Counter()
    captions_dropped: collections.Counter = collections.Counter()
    first_keys: dict[str, list[str]] = collections.defaultdict(list)
    damaged: list[dict[str, Any]] = []
    seen: set[str] = set()
    read = 0

    def skip(reason: str, key: str) -> None:
        skipped[reason] += 1
        if len(first_keys[reason]) < _EXAMPLES_PER_REASON:
            first_keys[reason].append(key)

    try:
        for raw in source.read(unit, args):
            read += 1
            checked = check_example(raw, args, label_names is not None)
            if checked.example is None:
                skip(checked.reason, raw.key)
                continue
            if checked.digest is not None:
                if checked.digest in seen:
                    skip("duplicate_image", raw.key)
                    continue
                seen.add(checked.digest)
            target = "holdout" if holdout(raw.key, args.holdout_fraction) else args.split
            writers[target].write(feats.serialize_example(checked.example))
            counts[target] += 1
            captions_dropped.update(checked.captions_dropped)
            if checked.digest is not None:
                digests[target].append([checked.digest, raw.key])
    except sources.DamagedInput as e:
        damaged.append({"input": e.path, "error": e.detail, "examples_before": read})
        for _ in range(e.lost):
            skip("damaged_input", f"{e.path} (after {read} examples)")
        read += e.lost
    for t, w in writers.items():
        w.close()
        os.replace(f"{stem}.{t}.array_record.tmp", f"{stem}.{t}.array_record")
    record = {"unit": index, "read": read, "kept": counts, "skipped": dict(skipped),
              "first_keys": dict(first_keys), "captions_dropped": dict(captions_dropped),
              "damaged_inputs": damaged, "digests": digests}
    tmp = record_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, record_path)  # the unit counts as done only once this exists
    return record


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per update: units and examples done, rate, ETA (stderr)."""

    def __init__(self, total_units: int, done_units: int, quiet: bool):
        self.total, self.done, self.quiet = total_units, done_units, quiet
        self.start, self.start_done = time.time(), done_units
        self.examples = self.skipped = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.examples += sum(record["kept"].values())
        self.skipped += sum(record["skipped"].values())
        now = time.time()
        if self.quiet or (not self.tty and now - self._last < 10 and self.done < self.total):
            return
        self._last = now
        elapsed = now - self.start
        rate = (self.done - self.start_done) / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"ingest: {self.done}/{self.total} units · {self.examples:,} kept · {self.skipped:,} skipped · "
                f"{(self.examples + self.skipped) / max(elapsed, 1e-9):,.0f} examples/s · ETA {_duration(eta)}")
        print(("\r" + line) if self.tty else line, end="" if self.tty and self.done < self.total else "\n",
              file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------- finishing


def _fingerprint(args: argparse.Namespace, plan: sources.Plan) -> str:
    fields = {k: v for k, v in sorted(vars(args).items()) if k not in _FREE_ARGS}
    blob = json.dumps({"args": fields, "units": plan.units, "labels": plan.label_names}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()


# Options that may change between a killed ingestion and its restart.
_FREE_ARGS = ("workers", "quiet", "process_index", "process_count", "wait_seconds", "fit_tokenizer")


def _link_or_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _filtered_copy(src: str, dst: str, drop: set[int]) -> None:
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    reader = ArrayRecordReader(src)
    tmp = dst + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for i in range(reader.num_records()):
        record = reader.read([i])[0]
        if i not in drop:
            writer.write(record)
    writer.close()
    reader.close()
    os.replace(tmp, dst)


def finish(args: argparse.Namespace, plan: sources.Plan, records: list[dict[str, Any]], work: str,
           out_dir: str) -> dict[str, Any]:
    """Cross-unit duplicates, final shard names, TFDS metadata, the report."""
    import tensorflow_datasets as tfds

    targets = [args.split] + (["holdout"] if args.holdout_fraction > 0 else [])
    skipped: collections.Counter = collections.Counter()
    captions_dropped: collections.Counter = collections.Counter()
    first_keys: dict[str, list[str]] = collections.defaultdict(list)
    for r in records:
        skipped.update(r["skipped"])
        captions_dropped.update(r["captions_dropped"])
        for reason, keys in r["first_keys"].items():
            first_keys[reason] = (first_keys[reason] + keys)[:_EXAMPLES_PER_REASON]
    # Duplicates across units: the first occurrence in unit order is kept.
    drops: dict[tuple[int, str], set[int]] = collections.defaultdict(set)
    if args.dedup:
        seen: set[str] = set()
        for r in records:
            for t in targets:
                for i, (digest, key) in enumerate(r["digests"][t]):
                    if digest in seen:
                        drops[(r["unit"], t)].add(i)
                        skipped["duplicate_image"] += 1
                        if len(first_keys["duplicate_image"]) < _EXAMPLES_PER_REASON:
                            first_keys["duplicate_image"].append(key)
                    seen.add(digest)
    os.makedirs(out_dir, exist_ok=True)
    split_infos, kept = [], {}
    for t in targets:
        shards = [(r["unit"], r["kept"][t] - len(drops[(r["unit"], t)])) for r in records]
        shards = [(u, n) for u, n in shards if n > 0]
        kept[t] = sum(n for _, n in shards)
        if not shards:
            continue
        for old in os.listdir(out_dir):  # shards of an earlier ingestion of this split
            if old.startswith(f"{args.name}-{t}.array_record-"):
                os.remove(os.path.join(out_dir, old))
        for k, (unit, _) in enumerate(shards):
            src = f"{_unit_paths(work, unit)[1]}.{t}.array_record"
            dst = os.path.join(out_dir, f"{args.name}-{t}.array_record-{k:05d}-of-{len(shards):05d}")
            if drops[(unit, t)]:
                _filtered_copy(src, dst, drops[(unit, t)])
            else:
                _link_or_copy(src, dst)
        template = tfds.core.ShardedFileTemplate(data_dir=out_dir, template=SHARD_TEMPLATE, dataset_name=args.name,
                                                 split=t, filetype_suffix="array_record")
        num_bytes = sum(os.path.getsize(os.path.join(out_dir, f"{args.name}-{t}.array_record-{k:05d}-of-{len(shards):05d}"))
                        for k in range(len(shards)))
        split_infos.append(tfds.core.SplitInfo(name=t, shard_lengths=[n for _, n in shards], num_bytes=num_bytes,
                                               filename_template=template))
    if not split_infos:
        raise ConfigError(f"no example of {args.inputs} passed the checks; see the report below")
    feats = features(plan.label_names)
    info_path = os.path.join(out_dir, "dataset_info.json")
    if os.path.exists(info_path):  # another split ingested earlier: keep it, if the features agree
        existing = tfds.builder_from_directory(out_dir)
        if existing.info.features.to_json_content() != feats.to_json_content():
            raise ConfigError(f"--name {args.name}: {out_dir} holds splits with other features "
                              f"({sorted(existing.info.features)}{', other class names' if 'label' in feats else ''}); "
                              f"ingest into another --name")
        new = {s.name for s in split_infos}
        split_infos += [s for name, s in existing.info.splits.items() if name not in new]
    tfds.folder_dataset.write_metadata(data_dir=out_dir, features=feats, split_infos=split_infos,
                                       filename_template=SHARD_TEMPLATE, check_data=False,
                                       description=f"Ingested by vlm_jax.data.ingest {args.source} from {args.inputs}")
    report = {
        "name": args.name, "split": args.split, "source": args.source, "inputs": args.inputs,
        "read": sum(r["read"] for r in records), "kept": kept, "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()), "first_keys": dict(first_keys),
        "captions_dropped_from_kept_examples": dict(captions_dropped),
        "damaged_inputs": [d for r in records for d in r["damaged_inputs"]],
        "reasons": {k: REASONS[k] for k in sorted(skipped)},
        "fingerprint": _fingerprint(args, plan),
    }
    _write_json(os.path.join(out_dir, f"ingest_report.{args.split}.json"), report)
    return report


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def print_report(report: dict[str, Any], out_dir: str) -> None:
    kept = ", ".join(f"{n:,} in {t!r}" for t, n in report["kept"].items())
    print(f"ingested {report['read']:,} examples from {report['source']} {report['inputs']}: {kept}; "
          f"{report['skipped_total']:,} skipped")
    if report["skipped"]:
        width = max(len(r) for r in report["skipped"])
        print(f"  {'reason'.ljust(width)}  {'count':>9}  first keys")
        for reason, n in report["skipped"].items():
            keys = ", ".join(report["first_keys"].get(reason, [])[:3])
            print(f"  {reason.ljust(width)}  {n:>9,}  {keys}")
    for d in report["damaged_inputs"]:
        print(f"  damaged input {d['input']}: {d['error']} (after {d['examples_before']} examples)")
    if report["captions_dropped_from_kept_examples"]:
        print(f"  captions dropped from kept examples: {report['captions_dropped_from_kept_examples']}")
    print(f"dataset: {out_dir} (report: ingest_report.{report['split']}.json)")


def fit_tokenizer(name: str, data_dir: str, split: str, vocab_size: int, max_examples: int = 200_000) -> str:
    """Fits a SentencePiece model on the split's captions, beside the dataset."""
    import tensorflow_datasets as tfds

    from vlm_jax.data import tokenizers

    path = os.path.join(data_dir, name, "tokenizer.model")
    source = tfds.builder(name, data_dir=data_dir).as_data_source(
        decoders={"image": tfds.decode.SkipDecoding()})[split]
    n = min(len(source), max_examples)
    captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for i in range(n) for c in source[i]["caption"]]
    tokenizers.train_sentencepiece(captions, path, vocab_size=vocab_size)
    return path


# --------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.data.ingest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    for kind, source in sources.SOURCES.items():
        sp = sub.add_parser(kind, help=source.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        source.add_arguments(sp)
        sp.add_argument("--name", required=True, help="dataset name (config.data.dataset): lower case, digits, _")
        sp.add_argument("--data_dir", default="./data", help="config.data.data_dir")
        sp.add_argument("--split", default="train", help="split to write (ingest again for another split)")
        sp.add_argument("--holdout_fraction", type=float, default=0.0,
                        help="send this fraction of examples (chosen by a hash of their key) to split 'holdout'")
        sp.add_argument("--shorter_side", type=int, default=0,
                        help="re-encode images whose shorter side is larger, to this shorter side (0: keep sizes)")
        sp.add_argument("--jpeg_quality", type=int, default=95)
        sp.add_argument("--min_size", type=int, default=32, help="skip images whose shorter side is smaller")
        sp.add_argument("--max_caption_chars", type=int, default=2000, help="drop longer captions")
        sp.add_argument("--dedup", action="store_true", help="skip images whose bytes equal an earlier example's")
        sp.add_argument("--examples_per_shard", type=int, default=10_000, help="table and folder sources")
        sp.add_argument("--fit_tokenizer", type=int, default=0, metavar="VOCAB",
                        help="fit a SentencePiece model of this vocabulary on the captions, beside the dataset "
                             "(config.data.tokenizer_path may then stay empty)")
        sp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes on this host")
        sp.add_argument("--process_index", type=int, default=0, help="this host, for an ingestion over several")
        sp.add_argument("--process_count", type=int, default=1)
        sp.add_argument("--wait_seconds", type=float, default=86400.0,
                        help="process 0: how long to wait for the other processes' units")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", args.name):
        raise ConfigError(f"--name {args.name!r}: use lower-case letters, digits and _, starting with a letter")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", args.split) or args.split == "holdout" and args.holdout_fraction:
        raise ConfigError(f"--split {args.split!r}: use lower-case letters, digits and _ (and not 'holdout' "
                          f"with --holdout_fraction)")
    checks = [(0 <= args.holdout_fraction < 1, "--holdout_fraction", "must be in [0, 1)"),
              (args.shorter_side >= 0, "--shorter_side", "must be 0 or positive"),
              (1 <= args.jpeg_quality <= 100, "--jpeg_quality", "must be in 1..100"),
              (args.min_size >= 1, "--min_size", "must be positive"),
              (args.max_caption_chars >= 1, "--max_caption_chars", "must be positive"),
              (args.examples_per_shard >= 1, "--examples_per_shard", "must be positive"),
              (args.workers >= 1, "--workers", "must be positive"),
              (0 <= args.process_index < args.process_count, "--process_index", "must be in [0, --process_count)"),
              (args.fit_tokenizer >= 0, "--fit_tokenizer", "must be 0 (none) or a vocabulary size")]
    for ok, flag, what in checks:
        if not ok:
            raise ConfigError(f"{flag}: {what}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Plans, processes this process's unfinished units, and (process 0) finishes."""
    _check_args(args)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    out_dir = os.path.join(data_dir, args.name, VERSION)
    work = os.path.join(data_dir, args.name, "_ingest", args.split)
    plan = sources.SOURCES[args.source].plan(args)
    fingerprint = _fingerprint(args, plan)
    report_path = os.path.join(out_dir, f"ingest_report.{args.split}.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            done = json.load(f)
        if done.get("fingerprint") == fingerprint:
            print(f"already ingested with these inputs and options: {out_dir}")
            return done
    os.makedirs(work, exist_ok=True)
    plan_path = os.path.join(work, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f).get("fingerprint")
        if previous != fingerprint:
            raise ConfigError(f"{work} holds an unfinished ingestion of split {args.split!r} with other inputs "
                              f"or options; rerun that command to finish it, or delete {work} to start over")
    else:
        _write_json(plan_path, {"fingerprint": fingerprint, "units": len(plan.units)})
    mine = [i for i in range(len(plan.units)) if i % args.process_count == args.process_index]
    todo = [i for i in mine if not os.path.exists(_unit_paths(work, i)[0])]
    if len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} units already done", file=sys.stderr)
    progress = Progress(len(mine), len(mine) - len(todo), args.quiet)
    arg_dict = vars(args)
    jobs = [(i, plan.units[i], arg_dict, work, plan.label_names) for i in todo]
    if args.workers == 1 or len(jobs) <= 1:
        for job in jobs:
            progress.update(process_unit(job))
    else:
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            for record in pool.imap_unordered(process_unit, jobs):
                progress.update(record)
    if args.process_index != 0:
        print(f"process {args.process_index}: its {len(mine)} units are done; process 0 finishes", file=sys.stderr)
        return {}
    records = _wait_for_units(work, len(plan.units), args.wait_seconds)
    with open(os.path.join(data_dir, args.name, ".ingest.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer of dataset_info.json at a time
        report = finish(args, plan, records, work, out_dir)
    print_report(report, out_dir)
    if args.fit_tokenizer:
        path = fit_tokenizer(args.name, data_dir, args.split, args.fit_tokenizer)
        print(f"tokenizer: {path}")
    shutil.rmtree(work)
    return report


def _wait_for_units(work: str, n: int, wait_seconds: float) -> list[dict[str, Any]]:
    deadline = time.time() + wait_seconds
    while True:
        missing = [i for i in range(n) if not os.path.exists(_unit_paths(work, i)[0])]
        if not missing:
            break
        if time.time() > deadline:
            raise ConfigError(f"{len(missing)} units (first: {missing[0]}) were not finished by the other processes "
                              f"within --wait_seconds; rerun their commands, then this one")
        time.sleep(5)
    records = []
    for i in range(n):
        with open(_unit_paths(work, i)[0]) as f:
            records.append(json.load(f))
    return records


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: ingest {args.name!r}: {e.strerror or e} ({e.filename or 'no file named'}); "
                         f"fix it and rerun the same command: finished units are kept") from None


if __name__ == "__main__":
    main()
