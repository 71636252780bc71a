"""The one safetensors reader of id3-ds (strict), its streaming writer, and the atomic whole-file save.

Every safetensors file id3-ds reads (deltas, base model shards, mask shards, checkpoint LoRA matrices) goes
through `read_header` / `read_tensor` / `load_tensors` here, never `safetensors.safe_open`. Why: a
hand-broken or fuzzed file can make the Rust reader panic, and a pyo3 panic is not an `Exception`, so it
would escape the project's one-error contract (callers would need `except BaseException`). Parsing the
header ourselves (8-byte little-endian length, then JSON, bounds-checked) turns every malformed file into
one `ID3Error` naming it, and reading one tensor's bytes at a time is what lets `merge` stream a shard
without holding it in memory. Writing whole files uses safetensors' own `save_file` (it cannot produce a
malformed file) inside `atomic_file`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from id3_ds.errors import ID3Error

# safetensors dtype names <-> torch dtypes (only those the project meets; others are refused clearly)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a safetensors file (offsets relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def ordered(self) -> list[TensorInfo]:
        """Tensors in file order (by offset): the order a streaming pass reads them."""
        return sorted(self.tensors.values(), key=lambda t: t.begin)


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


def read_header(path: str | os.PathLike, what: str = "safetensors file") -> Header:
    """Parse and bounds-check the header of `path`; every defect is one `ID3Error`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ID3Error(f"{what} {path} is truncated (no header): it is corrupt; re-create it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or 8 + n > size:
                raise ID3Error(f"{what} {path} has a header longer than the file: it is truncated or corrupt")
            raw = f.read(n)
    except FileNotFoundError:
        raise ID3Error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ID3Error(f"{what} {path} is a directory, not a file") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ID3Error(f"{what} {path} has an unreadable header: it is corrupt; re-create it") from None
    if not isinstance(doc, dict):
        raise ID3Error(f"{what} {path} has a header that is not a JSON object: it is corrupt")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ID3Error(f"{what} {path} has malformed __metadata__: it is corrupt")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(path, what, name, entry, data_len)
    spans = sorted((t.begin, t.end) for t in tensors.values() if t.end > t.begin)
    for (_, e0), (b1, _) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ID3Error(f"{what} {path} has overlapping tensors: it is corrupt; re-create it")
    return Header(path, 8 + n, tensors, dict(meta))


def _tensor_info(path: Path, what: str, name: str, entry: object, data_len: int) -> TensorInfo:
    bad = f"{what} {path}: tensor {name!r} has a malformed header entry; the file is corrupt"
    if not isinstance(entry, dict):
        raise ID3Error(bad)
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ID3Error(f"{what} {path}: tensor {name!r} has unsupported dtype {dtype!r}")
    ints = (isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*(shape or []), *(offs or [])])
    if not isinstance(shape, list) or not isinstance(offs, list) or len(offs) != 2 or not all(ints):
        raise ID3Error(bad)
    begin, end = offs
    info = TensorInfo(name, dtype, tuple(shape), begin, end)
    if end < begin or end > data_len:
        raise ID3Error(f"{what} {path}: tensor {name!r} lies past the end of the file; it is truncated or corrupt")
    if info.numel * _itemsize(dtype) != end - begin:
        raise ID3Error(f"{what} {path}: tensor {name!r} has {end - begin} bytes but its shape needs more or less")
    return info


def read_bytes(f: BinaryIO, header: Header, info: TensorInfo) -> bytearray:
    """The raw little-endian bytes of one tensor (nothing else of the file is read)."""
    buf = bytearray(info.nbytes)
    f.seek(header.data_start + info.begin)
    got = f.readinto(buf)
    if got != info.nbytes:
        raise ID3Error(f"{header.path} ended inside tensor {info.name!r}: the file is truncated")
    return buf


def to_tensor(buf: bytearray, info: TensorInfo) -> torch.Tensor:
    """A tensor sharing `buf` (no copy), shaped as recorded."""
    if info.numel == 0:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


def read_tensor(f: BinaryIO, header: Header, info: TensorInfo) -> torch.Tensor:
    return to_tensor(read_bytes(f, header, info), info)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes safetensors stores for `t` (CPU is little-endian, as the format requires)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Writes a safetensors file tensor by tensor, in a declared order, without holding it all.

    The header needs every offset up front, so the caller declares (name, dtype, shape) first; then
    `write` must be called once per tensor, in that order. `copy_from` moves an untouched tensor's bytes
    straight from the source file in bounded chunks.
    """

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> None:
        doc: dict[str, object] = {}
        if metadata:
            doc["__metadata__"] = metadata
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in specs:
            n = 1
            for d in shape:
                n *= d
            nbytes = n * _itemsize(dtype)
            doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(doc, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def _expect(self, name: str, nbytes: int) -> None:
        want, size = self._order[self._next]
        if want != name or size != nbytes:
            raise RuntimeError(f"StreamWriter: got {name} ({nbytes} bytes), expected {want} ({size} bytes)")
        self._next += 1

    def write(self, name: str, data: memoryview | bytes | bytearray) -> None:
        self._expect(name, len(memoryview(data).cast("B")))
        self._f.write(data)

    def copy_from(self, name: str, src: BinaryIO, header: Header, info: TensorInfo) -> None:
        self._expect(name, info.nbytes)
        src.seek(header.data_start + info.begin)
        left = info.nbytes
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ID3Error(f"{header.path} ended inside tensor {info.name!r}: the file is truncated")
            self._f.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.close()
            raise RuntimeError("StreamWriter closed before every declared tensor was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def load_tensors(
    path: str | os.PathLike, what: str = "safetensors file"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a (small) safetensors file, plus its metadata; any defect is one `ID3Error`."""
    header = read_header(path, what)
    with open(header.path, "rb") as f:
        tensors = {info.name: read_tensor(f, header, info) for info in header.ordered()}
    return tensors, header.metadata


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], mode: int | None = None
) -> None:
    """Write a safetensors file atomically: it appears whole under `path` or not at all."""
    from safetensors.torch import save_file

    from id3_ds.files.atomic import atomic_file

    with atomic_file(path, mode=mode) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
