"""A Hugging Face base model directory seen through its safetensors headers only.

Export, merge and validation need each tensor's file, dtype and shape, and sometimes one tensor's bytes,
never the whole model: this index reads headers (kilobytes) and leaves the weights on disk. File names come
from the index JSON's weight_map values and must be plain names inside the directory; tensor names are
never used to build a path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from id3_ds.errors import ID3Error
from id3_ds.files import safetensors_io as st

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class BaseTensor:
    file: str
    info: st.TensorInfo


class BaseModel:
    """Tensor name -> (shard file, header entry) for a base model directory."""

    def __init__(self, root: Path, files: list[str], headers: dict[str, st.Header], sharded: bool) -> None:
        self.root = root
        self.files = files  # shard file names, in index order
        self.headers = headers
        self.sharded = sharded
        self.tensors: dict[str, BaseTensor] = {}
        for fn in files:
            for name, info in headers[fn].tensors.items():
                if name in self.tensors:
                    raise ID3Error(f"base {root}: tensor {name!r} appears in two shards; the base is corrupt")
                self.tensors[name] = BaseTensor(fn, info)

    @staticmethod
    def open(path: str | Path) -> BaseModel:
        root = Path(path)
        if not root.is_dir():
            raise ID3Error(f"base model directory {root} does not exist: pass the directory of the base model")
        if (root / INDEX).is_file():
            try:
                index = json.loads((root / INDEX).read_text())
                weight_map = index["weight_map"]
                assert isinstance(weight_map, dict)
            except Exception:
                raise ID3Error(f"{root / INDEX} is not a valid safetensors index: the base is corrupt") from None
            files = list(dict.fromkeys(weight_map.values()))
            for fn in files:
                if not isinstance(fn, str) or not _plain_name(fn):
                    raise ID3Error(f"{root / INDEX} names shard {fn!r}, which is not a plain file name in the base")
            headers = {fn: st.read_header(root / fn, "base shard") for fn in files}
            base = BaseModel(root, files, headers, sharded=True)
            for name, fn in weight_map.items():
                if name not in base.tensors or base.tensors[name].file != fn:
                    raise ID3Error(f"{root / INDEX} maps {name!r} to {fn}, which does not hold it: the base is corrupt")
            return base
        if (root / SINGLE).is_file():
            return BaseModel(root, [SINGLE], {SINGLE: st.read_header(root / SINGLE, "base model")}, sharded=False)
        if any((root / p).exists() for p in _PICKLED):
            raise ID3Error(
                f"base {root} holds only pickled pytorch_model.bin weights, which id3-ds never loads: "
                "re-save it with save_pretrained(..., safe_serialization=True)"
            )
        raise ID3Error(f"{root} has no {SINGLE} or {INDEX}: it is not a Hugging Face safetensors model directory")

    @property
    def numel(self) -> int:
        return sum(t.info.numel for t in self.tensors.values())

    def get(self, name: str) -> BaseTensor:
        t = self.tensors.get(name)
        if t is None:
            hint = ""
            if name.startswith("module.") and name[len("module.") :] in self.tensors:
                hint = " (the name carries a wrapper's 'module.' prefix)"
            raise ID3Error(
                f"parameter {name!r} is not in the base model {self.root}{hint}: use the base the run was trained "
                "from, or a checkpoint whose parameter names are the base's state-dict names"
            )
        return t

    def read(self, name: str) -> tuple[torch.Tensor, str]:
        """One tensor (from disk, its own dtype) and the sha256 of its stored bytes."""
        t = self.get(name)
        header = self.headers[t.file]
        with open(self.root / t.file, "rb") as f:
            buf = st.read_bytes(f, header, t.info)
        return st.to_tensor(buf, t.info), hashlib.sha256(buf).hexdigest()


def _plain_name(fn: str) -> bool:
    return fn not in ("", ".", "..") and "/" not in fn and "\\" not in fn and Path(fn).name == fn


def tensor_digest(name: str, dtype: str, shape: tuple[int, ...], sha: str) -> str:
    """One line of the fingerprint: the tensor's identity and the hash of its bytes."""
    return f"{name}\t{dtype}\t{list(shape)}\t{sha}\n"


def combine(entries: dict[str, dict]) -> str:
    """The fingerprint digest: sha256 over the sorted per-tensor lines (name, dtype, shape, sha256)."""
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        h.update(tensor_digest(name, e["dtype"], tuple(e["shape"]), e["sha256"]).encode())
    return h.hexdigest()
