"""Readers of the forms people keep image–text data in, for ``ingest``.

A source kind is a class with ``add_arguments`` (its command-line options),
``plan(inputs, args) -> Plan`` (cheap: lists the work units, each an input
shard or a slice of a table or folder, and the class names if the source has
labels) and ``read(unit, args) -> Iterator[Raw]`` (the raw examples of one
unit, unvalidated). ``SOURCES`` maps the ``ingest`` subcommand to the class;
a new form is one class here and one line there.

* ``webdataset``: tar shards as img2dataset and webdataset write them —
  members grouped by key (the member's path up to the first dot of its file
  name), the image in ``key.jpg|jpeg|png|webp|...``, the caption in
  ``key.txt`` (or the "caption" field of ``key.json``).
* ``table``: CSV/TSV/Parquet tables of (image path, caption[, label]); rows
  that name the same image are one example with several captions.
* ``folder``: image files anywhere under a directory, each with its caption
  file beside it (``a/b.jpg`` → ``a/b.txt``, one caption per non-empty line);
  ``--label_from_dir`` labels each image by its first sub-directory.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import tarfile
from typing import Any, Iterator, Sequence

from vlm_jax.errors import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")


@dataclasses.dataclass
class Raw:
    """One example as the source holds it: image bytes (None: missing), the
    captions' raw bytes, the label name (None: unlabelled)."""

    key: str
    image: bytes | None
    captions: list[bytes]
    label: str | None = None


@dataclasses.dataclass
class Plan:
    units: list[dict[str, Any]]  # JSON-able; one per output shard
    label_names: list[str] | None = None


class DamagedInput(Exception):
    """An input file ended early or is corrupt; ``lost`` examples went with it."""

    def __init__(self, path: str, detail: str, lost: int):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail, self.lost = path, detail, lost


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None


def _expand(inputs: Sequence[str], suffixes: tuple[str, ...], what: str) -> list[str]:
    """Files named, files matching a glob, and files with ``suffixes`` directly in named directories."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            out += sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(suffixes))
        elif os.path.isfile(item):
            out.append(item)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise ConfigError(f"input {item!r}: no such file, directory or pattern")
            out += matches
    if not out:
        raise ConfigError(f"inputs {list(inputs)}: no {what} found (looked for {', '.join(suffixes)})")
    return [os.path.abspath(p) for p in out]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# --------------------------------------------------------------------------- webdataset


class WebDataset:
    """Tar shards: one unit per shard."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", help="tar files, directories holding them, or glob patterns")

    @staticmethod
    def plan(args: argparse.Namespace) -> Plan:
        return Plan([{"tar": path} for path in _expand(args.inputs, (".tar",), "tar shards")])

    @staticmethod
    def read(unit: dict[str, Any], args: argparse.Namespace) -> Iterator[Raw]:
        path = unit["tar"]
        key, members = None, {}
        try:
            with tarfile.open(path, "r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, name = os.path.split(info.name)
                    if "." not in name or name.startswith("."):
                        continue
                    stem, ext = name.split(".", 1)
                    this = f"{folder}/{stem}" if folder else stem
                    if this != key and key is not None:
                        yield WebDataset._example(key, members)
                        members = {}
                    key = this
                    members[ext.lower()] = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            # The example being gathered when the file broke is lost with it.
            raise DamagedInput(path, f"{type(e).__name__}: {e}", 1 if key is not None else 0) from None
        if key is not None:
            yield WebDataset._example(key, members)

    @staticmethod
    def _example(key: str, members: dict[str, bytes]) -> Raw:
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        captions: list[bytes] = []
        if "txt" in members:
            captions = [members["txt"]]
        elif "json" in members:
            try:
                caption = json.loads(members["json"]).get("caption")
            except (ValueError, AttributeError):
                caption = None
            if isinstance(caption, str):
                captions = [caption.encode("utf-8", "surrogateescape")]
        return Raw(key, image, captions)


# --------------------------------------------------------------------------- tables


class Table:
    """CSV/TSV/Parquet tables; rows naming one image are one example."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", help=".csv, .tsv or .parquet files")
        p.add_argument("--image_key", default="filepath", help="column of image paths (open_clip's --csv-img-key)")
        p.add_argument("--caption_key", default="title", help="column of captions (open_clip's --csv-caption-key)")
        p.add_argument("--label_key", default="", help="column of class names (optional)")
        p.add_argument("--separator", default="", help="CSV field separator (default: tab for .tsv, comma otherwise)")
        p.add_argument("--image_root", default="",
                       help="directory relative image paths start from (default: the table's own directory)")

    @staticmethod
    def _rows(path: str, args: argparse.Namespace) -> list[dict[str, Any]]:
        columns = [args.image_key, args.caption_key] + ([args.label_key] if args.label_key else [])
        if path.lower().endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError(f"input {path!r}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
            schema = pq.read_schema(path)
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise ConfigError(f"input {path!r}: no column {missing[0]!r} (columns: {schema.names}); "
                                  f"name the right one with --image_key/--caption_key/--label_key")
            return pq.read_table(path, columns=columns).to_pylist()
        sep = args.separator or ("\t" if path.lower().endswith(".tsv") else ",")
        # surrogateescape keeps bytes that are not UTF-8 so that validation can count them
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=sep)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"input {path!r}: no column {missing[0]!r} (columns: {reader.fieldnames}); "
                                  f"name the right one with --image_key/--caption_key/--label_key")
            return list(reader)

    @staticmethod
    def _examples(args: argparse.Namespace) -> list[tuple[str, list[bytes], str | None, str]]:
        """(image path, captions, label, key: the path as the table writes it) per distinct image,
        in first-appearance order."""
        cache_key = (tuple(args.inputs), args.image_key, args.caption_key, args.label_key, args.separator, args.image_root)
        if _TABLE_CACHE.get("key") == cache_key:
            return _TABLE_CACHE["examples"]
        grouped: dict[str, tuple[list[bytes], str | None, str]] = {}
        for table in _expand(args.inputs, (".csv", ".tsv", ".parquet"), "tables"):
            root = args.image_root or os.path.dirname(table)
            for row in Table._rows(table, args):
                raw_path = row[args.image_key]
                if raw_path is None:
                    continue
                key = raw_path.decode("utf-8", "surrogateescape") if isinstance(raw_path, bytes) else str(raw_path)
                path = os.path.normpath(os.path.join(root, key))
                caption = row[args.caption_key]
                if caption is None:
                    caption_bytes = b""
                elif isinstance(caption, bytes):
                    caption_bytes = caption
                else:
                    caption_bytes = str(caption).encode("utf-8", "surrogateescape")
                label = str(row[args.label_key]) if args.label_key and row[args.label_key] is not None else None
                captions, _, _ = grouped.setdefault(path, ([], label, key))
                captions.append(caption_bytes)
        examples = [(p, caps, label, key) for p, (caps, label, key) in grouped.items()]
        _TABLE_CACHE.update(key=cache_key, examples=examples)
        return examples

    @staticmethod
    def plan(args: argparse.Namespace) -> Plan:
        examples = Table._examples(args)
        units = [{"rows": [s, e]} for s, e in _chunks(len(examples), args.examples_per_shard)]
        labels = sorted({lab for _, _, lab, _ in examples if lab is not None}) if args.label_key else None
        return Plan(units, labels)

    @staticmethod
    def read(unit: dict[str, Any], args: argparse.Namespace) -> Iterator[Raw]:
        start, stop = unit["rows"]
        for path, captions, label, key in Table._examples(args)[start:stop]:
            yield Raw(key, _read_file(path), captions, label)


_TABLE_CACHE: dict[str, Any] = {}  # a worker reads the tables once, not once per unit


# --------------------------------------------------------------------------- folders


class Folder:
    """Images with sidecar caption files under one or more directories."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("inputs", nargs="+", help="directories")
        p.add_argument("--label_from_dir", action="store_true",
                       help="label each image by its first sub-directory; an image without a caption "
                            "file is then captioned by that name")

    @staticmethod
    def plan(args: argparse.Namespace) -> Plan:
        files: list[list[str]] = []
        for root in args.inputs:
            if not os.path.isdir(root):
                raise ConfigError(f"input {root!r}: not a directory")
            root = os.path.abspath(root)
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                for name in sorted(names):
                    if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                        files.append([root, os.path.relpath(os.path.join(folder, name), root)])
        if not files:
            raise ConfigError(f"inputs {args.inputs}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
        labels = None
        if args.label_from_dir:
            labels = sorted({rel.split(os.sep)[0] for _, rel in files if os.sep in rel})
            if not labels:
                raise ConfigError(f"--label_from_dir: the images under {args.inputs} are not in sub-directories")
        units = [{"files": files[s:e]} for s, e in _chunks(len(files), args.examples_per_shard)]
        return Plan(units, labels)

    @staticmethod
    def read(unit: dict[str, Any], args: argparse.Namespace) -> Iterator[Raw]:
        for root, rel in unit["files"]:
            path = os.path.join(root, rel)
            label = rel.split(os.sep)[0] if args.label_from_dir and os.sep in rel else None
            text = _read_file(os.path.splitext(path)[0] + ".txt")
            if text is not None:
                captions = [line for line in text.splitlines() if line.strip()] or [b""]
            elif label is not None:
                captions = [label.encode("utf-8", "surrogateescape")]
            else:
                captions = []
            yield Raw(rel, _read_file(path), captions, label)  # the key does not depend on where the folder is


SOURCES = {
    "webdataset": WebDataset,
    "table": Table,
    "folder": Folder,
}
