"""Checkpoint files as flat ``{name: numpy array}`` dicts, read and written without torch.

- ``.safetensors``: an 8-byte little-endian header length, a JSON header
  (``{name: {"dtype", "shape", "data_offsets"}}``, offsets into the byte
  buffer that follows) and the raw little-endian tensor bytes.
- ``.pt`` / ``.bin`` written by ``torch.save`` (PyTorch ≥ 1.6): a zip whose
  ``<archive>/data.pkl`` pickles the objects, with every tensor a call of
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and
  every storage a persistent id ``("storage", <dtype>Storage, key, location,
  numel)`` naming the raw bytes at ``<archive>/data/<key>``. It is read by an
  unpickler that admits only those names (and ``OrderedDict``), so loading
  runs no code from the file; a TorchScript archive (OpenAI's own ``.pt``
  files) is read through torch, which is then needed.
- ``.npz`` (big_vision): ``numpy.savez`` of ``"params/a/b/c"`` keys.

Nested dicts in a ``.pt`` (``{"state_dict": {...}, "epoch": ...}`` from
OpenCLIP's trainer) are flattened with "." and non-tensor leaves dropped;
``vlm_jax.weights`` then picks the model's keys.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

Flat = dict[str, np.ndarray]

# safetensors dtype names <-> numpy
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

# torch's legacy typed-storage class names (still what torch.save pickles) <-> numpy
_TORCH_STORAGES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                   "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_TORCH_NAMES = {np.dtype(v): k for k, v in _TORCH_STORAGES.items()}


class FormatError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and what to do."""


# --------------------------------------------------------------------------- safetensors


def read_safetensors(path: str) -> Flat:
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise FormatError(f"{path}: too short for a safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which vlm_jax does not read")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or end > len(data):
            raise FormatError(f"{path}: tensor {name!r} is truncated or its offsets are wrong (damaged file?)")
        out[name] = np.frombuffer(data[begin:end], dtype.newbyteorder("<")).reshape(shape).copy()
    return out


def write_safetensors(path: str, tensors: Flat, metadata: dict[str, str] | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        a = _contiguous(tensors[name])
        if a.dtype not in _ST_NAMES:
            raise FormatError(f"{path}: cannot write tensor {name!r} of dtype {a.dtype} as safetensors")
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    _atomic_write(path, [struct.pack("<Q", len(text)), text, *blobs])


# --------------------------------------------------------------------------- torch.save zip archives


class _Storage:
    def __init__(self, dtype, data: bytes):
        self.array = np.frombuffer(data, np.dtype(dtype).newbyteorder("<"))


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_):
    a = storage.array
    if not size:
        return np.array(a[offset])  # 0-d
    itemsize = a.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(a[offset:], shape=tuple(size), strides=[s * itemsize for s in stride])
    return np.array(view)  # a contiguous copy, detached from the storage


def _rebuild_parameter(data, *_):
    return data


class TorchScriptArchive(FormatError):
    """The file is a TorchScript archive, which only torch reads."""


class _Unpickler(pickle.Unpickler):
    """Admits only what a state dict is made of; everything else is an error naming it."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module.startswith("__torch__"):
            raise TorchScriptArchive(f"{self.path} is a TorchScript archive")
        raise FormatError(f"{self.path}: holds a {module}.{name} object, which a plain state dict does not; "
                          f"save its state_dict() with torch.save, or export it as .safetensors")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise FormatError(f"{self.path}: unknown persistent object {kind!r}")
        return _Storage(dtype, self.archive.read(f"{self.prefix}data/{key}"))


def _flatten(obj: Any, prefix: str, out: Flat) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, np.ndarray):
        out[prefix] = obj


def read_torch(path: str) -> Flat:
    """A ``torch.save`` zip archive's tensors; TorchScript archives through torch."""
    if not zipfile.is_zipfile(path):
        raise FormatError(f"{path}: not a zip-format torch checkpoint (legacy pre-1.6 torch.save files are not "
                          f"read; re-save with a current torch, or export .safetensors)")
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise FormatError(f"{path}: a zip without <archive>/data.pkl is not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            obj = _Unpickler(io.BytesIO(z.read(pkl[0])), z, prefix, path).load()
        except TorchScriptArchive:
            return _read_torchscript(path)
    out: Flat = {}
    _flatten(obj, "", out)
    return out


def _read_torchscript(path: str) -> Flat:
    try:
        import torch
    except ImportError:
        raise FormatError(f"{path} is a TorchScript archive (as OpenAI's .pt files are); reading it needs torch: "
                          f"install torch, or load it once elsewhere and save model.state_dict() as "
                          f".safetensors") from None
    module = torch.jit.load(path, map_location="cpu")
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in module.state_dict().items()}


class _PickleWriter:
    """Emits the protocol-2 pickle of a ``{name: tensor}`` dict exactly as
    ``torch.save`` lays it out, without importing torch (the names it refers
    to are written as text, never resolved here)."""

    def __init__(self):
        self.out = io.BytesIO()
        self.memo: dict[str, int] = {}

    def op(self, b: bytes) -> None:
        self.out.write(b)

    def string(self, s: str) -> None:
        b = s.encode()
        self.op(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

    def integer(self, i: int) -> None:
        self.op(pickle.BININT + struct.pack("<i", i) if -(1 << 31) <= i < (1 << 31) else
                pickle.LONG1 + bytes([8]) + struct.pack("<q", i))

    def ints(self, xs) -> None:
        self.op(pickle.MARK)
        for x in xs:
            self.integer(int(x))
        self.op(pickle.TUPLE)

    def glob(self, module: str, name: str) -> None:
        key = f"{module}\n{name}\n"
        if key in self.memo:
            self.op(pickle.BINGET + bytes([self.memo[key]]))
            return
        self.op(pickle.GLOBAL + key.encode())
        self.memo[key] = len(self.memo)
        self.op(pickle.BINPUT + bytes([self.memo[key]]))

    def tensor(self, key: str, a: np.ndarray) -> None:
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        self.op(pickle.MARK)  # the storage's persistent id
        self.string("storage")
        self.glob("torch", _TORCH_NAMES[a.dtype])
        self.string(key)
        self.string("cpu")
        self.integer(a.size)
        self.op(pickle.TUPLE + pickle.BINPERSID)
        self.integer(0)
        self.ints(a.shape)
        self.ints([int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)])  # C-contiguous, in elements
        self.op(pickle.NEWFALSE)
        self.glob("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE + pickle.REDUCE)  # backward hooks
        self.op(pickle.TUPLE + pickle.REDUCE)

    def state_dict(self, names: list[str], arrays: list[np.ndarray]) -> bytes:
        self.op(pickle.PROTO + bytes([2]))
        self.glob("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE + pickle.REDUCE)
        self.op(pickle.MARK)
        for i, (name, a) in enumerate(zip(names, arrays)):
            self.string(name)
            self.tensor(str(i), a)
        self.op(pickle.SETITEMS + pickle.STOP)
        return self.out.getvalue()


def write_torch(path: str, tensors: Flat) -> None:
    """A zip archive that ``torch.load`` reads as an ``OrderedDict`` state dict."""
    names = list(tensors)
    arrays = [_contiguous(tensors[n]) for n in names]
    for n, a in zip(names, arrays):
        if a.dtype not in _TORCH_NAMES:
            raise FormatError(f"{path}: cannot write tensor {n!r} of dtype {a.dtype} as a torch checkpoint")
    arrays = [a.astype(a.dtype.newbyteorder("<"), copy=False) for a in arrays]
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", _PickleWriter().state_dict(names, arrays))
        z.writestr(f"{archive}/byteorder", "little")
        for i, a in enumerate(arrays):
            z.writestr(f"{archive}/data/{i}", a.tobytes())
        z.writestr(f"{archive}/version", "3\n")
    _atomic_write(path, [buf.getvalue()])


# --------------------------------------------------------------------------- npz and dispatch


def read_npz(path: str) -> Flat:
    try:
        with np.load(path, allow_pickle=False) as z:
            # numpy stores bfloat16 as 2-byte void; big_vision reads it back the same way
            return {k: z[k].view(ml_dtypes.bfloat16) if z[k].dtype == np.dtype("V2") else z[k] for k in z.files}
    except (ValueError, zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"{path}: not a readable .npz ({e})") from None


def write_npz(path: str, tensors: Flat) -> None:
    buf = io.BytesIO()
    np.savez(buf, **tensors)
    _atomic_write(path, [buf.getvalue()])


READERS = {".safetensors": read_safetensors, ".pt": read_torch, ".pth": read_torch, ".bin": read_torch,
           ".ckpt": read_torch, ".npz": read_npz}
WRITERS = {".safetensors": write_safetensors, ".pt": write_torch, ".pth": write_torch, ".bin": write_torch,
           ".npz": write_npz}


def read(path: str) -> Flat:
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise FormatError(f"{path}: unknown checkpoint extension {ext!r}; vlm_jax reads {sorted(READERS)}")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    return READERS[ext](path)


def write(path: str, tensors: Flat, **kw) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITERS:
        raise FormatError(f"{path}: unknown checkpoint extension {ext!r}; vlm_jax writes {sorted(WRITERS)}")
    WRITERS[ext](path, tensors, **kw)


def _contiguous(x) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.array(x, order="C", copy=None)


def _atomic_write(path: str, chunks: list[bytes]) -> None:
    """Written beside the target and renamed over it: a kill never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
